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

/// The counter deltas of a round's batches not yet sent, by key hash: 24 bytes per key,
/// built at the round's first gap that has a read in flight, dropped with the round.
pub(super) struct Ahead {
    hasher: ahash::RandomState,
    /// (hash of the key, its delta, its batch), sorted by hash. The batch is the position of
    /// the key's batch among the unsent ones the index was built from, or [`SHARED`] when
    /// another key has the same hash (then neither is looked up: such a key waits for the
    /// round's end).
    entries: Vec<(u64, i64, u32)>,
    /// How many of those batches have been sent since (they go in order): an entry whose
    /// batch is below this is no longer ahead of a read. Counting, rather than marking each
    /// key of a sent batch, keeps a batch's send O(1): marking was a binary search per key
    /// (cache misses over a million-entry index), a quarter of the proxy's CPU during a
    /// flush of a million keys, on the lane's path between two batches.
    sent: u32,
}

const SHARED: u32 = u32::MAX;

impl Ahead {
    pub(super) fn new<'a>(unsent: impl IntoIterator<Item = &'a Batch>) -> Ahead {
        let hasher = ahash::RandomState::new();
        let mut entries: Vec<(u64, i64, u32)> = unsent
            .into_iter()
            .enumerate()
            .flat_map(|(i, b)| b.items.iter().map(move |item| (i, item)))
            .filter(|(_, (k, _))| windows::parse_pending(k).is_none())
            .filter_map(|(i, (k, d))| {
                let i = u32::try_from(i).ok().filter(|&i| i != SHARED)?;
                Some((hasher.hash_one(&k[..]), (*d)?, i))
            })
            .collect();
        entries.sort_unstable_by_key(|&(h, _, _)| h);
        for i in 1..entries.len() {
            if entries[i].0 == entries[i - 1].0 {
                entries[i].2 = SHARED;
                entries[i - 1].2 = SHARED;
            }
        }
        Ahead {
            hasher,
            entries,
            sent: 0,
        }
    }

    /// The entry of `key`'s hash. The hashes are uniform (a seeded ahash), so interpolation
    /// finds it in a few probes where a binary search takes ~20 cache misses at a million
    /// entries; after 8 probes (never, but for bad luck) a binary search finishes.
    fn find(&self, key: &[u8]) -> Option<usize> {
        let h = self.hasher.hash_one(key);
        let e = &self.entries;
        let (mut lo, mut hi) = (0usize, e.len());
        for _ in 0..8 {
            if hi - lo <= 8 {
                break;
            }
            let (a, b) = (e[lo].0, e[hi - 1].0);
            if h < a || h > b {
                return None;
            }
            let offset = u128::from(h - a) * (hi - 1 - lo) as u128 / u128::from(b - a).max(1);
            let at = lo + offset as usize;
            match e[at].0.cmp(&h) {
                std::cmp::Ordering::Equal => return Some(at),
                std::cmp::Ordering::Less => lo = at + 1,
                std::cmp::Ordering::Greater => hi = at,
            }
        }
        e[lo..hi]
            .binary_search_by_key(&h, |&(h, _, _)| h)
            .ok()
            .map(|i| lo + i)
    }

    /// The next unsent batch is about to be sent: its deltas are no longer ahead of a read.
    pub(super) fn sent(&mut self) {
        self.sent += 1;
    }

    /// The delta of `key` in a batch not yet sent.
    fn get(&self, key: &[u8]) -> Option<i64> {
        let (_, delta, b) = self.entries[self.find(key)?];
        (b != SHARED && b >= self.sent).then_some(delta)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_finds_every_key_it_holds_and_no_other() {
        let hasher = ahash::RandomState::new();
        for n in [0usize, 1, 5, 9, 100, 100_000] {
            let mut entries: Vec<(u64, i64, u32)> = (0..n)
                .map(|i| (hasher.hash_one(format!("k{i}").as_bytes()), i as i64, 0))
                .collect();
            entries.sort_unstable_by_key(|&(h, _, _)| h);
            let ahead = Ahead {
                hasher: hasher.clone(),
                entries,
                sent: 0,
            };
            for i in 0..n {
                assert_eq!(ahead.get(format!("k{i}").as_bytes()), Some(i as i64));
            }
            for i in 0..1000 {
                assert_eq!(ahead.get(format!("x{i}").as_bytes()), None);
            }
        }
    }

    #[test]
    fn a_key_is_ahead_until_its_batch_is_sent_and_a_shared_hash_never_is() {
        let hasher = ahash::RandomState::new();
        let h = |k: &str| hasher.hash_one(k.as_bytes());
        let mut entries = vec![
            (h("a"), 1, 0),
            (h("b"), 2, 1),
            (h("c"), 3, 2),
            (h("d"), 4, SHARED),
        ];
        entries.sort_unstable_by_key(|&(h, _, _)| h);
        let mut ahead = Ahead {
            hasher: hasher.clone(),
            entries,
            sent: 0,
        };
        let get = |a: &Ahead| ["a", "b", "c", "d"].map(|k| a.get(k.as_bytes()));
        assert_eq!(get(&ahead), [Some(1), Some(2), Some(3), None]);
        ahead.sent();
        assert_eq!(get(&ahead), [None, Some(2), Some(3), None]);
        ahead.sent();
        ahead.sent();
        assert_eq!(get(&ahead), [None, None, None, None]);
    }
}
