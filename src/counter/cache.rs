//! The read cache: a key's base as its shard last answered, how fresh it is, read-ahead of
//! bases past half their TTL, reads through the lane (which land the key's pending delta on
//! the way when the log can record the batch), and the sweep of stale clean entries.
//!
//! Owns freshness and reads. Does not own increments (`incr`) or landing (`flush`).

use super::lane::{KeyValue, LaneError};
use super::stripe::{BaseState, Entry, REFRESHING};
use super::{parse_i64, Cached, Engine};
use bytes::Bytes;
use std::sync::atomic::Ordering;

impl Engine {
    pub(super) fn is_fresh(&self, e: &Entry, now: u32) -> bool {
        if self.memory_mode {
            return true;
        }
        e.state != BaseState::Unknown && (now.wrapping_sub(e.base_at) as u64) < self.ttl_ms
    }

    /// Whether a fresh entry's base is past half its TTL and no read-ahead is queued yet;
    /// marks it queued. A key in use is then re-read in the background before it goes stale,
    /// so its reads and increments never wait for the shard.
    pub(super) fn wants_refresh(&self, e: &mut Entry, now: u32) -> bool {
        if self.memory_mode
            || e.flags & REFRESHING != 0
            || !matches!(e.state, BaseState::Int | BaseState::Absent)
            || (now.wrapping_sub(e.base_at) as u64) < self.ttl_ms / 2
        {
            return false;
        }
        e.flags |= REFRESHING;
        true
    }

    /// Queues a read of `key`'s base on its lane without waiting for it: the reply settles
    /// the base (and clears `refreshing`) like any read. A lost reply leaves the entry to go
    /// stale, and the next use reads it the usual way.
    pub(super) fn refresh_ahead(&self, key: &[u8]) {
        self.stats.refreshes.fetch_add(1, Ordering::Relaxed);
        drop(self.read_now(&Bytes::copy_from_slice(key), false));
    }

    /// A cache read for GET: [`Engine::lookup`], counted in the cache statistics.
    pub fn cached(&self, key: &[u8]) -> Cached {
        let r = self.lookup(key);
        let hit = matches!(r, Cached::Hit(_));
        self.count_reads(u64::from(hit), u64::from(!hit));
        r
    }

    /// Adds to the cache statistics (INFO's `cache_hits` and `cache_misses`): a multi-key
    /// read counts each key it looked up once, in one addition per figure.
    pub fn count_reads(&self, hits: u64, misses: u64) {
        if hits > 0 {
            self.stats.cache_hits.fetch_add(hits, Ordering::Relaxed);
        }
        if misses > 0 {
            self.stats.cache_misses.fetch_add(misses, Ordering::Relaxed);
        }
    }

    /// A cache read that its caller counts (with [`Engine::count_reads`]): a hit is a fresh
    /// base (queueing its read-ahead past half the TTL), a miss anything else.
    pub fn lookup(&self, key: &[u8]) -> Cached {
        let now = self.now_ms();
        let mut stripe = self.lock(key);
        let mut refresh = false;
        let r = match stripe.map.get_mut(key) {
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
        drop(stripe);
        if refresh {
            self.refresh_ahead(key);
        }
        r
    }

    /// Whether `key` has a delta not yet confirmed by its shard.
    pub fn has_unflushed(&self, key: &[u8]) -> bool {
        self.lock(key).map.get(key).is_some_and(|e| e.unflushed())
    }

    /// Forgets the cached base of `key` (its deltas stay): the next read asks the shard.
    /// Called around any other command that may change the key in Redis.
    pub fn invalidate(&self, key: &[u8]) {
        if self.memory_mode {
            return;
        }
        self.invalidations.fetch_add(1, Ordering::SeqCst);
        let mut stripe = self.lock(key);
        if let Some(e) = stripe.map.get_mut(key) {
            if !e.unflushed() {
                stripe.map.remove(key);
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
        let mut stripe = self.lock(key);
        stripe.map.entry(key.into()).or_insert(Entry {
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
            self.ensure_moved(&m, key).await?;
        }
        let shard = topo.shard_for(key);
        let lane = self.lane(&shard.name).ok_or(LaneError::Unavailable)?;
        lane.request(key.clone(), land).await
    }

    /// Forgets every cached base (deltas stay): after a ring change, bases read from old
    /// owners no longer describe the new owner.
    pub fn invalidate_all_bases(&self) {
        self.invalidations.fetch_add(1, Ordering::SeqCst);
        for c in self.stripes.iter() {
            let mut s = c.lock.lock();
            s.map.retain(|_, e| e.unflushed());
            for e in s.map.values_mut() {
                e.state = BaseState::Unknown;
            }
        }
    }

    /// Queues a read of `key` on its lane now (see `Lane::enqueue`); None in memory mode.
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
        let stripe = self.lock(key);
        let e = stripe.map.get(key)?;
        match e.state {
            BaseState::NotInt | BaseState::WrongType => None,
            _ => Some(if e.exists() { e.value() } else { None }),
        }
    }

    /// The value from a known base however old, for reads while the owner is down:
    /// (value, whether the base is older than the TTL). None: no base is known.
    pub fn last_known(&self, key: &[u8]) -> Option<(Option<i64>, bool)> {
        let now = self.now_ms();
        let stripe = self.lock(key);
        let e = stripe.map.get(key)?;
        match e.state {
            BaseState::Int | BaseState::Absent => Some((
                if e.exists() { e.value() } else { None },
                !self.is_fresh(e, now),
            )),
            _ => None,
        }
    }

    /// Forgets entries that are clean and stale, bounding the cache to what was used
    /// within one TTL. Returns how many remain. A stripe at a time, letting other tasks run
    /// between two: in one go, a pass over ten million keys held the worker ~0.1 s every
    /// `cache_ttl`.
    pub async fn sweep(&self) -> usize {
        if self.memory_mode {
            return self.len();
        }
        let mut left = 0;
        for s in self.stripes.iter() {
            let now = self.now_ms();
            {
                let mut stripe = s.lock.lock();
                stripe
                    .map
                    .retain(|_, e| e.unflushed() || self.is_fresh(e, now));
                left += stripe.map.len();
            }
            tokio::task::yield_now().await;
        }
        left
    }
}
