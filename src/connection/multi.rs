//! Multi-key commands: MGET, MSET, DEL, UNLINK, EXISTS, TOUCH split by place (the shard in
//! a ring, the slot in a cluster: `Topology::place`), sent in parallel, merged (values in
//! key order, integers summed, `+OK` when every shard says so).
//!
//! The common case is not a barrier: when no key needs its lane (MGET keys are cached or
//! unknown to the engine; writes touch no key with unflushed increments), the per-shard
//! pieces are queued at dispatch on the client's own connections, in order with its other
//! commands, and merged when the reply's turn comes ([`Gather`]). Otherwise the command
//! runs as a barrier task: lane reads or landings first, then the same pieces.
//!
//! An MGET's cache lookups are made once and counted once (`cache_hits`, `cache_misses`):
//! the cache-only path hands what it found to `plan`, and the plan that answers counts
//! its lookups when its pieces are sent (a barrier plans again when it runs).
//!
//! Owns splitting and merging. Does not own the per-key counter semantics (`counter`) or
//! the connection's ordering rules (`connection`).

use super::{
    await_reply, error_bytes, redirect, send, write_counter_read, BackendRx, Client, Pending,
    MEMORY_MODE,
};
use crate::backend::{encode_command, BackendError, Reply, Shard};
use crate::command::{self, Merge, Spec};
use crate::context::Context;
use crate::counter::{Cached, Engine};
use crate::resp::reply::{self, Proto};
use crate::router::Topology;
use bytes::{Bytes, BytesMut};
use redis_protocol::resp2::types::BytesFrame;
use std::sync::Arc;
use tokio::time::Instant;

/// A multi-key command in flight: its pieces, and what is already known.
pub struct Gather {
    merge: Merge,
    /// The key of each slot (one slot per key, in request order).
    keys: Vec<Bytes>,
    /// The replies of the first keys, answered from the cache at dispatch ([`Head`]).
    head: Head,
    /// Values known before any piece returns (MGET of cached counter keys); none for the
    /// head's keys.
    values: Vec<Option<Bytes>>,
    parts: Vec<Part>,
    /// Invalidation epoch when the pieces were sent (see `Engine::offer_read`).
    epoch: u64,
    /// The client's protocol, for the merged reply.
    proto: Proto,
    /// The client's id (its pool connections), for pieces a cluster redirects.
    client: u64,
}

struct Part {
    shard: Arc<Shard>,
    rx: Option<BackendRx>,
    /// The piece as sent, to send again where a cluster redirects it.
    frame: Bytes,
    sent: Instant,
    slots: Vec<usize>,
}

impl Gather {
    /// Whether the command may change counter keys (anything but MGET).
    pub fn is_write(&self) -> bool {
        self.merge != Merge::Values
    }
}

/// Where each key goes: answered now, through its lane, or as a plain piece per place.
struct Plan {
    keys: Vec<Bytes>,
    head: Head,
    values: Vec<Option<Bytes>>,
    lane: Vec<usize>,
    pieces: Pieces,
    /// The cache lookups made for this plan (the head's too), counted when it is sent.
    hits: u64,
    misses: u64,
}

/// An MGET's first keys, whose replies [`all_cached`] found in the cache before it met one
/// it could not answer: their replies as encoded, so that no key is looked up twice.
#[derive(Default)]
struct Head {
    keys: usize,
    replies: Bytes,
}

/// The keys' positions grouped by [`Topology::place`] (the unit served whole by one
/// command: the shard in a ring, the slot in a cluster), in order of each place's first key.
#[derive(Default)]
struct Pieces {
    places: Vec<usize>,
    keys: Vec<Vec<usize>>,
    /// Place -> piece, built once there are more pieces than a scan should walk (a cluster
    /// MGET may touch thousands of slots).
    index: Option<std::collections::HashMap<usize, usize>>,
}

impl Pieces {
    const SCAN: usize = 16;

    fn push(&mut self, place: usize, key: usize) {
        let found = match &self.index {
            Some(index) => index.get(&place).copied(),
            None => self.places.iter().position(|&p| p == place),
        };
        let i = found.unwrap_or_else(|| {
            self.places.push(place);
            self.keys.push(Vec::new());
            let i = self.places.len() - 1;
            match &mut self.index {
                Some(index) => {
                    index.insert(place, i);
                }
                None if self.places.len() > Self::SCAN => {
                    self.index = Some(self.places.iter().copied().zip(0..).collect());
                }
                None => {}
            }
            i
        });
        self.keys[i].push(key);
    }
}

