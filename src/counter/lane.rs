//! A shard's counter lane: the only path by which counter deltas reach that shard.
//!
//! One task, one connection, one round trip at a time. A round trip is one `EVAL` of
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
//!
//! Owns the exactly-once protocol. Does not own the deltas themselves (the engine does;
//! the lane takes them, and settles them with the shard's reply).

use super::{parse_i64, Engine};
use crate::backend::{BackendError, Reply, Shard};
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use redis_protocol::resp2::types::BytesFrame;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Notify};

/// The hash on each shard holding, per proxy id, the last batch sequence number applied.
pub const APPLIED_KEY: &str = "tally:applied";

/// KEYS = [APPLIED_KEY, k1..kn]; ARGV = [proxy id, seq, d1..dn] where a delta of "" means
/// "read only". seq 0: a read-only batch that leaves the watermark alone.
pub const SCRIPT: &str = r#"
local seq = tonumber(ARGV[2])
local fresh = false
if seq > 0 then
  local seen = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
  if seq > seen then
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
    fresh = true
  end
end
local out = {}
for i = 2, #KEYS do
  local d = ARGV[i + 1]
  if fresh and d ~= '' then
    out[i - 1] = redis.pcall('INCRBY', KEYS[i], d)
  else
    out[i - 1] = redis.pcall('GET', KEYS[i])
  end
end
return {fresh and 1 or 0, out}
"#;

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
}

impl LaneError {
    pub fn client_message(&self, shard: &str) -> String {
        match self {
            LaneError::Unavailable => format!("TRYAGAIN shard {shard} is unavailable"),
            LaneError::Timeout => format!("TRYAGAIN shard {shard} timed out"),
        }
    }
}

type Waiter = oneshot::Sender<Result<KeyValue, LaneError>>;

#[derive(Default)]
struct Queue {
    /// Keys to read in the next round trip; `true` when their delta must land too.
    reads: HashMap<Bytes, (bool, Vec<Waiter>)>,
    flush: Vec<oneshot::Sender<bool>>,
    /// Batches recovered from the log, re-sent with their ids before anything else.
    replay: Vec<(u64, Vec<(Bytes, i64)>)>,
}

pub struct Lane {
    pub shard: Arc<Shard>,
    engine: Weak<Engine>,
    queue: Mutex<Queue>,
    wake: Notify,
}

/// One batch: what is sent, and what each key carried.
struct Batch {
    seq: u64,
    /// (key, delta): None for a read.
    items: Vec<(Bytes, Option<i64>)>,
    frame: Bytes,
}

impl Lane {
    pub fn spawn(shard: Arc<Shard>, engine: &Arc<Engine>) -> Arc<Lane> {
        let lane = Arc::new(Lane {
            shard,
            engine: Arc::downgrade(engine),
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
        });
        tokio::spawn(run(lane.clone()));
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

    /// Queues a batch recovered from the log; it goes before any new work.
    pub fn replay(&self, seq: u64, items: Vec<(Bytes, i64)>) {
        self.queue.lock().replay.push((seq, items));
        self.wake.notify_one();
    }

    /// Lands every pending delta of this shard; true when all landed.
    pub fn flush(&self) -> impl std::future::Future<Output = bool> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        self.queue.lock().flush.push(tx);
        self.wake.notify_one();
        async move { rx.await.unwrap_or(false) }
    }
}

