//! Landing deltas: a lane takes a shard's pending deltas (`take`), settles them with the
//! shard's reply (`settle`) or gives them back (`untake`); periodic, early and whole flushes
//! are started here, and the background jobs (clock tick, flush, sweep) are spawned here.
//! The clock task also measures how long the worker was held (`worker_held`), for the
//! metric and for the shards' timeouts (`deadline`).
//!
//! Owns the engine's side of a flush and its background jobs. Does not own the exactly-once
//! protocol (`lane`), the pacing (`pace`) or the cache sweep itself (`cache`).

use super::lane::KeyValue;
use super::stripe::{stripe_of, BaseState, Entry, DIRTY, INFLIGHT, REFRESHING};
use super::{unix_ms, wal, windows, Engine};
use bytes::Bytes;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

impl Engine {
    /// Moves the pending deltas of `keys` to in-flight, and returns them. Called by a lane
    /// building a batch. When `keys` is None: the dirty keys owned by the shard `owner`
    /// names, stripe by stripe from its cursor, which is left after the last stripe taken;
    /// the take ends with the stripe in which it reached `limit` keys (a stripe is taken
    /// whole, so that a key's window deltas go together).
    pub(crate) fn take(
        &self,
        owner: Option<(&crate::router::Topology, usize, &mut usize)>,
        keys: Option<&[Bytes]>,
        limit: usize,
        lane: u32,
    ) -> Vec<(Bytes, i64)> {
        let mut out = Vec::new();
        let mut taken = 0usize;
        let mut spilled = 0usize;
        // Dirty keys left behind because another lane holds their slot (cluster mode).
        let mut held = 0u64;
        // In a cluster a key's slot must be free or this lane's (see `slot_holds`).
        let holds = self.holds.as_ref();
        let may_take = |key: &[u8]| match holds {
            Some(h) => h.try_hold(
                crate::router::slots::key_slot(windows::placement_key(key)),
                lane,
            ),
            None => true,
        };
        let mut arena = KeyArena::default();
        let mut take_entry = |key: &[u8], e: &mut Entry, out: &mut Vec<(Bytes, i64)>| {
            if e.flags & DIRTY == 0 {
                return;
            }
            out.push((arena.copy(key), e.pending));
            e.inflight += e.pending;
            e.pending = 0;
            e.flags = (e.flags & !DIRTY) | INFLIGHT;
            taken += 1;
        };
        match keys {
            Some(keys) => {
                for k in keys {
                    let mut stripe = self.lock(k);
                    // Its window delta leaves the entry first (the entry stops being dirty).
                    spilled += stripe.spill_key(k);
                    if let Some(e) = stripe.map.get_mut(&k[..]) {
                        if e.flags & DIRTY != 0 {
                            if may_take(k) {
                                take_entry(k, e, &mut out);
                            } else {
                                held += 1;
                            }
                        }
                    }
                }
            }
            None => {
                let (topo, idx, cursor) = owner.expect("an owner for a full take");
                while *cursor < self.stripes.len() && out.len() < limit {
                    let mut stripe = self.stripes[*cursor].lock.lock();
                    *cursor += 1;
                    // Window deltas held in the entries of this shard's keys go to their own
                    // entries first, so that this take sees them (and takes them).
                    spilled += stripe.spill_all(|k| topo.shard_index(k) == idx);
                    for (k, e) in stripe.map.iter_mut() {
                        if e.flags & DIRTY != 0
                            && topo.shard_index(windows::placement_key(k)) == idx
                        {
                            if may_take(k) {
                                take_entry(k, e, &mut out);
                            } else {
                                held += 1;
                            }
                        }
                    }
                }
            }
        }
        self.dirty_keys.fetch_add(spilled, Ordering::Relaxed);
        self.dirty_keys.fetch_sub(taken, Ordering::Relaxed);
        if held > 0 {
            self.left_held.fetch_add(held, Ordering::Relaxed);
        }
        if self.dirty_keys.load(Ordering::Relaxed) <= self.max_pending_keys {
            self.early_flush_armed.store(true, Ordering::Relaxed);
        }
        out
    }

