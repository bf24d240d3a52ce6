//! One client connection: frames in, commands dispatched, replies out in request order.
//!
//! The loop reads what the socket has, takes every complete request off the buffer and
//! dispatches each: a command answered here or by the counter engine from memory is
//! replied at once; a forwarded command is queued on the client's connection to its shard
//! and its reply awaited later, so a pipelined burst to several shards is in flight at
//! once. Replies are written in request order, all of a burst with one write.
//!
//! A command that needs a round trip before it can even start (a counter read that misses
//! the cache, anything on a key with unflushed increments, a multi-key split) is a
//! *barrier*: the requests before it complete first and the requests after it are not
//! dispatched until it is done, so that each client sees its own commands applied in the
//! order it sent them.
//!
//! Owns the per-client loop and dispatch. Does not own parsing (`resp`), counting
//! (`counter`) or sockets to shards (`backend`).

pub mod blocking;
pub mod every_shard;
mod hot;
pub mod keyspace;
pub mod local;
pub mod multi;
pub mod pubsub;
pub mod redirect;
pub mod same_shard;
pub mod transaction;

use crate::backend::{encode_command, BackendError, Reply, Shard};
use crate::command::{self, CounterOp, Kind};
use crate::context::Context;
use crate::counter::lane::{KeyValue, LaneError};
use crate::counter::{Cached, CounterRead, Engine, Incr, IncrError, NOT_INTEGER};
use crate::metrics::Class;
use crate::resp::reply::{self, Proto};
use crate::resp::{short, RequestParser};
use crate::shutdown::Shutdown;
use bytes::{Buf, Bytes, BytesMut};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::time::Instant;

type Task = Pin<Box<dyn Future<Output = BytesMut> + Send>>;
/// A barrier task's future, for the parts that build one (`local`).
pub type PendingTask = Task;
pub(crate) type BackendRx = oneshot::Receiver<Result<Reply, BackendError>>;

/// A reply not yet written, in request order.
pub(crate) enum Pending {
    Ready(Bytes),
    /// A forwarded command in flight on the client's connection to `shard`.
    Forward {
        rx: Option<BackendRx>,
        shard: Arc<Shard>,
        sent: Instant,
        after: After,
        /// The command as sent, and for whom: a cluster's redirection sends it again.
        frame: Bytes,
        client: u64,
        proto: Proto,
    },
    /// A barrier: runs when everything before it is done.
    Task(Task),
    /// A barrier that may wait for a long time (a blocking command on its dedicated
    /// connection): while it waits, the client's socket is watched, and a client that
    /// leaves drops it (see `blocking`).
    Blocking(Task),
    /// A command on the client's subscription connection: its replies are the relayed
    /// frames up to its end (see `pubsub`). Not a barrier.
    Sub(u64),
    /// A multi-key command whose pieces are in flight (not a barrier; see `multi`).
    Gather(multi::Gather),
    /// An increment of a key whose base is being read (queued at dispatch, so that the
    /// first touches of many keys share a round trip). Not a barrier: only later commands
    /// on the same key wait for it.
    Deferred {
        key: Bytes,
        delta: i64,
        rx: oneshot::Receiver<Result<KeyValue, LaneError>>,
    },
}

/// What to do with the engine once a forwarded reply is in.
pub(crate) enum After {
    Nothing,
    /// The command may have changed a counter key: forget its cached base.
    Invalidate(Bytes),
    /// A plain GET of a counter key: cache the value if it is an integer.
    /// With the engine's invalidation epoch at dispatch: a write to any counter key since
    /// then means the value may be older than that write, and it is not cached.
    OfferRead(Bytes, u64),
}

/// Per-client state that commands can change.
pub struct Client {
    pub id: u64,
    pub name: Option<Bytes>,
    pub close: bool,
    /// A forwarded write to a counter key is in flight: this client's next counter
    /// operations wait for it, so that they see their own write.
    pub writes_in_flight: bool,
    /// This burst buffered an increment: its log record must be durable before replies.
    pub logged: bool,
    /// Keys with a deferred increment in the queue; a later command on one of them waits.
    pub deferred: Vec<Bytes>,
    /// AUTH (or HELLO AUTH) succeeded, or no password is configured.
    pub authenticated: bool,
    /// The protocol this client speaks (HELLO changes it): every reply the proxy builds
    /// follows it, and its forwarded commands go to shard connections that speak it.
    pub proto: Proto,
    /// A WATCH or MULTI under way (see `transaction`).
    pub txn: Option<Box<transaction::Txn>>,
    /// The subscription connection, once the client subscribed (see `pubsub`).
    pub sub: Option<pubsub::Subscription>,
}

