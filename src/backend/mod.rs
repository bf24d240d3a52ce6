//! Shards as the proxy talks to them: a pool of pipelined connections per shard, request
//! timeouts, and health.
//!
//! Owns sockets to shards and the meaning of a failed request (unavailable, timed out,
//! lost). Does not own what a command means, nor which shard a key belongs to (`router`).

pub mod cluster;
pub mod conn;
pub mod dedicated;
pub mod follower;
pub mod health;
pub mod identity;
pub mod resp3;
pub mod sentinel;

use bytes::{Bytes, BytesMut};
pub use conn::{BackendConn, ConnOptions};
use redis_protocol::resp2::types::BytesFrame;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A reply from a shard: the decoded frame and the exact bytes it came in, so that a
/// forwarded reply is passed to the client without re-encoding.
#[derive(Debug, Clone)]
pub struct Reply {
    pub frame: BytesFrame,
    pub raw: Bytes,
}

impl Reply {
    /// The error text when the reply is an error frame.
    pub fn error(&self) -> Option<&str> {
        match &self.frame {
            BytesFrame::Error(s) => Some(s),
            _ => None,
        }
    }
}

/// Why a request to a shard has no reply. Whether the command ran is known only for
/// `Unavailable` and `Busy` (it was never sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendError {
    /// Not connected; the request was not sent.
    Unavailable,
    /// The connection's queue is full; the request was not sent.
    Busy,
    /// No reply within the request timeout: the command may or may not have run.
    Timeout,
    /// The connection broke with the request in flight: the command may or may not have run.
    Lost,
}

impl BackendError {
    /// The client's error line for a failure at `shard`.
    pub fn client_message(&self, shard: &str) -> String {
        match self {
            BackendError::Unavailable => format!("TRYAGAIN shard {shard} is unavailable"),
            BackendError::Busy => format!("TRYAGAIN shard {shard} is busy"),
            BackendError::Timeout => {
                format!("ERR shard {shard} timed out; the command may or may not have run")
            }
            BackendError::Lost => {
                format!("ERR connection to shard {shard} lost; the command may or may not have run")
            }
        }
    }

    /// Whether the command certainly did not run, so that sending it again is safe.
    pub fn retry_safe(&self) -> bool {
        matches!(self, BackendError::Unavailable | BackendError::Busy)
    }
}

/// Encodes a command as a RESP array of bulk strings.
pub fn encode_command<A: AsRef<[u8]>>(args: &[A]) -> Bytes {
    let mut out =
        BytesMut::with_capacity(16 + args.iter().map(|a| a.as_ref().len() + 16).sum::<usize>());
    encode_into(&mut out, args);
    out.freeze()
}

pub fn encode_into<A: AsRef<[u8]>>(out: &mut BytesMut, args: &[A]) {
    crate::resp::reply::array(out, args.len());
    for a in args {
        crate::resp::reply::bulk(out, a.as_ref());
    }
}

/// Per-shard figures, for INFO and /metrics.
#[derive(Debug, Default)]
pub struct ShardStats {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub timeouts: AtomicU64,
    /// Forwarded requests sent and not yet answered (or given up on).
    pub inflight: std::sync::atomic::AtomicI64,
    /// Times a flush found the shard's exactly-once record behind batches the proxy had
    /// settled there: the shard lost data (`counter::lane`).
    pub lost_data: AtomicU64,
}

/// One standalone Redis server behind the proxy.
pub struct Shard {
    pub name: String,
    /// The address of a plain shard (and a Sentinel-managed one's primary at start-up);
    /// [`Shard::addr`] is where it is now.
    static_addr: SocketAddr,
    /// A Sentinel-managed shard's primary, followed through failovers (`follower`).
    pub primary: Option<Arc<sentinel::Primary>>,
    /// `WAIT` after each flushed batch: replicas to confirm it (0: none), and for how long.
    pub wait_replicas: u32,
    pub wait_timeout: Duration,
    pub weight: u32,
    /// Forwarded commands; a client always uses the same one, so its commands to this
    /// shard run in the order it sent them.
    pool: Vec<BackendConn>,
    /// The same for RESP3 clients: connections that sent `HELLO 3`, made when the first
    /// RESP3 client sends this shard a command (most deployments never need them).
    pool3: std::sync::OnceLock<Vec<BackendConn>>,
    pool_size: usize,
    /// The counter lane's own connection: flush batches and base reads, one round trip at
    /// a time (see `counter::lane`).
    pub lane_conn: BackendConn,
    pub timeout: Duration,
    /// Health as the checker last saw it; see `health`.
    pub up: AtomicBool,
    /// How to connect (address, credentials, TLS), for connections made later (health).
    pub conn_opts: ConnOptions,
    /// `AUTH [user] password` for this shard, for MIGRATE into it during a rebalance.
    pub auth_args: Option<Vec<String>>,
    /// Removed from the ring by a rebalance: its health checker stops.
    pub retired: AtomicBool,
    /// Not (yet) known to be Redis (see `identity`): nothing is sent to it. False only for a
    /// shard that could not be asked at start-up or that answered as something else since;
    /// the health checker asks again when it answers PING.
    pub unverified: AtomicBool,
    pub stats: ShardStats,
    /// Round-trip time of forwarded requests.
    pub latency: metrics::Histogram,
}

