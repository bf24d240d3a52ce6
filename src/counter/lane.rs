//! A shard's counter lane: the only path by which counter deltas reach that shard.
//!
//! One task, one connection, one batch out at a time. A round trip is one `EVAL` of
//! [`SCRIPT`] carrying a batch: a sequence number, keys, and per key either a delta to add
//! or nothing (a read). The script records the highest sequence number it has applied for
//! this proxy in the hash `tally:applied` on the shard; a batch whose number is not above it
//! has been applied before, so the script only reads. That is what makes a retry after a
//! lost reply, or a replay from the log after a crash, land exactly once. Batches of one
//! lane are strictly ordered (a failed batch is retried, same number and contents, before
//! any later one), which is why one number per proxy and shard is enough.
//!
//! Requests that arrive while a round trip is out wait for the next one and share it:
//! concurrent first reads of one key cost one read, and many keys cost one round trip.
//! Plain reads that arrive during a round go on the same connection right behind the batch
//! out, or ahead of the next (`lane_between`), not after the last. A flush takes its keys a
//! few stripes at a time, and sends smaller batches while reads wait (`round`); a periodic
//! flush spreads them over part of its interval (`pace`).
//! Window deltas in a batch become `HINCRBY`s of bucket hashes in the same script, under the
//! same number. A window read is sent between round trips ([`Lane::read_between`]), when no
//! batch of the lane is in flight; on a cluster, one `-MOVED` or `-ASK` it meets is followed
//! (`redirected`). Each batch's reply also says where the shard's record stood, which tells
//! a shard that lost data (`Lane::check_record`). A lane whose shard was declared lost
//! ([`Lane::abandon`]) gives its batches back to the engine and sends nothing more.
//!
//! Owns the exactly-once protocol. Does not own the deltas themselves (the engine does;
//! the lane takes them, and settles them with the shard's reply).

use super::forget::Flush;
use super::stripe::STRIPES;
use super::window_store::Writes;
use super::windows::Windows;
use super::{parse_i64, Engine};
use crate::backend::{cluster::Redirect, BackendError, Reply, Shard};
use crate::backoff::Backoff;
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use redis_protocol::resp2::types::BytesFrame;
/// The lane's maps are keyed by counter keys: ahash with random seeds per map, as the
/// engine's own maps (faster than SipHash, still keyed against chosen collisions).
type HashMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;
type HashSet<K> = std::collections::HashSet<K, ahash::RandomState>;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Notify};

/// The hash on each shard holding, per proxy id, the last batch sequence number applied.
pub const APPLIED_KEY: &str = "tally:applied";

/// A batch seen before rewrites the watermark as it is: a write, so that a `WAIT` after
/// the retry (on a new connection, maybe) covers the first application too, and so that a
/// replica refuses the retry (`-READONLY`) rather than answer from its copy.
///
/// KEYS = [APPLIED_KEY, k1..kn, w1..wm]; ARGV = [proxy id, seq, n, d1..dn, then the window
/// writes (`window_store::SCRIPT_PART`, none when the batch has no window hash)], where a
/// delta of "" means "read only". seq 0: a read-only batch that leaves the watermark alone.
/// The window hashes (time windows) are written under the same watermark as the counters: a
/// batch lands whole, once. Reply: [1 when applied now, the counters' values, the watermark
/// found], the last for `Lane::check_record`.
pub const SCRIPT: &str = concat!(
    r#"
local seq = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local fresh = false
local seen = 0
if seq > 0 then
  seen = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
  if seq > seen then
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
    fresh = true
  else
    redis.call('HSET', KEYS[1], ARGV[1], seen)
  end
end
local out = {}
for i = 1, n do
  local d = ARGV[i + 3]
  if fresh and d ~= '' then
    out[i] = redis.pcall('INCRBY', KEYS[i + 1], d)
    if type(out[i]) == 'table' and out[i].err then
      -- Refused (no longer an integer): the value as GET gives it, for the read waiting.
      out[i] = redis.pcall('GET', KEYS[i + 1])
    elseif math.abs(out[i]) >= 9007199254740992 then
      -- Past 2^53 a Lua number (a double) is not the value: GET's string is.
      out[i] = redis.pcall('GET', KEYS[i + 1])
    end
  else
    out[i] = redis.pcall('GET', KEYS[i + 1])
  end
end
if fresh then
  local a = n + 4
  local first = n + 2
"#,
    super::window_store::script_part!(),
    r#"
end
return {fresh and 1 or 0, out, seen}
"#
);