impl Client {
    pub fn new(id: u64, proto: Proto) -> Client {
        Client {
            id,
            proto,
            name: None,
            close: false,
            writes_in_flight: false,
            logged: false,
            deferred: Vec::new(),
            authenticated: true,
            txn: None,
            sub: None,
        }
    }
}

pub async fn handle<S>(mut stream: S, ctx: Arc<Context>, mut shutdown: Shutdown)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut client = Client::new(
        ctx.next_client_id.fetch_add(1, Ordering::Relaxed),
        Proto::Resp2,
    );
    client.authenticated = !ctx.users.required();
    let mut rbuf = BytesMut::with_capacity(16 * 1024);
    let mut parser = RequestParser::default();
    // This connection's share of the budget on buffered input (see `resp::budget`).
    let mut held = crate::resp::budget::Held::new(ctx.input_budget.clone());
    let mut wbuf = BytesMut::with_capacity(16 * 1024);
    // Each reply not yet written, with its command's name (for the per-command figures).
    let mut queue: VecDeque<(Pending, &'static str)> = VecDeque::new();
    let mut burst = crate::metrics::Burst::default();
    let max_pipeline = ctx.config.limits.max_pipeline;
    // A parsed command that must wait for the queue to drain (it touches a key with a
    // deferred increment); dispatched first thing next round.
    let mut stashed: Option<Vec<Bytes>> = None;
    loop {
        // Counted per burst, not per command: a shared counter per command would bounce
        // its cache line between cores.
        let mut commands = 0u64;
        let burst_start = std::time::Instant::now();
        let log_epoch = ctx.engine.log_epoch();
        let mut more = false;
        let mut protocol_error = None;
        while !client.close {
            if queue.len() >= max_pipeline {
                more = true;
                break;
            }
            let next = match stashed.take() {
                Some(args) => Ok(Some(args)),
                None => {
                    if queue.is_empty() && !parser.resuming() {
                        if let Some(req) = short::peek(&rbuf, &ctx.limits) {
                            if let Some((name, error)) =
                                hot::answer(&ctx, &mut client, req.args(), &mut wbuf)
                            {
                                rbuf.advance(req.len);
                                commands += 1;
                                burst.command(name, error, Class::Memory);
                                continue;
                            }
                        }
                    }
                    parser.parse(&mut rbuf, &ctx.limits)
                }
            };
            match next {
                Ok(Some(args)) if args.is_empty() => continue,
                Ok(Some(args))
                    if !queue.is_empty()
                        && (touches_deferred(&client, &args)
                            || pubsub::must_wait(&client, &args)) =>
                {
                    stashed = Some(args);
                    more = true;
                    break;
                }
                Ok(Some(args)) => {
                    commands += 1;
                    let direct = queue.is_empty();
                    let mut scratch = BytesMut::new();
                    let out = if direct { &mut wbuf } else { &mut scratch };
                    let spec = command::lookup(&args[0]);
                    let name = spec.map_or("unknown", |s| s.name);
                    let start = out.len();
                    let pending = dispatch_spec(&ctx, &mut client, spec, args, out);
                    if pending.is_none() {
                        burst.command(name, out.get(start) == Some(&b'-'), Class::Memory);
                    }
                    match pending {
                        None if direct => {}
                        None => queue.push_back((Pending::Ready(scratch.freeze()), "")),
                        Some(p) => {
                            let writes = match &p {
                                Pending::Forward {
                                    after: After::Invalidate(_),
                                    ..
                                } => true,
                                Pending::Gather(g) => g.is_write(),
                                _ => false,
                            };
                            if writes {
                                client.writes_in_flight = true;
                            }
                            let barrier = matches!(p, Pending::Task(_) | Pending::Blocking(_));
                            queue.push_back((p, name));
                            if barrier {
                                more = true;
                                break;
                            }
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    protocol_error = Some(e);
                    break;
                }
            }
        }
        crate::metrics::global()
            .commands
            .fetch_add(commands, Ordering::Relaxed);
        while let Some((p, name)) = queue.pop_front() {
            let start = wbuf.len();
            match p {
                Pending::Blocking(t) => {
                    match blocking::wait(t, &mut stream, &mut rbuf, &mut shutdown).await {
                        Some(b) => wbuf.extend_from_slice(&b),
                        // The client left (or the proxy is stopping): the command is
                        // dropped with its dedicated connection.
                        None => {
                            client.close = true;
                            wbuf.clear();
                            break;
                        }
                    }
                }
                Pending::Sub(id) => {
                    let limit = ctx.config.backend.timeout.0 * 2;
                    if !pubsub::collect(&mut client, id, &mut wbuf, limit).await {
                        tracing::debug!(client = client.id, "subscription lost, closing");
                        client.close = true;
                        break;
                    }
                }
                p => resolve(p, &ctx, &mut wbuf).await,
            }
            // Ready replies were counted at dispatch (their name is empty here).
            if !name.is_empty() {
                burst.command(name, wbuf.get(start) == Some(&b'-'), Class::Backend);
            }
            // Large replies go out before the burst ends, so that one client's output is
            // bounded; a client that does not read then stops being read.
            if wbuf.len() > ctx.config.limits.max_output_bytes {
                if !logged_durably(&ctx, &client, log_epoch).await {
                    client.close = true;
                    wbuf.clear();
                    break;
                }
                if !write_out(&mut stream, &wbuf, &ctx).await {
                    client.close = true;
                    wbuf.clear();
                    break;
                }
                wbuf.clear();
            }
        }
        burst.finish(burst_start.elapsed());
        client.writes_in_flight = false;
        client.deferred.clear();
        if let Some(e) = protocol_error {
            crate::metrics::global()
                .protocol_errors
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(client = client.id, error = %e.0, "protocol error, closing");
            reply::error(&mut wbuf, &format!("ERR Protocol error: {}", e.0));
            client.close = true;
        }
        if !wbuf.is_empty() {
            // An increment is acknowledged only once its log record is durable (group
            // commit: one write, and with fsync=always one sync, for the whole burst and
            // every other client's burst that arrived meanwhile).
            if !logged_durably(&ctx, &client, log_epoch).await {
                // Not durable, so not acknowledged: close without the replies; the client
                // sees an unknown outcome, which is the truth.
                break;
            }
            client.logged = false;
            if !write_out(&mut stream, &wbuf, &ctx).await {
                break;
            }
            wbuf.clear();
            if wbuf.capacity() > 1024 * 1024 {
                wbuf = BytesMut::with_capacity(16 * 1024);
            }
        }
        if client.close {
            break;
        }
        if more {
            continue;
        }
        held.set(rbuf.len()); // gives back what the requests taken off the buffer held
        if rbuf.capacity() - rbuf.len() < 4096 {
            rbuf.reserve(16 * 1024);
        }
        let idle = ctx.config.limits.idle_timeout.0;
        let read = async {
            if idle.is_zero() {
                Ok(stream.read_buf(&mut rbuf).await)
            } else {
                tokio::time::timeout(idle, stream.read_buf(&mut rbuf)).await
            }
        };
        tokio::select! {
            r = read => match r {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => {}
                Err(_) => {
                    tracing::debug!(client = client.id, "idle timeout, closing");
                    break;
                }
            },
            // Messages of the client's subscriptions, written as they come.
            live = pubsub::next_messages(&mut client.sub, &mut wbuf) => {
                if !live || !write_out(&mut stream, &wbuf, &ctx).await {
                    break;
                }
                wbuf.clear();
            }
            _ = shutdown.wait() => break,
        }
        if !held.set(rbuf.len()) {
            crate::metrics::global()
                .protocol_errors
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                client = client.id,
                buffered = rbuf.len(),
                "client input over the budget, closing"
            );
            drop(held); // this connection's share goes back before anyone hears of it
            wbuf.clear();
            reply::error(
                &mut wbuf,
                &format!("ERR Protocol error: {}", crate::resp::budget::OVER_BUDGET),
            );
            if write_out(&mut stream, &wbuf, &ctx).await {
                linger(&mut stream).await;
            }
            break;
        }
    }
    let _ = stream.shutdown().await;
}

/// After a refusal that leaves the client's request half sent: the error is followed by a
/// FIN, and what the client still sends is read and dropped (into a small fixed buffer,
/// for at most 2 s), so that the close does not reset the connection before the client
/// has read the error.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) {
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 16 * 1024];
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// A place among the dedicated backend connections (transactions with WATCH, subscriptions,
/// blocking commands), or None with the client's error written to `out` when the cap is
/// reached.
fn take_dedicated(ctx: &Context, out: &mut BytesMut) -> Option<crate::backend::dedicated::Permit> {
    let permit = ctx.dedicated.try_take();
    if permit.is_none() {
        reply::error(out, &ctx.dedicated.exhausted_message());
    }
    permit
}

