//! The process-wide budget on buffered client input: with Redis's 512 MB bulk strings
//! allowed, what protects memory is a cap on the bytes all connections hold in their read
//! buffers at once (`[limits] max_input_bytes`), besides each request's own cap
//! (`max_request_bytes`).
//!
//! Each connection holds a [`Held`] share, set to what its read buffer holds beyond a free
//! allowance of [`FREE_BYTES`]: an ordinary connection (requests of a few KiB) never touches
//! the shared counter, so the hot path costs one comparison per read. A connection whose
//! share cannot grow gets a protocol error and is closed; its share is given back when its
//! buffer drains or the connection ends.
//!
//! Owns the accounting. Does not own the read buffers (`connection`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Bytes of each connection's read buffer not counted against the budget.
pub const FREE_BYTES: usize = 64 * 1024;

/// The protocol error of a connection refused by the budget.
pub const OVER_BUDGET: &str =
    "client input over the proxy's budget (limits.max_input_bytes); try again later";

#[derive(Debug)]
pub struct InputBudget {
    limit: usize,
    used: AtomicUsize,
}

impl InputBudget {
    pub fn new(limit: usize) -> Arc<InputBudget> {
        Arc::new(InputBudget {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// Bytes counted now, across connections.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn grow(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|&t| t <= self.limit)
            })
            .is_ok()
    }

    fn shrink(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// One connection's share of the budget; given back on drop.
#[derive(Debug)]
pub struct Held {
    budget: Arc<InputBudget>,
    held: usize,
}

impl Held {
    pub fn new(budget: Arc<InputBudget>) -> Held {
        Held { budget, held: 0 }
    }

    /// Accounts a read buffer of `len` bytes; false when it cannot grow that far (the share
    /// is left as it was).
    pub fn set(&mut self, len: usize) -> bool {
        let want = len.saturating_sub(FREE_BYTES);
        if want > self.held {
            if !self.budget.grow(want - self.held) {
                return false;
            }
        } else if want < self.held {
            self.budget.shrink(self.held - want);
        }
        self.held = want;
        true
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.shrink(self.held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_grow_within_the_budget_and_are_given_back() {
        let b = InputBudget::new(100);
        let mut x = Held::new(b.clone());
        let mut y = Held::new(b.clone());
        assert!(x.set(FREE_BYTES), "the free allowance costs nothing");
        assert_eq!(b.used(), 0);
        assert!(x.set(FREE_BYTES + 60));
        assert!(!y.set(FREE_BYTES + 41), "60 + 41 > 100");
        assert!(y.set(FREE_BYTES + 40));
        assert_eq!(b.used(), 100);
        assert!(x.set(10));
        assert_eq!(b.used(), 40);
        drop(y);
        assert_eq!(b.used(), 0);
    }
}
