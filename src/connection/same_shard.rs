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
use crate::backend::Shard;
use crate::command::Keys;
use crate::context::Context;
use crate::resp::reply;
use bytes::{Bytes, BytesMut};
use std::sync::Arc;

pub const CROSSSLOT: &str = "CROSSSLOT Keys in request don't hash to the same slot";

/// The shard that every key of `args` lives on, with the keys; the refusal otherwise.
pub(super) fn owner(
    ctx: &Context,
    keys: Keys,
    args: &[Bytes],
) -> Result<(Arc<Shard>, Vec<Bytes>), &'static str> {
    let topo = ctx.router.topology();
    if topo.is_empty() {
        return Err(MEMORY_MODE);
    }
    // A bad key count is the shard's to answer, in its own words: sent where argument 1 goes.
    let named: Vec<Bytes> = match keys.of(args) {
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
        return Err(CROSSSLOT);
    }
    Ok((topo.shards[index].clone(), named))
}

/// SORT's BY and GET patterns name other keys (any with a `*`), which may live anywhere.
fn sort_patterns(args: &[Bytes]) -> bool {
    args.windows(2).skip(1).any(|w| {
        matches!(w[0].to_ascii_lowercase().as_slice(), b"by" | b"get") && w[1].contains(&b'*')
    })
}

pub const SORT_PATTERNS: &str = "ERR SORT with BY or GET patterns naming other keys is not supported by tallyproxy: those keys may live on any shard";

pub(super) fn dispatch(
    ctx: &Arc<Context>,
    client: &Client,
    keys: Keys,
    args: Vec<Bytes>,
    out: &mut BytesMut,
) -> Option<Pending> {
    if matches!(keys, Keys::Store { options_from: 2 }) && sort_patterns(&args) {
        reply::error(out, SORT_PATTERNS);
        return None;
    }
    let (shard, named) = match owner(ctx, keys, &args) {
        Ok(o) => o,
        Err(e) => {
            reply::error(out, e);
            return None;
        }
    };
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
    shard: Arc<Shard>,
    args: Vec<Bytes>,
) -> Pending {
    let (ctx, id, proto) = (ctx.clone(), client.id, client.proto);
    Pending::Task(Box::pin(async move {
        if let Err(e) = prepare(&ctx, &named, &counters, &shard).await {
            return e;
        }
        let r = call(&ctx, &shard, id, proto, &args).await;
        for k in &counters {
            ctx.engine.invalidate(k);
        }
        match r {
            Ok(r) => BytesMut::from(&r.raw[..]),
            Err(e) => error_bytes(&e.client_message(&shard.name)),
        }
    }))
}

/// Before a command runs on `shard` outside the pool (a barrier, a transaction, a blocking
/// command): keys still on their old owner move, counters' pending increments land, and
/// their cached bases are dropped. The error is the client's reply.
pub(super) async fn prepare(
    ctx: &Context,
    named: &[Bytes],
    counters: &[Bytes],
    shard: &Shard,
) -> Result<(), BytesMut> {
    let engine = &ctx.engine;
    if let Some(m) = ctx.router.migration() {
        for k in named {
            if let Err(e) = engine.ensure_moved(&m, k).await {
                return Err(error_bytes(&e.client_message(&engine.owner_name(k))));
            }
        }
    }
    for k in counters {
        if let Err(e) = engine.land(k).await {
            return Err(error_bytes(&e.client_message(&shard.name)));
        }
        engine.invalidate(k);
    }
    Ok(())
}
