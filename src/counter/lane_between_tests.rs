//! Reads around the batches of a flush (`lane_between`), against the fake shard of
//! `lane_tests`: a flush held at its second batch, and INCRs of keys whose bases are
//! unknown, some with deltas in the batches not yet sent (read right behind the held batch),
//! some with deltas in the held batch (read in the gap after it); and a flush that takes its
//! keys a few stripes at a time.

use super::lane_tests::{
    engine_with, flush_until_ok, incr, stat, until, within, FakeShard, Fault, Outcome, Value,
};
use std::collections::{HashMap, HashSet};

#[tokio::test]
async fn base_reads_go_out_behind_a_held_batch_and_in_the_gap_after_it() {
    let fake = FakeShard::start().await;
    // Three keys a batch: a flush of ten keys is four batches. A shard timeout longer than
    // the hold: the held batch is not retried.
    let engine = engine_with(
        &fake,
        "10s",
        "[counters]\nflush_batch_keys = 3\ncache_ttl = \"60s\"\n",
    );
    let keys: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
    let start = |i: usize| 100 * i as i64;
    for (i, k) in keys.iter().enumerate() {
        fake.set(k, Value::Str(start(i).to_string().into_bytes()));
        assert_eq!(incr(&engine, k, 1).await, start(i) + 1, "{k}");
    }
    // Every base forgotten, the deltas kept: each key needs a read before its next INCR.
    for k in &keys {
        engine.invalidate(k.as_bytes());
    }
    fake.misbehave(1, Fault::Hold);
    let flush = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.flush_all().await })
    };
    until("the second batch held", || fake.stalled() == 1).await;
    let writes = fake.writes();
    assert_eq!(writes.len(), 2, "{writes:?}");
    let set = |a: &super::lane_tests::Arrival| -> HashSet<Vec<u8>> {
        a.items.iter().map(|(k, _)| k.clone()).collect()
    };
    let (first, held) = (set(&writes[0]), set(&writes[1]));
    assert_eq!((first.len(), held.len()), (3, 3));

    // The first batch's keys are settled (fresh); every other key needs a read. Those whose
    // delta waits in the two batches not sent yet are read at once, behind the held batch;
    // those of the held batch wait for its outcome.
    let tasks: Vec<_> = keys
        .iter()
        .map(|k| {
            let (engine, k) = (engine.clone(), k.clone());
            tokio::spawn(async move { incr(&engine, &k, 10).await })
        })
        .collect();
    let lane = engine.lane("fake").unwrap();
    until("the four reads sent behind the held batch", || {
        stat(&engine.stats.reads_between) == 4 && lane.queued_reads() == 0
    })
    .await;
    fake.release();
    for (i, t) in tasks.into_iter().enumerate() {
        let v = within("an INCR", t).await.unwrap();
        assert_eq!(v, start(i) + 11, "{}", keys[i]);
    }
    assert!(within("the flush", flush).await.unwrap());

    // On the shard: the two first batches, the reads of the four keys of the unsent batches
    // (number 0, in batches of three), the read of the held batch's three keys, then the
    // last two batches.
    let arrivals = fake.arrivals();
    let at = |seq: u64| arrivals.iter().position(|a| a.seq == seq).unwrap();
    let all = fake.writes();
    assert_eq!(all.len(), 4, "{all:?}");
    let gap = &arrivals[at(all[1].seq) + 1..at(all[2].seq)];
    for a in gap {
        assert_eq!((a.seq, a.outcome), (0, Outcome::ReadOnly), "{arrivals:?}");
        assert!(a.items.iter().all(|(_, d)| d.is_none()), "{a:?}");
    }
    let unsent: HashSet<Vec<u8>> = set(&all[2]).union(&set(&all[3])).cloned().collect();
    let (last, behind) = gap.split_last().expect("reads in the gap");
    let behind: HashSet<Vec<u8>> = behind.iter().flat_map(set).collect();
    assert_eq!(behind, unsent, "{arrivals:?}");
    assert_eq!(set(last), held, "{arrivals:?}");
    assert!(arrivals[at(all[2].seq)..].iter().all(|a| a.seq != 0));
    assert_eq!(stat(&engine.stats.reads_between), 7);

    // Every increment lands once: the batches keep their numbers and order.
    flush_until_ok(&engine).await;
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(fake.int(k), Some(start(i) + 11), "{k} on the shard");
        assert_eq!(engine.value_of(k.as_bytes()), Some(Some(start(i) + 11)));
    }
    let mut applied: HashMap<u64, usize> = HashMap::new();
    for a in fake.writes() {
        *applied.entry(a.seq).or_default() += (a.outcome == Outcome::Applied) as usize;
    }
    assert!(applied.values().all(|&n| n == 1), "{applied:?}");
    let w = fake.writes();
    assert!(w.windows(2).all(|p| p[0].seq < p[1].seq), "{w:?}");
    assert_eq!(fake.watermark(), w.last().unwrap().seq);
}