/// Writes replies; false when the client is gone or has not read them within
/// `limits.write_timeout` (a client that never reads must not hold its slot for ever).
async fn write_out<S: AsyncWrite + Unpin>(stream: &mut S, buf: &[u8], ctx: &Context) -> bool {
    matches!(
        tokio::time::timeout(ctx.config.limits.write_timeout.0, stream.write_all(buf)).await,
        Ok(Ok(()))
    )
}

/// Whether `args` names a key that has a deferred increment in this client's queue.
fn touches_deferred(client: &Client, args: &[Bytes]) -> bool {
    if client.deferred.is_empty() || args.len() < 2 {
        return false;
    }
    match command::lookup(&args[0]).map(|s| s.kind) {
        None | Some(Kind::Local) | Some(Kind::Refused(_)) => return false,
        // Another increment of the key is deferred behind the first (see `counter`).
        Some(Kind::Counter(op)) if op != CounterOp::Get => return false,
        _ => {}
    }
    // Values of MSET are compared too: a false match only costs a wait.
    args[1..].iter().any(|a| client.deferred.contains(a))
}

async fn resolve(p: Pending, ctx: &Context, out: &mut BytesMut) {
    match p {
        Pending::Ready(b) => out.extend_from_slice(&b),
        Pending::Task(t) | Pending::Blocking(t) => out.extend_from_slice(&t.await),
        // Only the connection loop has the subscription; no nested dispatch makes one.
        Pending::Sub(_) => {}
        Pending::Gather(g) => out.extend_from_slice(&multi::finish(g, ctx).await),
        Pending::Deferred { key, delta, rx } => {
            let engine = &ctx.engine;
            let read = rx.await.unwrap_or(Err(LaneError::Unavailable));
            let result = match read {
                Ok(_) => match engine.try_incr(&key, delta) {
                    Incr::Value(v) => Ok(v),
                    Incr::Refused(r) => Err(IncrError::Refused(r)),
                    // Another round trip made the base stale again: the full path.
                    Incr::NeedBase | Incr::Pending => {
                        engine.incr_with_base(&key, delta).await.map(|(v, _)| v)
                    }
                },
                Err(e) => match engine.try_incr_stale(&key, delta) {
                    Incr::Value(v) => Ok(v),
                    Incr::Refused(r) => Err(IncrError::Refused(r)),
                    Incr::NeedBase | Incr::Pending => Err(IncrError::Unavailable(
                        e.client_message(&engine.owner_name(&key)),
                    )),
                },
            };
            match result {
                Ok(v) => reply::int(out, v),
                Err(e) => reply::error(out, e.message()),
            }
        }
        Pending::Forward {
            rx,
            shard,
            sent,
            after,
            frame,
            client,
            proto,
        } => {
            let res = await_reply(rx, &shard, sent).await;
            let (res, shard) = redirect::follow(ctx, res, &shard, &frame, client, proto).await;
            match &after {
                After::Nothing => {}
                After::Invalidate(k) => ctx.engine.invalidate(k),
                After::OfferRead(k, epoch) => {
                    if let Ok(r) = &res {
                        ctx.engine.offer_read(k, &r.frame, *epoch);
                    }
                }
            }
            match res {
                Ok(r) => out.extend_from_slice(&r.raw),
                Err(e) => reply::error(out, &e.client_message(&shard.name)),
            }
        }
    }
}