impl Shard {
    /// A shard with its connections. The shard's credentials (its own, else `[backend]`'s)
    /// come from `config`; a shard the config does not name uses `[backend]`'s.
    pub fn new(
        name: String,
        addr: SocketAddr,
        weight: u32,
        config: &crate::config::Config,
    ) -> Result<Arc<Shard>, String> {
        Shard::build(name, addr, None, weight, config)
    }

    /// A Sentinel-managed shard whose primary is at `addr` now.
    pub fn with_primary(
        name: String,
        primary: Arc<sentinel::Primary>,
        weight: u32,
        config: &crate::config::Config,
    ) -> Result<Arc<Shard>, String> {
        Shard::build(name, primary.addr(), Some(primary), weight, config)
    }

    fn build(
        name: String,
        addr: SocketAddr,
        primary: Option<Arc<sentinel::Primary>>,
        weight: u32,
        config: &crate::config::Config,
    ) -> Result<Arc<Shard>, String> {
        let cfg = &config.backend;
        let auth_args = config.shard_auth(&name)?;
        let mut opts = Shard::conn_options(&name, addr, config)?;
        opts.primary = primary.clone();
        let pool = (0..cfg.pool_size)
            .map(|_| BackendConn::spawn(opts.clone()))
            .collect();
        let latency = {
            crate::metrics::prometheus();
            metrics::histogram!("tallyproxy_shard_request_duration_seconds", "shard" => name.clone())
        };
        Ok(Arc::new(Shard {
            name,
            static_addr: addr,
            primary,
            wait_replicas: config.wait_replicas(),
            wait_timeout: config.wait_timeout(),
            weight,
            pool,
            pool3: std::sync::OnceLock::new(),
            pool_size: cfg.pool_size,
            lane_conn: BackendConn::spawn(opts.clone()),
            timeout: cfg.timeout.0,
            up: AtomicBool::new(true),
            retired: AtomicBool::new(false),
            unverified: AtomicBool::new(false),
            conn_opts: opts.clone(),
            auth_args,
            stats: ShardStats::default(),
            latency,
        }))
    }

    /// How the proxy connects to shard `name` at `addr`: credentials and TLS from `config`.
    pub fn conn_options(
        name: &str,
        addr: SocketAddr,
        config: &crate::config::Config,
    ) -> Result<ConnOptions, String> {
        let cfg = &config.backend;
        let auth = config
            .shard_auth(name)?
            .as_ref()
            .map(|args| encode_command(args));
        Ok(ConnOptions {
            addr,
            connect_timeout: cfg.connect_timeout.0,
            request_timeout: cfg.timeout.0,
            queue_depth: cfg.queue_depth,
            on_connect: auth.into_iter().collect(),
            resp3: false,
            tls: config.shard_tls(name, addr)?,
            primary: None,
        })
    }

    /// The shard's address as `spec::ShardSpec` records it.
    pub fn spec_addr(&self) -> String {
        match &self.primary {
            Some(p) => format!("{}{}", crate::spec::MASTER_PREFIX, p.master),
            None => self.static_addr.to_string(),
        }
    }

    /// Where the shard is now: its primary's address for a Sentinel-managed shard.
    pub fn addr(&self) -> SocketAddr {
        match &self.primary {
            Some(p) => p.addr(),
            None => self.static_addr,
        }
    }