/// What a shard holds for a key after a round trip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyValue {
    Int(i64),
    Nil,
    /// A string that is not an integer, as the shard's raw reply bytes.
    Other(Bytes),
    /// An error for this key (e.g. WRONGTYPE), in the shard's words.
    Error(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaneError {
    /// The shard cannot be reached now; nothing was read.
    Unavailable,
    /// The shard did not answer in time.
    Timeout,
    /// The key's pending increments were to land first, but the write-ahead log is failed,
    /// so no batch can be logged, so none is sent.
    LogFailed,
}

impl LaneError {
    pub fn client_message(&self, shard: &str) -> String {
        match self {
            LaneError::Unavailable => format!("TRYAGAIN shard {shard} is unavailable"),
            LaneError::Timeout => format!("TRYAGAIN shard {shard} timed out"),
            LaneError::LogFailed => LOG_FAILED_LAND.to_string(),
        }
    }
}

/// The refusal of a command that needs a key's pending increments landed first while the
/// log is failed.
pub const LOG_FAILED_LAND: &str =
    "TRYAGAIN the write-ahead log failed; this key's pending increments cannot land before the command";

pub(super) type Waiter = oneshot::Sender<Result<KeyValue, LaneError>>;

/// Called on the lane's task with the reply to a [`Lane::read_between`] request.
pub type OnReply = Box<dyn FnOnce(Result<BytesFrame, LaneError>) + Send>;

#[derive(Default)]
struct Queue {
    /// Keys to read in the next round trip; `true` when their delta must land too.
    reads: HashMap<Bytes, (bool, Vec<Waiter>)>,
    flush: Vec<oneshot::Sender<bool>>,
    /// Whether a flush request in `flush` wants every delta landed as fast as the shard
    /// takes them (early, admin, shutdown, rebalance); otherwise the flush is paced.
    flush_now: bool,
    /// The earliest end a paced flush request was given (see `pace`).
    flush_by: Option<Instant>,
    /// Batches recovered from the log, re-sent with their ids before anything else.
    replay: Vec<(u64, Vec<(Bytes, i64)>)>,
    /// Commands sent between round trips (window reads), each with what to do on reply.
    between: Vec<(Bytes, OnReply)>,
    /// FLUSHDB / FLUSHALL, run between round trips (see `forget`).
    forget: Vec<(Flush, ForgetWaiter)>,
}

type ForgetWaiter = oneshot::Sender<Result<(), super::forget::ForgetError>>;

impl Queue {
    fn is_empty(&self) -> bool {
        self.reads.is_empty()
            && self.flush.is_empty()
            && self.replay.is_empty()
            && self.between.is_empty()
            && self.forget.is_empty()
    }

    /// Takes everything a round trip would answer, leaving the replays.
    fn take_requests(&mut self) -> Queue {
        Queue {
            reads: std::mem::take(&mut self.reads),
            flush: std::mem::take(&mut self.flush),
            flush_now: std::mem::take(&mut self.flush_now),
            flush_by: self.flush_by.take(),
            replay: Vec::new(),
            between: std::mem::take(&mut self.between),
            forget: std::mem::take(&mut self.forget),
        }
    }

    /// Answers requests without the shard: reads fail, flush waiters learn `flushed`.
    fn answer_without_shard(self, flushed: bool, shard: &str) {
        fail_waiters(
            self.reads.into_values().map(|(_, ws)| ws),
            LaneError::Unavailable,
        );
        for (_, on_reply) in self.between {
            on_reply(Err(LaneError::Unavailable));
        }
        for f in self.flush {
            let _ = f.send(flushed);
        }
        for (_, w) in self.forget {
            let _ = w.send(Err(LaneError::Unavailable.client_message(shard)));
        }
    }
}

pub(super) fn fail_waiters(waiters: impl IntoIterator<Item = Vec<Waiter>>, e: LaneError) {
    for w in waiters.into_iter().flatten() {
        let _ = w.send(Err(e));
    }
}

pub struct Lane {
    pub shard: Arc<Shard>,
    /// This lane's number, for the slots it holds in a cluster (`slot_holds`).
    pub(super) id: u32,
    engine: Weak<Engine>,
    queue: Mutex<Queue>,
    pub(super) wake: Notify,
    /// The shard was declared lost (see `rebalance::declare_lost`): nothing more is sent.
    abandoned: std::sync::atomic::AtomicBool,
    /// The highest batch number this lane has settled on the shard (see `check_record`).
    settled: std::sync::atomic::AtomicU64,
}

/// One batch: what is sent, and what each key carried.
pub(super) struct Batch {
    seq: u64,
    /// (key, delta): None for a read.
    pub(super) items: Vec<(Bytes, Option<i64>)>,
    /// Reads sent between two batches of a flush: per key, its delta in the batches not
    /// yet sent, which the value read does not hold (`lane_between`).
    pub(super) under: HashMap<Bytes, i64>,
    frame: Bytes,
    /// In a cluster: one part per slot, sent instead of `frame` (`cluster_batch`).
    parts: Option<Vec<super::cluster_batch::Part>>,
    /// Counter deltas and bucket fields it writes (for the economy figures).
    writes: (u64, u64),
}

impl Lane {
    pub fn spawn(shard: Arc<Shard>, engine: &Arc<Engine>) -> Arc<Lane> {
        static IDS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
        let lane = Arc::new(Lane {
            shard,
            id: IDS.fetch_add(1, Ordering::Relaxed),
            engine: Arc::downgrade(engine),
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            abandoned: Default::default(),
            settled: Default::default(),
        });
        crate::task::spawn(
            tracing::info_span!("lane", shard = %lane.shard.name),
            run(lane.clone()),
        );
        lane
    }

    /// Reads `key` in the next round trip (landing its delta first when `land`).
    pub async fn request(&self, key: Bytes, land: bool) -> Result<KeyValue, LaneError> {
        self.enqueue(key, land)
            .await
            .unwrap_or(Err(LaneError::Unavailable))
    }

    /// Queues a read of `key` for the next round trip now, and returns where its result
    /// will come (requests queued together share one round trip).
    pub fn enqueue(
        &self,
        key: Bytes,
        land: bool,
    ) -> oneshot::Receiver<Result<KeyValue, LaneError>> {
        let (tx, rx) = oneshot::channel();
        {
            let mut q = self.queue.lock();
            let slot = q.reads.entry(key).or_insert((false, Vec::new()));
            slot.0 |= land;
            slot.1.push(tx);
        }
        self.wake.notify_one();
        rx
    }

    /// Takes the queued reads that need no landing (see `lane_between`).
    pub(super) fn take_plain_reads(&self) -> Vec<(Bytes, Vec<Waiter>)> {
        let mut q = self.queue.lock();
        if q.reads.values().all(|(land, _)| *land) {
            return Vec::new();
        }
        let mut plain = Vec::new();
        let all = std::mem::take(&mut q.reads);
        for (k, (land, ws)) in all {
            if land {
                q.reads.insert(k, (land, ws));
            } else {
                plain.push((k, ws));
            }
        }
        plain
    }

    /// Reads waiting for the next round.
    #[cfg(test)]
    pub(super) fn queued_reads(&self) -> usize {
        self.queue.lock().reads.len()
    }

    /// Puts reads taken by [`Lane::take_plain_reads`] back for the next round.
    pub(super) fn requeue_reads(&self, reads: Vec<(Bytes, Vec<Waiter>)>) {
        if reads.is_empty() {
            return;
        }
        let mut q = self.queue.lock();
        for (k, ws) in reads {
            q.reads.entry(k).or_insert((false, Vec::new())).1.extend(ws);
        }
        drop(q);
        self.wake.notify_one();
    }

    /// Sends `frame` between two round trips, when no batch of this lane is in flight, and
    /// calls `on_reply` on the lane's task as soon as the reply comes: whatever the engine
    /// still holds for this shard at that moment has not reached the shard.
    pub fn read_between(&self, frame: Bytes, on_reply: OnReply) {
        self.queue.lock().between.push((frame, on_reply));
        self.wake.notify_one();
    }

    /// Gives the shard up for lost: the batch being retried and any queued replay are
    /// abandoned (their deltas go back to pending, logged, for the keys' new owners), reads
    /// fail at once, and flushes succeed with nothing to land.
    pub fn abandon(&self) {
        self.abandoned.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    pub(super) fn is_abandoned(&self) -> bool {
        self.abandoned.load(Ordering::SeqCst)
    }

    /// A batch's reply says where the shard's exactly-once record stood before the batch:
    /// below a batch this lane settled there, the shard has lost what it held (restarted
    /// empty, flushed by hand, or a failover promoted a server that lacked it). The counts
    /// went with it and no proxy can restore them; this makes the loss loud (an error and
    /// `tallyproxy_shard_lost_data_total`) instead of silent. Once per loss: the batch that
    /// finds it raises `settled` past it.
    fn check_record(&self, seen: u64) {
        let settled = self.settled.load(Ordering::SeqCst);
        if seen < settled {
            self.shard.stats.lost_data.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                shard = %self.shard.name,
                record = seen,
                settled,
                "the shard lost data: its exactly-once record is behind batches this proxy settled there (restarted empty, flushed by hand, or failed over to a server that lacked them); their counts are gone"
            );
        }
    }

    /// Queues a batch recovered from the log; it goes before any new work.
    pub fn replay(&self, seq: u64, items: Vec<(Bytes, i64)>) {
        let mut q = self.queue.lock();
        if let Some(engine) = self.engine.upgrade() {
            if let Some(h) = &engine.holds {
                // Before any new batch could take these slots (see `slot_holds`), and under
                // the queue's lock, so that the lane lets go of them only once every replay
                // queued is sent (see `run`). In a cluster all replays go to one lane
                // (`wal::restore`), so no other lane can hold one of their slots.
                for (k, _) in &items {
                    let slot = crate::router::slots::key_slot(super::windows::placement_key(k));
                    h.try_hold(slot, self.id);
                }
            }
        }
        q.replay.push((seq, items));
        drop(q);
        self.wake.notify_one();
    }

    /// Flushes the shard between two round trips, absorbing its pending deltas (see
    /// `forget`).
    pub fn forget(
        &self,
        flush: Flush,
    ) -> impl std::future::Future<Output = Result<(), super::forget::ForgetError>> + Send + 'static
    {
        let (tx, rx) = oneshot::channel();
        self.queue.lock().forget.push((flush, tx));
        self.wake.notify_one();
        let name = self.shard.name.clone();
        async move {
            rx.await
                .unwrap_or_else(|_| Err(LaneError::Unavailable.client_message(&name)))
        }
    }

    /// Lands every pending delta of this shard; true when all landed. `by`: a paced flush,
    /// spread until then (see `pace`); None: as fast as the shard takes the batches.
    pub fn flush(
        &self,
        by: Option<Instant>,
    ) -> impl std::future::Future<Output = bool> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        {
            let mut q = self.queue.lock();
            q.flush.push(tx);
            match by {
                Some(by) => q.flush_by = Some(q.flush_by.map_or(by, |b| b.min(by))),
                None => q.flush_now = true,
            }
        }
        self.wake.notify_one();
        async move { rx.await.unwrap_or(false) }
    }

    /// Whether something is queued that a paced flush must not keep waiting: anything but
    /// plain reads (which go in its gaps) and paced flushes.
    pub(super) fn has_urgent(&self) -> bool {
        let q = self.queue.lock();
        q.flush_now
            || !q.replay.is_empty()
            || !q.between.is_empty()
            || !q.forget.is_empty()
            || q.reads.values().any(|(land, _)| *land)
    }
}

