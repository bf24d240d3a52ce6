//! Redis Sentinel, as the proxy asks it: where a master name's primary is, and a
//! subscription to `+switch-master`; and [`Primary`], a Sentinel-managed shard's current
//! address, shared with the shard's connections.
//!
//! Owns the questions to sentinels and their parsing. Does not own when they are asked nor
//! what follows from the answers (`follower`), nor connections to shards (`conn`).

use super::{conn::decode, encode_command};
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use redis_protocol::resp2::types::BytesFrame;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};

/// A Sentinel-managed shard's primary as the proxy knows it. Connections read the address
/// on each (re)connect and drop when it changes (see `conn`); a connection that finds a
/// replica where the primary should be asks for a re-check (`recheck`).
pub struct Primary {
    /// The Sentinel master name.
    pub master: String,
    addr: watch::Sender<SocketAddr>,
    /// Wakes the follower: something saw a replica (or nothing) at the primary's address.
    pub recheck: Notify,
    /// The primary's replicas, as its `ROLE` last listed them.
    pub replicas: Mutex<Vec<SocketAddr>>,
    /// The last change of primary seen: when, from, to.
    pub last_failover: Mutex<Option<(SystemTime, SocketAddr, SocketAddr)>>,
}

impl Primary {
    pub fn new(master: String, addr: SocketAddr) -> Primary {
        Primary {
            master,
            addr: watch::Sender::new(addr),
            recheck: Notify::new(),
            replicas: Mutex::new(Vec::new()),
            last_failover: Mutex::new(None),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        *self.addr.borrow()
    }

    /// A receiver whose `changed` fires when the primary moves.
    pub fn subscribe(&self) -> watch::Receiver<SocketAddr> {
        self.addr.subscribe()
    }

    /// Moves the shard to a confirmed primary at `to`: every connection drops and
    /// reconnects there. Returns whether it moved.
    pub fn set(&self, to: SocketAddr) -> bool {
        let from = self.addr();
        if from == to {
            return false;
        }
        self.addr.send_replace(to);
        // Port 0: no primary was known (none confirmed at start-up); finding one is no failover.
        if from.port() != 0 {
            *self.last_failover.lock() = Some((SystemTime::now(), from, to));
        }
        true
    }
}

/// How the proxy reaches the sentinels.
#[derive(Clone)]
pub struct Sentinels {
    pub addrs: Vec<SocketAddr>,
    /// `AUTH ...`, sent first on each connection, when configured.
    pub auth: Option<Bytes>,
    pub timeout: Duration,
}

/// A connection to one sentinel, for a few questions and a subscription.
struct SentinelConn {
    stream: TcpStream,
    buf: BytesMut,
}

impl SentinelConn {
    async fn open(addr: SocketAddr, s: &Sentinels) -> Result<SentinelConn, String> {
        let stream = tokio::time::timeout(s.timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| format!("sentinel {addr}: connect timed out"))?
            .map_err(|e| format!("sentinel {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let mut c = SentinelConn {
            stream,
            buf: BytesMut::with_capacity(1024),
        };
        if let Some(auth) = &s.auth {
            if let BytesFrame::Error(e) = c.ask(auth.clone(), Some(s.timeout)).await? {
                return Err(format!("sentinel {addr}: AUTH: {e}"));
            }
        }
        Ok(c)
    }

    async fn ask(&mut self, cmd: Bytes, timeout: Option<Duration>) -> Result<BytesFrame, String> {
        let send = self.stream.write_all(&cmd);
        match timeout {
            Some(t) => tokio::time::timeout(t, send)
                .await
                .map_err(|_| "sentinel write timed out".to_string())?,
            None => send.await,
        }
        .map_err(|e| e.to_string())?;
        self.next(timeout).await
    }

    /// The next frame, within `timeout` (None: however long it takes).
    async fn next(&mut self, timeout: Option<Duration>) -> Result<BytesFrame, String> {
        loop {
            if let Some(r) = decode(&mut self.buf, false)? {
                return Ok(r.frame);
            }
            let read = self.stream.read_buf(&mut self.buf);
            let n = match timeout {
                Some(t) => tokio::time::timeout(t, read)
                    .await
                    .map_err(|_| "sentinel did not answer in time".to_string())?,
                None => read.await,
            }
            .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("sentinel closed the connection".into());
            }
        }
    }
}

/// Asks the sentinels in turn where `master`'s primary is; the first answer wins.
pub async fn master_addr(s: &Sentinels, master: &str) -> Result<SocketAddr, String> {
    let cmd = encode_command(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", master]);
    let mut why = Vec::new();
    for &addr in &s.addrs {
        let answer = async {
            let mut c = SentinelConn::open(addr, s).await?;
            let f = c.ask(cmd.clone(), Some(s.timeout)).await?;
            parse_master_addr(&f).ok_or_else(|| format!("sentinel {addr} answered {f:?}"))
        };
        match answer.await {
            Ok(a) => return Ok(a),
            Err(e) => why.push(e),
        }
    }
    Err(format!(
        "no sentinel knows master {master:?}: {}",
        why.join("; ")
    ))
}

/// `[ip, port]` as an address; None for a null (unknown master) or anything else.
pub fn parse_master_addr(f: &BytesFrame) -> Option<SocketAddr> {
    let BytesFrame::Array(parts) = f else {
        return None;
    };
    let [ip, port] = parts.as_slice() else {
        return None;
    };
    let text = |f: &BytesFrame| match f {
        BytesFrame::BulkString(b) | BytesFrame::SimpleString(b) => {
            std::str::from_utf8(b).ok().map(str::to_string)
        }
        _ => None,
    };
    format!("{}:{}", text(ip)?, text(port)?).parse().ok()
}

/// What `ROLE` says: `Some(replicas)` for a primary, None for anything else.
pub fn parse_role(f: &BytesFrame) -> Option<Vec<SocketAddr>> {
    let BytesFrame::Array(parts) = f else {
        return None;
    };
    match parts.first() {
        Some(BytesFrame::BulkString(b)) if b.as_ref() == b"master" => {}
        _ => return None,
    }
    let mut replicas = Vec::new();
    if let Some(BytesFrame::Array(rs)) = parts.get(2) {
        for r in rs {
            if let BytesFrame::Array(r) = r {
                if let [ip, port, ..] = r.as_slice() {
                    if let Some(a) =
                        parse_master_addr(&BytesFrame::Array(vec![ip.clone(), port.clone()]))
                    {
                        replicas.push(a);
                    }
                }
            }
        }
    }
    Some(replicas)
}

/// `+switch-master` text (`<name> <old ip> <old port> <new ip> <new port>`): the master
/// name and its new address.
pub fn parse_switch(msg: &str) -> Option<(&str, SocketAddr)> {
    let mut w = msg.split_whitespace();
    let name = w.next()?;
    let (_, _) = (w.next()?, w.next()?);
    let addr = format!("{}:{}", w.next()?, w.next()?).parse().ok()?;
    Some((name, addr))
}

/// Subscribes to `+switch-master` on the sentinel at `addr` and calls `on_switch` with each
/// message's text until the connection drops (the error says why).
pub async fn follow_switches(
    addr: SocketAddr,
    s: &Sentinels,
    mut on_switch: impl FnMut(&str),
) -> String {
    let mut c = match SentinelConn::open(addr, s).await {
        Ok(c) => c,
        Err(e) => return e,
    };
    match c
        .ask(
            encode_command(&["SUBSCRIBE", "+switch-master"]),
            Some(s.timeout),
        )
        .await
    {
        Ok(BytesFrame::Array(_)) => {}
        Ok(f) => return format!("sentinel {addr} refused SUBSCRIBE: {f:?}"),
        Err(e) => return e,
    }
    tracing::info!(sentinel = %addr, "following +switch-master");
    // A subscribed connection is silent between events; a PING after `KEEPALIVE` of
    // silence finds a sentinel that vanished without closing (no answer within another
    // `KEEPALIVE`: the next sentinel is tried).
    let mut pinged = false;
    loop {
        match tokio::time::timeout(KEEPALIVE, c.next(None)).await {
            Ok(Ok(BytesFrame::Array(parts))) => {
                pinged = false;
                let is_message = matches!(parts.first(), Some(BytesFrame::BulkString(k)) if k.as_ref() == b"message");
                if let (true, Some(BytesFrame::BulkString(text))) = (is_message, parts.get(2)) {
                    on_switch(&String::from_utf8_lossy(text));
                }
            }
            Ok(Ok(_)) => pinged = false,
            Ok(Err(e)) => return format!("sentinel {addr}: {e}"),
            Err(_) if pinged => return format!("sentinel {addr}: no answer to PING"),
            Err(_) => {
                pinged = true;
                let frame = encode_command(&["PING"]);
                let ping = c.stream.write_all(&frame);
                if tokio::time::timeout(s.timeout, ping)
                    .await
                    .map_or(true, |r| r.is_err())
                {
                    return format!("sentinel {addr}: cannot send PING");
                }
            }
        }
    }
}

/// Silence on the subscription before it is checked with a PING.
const KEEPALIVE: Duration = Duration::from_secs(15);

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> BytesFrame {
        BytesFrame::BulkString(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn sentinel_answers_are_parsed() {
        let a = BytesFrame::Array(vec![bulk("127.0.0.1"), bulk("7070")]);
        assert_eq!(
            parse_master_addr(&a),
            Some("127.0.0.1:7070".parse().unwrap())
        );
        assert_eq!(parse_master_addr(&BytesFrame::Null), None);
        let role = BytesFrame::Array(vec![
            bulk("master"),
            BytesFrame::Integer(10),
            BytesFrame::Array(vec![BytesFrame::Array(vec![
                bulk("127.0.0.1"),
                bulk("7071"),
                bulk("10"),
            ])]),
        ]);
        assert_eq!(
            parse_role(&role),
            Some(vec!["127.0.0.1:7071".parse().unwrap()])
        );
        let replica = BytesFrame::Array(vec![
            bulk("slave"),
            bulk("127.0.0.1"),
            BytesFrame::Integer(7070),
        ]);
        assert_eq!(parse_role(&replica), None);
        assert_eq!(
            parse_switch("shard-a 127.0.0.1 7070 127.0.0.1 7071"),
            Some(("shard-a", "127.0.0.1:7071".parse().unwrap()))
        );
        assert_eq!(parse_switch("shard-a 127.0.0.1"), None);
    }

    #[test]
    fn a_moved_primary_is_seen_by_connections_and_recorded_as_a_failover() {
        let nowhere: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let (a, b): (SocketAddr, SocketAddr) = (
            "127.0.0.1:7070".parse().unwrap(),
            "127.0.0.1:7071".parse().unwrap(),
        );
        let p = Primary::new("shard-a".into(), nowhere);
        let mut rx = p.subscribe();
        rx.borrow_and_update();
        // Found at last (none was confirmed at start-up): a move, not a failover.
        assert!(p.set(a));
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), a);
        assert!(p.last_failover.lock().is_none());
        assert!(!p.set(a), "the same primary again is no move");
        assert!(!rx.has_changed().unwrap());
        assert!(p.set(b));
        assert_eq!(p.addr(), b);
        let (_, from, to) = p.last_failover.lock().unwrap();
        assert_eq!((from, to), (a, b));
    }
}
