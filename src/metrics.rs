//! Process-wide figures, and the Prometheus recorder behind `/metrics`.
//!
//! Three kinds: plain atomics owned by the parts (connections here; shards, engine and log
//! in their own structs); counters and histograms kept by the `metrics` crate with
//! metrics-exporter-prometheus (per-command counts by outcome, the flush histogram); and the
//! command latency histograms of this module's own ([`Latency`]): the exporter keeps every
//! observation, with a clock read, until its upkeep, a share of the proxy's CPU per command
//! that showed at a million commands a second (see docs/performance.md). Hot-path figures
//! are aggregated per burst before they touch a shared counter.
//!
//! This module keeps figures and writes no text: `http/metrics.rs` renders all of them in
//! the Prometheus text format (the exporter's own part by [`prometheus`]'s handle).

use metrics::Counter;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
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
    /// (forwarded commands and flush parts), counted by `backend::cluster::Redirect::count`.
    pub cluster_moved: AtomicU64,
    pub cluster_ask: AtomicU64,
    pub cluster_retry: AtomicU64,
}

pub fn global() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::default)
}

/// Latency buckets, in seconds: 10 µs to 2.5 s.
pub const BUCKETS: &[f64] = &[
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

/// A histogram registered on first use, after the recorder (see [`prometheus`]); `cell` is
/// the caller's `static`, so that the registration is looked up once.
pub fn histogram_once(
    cell: &'static OnceLock<metrics::Histogram>,
    name: &'static str,
) -> &'static metrics::Histogram {
    cell.get_or_init(|| {
        prometheus();
        metrics::histogram!(name)
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

/// A fixed-bucket histogram of atomics: `n` observations of one value are one bucket
/// increment, however large `n`.
#[derive(Default)]
pub struct Latency {
    /// Observations per bucket of [`BUCKETS`] (not cumulative), above the previous bound
    /// and at most this one; the last slot is above every bound.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Latency {
    pub fn record_many(&self, d: Duration, n: u64) {
        let secs = d.as_secs_f64();
        let i = BUCKETS.partition_point(|&b| b < secs);
        self.buckets[i].fetch_add(n, Relaxed);
        self.count.fetch_add(n, Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos.saturating_mul(n), Relaxed);
    }

    /// The histogram as Prometheus counts it: cumulative per bound.
    pub fn snapshot(&self) -> LatencySnapshot {
        let mut cumulative = [0; BUCKETS.len() + 1];
        let mut total = 0;
        for (c, b) in cumulative.iter_mut().zip(&self.buckets) {
            total += b.load(Relaxed);
            *c = total;
        }
        LatencySnapshot {
            cumulative,
            sum_seconds: self.sum_nanos.load(Relaxed) as f64 / 1e9,
            count: self.count.load(Relaxed),
        }
    }
}

/// One read of a [`Latency`].
pub struct LatencySnapshot {
    /// Observations at most each bound of [`BUCKETS`]; the last slot counts them all
    /// (`+Inf`).
    pub cumulative: [u64; BUCKETS.len() + 1],
    pub sum_seconds: f64,
    pub count: u64,
}

fn class_histogram(c: Class) -> &'static Latency {
    static H: OnceLock<[Latency; 2]> = OnceLock::new();
    &H.get_or_init(Default::default)[c as usize]
}

/// The command latency histogram of one class (`tallyproxy_command_duration_seconds`).
pub fn command_latency(class: Class) -> LatencySnapshot {
    class_histogram(class).snapshot()
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
        for (class, n) in [(Class::Memory, self.memory), (Class::Backend, self.backend)] {
            if n > 0 {
                class_histogram(class).record_many(elapsed, n);
            }
        }
        self.memory = 0;
        self.backend = 0;
    }
}