/// Plans a command. `known` is what [`all_cached`] learned of an MGET (its head, and the
/// lookup of the key after it when it made one); the plan starts after the head.
fn plan(
    ctx: &Context,
    topo: &Topology,
    merge: Merge,
    args: &[Bytes],
    proto: Proto,
    known: Option<(Head, Option<Cached>)>,
) -> Plan {
    let step = if merge == Merge::Pairs { 2 } else { 1 };
    let keys: Vec<Bytes> = args[1..].iter().step_by(step).cloned().collect();
    let (head, mut next) = known.unwrap_or_default();
    let mut p = Plan {
        values: vec![None; keys.len()],
        lane: Vec::new(),
        pieces: Pieces::default(),
        keys,
        hits: head.keys as u64,
        misses: 0,
        head,
    };
    let engine = &ctx.engine;
    for (slot, k) in p.keys.iter().enumerate().skip(p.head.keys) {
        if engine.is_batched(k) {
            if merge == Merge::Values {
                let found = next.take().unwrap_or_else(|| engine.lookup(k));
                if matches!(found, Cached::Hit(_)) {
                    p.hits += 1;
                } else {
                    p.misses += 1;
                }
                match found {
                    Cached::Hit(v) => {
                        let mut o = BytesMut::new();
                        match v {
                            Some(v) => reply::bulk_int(&mut o, v),
                            None => reply::null(&mut o, proto),
                        }
                        p.values[slot] = Some(o.freeze());
                        continue;
                    }
                    Cached::Stale => {
                        p.lane.push(slot);
                        continue;
                    }
                    Cached::Absent => {}
                }
            } else if engine.has_unflushed(k) {
                p.lane.push(slot);
            }
        }
        // One piece per place: per shard in a ring, per slot in a cluster (a node refuses a
        // command whose keys span slots).
        p.pieces.push(topo.place(k), slot);
    }
    p
}

/// Queues one piece per place on the client's connections.
fn send_parts(
    ctx: &Context,
    (client, proto): (u64, Proto),
    topo: &Topology,
    spec: &Spec,
    merge: Merge,
    args: &[Bytes],
    p: Plan,
) -> Gather {
    let name = Bytes::copy_from_slice(spec.name.to_ascii_uppercase().as_bytes());
    // Counted here, by the plan that answers (a barrier plans again once it runs).
    ctx.engine.count_reads(p.hits, p.misses);
    let epoch = ctx.engine.invalidation_epoch();
    if merge != Merge::Values {
        for k in &p.keys {
            if ctx.engine.is_batched(k) {
                ctx.engine.invalidate(k);
            }
        }
    }
    let parts = p
        .pieces
        .keys
        .into_iter()
        .map(|slots| {
            let shard = topo.shard_for(&p.keys[slots[0]]).clone();
            let mut cmd = Vec::with_capacity(1 + slots.len() * 2);
            cmd.push(name.clone());
            for &s in &slots {
                cmd.push(p.keys[s].clone());
                if merge == Merge::Pairs {
                    cmd.push(args[2 + 2 * s].clone());
                }
            }
            let frame = encode_command(&cmd);
            Part {
                rx: send(&shard, client, proto, frame.clone()),
                frame,
                shard,
                sent: Instant::now(),
                slots,
            }
        })
        .collect();
    Gather {
        merge,
        keys: p.keys,
        head: p.head,
        values: p.values,
        parts,
        epoch,
        proto,
        client,
    }
}

