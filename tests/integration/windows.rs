//! Time-windowed counts: exact counts across second, minute and hour edges, before and
//! after flushes, across restarts and a kill -9, with a shard down and back, retention
//! expiry in Redis, the HTTP and RESP queries, and buckets merged by a rebalance.
//!
//! The proxy's wall clock is a manual one the tests move: no test waits for time to pass.
//! Start times are set ahead of the real clock (Redis expires bucket hashes by its own
//! clock), except where a test wants Redis to expire them.

use crate::support::{self, ring_owner, Proxy, ProxyProcess, Raw, Redis, TempDir};
use serde_json::Value;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tallyproxy::clock::format_time;
use tallyproxy::clock::Clock;
use tallyproxy::counter::window_store::{field, legacy_bucket_key, window_hash};
use tallyproxy::Config;

pub(crate) fn real_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An hour boundary two hours or so ahead of the real clock.
pub(crate) fn hour_ahead() -> u64 {
    (real_now() / 3600 + 2) * 3600
}

pub(crate) fn config_at(shards: &[&Redis], wal: &TempDir, clock: &Clock) -> Config {
    let mut c = support::config(shards, wal);
    c.clock = clock.clone();
    c
}

use crate::support::int_reply as int;

pub(crate) async fn incr(c: &mut Raw, key: &str, n: usize) {
    for _ in 0..n {
        let r = c.cmd(&["INCR", key]).await;
        assert!(r.starts_with(':'), "{r}");
    }
}

pub(crate) async fn range(c: &mut Raw, key: &str, from: u64, to: u64) -> i64 {
    int(&c
        .cmd(&["TALLY.RANGE", key, &from.to_string(), &to.to_string()])
        .await)
}

async fn json(p: &Proxy, method: &str, path: &str) -> (u16, Value) {
    let (status, body) = p.http(method, path).await;
    let v = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{body}: {e}"));
    (status, v)
}

pub(crate) async fn flush(p: &Proxy) {
    let (status, body) = json(p, "POST", "/admin/flush").await;
    assert_eq!(status, 200, "{body}");
}

