//! Window deltas in the engine: per-granularity deltas of windowed keys, read for window
//! queries, and swept past retention in memory mode (where they are the buckets).
//!
//! Owns window entries in the stripes. Does not own bucket layout or queries (`windows`).

use super::stripe::Entry;
use super::{key, wal, windows, Engine};
use std::collections::HashMap;
use std::sync::atomic::Ordering;

impl Engine {
    /// Memory mode: drops the bucket entries no longer kept (logged as their inverse, so a
    /// replay does not bring them back). Returns how many went.
    pub fn sweep_windows(&self) -> usize {
        let now = self.clock_wall.now_secs();
        let mut gone = 0;
        for cell in self.stripes.iter() {
            let mut guard = cell.lock.lock();
            let stripe = &mut *guard;
            let expired: Vec<key::Key> = stripe
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
                if let Some(e) = stripe.map.remove(&k[..]) {
                    if self.wal.is_some() {
                        wal::encode_incr(&mut stripe.log, &k, e.pending.wrapping_neg());
                        cell.has_log.store(true, Ordering::SeqCst);
                    }
                    gone += 1;
                }
            }
        }
        gone
    }

    /// Lowers the window floor for a window delta restored from the log.
    pub(super) fn note_window(&self, key: &[u8]) {
        if let Some((g, t, _)) = windows::parse_pending(key) {
            if g == windows::ALL {
                self.window_floor.fetch_min(t, Ordering::Relaxed);
            } else {
                self.moved_windows.store(true, Ordering::Relaxed);
            }
        }
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
        let mut stripe = self.lock(key);
        // The current second's delta, if the entry holds it, is read as its own entry.
        let spilled = stripe.spill_key(key);
        self.dirty_keys.fetch_add(spilled, Ordering::Relaxed);
        let mut seconds = Vec::new();
        let value = |e: &Entry| e.pending.wrapping_add(e.inflight);
        if lo < hi {
            let probes = hi - lo;
            if probes as usize <= stripe.map.len() {
                let mut k = windows::pending_key(windows::ALL, lo, key);
                for t in lo..hi {
                    k[9..17].copy_from_slice(&t.to_be_bytes());
                    if let Some(e) = stripe.map.get(&k[..]) {
                        seconds.push((t, value(e)));
                    }
                }
            } else {
                // Fewer entries than seconds to probe (a long outage): walk the entries.
                for (k, e) in stripe.map.iter() {
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
                if let Some(e) = stripe.map.get(&k[..]) {
                    per_bucket.insert((g, t), value(e));
                }
            }
        }
        (seconds, per_bucket)
    }
}
