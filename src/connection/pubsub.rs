//! Pub/sub: SUBSCRIBE, PSUBSCRIBE, UNSUBSCRIBE, PUNSUBSCRIBE over one dedicated connection
//! per subscribed client, and PUBLISH / PUBSUB forwarded, all on one shard: the first shard
//! of the topology (the pub/sub shard). Redis's pub/sub is per server, so publishers and
//! subscribers meet there whatever the channel; counting and keys are not involved.
//!
//! A relay task owns the client's dedicated connection (`backend::dedicated`): it writes the
//! client's subscription commands, each followed by `PING <marker>`, and passes everything
//! the shard sends back to the client's loop in order, on one bounded channel: confirmations,
//! messages, and `Done` when a command's marker comes back (the marker's own reply is
//! dropped). A subscription command is `Pending::Sub`: resolving it takes the stream up to its
//! marker, so a command's confirmations (however many: `UNSUBSCRIBE` with no argument answers
//! one per channel) are written in request order, with the messages that came before them.
//! Between commands, the loop writes messages as they come.
//!
//! RESP2 rules as Redis's (a subscribed client may send only the (P)(UN)SUBSCRIBE commands,
//! PING, QUIT and RESET; anything else gets Redis's own refusal), decided from what the
//! client has subscribed to, tracked at dispatch; PING then goes to the shard, which answers
//! `*2 pong <arg>`. A RESP3 client gets push frames (`>`), from a connection that said
//! `HELLO 3`, and may send any command meanwhile but `HELLO` (the connection's pushes could
//! not follow a switch of protocol).
//!
//! Bounds: messages not yet written to the client are capped at `limits.max_output_bytes`
//! (and 65,536 frames); past that the client is disconnected, as Redis's
//! `client-output-buffer-limit pubsub` does. A shard connection that breaks closes the
//! client too (its subscriptions are gone; clients resubscribe on reconnect). The connection
//! is released once the client has no channel and no pattern left, at RESET, and when the
//! client leaves.
//!
//! Owns the relay and the subscribed-mode rules. Does not own the socket (`backend`).

use super::{error_bytes, forward, After, Client, Pending, MEMORY_MODE};
use crate::backend::dedicated::{Dedicated, Permit};
use crate::backend::{encode_command, encode_into, Shard};
use crate::command::Spec;
use crate::context::Context;
use crate::resp::reply::{self, Proto};
use bytes::{Bytes, BytesMut};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

/// Channels plus patterns one client may hold.
pub const MAX_SUBSCRIPTIONS: usize = 10_000;
/// Frames relayed and not yet taken by the client's loop.
const MAX_EVENTS: usize = 65_536;

/// What the relay passes to the client's loop, in the order the shard sent it.
pub(super) enum Event {
    /// A confirmation or a message, as the shard sent it.
    Frame(Bytes),
    /// The command with this number is fully answered.
    Done(u64),
    /// The connection could not be opened: the reply for every command sent.
    Failed(String),
}

/// One client's subscription connection, as its loop sees it.
pub struct Subscription {
    commands: mpsc::Sender<(Bytes, u64)>,
    events: mpsc::Receiver<Event>,
    /// Bytes of frames relayed and not yet taken (the relay's cap).
    queued: Arc<AtomicUsize>,
    next: u64,
    /// What the client is subscribed to once the commands sent so far have run.
    channels: HashSet<Bytes>,
    patterns: HashSet<Bytes>,
    /// `Pending::Sub` entries not yet resolved.
    waiting: usize,
    /// Nothing left subscribed, or RESET: dropped once `waiting` is zero.
    release: bool,
    /// Why the connection failed to open, once known.
    failed: Option<String>,
}

impl Subscription {
    /// Whether Redis's subscribed-mode rules apply to the client's next command.
    pub fn active(&self) -> bool {
        !self.release && (!self.channels.is_empty() || !self.patterns.is_empty())
    }

    fn track(&mut self, name: &str, args: &[Bytes]) {
        let set = if name.starts_with('p') {
            &mut self.patterns
        } else {
            &mut self.channels
        };
        if name.ends_with("unsubscribe") {
            if args.len() == 1 {
                set.clear();
            }
            for a in &args[1..] {
                set.remove(a);
            }
        } else {
            set.extend(args[1..].iter().cloned());
        }
        self.release = self.channels.is_empty() && self.patterns.is_empty();
    }
}

