//! FLUSHDB and FLUSHALL through the engine: the shard's keys go, and so does everything the
//! proxy still holds for them (pending and in-flight deltas, cached bases), so that nothing
//! flushed away comes back.
//!
//! A flush runs on each shard's lane, between two round trips, so no batch of the lane is
//! in flight. The lane takes the shard's pending deltas as a batch with a fresh sequence
//! number and logs it, exactly as for a landing; but instead of `INCRBY`s it sends
//! [`SCRIPT`], which saves the shard's `tally:applied` watermark hash, flushes, puts the
//! hash back and moves this proxy's watermark to the batch's number, in one atomic step.
//! The flush therefore *absorbs* the batch:
//!
//! - a replay after kill -9 re-sends the logged batch with its number; if the flush ran,
//!   the watermark says "applied" and the batch only reads; if it did not, the deltas land,
//!   as they would have without the flush. Either way nothing is counted twice or revived;
//! - a flush whose outcome is unknown (timeout, lost connection) falls back to sending the
//!   same batch as an ordinary one, retried until it lands, with the same effect.
//!
//! Once the shard confirmed, the engine drops every entry of the shard's keys: the taken
//! deltas leave `inflight`, increments that arrived since the take are cancelled by a
//! negative `Incr` record in the log (under the stripe lock that zeroes them, so a
//! checkpoint sees both or neither), cached bases go, and the invalidation epoch moves so
//! that a plain GET sent before the flush cannot cache its old answer. The log is committed
//! before the flush is acknowledged: an increment sent after the `+OK` counts from zero.
//!
//! Other `tally:` keys: window hashes (`tally:win:*`, and `tally:w:*` of the layout before)
//! are counts of the flushed keys and go with them; rebalance tombstones (`tally:mv:*`)
//! exist only during a rebalance, when a flush is refused.
//!
//! Owns the engine's side of a flush. Does not own the lane's queue (`lane`) or the
//! command (`connection::keyspace`).

use super::lane::{self, Lane};
use super::stripe::{Entry, DIRTY, INFLIGHT};
use super::{wal, windows, Engine};
use crate::backend::BackendError;
use bytes::{Bytes, BytesMut};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// KEYS = \[tally:applied\]; ARGV = [proxy id, seq (0: none), FLUSHDB|FLUSHALL, mode?].
pub const SCRIPT: &str = r#"
local saved = redis.call('HGETALL', KEYS[1])
if ARGV[4] then
  redis.call(ARGV[3], ARGV[4])
else
  redis.call(ARGV[3])
end
for i = 1, #saved, 2 do
  redis.call('HSET', KEYS[1], saved[i], saved[i + 1])
end
local seq = tonumber(ARGV[2])
if seq > 0 then
  local seen = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
  if seq > seen then
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  end
end
return 1
"#;

/// What a flush asks of each shard: the command (`FLUSHDB` or `FLUSHALL`) and its mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flush {
    pub command: &'static str,
    /// `ASYNC` or `SYNC`, as the client wrote it; None for the server's default.
    pub mode: Option<Bytes>,
}

/// Why a shard's flush did not succeed, in the words the client gets.
pub type ForgetError = String;

