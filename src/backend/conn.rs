//! One long-lived, pipelined connection to a shard, run as an actor.
//!
//! Callers send a [`Request`] (an encoded command and a oneshot) over a bounded channel. The
//! actor's task runs two halves side by side: a writer that writes every request it can
//! gather in one syscall and queues its oneshot, and a reader that decodes replies (redis-protocol) and answers the oneshots in FIFO order, which
//! is the order Redis replies in. When the connection breaks, every request in flight is
//! answered `Lost` (its outcome is unknown: never resend it blindly), the actor reconnects
//! with back-off, and while it is down new requests are answered `Unavailable` at once.
//!
//! A shard that stops answering is not waited on for ever: when the oldest request in flight
//! is older than twice the request timeout, the connection is dropped and rebuilt.
//!
//! A Sentinel-managed shard's connection (`ConnOptions::primary`) connects to the primary's
//! address as it is at each (re)connect, asks `ROLE` before any request and refuses to
//! serve a replica (requests are answered `Unavailable`: never sent), drops when the
//! primary moves, and drops (asking the follower for a re-check) on a `-READONLY` reply.
//! Plain shards skip all of it.
//!
//! Owns bytes to and from one socket. Does not own what a command means or which shard it
//! is for.

use super::{BackendError, Reply};
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;

pub type Responder = oneshot::Sender<Result<Reply, BackendError>>;

pub struct Request {
    /// A whole RESP command, already encoded.
    pub frame: Bytes,
    pub respond_to: Responder,
    /// Replies before the one answered, each dropped: `ASKING` sent with the command it
    /// applies to, in one write, so that no other command takes its one-shot flag.
    pub skip: u8,
}

/// A connected socket: plain TCP or TLS over it.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

#[derive(Clone)]
pub struct ConnOptions {
    pub addr: SocketAddr,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub queue_depth: usize,
    /// Commands sent on every (re)connect before any request, e.g. AUTH, `HELLO 3`.
    pub on_connect: Vec<Bytes>,
    /// The connection speaks RESP3 (it sends `HELLO 3` on connect): replies are decoded
    /// as RESP3, for clients that switched to it.
    pub resp3: bool,
    /// TLS to the shard: the connector and the name its certificate must carry.
    pub tls: Option<(
        tokio_rustls::TlsConnector,
        tokio_rustls::rustls::pki_types::ServerName<'static>,
    )>,
    /// A Sentinel-managed shard's primary: its address replaces `addr` (see the module doc).
    pub primary: Option<Arc<super::sentinel::Primary>>,
}

impl ConnOptions {
    /// Where a connection made now goes.
    pub fn current_addr(&self) -> SocketAddr {
        match &self.primary {
            Some(p) => p.addr(),
            None => self.addr,
        }
    }
}

/// A handle to the actor. Cheap to clone; the actor ends when every handle is dropped.
#[derive(Clone)]
pub struct BackendConn {
    tx: mpsc::Sender<Request>,
    connected: Arc<AtomicBool>,
    /// Connections made so far: two replies on one connection are known to have shared it
    /// when this did not change in between (`WAIT` must follow its write on one socket).
    connects: Arc<AtomicU64>,
}

impl BackendConn {
    pub fn spawn(opts: ConnOptions) -> BackendConn {
        let (tx, rx) = mpsc::channel(opts.queue_depth);
        let connected = Arc::new(AtomicBool::new(false));
        let connects = Arc::new(AtomicU64::new(0));
        let span = tracing::info_span!("backend_conn", addr = %opts.current_addr());
        crate::task::spawn(span, actor(opts, rx, connected.clone(), connects.clone()));
        BackendConn {
            tx,
            connected,
            connects,
        }
    }

    /// How many connections the actor has made (see `connects`).
    pub fn connects(&self) -> u64 {
        self.connects.load(Ordering::SeqCst)
    }

    /// Whether the socket is up right now (a hint: it may break the next moment).
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Queues a request; the reply (or the reason there is none) comes on the receiver.
    /// Never waits: a full queue is answered `Busy`.
    pub fn send(&self, frame: Bytes) -> oneshot::Receiver<Result<Reply, BackendError>> {
        self.send_skipping(frame, 0)
    }

    /// Queues `ASKING` and then `frame` as one request answered with `frame`'s reply (a
    /// Redis Cluster `-ASK` redirection; see `backend::cluster`).
    pub fn send_asking(&self, frame: &[u8]) -> oneshot::Receiver<Result<Reply, BackendError>> {
        let mut both = bytes::BytesMut::with_capacity(frame.len() + 20);
        both.extend_from_slice(b"*1\r\n$6\r\nASKING\r\n");
        both.extend_from_slice(frame);
        self.send_skipping(both.freeze(), 1)
    }

