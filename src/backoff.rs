//! Waiting between retries: doubling waits from a first one up to a cap, reset by a
//! success. One helper for every retry loop (accept, flush batches, rebalance scans, the
//! log's recovery, reconnects), so that each is bounded the same way.
//!
//! A leaf: names no other module but `shutdown`.

use crate::shutdown::Shutdown;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            next: first,
            max,
        }
    }

    /// The wait before the next try; the one after is twice as long, up to the cap.
    pub fn next_wait(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// After a success: the next failure waits the first wait again.
    pub fn reset(&mut self) {
        self.next = self.first;
    }

    /// Sleeps the next wait; false when `shutdown` fired first (stop retrying).
    pub async fn sleep(&mut self, shutdown: &mut Shutdown) -> bool {
        let d = self.next_wait();
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = shutdown.wait() => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap_and_reset() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(50), ms(300));
        let waits: Vec<_> = (0..5).map(|_| b.next_wait()).collect();
        assert_eq!(waits, [ms(50), ms(100), ms(200), ms(300), ms(300)]);
        b.reset();
        assert_eq!(b.next_wait(), ms(50));
    }
}
