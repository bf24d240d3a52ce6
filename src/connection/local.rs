//! Commands the proxy answers itself: connection commands, introspection, INFO.
//!
//! Owns the replies that make unmodified clients start cleanly (HELLO, COMMAND, CLIENT,
//! CONFIG GET for redis-benchmark), in the client's protocol: each reply has the shape
//! Redis 7 gives a RESP2 or a RESP3 client (maps, sets, verbatim text, nulls). Does not own
//! anything that touches a key.

use super::Client;
use crate::command::{self, Kind, Spec};
use crate::context::Context;
use crate::resp::reply::{self, Proto};
use bytes::{Bytes, BytesMut};
use std::sync::Arc;

type Out = Option<super::PendingTask>;

fn upper(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_ascii_uppercase()
}

pub fn run(
    ctx: &Arc<Context>,
    client: &mut Client,
    spec: &Spec,
    args: Vec<Bytes>,
    out: &mut BytesMut,
) -> Out {
    match spec.name {
        "ping" => match args.len() {
            1 => reply::simple(out, "PONG"),
            2 => reply::bulk(out, &args[1]),
            _ => reply::error(out, &command::arity_error("ping")),
        },
        "echo" => reply::bulk(out, &args[1]),
        "quit" => {
            reply::ok(out);
            client.close = true;
        }
        "select" => match &args[1][..] {
            b"0" => reply::ok(out),
            _ => reply::error(out, "ERR DB index is out of range"),
        },
        "reset" => {
            client.name = None;
            client.authenticated = !ctx.users.required();
            client.proto = Proto::Resp2;
            reply::simple(out, "RESET");
        }
        "readonly" | "readwrite" => reply::ok(out),
        // No password is configured (as Redis with the default user on `nopass`): a bare
        // password is an error, `AUTH default <anything>` succeeds, other users do not exist.
        "auth" => match args.len() {
            2 | 3 => {
                let (user, pw) = if args.len() == 2 {
                    (None, &args[1])
                } else {
                    (Some(&args[1][..]), &args[2])
                };
                match authenticate(ctx, user, pw) {
                    Ok(()) => {
                        client.authenticated = true;
                        reply::ok(out)
                    }
                    Err(e) => reply::error(out, e),
                }
            }
            _ => reply::error(out, "ERR syntax error"),
        },
        "hello" => hello(ctx, client, &args, out),
        "client" => client_cmd(client, &args, out),
        "command" => command_cmd(&args, client.proto, out),
        "config" => config_cmd(&args, client.proto, out),
        "time" => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            reply::array(out, 2);
            reply::bulk(out, now.as_secs().to_string().as_bytes());
            reply::bulk(out, now.subsec_micros().to_string().as_bytes());
        }
        "lastsave" => reply::int(out, ctx.started_unix as i64),
        "info" => {
            let section = args
                .get(1)
                .map(|s| String::from_utf8_lossy(s).to_ascii_lowercase());
            let text = crate::info::render(ctx, section.as_deref());
            reply::verbatim(out, text.as_bytes(), client.proto);
        }
        other => reply::error(out, &format!("ERR command '{other}' is not answered here")),
    }
    None
}

/// AUTH's rule, as Redis's: with no password configured, a bare password is an error and
/// `default` with any password succeeds; otherwise name and password must match.
fn authenticate(ctx: &Context, user: Option<&[u8]>, password: &[u8]) -> Result<(), &'static str> {
    if !ctx.users.required() {
        return match user {
            None => Err("ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?"),
            Some(b"default") => Ok(()),
            Some(_) => Err(crate::auth::WRONGPASS),
        };
    }
    if ctx.users.check(user, password) {
        Ok(())
    } else {
        Err(crate::auth::WRONGPASS)
    }
}

