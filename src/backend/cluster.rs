//! Talking to Redis Cluster nodes: asking one for the slot map (`CLUSTER SHARDS`, falling
//! back to `CLUSTER SLOTS` where it is unknown), and reading the redirections a node
//! answers with (`-MOVED`, `-ASK`) and the refusals worth a retry (`-TRYAGAIN`,
//! `-CLUSTERDOWN`).
//!
//! A node reached over TLS is described by its TLS port: `CLUSTER SHARDS` names a node's
//! ports `port` (plain text) and `tls-port` (with `tls-cluster yes`), and the proxy takes the
//! one it dials with (`[backend] tls`); `CLUSTER SLOTS` and redirections already give the
//! port of the kind of connection they were asked on.
//!
//! Owns the wire format of those replies. Does not own the slot map the proxy routes by
//! (`router::slots`), nor when it is refreshed (`cluster`).

use super::conn::{connect, round_trip};
use super::{encode_command, BackendError, ConnOptions};
use bytes::{Bytes, BytesMut};
use redis_protocol::resp2::types::BytesFrame;
use std::net::SocketAddr;
use std::time::Duration;

/// One node as the cluster describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub addr: SocketAddr,
    pub id: String,
    pub primary: bool,
    /// `online`, `failed` or `loading` (`CLUSTER SHARDS`); `online` from `CLUSTER SLOTS`.
    pub health: String,
}

/// A group of slot ranges and the nodes that hold them: one primary, its replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    pub ranges: Vec<(u16, u16)>,
    pub nodes: Vec<NodeInfo>,
}

impl ShardInfo {
    pub fn primary(&self) -> Option<&NodeInfo> {
        self.nodes.iter().find(|n| n.primary)
    }
}

/// Asks the node at `opts.addr` for the cluster's slot map: one connection of its own (with
/// the shards' AUTH and TLS), each question answered within `wait`.
pub async fn ask_map(opts: &ConnOptions, wait: Duration) -> Result<Vec<ShardInfo>, String> {
    // Say why a connection fails (a refused AUTH, a failed TLS handshake), not just that it
    // is down.
    let mut stream = connect(opts).await.map_err(|e| e.to_string())?;
    let asking = ConnOptions {
        request_timeout: wait,
        ..opts.clone()
    };
    let mut buf = BytesMut::with_capacity(4096);
    let mut call = async |args: &[&str]| match round_trip(
        &mut stream,
        &mut buf,
        &encode_command(args),
        &asking,
    )
    .await
    {
        Ok(r) => Ok(r.frame),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Err("no reply".to_string()),
        Err(_) => Err(format!("{:?}", BackendError::Lost)),
    };
    match call(&["CLUSTER", "SHARDS"]).await? {
        BytesFrame::Error(e) if e.contains("unknown subcommand") || e.contains("Unknown") => {}
        BytesFrame::Error(e) => return Err(e.to_string()),
        f => return parse_shards(&f, opts.addr, opts.tls.is_some()),
    }
    match call(&["CLUSTER", "SLOTS"]).await? {
        BytesFrame::Error(e) => Err(e.to_string()),
        f => parse_slots(&f, opts.addr),
    }
}

fn text(f: &BytesFrame) -> Option<String> {
    match f {
        BytesFrame::BulkString(b) | BytesFrame::SimpleString(b) => {
            Some(String::from_utf8_lossy(b).into_owned())
        }
        BytesFrame::Integer(i) => Some(i.to_string()),
        _ => None,
    }
}

fn int(f: &BytesFrame) -> Option<i64> {
    match f {
        BytesFrame::Integer(i) => Some(*i),
        other => text(other)?.parse().ok(),
    }
}

/// A node's address: its `ip` (an empty one, or `?`, means the address we asked, as
/// redis-cli reads it) and port.
fn node_addr(ip: &str, port: i64, asked: SocketAddr) -> Option<SocketAddr> {
    let port = u16::try_from(port).ok().filter(|&p| p != 0)?;
    let ip = match ip {
        "" | "?" => asked.ip(),
        ip => ip.parse().ok()?,
    };
    Some(SocketAddr::new(ip, port))
}

