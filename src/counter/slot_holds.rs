//! Which lane may write a Redis Cluster slot's counters now.
//!
//! In cluster mode the exactly-once watermark is per slot (`tally:applied:{<tag>}`, see
//! `cluster_batch`), and a batch's number is only meaningful if a slot's batches reach it in
//! order: a later batch landing first would make the earlier one look applied. One lane's
//! batches are ordered; two lanes could overtake each other on a slot that moved from one
//! node to another while the first lane's batch for it is still out (a lost reply, a node
//! failing over). So a lane holds each slot it takes deltas of until its round ends (every
//! batch of it settled), and no other lane takes that slot's deltas meanwhile; they stay
//! pending (and logged) until the holder is done.
//!
//! Owns the holds. Does not own which node serves a slot (`router::slots`).

use crate::router::slots::SLOTS;
use std::sync::atomic::{AtomicU32, Ordering};

pub struct SlotHolds {
    /// Per slot, the id of the lane holding it; 0: free.
    holder: Box<[AtomicU32]>,
}

impl Default for SlotHolds {
    fn default() -> Self {
        SlotHolds {
            holder: (0..SLOTS).map(|_| AtomicU32::new(0)).collect(),
        }
    }
}

impl SlotHolds {
    /// Holds `slot` for lane `lane` unless another lane holds it; whether `lane` holds it.
    pub fn try_hold(&self, slot: u16, lane: u32) -> bool {
        match self.holder[slot as usize].compare_exchange(
            0,
            lane,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => true,
            Err(current) => current == lane,
        }
    }

    /// Lets go of every slot `lane` holds.
    pub fn release(&self, lane: u32) {
        for h in self.holder.iter() {
            let _ = h.compare_exchange(lane, 0, Ordering::AcqRel, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_slot_is_the_holders_alone_until_released() {
        let h = SlotHolds::default();
        assert!(h.try_hold(7, 1));
        assert!(h.try_hold(7, 1));
        assert!(!h.try_hold(7, 2));
        h.release(2);
        assert!(!h.try_hold(7, 2), "only the holder lets go");
        h.release(1);
        assert!(h.try_hold(7, 2));
        assert!(!h.try_hold(7, 1));
    }
}