pub(crate) async fn await_reply(
    rx: Option<BackendRx>,
    shard: &Shard,
    sent: Instant,
) -> Result<Reply, BackendError> {
    let Some(rx) = rx else {
        return Err(BackendError::Unavailable);
    };
    let _done = InflightGuard(shard);
    let r = match crate::deadline::within(sent + shard.timeout, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(BackendError::Lost),
        Err(_) => Err(BackendError::Timeout),
    };
    shard.latency.record(sent.elapsed().as_secs_f64());
    if let Err(e) = &r {
        shard.stats.errors.fetch_add(1, Ordering::Relaxed);
        if *e == BackendError::Timeout {
            shard.stats.timeouts.fetch_add(1, Ordering::Relaxed);
        }
    }
    r
}

/// Counts a forwarded request out of flight however its wait ends (reply, error, timeout,
/// or the waiting future dropped), and records its round trip.
struct InflightGuard<'a>(&'a Shard);

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.0.stats.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Queues `frame` on the client's connection to `shard` for its protocol (None: the shard
/// is known down).
pub(crate) fn send(
    shard: &Arc<Shard>,
    client: u64,
    proto: Proto,
    frame: Bytes,
) -> Option<BackendRx> {
    send_routed(shard, client, proto, frame, false)
}

/// [`send`], after `ASKING` when `asking` (a cluster's `-ASK`).
pub(crate) fn send_routed(
    shard: &Arc<Shard>,
    client: u64,
    proto: Proto,
    frame: Bytes,
    asking: bool,
) -> Option<BackendRx> {
    shard.stats.requests.fetch_add(1, Ordering::Relaxed);
    let rx = if asking {
        shard.send_asking_as(client, proto, &frame)
    } else {
        shard.send_as(client, proto, frame)
    };
    if rx.is_some() {
        shard.stats.inflight.fetch_add(1, Ordering::Relaxed);
    }
    rx
}

