//! The stripe table: every entry of the engine lives in one of [`STRIPES`] mutex-guarded
//! maps, chosen by key hash (a window delta with its counter key), so that connections on
//! different cores rarely meet, and one lock covers an increment, its window delta and its
//! log record. ("Stripe", not "shard": a shard is a Redis server.)
//!
//! Owns the entry layout and the stripe of a key. Does not own what entries mean (the
//! engine's other files do).

use super::{key, windows};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;

/// Number of independently locked maps. A power of two comfortably above the core count.
pub const STRIPES: usize = 32;

/// What the shard held at the last read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum BaseState {
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

pub(super) const DIRTY: u8 = 1;
pub(super) const INFLIGHT: u8 = 2;
/// A read-ahead of the base is queued on the lane (see [`super::Engine::refresh_ahead`]).
pub(super) const REFRESHING: u8 = 4;
/// Whether increments of this key count into time windows, once asked: [`WINDOWED`],
/// [`NOT_WINDOWED`], or neither (not asked yet). The answer is fixed for the engine's life.
pub(super) const WINDOWED: u8 = 8;
pub(super) const NOT_WINDOWED: u8 = 16;

/// One counter key. Kept small: memory per pending key is a product figure.
#[derive(Debug, Clone, Copy)]
pub(super) struct Entry {
    pub(super) base: i64,
    pub(super) pending: i64,
    pub(super) inflight: i64,
    /// Milliseconds since the engine's epoch when `base` was read.
    pub(super) base_at: u32,
    pub(super) state: BaseState,
    /// [`DIRTY`], [`INFLIGHT`], [`REFRESHING`], [`WINDOWED`] or [`NOT_WINDOWED`].
    pub(super) flags: u8,
    /// The key's name in the log's current segment (see `wal::LogName`); 0: not named yet.
    pub(super) log_name: u16,
    /// The window delta of the second `win_t` (Unix seconds), kept here rather than in its
    /// own entry while the second lasts (see `window_now`); 0: none.
    pub(super) win: i32,
    pub(super) win_t: u32,
}

impl Entry {
    pub(super) const NEW: Entry = Entry {
        base: 0,
        pending: 0,
        inflight: 0,
        base_at: 0,
        state: BaseState::Unknown,
        flags: 0,
        log_name: 0,
        win: 0,
        win_t: 0,
    };

    pub(super) fn exists(&self) -> bool {
        self.state == BaseState::Int || self.unflushed()
    }

    /// A delta not yet confirmed by the shard: pending, or in a batch in flight.
    pub(super) fn unflushed(&self) -> bool {
        self.flags & (DIRTY | INFLIGHT) != 0
    }

    /// base + inflight + pending, or None on overflow.
    pub(super) fn value(&self) -> Option<i64> {
        let base = if self.state == BaseState::Int {
            self.base
        } else {
            0
        };
        base.checked_add(self.inflight)?.checked_add(self.pending)
    }
}

pub(super) type Map = HashMap<key::Key, Entry, ahash::RandomState>;

impl Stripe {
    /// Adds `delta` to `key`'s pending delta (a new entry if none); true when the entry was
    /// not dirty before (the caller counts it).
    pub(super) fn add_pending(&mut self, key: &[u8], delta: i64) -> bool {
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

pub(super) struct Stripe {
    pub(super) map: Map,
    /// Increments appended under this lock as bare `Incrs` entries (`wal::append_incr`),
    /// framed into one record by the log's next commit.
    pub(super) incrs: Vec<u8>,
    /// Other log records appended under this lock, drained by the log's next commit.
    pub(super) log: Vec<u8>,
    /// Increments buffered here (summed for INFO; no shared counter on the hot path).
    pub(super) increments: u64,
    /// The next name the log gives a key of this stripe in the current segment (see
    /// `wal::LogName`); 0 once the segment used them all.
    pub(super) next_log_name: u16,
    /// Σ (pending + inflight) of this stripe's counter entries (window deltas excluded): kept
    /// as it changes, so that INFO and /metrics never walk the keys under the lock.
    pub(super) unflushed: i64,
}

/// A stripe and, beside its lock, whether its log buffers have bytes, so that a commit
/// skips the locks of shards with nothing to write.
pub(super) struct Cell {
    pub(super) lock: Mutex<Stripe>,
    pub(super) has_log: AtomicBool,
}

/// The stripe of an entry; a window delta lives with its counter key, so that one lock
/// covers an increment and its window delta.
pub fn stripe_of(key: &[u8]) -> usize {
    // Any well-mixed hash will do (it only spreads keys over the locks): ahash with fixed
    // seeds costs a few nanoseconds, where the ring's crc32 + fmix32 cost several times that.
    static STATE: std::sync::OnceLock<ahash::RandomState> = std::sync::OnceLock::new();
    let state =
        STATE.get_or_init(|| ahash::RandomState::with_seeds(0x7a11, 0x9e37, 0x79b9, 0x7f4a));
    let key = windows::placement_key(key);
    (state.hash_one(key) >> 32) as usize % STRIPES
}

#[cfg(test)]
mod tests {
    /// Memory per pending key is a product figure (docs/performance.md): an entry that grows
    /// past 40 bytes makes every map slot 8 bytes larger.
    #[test]
    fn an_entry_stays_forty_bytes() {
        assert_eq!(std::mem::size_of::<super::Entry>(), 40);
    }
}
