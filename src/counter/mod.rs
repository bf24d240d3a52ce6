//! The counter engine: merged increments, the read cache, and their flush to the shards.
//!
//! Every counter key the proxy has seen recently has an [`Entry`] in one of [`SHARDS`]
//! mutex-guarded maps (chosen by key hash, so connections on different cores rarely meet).
//! An entry holds three numbers whose sum is the value a client sees:
//!
//! - `base`: the shard's value as last read (with when, and whether it was an integer);
//! - `inflight`: deltas handed to a flush round trip whose reply has not come yet;
//! - `pending`: deltas received since, waiting for the next flush.
//!
//! INCR adds to `pending` and answers `base + inflight + pending` without touching Redis,
//! provided the base is fresh (younger than `cache_ttl`); otherwise the caller first asks
//! the key's [`lane`] for a read. GET answers from a fresh entry, or goes to the lane, which
//! lands the key's pending delta in the same round trip. Each shard has one lane: one
//! connection, one round trip at a time, every write carrying a batch sequence number that
//! the shard records, so a retried or replayed batch is applied exactly once.
//!
//! A key used after half its TTL is re-read in the background (`refresh_ahead`), so keys in
//! use do not go stale. An increment of a windowed key also adds to a *window delta* entry
//! (see [`windows`]) in the same map shard, under the same lock: window deltas are entries
//! like any other for the log, the flush and the replay. INFO's figures are running totals
//! kept per map shard, never a walk over the keys.
//!
//! With no shards (memory mode) the entries are the counters themselves and never expire;
//! window entries are the buckets, swept past retention.
//!
//! Owns counting and caching. Does not own the wire (`connection`, `http` call it) or
//! placement (`router`).

pub mod glob;
pub mod key;
pub mod lane;
pub mod wal;
pub mod windows;

use crate::config::{CounterMode, CountersConfig};
use crate::router::Router;
use bytes::Bytes;
use lane::{KeyValue, Lane, LaneError};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Number of independently locked maps. A power of two comfortably above the core count.
pub const SHARDS: usize = 32;

pub const NOT_INTEGER: &str = "ERR value is not an integer or out of range";
pub const OVERFLOW: &str = "ERR increment or decrement would overflow";
pub const LOG_FAILED: &str =
    "ERR the write-ahead log failed; increments are refused until it can be written again";
pub const BUFFER_FULL: &str = "TRYAGAIN the pending buffer is full while a shard is down";
pub const WRONGTYPE: &str = "WRONGTYPE Operation against a key holding the wrong kind of value";

/// What the shard held at the last read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum BaseState {
    /// Never read (or invalidated): the entry only carries deltas.
    Unknown,
    /// The key did not exist.
    Absent,
    /// An integer, in `base`.
    Int,
    /// A string that is not an integer: increments are refused.
    NotInt,
    /// Not a string at all: increments are refused with WRONGTYPE.
    WrongType,
}

const DIRTY: u8 = 1;
const INFLIGHT: u8 = 2;

/// One counter key. Kept small: memory per pending key is a product figure.
#[derive(Debug, Clone, Copy)]
struct Entry {
    base: i64,
    pending: i64,
    inflight: i64,
    /// Milliseconds since the engine's epoch when `base` was read.
    base_at: u32,
    state: BaseState,
    flags: u8,
    /// A read-ahead of the base is queued on the lane (see [`Engine::refresh_ahead`]).
    refreshing: bool,
}

impl Entry {
    const NEW: Entry = Entry {
        base: 0,
        pending: 0,
        inflight: 0,
        base_at: 0,
        state: BaseState::Unknown,
        flags: 0,
        refreshing: false,
    };

    fn exists(&self) -> bool {
        self.state == BaseState::Int || self.flags != 0
    }

    /// base + inflight + pending, or None on overflow.
    fn value(&self) -> Option<i64> {
        let base = if self.state == BaseState::Int {
            self.base
        } else {
            0
        };
        base.checked_add(self.inflight)?.checked_add(self.pending)
    }
}

type Map = HashMap<key::Key, Entry, ahash::RandomState>;

impl Shard {
    /// Adds `delta` to `key`'s pending delta (a new entry if none); true when the entry was
    /// not dirty before (the caller counts it).
    fn add_pending(&mut self, key: &[u8], delta: i64) -> bool {
        let e = match self.map.get_mut(key) {
            Some(e) => e,
            None => self.map.entry(key.into()).or_insert(Entry::NEW),
        };
        e.pending = e.pending.wrapping_add(delta);
        let newly_dirty = e.flags & DIRTY == 0;
        e.flags |= DIRTY;
        newly_dirty
    }
}

struct Shard {
    map: Map,
    /// Log records appended under this lock, drained by the log's next commit.
    log: Vec<u8>,
    /// Increments buffered here (summed for INFO; no shared counter on the hot path).
    increments: u64,
    /// Σ (pending + inflight) of this shard's counter entries (window deltas excluded): kept
    /// as it changes, so that INFO and /metrics never walk the keys under the lock.
    unflushed: i64,
}

/// A map shard and, beside its lock, whether its log buffer has bytes, so that a commit
/// skips the locks of shards with nothing to write.
struct Cell {
    lock: Mutex<Shard>,
    has_log: AtomicBool,
}

/// Result of an immediate increment attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Incr {
    /// Buffered; the new value.
    Value(i64),
    /// The base is missing or stale: read it through the lane, then try again.
    NeedBase,
    /// Refused, with Redis's wording; nothing was buffered.
    Refused(&'static str),
    /// Buffered and logged, but the total is unknown (no base: the owner is down).
    Pending,
}

/// How much of a base an increment needs.
#[derive(Clone, Copy)]
enum Base {
    Fresh,
    AnyKnown,
    NotNeeded,
}

/// Result of a cache read.
#[derive(Debug, PartialEq, Eq)]
pub enum Cached {
    /// Fresh: the value (None: the key does not exist).
    Hit(Option<i64>),
    /// The entry exists but is stale or unknown: ask the lane.
    Stale,
    /// No entry at all: a plain GET may be forwarded, and its reply cached.
    Absent,
}