    /// Sends `WAIT` on the lane connection when `wait_replicas` asks for it: whether the
    /// batch whose reply came on connection number `connects` is on that many replicas.
    /// The `WAIT` must run on the connection that sent the batch's write, so a reconnect in
    /// between means "not confirmed" (the batch is retried, same id).
    pub async fn lane_wait(&self, connects: u64) -> Result<bool, BackendError> {
        if self.wait_replicas == 0 {
            return Ok(true);
        }
        let ms = self.wait_timeout.as_millis().max(1).to_string();
        let n = self.wait_replicas.to_string();
        let rx = self.lane_send(encode_command(&["WAIT", &n, &ms]));
        let reply = match crate::deadline::within_for(self.wait_timeout + self.timeout, rx).await {
            Ok(Ok(r)) => r?,
            Ok(Err(_)) => return Err(BackendError::Lost),
            Err(_) => return Err(BackendError::Timeout),
        };
        let same_conn = self.lane_conn.connects() == connects;
        match reply.frame {
            BytesFrame::Integer(got) if same_conn => Ok(got >= self.wait_replicas as i64),
            _ => Ok(false),
        }
    }
    /// Whether the shard is known to be Redis (see `unverified`).
    pub fn is_verified(&self) -> bool {
        !self.unverified.load(Ordering::Relaxed)
    }

    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Queues an encoded command on the connection assigned to `client`. None when the
    /// shard is known to be down and the connection is not up: fail fast, not after the
    /// timeout.
    pub fn send(
        &self,
        client: u64,
        frame: Bytes,
    ) -> Option<tokio::sync::oneshot::Receiver<Result<Reply, BackendError>>> {
        self.send_as(client, crate::resp::reply::Proto::Resp2, frame)
    }

    /// The connection assigned to `client` for `proto` (a RESP3 client's among the RESP3
    /// connections, made on first use); None when nothing may be sent to the shard now: not
    /// known to be Redis, or known down with that connection not up (fail fast, not after
    /// the timeout).
    fn conn_for(&self, client: u64, proto: crate::resp::reply::Proto) -> Option<&BackendConn> {
        if !self.is_verified() {
            return None;
        }
        let pool = match proto {
            crate::resp::reply::Proto::Resp2 => &self.pool,
            _ => self.resp3_pool(),
        };
        let conn = &pool[(client as usize) % pool.len()];
        (self.is_up() || conn.is_connected()).then_some(conn)
    }

    /// One command and its reply frame within `wait`, for the control plane (moves, scans,
    /// identity): an error reply comes back as the shard's words; no reply, as why (a
    /// timeout means the command may or may not have run).
    pub async fn call<A: AsRef<[u8]>>(
        &self,
        args: &[A],
    ) -> Result<redis_protocol::resp2::types::BytesFrame, String> {
        use redis_protocol::resp2::types::BytesFrame;
        let Some(rx) = self.send(0, encode_command(args)) else {
            return Err(format!("shard {} is unavailable", self.name));
        };
        match crate::deadline::within_for(self.timeout * 5, rx).await {
            Ok(Ok(Ok(r))) => match r.frame {
                BytesFrame::Error(e) => Err(e.to_string()),
                f => Ok(f),
            },
            Ok(Ok(Err(e))) => Err(e.client_message(&self.name)),
            _ => Err(format!("shard {} timed out", self.name)),
        }
    }

    /// [`Shard::send`] for a client speaking `proto`: a RESP3 client's commands go to the
    /// RESP3 connections, whose replies are passed through as they come.
    pub fn send_as(
        &self,
        client: u64,
        proto: crate::resp::reply::Proto,
        frame: Bytes,
    ) -> Option<tokio::sync::oneshot::Receiver<Result<Reply, BackendError>>> {
        self.conn_for(client, proto).map(|c| c.send(frame))
    }

    /// The RESP3 connections, made on first use.
    fn resp3_pool(&self) -> &Vec<BackendConn> {
        self.pool3.get_or_init(|| {
            let mut opts = self.conn_opts.clone();
            opts.on_connect.push(encode_command(&["HELLO", "3"]));
            opts.resp3 = true;
            (0..self.pool_size)
                .map(|_| BackendConn::spawn(opts.clone()))
                .collect()
        })
    }

    /// [`Shard::send_as`] after `ASKING`, in one write (a Redis Cluster `-ASK`).
    pub fn send_asking_as(
        &self,
        client: u64,
        proto: crate::resp::reply::Proto,
        frame: &[u8],
    ) -> Option<tokio::sync::oneshot::Receiver<Result<Reply, BackendError>>> {
        self.conn_for(client, proto).map(|c| c.send_asking(frame))
    }

    /// [`Shard::lane_send`] after `ASKING`, in one write.
    pub fn lane_send_asking(
        &self,
        frame: &[u8],
    ) -> tokio::sync::oneshot::Receiver<Result<Reply, BackendError>> {
        self.lane_conn.send_asking(frame)
    }

    /// Sends a command on the lane connection (no per-request timeout here: the lane
    /// applies its own and knows that a timed-out batch has an unknown outcome).
    pub fn lane_send(
        &self,
        frame: Bytes,
    ) -> tokio::sync::oneshot::Receiver<Result<Reply, BackendError>> {
        if !self.is_verified() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let _ = tx.send(Err(BackendError::Unavailable));
            return rx;
        }
        self.lane_conn.send(frame)
    }
}
