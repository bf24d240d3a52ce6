//! Transactions: MULTI, EXEC, DISCARD, WATCH, UNWATCH, when every key of the transaction
//! (and of its WATCH) lives on one shard.
//!
//! Commands after MULTI are checked and queued here, in the proxy, and answered `+QUEUED`
//! as Redis does: an unknown command, a wrong arity, a refused command or a key on another
//! shard than the transaction's (`CROSSSLOT`) is answered with its error at once and makes
//! EXEC answer `EXECABORT`, as Redis does. EXEC then sends `MULTI`, the queued commands and
//! `EXEC` in one write on a dedicated connection to the shard (`backend::dedicated`), and
//! answers the shard's EXEC reply. WATCH opens that connection first and keeps it, pinned,
//! until EXEC, DISCARD, UNWATCH, RESET or the client leaves; without WATCH it exists only
//! for the EXEC. Nothing of a transaction goes through the shared pool, so no other
//! client's command can land inside it.
//!
//! Commands the proxy answers itself (PING, ECHO, TIME, CLIENT SETNAME, ...) are queued too
//! and answered in EXEC's array at their place (run when EXEC is dispatched, before the
//! shard's part; they touch no key). HELLO, subscriptions, SCRIPT/FUNCTION management and
//! the TALLY queries are refused inside MULTI (they concern the connection or every shard).
//! PUBLISH and PUBSUB are queued and place the transaction on the pub/sub shard
//! (`pubsub::pubsub_shard`): a key of another shard, before or after, is refused with
//! `PUBLISH_ELSEWHERE` (one rule for both, `settle`).
//!
//! Counter keys keep their promises: at EXEC (and at WATCH, for the watched keys) keys still
//! on an old owner move and every pending increment of the transaction's counter keys lands
//! first; the commands, INCR and GET included, then run on the shard inside the
//! transaction, and the keys' cached bases are dropped before and after. No increment is
//! lost or doubled (buffered ones land once, the transaction's own are applied by the
//! shard once) and reads after EXEC see the transaction's effects. An increment buffered by
//! another client after a WATCH lands before EXEC, so it counts as a change of the watched
//! key: EXEC answers nil, as Redis would had it arrived there.
//!
//! A shard change between queueing and EXEC (a rebalance began) that gives any of its keys to
//! another shard makes EXEC answer `TRYAGAIN ...` and discard it: nothing runs on the old owner.
//!
//! Owns the transaction state of one client. Does not own the socket (`backend`).

use super::{
    error_bytes, local, pubsub, same_shard, Client, Pending, PendingTask, MEMORY_MODE, RESERVED,
};
use crate::backend::dedicated::{Dedicated, Permit};
use crate::backend::{encode_into, resp3, Shard};
use crate::command::{self, Kind, Merge, PubSubOp, Spec, TxnOp};
use crate::context::Context;
use crate::resp::reply::{self, Proto};
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use std::sync::Arc;

/// Commands one transaction may queue, and their bytes.
pub const MAX_QUEUED: usize = 10_000;
pub const MAX_QUEUED_BYTES: usize = 64 * 1024 * 1024;

pub const EXECABORT: &str = "EXECABORT Transaction discarded because of previous errors.";
pub const PUBLISH_ELSEWHERE: &str = "CROSSSLOT PUBLISH and PUBSUB inside MULTI run on the pub/sub shard (the first shard listed): every key of the transaction must live there";
pub const MOVED_MEANWHILE: &str = "TRYAGAIN the shards changed while the transaction was queued: its keys live elsewhere now; transaction discarded, run it again";

