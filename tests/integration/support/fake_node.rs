//! A fake Redis Cluster node, for the misbehaviour a real cluster cannot be made to show on
//! demand: a forwarded command refused with `-TRYAGAIN` or `-CLUSTERDOWN` a given number of
//! times, or a `-MOVED` for every key's first command (a burst of redirections without the
//! slot map changing). Real clusters are used everywhere else (`support::cluster`).
//!
//! The node says it serves all 16384 slots alone (`CLUSTER SHARDS` and `CLUSTER SLOTS`),
//! keeps strings in a map (`GET`, `SET`, `MGET` of one slot), answers what a backend
//! connection and a health check send (`PING`, `INFO`, `CLIENT`, `ROLE`), and counts every
//! command it reads by name, so that a test reads off how often the proxy sent something.
//! It runs on the test's runtime and stops (every connection with it) when dropped.

use super::cluster::slot_of;
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Redis's wording of the two refusals worth a retry.
pub const TRYAGAIN: &str = "TRYAGAIN Multiple keys request during rehashing of slot";
pub const CLUSTERDOWN: &str = "CLUSTERDOWN The cluster is down";

/// A command larger than this closes the connection (nothing the proxy sends comes close).
const MAX_BUFFER: usize = 1 << 20;

#[derive(Default)]
struct State {
    values: HashMap<Bytes, Bytes>,
    /// Errors answered, one each, to the next data commands instead of running them.
    refusals: VecDeque<String>,
    /// When set, the first data command on each key is answered `-MOVED <slot> <this node>`.
    moved_once: bool,
    moved_keys: HashSet<Bytes>,
    /// Commands read, by name (upper case; `CLUSTER SHARDS` as two words).
    calls: HashMap<String, u64>,
}

pub struct FakeNode {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeNode {
    /// Listens on a free port of 127.0.0.1.
    pub async fn start() -> FakeNode {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let s = state.clone();
        let task = tokio::spawn(async move {
            // Dropped with the accept loop: every connection ends with it.
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((sock, _)) = listener.accept().await {
                conns.spawn(serve(sock, s.clone(), addr));
            }
        });
        FakeNode { addr, state, task }
    }

    /// `SET key value` done directly.
    pub fn set(&self, key: &str, value: &str) {
        self.state.lock().values.insert(
            Bytes::copy_from_slice(key.as_bytes()),
            Bytes::copy_from_slice(value.as_bytes()),
        );
    }

