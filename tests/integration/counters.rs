//! Counter engine behaviour through the proxy (issue: counters): merged increments, the read
//! cache, flushes, exactly-once retries, Redis's wording, memory and direct modes.
//!
//! Every test runs its own redis-server processes and its own in-process proxy, so the
//! tests are independent of each other and may run in parallel.

use crate::support::{config, eventually, http_request, ring_owner, Proxy, Raw, Redis, TempDir};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tallyproxy::config::{Config, CounterMode, CounterPattern, HumanDuration};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The shard name the proxy reports in `served_via` for a shard on `port`.
fn via(port: u16) -> String {
    format!("redis_{port}")
}

/// The shard the ring assigns `key` to.
fn owner<'a>(shards: &[&'a Redis], key: &str) -> &'a Redis {
    let port = ring_owner(shards, key);
    shards.iter().copied().find(|s| s.port == port).unwrap()
}

/// The first key `{prefix}-{i}` that the ring assigns to the shard on `port`.
fn key_on(shards: &[&Redis], port: u16, prefix: &str) -> String {
    (0..10_000)
        .map(|i| format!("{prefix}-{i}"))
        .find(|k| ring_owner(shards, k) == port)
        .expect("some key lands on every shard")
}

/// A test config with the given cache TTL and flush interval.
fn config_with(shards: &[&Redis], wal: &TempDir, ttl: Duration, flush: Duration) -> Config {
    let mut cfg = config(shards, wal);
    cfg.counters.cache_ttl = HumanDuration(ttl);
    cfg.counters.flush_interval = HumanDuration(flush);
    cfg
}

/// An HTTP visits call that must answer 200; its JSON body.
async fn visits(proxy: &Proxy, method: &str, page: &str) -> Value {
    visits_at(proxy.http, method, page).await
}

async fn visits_at(http: SocketAddr, method: &str, page: &str) -> Value {
    let (status, body) = http_request(http, method, &format!("/visits/{page}")).await;
    assert_eq!(status, 200, "{method} /visits/{page}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{body:?} is not JSON: {e}"))
}

