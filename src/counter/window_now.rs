//! The current second's window delta, kept in the counter's own entry.
//!
//! A windowed increment at second `t` counts into the window delta `tally:p:a<t>K` (see
//! [`windows`]). Kept as an entry of its own, that is a second map lookup of a 36-byte key
//! and a second log record on every increment: the profile of `INCR visits:*` showed the
//! two lookups and their key compares as a third of the proxy's time. So while a second
//! lasts, its delta stays in `K`'s entry (`win`, `win_t`: 8 bytes), the increment is one
//! lookup and one log entry ([`wal::append_named_incr`]: key, delta and second), and the
//! delta moves to its own entry (*spills*) only when
//!
//! - an increment of another second arrives (once per key and second at most),
//! - anything other than an increment is about to look at window deltas or at the entry's
//!   flags: a flush taking the key ([`Engine::take`]), a log checkpoint's cut, a FLUSHDB's
//!   cancelling, a window query of the key,
//! - the delta would not fit the entry's 32 bits (it then goes to its own entry at once).
//!
//! A spill is not logged: the log already holds the delta, under the window delta's own key
//! once replayed (a windowed increment's entry replays as both deltas). So after a spill, and
//! after a replay, the engine is exactly as if every increment had written its window delta
//! entry itself, which is what the flush, the checkpoint and the queries were built on.
//!
//! Invariant: an entry with `win != 0` is dirty. Increments set `DIRTY`; the only paths that
//! clear it (a flush's take, FLUSHDB's cancelling) spill first.
//!
//! Memory mode keeps its own path (every granularity's bucket is an entry there). Owns the
//! in-entry delta and its spills. Does not own window deltas as entries (`window_deltas`).

use super::stripe::{Entry, Stripe};
use super::{wal, windows, Engine};
use std::sync::atomic::Ordering;

/// What became of an increment's window delta.
pub(super) struct WindowAdd {
    /// Held in the entry (logged with the increment in one record); otherwise the caller
    /// adds it to its own entry and logs it there.
    pub(super) held: bool,
    /// Deltas that left the entry (an earlier second's, or this second's that no longer
    /// fits), for their own entries, unlogged: their increments are in the log already.
    pub(super) spilled: [Option<(u64, i64)>; 2],
}

impl Entry {
    /// Counts `delta` at second `t` into the entry's window delta.
    pub(super) fn add_window(&mut self, t: u64, delta: i64) -> WindowAdd {
        let mut spilled = [None, None];
        if self.win != 0 && u64::from(self.win_t) != t {
            spilled[0] = self.take_window();
        }
        let fits = u32::try_from(t)
            .ok()
            .zip(i32::try_from(delta).ok())
            .and_then(|(t32, d32)| Some((t32, self.win.checked_add(d32)?)));
        match fits {
            Some((t32, w)) => {
                self.win = w;
                self.win_t = t32;
                WindowAdd {
                    held: true,
                    spilled,
                }
            }
            None => {
                // This second's delta so far leaves with the entry's: the caller logs
                // `delta` under the window delta's key, and the rest is logged already.
                spilled[1] = self.take_window();
                WindowAdd {
                    held: false,
                    spilled,
                }
            }
        }
    }

    /// Removes the entry's window delta: (second, delta), or None.
    pub(super) fn take_window(&mut self) -> Option<(u64, i64)> {
        if self.win == 0 {
            return None;
        }
        let d = (u64::from(self.win_t), i64::from(self.win));
        self.win = 0;
        Some(d)
    }
}

impl Stripe {
    /// Adds a spilled window delta of `key` at second `t` to its own entry (not logged).
    /// True when that entry was not dirty before (the caller counts it).
    pub(super) fn spill(&mut self, key: &[u8], (t, delta): (u64, i64)) -> bool {
        windows::with_pending_key(windows::ALL, t, key, |wk| self.add_pending(wk, delta))
    }

    /// Spills `key`'s window delta, if it has one; the number of entries made dirty.
    pub(super) fn spill_key(&mut self, key: &[u8]) -> usize {
        match self.map.get_mut(key).and_then(Entry::take_window) {
            Some(d) => usize::from(self.spill(key, d)),
            None => 0,
        }
    }

    /// Spills the window delta of every entry `which` accepts; the number of entries made
    /// dirty.
    pub(super) fn spill_all(&mut self, mut which: impl FnMut(&[u8]) -> bool) -> usize {
        let out: Vec<(Vec<u8>, (u64, i64))> = self
            .map
            .iter_mut()
            .filter(|(_, e)| e.win != 0)
            .filter(|(k, _)| which(k))
            .filter_map(|(k, e)| Some((k.to_vec(), e.take_window()?)))
            .collect();
        out.into_iter()
            .map(|(k, d)| usize::from(self.spill(&k, d)))
            .sum()
    }
}

impl Engine {
    /// The hot path's window delta for `key` (locked in `stripe`, entry `e` just counted
    /// `delta`): held in the entry and logged with the increment in one record, or logged
    /// on its own. Returns the spills for the caller to apply once `e` is released.
    pub(super) fn count_window_now(
        &self,
        log: &mut Vec<u8>,
        e: &mut Entry,
        key: &[u8],
        name: wal::LogName,
        t: u64,
        delta: i64,
    ) -> WindowAdd {
        let add = e.add_window(t, delta);
        if self.wal.is_some() {
            wal::append_named_incr(log, key, name, delta, add.held.then_some(t));
        }
        add
    }

