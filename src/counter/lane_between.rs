//! Reads sent between the batches of a long flush.
//!
//! A lane has one round trip out at a time, and a full flush of K keys is K /
//! `flush_batch_keys` batches sent one after another. A base read queued meanwhile (an INCR
//! of a key whose base is older than `cache_ttl`, a read-ahead) used to wait for the whole
//! flush: seconds at a million pending keys, during which such INCRs all but stopped. So
//! between two batches the lane takes the plain reads queued so far and sends them in a
//! round trip of their own, read only (number 0: no watermark moves, on a cluster slot
//! neither), then goes on with the flush.
//!
//! Why the value read is right: every batch of the lane before the gap is settled and none
//! after it is sent, so a key is either not in flight on this lane, or its whole in-flight
//! delta waits in a batch not yet sent ([`Ahead`] knows which, and how much). The shard's
//! value is then the base under that delta ([`Engine::settle_ahead`]), and the total the
//! client sees, `base + inflight + pending`, is the one it would have seen after the flush.
//!
//! What still waits for the end of the round: a key with a delta in flight that is not all
//! in this lane's unsent batches (another lane's batch, during a move), and every landing
//! (a read that must land the key's delta first). A landing needs a batch number, and the
//! round's numbers are given and logged already: a later number sent first would make the
//! earlier batches look applied.
//!
//! Owns the index of what the unsent batches carry and the reads of a gap. Does not own the
//! exactly-once protocol (`lane`).

use super::lane::{fail_waiters, send_batch, Batch, Lane, LaneError, Waiter};
use super::{windows, Engine};
use bytes::Bytes;
use std::sync::Arc;

type HashMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;

/// The counter deltas of a round's batches not yet sent, by key hash: 17 bytes per key,
/// built at the round's first gap that has a read in flight, dropped with the round.
pub(super) struct Ahead {
    hasher: ahash::RandomState,
    /// (hash of the key, its delta), sorted by hash.
    deltas: Vec<(u64, i64)>,
    /// Per entry of `deltas`: its batch has been sent, or another key has the same hash
    /// (then neither is looked up: such a key waits for the round's end).
    gone: Vec<bool>,
}

impl Ahead {
    pub(super) fn new<'a>(unsent: impl IntoIterator<Item = &'a Batch>) -> Ahead {
        let hasher = ahash::RandomState::new();
        let mut deltas: Vec<(u64, i64)> = unsent
            .into_iter()
            .flat_map(|b| b.items.iter())
            .filter(|(k, _)| windows::parse_pending(k).is_none())
            .filter_map(|(k, d)| Some((hasher.hash_one(&k[..]), (*d)?)))
            .collect();
        deltas.sort_unstable_by_key(|&(h, _)| h);
        let mut gone = vec![false; deltas.len()];
        for i in 1..deltas.len() {
            if deltas[i].0 == deltas[i - 1].0 {
                gone[i] = true;
                gone[i - 1] = true;
            }
        }
        Ahead {
            hasher,
            deltas,
            gone,
        }
    }

    fn find(&self, key: &[u8]) -> Option<usize> {
        let h = self.hasher.hash_one(key);
        self.deltas.binary_search_by_key(&h, |&(h, _)| h).ok()
    }

    /// `batch` is about to be sent: its deltas are no longer ahead of a read.
    pub(super) fn sent(&mut self, batch: &Batch) {
        for (k, _) in &batch.items {
            if let Some(i) = self.find(k) {
                self.gone[i] = true;
            }
        }
    }

    /// The delta of `key` in a batch not yet sent.
    fn get(&self, key: &[u8]) -> Option<i64> {
        let i = self.find(key)?;
        (!self.gone[i]).then_some(self.deltas[i].1)
    }
}

/// In a gap of a round: sends the plain reads queued since the round began, read only, in
/// batches of at most `flush_batch_keys`, and answers them. `unsent` are the round's batches
/// still to go (indexed into `ahead` on first use).
pub(super) async fn reads_between<'a>(
    lane: &Lane,
    engine: &Arc<Engine>,
    unsent: impl IntoIterator<Item = &'a Batch>,
    ahead: &mut Option<Ahead>,
) {
    let reads = lane.take_plain_reads();
    if reads.is_empty() {
        return;
    }
    let index = ahead.get_or_insert_with(|| Ahead::new(unsent));
    let mut items: Vec<(Bytes, Option<i64>)> = Vec::new();
    let mut under: HashMap<Bytes, i64> = HashMap::default();
    let mut waiters: HashMap<Bytes, Vec<Waiter>> = HashMap::default();
    let mut later = Vec::new();
    for (key, ws) in reads {
        match engine.inflight_of(&key) {
            None => {}
            Some(d) if index.get(&key) == Some(d) => {
                under.insert(key.clone(), d);
            }
            // In flight elsewhere too: only the round's end tells the base.
            Some(_) => {
                later.push((key, ws));
                continue;
            }
        }
        items.push((key.clone(), None));
        waiters.insert(key, ws);
    }
    lane.requeue_reads(later);
    engine
        .stats
        .reads_between
        .fetch_add(items.len() as u64, std::sync::atomic::Ordering::Relaxed);
    let limit = engine.flush_batch_keys().max(1);
    let mut rest = items.into_iter().peekable();
    while rest.peek().is_some() {
        let chunk: Vec<_> = rest.by_ref().take(limit).collect();
        let mut batch = Batch::new(engine, 0, chunk);
        batch.under = batch
            .items
            .iter()
            .filter_map(|(k, _)| Some((k.clone(), *under.get(k)?)))
            .collect();
        // A read-only batch is not retried: a failure reaches its readers, as between rounds.
        send_batch(lane, engine, batch, &mut waiters, &mut Vec::new()).await;
    }
    fail_waiters(waiters.into_values(), LaneError::Unavailable);
}