async fn run(lane: Arc<Lane>) {
    loop {
        lane.wake.notified().await;
        let Some(engine) = lane.engine.upgrade() else {
            return;
        };
        loop {
            let mut taken = std::mem::take(&mut *lane.queue.lock());
            if taken.is_empty() {
                break;
            }
            let replay = std::mem::take(&mut taken.replay);
            if lane.is_abandoned() {
                for (seq, items) in replay {
                    let items: Vec<_> = items.into_iter().map(|(k, d)| (k, Some(d))).collect();
                    engine.abandon_batch(seq, &items).await;
                }
                // Nothing is left to land on a lost shard: flushes succeed.
                taken.answer_without_shard(true, &lane.shard.name);
                continue;
            }
            let Queue {
                reads,
                flush: flushers,
                flush_now,
                flush_by,
                between,
                forget,
                ..
            } = taken;
            // A paced flush is paced only when no flush request wants it now.
            let pace = flush_by.filter(|_| !flush_now);
            for (seq, items) in replay {
                let items = items.into_iter().map(|(k, d)| (k, Some(d))).collect();
                let batch = Batch::new(&engine, seq, items);
                send_batch(
                    &lane,
                    &engine,
                    batch,
                    &mut HashMap::default(),
                    &mut Vec::new(),
                )
                .await;
            }
            if !reads.is_empty() || !flushers.is_empty() {
                let mut flushers = flushers;
                let flush = !flushers.is_empty();
                let ok = round(&lane, &engine, reads, flush, pace, &mut flushers).await;
                for f in flushers {
                    let _ = f.send(ok);
                }
            }
            for (flush, waiter) in forget {
                let (result, fallback) = super::forget::run(&lane, &engine, &flush).await;
                let _ = waiter.send(result);
                if let Some((seq, items)) = fallback {
                    send_logged(&lane, &engine, seq, items).await;
                }
            }
            if let Some(h) = &engine.holds {
                // Every batch this lane took is settled (or given back): its slots are free,
                // unless replays were queued meanwhile (they hold theirs until sent).
                let q = lane.queue.lock();
                if q.replay.is_empty() {
                    h.release(lane.id);
                }
            }
            for (frame, on_reply) in between {
                let rx = lane.shard.lane_send(frame.clone());
                let r = match crate::deadline::within_for(lane.shard.timeout, rx).await {
                    Ok(Ok(Ok(reply))) => {
                        // A cluster redirection is never shown to the reader: `-MOVED` and
                        // `-ASK` are followed once, anything else is "try again" (the map is
                        // looked at again).
                        let redirect = engine
                            .holds
                            .as_ref()
                            .and_then(|_| Redirect::of_raw(&reply.raw));
                        match redirect {
                            // The slot moved (the map is refreshed meanwhile), or is moving
                            // and the key already went: the read is sent there once.
                            Some(
                                r @ (Redirect::Moved { addr, .. } | Redirect::Ask { addr, .. }),
                            ) => {
                                r.count();
                                let asking = matches!(r, Redirect::Ask { .. });
                                if !asking {
                                    engine.router().report_stale();
                                }
                                redirected(&engine, addr, asking, &frame, lane.shard.timeout).await
                            }
                            Some(r) => {
                                r.count();
                                engine.router().report_stale();
                                Err(LaneError::Unavailable)
                            }
                            None => Ok(reply.frame),
                        }
                    }
                    Ok(Ok(Err(BackendError::Timeout))) | Err(_) => Err(LaneError::Timeout),
                    Ok(_) => Err(LaneError::Unavailable),
                };
                on_reply(r);
            }
        }
    }
}