async fn run(lane: Arc<Lane>) {
    loop {
        lane.wake.notified().await;
        let Some(engine) = lane.engine.upgrade() else {
            return;
        };
        loop {
            let (reads, flushers, replay) = {
                let mut q = lane.queue.lock();
                (
                    std::mem::take(&mut q.reads),
                    std::mem::take(&mut q.flush),
                    std::mem::take(&mut q.replay),
                )
            };
            if reads.is_empty() && flushers.is_empty() && replay.is_empty() {
                break;
            }
            for (seq, items) in replay {
                let items = items.into_iter().map(|(k, d)| (k, Some(d))).collect();
                let batch = Batch::new(&engine.proxy_id, seq, items);
                send_batch(&lane, &engine, batch, &mut HashMap::new(), &mut Vec::new()).await;
            }
            let mut flushers = flushers;
            let flush = !flushers.is_empty();
            let ok = round(&lane, &engine, reads, flush, &mut flushers).await;
            for f in flushers {
                let _ = f.send(ok);
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
    flushers: &mut Vec<oneshot::Sender<bool>>,
) -> bool {
    let started = Instant::now();
    let limit = engine.flush_batch_keys();
    // Taking deltas and logging their batches is one step for a log checkpoint.
    let gate = match &engine.wal {
        Some(w) => Some(w.lane_gate.read().await),
        None => None,
    };
    let land_keys: Vec<Bytes> = reads
        .iter()
        .filter(|(_, (land, _))| *land)
        .map(|(k, _)| k.clone())
        .collect();
    let mut items: Vec<(Bytes, Option<i64>)> = engine
        .take(None, Some(&land_keys), usize::MAX)
        .into_iter()
        .map(|(k, d)| (k, Some(d)))
        .collect();
    let landed: std::collections::HashSet<Bytes> = items.iter().map(|(k, _)| k.clone()).collect();
    for k in reads.keys() {
        if !landed.contains(k) {
            items.push((k.clone(), None));
        }
    }
    if flush {
        let topo = engine.router().topology();
        if let Some(idx) = topo
            .shards
            .iter()
            .position(|sh| Arc::ptr_eq(sh, &lane.shard))
        {
            let taken = engine.take(Some((&topo, idx)), None, usize::MAX);
            let at: HashMap<Bytes, usize> = items
                .iter()
                .enumerate()
                .map(|(i, (k, _))| (k.clone(), i))
                .collect();
            for (k, d) in taken {
                match at.get(&k) {
                    // A key read in this round and dirty since: its delta joins the read.
                    Some(&i) => items[i].1 = Some(items[i].1.unwrap_or(0).wrapping_add(d)),
                    None => items.push((k, Some(d))),
                }
            }
        }
    }
    let mut waiters: HashMap<Bytes, Vec<Waiter>> =
        reads.into_iter().map(|(k, (_, w))| (k, w)).collect();
    let mut batches = Vec::new();
    // Chunks taken front to back in one pass (split_off copied the remainder per chunk:
    // quadratic in the number of pending keys, minutes at a million).
    let mut rest = items.into_iter().peekable();
    while rest.peek().is_some() {
        let chunk: Vec<_> = rest.by_ref().take(limit.max(1)).collect();
        let seq = if chunk.iter().any(|(_, d)| d.is_some()) {
            engine.next_seq()
        } else {
            0
        };
        batches.push(Batch::new(&engine.proxy_id, seq, chunk));
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
                // replay would count its deltas again. They stay in flight in memory, and
                // the log up to its failure holds every increment that was acknowledged.
                drop(gate);
                for (_, ws) in waiters.drain() {
                    for w in ws {
                        let _ = w.send(Err(LaneError::Unavailable));
                    }
                }
                return false;
            }
        }
    }
    drop(gate);
    let mut all_ok = true;
    for b in batches {
        all_ok &= send_batch(lane, engine, b, &mut waiters, flushers).await;
    }
    for (_, ws) in waiters.drain() {
        for w in ws {
            let _ = w.send(Err(LaneError::Unavailable));
        }
    }
    if flush {
        flush_histogram().record(started.elapsed().as_secs_f64());
        engine.stats.flushes.fetch_add(1, Ordering::Relaxed);
        engine
            .stats
            .flush_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        if !all_ok {
            engine.stats.flush_failures.fetch_add(1, Ordering::Relaxed);
        }
    }
    all_ok
}

fn flush_histogram() -> &'static metrics::Histogram {
    static H: std::sync::OnceLock<metrics::Histogram> = std::sync::OnceLock::new();
    H.get_or_init(|| {
        crate::metrics::prometheus();
        metrics::histogram!("tallyproxy_flush_duration_seconds")
    })
}