/// A RESP command through the proxy that must answer an integer.
async fn int(con: &mut redis::aio::MultiplexedConnection, args: &[&str]) -> i64 {
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c.query_async(con)
        .await
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// The exact RESP bytes of a bulk string reply.
fn bulk(s: &str) -> String {
    format!("${}\r\n{s}\r\n", s.len())
}

const NIL: &str = "$-1\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_increment_counts_and_get_returns_the_exact_total_over_http_and_resp() {
    let (a, b) = (Redis::start(), Redis::start());
    let shards = [&a, &b];
    let wal = TempDir::new("counters-exact");
    let proxy = Proxy::start(config(&shards, &wal)).await;
    let home_owner = via(ring_owner(&shards, "visits:home"));

    // HTTP: the first visit reads the base from the owning shard, the rest are in memory.
    for n in 1..=5 {
        let expect_via = if n == 1 {
            home_owner.clone()
        } else {
            "in_memory".to_string()
        };
        assert_eq!(
            visits(&proxy, "POST", "home").await,
            json!({"visits": n, "served_via": expect_via})
        );
    }
    // RESP INCR counts the same key.
    let mut con = proxy.client().await;
    for n in 6..=9 {
        assert_eq!(int(&mut con, &["INCR", "visits:home"]).await, n);
    }
    // GET over both protocols returns the exact count.
    let mut raw = proxy.conn().await;
    assert_eq!(raw.cmd(&["GET", "visits:home"]).await, bulk("9"));
    assert_eq!(
        visits(&proxy, "GET", "home").await,
        json!({"visits": 9, "served_via": "in_memory"})
    );
    assert_eq!(
        visits(&proxy, "POST", "home").await,
        json!({"visits": 10, "served_via": "in_memory"})
    );
    assert_eq!(raw.cmd(&["GET", "visits:home"]).await, bulk("10"));

    // A page never seen: zero visits, read from its owning shard.
    assert_eq!(
        visits(&proxy, "GET", "never-seen").await,
        json!({"visits": 0, "served_via": via(ring_owner(&shards, "visits:never-seen"))})
    );
    assert_eq!(raw.cmd(&["GET", "visits:never-seen-2"]).await, NIL);
    // Nothing has been written to the shards (no flush yet).
    assert_eq!(a.get("visits:home"), None);
    assert_eq!(b.get("visits:home"), None);
    assert_eq!(a.get("visits:never-seen"), None);
    assert_eq!(b.get("visits:never-seen"), None);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_survive_a_proxy_restart_because_a_graceful_stop_flushes_them_to_redis() {
    let (a, b) = (Redis::start(), Redis::start());
    let shards = [&a, &b];
    let wal = TempDir::new("counters-restart-1");
    let proxy = Proxy::start(config(&shards, &wal)).await;
    for _ in 0..5 {
        visits(&proxy, "POST", "home").await;
    }
    let mut con = proxy.client().await;
    for _ in 0..3 {
        int(&mut con, &["INCR", "visits:home"]).await;
    }
    assert_eq!(int(&mut con, &["INCRBY", "visits:home", "4"]).await, 12);
    let home = owner(&shards, "visits:home");
    assert_eq!(home.get("visits:home"), None, "no write before the flush");
    drop(con);
    proxy.stop().await;

    // The stop flushed: the owning shard holds the count, the other nothing.
    assert_eq!(home.get("visits:home").as_deref(), Some("12"));
    let other = if home.port == a.port { &b } else { &a };
    assert_eq!(other.get("visits:home"), None);

    // A new proxy with an empty log reads it back from Redis.
    let wal2 = TempDir::new("counters-restart-2");
    let proxy = Proxy::start(config(&shards, &wal2)).await;
    assert_eq!(
        visits(&proxy, "GET", "home").await,
        json!({"visits": 12, "served_via": via(home.port)})
    );
    let mut raw = proxy.conn().await;
    assert_eq!(raw.cmd(&["GET", "visits:home"]).await, bulk("12"));
    assert_eq!(
        visits(&proxy, "POST", "home").await,
        json!({"visits": 13, "served_via": "in_memory"})
    );
    proxy.stop().await;
    assert_eq!(home.get("visits:home").as_deref(), Some("13"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_within_the_ttl_come_from_memory_and_after_it_from_the_owning_shard() {
    let (a, b) = (Redis::start(), Redis::start());
    let shards = [&a, &b];
    let wal = TempDir::new("counters-ttl");
    // Past half the TTL a read queues a read-ahead (see the next test): the in-TTL checks
    // below must finish before that.
    let ttl = ms(2000);
    let proxy = Proxy::start(config_with(&shards, &wal, ttl, Duration::from_secs(3600))).await;
    let key = "visits:cached";
    let shard = owner(&shards, key);
    shard.cmd(&["SET", key, "10"]);
    let mut raw = proxy.conn().await;

    // First read: from the owning shard.
    let read_at = Instant::now();
    assert_eq!(
        visits(&proxy, "GET", "cached").await,
        json!({"visits": 10, "served_via": via(shard.port)})
    );
    let (gets, evals) = (shard.calls("get"), shard.calls("eval"));
    // Within the TTL: from memory, no Redis call, even after the shard's value changed.
    for _ in 0..3 {
        assert_eq!(
            visits(&proxy, "GET", "cached").await,
            json!({"visits": 10, "served_via": "in_memory"})
        );
        assert_eq!(raw.cmd(&["GET", key]).await, bulk("10"));
    }
    shard.cmd(&["SET", key, "42"]);
    assert_eq!(
        visits(&proxy, "GET", "cached").await,
        json!({"visits": 10, "served_via": "in_memory"})
    );
    assert_eq!(raw.cmd(&["GET", key]).await, bulk("10"));
    assert_eq!(shard.calls("get"), gets, "cached reads made GET calls");
    assert_eq!(shard.calls("eval"), evals, "cached reads made EVAL calls");
    assert!(
        read_at.elapsed() < ttl / 2,
        "the in-TTL checks took {:?}, longer than half the TTL",
        read_at.elapsed()
    );

    // After the TTL: from the owning shard, which now holds 42.
    tokio::time::sleep(ttl + ms(100)).await;
    assert_eq!(
        visits(&proxy, "GET", "cached").await,
        json!({"visits": 42, "served_via": via(shard.port)})
    );
    assert_eq!(shard.calls("eval"), evals + 1, "one read of the shard");
    assert_eq!(
        visits(&proxy, "GET", "cached").await,
        json!({"visits": 42, "served_via": "in_memory"})
    );
    assert_eq!(raw.cmd(&["GET", key]).await, bulk("42"));

    // The same over RESP: a direct change is seen once the TTL has passed.
    shard.cmd(&["SET", key, "43"]);
    tokio::time::sleep(ttl + ms(100)).await;
    assert_eq!(raw.cmd(&["GET", key]).await, bulk("43"));
    assert_eq!(
        visits(&proxy, "GET", "cached").await,
        json!({"visits": 43, "served_via": "in_memory"})
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_in_use_is_re_read_before_its_base_goes_stale() {
    let (a, b) = (Redis::start(), Redis::start());
    let shards = [&a, &b];
    let wal = TempDir::new("counters-refresh");
    let ttl = ms(4000);
    let proxy = Proxy::start(config_with(&shards, &wal, ttl, Duration::from_secs(3600))).await;
    let key = "visits:ahead";
    let shard = owner(&shards, key);
    shard.cmd(&["SET", key, "10"]);
    let mut raw = proxy.conn().await;
    let start = Instant::now();
    assert_eq!(raw.cmd(&["INCR", key]).await, ":11\r\n");
    // Before half the TTL: no read-ahead.
    assert_eq!(raw.cmd(&["GET", key]).await, bulk("11"));
    let refreshes = |info: String| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix("cache_refreshes:"))
            .map(|v| v.trim().parse().unwrap())
            .unwrap()
    };
    let info = raw.cmd(&["INFO", "counters"]).await;
    assert_eq!(refreshes(info), 0);
    shard.cmd(&["INCRBY", key, "100"]);
    // Past half the TTL, a read is answered from memory and queues a read-ahead.
    tokio::time::sleep((ttl / 2 + ms(200)).saturating_sub(start.elapsed())).await;
    assert_eq!(
        visits(&proxy, "GET", "ahead").await,
        json!({"visits": 11, "served_via": "in_memory"})
    );
    let mut seen = false;
    for _ in 0..50 {
        if refreshes(raw.cmd(&["INFO", "counters"]).await) == 1 {
            seen = true;
            break;
        }
        tokio::time::sleep(ms(20)).await;
    }
    assert!(seen, "a read-ahead was queued");
    // Past the first base's TTL, the key is still fresh (re-read in the background) and
    // the shard's change is in it: no read waits for the shard.
    tokio::time::sleep((ttl + ms(300)).saturating_sub(start.elapsed())).await;
    assert!(
        start.elapsed() < ttl / 2 + ttl,
        "slept too long to check: {:?}",
        start.elapsed()
    );
    assert_eq!(
        visits(&proxy, "GET", "ahead").await,
        json!({"visits": 111, "served_via": "in_memory"})
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn increments_accumulate_in_memory_until_a_flush_or_a_cache_miss_lands_them() {
    let (a, b) = (Redis::start(), Redis::start());
    let shards = [&a, &b];
    let incrbys = || a.calls("incrby") + b.calls("incrby");

    // 1. Long TTL and flush interval: increments stay in memory, reads add them to Redis's.
    let wal = TempDir::new("counters-acc-1");
    let proxy = Proxy::start(config_with(
        &shards,
        &wal,
        Duration::from_secs(5),
        Duration::from_secs(3600),
    ))
    .await;
    let mut con = proxy.client().await;
    let (k1, k2) = ("acc:base", "acc:new");
    owner(&shards, k1).cmd(&["SET", k1, "10"]);
    let before = incrbys();
    for n in 11..=15 {
        assert_eq!(int(&mut con, &["INCR", k1]).await, n);
    }
    for n in 1..=3 {
        assert_eq!(int(&mut con, &["INCR", k2]).await, n);
    }
    for _ in 0..2 {
        visits(&proxy, "POST", "acc").await;
    }
    let mut raw = proxy.conn().await;
    assert_eq!(raw.cmd(&["GET", k1]).await, bulk("15"));
    assert_eq!(raw.cmd(&["GET", k2]).await, bulk("3"));
    assert_eq!(
        visits(&proxy, "GET", "acc").await,
        json!({"visits": 2, "served_via": "in_memory"})
    );
    assert_eq!(owner(&shards, k1).get(k1).as_deref(), Some("10"));
    assert_eq!(owner(&shards, k2).get(k2), None);
    assert_eq!(owner(&shards, "visits:acc").get("visits:acc"), None);
    assert_eq!(incrbys(), before, "an increment was written before a flush");
    drop((con, raw));
    proxy.stop().await;
    assert_eq!(owner(&shards, k1).get(k1).as_deref(), Some("15"));
    assert_eq!(owner(&shards, k2).get(k2).as_deref(), Some("3"));
    assert_eq!(
        owner(&shards, "visits:acc").get("visits:acc").as_deref(),
        Some("2")
    );

    // 2. A short flush interval: the background flush lands them.
    let wal = TempDir::new("counters-acc-2");
    let proxy = Proxy::start(config_with(&shards, &wal, Duration::from_secs(5), ms(300))).await;
    let mut con = proxy.client().await;
    let k3 = "acc:background";
    let s3 = owner(&shards, k3);
    s3.cmd(&["SET", k3, "10"]);
    for n in 11..=15 {
        assert_eq!(int(&mut con, &["INCR", k3]).await, n);
    }
    assert!(
        eventually(Duration::from_secs(3), || s3.get(k3).as_deref()
            == Some("15"))
        .await,
        "the background flush did not land: shard holds {:?}",
        s3.get(k3)
    );
    assert_eq!(proxy.conn().await.cmd(&["GET", k3]).await, bulk("15"));
    drop(con);
    proxy.stop().await;
    assert_eq!(s3.get(k3).as_deref(), Some("15"));

    // 3. A long flush interval and a short TTL: a GET that misses the cache lands the key.
    let wal = TempDir::new("counters-acc-3");
    let ttl = ms(300);
    let proxy = Proxy::start(config_with(&shards, &wal, ttl, Duration::from_secs(3600))).await;
    let mut con = proxy.client().await;
    let k4 = "acc:miss";
    let s4 = owner(&shards, k4);
    s4.cmd(&["SET", k4, "10"]);
    for n in 11..=15 {
        assert_eq!(int(&mut con, &["INCR", k4]).await, n);
    }
    for _ in 0..3 {
        visits(&proxy, "POST", "miss").await;
    }
    let s5 = owner(&shards, "visits:miss");
    assert_eq!(s4.get(k4).as_deref(), Some("10"));
    assert_eq!(s5.get("visits:miss"), None);
    tokio::time::sleep(ttl + ms(100)).await;
    assert_eq!(proxy.conn().await.cmd(&["GET", k4]).await, bulk("15"));
    assert_eq!(
        s4.get(k4).as_deref(),
        Some("15"),
        "the GET did not land the key"
    );
    assert_eq!(
        visits(&proxy, "GET", "miss").await,
        json!({"visits": 3, "served_via": via(s5.port)})
    );
    assert_eq!(
        s5.get("visits:miss").as_deref(),
        Some("3"),
        "the GET did not land the key"
    );
    drop(con);
    proxy.stop().await;
    assert_eq!(s4.get(k4).as_deref(), Some("15"));
    assert_eq!(s5.get("visits:miss").as_deref(), Some("3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_spread_over_both_shards_and_served_via_names_the_shard_that_holds_the_key() {
    let (a, b) = (Redis::start(), Redis::start());
    let shards = [&a, &b];
    let wal = TempDir::new("counters-spread-1");
    let proxy = Proxy::start(config(&shards, &wal)).await;
    let pages: Vec<(String, i64)> = (0..50)
        .map(|i| (format!("page-{i}"), (i % 3) + 1))
        .collect();
    for (page, n) in &pages {
        for _ in 0..*n {
            visits(&proxy, "POST", page).await;
        }
    }
    proxy.stop().await;

    let mut per_shard: HashMap<u16, usize> = HashMap::new();
    for (page, n) in &pages {
        let key = format!("visits:{page}");
        let expected = ring_owner(&shards, &key);
        let holders: Vec<u16> = shards
            .iter()
            .filter(|s| s.get(&key).is_some())
            .map(|s| s.port)
            .collect();
        assert_eq!(holders, vec![expected], "{key} is held by {holders:?}");
        assert_eq!(owner(&shards, &key).get(&key), Some(n.to_string()), "{key}");
        *per_shard.entry(expected).or_default() += 1;
    }
    assert!(
        per_shard.get(&a.port).copied().unwrap_or(0) > 0
            && per_shard.get(&b.port).copied().unwrap_or(0) > 0,
        "both shards must get some of the 50 keys: {per_shard:?}"
    );

    // A fresh proxy reads each key from the shard that holds it, and says so.
    let wal2 = TempDir::new("counters-spread-2");
    let proxy = Proxy::start(config(&shards, &wal2)).await;
    for (page, n) in &pages {
        let holder = ring_owner(&shards, &format!("visits:{page}"));
        assert_eq!(
            visits(&proxy, "GET", page).await,
            json!({"visits": n, "served_via": via(holder)}),
            "{page}"
        );
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_increments_from_50_clients_over_http_and_resp_total_exactly() {
    let (a, b) = (Redis::start(), Redis::start());
    let shards = [&a, &b];
    let wal = TempDir::new("counters-concurrent");
    let proxy = Proxy::start(config(&shards, &wal)).await;
    const TASKS_PER_PROTOCOL: usize = 25;
    const OPS: usize = 40;
    // Half of every task's operations go to one hot page, the rest spread over the others.
    let page_of = |task: usize, op: usize| -> &'static str {
        if op.is_multiple_of(2) {
            "hot"
        } else {
            ["c0", "c1", "c2"][(task + op / 2) % 3]
        }
    };
    let mut expected: HashMap<&str, i64> = HashMap::new();
    for task in 0..2 * TASKS_PER_PROTOCOL {
        for op in 0..OPS {
            *expected.entry(page_of(task, op)).or_default() += 1;
        }
    }
    assert_eq!(expected.values().sum::<i64>(), 2000);

    let mut handles = Vec::new();
    for task in 0..TASKS_PER_PROTOCOL {
        let http = proxy.http;
        handles.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for op in 0..OPS {
                let page = page_of(task, op);
                let v = visits_at(http, "POST", page).await;
                seen.push((page, v["visits"].as_i64().unwrap()));
            }
            seen
        }));
    }
    for task in TASKS_PER_PROTOCOL..2 * TASKS_PER_PROTOCOL {
        let mut con = proxy.client().await;
        handles.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for op in 0..OPS {
                let page = page_of(task, op);
                let key = format!("visits:{page}");
                seen.push((page, int(&mut con, &["INCR", &key]).await));
            }
            seen
        }));
    }
    // Every increment got its own value: per key, the replies are exactly 1..=total.
    let mut replies: HashMap<&str, Vec<i64>> = HashMap::new();
    for h in handles {
        for (page, v) in h.await.unwrap() {
            replies.entry(page).or_default().push(v);
        }
    }
    for (page, total) in &expected {
        let mut got = replies.remove(page).unwrap();
        got.sort_unstable();
        assert_eq!(got, (1..=*total).collect::<Vec<_>>(), "replies for {page}");
    }

    let mut raw = proxy.conn().await;
    for (page, total) in &expected {
        assert_eq!(
            visits(&proxy, "GET", page).await,
            json!({"visits": total, "served_via": "in_memory"})
        );
        assert_eq!(
            raw.cmd(&["GET", &format!("visits:{page}")]).await,
            bulk(&total.to_string())
        );
    }
    drop(raw);
    proxy.stop().await;
    for (page, total) in &expected {
        let key = format!("visits:{page}");
        assert_eq!(owner(&shards, &key).get(&key), Some(total.to_string()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_with_one_shard_down_lands_the_other_and_retries_the_failed_batch_exactly_once() {
    let (a, mut b) = (Redis::start(), Redis::start());
    let (ka, kb, blind) = {
        let shards = [&a, &b];
        (
            key_on(&shards, a.port, "outage:a"),
            key_on(&shards, b.port, "outage:b"),
            key_on(&shards, b.port, "visits:outage"),
        )
    };
    let blind_page = blind.strip_prefix("visits:").unwrap().to_string();
    let b_port = b.port;
    let wal = TempDir::new("counters-outage");
    let ttl = ms(500);
    let proxy = Proxy::start(config_with(&[&a, &b], &wal, ttl, ms(300))).await;
    let mut raw = proxy.conn().await;

    // Read both bases while both shards are up (a read writes nothing)...
    assert_eq!(raw.cmd(&["GET", &ka]).await, NIL);
    assert_eq!(raw.cmd(&["GET", &kb]).await, NIL);
    let read_at = Instant::now();
    // ...stop B, then count: every delta of B's key arises while B is down.
    b.stop();
    for n in 1..=4 {
        assert_eq!(raw.cmd(&["INCR", &kb]).await, format!(":{n}\r\n"));
    }
    for n in 1..=3 {
        assert_eq!(raw.cmd(&["INCR", &ka]).await, format!(":{n}\r\n"));
    }
    assert!(
        read_at.elapsed() < ttl,
        "the increments took {:?}, longer than the TTL",
        read_at.elapsed()
    );

    // Checks past this point are collected, so that one run reports every failure.
    let mut problems: Vec<String> = Vec::new();

    // The periodic flush lands A's key while B is down.
    if !eventually(Duration::from_secs(3), || {
        a.get(&ka).as_deref() == Some("3")
    })
    .await
    {
        problems.push(format!(
            "with B down, A did not receive its first count within 3 s: A holds {:?}, expected \"3\"",
            a.get(&ka)
        ));
    }
    // More increments of A's key keep flowing to A while B is still down.
    let after_first = a.get(&ka).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
    assert_eq!(raw.cmd(&["INCR", &ka]).await, ":4\r\n");
    assert_eq!(raw.cmd(&["INCR", &ka]).await, ":5\r\n");
    if !eventually(Duration::from_secs(3), || {
        a.get(&ka).as_deref() == Some("5")
    })
    .await
    {
        problems.push(format!(
            "with B down, later increments of A's key did not reach A within 3 s: A holds {:?} \
             (held {after_first} before them), expected \"5\"",
            a.get(&ka)
        ));
    }

    // Reads of B's keys while B is down and their cache is stale. A key with a known base
    // answers the last known value (docs/architecture.md, "reads answer from the last known
    // value ... or TRYAGAIN when none is known"); a key with no known base (a visit
    // accepted blind while B is down) gets a clear retryable error.
    let since = read_at.elapsed();
    if since < ttl + ms(100) {
        tokio::time::sleep(ttl + ms(100) - since).await;
    }
    let reply = raw.cmd(&["GET", &kb]).await;
    if reply != bulk("4") {
        problems.push(format!(
            "GET of B's key (base known, stale) with B down answered {reply:?}, expected the last known \"4\""
        ));
    }
    let (status, body) = proxy.http("POST", &format!("/visits/{blind_page}")).await;
    if status != 202 {
        problems.push(format!(
            "POST of a new page of B with B down answered {status} {body}, expected 202 (accepted blind)"
        ));
    }
    let reply = raw.cmd(&["GET", &blind]).await;
    if !reply.starts_with("-TRYAGAIN") {
        problems.push(format!(
            "GET of B's key with B down and no known base (stale entry) answered {reply:?}, expected -TRYAGAIN..."
        ));
    }

    // B comes back empty: the retried batch lands once.
    b.restart();
    assert_eq!(b.port, b_port, "B restarted on another port");
    if !eventually(Duration::from_secs(10), || {
        b.get(&kb).as_deref() == Some("4")
    })
    .await
    {
        problems.push(format!(
            "the retried batch did not land on B within 10 s of its restart: B holds {:?}",
            b.get(&kb)
        ));
    }
    let reply = raw.cmd(&["GET", &kb]).await;
    if reply != bulk("4") {
        problems.push(format!(
            "GET of B's key after B's return answered {reply:?}, expected \"4\""
        ));
    }
    drop(raw);
    proxy.stop().await;
    let (on_a, on_b) = (a.get(&ka), b.get(&kb));
    if on_b.as_deref() != Some("4") {
        problems.push(format!(
            "after stop B holds {on_b:?} for its key, expected \"4\" (once)"
        ));
    }
    if on_a.as_deref() != Some("5") {
        problems.push(format!(
            "after stop A holds {on_a:?} for its key, expected \"5\""
        ));
    }
    let on_b_blind = b.get(&blind);
    if on_b_blind.as_deref() != Some("1") {
        problems.push(format!(
            "after stop B holds {on_b_blind:?} for the blind visit, expected \"1\" (once)"
        ));
    }
    if b.get(&ka).is_some() || a.get(&kb).is_some() || a.get(&blind).is_some() {
        problems.push("a count landed on the shard that does not own it".into());
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_commands_on_a_counter_key_with_pending_increments_land_the_delta_first() {
    let (a, b) = (Redis::start(), Redis::start());
    let shards = [&a, &b];
    let wal = TempDir::new("counters-other");
    let proxy = Proxy::start(config(&shards, &wal)).await;
    let mut c = proxy.conn().await;

    // SET replaces the landed value; the next INCR counts from it.
    for n in 1..=3 {
        assert_eq!(c.cmd(&["INCR", "other:k"]).await, format!(":{n}\r\n"));
    }
    assert_eq!(c.cmd(&["SET", "other:k", "100"]).await, "+OK\r\n");
    assert_eq!(
        owner(&shards, "other:k").get("other:k").as_deref(),
        Some("100")
    );
    assert_eq!(c.cmd(&["GET", "other:k"]).await, bulk("100"));
    assert_eq!(c.cmd(&["INCR", "other:k"]).await, ":101\r\n");
    assert_eq!(c.cmd(&["GET", "other:k"]).await, bulk("101"));

    // APPEND sees the landed "2".
    for n in 1..=2 {
        assert_eq!(c.cmd(&["INCR", "other:j"]).await, format!(":{n}\r\n"));
    }
    assert_eq!(c.cmd(&["APPEND", "other:j", "5"]).await, ":2\r\n");
    assert_eq!(c.cmd(&["GET", "other:j"]).await, bulk("25"));
    assert_eq!(
        owner(&shards, "other:j").get("other:j").as_deref(),
        Some("25")
    );

    // EXPIRE applies to the landed key.
    for n in 1..=4 {
        assert_eq!(c.cmd(&["INCR", "other:m"]).await, format!(":{n}\r\n"));
    }
    assert_eq!(c.cmd(&["EXPIRE", "other:m", "100"]).await, ":1\r\n");
    let ttl = c.cmd(&["TTL", "other:m"]).await;
    let secs: i64 = ttl
        .strip_prefix(':')
        .and_then(|s| s.strip_suffix("\r\n"))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("TTL answered {ttl:?}"));
    assert!((1..=100).contains(&secs), "TTL other:m = {secs}");
    assert_eq!(c.cmd(&["GET", "other:m"]).await, bulk("4"));

    // DEL of a key that exists only as pending increments deletes it.
    for n in 1..=2 {
        assert_eq!(c.cmd(&["INCR", "other:d"]).await, format!(":{n}\r\n"));
    }
    assert_eq!(c.cmd(&["DEL", "other:d"]).await, ":1\r\n");
    assert_eq!(c.cmd(&["GET", "other:d"]).await, NIL);
    assert_eq!(a.get("other:d"), None);
    assert_eq!(b.get("other:d"), None);

    // MGET mixes pending counters and plain strings, in order.
    for n in 1..=3 {
        assert_eq!(c.cmd(&["INCR", "other:c1"]).await, format!(":{n}\r\n"));
    }
    for n in 1..=5 {
        assert_eq!(c.cmd(&["INCR", "other:c2"]).await, format!(":{n}\r\n"));
    }
    assert_eq!(c.cmd(&["SET", "other:s1", "hello"]).await, "+OK\r\n");
    assert_eq!(
        c.cmd(&["MGET", "other:c1", "other:s1", "other:c2", "other:none"])
            .await,
        format!("*4\r\n{}{}{}{NIL}", bulk("3"), bulk("hello"), bulk("5"))
    );

    drop(c);
    proxy.stop().await;
    let on = |k: &str| owner(&shards, k).get(k);
    assert_eq!(on("other:k").as_deref(), Some("101"));
    assert_eq!(on("other:j").as_deref(), Some("25"));
    assert_eq!(on("other:m").as_deref(), Some("4"));
    assert_eq!(on("other:d"), None);
    assert_eq!(on("other:c1").as_deref(), Some("3"));
    assert_eq!(on("other:c2").as_deref(), Some("5"));
    assert_eq!(on("other:s1").as_deref(), Some("hello"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_increments_use_redis_wording_and_buffer_nothing() {
    let (a, b) = (Redis::start(), Redis::start());
    let plain = Redis::start();
    let shards = [&a, &b];
    let wal = TempDir::new("counters-refused");
    let proxy = Proxy::start(config(&shards, &wal)).await;
    let mut p = proxy.conn().await;
    let mut r = Raw::connect(plain.addr().parse().unwrap()).await;

    let not_integer = "-ERR value is not an integer or out of range\r\n";
    let wrongtype = "-WRONGTYPE Operation against a key holding the wrong kind of value\r\n";
    let overflow = "-ERR increment or decrement would overflow\r\n";
    let max = i64::MAX.to_string();
    let script: Vec<(Vec<&str>, String)> = vec![
        (vec!["SET", "s", "abc"], "+OK\r\n".into()),
        (vec!["INCR", "s"], not_integer.into()),
        (vec!["INCRBY", "s", "5"], not_integer.into()),
        (vec!["DECR", "s"], not_integer.into()),
        (vec!["RPUSH", "l", "x"], ":1\r\n".into()),
        (vec!["INCR", "l"], wrongtype.into()),
        (vec!["DECRBY", "l", "2"], wrongtype.into()),
        (vec!["INCRBY", "k", &max], format!(":{max}\r\n")),
        (vec!["INCR", "k"], overflow.into()),
        (vec!["INCRBY", "k", "1"], overflow.into()),
        (vec!["INCRBY", "n", "notanumber"], not_integer.into()),
        (vec!["GET", "s"], bulk("abc")),
        (vec!["GET", "k"], bulk(&max)),
        (vec!["GET", "n"], NIL.into()),
    ];
    for (args, expected) in &script {
        let from_proxy = p.cmd(args).await;
        let from_redis = r.cmd(args).await;
        assert_eq!(&from_redis, expected, "redis-server itself, {args:?}");
        assert_eq!(&from_proxy, expected, "the proxy, {args:?}");
    }

    drop(p);
    proxy.stop().await;
    // Nothing was buffered for the refused increments: the shards hold what they had.
    let on = |k: &str| owner(&shards, k);
    assert_eq!(on("s").get("s").as_deref(), Some("abc"));
    let list: Vec<String> = redis::cmd("LRANGE")
        .arg("l")
        .arg(0)
        .arg(-1)
        .query(&mut on("l").client())
        .unwrap();
    assert_eq!(list, vec!["x".to_string()]);
    assert_eq!(on("k").get("k"), Some(max.clone()));
    assert_eq!(a.get("n"), None);
    assert_eq!(b.get("n"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_increments_over_100_hot_keys_merge_into_at_most_100_incrby_calls() {
    let (a, b) = (Redis::start(), Redis::start());
    let shards = [&a, &b];
    let wal = TempDir::new("counters-merge");
    let proxy = Proxy::start(config(&shards, &wal)).await;
    a.reset_stats();
    b.reset_stats();
    let mut con = proxy.client().await;
    const KEYS: usize = 100;
    const INCRS: usize = 10_000;
    for chunk in 0..INCRS / 1000 {
        let mut pipe = redis::pipe();
        for i in 0..1000 {
            pipe.cmd("INCR")
                .arg(format!("hot:{}", (chunk * 1000 + i) % KEYS));
        }
        let replies: Vec<i64> = pipe.query_async(&mut con).await.unwrap();
        assert_eq!(replies.len(), 1000);
        // Each chunk increments every key 10 times: the last reply is the running total.
        assert_eq!(*replies.last().unwrap(), (chunk as i64 + 1) * 10);
    }
    let before_flush = a.calls("incrby") + b.calls("incrby");
    assert_eq!(before_flush, 0, "INCRBY calls before any flush");
    drop(con);
    proxy.stop().await;

    let incrbys = a.calls("incrby") + b.calls("incrby");
    println!(
        "merge ratio: {INCRS} INCRs over {KEYS} keys -> {incrbys} INCRBY calls on the shards \
         ({} on {}, {} on {}), {:.0} increments per INCRBY",
        a.calls("incrby"),
        via(a.port),
        b.calls("incrby"),
        via(b.port),
        INCRS as f64 / incrbys.max(1) as f64
    );
    assert!(
        incrbys <= KEYS as u64,
        "{incrbys} INCRBY calls for {KEYS} keys"
    );
    for i in 0..KEYS {
        let key = format!("hot:{i}");
        assert_eq!(
            owner(&shards, &key).get(&key),
            Some((INCRS / KEYS).to_string()),
            "{key}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_mode_counts_in_the_proxy_and_survives_a_restart_through_its_log() {
    let wal = TempDir::new("counters-memory");
    let proxy = Proxy::start(config(&[], &wal)).await;
    let mut con = proxy.client().await;
    for n in 1..=3 {
        assert_eq!(int(&mut con, &["INCR", "mem:1"]).await, n);
    }
    assert_eq!(int(&mut con, &["INCRBY", "mem:1", "10"]).await, 13);
    assert_eq!(int(&mut con, &["DECR", "mem:1"]).await, 12);
    let mut raw = proxy.conn().await;
    assert_eq!(raw.cmd(&["GET", "mem:1"]).await, bulk("12"));
    assert_eq!(raw.cmd(&["GET", "mem:never"]).await, NIL);
    for n in 1..=2 {
        assert_eq!(
            visits(&proxy, "POST", "home").await,
            json!({"visits": n, "served_via": "in_memory"})
        );
    }
    assert_eq!(
        visits(&proxy, "GET", "home").await,
        json!({"visits": 2, "served_via": "in_memory"})
    );
    assert_eq!(raw.cmd(&["GET", "visits:home"]).await, bulk("2"));
    assert_eq!(
        visits(&proxy, "GET", "never-seen").await,
        json!({"visits": 0, "served_via": "in_memory"})
    );
    let set = raw.cmd(&["SET", "mem:1", "5"]).await;
    assert!(
        set.starts_with("-ERR ") && set.contains("memory mode"),
        "SET in memory mode answered {set:?}"
    );
    assert_eq!(raw.cmd(&["GET", "mem:1"]).await, bulk("12"));
    drop((con, raw));
    proxy.stop().await;

    // The same log directory: the counts are back.
    let proxy = Proxy::start(config(&[], &wal)).await;
    let mut raw = proxy.conn().await;
    assert_eq!(raw.cmd(&["GET", "mem:1"]).await, bulk("12"));
    assert_eq!(
        visits(&proxy, "GET", "home").await,
        json!({"visits": 2, "served_via": "in_memory"})
    );
    assert_eq!(raw.cmd(&["INCR", "mem:1"]).await, ":13\r\n");
    assert_eq!(
        visits(&proxy, "POST", "home").await,
        json!({"visits": 3, "served_via": "in_memory"})
    );
    drop(raw);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_mode_keys_are_incremented_in_redis_at_once() {
    let (a, b) = (Redis::start(), Redis::start());
    let shards = [&a, &b];
    let wal = TempDir::new("counters-direct");
    let mut cfg = config(&shards, &wal);
    cfg.counters.patterns = vec![
        CounterPattern {
            pattern: "id:*".into(),
            mode: CounterMode::Direct,
        },
        CounterPattern {
            pattern: "*".into(),
            mode: CounterMode::Batched,
        },
    ];
    let proxy = Proxy::start(cfg).await;
    let mut con = proxy.client().await;
    let id = owner(&shards, "id:x");
    let incrs = id.calls("incr");
    for n in 1..=3 {
        assert_eq!(int(&mut con, &["INCR", "id:x"]).await, n);
        assert_eq!(id.get("id:x"), Some(n.to_string()), "after INCR #{n}");
    }
    assert_eq!(
        id.calls("incr"),
        incrs + 3,
        "one INCR on the shard per INCR"
    );
    assert_eq!(int(&mut con, &["INCRBY", "id:x", "10"]).await, 13);
    assert_eq!(id.get("id:x").as_deref(), Some("13"));
    let mut raw = proxy.conn().await;
    assert_eq!(raw.cmd(&["GET", "id:x"]).await, bulk("13"));

    // A key matching the batched pattern is still buffered.
    assert_eq!(int(&mut con, &["INCR", "batched:y"]).await, 1);
    assert_eq!(owner(&shards, "batched:y").get("batched:y"), None);
    drop((con, raw));
    proxy.stop().await;
    assert_eq!(
        owner(&shards, "batched:y").get("batched:y").as_deref(),
        Some("1")
    );
    assert_eq!(id.get("id:x").as_deref(), Some("13"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_touches_of_many_keys_in_one_pipeline_share_round_trips_and_keep_order() {
    let (a, b) = (Redis::start(), Redis::start());
    let wal = TempDir::new("first-touch");
    let proxy = Proxy::start(config(&[&a, &b], &wal)).await;
    let mut c = proxy.conn().await;
    // 2,000 keys never seen, each incremented twice in one burst, with a read, a write
    // and an increment of the same key interleaved for some: each reply as Redis would.
    let mut burst = Vec::new();
    for i in 0..2000 {
        burst.extend(crate::support::encode(&["INCRBY", &format!("ft:{i}"), "5"]));
        burst.extend(crate::support::encode(&["INCR", &format!("ft:{i}")]));
        if i % 100 == 0 {
            burst.extend(crate::support::encode(&["GET", &format!("ft:{i}")]));
            burst.extend(crate::support::encode(&["SET", &format!("ft:{i}"), "10"]));
            burst.extend(crate::support::encode(&["INCR", &format!("ft:{i}")]));
        }
    }
    let started = Instant::now();
    c.send(&burst).await;
    for i in 0..2000 {
        assert_eq!(c.reply().await, ":5\r\n", "ft:{i}");
        assert_eq!(c.reply().await, ":6\r\n", "ft:{i}");
        if i % 100 == 0 {
            assert_eq!(c.reply().await, "$1\r\n6\r\n");
            assert_eq!(c.reply().await, "+OK\r\n");
            assert_eq!(c.reply().await, ":11\r\n");
        }
    }
    let elapsed = started.elapsed();
    // The reads were shared: far fewer lane round trips than keys.
    let evals = a.calls("eval") + b.calls("eval");
    println!("2000 first touches in one pipeline: {evals} lane round trips, {elapsed:?}");
    assert!(evals < 400, "{evals} round trips for 2000 new keys");
    proxy.stop().await;
    let shards = [&a, &b];
    for i in (0..2000).step_by(37) {
        let k = format!("ft:{i}");
        let want = if i % 100 == 0 { "11" } else { "6" };
        assert_eq!(owner(&shards, &k).get(&k).as_deref(), Some(want), "{k}");
    }
}

/// A key overwritten with a string behind the proxy's back while increments are pending:
/// the GET that lands them answers what Redis's GET would (the string), and the refused
/// increments are dropped and counted, as Redis would have refused them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_landing_onto_a_string_answers_the_string_and_drops_the_increments() {
    let (a, b) = (Redis::start(), Redis::start());
    let wal = TempDir::new("get-string");
    let proxy = Proxy::start(config_with(
        &[&a, &b],
        &wal,
        ms(100),
        Duration::from_secs(3600),
    ))
    .await;
    let mut raw = Raw::connect(proxy.addr).await;
    let key = "overwritten";
    assert_eq!(raw.cmd(&["INCRBY", key, "5"]).await, ":5\r\n");
    // Another writer (not through this proxy) replaces the counter with a string.
    owner(&[&a, &b], key).cmd(&["SET", key, "abc"]);
    tokio::time::sleep(ms(150)).await; // the cached base goes stale
    assert_eq!(raw.cmd(&["GET", key]).await, "$3\r\nabc\r\n");
    let info = raw.cmd(&["INFO", "counters"]).await;
    assert!(info.contains("dropped_deltas:1"), "{info}");
    assert_eq!(owner(&[&a, &b], key).get(key).as_deref(), Some("abc"));
    proxy.stop().await;
}