impl Engine {
    /// Flushes every shard of the current topology through its lane and forgets what the
    /// engine held for their keys. The first failure is the error.
    pub async fn forget_all(&self, flush: &Flush) -> Result<(), ForgetError> {
        let topo = self.router().topology();
        let mut waits = Vec::new();
        for s in &topo.shards {
            let Some(lane) = self.lane(&s.name) else {
                return Err(lane::LaneError::Unavailable.client_message(&s.name));
            };
            waits.push(lane.forget(flush.clone()));
        }
        let mut first_err = None;
        for w in waits {
            if let Err(e) = w.await {
                first_err.get_or_insert(e);
            }
        }
        // Whatever each shard did, increments cancelled meanwhile are in the log before
        // anyone hears about it.
        if self.commit_log().await.is_err() {
            first_err.get_or_insert_with(|| super::LOG_FAILED.to_string());
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Drops every entry of the keys `lane`'s shard owns in `topo`, after the shard was
    /// flushed: `taken` (what the flush absorbed) leaves in-flight, increments since are
    /// cancelled in the log.
    fn forget_settle(&self, topo: &crate::router::Topology, idx: usize, taken: &[(Bytes, i64)]) {
        for (k, d) in taken {
            let mut stripe = self.lock(k);
            let stripe = &mut *stripe;
            stripe.unflushed = stripe.unflushed.wrapping_sub(*d);
            if let Some(e) = stripe.map.get_mut(&k[..]) {
                e.inflight -= d;
                if e.inflight == 0 {
                    e.flags &= !INFLIGHT;
                }
            }
        }
        let mut cancelled = 0usize;
        for cell in self.stripes.iter() {
            let mut guard = cell.lock.lock();
            let stripe = &mut *guard;
            // Window deltas held in entries are cancelled under their own keys below.
            let spilled = stripe.spill_all(|k| topo.shard_index(k) == idx);
            self.dirty_keys.fetch_add(spilled, Ordering::Relaxed);
            let mut log = std::mem::take(&mut stripe.log);
            let mut unflushed = 0i64;
            stripe.map.retain(|k, e: &mut Entry| {
                if topo.shard_index(windows::placement_key(k.as_bytes())) != idx {
                    return true;
                }
                if e.flags & INFLIGHT != 0 {
                    // Another lane's round trip (not this shard's) still settles it.
                    e.state = super::stripe::BaseState::Unknown;
                    return true;
                }
                if e.flags & DIRTY != 0 {
                    if self.wal.is_some() {
                        wal::encode_incr(&mut log, k.as_bytes(), e.pending.wrapping_neg());
                    }
                    unflushed = unflushed.wrapping_add(e.pending);
                    cancelled += 1;
                }
                false
            });
            stripe.unflushed = stripe.unflushed.wrapping_sub(unflushed);
            let has_log = !log.is_empty();
            stripe.log = log;
            if has_log {
                cell.has_log.store(true, Ordering::SeqCst);
            }
        }
        self.dirty_keys.fetch_sub(cancelled, Ordering::Relaxed);
        self.invalidations.fetch_add(1, Ordering::SeqCst);
    }
}

/// A batch to send as an ordinary one after a flush whose outcome is unknown.
pub(super) type Fallback = Option<(u64, Vec<(Bytes, Option<i64>)>)>;

/// Runs one flush on `lane`'s shard (called by the lane between round trips). The lane
/// answers the client first, then sends the fallback batch, which may wait for the shard.
pub(super) async fn run(
    lane: &Lane,
    engine: &Arc<Engine>,
    flush: &Flush,
) -> (Result<(), ForgetError>, Fallback) {
    let name = lane.shard.name.clone();
    let unavailable = || lane::LaneError::Unavailable.client_message(&name);
    let topo = engine.router().topology();
    let Some(idx) = topo.shards.iter().position(|s| Arc::ptr_eq(s, &lane.shard)) else {
        return (Err(unavailable()), None);
    };
    if !lane.shard.is_up() {
        // Known down: nothing taken, nothing sent.
        return (Err(unavailable()), None);
    }
    let gate = engine.lane_gate().await;
    let taken = engine.take(Some((&topo, idx, &mut 0)), None, usize::MAX, lane.id);
    let items: Vec<(Bytes, Option<i64>)> =
        taken.iter().map(|(k, d)| (k.clone(), Some(*d))).collect();
    let seq = if taken.is_empty() {
        0
    } else {
        engine.next_seq()
    };
    if let (Some(wal), true) = (&engine.wal, seq != 0) {
        if wal.log_batch(seq, &name, &items).await.is_err() {
            engine.untake(&items);
            return (Err(super::LOG_FAILED.to_string()), None);
        }
    }
    drop(gate);
    let frame = encode(&engine.proxy_id, seq, flush);
    let rx = lane.shard.lane_send(frame);
    let outcome = match crate::deadline::within_for(lane.shard.timeout, rx).await {
        Ok(Ok(Ok(r))) => match r.error() {
            None => Ok(()),
            Some(e) => Err(e.to_string()),
        },
        Ok(Ok(Err(e))) => Err(e.client_message(&name)),
        Ok(Err(_)) => Err(BackendError::Lost.client_message(&name)),
        Err(_) => Err(BackendError::Timeout.client_message(&name)),
    };
    match outcome {
        Ok(()) => {
            let _gate = engine.lane_gate().await;
            if let (Some(wal), true) = (&engine.wal, seq != 0) {
                wal.log_applied(seq);
            }
            engine.forget_settle(&topo, idx, &taken);
            (Ok(()), None)
        }
        // The flush may or may not have run: the absorbed batch goes out as an ordinary one
        // under the same number, which lands only if the flush did not.
        Err(e) => (Err(e), (seq != 0).then_some((seq, items))),
    }
}

fn encode(proxy_id: &str, seq: u64, flush: &Flush) -> Bytes {
    let seq = seq.to_string();
    let mut args: Vec<&[u8]> = vec![
        b"EVAL",
        SCRIPT.as_bytes(),
        b"1",
        lane::APPLIED_KEY.as_bytes(),
        proxy_id.as_bytes(),
        seq.as_bytes(),
        flush.command.as_bytes(),
    ];
    if let Some(m) = &flush.mode {
        args.push(m);
    }
    let mut out = BytesMut::new();
    crate::backend::encode_into(&mut out, &args);
    out.freeze()
}
