//! Script management sent to every shard, so that a script loaded through the proxy is there
//! whichever shard its keys lead `EVALSHA` to: `SCRIPT LOAD` (the same SHA1 from every shard:
//! the first answer), `SCRIPT EXISTS` (a script exists only where every shard has it), `SCRIPT
//! FLUSH [ASYNC|SYNC]` (`+OK` once every shard said so). The first error any shard gives is
//! the reply. Other `SCRIPT` subcommands (`KILL`, `DEBUG`) concern one running script on one
//! server and are refused.
//!
//! Function management the same way: `FUNCTION LOAD`, `DELETE`, `FLUSH` and `LIST` go to
//! every shard, the first error any shard gives is the reply, else the first shard's answer
//! (every shard holds the same libraries when they were loaded through the proxy), so that
//! `FCALL` finds a function whichever shard its keys lead to. A LOAD that one shard refuses
//! (the library exists there) may have succeeded on others: `FUNCTION LOAD REPLACE` makes
//! them agree again. `FUNCTION DUMP`, `RESTORE`, `KILL` and `STATS` concern one server's
//! state and are refused.
//!
//! Owns these fan-outs. Does not own routing by key (`same_shard`).

use super::{call, error_bytes, join_all, Client, Pending, MEMORY_MODE};
use crate::context::Context;
use crate::resp::reply;
use bytes::{Bytes, BytesMut};
use redis_protocol::resp2::types::BytesFrame;
use std::sync::Arc;

pub const FUNCTION_REFUSED: &str = "ERR FUNCTION subcommands other than LOAD, DELETE, FLUSH, LIST and HELP are not supported by tallyproxy: they concern one server's state";
pub const SCRIPT_REFUSED: &str = "ERR SCRIPT subcommands other than LOAD, EXISTS and FLUSH are not supported by tallyproxy: they concern one running script on one server";

#[derive(Clone, Copy)]
enum Sub {
    /// Every shard agrees: the first answer.
    First,
    /// SCRIPT EXISTS: a script exists where every shard has it.
    Exists,
}

pub(super) fn dispatch(
    ctx: &Arc<Context>,
    client: &Client,
    spec: &crate::command::Spec,
    args: Vec<Bytes>,
    out: &mut BytesMut,
) -> Option<Pending> {
    let sub = args[1].to_ascii_lowercase();
    let sub = match (spec.name, sub.as_slice()) {
        ("script", b"load" | b"flush") => Sub::First,
        ("script", b"exists") => Sub::Exists,
        ("script", _) => {
            reply::error(out, SCRIPT_REFUSED);
            return None;
        }
        (_, b"load" | b"delete" | b"flush" | b"list" | b"help") => Sub::First,
        _ => {
            reply::error(out, FUNCTION_REFUSED);
            return None;
        }
    };
    let topo = ctx.router.topology();
    if topo.is_empty() {
        reply::error(out, MEMORY_MODE);
        return None;
    }
    let (id, proto, ctx) = (client.id, client.proto, ctx.clone());
    Some(Pending::Task(Box::pin(async move {
        let replies = join_all(topo.shards.iter().map(|s| call(&ctx, s, id, proto, &args))).await;
        let mut frames = Vec::with_capacity(replies.len());
        for (r, s) in replies.iter().zip(topo.shards.iter()) {
            match r {
                Ok(r) if r.error().is_some() => return BytesMut::from(&r.raw[..]),
                Ok(r) => frames.push(r),
                Err(e) => return error_bytes(&e.client_message(&s.name)),
            }
        }
        match sub {
            // Every shard answered; they agree (same script, same digest), so the first.
            Sub::First => BytesMut::from(&frames[0].raw[..]),
            Sub::Exists => {
                let mut all: Option<Vec<bool>> = None;
                for f in &frames {
                    let BytesFrame::Array(items) = &f.frame else {
                        return BytesMut::from(&f.raw[..]);
                    };
                    let here: Vec<bool> = items
                        .iter()
                        .map(|i| matches!(i, BytesFrame::Integer(1)))
                        .collect();
                    all = Some(match all {
                        None => here,
                        Some(prev) => prev.iter().zip(&here).map(|(a, b)| *a && *b).collect(),
                    });
                }
                let all = all.unwrap_or_default();
                let mut o = BytesMut::new();
                reply::array(&mut o, all.len());
                for e in all {
                    reply::int(&mut o, i64::from(e));
                }
                o
            }
        }
    })))
}
