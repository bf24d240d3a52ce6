//! The engine's side of the write-ahead log: draining the records appended under the stripe
//! locks into a commit, the consistent cut of a checkpoint, and putting replayed state back.
//!
//! Owns the engine's state as the log sees it. Does not own the file or its format (`wal`).

use super::stripe::{BaseState, Entry, DIRTY, INFLIGHT};
use super::{wal, windows, Engine};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Engine {
    /// Restores a delta from the log at start-up (before any client connects).
    pub fn restore_pending(&self, key: &[u8], delta: i64) {
        if delta == 0 && windows::parse_pending(key).is_some() {
            // A window entry whose records cancel out (swept past retention).
            return;
        }
        self.note_window(key);
        let mut stripe = self.lock(key);
        if windows::parse_pending(key).is_none() {
            stripe.unflushed = stripe.unflushed.wrapping_add(delta);
        }
        let e = stripe.map.entry(key.into()).or_insert(Entry {
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

    pub fn set_wal(self: &mut Arc<Self>, wal: Arc<wal::Wal>) {
        Arc::get_mut(self)
            .expect("the log is attached before the engine is shared")
            .wal = Some(wal.clone());
        wal.attach(self);
    }

    /// Moves every buffered log record into `out` (a log commit).
    pub(crate) fn drain_logs(&self, out: &mut Vec<u8>) {
        for cell in self.stripes.iter() {
            if cell.has_log.load(Ordering::SeqCst) {
                let mut s = cell.lock.lock();
                out.append(&mut s.log);
                cell.has_log.store(false, Ordering::SeqCst);
            }
        }
    }

    /// A consistent cut for a log checkpoint: with every stripe locked at once, drains
    /// the buffered records (they belong before the cut) and computes, per key, the deltas
    /// not covered by a logged unapplied batch.
    pub(crate) fn cut(
        &self,
        unapplied: &wal::Unapplied,
    ) -> (Vec<u8>, Vec<(Bytes, i64)>, std::collections::HashSet<Bytes>) {
        let mut guards: Vec<_> = self.stripes.iter().map(|c| c.lock.lock()).collect();
        let mut tail = Vec::new();
        let mut covered: HashMap<&[u8], i64> = HashMap::new();
        for (_, items) in unapplied.values() {
            for (k, d) in items {
                *covered.entry(&k[..]).or_insert(0) += d;
            }
        }
        let mut pending = Vec::new();
        for (g, cell) in guards.iter_mut().zip(self.stripes.iter()) {
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
            let mut stripe = self.lock(k);
            if windows::parse_pending(k).is_none() {
                stripe.unflushed = stripe.unflushed.wrapping_add(*d);
            }
            let e = stripe.map.entry(k[..].into()).or_insert(Entry::NEW);
            e.inflight = e.inflight.wrapping_add(*d);
            e.flags |= INFLIGHT;
        }
    }

    pub fn ensure_seq_above(&self, seq: u64) {
        self.next_seq.fetch_max(seq + 1, Ordering::Relaxed);
    }
}
