//! MGET of counter keys: when every key is fresh in the cache the reply is written at
//! dispatch, no shard is asked, and the bytes are what a direct Redis holding the same
//! values answers; one key that is not sends the command the usual way, and the cache
//! statistics count each key once either way.

use crate::support::{config, encode, Proxy, Raw, Redis, TempDir};
use std::time::Duration;
use tallyproxy::config::HumanDuration;

async fn info_counter(c: &mut Raw, field: &str) -> u64 {
    let text = c.cmd(&["INFO", "counters"]).await;
    let prefix = format!("{field}:");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no {field} in {text}"))
        .trim()
        .parse()
        .unwrap()
}

/// INFO's (cache_hits, cache_misses).
async fn cache_counts(c: &mut Raw) -> (u64, u64) {
    (
        info_counter(c, "cache_hits").await,
        info_counter(c, "cache_misses").await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mget_of_cached_counters_is_answered_from_memory_byte_for_byte() {
    let (a, b) = (Redis::start(), Redis::start());
    let plain = Redis::start();
    let wal = TempDir::new("mget-cached");
    let mut cfg = config(&[&a, &b], &wal);
    // Every base stays fresh for the whole test, however slow the machine.
    cfg.counters.cache_ttl = HumanDuration(Duration::from_secs(3600));
    let proxy = Proxy::start(cfg).await;
    let mut p = proxy.conn().await;
    let mut r = Raw::connect(plain.addr().parse().unwrap()).await;
    let keys: Vec<String> = (0..10).map(|i| format!("mc:{i}")).collect();
    for (i, k) in keys.iter().enumerate() {
        for _ in 0..=i {
            assert_eq!(p.cmd(&["INCR", k]).await, r.cmd(&["INCR", k]).await);
        }
    }
    // A counter back at zero, and one decremented below.
    assert_eq!(
        p.cmd(&["DECR", "mc:0"]).await,
        r.cmd(&["DECR", "mc:0"]).await
    );
    for _ in 0..3 {
        assert_eq!(
            p.cmd(&["DECR", "mc:1"]).await,
            r.cmd(&["DECR", "mc:1"]).await
        );
    }
    a.reset_stats();
    b.reset_stats();
    let (hits, misses) = (
        info_counter(&mut p, "cache_hits").await,
        info_counter(&mut p, "cache_misses").await,
    );

    let mut all = vec!["MGET"];
    all.extend(keys.iter().map(String::as_str));
    let want = r.cmd(&all).await;
    assert_eq!(p.cmd(&all).await, want);
    assert!(
        want.starts_with("*10\r\n$1\r\n0\r\n$2\r\n-1\r\n$1\r\n3\r\n"),
        "{want}"
    );
    assert_eq!(a.calls("mget") + b.calls("mget"), 0, "no shard was asked");
    assert_eq!(info_counter(&mut p, "cache_hits").await, hits + 10);
    assert_eq!(info_counter(&mut p, "cache_misses").await, misses);

    // A plain string and a missing key among them: the shards answer those.
    assert_eq!(
        p.cmd(&["SET", "mc:s", "hello"]).await,
        r.cmd(&["SET", "mc:s", "hello"]).await
    );
    let (hits, misses) = (
        info_counter(&mut p, "cache_hits").await,
        info_counter(&mut p, "cache_misses").await,
    );
    let mixed = ["MGET", "mc:9", "mc:s", "mc:none", "mc:2"];
    let want = r.cmd(&mixed).await;
    assert_eq!(want, "*4\r\n$2\r\n10\r\n$5\r\nhello\r\n$-1\r\n$1\r\n3\r\n");
    assert_eq!(p.cmd(&mixed).await, want);
    assert!(a.calls("mget") + b.calls("mget") >= 1);
    assert_eq!(info_counter(&mut p, "cache_hits").await, hits + 2);
    assert_eq!(info_counter(&mut p, "cache_misses").await, misses + 2);
    proxy.stop().await;
}

/// Three fresh counters and two keys the cache cannot answer (a plain string, a missing
/// key) count 3 hits and 2 misses, exactly: on the usual path (the first two counters
/// found by the cache-only path before the string, which must not look them up again),
/// and as a barrier behind the client's own write in the same burst (planned once more
/// when it runs, and counted only then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mget_of_three_cached_and_two_uncached_keys_counts_three_hits_and_two_misses() {
    let (a, b) = (Redis::start(), Redis::start());
    let plain = Redis::start();
    let wal = TempDir::new("mget-counts");
    let mut cfg = config(&[&a, &b], &wal);
    cfg.counters.cache_ttl = HumanDuration(Duration::from_secs(3600));
    let proxy = Proxy::start(cfg).await;
    let mut p = proxy.conn().await;
    let mut r = Raw::connect(plain.addr().parse().unwrap()).await;
    for k in ["mh:1", "mh:2", "mh:2", "mh:3", "mh:3", "mh:3"] {
        assert_eq!(p.cmd(&["INCR", k]).await, r.cmd(&["INCR", k]).await);
    }
    let set = ["SET", "mh:s", "hello"];
    assert_eq!(p.cmd(&set).await, r.cmd(&set).await);
    let mget = ["MGET", "mh:1", "mh:2", "mh:s", "mh:3", "mh:none"];
    let want = r.cmd(&mget).await;
    assert_eq!(
        want,
        "*5\r\n$1\r\n1\r\n$1\r\n2\r\n$5\r\nhello\r\n$1\r\n3\r\n$-1\r\n"
    );

    let (hits, misses) = cache_counts(&mut p).await;
    assert_eq!(p.cmd(&mget).await, want);
    assert_eq!(cache_counts(&mut p).await, (hits + 3, misses + 2));

    // The write and the read in one send: the MGET waits for the SET (a barrier). Another
    // missing key: the first one's null is cached now, as a shard's read of a counter key.
    let set = ["SET", "mh:s", "again"];
    let mget = ["MGET", "mh:1", "mh:2", "mh:s", "mh:3", "mh:gone"];
    let mut both = encode(&set);
    both.extend_from_slice(&encode(&mget));
    let (hits, misses) = cache_counts(&mut p).await;
    p.send(&both).await;
    assert_eq!(p.reply().await, r.cmd(&set).await);
    let want = r.cmd(&mget).await;
    assert!(want.contains("again"), "{want}");
    assert_eq!(p.reply().await, want);
    assert_eq!(cache_counts(&mut p).await, (hits + 3, misses + 2));
    proxy.stop().await;
}
