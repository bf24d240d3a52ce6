//! Reads sent around the batches of a round, rather than after its last.
//!
//! A lane has one batch out at a time, and a full flush of K keys is K / `flush_batch_keys`
//! batches sent one after another. A base read queued meanwhile (an INCR of a key whose base
//! is older than `cache_ttl`, a read-ahead) used to wait for the whole flush: seconds at a
//! million pending keys, during which such INCRs all but stopped. So the lane takes the plain
//! reads queued so far and sends them read only (number 0: no watermark moves, on a cluster
//! slot neither) on its own connection, without waiting: right behind the batch that is out
//! ([`During`]), or right ahead of the next one. On a Redis Cluster, where a batch goes in
//! parts to several nodes, they go in a round trip of their own between two batches
//! ([`reads_between`]).
//!
//! Why the value read is right: the connection runs commands in the order they were sent, so
//! every batch of the lane before the read is settled, or is the batch out, and none after it
//! is sent. A key is either not in flight on this lane, or its whole in-flight delta waits in
//! a batch not yet sent ([`Ahead`] knows which, and how much), or it is in the batch out,
//! whose outcome is unknown until its reply: such a read waits for that reply. The shard's
//! value is then the base under the unsent delta ([`Engine::settle_ahead`]), and the total the
//! client sees, `base + inflight + pending`, is the one it would have seen after the flush.
//!
//! What still waits for the end of the round: a key with a delta in flight that is not all
//! in this lane's unsent batches (another lane's batch, during a move), and every landing
//! (a read that must land the key's delta first). A landing needs a batch number, and the
//! round's numbers are given and logged already: a later number sent first would make the
//! earlier batches look applied.
//!
//! Owns the index of what the unsent batches carry and the reads sent around them. Does not
//! own the exactly-once protocol (`lane`).

use super::lane::{
    fail_waiters, lane_error, receive_by, send_batch, settle_items, Batch, Lane, LaneError, Waiter,
};
use super::{windows, Engine};
use crate::backend::{BackendError, Reply};
use bytes::Bytes;
use std::sync::Arc;
use tokio::sync::oneshot;

type HashMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;
/// Reads taken from a lane's queue: each key with its readers.
pub(super) type Reads = Vec<(Bytes, Vec<Waiter>)>;

/// The counter deltas of a round's batches not yet sent, by key hash: 24 bytes per key,
/// built at the first read sent among them, dropped with them.
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
) -> bool {
    let mut later = Vec::new();
    let sent = reads_now(lane, engine, unsent, ahead, &mut later).await;
    lane.requeue_reads(later);
    sent
}

/// [`reads_between`], leaving the reads that must wait for the round's end in `later`
/// rather than in the lane's queue (where they would wake the lane again at once).
pub(super) async fn reads_now<'a>(
    lane: &Lane,
    engine: &Arc<Engine>,
    unsent: impl IntoIterator<Item = &'a Batch>,
    ahead: &mut Option<Ahead>,
    later: &mut Reads,
) -> bool {
    let reads = lane.take_plain_reads();
    if reads.is_empty() {
        return false;
    }
    let index = ahead.get_or_insert_with(|| Ahead::new(unsent));
    let (batches, mut waiters, deferred) = read_batches(engine, index, reads);
    later.extend(deferred);
    for batch in batches {
        // A read-only batch is not retried: a failure reaches its readers, as between rounds.
        send_batch(lane, engine, batch, &mut waiters, &mut Vec::new()).await;
    }
    fail_waiters(waiters.into_values(), LaneError::Unavailable);
    true
}

/// Read-only batches (at most `flush_batch_keys` keys each) for `reads`, each key's delta
/// in the unsent batches of `index` noted as under its value, with their readers; and the
/// reads that must wait for the round's end (a delta in flight that `index` does not hold
/// whole).
fn read_batches(
    engine: &Engine,
    index: &Ahead,
    reads: Reads,
) -> (Vec<Batch>, HashMap<Bytes, Vec<Waiter>>, Reads) {
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
    engine
        .stats
        .reads_between
        .fetch_add(items.len() as u64, std::sync::atomic::Ordering::Relaxed);
    let limit = engine.flush_batch_keys().max(1);
    let mut batches = Vec::new();
    let mut rest = items.into_iter().peekable();
    while rest.peek().is_some() {
        let chunk: Vec<_> = rest.by_ref().take(limit).collect();
        let mut batch = Batch::new(engine, 0, chunk);
        batch.under = batch
            .items
            .iter()
            .filter_map(|(k, _)| Some((k.clone(), *under.get(k)?)))
            .collect();
        batches.push(batch);
    }
    (batches, waiters, later)
}

/// Reads sent on the lane connection around a batch of a round without waiting for replies
/// ([`super::lane::send_batch_with`]): those queued at the gap go right ahead of the batch,
/// those queued while it is out go right behind it. The connection runs them in that order,
/// so the shard works through them back to back with the batch, and a read queued during a
/// flush waits for the rest of one batch, not for the batch's round trip and a gap of its
/// own.
///
/// Why the value read is right: as for a gap, every batch before the one out is settled and
/// none after it is sent, so a key's delta in flight is either whole in an unsent batch
/// ([`Ahead`]), or in the batch out, whose outcome is not known until its reply. A read of
/// such a key waits for the next gap, where that batch is settled. Replies are answered in
/// the order they were sent: the reads ahead of the batch before its reply is settled, those
/// behind it before the lane's next batch ([`During::finish`]).
pub(super) struct During<'a> {
    ahead: &'a mut Option<Ahead>,
    /// The round's batches after the one out (for `ahead`, built at first use).
    unsent: &'a [Batch],
    /// Sent and not yet answered, in the order sent.
    sent: Vec<SentRead>,
    /// Reads of keys in flight in the batch out (or elsewhere), for the next gap.
    later: Reads,
    /// Whether a read was sent around the batch (or waits for the next gap).
    reads_sent: bool,
    /// Whether reads went behind the batch out already (see [`During::wait`]).
    sent_behind: bool,
}

