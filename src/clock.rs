//! The one wall clock the proxy reads for time-windowed counts.
//!
//! In production it is the system clock. Tests build a manual clock, hand it to the proxy
//! in its [`crate::config::Config`], and move it forward themselves: a test of hour edges
//! or of retention never sleeps for minutes to pass.
//!
//! Owns "what time is it" for windows. Does not own timeouts, TTLs or intervals: those are
//! durations, measured with tokio's monotonic clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Clone, Default)]
pub struct Clock {
    /// Milliseconds since the Unix epoch, when set by hand; None: the system clock.
    manual: Option<Arc<AtomicU64>>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock::default()
    }

    /// A clock that reads `unix_ms` until moved with [`Clock::set_ms`] or [`Clock::advance`].
    pub fn manual(unix_ms: u64) -> Clock {
        Clock {
            manual: Some(Arc::new(AtomicU64::new(unix_ms))),
        }
    }

    pub fn now_ms(&self) -> u64 {
        match &self.manual {
            Some(t) => t.load(Ordering::SeqCst),
            None => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        }
    }

    /// Whole seconds since the Unix epoch.
    pub fn now_secs(&self) -> u64 {
        self.now_ms() / 1000
    }

    /// Sets a manual clock (no effect on the system clock).
    pub fn set_ms(&self, unix_ms: u64) {
        if let Some(t) = &self.manual {
            t.store(unix_ms, Ordering::SeqCst);
        }
    }

    /// Moves a manual clock forward by `secs` seconds.
    pub fn advance(&self, secs: u64) {
        if let Some(t) = &self.manual {
            t.fetch_add(secs * 1000, Ordering::SeqCst);
        }
    }

    pub fn is_manual(&self) -> bool {
        self.manual.is_some()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.manual {
            Some(t) => write!(f, "Clock::manual({})", t.load(Ordering::SeqCst)),
            None => f.write_str("Clock::system"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told() {
        let c = Clock::manual(1_000_500);
        assert_eq!(c.now_secs(), 1000);
        c.advance(60);
        assert_eq!(c.now_ms(), 1_060_500);
        c.set_ms(5);
        assert_eq!(c.now_secs(), 0);
        let sys = Clock::system();
        assert!(sys.now_secs() > 1_700_000_000);
    }
}
