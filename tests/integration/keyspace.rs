//! The keyspace over every shard: SCAN, KEYS, RANDOMKEY, DBSIZE, FLUSHDB, FLUSHALL, against
//! the shards asked directly; SCAN during a rebalance; a flush with kill -9; redis-cli.

use crate::support::{self, http_json as http, Proxy, ProxyProcess, Raw, Redis, TempDir};
use std::collections::{BTreeSet, HashMap};
use std::process::Command;
use std::time::Duration;

/// Every key on `shards`, asked directly, without the proxy's own.
fn shard_keys(shards: &[&Redis], pattern: &str) -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for s in shards {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(pattern)
            .query(&mut s.client())
            .unwrap();
        all.extend(keys.into_iter().filter(|k| !k.starts_with("tally:")));
    }
    all
}

/// A full SCAN through `c` with `opts`; the keys in the order returned, and the calls made.
async fn scan_all(
    c: &mut redis::aio::MultiplexedConnection,
    opts: &[&str],
) -> (Vec<String>, usize) {
    let mut cursor = "0".to_string();
    let mut keys = Vec::new();
    for calls in 1..=100_000 {
        let (next, batch): (String, Vec<String>) = redis::cmd("SCAN")
            .arg(&cursor)
            .arg(opts)
            .query_async(c)
            .await
            .unwrap();
        keys.extend(batch);
        if next == "0" {
            return (keys, calls);
        }
        cursor = next;
    }
    panic!("SCAN did not finish in 100,000 calls");
}

fn exactly_once(keys: &[String]) -> BTreeSet<String> {
    let set: BTreeSet<String> = keys.iter().cloned().collect();
    assert_eq!(set.len(), keys.len(), "a key was returned twice: {keys:?}");
    set
}

