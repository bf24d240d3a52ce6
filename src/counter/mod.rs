//! The counter engine: merged increments, the read cache, and their flush to the shards.
//!
//! Every counter key the proxy has seen recently has an entry in one of [`STRIPES`]
//! mutex-guarded maps (`stripe`: chosen by key hash, so connections on different cores
//! rarely meet).
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
//! (see [`windows`]) in the same stripe, under the same lock: window deltas are entries
//! like any other for the log, the flush and the replay (the current second's is held in
//! the key's own entry until something else looks: `window_now`). INFO's figures are running totals
//! kept per stripe, never a walk over the keys.
//!
//! With no shards (memory mode) the entries are the counters themselves and never expire;
//! window entries are the buckets, swept past retention.
//!
//! One idea per file: `stripe` (the entry table), `incr` (the hot increment), `cache` (bases,
//! freshness, reads), `flush` (taking, settling, the background jobs), `forget` (FLUSHDB and FLUSHALL),
//! `recovery` (the
//! engine's side of the log), `moving` (values moved by a rebalance), `window_deltas`, `window_now` (the current
//! second's window delta in the key's entry);
//! `lane` (the exactly-once round trips), `lane_between` (reads between a flush's batches),
//! `pace` (the periodic flush's schedule), `wal` (the log's file and format), `windows`
//! (bucket layout and queries).
//!
//! Owns counting and caching. Does not own the wire (`connection`, `http` call it) or
//! placement (`router`).

mod cache;
pub mod cluster_batch;
mod flush;
pub mod forget;
pub mod glob;
mod incr;
pub mod key;
pub mod lane;
mod lane_between;
#[cfg(test)]
mod lane_between_tests;
#[cfg(test)]
mod lane_tests;
mod moving;
mod outcome;
mod pace;
mod recovery;
mod slot_holds;
mod stripe;
pub mod wal;
mod window_deltas;
mod window_now;
pub mod window_store;
pub mod windows;

pub use flush::spawn_background;
pub use stripe::{stripe_of, STRIPES};
use stripe::{Cell, Stripe};

use crate::config::{CounterMode, CountersConfig};
use crate::router::Router;
use bytes::Bytes;
use lane::Lane;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub use outcome::{
    Counted, CounterRead, IncrError, Refusal, BUFFER_FULL, LOG_FAILED, NOT_INTEGER, OVERFLOW,
    WRONGTYPE,
};

