//! The whole keyspace over every shard: SCAN, KEYS, RANDOMKEY, DBSIZE, FLUSHDB, FLUSHALL.
//! The proxy's own `tally:` keys never appear in a listing or a count.
//!
//! **SCAN's cursor** names a step of a *plan* and the shard's own cursor:
//! `cursor = tag << 43 | step << 36 | shard_cursor` (below 2^53, so JavaScript clients that
//! hold cursors as numbers keep them exact). The plan is the shard list in topology order;
//! during a rebalance it is the old shards, then the new ones (see below). `tag` (10 bits)
//! is the plan's identity: `2 × topology version` normally, `2 × new version + 1` during a
//! rebalance. A cursor whose tag is not the current plan's (the shard list changed between
//! two calls) restarts the iteration from the beginning of the current plan: every key
//! present throughout is still returned, and keys returned before the change may be
//! returned again (Redis's SCAN allows repeats too). A step past the plan, or a shard
//! cursor of 2^36 or more, is `ERR invalid cursor`. A step ends when its shard's cursor
//! comes back 0, and the last step's end is cursor 0.
//!
//! **During a rebalance** keys move from their old owner to the new one, so a shard visited
//! early could miss a key that moves into it later, and a shard visited late could hold a
//! key already returned elsewhere. The plan avoids both: first each *old* shard, reporting
//! the keys whose owner did not change and *moving* (`Engine::ensure_moved`, then landing a
//! counter's value) each key whose owner changed, without reporting it; then, after landing
//! every pending delta (moved counter values included), each *new* shard, reporting only
//! the keys whose owner changed. A key present throughout whose owner did not change is on
//! its shard during the first part and reported there once; one whose owner changed is on
//! its new owner by the end of the first part (moved by the mover, or by the SCAN itself
//! when it met the key) and stays there, so the second part reports it once.
//!
//! KEYS asks every shard (during a rebalance: the old shards, then, after landing pending
//! deltas, the new ones) and removes duplicates. DBSIZE sums a per-shard script that
//! subtracts the shard's `tally:*` keys (which makes it O(N) on each shard, where Redis's is
//! O(1)). KEYS, DBSIZE and a SCAN at cursor 0 first land pending increments, so a counter
//! incremented only through the proxy is listed and counted. RANDOMKEY tries the shards in a
//! random order, retrying a `tally:` answer a bounded number of times before a bounded SCAN
//! of that shard. FLUSHDB and FLUSHALL go through the engine (`counter::forget`) and are
//! refused during a rebalance.
//!
//! Owns these fan-outs. Does not own placement (`router`) or the moving of keys (`counter`).

use super::{call, error_bytes, join_all, Client, Pending, MEMORY_MODE};
use crate::backend::{BackendError, Reply, Shard};
use crate::command::KeyspaceOp;
use crate::context::Context;
use crate::counter::forget::Flush;
use crate::resp::reply::{self, Proto};
use crate::router::Migration;
use bytes::{Bytes, BytesMut};
use redis_protocol::resp2::types::BytesFrame;
use std::collections::HashSet;
use std::sync::Arc;

const SHARD_BITS: u32 = 36;
const STEP_BITS: u32 = 7;
const TAG_BITS: u32 = 10;
const INVALID_CURSOR: &str = "ERR invalid cursor";
pub const FLUSH_DURING_REBALANCE: &str =
    "ERR FLUSHDB and FLUSHALL are not served while a rebalance is under way; try again when it has finished";
/// RANDOMKEY answers from one shard that were the proxy's own keys, before that shard is
/// scanned for another key instead.
const RANDOM_TRIES: usize = 8;
/// SCAN calls (COUNT 100) spent looking for a key that is not the proxy's on one shard.
const RANDOM_SCANS: usize = 10;
/// DBSIZE without the proxy's own keys.
const DBSIZE_SCRIPT: &str = "return redis.call('DBSIZE') - #redis.call('KEYS', 'tally:*')";

fn is_own(key: &[u8]) -> bool {
    key.starts_with(b"tally:")
}