/// One pass: the reads, plus (when `flush`) every dirty key of this shard, in batches of
/// at most `flush_batch_keys`. Returns whether every delta taken landed.
async fn round(
    lane: &Lane,
    engine: &Arc<Engine>,
    reads: HashMap<Bytes, (bool, Vec<Waiter>)>,
    flush: bool,
    pace: Option<Instant>,
    flushers: &mut Vec<oneshot::Sender<bool>>,
) -> bool {
    let started = Instant::now();
    let limit = engine.flush_batch_keys();
    // Taking deltas and logging their batches is one step for a log checkpoint.
    let gate = engine.lane_gate().await;
    // With the log failed no batch can be logged, so none is sent: plain reads go read-only
    // (the engine adds the pending delta to what the shard holds), landings are refused,
    // and a flush reports failure.
    let logging = engine.wal.as_ref().is_none_or(|w| !w.failed());
    let mut reads = reads;
    if !logging {
        if flush {
            engine.stats.flush_failures.fetch_add(1, Ordering::Relaxed);
        }
        // Who needed a landing (a command ordered after the increments) is refused.
        let (land, read): (HashMap<_, _>, HashMap<_, _>) =
            reads.into_iter().partition(|(_, (land, _))| *land);
        fail_waiters(land.into_values().map(|(_, w)| w), LaneError::LogFailed);
        reads = read;
    }
    let flush = flush && logging;
    let mut land_keys: Vec<Bytes> = reads
        .iter()
        .filter(|(_, (land, _))| *land)
        .map(|(k, _)| k.clone())
        .collect();
    if let Some(h) = &engine.holds {
        // A key whose slot another lane holds cannot land now (its batch is out there).
        // Held now (not just checked), so that no other lane takes the slot before `take`.
        let (free, held): (Vec<Bytes>, Vec<Bytes>) = land_keys.into_iter().partition(|k| {
            h.try_hold(
                crate::router::slots::key_slot(super::windows::placement_key(k)),
                lane.id,
            )
        });
        land_keys = free;
        for k in held {
            if let Some((_, ws)) = reads.remove(&k) {
                fail_waiters([ws], LaneError::Unavailable);
            }
        }
    }
    let mut items: Vec<(Bytes, Option<i64>)> = engine
        .take(None, Some(&land_keys), usize::MAX, lane.id)
        .into_iter()
        .map(|(k, d)| (k, Some(d)))
        .collect();
    let landed: HashSet<Bytes> = items.iter().map(|(k, _)| k.clone()).collect();
    for k in reads.keys() {
        if !landed.contains(k) {
            items.push((k.clone(), None));
        }
    }
    let mut waiters: HashMap<Bytes, Vec<Waiter>> =
        reads.into_iter().map(|(k, (_, w))| (k, w)).collect();
    let mut all_ok = true;
    let mut gap = false;
    // A flush takes the shard's dirty keys a few stripes at a time (`CHUNK_BATCHES` batches'
    // worth), logs and sends them, then takes the next: taking, encoding and logging a
    // million keys at once held the worker for a third of a second, during which nothing
    // else was answered.
    let mut cursor = if flush { 0 } else { STRIPES };
    let mut batch_keys = limit;
    let mut gate = gate;
    // A periodic flush spreads its batches (`pace`); a cluster round holds its slots until
    // it ends, so goes at full speed.
    let mut pace = pace
        .filter(|_| flush && engine.holds.is_none())
        .map(|until| super::pace::Pace::new(started, until));
    loop {
        let from = cursor;
        // One look at the ring per chunk: what it takes, and the version `pace` watches.
        let topo = engine.router().topology();
        if cursor < STRIPES {
            match topo
                .shards
                .iter()
                .position(|sh| Arc::ptr_eq(sh, &lane.shard))
            {
                Some(idx) => {
                    let taken = engine.take(
                        Some((&topo, idx, &mut cursor)),
                        None,
                        limit.max(1).saturating_mul(CHUNK_BATCHES),
                        lane.id,
                    );
                    let at: HashMap<Bytes, usize> = items
                        .iter()
                        .enumerate()
                        .map(|(i, (k, _))| (k.clone(), i))
                        .collect();
                    for (k, d) in taken {
                        match at.get(&k) {
                            // A key read in this round and dirty since: its delta joins the
                            // read.
                            Some(&i) => items[i].1 = Some(items[i].1.unwrap_or(0).wrapping_add(d)),
                            None => items.push((k, Some(d))),
                        }
                    }
                }
                // No longer a shard of the ring: nothing more is its to land.
                None => cursor = STRIPES,
            }
        }
        let batches = into_batches(engine, std::mem::take(&mut items), batch_keys);
        if let Some(p) = &mut pace {
            p.chunk(from, cursor, batches.len(), topo.version);
        }
        if let Some(wal) = &engine.wal {
            for b in batches.iter().filter(|b| b.seq != 0) {
                if wal
                    .log_batch(b.seq, &lane.shard.name, &b.items)
                    .await
                    .is_err()
                {
                    for b in &batches {
                        engine.untake(&b.items);
                    }
                    // A batch that is not in the log must not be sent: after a restart the
                    // replay would count its deltas again. They stay in flight in memory,
                    // and the log up to its failure holds every increment that was
                    // acknowledged.
                    drop(gate);
                    fail_waiters(waiters.into_values(), LaneError::Unavailable);
                    return false;
                }
            }
        }
        drop(gate);
        let (ok, contended) = send_batches(
            lane,
            engine,
            batches,
            &mut gap,
            &mut waiters,
            flushers,
            pace.as_mut(),
        )
        .await;
        all_ok &= ok;
        // Reads queued behind a batch wait for the rest of it on the shard: while clients
        // wait, the next batches are smaller.
        batch_keys = if contended {
            (limit / CONTENDED_DIVISOR).max(1)
        } else {
            limit
        };
        if cursor >= STRIPES || lane.is_abandoned() {
            break;
        }
        gate = engine.lane_gate().await;
    }
    fail_waiters(waiters.into_values(), LaneError::Unavailable);
    if flush {
        // A paced flush's own time: its waits between batches are not work.
        let took = started
            .elapsed()
            .saturating_sub(pace.map_or(Duration::ZERO, |p| p.waited));
        flush_histogram().record(took.as_secs_f64());
        engine.stats.flushes.fetch_add(1, Ordering::Relaxed);
        engine
            .stats
            .flush_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        if !all_ok {
            engine.stats.flush_failures.fetch_add(1, Ordering::Relaxed);
        }
    }
    all_ok && logging
}