/// `CLUSTER SHARDS` (Redis 7): per shard, `slots` (flat start/end pairs) and `nodes` (each
/// a flat field/value list). `tls`: the proxy dials the nodes over TLS, so a node's address
/// is its `tls-port` (its `port` where it lists none).
pub fn parse_shards(
    f: &BytesFrame,
    asked: SocketAddr,
    tls: bool,
) -> Result<Vec<ShardInfo>, String> {
    let bad = || format!("unexpected CLUSTER SHARDS reply: {f:?}");
    let BytesFrame::Array(shards) = f else {
        return Err(bad());
    };
    let mut out = Vec::new();
    for s in shards {
        let BytesFrame::Array(fields) = s else {
            return Err(bad());
        };
        let mut info = ShardInfo {
            ranges: Vec::new(),
            nodes: Vec::new(),
        };
        for kv in fields.chunks(2) {
            let [k, v] = kv else { return Err(bad()) };
            match (text(k).as_deref(), v) {
                (Some("slots"), BytesFrame::Array(v)) => {
                    for pair in v.chunks(2) {
                        let [a, b] = pair else { return Err(bad()) };
                        let (a, b) = (int(a).ok_or_else(bad)?, int(b).ok_or_else(bad)?);
                        info.ranges.push((a as u16, b as u16));
                    }
                }
                (Some("nodes"), BytesFrame::Array(v)) => {
                    for n in v {
                        let BytesFrame::Array(nf) = n else {
                            return Err(bad());
                        };
                        let (mut ip, mut port, mut tls_port, mut id, mut role, mut health) = (
                            String::new(),
                            0,
                            0,
                            String::new(),
                            String::new(),
                            String::new(),
                        );
                        for kv in nf.chunks(2) {
                            let [k, v] = kv else { return Err(bad()) };
                            match text(k).as_deref() {
                                Some("ip") => ip = text(v).unwrap_or_default(),
                                Some("port") => port = int(v).unwrap_or(0),
                                Some("tls-port") => tls_port = int(v).unwrap_or(0),
                                Some("id") => id = text(v).unwrap_or_default(),
                                Some("role") => role = text(v).unwrap_or_default(),
                                Some("health") => health = text(v).unwrap_or_default(),
                                _ => {}
                            }
                        }
                        // Without TLS, a node with no plain-text port (TLS only) is not
                        // reachable; with it, a node listing no TLS port is dialled (and
                        // fails its handshake) on its plain one.
                        let dialled = if tls && tls_port != 0 { tls_port } else { port };
                        let Some(addr) = node_addr(&ip, dialled, asked) else {
                            continue;
                        };
                        info.nodes.push(NodeInfo {
                            addr,
                            id,
                            primary: role == "master",
                            health,
                        });
                    }
                }
                _ => {}
            }
        }
        out.push(info);
    }
    Ok(out)
}

/// `CLUSTER SLOTS`: per range, `start end [ip port id ...] [replica ...]*`.
pub fn parse_slots(f: &BytesFrame, asked: SocketAddr) -> Result<Vec<ShardInfo>, String> {
    let bad = || format!("unexpected CLUSTER SLOTS reply: {f:?}");
    let BytesFrame::Array(ranges) = f else {
        return Err(bad());
    };
    let mut out: Vec<ShardInfo> = Vec::new();
    for r in ranges {
        let BytesFrame::Array(r) = r else {
            return Err(bad());
        };
        if r.len() < 3 {
            return Err(bad());
        }
        let (a, b) = (int(&r[0]).ok_or_else(bad)?, int(&r[1]).ok_or_else(bad)?);
        let mut nodes = Vec::new();
        for (i, n) in r[2..].iter().enumerate() {
            let BytesFrame::Array(n) = n else {
                return Err(bad());
            };
            let ip = n.first().and_then(text).unwrap_or_default();
            let port = n.get(1).and_then(int).unwrap_or(0);
            let Some(addr) = node_addr(&ip, port, asked) else {
                continue;
            };
            nodes.push(NodeInfo {
                addr,
                id: n.get(2).and_then(text).unwrap_or_default(),
                primary: i == 0,
                health: "online".to_string(),
            });
        }
        // Ranges of one primary are one shard, as CLUSTER SHARDS groups them.
        let primary = nodes.first().map(|n| n.addr);
        match out
            .iter_mut()
            .find(|s| s.primary().map(|p| p.addr) == primary)
        {
            Some(s) => s.ranges.push((a as u16, b as u16)),
            None => out.push(ShardInfo {
                ranges: vec![(a as u16, b as u16)],
                nodes,
            }),
        }
    }
    Ok(out)
}