/// Sends one batch and settles it. A batch that carries deltas is retried, with the same
/// sequence number, until it lands, for as long as the process lives: a shutdown waits for
/// it only until its deadline, and its deltas stay in the log for the next start. Read
/// waiters get the first outcome.
async fn send_batch(
    lane: &Lane,
    engine: &Arc<Engine>,
    batch: Batch,
    waiters: &mut HashMap<Bytes, Vec<Waiter>>,
    flushers: &mut Vec<oneshot::Sender<bool>>,
) -> bool {
    let has_deltas = batch.seq != 0;
    let mut backoff = Duration::from_millis(50);
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let epoch = engine.invalidation_epoch();
        match attempt(lane, &batch).await {
            Ok(results) => {
                let _gate = match &engine.wal {
                    Some(w) => Some(w.lane_gate.read().await),
                    None => None,
                };
                if has_deltas {
                    if let Some(wal) = &engine.wal {
                        wal.log_applied(batch.seq);
                    }
                    engine.stats.backend_writes.fetch_add(
                        batch.items.iter().filter(|i| i.1.is_some()).count() as u64,
                        Ordering::Relaxed,
                    );
                }
                for ((key, delta), value) in batch.items.iter().zip(results) {
                    if let (Some(d), KeyValue::Other(_) | KeyValue::Error(_)) = (delta, &value) {
                        engine.drop_delta(key, *d, &format!("{value:?}"));
                    }
                    engine.settle(key, *delta, &value, epoch);
                    if let Some(ws) = waiters.remove(key) {
                        for w in ws {
                            let _ = w.send(Ok(value.clone()));
                        }
                    }
                }
                return true;
            }
            Err(e) => {
                let lane_err = if e == BackendError::Timeout {
                    LaneError::Timeout
                } else {
                    LaneError::Unavailable
                };
                for (key, _) in &batch.items {
                    if let Some(ws) = waiters.remove(key) {
                        for w in ws {
                            let _ = w.send(Err(lane_err));
                        }
                    }
                }
                if !has_deltas {
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
                let deadline = tokio::time::Instant::now() + backoff;
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(deadline) => break,
                        _ = lane.wake.notified() => {
                            let reads = std::mem::take(&mut lane.queue.lock().reads);
                            for (_, (_, ws)) in reads {
                                for w in ws { let _ = w.send(Err(LaneError::Unavailable)); }
                            }
                            // Flush waiters learn the shard is down; the batch keeps trying.
                            let flushers = std::mem::take(&mut lane.queue.lock().flush);
                            for f in flushers { let _ = f.send(false); }
                        }
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

impl Batch {
    fn new(proxy_id: &str, seq: u64, items: Vec<(Bytes, Option<i64>)>) -> Batch {
        Batch {
            seq,
            frame: encode_batch(proxy_id, seq, &items),
            items,
        }
    }
}

async fn attempt(lane: &Lane, batch: &Batch) -> Result<Vec<KeyValue>, BackendError> {
    let rx = lane.shard.lane_send(batch.frame.clone());
    let reply = match tokio::time::timeout(lane.shard.timeout, rx).await {
        Ok(Ok(r)) => r?,
        Ok(Err(_)) => return Err(BackendError::Lost),
        Err(_) => return Err(BackendError::Timeout),
    };
    parse_results(&reply, batch.items.len()).ok_or_else(|| {
        tracing::warn!(shard = %lane.shard.name, reply = ?reply.frame, "unexpected flush reply");
        BackendError::Lost
    })
}

fn parse_results(reply: &Reply, n: usize) -> Option<Vec<KeyValue>> {
    let BytesFrame::Array(top) = &reply.frame else {
        return None;
    };
    let [_, BytesFrame::Array(values)] = top.as_slice() else {
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

fn encode_batch(proxy_id: &str, seq: u64, items: &[(Bytes, Option<i64>)]) -> Bytes {
    let mut out = BytesMut::with_capacity(SCRIPT.len() + 64 + items.len() * 48);
    let n = items.len();
    crate::resp::reply::array(&mut out, 3 + 2 * n + 2 + 1);
    let mut num = itoa::Buffer::new();
    crate::resp::reply::bulk(&mut out, b"EVAL");
    crate::resp::reply::bulk(&mut out, SCRIPT.as_bytes());
    crate::resp::reply::bulk(&mut out, num.format(n + 1).as_bytes());
    crate::resp::reply::bulk(&mut out, APPLIED_KEY.as_bytes());
    for (k, _) in items {
        crate::resp::reply::bulk(&mut out, k);
    }
    crate::resp::reply::bulk(&mut out, proxy_id.as_bytes());
    crate::resp::reply::bulk(&mut out, num.format(seq).as_bytes());
    for (_, d) in items {
        match d {
            Some(d) => crate::resp::reply::bulk(&mut out, num.format(*d).as_bytes()),
            None => crate::resp::reply::bulk(&mut out, b""),
        }
    }
    out.freeze()
}