/// One client's transaction: from WATCH or MULTI to EXEC, DISCARD or UNWATCH.
#[derive(Default)]
pub struct Txn {
    /// MULTI was given: commands are queued.
    pub multi: bool,
    /// A command was refused at queue time: EXEC answers EXECABORT.
    aborted: bool,
    queued: Vec<Queued>,
    queued_bytes: usize,
    /// The shard every key so far lives on (the pub/sub shard when the transaction publishes).
    shard: Option<Arc<Shard>>,
    /// Their unit of placement (`Topology::place`: the shard, or a cluster's slot, since a
    /// cluster runs a transaction only on keys of one slot). None while only a PUBLISH has
    /// placed the transaction: it names a shard, not a unit.
    place: Option<usize>,
    /// A PUBLISH or PUBSUB is queued: the shard is the pub/sub shard.
    publishes: bool,
    keys: Vec<Bytes>,
    /// `keys` as a set: a hostile transaction of 10,000 commands costs no quadratic scan.
    seen: std::collections::HashSet<Bytes>,
    counters: Vec<Bytes>,
    /// The connection holding the WATCH, shared with the barrier tasks that use it.
    watch: Option<Arc<Mutex<Watch>>>,
}

#[derive(Default)]
struct Watch {
    conn: Option<Dedicated>,
    /// The connection broke or never opened: what was watched is unknown.
    lost: Option<String>,
}

enum Queued {
    Shard(Vec<Bytes>),
    Local(Vec<Bytes>),
}

/// An answer of a command the proxy runs itself, for EXEC's array.
enum Answer {
    Ready(BytesMut),
    Task(PendingTask),
}

/// MULTI, EXEC, DISCARD, WATCH and UNWATCH outside MULTI.
pub(super) fn dispatch(
    ctx: &Arc<Context>,
    client: &mut Client,
    op: TxnOp,
    args: Vec<Bytes>,
    out: &mut BytesMut,
) -> Option<Pending> {
    match op {
        TxnOp::Multi => {
            client.txn.get_or_insert_with(Box::default).multi = true;
            reply::ok(out);
            None
        }
        TxnOp::Exec => {
            reply::error(out, "ERR EXEC without MULTI");
            None
        }
        TxnOp::Discard => {
            reply::error(out, "ERR DISCARD without MULTI");
            None
        }
        TxnOp::Watch => watch(ctx, client, args, out),
        TxnOp::Unwatch => {
            let watch = client.txn.take().and_then(|t| t.watch);
            match watch {
                // After the WATCH tasks before it (a barrier), so that none re-arms it.
                Some(w) => Some(Pending::Task(Box::pin(async move {
                    w.lock().conn = None;
                    let mut o = BytesMut::new();
                    reply::ok(&mut o);
                    o
                }))),
                None => {
                    reply::ok(out);
                    None
                }
            }
        }
    }
}

/// RESET: the transaction and its WATCH are dropped.
pub(super) fn reset(client: &mut Client) {
    client.txn = None;
}

/// The shard of `key`, checked against the transaction's.
fn place(ctx: &Context, txn: &mut Txn, key: &[u8]) -> Result<(), &'static str> {
    let topo = ctx.router.topology();
    if topo.is_empty() {
        return Err(MEMORY_MODE);
    }
    settle(txn, topo.shard_for(key), Some(topo.place(key)))
}

/// PUBLISH and PUBSUB run on the pub/sub shard: the transaction's shard must be it.
fn place_publish(ctx: &Context, txn: &mut Txn) -> Result<(), &'static str> {
    let shard = pubsub::pubsub_shard(ctx).ok_or(MEMORY_MODE)?;
    settle(txn, &shard, None)?;
    txn.publishes = true;
    Ok(())
}

/// The one rule of a transaction's shard: the first command that names one (by a key, or
/// by publishing) sets it, with the key's unit of placement; a later command on another
/// shard, or on another unit, is refused.
fn settle(txn: &mut Txn, shard: &Arc<Shard>, place: Option<usize>) -> Result<(), &'static str> {
    if let Some(s) = &txn.shard {
        if s.name != shard.name {
            return Err(if txn.publishes || place.is_none() {
                PUBLISH_ELSEWHERE
            } else {
                same_shard::CROSSSLOT
            });
        }
    }
    if let (Some(held), Some(p)) = (txn.place, place) {
        if held != p {
            return Err(same_shard::CROSSSLOT);
        }
    }
    txn.shard.get_or_insert_with(|| shard.clone());
    txn.place = txn.place.or(place);
    Ok(())
}

