//! Test support: real `redis-server` processes on free ports, the proxy in-process (or as
//! the built binary), and clients. Every process started here is stopped by its PID when
//! its handle drops; every wait is bounded.
#![allow(dead_code)]

pub mod certs;
pub mod cluster;
pub mod fake_node;
pub mod load;
mod sentinel;

pub use sentinel::Sentinel;

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tallyproxy::config::Config;
use tallyproxy::shutdown::ShutdownTrigger;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A port nobody listens on right now (bind :0, read it, let go).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "tallyproxy-test-{}-{}-{}",
            tag,
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A real redis-server on a free port, killed on drop.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    dir: TempDir,
    /// More redis-server arguments (e.g. `--requirepass pw`).
    extra: Vec<String>,
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_on(free_port())
    }

    /// A redis-server with more arguments.
    pub fn start_with(extra: &[&str]) -> Redis {
        Self::start_as(free_port(), extra)
    }

    pub fn start_on(port: u16) -> Redis {
        Self::start_as(port, &[])
    }

    fn start_as(port: u16, extra: &[&str]) -> Redis {
        let dir = TempDir::new("redis");
        let mut r = Redis {
            port,
            child: None,
            dir,
            extra: extra.iter().map(|a| a.to_string()).collect(),
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        launch_retrying(self, "redis-server");
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// What it logged, over its restarts (for a failed check to show).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// True unless stopped (by [`Redis::stop`], until [`Redis::restart`]).
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Stops the server (SIGKILL by PID) and waits for it to be gone.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port (its data is gone: no persistence in tests).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Starts it again on the same port as a replica of `primary`: empty until it has synced,
    /// and never an empty primary meanwhile. It stays a replica of `primary` across later
    /// restarts (call once: the argument is kept).
    pub fn restart_as_replica_of(&mut self, primary: u16) {
        self.extra
            .extend(["--replicaof", "127.0.0.1"].map(String::from));
        self.extra.push(primary.to_string());
        self.restart();
    }

    pub fn client(&self) -> redis::Connection {
        redis::Client::open(format!("redis://127.0.0.1:{}/", self.port))
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// Runs a command directly on this shard.
    pub fn cmd(&self, args: &[&str]) -> redis::Value {
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        c.query(&mut self.client()).unwrap()
    }

    pub fn get(&self, key: &str) -> Option<String> {
        redis::cmd("GET")
            .arg(key)
            .query(&mut self.client())
            .unwrap()
    }

    /// How many times `cmd` ran on this shard (INFO commandstats), e.g. "incrby".
    pub fn calls(&self, cmd: &str) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut self.client())
            .unwrap();
        let prefix = format!("cmdstat_{cmd}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(|rest| rest.split(',').next().unwrap().parse().unwrap())
            .unwrap_or(0)
    }

    pub fn reset_stats(&self) {
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query(&mut self.client())
            .unwrap();
    }
}

impl Launch for Redis {
    fn launch(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.dir.path().join("redis.log"))
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/ensure-deps.sh)");
        self.child = Some(child);
        wait_until(Duration::from_secs(5), || ping(self.port))
    }

    fn stop(&mut self) {
        Redis::stop(self);
    }

    fn port_mut(&mut self) -> &mut u16 {
        &mut self.port
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A server process the support starts on a port of its own.
trait Launch {
    /// Starts the process on its port; true once it answers PING (within 5 s).
    fn launch(&mut self) -> bool;
    /// Stops the process (SIGKILL by PID), if it runs.
    fn stop(&mut self);
    fn port_mut(&mut self) -> &mut u16;
}

/// Launches `server`, moving it to a fresh free port when it does not come up on its own
/// (another process may have taken the port since [`free_port`] found it): at most 5 tries.
fn launch_retrying(server: &mut impl Launch, what: &str) {
    for attempt in 0..5 {
        if server.launch() {
            return;
        }
        server.stop();
        if attempt < 4 {
            *server.port_mut() = free_port();
        }
    }
    panic!("{what} did not start");
}

pub fn ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_millis(200),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    // A server that wants a password answers too (NOAUTH).
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && (&buf == b"+PONG\r\n" || buf.starts_with(b"-NOAUTH"))
}

