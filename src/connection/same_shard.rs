//! Commands whose keys must live on one shard (RENAME, SMOVE, SINTERSTORE, ZUNIONSTORE,
//! LMOVE, BITOP, PFMERGE, EVAL, FCALL, ...): forwarded whole to that shard when every key
//! hashes there — always the case for keys sharing a `{hash tag}` — and refused otherwise
//! with Redis Cluster's words, `CROSSSLOT Keys in request don't hash to the same slot`.
//!
//! Counter keys among them keep their promises: pending increments land first, and cached
//! bases are dropped before and after, so the result is what Redis would give had every
//! increment been applied before the command. During a rebalance, keys still on their old
//! owner move first. A script or function with no keys goes to the first shard. A script's
//! body is not inspected: it runs with the shard's full access (docs/architecture.md).
//!
//! Owns routing and refusing these commands. Does not own the key positions (`command`).

use super::{call, error_bytes, forward, After, Client, Pending, MEMORY_MODE};
use crate::command::Keys;
use crate::context::Context;
use crate::resp::reply;
use bytes::{Bytes, BytesMut};
use std::sync::Arc;

pub const CROSSSLOT: &str = "CROSSSLOT Keys in request don't hash to the same slot";

pub(super) fn dispatch(
    ctx: &Arc<Context>,
    client: &Client,
    keys: Keys,
    args: Vec<Bytes>,
    out: &mut BytesMut,
) -> Option<Pending> {
    let topo = ctx.router.topology();
    if topo.is_empty() {
        reply::error(out, MEMORY_MODE);
        return None;
    }
    // A bad key count is the shard's to answer, in its own words: sent where argument 1 goes.
    let named: Vec<Bytes> = match keys.of(&args) {
        Some(k) => k.into_iter().cloned().collect(),
        None => Vec::new(),
    };
    let first = named
        .first()
        .map_or(args.get(1).map_or(&b""[..], |a| &a[..]), |k| &k[..]);
    let index = topo.shard_index(first);
    // One shard in a ring; one slot in a cluster, which refuses keys of two slots even
    // when one node serves both.
    let place = topo.place(first);
    if named.iter().any(|k| topo.place(k) != place) {
        reply::error(out, CROSSSLOT);
        return None;
    }
    let shard = topo.shards[index].clone();
    let engine = &ctx.engine;
    let counters: Vec<Bytes> = named
        .iter()
        .filter(|k| engine.is_batched(k))
        .cloned()
        .collect();
    let moving = named.iter().any(|k| engine.needs_move(k));
    let landing = counters.iter().any(|k| engine.has_unflushed(k));
    if !moving && !landing {
        return Some(match counters.as_slice() {
            [] => forward(&shard, client, &args, After::Nothing),
            [one] => {
                engine.invalidate(one);
                forward(&shard, client, &args, After::Invalidate(one.clone()))
            }
            _ => {
                // Several counter keys: drop every base before and after (a barrier).
                return Some(barrier(ctx, client, named, counters, shard, args));
            }
        });
    }
    Some(barrier(ctx, client, named, counters, shard, args))
}

/// Moves the keys still on their old owner, lands the counters' pending increments, then
/// forwards, with every counter's cached base dropped before and after.
fn barrier(
    ctx: &Arc<Context>,
    client: &Client,
    named: Vec<Bytes>,
    counters: Vec<Bytes>,
    shard: Arc<crate::backend::Shard>,
    args: Vec<Bytes>,
) -> Pending {
    let (ctx, id, proto) = (ctx.clone(), client.id, client.proto);
    Pending::Task(Box::pin(async move {
        let engine = &ctx.engine;
        if let Some(m) = ctx.router.migration() {
            for k in &named {
                if let Err(e) = engine.ensure_moved(&m, k).await {
                    return error_bytes(&e.client_message(&engine.owner_name(k)));
                }
            }
        }
        for k in &counters {
            if let Err(e) = engine.land(k).await {
                return error_bytes(&e.client_message(&shard.name));
            }
            engine.invalidate(k);
        }
        let r = call(&ctx, &shard, id, proto, &args).await;
        for k in &counters {
            engine.invalidate(k);
        }
        match r {
            Ok(r) => BytesMut::from(&r.raw[..]),
            Err(e) => error_bytes(&e.client_message(&shard.name)),
        }
    }))
}