/// Strings, a hash, a list, a set, counters incremented only through the proxy (pending).
async fn fill(c: &mut redis::aio::MultiplexedConnection, n: usize) -> BTreeSet<String> {
    let mut expected = BTreeSet::new();
    for i in 0..n {
        let k = format!("s:{i}");
        let _: () = redis::cmd("SET")
            .arg(&k)
            .arg(i)
            .query_async(c)
            .await
            .unwrap();
        expected.insert(k);
        let k = format!("visits:{i}");
        let _: i64 = redis::cmd("INCRBY")
            .arg(&k)
            .arg(i + 1)
            .query_async(c)
            .await
            .unwrap();
        expected.insert(k);
    }
    for (cmd, k) in [("HSET", "h:1"), ("RPUSH", "l:1"), ("SADD", "set:1")] {
        let mut q = redis::cmd(cmd);
        q.arg(k);
        if cmd == "HSET" {
            q.arg("f");
        }
        let _: i64 = q.arg("v").query_async(c).await.unwrap();
        expected.insert(k.to_string());
    }
    expected
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_and_counts_match_the_shards_without_the_proxys_keys() {
    let (a, b) = (Redis::start(), Redis::start());
    let wal = TempDir::new("keyspace");
    let proxy = Proxy::start(support::config(&[&a, &b], &wal)).await;
    let mut c = proxy.client().await;
    let mut raw = proxy.conn().await;
    // Empty: as Redis answers an empty database.
    let mut direct = Raw::connect(a.addr().parse().unwrap()).await;
    for cmd in [
        &["RANDOMKEY"][..],
        &["DBSIZE"],
        &["KEYS", "*"],
        &["SCAN", "0"],
    ] {
        assert_eq!(
            raw.cmd(cmd).await,
            direct.cmd(cmd).await,
            "{cmd:?} on nothing"
        );
    }
    let expected = fill(&mut c, 60).await;
    // The counters exist only in the proxy so far; KEYS lands them first.
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut c)
        .await
        .unwrap();
    let keys = exactly_once(&keys);
    assert_eq!(keys, expected);
    assert_eq!(keys, shard_keys(&[&a, &b], "*"));
    for s in [&a, &b] {
        assert!(!shard_keys(&[s], "*").is_empty(), "keys on both shards");
        assert_eq!(s.cmd(&["EXISTS", "tally:applied"]), redis::Value::Int(1));
    }
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("visits:1*")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(exactly_once(&keys), shard_keys(&[&a, &b], "visits:1*"));
    // KEYS tally:* is a pattern like any other: none of the proxy's keys.
    assert_eq!(raw.cmd(&["KEYS", "tally:*"]).await, "*0\r\n");
    let n: i64 = redis::cmd("DBSIZE").query_async(&mut c).await.unwrap();
    assert_eq!(n as usize, expected.len());

    let (scanned, calls) = scan_all(&mut c, &["COUNT", "7"]).await;
    assert_eq!(exactly_once(&scanned), expected);
    assert!(calls > 2, "several calls: {calls}");
    let (scanned, _) = scan_all(&mut c, &["MATCH", "s:*", "COUNT", "5"]).await;
    assert_eq!(exactly_once(&scanned), shard_keys(&[&a, &b], "s:*"));
    let (scanned, _) = scan_all(&mut c, &["TYPE", "hash"]).await;
    assert_eq!(scanned, vec!["h:1".to_string()]);
    let (scanned, _) = scan_all(&mut c, &["MATCH", "tally:*"]).await;
    assert!(scanned.is_empty());

    for _ in 0..20 {
        let k: String = redis::cmd("RANDOMKEY").query_async(&mut c).await.unwrap();
        assert!(expected.contains(&k), "{k}");
    }
    // Errors in Redis's words, byte for byte.
    for cmd in [
        &["SCAN", "abc"][..],
        &["SCAN", "0", "COUNT", "0"],
        &["SCAN", "0", "COUNT", "x"],
        &["SCAN", "0", "BOGUS"],
        &["SCAN"],
        &["KEYS"],
        &["KEYS", "a", "b"],
        &["RANDOMKEY", "x"],
        &["DBSIZE", "x"],
        &["FLUSHDB", "x"],
        &["FLUSHALL", "SYNC", "ASYNC"],
    ] {
        assert_eq!(raw.cmd(cmd).await, direct.cmd(cmd).await, "{cmd:?}");
    }
    // Redis reads "-1" as 2^64 - 1 (strtoul); the proxy takes only digits.
    assert_eq!(raw.cmd(&["SCAN", "-1"]).await, "-ERR invalid cursor\r\n");
    // A step past the plan (with the plan's own tag) is an invalid cursor.
    let (cursor, _): (String, Vec<String>) = redis::cmd("SCAN")
        .arg("0")
        .arg("COUNT")
        .arg("1")
        .query_async(&mut c)
        .await
        .unwrap();
    let tag = cursor.parse::<u64>().unwrap() >> 43;
    let bogus = (tag << 43 | 100 << 36).to_string();
    assert_eq!(raw.cmd(&["SCAN", &bogus]).await, "-ERR invalid cursor\r\n");
    assert_eq!(raw.cmd(&["PING"]).await, "+PONG\r\n");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomkey_skips_the_proxys_keys_and_answers_nil_without_others() {
    let (a, b) = (Redis::start(), Redis::start());
    let wal = TempDir::new("randomkey");
    // Only the proxy's own keys on the shards.
    for s in [&a, &b] {
        for i in 0..50 {
            s.cmd(&["SET", &format!("tally:w:{{x}}:m:{i}:x"), "1"]);
        }
    }
    let proxy = Proxy::start(support::config(&[&a, &b], &wal)).await;
    let mut raw = proxy.conn().await;
    assert_eq!(raw.cmd(&["RANDOMKEY"]).await, "$-1\r\n");
    assert_eq!(raw.cmd(&["DBSIZE"]).await, ":0\r\n");
    b.cmd(&["SET", "only", "1"]);
    for _ in 0..5 {
        assert_eq!(raw.cmd(&["RANDOMKEY"]).await, "$4\r\nonly\r\n");
    }
    assert!(raw.cmd(&["HELLO", "3"]).await.starts_with('%'));
    b.cmd(&["DEL", "only"]);
    assert_eq!(raw.cmd(&["RANDOMKEY"]).await, "_\r\n");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushdb_drops_pending_increments_and_keeps_the_watermark() {
    let (a, b) = (Redis::start(), Redis::start());
    let wal = TempDir::new("flushdb");
    let proxy = Proxy::start(support::config(&[&a, &b], &wal)).await;
    let mut c = proxy.client().await;
    let expected = fill(&mut c, 40).await;
    // Some counters landed (a GET of a stale or unknown key reads through), others pending.
    let _: i64 = redis::cmd("DBSIZE").query_async(&mut c).await.unwrap();
    for i in 0..40 {
        let _: i64 = redis::cmd("INCRBY")
            .arg(format!("visits:{i}"))
            .arg(100)
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let marks: Vec<HashMap<String, String>> = [&a, &b]
        .iter()
        .map(|s| {
            redis::cmd("HGETALL")
                .arg("tally:applied")
                .query(&mut s.client())
                .unwrap()
        })
        .collect();
    assert!(marks.iter().all(|m| m.len() == 1), "{marks:?}");
    assert_eq!(expected.len(), 83);

    let mut raw = proxy.conn().await;
    assert_eq!(raw.cmd(&["FLUSHDB"]).await, "+OK\r\n");
    assert_eq!(raw.cmd(&["DBSIZE"]).await, ":0\r\n");
    assert_eq!(raw.cmd(&["KEYS", "*"]).await, "*0\r\n");
    assert_eq!(raw.cmd(&["GET", "visits:3"]).await, "$-1\r\n");
    for (s, before) in [&a, &b].iter().zip(&marks) {
        // Only the watermark is left, moved on by the flush that absorbed the pending batch.
        assert_eq!(shard_keys(&[s], "*").len(), 0);
        let after: HashMap<String, String> = redis::cmd("HGETALL")
            .arg("tally:applied")
            .query(&mut s.client())
            .unwrap();
        let id = before.keys().next().unwrap();
        let (x, y): (u64, u64) = (before[id].parse().unwrap(), after[id].parse().unwrap());
        assert!(y > x, "watermark {x} -> {y}");
    }
    // Counts start from zero; nothing flushed away comes back at the next flush.
    for i in 0..40 {
        let v: i64 = redis::cmd("INCR")
            .arg(format!("visits:{i}"))
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(v, 1);
    }
    assert_eq!(raw.cmd(&["FLUSHALL", "ASYNC"]).await, "+OK\r\n");
    for i in 0..10 {
        let v: i64 = redis::cmd("INCRBY")
            .arg(format!("visits:{i}"))
            .arg(5)
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(v, 5);
    }
    assert_eq!(raw.cmd(&["SET", "plain", "v"]).await, "+OK\r\n");
    assert_eq!(raw.cmd(&["flushdb", "sync"]).await, "+OK\r\n");
    assert_eq!(raw.cmd(&["EXISTS", "plain"]).await, ":0\r\n");
    for i in 0..10 {
        let v: i64 = redis::cmd("INCRBY")
            .arg(format!("visits:{i}"))
            .arg(i + 1)
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(v, i + 1);
    }
    proxy.stop().await; // the final flush
    for i in 0..40 {
        let k = format!("visits:{i}");
        let want = (i < 10).then(|| (i + 1).to_string());
        let got = a.get(&k).or_else(|| b.get(&k));
        assert_eq!(got, want, "{k}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_survives_kill_9_and_the_replay_revives_nothing() {
    let (a, b) = (Redis::start(), Redis::start());
    let wal = TempDir::new("flush-kill9");
    let shards = [a.addr(), b.addr()];
    let keys: Vec<String> = (0..50).map(|i| format!("visits:k{i}")).collect();
    let mut p = ProxyProcess::start(&shards, &wal, "always", "100ms");
    let url = format!("redis://{}/", p.addr());
    let mut c = redis::Client::open(url.clone())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for round in 0..4 {
        for k in &keys {
            let _: i64 = redis::cmd("INCRBY")
                .arg(k)
                .arg(round + 1)
                .query_async(&mut c)
                .await
                .unwrap();
        }
    }
    let r: String = redis::cmd("FLUSHDB").query_async(&mut c).await.unwrap();
    assert_eq!(r, "OK");
    let mut want = HashMap::new();
    for (i, k) in keys.iter().enumerate() {
        for _ in 0..=(i % 3) {
            let _: i64 = redis::cmd("INCR").arg(k).query_async(&mut c).await.unwrap();
        }
        want.insert(k.clone(), (i % 3 + 1) as i64);
    }
    p.kill9();
    let mut p = ProxyProcess::start(&shards, &wal, "always", "100ms");
    let mut c = redis::Client::open(format!("redis://{}/", p.addr()))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for k in &keys {
        let v: i64 = redis::cmd("GET").arg(k).query_async(&mut c).await.unwrap();
        assert_eq!(v, want[k], "{k} after kill -9");
    }
    p.terminate();
    for k in &keys {
        let v: i64 = a.get(k).or_else(|| b.get(k)).unwrap().parse().unwrap();
        assert_eq!(v, want[k], "{k} on its shard");
    }
}

async fn wait_state(addr: std::net::SocketAddr, state: &str) -> serde_json::Value {
    for _ in 0..600 {
        let (_, p) = http(addr, "GET", "/admin/rebalance", "").await;
        if p["state"] == state {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("rebalance never reached {state}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_during_a_rebalance_returns_every_key_once() {
    let (a, b, third) = (Redis::start(), Redis::start(), Redis::start());
    let wal = TempDir::new("scan-rebalance");
    let mut cfg = support::config(&[&a, &b], &wal);
    cfg.rebalance.keys_per_second = 10; // slow: the SCANs below meet it half way
    let proxy = Proxy::start(cfg).await;
    let mut c = proxy.client().await;
    let expected = fill(&mut c, 100).await;
    // A cursor from before the change, continued during it: every key, maybe some twice.
    let (cursor, first): (String, Vec<String>) = redis::cmd("SCAN")
        .arg("0")
        .arg("COUNT")
        .arg("20")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_ne!(cursor, "0");
    let (status, _) = http(
        proxy.http,
        "POST",
        "/admin/shards",
        &format!("{{\"addr\": \"{}\", \"name\": \"third\"}}", third.addr()),
    )
    .await;
    assert_eq!(status, 202);
    wait_state(proxy.http, "running").await;
    let mut cur = cursor;
    let mut rest = Vec::new();
    for _ in 0..10_000 {
        let (next, batch): (String, Vec<String>) = redis::cmd("SCAN")
            .arg(&cur)
            .arg("COUNT")
            .arg("20")
            .query_async(&mut c)
            .await
            .unwrap();
        rest.extend(batch);
        if next == "0" {
            break;
        }
        cur = next;
    }
    let mut union: BTreeSet<String> = first.into_iter().collect();
    union.extend(rest.iter().cloned());
    assert_eq!(
        union, expected,
        "a cursor from before the rebalance still sees every key"
    );
    // Whole iterations during the rebalance: exactly once each.
    for round in 0..3 {
        let (scanned, _) = scan_all(&mut c, &["COUNT", "15"]).await;
        let (_, p) = http(proxy.http, "GET", "/admin/rebalance", "").await;
        assert_eq!(
            p["state"], "running",
            "the rebalance outlasted round {round}: {p}"
        );
        assert_eq!(exactly_once(&scanned), expected, "round {round}");
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(exactly_once(&keys), expected, "KEYS, round {round}");
    }
    let (_, p) = http(proxy.http, "GET", "/admin/rebalance", "").await;
    assert!(p["keys_moved"].as_u64().unwrap() > 0, "{p}");
    // Counters keep their counts through the moves the SCANs made.
    for i in 0..100 {
        let v: i64 = redis::cmd("GET")
            .arg(format!("visits:{i}"))
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(v, i + 1);
    }
    let mut raw = proxy.conn().await;
    assert_eq!(
        raw.cmd(&["FLUSHDB"]).await,
        format!(
            "-{}\r\n",
            tallyproxy::connection::keyspace::FLUSH_DURING_REBALANCE
        )
    );
    proxy.stop().await;
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("timeout")
        .arg("60")
        .arg("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_scan_and_bigkeys_through_the_proxy() {
    let (a, b) = (Redis::start(), Redis::start());
    let wal = TempDir::new("cli-scan");
    let proxy = Proxy::start(support::config(&[&a, &b], &wal)).await;
    let mut c = proxy.client().await;
    let expected = fill(&mut c, 30).await;
    let _: () = redis::cmd("SET")
        .arg("big")
        .arg("x".repeat(1000))
        .query_async(&mut c)
        .await
        .unwrap();
    let port = proxy.addr.port();
    let listed: Vec<String> = redis_cli(port, &["--scan"])
        .lines()
        .map(String::from)
        .collect();
    let mut want = expected.clone();
    want.insert("big".into());
    assert_eq!(exactly_once(&listed), want);
    let listed: Vec<String> = redis_cli(port, &["--scan", "--pattern", "s:1*"])
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(exactly_once(&listed), shard_keys(&[&a, &b], "s:1*"));
    let big = redis_cli(port, &["--bigkeys"]);
    assert!(
        big.contains("Biggest string found so far '\"big\"' with 1000 bytes"),
        "{big}"
    );
    assert!(
        big.contains(&format!("Sampled {} keys in the keyspace!", want.len())),
        "{big}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_with_a_shard_down_answers_at_once_and_names_it() {
    let (a, mut b) = (Redis::start(), Redis::start());
    let wal = TempDir::new("flush-down");
    let proxy = Proxy::start(support::config(&[&a, &b], &wal)).await;
    let mut c = proxy.client().await;
    fill(&mut c, 30).await; // counters pending on both shards
    assert!(!shard_keys(&[&a], "*").is_empty());
    b.stop();
    let mut raw = proxy.conn().await;
    let r = raw.cmd(&["FLUSHDB"]).await;
    assert!(
        r.starts_with('-') && r.contains(&format!("shard redis_{}", b.port)),
        "{r}"
    );
    // The shard that answered was flushed; the connection carries on.
    assert!(shard_keys(&[&a], "*").is_empty());
    assert_eq!(raw.cmd(&["PING"]).await, "+PONG\r\n");
    proxy.stop().await;
}