/// Polls `f` every 20 ms until it is true or `limit` passes.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// Waits (bounded: 10 s) until the proxy's log file at `log` has the line that a SIGHUP
/// refused with `reason` (`config reloaded: shard list not changed`); fails with the log.
pub async fn assert_reload_refused(log: &Path, reason: &str) {
    let read = || std::fs::read_to_string(log).unwrap_or_default();
    let seen = eventually(Duration::from_secs(10), || {
        read()
            .lines()
            .any(|l| l.contains("config reloaded: shard list not changed") && l.contains(reason))
    })
    .await;
    assert!(seen, "no refusal saying {reason:?} in:\n{}", read());
}

/// Async twin of [`wait_until`].
pub async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

/// A config for tests: the given shards, ports 0, a private log directory, short timers.
pub fn config(shards: &[&Redis], wal: &TempDir) -> Config {
    let addrs: Vec<String> = shards.iter().map(|s| s.addr()).collect();
    config_for(&addrs, wal)
}

/// [`config`] with shards given by address (which need not be Redis servers).
pub fn config_for(addrs: &[String], wal: &TempDir) -> Config {
    let mut toml = String::from("listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n");
    for a in addrs {
        toml.push_str(&format!("[[shards]]\naddr = \"{a}\"\n"));
    }
    toml.push_str(&format!(
        "[backend]\ntimeout = \"2s\"\nhealth_interval = \"100ms\"\nhealth_failures = 2\n\
         [counters]\nflush_interval = \"1h\"\ncache_ttl = \"5s\"\n\
         [durability]\nwal_dir = \"{}\"\n",
        wal.path().display()
    ));
    Config::from_toml_str(&toml).unwrap()
}

/// The proxy running in-process on ephemeral ports.
pub struct Proxy {
    pub addr: SocketAddr,
    pub http: SocketAddr,
    pub trigger: ShutdownTrigger,
    pub task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Proxy {
    pub async fn start(config: Config) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, http_addr) = (listener.local_addr().unwrap(), http.local_addr().unwrap());
        let (trigger, _) = tallyproxy::shutdown::channel();
        let task = tokio::spawn(tallyproxy::run(config, listener, http, trigger.clone()));
        // Ready once it answers PING; a proxy that stopped at start-up says why.
        let pong = match first_reply(addr, &["PING"]).await {
            Ok(pong) => pong,
            Err(e) => {
                let ended = tokio::time::timeout(Duration::from_secs(5), task).await;
                panic!("the proxy did not start ({e}): {ended:?}");
            }
        };
        assert!(pong == "+PONG\r\n" || pong.starts_with("-NOAUTH"), "{pong}");
        Proxy {
            addr,
            http: http_addr,
            trigger,
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    pub async fn client(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    pub async fn conn(&self) -> Raw {
        Raw::connect(self.addr).await
    }

    /// Orderly shutdown; waits for `run` to return.
    pub async fn stop(mut self) {
        self.trigger.trigger();
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), t)
                .await
                .expect("shutdown in time")
                .unwrap()
                .unwrap();
        }
    }

    /// An HTTP request to the sidecar: (status, body).
    pub async fn http(&self, method: &str, path: &str) -> (u16, String) {
        http_request(self.http, method, path).await
    }
}

/// The first line of the reply to `args` on a new connection to `addr` (within 10 s).
async fn first_reply(addr: SocketAddr, args: &[&str]) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(&encode(args)).await?;
    let mut got = Vec::new();
    let read = async {
        let mut b = [0u8; 256];
        while !got.ends_with(b"\r\n") {
            match s.read(&mut b).await? {
                0 => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
                n => got.extend_from_slice(&b[..n]),
            }
        }
        Ok::<(), std::io::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    Ok(String::from_utf8_lossy(&got).to_string())
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.trigger.trigger();
    }
}

/// A bare HTTP/1.1 request (no client dependency): (status, body).
pub async fn http_request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    http_with_body(addr, method, path, "").await
}

