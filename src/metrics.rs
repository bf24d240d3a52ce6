//! Process-wide figures, and the Prometheus recorder behind `/metrics`.
//!
//! Two kinds: plain atomics owned by the parts (connections here; shards, engine and log
//! in their own structs), rendered by `http/metrics.rs`; and counters and histograms kept by
//! the `metrics` crate with metrics-exporter-prometheus (per-command counts by outcome,
//! latency histograms), because histograms with lock-free buckets are what that crate does
//! well. Hot-path figures are aggregated per burst before they touch a shared counter.

use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;
use std::time::Duration;

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
    /// A Redis Cluster's `-MOVED`, `-ASK` and `-TRYAGAIN`/`-CLUSTERDOWN` replies followed
    /// (forwarded commands and flush parts).
    pub cluster_moved: AtomicU64,
    pub cluster_ask: AtomicU64,
    pub cluster_retry: AtomicU64,
}

impl Metrics {
    /// Counts one redirection followed.
    pub fn count_redirect(&self, kind: RedirectKind) {
        let c = match kind {
            RedirectKind::Moved => &self.cluster_moved,
            RedirectKind::Ask => &self.cluster_ask,
            RedirectKind::Retry => &self.cluster_retry,
        };
        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What a Redis Cluster node answered instead of running a command.
#[derive(Debug, Clone, Copy)]
pub enum RedirectKind {
    Moved,
    Ask,
    Retry,
}

pub fn global() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::default)
}

/// Latency buckets, in seconds: 10 µs to 2.5 s.
const BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5,
];

/// The recorder's handle, installed on first use (before any handle is registered).
/// When another recorder is already installed in the process, ours renders nothing.
pub fn prometheus() -> &'static PrometheusHandle {
    static H: OnceLock<PrometheusHandle> = OnceLock::new();
    H.get_or_init(|| {
        let recorder = PrometheusBuilder::new().set_buckets(BUCKETS).expect("buckets are valid").build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is installed; /metrics shows only the proxy's own atomics");
        }
        handle
    })
}

/// Drains histogram buffers; run periodically so that they do not grow between scrapes.
pub fn upkeep() {
    prometheus().run_upkeep();
}

struct CommandHandles {
    ok: Counter,
    error: Counter,
}

fn command_handles() -> &'static HashMap<&'static str, CommandHandles> {
    static T: OnceLock<HashMap<&'static str, CommandHandles>> = OnceLock::new();
    T.get_or_init(|| {
        prometheus();
        crate::command::all()
            .map(|s| s.name)
            .chain(["unknown"])
            .map(|name| {
                let h = CommandHandles {
                    ok: metrics::counter!("tallyproxy_commands_total", "command" => name, "outcome" => "ok"),
                    error: metrics::counter!("tallyproxy_commands_total", "command" => name, "outcome" => "error"),
                };
                (name, h)
            })
            .collect()
    })
}

/// Where a command was answered from, for the latency histograms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Answered from the proxy's memory (counters, cache, local commands).
    Memory,
    /// Needed a shard (forwarded, split, lane read).
    Backend,
}

fn class_histogram(c: Class) -> &'static Histogram {
    static H: OnceLock<[Histogram; 2]> = OnceLock::new();
    let h = H.get_or_init(|| {
        prometheus();
        [
            metrics::histogram!("tallyproxy_command_duration_seconds", "answered_from" => "memory"),
            metrics::histogram!("tallyproxy_command_duration_seconds", "answered_from" => "backend"),
        ]
    });
    &h[c as usize]
}

/// One connection's figures for one burst, pushed to the shared ones at its end.
#[derive(Default)]
pub struct Burst {
    by_command: Vec<(&'static str, u64, u64)>,
    memory: u64,
    backend: u64,
}

impl Burst {
    pub fn command(&mut self, name: &'static str, error: bool, class: Class) {
        match self
            .by_command
            .iter_mut()
            .find(|(n, _, _)| std::ptr::eq(*n, name))
        {
            Some(e) => {
                if error {
                    e.2 += 1
                } else {
                    e.1 += 1
                }
            }
            None => self
                .by_command
                .push((name, u64::from(!error), u64::from(error))),
        }
        match class {
            Class::Memory => self.memory += 1,
            Class::Backend => self.backend += 1,
        }
    }

    /// Records the burst: every command in it is recorded with the burst's time, from its
    /// read to its replies being ready (what a pipelining client sees, less the network and
    /// the log commit), not its own service time.
    pub fn finish(&mut self, elapsed: Duration) {
        if self.by_command.is_empty() {
            return;
        }
        let table = command_handles();
        for (name, ok, err) in self.by_command.drain(..) {
            if let Some(h) = table.get(name) {
                if ok > 0 {
                    h.ok.increment(ok);
                }
                if err > 0 {
                    h.error.increment(err);
                }
            }
        }
        let secs = elapsed.as_secs_f64();
        for (class, n) in [(Class::Memory, self.memory), (Class::Backend, self.backend)] {
            if n > 0 {
                class_histogram(class).record_many(secs, n as usize);
            }
        }
        self.memory = 0;
        self.backend = 0;
    }
}