/// Engine-wide figures, for INFO and /metrics.
#[derive(Debug, Default)]
pub struct CounterStats {
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub flushes: AtomicU64,
    pub flush_failures: AtomicU64,
    pub batch_retries: AtomicU64,
    pub backend_writes: AtomicU64,
    pub dropped_deltas: AtomicU64,
    pub flush_micros: AtomicU64,
    /// Bases re-read in the background before they went stale.
    pub refreshes: AtomicU64,
    /// Bucket fields (time windows) written by flushes.
    pub window_writes: AtomicU64,
    pub window_queries: AtomicU64,
    pub window_query_errors: AtomicU64,
}

pub struct Engine {
    shards: Box<[Cell]>,
    /// Coarse milliseconds since `epoch`, kept by a ticker (0: no ticker, read the clock).
    clock: std::sync::atomic::AtomicU32,
    invalidations: AtomicU64,
    /// Counter keys whose old owner's value has been moved in the rebalance under way
    /// (see `rebalance`); logged with each move, cleared when the rebalance ends.
    moved: Mutex<std::collections::HashSet<Bytes>>,
    last_flush_ms: AtomicU64,
    epoch_unix_ms: u64,
    patterns: Vec<(Vec<u8>, CounterMode)>,
    ttl_ms: u64,
    epoch: Instant,
    memory_mode: bool,
    router: Arc<Router>,
    lanes: Mutex<HashMap<String, Arc<Lane>>>,
    /// Keys with an unflushed delta; past `max_pending_keys` a flush starts early.
    dirty_keys: AtomicUsize,
    max_pending_keys: usize,
    flush_batch_keys: usize,
    early_flush: tokio::sync::Notify,
    early_flush_armed: AtomicBool,
    pub wal: Option<Arc<wal::Wal>>,
    /// Next batch sequence number; monotonic across restarts (see `wal`).
    next_seq: AtomicU64,
    pub proxy_id: String,
    pub stats: CounterStats,
    /// Which keys count into time buckets, and for how long buckets are kept.
    windows: windows::Windows,
    /// The wall clock window buckets are stamped with.
    clock_wall: crate::clock::Clock,
    /// No window delta of an increment stamped before this second is in the proxy: every
    /// one older has landed (raised by each flush that landed everything).
    window_floor: AtomicU64,
    /// Whether window deltas of single granularities (moved by a rebalance) may exist.
    moved_windows: AtomicBool,
    /// The busiest pages, from a sample of the increments (see `activity`).
    pub activity: crate::activity::Activity,
}

/// The map shard of an entry; a window delta lives with its counter key, so that one lock
/// covers an increment and its window delta.
pub fn shard_of(key: &[u8]) -> usize {
    // Any well-mixed hash will do (it only spreads keys over the locks): ahash with fixed
    // seeds costs a few nanoseconds, where the ring's crc32 + fmix32 cost several times that.
    static STATE: std::sync::OnceLock<ahash::RandomState> = std::sync::OnceLock::new();
    let state =
        STATE.get_or_init(|| ahash::RandomState::with_seeds(0x7a11, 0x9e37, 0x79b9, 0x7f4a));
    let key = windows::placement_key(key);
    (state.hash_one(key) >> 32) as usize % SHARDS
}

impl Engine {
    pub fn new(
        cfg: &CountersConfig,
        windows: windows::Windows,
        clock: crate::clock::Clock,
        router: Arc<Router>,
        proxy_id: String,
        first_seq: u64,
    ) -> Arc<Engine> {
        let memory_mode = router.topology().is_empty();
        let state = ahash::RandomState::new();
        let engine = Arc::new(Engine {
            shards: (0..SHARDS)
                .map(|_| Cell {
                    lock: Mutex::new(Shard {
                        map: HashMap::with_hasher(state.clone()),
                        log: Vec::new(),
                        increments: 0,
                        unflushed: 0,
                    }),
                    has_log: AtomicBool::new(false),
                })
                .collect(),
            clock: std::sync::atomic::AtomicU32::new(0),
            invalidations: AtomicU64::new(0),
            moved: Mutex::new(std::collections::HashSet::new()),
            last_flush_ms: AtomicU64::new(0),
            epoch_unix_ms: unix_ms(),
            patterns: cfg
                .patterns
                .iter()
                .map(|p| (p.pattern.as_bytes().to_vec(), p.mode))
                .collect(),
            ttl_ms: cfg.cache_ttl.0.as_millis() as u64,
            epoch: Instant::now(),
            memory_mode,
            router: router.clone(),
            lanes: Mutex::new(HashMap::new()),
            dirty_keys: AtomicUsize::new(0),
            max_pending_keys: cfg.max_pending_keys,
            flush_batch_keys: cfg.flush_batch_keys,
            early_flush: tokio::sync::Notify::new(),
            early_flush_armed: AtomicBool::new(true),
            wal: None,
            next_seq: AtomicU64::new(first_seq.max(now_micros())),
            proxy_id,
            stats: CounterStats::default(),
            windows,
            window_floor: AtomicU64::new(clock.now_secs()),
            clock_wall: clock,
            // In memory mode every window entry is per bucket (see `incr`).
            moved_windows: AtomicBool::new(memory_mode),
            activity: Default::default(),
        });
        engine
    }

    pub fn is_memory_mode(&self) -> bool {
        self.memory_mode
    }

    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// The counter mode of `key`, or None when it is a plain key.
    pub fn mode_of(&self, key: &[u8]) -> Option<CounterMode> {
        self.patterns
            .iter()
            .find(|(p, _)| glob::matches(p, key))
            .map(|(_, m)| *m)
    }

    /// Whether increments of `key` also count into time buckets.
    pub fn is_windowed(&self, key: &[u8]) -> bool {
        self.windows.matches(key) && self.is_batched(key)
    }

    pub fn windows(&self) -> &windows::Windows {
        &self.windows
    }

    pub fn wall_clock(&self) -> &crate::clock::Clock {
        &self.clock_wall
    }