    /// Applies the spills of [`Engine::count_window_now`]; `own` is this increment's window
    /// delta when the entry could not hold it (logged here).
    pub(super) fn apply_spills(
        &self,
        stripe: &mut Stripe,
        key: &[u8],
        t: u64,
        delta: i64,
        add: WindowAdd,
    ) {
        for d in add.spilled.into_iter().flatten() {
            if stripe.spill(key, d) {
                self.note_dirty();
            }
        }
        if !add.held {
            self.add_window_delta(stripe, windows::ALL, t, key, delta);
        }
    }

    /// The second a windowed increment counts in: the clock ticker's reading (refreshed
    /// every 2 ms, later only while the runtime's workers are all busy), the clock itself
    /// when no ticker runs (none yet, or stopped) or the clock is a test's. An increment
    /// within a tick of a second's end may so count in that second rather than the next.
    pub(super) fn window_second(&self) -> u64 {
        match self.wall_secs.load(Ordering::Relaxed) {
            0 => self.clock_wall.now_secs(),
            t => t,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Shard;
    use crate::config::Config;
    use crate::router::{Router, Topology};
    use bytes::Bytes;
    use std::sync::Arc;

    const T: u64 = 1_800_000_000;

    /// An engine over one shard nobody listens on (nothing here sends), with a manual clock
    /// at `T` and `visits:*` windowed (the default).
    fn engine() -> (Arc<Engine>, Arc<Topology>) {
        let config = Config::from_toml_str("[durability]\nenabled = false\n").unwrap();
        let addr = "127.0.0.1:1".parse().unwrap();
        let shard = Shard::new("s".into(), addr, 1, &config).unwrap();
        let topo = Topology::new(1, vec![shard], config.ring.vnodes);
        let router = Arc::new(Router::new(topo));
        let clock = crate::clock::Clock::manual(T * 1000);
        let engine = Engine::new(
            &config.counters,
            windows::Windows::from_config(&config.windows),
            clock,
            router.clone(),
            "t".into(),
            1,
        );
        (engine, router.topology())
    }

    fn full_take(e: &Engine, topo: &Topology) -> Vec<(Bytes, i64)> {
        let mut v = e.take(Some((topo, 0, &mut 0)), None, usize::MAX, 0);
        v.sort();
        v
    }

    fn w(t: u64) -> Bytes {
        Bytes::from(windows::pending_key(windows::ALL, t, b"visits:a"))
    }

    #[tokio::test]
    async fn a_flush_takes_every_seconds_delta_held_or_spilled() {
        let (e, topo) = engine();
        e.incr_blind(b"visits:a", 2);
        e.incr_blind(b"visits:a", 3);
        e.wall_clock().advance(1);
        e.incr_blind(b"visits:a", 4);
        let k = Bytes::from_static(b"visits:a");
        assert_eq!(full_take(&e, &topo), vec![(w(T), 5), (w(T + 1), 4), (k, 9)]);
        assert_eq!(e.dirty_keys(), 0);
    }

    #[tokio::test]
    async fn a_landing_leaves_the_window_delta_for_the_next_flush() {
        let (e, topo) = engine();
        e.incr_blind(b"visits:a", 7);
        let k = Bytes::from_static(b"visits:a");
        // A landing takes the key alone; then its batch settles and the entry is clean.
        let taken = e.take(None, Some(std::slice::from_ref(&k)), usize::MAX, 0);
        assert_eq!(taken, vec![(k.clone(), 7)]);
        let value = super::super::lane::KeyValue::Int(7);
        e.settle(b"visits:a", Some(7), &value, e.invalidation_epoch());
        // A cache sweep drops clean entries: the window delta must not have stayed there.
        e.invalidate_all_bases();
        assert_eq!(full_take(&e, &topo), vec![(w(T), 7)]);
    }

    #[tokio::test]
    async fn a_checkpoint_lists_the_held_delta_under_its_own_key() {
        let (e, _) = engine();
        e.incr_blind(b"visits:a", 5);
        let (_, pending, _) = e.cut(&Default::default());
        let mut pending = pending.to_vec();
        pending.sort();
        assert_eq!(
            pending,
            vec![(w(T), 5), (Bytes::from_static(b"visits:a"), 5)]
        );
    }

    #[test]
    fn a_second_is_held_until_the_next_one_and_what_does_not_fit_leaves() {
        let mut e = Entry::NEW;
        let a = e.add_window(100, 2);
        assert!(a.held && a.spilled == [None, None]);
        assert!(e.add_window(100, 3).held);
        assert_eq!((e.win, e.win_t), (5, 100));
        // A new second: the old one leaves, the new one is held.
        let a = e.add_window(101, 1);
        assert!(a.held);
        assert_eq!(a.spilled, [Some((100, 5)), None]);
        // Too large for 32 bits: this second's delta so far leaves too.
        let a = e.add_window(101, i64::from(i32::MAX) + 1);
        assert!(!a.held);
        assert_eq!(a.spilled, [None, Some((101, 1))]);
        assert_eq!(e.take_window(), None);
        // An overflow of the held sum, and a second past u32: neither is held.
        assert!(e.add_window(102, i64::from(i32::MAX)).held);
        let a = e.add_window(102, 1);
        assert!(!a.held);
        assert_eq!(a.spilled, [None, Some((102, i64::from(i32::MAX)))]);
        let a = e.add_window(u64::from(u32::MAX) + 1, 1);
        assert!(!a.held && a.spilled == [None, None]);
        // Increments that cancel out leave nothing held.
        assert!(e.add_window(103, 4).held);
        assert!(e.add_window(103, -4).held);
        assert_eq!(e.take_window(), None);
    }
}
