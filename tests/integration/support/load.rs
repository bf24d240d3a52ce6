//! Counting load for the fault tests: pipelined INCRs from several raw connections, with
//! what each client saw per key, so that a test can check key by key that every acknowledged
//! increment landed (0 lost) and nothing landed that was not sent (0 doubled).

use super::encode;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Per key: increments acknowledged with an integer, and increments sent whose outcome is
/// not a refusal (acknowledged, or unknown because the connection closed first).
#[derive(Debug, Default, Clone, Copy)]
pub struct Seen {
    pub acked: i64,
    pub sent: i64,
}

#[derive(Debug, Default)]
pub struct Load {
    pub keys: HashMap<String, Seen>,
    pub refusals: u64,
    pub closed: u64,
}

impl Load {
    pub fn merge(&mut self, other: Load) {
        for (k, s) in other.keys {
            let e = self.keys.entry(k).or_default();
            e.acked += s.acked;
            e.sent += s.sent;
        }
        self.refusals += other.refusals;
        self.closed += other.closed;
    }

    pub fn acked(&self) -> i64 {
        self.keys.values().map(|s| s.acked).sum()
    }

    /// Key by key, with `landed` what the shards hold: (acknowledged but not landed, landed
    /// but never sent), summed.
    pub fn lost_and_doubled(&self, mut landed: impl FnMut(&str) -> i64) -> (i64, i64) {
        let (mut lost, mut doubled) = (0, 0);
        for (k, s) in &self.keys {
            let got = landed(k);
            lost += (s.acked - got).max(0);
            doubled += (got - s.sent).max(0);
        }
        (lost, doubled)
    }
}

/// How the clients push.
#[derive(Debug, Clone)]
pub struct Spec {
    pub clients: usize,
    /// INCRs per pipeline, over each client's own 4 keys `<prefix>:<client>:<0..4>`.
    pub depth: usize,
    pub prefix: String,
    /// Between a pipeline's replies and the next pipeline.
    pub pause: Duration,
    /// A client stops after this many pipelines in a row were refused whole (a full log).
    pub refused_rounds: Option<u32>,
    /// Each client stops after this long in any case.
    pub limit: Duration,
}

/// Reads one line reply (`:n` or `-err`); None when the connection closed or stalled.
async fn read_line(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..i]).to_string();
            buf.drain(..i + 2);
            return Some(line);
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

/// Runs `spec.clients` connections until `stop`, until each one's connection closes, or
/// until its limits; returns what they saw, merged.
pub async fn pipelined(addr: SocketAddr, spec: Spec, stop: Arc<AtomicBool>) -> Load {
    let mut tasks = Vec::new();
    for c in 0..spec.clients {
        let (stop, spec) = (stop.clone(), spec.clone());
        tasks.push(tokio::spawn(async move {
            let mut load = Load::default();
            let keys: Vec<String> = (0..4).map(|k| format!("{}:{c}:{k}", spec.prefix)).collect();
            let Ok(mut s) = TcpStream::connect(addr).await else {
                return load;
            };
            let mut buf = Vec::new();
            let mut refused_rounds = 0;
            let deadline = Instant::now() + spec.limit;
            'rounds: while !stop.load(Ordering::Relaxed)
                && Instant::now() < deadline
                && spec.refused_rounds.is_none_or(|n| refused_rounds < n)
            {
                let mut req = Vec::new();
                for i in 0..spec.depth {
                    req.extend(encode(&["INCR", &keys[i % keys.len()]]));
                    load.keys
                        .entry(keys[i % keys.len()].clone())
                        .or_default()
                        .sent += 1;
                }
                if s.write_all(&req).await.is_err() {
                    load.closed += 1;
                    break;
                }
                let mut refused = 0;
                for i in 0..spec.depth {
                    let Some(line) = read_line(&mut s, &mut buf).await else {
                        // Closed without replies: the rest of the pipeline is unknown.
                        load.closed += 1;
                        break 'rounds;
                    };
                    let seen = load.keys.get_mut(&keys[i % keys.len()]).unwrap();
                    if line.starts_with(':') {
                        seen.acked += 1;
                    } else {
                        assert!(line.starts_with('-'), "reply {line:?}");
                        // A refusal buffers nothing.
                        seen.sent -= 1;
                        refused += 1;
                        load.refusals += 1;
                    }
                }
                refused_rounds = if refused == spec.depth {
                    refused_rounds + 1
                } else {
                    0
                };
                if !spec.pause.is_zero() {
                    tokio::time::sleep(spec.pause).await;
                }
            }
            load
        }));
    }
    let mut all = Load::default();
    for t in tasks {
        all.merge(t.await.unwrap());
    }
    all
}
