//! What a flush of window deltas costs the shard, counted exactly (INFO commandstats): a
//! windowed key's buckets are written by one HMGET and one HSET of its window hash (with its
//! INCRBY: three commands per key), past seconds are trimmed once a tenth of their retention
//! has piled up, a hash whose buckets all have a finite retention expires with an expiry
//! renewed only when a bucket needs more, and the sums stay exact past what a Lua number
//! holds.
//!
//! The proxy's wall clock is a manual one, an hour or two ahead of the real clock, so Redis
//! expires nothing meanwhile.

use super::windows::{config_at, flush, hour_ahead, incr};
use crate::support::int_reply as int;
use crate::support::{Proxy, Redis, TempDir};
use std::time::Duration;
use tallyproxy::clock::Clock;
use tallyproxy::config::HumanDuration;
use tallyproxy::config::Retention;
use tallyproxy::counter::window_store::{field, window_hash};
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

const NAMES: [&str; 8] = [
    "incrby", "hincrby", "hmget", "hset", "hget", "hdel", "expireat", "eval",
];

fn ttl(r: &Redis, key: Vec<u8>) -> i64 {
    redis::cmd("TTL").arg(key).query(&mut r.client()).unwrap()
}

/// The count of `key`'s bucket `t` of granularity `g` in its window hash.
fn bucket(r: &Redis, key: &[u8], g: usize, t: u64) -> Option<String> {
    redis::cmd("HGET")
        .arg(window_hash(key))
        .arg(field(g, t))
        .query(&mut r.client())
        .unwrap()
}