/// The `PING <marker>` that follows command `id`, and the shard's bulk reply to it (what
/// [`is_marker`] compares each frame received against): built once per command sent.
fn marker(nonce: u64, id: u64) -> (BytesMut, Bytes) {
    let text = format!("tallyproxy-marker-{nonce:x}-{id}");
    let mut ping = BytesMut::new();
    encode_into(&mut ping, &[&b"PING"[..], text.as_bytes()]);
    let mut reply = BytesMut::new();
    reply::bulk(&mut reply, text.as_bytes());
    (ping, reply.freeze())
}

/// The shard pub/sub runs on (and a transaction that publishes: `transaction`).
pub(super) fn pubsub_shard(ctx: &Context) -> Option<Arc<Shard>> {
    ctx.router.topology().shards.first().cloned()
}

pub const HELLO_SUBSCRIBED: &str =
    "ERR HELLO while subscribed is not supported by tallyproxy: UNSUBSCRIBE (or RESET) first";

/// Redis's refusal of a command in RESP2 subscribed mode.
pub fn not_allowed(name: &str) -> String {
    format!("ERR Can't execute '{name}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context")
}

/// Dispatch of a command while the client holds a subscription connection (RESP2 rules,
/// PING to the shard); None when the command takes the ordinary path.
pub(super) fn intercept(client: &mut Client, spec: &Spec, args: &[Bytes]) -> Option<Pending> {
    let sub = client.sub.as_ref()?;
    if client.proto == Proto::Resp3 && sub.active() && spec.name == "hello" {
        // The subscription connection speaks RESP3: its pushes cannot follow a switch.
        return Some(Pending::Ready(error_bytes(HELLO_SUBSCRIBED).freeze()));
    }
    if client.proto != Proto::Resp2 || !sub.active() {
        return None;
    }
    match spec.name {
        "subscribe" | "psubscribe" | "unsubscribe" | "punsubscribe" | "quit" | "reset" => None,
        "ping" => Some(send(client, spec.name, args)),
        name => Some(Pending::Ready(error_bytes(&not_allowed(name)).freeze())),
    }
}

/// Whether `args` must wait for the client's queue to drain first: a new subscription while
/// the connection is being released (after RESET, or everything unsubscribed) with commands
/// still unanswered on it. Once they are, the connection goes and a fresh one is opened, so
/// that a RESET's subscriptions never come back.
pub(super) fn must_wait(client: &Client, args: &[Bytes]) -> bool {
    client
        .sub
        .as_ref()
        .is_some_and(|s| s.release && s.waiting > 0)
        && (args[0].eq_ignore_ascii_case(b"subscribe")
            || args[0].eq_ignore_ascii_case(b"psubscribe"))
}

/// SUBSCRIBE, PSUBSCRIBE, UNSUBSCRIBE, PUNSUBSCRIBE (`subscription`), PUBLISH and PUBSUB.
pub(super) fn dispatch(
    ctx: &Arc<Context>,
    client: &mut Client,
    spec: &Spec,
    args: Vec<Bytes>,
    out: &mut BytesMut,
) -> Option<Pending> {
    let Some(shard) = pubsub_shard(ctx) else {
        reply::error(out, MEMORY_MODE);
        return None;
    };
    if matches!(spec.name, "publish" | "pubsub") {
        return Some(forward(&shard, client, &args, After::Nothing));
    }
    let unsubscribe = spec.name.ends_with("unsubscribe");
    let held = client
        .sub
        .as_ref()
        .map_or(0, |s| s.channels.len() + s.patterns.len());
    if !unsubscribe && held + args.len() - 1 > MAX_SUBSCRIPTIONS {
        reply::error(
            out,
            &format!("ERR tallyproxy allows at most {MAX_SUBSCRIPTIONS} channels and patterns per client"),
        );
        return None;
    }
    if client.sub.is_none() {
        if unsubscribe {
            // Nothing subscribed: Redis's answer, without a connection.
            unsubscribed_all(spec.name, &args, client.proto, out);
            return None;
        }
        let permit = super::take_dedicated(ctx, out)?;
        client.sub = Some(open(ctx, shard, client.proto, permit));
    }
    Some(send(client, spec.name, &args))
}