#[tokio::test]
async fn a_full_take_goes_stripe_by_stripe_from_its_cursor() {
    let fake = FakeShard::start().await;
    let engine = engine_with(&fake, "10s", "[counters]\ncache_ttl = \"60s\"\n");
    let keys: Vec<String> = (0..300).map(|i| format!("c{i}")).collect();
    for k in &keys {
        assert_eq!(incr(&engine, k, 2).await, 2, "{k}");
    }
    let topo = engine.router().topology();
    let mut cursor = 0;
    let mut taken: Vec<Vec<u8>> = Vec::new();
    let mut takes = 0;
    while cursor < crate::counter::stripe::STRIPES {
        let before = cursor;
        let part = engine.take(Some((&topo, 0, &mut cursor)), None, 40, 0);
        takes += 1;
        assert!(cursor > before, "the cursor moves on");
        // A take ends with the stripe in which it reached its limit (or with the last).
        assert!(
            part.len() >= 40 || cursor == crate::counter::stripe::STRIPES,
            "{} keys, cursor {cursor}",
            part.len()
        );
        assert!(part.iter().all(|(_, d)| *d == 2));
        taken.extend(part.into_iter().map(|(k, _)| k.to_vec()));
    }
    assert!(takes >= 300 / 40 / 2, "{takes} takes");
    let distinct: HashSet<Vec<u8>> = taken.iter().cloned().collect();
    assert_eq!(distinct.len(), taken.len(), "a key taken twice");
    let all: HashSet<Vec<u8>> = keys.iter().map(|k| k.as_bytes().to_vec()).collect();
    assert_eq!(distinct, all);
}

#[tokio::test]
async fn a_flush_of_many_chunks_lands_every_delta_once_in_order() {
    let fake = FakeShard::start().await;
    // Two keys a batch: a flush takes eight keys' worth of stripes at a time.
    let engine = engine_with(
        &fake,
        "10s",
        "[counters]\nflush_batch_keys = 2\ncache_ttl = \"60s\"\n",
    );
    let keys: Vec<String> = (0..120).map(|i| format!("m{i}")).collect();
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(incr(&engine, k, i as i64 + 1).await, i as i64 + 1, "{k}");
    }
    assert!(within("the flush", engine.flush_all()).await);
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(fake.int(k), Some(i as i64 + 1), "{k} on the shard");
    }
    let w = fake.writes();
    assert!(w.iter().all(|a| a.items.len() <= 2), "{w:?}");
    assert!(w.len() >= 60, "{} batches", w.len());
    assert!(w.windows(2).all(|p| p[0].seq < p[1].seq), "{w:?}");
    assert!(w.iter().all(|a| a.outcome == Outcome::Applied), "{w:?}");
    assert_eq!(fake.watermark(), w.last().unwrap().seq);
}

#[tokio::test]
async fn a_read_of_a_key_in_a_failing_batch_is_answered_while_the_batch_retries() {
    let fake = FakeShard::start().await;
    // The first batch is held past the shard's timeout: its attempt fails and is retried.
    let engine = engine_with(
        &fake,
        "300ms",
        "[counters]\nflush_batch_keys = 3\ncache_ttl = \"60s\"\n",
    );
    let keys: Vec<String> = (0..6).map(|i| format!("r{i}")).collect();
    for k in &keys {
        assert_eq!(incr(&engine, k, 1).await, 1, "{k}");
    }
    fake.misbehave(0, Fault::Hold);
    let flush = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.flush_all().await })
    };
    until("the first batch held", || fake.stalled() == 1).await;
    let held = fake.writes()[0].items[0].0.clone();
    // A plain read of a key of the held batch waits for its outcome; when the attempt fails,
    // the reader is told the shard is unavailable at once, not when the retry lands.
    let lane = engine.lane("fake").unwrap();
    let read = lane.enqueue(bytes::Bytes::from(held.clone()), false);
    let r = within("the read of a key in the failing batch", read)
        .await
        .unwrap();
    assert!(
        matches!(
            r,
            Err(super::lane::LaneError::Unavailable | super::lane::LaneError::Timeout)
        ),
        "{r:?}"
    );
    fake.release();
    let _ = within("the flush", flush).await;
    flush_until_ok(&engine).await;
    for k in &keys {
        assert_eq!(fake.int(k), Some(1), "{k} on the shard");
    }
    let mut applied: HashMap<u64, usize> = HashMap::new();
    for a in fake.writes() {
        *applied.entry(a.seq).or_default() += (a.outcome == Outcome::Applied) as usize;
    }
    assert!(applied.values().all(|&n| n == 1), "{applied:?}");
}