fn forward(shard: &Arc<Shard>, client: &Client, args: &[Bytes], after: After) -> Pending {
    let frame = encode_command(args);
    Pending::Forward {
        rx: send(shard, client.id, client.proto, frame.clone()),
        shard: shard.clone(),
        sent: Instant::now(),
        after,
        frame,
        client: client.id,
        proto: client.proto,
    }
}

/// Sends `args` to `shard` and waits for the reply (following a cluster's redirections),
/// as a barrier task would.
async fn call(
    ctx: &Context,
    shard: &Arc<Shard>,
    client: u64,
    proto: Proto,
    args: &[Bytes],
) -> Result<Reply, BackendError> {
    let r = call_direct(shard, client, proto, args).await;
    if ctx.cluster.is_none() {
        return r;
    }
    redirect::follow(ctx, r, shard, &encode_command(args), client, proto)
        .await
        .0
}

/// [`call`] for a command that names no key (a keyspace scan of one server): nothing to
/// redirect.
async fn call_direct(
    shard: &Arc<Shard>,
    client: u64,
    proto: Proto,
    args: &[Bytes],
) -> Result<Reply, BackendError> {
    let sent = Instant::now();
    let rx = send(shard, client, proto, encode_command(args));
    await_reply(rx, shard, sent).await
}

pub(crate) fn error_bytes(msg: &str) -> BytesMut {
    let mut o = BytesMut::new();
    reply::error(&mut o, msg);
    o
}

pub(crate) const RESERVED: &str = "ERR keys starting with 'tally:' are reserved by tallyproxy";

/// Whether an argument after the command's name is one of the proxy's own keys (exactly-once
/// records, rebalance tombstones, window hashes: `tally:...`).
pub(crate) fn names_reserved<A: AsRef<[u8]>>(args: &[A]) -> bool {
    args.iter()
        .skip(1)
        .any(|a| a.as_ref().starts_with(b"tally:"))
}
pub(crate) const MEMORY_MODE: &str = "ERR only counter commands (GET, MGET, INCR, INCRBY, DECR, DECRBY) are served in memory mode: no shards are configured";

/// Runs or starts one command. Immediate replies go to `out`; anything that must wait is
/// returned as a [`Pending`].
fn dispatch(
    ctx: &Arc<Context>,
    client: &mut Client,
    args: Vec<Bytes>,
    out: &mut BytesMut,
) -> Option<Pending> {
    let spec = command::lookup(&args[0]);
    dispatch_spec(ctx, client, spec, args, out)
}