fn note_keys(ctx: &Context, txn: &mut Txn, keys: &[Bytes]) {
    for k in keys {
        if txn.seen.insert(k.clone()) {
            txn.keys.push(k.clone());
            if ctx.engine.is_batched(k) {
                txn.counters.push(k.clone());
            }
        }
    }
}

fn watch(
    ctx: &Arc<Context>,
    client: &mut Client,
    args: Vec<Bytes>,
    out: &mut BytesMut,
) -> Option<Pending> {
    let txn = client.txn.get_or_insert_with(Box::default);
    let keys = &args[1..];
    let before = (txn.shard.clone(), txn.place);
    for k in keys {
        if let Err(e) = place(ctx, txn, k) {
            (txn.shard, txn.place) = before;
            if txn.watch.is_none() && !txn.multi {
                client.txn = None;
            }
            reply::error(out, e);
            return None;
        }
    }
    note_keys(ctx, txn, keys);
    let shard = txn.shard.clone().expect("placed");
    let slot = txn.watch.get_or_insert_with(Default::default).clone();
    // A WATCH before this one has run (barriers run in order): its connection is there.
    let permit = if slot.lock().conn.is_none() {
        Some(super::take_dedicated(ctx, out)?)
    } else {
        None
    };
    let (ctx, resp3) = (ctx.clone(), client.proto == Proto::Resp3);
    let counters: Vec<Bytes> = keys
        .iter()
        .filter(|k| ctx.engine.is_batched(k))
        .cloned()
        .collect();
    Some(Pending::Task(Box::pin(async move {
        if let Err(e) = same_shard::prepare(&ctx, &args[1..], &counters, &shard).await {
            return e;
        }
        let held = slot.lock().conn.take();
        let mut conn = match held_or_open(held, permit, &shard, resp3).await {
            Ok(c) => c,
            Err(e) => {
                let msg = e.client_message(&shard.name);
                slot.lock().lost = Some(msg.clone());
                return error_bytes(&msg);
            }
        };
        let mut frame = BytesMut::new();
        encode_into(&mut frame, &args);
        match conn.call(&frame, &shard, 0, Some(shard.timeout)).await {
            Ok(r) => {
                slot.lock().conn = Some(conn);
                BytesMut::from(&r.raw[..])
            }
            Err(e) => {
                let msg = e.client_message(&shard.name);
                slot.lock().lost = Some(msg.clone());
                error_bytes(&msg)
            }
        }
    })))
}