/// Where a node sent a command instead of running it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redirect {
    /// The slot lives at `addr` now: refresh the map, send it there.
    Moved { slot: u16, addr: SocketAddr },
    /// The slot is being migrated; this command goes to `addr`, after `ASKING`.
    Ask { slot: u16, addr: SocketAddr },
    /// Not run now; the same command may succeed soon (`TRYAGAIN` during a migration,
    /// `CLUSTERDOWN` while the cluster fails over).
    Retry,
}

impl Redirect {
    /// Reads an error reply's text (without its leading `-`). Only what the node certainly
    /// did not run is a redirect: these errors all come before execution.
    pub fn parse(err: &str) -> Option<Redirect> {
        let mut words = err.split(' ');
        let kind = words.next()?;
        match kind {
            "MOVED" | "ASK" => {
                let slot: u16 = words.next()?.parse().ok()?;
                let addr = words.next()?;
                let addr: SocketAddr = match addr.parse() {
                    Ok(a) => a,
                    // `:port` alone: the address we sent to, with an unknown endpoint.
                    Err(_) => return None,
                };
                Some(if kind == "MOVED" {
                    Redirect::Moved { slot, addr }
                } else {
                    Redirect::Ask { slot, addr }
                })
            }
            "TRYAGAIN" | "CLUSTERDOWN" => Some(Redirect::Retry),
            _ => None,
        }
    }

