//! Process-wide figures that are not owned by one part: connections and commands.
//!
//! Counters are plain atomics bumped on the hot path (Relaxed: figures, not
//! synchronisation), bumped once per burst rather than per command where they are shared.
//! INFO (`info.rs`) and `/metrics` (`http/metrics.rs`) render them with the engine's and
//! the shards' own figures.

use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;

#[derive(Debug, Default)]
pub struct Metrics {
    pub connections_current: AtomicU64,
    pub connections_total: AtomicU64,
    pub connections_refused: AtomicU64,
    pub commands: AtomicU64,
    pub command_errors: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub shard_transitions: AtomicU64,
    pub http_requests: AtomicU64,
}

pub fn global() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::default)
}