    pub fn value(&self, key: &str) -> Option<String> {
        self.state
            .lock()
            .values
            .get(key.as_bytes())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// The next data commands are answered with these errors, one each, in order.
    pub fn refuse(&self, errors: &[&str]) {
        let mut st = self.state.lock();
        st.refusals.clear();
        st.refusals.extend(errors.iter().map(|e| e.to_string()));
    }

    /// Refusals not yet used.
    pub fn refusals_left(&self) -> usize {
        self.state.lock().refusals.len()
    }

    /// Answers `-MOVED` (to this very node) to the first data command on each key.
    pub fn moved_once_per_key(&self, on: bool) {
        self.state.lock().moved_once = on;
    }

    /// How many times a command named `name` arrived (`"GET"`, `"CLUSTER SHARDS"`).
    pub fn calls(&self, name: &str) -> u64 {
        self.state.lock().calls.get(name).copied().unwrap_or(0)
    }

    /// `CLUSTER SHARDS` plus `CLUSTER SLOTS`: the looks at the slot map.
    pub fn map_reads(&self) -> u64 {
        self.calls("CLUSTER SHARDS") + self.calls("CLUSTER SLOTS")
    }
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut sock: TcpStream, state: Arc<Mutex<State>>, me: SocketAddr) {
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        let mut out = Vec::new();
        loop {
            match parse_command(&mut buf) {
                Ok(Some(args)) => out.extend(answer(&state, &args, me)),
                Ok(None) => break,
                Err(()) => return,
            }
        }
        if !out.is_empty() && sock.write_all(&out).await.is_err() {
            return;
        }
        if buf.len() > MAX_BUFFER {
            return;
        }
        match sock.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

fn name_of(args: &[Bytes]) -> String {
    let word = |i: usize| {
        args.get(i)
            .map(|a| String::from_utf8_lossy(a).to_ascii_uppercase())
            .unwrap_or_default()
    };
    match word(0).as_str() {
        "CLUSTER" | "CLIENT" => format!("{} {}", word(0), word(1)),
        w => w.to_string(),
    }
}

fn answer(state: &Mutex<State>, args: &[Bytes], me: SocketAddr) -> Vec<u8> {
    let name = name_of(args);
    let mut st = state.lock();
    *st.calls.entry(name.clone()).or_default() += 1;
    match name.as_str() {
        "PING" => return b"+PONG\r\n".to_vec(),
        "INFO" => return bulk(b"# Server\r\nredis_version:7.0.15\r\nredis_mode:cluster\r\n"),
        "ROLE" => return b"*3\r\n$6\r\nmaster\r\n:0\r\n*0\r\n".to_vec(),
        "ASKING" | "AUTH" | "SELECT" | "READONLY" => return b"+OK\r\n".to_vec(),
        n if n.starts_with("CLIENT ") => return b"+OK\r\n".to_vec(),
        "CLUSTER SHARDS" => return shards(me),
        "CLUSTER SLOTS" => return slots(me),
        _ => {}
    }
    let Some(key) = args.get(1).cloned() else {
        return error(&format!(
            "ERR wrong number of arguments for '{name}' command"
        ));
    };
    if let Some(e) = st.refusals.pop_front() {
        return error(&e);
    }
    if st.moved_once && st.moved_keys.insert(key.clone()) {
        return error(&format!("MOVED {} {me}", slot_of(&key)));
    }
    match (name.as_str(), args.len()) {
        ("GET", 2) => match st.values.get(&key) {
            Some(v) => bulk(v),
            None => b"$-1\r\n".to_vec(),
        },
        ("SET", 3) => {
            st.values.insert(key, args[2].clone());
            b"+OK\r\n".to_vec()
        }
        ("MGET", n) => {
            let mut out = format!("*{}\r\n", n - 1).into_bytes();
            for k in &args[1..] {
                match st.values.get(k) {
                    Some(v) => out.extend(bulk(v)),
                    None => out.extend_from_slice(b"$-1\r\n"),
                }
            }
            out
        }
        _ => error(&format!("ERR unknown command '{name}' (fake node)")),
    }
}

/// One shard: every slot, this node its online primary.
fn shards(me: SocketAddr) -> Vec<u8> {
    let mut out =
        b"*1\r\n*4\r\n$5\r\nslots\r\n*2\r\n:0\r\n:16383\r\n$5\r\nnodes\r\n*1\r\n*10\r\n".to_vec();
    for (k, v) in [
        ("id", "fakefakefakefakefakefakefakefakefakefake".to_string()),
        ("port", me.port().to_string()),
        ("ip", me.ip().to_string()),
        ("role", "master".to_string()),
        ("health", "online".to_string()),
    ] {
        out.extend(bulk(k.as_bytes()));
        out.extend(bulk(v.as_bytes()));
    }
    out
}

fn slots(me: SocketAddr) -> Vec<u8> {
    let mut out = b"*1\r\n*3\r\n:0\r\n:16383\r\n*3\r\n".to_vec();
    out.extend(bulk(me.ip().to_string().as_bytes()));
    out.extend(format!(":{}\r\n", me.port()).as_bytes());
    out.extend(bulk(b"fakefakefakefakefakefakefakefakefakefake"));
    out
}

fn bulk(b: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    tallyproxy::resp::reply::bulk(&mut out, b);
    out.to_vec()
}

fn error(msg: &str) -> Vec<u8> {
    let mut out = BytesMut::new();
    tallyproxy::resp::reply::error(&mut out, msg);
    out.to_vec()
}

/// One command, or None until it is whole; Err on anything the proxy's own parser refuses.
fn parse_command(buf: &mut BytesMut) -> Result<Option<Vec<Bytes>>, ()> {
    let limits = (&tallyproxy::config::LimitsConfig::default()).into();
    tallyproxy::resp::parse_request(buf, &limits).map_err(|_| ())
}
