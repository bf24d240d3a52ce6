//! The chaos tool behind `scripts/chaos.sh`: a load generator, a lossy TCP relay and a
//! checker. The script starts and kills the processes (Redis shards, the proxy, the relay);
//! this program only produces load, injects the relay fault and compares the counts.
//!
//! ```text
//! chaos free-ports N
//!     N distinct free TCP ports on 127.0.0.1, one line, space separated.
//! chaos load --addr 127.0.0.1:P --clients 64 --seconds 20 --prefix chaos:kill --out counts.json
//!     Each client owns the key <prefix>:<i> and INCRs it in a loop, one request in flight,
//!     until the time is up; it reconnects whenever the connection is lost. Writes, per key,
//!     how many increments were acknowledged and how many were attempted.
//! chaos relay --listen P --target Q --seconds 20 [--every-ms 500] [--stats FILE]
//!     A TCP relay to 127.0.0.1:Q. For `--seconds`, at most once per `--every-ms`, a
//!     connection that carries a flush batch (an EVAL of the lane's script with a sequence
//!     number and deltas) is forwarded the batch, then the shard's reply is swallowed and both
//!     sides are closed. After that window it relays faithfully until SIGTERM or SIGINT.
//! chaos check --shards [name=]host:port,... --counts counts.json --scenario NAME
//!     Reads every key on every shard and prints one line:
//!     `NAME acknowledged=.. in_redis=.. lost=.. doubled=.. unknown_outcome=..`.
//!     Exit status 1 when an increment was lost or doubled, or a key is not (only) on its
//!     ring owner; details go to stderr.
//! ```
//!
//! Accounting of the load (per key, with at most one increment in flight):
//! - an attempt is an `INCR` that was written (or partly written) to the socket;
//! - an integer reply acknowledges it;
//! - an error reply (`-TRYAGAIN ...`) means nothing was buffered: it is not an attempt;
//! - a lost connection or a reply that does not come in time leaves the attempt's outcome
//!   unknown: it stays an attempt, and the client reconnects.
//!
//! So for every key `acknowledged <= in Redis <= attempted` must hold at the end.

use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// How long a client waits to connect before trying again.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause between failed connection attempts (the proxy is down or restarting).
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);
/// A reply that takes longer leaves its increment's outcome unknown; the client reconnects.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after an error reply (TRYAGAIN), so a refusing proxy is not spun on.
const ERROR_PAUSE: Duration = Duration::from_millis(20);
/// How long the relay waits for the swallowed reply before it closes anyway.
const SWALLOW_WAIT: Duration = Duration::from_secs(1);
/// The relay exits by itself this long after its drop window, if nobody stopped it.
const RELAY_GRACE: Duration = Duration::from_secs(600);

