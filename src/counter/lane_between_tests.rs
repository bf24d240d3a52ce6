//! Reads between the batches of a flush (`lane_between`), against the fake shard of
//! `lane_tests`: a flush held at its second batch, and INCRs of keys whose bases are
//! unknown, some with deltas in the batches not yet sent, answered before it goes on.

use super::lane_tests::{
    engine_with, flush_until_ok, incr, stat, until, within, FakeShard, Fault, Outcome, Value,
};
use std::collections::{HashMap, HashSet};

#[tokio::test]
async fn base_reads_go_out_between_the_batches_of_a_held_flush() {
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
    let first: HashSet<Vec<u8>> = writes[0].items.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(first.len(), 3);

    // The first batch's keys are settled (fresh); every other key needs a read: those of the
    // held batch, and those whose delta waits in the two batches not sent yet.
    let tasks: Vec<_> = keys
        .iter()
        .map(|k| {
            let (engine, k) = (engine.clone(), k.clone());
            tokio::spawn(async move { incr(&engine, &k, 10).await })
        })
        .collect();
    let lane = engine.lane("fake").unwrap();
    until("the reads queued", || lane.queued_reads() == 7).await;
    fake.release();
    for (i, t) in tasks.into_iter().enumerate() {
        let v = within("an INCR", t).await.unwrap();
        assert_eq!(v, start(i) + 11, "{}", keys[i]);
    }
    assert!(within("the flush", flush).await.unwrap());

    // On the shard: the two first batches, the seven reads (number 0, in batches of three),
    // then the last two batches.
    let arrivals = fake.arrivals();
    let at = |seq: u64| arrivals.iter().position(|a| a.seq == seq).unwrap();
    let all = fake.writes();
    assert_eq!(all.len(), 4, "{all:?}");
    let gap = &arrivals[at(all[1].seq) + 1..at(all[2].seq)];
    assert_eq!(gap.len(), 3, "{arrivals:?}");
    let read: HashSet<Vec<u8>> = gap
        .iter()
        .flat_map(|a| {
            assert_eq!((a.seq, a.outcome), (0, Outcome::ReadOnly));
            a.items.iter().map(|(k, d)| {
                assert_eq!(*d, None);
                k.clone()
            })
        })
        .collect();
    let others: HashSet<Vec<u8>> = keys
        .iter()
        .map(|k| k.as_bytes().to_vec())
        .filter(|k| !first.contains(k))
        .collect();
    assert_eq!(read, others);
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