    /// Whether the engine answers INCR/GET for `key` (a batched counter key).
    pub fn is_batched(&self, key: &[u8]) -> bool {
        self.memory_mode || self.mode_of(key) == Some(CounterMode::Batched)
    }

    fn now_ms(&self) -> u32 {
        match self.clock.load(Ordering::Relaxed) {
            0 => self.read_clock(),
            t => t,
        }
    }

    /// Keeps the coarse clock (every 2 ms): one clock read per tick instead of per request.
    pub fn tick_clock(&self) {
        self.clock.store(self.read_clock(), Ordering::Relaxed);
    }

    fn read_clock(&self) -> u32 {
        // Never 0 (0 means "no ticker" in `clock`). Wraps after about 49 days; a base read
        // just before a wrap then looks stale, never fresh for ever.
        (self.epoch.elapsed().as_millis() as u64 % (u32::MAX as u64 - 1) + 1) as u32
    }

    fn is_fresh(&self, e: &Entry, now: u32) -> bool {
        if self.memory_mode {
            return true;
        }
        e.state != BaseState::Unknown && (now.wrapping_sub(e.base_at) as u64) < self.ttl_ms
    }

    /// Whether a fresh entry's base is past half its TTL and no read-ahead is queued yet;
    /// marks it queued. A key in use is then re-read in the background before it goes stale,
    /// so its reads and increments never wait for the shard.
    fn wants_refresh(&self, e: &mut Entry, now: u32) -> bool {
        if self.memory_mode
            || e.refreshing
            || !matches!(e.state, BaseState::Int | BaseState::Absent)
            || (now.wrapping_sub(e.base_at) as u64) < self.ttl_ms / 2
        {
            return false;
        }
        e.refreshing = true;
        true
    }

    /// Queues a read of `key`'s base on its lane without waiting for it: the reply settles
    /// the base (and clears `refreshing`) like any read. A lost reply leaves the entry to go
    /// stale, and the next use reads it the usual way.
    fn refresh_ahead(&self, key: &[u8]) {
        self.stats.refreshes.fetch_add(1, Ordering::Relaxed);
        drop(self.read_now(&Bytes::copy_from_slice(key), false));
    }