/// Queues a command on the client's subscription connection.
fn send(client: &mut Client, name: &str, args: &[Bytes]) -> Pending {
    let sub = client.sub.as_mut().expect("a subscription");
    if name != "ping" {
        sub.track(name, args);
    }
    let id = sub.next;
    sub.next += 1;
    sub.waiting += 1;
    // The relay never lags behind by more than the client's pipeline: a full queue means
    // the relay is gone, which the resolution reports.
    let _ = sub.commands.try_send((encode_command(args), id));
    Pending::Sub(id)
}

/// `(P)UNSUBSCRIBE` from a client subscribed to nothing, as Redis answers it.
fn unsubscribed_all(name: &str, args: &[Bytes], proto: Proto, out: &mut BytesMut) {
    let one = |out: &mut BytesMut, channel: Option<&Bytes>| {
        match proto {
            Proto::Resp2 => reply::array(out, 3),
            Proto::Resp3 => out.extend_from_slice(b">3\r\n"),
        }
        reply::bulk(out, name.as_bytes());
        match channel {
            Some(c) => reply::bulk(out, c),
            None => reply::null(out, proto),
        }
        reply::int(out, 0);
    };
    if args.len() == 1 {
        one(out, None);
    }
    for a in &args[1..] {
        one(out, Some(a));
    }
}

/// Starts the relay: the connection is opened in its task, so dispatch never waits.
fn open(ctx: &Arc<Context>, shard: Arc<Shard>, proto: Proto, permit: Permit) -> Subscription {
    let (commands, mut rx) = mpsc::channel::<(Bytes, u64)>(ctx.config.limits.max_pipeline + 16);
    let (tx, events) = mpsc::channel(MAX_EVENTS);
    let queued = Arc::new(AtomicUsize::new(0));
    let cap = ctx.config.limits.max_output_bytes;
    let nonce = ahash::RandomState::new().hash_one(ctx.next_client_id.load(Ordering::Relaxed));
    let relay_queued = queued.clone();
    let span = tracing::debug_span!("pubsub", shard = %shard.name);
    crate::task::spawn(span, async move {
        let mut conn = match Dedicated::open(&shard, proto == Proto::Resp3, permit).await {
            Ok(c) => c,
            Err(e) => {
                let _ = tx.try_send(Event::Failed(e.client_message(&shard.name)));
                return;
            }
        };
        let mut sent = std::collections::VecDeque::new();
        let mut closing = false;
        loop {
            tokio::select! {
                cmd = rx.recv(), if !closing => match cmd {
                    Some((frame, id)) => {
                        let (ping, reply) = marker(nonce, id);
                        let mut o = BytesMut::with_capacity(frame.len() + ping.len());
                        o.extend_from_slice(&frame);
                        o.extend_from_slice(&ping);
                        if conn.send(&o, &shard).await.is_err() {
                            return;
                        }
                        sent.push_back((id, reply));
                    }
                    // The client is gone or released the subscription: finish what it sent.
                    None if sent.is_empty() => return,
                    None => closing = true,
                },
                r = conn.read() => {
                    let Ok(r) = r else { return };
                    if let Some((id, reply)) = sent.front() {
                        let id = *id;
                        if is_marker(&r.raw, reply) {
                            sent.pop_front();
                            if tx.send(Event::Done(id)).await.is_err() || (closing && sent.is_empty()) {
                                return;
                            }
                            continue;
                        }
                    }
                    let n = r.raw.len();
                    if relay_queued.fetch_add(n, Ordering::Relaxed) + n > cap
                        || tx.try_send(Event::Frame(r.raw)).is_err()
                    {
                        tracing::warn!("subscriber not reading: output limit reached, disconnecting");
                        return;
                    }
                }
            }
        }
    });
    Subscription {
        commands,
        events,
        queued,
        next: 0,
        channels: HashSet::new(),
        patterns: HashSet::new(),
        waiting: 0,
        release: false,
        failed: None,
    }
}