#[derive(Parser)]
#[command(about = "Load, a lossy relay and a checker for tallyproxy's chaos runs")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print N distinct free TCP ports on 127.0.0.1.
    FreePorts { n: usize },
    /// INCR one key per client until the time is up; write per-key counts as JSON.
    Load {
        #[arg(long)]
        addr: String,
        #[arg(long, default_value_t = 64)]
        clients: usize,
        #[arg(long)]
        seconds: f64,
        #[arg(long, default_value = "chaos")]
        prefix: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// A TCP relay that drops connections right after forwarding a flush batch.
    Relay {
        #[arg(long)]
        listen: u16,
        #[arg(long)]
        target: u16,
        /// Length of the window in which connections are dropped.
        #[arg(long)]
        seconds: f64,
        #[arg(long, default_value_t = 500)]
        every_ms: u64,
        /// Where to write the relay's figures (JSON), after every drop and at exit.
        #[arg(long)]
        stats: Option<PathBuf>,
    },
    /// Compare the shards' values with the load's counts; print one line.
    Check {
        /// `name=host:port` or `host:port` (named `redis_<port>`), in config order.
        #[arg(long, value_delimiter = ',')]
        shards: Vec<String>,
        #[arg(long)]
        counts: PathBuf,
        #[arg(long)]
        scenario: String,
        /// `ring.vnodes` of the proxy's config.
        #[arg(long, default_value_t = 160)]
        vnodes: u32,
        /// Fewer acknowledged increments than this means the load did not run: a failure.
        #[arg(long, default_value_t = 1)]
        min_acked: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::FreePorts { n } => free_ports(n),
        Cmd::Load {
            addr,
            clients,
            seconds,
            prefix,
            out,
        } => runtime().and_then(|rt| rt.block_on(load(addr, clients, seconds, prefix, out))),
        Cmd::Relay {
            listen,
            target,
            seconds,
            every_ms,
            stats,
        } => runtime().and_then(|rt| {
            rt.block_on(relay(
                listen,
                target,
                Duration::from_secs_f64(seconds.max(0.0)),
                Duration::from_millis(every_ms),
                stats,
            ))
        }),
        Cmd::Check {
            shards,
            counts,
            scenario,
            vnodes,
            min_acked,
        } => check(&shards, &counts, &scenario, vnodes, min_acked),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("chaos: {e}");
            ExitCode::from(2)
        }
    }
}

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn runtime() -> Res<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn free_ports(n: usize) -> Res<ExitCode> {
    // Hold every listener until all are bound, so the ports are distinct.
    let listeners = (0..n)
        .map(|_| StdListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    let ports = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port().to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    println!("{}", ports.join(" "));
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------------------
// load
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct KeyCounts {
    acked: u64,
    attempted: u64,
    /// Attempts whose reply never came (connection lost, or no reply in time).
    unknown: u64,
    /// Integer replies outside [acknowledged, attempted] as counted at that reply: the
    /// total the proxy reported cannot be the key's true count.
    bad_replies: u64,
    first_bad_reply: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct LoadReport {
    addr: String,
    clients: usize,
    seconds: f64,
    keys: BTreeMap<String, KeyCounts>,
    /// Error replies by their first word (TRYAGAIN, ERR, ...): refusals, not attempts.
    errors: BTreeMap<String, u64>,
    /// Connections opened again after one was lost.
    reconnects: u64,
    /// Connection attempts that failed (proxy down or restarting).
    connect_failures: u64,
    /// Why connections were given up with an increment's outcome unknown: `eof`, `reset`,
    /// `write`, `timeout`, `garbage`.
    #[serde(default)]
    lost_by_reason: BTreeMap<String, u64>,
}

struct ClientOutcome {
    key: String,
    counts: KeyCounts,
    errors: BTreeMap<String, u64>,
    reconnects: u64,
    connect_failures: u64,
    lost_by_reason: BTreeMap<&'static str, u64>,
}

async fn load(
    addr: String,
    clients: usize,
    seconds: f64,
    prefix: String,
    out: PathBuf,
) -> Res<ExitCode> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(seconds.max(0.0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for i in 0..clients {
        let key = format!("{prefix}:{i}");
        tasks.push(tokio::spawn(client(addr.clone(), key, deadline)));
    }
    let mut report = LoadReport {
        addr: addr.clone(),
        clients,
        seconds,
        ..LoadReport::default()
    };
    for t in tasks {
        let o = t.await?;
        for (k, n) in o.errors {
            *report.errors.entry(k).or_default() += n;
        }
        report.reconnects += o.reconnects;
        report.connect_failures += o.connect_failures;
        for (k, n) in o.lost_by_reason {
            *report.lost_by_reason.entry(k.to_string()).or_default() += n;
        }
        report.keys.insert(o.key, o.counts);
    }
    let sum = |f: fn(&KeyCounts) -> u64| report.keys.values().map(f).sum::<u64>();
    let (acked, attempted, unknown, bad) = (
        sum(|c| c.acked),
        sum(|c| c.attempted),
        sum(|c| c.unknown),
        sum(|c| c.bad_replies),
    );
    eprintln!(
        "load {addr}: {clients} clients, {:.1}s: acknowledged={acked} attempted={attempted} \
         unknown={unknown} ({:.0} acks/s) reconnects={} connect_failures={} lost={:?} errors={:?} bad_replies={bad}",
        started.elapsed().as_secs_f64(),
        acked as f64 / started.elapsed().as_secs_f64().max(0.001),
        report.reconnects,
        report.connect_failures,
        report.lost_by_reason,
        report.errors,
    );
    std::fs::write(&out, serde_json::to_vec_pretty(&report)?)?;
    Ok(ExitCode::SUCCESS)
}

/// What one INCR round trip came to.
enum Reply {
    Int(i64),
    Error(String),
    /// No reply, or not one that can be trusted: the connection must go.
    Lost(&'static str),
}

async fn client(addr: String, key: String, deadline: tokio::time::Instant) -> ClientOutcome {
    let frame = format!("*2\r\n$4\r\nINCR\r\n${}\r\n{}\r\n", key.len(), key).into_bytes();
    let mut o = ClientOutcome {
        key,
        counts: KeyCounts::default(),
        errors: BTreeMap::new(),
        reconnects: 0,
        connect_failures: 0,
        lost_by_reason: BTreeMap::new(),
    };
    let mut conn: Option<BufReader<TcpStream>> = None;
    let mut connected_before = false;
    let mut line = String::new();
    // Bounded by the deadline: every pass either sleeps, or waits for a bounded I/O.
    while tokio::time::Instant::now() < deadline {
        let stream = match conn.as_mut() {
            Some(s) => s,
            None => match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    if connected_before {
                        o.reconnects += 1;
                    }
                    connected_before = true;
                    conn.insert(BufReader::new(s))
                }
                _ => {
                    o.connect_failures += 1;
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                    continue;
                }
            },
        };
        o.counts.attempted += 1;
        let reply = match stream.get_mut().write_all(&frame).await {
            Err(_) => Reply::Lost("write"),
            Ok(()) => {
                line.clear();
                match tokio::time::timeout(REPLY_TIMEOUT, stream.read_line(&mut line)).await {
                    Ok(Ok(n)) if n >= 3 && line.ends_with("\r\n") => {
                        let body = &line[1..line.len() - 2];
                        match line.as_bytes()[0] {
                            b':' => body
                                .parse()
                                .map(Reply::Int)
                                .unwrap_or(Reply::Lost("garbage")),
                            b'-' => {
                                Reply::Error(body.split(' ').next().unwrap_or_default().to_string())
                            }
                            _ => Reply::Lost("garbage"),
                        }
                    }
                    Ok(Ok(0)) => Reply::Lost("eof"),
                    Ok(Ok(_)) => Reply::Lost("garbage"),
                    Ok(Err(_)) => Reply::Lost("reset"),
                    Err(_) => Reply::Lost("timeout"),
                }
            }
        };
        match reply {
            Reply::Int(v) => {
                o.counts.acked += 1;
                let (lo, hi) = (o.counts.acked as i64, o.counts.attempted as i64);
                if v < lo || v > hi {
                    o.counts.bad_replies += 1;
                    if o.counts.first_bad_reply.is_none() {
                        o.counts.first_bad_reply = Some(format!(
                            "reply {v} when {lo} were acknowledged and {hi} attempted"
                        ));
                    }
                }
            }
            Reply::Error(kind) => {
                // Refused: nothing was buffered, so it was not an attempt.
                o.counts.attempted -= 1;
                *o.errors.entry(kind).or_default() += 1;
                tokio::time::sleep(ERROR_PAUSE).await;
            }
            Reply::Lost(why) => {
                *o.lost_by_reason.entry(why).or_default() += 1;
                o.counts.unknown += 1;
                conn = None;
            }
        }
    }
    o
}

// ---------------------------------------------------------------------------------------------
// relay
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct RelayState {
    connections: AtomicU64,
    batches_seen: AtomicU64,
    drops: AtomicU64,
    replies_swallowed: AtomicU64,
    last_drop: parking_lot::Mutex<Option<Instant>>,
}

#[derive(Serialize)]
struct RelayStats {
    connections: u64,
    batches_seen: u64,
    drops: u64,
    replies_swallowed: u64,
}

impl RelayState {
    fn stats(&self) -> RelayStats {
        RelayStats {
            connections: self.connections.load(Ordering::Relaxed),
            batches_seen: self.batches_seen.load(Ordering::Relaxed),
            drops: self.drops.load(Ordering::Relaxed),
            replies_swallowed: self.replies_swallowed.load(Ordering::Relaxed),
        }
    }

    fn write(&self, path: &Option<PathBuf>) {
        if let Some(p) = path {
            if let Ok(json) = serde_json::to_vec(&self.stats()) {
                let tmp = p.with_extension("tmp");
                if std::fs::write(&tmp, json).is_ok() {
                    let _ = std::fs::rename(&tmp, p);
                }
            }
        }
    }
}

async fn relay(
    listen: u16,
    target: u16,
    window: Duration,
    every: Duration,
    stats: Option<PathBuf>,
) -> Res<ExitCode> {
    use tokio::signal::unix::{signal, SignalKind};
    let listener = TcpListener::bind(("127.0.0.1", listen)).await?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let started = Instant::now();
    let drop_until = started + window;
    let give_up = tokio::time::Instant::now() + window + RELAY_GRACE;
    let state = Arc::new(RelayState::default());
    let stats = Arc::new(stats);
    state.write(&stats);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                state.connections.fetch_add(1, Ordering::Relaxed);
                let (state, stats) = (state.clone(), stats.clone());
                tokio::spawn(async move {
                    if let Ok(Ok(server)) = tokio::time::timeout(
                        CONNECT_TIMEOUT,
                        TcpStream::connect(("127.0.0.1", target)),
                    )
                    .await
                    {
                        pipe(client, server, state, drop_until, every, stats).await;
                    }
                });
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = tokio::time::sleep_until(give_up) => break,
        }
    }
    state.write(&stats);
    let s = state.stats();
    eprintln!(
        "relay :{listen} -> :{target}: connections={} flush_batches={} dropped_after_batch={} replies_swallowed={}",
        s.connections, s.batches_seen, s.drops, s.replies_swallowed
    );
    Ok(ExitCode::SUCCESS)
}

/// One relayed connection. Client-to-server bytes are framed as RESP requests so that a
/// flush batch is recognised whole; server-to-client bytes are passed through.
async fn pipe(
    client: TcpStream,
    server: TcpStream,
    state: Arc<RelayState>,
    drop_until: Instant,
    every: Duration,
    stats: Arc<Option<PathBuf>>,
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    // Set before a doomed batch is written: from then on the server's bytes are swallowed.
    let mute = AtomicBool::new(false);
    let swallowed = Notify::new();
    let up = async {
        let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
        let mut chunk = vec![0u8; 64 * 1024];
        let mut inspect = true;
        loop {
            let n = match cr.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if !inspect {
                if sw.write_all(&chunk[..n]).await.is_err() {
                    return;
                }
                continue;
            }
            buf.extend_from_slice(&chunk[..n]);
            // Forward whole requests; keep a partial one until the rest arrives.
            let mut at = 0;
            let mut doomed = None;
            while at < buf.len() {
                match parse_request(&buf[at..]) {
                    Parsed::Complete(len, args) => {
                        let end = at + len;
                        if is_flush_batch(&args) {
                            state.batches_seen.fetch_add(1, Ordering::Relaxed);
                            if take_drop_turn(&state, drop_until, every) {
                                doomed = Some(end);
                                at = end;
                                break;
                            }
                        }
                        at = end;
                    }
                    Parsed::Partial => break,
                    Parsed::NotResp => {
                        // Not a request array (inline command?): stop looking, pass through.
                        inspect = false;
                        at = buf.len();
                        break;
                    }
                }
            }
            if let Some(end) = doomed {
                // Whatever precedes the batch goes out normally first.
                mute.store(true, Ordering::SeqCst);
                if sw.write_all(&buf[..end]).await.is_err() {
                    return;
                }
                // Let the shard run it, and lose its reply.
                let _ = tokio::time::timeout(SWALLOW_WAIT, swallowed.notified()).await;
                state.drops.fetch_add(1, Ordering::Relaxed);
                state.write(&stats);
                return;
            }
            if at > 0 {
                if sw.write_all(&buf[..at]).await.is_err() {
                    return;
                }
                buf.drain(..at);
            }
        }
    };
    let down = async {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = match sr.read(&mut chunk).await {
                Ok(0) | Err(_) => {
                    // Keep `select!` from ending the connection before a swallow completes.
                    if mute.load(Ordering::SeqCst) {
                        std::future::pending::<()>().await;
                    }
                    return;
                }
                Ok(n) => n,
            };
            if mute.load(Ordering::SeqCst) {
                state.replies_swallowed.fetch_add(1, Ordering::Relaxed);
                swallowed.notify_one();
                std::future::pending::<()>().await;
            }
            if cw.write_all(&chunk[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
    // Both halves of both sockets are dropped here: the proxy sees the connection close.
}

/// True at most once per `every`, and only inside the drop window.
fn take_drop_turn(state: &RelayState, drop_until: Instant, every: Duration) -> bool {
    let now = Instant::now();
    if now >= drop_until {
        return false;
    }
    let mut last = state.last_drop.lock();
    match *last {
        Some(t) if now.duration_since(t) < every => false,
        _ => {
            *last = Some(now);
            true
        }
    }
}

enum Parsed<'a> {
    /// A whole request: its length in bytes and its arguments.
    Complete(usize, Vec<&'a [u8]>),
    Partial,
    NotResp,
}

/// Frames one RESP request (an array of bulk strings) at the start of `buf`.
fn parse_request(buf: &[u8]) -> Parsed<'_> {
    fn line(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
        let rest = buf.get(at..)?;
        let i = rest.windows(2).position(|w| w == b"\r\n")?;
        Some((&rest[..i], at + i + 2))
    }
    fn number(b: &[u8]) -> Option<usize> {
        std::str::from_utf8(b).ok()?.parse().ok()
    }
    if buf.is_empty() {
        return Parsed::Partial;
    }
    if buf[0] != b'*' {
        return Parsed::NotResp;
    }
    let Some((head, mut at)) = line(buf, 0) else {
        return Parsed::Partial;
    };
    let Some(n) = number(&head[1..]) else {
        return Parsed::NotResp;
    };
    let mut args = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        if at >= buf.len() {
            return Parsed::Partial;
        }
        if buf[at] != b'$' {
            return Parsed::NotResp;
        }
        let Some((head, next)) = line(buf, at) else {
            return Parsed::Partial;
        };
        let Some(len) = number(&head[1..]) else {
            return Parsed::NotResp;
        };
        if buf.len() < next + len + 2 {
            return Parsed::Partial;
        }
        if &buf[next + len..next + len + 2] != b"\r\n" {
            return Parsed::NotResp;
        }
        args.push(&buf[next..next + len]);
        at = next + len + 2;
    }
    Parsed::Complete(at, args)
}

/// A lane's flush batch: `EVAL <script with INCRBY> numkeys tally:applied k.. id seq d..`
/// with a sequence number above zero and at least one delta (not a read-only round trip).
fn is_flush_batch(args: &[&[u8]]) -> bool {
    if args.len() < 3 || !args[0].eq_ignore_ascii_case(b"EVAL") {
        return false;
    }
    if !args[1].windows(6).any(|w| w == b"INCRBY") {
        return false;
    }
    let Some(numkeys) = std::str::from_utf8(args[2])
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
    else {
        return false;
    };
    let argv = 3 + numkeys;
    let seq = args
        .get(argv + 1)
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0);
    seq > 0 && args.iter().skip(argv + 2).any(|d| !d.is_empty())
}

// ---------------------------------------------------------------------------------------------
// check
// ---------------------------------------------------------------------------------------------

struct ShardSpec {
    name: String,
    addr: String,
}

fn parse_shard(s: &str) -> ShardSpec {
    match s.split_once('=') {
        Some((name, addr)) => ShardSpec {
            name: name.to_string(),
            addr: addr.to_string(),
        },
        None => ShardSpec {
            name: format!("redis_{}", s.rsplit(':').next().unwrap_or(s)),
            addr: s.to_string(),
        },
    }
}

fn check(
    shards: &[String],
    counts: &PathBuf,
    scenario: &str,
    vnodes: u32,
    min_acked: u64,
) -> Res<ExitCode> {
    let specs: Vec<ShardSpec> = shards.iter().map(|s| parse_shard(s)).collect();
    if specs.is_empty() {
        return Err("check: --shards is empty".into());
    }
    let report: LoadReport = serde_json::from_slice(&std::fs::read(counts)?)?;
    let keys: Vec<&String> = report.keys.keys().collect();
    let ring = tallyproxy::router::ring::Ring::new(
        specs
            .iter()
            .map(|s| tallyproxy::router::ring::Node {
                name: s.name.clone(),
                weight: 1,
            })
            .collect(),
        vnodes,
    );

    // values[shard][key]
    let mut values: Vec<Vec<Option<i64>>> = Vec::new();
    for s in &specs {
        let client = redis::Client::open(format!("redis://{}/", s.addr))?;
        let mut con = client.get_connection_with_timeout(Duration::from_secs(5))?;
        con.set_read_timeout(Some(Duration::from_secs(30)))?;
        let got: Vec<Option<String>> = if keys.is_empty() {
            Vec::new()
        } else {
            redis::cmd("MGET").arg(&keys).query(&mut con)?
        };
        let parsed = got
            .into_iter()
            .zip(&keys)
            .map(|(v, k)| {
                v.map(|v| {
                    v.parse::<i64>()
                        .map_err(|_| format!("{k} on {} holds {v:?}, not an integer", s.name))
                })
                .transpose()
            })
            .collect::<Result<Vec<_>, _>>()?;
        values.push(parsed);
        let applied: BTreeMap<String, String> =
            redis::cmd("HGETALL").arg("tally:applied").query(&mut con)?;
        eprintln!("  {scenario}: {} tally:applied {applied:?}", s.name);
    }

    let (mut acked, mut in_redis, mut lost, mut doubled, mut unknown) = (0u64, 0i64, 0, 0, 0);
    let (mut misplaced, mut bad_replies) = (0u64, 0u64);
    let mut problems = Vec::new();
    let mut bad_notes = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let c = &report.keys[*key];
        let holders: Vec<usize> = (0..specs.len())
            .filter(|&s| values[s][i].is_some())
            .collect();
        let total: i64 = holders.iter().filter_map(|&s| values[s][i]).sum();
        let owner = ring.locate(key.as_bytes());
        if holders.len() > 1 || holders.first().is_some_and(|&h| h != owner) {
            misplaced += 1;
            let on: Vec<&str> = holders.iter().map(|&h| specs[h].name.as_str()).collect();
            problems.push(format!(
                "{key}: on {on:?}, its ring owner is {}",
                specs[owner].name
            ));
        }
        let (a, t) = (c.acked as i64, c.attempted as i64);
        let key_lost = (a - total).max(0);
        let key_doubled = (total - t).max(0);
        if key_lost > 0 || key_doubled > 0 {
            problems.push(format!(
                "{key}: in Redis {total}, acknowledged {a}, attempted {t} (lost {key_lost}, doubled {key_doubled})"
            ));
        }
        acked += c.acked;
        in_redis += total;
        lost += key_lost;
        doubled += key_doubled;
        unknown += total.clamp(a, t.max(a)) - a;
        bad_replies += c.bad_replies;
        if let Some(first) = &c.first_bad_reply {
            bad_notes.push(format!(
                "{key}: {} such replies, first: {first}",
                c.bad_replies
            ));
        }
    }
    println!(
        "{scenario:<12}acknowledged={acked} in_redis={in_redis} lost={lost} doubled={doubled} unknown_outcome={unknown}"
    );
    const SHOWN: usize = 10;
    for p in problems.iter().take(SHOWN) {
        eprintln!("  {scenario}: {p}");
    }
    if problems.len() > SHOWN {
        eprintln!("  {scenario}: ... and {} more", problems.len() - SHOWN);
    }
    if bad_replies > 0 {
        // A reply is the total as the proxy knows it; with one writer per key it must lie
        // between the acknowledged and the attempted increments at that moment.
        eprintln!(
            "  {scenario}: warning: {bad_replies} INCR replies, on {} keys, were outside [acknowledged, attempted]",
            bad_notes.len()
        );
        for n in bad_notes.iter().take(5) {
            eprintln!("  {scenario}:   {n}");
        }
    }
    let mut ok = lost == 0 && doubled == 0;
    if misplaced > 0 {
        eprintln!("  {scenario}: FAIL: {misplaced} keys not (only) on their ring owner");
        ok = false;
    }
    if acked < min_acked {
        eprintln!(
            "  {scenario}: FAIL: only {acked} increments acknowledged (expected at least {min_acked}): the load did not run"
        );
        ok = false;
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