    fn lock(&self, key: &[u8]) -> parking_lot::MutexGuard<'_, Shard> {
        self.shards[shard_of(key)].lock.lock()
    }

    /// INCRBY `delta` if the base is fresh; see [`Incr`].
    pub fn try_incr(&self, key: &[u8], delta: i64) -> Incr {
        self.incr(key, delta, Base::Fresh)
    }

    /// INCRBY on a key whose owner is down: a known base is used however old it is.
    pub fn try_incr_stale(&self, key: &[u8], delta: i64) -> Incr {
        self.incr(key, delta, Base::AnyKnown)
    }

    /// An increment accepted with no known base (its owner is down): buffered and logged,
    /// the total unknown until the shard returns. Refused once the buffer is full.
    pub fn incr_blind(&self, key: &[u8], delta: i64) -> Incr {
        self.incr(key, delta, Base::NotNeeded)
    }

    fn incr(&self, key: &[u8], delta: i64, need: Base) -> Incr {
        if self.log_failed() {
            return Incr::Refused(LOG_FAILED);
        }
        let window_at = self.is_windowed(key).then(|| self.clock_wall.now_secs());
        let now = self.now_ms();
        let cell = &self.shards[shard_of(key)];
        let mut guard = cell.lock.lock();
        let shard = &mut *guard;
        // One lookup on the hot path; the key is copied only when it is new.
        let e = match shard.map.get_mut(key) {
            Some(e) => e,
            None => {
                match need {
                    _ if self.memory_mode => {}
                    Base::NotNeeded
                        if self.dirty_keys.load(Ordering::Relaxed) < self.max_pending_keys => {}
                    Base::NotNeeded => return Incr::Refused(BUFFER_FULL),
                    _ => return Incr::NeedBase,
                }
                let state = if self.memory_mode {
                    BaseState::Absent
                } else {
                    BaseState::Unknown
                };
                shard.map.entry(key.into()).or_insert(Entry {
                    state,
                    ..Entry::NEW
                })
            }
        };
        let known = !matches!(e.state, BaseState::Unknown);
        let usable = match need {
            Base::Fresh => self.is_fresh(e, now),
            Base::AnyKnown => known,
            Base::NotNeeded => true,
        };
        if !usable {
            return Incr::NeedBase;
        }
        let refresh = matches!(need, Base::Fresh) && self.wants_refresh(e, now);
        match e.state {
            BaseState::NotInt => return Incr::Refused(NOT_INTEGER),
            BaseState::WrongType => return Incr::Refused(WRONGTYPE),
            _ => {}
        }
        let Some(new) = e.value().and_then(|v| v.checked_add(delta)) else {
            return Incr::Refused(OVERFLOW);
        };
        let Some(pending) = e.pending.checked_add(delta) else {
            return Incr::Refused(OVERFLOW);
        };
        e.pending = pending;
        if e.flags & DIRTY == 0 {
            e.flags |= DIRTY;
            self.note_dirty();
        }
        if self.wal.is_some() {
            wal::encode_incr(&mut shard.log, key, delta);
            cell.has_log.store(true, Ordering::SeqCst);
        }
        if let Some(t) = window_at {
            // Same map shard, same lock, same log buffer: the increment and its window
            // delta reach the log in one write, or neither does.
            if self.memory_mode {
                // No shard to expand a window delta into buckets: the buckets are entries
                // here, one per kept granularity; `sweep_windows` drops them past retention.
                for g in (0..windows::GRANULARITIES).filter(|&g| self.windows.kept(g)) {
                    let bucket = t - t % windows::SIZE[g];
                    self.add_window_delta(shard, windows::LETTER[g], bucket, key, delta);
                }
            } else {
                self.add_window_delta(shard, windows::ALL, t, key, delta);
            }
        }
        shard.increments += 1;
        shard.unflushed = shard.unflushed.wrapping_add(delta);
        let sampled = crate::activity::sampled(shard.increments);
        drop(guard);
        if sampled {
            self.activity.offer(key, delta);
        }
        if refresh {
            self.refresh_ahead(key);
        }
        if known {
            Incr::Value(new)
        } else {
            Incr::Pending
        }
    }

    /// Adds `delta` to the window delta `g`/`t` of `key` in `shard` (its map shard, locked),
    /// logged. The entry's key is built on the stack: no allocation unless it is new.
    fn add_window_delta(&self, shard: &mut Shard, g: u8, t: u64, key: &[u8], delta: i64) {
        let mut stack = [0u8; 96];
        let heap;
        let wk = match windows::pending_key_in(&mut stack, g, t, key) {
            Some(k) => k,
            None => {
                heap = windows::pending_key(g, t, key);
                &heap[..]
            }
        };
        if self.wal.is_some() {
            wal::encode_incr(&mut shard.log, wk, delta);
        }
        if shard.add_pending(wk, delta) {
            self.note_dirty();
        }
    }

    fn note_dirty(&self) {
        let n = self.dirty_keys.fetch_add(1, Ordering::Relaxed) + 1;
        if n > self.max_pending_keys
            && !self.memory_mode
            && self.early_flush_armed.swap(false, Ordering::Relaxed)
        {
            self.early_flush.notify_one();
        }
    }

    /// A cache read for GET.
    pub fn cached(&self, key: &[u8]) -> Cached {
        let now = self.now_ms();
        let mut shard = self.lock(key);
        let mut refresh = false;
        let r = match shard.map.get_mut(key) {
            None if self.memory_mode => Cached::Hit(None),
            None => Cached::Absent,
            Some(e)
                if self.is_fresh(e, now)
                    && matches!(e.state, BaseState::Int | BaseState::Absent) =>
            {
                refresh = self.wants_refresh(e, now);
                Cached::Hit(if e.exists() { e.value() } else { None })
            }
            Some(_) => Cached::Stale,
        };
        drop(shard);
        if refresh {
            self.refresh_ahead(key);
        }
        let counter = if matches!(r, Cached::Hit(_)) {
            &self.stats.cache_hits
        } else {
            &self.stats.cache_misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        r
    }

    /// Whether `key` has a delta not yet confirmed by its shard.
    pub fn has_unflushed(&self, key: &[u8]) -> bool {
        self.lock(key).map.get(key).is_some_and(|e| e.flags != 0)
    }

    /// Forgets the cached base of `key` (its deltas stay): the next read asks the shard.
    /// Called around any other command that may change the key in Redis.
    pub fn invalidate(&self, key: &[u8]) {
        if self.memory_mode {
            return;
        }
        self.invalidations.fetch_add(1, Ordering::SeqCst);
        let mut shard = self.lock(key);
        if let Some(e) = shard.map.get_mut(key) {
            if e.flags == 0 {
                shard.map.remove(key);
            } else {
                e.state = BaseState::Unknown;
            }
        }
    }

    /// Caches a value read by a plain GET, if nothing else created the entry meanwhile.
    /// Bumped by every invalidation: a plain read started before a write to some counter
    /// key may have been overtaken by it, and is then not cached.
    pub fn invalidation_epoch(&self) -> u64 {
        self.invalidations.load(Ordering::SeqCst)
    }

    pub fn offer_read(
        &self,
        key: &[u8],
        value: &redis_protocol::resp2::types::BytesFrame,
        epoch: u64,
    ) {
        if self.invalidation_epoch() != epoch || self.needs_move(key) {
            return;
        }
        use redis_protocol::resp2::types::BytesFrame as F;
        let state = match value {
            F::Null => (BaseState::Absent, 0),
            F::BulkString(b) => match parse_i64(b) {
                Some(v) => (BaseState::Int, v),
                None => return,
            },
            _ => return,
        };
        let now = self.now_ms();
        let mut shard = self.lock(key);
        shard.map.entry(key.into()).or_insert(Entry {
            base: state.1,
            base_at: now,
            state: state.0,
            ..Entry::NEW
        });
    }

    /// Reads `key` through its lane; with `land`, its pending delta lands in the same round
    /// trip. Concurrent requests for one key share a round trip.
    pub async fn refresh(&self, key: &Bytes, land: bool) -> Result<KeyValue, LaneError> {
        let topo = self.router.topology();
        if topo.is_empty() {
            return Ok(KeyValue::Nil);
        }
        if let Some(m) = self.router.migration() {
            crate::rebalance::ensure_moved(self, &m, key).await?;
        }
        let shard = topo.shard_for(key);
        let lane = self.lane(&shard.name).ok_or(LaneError::Unavailable)?;
        lane.request(key.clone(), land).await
    }

    /// Adds `value`, moved off the key's old owner by rebalance `id`, to its pending delta,
    /// logged in the same step (replay restores both the delta and the fact of the move).
    pub fn apply_moved(&self, id: u64, key: &[u8], value: i64) {
        let cell = &self.shards[shard_of(key)];
        let mut guard = cell.lock.lock();
        let shard = &mut *guard;
        if shard.add_pending(key, value) {
            self.note_dirty();
        }
        shard.unflushed = shard.unflushed.wrapping_add(value);
        if self.wal.is_some() {
            wal::encode_moved(&mut shard.log, id, key, value);
            cell.has_log.store(true, Ordering::SeqCst);
        }
        self.moved.lock().insert(Bytes::copy_from_slice(key));
    }

    /// Adds the counts of bucket hash `bk` (granularity `g` of `key`), moved off its old
    /// owner by rebalance `id`, to window deltas, logged in the same step with a record that
    /// the hash has moved.
    pub fn apply_moved_bucket(
        &self,
        id: u64,
        key: &[u8],
        g: usize,
        bk: &[u8],
        fields: &[(u64, i64)],
    ) {
        let cell = &self.shards[shard_of(key)];
        let mut guard = cell.lock.lock();
        let shard = &mut *guard;
        for &(t, v) in fields {
            let pk = windows::pending_key(windows::LETTER[g], t, key);
            if self.wal.is_some() {
                wal::encode_moved(&mut shard.log, id, &pk, v);
            }
            if shard.add_pending(&pk, v) {
                self.note_dirty();
            }
        }
        if self.wal.is_some() {
            wal::encode_marked(&mut shard.log, id, bk);
            cell.has_log.store(true, Ordering::SeqCst);
        }
        self.moved_windows.store(true, Ordering::Relaxed);
        self.moved.lock().insert(Bytes::copy_from_slice(bk));
    }

    /// Marks a key as moved without a value (its old owner had nothing for it).
    pub fn mark_moved(&self, key: &[u8]) {
        self.moved.lock().insert(Bytes::copy_from_slice(key));
    }

    pub fn is_moved(&self, key: &[u8]) -> bool {
        self.moved.lock().contains(key)
    }

    pub fn moved_count(&self) -> usize {
        self.moved.lock().len()
    }

    pub fn set_moved(&self, keys: std::collections::HashSet<Bytes>) {
        *self.moved.lock() = keys;
    }

    /// Whether `key`'s value may still be partly on its old owner (a rebalance is under
    /// way, its owner changed, and it has not been moved yet).
    pub fn needs_move(&self, key: &[u8]) -> bool {
        self.router
            .with_migration(|m| m.owner_changed(key) && !self.is_moved(key))
            .unwrap_or(false)
    }

    /// Forgets every cached base (deltas stay): after a ring change, bases read from old
    /// owners no longer describe the new owner.
    pub fn invalidate_all_bases(&self) {
        self.invalidations.fetch_add(1, Ordering::SeqCst);
        for c in self.shards.iter() {
            let mut s = c.lock.lock();
            s.map.retain(|_, e| e.flags != 0);
            for e in s.map.values_mut() {
                e.state = BaseState::Unknown;
            }
        }
    }

    /// Queues a read of `key` on its lane now (see [`Lane::enqueue`]); None in memory mode.
    pub fn read_now(
        &self,
        key: &Bytes,
        land: bool,
    ) -> Option<tokio::sync::oneshot::Receiver<Result<KeyValue, LaneError>>> {
        let topo = self.router.topology();
        // A key still partly on its old owner must be moved first: the async path does.
        if topo.is_empty() || self.needs_move(key) {
            return None;
        }
        Some(
            self.lane(&topo.shard_for(key).name)?
                .enqueue(key.clone(), land),
        )
    }

    /// Lands `key`'s unflushed delta on its shard (before another command runs on it).
    pub async fn land(&self, key: &Bytes) -> Result<(), LaneError> {
        if self.memory_mode || !self.has_unflushed(key) {
            return Ok(());
        }
        if self.log_failed() {
            return Err(LaneError::LogFailed);
        }
        self.refresh(key, true).await.map(|_| ())
    }

    /// Whether the write-ahead log is failed: increments are refused and nothing lands.
    pub fn log_failed(&self) -> bool {
        self.wal.as_ref().is_some_and(|w| w.failed())
    }

    /// Whether a read of `key` should land its pending delta on the way: when it has one
    /// and the log can record the batch (otherwise the read is served read-only).
    pub fn read_lands(&self, key: &[u8]) -> bool {
        self.has_unflushed(key) && !self.log_failed()
    }

    /// Current value for HTTP and GET after a refresh: (exists, value).
    pub fn value_of(&self, key: &[u8]) -> Option<Option<i64>> {
        let shard = self.lock(key);
        let e = shard.map.get(key)?;
        match e.state {
            BaseState::NotInt | BaseState::WrongType => None,
            _ => Some(if e.exists() { e.value() } else { None }),
        }
    }

    /// The value from a known base however old, for reads while the owner is down:
    /// (value, whether the base is older than the TTL). None: no base is known.
    pub fn last_known(&self, key: &[u8]) -> Option<(Option<i64>, bool)> {
        let now = self.now_ms();
        let shard = self.lock(key);
        let e = shard.map.get(key)?;
        match e.state {
            BaseState::Int | BaseState::Absent => Some((
                if e.exists() { e.value() } else { None },
                !self.is_fresh(e, now),
            )),
            _ => None,
        }
    }

    /// Whether the shard that owns `key` passes its health checks (memory mode: yes).
    pub fn owner_up(&self, key: &[u8]) -> bool {
        let topo = self.router.topology();
        topo.is_empty() || topo.shard_for(key).is_up()
    }

    /// The name reported as `served_via` for a read that went to `key`'s owner.
    pub fn owner_name(&self, key: &[u8]) -> String {
        let topo = self.router.topology();
        if topo.is_empty() {
            "in_memory".into()
        } else {
            topo.shard_for(key).name.clone()
        }
    }

    pub fn lane(&self, shard: &str) -> Option<Arc<Lane>> {
        self.lanes.lock().get(shard).cloned()
    }

    pub fn add_lane(&self, lane: Arc<Lane>) {
        self.lanes.lock().insert(lane.shard.name.clone(), lane);
    }

    /// Drops a removed shard's lane (after a rebalance moved its keys away).
    pub fn remove_lane(&self, shard: &str) {
        self.lanes.lock().remove(shard);
    }

    pub fn lanes(&self) -> Vec<Arc<Lane>> {
        self.lanes.lock().values().cloned().collect()
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    pub fn dirty_keys(&self) -> usize {
        self.dirty_keys.load(Ordering::Relaxed)
    }

    pub fn flush_batch_keys(&self) -> usize {
        self.flush_batch_keys
    }

    /// Moves the pending deltas of `keys` (all dirty keys owned by `shard_index` when
    /// `keys` is None) to in-flight, and returns them. Called by a lane building a batch.
    pub(crate) fn take(
        &self,
        owner: Option<(&crate::router::Topology, usize)>,
        keys: Option<&[Bytes]>,
        limit: usize,
    ) -> Vec<(Bytes, i64)> {
        let mut out = Vec::new();
        let mut taken = 0usize;
        let mut take_entry = |key: &[u8], e: &mut Entry, out: &mut Vec<(Bytes, i64)>| {
            if e.flags & DIRTY == 0 {
                return;
            }
            out.push((Bytes::copy_from_slice(key), e.pending));
            e.inflight += e.pending;
            e.pending = 0;
            e.flags = (e.flags & !DIRTY) | INFLIGHT;
            taken += 1;
        };
        match keys {
            Some(keys) => {
                for k in keys {
                    let mut shard = self.lock(k);
                    if let Some(e) = shard.map.get_mut(&k[..]) {
                        take_entry(k, e, &mut out);
                    }
                }
            }
            None => {
                let (topo, idx) = owner.expect("an owner for a full take");
                for s in self.shards.iter() {
                    if out.len() >= limit {
                        break;
                    }
                    let mut shard = s.lock.lock();
                    for (k, e) in shard.map.iter_mut() {
                        if out.len() >= limit {
                            break;
                        }
                        if e.flags & DIRTY != 0
                            && topo.shard_index(windows::placement_key(k)) == idx
                        {
                            take_entry(k, e, &mut out);
                        }
                    }
                }
            }
        }
        self.dirty_keys.fetch_sub(taken, Ordering::Relaxed);
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
        let now = if self.invalidation_epoch() == epoch {
            self.now_ms()
        } else {
            self.now_ms()
                .wrapping_sub(self.ttl_ms as u32)
                .wrapping_sub(1)
        };
        let mut shard = self.lock(key);
        if windows::parse_pending(key).is_some() {
            // A window delta has no value of its own: once landed, it is gone.
            if let (Some(d), Some(e)) = (delta, shard.map.get_mut(key)) {
                e.inflight -= d;
                if e.inflight == 0 {
                    e.flags &= !INFLIGHT;
                }
                if e.flags == 0 {
                    shard.map.remove(key);
                }
            }
            return;
        }
        let shard = &mut *shard;
        if let Some(d) = delta {
            shard.unflushed = shard.unflushed.wrapping_sub(d);
        }
        let e = shard.map.entry(key.into()).or_insert(Entry::NEW);
        e.refreshing = false;
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
            let mut shard = self.lock(k);
            if let Some(e) = shard.map.get_mut(&k[..]) {
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
        let _gate = match &self.wal {
            Some(w) => Some(w.lane_gate.read().await),
            None => None,
        };
        if self.wal.is_some() {
            for (k, d) in items {
                let Some(d) = d else { continue };
                let cell = &self.shards[shard_of(k)];
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

    /// Forgets entries that are clean and stale, bounding the cache to what was used
    /// within one TTL. Returns how many remain.
    pub fn sweep(&self) -> usize {
        if self.memory_mode {
            return self.len();
        }
        let now = self.now_ms();
        let mut left = 0;
        for s in self.shards.iter() {
            let mut shard = s.lock.lock();
            shard
                .map
                .retain(|_, e| e.flags != 0 || self.is_fresh(e, now));
            left += shard.map.len();
        }
        left
    }

    /// Increments received since start (RESP and HTTP).
    pub fn increments(&self) -> u64 {
        self.shards.iter().map(|c| c.lock.lock().increments).sum()
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock.lock().map.len()).sum()
    }

    /// Counter keys held, window entries left out (DBSIZE in memory mode): a walk.
    pub fn key_count(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let shard = s.lock.lock();
                shard
                    .map
                    .keys()
                    .filter(|k| windows::parse_pending(k).is_none())
                    .count()
            })
            .sum()
    }

    /// Memory mode: drops the bucket entries no longer kept (logged as their inverse, so a
    /// replay does not bring them back). Returns how many went.
    pub fn sweep_windows(&self) -> usize {
        let now = self.clock_wall.now_secs();
        let mut gone = 0;
        for cell in self.shards.iter() {
            let mut guard = cell.lock.lock();
            let shard = &mut *guard;
            let expired: Vec<key::Key> = shard
                .map
                .keys()
                .filter(|k| match windows::parse_pending(k) {
                    Some((letter, t, _)) => windows::LETTER
                        .iter()
                        .position(|&l| l == letter)
                        .is_some_and(|g| !self.windows.retained(g, t, now)),
                    None => false,
                })
                .cloned()
                .collect();
            for k in expired {
                if let Some(e) = shard.map.remove(&k[..]) {
                    if self.wal.is_some() {
                        wal::encode_incr(&mut shard.log, &k, e.pending.wrapping_neg());
                        cell.has_log.store(true, Ordering::SeqCst);
                    }
                    gone += 1;
                }
            }
        }
        gone
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys (and window deltas) with a delta not yet taken by a flush, and the sum of the
    /// counters' unflushed deltas, for INFO and /metrics: 32 locks, no walk over the keys.
    pub fn pending_total(&self) -> (usize, i64) {
        let sum = self
            .shards
            .iter()
            .fold(0i64, |acc, s| acc.wrapping_add(s.lock.lock().unflushed));
        (self.dirty_keys(), sum)
    }

    /// Every key and value, for memory mode's log checkpoints and tests.
    pub fn snapshot(&self) -> Vec<(Bytes, i64)> {
        let mut out = Vec::new();
        for s in self.shards.iter() {
            for (k, e) in s.lock.lock().map.iter() {
                if let Some(v) = e.value() {
                    out.push((Bytes::copy_from_slice(k), v));
                }
            }
        }
        out
    }

    /// Lowers the window floor for a window delta restored from the log.
    fn note_window(&self, key: &[u8]) {
        if let Some((g, t, _)) = windows::parse_pending(key) {
            if g == windows::ALL {
                self.window_floor.fetch_min(t, Ordering::Relaxed);
            } else {
                self.moved_windows.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Restores a delta from the log at start-up (before any client connects).
    pub fn restore_pending(&self, key: &[u8], delta: i64) {
        if delta == 0 && windows::parse_pending(key).is_some() {
            // A window entry whose records cancel out (swept past retention).
            return;
        }
        self.note_window(key);
        let mut shard = self.lock(key);
        if windows::parse_pending(key).is_none() {
            shard.unflushed = shard.unflushed.wrapping_add(delta);
        }
        let e = shard.map.entry(key.into()).or_insert(Entry {
            state: if self.memory_mode {
                BaseState::Absent
            } else {
                BaseState::Unknown
            },
            ..Entry::NEW
        });
        e.pending = e.pending.saturating_add(delta);
        if e.flags & DIRTY == 0 {
            e.flags |= DIRTY;
            self.dirty_keys.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits until an early flush is due (the buffer passed `max_pending_keys`).
    pub async fn early_flush_due(&self) {
        self.early_flush.notified().await
    }

    /// Starts a flush on every lane and waits until each has landed what it took (or
    /// gave up for now: a down shard keeps its deltas pending).
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

    pub async fn flush_all(&self) -> bool {
        let started = unix_ms();
        let started_wall = self.clock_wall.now_secs();
        let lanes = self.lanes();
        let waits: Vec<_> = lanes.iter().map(|l| l.flush()).collect();
        let mut ok = true;
        for w in waits {
            ok &= w.await;
        }
        // Only a flush that landed everything bounds the age of what is pending.
        if ok {
            self.last_flush_ms.store(started, Ordering::Relaxed);
            // Every window delta stamped before the flush started has landed.
            self.window_floor.fetch_max(started_wall, Ordering::Relaxed);
        }
        ok
    }

    /// The window deltas of `key` still in the proxy (pending or in flight) that fall in
    /// [lo, hi): per second (increments), and per bucket of `buckets` (moved by a
    /// rebalance). Called by the key's lane between round trips, so none of them is on its
    /// way to the shard meanwhile.
    pub(crate) fn window_deltas(
        &self,
        key: &[u8],
        lo: u64,
        hi: u64,
        buckets: &[(usize, u64)],
    ) -> windows::Deltas {
        let now = self.clock_wall.now_secs();
        let lo = lo.max(self.window_floor.load(Ordering::Relaxed));
        let hi = hi.min(now.saturating_add(2));
        let moved = self.moved_windows.load(Ordering::Relaxed);
        let shard = self.lock(key);
        let mut seconds = Vec::new();
        let value = |e: &Entry| e.pending.wrapping_add(e.inflight);
        if lo < hi {
            let probes = hi - lo;
            if probes as usize <= shard.map.len() {
                let mut k = windows::pending_key(windows::ALL, lo, key);
                for t in lo..hi {
                    k[9..17].copy_from_slice(&t.to_be_bytes());
                    if let Some(e) = shard.map.get(&k[..]) {
                        seconds.push((t, value(e)));
                    }
                }
            } else {
                // Fewer entries than seconds to probe (a long outage): walk the entries.
                for (k, e) in shard.map.iter() {
                    if let Some((windows::ALL, t, of)) = windows::parse_pending(k) {
                        if of == key && (lo..hi).contains(&t) {
                            seconds.push((t, value(e)));
                        }
                    }
                }
                seconds.sort_unstable();
            }
        }
        let mut per_bucket = HashMap::new();
        if moved {
            for &(g, t) in buckets {
                let k = windows::pending_key(windows::LETTER[g], t, key);
                if let Some(e) = shard.map.get(&k[..]) {
                    per_bucket.insert((g, t), value(e));
                }
            }
        }
        (seconds, per_bucket)
    }

    pub fn set_wal(self: &mut Arc<Self>, wal: Arc<wal::Wal>) {
        Arc::get_mut(self)
            .expect("the log is attached before the engine is shared")
            .wal = Some(wal.clone());
        wal.attach(self);
    }

    /// Moves every buffered log record into `out` (a log commit).
    pub(crate) fn drain_logs(&self, out: &mut Vec<u8>) {
        for cell in self.shards.iter() {
            if cell.has_log.load(Ordering::SeqCst) {
                let mut s = cell.lock.lock();
                out.append(&mut s.log);
                cell.has_log.store(false, Ordering::SeqCst);
            }
        }
    }

    /// A consistent cut for a log checkpoint: with every map shard locked at once, drains
    /// the buffered records (they belong before the cut) and computes, per key, the deltas
    /// not covered by a logged unapplied batch.
    pub(crate) fn cut(
        &self,
        unapplied: &wal::Unapplied,
    ) -> (Vec<u8>, Vec<(Bytes, i64)>, std::collections::HashSet<Bytes>) {
        let mut guards: Vec<_> = self.shards.iter().map(|c| c.lock.lock()).collect();
        let mut tail = Vec::new();
        let mut covered: HashMap<&[u8], i64> = HashMap::new();
        for (_, items) in unapplied.values() {
            for (k, d) in items {
                *covered.entry(&k[..]).or_insert(0) += d;
            }
        }
        let mut pending = Vec::new();
        for (g, cell) in guards.iter_mut().zip(self.shards.iter()) {
            tail.append(&mut g.log);
            cell.has_log.store(false, Ordering::SeqCst);
            for (k, e) in g.map.iter() {
                if e.flags == 0 {
                    continue;
                }
                let p = e
                    .pending
                    .wrapping_add(e.inflight)
                    .wrapping_sub(covered.get(&k[..]).copied().unwrap_or(0));
                if p != 0 {
                    pending.push((Bytes::copy_from_slice(k), p));
                }
            }
        }
        let moved = self.moved.lock().clone();
        (tail, pending, moved)
    }

    pub(crate) fn peek_seq(&self) -> u64 {
        self.next_seq.load(Ordering::Relaxed)
    }

    /// Marks replayed batch deltas as in flight (their batch is queued for re-sending).
    pub fn restore_inflight(&self, items: &[(Bytes, i64)]) {
        for (k, d) in items {
            self.note_window(k);
            let mut shard = self.lock(k);
            if windows::parse_pending(k).is_none() {
                shard.unflushed = shard.unflushed.wrapping_add(*d);
            }
            let e = shard.map.entry(k[..].into()).or_insert(Entry::NEW);
            e.inflight = e.inflight.wrapping_add(*d);
            e.flags |= INFLIGHT;
        }
    }

    pub fn ensure_seq_above(&self, seq: u64) {
        self.next_seq.fetch_max(seq + 1, Ordering::Relaxed);
    }
}

fn unix_ms() -> u64 {
    now_micros() / 1000
}

pub fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Parses an integer exactly as Redis's string2ll accepts it (no spaces, no `+`, no
/// leading zeros).
pub fn parse_i64(b: &[u8]) -> Option<i64> {
    if b.is_empty() || b.len() > 20 {
        return None;
    }
    let (neg, digits) = match b[0] {
        b'-' => (true, &b[1..]),
        _ => (false, b),
    };
    if digits.is_empty() || (digits[0] == b'0' && (digits.len() > 1 || neg)) {
        return None;
    }
    let mut v: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = if neg {
            v.checked_mul(10)?.checked_sub((d - b'0') as i64)?
        } else {
            v.checked_mul(10)?.checked_add((d - b'0') as i64)?
        };
    }
    Some(v)
}

/// Spawns the background jobs: periodic and early flushes, and the cache sweep.
pub fn spawn_background(
    engine: Arc<Engine>,
    flush_interval: Duration,
    cache_ttl: Duration,
    mut shutdown: crate::shutdown::Shutdown,
) {
    let clock = Arc::downgrade(&engine);
    let mut clock_stop = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(2));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = clock_stop.wait() => return,
            }
            match clock.upgrade() {
                Some(e) => e.tick_clock(),
                None => return,
            }
        }
    });
    if engine.is_memory_mode() {
        if engine.windows().enabled() {
            tokio::spawn(async move {
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
    tokio::spawn(async move {
        let mut flush = tokio::time::interval(flush_interval);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        flush.tick().await;
        let mut sweep = tokio::time::interval(cache_ttl.max(Duration::from_millis(100)));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = flush.tick() => { engine.flush_all().await; }
                _ = engine.early_flush_due() => { engine.flush_all().await; }
                _ = sweep.tick() => { engine.sweep(); }
                _ = shutdown.wait() => return,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_parse_as_redis_does() {
        assert_eq!(parse_i64(b"0"), Some(0));
        assert_eq!(parse_i64(b"-12"), Some(-12));
        assert_eq!(parse_i64(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_i64(b"-9223372036854775808"), Some(i64::MIN));
        for bad in [
            &b""[..],
            b"01",
            b"-0",
            b"+1",
            b" 1",
            b"1 ",
            b"9223372036854775808",
            b"1.5",
            b"abc",
        ] {
            assert_eq!(parse_i64(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    fn memory_engine() -> Arc<Engine> {
        let router = Arc::new(Router::new(crate::router::Topology::new(0, vec![], 160)));
        Engine::new(
            &CountersConfig::default(),
            windows::Windows::from_config(&Default::default()),
            crate::clock::Clock::system(),
            router,
            "test".into(),
            1,
        )
    }

    #[test]
    fn memory_mode_window_buckets_go_once_past_retention() {
        let router = Arc::new(Router::new(crate::router::Topology::new(0, vec![], 160)));
        let t0 = 1_763_856_000;
        let clock = crate::clock::Clock::manual(t0 * 1000);
        let e = Engine::new(
            &CountersConfig::default(),
            windows::Windows::from_config(&Default::default()),
            clock.clone(),
            router,
            "test".into(),
            1,
        );
        assert_eq!(e.try_incr(b"visits:a", 2), Incr::Value(2));
        assert_eq!(e.try_incr(b"other", 1), Incr::Value(1));
        // visits:a, other, and one bucket per granularity of visits:a.
        assert_eq!((e.len(), e.key_count()), (6, 2));
        assert_eq!(e.sweep_windows(), 0);
        clock.advance(3600 + 1);
        assert_eq!(e.sweep_windows(), 1, "the second's bucket");
        clock.advance(8 * 86400);
        assert_eq!(e.sweep_windows(), 1, "the minute's bucket");
        assert_eq!((e.len(), e.key_count()), (4, 2));
        assert_eq!(e.cached(b"visits:a"), Cached::Hit(Some(2)));
    }

    #[test]
    fn memory_mode_counts_and_refuses_overflow() {
        let e = memory_engine();
        assert_eq!(e.cached(b"k"), Cached::Hit(None));
        assert_eq!(e.try_incr(b"k", 1), Incr::Value(1));
        assert_eq!(e.try_incr(b"k", 41), Incr::Value(42));
        assert_eq!(e.try_incr(b"k", -50), Incr::Value(-8));
        assert_eq!(e.cached(b"k"), Cached::Hit(Some(-8)));
        assert_eq!(e.try_incr(b"big", i64::MAX), Incr::Value(i64::MAX));
        assert_eq!(e.try_incr(b"big", 1), Incr::Refused(OVERFLOW));
        assert_eq!(e.cached(b"big"), Cached::Hit(Some(i64::MAX)));
    }

    #[test]
    fn an_increment_then_its_inverse_still_creates_the_key() {
        let e = memory_engine();
        assert_eq!(e.try_incr(b"z", 5), Incr::Value(5));
        assert_eq!(e.try_incr(b"z", -5), Incr::Value(0));
        assert_eq!(e.cached(b"z"), Cached::Hit(Some(0)));
    }

    #[test]
    fn the_engine_is_shared_across_threads_without_losing_counts() {
        let e = memory_engine();
        std::thread::scope(|s| {
            for t in 0..4 {
                let e = &e;
                s.spawn(move || {
                    for i in 0..10_000 {
                        let key = format!("k{}", (i + t) % 7);
                        assert!(matches!(e.try_incr(key.as_bytes(), 1), Incr::Value(_)));
                    }
                });
            }
        });
        let total: i64 = (0..7)
            .map(|i| match e.cached(format!("k{i}").as_bytes()) {
                Cached::Hit(Some(v)) => v,
                other => panic!("{other:?}"),
            })
            .sum();
        assert_eq!(total, 40_000);
    }
}
