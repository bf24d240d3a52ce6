//! The dashboard: one self-contained page (`GET /`, `GET /dashboard`) and the two JSON
//! routes it reads besides `/visits/{page_id}` and its series.
//!
//! | method | path             | what                                                        |
//! |--------|------------------|-------------------------------------------------------------|
//! | GET    | / , /dashboard   | the page: HTML, CSS and JS embedded in the binary, no CDN   |
//! | GET    | /stats/summary   | counters, pending, shards (no addresses), rebalance progress |
//! | GET    | /stats/top?n=    | the busiest pages, approximately (see `activity`)            |
//!
//! Public and read-only, like `/metrics` (which already shows shard names, health and
//! traffic): nothing here needs the admin token, and nothing here shows what only `/admin`
//! shows (shard addresses, the text of a rebalance error). Each request costs a bounded
//! amount: about a hundred lock acquisitions and one line per shard for the summary, a
//! 64-entry table and at most 64 cache look-ups for the top; never a walk of the keys, never
//! a round trip to a shard.

use super::{error, json_response, Resp};
use crate::context::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use serde_json::json;
use std::sync::atomic::Ordering::Relaxed;

/// The page, embedded at build time.
const PAGE: &str = include_str!("dashboard.html");

/// Pages `/stats/top` lists when `n` is not given.
const DEFAULT_TOP: usize = 10;

/// `path` is the request path, `query` its query string.
pub fn route(ctx: &Context, path: &str, query: Option<&str>) -> Resp {
    match path {
        "/" | "/dashboard" => page(),
        "/stats/summary" => summary(ctx),
        "/stats/top" => match top_n(query.unwrap_or("")) {
            Ok(n) => top(ctx, n),
            Err(e) => error(StatusCode::BAD_REQUEST, e),
        },
        _ => error(StatusCode::NOT_FOUND, "not found"),
    }
}

fn page() -> Resp {
    Response::builder()
        .header("content-type", "text/html; charset=utf-8")
        .header("cache-control", "no-store")
        // Everything the page needs is inline; it talks only to the sidecar it came from.
        .header(
            "content-security-policy",
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
        )
        .header("x-content-type-options", "nosniff")
        .body(Full::new(Bytes::from_static(PAGE.as_bytes())))
        .expect("a valid response")
}

/// `n` from `?n=`: 1 to `activity::SLOTS`.
fn top_n(query: &str) -> Result<usize, String> {
    let mut n = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("n", v)) if n.is_none() => {
                n = Some(
                    v.parse::<usize>()
                        .ok()
                        .filter(|n| (1..=crate::activity::SLOTS).contains(n))
                        .ok_or_else(|| {
                            format!("n must be an integer from 1 to {}", crate::activity::SLOTS)
                        })?,
                )
            }
            Some(("n", _)) => return Err("query parameter \"n\" given twice".into()),
            _ => {
                let name = pair.split('=').next().unwrap_or(pair);
                return Err(format!("unknown query parameter {name:?}"));
            }
        }
    }
    Ok(n.unwrap_or(DEFAULT_TOP))
}

fn top(ctx: &Context, n: usize) -> Resp {
    let engine = &ctx.engine;
    let pages: Vec<_> = engine
        .activity
        .top(n)
        .into_iter()
        .map(|(page, recent)| {
            let mut key = b"visits:".to_vec();
            key.extend_from_slice(&page);
            // What this proxy knows, without a round trip: base as last read plus the
            // increments since (stale: the base is older than cache_ttl).
            let (visits, stale) = match engine.last_known(&key) {
                Some((v, stale)) => (json!(v.unwrap_or(0)), stale),
                None => (serde_json::Value::Null, true),
            };
            json!({
                "page": String::from_utf8_lossy(&page),
                "recent": recent,
                "visits": visits,
                "stale": stale,
            })
        })
        .collect();
    json_response(
        StatusCode::OK,
        json!({
            "pages": pages,
            "sample": crate::activity::SAMPLE,
            "half_life_seconds": crate::activity::HALF_LIFE.as_secs(),
        }),
    )
}

fn summary(ctx: &Context) -> Resp {
    let e = &ctx.engine;
    let s = &e.stats;
    let increments = e.increments();
    let writes = s.backend_writes.load(Relaxed);
    let (pending_keys, pending_increments) = e.pending_total();
    let topo = ctx.router.topology();
    let shares = topo.shares();
    let served = e.activity.served_counts();
    let served_by = |name: &str| {
        served
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, c)| *c)
    };
    let shards: Vec<_> = topo
        .shards
        .iter()
        .zip(shares)
        .map(|(sh, share)| {
            json!({
                "name": sh.name,
                "weight": sh.weight,
                "health": if sh.is_up() { "up" } else { "down" },
                "share": share,
                "requests": sh.stats.requests.load(Relaxed),
                "errors": sh.stats.errors.load(Relaxed),
                "served_via": served_by(&sh.name),
            })
        })
        .collect();
    let migration = ctx.router.migration();
    let rb = ctx.rebalancer.progress(migration.as_deref());
    let log_failed = e.log_failure().is_some();
    let all_up = topo.shards.iter().all(|sh| sh.is_up());
    json_response(
        StatusCode::OK,
        json!({
            "now": e.wall_clock().now_secs(),
            "uptime_seconds": ctx.started.elapsed().as_secs(),
            "version": env!("CARGO_PKG_VERSION"),
            "memory_mode": e.is_memory_mode(),
            "ready": all_up && !log_failed,
            "increments_total": increments,
            "backend_writes_total": writes,
            "merge_ratio": if writes == 0 { None } else { Some(increments as f64 / writes as f64) },
            "pending": {
                "keys": pending_keys,
                "increments": pending_increments,
                "oldest_seconds": e.oldest_pending_seconds(),
            },
            "cache": {
                "hits": s.cache_hits.load(Relaxed),
                "misses": s.cache_misses.load(Relaxed),
            },
            "flushes": {
                "total": s.flushes.load(Relaxed),
                "failures": s.flush_failures.load(Relaxed),
                "dropped_deltas": s.dropped_deltas.load(Relaxed),
            },
            "log": {"enabled": e.has_log(), "failed": log_failed},
            "ring_version": topo.version,
            "shards": shards,
            "served_via": served.iter().map(|(n, c)| (n.clone(), json!(c))).collect::<serde_json::Map<_, _>>(),
            "rebalance": {
                "running": migration.is_some(),
                "state": rb.state,
                "from_version": rb.from_version,
                "to_version": rb.to_version,
                "keys_scanned": rb.keys_scanned,
                "keys_moved": rb.keys_moved,
                "keys_total_estimate": rb.keys_total_estimate,
                "keys_remaining_estimate": rb.keys_remaining_estimate,
                "rate_keys_per_second": rb.rate_keys_per_second,
                "elapsed_seconds": rb.elapsed_seconds,
                "lost": rb.lost,
            },
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::top_n;

    #[test]
    fn top_takes_n_from_1_to_64() {
        assert_eq!(top_n(""), Ok(10));
        assert_eq!(top_n("n=3"), Ok(3));
        assert_eq!(top_n("n=64"), Ok(64));
        assert!(top_n("n=0").is_err());
        assert!(top_n("n=65").is_err());
        assert!(top_n("n=x").is_err());
        assert!(top_n("n=1&n=2").is_err());
        assert!(top_n("m=1").is_err());
    }
}
