//! The sidecar's `/admin/*` routes: shard list, rebalance, shutdown.
//!
//! Every admin route needs `Authorization: Bearer <admin_token>` when `admin_token` is
//! configured, and is answered only to loopback peers when it is not.

use super::{error, json_response, Resp};
use crate::auth::constant_time_eq;
use crate::context::Context;
use crate::rebalance::specs_of;
use crate::spec::ShardSpec;
use bytes::Bytes;
use hyper::{HeaderMap, Method, StatusCode};
use serde::Deserialize;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;

/// The refusal, when the request may not use admin routes (see the module doc).
pub fn refused(ctx: &Context, peer: SocketAddr, headers: &HeaderMap) -> Option<Resp> {
    match &ctx.admin_token {
        Some(token) => {
            let given = headers
                .get(hyper::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            if constant_time_eq(given.as_bytes(), token.as_bytes()) {
                None
            } else {
                Some(error(
                    StatusCode::UNAUTHORIZED,
                    "admin routes need a valid bearer token",
                ))
            }
        }
        None if peer.ip().is_loopback() => None,
        None => Some(error(
            StatusCode::FORBIDDEN,
            "admin routes answer loopback peers only (no admin_token is configured)",
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddShard {
    addr: String,
    name: Option<String>,
    #[serde(default = "one")]
    weight: u32,
}

fn one() -> u32 {
    1
}

/// In cluster mode the cluster moves slots itself: the proxy's rebalance routes refuse.
const CLUSTER_RESHARDS: &str = "the shards are a Redis Cluster's nodes: resharding is the cluster's job (redis-cli --cluster reshard, add-node, del-node); the proxy follows the slot map";

pub async fn route(ctx: &Arc<Context>, method: &Method, rest: &str, body: Bytes) -> Resp {
    let rebalancing = matches!(
        (method, rest),
        (&Method::POST, "shards") | (&Method::POST, "rebalance/lost")
    ) || (method == Method::DELETE && rest.starts_with("shards/"));
    if ctx.cluster.is_some() && rebalancing {
        return error(StatusCode::CONFLICT, CLUSTER_RESHARDS);
    }
    match (method, rest) {
        (&Method::GET, "shards") if ctx.cluster.is_some() => cluster_nodes(ctx),
        (&Method::GET, "shards") => shards(ctx),
        (&Method::POST, "shards") => {
            let add: AddShard = match serde_json::from_slice(&body) {
                Ok(a) => a,
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("body must be {{\"addr\": \"ip:port\", \"name\": \"...\"}}: {e}"),
                    )
                }
            };
            let name = add.name.unwrap_or_else(|| match add.addr.rsplit_once(':') {
                Some((_, port)) => format!("redis_{port}"),
                None => format!("redis_{}", add.addr),
            });
            let mut specs = specs_of(&ctx.router.topology());
            specs.push(ShardSpec {
                name,
                addr: add.addr,
                weight: add.weight,
            });
            apply(ctx, specs).await
        }
        (&Method::DELETE, path) if path.starts_with("shards/") => {
            let name = &path["shards/".len()..];
            let mut specs = specs_of(&ctx.router.topology());
            let before = specs.len();
            specs.retain(|s| s.name != name);
            if specs.len() == before {
                return error(StatusCode::NOT_FOUND, format!("no shard named {name:?}"));
            }
            apply(ctx, specs).await
        }
        (&Method::GET, "rebalance") => json_response(
            StatusCode::OK,
            json!(ctx.rebalancer.progress(ctx.router.migration().as_deref())),
        ),
        (&Method::POST, "rebalance/lost") => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Lost {
                shard: String,
            }
            let lost: Lost = match serde_json::from_slice(&body) {
                Ok(l) => l,
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("body must be {{\"shard\": \"<name>\"}}: {e}"),
                    )
                }
            };
            match ctx.rebalancer.declare_lost(&lost.shard).await {
                Ok(p) => json_response(
                    StatusCode::OK,
                    json!({"status": "declared lost", "rebalance": p}),
                ),
                Err(e) => error(StatusCode::CONFLICT, e.0),
            }
        }
        (&Method::POST, "flush") => {
            // Lands every pending increment now (before maintenance, or in tests); 503 when
            // a shard did not take its batch (it stays pending and is retried).
            let ok = ctx.engine.flush_all().await;
            let status = if ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let mut body = json!({"flushed": ok, "pending_keys": ctx.engine.dirty_keys()});
            if let Some(e) = ctx.engine.log_failure() {
                // Nothing is sent while the log cannot record it (see docs/guarantees.md).
                body["wal_error"] = json!(e);
            }
            json_response(status, body)
        }
        (&Method::POST, "shutdown") => {
            tracing::info!("shutdown requested over http");
            ctx.shutdown.trigger();
            json_response(StatusCode::ACCEPTED, json!({"status": "shutting down"}))
        }
        (_, "shards" | "rebalance" | "rebalance/lost" | "shutdown" | "flush") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        (_, p) if p.starts_with("shards/") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => error(StatusCode::NOT_FOUND, "not found"),
    }
}