/// How many batches' worth of keys a flush takes at a time (see `round`).
const CHUNK_BATCHES: usize = 4;

/// A flush's batches while reads wait are `flush_batch_keys` / this (see `round`).
const CONTENDED_DIVISOR: usize = 4;

/// `items` in batches of at most `limit` keys, each numbered when it carries a delta. A
/// key's window deltas are never split between two batches: its window hash is written once.
fn into_batches(engine: &Engine, items: Vec<(Bytes, Option<i64>)>, limit: usize) -> Vec<Batch> {
    let mut batches = Vec::new();
    let items = group_window_deltas(items);
    // Chunks taken front to back in one pass (split_off copied the remainder per chunk:
    // quadratic in the number of pending keys, minutes at a million).
    let mut rest = items.into_iter().peekable();
    while rest.peek().is_some() {
        let mut chunk: Vec<_> = rest.by_ref().take(limit.max(1)).collect();
        while let (Some(last), Some(next)) = (chunk.last(), rest.peek()) {
            if !same_window_hash(&last.0, &next.0) {
                break;
            }
            chunk.extend(rest.next());
        }
        let seq = if chunk.iter().any(|(_, d)| d.is_some()) {
            engine.next_seq()
        } else {
            0
        };
        batches.push(Batch::new(engine, seq, chunk));
    }
    batches
}