/// Counts of one key, checked against the expected per-second counts `at` (absolute
/// second → count), over several ranges that mix granularities.
async fn check_ranges(c: &mut Raw, key: &str, at: &[(u64, i64)], t0: u64) {
    let expect = |from: u64, to: u64| -> i64 {
        at.iter()
            .filter(|(t, _)| (from..to).contains(t))
            .map(|(_, n)| n)
            .sum()
    };
    for (from, to) in [
        (t0, t0 + 1),
        (t0, t0 + 2),
        (t0 + 1, t0 + 3),
        (t0 + 2, t0 + 3),
        (t0 + 2, t0 + 62),
        (t0, t0 + 63),
        (t0 - 7200, t0 + 3600),
        (t0 - 86400 * 3 + 17, t0 + 86400 + 5),
    ] {
        assert_eq!(
            range(c, key, from, to).await,
            expect(from, to),
            "[{}, {})",
            format_time(from),
            format_time(to)
        );
    }
    // A range mixing granularities equals the sum of its seconds.
    let series = c
        .cmd(&[
            "TALLY.SERIES",
            key,
            &t0.to_string(),
            &(t0 + 63).to_string(),
            "1",
        ])
        .await;
    let values: Vec<i64> = series
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(values.len(), 126, "63 points of [t, n]: {series}");
    let per_second: i64 = values.iter().skip(1).step_by(2).sum();
    assert_eq!(per_second, range(c, key, t0, t0 + 63).await);
    assert_eq!(values[0], t0 as i64);
    assert_eq!(values[1], expect(t0, t0 + 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_are_exact_across_second_minute_and_hour_edges_before_and_after_a_flush() {
    let r = Redis::start();
    let wal = TempDir::new("win-edges");
    let t0 = hour_ahead() - 2; // hh:59:58
    let clock = Clock::manual(t0 * 1000);
    let proxy = Proxy::start(config_at(&[&r], &wal, &clock)).await;
    let mut c = proxy.conn().await;
    let key = "visits:edges";
    incr(&mut c, key, 3).await;
    clock.advance(1); // hh:59:59
    incr(&mut c, key, 2).await;
    clock.advance(1); // the next hour, 00:00:00
    incr(&mut c, key, 5).await;
    clock.advance(60); // 00:01:00
    incr(&mut c, key, 7).await;
    let at = [(t0, 3), (t0 + 1, 2), (t0 + 2, 5), (t0 + 62, 7)];

    // Nothing flushed yet: every count comes from the proxy.
    assert_eq!(r.cmd(&["DBSIZE"]), redis::Value::Int(0));
    check_ranges(&mut c, key, &at, t0).await;
    assert_eq!(int(&c.cmd(&["TALLY.LAST", key, "1"]).await), 7);
    assert_eq!(int(&c.cmd(&["TALLY.LAST", key, "61s"]).await), 12);
    assert_eq!(int(&c.cmd(&["TALLY.LAST", key, "1h"]).await), 17);

    // Flushed: Redis holds the buckets, one field each in the key's window hash, and the
    // answers are the same.
    flush(&proxy).await;
    let hget = |g: usize, bucket: u64| -> Option<String> {
        redis::cmd("HGET")
            .arg(window_hash(key.as_bytes()))
            .arg(field(g, bucket))
            .query(&mut r.client())
            .unwrap()
    };
    assert_eq!(hget(0, t0).as_deref(), Some("3"));
    assert_eq!(hget(0, t0 + 1).as_deref(), Some("2"));
    assert_eq!(hget(0, t0 + 2).as_deref(), Some("5"));
    assert_eq!(hget(1, t0 + 2).as_deref(), Some("5"));
    assert_eq!(
        hget(1, t0 - 58).as_deref(),
        Some("5"),
        "the minute before the hour"
    );
    assert_eq!(hget(2, t0 + 2).as_deref(), Some("12"));
    assert_eq!(hget(2, t0 + 2 - 3600).as_deref(), Some("5"));
    let day = (t0 + 2) / 86400 * 86400;
    let days = if day > t0 { 12 } else { 17 };
    assert_eq!(hget(3, day).as_deref(), Some(days.to_string().as_str()));
    check_ranges(&mut c, key, &at, t0).await;
    // The total is the same number.
    assert_eq!(c.cmd(&["GET", key]).await, "$2\r\n17\r\n");

    // New increments in a flushed second add to what Redis holds.
    incr(&mut c, key, 1).await;
    assert_eq!(int(&c.cmd(&["TALLY.LAST", key, "1"]).await), 8);

    // Three hours on, seconds are no longer kept: hours answer what they cover exactly.
    clock.advance(3 * 3600);
    assert_eq!(range(&mut c, key, t0 + 2, t0 + 2 + 7200).await, 13);
    assert_eq!(range(&mut c, key, t0 - 3598, t0 + 2).await, 5);
    // A range starting mid-minute cannot be answered exactly at its edge: the edge is left
    // out, and HTTP says so.
    let page_from = t0 + 30;
    assert_eq!(range(&mut c, key, page_from, t0 + 3600).await, 8);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_answers_ranges_sliding_windows_and_series() {
    let r = Redis::start();
    let wal = TempDir::new("win-http");
    let t0 = hour_ahead();
    let clock = Clock::manual(t0 * 1000 + 500);
    let proxy = Proxy::start(config_at(&[&r], &wal, &clock)).await;
    for _ in 0..3 {
        assert_eq!(proxy.http("POST", "/visits/home").await.0, 200);
    }
    clock.advance(90);
    for _ in 0..2 {
        assert_eq!(proxy.http("POST", "/visits/home").await.0, 200);
    }
    let via = format!("redis_{}", r.port);

    let (s, v) = json(&proxy, "GET", "/visits/home?last=60s").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["visits"], 2);
    assert_eq!(v["served_via"], via.as_str());
    assert_eq!(v["complete"], true);
    assert_eq!(v["to"], format_time(t0 + 91).as_str());
    assert_eq!(v["from"], format_time(t0 + 31).as_str());

    let path = format!("/visits/home?from={}&to={}", format_time(t0), t0 + 91);
    let (s, v) = json(&proxy, "GET", &path).await;
    assert_eq!((s, v["visits"].clone()), (200, Value::from(5)), "{v}");
    // An offset written with %2B, and `to` left out (now).
    let path = format!("/visits/home?from={}", "2000-01-01T01:00:00%2B01:00");
    let (s, v) = json(&proxy, "GET", &path).await;
    assert_eq!((s, v["visits"].clone()), (200, Value::from(5)), "{v}");
    assert_eq!(v["from"], "2000-01-01T00:00:00Z");

    let path = format!("/visits/home/series?from={t0}&to={}&step=1m", t0 + 120);
    let (s, v) = json(&proxy, "GET", &path).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["step"], 60);
    let points = v["points"].as_array().unwrap();
    assert_eq!(points.len(), 2);
    assert_eq!(points[0]["t"], format_time(t0).as_str());
    assert_eq!(points[0]["visits"], 3);
    assert_eq!(points[1]["visits"], 2);

    // The plain read is unchanged.
    let (_, v) = json(&proxy, "GET", "/visits/home").await;
    assert_eq!(v["visits"], 5);

    // Beyond retention: seconds go after an hour; a range that needs them there says so.
    flush(&proxy).await;
    clock.advance(2 * 3600);
    let path = format!("/visits/home?from={}&to={}", t0 + 1, t0 + 120);
    let (s, v) = json(&proxy, "GET", &path).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["complete"], false);
    assert_eq!(v["visits"], 2, "the kept minute [t0+60, t0+120) only: {v}");
    assert_eq!(
        v["uncovered"],
        serde_json::json!([{"from": format_time(t0 + 1), "to": format_time(t0 + 60)}])
    );

    for (path, status) in [
        ("/visits/home?from=yesterday", 400),
        ("/visits/home?last=0s", 400),
        ("/visits/home?last=5s&from=1", 400),
        ("/visits/home?bogus=1", 400),
        ("/visits/home?to=5", 400),
        ("/visits/home?from=20&to=10", 400),
        ("/visits/home/series?from=0&to=100000000&step=1s", 400),
        ("/visits/home/series?from=1&step=soon", 400),
        ("/visits/home/series?last=5s", 400),
        ("/visits/a%7Db?last=5s", 400),
    ] {
        let (s, v) = json(&proxy, "GET", path).await;
        assert_eq!(s, status, "{path}: {v}");
        assert!(v["error"].is_string(), "{path}: {v}");
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp_queries_refuse_what_they_cannot_answer() {
    let r = Redis::start();
    let wal = TempDir::new("win-resp");
    let proxy = Proxy::start(support::config(&[&r], &wal)).await;
    let mut c = proxy.conn().await;
    incr(&mut c, "plain:counter", 1).await;
    assert_eq!(
        c.cmd(&["TALLY.LAST", "plain:counter", "60"]).await,
        "-ERR the key does not count into time windows (see [windows] match)\r\n"
    );
    assert!(c
        .cmd(&["TALLY.RANGE", "visits:x", "10", "5"])
        .await
        .starts_with("-ERR the range must end after it starts"));
    assert!(c
        .cmd(&["TALLY.RANGE", "visits:x", "soon", "5"])
        .await
        .starts_with("-ERR invalid time"));
    assert!(c
        .cmd(&["TALLY.SERIES", "visits:x", "0", "1000000", "1"])
        .await
        .starts_with("-ERR the series would have 1000000 points"));
    assert_eq!(
        c.cmd(&["TALLY.LAST", "visits:x"]).await,
        "-ERR wrong number of arguments for 'tally.last' command\r\n"
    );
    assert_eq!(
        c.cmd(&["TALLY.LAST", "tally:w:x", "5"]).await,
        "-ERR keys starting with 'tally:' are reserved by tallyproxy\r\n"
    );
    // An increment pipelined before a query is in it.
    let mut burst = support::encode(&["INCR", "visits:piped"]);
    burst.extend(support::encode(&["TALLY.LAST", "visits:piped", "5"]));
    c.send(&burst).await;
    assert_eq!(c.reply().await, ":1\r\n");
    assert_eq!(c.reply().await, ":1\r\n");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_mode_keeps_the_buckets_in_the_proxy_and_its_log() {
    let wal = TempDir::new("win-memory");
    let t0 = 1_763_856_000; // an hour boundary; no Redis to expire anything
    let clock = Clock::manual(t0 * 1000);
    let mem = Proxy::start(config_at(&[], &wal, &clock)).await;
    let mut c = mem.conn().await;
    incr(&mut c, "visits:m", 3).await;
    clock.advance(61);
    incr(&mut c, "visits:m", 2).await;
    assert_eq!(range(&mut c, "visits:m", t0, t0 + 1).await, 3);
    assert_eq!(int(&c.cmd(&["TALLY.LAST", "visits:m", "61"]).await), 2);
    assert_eq!(range(&mut c, "visits:m", t0, t0 + 120).await, 5);
    assert_eq!(range(&mut c, "visits:m", t0 - 86400, t0 + 86400).await, 5);
    let (s, v) = json(&mem, "GET", "/visits/m?last=1h").await;
    assert_eq!((s, v["visits"].clone()), (200, Value::from(5)), "{v}");
    assert_eq!(v["served_via"], "in_memory");
    assert_eq!(
        c.cmd(&["DBSIZE"]).await,
        ":1\r\n",
        "window entries are not keys"
    );
    drop(c);
    mem.stop().await;

    // The log brings them back.
    let mem = Proxy::start(config_at(&[], &wal, &clock)).await;
    let mut c = mem.conn().await;
    assert_eq!(range(&mut c, "visits:m", t0, t0 + 1).await, 3);
    assert_eq!(range(&mut c, "visits:m", t0 + 60, t0 + 62).await, 2);
    // Two hours on, seconds are gone: a sub-minute range is not kept, whole minutes are.
    clock.advance(2 * 3600);
    assert_eq!(range(&mut c, "visits:m", t0, t0 + 1).await, 0);
    assert_eq!(range(&mut c, "visits:m", t0, t0 + 60).await, 3);
    let (_, v) = json(&mem, "GET", &format!("/visits/m?from={t0}&to={}", t0 + 1)).await;
    assert_eq!(v["complete"], false, "{v}");
    mem.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_survive_a_restart_and_a_shard_outage() {
    let mut r = Redis::start();
    let wal = TempDir::new("win-restart");
    let t0 = hour_ahead() + 600;
    let clock = Clock::manual(t0 * 1000);
    let proxy = Proxy::start(config_at(&[&r], &wal, &clock)).await;
    let mut c = proxy.conn().await;
    incr(&mut c, "visits:r", 4).await;
    clock.advance(1);
    incr(&mut c, "visits:r", 6).await;
    drop(c);
    // A graceful stop flushes; the next proxy reads the buckets back.
    proxy.stop().await;
    let proxy = Proxy::start(config_at(&[&r], &wal, &clock)).await;
    let mut c = proxy.conn().await;
    assert_eq!(range(&mut c, "visits:r", t0, t0 + 1).await, 4);
    assert_eq!(range(&mut c, "visits:r", t0, t0 + 2).await, 10);

    // The shard goes away with increments pending (nothing flushed since): queries are
    // refused, increments are kept, and everything lands once it is back.
    clock.advance(60);
    incr(&mut c, "visits:r", 5).await;
    r.stop();
    assert!(
        support::eventually(Duration::from_secs(5), || {
            std::net::TcpStream::connect(("127.0.0.1", r.port)).is_err()
        })
        .await
    );
    let refused = c.cmd(&["TALLY.LAST", "visits:r", "3600"]).await;
    assert!(refused.starts_with("-TRYAGAIN"), "{refused}");
    incr(&mut c, "visits:r", 2).await;
    let (s, _) = proxy.http("POST", "/admin/flush").await;
    assert_eq!(s, 503, "the flush cannot land while the shard is down");
    r.restart();
    // The restarted shard is empty (no persistence): only what was pending lands.
    let mut landed = false;
    for _ in 0..100 {
        if proxy.http("POST", "/admin/flush").await.0 == 200 {
            landed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(landed, "the flush landed after the shard came back");
    assert_eq!(range(&mut c, "visits:r", t0 + 61, t0 + 62).await, 7);
    assert_eq!(
        range(&mut c, "visits:r", t0, t0 + 2).await,
        0,
        "lost with the shard"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_proxy_loses_no_window_count() {
    let r = Redis::start();
    let wal = TempDir::new("win-kill");
    let mut p = ProxyProcess::start(&[r.addr()], &wal, "always", "1h");
    let mut c = Raw::connect(p.addr()).await;
    incr(&mut c, "visits:k", 250).await;
    p.kill9();
    assert_eq!(r.cmd(&["DBSIZE"]), redis::Value::Int(0), "nothing flushed");
    let p = ProxyProcess::start(&[r.addr()], &wal, "always", "1h");
    let mut c = Raw::connect(p.addr()).await;
    assert_eq!(int(&c.cmd(&["TALLY.LAST", "visits:k", "1h"]).await), 250);
    drop(p);
    // Replayed deltas land once: a third start reads them from Redis.
    let mut p = ProxyProcess::start(&[r.addr()], &wal, "always", "1h");
    p.terminate();
    let p = ProxyProcess::start(&[r.addr()], &wal, "always", "1h");
    let mut c = Raw::connect(p.addr()).await;
    assert_eq!(int(&c.cmd(&["TALLY.LAST", "visits:k", "1h"]).await), 250);
    assert_eq!(c.cmd(&["GET", "visits:k"]).await, "$3\r\n250\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buckets_past_their_retention_are_not_written() {
    let r = Redis::start();
    let wal = TempDir::new("win-expire");
    // Three hours ago, 10 s into a minute: the second is past retention when flushed; the
    // minute is not.
    let t = (real_now() - 3 * 3600) / 60 * 60 + 10;
    let clock = Clock::manual(t * 1000);
    let proxy = Proxy::start(config_at(&[&r], &wal, &clock)).await;
    let mut c = proxy.conn().await;
    incr(&mut c, "visits:old", 4).await;
    clock.set_ms(real_now() * 1000);
    flush(&proxy).await;
    let hget = |g: usize, b: u64| -> Option<String> {
        redis::cmd("HGET")
            .arg(window_hash(b"visits:old"))
            .arg(field(g, b))
            .query(&mut r.client())
            .unwrap()
    };
    assert_eq!(hget(0, t), None, "the second is past retention");
    assert_eq!(hget(1, t - 10).as_deref(), Some("4"), "minutes kept");
    assert_eq!(hget(3, t - t % 86400).as_deref(), Some("4"), "days kept");
    assert_eq!(
        redis::cmd("TTL")
            .arg(window_hash(b"visits:old"))
            .query::<i64>(&mut r.client())
            .unwrap(),
        -1,
        "days are kept forever, and so is the hash"
    );
    // Now: the minute answers, the second does not.
    assert_eq!(range(&mut c, "visits:old", t - 10, t + 50).await, 4);
    let (_, v) = json(&proxy, "GET", &format!("/visits/old?from={t}&to={}", t + 1)).await;
    assert_eq!(v["visits"], 0, "{v}");
    assert_eq!(v["complete"], false, "{v}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buckets_of_the_layout_before_are_read_and_moved_into_the_window_hash() {
    let a = Redis::start();
    let b = Redis::start();
    let wal = TempDir::new("win-legacy");
    let t0 = hour_ahead() + 65;
    let clock = Clock::manual(t0 * 1000);
    let proxy = Proxy::start(config_at(&[&a], &wal, &clock)).await;
    let mut c = proxy.conn().await;
    // What an earlier build wrote: one hash per granularity and period, field = start.
    let minute = t0 - t0 % 60;
    for (g, bucket, n) in [(0, t0, 3), (1, minute, 3), (2, t0 - t0 % 3600, 3)] {
        let _: i64 = redis::cmd("HSET")
            .arg(legacy_bucket_key(b"visits:old", g, bucket))
            .arg(bucket)
            .arg(n)
            .query(&mut a.client())
            .unwrap();
    }
    incr(&mut c, "visits:old", 2).await;
    assert_eq!(
        range(&mut c, "visits:old", t0, t0 + 1).await,
        5,
        "pending + old"
    );
    flush(&proxy).await;
    assert_eq!(
        range(&mut c, "visits:old", t0, t0 + 1).await,
        5,
        "new + old"
    );
    assert_eq!(range(&mut c, "visits:old", minute, minute + 60).await, 5);
    assert_eq!(int(&c.cmd(&["TALLY.LAST", "visits:old", "1h"]).await), 5);
    // A rebalance moves the old hashes of keys whose owner changes with the rest: find a
    // key that moves to the new shard, give it old buckets, and add the shard.
    let moving = (0..500)
        .map(|i| format!("visits:m{i}"))
        .find(|k| ring_owner(&[&a, &b], k) == b.port)
        .expect("a key that moves");
    let _: i64 = redis::cmd("HSET")
        .arg(legacy_bucket_key(moving.as_bytes(), 1, minute))
        .arg(minute)
        .arg(7)
        .query(&mut a.client())
        .unwrap();
    crate::rebalance::add_shard(proxy.http, &b).await;
    crate::rebalance::wait_done(proxy.http, Duration::from_secs(30)).await;
    flush(&proxy).await;
    assert_eq!(range(&mut c, &moving, minute, minute + 60).await, 7);
    let on = |s: &Redis, k: Vec<u8>| -> i64 {
        redis::cmd("EXISTS").arg(k).query(&mut s.client()).unwrap()
    };
    assert_eq!(
        on(&a, legacy_bucket_key(moving.as_bytes(), 1, minute)),
        0,
        "moved off"
    );
    assert_eq!(
        redis::cmd("HGET")
            .arg(window_hash(moving.as_bytes()))
            .arg(field(1, minute))
            .query::<Option<String>>(&mut b.client())
            .unwrap()
            .as_deref(),
        Some("7"),
        "merged into its window hash on the new owner"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_merges_buckets_into_their_new_owner() {
    let (a, b, new) = (Redis::start(), Redis::start(), Redis::start());
    let wal = TempDir::new("win-rebalance");
    let t0 = hour_ahead() + 120;
    let clock = Clock::manual(t0 * 1000);
    let proxy = Proxy::start(config_at(&[&a, &b], &wal, &clock)).await;
    let mut c = proxy.conn().await;
    let pages: Vec<String> = (0..120).map(|i| format!("visits:p{i}")).collect();
    for (i, p) in pages.iter().enumerate() {
        incr(&mut c, p, 1 + i % 3).await;
    }
    flush(&proxy).await;
    // Pending increments at the next second, some on keys about to move.
    clock.advance(1);
    for p in &pages {
        incr(&mut c, p, 1).await;
    }
    crate::rebalance::add_shard(proxy.http, &new).await;
    // Reads during the move are exact too.
    for (i, p) in pages.iter().enumerate().step_by(7) {
        assert_eq!(
            range(&mut c, p, t0, t0 + 2).await,
            2 + (i % 3) as i64,
            "{p}"
        );
    }
    crate::rebalance::wait_done(proxy.http, Duration::from_secs(30)).await;
    flush(&proxy).await;
    let all = [&a, &b, &new];
    let mut moved = 0;
    for (i, p) in pages.iter().enumerate() {
        let want = 2 + (i % 3) as i64;
        assert_eq!(range(&mut c, p, t0, t0 + 2).await, want, "{p}");
        assert_eq!(range(&mut c, p, t0 - 3600, t0 + 3600).await, want, "{p}");
        // The page's window hash is on the page's owner only.
        let owner = ring_owner(&all, p);
        {
            let bk = window_hash(p.as_bytes());
            for s in all {
                let n: i64 = redis::cmd("EXISTS")
                    .arg(&bk)
                    .query(&mut s.client())
                    .unwrap();
                assert_eq!(
                    n,
                    (s.port == owner) as i64,
                    "{} on {}",
                    String::from_utf8_lossy(&bk),
                    s.port
                );
            }
        }
        if owner == new.port {
            moved += 1;
        }
    }
    assert!(moved > 20, "{moved} of 120 pages moved to the new shard");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_flush_reply_does_not_double_count_the_buckets() {
    let a = Redis::start();
    let (relay, dropped) = crate::durability::lossy_relay(a.port).await;
    let wal = TempDir::new("win-relay");
    let toml = format!(
        "listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n[[shards]]\nname = \"only\"\naddr = \"127.0.0.1:{relay}\"\n\
         [backend]\ntimeout = \"300ms\"\n[counters]\nflush_interval = \"1h\"\n[durability]\nwal_dir = \"{}\"\n",
        wal.path().display()
    );
    let mut cfg = Config::from_toml_str(&toml).unwrap();
    let t0 = hour_ahead() + 5;
    cfg.clock = Clock::manual(t0 * 1000);
    let proxy = Proxy::start(cfg).await;
    let mut c = proxy.conn().await;
    incr(&mut c, "visits:relay", 250).await;
    proxy.stop().await;
    assert!(
        std::sync::atomic::AtomicBool::load(&dropped, std::sync::atomic::Ordering::SeqCst),
        "the relay dropped a flush reply"
    );
    // The batch was retried under the same id: the buckets hold each increment once.
    for g in 0..4 {
        let bucket = t0 - t0 % tallyproxy::counter::windows::SIZE[g];
        let v: Option<String> = redis::cmd("HGET")
            .arg(window_hash(b"visits:relay"))
            .arg(field(g, bucket))
            .query(&mut a.client())
            .unwrap();
        assert_eq!(v.as_deref(), Some("250"), "granularity {g}");
    }
    assert_eq!(a.get("visits:relay").as_deref(), Some("250"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_granularity_turned_off_is_neither_written_nor_used() {
    let r = Redis::start();
    let wal = TempDir::new("win-off");
    let t0 = hour_ahead() + 10;
    let clock = Clock::manual(t0 * 1000);
    let mut cfg = config_at(&[&r], &wal, &clock);
    cfg.windows.seconds = tallyproxy::config::Retention::Off;
    let proxy = Proxy::start(cfg).await;
    let mut c = proxy.conn().await;
    incr(&mut c, "visits:off", 3).await;
    flush(&proxy).await;
    let exists = |g: usize, b: u64| -> i64 {
        redis::cmd("HEXISTS")
            .arg(window_hash(b"visits:off"))
            .arg(field(g, b))
            .query(&mut r.client())
            .unwrap()
    };
    assert_eq!(exists(0, t0), 0, "no seconds");
    assert_eq!(exists(1, t0 - t0 % 60), 1, "minutes");
    // Whole minutes are answered; a part of a minute has no bucket to answer it.
    assert_eq!(range(&mut c, "visits:off", t0 - 10, t0 + 50).await, 3);
    let (_, v) = json(
        &proxy,
        "GET",
        &format!("/visits/off?from={t0}&to={}", t0 + 1),
    )
    .await;
    assert_eq!(
        (v["visits"].clone(), v["complete"].clone()),
        (Value::from(0), Value::from(false)),
        "{v}"
    );
    proxy.stop().await;
}