/// The commands of one flush of one windowed key: its INCRBY, one HMGET and one HSET of its
/// window hash, and the watermark's HGET and HSET; nothing else.
fn three_per_key() -> Vec<(String, u64)> {
    expected(&[
        ("incrby", 1),
        ("hincrby", 0),
        ("hmget", 1),
        ("hset", 2),
        ("hget", 1),
        ("hdel", 0),
        ("expireat", 0),
        ("eval", 1),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_windowed_key_is_flushed_in_three_commands_whatever_its_buckets() {
    let r = Redis::start();
    let wal = TempDir::new("win-flush-three");
    // 10 minutes and 10 seconds into an hour ahead: the seconds below share a minute.
    let t0 = hour_ahead() + 610;
    let clock = Clock::manual(t0 * 1000);
    let proxy = Proxy::start(long_ttl(config_at(&[&r], &wal, &clock))).await;
    let mut c = proxy.conn().await;
    r.reset_stats();
    incr(&mut c, "visits:k", 1).await;
    flush(&proxy).await;
    // A new hash: four buckets created; days are kept forever, so the hash never expires.
    // (One EVAL more: the read of the key's base at its first INCR.)
    let mut first = three_per_key();
    first[7].1 = 2;
    assert_eq!(calls(&r, &NAMES), first);
    assert_eq!(ttl(&r, window_hash(b"visits:k")), -1);
    r.reset_stats();

    // Three new seconds in the same minute, hour and day.
    for dt in 1..=3 {
        clock.set_ms((t0 + dt) * 1000);
        incr(&mut c, "visits:k", 1).await;
    }
    flush(&proxy).await;
    assert_eq!(calls(&r, &NAMES), three_per_key());
    for dt in 0..=3 {
        assert_eq!(bucket(&r, b"visits:k", 0, t0 + dt).as_deref(), Some("1"));
    }
    assert_eq!(bucket(&r, b"visits:k", 1, t0 - 10).as_deref(), Some("4"));
    assert_eq!(bucket(&r, b"visits:k", 2, t0 - 610).as_deref(), Some("4"));
    assert_eq!(
        bucket(&r, b"visits:k", 3, t0 - t0 % 86400).as_deref(),
        Some("4")
    );

    // The same seconds again (a replayed clock): the merged write adds to what is there.
    r.reset_stats();
    for dt in 1..=3 {
        clock.set_ms((t0 + dt) * 1000);
        incr(&mut c, "visits:k", 2).await;
    }
    flush(&proxy).await;
    assert_eq!(calls(&r, &NAMES), three_per_key());
    for dt in 1..=3 {
        assert_eq!(bucket(&r, b"visits:k", 0, t0 + dt).as_deref(), Some("3"));
    }
    assert_eq!(bucket(&r, b"visits:k", 2, t0 - 610).as_deref(), Some("10"));
    assert_eq!(c.cmd(&["GET", "visits:k"]).await, "$2\r\n10\r\n");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_seconds_are_trimmed_and_a_hash_of_finite_buckets_expires() {
    let r = Redis::start();
    let wal = TempDir::new("win-flush-trim");
    let t0 = hour_ahead() + 610;
    let clock = Clock::manual(t0 * 1000);
    let mut cfg = long_ttl(config_at(&[&r], &wal, &clock));
    cfg.windows.minutes = Retention::For(Duration::from_secs(86400));
    cfg.windows.hours = Retention::Off;
    cfg.windows.days = Retention::Off;
    let proxy = Proxy::start(cfg).await;
    let mut c = proxy.conn().await;
    let h = window_hash(b"visits:t");
    r.reset_stats();
    incr(&mut c, "visits:t", 1).await;
    flush(&proxy).await;
    // Every bucket has a finite retention: the hash expires an hour after its newest bucket
    // (the minute's, kept a day) stops being kept.
    assert_eq!(r.calls("expireat"), 1);
    let minute = t0 - t0 % 60;
    let expected = (minute + 60 + 86400 + 3600) as i64 - super::windows::real_now() as i64;
    let got = ttl(&r, h.clone());
    assert!(
        (got - expected).abs() <= 5,
        "TTL {got}, expected about {expected}"
    );

    // A second later: the same minute needs no longer expiry, so none is sent.
    r.reset_stats();
    clock.set_ms((t0 + 1) * 1000);
    incr(&mut c, "visits:t", 1).await;
    flush(&proxy).await;
    assert_eq!(r.calls("expireat"), 0);
    assert_eq!(r.calls("hdel"), 0, "nothing to trim yet");
    assert_eq!(bucket(&r, b"visits:t", 0, t0).as_deref(), Some("1"));

    // An hour and 400 s later the two seconds are past retention, and a trim is due (a tenth
    // of the shortest retention, 360 s, since the last): the flush deletes every field that
    // passed retention since the first flush (t0) up to the `w` marker (t0 + 600), one HDEL
    // per 1,000 names, and keeps the minute.
    r.reset_stats();
    let t1 = t0 + 3600 + 400;
    clock.set_ms(t1 * 1000);
    incr(&mut c, "visits:t", 1).await;
    flush(&proxy).await;
    let oldest = |at: u64, size: u64, keep: u64| ((at - size - keep) / size + 1) * size;
    let w = t0 + 600;
    let seconds = oldest(t1, 1, 3600).min(w + 1) - oldest(t0, 1, 3600);
    let minutes = (oldest(t1, 60, 86400).min(w - w % 60 + 60) - oldest(t0, 60, 86400)) / 60;
    assert_eq!(r.calls("hdel"), (seconds + minutes).div_ceil(1000));
    assert_eq!(r.calls("hmget"), 1);
    assert_eq!(bucket(&r, b"visits:t", 0, t0), None, "trimmed");
    assert_eq!(bucket(&r, b"visits:t", 0, t0 + 1), None, "trimmed");
    assert_eq!(bucket(&r, b"visits:t", 0, t1).as_deref(), Some("1"));
    assert_eq!(bucket(&r, b"visits:t", 1, minute).as_deref(), Some("2"));
    // The new minute needs the hash longer: the expiry is renewed.
    assert_eq!(r.calls("expireat"), 1);
    let expected = (t1 - t1 % 60 + 60 + 86400 + 3600) as i64 - super::windows::real_now() as i64;
    let got = ttl(&r, h.clone());
    assert!(
        (got - expected).abs() <= 5,
        "TTL {got}, expected about {expected}"
    );
    // A second later nothing more is trimmed.
    r.reset_stats();
    clock.set_ms((t1 + 1) * 1000);
    incr(&mut c, "visits:t", 1).await;
    flush(&proxy).await;
    assert_eq!(calls(&r, &NAMES), three_per_key());
    assert_eq!(int(&c.cmd(&["TALLY.LAST", "visits:t", "1h"]).await), 2);
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
    assert_eq!(
        bucket(&r, b"visits:x", 0, t0 + 1).as_deref(),
        Some("18014398509481986")
    );
    assert_eq!(
        bucket(&r, b"visits:x", 0, t0 + 2).as_deref(),
        Some("1999999999999998")
    );
    assert_eq!(bucket(&r, b"visits:x", 0, t0 + 3).as_deref(), Some("2"));
    // The day's field took the big sums by HINCRBY: exact in Redis's own arithmetic.
    let total: i64 = 2 * (9_007_199_254_740_993 + 999_999_999_999_999 + 1);
    assert_eq!(
        bucket(&r, b"visits:x", 3, t0 - t0 % 86400),
        Some(total.to_string())
    );
    assert_eq!(
        c.cmd(&["GET", "visits:x"]).await,
        format!("${}\r\n{total}\r\n", total.to_string().len())
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_seconds_are_written_by_one_batch_when_a_flush_takes_many() {
    let r = Redis::start();
    let wal = TempDir::new("win-flush-group");
    let t0 = hour_ahead() + 610;
    let clock = Clock::manual(t0 * 1000);
    let mut cfg = long_ttl(config_at(&[&r], &wal, &clock));
    // Batches of 10 items: 40 keys with two seconds each make 120 items, 12 batches or more.
    cfg.counters.flush_batch_keys = 10;
    let proxy = Proxy::start(cfg).await;
    let mut c = proxy.conn().await;
    let keys: Vec<String> = (0..40).map(|i| format!("visits:g{i}")).collect();
    for k in &keys {
        incr(&mut c, k, 1).await;
    }
    flush(&proxy).await;
    r.reset_stats();
    for dt in 1..=2 {
        clock.set_ms((t0 + dt) * 1000);
        for k in &keys {
            incr(&mut c, k, 1).await;
        }
    }
    flush(&proxy).await;
    // One INCRBY, one HMGET and one HSET per key, however the round was cut into batches.
    assert_eq!(r.calls("incrby"), 40);
    assert_eq!(r.calls("hmget"), 40);
    assert!(r.calls("eval") >= 8, "{} batches", r.calls("eval"));
    assert_eq!(
        r.calls("hset") - r.calls("hget"),
        40,
        "one HSET per key beside the watermark's"
    );
    for k in &keys {
        assert_eq!(bucket(&r, k.as_bytes(), 0, t0 + 2).as_deref(), Some("1"));
        assert_eq!(bucket(&r, k.as_bytes(), 1, t0 - 10).as_deref(), Some("3"));
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shorter_retention_or_a_granularity_turned_off_sweeps_what_it_no_longer_keeps() {
    let r = Redis::start();
    let wal = TempDir::new("win-flush-sweep");
    let t0 = hour_ahead() + 610;
    let clock = Clock::manual(t0 * 1000);
    let proxy = Proxy::start(long_ttl(config_at(&[&r], &wal, &clock))).await;
    let mut c = proxy.conn().await;
    incr(&mut c, "visits:s", 1).await;
    flush(&proxy).await;
    proxy.stop().await;
    // Restarted 700 s later with seconds kept 600 s and minutes off: the next write of the
    // key deletes its second (past the new retention) and its minute, keeps hour and day.
    let t1 = t0 + 700;
    clock.set_ms(t1 * 1000);
    let mut cfg = long_ttl(config_at(&[&r], &wal, &clock));
    cfg.windows.seconds = Retention::For(Duration::from_secs(600));
    cfg.windows.minutes = Retention::Off;
    let proxy = Proxy::start(cfg).await;
    let mut c = proxy.conn().await;
    assert_eq!(bucket(&r, b"visits:s", 0, t0).as_deref(), Some("1"));
    r.reset_stats();
    incr(&mut c, "visits:s", 1).await;
    flush(&proxy).await;
    assert_eq!(r.calls("hkeys"), 1, "one sweep");
    assert_eq!(
        bucket(&r, b"visits:s", 0, t0),
        None,
        "past the new retention"
    );
    assert_eq!(bucket(&r, b"visits:s", 1, t0 - 10), None, "minutes are off");
    assert_eq!(bucket(&r, b"visits:s", 0, t1).as_deref(), Some("1"));
    assert_eq!(bucket(&r, b"visits:s", 2, t0 - 610).as_deref(), Some("2"));
    assert_eq!(
        bucket(&r, b"visits:s", 3, t0 - t0 % 86400).as_deref(),
        Some("2")
    );
    // Once swept, the next flush does not sweep again.
    r.reset_stats();
    clock.set_ms((t1 + 1) * 1000);
    incr(&mut c, "visits:s", 1).await;
    flush(&proxy).await;
    assert_eq!(r.calls("hkeys"), 0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_below_what_another_proxy_trimmed_is_not_written() {
    let r = Redis::start();
    let (wal_a, wal_b) = (
        TempDir::new("win-flush-late-a"),
        TempDir::new("win-flush-late-b"),
    );
    let t0 = hour_ahead() + 610;
    // Proxy A's clock is two hours ahead of B's (or B's batch is a retry landing late).
    let clock_a = Clock::manual((t0 + 7200) * 1000);
    let clock_b = Clock::manual(t0 * 1000);
    let a = Proxy::start(long_ttl(config_at(&[&r], &wal_a, &clock_a))).await;
    let b = Proxy::start(long_ttl(config_at(&[&r], &wal_b, &clock_b))).await;
    let mut ca = a.conn().await;
    let mut cb = b.conn().await;
    incr(&mut ca, "visits:z", 1).await;
    flush(&a).await;
    incr(&mut cb, "visits:z", 1).await;
    flush(&b).await;
    // B's second is below what A's trim keeps (an hour before A's now): written, it would
    // never be trimmed. B's minute is within the week minutes are kept: written.
    assert_eq!(bucket(&r, b"visits:z", 0, t0), None);
    assert_eq!(bucket(&r, b"visits:z", 0, t0 + 7200).as_deref(), Some("1"));
    assert_eq!(bucket(&r, b"visits:z", 1, t0 - 10).as_deref(), Some("1"));
    assert_eq!(r.get("visits:z").as_deref(), Some("2"));
    a.stop().await;
    b.stop().await;
}