/// Result of an immediate increment attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Incr {
    /// Buffered; the new value.
    Value(i64),
    /// The base is missing or stale: read it through the lane, then try again.
    NeedBase,
    /// Refused; nothing was buffered.
    Refused(Refusal),
    /// Buffered and logged, but the total is unknown (no base: the owner is down).
    Pending,
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
    /// Plain reads sent between two batches of a flush (`lane_between`).
    pub reads_between: AtomicU64,
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
    stripes: Box<[Cell]>,
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
    /// In cluster mode: which lane may write each slot now (see `slot_holds`).
    pub(crate) holds: Option<slot_holds::SlotHolds>,
    /// Keys with an unflushed delta; past `max_pending_keys` a flush starts early.
    dirty_keys: AtomicUsize,
    max_pending_keys: usize,
    flush_batch_keys: usize,
    early_flush: tokio::sync::Notify,
    early_flush_armed: AtomicBool,
    /// The write-ahead log: private to the engine (see `recovery` for what others may ask).
    wal: Option<Arc<wal::Wal>>,
    /// Next batch sequence number; monotonic across restarts (see `wal`).
    next_seq: AtomicU64,
    pub proxy_id: String,
    pub stats: CounterStats,
    /// Which keys count into time buckets, and for how long buckets are kept.
    windows: windows::Windows,
    /// The wall clock window buckets are stamped with.
    clock_wall: crate::clock::Clock,
    /// Its seconds as of the last clock tick (0: no ticker, or a test's manual clock).
    wall_secs: AtomicU64,
    /// No window delta of an increment stamped before this second is in the proxy: every
    /// one older has landed (raised by each flush that landed everything).
    window_floor: AtomicU64,
    /// Dirty keys a take has left behind because another lane held their cluster slot, ever
    /// (a whole flush during which this moved has not landed everything).
    left_held: AtomicU64,
    /// Whether window deltas of single granularities (moved by a rebalance) may exist.
    moved_windows: AtomicBool,
    /// The busiest pages, from a sample of the increments (see `activity`).
    pub activity: crate::activity::Activity,
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
            stripes: (0..STRIPES)
                .map(|_| Cell {
                    lock: Mutex::new(Stripe {
                        map: HashMap::with_hasher(state.clone()),
                        incrs: Vec::new(),
                        log: Vec::new(),
                        next_log_name: 1,
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
            holds: router
                .topology()
                .is_cluster()
                .then(slot_holds::SlotHolds::default),
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
            wall_secs: AtomicU64::new(0),
            left_held: AtomicU64::new(0),
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
        if !self.clock_wall.is_manual() {
            self.wall_secs
                .store(self.clock_wall.now_secs(), Ordering::Relaxed);
        }
    }

    /// The ticker has stopped: every reading goes to the clocks again.
    pub fn stop_clock(&self) {
        self.clock.store(0, Ordering::Relaxed);
        self.wall_secs.store(0, Ordering::Relaxed);
    }

    fn read_clock(&self) -> u32 {
        // Never 0 (0 means "no ticker" in `clock`). Wraps after about 49 days; a base read
        // just before a wrap then looks stale, never fresh for ever.
        (self.epoch.elapsed().as_millis() as u64 % (u32::MAX as u64 - 1) + 1) as u32
    }

    fn lock(&self, key: &[u8]) -> parking_lot::MutexGuard<'_, Stripe> {
        self.stripes[stripe_of(key)].lock.lock()
    }

    /// Whether the shard that owns `key` passes its health checks (memory mode: yes).
    pub fn owner_up(&self, key: &[u8]) -> bool {
        self.router.owner(key).is_none_or(|s| s.is_up())
    }

    /// The name reported as `served_via` for a read that went to `key`'s owner.
    pub fn owner_name(&self, key: &[u8]) -> String {
        match self.router.owner(key) {
            Some(s) => s.name.clone(),
            None => "in_memory".into(),
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

    /// A lane to replay a batch whose own lane is gone: in a cluster any lane will do,
    /// since each part of a batch goes where its slot is served when it is sent.
    pub fn any_lane(&self) -> Option<Arc<Lane>> {
        self.holds.as_ref()?;
        let lanes = self.lanes.lock();
        let mut names: Vec<&String> = lanes.keys().collect();
        names.sort();
        names.first().and_then(|n| lanes.get(*n).cloned())
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

    /// Increments received since start (RESP and HTTP).
    pub fn increments(&self) -> u64 {
        self.stripes.iter().map(|c| c.lock.lock().increments).sum()
    }

    pub fn len(&self) -> usize {
        self.stripes.iter().map(|s| s.lock.lock().map.len()).sum()
    }

    /// Counter keys held, window entries left out (DBSIZE in memory mode): a walk.
    pub fn key_count(&self) -> usize {
        self.stripes
            .iter()
            .map(|s| {
                let stripe = s.lock.lock();
                stripe
                    .map
                    .keys()
                    .filter(|k| windows::parse_pending(k).is_none())
                    .count()
            })
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys (and window deltas) with a delta not yet taken by a flush, and the sum of the
    /// counters' unflushed deltas, for INFO and /metrics: 32 locks, no walk over the keys.
    pub fn pending_total(&self) -> (usize, i64) {
        let sum = self
            .stripes
            .iter()
            .fold(0i64, |acc, s| acc.wrapping_add(s.lock.lock().unflushed));
        (self.dirty_keys(), sum)
    }

    /// Every key and value, for memory mode's log checkpoints and tests.
    pub fn snapshot(&self) -> Vec<(Bytes, i64)> {
        let mut out = Vec::new();
        for s in self.stripes.iter() {
            for (k, e) in s.lock.lock().map.iter() {
                if let Some(v) = e.value() {
                    out.push((Bytes::copy_from_slice(k), v));
                }
            }
        }
        out
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
        assert_eq!(e.try_incr(b"big", 1), Incr::Refused(Refusal::Overflow));
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