/// Whether `raw` is the shard's reply to `PING marker`, in subscribed mode (`*2 pong
/// marker`) or not; `bulk` is the marker as a bulk string. Allocates nothing: it runs for
/// every frame received.
fn is_marker(raw: &[u8], bulk: &[u8]) -> bool {
    raw == bulk || raw.strip_prefix(&b"*2\r\n$4\r\npong\r\n"[..]) == Some(bulk)
}

/// Appends the relayed frames up to command `id`'s end to `out`. False when the client must
/// be closed (the connection broke, or the client fell too far behind).
pub(super) async fn collect(
    client: &mut Client,
    id: u64,
    out: &mut BytesMut,
    limit: std::time::Duration,
) -> bool {
    let Some(sub) = client.sub.as_mut() else {
        return false;
    };
    sub.waiting = sub.waiting.saturating_sub(1);
    if let Some(msg) = &sub.failed {
        reply::error(out, msg);
        return true;
    }
    let deadline = tokio::time::Instant::now() + limit;
    let ok = loop {
        match tokio::time::timeout_at(deadline, sub.events.recv()).await {
            Ok(Some(Event::Frame(b))) => {
                sub.queued.fetch_sub(b.len(), Ordering::Relaxed);
                out.extend_from_slice(&b);
            }
            Ok(Some(Event::Done(d))) if d >= id => break true,
            Ok(Some(Event::Done(_))) => {}
            Ok(Some(Event::Failed(msg))) => {
                reply::error(out, &msg);
                sub.failed = Some(msg);
                sub.release = true;
                break true;
            }
            Ok(None) | Err(_) => break false,
        }
    };
    if sub.waiting == 0 && sub.release {
        client.sub = None;
    }
    ok
}

/// The next frame relayed while the client has nothing else in flight: appended to `out`
/// with any others ready. False when the client must be closed. Never completes without a
/// live subscription.
pub(super) async fn next_messages(sub: &mut Option<Subscription>, out: &mut BytesMut) -> bool {
    let Some(s) = sub.as_mut().filter(|s| !s.release && s.failed.is_none()) else {
        return std::future::pending().await;
    };
    let mut first = s.events.recv().await;
    loop {
        match first {
            Some(Event::Frame(b)) => {
                s.queued.fetch_sub(b.len(), Ordering::Relaxed);
                out.extend_from_slice(&b);
            }
            Some(Event::Done(_)) => {}
            Some(Event::Failed(msg)) => {
                s.failed = Some(msg);
                return true;
            }
            None => return false,
        }
        match s.events.try_recv() {
            Ok(e) => first = Some(e),
            Err(_) => return true,
        }
    }
}

/// RESET or the end of the client's subscriptions: the connection goes once every command
/// sent on it has been answered.
pub(super) fn reset(client: &mut Client) {
    if let Some(s) = client.sub.as_mut() {
        s.channels.clear();
        s.patterns.clear();
        s.release = true;
        if s.waiting == 0 {
            client.sub = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{is_marker, marker};

    /// The PING carries the marker the reply is compared against, and only the shard's two
    /// reply shapes to that PING match: not another command's marker, not a message whose
    /// payload is the marker's text.
    #[test]
    fn a_marker_matches_its_ping_reply_in_both_modes_and_nothing_else() {
        let (ping, reply) = marker(0xab, 7);
        let text = b"tallyproxy-marker-ab-7";
        let mut want_ping = format!("*2\r\n$4\r\nPING\r\n${}\r\n", text.len()).into_bytes();
        want_ping.extend_from_slice(text);
        want_ping.extend_from_slice(b"\r\n");
        assert_eq!(&ping[..], &want_ping[..]);
        assert_eq!(&reply[..], b"$22\r\ntallyproxy-marker-ab-7\r\n");

        assert!(is_marker(&reply, &reply));
        let mut subscribed = b"*2\r\n$4\r\npong\r\n".to_vec();
        subscribed.extend_from_slice(&reply);
        assert!(is_marker(&subscribed, &reply));

        let (_, other) = marker(0xab, 8);
        assert!(!is_marker(&other, &reply));
        let mut message = b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n".to_vec();
        message.extend_from_slice(&reply);
        assert!(!is_marker(&message, &reply));
        subscribed.extend_from_slice(b"x");
        assert!(!is_marker(&subscribed, &reply));
        assert!(!is_marker(b"", &reply));
    }
}