pub(super) fn dispatch(
    ctx: &Arc<Context>,
    client: &Client,
    op: KeyspaceOp,
    args: Vec<Bytes>,
    out: &mut BytesMut,
) -> Option<Pending> {
    if ctx.router.topology().is_empty() {
        if op == KeyspaceOp::DbSize {
            reply::int(out, ctx.engine.key_count() as i64);
        } else {
            reply::error(out, MEMORY_MODE);
        }
        return None;
    }
    let (ctx, id, proto) = (ctx.clone(), client.id, client.proto);
    let flush = match op {
        KeyspaceOp::FlushDb | KeyspaceOp::FlushAll => match flush_args(op, &args) {
            Ok(f) => Some(f),
            Err(e) => {
                reply::error(out, e);
                return None;
            }
        },
        _ => None,
    };
    Some(Pending::Task(Box::pin(async move {
        let mut o = BytesMut::new();
        let r = match op {
            KeyspaceOp::Scan => scan(&ctx, id, proto, &args, &mut o).await,
            KeyspaceOp::Keys => keys(&ctx, id, proto, &args[1], &mut o).await,
            KeyspaceOp::RandomKey => random_key(&ctx, id, proto, &mut o).await,
            KeyspaceOp::DbSize => dbsize(&ctx, id, proto, &mut o).await,
            KeyspaceOp::FlushDb | KeyspaceOp::FlushAll => {
                forget(&ctx, flush.as_ref().expect("parsed above"), &mut o).await
            }
        };
        match r {
            Ok(()) => o,
            Err(e) => e,
        }
    })))
}

/// A reply that ends the command early: an error, or a shard's own error reply.
type Early = BytesMut;

fn shard_reply(r: Result<Reply, BackendError>, shard: &Shard) -> Result<BytesFrame, Early> {
    match r {
        Ok(r) if r.error().is_some() => Err(BytesMut::from(&r.raw[..])),
        Ok(r) => Ok(r.frame),
        Err(e) => Err(error_bytes(&e.client_message(&shard.name))),
    }
}

/// The shards a listing visits: the current ones, or during a rebalance the old and the
/// new ones (each once, old first).
fn all_shards(ctx: &Context) -> Vec<Arc<Shard>> {
    match ctx.router.migration() {
        Some(m) => {
            let mut v: Vec<Arc<Shard>> = m.old.shards.clone();
            for s in &m.new.shards {
                if !v.iter().any(|o| o.name == s.name) {
                    v.push(s.clone());
                }
            }
            v.retain(|s| !m.is_lost(&s.name));
            v
        }
        None => ctx.router.topology().shards.clone(),
    }
}

// ---- SCAN ----

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    /// No rebalance: every key found.
    All,
    /// An old shard during a rebalance: keys that stay are reported, keys that move are
    /// moved and not reported.
    Stay,
    /// A new shard during a rebalance: keys that moved in are reported.
    Arrived,
}

struct Plan {
    tag: u64,
    steps: Vec<(Arc<Shard>, Phase)>,
    migration: Option<Arc<Migration>>,
}

fn plan(ctx: &Context) -> Plan {
    let mask = (1u64 << TAG_BITS) - 1;
    match ctx.router.migration() {
        Some(m) => {
            let mut steps: Vec<_> = m
                .old
                .shards
                .iter()
                .map(|s| (s.clone(), Phase::Stay))
                .collect();
            steps.extend(m.new.shards.iter().map(|s| (s.clone(), Phase::Arrived)));
            Plan {
                tag: (2 * m.new.version + 1) & mask,
                steps,
                migration: Some(m),
            }
        }
        None => {
            let t = ctx.router.topology();
            Plan {
                tag: (2 * t.version) & mask,
                steps: t.shards.iter().map(|s| (s.clone(), Phase::All)).collect(),
                migration: None,
            }
        }
    }
}

/// A cursor's parts: (tag, step, shard cursor).
fn decode(c: u64) -> (u64, usize, u64) {
    (
        c >> (SHARD_BITS + STEP_BITS),
        ((c >> SHARD_BITS) & ((1 << STEP_BITS) - 1)) as usize,
        c & ((1 << SHARD_BITS) - 1),
    )
}