/// An HTTP/1.1 request with a JSON body (may be empty): (status, body).
pub async fn http_with_body(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.split(' ').nth(1).unwrap().parse().unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// A raw RESP connection: send exact bytes, read exact replies.
pub struct Raw {
    pub stream: TcpStream,
    buf: bytes::BytesMut,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        Raw {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: bytes::BytesMut::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads one whole reply and returns its bytes.
    pub async fn reply(&mut self) -> String {
        loop {
            if let Some(n) = reply_len(&self.buf) {
                let r = self.buf.split_to(n);
                return String::from_utf8_lossy(&r).to_string();
            }
            let n =
                tokio::time::timeout(Duration::from_secs(10), self.stream.read_buf(&mut self.buf))
                    .await
                    .expect("a reply within 10 s")
                    .unwrap();
            if n == 0 {
                return format!("<closed>{}", String::from_utf8_lossy(&self.buf));
            }
        }
    }

    /// Sends one command (as a RESP array) and reads its reply.
    pub async fn cmd(&mut self, args: &[&str]) -> String {
        self.send(&encode(args)).await;
        self.reply().await
    }

    /// `HELLO <proto>` ("2" or "3"), asserting the reply's shape (an array in RESP2, a map in
    /// RESP3).
    pub async fn hello(&mut self, proto: &str) {
        let reply = self.cmd(&["HELLO", proto]).await;
        let want = if proto == "3" { "%" } else { "*" };
        assert!(reply.starts_with(want), "HELLO {proto}: {reply}");
    }

    /// True when the server closed the connection (EOF within 2 s).
    pub async fn closed(&mut self) -> bool {
        let mut b = [0u8; 64];
        matches!(
            tokio::time::timeout(Duration::from_secs(2), self.stream.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

pub fn encode(args: &[&str]) -> Vec<u8> {
    let mut v = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        v.extend_from_slice(format!("${}\r\n{}\r\n", a.len(), a).as_bytes());
    }
    v
}

/// Length of the first whole RESP2 or RESP3 reply in `b`, if there is one (an attribute
/// counts as part of the reply it precedes).
pub fn reply_len(b: &[u8]) -> Option<usize> {
    fn line(b: &[u8], at: usize) -> Option<(usize, usize)> {
        let i = b[at..].windows(2).position(|w| w == b"\r\n")?;
        Some((at, at + i))
    }
    fn one(b: &[u8], at: usize) -> Option<usize> {
        let t = *b.get(at)?;
        let (_, end) = line(b, at)?;
        let after = end + 2;
        let count = || -> Option<i64> { std::str::from_utf8(&b[at + 1..end]).ok()?.parse().ok() };
        let elements = |n: i64| {
            let mut pos = after;
            for _ in 0..n.max(0) {
                pos = one(b, pos)?;
            }
            Some(pos)
        };
        match t {
            b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => Some(after),
            b'$' | b'=' | b'!' => {
                let n: i64 = std::str::from_utf8(&b[at + 1..end]).ok()?.parse().ok()?;
                if n < 0 {
                    return Some(after);
                }
                let total = after + n as usize + 2;
                (b.len() >= total).then_some(total)
            }
            b'*' | b'~' | b'>' => elements(count()?),
            b'%' => elements(2 * count()?),
            // An attribute map, then the reply it describes.
            b'|' => one(b, elements(2 * count()?)?),
            _ => None,
        }
    }
    one(b, 0)
}

/// Which of `shards` physically holds `key`.
pub fn holder(shards: &[&Redis], key: &str) -> Vec<u16> {
    shards
        .iter()
        .filter(|s| s.get(key).is_some())
        .map(|s| s.port)
        .collect()
}

/// The shard the ring assigns `key` to, by port, computed with the proxy's own ring.
pub fn ring_owner(shards: &[&Redis], key: &str) -> u16 {
    let nodes = shards
        .iter()
        .map(|s| tallyproxy::router::ring::Node {
            name: format!("redis_{}", s.port),
            weight: 1,
        })
        .collect();
    let ring = tallyproxy::router::ring::Ring::new(nodes, 160);
    shards[ring.locate(key.as_bytes())].port
}

/// The role a redis-server at `port` says it has (`master`, `slave`), if it answers.
pub fn role(port: u16) -> Option<String> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).ok()?;
    let mut c = client
        .get_connection_with_timeout(Duration::from_millis(500))
        .ok()?;
    c.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    match redis::cmd("ROLE").query::<redis::Value>(&mut c).ok()? {
        redis::Value::Array(v) => match v.first()? {
            redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).to_string()),
            _ => None,
        },
        _ => None,
    }
}

/// The built `tallyproxy` binary with a config file, killed by PID on drop.
pub struct ProxyProcess {
    child: Option<Child>,
    pub port: u16,
    pub http: u16,
    /// The config file it was started with (SIGHUP re-reads it).
    config: PathBuf,
}

impl ProxyProcess {
    pub fn start(shards: &[String], wal: &TempDir, fsync: &str, flush: &str) -> ProxyProcess {
        Self::start_with(shards, wal, fsync, flush, "")
    }

    /// As [`ProxyProcess::start`], with more TOML appended to the config.
    pub fn start_with(
        shards: &[String],
        wal: &TempDir,
        fsync: &str,
        flush: &str,
        extra: &str,
    ) -> ProxyProcess {
        Self::spawn(shards, wal, fsync, flush, "", extra, None)
    }

    /// As [`ProxyProcess::start_with`], with more `[durability]` keys.
    pub fn start_durable(
        shards: &[String],
        wal: &TempDir,
        fsync: &str,
        flush: &str,
        durability: &str,
        extra: &str,
    ) -> ProxyProcess {
        Self::spawn(shards, wal, fsync, flush, durability, extra, None)
    }

    /// As [`ProxyProcess::start_with`], logging JSON lines at `info` to `log` (the file).
    pub fn start_logged(shards: &[String], wal: &TempDir, extra: &str, log: &Path) -> ProxyProcess {
        Self::spawn(shards, wal, "always", "100ms", "", extra, Some(log))
    }

    /// Sentinel-managed shards: `masters` as (shard name, Sentinel master name), the
    /// sentinels at `sentinels`, `backend` more `[backend]` keys (e.g. `wait_replicas`),
    /// logging JSON lines at `info` to `log` when given.
    pub fn start_masters(
        masters: &[(&str, &str)],
        sentinels: &[String],
        wal: &TempDir,
        backend: &str,
        log: Option<&Path>,
    ) -> ProxyProcess {
        let mut shards = String::new();
        for (name, master) in masters {
            shards.push_str(&format!(
                "[[shards]]\nname = \"{name}\"\nmaster = \"{master}\"\n"
            ));
        }
        let addrs: Vec<String> = sentinels.iter().map(|a| format!("\"{a}\"")).collect();
        shards.push_str(&format!("[sentinel]\naddrs = [{}]\n", addrs.join(", ")));
        Self::spawn_toml(shards, backend, wal, "always", "100ms", "", "", log)
    }

    /// In front of a Redis Cluster: `[cluster] seeds` and `cluster` (more `[cluster]` keys,
    /// e.g. `wait_replicas = 1`), no `[[shards]]`; `extra` more TOML appended (sections).
    pub fn start_cluster(
        seeds: &[String],
        cluster: &str,
        wal: &TempDir,
        extra: &str,
        log: Option<&Path>,
    ) -> ProxyProcess {
        let quoted: Vec<String> = seeds.iter().map(|a| format!("\"{a}\"")).collect();
        let section = format!("[cluster]\nseeds = [{}]\n{cluster}\n", quoted.join(", "));
        Self::spawn_toml(section, "", wal, "always", "100ms", "", extra, log)
    }

    fn spawn(
        shards: &[String],
        wal: &TempDir,
        fsync: &str,
        flush: &str,
        durability: &str,
        extra: &str,
        log: Option<&Path>,
    ) -> ProxyProcess {
        let mut toml = String::new();
        for s in shards {
            toml.push_str(&format!("[[shards]]\naddr = \"{s}\"\n"));
        }
        Self::spawn_toml(toml, "", wal, fsync, flush, durability, extra, log)
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn_toml(
        shards: String,
        backend: &str,
        wal: &TempDir,
        fsync: &str,
        flush: &str,
        durability: &str,
        extra: &str,
        log: Option<&Path>,
    ) -> ProxyProcess {
        let (port, http) = (free_port(), free_port());
        let mut toml =
            format!("listen = \"127.0.0.1:{port}\"\nhttp_listen = \"127.0.0.1:{http}\"\n");
        toml.push_str(&shards);
        toml.push_str(&format!(
            "[backend]\ntimeout = \"500ms\"\nhealth_interval = \"100ms\"\n{backend}\n[counters]\nflush_interval = \"{flush}\"\n\
             [durability]\nwal_dir = \"{}\"\nfsync = \"{fsync}\"\n{durability}\n[log]\nlevel = \"warn\"\n{extra}",
            wal.path().join("log").display()
        ));
        let cfg = wal.path().join("proxy.toml");
        std::fs::write(&cfg, toml).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tallyproxy"));
        cmd.arg("--config").arg(&cfg).stdout(Stdio::null());
        match log {
            Some(path) => {
                cmd.arg("--log-json")
                    .env("RUST_LOG", "info")
                    .stderr(std::fs::File::create(path).unwrap());
            }
            None => {
                cmd.stderr(Stdio::null());
            }
        }
        let child = cmd.spawn().unwrap();
        let p = ProxyProcess {
            child: Some(child),
            port,
            http,
            config: cfg,
        };
        assert!(
            wait_until(Duration::from_secs(10), || ping(port)),
            "proxy started"
        );
        p
    }

    pub fn addr(&self) -> SocketAddr {
        format!("127.0.0.1:{}", self.port).parse().unwrap()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    /// Replaces `from` (which must occur) with `to` in its config file, for a SIGHUP.
    pub fn edit_config(&self, from: &str, to: &str) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        assert!(text.contains(from), "{from:?} not in the config:\n{text}");
        std::fs::write(&self.config, text.replace(from, to)).unwrap();
    }

    /// Sends `signal` (e.g. "HUP") to the process, by PID.
    pub fn signal(&self, signal: &str) {
        if let Some(c) = &self.child {
            let ok = Command::new("kill")
                .args([&format!("-{signal}"), &c.id().to_string()])
                .status()
                .unwrap()
                .success();
            assert!(ok, "kill -{signal}");
        }
    }

    /// SIGTERM by PID and wait: the orderly path, with its final flush.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let ok = wait_until(Duration::from_secs(15), || {
                matches!(c.try_wait(), Ok(Some(_)))
            });
            if !ok {
                let _ = c.kill();
            }
            let status = c.wait().unwrap();
            assert!(ok && status.success(), "clean exit: {status:?}");
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// An HTTP request with a JSON body: (status, parsed body).
pub async fn http_json(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    let (status, body) = http_with_body(addr, method, path, body).await;
    (
        status,
        serde_json::from_str(body.trim()).unwrap_or(serde_json::Value::Null),
    )
}

/// The integer of a raw `:<n>\r\n` reply (panics on anything else).
pub fn int_reply(reply: &str) -> i64 {
    reply
        .strip_prefix(':')
        .and_then(|r| r.strip_suffix("\r\n"))
        .unwrap_or_else(|| panic!("not an integer reply: {reply:?}"))
        .parse()
        .unwrap()
}

/// A raw connection to the proxy at `proxy` and one to `direct`, both switched to `hello`
/// (`Some("3")`: RESP3; None: RESP2 as connected), for byte-for-byte comparisons.
pub async fn raw_pair(proxy: SocketAddr, direct: &Redis, hello: Option<&str>) -> (Raw, Raw) {
    let (mut p, mut d) = (
        Raw::connect(proxy).await,
        Raw::connect(direct.addr().parse().unwrap()).await,
    );
    if let Some(v) = hello {
        p.cmd(&["HELLO", v]).await;
        d.cmd(&["HELLO", v]).await;
    }
    (p, d)
}

/// Sends each command of `script` to both connections and asserts the same reply bytes.
pub async fn assert_same_replies(
    p: &mut Raw,
    d: &mut Raw,
    script: &[&[&str]],
    hello: Option<&str>,
) {
    for cmd in script {
        let (got, want) = (p.cmd(cmd).await, d.cmd(cmd).await);
        assert_eq!(got, want, "{cmd:?} (HELLO {hello:?})");
    }
}
