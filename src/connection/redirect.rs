//! A forwarded command that a Redis Cluster node answered with a redirection instead of
//! running it: followed here, so that a client of the proxy never sees one.
//!
//! `-MOVED slot addr`: the map is stale (reported to `cluster`, which looks again) and the
//! command is sent to `addr`. `-ASK slot addr`: the slot is migrating and this key is at
//! `addr` already; the command is sent there once, after `ASKING`, without touching the
//! map. `-TRYAGAIN` (a multi-key command during a migration) and `-CLUSTERDOWN` (a failover
//! in progress): sent again to the same place after a short wait. Each of these replies
//! comes before the node runs anything, so sending the command again cannot run it twice.
//! At most [`MAX_HOPS`] sends and [`MAX_TIME`] in all; then the last reply goes to the
//! client as Redis's error.
//!
//! Owns following. Does not own the map (`router`, `cluster`) or the wire format of the
//! redirections (`backend::cluster`).

use super::{await_reply, send_routed};
use crate::backend::cluster::Redirect;
use crate::backend::{BackendError, Reply, Shard};
use crate::backoff::Backoff;
use crate::context::Context;
use crate::resp::reply::Proto;
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Sends of one command after the first, at most.
pub const MAX_HOPS: u32 = 6;
/// Time spent following, at most.
pub const MAX_TIME: Duration = Duration::from_secs(3);

/// Follows `first` (the reply of `frame` sent to `shard`) when it is a redirection, in
/// cluster mode; returns the final reply and the node that gave it.
pub(crate) async fn follow(
    ctx: &Context,
    first: Result<Reply, BackendError>,
    shard: &Arc<Shard>,
    frame: &Bytes,
    client: u64,
    proto: Proto,
) -> (Result<Reply, BackendError>, Arc<Shard>) {
    let Some(cluster) = &ctx.cluster else {
        return (first, shard.clone());
    };
    if first.is_err() {
        // No reply: the node may have failed over; have the map looked at (the command is
        // not sent again: it may have run).
        ctx.router.report_stale();
    }
    let mut reply = first;
    let mut at = shard.clone();
    let mut asking = false;
    let started = Instant::now();
    let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(400));
    for _ in 0..MAX_HOPS {
        let redirect = match &reply {
            Ok(r) => Redirect::of_raw(&r.raw).inspect(Redirect::count),
            Err(_) => None,
        };
        let Some(redirect) = redirect else { break };
        if started.elapsed() >= MAX_TIME {
            break;
        }
        match redirect {
            Redirect::Moved { addr, .. } | Redirect::Ask { addr, .. } => {
                let moved = matches!(redirect, Redirect::Moved { .. });
                if moved {
                    ctx.router.report_stale();
                }
                let target = match cluster.node(addr) {
                    Some(n) => n,
                    None => {
                        // A node the proxy has not made yet: wait for the map that names it.
                        ctx.router.report_stale();
                        let v = ctx.router.topology().version;
                        ctx.router.newer_than(v, Duration::from_secs(1)).await;
                        match cluster.node(addr) {
                            Some(n) => n,
                            None => break,
                        }
                    }
                };
                at = target;
                asking = !moved;
            }
            Redirect::Retry => {
                ctx.router.report_stale();
                tokio::time::sleep(backoff.next_wait()).await;
            }
        }
        let sent = Instant::now();
        let rx = send_routed(&at, client, proto, frame.clone(), asking);
        reply = await_reply(rx, &at, sent).await;
    }
    (reply, at)
}