/// A command after MULTI (`spec` None: unknown to the proxy).
pub(super) fn queue(
    ctx: &Arc<Context>,
    client: &mut Client,
    spec: Option<&'static Spec>,
    args: Vec<Bytes>,
    out: &mut BytesMut,
) -> Option<Pending> {
    let Some(spec) = spec else {
        return abort(client, &command::unknown_command_error(&args), out);
    };
    match spec.kind {
        Kind::Transaction(TxnOp::Exec) => return exec(ctx, client, out),
        Kind::Transaction(TxnOp::Discard) => {
            client.txn = None;
            reply::ok(out);
            return None;
        }
        Kind::Transaction(TxnOp::Multi) => {
            reply::error(out, "ERR MULTI calls can not be nested");
            return None;
        }
        Kind::Transaction(TxnOp::Watch) => {
            reply::error(out, "ERR WATCH inside MULTI is not allowed");
            return None;
        }
        _ => {}
    }
    if !spec.arity_ok(args.len()) {
        return abort(client, &command::arity_error(spec.name), out);
    }
    // Run at once, as Redis does: they end the transaction or the connection.
    if matches!(spec.name, "quit" | "reset") {
        return local::run(ctx, client, spec, args, out).map(Pending::Task);
    }
    if !matches!(spec.kind, Kind::Local | Kind::Refused(_) | Kind::PubSub(_))
        && super::names_reserved(&args)
    {
        return abort(client, RESERVED, out);
    }
    let keys: Vec<Bytes> = match spec.kind {
        Kind::Local if spec.name == "hello" => {
            return abort(client, &not_in_multi(spec.name), out);
        }
        Kind::Local | Kind::Transaction(_) => Vec::new(),
        Kind::Refused(why) => return abort(client, &command::refused_error(spec.name, why), out),
        Kind::PubSub(PubSubOp::Subscription)
        | Kind::Window(_)
        | Kind::EveryShard
        | Kind::Keyspace(_) => {
            return abort(client, &not_in_multi(spec.name), out);
        }
        Kind::PubSub(PubSubOp::Publish) => Vec::new(),
        Kind::Single | Kind::Counter(_) => vec![args[1].clone()],
        Kind::Multi(Merge::Pairs) => args[1..].iter().step_by(2).cloned().collect(),
        Kind::Multi(_) => args[1..].to_vec(),
        Kind::SameShard(k) | Kind::Blocking(k) => match k.of(&args) {
            Some(keys) => keys.into_iter().cloned().collect(),
            None => vec![args[1].clone()],
        },
    };
    let txn = client.txn.as_mut().expect("in MULTI");
    let size: usize = args.iter().map(|a| a.len()).sum();
    if txn.queued.len() >= MAX_QUEUED || txn.queued_bytes + size > MAX_QUEUED_BYTES {
        let msg = format!("ERR tallyproxy queues at most {MAX_QUEUED} commands ({MAX_QUEUED_BYTES} bytes) in a transaction");
        return abort(client, &msg, out);
    }
    let local = matches!(spec.kind, Kind::Local | Kind::Transaction(_));
    let placed = if spec.kind == Kind::PubSub(PubSubOp::Publish) {
        place_publish(ctx, txn)
    } else {
        keys.iter().try_for_each(|k| place(ctx, txn, k))
    };
    if let Err(e) = placed {
        return abort(client, e, out);
    }
    note_keys(ctx, txn, &keys);
    txn.queued_bytes += size;
    txn.queued.push(if local {
        Queued::Local(args)
    } else {
        Queued::Shard(args)
    });
    reply::simple(out, "QUEUED");
    None
}

fn not_in_multi(name: &str) -> String {
    format!(
        "ERR {} inside MULTI is not supported by tallyproxy",
        name.to_ascii_uppercase()
    )
}

/// A command refused at queue time: its error now, EXECABORT at EXEC.
fn abort(client: &mut Client, msg: &str, out: &mut BytesMut) -> Option<Pending> {
    if let Some(t) = client.txn.as_mut() {
        t.aborted = true;
    }
    reply::error(out, msg);
    None
}