fn dispatch_spec(
    ctx: &Arc<Context>,
    client: &mut Client,
    spec: Option<&'static command::Spec>,
    args: Vec<Bytes>,
    out: &mut BytesMut,
) -> Option<Pending> {
    if client.txn.as_ref().is_some_and(|t| t.multi) {
        return transaction::queue(ctx, client, spec, args, out);
    }
    let Some(spec) = spec else {
        crate::metrics::global()
            .command_errors
            .fetch_add(1, Ordering::Relaxed);
        reply::error(out, &command::unknown_command_error(&args));
        return None;
    };
    if !client.authenticated && !matches!(spec.name, "auth" | "hello" | "quit") {
        reply::error(out, crate::auth::NOAUTH);
        return None;
    }
    // The proxy's own keys (exactly-once records, rebalance tombstones) are off limits;
    // keyspace commands take patterns, not keys, and filter those keys from their answers.
    // (Channels are not keys.)
    if !matches!(
        spec.kind,
        Kind::Local | Kind::Refused(_) | Kind::Keyspace(_) | Kind::PubSub(_)
    ) && names_reserved(&args)
    {
        reply::error(out, RESERVED);
        return None;
    }
    if !spec.arity_ok(args.len()) {
        crate::metrics::global()
            .command_errors
            .fetch_add(1, Ordering::Relaxed);
        reply::error(out, &command::arity_error(spec.name));
        return None;
    }
    if client.sub.is_some() {
        if let Some(p) = pubsub::intercept(client, spec, &args) {
            return Some(p);
        }
    }
    match spec.kind {
        Kind::Local => {
            let (proto, start) = (client.proto, out.len());
            let task = local::run(ctx, client, spec, args, out);
            if task.is_none() && client.proto != proto {
                // HELLO or RESET switched protocols, so the client's next commands go to
                // other shard connections: a barrier, so that those before run first.
                let answer = out.split_off(start);
                return Some(Pending::Task(Box::pin(async move { answer })));
            }
            task.map(Pending::Task)
        }
        Kind::Refused(why) => {
            reply::error(out, &command::refused_error(spec.name, why));
            None
        }
        Kind::Single => single(ctx, client, args, out),
        Kind::Counter(op) => {
            if op != CounterOp::Get {
                client.logged = true;
            }
            if client.writes_in_flight && ctx.engine.is_batched(&args[1]) {
                // Runs after this client's write to a counter key has landed (a barrier).
                let (ctx, id, proto) = (ctx.clone(), client.id, client.proto);
                return Some(Pending::Task(Box::pin(async move {
                    let mut o = BytesMut::new();
                    let mut client = Client::new(id, proto);
                    if let Some(p) = counter(&ctx, &mut client, op, args, &mut o) {
                        resolve(p, &ctx, &mut o).await;
                    }
                    o
                })));
            }
            counter(ctx, client, op, args, out)
        }
        Kind::Multi(m) => multi::dispatch(ctx, client, spec, m, args, out),
        Kind::SameShard(keys) => same_shard::dispatch(ctx, client, keys, args, out),
        Kind::EveryShard => every_shard::dispatch(ctx, client, spec, args, out),
        Kind::Keyspace(op) => keyspace::dispatch(ctx, client, op, args, out),
        Kind::Blocking(keys) => blocking::dispatch(ctx, client, spec, keys, args, out),
        Kind::Transaction(op) => transaction::dispatch(ctx, client, op, args, out),
        Kind::PubSub(_) => pubsub::dispatch(ctx, client, spec, args, out),
        Kind::Window(op) => {
            let ctx = ctx.clone();
            Some(Pending::Task(Box::pin(async move {
                let mut o = BytesMut::new();
                window(&ctx, op, &args, &mut o).await;
                o
            })))
        }
    }
}

/// TALLY.RANGE, TALLY.LAST and TALLY.SERIES (see `counter::windows`).
async fn window(ctx: &Arc<Context>, op: command::WindowOp, args: &[Bytes], out: &mut BytesMut) {
    use crate::counter::windows::{self, QueryError};
    let text = |i: usize| String::from_utf8_lossy(&args[i]).into_owned();
    let now = ctx.engine.wall_clock().now_secs();
    let ranges = match op {
        command::WindowOp::Range => crate::clock::parse_time(&text(2))
            .and_then(|from| Ok(vec![(from, crate::clock::parse_time(&text(3))?)]))
            .map_err(QueryError::Invalid),
        command::WindowOp::Last => crate::clock::parse_span(&text(2))
            .map(|span| vec![windows::last(now, span)])
            .map_err(QueryError::Invalid),
        command::WindowOp::Series => (|| {
            let from = crate::clock::parse_time(&text(2)).map_err(QueryError::Invalid)?;
            let to = crate::clock::parse_time(&text(3)).map_err(QueryError::Invalid)?;
            let step = crate::clock::parse_span(&text(4)).map_err(QueryError::Invalid)?;
            windows::series_ranges(from, to, step)
        })(),
    };
    let answer = match ranges {
        Ok(r) => windows::query(&ctx.engine, &args[1], &r)
            .await
            .map(|a| (r, a)),
        Err(e) => Err(e),
    };
    match answer {
        Ok((ranges, a)) if op == command::WindowOp::Series => {
            reply::array(out, ranges.len());
            for ((from, _), n) in ranges.iter().zip(&a.counts) {
                reply::array(out, 2);
                reply::int(out, *from as i64);
                reply::int(out, *n);
            }
        }
        Ok((_, a)) => reply::int(out, a.counts[0]),
        Err(e) => reply::error(out, &e.message()),
    }
}

