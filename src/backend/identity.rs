//! Whether an address is a Redis server, before it is used as a shard.
//!
//! A shard must be Redis itself: the proxy moves keys into it with scripts, `SCAN` and
//! `MIGRATE`, and keeps its exactly-once records there. Another tallyproxy (or this one)
//! answers PING too, and would take the keys only to answer `TRYAGAIN` for them. So a shard
//! is asked `INFO server`, over a throwaway connection made as the proxy connects (TLS,
//! credentials): a Redis server names its `redis_version`; a tallyproxy names its
//! `tallyproxy_version` too (see `info`), and is refused.
//!
//! Owns that one question. Does not own when it is asked (`rebalance` on a change,
//! `server` at start-up, `health` when a shard comes back).

use super::{encode_command, BackendConn, BackendError, ConnOptions};
use redis_protocol::resp2::types::BytesFrame;
use std::net::SocketAddr;

/// Why an address cannot be used as a shard (now).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotRedis {
    /// Nothing usable answers there yet (refused, timed out, TLS or AUTH failed): it may
    /// still turn out to be Redis.
    Unreachable(String),
    /// It refused the question (credentials, or an ACL user that may not run INFO): it may
    /// be Redis, but it cannot be told from a tallyproxy, nor used as the proxy would.
    Refused(String),
    /// A tallyproxy; `itself` when it is the very proxy asking.
    Tallyproxy { itself: bool },
    /// Something that answers, but not as Redis does.
    Other(String),
}

impl NotRedis {
    /// The message for operators, naming the address.
    pub fn message(&self, addr: SocketAddr) -> String {
        match self {
            NotRedis::Unreachable(why) => format!("{addr} is unreachable: {why}"),
            NotRedis::Refused(e) => format!(
                "{addr} refused INFO server, which tells a Redis server from a tallyproxy \
                 (check the shard's credentials; an ACL user needs INFO): {e}"
            ),
            NotRedis::Tallyproxy { itself: true } => {
                format!("{addr} is a tallyproxy (this very proxy), not a Redis server")
            }
            NotRedis::Tallyproxy { itself: false } => {
                format!("{addr} is a tallyproxy, not a Redis server")
            }
            NotRedis::Other(why) => format!("{addr} is not a Redis server: {why}"),
        }
    }

    /// Whether the address may still prove to be Redis later (as opposed to having
    /// answered as something else).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, NotRedis::Unreachable(_) | NotRedis::Refused(_))
    }
}

/// What `INFO server` says about the server that sent it.
pub fn classify(info: &str, own_proxy_id: &str) -> Result<(), NotRedis> {
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.trim_end().strip_prefix(name)?.strip_prefix(':'))
    };
    if field("tallyproxy_version").is_some() {
        return Err(NotRedis::Tallyproxy {
            itself: field("proxy_id") == Some(own_proxy_id),
        });
    }
    match field("redis_version") {
        Some(v) if !v.is_empty() => Ok(()),
        _ => Err(NotRedis::Other(
            "its INFO server names no redis_version".into(),
        )),
    }
}

/// Asks the server at `opts.addr` who it is (see the module doc). Bounded by twice the
/// connect timeout plus the request timeout.
pub async fn verify(opts: &ConnOptions, own_proxy_id: &str) -> Result<(), NotRedis> {
    // A plain connect first, for the operating system's reason when it fails.
    match tokio::time::timeout(
        opts.connect_timeout,
        tokio::net::TcpStream::connect(opts.current_addr()),
    )
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(NotRedis::Unreachable(e.to_string())),
        Err(_) => return Err(NotRedis::Unreachable("connect timed out".into())),
    }
    let conn = BackendConn::spawn(ConnOptions {
        queue_depth: 2,
        ..opts.clone()
    });
    let wait = opts.connect_timeout * 2 + opts.request_timeout;
    let reply =
        crate::deadline::within_for(wait, conn.send(encode_command(&["INFO", "server"]))).await;
    match reply {
        Ok(Ok(Ok(r))) => match r.frame {
            BytesFrame::BulkString(b) => classify(&String::from_utf8_lossy(&b), own_proxy_id),
            BytesFrame::Error(e)
                if ["NOAUTH", "WRONGPASS", "NOPERM"]
                    .iter()
                    .any(|p| e.starts_with(p)) =>
            {
                Err(NotRedis::Refused(e.to_string()))
            }
            BytesFrame::Error(e) => Err(NotRedis::Other(format!("INFO server answered {e}"))),
            other => Err(NotRedis::Other(format!(
                "INFO server answered {}",
                kind(&other)
            ))),
        },
        Ok(Ok(Err(BackendError::Lost))) => Err(NotRedis::Other(
            "it closed the connection or answered something that is not RESP".into(),
        )),
        Ok(Ok(Err(BackendError::Unavailable | BackendError::Busy))) => Err(NotRedis::Unreachable(
            "connected, but the handshake (TLS or AUTH) failed".into(),
        )),
        Ok(Ok(Err(BackendError::Timeout))) | Ok(Err(_)) | Err(_) => {
            Err(NotRedis::Unreachable(format!(
                "no answer to INFO server within {}",
                humantime::format_duration(wait)
            )))
        }
    }
}

fn kind(f: &BytesFrame) -> &'static str {
    match f {
        BytesFrame::SimpleString(_) => "a simple string",
        BytesFrame::Integer(_) => "an integer",
        BytesFrame::Array(_) => "an array",
        BytesFrame::Null => "a null",
        _ => "an unexpected reply",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_tells_redis_from_a_tallyproxy() {
        let redis = "# Server\r\nredis_version:7.2.4\r\nredis_mode:standalone\r\n";
        assert_eq!(classify(redis, "p1"), Ok(()));
        let proxy =
            "# Server\r\nredis_version:7.0.0\r\ntallyproxy_version:0.1.0\r\nproxy_id:p1\r\n";
        assert_eq!(
            classify(proxy, "p1"),
            Err(NotRedis::Tallyproxy { itself: true })
        );
        assert_eq!(
            classify(proxy, "p2"),
            Err(NotRedis::Tallyproxy { itself: false })
        );
        assert!(matches!(
            classify("# Server\r\n", "p1"),
            Err(NotRedis::Other(_))
        ));
        let addr: SocketAddr = "127.0.0.1:6380".parse().unwrap();
        assert_eq!(
            NotRedis::Tallyproxy { itself: false }.message(addr),
            "127.0.0.1:6380 is a tallyproxy, not a Redis server"
        );
    }
}
