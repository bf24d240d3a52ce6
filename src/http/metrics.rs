//! `/metrics`: the proxy's figures in the Prometheus text format (version 0.0.4).
//!
//! Rendered on request from the same atomics INFO reads; names follow Prometheus
//! conventions (`tallyproxy_` prefix, `_total` for counters, base units). The one writer of
//! the text format: `crate::metrics` keeps the figures (and the exporter's handle renders
//! its own counters and histograms, first), this module writes every other line.

use crate::context::Context;
use crate::metrics::{Class, LatencySnapshot, BUCKETS};
use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;

struct Out(String);

impl Out {
    fn metric(&mut self, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
        let _ = writeln!(self.0, "# HELP tallyproxy_{name} {help}");
        let _ = writeln!(self.0, "# TYPE tallyproxy_{name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(self.0, "tallyproxy_{name}{labels} {v}");
        }
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, v: f64) {
        self.metric(name, kind, help, &[(String::new(), v)]);
    }

    /// A histogram: cumulative `_bucket` lines, `_sum` and `_count` per series, each series
    /// named by its labels (`a="b"`, without braces).
    fn histogram(&mut self, name: &str, help: &str, series: &[(String, LatencySnapshot)]) {
        let _ = writeln!(self.0, "# HELP tallyproxy_{name} {help}");
        let _ = writeln!(self.0, "# TYPE tallyproxy_{name} histogram");
        for (labels, h) in series {
            self.buckets(&format!("tallyproxy_{name}"), labels, h);
        }
    }