/// HELLO as Redis 7 runs it: the version first (2 or 3), then AUTH and SETNAME, each
/// checked before anything changes; the protocol switches only on success, and the answer
/// (a map) is in the new protocol.
fn hello(ctx: &Context, client: &mut Client, args: &[Bytes], out: &mut BytesMut) {
    let mut proto = client.proto;
    let mut i = 1;
    if let Some(v) = args.get(1) {
        match crate::counter::parse_i64(v) {
            Some(2) => proto = Proto::Resp2,
            Some(3) => proto = Proto::Resp3,
            Some(_) => {
                reply::error(out, "NOPROTO unsupported protocol version");
                return;
            }
            None => {
                reply::error(
                    out,
                    "ERR Protocol version is not an integer or out of range",
                );
                return;
            }
        }
        i = 2;
    }
    let mut auth = None;
    let mut name = None;
    while i < args.len() {
        let more = args.len() - 1 - i;
        match upper(&args[i]).as_str() {
            "AUTH" if more >= 2 => {
                auth = Some((&args[i + 1], &args[i + 2]));
                i += 3;
            }
            "SETNAME" if more >= 1 => {
                if let Err(e) = valid_client_name(&args[i + 1]) {
                    reply::error(out, e);
                    return;
                }
                name = Some(args[i + 1].clone());
                i += 2;
            }
            _ => {
                reply::error(
                    out,
                    &format!(
                        "ERR Syntax error in HELLO option '{}'",
                        String::from_utf8_lossy(&args[i])
                    ),
                );
                return;
            }
        }
    }
    if let Some((user, pw)) = auth {
        if let Err(e) = authenticate(ctx, Some(user), pw) {
            reply::error(out, e);
            return;
        }
        client.authenticated = true;
    }
    if !client.authenticated {
        reply::error(out, "NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time");
        return;
    }
    if let Some(name) = name {
        client.name = (!name.is_empty()).then_some(name);
    }
    client.proto = proto;
    reply::map(out, 7, proto);
    reply::bulk(out, b"server");
    reply::bulk(out, b"redis");
    reply::bulk(out, b"version");
    reply::bulk(out, crate::info::REDIS_VERSION.as_bytes());
    reply::bulk(out, b"proto");
    reply::int(out, proto.version());
    reply::bulk(out, b"id");
    reply::int(out, client.id as i64);
    reply::bulk(out, b"mode");
    reply::bulk(out, b"standalone");
    reply::bulk(out, b"role");
    reply::bulk(out, b"master");
    reply::bulk(out, b"modules");
    reply::array(out, 0);
}

/// Redis's rule for client names (CLIENT SETNAME, HELLO SETNAME).
fn valid_client_name(name: &[u8]) -> Result<(), &'static str> {
    if name.iter().any(|b| *b <= b' ' || *b > b'~') {
        Err("ERR Client names cannot contain spaces, newlines or special characters.")
    } else {
        Ok(())
    }
}

fn client_cmd(client: &mut Client, args: &[Bytes], out: &mut BytesMut) {
    match upper(&args[1]).as_str() {
        "SETNAME" if args.len() == 3 => {
            if let Err(e) = valid_client_name(&args[2]) {
                reply::error(out, e);
            } else {
                client.name = if args[2].is_empty() {
                    None
                } else {
                    Some(args[2].clone())
                };
                reply::ok(out);
            }
        }
        "GETNAME" if args.len() == 2 => match &client.name {
            Some(n) => reply::bulk(out, n),
            None => reply::null(out, client.proto),
        },
        "ID" if args.len() == 2 => reply::int(out, client.id as i64),
        "SETINFO" if args.len() == 4 => reply::ok(out),
        "INFO" if args.len() == 2 => {
            let name = client
                .name
                .as_ref()
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .unwrap_or_default();
            reply::verbatim(
                out,
                format!("id={} name={} db=0\n", client.id, name).as_bytes(),
                client.proto,
            );
        }
        "TRACKING" => reply::error(out, TRACKING),
        "NO-EVICT" | "NO-TOUCH" if args.len() == 3 => reply::ok(out),
        _ => reply::error(
            out,
            &format!(
                "ERR unknown subcommand or wrong number of arguments for '{}'. Try CLIENT HELP.",
                String::from_utf8_lossy(&args[1])
            ),
        ),
    }
}