    /// Applies a round trip's result for `key`: `delta` (what was in flight) has landed and
    /// the shard now holds `value`.
    /// `epoch` is the invalidation epoch when the round trip was sent: if a write to a
    /// counter key ran since, the value may predate it, so it answers this read but is
    /// not cached as fresh.
    pub(crate) fn settle(&self, key: &[u8], delta: Option<i64>, value: &KeyValue, epoch: u64) {
        let now = self.settle_time(epoch);
        let mut stripe = self.lock(key);
        if windows::parse_pending(key).is_some() {
            // A window delta has no value of its own: once landed, it is gone.
            if let (Some(d), Some(e)) = (delta, stripe.map.get_mut(key)) {
                e.inflight -= d;
                if e.inflight == 0 {
                    e.flags &= !INFLIGHT;
                }
                if !e.unflushed() {
                    stripe.map.remove(key);
                }
            }
            return;
        }
        let stripe = &mut *stripe;
        if let Some(d) = delta {
            stripe.unflushed = stripe.unflushed.wrapping_sub(d);
        }
        // A lookup first: `entry` builds the owned key even when the entry is there.
        let e = match stripe.map.get_mut(key) {
            Some(e) => e,
            None => stripe.map.entry(key.into()).or_insert(Entry::NEW),
        };
        e.flags &= !REFRESHING;
        if let Some(d) = delta {
            e.inflight -= d;
            if e.inflight == 0 {
                e.flags &= !INFLIGHT;
            }
        }
        if e.flags & INFLIGHT != 0 {
            // Another round trip for this key is still out; its reply will settle the base.
            return;
        }
        self.set_base(key, e, value, now);
    }

    /// Applies a read sent between two batches of one flush (see `lane_between`): `ahead`
    /// is the delta of `key` in that lane's batches not yet sent, which the shard's `value`
    /// does not hold, so `value` is the base under `inflight`. Only when `ahead` is all the
    /// key has in flight; otherwise the entry is left as it is (another round trip's reply
    /// will settle the base) and the reader asks again.
    pub(crate) fn settle_ahead(&self, key: &[u8], ahead: i64, value: &KeyValue, epoch: u64) {
        let now = self.settle_time(epoch);
        let mut stripe = self.lock(key);
        let Some(e) = stripe.map.get_mut(key) else {
            return;
        };
        if e.flags & INFLIGHT == 0 || e.inflight != ahead {
            return;
        }
        e.flags &= !REFRESHING;
        self.set_base(key, e, value, now);
    }

    /// The delta `key` has in flight, if any round trip carries one.
    pub(crate) fn inflight_of(&self, key: &[u8]) -> Option<i64> {
        let stripe = self.lock(key);
        let e = stripe.map.get(key)?;
        (e.flags & INFLIGHT != 0).then_some(e.inflight)
    }

    /// When a value read in a round trip sent at invalidation epoch `epoch` was read: now,
    /// or, if a write to a counter key ran since, already past the TTL (it answers the read
    /// but is not cached as fresh).
    fn settle_time(&self, epoch: u64) -> u32 {
        if self.invalidation_epoch() == epoch {
            self.now_ms()
        } else {
            self.now_ms()
                .wrapping_sub(self.ttl_ms as u32)
                .wrapping_sub(1)
        }
    }

    /// The shard's reply becomes `e`'s base, read at `now`.
    fn set_base(&self, key: &[u8], e: &mut Entry, value: &KeyValue, now: u32) {
        if self.needs_move(key) {
            // The shard's value is only part of the total until the key has moved.
            e.state = BaseState::Unknown;
            return;
        }
        let (state, base) = match value {
            KeyValue::Int(v) => (BaseState::Int, *v),
            KeyValue::Nil => (BaseState::Absent, 0),
            KeyValue::Other(_) => (BaseState::NotInt, 0),
            KeyValue::Error(msg) if msg.starts_with("WRONGTYPE") => (BaseState::WrongType, 0),
            KeyValue::Error(_) => (BaseState::Unknown, 0),
        };
        e.state = state;
        e.base = base;
        e.base_at = now;
    }

    /// A batch whose deltas could not be applied (the key no longer holds an integer):
    /// they are dropped, counted and logged. Redis would have refused them too.
    pub(crate) fn drop_delta(&self, key: &[u8], delta: i64, why: &str) {
        self.stats.dropped_deltas.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(key = %String::from_utf8_lossy(key), delta, error = why, "increment could not be applied and was dropped");
    }