    fn buckets(&mut self, name: &str, labels: &str, h: &LatencySnapshot) {
        for (i, cumulative) in h.cumulative.iter().enumerate() {
            let le = match BUCKETS.get(i) {
                Some(bound) => bound.to_string(),
                None => "+Inf".to_string(),
            };
            let _ = writeln!(self.0, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(self.0, "{name}_sum{{{labels}}} {}", h.sum_seconds);
        let _ = writeln!(self.0, "{name}_count{{{labels}}} {}", h.count);
    }
}

pub fn render(ctx: &Context) -> String {
    let m = crate::metrics::global();
    let e = &ctx.engine;
    let s = &e.stats;
    // Per-command counters (the metrics crate's recorder), then the latency histograms.
    let mut o = Out(crate::metrics::prometheus().render());
    if !o.0.is_empty() && !o.0.ends_with('\n') {
        o.0.push('\n');
    }
    o.histogram(
        "command_duration_seconds",
        "Command latency inside the proxy, recorded per burst.",
        &[(Class::Memory, "memory"), (Class::Backend, "backend")].map(|(class, label)| {
            (
                format!("answered_from=\"{label}\""),
                crate::metrics::command_latency(class),
            )
        }),
    );
    o.one(
        "connections",
        "gauge",
        "Client connections open now.",
        m.connections_current.load(Relaxed) as f64,
    );
    o.one(
        "connections_total",
        "counter",
        "Client connections accepted.",
        m.connections_total.load(Relaxed) as f64,
    );
    o.one(
        "connections_refused_total",
        "counter",
        "Connections refused at maxclients.",
        m.connections_refused.load(Relaxed) as f64,
    );
    o.one(
        "commands_received_total",
        "counter",
        "RESP commands received.",
        m.commands.load(Relaxed) as f64,
    );
    o.one(
        "command_errors_total",
        "counter",
        "Commands refused before execution (unknown, arity).",
        m.command_errors.load(Relaxed) as f64,
    );
    o.one(
        "protocol_errors_total",
        "counter",
        "Connections closed on malformed input.",
        m.protocol_errors.load(Relaxed) as f64,
    );
    o.one(
        "shard_state_changes_total",
        "counter",
        "Shard up/down transitions seen by health checks.",
        m.shard_transitions.load(Relaxed) as f64,
    );
    if let Some(c) = &ctx.cluster {
        let topo = ctx.router.topology();
        o.one(
            "cluster_map_version",
            "gauge",
            "Version of the Redis Cluster slot map in force (raised by each change seen).",
            topo.version as f64,
        );
        o.one(
            "cluster_slots_unserved",
            "gauge",
            "Slots no node serves in the map in force (the cluster is down for them).",
            topo.slot_map().map_or(0, |m| m.unserved()) as f64,
        );
        o.one(
            "cluster_refreshes_total",
            "counter",
            "Looks at the cluster's slot map.",
            c.refreshes.load(Relaxed) as f64,
        );
        o.one(
            "cluster_refresh_errors_total",
            "counter",
            "Looks at the slot map that no node answered.",
            c.refresh_errors.load(Relaxed) as f64,
        );
        o.metric(
            "cluster_redirects_total",
            "counter",
            "Redirections followed, by kind (moved, ask, retry: TRYAGAIN or CLUSTERDOWN).",
            &[
                (
                    "{kind=\"moved\"}".into(),
                    m.cluster_moved.load(Relaxed) as f64,
                ),
                ("{kind=\"ask\"}".into(), m.cluster_ask.load(Relaxed) as f64),
                (
                    "{kind=\"retry\"}".into(),
                    m.cluster_retry.load(Relaxed) as f64,
                ),
            ],
        );
    }
    o.one(
        "http_requests_total",
        "counter",
        "HTTP requests served by the sidecar.",
        m.http_requests.load(Relaxed) as f64,
    );

    o.one(
        "auth_failures_total",
        "counter",
        "AUTH and HELLO AUTH attempts refused.",
        ctx.users.failures.load(Relaxed) as f64,
    );
    let topo = ctx.router.topology();
    let label = |name: &str| format!("{{shard=\"{name}\"}}");
    let per = |f: &dyn Fn(&crate::backend::Shard) -> f64| -> Vec<(String, f64)> {
        topo.shards
            .iter()
            .map(|sh| (label(&sh.name), f(sh)))
            .collect()
    };
    o.metric(
        "shard_up",
        "gauge",
        "1 when the shard passes health checks.",
        &per(&|sh| if sh.is_up() { 1.0 } else { 0.0 }),
    );
    o.metric(
        "shard_requests_total",
        "counter",
        "Requests forwarded to the shard.",
        &per(&|sh| sh.stats.requests.load(Relaxed) as f64),
    );
    o.metric(
        "shard_errors_total",
        "counter",
        "Forwarded requests that failed.",
        &per(&|sh| sh.stats.errors.load(Relaxed) as f64),
    );
    o.metric(
        "shard_lost_data_total",
        "counter",
        "Times a flush found the shard's exactly-once record behind batches this proxy had settled there: the shard lost data (restarted empty, flushed by hand, or failed over to a server that lacked it).",
        &per(&|sh| sh.stats.lost_data.load(Relaxed) as f64),
    );
    o.metric(
        "shard_timeouts_total",
        "counter",
        "Forwarded requests that timed out.",
        &per(&|sh| sh.stats.timeouts.load(Relaxed) as f64),
    );
    o.metric(
        "shard_inflight_requests",
        "gauge",
        "Forwarded requests awaiting a reply.",
        &per(&|sh| sh.stats.inflight.load(Relaxed) as f64),
    );
    o.one(
        "dedicated_connections",
        "gauge",
        "Dedicated shard connections open (transactions with WATCH, subscriptions, blocked commands).",
        ctx.dedicated.in_use() as f64,
    );
    o.one(
        "ring_version",
        "gauge",
        "Version of the ring in use.",
        topo.version as f64,
    );
    let rb = ctx.rebalancer.progress(ctx.router.migration().as_deref());
    o.one(
        "rebalance_running",
        "gauge",
        "1 while a rebalance moves keys.",
        if ctx.router.migration().is_some() {
            1.0
        } else {
            0.0
        },
    );
    o.one(
        "rebalance_keys_scanned",
        "gauge",
        "Keys scanned by the current or last rebalance.",
        rb.keys_scanned as f64,
    );
    o.one(
        "rebalance_keys_moved",
        "gauge",
        "Keys moved by the current or last rebalance.",
        rb.keys_moved as f64,
    );
    o.one(
        "rebalance_keys_remaining_estimate",
        "gauge",
        "Keys left to scan (estimate).",
        rb.keys_remaining_estimate as f64,
    );
    o.one(
        "counter_oldest_pending_seconds",
        "gauge",
        "Upper bound on the age of the oldest unflushed increment.",
        e.oldest_pending_seconds(),
    );

    let (pkeys, psum) = e.pending_total();
    o.one(
        "counter_pending_keys",
        "gauge",
        "Counter keys with unflushed increments.",
        pkeys as f64,
    );
    o.one(
        "counter_pending_increments",
        "gauge",
        "Sum of unflushed deltas.",
        psum as f64,
    );
    o.one(
        "counter_cached_keys",
        "gauge",
        "Counter keys held in memory.",
        e.len() as f64,
    );
    o.one(
        "counter_increments_total",
        "counter",
        "Increments received (RESP and HTTP).",
        e.increments() as f64,
    );
    o.one(
        "counter_backend_writes_total",
        "counter",
        "INCRBY writes issued to shards by flushes.",
        s.backend_writes.load(Relaxed) as f64,
    );
    o.one(
        "window_writes_total",
        "counter",
        "Time-window bucket fields (HINCRBY) written by flushes.",
        s.window_writes.load(Relaxed) as f64,
    );
    o.one(
        "window_queries_total",
        "counter",
        "Time-window queries (TALLY.* and HTTP ?from/?last/series).",
        s.window_queries.load(Relaxed) as f64,
    );
    o.one(
        "window_query_errors_total",
        "counter",
        "Time-window queries answered with an error.",
        s.window_query_errors.load(Relaxed) as f64,
    );
    o.one(
        "counter_cache_hits_total",
        "counter",
        "Counter reads answered from memory.",
        s.cache_hits.load(Relaxed) as f64,
    );
    o.one(
        "counter_cache_refreshes_total",
        "counter",
        "Cached bases re-read in the background after half their TTL, before going stale.",
        s.refreshes.load(Relaxed) as f64,
    );
    o.one(
        "counter_cache_misses_total",
        "counter",
        "Counter reads that asked a shard.",
        s.cache_misses.load(Relaxed) as f64,
    );
    o.one(
        "counter_flushes_total",
        "counter",
        "Flush passes.",
        s.flushes.load(Relaxed) as f64,
    );
    o.one(
        "counter_flush_failures_total",
        "counter",
        "Flush passes that left deltas pending.",
        s.flush_failures.load(Relaxed) as f64,
    );
    o.one(
        "counter_flush_seconds_total",
        "counter",
        "Time spent in flush passes.",
        s.flush_micros.load(Relaxed) as f64 / 1e6,
    );
    o.one(
        "counter_batch_retries_total",
        "counter",
        "Flush batches retried with the same id.",
        s.batch_retries.load(Relaxed) as f64,
    );
    o.one(
        "counter_dropped_deltas_total",
        "counter",
        "Deltas refused by a shard (key no longer an integer).",
        s.dropped_deltas.load(Relaxed) as f64,
    );
    for (k, v) in e.log_info_lines() {
        if let Ok(v) = v.parse::<f64>() {
            let kind = if k.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            o.one(
                &k,
                kind,
                "Write-ahead log figure (see docs/operations.md).",
                v,
            );
        }
    }
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Latency;
    use std::time::Duration;

    #[test]
    fn a_burst_is_one_bucket_increment_rendered_cumulatively() {
        let h = Latency::default();
        h.record_many(Duration::from_micros(30), 16);
        h.record_many(Duration::from_micros(10), 2);
        h.record_many(Duration::from_secs(3), 1);
        let mut out = Out(String::new());
        out.buckets("x", "a=\"b\"", &h.snapshot());
        let lines: Vec<&str> = out.0.lines().collect();
        assert_eq!(lines.len(), BUCKETS.len() + 3);
        // 10 µs is at most the first bound (le is inclusive); 30 µs falls under 50 µs.
        assert_eq!(lines[0], "x_bucket{a=\"b\",le=\"0.00001\"} 2");
        assert_eq!(lines[1], "x_bucket{a=\"b\",le=\"0.000025\"} 2");
        assert_eq!(lines[2], "x_bucket{a=\"b\",le=\"0.00005\"} 18");
        assert_eq!(lines[BUCKETS.len() - 1], "x_bucket{a=\"b\",le=\"2.5\"} 18");
        assert_eq!(lines[BUCKETS.len()], "x_bucket{a=\"b\",le=\"+Inf\"} 19");
        assert_eq!(lines[BUCKETS.len() + 1], "x_sum{a=\"b\"} 3.0005");
        assert_eq!(lines[BUCKETS.len() + 2], "x_count{a=\"b\"} 19");
    }
}