fn exec(ctx: &Arc<Context>, client: &mut Client, out: &mut BytesMut) -> Option<Pending> {
    let txn = client.txn.take().expect("in MULTI");
    if txn.aborted {
        reply::error(out, EXECABORT);
        return None;
    }
    // A shard change since the keys were placed (a rebalance began) moved some of them.
    let topo = ctx.router.topology();
    if let Some(shard) = &txn.shard {
        if txn
            .keys
            .iter()
            .any(|k| topo.shard_for(k).name != shard.name)
        {
            reply::error(out, MOVED_MEANWHILE);
            return None;
        }
    }
    // The proxy's own commands run now, in order; their answers go in EXEC's array.
    let mut answers = Vec::new();
    let mut commands = Vec::new();
    for q in txn.queued {
        match q {
            Queued::Local(args) => {
                let mut o = BytesMut::new();
                let spec = command::lookup(&args[0]).expect("queued commands are known");
                let task = if spec.name == "unwatch" {
                    reply::ok(&mut o);
                    None
                } else {
                    local::run(ctx, client, spec, args, &mut o)
                };
                answers.push((
                    commands.len() + answers.len(),
                    task.map_or(Answer::Ready(o), Answer::Task),
                ));
            }
            Queued::Shard(args) => commands.push(args),
        }
    }
    let to_shard = !commands.is_empty() || txn.watch.is_some();
    let shard = match (&txn.shard, to_shard) {
        (Some(s), true) => Some(s.clone()),
        _ => None,
    };
    let conn = txn.watch.as_ref().map(|w| {
        let mut w = w.lock();
        (w.conn.take(), w.lost.take())
    });
    let permit: Option<Permit> = match (&shard, &conn) {
        (Some(_), None | Some((None, None))) => Some(super::take_dedicated(ctx, out)?),
        _ => None,
    };
    let (ctx, resp3) = (ctx.clone(), client.proto == Proto::Resp3);
    let (keys, counters) = (txn.keys, txn.counters);
    Some(Pending::Task(Box::pin(async move {
        let shard_part = match shard {
            None => None,
            Some(shard) => {
                let held = match conn {
                    Some((_, Some(lost))) => {
                        return error_bytes(&format!(
                            "{lost}; the WATCH was lost, transaction discarded"
                        ));
                    }
                    Some((c, None)) => c,
                    None => None,
                };
                Some(
                    run_on_shard(
                        &ctx, &shard, held, permit, resp3, &keys, &counters, &commands,
                    )
                    .await,
                )
            }
        };
        let raw = match shard_part {
            Some(Ok(raw)) => Some(raw),
            Some(Err(e)) => return e,
            None => None,
        };
        let elements = match &raw {
            Some(raw) => match resp3::elements(raw) {
                Some(e) if e.len() == commands.len() => e,
                // nil (a watched key changed) or EXECABORT: the shard's answer as it is.
                _ => return BytesMut::from(&raw[..]),
            },
            None => Vec::new(),
        };
        if answers.is_empty() {
            if let Some(raw) = raw {
                return BytesMut::from(&raw[..]);
            }
        }
        let mut o = BytesMut::new();
        reply::array(&mut o, elements.len() + answers.len());
        let mut elements = elements.into_iter();
        let mut answers = answers.into_iter().peekable();
        for at in 0.. {
            match answers.peek() {
                Some((i, _)) if *i == at => {
                    let (_, a) = answers.next().expect("peeked");
                    match a {
                        Answer::Ready(b) => o.extend_from_slice(&b),
                        Answer::Task(t) => o.extend_from_slice(&t.await),
                    }
                }
                _ => match elements.next() {
                    Some(e) => o.extend_from_slice(&e),
                    None => break,
                },
            }
        }
        o
    })))
}

/// The WATCH connection already held, else one opened with the permit taken at dispatch;
/// neither (a dispatch that found a connection an earlier command then lost) is `Lost`.
async fn held_or_open(
    held: Option<Dedicated>,
    permit: Option<Permit>,
    shard: &Shard,
    resp3: bool,
) -> Result<Dedicated, crate::backend::BackendError> {
    match (held, permit) {
        (Some(c), _) => Ok(c),
        (None, Some(p)) => Dedicated::open(shard, resp3, p).await,
        (None, None) => Err(crate::backend::BackendError::Lost),
    }
}

/// MULTI, the commands and EXEC in one write; EXEC's reply, raw.
#[allow(clippy::too_many_arguments)]
async fn run_on_shard(
    ctx: &Context,
    shard: &Shard,
    held: Option<Dedicated>,
    permit: Option<Permit>,
    resp3: bool,
    keys: &[Bytes],
    counters: &[Bytes],
    commands: &[Vec<Bytes>],
) -> Result<Bytes, BytesMut> {
    same_shard::prepare(ctx, keys, counters, shard).await?;
    let fail = |e: crate::backend::BackendError| error_bytes(&e.client_message(&shard.name));
    let mut conn = held_or_open(held, permit, shard, resp3)
        .await
        .map_err(fail)?;
    let mut frame = BytesMut::new();
    encode_into(&mut frame, &["MULTI"]);
    for c in commands {
        encode_into(&mut frame, c);
    }
    encode_into(&mut frame, &["EXEC"]);
    // After MULTI's +OK and each +QUEUED (a refusal there makes EXEC answer EXECABORT).
    let result = conn
        .call(&frame, shard, commands.len() + 1, Some(shard.timeout))
        .await;
    for k in counters {
        ctx.engine.invalidate(k);
    }
    result.map(|r| r.raw).map_err(fail)
}