/// Starts a multi-key command: an immediate reply, a [`Gather`], or a barrier task.
pub(crate) fn dispatch(
    ctx: &Arc<Context>,
    client: &Client,
    spec: &'static Spec,
    merge: Merge,
    args: Vec<Bytes>,
    out: &mut BytesMut,
) -> Option<Pending> {
    if merge == Merge::Pairs && args.len().is_multiple_of(2) {
        reply::error(out, &command::arity_error(spec.name));
        return None;
    }
    let engine = &ctx.engine;
    // The cache-only path, outside memory mode (below) and rebalances (whose keys may
    // have to move first: `plan` and the barrier see to that).
    let mut known = None;
    if merge == Merge::Values
        && !client.writes_in_flight
        && !engine.is_memory_mode()
        && !ctx.router.rebalancing()
    {
        match all_cached(engine, &args, client.proto, out) {
            Ok(()) => return None,
            Err(k) => known = Some(k),
        }
    }
    let topo = ctx.router.topology();
    if topo.is_empty() {
        if merge != Merge::Values {
            reply::error(out, MEMORY_MODE);
            return None;
        }
        reply::array(out, args.len() - 1);
        for k in &args[1..] {
            match engine.lookup(k) {
                Cached::Hit(Some(v)) => reply::bulk_int(out, v),
                _ => reply::null(out, client.proto),
            }
        }
        engine.count_reads(args.len() as u64 - 1, 0);
        return None;
    }
    let who = (client.id, client.proto);
    let p = plan(ctx, &topo, merge, &args, client.proto, known);
    let moving = ctx.router.rebalancing() && p.keys.iter().any(|k| engine.needs_move(k));
    if p.lane.is_empty() && !client.writes_in_flight && !moving {
        return Some(Pending::Gather(send_parts(
            ctx, who, &topo, spec, merge, &args, p,
        )));
    }
    let ctx = ctx.clone();
    Some(Pending::Task(Box::pin(async move {
        run_barrier(&ctx, who, spec, merge, args).await
    })))
}

/// MGET whose keys are all fresh in the counter cache (the common case for counters read
/// in bulk): the reply is written straight into `out`, with no piece, no per-key buffer and
/// no merge, and the hits counted in one addition. Not outside memory mode or during a
/// rebalance (the caller's checks). At the first key that is not a hit, `out` is as it was
/// and the error holds what was learned for `plan`: the replies so far (the head) and that
/// key's lookup (None when it is not a counter key: nothing was looked up).
fn all_cached(
    engine: &Engine,
    args: &[Bytes],
    proto: Proto,
    out: &mut BytesMut,
) -> Result<(), (Head, Option<Cached>)> {
    let start = out.len();
    reply::array(out, args.len() - 1);
    let first = out.len();
    for (i, k) in args[1..].iter().enumerate() {
        let found = if engine.is_batched(k) {
            Some(engine.lookup(k))
        } else {
            None
        };
        match found {
            Some(Cached::Hit(Some(v))) => reply::bulk_int(out, v),
            Some(Cached::Hit(None)) => reply::null(out, proto),
            other => {
                // A copy: a split would leave `out` shared, and its next write a copy.
                let head = Head {
                    keys: i,
                    replies: Bytes::copy_from_slice(&out[first..]),
                };
                out.truncate(start);
                return Err((head, other));
            }
        }
    }
    engine.count_reads(args.len() as u64 - 1, 0);
    Ok(())
}

/// The barrier path: lane reads (MGET of stale counter keys) or landings (writes to keys
/// with unflushed increments) first, then the pieces.
async fn run_barrier(
    ctx: &Context,
    client: (u64, Proto),
    spec: &'static Spec,
    merge: Merge,
    args: Vec<Bytes>,
) -> BytesMut {
    let topo = ctx.router.topology();
    let engine = &ctx.engine;
    // During a rebalance, keys still on their old owner move first.
    if let Some(m) = ctx.router.migration() {
        let step = if merge == Merge::Pairs { 2 } else { 1 };
        for k in args[1..].iter().step_by(step) {
            if let Err(e) = engine.ensure_moved(&m, k).await {
                return error_bytes(&e.client_message(&engine.owner_name(k)));
            }
        }
    }
    let mut p = plan(ctx, &topo, merge, &args, client.1, None);
    let lane = std::mem::take(&mut p.lane);
    if merge == Merge::Values {
        let keys = p.keys.clone();
        let g = send_parts(ctx, client, &topo, spec, merge, &args, p);
        let reads = super::join_all(lane.iter().map(|&slot| {
            let k = keys[slot].clone();
            async move {
                let mut o = BytesMut::new();
                write_counter_read(engine, &k, client.1, &mut o).await;
                (slot, o.freeze())
            }
        }))
        .await;
        let mut g = g;
        for (slot, v) in reads {
            g.values[slot] = Some(v);
        }
        return finish(g, ctx).await;
    }
    let landed = super::join_all(lane.iter().map(|&s| engine.land(&p.keys[s]))).await;
    for (&s, r) in lane.iter().zip(landed) {
        if let Err(e) = r {
            return error_bytes(&e.client_message(&topo.shard_for(&p.keys[s]).name));
        }
    }
    finish(send_parts(ctx, client, &topo, spec, merge, &args, p), ctx).await
}