    fn send_skipping(
        &self,
        frame: Bytes,
        skip: u8,
    ) -> oneshot::Receiver<Result<Reply, BackendError>> {
        let (respond_to, rx) = oneshot::channel();
        if let Err(e) = self.tx.try_send(Request {
            frame,
            respond_to,
            skip,
        }) {
            let (req, err) = match e {
                mpsc::error::TrySendError::Full(r) => (r, BackendError::Busy),
                mpsc::error::TrySendError::Closed(r) => (r, BackendError::Unavailable),
            };
            let _ = req.respond_to.send(Err(err));
        }
        rx
    }
}

struct Inflight {
    respond_to: Responder,
    sent_at: Instant,
    skip: u8,
}

async fn actor(
    opts: ConnOptions,
    mut rx: mpsc::Receiver<Request>,
    connected: Arc<AtomicBool>,
    connects: Arc<AtomicU64>,
) {
    let mut backoff = Duration::from_millis(20);
    loop {
        // Subscribed before the address is read: a move after this drops the connection.
        let mut moved = opts.primary.as_ref().map(|p| p.subscribe());
        if let Some(m) = &mut moved {
            m.borrow_and_update();
        }
        match connect(&opts).await {
            Ok(stream) => {
                backoff = Duration::from_millis(20);
                connects.fetch_add(1, Ordering::SeqCst);
                connected.store(true, Ordering::Relaxed);
                let closed = run(stream, &opts, &mut rx, moved).await;
                connected.store(false, Ordering::Relaxed);
                if closed {
                    return;
                }
            }
            Err(e) => {
                tracing::debug!(addr = %opts.current_addr(), error = %e, "backend connect failed");
            }
        }
        // Down: answer queued requests at once rather than let them wait for the back-off.
        let deadline = Instant::now() + backoff;
        loop {
            tokio::select! {
                req = rx.recv() => match req {
                    Some(r) => { let _ = r.respond_to.send(Err(BackendError::Unavailable)); }
                    None => return,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

pub(crate) async fn connect(opts: &ConnOptions) -> std::io::Result<Box<dyn Io>> {
    let role = opts
        .primary
        .as_ref()
        .map(|_| super::encode_command(&["ROLE"]));
    let stream = tokio::time::timeout(
        opts.connect_timeout,
        TcpStream::connect(opts.current_addr()),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    let mut stream: Box<dyn Io> = match &opts.tls {
        Some((connector, name)) => {
            let tls = tokio::time::timeout(
                opts.connect_timeout,
                connector.connect(name.clone(), stream),
            )
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
            })??;
            Box::new(tls)
        }
        None => Box::new(stream),
    };
    for cmd in opts.on_connect.iter().chain(role.iter()) {
        let mut buf = BytesMut::with_capacity(256);
        let reply = round_trip(&mut stream, &mut buf, cmd, opts)
            .await
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::TimedOut {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out")
                } else {
                    e
                }
            })?;
        if let Some(msg) = reply.error() {
            return Err(std::io::Error::other(format!("handshake refused: {msg}")));
        }
        if role.as_ref() == Some(cmd) && super::sentinel::parse_role(&reply.frame).is_none() {
            if let Some(p) = &opts.primary {
                p.recheck.notify_one();
            }
            return Err(std::io::Error::other("not a primary (ROLE)"));
        }
    }
    Ok(stream)
}

/// Writes one encoded command on a socket that carries nothing else and reads its reply
/// (decoded as `opts.resp3` says), the whole exchange within `opts.request_timeout`
/// (`TimedOut`). `buf` keeps what was read past the reply, for the next call.
pub(crate) async fn round_trip(
    stream: &mut Box<dyn Io>,
    buf: &mut BytesMut,
    cmd: &[u8],
    opts: &ConnOptions,
) -> std::io::Result<Reply> {
    let exchange = async {
        stream.write_all(cmd).await?;
        loop {
            if let Some(r) = decode(buf, opts.resp3).map_err(std::io::Error::other)? {
                return Ok(r);
            }
            if stream.read_buf(buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    };
    crate::deadline::within_for(opts.request_timeout, exchange)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

/// Decodes one reply off the front of `buf`, as RESP3 on a `resp3` connection.
pub fn decode(buf: &mut BytesMut, resp3: bool) -> Result<Option<Reply>, String> {
    if buf.is_empty() {
        return Ok(None);
    }
    if resp3 {
        return match super::resp3::decode(buf) {
            Ok(Some((frame, raw))) => Ok(Some(Reply { frame, raw })),
            Ok(None) => Ok(None),
            Err(e) => Err(format!("bad reply from shard: {e}")),
        };
    }
    match redis_protocol::resp2::decode::decode_bytes_mut(buf) {
        Ok(Some((frame, _, raw))) => Ok(Some(Reply { frame, raw })),
        Ok(None) => Ok(None),
        Err(e) => Err(format!("bad reply from shard: {e:?}")),
    }
}

/// Serves one connected socket until it breaks (false) or every handle is gone (true).
async fn run(
    stream: Box<dyn Io>,
    opts: &ConnOptions,
    rx: &mut mpsc::Receiver<Request>,
    moved: Option<tokio::sync::watch::Receiver<SocketAddr>>,
) -> bool {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let inflight: Arc<Mutex<VecDeque<Inflight>>> = Arc::new(Mutex::new(VecDeque::new()));
    let queued = Arc::new(Notify::new());
    let stall_limit = opts.request_timeout * 2;

    let resp3 = opts.resp3;
    let primary = opts.primary.clone();
    let reader = {
        let inflight = inflight.clone();
        let queued = queued.clone();
        async move {
            let mut buf = BytesMut::with_capacity(16 * 1024);
            loop {
                loop {
                    match decode(&mut buf, resp3) {
                        // Out-of-band data answers no request (nothing the proxy forwards
                        // turns pushes on, but a shard may still send one).
                        Ok(Some(reply)) if resp3 && reply.raw.first() == Some(&b'>') => {}
                        Ok(Some(reply)) => {
                            // A primary demoted under the connection: it refused the write;
                            // drop, so that the reconnect asks ROLE, and have it re-checked.
                            let demoted = match &primary {
                                Some(p) if reply.raw.starts_with(b"-READONLY") => {
                                    p.recheck.notify_one();
                                    true
                                }
                                _ => false,
                            };
                            let mut q = inflight.lock();
                            match q.front_mut() {
                                Some(w) if w.skip > 0 => w.skip -= 1,
                                Some(_) => {
                                    let w = q.pop_front().expect("a front");
                                    let _ = w.respond_to.send(Ok(reply));
                                }
                                None => return, // a reply nobody asked for: resynchronise
                            }
                            drop(q);
                            if demoted {
                                tracing::warn!(
                                    "shard answered READONLY: a replica now; reconnecting"
                                );
                                return;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "dropping backend connection");
                            return;
                        }
                    }
                }
                let oldest = inflight.lock().front().map(|w| w.sent_at);
                let read = rd.read_buf(&mut buf);
                let n = match oldest {
                    Some(t) => match crate::deadline::within(t + stall_limit, read).await {
                        Ok(r) => r,
                        Err(_) => {
                            tracing::warn!("backend stalled, reconnecting");
                            return;
                        }
                    },
                    None => {
                        tokio::select! {
                            r = read => r,
                            // Re-check the deadline once a request has been queued.
                            _ = queued.notified() => continue,
                        }
                    }
                };
                match n {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                if buf.capacity() - buf.len() < 4096 {
                    buf.reserve(16 * 1024);
                }
            }
        }
    };

    let writer = {
        let inflight = inflight.clone();
        let queued = queued.clone();
        async move {
            let mut out = BytesMut::with_capacity(16 * 1024);
            let max_inflight = opts.queue_depth;
            loop {
                let Some(first) = rx.recv().await else {
                    return true;
                };
                let now = Instant::now();
                let mut batch = vec![first];
                while batch.len() < 512 {
                    match rx.try_recv() {
                        Ok(r) => batch.push(r),
                        Err(_) => break,
                    }
                }
                {
                    let mut q = inflight.lock();
                    for r in batch {
                        if q.len() >= max_inflight {
                            let _ = r.respond_to.send(Err(BackendError::Busy));
                            continue;
                        }
                        out.extend_from_slice(&r.frame);
                        q.push_back(Inflight {
                            respond_to: r.respond_to,
                            sent_at: now,
                            skip: r.skip,
                        });
                    }
                }
                queued.notify_one();
                if out.is_empty() {
                    continue;
                }
                if wr.write_all(&out).await.is_err() {
                    return false;
                }
                out.clear();
            }
        }
    };

    let moved = async move {
        match moved {
            Some(mut m) => {
                let _ = m.changed().await;
                tracing::info!(to = %*m.borrow(), "primary moved; reconnecting");
            }
            None => std::future::pending().await,
        }
    };
    let closed = tokio::select! {
        _ = reader => false,
        closed = writer => closed,
        _ = moved => false,
    };
    // Whatever was in flight has an unknown outcome now.
    for w in inflight.lock().drain(..) {
        let _ = w.respond_to.send(Err(BackendError::Lost));
    }
    closed
}