    /// Counts this redirection in the metrics (`tallyproxy_cluster_redirects_total`): called
    /// by whoever acts on it, e.g. `Redirect::of_raw(raw).inspect(Redirect::count)`.
    pub fn count(&self) {
        let m = crate::metrics::global();
        let counter = match self {
            Redirect::Moved { .. } => &m.cluster_moved,
            Redirect::Ask { .. } => &m.cluster_ask,
            Redirect::Retry => &m.cluster_retry,
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// A raw reply's redirect, if it is one: the cheap test first. Pure (see [`Redirect::count`]).
    pub fn of_raw(raw: &Bytes) -> Option<Redirect> {
        if raw.first() != Some(&b'-') {
            return None;
        }
        let end = raw.iter().position(|&b| b == b'\r').unwrap_or(raw.len());
        Redirect::parse(std::str::from_utf8(&raw[1..end]).ok()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> BytesFrame {
        BytesFrame::BulkString(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn redirects_are_read_as_redis_writes_them() {
        let a: SocketAddr = "127.0.0.1:31003".parse().unwrap();
        assert_eq!(
            Redirect::parse("MOVED 12182 127.0.0.1:31003"),
            Some(Redirect::Moved {
                slot: 12182,
                addr: a
            })
        );
        assert_eq!(
            Redirect::of_raw(&Bytes::from_static(b"-ASK 5 127.0.0.1:31003\r\n")),
            Some(Redirect::Ask { slot: 5, addr: a })
        );
        assert_eq!(
            Redirect::parse("TRYAGAIN Multiple keys request during rehashing of slot"),
            Some(Redirect::Retry)
        );
        assert_eq!(
            Redirect::parse("CLUSTERDOWN Hash slot not served"),
            Some(Redirect::Retry)
        );
        assert_eq!(Redirect::parse("ERR wrong number of arguments"), None);
        assert_eq!(
            Redirect::parse("CROSSSLOT Keys in request don't hash to the same slot"),
            None
        );
        assert_eq!(Redirect::of_raw(&Bytes::from_static(b"+OK\r\n")), None);
    }

    #[test]
    fn cluster_shards_and_slots_give_the_same_map() {
        let asked: SocketAddr = "127.0.0.1:31001".parse().unwrap();
        let node = |port: i64, role: &str| {
            BytesFrame::Array(vec![
                bulk("id"),
                bulk("abc"),
                bulk("port"),
                BytesFrame::Integer(port),
                bulk("ip"),
                bulk("127.0.0.1"),
                bulk("role"),
                bulk(role),
                bulk("health"),
                bulk("online"),
            ])
        };
        let shards = BytesFrame::Array(vec![BytesFrame::Array(vec![
            bulk("slots"),
            BytesFrame::Array(vec![
                BytesFrame::Integer(0),
                BytesFrame::Integer(5460),
                BytesFrame::Integer(6000),
                BytesFrame::Integer(6001),
            ]),
            bulk("nodes"),
            BytesFrame::Array(vec![node(31001, "master"), node(31004, "replica")]),
        ])]);
        let a = parse_shards(&shards, asked, false).unwrap();
        assert_eq!(a[0].ranges, vec![(0, 5460), (6000, 6001)]);
        assert_eq!(a[0].primary().unwrap().addr, asked);
        assert_eq!(a[0].nodes.len(), 2);
        let entry = |a: i64, b: i64| {
            BytesFrame::Array(vec![
                BytesFrame::Integer(a),
                BytesFrame::Integer(b),
                BytesFrame::Array(vec![
                    bulk("127.0.0.1"),
                    BytesFrame::Integer(31001),
                    bulk("abc"),
                ]),
                BytesFrame::Array(vec![
                    bulk("127.0.0.1"),
                    BytesFrame::Integer(31004),
                    bulk("abc"),
                ]),
            ])
        };
        let slots = BytesFrame::Array(vec![entry(0, 5460), entry(6000, 6001)]);
        let b = parse_slots(&slots, asked).unwrap();
        assert_eq!(b[0].ranges, a[0].ranges);
        assert_eq!(
            b[0].nodes
                .iter()
                .map(|n| (n.addr, n.primary))
                .collect::<Vec<_>>(),
            a[0].nodes
                .iter()
                .map(|n| (n.addr, n.primary))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_tls_cluster_is_dialled_on_its_tls_ports() {
        let asked: SocketAddr = "127.0.0.1:32001".parse().unwrap();
        // As Redis 7.0 with `tls-cluster yes` lists its nodes: `tls-port`, and `port` only
        // when the plain-text port is open too.
        let node = |ports: &[(&str, i64)], role: &str| {
            let mut f = vec![bulk("id"), bulk("abc")];
            for (k, v) in ports {
                f.extend([bulk(k), BytesFrame::Integer(*v)]);
            }
            f.extend([bulk("ip"), bulk("127.0.0.1"), bulk("role"), bulk(role)]);
            BytesFrame::Array(f)
        };
        let shards = BytesFrame::Array(vec![BytesFrame::Array(vec![
            bulk("slots"),
            BytesFrame::Array(vec![BytesFrame::Integer(0), BytesFrame::Integer(16383)]),
            bulk("nodes"),
            BytesFrame::Array(vec![
                node(&[("tls-port", 32001)], "master"),
                node(&[("port", 31004), ("tls-port", 32004)], "replica"),
            ]),
        ])]);
        let ports = |tls| {
            parse_shards(&shards, asked, tls).unwrap()[0]
                .nodes
                .iter()
                .map(|n| (n.addr.port(), n.primary))
                .collect::<Vec<_>>()
        };
        assert_eq!(ports(true), vec![(32001, true), (32004, false)]);
        // Without TLS the TLS-only primary is unreachable: left out, never dialled in clear.
        assert_eq!(ports(false), vec![(31004, false)]);
    }
}