/// Awaits every piece and merges the replies.
pub(crate) async fn finish(g: Gather, ctx: &Context) -> BytesMut {
    let engine = &ctx.engine;
    let Gather {
        merge,
        keys,
        head,
        mut values,
        mut parts,
        epoch,
        proto,
        client,
    } = g;
    let mut replies: Vec<Result<Reply, BackendError>> = Vec::with_capacity(parts.len());
    for part in &mut parts {
        let r = await_reply(part.rx.take(), &part.shard, part.sent).await;
        let (r, shard) = redirect::follow(ctx, r, &part.shard, &part.frame, client, proto).await;
        part.shard = shard;
        replies.push(r);
    }
    if merge != Merge::Values {
        // The write may have changed counter keys: forget their bases again now it ran.
        for k in &keys {
            if engine.is_batched(k) {
                engine.invalidate(k);
            }
        }
    }
    let mut out = BytesMut::new();
    let mut sum = 0i64;
    for (part, res) in parts.iter().zip(replies) {
        let (shard, slots) = (&part.shard, &part.slots);
        let r = match res {
            Ok(r) => r,
            Err(e) => return error_bytes(&e.client_message(&shard.name)),
        };
        match (merge, &r.frame) {
            (Merge::Values, BytesFrame::Array(items)) if items.len() == slots.len() => {
                for (&slot, item) in slots.iter().zip(items) {
                    if engine.is_batched(&keys[slot]) {
                        engine.offer_read(&keys[slot], item, epoch);
                    }
                    let mut o = BytesMut::new();
                    encode_frame(&mut o, item, proto);
                    values[slot] = Some(o.freeze());
                }
            }
            (Merge::Sum, BytesFrame::Integer(n)) => sum += n,
            (Merge::Pairs, BytesFrame::SimpleString(_)) => {}
            _ if r.error().is_some() => return BytesMut::from(&r.raw[..]),
            _ => return error_bytes(&format!("ERR unexpected reply from shard {}", shard.name)),
        }
    }
    match merge {
        Merge::Values => {
            reply::array(&mut out, values.len());
            out.extend_from_slice(&head.replies);
            for v in values.into_iter().skip(head.keys) {
                out.extend_from_slice(&v.expect("every MGET slot past the head is filled"));
            }
        }
        Merge::Sum => reply::int(&mut out, sum),
        Merge::Pairs => reply::ok(&mut out),
    }
    out
}

/// Encodes a decoded frame back for the client (for the pieces of a merged MGET, whose
/// values are strings or nulls: the two protocols differ only in the null).
fn encode_frame(out: &mut BytesMut, f: &BytesFrame, proto: Proto) {
    match f {
        BytesFrame::SimpleString(s) => reply::simple(out, &String::from_utf8_lossy(s)),
        BytesFrame::Error(e) => reply::error(out, e),
        BytesFrame::Integer(i) => reply::int(out, *i),
        BytesFrame::BulkString(b) => reply::bulk(out, b),
        BytesFrame::Null => reply::null(out, proto),
        BytesFrame::Array(items) => {
            reply::array(out, items.len());
            for i in items {
                encode_frame(out, i, proto);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Pieces;

    /// Keys grouped by place in order of each place's first key, the same whether the
    /// pieces are found by a scan or (past `Pieces::SCAN`) by the index.
    #[test]
    fn pieces_group_keys_by_place_in_first_key_order() {
        let mut few = Pieces::default();
        for (key, place) in [2, 0, 2, 1, 0].into_iter().enumerate() {
            few.push(place, key);
        }
        assert_eq!(few.places, vec![2, 0, 1]);
        assert_eq!(few.keys, vec![vec![0, 2], vec![1, 4], vec![3]]);
        assert!(few.index.is_none());

        let mut many = Pieces::default();
        let places: Vec<usize> = (0..3000).map(|k| (k * 7919) % 1000).collect();
        for (key, &place) in places.iter().enumerate() {
            many.push(place, key);
        }
        assert!(many.index.is_some());
        assert_eq!(many.places.len(), 1000);
        for (piece, keys) in many.keys.iter().enumerate() {
            assert!(keys.iter().all(|&k| places[k] == many.places[piece]));
            assert!(keys.windows(2).all(|w| w[0] < w[1]));
        }
        let firsts: Vec<usize> = many.keys.iter().map(|k| k[0]).collect();
        assert!(firsts.windows(2).all(|w| w[0] < w[1]), "first-key order");
        assert_eq!(many.keys.iter().map(Vec::len).sum::<usize>(), 3000);
    }
}