async fn apply(ctx: &Arc<Context>, specs: Vec<ShardSpec>) -> Resp {
    match ctx.rebalancer.change(specs, &ctx.config).await {
        Ok(p) => json_response(
            StatusCode::ACCEPTED,
            json!({"status": "rebalancing", "rebalance": p}),
        ),
        Err(e) => error(StatusCode::CONFLICT, e.0),
    }
}

/// A Sentinel-managed shard's primary, replicas and last failover, for `/admin/shards`.
fn primary_json(p: &crate::backend::sentinel::Primary) -> serde_json::Value {
    let last = p.last_failover.lock().map(|(at, from, to)| {
        let unix = at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        json!({"at_unix": unix, "from": from.to_string(), "to": to.to_string()})
    });
    let replicas: Vec<String> = p.replicas.lock().iter().map(|a| a.to_string()).collect();
    json!({
        "master": p.master,
        "primary": p.addr().to_string(),
        "replicas": replicas,
        "last_failover": last,
    })
}

fn shards(ctx: &Context) -> Resp {
    let topo = ctx.router.topology();
    let shares = topo.shares();
    let progress = ctx.rebalancer.progress(ctx.router.migration().as_deref());
    let shards: Vec<_> = topo
        .shards
        .iter()
        .zip(shares)
        .map(|(s, share)| {
            json!({
                "name": s.name,
                "addr": s.addr().to_string(),
                "weight": s.weight,
                "health": if s.is_up() { "up" } else { "down" },
                "share": share,
                "keys_moved_in": progress.moved_into.get(&s.name).copied().unwrap_or(0),
                "sentinel": s.primary.as_ref().map(|p| primary_json(p)),
            })
        })
        .collect();
    json_response(
        StatusCode::OK,
        json!({"ring_version": topo.version, "rebalancing": ctx.router.migration().is_some(), "shards": shards}),
    )
}

/// `/admin/shards` in cluster mode: every node of the map as last read, with its role,
/// slot ranges (primaries) and health (the cluster's word, and the proxy's own check).
fn cluster_nodes(ctx: &Context) -> Resp {
    let Some(cluster) = &ctx.cluster else {
        return shards(ctx);
    };
    let topo = ctx.router.topology();
    let mut nodes = Vec::new();
    for shard in cluster.view() {
        for n in &shard.nodes {
            let served = topo.by_addr(n.addr);
            let ranges: Vec<[u16; 2]> = if n.primary {
                shard.ranges.iter().map(|&(a, b)| [a, b]).collect()
            } else {
                Vec::new()
            };
            let proxy_health = cluster
                .node(n.addr)
                .map(|s| if s.is_up() { "up" } else { "down" });
            nodes.push(json!({
                "name": crate::cluster::node_name(n.addr),
                "addr": n.addr.to_string(),
                "id": n.id,
                "role": if n.primary { "primary" } else { "replica" },
                "slots": ranges,
                "slot_count": ranges.iter().map(|r| (r[1] - r[0]) as u64 + 1).sum::<u64>(),
                "cluster_health": n.health,
                "health": proxy_health.unwrap_or(if served.is_some() { "up" } else { "unknown" }),
            }));
        }
    }
    let unserved = topo.slot_map().map(|m| m.unserved()).unwrap_or(0);
    json_response(
        StatusCode::OK,
        json!({
            "mode": "cluster",
            "map_version": topo.version,
            "slots_unserved": unserved,
            "refreshes": cluster.refreshes.load(std::sync::atomic::Ordering::Relaxed),
            "last_error": cluster.last_error(),
            "nodes": nodes,
        }),
    )
}
