//! Scale out at run time: a third shard added and removed under concurrent increments,
//! the proxy killed mid-move, reads during a move, refused changes.

use crate::support::{self, http_json as http, ring_owner, Proxy, ProxyProcess, Redis, TempDir};
use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Adds `shard` to the proxy's ring (its sidecar at `http`): a rebalance starts.
pub(crate) async fn add_shard(http: SocketAddr, shard: &Redis) {
    let (status, body) = support::http_json(
        http,
        "POST",
        "/admin/shards",
        &format!("{{\"addr\": \"{}\"}}", shard.addr()),
    )
    .await;
    assert_eq!(status, 202, "{body}");
}

pub(crate) async fn wait_done(addr: SocketAddr, limit: Duration) -> Value {
    let start = std::time::Instant::now();
    loop {
        let (_, p) = http(addr, "GET", "/admin/rebalance", "").await;
        if p["state"] == "done" {
            return p;
        }
        assert!(start.elapsed() < limit, "rebalance not done in time: {p}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn value_on(shards: &[&Redis], key: &str) -> (i64, Vec<u16>) {
    let mut total = 0;
    let mut on = Vec::new();
    for s in shards {
        if let Some(v) = s.get(key) {
            total += v.parse::<i64>().unwrap();
            on.push(s.port);
        }
    }
    (total, on)
}

/// Clients each INCR keys from `keys` until `stop`; returns the acknowledged count per key.
fn load(
    url: String,
    keys: Vec<String>,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<HashMap<String, i64>> {
    tokio::spawn(async move {
        let mut tasks = Vec::new();
        for t in 0..clients {
            let (url, keys, stop) = (url.clone(), keys.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut c = redis::Client::open(url)
                    .unwrap()
                    .get_multiplexed_async_connection()
                    .await
                    .unwrap();
                let mut acked = HashMap::<String, i64>::new();
                for i in 0..1_000_000usize {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let k = &keys[(i * 13 + t * 7) % keys.len()];
                    if redis::cmd("INCR")
                        .arg(k)
                        .query_async::<i64>(&mut c)
                        .await
                        .is_ok()
                    {
                        *acked.entry(k.clone()).or_default() += 1;
                    }
                }
                acked
            }));
        }
        let mut all = HashMap::new();
        for t in tasks {
            for (k, n) in t.await.unwrap() {
                *all.entry(k).or_insert(0) += n;
            }
        }
        all
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_shard_added_and_removed_under_load_keeps_every_count() {
    let (a, b, c) = (Redis::start(), Redis::start(), Redis::start());
    let wal = TempDir::new("grow");
    let mut cfg = support::config(&[&a, &b], &wal);
    cfg.counters.flush_interval = tallyproxy::config::HumanDuration(Duration::from_millis(200));
    let proxy = Proxy::start(cfg).await;
    let keys: Vec<String> = (0..400).map(|i| format!("grow:{i}")).collect();
    // A starting count on the shards, and plain keys with a TTL, which MIGRATE must carry.
    let mut conn = proxy.client().await;
    for k in &keys {
        let _: i64 = redis::cmd("INCRBY")
            .arg(k)
            .arg(10)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    for i in 0..60 {
        let _: () = redis::cmd("SET")
            .arg(format!("plain:{i}"))
            .arg("v")
            .arg("EX")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let (_, _) = http(proxy.http, "POST", "/admin/shutdown-not-a-route", "").await;
    // Land the starting counts so that most keys have something to move.
    tokio::time::sleep(Duration::from_millis(400)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let running = load(proxy.url(), keys.clone(), 8, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    add_shard(proxy.http, &c).await;
    let progress = wait_done(proxy.http, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let acked = running.await.unwrap();
    assert!(acked.values().sum::<i64>() > 500, "the load ran");

    // Counts exact, every key on its new owner only, and moves only into the new shard.
    let (_, shards_json) = http(proxy.http, "GET", "/admin/shards", "").await;
    assert_eq!(shards_json["ring_version"], 2);
    let c_name = format!("redis_{}", c.port);
    let c_json = shards_json["shards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == c_name.as_str())
        .unwrap()
        .clone();
    let moved_in = c_json["keys_moved_in"].as_u64().unwrap();
    // The new shard's share of the hash space depends on its name (and so on its random
    // port): the keys it took are compared with that share, not with a fixed range.
    let ring_share = c_json["share"].as_f64().unwrap();
    assert!(
        moved_in > 0 && moved_in == progress["keys_moved"].as_u64().unwrap(),
        "{shards_json} {progress}"
    );
    let mut conn = proxy.client().await;
    let v: i64 = redis::cmd("GET")
        .arg(&keys[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(v, 10 + acked.get(&keys[0]).copied().unwrap_or(0));
    proxy.stop().await;
    let three = [&a, &b, &c];
    let mut on_c = 0;
    for k in &keys {
        let (total, on) = value_on(&three, k);
        assert_eq!(total, 10 + acked.get(k).copied().unwrap_or(0), "{k}");
        assert_eq!(on, vec![ring_owner(&three, k)], "{k} on its new owner only");
        on_c += usize::from(on == vec![c.port]);
    }
    let share = on_c as f64 / keys.len() as f64;
    // 400 keys: a binomial spread of about 0.024 around the ring's share; 0.08 is > 3 of it.
    assert!(
        (share - ring_share).abs() <= 0.08 && (0.2..=0.46).contains(&share),
        "moved share {share}, ring share {ring_share}"
    );
    for i in 0..60 {
        let k = format!("plain:{i}");
        assert_eq!(
            support::holder(&three, &k),
            vec![ring_owner(&three, &k)],
            "{k}"
        );
        let owner = three
            .iter()
            .find(|s| s.port == ring_owner(&three, &k))
            .unwrap();
        match owner.cmd(&["TTL", &k]) {
            redis::Value::Int(t) => assert!(t > 900, "{k} kept its TTL ({t})"),
            v => panic!("{v:?}"),
        }
    }

    // Remove it again, under load, from a proxy that restarted with the same log (the
    // shard list it had at run time is the recorded one).
    let mut cfg = support::config(&[&a, &b], &wal);
    cfg.counters.flush_interval = tallyproxy::config::HumanDuration(Duration::from_millis(200));
    // The config still lists two shards: a restart applies that difference as a rebalance.
    let proxy = Proxy::start(cfg).await;
    let stop = Arc::new(AtomicBool::new(false));
    let running = load(proxy.url(), keys.clone(), 8, stop.clone());
    wait_done(proxy.http, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let acked2 = running.await.unwrap();
    let (_, shards_json) = http(proxy.http, "GET", "/admin/shards", "").await;
    assert_eq!(
        shards_json["shards"].as_array().unwrap().len(),
        2,
        "{shards_json}"
    );
    assert_eq!(shards_json["ring_version"], 3);
    proxy.stop().await;
    let two = [&a, &b];
    for k in &keys {
        let want = 10 + acked.get(k).copied().unwrap_or(0) + acked2.get(k).copied().unwrap_or(0);
        let (total, on) = value_on(&three, k);
        assert_eq!(total, want, "{k}");
        assert_eq!(on, vec![ring_owner(&two, k)], "{k}");
    }
    match c.cmd(&["DBSIZE"]) {
        redis::Value::Int(n) => assert_eq!(n, 0, "the removed shard holds no keys"),
        v => panic!("{v:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_during_a_move_return_the_whole_count() {
    let (a, b, c) = (Redis::start(), Redis::start(), Redis::start());
    let wal = TempDir::new("reads");
    let mut cfg = support::config(&[&a, &b], &wal);
    cfg.rebalance.keys_per_second = 20; // slow, so that reads meet the move half way
    let proxy = Proxy::start(cfg).await;
    let keys: Vec<String> = (0..200).map(|i| format!("r:{i}")).collect();
    let mut conn = proxy.client().await;
    for (i, k) in keys.iter().enumerate() {
        let _: i64 = redis::cmd("INCRBY")
            .arg(k)
            .arg(i as i64 + 1)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    // Land everything, so the old owners hold the counts.
    let (_, _) = http(proxy.http, "GET", "/healthz", "").await;
    proxy.stop().await;
    let proxy = Proxy::start({
        let mut cfg = support::config(&[&a, &b], &wal);
        cfg.rebalance.keys_per_second = 20;
        cfg
    })
    .await;
    let (status, _) = http(
        proxy.http,
        "POST",
        "/admin/shards",
        &format!("{{\"addr\": \"{}\", \"name\": \"third\"}}", c.addr()),
    )
    .await;
    assert_eq!(status, 202);
    let mut conn = proxy.client().await;
    let (_, p) = http(proxy.http, "GET", "/admin/rebalance", "").await;
    assert_eq!(p["state"], "running", "{p}");
    for (i, k) in keys.iter().enumerate() {
        let v: i64 = redis::cmd("GET")
            .arg(k)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(v, i as i64 + 1, "{k} during the move");
        let (_, body) = http(proxy.http, "GET", &format!("/visits/{}", k), "").await;
        assert!(body.is_object());
    }
    // served_via names the new owner once a key has moved.
    let three = [&a, &b, &c];
    let k = keys
        .iter()
        .find(|k| {
            support::ring_owner(&[&a, &b], k) != a.port && ring_owner_named(&three, k, c.port)
        })
        .cloned();
    if let Some(k) = k {
        let _: i64 = redis::cmd("INCR")
            .arg(&k)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let (_, p) = http(proxy.http, "GET", "/admin/rebalance", "").await;
    assert!(p["keys_moved"].as_u64().unwrap() > 0, "{p}");
    proxy.stop().await;
}

fn ring_owner_named(shards: &[&Redis], key: &str, port: u16) -> bool {
    // The test's third shard is named "third", not redis_<port>: compute with that name.
    let nodes = shards
        .iter()
        .map(|s| tallyproxy::router::ring::Node {
            name: if s.port == port {
                "third".into()
            } else {
                format!("redis_{}", s.port)
            },
            weight: 1,
        })
        .collect();
    let ring = tallyproxy::router::ring::Ring::new(nodes, 160);
    shards[ring.locate(key.as_bytes())].port == port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_killed_mid_move_resumes_and_loses_nothing() {
    let (a, b, c) = (Redis::start(), Redis::start(), Redis::start());
    let wal = TempDir::new("kill-move");
    let shards = vec![a.addr(), b.addr()];
    let slow = "[rebalance]\nkeys_per_second = 40\n";
    let mut proxy = ProxyProcess::start_with(&shards, &wal, "always", "100ms", slow);
    let addr = proxy.addr();
    let keys: Vec<String> = (0..300).map(|i| format!("k9:{i}")).collect();
    {
        let mut conn = redis::Client::open(format!("redis://{addr}/"))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        for k in &keys {
            let _: i64 = redis::cmd("INCRBY")
                .arg(k)
                .arg(7)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let http_addr: SocketAddr = format!("127.0.0.1:{}", proxy.http).parse().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // The load touches a quarter of the keys (a touch moves a key at once); the mover
    // takes the rest at 40 keys per second, so the kill finds it half way.
    let running = load(
        format!("redis://{addr}/"),
        keys[..75].to_vec(),
        4,
        stop.clone(),
    );
    add_shard(http_addr, &c).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (_, p) = http(http_addr, "GET", "/admin/rebalance", "").await;
    assert_eq!(p["state"], "running", "killed mid-move: {p}");
    proxy.kill9();
    let moved_before_kill = p["keys_moved"].as_u64().unwrap();
    assert!(
        moved_before_kill > 0,
        "some keys moved before the kill: {p}"
    );
    stop.store(true, Ordering::Relaxed);
    let acked = running.await.unwrap();

    // Same log, same config (two shards): the recorded rebalance to three resumes first.
    let mut again = ProxyProcess::start_with(
        &shards,
        &wal,
        "always",
        "100ms",
        "[rebalance]\nkeys_per_second = 5000\n",
    );
    let http_addr: SocketAddr = format!("127.0.0.1:{}", again.http).parse().unwrap();
    let p = wait_done(http_addr, Duration::from_secs(30)).await;
    // The whole rebalance's count, not what was left after the restart: every key that
    // changed owner held a value, so each moved once, before the kill or after it.
    let three = [&a, &b, &c];
    let changed = keys
        .iter()
        .filter(|k| ring_owner(&three, k) == c.port)
        .count() as u64;
    assert!(changed > moved_before_kill, "{changed} {moved_before_kill}");
    assert_eq!(p["keys_moved"].as_u64().unwrap(), changed, "{p}");
    let (_, shards_json) = http(http_addr, "GET", "/admin/shards", "").await;
    let c_name = format!("redis_{}", c.port);
    let into_c = shards_json["shards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == c_name.as_str())
        .unwrap()["keys_moved_in"]
        .as_u64()
        .unwrap();
    assert_eq!(into_c, changed, "{shards_json}");
    again.terminate();
    for k in &keys {
        let (total, on) = value_on(&three, k);
        let acked_k = acked.get(k).copied().unwrap_or(0);
        // Each client has one INCR in flight at the kill: at most 4 unknown outcomes in all.
        assert!(
            total >= 7 + acked_k && total <= 7 + acked_k + 4,
            "{k}: {total} vs {} acknowledged",
            7 + acked_k
        );
        assert_eq!(on.len(), 1, "{k} on one shard only: {on:?}");
    }
    let unknown: i64 = keys
        .iter()
        .map(|k| value_on(&three, k).0 - 7 - acked.get(k).copied().unwrap_or(0))
        .sum();
    assert!(
        unknown <= 4,
        "{unknown} increments beyond the acknowledged ones"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_change_leaves_the_ring_untouched() {
    let (a, b) = (Redis::start(), Redis::start());
    let wal = TempDir::new("refuse");
    let proxy = Proxy::start(support::config(&[&a, &b], &wal)).await;
    let a_name = format!("redis_{}", a.port);
    let cases = [
        (
            "POST",
            "/admin/shards".to_string(),
            format!("{{\"addr\": \"{}\"}}", a.addr()),
            "duplicate",
        ),
        (
            "POST",
            "/admin/shards".to_string(),
            format!(
                "{{\"addr\": \"127.0.0.1:{}\", \"name\": \"{a_name}\"}}",
                support::free_port()
            ),
            "duplicate shard name",
        ),
        (
            "POST",
            "/admin/shards".to_string(),
            format!("{{\"addr\": \"127.0.0.1:{}\"}}", support::free_port()),
            "is unreachable",
        ),
        (
            "POST",
            "/admin/shards".to_string(),
            "{\"addr\": \"nohost\"}".to_string(),
            "ip:port",
        ),
        (
            "DELETE",
            "/admin/shards/nosuch".to_string(),
            String::new(),
            "no shard named",
        ),
    ];
    for (method, path, body, want) in cases {
        let (status, resp) = http(proxy.http, method, &path, &body).await;
        assert!(
            status == 409 || status == 404,
            "{method} {path} {body}: {status} {resp}"
        );
        assert!(
            resp["error"].as_str().unwrap().contains(want),
            "{resp} should say {want}"
        );
    }
    let (_, body) = http(proxy.http, "POST", "/admin/shards", "{not json").await;
    assert!(body["error"].as_str().unwrap().contains("body must be"));
    let (_, shards) = http(proxy.http, "GET", "/admin/shards", "").await;
    assert_eq!(shards["ring_version"], 1);
    assert_eq!(shards["shards"].as_array().unwrap().len(), 2);
    let (_, p) = http(proxy.http, "GET", "/admin/rebalance", "").await;
    assert_eq!(p["state"], "idle");
    // Removing down to one shard is fine; removing the last is refused.
    let (status, _) = http(
        proxy.http,
        "DELETE",
        &format!("/admin/shards/redis_{}", b.port),
        "",
    )
    .await;
    assert_eq!(status, 202);
    wait_done(proxy.http, Duration::from_secs(20)).await;
    let (status, resp) = http(proxy.http, "DELETE", &format!("/admin/shards/{a_name}"), "").await;
    assert_eq!(status, 409);
    assert!(
        resp["error"].as_str().unwrap().contains("last shard"),
        "{resp}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_shard_removed_and_declared_lost_lets_the_rebalance_finish() {
    let (a, b, mut c) = (Redis::start(), Redis::start(), Redis::start());
    let wal = TempDir::new("rebalance-lost");
    let proxy = Proxy::start(support::config(&[&a, &b, &c], &wal)).await;
    let mut conn = proxy.conn().await;
    let keys: Vec<String> = (0..300).map(|i| format!("lost:{i}")).collect();
    for k in &keys {
        assert_eq!(conn.cmd(&["INCRBY", k, "5"]).await, ":5\r\n");
    }
    let (status, _) = http(proxy.http, "POST", "/admin/flush", "").await;
    assert_eq!(status, 200);
    let c_name = format!("redis_{}", c.port);
    let on_c: Vec<bool> = keys
        .iter()
        .map(|k| ring_owner(&[&a, &b, &c], k) == c.port)
        .collect();
    assert!(on_c.iter().filter(|x| **x).count() > 50);
    let (status, _) = http(
        proxy.http,
        "POST",
        "/admin/rebalance/lost",
        "{\"shard\": \"x\"}",
    )
    .await;
    assert_eq!(status, 409, "no rebalance under way");

    // c dies for good; increments of its keys are still taken (from the known base).
    c.stop();
    for k in &keys {
        assert_eq!(conn.cmd(&["INCR", k]).await, ":6\r\n");
    }
    // A flush takes c's deltas into a batch that c never confirms: it is retried.
    let (status, _) = http(proxy.http, "POST", "/admin/flush", "").await;
    assert_eq!(status, 503);
    let (status, body) = http(proxy.http, "DELETE", &format!("/admin/shards/{c_name}"), "").await;
    assert_eq!(status, 202, "{body}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, p) = http(proxy.http, "GET", "/admin/rebalance", "").await;
    assert_eq!(p["state"], "running", "held by the dead shard: {p}");
    let (status, _) = http(
        proxy.http,
        "POST",
        "/admin/rebalance/lost",
        &format!("{{\"shard\": \"redis_{}\"}}", a.port),
    )
    .await;
    assert_eq!(status, 409, "a shard that stays cannot be declared lost");

    let (status, body) = http(
        proxy.http,
        "POST",
        "/admin/rebalance/lost",
        &format!("{{\"shard\": \"{c_name}\"}}"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["rebalance"]["lost"], serde_json::json!([c_name]));
    wait_done(proxy.http, Duration::from_secs(30)).await;
    let (status, body) = http(proxy.http, "POST", "/admin/flush", "").await;
    assert_eq!(status, 200, "{body}");

    // c's keys start over from what the proxy held for them (the increment after c died);
    // every other key is whole.
    for (k, lost) in keys.iter().zip(&on_c) {
        let want = if *lost { 1 } else { 6 };
        let (total, on) = value_on(&[&a, &b], k);
        assert_eq!(total, want, "{k} on {on:?}");
        assert_eq!(on.len(), 1, "{k} on {on:?}");
        assert_eq!(
            conn.cmd(&["GET", k]).await,
            format!("${}\r\n{want}\r\n", want.to_string().len())
        );
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_held_by_a_down_shard_says_why_until_it_moves_again() {
    // a keeps its data over a restart, so that there is something to move once it is back.
    let mut a = Redis::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let b = Redis::start();
    let wal = TempDir::new("rebalance-held");
    let mut cfg = support::config(&[&a], &wal);
    cfg.rebalance.keys_per_second = 20; // slow, so that it is still running once a is back
    let proxy = Proxy::start(cfg).await;
    let mut conn = proxy.conn().await;
    let keys: Vec<String> = (0..120).map(|i| format!("held:{i}")).collect();
    for k in &keys {
        assert_eq!(conn.cmd(&["INCRBY", k, "3"]).await, ":3\r\n");
    }
    let (status, _) = http(proxy.http, "POST", "/admin/flush", "").await;
    assert_eq!(status, 200);
    for k in &keys {
        assert_eq!(conn.cmd(&["INCR", k]).await, ":4\r\n");
    }
    // a dies with an increment of every key pending: the move must land them first, and
    // cannot.
    a.stop();
    let a_name = format!("redis_{}", a.port);
    add_shard(proxy.http, &b).await;
    let start = std::time::Instant::now();
    let held = loop {
        let (_, p) = http(proxy.http, "GET", "/admin/rebalance", "").await;
        let e = p["error"].as_str().unwrap_or("").to_string();
        if e.contains(&a_name) && e.contains("unreachable") {
            break p;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the status should say what holds it: {p}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(held["state"], "running", "{held}");
    assert_eq!(held["keys_scanned"], 0, "{held}");
    assert!(
        held["error"].as_str().unwrap().contains("retrying"),
        "{held}"
    );

    // a is back: the increments land, the scan moves on, and the error is gone while the
    // rebalance still runs.
    a.restart();
    let start = std::time::Instant::now();
    loop {
        let (_, p) = http(proxy.http, "GET", "/admin/rebalance", "").await;
        if p["keys_scanned"].as_u64().unwrap_or(0) > 0 && p["state"] == "running" {
            assert!(p["error"].is_null(), "moving again, no error: {p}");
            break;
        }
        assert!(
            p["state"] == "running" && start.elapsed() < Duration::from_secs(20),
            "the rebalance moves again: {p}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let p = wait_done(proxy.http, Duration::from_secs(30)).await;
    assert!(p["error"].is_null(), "{p}");
    for k in &keys {
        assert_eq!(
            conn.cmd(&["GET", k]).await,
            "$1\r\n4\r\n",
            "{k} counted once"
        );
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_scanned_shard_logs_the_keys_moved_off_it() {
    let (a, b, c) = (Redis::start(), Redis::start(), Redis::start());
    let wal = TempDir::new("rebalance-log");
    let log = wal.path().join("stderr.jsonl");
    let mut proxy = ProxyProcess::start_logged(&[a.addr(), b.addr()], &wal, "", &log);
    let http_addr: SocketAddr = format!("127.0.0.1:{}", proxy.http).parse().unwrap();
    let mut conn = support::Raw::connect(proxy.addr()).await;
    for i in 0..200 {
        assert_eq!(conn.cmd(&["INCR", &format!("logged:{i}")]).await, ":1\r\n");
    }
    let (status, _) = http(http_addr, "POST", "/admin/flush", "").await;
    assert_eq!(status, 200);
    add_shard(http_addr, &c).await;
    let p = wait_done(http_addr, Duration::from_secs(30)).await;
    proxy.terminate();
    // One line per old shard, each with the keys moved off it: together, the whole.
    let text = std::fs::read_to_string(&log).unwrap();
    let scanned: HashMap<String, u64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "rebalance: shard scanned")
        .map(|v| {
            (
                v["fields"]["shard"].as_str().unwrap().to_string(),
                v["fields"]["moved"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(scanned.len(), 2, "{text}");
    let off = |r: &Redis| {
        (0..200)
            .filter(|i| {
                let k = format!("logged:{i}");
                ring_owner(&[&a, &b], &k) == r.port && ring_owner(&[&a, &b, &c], &k) == c.port
            })
            .count() as u64
    };
    assert_eq!(scanned[&format!("redis_{}", a.port)], off(&a), "{text}");
    assert_eq!(scanned[&format!("redis_{}", b.port)], off(&b), "{text}");
    assert_eq!(off(&a) + off(&b), p["keys_moved"].as_u64().unwrap(), "{p}");
}

/// A config reloaded with a shard renamed (same server, another name) is refused whole: the
/// old name's removal would delete the exactly-once record the new name's batches use there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_renamed_by_a_sighup_is_refused_and_keeps_its_record() {
    let (a, b) = (Redis::start(), Redis::start());
    let wal = TempDir::new("rebalance-rename");
    let log = wal.path().join("stderr.jsonl");
    let mut proxy = ProxyProcess::start_logged(&[a.addr(), b.addr()], &wal, "", &log);
    let http_addr: SocketAddr = format!("127.0.0.1:{}", proxy.http).parse().unwrap();
    let mut c = redis::Client::open(format!("redis://127.0.0.1:{}/", proxy.port))
        .unwrap()
        .get_connection()
        .unwrap();
    let keys: Vec<String> = (0..20).map(|i| format!("rn:{i}")).collect();
    for k in &keys {
        let v: i64 = redis::cmd("INCR").arg(k).query(&mut c).unwrap();
        assert_eq!(v, 1);
    }
    let (status, _) = http(http_addr, "POST", "/admin/flush", "").await;
    assert_eq!(status, 200);
    let records = || {
        [&a, &b].map(|s| match s.cmd(&["HLEN", "tally:applied"]) {
            redis::Value::Int(n) => n,
            other => panic!("HLEN: {other:?}"),
        })
    };
    assert_eq!(records(), [1, 1], "each shard holds this proxy's record");
    let line = format!("[[shards]]\naddr = \"{}\"", a.addr());
    proxy.edit_config(
        &line,
        &format!("[[shards]]\nname = \"renamed\"\naddr = \"{}\"", a.addr()),
    );
    proxy.signal("HUP");
    let want = format!(
        "{} is shard redis_{} already; a shard keeps its name",
        a.addr(),
        a.port
    );
    support::assert_reload_refused(&log, &want).await;
    let (_, shards) = http(http_addr, "GET", "/admin/shards", "").await;
    assert_eq!(shards["ring_version"], 1, "{shards}");
    let (_, p) = http(http_addr, "GET", "/admin/rebalance", "").await;
    assert_eq!(p["state"], "idle", "{p}");
    assert_eq!(records(), [1, 1], "no record deleted");
    proxy.terminate();
    let total: i64 = keys
        .iter()
        .map(|k| {
            [&a, &b]
                .iter()
                .filter_map(|s| s.get(k))
                .map(|v| v.parse::<i64>().unwrap())
                .sum::<i64>()
        })
        .sum();
    assert_eq!(total, 20);
}
