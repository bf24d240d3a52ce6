//! Commands that block (BLPOP, BRPOP, BRPOPLPUSH, BLMOVE, BLMPOP, BZPOPMIN, BZPOPMAX, BZMPOP,
//! XREAD and XREADGROUP with BLOCK): each runs on a dedicated connection to the shard of its
//! keys (`backend::dedicated`), opened for it and closed when it returns, so that a blocked
//! client never holds a pooled connection other clients' commands are pipelined on.
//!
//! Keys must live on one shard (else `CROSSSLOT`, as for `same_shard`). The command is a
//! barrier: the client's later pipelined commands wait behind it, in order. While it blocks,
//! the connection loop keeps reading the client's socket (`Pending::Blocking`): a client
//! that leaves drops the command, which closes the dedicated connection, and Redis forgets
//! the blocked client. The wait is bounded by the command's own timeout plus
//! `backend.timeout` (`0`, block for ever, is bounded by the client's presence and shutdown).
//! An XREAD or XREADGROUP without BLOCK does not block and goes the `same_shard` way.
//!
//! Owns running these commands. Does not own the key positions (`command`) or the cap
//! (`backend::dedicated::Limit`).

use super::{error_bytes, same_shard, Client, Pending, Task};
use crate::backend::dedicated::Dedicated;
use crate::backend::encode_command;
use crate::command::{Keys, Spec, StreamOptions};
use crate::context::Context;
use crate::resp::reply::{self, Proto};
use crate::shutdown::Shutdown;
use bytes::{Bytes, BytesMut};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};

pub(super) fn dispatch(
    ctx: &Arc<Context>,
    client: &Client,
    spec: &Spec,
    keys: Keys,
    args: Vec<Bytes>,
    out: &mut BytesMut,
) -> Option<Pending> {
    let Some(timeout) = block_timeout(spec.name, &args) else {
        return same_shard::dispatch(ctx, client, keys, args, out);
    };
    let (shard, named) = match same_shard::owner(ctx, keys, &args) {
        Ok(o) => o,
        Err(e) => {
            reply::error(out, e);
            return None;
        }
    };
    let permit = super::take_dedicated(ctx, out)?;
    let counters: Vec<Bytes> = named
        .iter()
        .filter(|k| ctx.engine.is_batched(k))
        .cloned()
        .collect();
    let (ctx, resp3) = (ctx.clone(), client.proto == Proto::Resp3);
    Some(Pending::Blocking(Box::pin(async move {
        if let Err(e) = same_shard::prepare(&ctx, &named, &counters, &shard).await {
            return e;
        }
        let mut conn = match Dedicated::open(&shard, resp3, permit).await {
            Ok(c) => c,
            Err(e) => return error_bytes(&e.client_message(&shard.name)),
        };
        let limit = timeout.map(|t| t + shard.timeout);
        let reply = conn.call(&encode_command(&args), &shard, 0, limit).await;
        for k in &counters {
            ctx.engine.invalidate(k);
        }
        match reply {
            Ok(r) => BytesMut::from(&r.raw[..]),
            Err(e) => error_bytes(&e.client_message(&shard.name)),
        }
    })))
}

/// Most bytes read ahead from a client while its blocking command waits; past it the
/// socket is not read until the command returns.
const BLOCKED_READ_AHEAD: usize = 1024 * 1024;

/// Awaits a blocking command while watching the client's socket: None when the client
/// leaves or the proxy shuts down first (the command is dropped, closing its connection).
/// What the client pipelines meanwhile is read into `rbuf`, dispatched after the command.
pub(super) async fn wait<S: AsyncRead + Unpin>(
    task: Task,
    stream: &mut S,
    rbuf: &mut BytesMut,
    shutdown: &mut Shutdown,
) -> Option<BytesMut> {
    let mut task = task;
    loop {
        let room = rbuf.len() < BLOCKED_READ_AHEAD;
        if rbuf.capacity() - rbuf.len() < 4096 {
            rbuf.reserve(16 * 1024);
        }
        tokio::select! {
            b = &mut task => return Some(b),
            r = stream.read_buf(rbuf), if room => match r {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            },
            _ = shutdown.wait() => return None,
        }
    }
}

/// None when the command does not block (XREAD without BLOCK, as the command table's walk of
/// its options finds it: `command::StreamOptions`); else how long it may
/// (`Some(None)`: for ever, a timeout of 0). A timeout Redis will refuse is read as 0: the
/// shard answers it at once with its own error.
fn block_timeout(name: &str, args: &[Bytes]) -> Option<Option<Duration>> {
    let text = |i: usize| {
        args.get(i)
            .and_then(|a| std::str::from_utf8(a).ok())
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
            .unwrap_or(0.0)
    };
    let seconds = match name {
        "xread" | "xreadgroup" => text(StreamOptions::of(args).block?) / 1000.0,
        "blmpop" | "bzmpop" => text(1),
        _ => text(args.len() - 1),
    };
    if seconds == 0.0 {
        return Some(None);
    }
    Some(Some(Duration::from_secs_f64(seconds.min(1e9))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<Bytes> {
        a.iter()
            .map(|s| Bytes::copy_from_slice(s.as_bytes()))
            .collect()
    }

    #[test]
    fn timeouts_are_read_where_each_command_keeps_them() {
        let secs = |n: &str, a: &[&str]| block_timeout(n, &args(a));
        assert_eq!(secs("blpop", &["BLPOP", "a", "0"]), Some(None));
        assert_eq!(
            secs("blpop", &["BLPOP", "a", "b", "1.5"]),
            Some(Some(Duration::from_millis(1500)))
        );
        assert_eq!(
            secs("bzmpop", &["BZMPOP", "2", "1", "z", "MIN"]),
            Some(Some(Duration::from_secs(2)))
        );
        assert_eq!(secs("xread", &["XREAD", "STREAMS", "s", "$"]), None);
        assert_eq!(
            secs("xread", &["XREAD", "BLOCK", "250", "STREAMS", "s", "$"]),
            Some(Some(Duration::from_millis(250)))
        );
        assert_eq!(secs("blpop", &["BLPOP", "a", "nope"]), Some(None));
        // A group or consumer named like a keyword is an argument, not the keyword.
        let group = |g: &str, c: &str, opts: &[&str]| {
            let mut a = vec!["XREADGROUP", "GROUP", g, c];
            a.extend_from_slice(opts);
            a.extend_from_slice(&["STREAMS", "k", ">"]);
            secs("xreadgroup", &a)
        };
        for (g, c) in [("streams", "block"), ("block", "streams"), ("g", "STREAMS")] {
            assert_eq!(group(g, c, &["BLOCK", "0"]), Some(None), "{g} {c}");
            assert_eq!(
                group(g, c, &["COUNT", "1", "BLOCK", "20", "NOACK"]),
                Some(Some(Duration::from_millis(20))),
                "{g} {c}"
            );
            assert_eq!(group(g, c, &[]), None, "{g} {c}: no BLOCK");
        }
        assert_eq!(
            group("g", "block", &["NOACK"]),
            None,
            "a consumer named block"
        );
    }
}