/// A command on one key, forwarded to its shard. On a batched counter key the key's
/// unflushed delta lands first, and its cached base is dropped.
fn single(
    ctx: &Arc<Context>,
    client: &Client,
    args: Vec<Bytes>,
    out: &mut BytesMut,
) -> Option<Pending> {
    let topo = ctx.router.topology();
    if topo.is_empty() {
        reply::error(out, MEMORY_MODE);
        return None;
    }
    let key = args[1].clone();
    if let Some(t) = move_first(ctx, client, &key, &args) {
        return Some(t);
    }
    let shard = topo.shard_for(&key).clone();
    let engine = &ctx.engine;
    if !engine.is_batched(&key) {
        return Some(forward(&shard, client, &args, After::Nothing));
    }
    if !engine.has_unflushed(&key) {
        engine.invalidate(&key);
        return Some(forward(&shard, client, &args, After::Invalidate(key)));
    }
    let (ctx, engine) = (ctx.clone(), engine.clone());
    let (id, proto) = (client.id, client.proto);
    Some(Pending::Task(Box::pin(async move {
        if let Err(e) = engine.land(&key).await {
            return error_bytes(&e.client_message(&shard.name));
        }
        engine.invalidate(&key);
        let r = call(&ctx, &shard, id, proto, &args).await;
        engine.invalidate(&key);
        match r {
            Ok(r) => BytesMut::from(&r.raw[..]),
            Err(e) => error_bytes(&e.client_message(&shard.name)),
        }
    })))
}

/// During a rebalance, a command on a key still (partly) on its old owner runs as a barrier
/// that moves the key first (see `Engine::ensure_moved`).
fn move_first(ctx: &Arc<Context>, client: &Client, key: &Bytes, args: &[Bytes]) -> Option<Pending> {
    if !ctx.engine.needs_move(key) {
        return None;
    }
    let (ctx, id, proto) = (ctx.clone(), client.id, client.proto);
    let (key, args) = (key.clone(), args.to_vec());
    Some(Pending::Task(Box::pin(async move {
        let mut o = BytesMut::new();
        if let Some(m) = ctx.router.migration() {
            if let Err(e) = ctx.engine.ensure_moved(&m, &key).await {
                reply::error(&mut o, &e.client_message(&ctx.engine.owner_name(&key)));
                return o;
            }
        }
        let mut client = Client::new(id, proto);
        if let Some(p) = dispatch(&ctx, &mut client, args, &mut o) {
            resolve(p, &ctx, &mut o).await;
        }
        o
    })))
}

fn counter(
    ctx: &Arc<Context>,
    client: &mut Client,
    op: CounterOp,
    args: Vec<Bytes>,
    out: &mut BytesMut,
) -> Option<Pending> {
    let key = &args[1];
    if !ctx.engine.is_batched(key) {
        return single(ctx, client, args, out);
    }
    if op == CounterOp::Get {
        return get(ctx, client, args, out);
    }
    let delta = match counter_delta(op, args.get(2).map(|a| &a[..])) {
        Ok(d) => d,
        Err(msg) => {
            reply::error(out, msg);
            return None;
        }
    };
    // Behind a deferred increment of the same key, an increment is deferred too, so that it
    // cannot be applied before the one sent ahead of it.
    let attempt = if client.deferred.contains(key) {
        Incr::NeedBase
    } else {
        ctx.engine.try_incr(key, delta)
    };
    if write_incr(&attempt, out) {
        return None;
    }
    match attempt {
        Incr::Value(_) | Incr::Refused(_) => None,
        // Queue the base read now, so that first touches in one burst share a round trip;
        // a key that must move first (rebalance) or a down owner takes the full path.
        Incr::NeedBase | Incr::Pending
            if ctx.engine.owner_up(key)
                && client.deferred.len() < 256
                && !ctx.engine.needs_move(key) =>
        {
            match ctx.engine.read_now(key, false) {
                Some(rx) => {
                    client.deferred.push(key.clone());
                    Some(Pending::Deferred {
                        key: key.clone(),
                        delta,
                        rx,
                    })
                }
                None => {
                    reply::error(
                        out,
                        &LaneError::Unavailable.client_message(&ctx.engine.owner_name(key)),
                    );
                    None
                }
            }
        }
        Incr::NeedBase | Incr::Pending => {
            let engine = ctx.engine.clone();
            let key = key.clone();
            Some(Pending::Task(Box::pin(async move {
                let mut o = BytesMut::new();
                match engine.incr_with_base(&key, delta).await {
                    Ok((v, _)) => reply::int(&mut o, v),
                    Err(e) => reply::error(&mut o, e.message()),
                }
                o
            })))
        }
    }
}