fn encode(tag: u64, step: usize, shard_cursor: u64) -> u64 {
    tag << (SHARD_BITS + STEP_BITS) | (step as u64) << SHARD_BITS | shard_cursor
}

/// Redis's rule for a cursor: an unsigned 64-bit decimal number.
fn parse_cursor(b: &[u8]) -> Option<u64> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

async fn scan(
    ctx: &Arc<Context>,
    id: u64,
    proto: Proto,
    args: &[Bytes],
    out: &mut BytesMut,
) -> Result<(), Early> {
    let Some(cursor) = parse_cursor(&args[1]) else {
        return Err(error_bytes(INVALID_CURSOR));
    };
    let plan = plan(ctx);
    if plan.steps.len() >= 1 << STEP_BITS {
        return Err(error_bytes(
            "ERR SCAN through tallyproxy supports at most 127 shard steps",
        ));
    }
    let (tag, mut step, mut shard_cursor) = decode(cursor);
    if cursor == 0 || tag != plan.tag || cursor >= 1 << (SHARD_BITS + STEP_BITS + TAG_BITS) {
        // A new iteration, or one begun under another shard list: from the beginning.
        (step, shard_cursor) = (0, 0);
    } else if step >= plan.steps.len() {
        return Err(error_bytes(INVALID_CURSOR));
    }
    let first_arrived = plan.steps.iter().position(|(_, p)| *p == Phase::Arrived);
    let mut found = Vec::new();
    // A shard that finishes with nothing to report hands on to the next one in the same
    // call (so an empty keyspace answers cursor 0 at once, as Redis does); at most one
    // call per step.
    let cursor = loop {
        if shard_cursor == 0 && (step == 0 || Some(step) == first_arrived) {
            // Counters incremented only through the proxy (and values a rebalance moved)
            // exist on their shards from here on. A shard that is down fails below.
            ctx.engine.flush_all().await;
        }
        let (shard, phase) = plan.steps[step].clone();
        let lost = plan
            .migration
            .as_ref()
            .is_some_and(|m| m.is_lost(&shard.name));
        let next = if lost {
            0
        } else {
            scan_step(
                ctx,
                id,
                proto,
                args,
                &shard,
                phase,
                &plan,
                shard_cursor,
                &mut found,
            )
            .await?
        };
        if next != 0 {
            break encode(plan.tag, step, next);
        }
        if step + 1 == plan.steps.len() {
            break 0;
        }
        (step, shard_cursor) = (step + 1, 0);
        if !found.is_empty() {
            break encode(plan.tag, step, 0);
        }
    };
    reply::array(out, 2);
    reply::bulk(out, cursor.to_string().as_bytes());
    reply::array(out, found.len());
    for k in &found {
        reply::bulk(out, k);
    }
    Ok(())
}

/// One SCAN call on `shard` at `shard_cursor`; the keys to report join `found`. Returns the
/// shard's next cursor.
#[allow(clippy::too_many_arguments)]
async fn scan_step(
    ctx: &Context,
    id: u64,
    proto: Proto,
    args: &[Bytes],
    shard: &Arc<Shard>,
    phase: Phase,
    plan: &Plan,
    shard_cursor: u64,
    found: &mut Vec<Bytes>,
) -> Result<u64, Early> {
    let mut cmd = Vec::with_capacity(args.len());
    cmd.push(Bytes::from_static(b"SCAN"));
    cmd.push(Bytes::from(shard_cursor.to_string()));
    cmd.extend_from_slice(&args[2..]);
    let frame = shard_reply(call(shard, id, proto, &cmd).await, shard)?;
    let (next, keys) = scan_reply(frame).ok_or_else(|| {
        error_bytes(&format!(
            "ERR unexpected SCAN reply from shard {}",
            shard.name
        ))
    })?;
    if next >= 1 << SHARD_BITS {
        return Err(error_bytes(&format!(
            "ERR shard {} answered a SCAN cursor too large for tallyproxy",
            shard.name
        )));
    }
    for k in keys {
        if is_own(&k) {
            continue;
        }
        let report = match (phase, &plan.migration) {
            (Phase::All, _) | (_, None) => true,
            (Phase::Stay, Some(m)) => {
                if m.owner_changed(&k) {
                    move_now(ctx, m, &k).await?;
                    false
                } else {
                    true
                }
            }
            (Phase::Arrived, Some(m)) => m.owner_changed(&k),
        };
        if report {
            found.push(k);
        }
    }
    Ok(next)
}