/// Sends a round's logged batches in order, each settled before the next is sent, with the
/// reads queued meanwhile around them (`lane_between`). `gap` is whether a batch of the
/// round went before these. A paced round (`pace`) waits after each batch until the next
/// is due. Returns whether every batch landed, and whether reads were sent among them.
async fn send_batches(
    lane: &Lane,
    engine: &Arc<Engine>,
    batches: Vec<Batch>,
    gap: &mut bool,
    waiters: &mut HashMap<Bytes, Vec<Waiter>>,
    flushers: &mut Vec<oneshot::Sender<bool>>,
    mut pace: Option<&mut super::pace::Pace>,
) -> (bool, bool) {
    let mut all_ok = true;
    let mut contended = false;
    let mut ahead = None;
    let mut batches = batches.into_iter();
    let pipelined = engine.holds.is_none();
    while !batches.as_slice().is_empty() {
        if !pipelined {
            // A cluster batch goes in parts, one per slot and node: no one connection
            // orders a read behind it. Reads queued since the round began go in a gap of
            // their own, not after its last batch.
            if *gap && !lane.is_abandoned() {
                contended |= super::lane_between::reads_between(
                    lane,
                    engine,
                    batches.as_slice(),
                    &mut ahead,
                )
                .await;
            }
            *gap = true;
            let Some(b) = batches.next() else { break };
            if let Some(a) = &mut ahead {
                a.sent();
            }
            all_ok &= send_batch(lane, engine, b, waiters, flushers).await;
            continue;
        }
        let mut during = super::lane_between::During::new(&mut ahead);
        if *gap {
            // Reads queued since the round began go now, ahead of the next batch, not
            // after its last.
            during.send_reads(lane, engine, batches.as_slice());
        }
        *gap = true;
        let Some(b) = batches.next() else { break };
        during.sent_next(batches.as_slice());
        all_ok &= send_batch_with(lane, engine, b, waiters, flushers, Some(&mut during)).await;
        contended |= during.finish(lane, engine).await;
        if let Some(p) = pace.as_deref_mut() {
            // Reads in a paced flush's gaps wait for no batch: not a reason for smaller ones.
            p.after_batch(lane, engine, batches.as_slice(), &mut ahead)
                .await;
        }
    }
    (all_ok, contended)
}

/// The round's items with the window deltas last, those of one key side by side (counter
/// keys and reads keep their order).
fn group_window_deltas(items: Vec<(Bytes, Option<i64>)>) -> Vec<(Bytes, Option<i64>)> {
    let (mut wins, mut out): (Vec<_>, Vec<_>) = items
        .into_iter()
        .partition(|(k, _)| super::windows::parse_pending(k).is_some());
    wins.sort_by(|a, b| {
        super::windows::placement_key(&a.0).cmp(super::windows::placement_key(&b.0))
    });
    out.append(&mut wins);
    out
}

/// Whether two items are window deltas of the same key (so write the same window hash).
fn same_window_hash(a: &[u8], b: &[u8]) -> bool {
    match (
        super::windows::parse_pending(a),
        super::windows::parse_pending(b),
    ) {
        (Some((_, _, x)), Some((_, _, y))) => x == y,
        _ => false,
    }
}

fn flush_histogram() -> &'static metrics::Histogram {
    static H: std::sync::OnceLock<metrics::Histogram> = std::sync::OnceLock::new();
    crate::metrics::histogram_once(&H, "tallyproxy_flush_duration_seconds")
}

/// Sends one batch and settles it. A batch that carries deltas is retried, with the same
/// sequence number, until it lands, for as long as the process lives: a shutdown waits for
/// it only until its deadline, and its deltas stay in the log for the next start. Read
/// waiters get the first outcome.
pub(super) async fn send_batch(
    lane: &Lane,
    engine: &Arc<Engine>,
    batch: Batch,
    waiters: &mut HashMap<Bytes, Vec<Waiter>>,
    flushers: &mut Vec<oneshot::Sender<bool>>,
) -> bool {
    send_batch_with(lane, engine, batch, waiters, flushers, None).await
}

/// [`send_batch`], sending the plain reads queued while the batch is out right behind it on
/// the same connection (`during`, see `lane_between::During`).
pub(super) async fn send_batch_with(
    lane: &Lane,
    engine: &Arc<Engine>,
    mut batch: Batch,
    waiters: &mut HashMap<Bytes, Vec<Waiter>>,
    flushers: &mut Vec<oneshot::Sender<bool>>,
    mut during: Option<&mut super::lane_between::During<'_>>,
) -> bool {
    let has_deltas = batch.seq != 0;
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    let mut attempts = 0u32;
    loop {
        if attempts > 0 && lane.is_abandoned() {
            // Declared lost while backing off: no further attempt.
            engine.abandon_batch(batch.seq, &batch.items).await;
            return false;
        }
        attempts += 1;
        let epoch = engine.invalidation_epoch();
        match attempt(lane, engine, &mut batch, during.as_deref_mut()).await {
            Ok(results) => {
                let _gate = engine.lane_gate().await;
                if has_deltas {
                    if let Some(wal) = &engine.wal {
                        wal.log_applied(batch.seq);
                    }
                    lane.settled.fetch_max(batch.seq, Ordering::SeqCst);
                    engine
                        .stats
                        .backend_writes
                        .fetch_add(batch.writes.0, Ordering::Relaxed);
                    engine
                        .stats
                        .window_writes
                        .fetch_add(batch.writes.1, Ordering::Relaxed);
                }
                settle_items(engine, &batch, results, waiters, epoch);
                return true;
            }
            Err(e) => {
                fail_waiters(
                    batch.items.iter().filter_map(|(k, _)| waiters.remove(k)),
                    lane_error(e),
                );
                if !has_deltas {
                    return false;
                }
                if let Some(d) = during.as_deref_mut() {
                    d.failed(lane, engine).await;
                }
                if lane.is_abandoned() {
                    engine.abandon_batch(batch.seq, &batch.items).await;
                    return false;
                }
                // Whoever waits for this flush learns now that the shard is not taking it;
                // the batch keeps trying, and other lanes are not held up.
                for f in flushers.drain(..) {
                    let _ = f.send(false);
                }
                if attempts == 1 {
                    tracing::warn!(shard = %lane.shard.name, seq = batch.seq, keys = batch.items.len(), error = ?e, "flush batch failed; retrying with the same id");
                }
                engine.stats.batch_retries.fetch_add(1, Ordering::Relaxed);
                // Reads that queue up meanwhile are answered at once: the shard is down.
                let deadline = tokio::time::Instant::now() + backoff.next_wait();
                while !lane.is_abandoned() {
                    tokio::select! {
                        _ = tokio::time::sleep_until(deadline) => break,
                        _ = lane.wake.notified() => {
                            // Flush waiters learn the shard is down; the batch keeps trying.
                            let requests = lane.queue.lock().take_requests();
                            requests.answer_without_shard(false, &lane.shard.name);
                        }
                    }
                }
            }
        }
    }
}

