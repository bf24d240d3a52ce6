//! The exactly-once lane protocol against a fake shard that misbehaves on demand: a reply
//! lost after the batch ran, a reply later than the request timeout, one key failing inside
//! a batch, the whole batch refused, and the order batches arrive in.
//!
//! The fake speaks just enough RESP2 for a backend connection and runs [`SCRIPT`]'s
//! semantics in Rust on an in-memory map (`State::eval`), recording every batch it reads,
//! so that what landed, and how often, is read off exactly. Real Redis is used end to end in
//! `tests/integration`; only a fake can run a batch and then drop its reply on purpose.

use super::lane::{KeyValue, Lane, APPLIED_KEY, SCRIPT};
use super::{parse_i64, Cached, Engine, Incr, Refusal, NOT_INTEGER, OVERFLOW, WRONGTYPE};
use crate::backend::Shard;
use crate::config::Config;
use crate::router::{Router, Topology};
use bytes::{Buf, Bytes, BytesMut};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The bound on every wait in these tests.
const WAIT: Duration = Duration::from_secs(10);
const PROXY_ID: &str = "lane-test";
const BUSY: &str =
    "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSCRIPT.";

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Value {
    Str(Vec<u8>),
    /// Any non-string type: every string command on it fails with WRONGTYPE.
    Hash,
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Fault {
    /// Runs the script, then closes the connection without a reply.
    LoseReply,
    /// Runs the script, then holds the reply this long before sending it.
    Stall(Duration),
    /// Answers the whole EVAL with this error and runs nothing.
    Refuse(&'static str),
    /// Runs the script, then holds the reply until [`FakeShard::release`] (at most `WAIT`).
    Hold,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// The number was above the watermark: the deltas were applied.
    Applied,
    /// The number was not above the watermark: the keys were only read.
    ReadOnly,
    /// The EVAL was answered with an error; nothing ran.
    Refused,
}

/// One EVAL of the lane script, as the fake read it.
#[derive(Debug, Clone)]
pub(super) struct Arrival {
    pub(super) seq: u64,
    /// (key, delta): None for a read.
    pub(super) items: Vec<(Vec<u8>, Option<i64>)>,
    pub(super) outcome: Outcome,
    /// The highest sequence number whose reply had been delivered when this one arrived.
    acked_before: u64,
}

#[derive(Default)]
struct State {
    values: HashMap<Vec<u8>, Value>,
    /// The `tally:applied` hash: proxy id -> highest sequence number applied.
    applied: HashMap<Vec<u8>, u64>,
    /// Every EVAL of the lane script, in the order read (all connections).
    arrivals: Vec<Arrival>,
    /// Misbehaviours, by index among the EVALs that carry a sequence number.
    faults: HashMap<usize, Fault>,
    writes_seen: usize,
    /// The highest sequence number whose (successful) reply was written.
    acked: u64,
    /// Replies being held back by a `Stall` or `Hold` right now.
    stalled: usize,
    /// Permits for `Hold`s to reply.
    release: Release,
}

/// Permits for held replies (none at first).
struct Release(Arc<tokio::sync::Semaphore>);

impl Default for Release {
    fn default() -> Self {
        Release(Arc::new(tokio::sync::Semaphore::new(0)))
    }
}

/// What the fake does with one command.
struct Answer {
    reply: Vec<u8>,
    fault: Option<Fault>,
    /// The sequence number this reply acknowledges once written.
    acks: Option<u64>,
}

impl Answer {
    fn plain(reply: Vec<u8>) -> Answer {
        Answer {
            reply,
            fault: None,
            acks: None,
        }
    }
}

struct Batch {
    proxy: Vec<u8>,
    seq: u64,
    items: Vec<(Vec<u8>, Option<i64>)>,
}

impl State {
    /// `SCRIPT`, line by line: the watermark, then per key INCRBY (fresh, with a delta) or GET.
    fn eval(&mut self, args: &[Bytes]) -> Answer {
        let batch = match parse_batch(args) {
            Ok(b) => b,
            Err(e) => return Answer::plain(error(&format!("ERR fake shard: {e}"))),
        };
        let fault = if batch.seq > 0 {
            self.writes_seen += 1;
            self.faults.remove(&(self.writes_seen - 1))
        } else {
            None
        };
        let acked_before = self.acked;
        if let Some(Fault::Refuse(msg)) = fault {
            self.arrivals.push(Arrival {
                seq: batch.seq,
                items: batch.items,
                outcome: Outcome::Refused,
                acked_before,
            });
            return Answer::plain(error(msg));
        }
        let seen = self.applied.get(&batch.proxy).copied().unwrap_or(0);
        let fresh = batch.seq > 0 && batch.seq > seen;
        if fresh {
            self.applied.insert(batch.proxy.clone(), batch.seq);
        }
        let mut out = format!("*2\r\n:{}\r\n*{}\r\n", fresh as u8, batch.items.len()).into_bytes();
        for (key, delta) in &batch.items {
            match (fresh, delta) {
                (true, Some(d)) => out.extend(self.incrby(key, *d)),
                _ => out.extend(self.get(key)),
            }
        }
        self.arrivals.push(Arrival {
            seq: batch.seq,
            items: batch.items,
            outcome: if fresh {
                Outcome::Applied
            } else {
                Outcome::ReadOnly
            },
            acked_before,
        });
        Answer {
            reply: out,
            fault,
            acks: Some(batch.seq),
        }
    }

    fn incrby(&mut self, key: &[u8], delta: i64) -> Vec<u8> {
        let now = match self.values.get(key) {
            None => Some(0),
            Some(Value::Hash) => return error(WRONGTYPE),
            Some(Value::Str(s)) => parse_i64(s),
        };
        let Some(now) = now else {
            return error(NOT_INTEGER);
        };
        let Some(new) = now.checked_add(delta) else {
            return error(OVERFLOW);
        };
        self.values
            .insert(key.to_vec(), Value::Str(new.to_string().into_bytes()));
        format!(":{new}\r\n").into_bytes()
    }

    fn get(&self, key: &[u8]) -> Vec<u8> {
        match self.values.get(key) {
            None => b"$-1\r\n".to_vec(),
            Some(Value::Hash) => error(WRONGTYPE),
            Some(Value::Str(s)) => bulk(s),
        }
    }
}

/// KEYS = [tally:applied, k1..kn]; ARGV = [proxy id, seq, n, d1..dn] (bucket hashes are not
/// modelled: these tests use no windowed keys).
fn parse_batch(args: &[Bytes]) -> Result<Batch, String> {
    if args.len() < 3 || args[1] != SCRIPT.as_bytes() {
        return Err("not the lane script".into());
    }
    let numkeys: usize = number(&args[2])?;
    let keys = args.get(3..3 + numkeys).ok_or("fewer keys than numkeys")?;
    let argv = &args[3 + numkeys..];
    if keys.first().map(|k| &k[..]) != Some(APPLIED_KEY.as_bytes()) {
        return Err("KEYS[1] is not the watermark hash".into());
    }
    let [proxy, seq, n, deltas @ ..] = argv else {
        return Err("ARGV too short".into());
    };
    let n: usize = number(n)?;
    if keys.len() != 1 + n || deltas.len() != n {
        return Err("bucket hashes are not modelled".into());
    }
    let items = keys[1..]
        .iter()
        .zip(deltas)
        .map(|(k, d)| {
            let d = match &d[..] {
                b"" => None,
                d => Some(parse_i64(d).ok_or("a delta is not an integer")?),
            };
            Ok((k.to_vec(), d))
        })
        .collect::<Result<_, String>>()?;
    Ok(Batch {
        proxy: proxy.to_vec(),
        seq: number(seq)?,
        items,
    })
}

fn number<T: std::str::FromStr>(b: &[u8]) -> Result<T, String> {
    std::str::from_utf8(b)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{:?} is not a number", String::from_utf8_lossy(b)))
}

fn bulk(b: &[u8]) -> Vec<u8> {
    let mut out = format!("${}\r\n", b.len()).into_bytes();
    out.extend_from_slice(b);
    out.extend_from_slice(b"\r\n");
    out
}

fn error(msg: &str) -> Vec<u8> {
    format!("-{msg}\r\n").into_bytes()
}

/// One command (an array of bulk strings, as clients send), or None until it is whole.
fn parse_command(buf: &mut BytesMut) -> Result<Option<Vec<Bytes>>, ()> {
    fn line(buf: &[u8], pos: &mut usize, tag: u8) -> Result<Option<usize>, ()> {
        let rest = &buf[*pos..];
        let Some(end) = rest.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        if rest[0] != tag {
            return Err(());
        }
        let n = number(&rest[1..end]).map_err(|_| ())?;
        *pos += end + 2;
        Ok(Some(n))
    }
    let mut pos = 0;
    let Some(n) = line(buf, &mut pos, b'*')? else {
        return Ok(None);
    };
    let mut args = Vec::with_capacity(n);
    for _ in 0..n {
        let Some(len) = line(buf, &mut pos, b'$')? else {
            return Ok(None);
        };
        if buf.len() < pos + len + 2 {
            return Ok(None);
        }
        args.push(Bytes::copy_from_slice(&buf[pos..pos + len]));
        pos += len + 2;
    }
    buf.advance(pos);
    Ok(Some(args))
}

fn answer(state: &Mutex<State>, args: &[Bytes]) -> Answer {
    let name = args
        .first()
        .map(|a| a.to_ascii_uppercase())
        .unwrap_or_default();
    Answer::plain(match &name[..] {
        b"EVAL" => return state.lock().eval(args),
        b"PING" => b"+PONG\r\n".to_vec(),
        // The proxy may ask whether this is Redis (see `backend::identity`).
        b"INFO" => bulk(b"# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\n"),
        b"AUTH" | b"CLIENT" | b"SELECT" => b"+OK\r\n".to_vec(),
        _ => error(&format!(
            "ERR unknown command '{}'",
            String::from_utf8_lossy(&name)
        )),
    })
}

async fn serve(mut sock: TcpStream, state: Arc<Mutex<State>>) {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    loop {
        loop {
            let args = match parse_command(&mut buf) {
                Ok(Some(args)) => args,
                Ok(None) => break,
                Err(()) => return,
            };
            let a = answer(&state, &args);
            match a.fault {
                Some(Fault::LoseReply) => return,
                Some(Fault::Stall(d)) => {
                    state.lock().stalled += 1;
                    tokio::time::sleep(d).await;
                }
                Some(Fault::Hold) => {
                    let release = {
                        let mut st = state.lock();
                        st.stalled += 1;
                        st.release.0.clone()
                    };
                    let _ = tokio::time::timeout(WAIT, release.acquire()).await;
                }
                _ => {}
            }
            let written = sock.write_all(&a.reply).await.is_ok();
            let mut st = state.lock();
            if matches!(a.fault, Some(Fault::Stall(_) | Fault::Hold)) {
                st.stalled -= 1;
            }
            if !written {
                return;
            }
            if let Some(seq) = a.acks {
                st.acked = st.acked.max(seq);
            }
        }
        match sock.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// A shard on 127.0.0.1:0 that runs the lane script on a map, and misbehaves when told.
pub(super) struct FakeShard {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for FakeShard {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl FakeShard {
    pub(super) async fn start() -> FakeShard {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(serve(sock, st.clone()));
            }
        });
        FakeShard {
            addr,
            state,
            accept,
        }
    }

    /// The `nth` EVAL carrying a sequence number (from 0) meets `fault`.
    pub(super) fn misbehave(&self, nth: usize, fault: Fault) {
        self.state.lock().faults.insert(nth, fault);
    }

    pub(super) fn set(&self, key: &str, v: Value) {
        self.state.lock().values.insert(key.as_bytes().to_vec(), v);
    }

    fn value(&self, key: &str) -> Option<Value> {
        self.state.lock().values.get(key.as_bytes()).cloned()
    }

    pub(super) fn int(&self, key: &str) -> Option<i64> {
        match self.value(key)? {
            Value::Str(s) => parse_i64(&s),
            Value::Hash => None,
        }
    }

    /// The EVALs that carried a sequence number (reads alone carry 0).
    pub(super) fn writes(&self) -> Vec<Arrival> {
        let st = self.state.lock();
        st.arrivals.iter().filter(|a| a.seq > 0).cloned().collect()
    }

    pub(super) fn watermark(&self) -> u64 {
        let st = self.state.lock();
        st.applied.get(PROXY_ID.as_bytes()).copied().unwrap_or(0)
    }

    pub(super) fn stalled(&self) -> usize {
        self.state.lock().stalled
    }

    /// Lets one held reply go.
    pub(super) fn release(&self) {
        self.state.lock().release.0.add_permits(1);
    }

    /// Every EVAL of the lane script so far, in the order read.
    pub(super) fn arrivals(&self) -> Vec<Arrival> {
        self.state.lock().arrivals.clone()
    }
}

/// An engine wired as `server::build` wires it (no log), with one lane to `fake`.
/// `extra`: more config, e.g. a `[counters]` table.
fn engine_for(fake: &FakeShard, extra: &str) -> Arc<Engine> {
    engine_with(fake, "200ms", extra)
}

/// [`engine_for`] with the shard's request `timeout`.
pub(super) fn engine_with(fake: &FakeShard, timeout: &str, extra: &str) -> Arc<Engine> {
    let config = Config::from_toml_str(&format!(
        "[backend]\ntimeout = \"{timeout}\"\nconnect_timeout = \"200ms\"\n\
         [durability]\nenabled = false\n{extra}"
    ))
    .unwrap();
    let shard = Shard::new("fake".into(), fake.addr, 1, &config).unwrap();
    let router = Arc::new(Router::new(Topology::new(
        1,
        vec![shard.clone()],
        config.ring.vnodes,
    )));
    let engine = Engine::new(
        &config.counters,
        super::windows::Windows::from_config(&config.windows),
        config.clock.clone(),
        router,
        PROXY_ID.into(),
        0,
    );
    engine.add_lane(Lane::spawn(shard, &engine));
    engine
}

pub(super) async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(WAIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: not within {WAIT:?}"),
    }
}

pub(super) async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

/// INCRBY through the engine, reading the base through the lane first when needed.
pub(super) async fn incr(engine: &Engine, key: &str, delta: i64) -> i64 {
    for _ in 0..3 {
        match engine.try_incr(key.as_bytes(), delta) {
            Incr::Value(v) => return v,
            Incr::NeedBase => {
                let k = Bytes::copy_from_slice(key.as_bytes());
                within("a base read", engine.refresh(&k, false))
                    .await
                    .unwrap();
            }
            other => panic!("INCRBY {key} {delta}: {other:?}"),
        }
    }
    panic!("INCRBY {key} {delta}: no base after three reads")
}

/// Until no delta of `keys` is waiting for its shard.
async fn landed(engine: &Engine, keys: &[&str]) {
    until("the batch to land", || {
        keys.iter().all(|k| !engine.has_unflushed(k.as_bytes()))
    })
    .await
}

/// Until a whole flush reports that everything landed.
pub(super) async fn flush_until_ok(engine: &Engine) {
    within("a flush that lands everything", async {
        while !engine.flush_all().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

pub(super) fn stat(a: &std::sync::atomic::AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

#[tokio::test]
async fn a_lost_reply_is_retried_with_the_same_seq_and_counted_once() {
    let fake = FakeShard::start().await;
    let engine = engine_for(&fake, "");
    assert_eq!(incr(&engine, "a", 3).await, 3);
    assert_eq!(incr(&engine, "b", 4).await, 4);
    fake.misbehave(0, Fault::LoseReply);
    assert!(
        !within("the flush", engine.flush_all()).await,
        "a batch without a reply is not reported landed"
    );
    landed(&engine, &["a", "b"]).await;

    let w = fake.writes();
    assert_eq!(w.len(), 2, "{w:?}");
    assert_eq!(w[0].seq, w[1].seq, "the retry keeps its number");
    assert_eq!(w[0].items, w[1].items, "and its contents");
    assert_eq!(w[0].outcome, Outcome::Applied);
    assert_eq!(
        w[1].outcome,
        Outcome::ReadOnly,
        "the second arrival only reads"
    );
    assert_eq!((fake.int("a"), fake.int("b")), (Some(3), Some(4)));
    assert_eq!(fake.watermark(), w[0].seq);
    assert_eq!(engine.value_of(b"a"), Some(Some(3)));
    assert_eq!(engine.value_of(b"b"), Some(Some(4)));
    assert_eq!(stat(&engine.stats.batch_retries), 1);
    assert_eq!(stat(&engine.stats.backend_writes), 2);
    assert_eq!(stat(&engine.stats.dropped_deltas), 0);

    // The lane carries on, with a higher number.
    assert_eq!(incr(&engine, "a", 1).await, 4);
    assert!(within("the flush", engine.flush_all()).await);
    let w = fake.writes();
    assert_eq!(w.len(), 3, "{w:?}");
    assert!(w[2].seq > w[0].seq);
    assert_eq!(w[2].outcome, Outcome::Applied);
    assert_eq!(fake.int("a"), Some(4));
    assert_eq!(engine.value_of(b"a"), Some(Some(4)));
}

/// A batch whose reply comes after the request timeout: the lane has already sent the same
/// batch again, so the shard reads it twice; `stall` decides whether the connection lives
/// (below twice the timeout: the late reply is discarded in FIFO order) or is dropped as
/// stalled (the retry goes on a new connection).
async fn a_late_reply(stall: Duration) -> (FakeShard, Arc<Engine>) {
    let fake = FakeShard::start().await;
    let engine = engine_for(&fake, "");
    assert_eq!(incr(&engine, "a", 3).await, 3);
    assert_eq!(incr(&engine, "b", -2).await, -2);
    fake.misbehave(0, Fault::Stall(stall));
    assert!(!within("the flush", engine.flush_all()).await);
    landed(&engine, &["a", "b"]).await;
    until("the held reply to be written", || fake.stalled() == 0).await;

    let w = fake.writes();
    assert!(w.len() >= 2, "{w:?}");
    assert!(w.iter().all(|a| a.seq == w[0].seq && a.items == w[0].items));
    assert_eq!(w[0].outcome, Outcome::Applied);
    assert!(
        w[1..].iter().all(|a| a.outcome == Outcome::ReadOnly),
        "{w:?}"
    );
    assert_eq!((fake.int("a"), fake.int("b")), (Some(3), Some(-2)));
    assert_eq!(fake.watermark(), w[0].seq);
    assert_eq!(engine.value_of(b"a"), Some(Some(3)));
    assert_eq!(engine.value_of(b"b"), Some(Some(-2)));
    assert_eq!(stat(&engine.stats.dropped_deltas), 0);

    // Nothing is left to send, and a new batch lands once.
    assert_eq!(incr(&engine, "b", 5).await, 3);
    assert!(within("the flush", engine.flush_all()).await);
    assert_eq!(fake.int("b"), Some(3));
    assert_eq!(engine.value_of(b"b"), Some(Some(3)));
    (fake, engine)
}

#[tokio::test]
async fn a_reply_later_than_the_timeout_is_applied_once() {
    // 300 ms: past the 200 ms request timeout, short of the connection's 400 ms stall limit.
    let (fake, engine) = a_late_reply(Duration::from_millis(300)).await;
    let w = fake.writes();
    assert_eq!(w.len(), 3, "the batch twice, then the next one: {w:?}");
    assert_eq!(stat(&engine.stats.batch_retries), 1);
}

#[tokio::test]
async fn a_reply_stalled_past_the_connection_limit_is_applied_once() {
    // 600 ms: the connection is dropped as stalled at 400 ms; the retry uses a new one while
    // the old one still holds the first reply (and possibly the first retry).
    let (_fake, engine) = a_late_reply(Duration::from_millis(600)).await;
    assert!(stat(&engine.stats.batch_retries) >= 2);
}

#[tokio::test]
async fn a_key_that_fails_inside_a_batch_drops_its_delta_and_the_rest_lands_once() {
    let fake = FakeShard::start().await;
    let engine = engine_for(&fake, "");
    fake.set("text", Value::Str(b"1".to_vec()));
    fake.set("hash", Value::Str(b"1".to_vec()));
    assert_eq!(incr(&engine, "good1", 2).await, 2);
    assert_eq!(incr(&engine, "good2", 3).await, 3);
    assert_eq!(incr(&engine, "text", 5).await, 6);
    assert_eq!(incr(&engine, "hash", 7).await, 8);
    // Someone else writes the keys straight to Redis after the proxy read them.
    fake.set("text", Value::Str(b"abc".to_vec()));
    fake.set("hash", Value::Hash);
    assert!(
        within("the flush", engine.flush_all()).await,
        "the batch landed; two of its keys refused their deltas"
    );

    let w = fake.writes();
    assert_eq!(w.len(), 1, "{w:?}");
    assert_eq!(w[0].outcome, Outcome::Applied);
    assert_eq!(w[0].items.len(), 4);
    assert_eq!((fake.int("good1"), fake.int("good2")), (Some(2), Some(3)));
    assert_eq!(fake.value("text"), Some(Value::Str(b"abc".to_vec())));
    assert_eq!(fake.value("hash"), Some(Value::Hash));
    assert_eq!(stat(&engine.stats.dropped_deltas), 2);
    assert_eq!(stat(&engine.stats.batch_retries), 0);
    assert_eq!(stat(&engine.stats.backend_writes), 4);
    assert_eq!(engine.value_of(b"good1"), Some(Some(2)));
    assert_eq!(engine.value_of(b"good2"), Some(Some(3)));
    for k in ["good1", "good2", "text", "hash"] {
        assert!(!engine.has_unflushed(k.as_bytes()), "{k}");
    }
    assert_eq!(engine.value_of(b"hash"), None, "not a string any more");
    assert_eq!(
        engine.try_incr(b"hash", 1),
        Incr::Refused(Refusal::WrongType)
    );
    // INCRBY's error says only "not an integer": the next use asks the shard what it holds.
    assert_eq!(engine.cached(b"text"), Cached::Stale);
    let text = Bytes::from_static(b"text");
    assert_eq!(
        within("a read", engine.refresh(&text, false)).await,
        Ok(KeyValue::Other(Bytes::from_static(b"$3\r\nabc\r\n")))
    );
    assert_eq!(engine.value_of(b"text"), None, "not an integer any more");
    assert_eq!(
        engine.try_incr(b"text", 1),
        Incr::Refused(Refusal::NotInteger)
    );
    assert!(within("the flush", engine.flush_all()).await);
    assert_eq!(fake.writes().len(), 1, "a dropped delta is not sent again");

    // The same with the reply lost: the retry only reads, and the drop is counted once.
    fake.set("late", Value::Str(b"5".to_vec()));
    assert_eq!(incr(&engine, "late", 1).await, 6);
    assert_eq!(incr(&engine, "good1", 1).await, 3);
    fake.set("late", Value::Str(b"x".to_vec()));
    fake.misbehave(1, Fault::LoseReply);
    assert!(!within("the flush", engine.flush_all()).await);
    landed(&engine, &["late", "good1"]).await;
    let w = fake.writes();
    assert_eq!(w.len(), 3, "{w:?}");
    assert_eq!((w[1].seq, w[1].outcome), (w[2].seq, Outcome::Applied));
    assert_eq!(w[2].outcome, Outcome::ReadOnly);
    assert_eq!(fake.int("good1"), Some(3));
    assert_eq!(fake.value("late"), Some(Value::Str(b"x".to_vec())));
    assert_eq!(stat(&engine.stats.dropped_deltas), 3);
    assert_eq!(engine.value_of(b"good1"), Some(Some(3)));
    assert_eq!(engine.value_of(b"late"), None);
}

#[tokio::test]
async fn a_batch_refused_whole_is_retried_and_lands_once() {
    let fake = FakeShard::start().await;
    let engine = engine_for(&fake, "");
    assert_eq!(incr(&engine, "a", 3).await, 3);
    assert_eq!(incr(&engine, "b", 4).await, 4);
    fake.misbehave(0, Fault::Refuse(BUSY));
    fake.misbehave(1, Fault::Refuse(BUSY));
    assert!(!within("the flush", engine.flush_all()).await);
    landed(&engine, &["a", "b"]).await;

    let w = fake.writes();
    let outcomes: Vec<_> = w.iter().map(|a| a.outcome).collect();
    assert_eq!(
        outcomes,
        [Outcome::Refused, Outcome::Refused, Outcome::Applied]
    );
    assert!(w.iter().all(|a| a.seq == w[0].seq && a.items == w[0].items));
    assert_eq!((fake.int("a"), fake.int("b")), (Some(3), Some(4)));
    assert_eq!(fake.watermark(), w[0].seq);
    assert_eq!(engine.value_of(b"a"), Some(Some(3)));
    assert_eq!(engine.value_of(b"b"), Some(Some(4)));
    assert_eq!(stat(&engine.stats.batch_retries), 2);
    assert_eq!(stat(&engine.stats.dropped_deltas), 0);
    assert!(within("the flush", engine.flush_all()).await);
    assert_eq!(fake.writes().len(), 3, "nothing left to send");
}

#[tokio::test]
async fn batches_of_a_lane_are_never_reordered_nor_renumbered_below_an_ack() {
    let fake = FakeShard::start().await;
    // Three keys a batch: a flush of ten keys is four batches. A long TTL: increments made
    // while a batch is being retried need no base read.
    let engine = engine_for(
        &fake,
        "[counters]\nflush_batch_keys = 3\ncache_ttl = \"60s\"\n",
    );
    let keys: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
    let mut expected: HashMap<String, i64> = HashMap::new();
    for k in &keys {
        assert_eq!(incr(&engine, k, 1).await, 1);
        expected.insert(k.clone(), 1);
    }
    fake.misbehave(1, Fault::LoseReply);
    fake.misbehave(4, Fault::Refuse(BUSY));
    fake.misbehave(5, Fault::LoseReply);
    fake.misbehave(9, Fault::LoseReply);
    for round in 0..5i64 {
        let flush = {
            let engine = engine.clone();
            tokio::spawn(async move { engine.flush_all().await })
        };
        // Increments keep coming while the flush is out.
        for (i, k) in keys.iter().enumerate() {
            if (i as i64 + round) % 3 != 0 {
                let d = i as i64 * round + 1;
                let want = expected[k] + d;
                assert_eq!(incr(&engine, k, d).await, want, "{k}");
                expected.insert(k.clone(), want);
                tokio::task::yield_now().await;
            }
        }
        within("the flush", flush).await.unwrap();
    }
    flush_until_ok(&engine).await;
    let names: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
    landed(&engine, &names).await;

    for k in &keys {
        assert_eq!(fake.int(k), Some(expected[k]), "{k} on the shard");
        assert_eq!(
            engine.value_of(k.as_bytes()),
            Some(Some(expected[k])),
            "{k}"
        );
    }
    let w = fake.writes();
    assert!(w.len() > 10, "{} batches", w.len());
    for (prev, next) in w.iter().zip(&w[1..]) {
        assert!(
            next.seq >= prev.seq,
            "reordered: {} after {}",
            next.seq,
            prev.seq
        );
        if next.seq == prev.seq {
            assert_eq!(next.items, prev.items, "a retry carries the same batch");
        }
    }
    for a in &w {
        assert!(
            a.seq > a.acked_before,
            "seq {} sent after {} was acknowledged",
            a.seq,
            a.acked_before
        );
        assert!(a.items.len() <= 3);
    }
    let mut applied: HashMap<u64, usize> = HashMap::new();
    for a in &w {
        *applied.entry(a.seq).or_default() += (a.outcome == Outcome::Applied) as usize;
    }
    assert!(
        applied.values().all(|&n| n == 1),
        "every batch applied exactly once: {applied:?}"
    );
    assert_eq!(fake.watermark(), w.last().unwrap().seq);
    assert_eq!(stat(&engine.stats.batch_retries), 4);
    assert_eq!(stat(&engine.stats.dropped_deltas), 0);
}
