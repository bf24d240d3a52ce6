//! The periodic flush spreads its batches over `flush_spread` × `flush_interval`
//! (`counter::pace`): every key still lands exactly once, plain reads are answered while it
//! waits, and a flush wanted now (here `POST /admin/flush`) ends the pacing.

use crate::support::{config, eventually, ring_owner, Proxy, Redis, TempDir};
use std::time::{Duration, Instant};
use tallyproxy::config::{Config, HumanDuration};

/// Keys pending when the first periodic flush starts: 1,000 per shard, 100 batches of 10.
const KEYS: i64 = 2000;
/// The flush interval: the first periodic flush starts this long after the proxy.
const INTERVAL: Duration = Duration::from_secs(6);
/// Half the interval (`flush_spread = 0.5`).
const SPREAD: Duration = Duration::from_secs(3);

fn paced(shards: &[&Redis], wal: &TempDir) -> Config {
    let mut cfg = config(shards, wal);
    cfg.counters.flush_interval = HumanDuration(INTERVAL);
    cfg.counters.flush_spread = 0.5;
    // Small batches, so that a shard's keys take many chunks (a flush taken whole in its
    // first chunk is not paced).
    cfg.counters.flush_batch_keys = 10;
    // No base goes stale during the test: every read is one the test makes.
    cfg.counters.cache_ttl = HumanDuration(Duration::from_secs(60));
    cfg
}

/// `INCRBY paced:<i> i+1` for every key, in one pipeline, answered exactly.
async fn load(proxy: &Proxy) {
    let mut con = proxy.client().await;
    let mut pipe = redis::pipe();
    for i in 0..KEYS {
        pipe.cmd("INCRBY").arg(format!("paced:{i}")).arg(i + 1);
    }
    let replies: Vec<i64> = pipe.query_async(&mut con).await.unwrap();
    assert_eq!(replies, (1..=KEYS).collect::<Vec<_>>());
}

/// `INCRBY`s the shards have run (a flush's script runs one per key).
fn landed(shards: &[&Redis]) -> u64 {
    shards.iter().map(|s| s.calls("incrby")).sum()
}

/// The value of `key` on whichever shard holds it.
fn stored(shards: &[&Redis], key: &str) -> Option<i64> {
    let port = ring_owner(shards, key);
    let s = shards.iter().find(|s| s.port == port).unwrap();
    s.get(key).map(|v| v.parse().unwrap())
}

/// Waits for the first periodic flush's first `INCRBY`; the time it was seen.
async fn flush_started(shards: &[&Redis]) -> Instant {
    assert!(
        eventually(INTERVAL * 2, || landed(shards) > 0).await,
        "no periodic flush started"
    );
    Instant::now()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_periodic_flush_spreads_its_batches_and_lands_every_key_once() {
    let (a, b) = (Redis::start(), Redis::start());
    let shards = [&a, &b];
    let wal = TempDir::new("paced-spread");
    let proxy = Proxy::start(paced(&shards, &wal)).await;
    load(&proxy).await;
    let started = flush_started(&shards).await;
    assert!(
        eventually(INTERVAL * 2, || landed(&shards) == KEYS as u64).await,
        "the flush did not land every key: {} INCRBYs",
        landed(&shards)
    );
    let took = started.elapsed();
    // At full speed 200 batches of 10 keys take well under a second; paced, the last
    // chunk is due at the end of the spread.
    assert!(
        took >= SPREAD / 2,
        "the periodic flush took {took:?}: not spread over {SPREAD:?}"
    );
    for i in 0..KEYS {
        assert_eq!(stored(&shards, &format!("paced:{i}")), Some(i + 1));
    }
    proxy.stop().await;
    assert_eq!(landed(&shards), KEYS as u64, "a key landed twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_answered_while_a_paced_flush_waits_and_a_flush_wanted_now_ends_it() {
    let (a, b) = (Redis::start(), Redis::start());
    let shards = [&a, &b];
    let wal = TempDir::new("paced-now");
    let proxy = Proxy::start(paced(&shards, &wal)).await;
    // A counter key the proxy has never seen: its GET is a read on the lane.
    let port = ring_owner(&shards, "paced:read");
    let owner = shards.iter().find(|s| s.port == port).unwrap();
    owner.cmd(&["SET", "paced:read", "41"]);
    load(&proxy).await;
    let started = flush_started(&shards).await;
    tokio::time::sleep(SPREAD / 6).await;

    let mut con = proxy.client().await;
    let read: i64 = redis::cmd("GET")
        .arg("paced:read")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(read, 41);
    let so_far = landed(&shards);
    assert!(
        so_far < KEYS as u64,
        "the read was answered only once the flush had landed all {so_far} keys"
    );
    // Increments of keys the flush has taken, or not yet: each lands once, in this flush
    // or the next.
    for i in 0..100 {
        let v: i64 = redis::cmd("INCRBY")
            .arg(format!("paced:{i}"))
            .arg(1000)
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(v, i + 1 + 1000);
    }

    let asked = Instant::now();
    let (status, body) = proxy.http("POST", "/admin/flush").await;
    assert_eq!(status, 200, "{body}");
    let (took, left) = (asked.elapsed(), SPREAD.saturating_sub(started.elapsed()));
    // At full speed the rest takes tens of milliseconds; on the schedule, about `left`.
    assert!(
        took < Duration::from_millis(1500),
        "the admin flush took {took:?}: it waited for the schedule ({left:?} of it left)"
    );
    for i in 0..KEYS {
        let extra = if i < 100 { 1000 } else { 0 };
        assert_eq!(stored(&shards, &format!("paced:{i}")), Some(i + 1 + extra));
    }
    assert_eq!(stored(&shards, "paced:read"), Some(41));
    // One INCRBY per key, plus one more for each of the 100 keys incremented again after its
    // first delta had landed (how many had is up to the schedule).
    let n = landed(&shards);
    assert!(
        (KEYS as u64..=KEYS as u64 + 100).contains(&n),
        "{n} INCRBYs for {KEYS} keys"
    );
    drop(con);
    proxy.stop().await;
    assert_eq!(landed(&shards), n, "the stop landed something again");
}