/// Settles each item of a batch that landed with the shard's values, and answers its
/// readers.
pub(super) fn settle_items(
    engine: &Engine,
    batch: &Batch,
    results: Vec<KeyValue>,
    waiters: &mut HashMap<Bytes, Vec<Waiter>>,
    epoch: u64,
) {
    let mut results = results.into_iter();
    for (key, delta) in &batch.items {
        if super::windows::parse_pending(key).is_some() {
            engine.settle(key, *delta, &KeyValue::Nil, epoch);
            continue;
        }
        let value = results.next().unwrap_or(KeyValue::Nil);
        if let (Some(d), KeyValue::Other(_) | KeyValue::Error(_)) = (delta, &value) {
            engine.drop_delta(key, *d, &format!("{value:?}"));
        }
        match batch.under.get(key) {
            Some(&ahead) => engine.settle_ahead(key, ahead, &value, epoch),
            None => engine.settle(key, *delta, &value, epoch),
        }
        if let Some(ws) = waiters.remove(key) {
            for w in ws {
                let _ = w.send(Ok(value.clone()));
            }
        }
    }
}

/// Sends a batch already logged under `seq` (a flush's absorbed batch whose flush had an
/// unknown outcome), retried until it lands, and settles it.
pub(super) async fn send_logged(
    lane: &Lane,
    engine: &Arc<Engine>,
    seq: u64,
    items: Vec<(Bytes, Option<i64>)>,
) {
    let batch = Batch::new(engine, seq, items);
    send_batch(
        lane,
        engine,
        batch,
        &mut HashMap::default(),
        &mut Vec::new(),
    )
    .await;
}

impl Batch {
    pub(super) fn new(engine: &Engine, seq: u64, items: Vec<(Bytes, Option<i64>)>) -> Batch {
        if engine.holds.is_some() {
            let (parts, writes) = super::cluster_batch::split(
                &engine.proxy_id,
                engine.windows(),
                engine.wall_clock().now_secs(),
                seq,
                &items,
            );
            return Batch {
                seq,
                frame: Bytes::new(),
                parts: Some(parts),
                items,
                under: HashMap::default(),
                writes,
            };
        }
        let (frame, writes) = encode_batch(
            &engine.proxy_id,
            engine.windows(),
            engine.wall_clock().now_secs(),
            seq,
            &items,
            APPLIED_KEY.as_bytes(),
        );
        Batch {
            seq,
            frame,
            parts: None,
            items,
            under: HashMap::default(),
            writes,
        }
    }
}

async fn attempt(
    lane: &Lane,
    engine: &Arc<Engine>,
    batch: &mut Batch,
    during: Option<&mut super::lane_between::During<'_>>,
) -> Result<Vec<KeyValue>, BackendError> {
    if let Some(parts) = &mut batch.parts {
        return super::cluster_batch::attempt(engine.router(), parts, &batch.items).await;
    }
    let connects = lane.shard.lane_conn.connects();
    let rx = lane.shard.lane_send(batch.frame.clone());
    let reply = match during {
        Some(during) => during.wait(lane, engine, rx).await?,
        None => receive_by(rx, tokio::time::Instant::now() + lane.shard.timeout).await?,
    };
    let results = batch.results(lane, &reply)?;
    if let (true, Some(seen)) = (batch.seq != 0, record_seen(&reply)) {
        lane.check_record(seen);
    }
    // With `wait_replicas`, a batch that wrote is settled only once enough replicas have
    // it; short of that it is retried (same id: applied once, wherever it lands).
    if batch.seq != 0 && !lane.shard.lane_wait(connects).await? {
        tracing::debug!(shard = %lane.shard.name, seq = batch.seq, "WAIT fell short of wait_replicas");
        return Err(BackendError::Timeout);
    }
    Ok(results)
}

/// The reply to a command sent on the lane connection, by `deadline`.
pub(super) async fn receive_by(
    rx: oneshot::Receiver<Result<Reply, BackendError>>,
    deadline: tokio::time::Instant,
) -> Result<Reply, BackendError> {
    match crate::deadline::within(deadline, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(BackendError::Lost),
        Err(_) => Err(BackendError::Timeout),
    }
}

/// What a reader is told when its round trip failed with `e`.
pub(super) fn lane_error(e: BackendError) -> LaneError {
    if e == BackendError::Timeout {
        LaneError::Timeout
    } else {
        LaneError::Unavailable
    }
}

impl Batch {
    /// The counters' values in `reply` to this batch, in order.
    pub(super) fn results(
        &self,
        lane: &Lane,
        reply: &Reply,
    ) -> Result<Vec<KeyValue>, BackendError> {
        let counters = self
            .items
            .iter()
            .filter(|(k, _)| super::windows::parse_pending(k).is_none())
            .count();
        parse_results(reply, counters).ok_or_else(|| {
            tracing::warn!(shard = %lane.shard.name, reply = ?reply.frame, "unexpected flush reply");
            BackendError::Lost
        })
    }