struct SentRead {
    batch: Batch,
    waiters: HashMap<Bytes, Vec<Waiter>>,
    rx: oneshot::Receiver<Result<Reply, BackendError>>,
    /// The invalidation epoch when it was sent (see `Engine::settle`).
    epoch: u64,
}

impl<'a> During<'a> {
    pub(super) fn new(ahead: &'a mut Option<Ahead>) -> During<'a> {
        During {
            ahead,
            unsent: &[],
            sent: Vec::new(),
            later: Vec::new(),
            reads_sent: false,
            sent_behind: false,
        }
    }

    /// The next batch of the round is about to be sent; `unsent` are those after it.
    pub(super) fn sent_next(&mut self, unsent: &'a [Batch]) {
        if let Some(a) = self.ahead.as_mut() {
            a.sent();
        }
        self.unsent = unsent;
    }

    /// The reply to the batch out (`rx`), within the shard's timeout. The reads sent ahead of
    /// it are answered first; reads queued meanwhile are sent behind it.
    pub(super) async fn wait(
        &mut self,
        lane: &Lane,
        engine: &Arc<Engine>,
        rx: oneshot::Receiver<Result<Reply, BackendError>>,
    ) -> Result<Reply, BackendError> {
        answer(lane, engine, std::mem::take(&mut self.sent)).await;
        // The batch's own time: the reads ahead of it are answered.
        let reply = receive_by(rx, tokio::time::Instant::now() + lane.shard.timeout);
        tokio::pin!(reply);
        loop {
            tokio::select! {
                biased;
                r = &mut reply => return r,
                // Once per batch out: reads queued later share the next gap's round trip
                // (one `EVAL` for many keys, as before), and a batch stalled until the
                // shard's timeout cannot fill the connection's queue.
                _ = lane.wake.notified(), if !self.sent_behind => {
                    let unsent = self.unsent;
                    self.sent_behind = self.send_reads(lane, engine, unsent);
                }
            }
        }
    }

    /// Sends the plain reads queued now; `unsent` are the round's batches not yet sent.
    /// Returns whether there were any.
    pub(super) fn send_reads(&mut self, lane: &Lane, engine: &Engine, unsent: &[Batch]) -> bool {
        if lane.is_abandoned() {
            return false;
        }
        let reads = lane.take_plain_reads();
        if reads.is_empty() {
            return false;
        }
        self.reads_sent = true;
        let index = self.ahead.get_or_insert_with(|| Ahead::new(unsent));
        let (batches, mut waiters, later) = read_batches(engine, index, reads);
        self.later.extend(later);
        for batch in batches {
            let epoch = engine.invalidation_epoch();
            let rx = lane.shard.lane_send(batch.frame().clone());
            let waiters = batch
                .items
                .iter()
                .filter_map(|(k, _)| Some((k.clone(), waiters.remove(k)?)))
                .collect();
            self.sent.push(SentRead {
                batch,
                waiters,
                rx,
                epoch,
            });
        }
        true
    }

    /// The batch's attempt failed, and it will be retried after a wait: the reads sent
    /// around it are answered, and the deferred ones go back to the queue, where the lane
    /// answers them at once while it waits (the shard is not taking the batch), as it does
    /// every read queued then. A read of a key in the batch must not wait for the retry to
    /// land: that can be the whole outage.
    pub(super) async fn failed(&mut self, lane: &Lane, engine: &Arc<Engine>) {
        answer(lane, engine, std::mem::take(&mut self.sent)).await;
        lane.requeue_reads(std::mem::take(&mut self.later));
        // `wait` took the lane's wake-up for whatever was queued meanwhile (a flush, a
        // FLUSHDB, a window read): given back, so that the lane answers it while it waits.
        lane.wake.notify_one();
    }

    /// Answers the reads sent behind the batch, and gives the deferred ones back to the
    /// queue for the next gap. Returns whether any read was sent around the batch.
    pub(super) async fn finish(self, lane: &Lane, engine: &Arc<Engine>) -> bool {
        answer(lane, engine, self.sent).await;
        lane.requeue_reads(self.later);
        self.reads_sent
    }
}

/// Settles reads sent without waiting, in the order sent, with their replies, and answers
/// their readers; one shard timeout for them all.
async fn answer(lane: &Lane, engine: &Arc<Engine>, reads: Vec<SentRead>) {
    let deadline = tokio::time::Instant::now() + lane.shard.timeout;
    for read in reads {
        answer_one(lane, engine, read, deadline).await;
    }
}

async fn answer_one(
    lane: &Lane,
    engine: &Arc<Engine>,
    mut read: SentRead,
    deadline: tokio::time::Instant,
) {
    let results = match receive_by(read.rx, deadline).await {
        Ok(reply) => read.batch.results(lane, &reply),
        Err(e) => Err(e),
    };
    match results {
        Ok(results) => {
            let _gate = engine.lane_gate().await;
            settle_items(engine, &read.batch, results, &mut read.waiters, read.epoch);
        }
        Err(e) => fail_waiters(read.waiters.into_values(), lane_error(e)),
    }
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