/// The delta of INCR, DECR, INCRBY or DECRBY (`n` is the third argument; GET adds
/// nothing), or the client's error line.
fn counter_delta(op: CounterOp, n: Option<&[u8]>) -> Result<i64, &'static str> {
    match op {
        CounterOp::Get => Ok(0),
        CounterOp::Incr => Ok(1),
        CounterOp::Decr => Ok(-1),
        CounterOp::IncrBy | CounterOp::DecrBy => {
            let n = n.and_then(crate::counter::parse_i64).ok_or(NOT_INTEGER)?;
            match op {
                CounterOp::DecrBy if n == i64::MIN => Err("ERR decrement would overflow"),
                CounterOp::DecrBy => Ok(-n),
                _ => Ok(n),
            }
        }
    }
}

/// Writes the reply of an increment the engine settled at once (a value or a refusal);
/// false for one that waits for its base.
fn write_incr(attempt: &Incr, out: &mut BytesMut) -> bool {
    match attempt {
        Incr::Value(v) => reply::int(out, *v),
        Incr::Refused(r) => reply::error(out, r.message()),
        Incr::NeedBase | Incr::Pending => return false,
    }
    true
}

/// Writes the reply of a counter read the cache answered; false for a miss.
fn write_hit(cached: &Cached, proto: Proto, out: &mut BytesMut) -> bool {
    match cached {
        Cached::Hit(Some(v)) => reply::bulk_int(out, *v),
        Cached::Hit(None) => reply::null(out, proto),
        Cached::Stale | Cached::Absent => return false,
    }
    true
}

fn get(
    ctx: &Arc<Context>,
    client: &Client,
    args: Vec<Bytes>,
    out: &mut BytesMut,
) -> Option<Pending> {
    let key = args[1].clone();
    let cached = ctx.engine.cached(&key);
    if write_hit(&cached, client.proto, out) {
        return None;
    }
    match cached {
        Cached::Hit(_) => None,
        Cached::Absent if !ctx.engine.needs_move(&key) => {
            let shard = ctx.router.topology().shard_for(&key).clone();
            let epoch = ctx.engine.invalidation_epoch();
            Some(forward(&shard, client, &args, After::OfferRead(key, epoch)))
        }
        Cached::Stale | Cached::Absent => {
            let engine = ctx.engine.clone();
            let proto = client.proto;
            Some(Pending::Task(Box::pin(async move {
                let mut o = BytesMut::new();
                write_counter_read(&engine, &key, proto, &mut o).await;
                o
            })))
        }
    }
}

/// Whether the replies in hand may go out: every increment they acknowledge is in the log
/// (group commit). A burst that began with the log already failed, and saw no recovery,
/// appended nothing (the engine refuses increments while the log is failed), so its
/// replies, refusals included, go out without a commit.
async fn logged_durably(ctx: &Context, client: &Client, log_epoch: u64) -> bool {
    !client.logged
        || ctx.engine.commit_log().await.is_ok()
        || ctx.engine.log_refused_throughout(log_epoch)
}

/// GET of a counter key through its lane (landing its delta), written as Redis would.
pub(crate) async fn write_counter_read(
    engine: &Engine,
    key: &Bytes,
    proto: Proto,
    o: &mut BytesMut,
) {
    match engine.read_counter(key).await {
        Ok(CounterRead::Read(Some(v)) | CounterRead::LastKnown(Some(v), _)) => {
            reply::bulk_int(o, v)
        }
        Ok(CounterRead::Read(None) | CounterRead::LastKnown(None, _)) => reply::null(o, proto),
        Ok(CounterRead::NotInteger(raw)) => o.extend_from_slice(&raw),
        Ok(CounterRead::Error(msg)) => reply::error(o, &msg),
        Err(e) => reply::error(o, &e.client_message(&engine.owner_name(key))),
    }
}

/// Awaits futures concurrently, results in input order (a small `join_all`).
pub async fn join_all<F: Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut outs: Vec<Option<F::Output>> = (0..futs.len()).map(|_| None).collect();
    let mut futs: Vec<Option<Pin<Box<F>>>> = futs.into_iter().map(Some).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (i, slot) in futs.iter_mut().enumerate() {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        outs[i] = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    outs.into_iter()
        .map(|o| o.expect("every future completed"))
        .collect()
}