    /// The frame sent for this batch (empty in a cluster, where its parts are sent).
    pub(super) fn frame(&self) -> &Bytes {
        &self.frame
    }
}

pub(super) fn parse_results(reply: &Reply, n: usize) -> Option<Vec<KeyValue>> {
    let BytesFrame::Array(top) = &reply.frame else {
        return None;
    };
    // [applied, values] or, from `SCRIPT`, [applied, values, the watermark found].
    let (2 | 3, Some(BytesFrame::Array(values))) = (top.len(), top.get(1)) else {
        return None;
    };
    if values.len() != n {
        return None;
    }
    Some(
        values
            .iter()
            .map(|v| match v {
                BytesFrame::Integer(i) => KeyValue::Int(*i),
                BytesFrame::Null => KeyValue::Nil,
                BytesFrame::BulkString(b) => match parse_i64(b) {
                    Some(i) => KeyValue::Int(i),
                    None => {
                        let mut raw = BytesMut::new();
                        crate::resp::reply::bulk(&mut raw, b);
                        KeyValue::Other(raw.freeze())
                    }
                },
                BytesFrame::Error(e) => KeyValue::Error(e.to_string()),
                other => KeyValue::Error(format!("ERR unexpected reply {other:?}")),
            })
            .collect(),
    )
}

/// A read between round trips that a cluster node redirected: with `-MOVED` (the slot
/// lives at `addr` now) or `-ASK` (it is migrating there and the key already moved, so the
/// read goes after `ASKING`). Sent once, on that node's lane connection; anything but a plain
/// reply there is `Unavailable` (the reader tries again).
async fn redirected(
    engine: &Engine,
    addr: std::net::SocketAddr,
    asking: bool,
    frame: &Bytes,
    timeout: Duration,
) -> Result<BytesFrame, LaneError> {
    let topo = engine.router().topology();
    let Some(node) = topo.by_addr(addr) else {
        engine.router().report_stale();
        return Err(LaneError::Unavailable);
    };
    let rx = if asking {
        node.lane_send_asking(frame)
    } else {
        node.lane_send(frame.clone())
    };
    match crate::deadline::within_for(timeout, rx).await {
        Ok(Ok(Ok(reply))) if Redirect::of_raw(&reply.raw).is_none() => Ok(reply.frame),
        Ok(Ok(Err(BackendError::Timeout))) | Err(_) => Err(LaneError::Timeout),
        _ => Err(LaneError::Unavailable),
    }
}

/// The watermark [`SCRIPT`] found before the batch (its reply's third element).
fn record_seen(reply: &Reply) -> Option<u64> {
    let BytesFrame::Array(top) = &reply.frame else {
        return None;
    };
    let BytesFrame::Integer(seen) = top.get(2)? else {
        return None;
    };
    u64::try_from(*seen).ok()
}

/// The `EVAL` of a batch, and how many counter deltas and bucket fields it writes.
/// Window deltas (see `windows`) become the fields of their keys' window hashes
/// (`window_store`), merged per bucket; `now` decides which buckets are past retention
/// (left out) and which old fields a write trims.
pub(super) fn encode_batch(
    proxy_id: &str,
    windows: &Windows,
    now: u64,
    seq: u64,
    items: &[(Bytes, Option<i64>)],
    applied_key: &[u8],
) -> (Bytes, (u64, u64)) {
    let (wins, counters): (Vec<_>, Vec<_>) = items
        .iter()
        .partition(|(k, _)| super::windows::parse_pending(k).is_some());
    let mut buckets = Writes::default();
    for (k, d) in &wins {
        if let (Some(d), Some((letter, t, key))) = (d, super::windows::parse_pending(k)) {
            buckets.add(windows, now, letter, t, key, *d);
        }
    }
    let fields = buckets.field_count();
    let entries = buckets.entries();
    let n = counters.len();
    let mut out = BytesMut::with_capacity(SCRIPT.len() + 64 + n * 48 + fields * 40);
    let writes = (
        counters.iter().filter(|(_, d)| d.is_some()).count() as u64,
        fields as u64,
    );
    let window_args = match entries.len() {
        0 => 0,
        _ => Writes::arg_count(windows, &entries),
    };
    let args = 4 + n + entries.len() + 3 + n + window_args;
    crate::resp::reply::array(&mut out, args);
    let mut num = itoa::Buffer::new();
    crate::resp::reply::bulk(&mut out, b"EVAL");
    crate::resp::reply::bulk(&mut out, SCRIPT.as_bytes());
    crate::resp::reply::bulk(&mut out, num.format(1 + n + entries.len()).as_bytes());
    crate::resp::reply::bulk(&mut out, applied_key);
    for (k, _) in &counters {
        crate::resp::reply::bulk(&mut out, k);
    }
    for (name, _, _) in &entries {
        crate::resp::reply::bulk(&mut out, name);
    }
    crate::resp::reply::bulk(&mut out, proxy_id.as_bytes());
    crate::resp::reply::bulk(&mut out, num.format(seq).as_bytes());
    crate::resp::reply::bulk(&mut out, num.format(n).as_bytes());
    for (_, d) in &counters {
        match d {
            Some(d) => crate::resp::reply::bulk(&mut out, num.format(*d).as_bytes()),
            None => crate::resp::reply::bulk(&mut out, b""),
        }
    }
    if !entries.is_empty() {
        Writes::encode_args(&mut out, windows, now, &entries);
    }
    (out.freeze(), writes)
}
