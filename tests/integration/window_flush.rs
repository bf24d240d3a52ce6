//! What a flush of window deltas costs the shard, counted exactly (INFO commandstats): a
//! bucket hash's expiry is set when the flush creates a bucket in it, not on every flush,
//! and the fields of one hash written by one flush are merged into one HMGET and one HSET,
//! exactly even past what a Lua number holds.
//!
//! The proxy's wall clock is a manual one, an hour or two ahead of the real clock, so Redis
//! expires nothing meanwhile.

use super::windows::{config_at, flush, hour_ahead, incr};
use crate::support::{Proxy, Redis, TempDir};
use std::time::Duration;
use tallyproxy::clock::Clock;
use tallyproxy::config::HumanDuration;
use tallyproxy::counter::windows::bucket_key;
use tallyproxy::Config;

/// A cached base stays fresh for the whole test: no read-ahead adds a command to count.
fn long_ttl(mut cfg: Config) -> Config {
    cfg.counters.cache_ttl = HumanDuration(Duration::from_secs(3600));
    cfg
}

/// Commands the shard ran since its stats were reset, for the names given.
fn calls(r: &Redis, names: &[&str]) -> Vec<(String, u64)> {
    names.iter().map(|n| (n.to_string(), r.calls(n))).collect()
}

fn expected(counts: &[(&str, u64)]) -> Vec<(String, u64)> {
    counts.iter().map(|(n, c)| (n.to_string(), *c)).collect()
}

const NAMES: [&str; 7] = [
    "incrby", "hincrby", "hmget", "hset", "hget", "expireat", "eval",
];

fn ttl(r: &Redis, key: Vec<u8>) -> i64 {
    redis::cmd("TTL").arg(key).query(&mut r.client()).unwrap()
}

fn field(r: &Redis, key: Vec<u8>, field: u64) -> Option<String> {
    redis::cmd("HGET")
        .arg(key)
        .arg(field)
        .query(&mut r.client())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_expiry_is_set_when_the_bucket_is_created_and_one_hash_takes_one_hset() {
    let r = Redis::start();
    let wal = TempDir::new("win-flush-expiry");
    // 10 minutes and 10 seconds into an hour ahead: the seconds below share a minute.
    let t0 = hour_ahead() + 610;
    let clock = Clock::manual(t0 * 1000);
    let proxy = Proxy::start(long_ttl(config_at(&[&r], &wal, &clock))).await;
    let mut c = proxy.conn().await;
    incr(&mut c, "visits:k", 1).await;
    flush(&proxy).await;
    let (s, m, h, d) = (
        bucket_key(b"visits:k", 0, t0),
        bucket_key(b"visits:k", 1, t0),
        bucket_key(b"visits:k", 2, t0),
        bucket_key(b"visits:k", 3, t0),
    );
    // Created by that flush: seconds, minutes and hours expire; days are kept forever.
    assert!(ttl(&r, s.clone()) > 0);
    assert!(ttl(&r, m.clone()) > 0);
    assert!(ttl(&r, h.clone()) > 0);
    assert_eq!(ttl(&r, d.clone()), -1);
    // A later expiry can only come from an EXPIREAT: take them away and see which return.
    for k in [&s, &m, &h] {
        let _: i64 = redis::cmd("PERSIST")
            .arg(k.as_slice())
            .query(&mut r.client())
            .unwrap();
    }
    r.reset_stats();

    // Three new seconds in the same minute, hour and day.
    for dt in 1..=3 {
        clock.set_ms((t0 + dt) * 1000);
        incr(&mut c, "visits:k", 1).await;
    }
    flush(&proxy).await;
    assert_eq!(
        calls(&r, &NAMES),
        expected(&[
            ("incrby", 1),
            // The minute, hour and day fields exist: one HINCRBY each, no expiry.
            ("hincrby", 3),
            // The three second fields: one HMGET and one HSET (beside the watermark's).
            ("hmget", 1),
            ("hset", 2),
            ("hget", 1),
            // New second buckets: their hash's expiry, once.
            ("expireat", 1),
            ("eval", 1),
        ])
    );
    assert!(ttl(&r, s.clone()) > 0, "the seconds' hash got new buckets");
    assert_eq!(ttl(&r, m.clone()), -1, "no new minute bucket, no EXPIREAT");
    assert_eq!(ttl(&r, h.clone()), -1, "no new hour bucket, no EXPIREAT");
    for dt in 0..=3 {
        assert_eq!(field(&r, s.clone(), t0 + dt).as_deref(), Some("1"));
    }
    assert_eq!(field(&r, m.clone(), t0 - 10).as_deref(), Some("4"));
    assert_eq!(field(&r, d.clone(), t0 - t0 % 86400).as_deref(), Some("4"));

    // The same seconds again (a replayed clock): the merged write adds to what is there.
    r.reset_stats();
    for dt in 1..=3 {
        clock.set_ms((t0 + dt) * 1000);
        incr(&mut c, "visits:k", 2).await;
    }
    flush(&proxy).await;
    assert_eq!(r.calls("hmget"), 1);
    assert_eq!(r.calls("expireat"), 0, "no bucket was created");
    for dt in 1..=3 {
        assert_eq!(field(&r, s.clone(), t0 + dt).as_deref(), Some("3"));
    }
    assert_eq!(field(&r, h.clone(), t0 - 610).as_deref(), Some("10"));
    assert_eq!(c.cmd(&["GET", "visits:k"]).await, "$2\r\n10\r\n");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_bucket_writes_stay_exact_past_what_a_lua_number_holds() {
    let r = Redis::start();
    let wal = TempDir::new("win-flush-exact");
    let t0 = hour_ahead() + 610;
    let clock = Clock::manual(t0 * 1000);
    let proxy = Proxy::start(long_ttl(config_at(&[&r], &wal, &clock))).await;
    let mut c = proxy.conn().await;
    // 2^53 + 1 is not a double; 999,999,999,999,999 (15 digits) is, and so is twice it.
    let big = "9007199254740993";
    let wide = "999999999999999";
    let steps = [(1, big), (2, wide), (3, "1")];
    for _ in 0..2 {
        for (dt, by) in steps {
            clock.set_ms((t0 + dt) * 1000);
            let reply = c.cmd(&["INCRBY", "visits:x", by]).await;
            assert!(reply.starts_with(':'), "{reply}");
        }
        flush(&proxy).await;
    }
    let s = bucket_key(b"visits:x", 0, t0);
    assert_eq!(
        field(&r, s.clone(), t0 + 1).as_deref(),
        Some("18014398509481986")
    );
    assert_eq!(
        field(&r, s.clone(), t0 + 2).as_deref(),
        Some("1999999999999998")
    );
    assert_eq!(field(&r, s, t0 + 3).as_deref(), Some("2"));
    // The day's field took every delta by HINCRBY: exact in Redis's own arithmetic.
    let total: i64 = 2 * (9_007_199_254_740_993 + 999_999_999_999_999 + 1);
    assert_eq!(
        field(&r, bucket_key(b"visits:x", 3, t0), t0 - t0 % 86400),
        Some(total.to_string())
    );
    assert_eq!(
        c.cmd(&["GET", "visits:x"]).await,
        format!("${}\r\n{total}\r\n", total.to_string().len())
    );
    proxy.stop().await;
}