/// Why CLIENT TRACKING is refused (see docs/architecture.md, "Protocols").
pub const TRACKING: &str = "ERR CLIENT TRACKING is not supported by tallyproxy: counter reads are served from the proxy's cache and increments are merged in the proxy, so invalidations from the shards would not cover counter changes";

/// One COMMAND entry in Redis 7's ten-field shape (flags, ACL categories, tips, key specs
/// and subcommands are sets in RESP3, as Redis 7.0 sends them).
fn command_entry(out: &mut BytesMut, spec: &Spec, proto: Proto) {
    let (first, last, step) = match spec.kind {
        Kind::Single | Kind::Counter(_) | Kind::Window(_) => (1, 1, 1),
        Kind::Multi(command::Merge::Pairs) => (1, -1, 2),
        Kind::Multi(_) => (1, -1, 1),
        Kind::SameShard(k) => k.legacy_range(),
        Kind::Local | Kind::Refused(_) | Kind::EveryShard | Kind::Keyspace(_) => (0, 0, 0),
    };
    reply::array(out, 10);
    reply::bulk(out, spec.name.as_bytes());
    reply::int(out, spec.arity as i64);
    reply::set(out, 0, proto);
    reply::int(out, first);
    reply::int(out, last);
    reply::int(out, step);
    for _ in 0..4 {
        reply::set(out, 0, proto);
    }
}

fn command_cmd(args: &[Bytes], proto: Proto, out: &mut BytesMut) {
    let served = || command::all().filter(|s| !matches!(s.kind, Kind::Refused(_)));
    let sub = args.get(1).map(|s| upper(s));
    match sub.as_deref() {
        None => {
            let specs: Vec<_> = served().collect();
            reply::array(out, specs.len());
            for s in specs {
                command_entry(out, s, proto);
            }
        }
        Some("COUNT") => reply::int(out, served().count() as i64),
        Some("DOCS") => reply::map(out, 0, proto),
        Some("INFO") => {
            reply::array(out, args.len() - 2);
            for name in &args[2..] {
                match command::lookup(name) {
                    Some(s) if !matches!(s.kind, Kind::Refused(_)) => command_entry(out, s, proto),
                    _ => reply::null(out, proto),
                }
            }
        }
        Some("LIST") => {
            let specs: Vec<_> = served().collect();
            reply::array(out, specs.len());
            for s in specs {
                reply::bulk(out, s.name.as_bytes());
            }
        }
        Some(other) => reply::error(
            out,
            &format!("ERR unknown subcommand '{other}'. Try COMMAND HELP."),
        ),
    }
}

/// `CONFIG GET` of the few keys that clients and redis-benchmark ask for; nothing is set.
fn config_cmd(args: &[Bytes], proto: Proto, out: &mut BytesMut) {
    if upper(&args[1]) != "GET" || args.len() < 3 {
        reply::error(out, "ERR CONFIG is limited to CONFIG GET on tallyproxy");
        return;
    }
    let known: &[(&str, &str)] = &[
        ("save", ""),
        ("appendonly", "no"),
        ("databases", "1"),
        ("maxmemory", "0"),
    ];
    let mut pairs = Vec::new();
    for pattern in &args[2..] {
        for (k, v) in known {
            if crate::counter::glob::matches(&pattern.to_ascii_lowercase(), k.as_bytes())
                && !pairs.iter().any(|(pk, _)| pk == k)
            {
                pairs.push((*k, *v));
            }
        }
    }
    reply::map(out, pairs.len(), proto);
    for (k, v) in pairs {
        reply::bulk(out, k.as_bytes());
        reply::bulk(out, v.as_bytes());
    }
}
