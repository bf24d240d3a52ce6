//! Keys moving during a rebalance: values taken off a key's old owner are added to its
//! pending delta (logged in the same step), and the set of keys already moved.
//!
//! Owns the engine's record of moves. Does not own the rebalance's plan or its scan
//! (`rebalance`).

use super::stripe::stripe_of;
use super::{wal, windows, Engine};
use bytes::Bytes;
use std::sync::atomic::Ordering;

impl Engine {
    /// Adds `value`, moved off the key's old owner by rebalance `id`, to its pending delta,
    /// logged in the same step (replay restores both the delta and the fact of the move).
    pub fn apply_moved(&self, id: u64, key: &[u8], value: i64) {
        let cell = &self.stripes[stripe_of(key)];
        let mut guard = cell.lock.lock();
        let stripe = &mut *guard;
        if stripe.add_pending(key, value) {
            self.note_dirty();
        }
        stripe.unflushed = stripe.unflushed.wrapping_add(value);
        if self.wal.is_some() {
            wal::encode_moved(&mut stripe.log, id, key, value);
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
        let cell = &self.stripes[stripe_of(key)];
        let mut guard = cell.lock.lock();
        let stripe = &mut *guard;
        for &(t, v) in fields {
            let pk = windows::pending_key(windows::LETTER[g], t, key);
            if self.wal.is_some() {
                wal::encode_moved(&mut stripe.log, id, &pk, v);
            }
            if stripe.add_pending(&pk, v) {
                self.note_dirty();
            }
        }
        if self.wal.is_some() {
            wal::encode_marked(&mut stripe.log, id, bk);
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
}