/// Moves `key` to its new owner now, and lands a counter's moved value there, so that the
/// second part of the plan finds it.
async fn move_now(ctx: &Context, m: &Migration, key: &Bytes) -> Result<(), Early> {
    let fail = |e: crate::counter::lane::LaneError| {
        error_bytes(&e.client_message(&ctx.engine.owner_name(key)))
    };
    ctx.engine.ensure_moved(m, key).await.map_err(fail)?;
    ctx.engine.land(key).await.map_err(fail)
}

fn scan_reply(frame: BytesFrame) -> Option<(u64, Vec<Bytes>)> {
    let BytesFrame::Array(mut top) = frame else {
        return None;
    };
    if top.len() != 2 {
        return None;
    }
    let BytesFrame::Array(keys) = top.pop()? else {
        return None;
    };
    let BytesFrame::BulkString(c) = top.pop()? else {
        return None;
    };
    let keys = keys
        .into_iter()
        .map(|k| match k {
            BytesFrame::BulkString(b) => Some(b),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    Some((parse_cursor(&c)?, keys))
}

// ---- KEYS, RANDOMKEY, DBSIZE ----

async fn keys(
    ctx: &Arc<Context>,
    id: u64,
    proto: Proto,
    pattern: &Bytes,
    out: &mut BytesMut,
) -> Result<(), Early> {
    ctx.engine.flush_all().await;
    let cmd = [Bytes::from_static(b"KEYS"), pattern.clone()];
    let rounds: Vec<Vec<Arc<Shard>>> = match ctx.router.migration() {
        // Old owners first; then, with moved values landed, the new owners (see the top).
        Some(m) => vec![m.old.shards.clone(), m.new.shards.clone()],
        None => vec![ctx.router.topology().shards.clone()],
    };
    let dedupe = rounds.len() > 1;
    let mut seen = HashSet::new();
    let mut found = Vec::new();
    for (i, shards) in rounds.iter().enumerate() {
        if i > 0 {
            ctx.engine.flush_all().await;
        }
        let replies = join_all(shards.iter().map(|s| call(s, id, proto, &cmd))).await;
        for (r, s) in replies.into_iter().zip(shards) {
            let BytesFrame::Array(items) = shard_reply(r, s)? else {
                return Err(error_bytes(&format!(
                    "ERR unexpected KEYS reply from shard {}",
                    s.name
                )));
            };
            for item in items {
                if let BytesFrame::BulkString(k) = item {
                    if !is_own(&k) && (!dedupe || seen.insert(k.clone())) {
                        found.push(k);
                    }
                }
            }
        }
    }
    reply::array(out, found.len());
    for k in &found {
        reply::bulk(out, k);
    }
    Ok(())
}

async fn random_key(
    ctx: &Arc<Context>,
    id: u64,
    proto: Proto,
    out: &mut BytesMut,
) -> Result<(), Early> {
    let mut shards = all_shards(ctx);
    // A random order (Fisher-Yates on a clock-seeded xorshift: no secret is at stake).
    let mut x = crate::counter::now_micros() | 1;
    for i in (1..shards.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        shards.swap(i, (x % (i as u64 + 1)) as usize);
    }
    for s in &shards {
        if let Some(k) = random_on(s, id, proto).await? {
            reply::bulk(out, &k);
            return Ok(());
        }
    }
    reply::null(out, proto);
    Ok(())
}

/// A key of `shard` that is not the proxy's own, if it has one.
async fn random_on(s: &Arc<Shard>, id: u64, proto: Proto) -> Result<Option<Bytes>, Early> {
    let cmd = [Bytes::from_static(b"RANDOMKEY")];
    for _ in 0..RANDOM_TRIES {
        match shard_reply(call(s, id, proto, &cmd).await, s)? {
            BytesFrame::BulkString(k) if !is_own(&k) => return Ok(Some(k)),
            BytesFrame::BulkString(_) => continue,
            _ => return Ok(None),
        }
    }
    // Mostly the proxy's own keys: look for another one, a bounded number of steps.
    let mut cursor = 0u64;
    for _ in 0..RANDOM_SCANS {
        let cmd = [
            Bytes::from_static(b"SCAN"),
            Bytes::from(cursor.to_string()),
            Bytes::from_static(b"COUNT"),
            Bytes::from_static(b"100"),
        ];
        let frame = shard_reply(call(s, id, proto, &cmd).await, s)?;
        let Some((next, keys)) = scan_reply(frame) else {
            return Ok(None);
        };
        if let Some(k) = keys.into_iter().find(|k| !is_own(k)) {
            return Ok(Some(k));
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    Ok(None)
}

async fn dbsize(
    ctx: &Arc<Context>,
    id: u64,
    proto: Proto,
    out: &mut BytesMut,
) -> Result<(), Early> {
    ctx.engine.flush_all().await;
    let shards = all_shards(ctx);
    let cmd = [
        Bytes::from_static(b"EVAL"),
        Bytes::from_static(DBSIZE_SCRIPT.as_bytes()),
        Bytes::from_static(b"0"),
    ];
    let replies = join_all(shards.iter().map(|s| call(s, id, proto, &cmd))).await;
    let mut sum = 0i64;
    for (r, s) in replies.into_iter().zip(&shards) {
        match shard_reply(r, s)? {
            BytesFrame::Integer(n) => sum += n,
            _ => {
                return Err(error_bytes(&format!(
                    "ERR unexpected DBSIZE reply from shard {}",
                    s.name
                )))
            }
        }
    }
    reply::int(out, sum);
    Ok(())
}

// ---- FLUSHDB, FLUSHALL ----

fn flush_args(op: KeyspaceOp, args: &[Bytes]) -> Result<Flush, &'static str> {
    let command = if op == KeyspaceOp::FlushAll {
        "FLUSHALL"
    } else {
        "FLUSHDB"
    };
    let mode = match args.len() {
        1 => None,
        2 if args[1].eq_ignore_ascii_case(b"async") || args[1].eq_ignore_ascii_case(b"sync") => {
            Some(Bytes::from(args[1].to_ascii_uppercase()))
        }
        _ => return Err("ERR syntax error"),
    };
    Ok(Flush { command, mode })
}

async fn forget(ctx: &Arc<Context>, flush: &Flush, out: &mut BytesMut) -> Result<(), Early> {
    if ctx.router.migration().is_some() {
        return Err(error_bytes(FLUSH_DURING_REBALANCE));
    }
    ctx.engine
        .forget_all(flush)
        .await
        .map_err(|e| error_bytes(&e))?;
    reply::ok(out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_below_2_pow_53() {
        let c = encode(1023, 127, (1 << SHARD_BITS) - 1);
        assert!(c < 1 << 53);
        assert_eq!(decode(c), (1023, 127, (1 << SHARD_BITS) - 1));
        assert_eq!(decode(encode(6, 1, 0)), (6, 1, 0));
        assert_eq!(parse_cursor(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_cursor(b"18446744073709551616"), None);
        assert_eq!(parse_cursor(b"-1"), None);
        assert_eq!(parse_cursor(b""), None);
        assert_eq!(parse_cursor(b"1a"), None);
    }

    #[test]
    fn flush_modes_as_redis() {
        let a = |v: &[&str]| {
            v.iter()
                .map(|s| Bytes::from(s.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            flush_args(KeyspaceOp::FlushDb, &a(&["flushdb"]))
                .unwrap()
                .mode,
            None
        );
        let f = flush_args(KeyspaceOp::FlushAll, &a(&["flushall", "async"])).unwrap();
        assert_eq!(
            (f.command, f.mode.as_deref()),
            ("FLUSHALL", Some(&b"ASYNC"[..]))
        );
        assert_eq!(
            flush_args(KeyspaceOp::FlushDb, &a(&["flushdb", "x"])).unwrap_err(),
            "ERR syntax error"
        );
        assert!(flush_args(KeyspaceOp::FlushDb, &a(&["flushdb", "sync", "async"])).is_err());
    }
}
