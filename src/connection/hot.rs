//! The hot path: a counter's GET, INCR, DECR, INCRBY or DECRBY answered from memory while
//! the request is still in the read buffer.
//!
//! At a pipeline of 16, most of a cached GET's user-space time went to building its
//! argument vector (an allocation, and a reference count taken and dropped per argument on
//! the read buffer), not to the counting. A request [`short::peek`] can read in place is
//! offered here first; it is answered only when the full dispatch would answer it at once
//! with the same bytes: a fresh cached base, or an increment the engine settles without a
//! round trip. Everything else (a miss, a base to read, a key that is not a batched
//! counter, a connection in a transaction or a subscription, an arity or reserved-key
//! error) is declined with nothing changed, and the full parser and dispatch take the
//! request as if this had not looked.
//!
//! [`short::peek`]: crate::resp::short::peek

use super::{counter_delta, names_reserved, write_hit, write_incr, Client};
use crate::command::{self, CounterOp, Kind};
use crate::context::Context;
use crate::counter::Incr;
use crate::resp::reply;
use bytes::BytesMut;

/// Answers `args` into `out` if it is a counter command settled from memory: returns the
/// command's name and whether the reply is an error. `None`: declined, nothing written and
/// nothing changed.
pub(super) fn answer(
    ctx: &Context,
    client: &mut Client,
    args: &[&[u8]],
    out: &mut BytesMut,
) -> Option<(&'static str, bool)> {
    // The connection states the full dispatch looks at before a counter command.
    if client.txn.is_some()
        || client.sub.is_some()
        || !client.authenticated
        || client.writes_in_flight
        || !client.deferred.is_empty()
    {
        return None;
    }
    let spec = command::lookup(args.first()?)?;
    let Kind::Counter(op) = spec.kind else {
        return None;
    };
    if !spec.arity_ok(args.len()) || names_reserved(args) {
        return None;
    }
    let key = args[1];
    if !ctx.engine.is_batched(key) {
        return None;
    }
    if op == CounterOp::Get {
        // A miss is counted by the full path, which reads it.
        let cached = ctx.engine.lookup(key);
        if !write_hit(&cached, client.proto, out) {
            return None;
        }
        ctx.engine.count_reads(1, 0);
        return Some((spec.name, false));
    }
    let attempt = match counter_delta(op, args.get(2).copied()) {
        Ok(delta) => ctx.engine.try_incr(key, delta),
        Err(msg) => {
            client.logged = true;
            reply::error(out, msg);
            return Some((spec.name, true));
        }
    };
    // `try_incr` changes nothing when it needs a base (and never answers `Pending`).
    if !write_incr(&attempt, out) {
        return None;
    }
    client.logged = true;
    Some((spec.name, matches!(attempt, Incr::Refused(_))))
}
