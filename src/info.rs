//! INFO text: the proxy's figures in Redis's INFO format, section by section.
//!
//! Tools that parse INFO (`# Section` headers, `key:value` lines, CRLF) read it as they read
//! Redis's. The same figures feed `/metrics` (see `http`).

use crate::context::Context;
use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;

/// What `redis_version` reports; clients gate features on it.
pub const REDIS_VERSION: &str = "7.0.0";

const SECTIONS: &[&str] = &[
    "server",
    "clients",
    "stats",
    "shards",
    "counters",
    "persistence",
    "keyspace",
];

pub fn render(ctx: &Context, section: Option<&str>) -> String {
    let wanted: Vec<&str> = match section {
        None | Some("default") | Some("all") | Some("everything") => SECTIONS.to_vec(),
        Some(s) => SECTIONS.iter().copied().filter(|x| *x == s).collect(),
    };
    let mut out = String::new();
    for (i, s) in wanted.iter().enumerate() {
        if i > 0 {
            out.push_str("\r\n");
        }
        let _ = writeln!(out, "# {}\r", capitalise(s));
        let lines = match *s {
            "server" => server(ctx),
            "clients" => clients(ctx),
            "stats" => stats(ctx),
            "shards" => shards(ctx),
            "counters" => counters(ctx),
            "persistence" => persistence(ctx),
            _ => keyspace(ctx),
        };
        for (k, v) in lines {
            let _ = write!(out, "{k}:{v}\r\n");
        }
    }
    out
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

type Lines = Vec<(String, String)>;

fn line(k: &str, v: impl ToString) -> (String, String) {
    (k.to_string(), v.to_string())
}

fn server(ctx: &Context) -> Lines {
    vec![
        line("redis_version", REDIS_VERSION),
        line("tallyproxy_version", env!("CARGO_PKG_VERSION")),
        line("redis_mode", "standalone"),
        line("process_id", std::process::id()),
        line("tcp_port", ctx.config.listen.port()),
        line("uptime_in_seconds", ctx.started.elapsed().as_secs()),
        line("proxy_id", &ctx.engine.proxy_id),
    ]
}

fn clients(ctx: &Context) -> Lines {
    let m = crate::metrics::global();
    vec![
        line("connected_clients", m.connections_current.load(Relaxed)),
        line("maxclients_refused", m.connections_refused.load(Relaxed)),
        // Buffered client input counted against `limits.max_input_bytes` (resp::budget).
        line("client_input_budget_used", ctx.input_budget.used()),
        line("client_input_budget", ctx.config.limits.max_input_bytes),
        line("dedicated_connections", ctx.dedicated.in_use()),
        line("max_dedicated", ctx.dedicated.cap()),
    ]
}

fn stats(ctx: &Context) -> Lines {
    let m = crate::metrics::global();
    let _ = ctx;
    vec![
        line(
            "total_connections_received",
            m.connections_total.load(Relaxed),
        ),
        line("total_commands_processed", m.commands.load(Relaxed)),
        line("rejected_connections", m.connections_refused.load(Relaxed)),
        line("total_error_replies", m.command_errors.load(Relaxed)),
        line("protocol_errors", m.protocol_errors.load(Relaxed)),
        line("auth_failures", ctx.users.failures.load(Relaxed)),
        line("shard_state_changes", m.shard_transitions.load(Relaxed)),
    ]
}

fn shards(ctx: &Context) -> Lines {
    let topo = ctx.router.topology();
    let shares = topo.shares();
    let mut v = vec![
        line("ring_version", topo.version),
        line("shards", topo.shards.len()),
    ];
    for (i, s) in topo.shards.iter().enumerate() {
        v.push(line(
            &format!("shard{i}"),
            format!(
                "name={},addr={},status={},share={:.4},requests={},errors={},timeouts={}",
                s.name,
                s.addr(),
                if s.is_up() { "up" } else { "down" },
                shares[i],
                s.stats.requests.load(Relaxed),
                s.stats.errors.load(Relaxed),
                s.stats.timeouts.load(Relaxed)
            ),
        ));
    }
    v
}

fn counters(ctx: &Context) -> Lines {
    let e = &ctx.engine;
    let s = &e.stats;
    let (keys, sum) = e.pending_total();
    let incr = e.increments();
    let writes = s.backend_writes.load(Relaxed);
    vec![
        line("memory_mode", if e.is_memory_mode() { 1 } else { 0 }),
        line("pending_keys", keys),
        line("pending_increments", sum),
        line("cached_keys", e.len()),
        line("increments_received", incr),
        line("backend_writes", writes),
        line(
            "merge_ratio",
            if writes == 0 {
                "0".to_string()
            } else {
                format!("{:.2}", incr as f64 / writes as f64)
            },
        ),
        line("cache_hits", s.cache_hits.load(Relaxed)),
        line("cache_misses", s.cache_misses.load(Relaxed)),
        line("cache_refreshes", s.refreshes.load(Relaxed)),
        line("flushes", s.flushes.load(Relaxed)),
        line("flush_failures", s.flush_failures.load(Relaxed)),
        line("batch_retries", s.batch_retries.load(Relaxed)),
        line("reads_between_batches", s.reads_between.load(Relaxed)),
        line("dropped_deltas", s.dropped_deltas.load(Relaxed)),
        line("window_writes", s.window_writes.load(Relaxed)),
        line("window_queries", s.window_queries.load(Relaxed)),
        line("window_query_errors", s.window_query_errors.load(Relaxed)),
    ]
}

fn persistence(ctx: &Context) -> Lines {
    ctx.engine.log_info_lines()
}

fn keyspace(ctx: &Context) -> Lines {
    if ctx.engine.is_memory_mode() {
        return vec![line(
            "db0",
            format!("keys={},expires=0,avg_ttl=0", ctx.engine.key_count()),
        )];
    }
    Vec::new()
}