    /// Returns deltas taken for a batch that could not be logged to pending (the batch is
    /// never sent), so that they are neither lost nor reported as landed.
    pub(crate) fn untake(&self, items: &[(Bytes, Option<i64>)]) {
        for (k, d) in items {
            let Some(d) = d else { continue };
            let mut stripe = self.lock(k);
            if let Some(e) = stripe.map.get_mut(&k[..]) {
                e.inflight -= d;
                e.pending = e.pending.wrapping_add(*d);
                if e.inflight == 0 {
                    e.flags &= !INFLIGHT;
                }
                if e.flags & DIRTY == 0 {
                    e.flags |= DIRTY;
                    self.dirty_keys.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// A batch whose shard was declared lost: its deltas go back to pending (for the keys'
    /// new owners), logged as increments in the same commit as the batch's `Applied`
    /// record, so that a replay neither re-sends the batch nor loses its deltas.
    pub(crate) async fn abandon_batch(&self, seq: u64, items: &[(Bytes, Option<i64>)]) {
        let _gate = self.lane_gate().await;
        if self.wal.is_some() {
            for (k, d) in items {
                let Some(d) = d else { continue };
                let cell = &self.stripes[stripe_of(k)];
                wal::encode_incr(&mut cell.lock.lock().log, k, *d);
                cell.has_log.store(true, Ordering::SeqCst);
            }
        }
        self.untake(items);
        if let Some(w) = &self.wal {
            w.log_applied(seq);
            let _ = w.commit().await;
        }
        tracing::warn!(
            seq,
            keys = items.len(),
            "batch for a lost shard abandoned; its deltas go to the keys' new owners"
        );
    }

    /// Waits until an early flush is due (the buffer passed `max_pending_keys`).
    pub async fn early_flush_due(&self) {
        self.early_flush.notified().await
    }

    /// Seconds since the last flush started, while deltas are pending: an upper bound on
    /// the age of the oldest pending increment (every flush takes every pending delta of
    /// the shards that are up).
    pub fn oldest_pending_seconds(&self) -> f64 {
        if self.dirty_keys() == 0 {
            return 0.0;
        }
        let last = self.last_flush_ms.load(Ordering::Relaxed);
        let start = if last == 0 { self.epoch_unix_ms } else { last };
        (unix_ms().saturating_sub(start)) as f64 / 1000.0
    }

    /// Lands every pending delta on every lane, as fast as the shards take them; true when
    /// all landed.
    pub async fn flush_all(&self) -> bool {
        self.flush_all_within(None).await
    }

    /// [`Engine::flush_all`], its batches spread over `spread` when given (`pace`): the
    /// periodic flush.
    pub async fn flush_all_within(&self, spread: Option<Duration>) -> bool {
        let by = spread
            .filter(|s| !s.is_zero())
            .map(|s| std::time::Instant::now() + s);
        let started = unix_ms();
        // The increments' own clock (the ticker's): every one counted after this read is
        // stamped this second or later.
        let started_wall = self.window_second();
        let held_before = self.left_held.load(Ordering::Relaxed);
        let lanes = self.lanes();
        let waits: Vec<_> = lanes.iter().map(|l| l.flush(by)).collect();
        let mut ok = true;
        for w in waits {
            ok &= w.await;
        }
        // Only a flush that landed everything bounds the age of what is pending, and every
        // window delta stamped before it started has then landed. A take that left a key
        // behind for another lane's hold on its slot (cluster mode) means it did not.
        if ok && self.left_held.load(Ordering::Relaxed) == held_before {
            self.last_flush_ms.store(started, Ordering::Relaxed);
            self.window_floor.fetch_max(started_wall, Ordering::Relaxed);
        }
        ok
    }
}

/// The keys a take copies out of the stripes, in shared buffers of [`KeyArena::SIZE`]: one
/// allocation per buffer rather than one per key, and a clone (the log's record of the
/// batch holds one) counts a reference instead of allocating. A buffer is freed with the
/// last key of it, when every batch cut from the take has settled.
#[derive(Default)]
struct KeyArena {
    buf: bytes::BytesMut,
}

impl KeyArena {
    const SIZE: usize = 64 * 1024;

    fn copy(&mut self, key: &[u8]) -> Bytes {
        if self.buf.capacity() - self.buf.len() < key.len() {
            self.buf = bytes::BytesMut::with_capacity(Self::SIZE.max(key.len()));
        }
        self.buf.extend_from_slice(key);
        self.buf.split().freeze()
    }
}

/// Spawns the background jobs: the clock, periodic and early flushes, and the cache sweep.
/// `flush_spread` is how long a periodic flush spreads its batches over (`pace`).
pub fn spawn_background(
    engine: Arc<Engine>,
    flush_interval: Duration,
    flush_spread: Duration,
    cache_ttl: Duration,
    mut shutdown: crate::shutdown::Shutdown,
) {
    let clock = Arc::downgrade(&engine);
    let mut clock_stop = shutdown.clone();
    crate::task::spawn(tracing::info_span!("clock"), async move {
        let mut tick = tokio::time::interval(CLOCK_TICK);
        let mut last = std::time::Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let now = std::time::Instant::now();
                    worker_held(now.duration_since(last));
                    last = now;
                }
                _ = clock_stop.wait() => {
                    // Increments served while the proxy stops read the clocks themselves
                    // rather than the last tick's reading.
                    if let Some(e) = clock.upgrade() {
                        e.stop_clock();
                    }
                    return;
                }
            }
            match clock.upgrade() {
                Some(e) => e.tick_clock(),
                None => return,
            }
        }
    });
    if engine.is_memory_mode() {
        if engine.windows().enabled() {
            crate::task::spawn(tracing::info_span!("window_sweep"), async move {
                let mut tick = tokio::time::interval(Duration::from_secs(60));
                loop {
                    tokio::select! {
                        _ = tick.tick() => { engine.sweep_windows(); }
                        _ = shutdown.wait() => return,
                    }
                }
            });
        }
        return;
    }
    let swept = engine.clone();
    let mut sweep_stop = shutdown.clone();
    crate::task::spawn(tracing::info_span!("cache_sweep"), async move {
        let mut sweep = tokio::time::interval(cache_ttl.max(Duration::from_millis(100)));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = sweep.tick() => { swept.sweep().await; }
                _ = sweep_stop.wait() => return,
            }
        }
    });
    crate::task::spawn(tracing::info_span!("flusher"), async move {
        let mut flush = tokio::time::interval(flush_interval);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        flush.tick().await;
        // The periodic flush runs beside the other jobs, not in their way: paced, it lasts
        // seconds, and an early flush meanwhile (which ends its pacing) must not wait for it.
        type Running<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + 'a>>;
        let mut periodic: Option<Running<'_>> = None;
        loop {
            tokio::select! {
                _ = flush.tick(), if periodic.is_none() => {
                    periodic = Some(Box::pin(engine.flush_all_within(Some(flush_spread))));
                }
                _ = async {
                    match periodic.as_mut() {
                        Some(p) => p.await,
                        None => std::future::pending().await,
                    }
                } => { periodic = None; }
                _ = engine.early_flush_due() => { engine.flush_all().await; }
                _ = shutdown.wait() => return,
            }
        }
    });
}

/// How often the engine's clock ticks.
const CLOCK_TICK: Duration = Duration::from_millis(2);

/// The clock tick came `gap` after the one before: a gap well past [`CLOCK_TICK`] is time
/// the worker was held by something that did not yield (a log checkpoint's cut is the
/// longest: ~1.5 s at ten million keys under load), during which no client was answered.
/// Recorded in `tallyproxy_worker_held_seconds` from 10 ms (below 100 ms mostly a busy
/// worker's queue; the shards' timeouts give back holds from 100 ms, see `deadline`); logged
/// from 1 s.
fn worker_held(gap: Duration) {
    if gap < Duration::from_millis(10) {
        return;
    }
    // Time no request could be written or read: not the shards' (see `deadline`).
    crate::deadline::record_held(gap.saturating_sub(CLOCK_TICK));
    static H: std::sync::OnceLock<metrics::Histogram> = std::sync::OnceLock::new();
    crate::metrics::histogram_once(&H, "tallyproxy_worker_held_seconds").record(gap.as_secs_f64());
    if gap >= Duration::from_secs(1) {
        tracing::warn!(
            held_ms = gap.as_millis() as u64,
            "the worker was held: no client was answered meanwhile"
        );
    }
}
