//! The command table: what each command is to the proxy, and its arity.
//!
//! Owns the classification (answered here, forwarded to one shard, split over shards, a
//! counter operation, refused) and Redis's wording for the argument errors. Does not own
//! how a class is executed: that is `connection` (dispatch) and the parts it calls.
//! The README's command table is generated from the same lists; keep them in step.

use std::collections::HashMap;
use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Answered by the proxy itself.
    Local,
    /// One key at argument 1; forwarded to the shard that owns it.
    Single,
    /// Keys at 1..; split by shard, sent in parallel, merged.
    Multi(Merge),
    /// Several keys that must live on one shard (a shared `{hash tag}` makes sure):
    /// forwarded whole, or refused with CROSSSLOT (see `connection::same_shard`).
    SameShard(Keys),
    /// A counter operation; on a batched counter key the engine answers it.
    Counter(CounterOp),
    /// Sent to every shard, replies merged (see `connection::every_shard`).
    EveryShard,
    /// The whole keyspace, over every shard (see `connection::keyspace`).
    Keyspace(KeyspaceOp),
    /// A command that may block, keys on one shard: run on a dedicated backend connection
    /// while it blocks (see `connection::blocking`).
    Blocking(Keys),
    /// MULTI, EXEC, DISCARD, WATCH, UNWATCH (see `connection::transaction`).
    Transaction(TxnOp),
    /// Pub/sub (see `connection::pubsub`).
    PubSub(PubSubOp),
    /// A time-window query of the key at argument 1 (see `counter::windows`).
    Window(WindowOp),
    /// Known but not served, with the reason.
    Refused(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    /// MGET: one reply per key, in key order.
    Values,
    /// DEL, UNLINK, EXISTS, TOUCH: integer replies summed.
    Sum,
    /// MSET: key value pairs; `+OK` when every shard says so.
    Pairs,
}

/// Where a command's keys are, as Redis's key specs say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keys {
    /// Arguments `first` to `last` (negative: counted from the end, -1 the last), every `step`.
    Range {
        first: usize,
        last: isize,
        step: usize,
    },
    /// The number of keys at argument `at`, the keys right after it; with `dest`, argument 1
    /// (before the number) is a key too (`ZUNIONSTORE dest numkeys key...`).
    NumKeys { at: usize, dest: bool },
    /// XREAD / XREADGROUP: the first half of the arguments after `STREAMS` (found by
    /// [`StreamOptions`], so a group named "streams" is not taken for the keyword).
    Streams,
    /// Argument 1, and the argument after each `STORE` / `STOREDIST` from argument
    /// `options_from` on (SORT, GEORADIUS, GEORADIUSBYMEMBER).
    Store { options_from: usize },
}

impl Keys {
    /// The key arguments of `args`; None when the arguments do not say (a bad key count),
    /// which the shard then answers in its own words.
    pub fn of<'a>(&self, args: &'a [bytes::Bytes]) -> Option<Vec<&'a bytes::Bytes>> {
        match *self {
            Keys::Range { first, last, step } => {
                let last = if last < 0 {
                    args.len().checked_sub(last.unsigned_abs())?
                } else {
                    last as usize
                };
                (last < args.len() && first <= last)
                    .then(|| args[first..=last].iter().step_by(step).collect())
            }
            Keys::NumKeys { at, dest } => {
                let n: usize = std::str::from_utf8(args.get(at)?).ok()?.parse().ok()?;
                let keys = args.get(at + 1..at + 1 + n)?;
                Some(args[1..at].iter().filter(|_| dest).chain(keys).collect())
            }
            Keys::Streams => {
                let rest = args.get(StreamOptions::of(args).streams? + 1..)?;
                (!rest.is_empty() && rest.len() % 2 == 0)
                    .then(|| rest[..rest.len() / 2].iter().collect())
            }
            Keys::Store { options_from } => {
                let mut keys = vec![args.get(1)?];
                let mut i = options_from;
                while i + 1 < args.len() {
                    if matches!(
                        args[i].to_ascii_lowercase().as_slice(),
                        b"store" | b"storedist"
                    ) {
                        keys.push(&args[i + 1]);
                        i += 1;
                    }
                    i += 1;
                }
                Some(keys)
            }
        }
    }

    /// COMMAND's (first, last, step) for this spec (0 0 0 for a key count, as Redis 7).
    pub fn legacy_range(&self) -> (i64, i64, i64) {
        match *self {
            Keys::Range { first, last, step } => (first as i64, last as i64, step as i64),
            Keys::NumKeys { dest: true, .. } => (1, 1, 1),
            Keys::NumKeys { dest: false, .. } | Keys::Streams => (0, 0, 0),
            Keys::Store { .. } => (1, 1, 1),
        }
    }
}

/// Where XREAD and XREADGROUP keep their options, found by walking them as Redis does
/// (`GROUP` takes two arguments, `COUNT` and `BLOCK` one, `NOACK` none, then `STREAMS`), so
/// that a group or consumer named "streams" or "block" is not taken for the keyword. The
/// one walk of those options: the keys (`Keys::Streams`) and the timeout
/// (`connection::blocking`) are both read from it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StreamOptions {
    /// The position of `BLOCK`'s timeout argument.
    pub block: Option<usize>,
    /// The position of the `STREAMS` keyword (keys, then IDs, follow it).
    pub streams: Option<usize>,
}

impl StreamOptions {
    /// The walk stops at `STREAMS` or at the first argument Redis would refuse (an unknown
    /// option, or one without its arguments), which the shard then answers in its own words.
    pub fn of(args: &[bytes::Bytes]) -> StreamOptions {
        let mut found = StreamOptions::default();
        let mut i = 1;
        while i < args.len() {
            let more = args.len() - i - 1;
            let is = |word: &[u8]| args[i].eq_ignore_ascii_case(word);
            if is(b"streams") && more > 0 {
                found.streams = Some(i);
                break;
            } else if is(b"group") && more >= 2 {
                i += 3;
            } else if is(b"block") && more > 0 {
                found.block = Some(i + 1);
                i += 2;
            } else if is(b"count") && more > 0 {
                i += 2;
            } else if is(b"noack") {
                i += 1;
            } else {
                break;
            }
        }
        found
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterOp {
    Get,
    Incr,
    IncrBy,
    Decr,
    DecrBy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyspaceOp {
    Scan,
    Keys,
    RandomKey,
    DbSize,
    FlushDb,
    FlushAll,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnOp {
    Multi,
    Exec,
    Discard,
    Watch,
    Unwatch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PubSubOp {
    /// SUBSCRIBE, PSUBSCRIBE, UNSUBSCRIBE, PUNSUBSCRIBE: the client's subscription
    /// connection.
    Subscription,
    /// PUBLISH and PUBSUB: forwarded to the pub/sub shard.
    Publish,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowOp {
    /// `TALLY.RANGE key from to`: the count in [from, to).
    Range,
    /// `TALLY.LAST key duration`: the count in the last `duration`, this second included.
    Last,
    /// `TALLY.SERIES key from to step`: `[t, count]` per step.
    Series,
}

#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub name: &'static str,
    /// Redis's convention: N means exactly N arguments (with the name), -N at least N.
    pub arity: i32,
    pub kind: Kind,
}

impl Spec {
    pub fn arity_ok(&self, argc: usize) -> bool {
        if self.arity >= 0 {
            argc == self.arity as usize
        } else {
            argc >= (-self.arity) as usize
        }
    }
}

const SINGLE: &[(&str, i32)] = &[
    // strings
    ("set", -3),
    ("getset", 3),
    ("getdel", 2),
    ("getex", -2),
    ("setnx", 3),
    ("setex", 4),
    ("psetex", 4),
    ("append", 3),
    ("strlen", 2),
    ("getrange", 4),
    ("substr", 4),
    ("setrange", 4),
    ("incrbyfloat", 3),
    ("getbit", 3),
    ("setbit", 4),
    ("bitcount", -2),
    ("bitpos", -3),
    // keys
    ("expire", -3),
    ("pexpire", -3),
    ("expireat", -3),
    ("pexpireat", -3),
    ("ttl", 2),
    ("pttl", 2),
    ("persist", 2),
    ("type", 2),
    ("expiretime", 2),
    ("pexpiretime", 2),
    // hashes
    ("hset", -4),
    ("hsetnx", 4),
    ("hget", 3),
    ("hmset", -4),
    ("hmget", -3),
    ("hdel", -3),
    ("hlen", 2),
    ("hstrlen", 3),
    ("hexists", 3),
    ("hkeys", 2),
    ("hvals", 2),
    ("hgetall", 2),
    ("hincrby", 4),
    ("hincrbyfloat", 4),
    ("hrandfield", -2),
    ("hscan", -3),
    // lists
    ("lpush", -3),
    ("rpush", -3),
    ("lpushx", -3),
    ("rpushx", -3),
    ("lpop", -2),
    ("rpop", -2),
    ("llen", 2),
    ("lrange", 4),
    ("lindex", 3),
    ("lset", 4),
    ("lrem", 4),
    ("ltrim", 4),
    ("linsert", 5),
    ("lpos", -3),
    // sets
    ("sadd", -3),
    ("srem", -3),
    ("smembers", 2),
    ("sismember", 3),
    ("smismember", -3),
    ("scard", 2),
    ("spop", -2),
    ("srandmember", -2),
    ("sscan", -3),
    // sorted sets
    ("zadd", -4),
    ("zincrby", 4),
    ("zrem", -3),
    ("zcard", 2),
    ("zscore", 3),
    ("zmscore", -3),
    ("zrank", -3),
    ("zrevrank", -3),
    ("zrange", -4),
    ("zrevrange", -4),
    ("zrangebyscore", -4),
    ("zrevrangebyscore", -4),
    ("zcount", 4),
    ("zlexcount", 4),
    ("zrangebylex", -4),
    ("zrevrangebylex", -4),
    ("zremrangebyrank", 4),
    ("zremrangebyscore", 4),
    ("zremrangebylex", 4),
    ("zpopmin", -2),
    ("zpopmax", -2),
    ("zrandmember", -2),
    ("zscan", -3),
    // hyperloglog (one key)
    ("pfadd", -2),
    // streams
    ("xadd", -5),
    ("xrange", -4),
    ("xrevrange", -4),
    ("xlen", 2),
    ("xdel", -3),
    ("xtrim", -4),
    ("xack", -4),
    ("xclaim", -6),
    ("xautoclaim", -6),
    ("xpending", -3),
    ("xsetid", -3),
    // geo
    ("geoadd", -5),
    ("geodist", -4),
    ("geohash", -2),
    ("geopos", -2),
    ("georadius_ro", -6),
    ("georadiusbymember_ro", -5),
    ("geosearch", -7),
    // bitfields
    ("bitfield", -2),
    ("bitfield_ro", -2),
];

const MULTI: &[(&str, i32, Merge)] = &[
    ("mget", -2, Merge::Values),
    ("mset", -3, Merge::Pairs),
    ("del", -2, Merge::Sum),
    ("unlink", -2, Merge::Sum),
    ("exists", -2, Merge::Sum),
    ("touch", -2, Merge::Sum),
];

/// `first..=last` every `step`.
const fn range(first: usize, last: isize, step: usize) -> Keys {
    Keys::Range { first, last, step }
}
const TWO: Keys = range(1, 2, 1);
const ALL: Keys = range(1, -1, 1);
const NUMKEYS: Keys = Keys::NumKeys { at: 1, dest: false };
const DEST_NUMKEYS: Keys = Keys::NumKeys { at: 2, dest: true };
const SCRIPT_KEYS: Keys = Keys::NumKeys { at: 2, dest: false };

const SAME_SHARD: &[(&str, i32, Keys)] = &[
    ("rename", 3, TWO),
    ("renamenx", 3, TWO),
    ("copy", -3, TWO),
    ("msetnx", -3, range(1, -1, 2)),
    ("smove", 4, TWO),
    ("lmove", 5, TWO),
    ("rpoplpush", 3, TWO),
    ("sinter", -2, ALL),
    ("sunion", -2, ALL),
    ("sdiff", -2, ALL),
    ("sinterstore", -3, ALL),
    ("sunionstore", -3, ALL),
    ("sdiffstore", -3, ALL),
    ("sintercard", -3, NUMKEYS),
    ("zunion", -3, NUMKEYS),
    ("zinter", -3, NUMKEYS),
    ("zdiff", -3, NUMKEYS),
    ("zintercard", -3, NUMKEYS),
    ("zunionstore", -4, DEST_NUMKEYS),
    ("zinterstore", -4, DEST_NUMKEYS),
    ("zdiffstore", -4, DEST_NUMKEYS),
    ("zrangestore", -5, TWO),
    ("pfcount", -2, ALL),
    ("pfmerge", -2, ALL),
    ("bitop", -4, range(2, -1, 1)),
    ("lcs", -3, TWO),
    ("lmpop", -4, NUMKEYS),
    ("zmpop", -4, NUMKEYS),
    ("eval", -3, SCRIPT_KEYS),
    ("evalsha", -3, SCRIPT_KEYS),
    ("eval_ro", -3, SCRIPT_KEYS),
    ("evalsha_ro", -3, SCRIPT_KEYS),
    ("fcall", -3, SCRIPT_KEYS),
    ("fcall_ro", -3, SCRIPT_KEYS),
    // the key is argument 2 (`XGROUP CREATE key ...`, `XINFO STREAM key`); HELP has none
    ("xgroup", -2, range(2, 2, 1)),
    ("xinfo", -2, range(2, 2, 1)),
    ("geosearchstore", -8, TWO),
    ("georadius", -6, Keys::Store { options_from: 5 }),
    ("georadiusbymember", -5, Keys::Store { options_from: 4 }),
    // BY and GET patterns that name other keys are refused (see `connection::same_shard`)
    ("sort", -2, Keys::Store { options_from: 2 }),
    ("sort_ro", -2, Keys::Store { options_from: 2 }),
];

/// Before the timeout (BLPOP key... timeout).
const BEFORE_LAST: Keys = range(1, -2, 1);
const BLOCKING_NUMKEYS: Keys = Keys::NumKeys { at: 2, dest: false };

const BLOCKING: &[(&str, i32, Keys)] = &[
    ("blpop", -3, BEFORE_LAST),
    ("brpop", -3, BEFORE_LAST),
    ("brpoplpush", 4, TWO),
    ("blmove", 6, TWO),
    ("blmpop", -5, BLOCKING_NUMKEYS),
    ("bzpopmin", -3, BEFORE_LAST),
    ("bzpopmax", -3, BEFORE_LAST),
    ("bzmpop", -5, BLOCKING_NUMKEYS),
    ("xread", -4, Keys::Streams),
    ("xreadgroup", -7, Keys::Streams),
];

const TRANSACTION: &[(&str, i32, TxnOp)] = &[
    ("multi", 1, TxnOp::Multi),
    ("exec", 1, TxnOp::Exec),
    ("discard", 1, TxnOp::Discard),
    ("watch", -2, TxnOp::Watch),
    ("unwatch", 1, TxnOp::Unwatch),
];

const PUBSUB: &[(&str, i32, PubSubOp)] = &[
    ("subscribe", -2, PubSubOp::Subscription),
    ("psubscribe", -2, PubSubOp::Subscription),
    ("unsubscribe", -1, PubSubOp::Subscription),
    ("punsubscribe", -1, PubSubOp::Subscription),
    ("publish", 3, PubSubOp::Publish),
    ("pubsub", -2, PubSubOp::Publish),
];

const COUNTER: &[(&str, i32, CounterOp)] = &[
    ("get", 2, CounterOp::Get),
    ("incr", 2, CounterOp::Incr),
    ("incrby", 3, CounterOp::IncrBy),
    ("decr", 2, CounterOp::Decr),
    ("decrby", 3, CounterOp::DecrBy),
];

const WINDOW: &[(&str, i32, WindowOp)] = &[
    ("tally.range", 4, WindowOp::Range),
    ("tally.last", 3, WindowOp::Last),
    ("tally.series", 5, WindowOp::Series),
];

const LOCAL: &[(&str, i32)] = &[
    ("ping", -1),
    ("echo", 2),
    ("quit", -1),
    ("select", 2),
    ("hello", -1),
    ("auth", -2),
    ("client", -2),
    ("command", -1),
    ("info", -1),
    ("time", 1),
    ("config", -2),
    ("reset", 1),
    ("readonly", 1),
    ("readwrite", 1),
    ("lastsave", 1),
];

const DATABASES: &str = "each shard has one database";
const WAITING: &str = "the proxy spreads a client's writes over several shard connections, so WAIT on one of them would not cover them";
const SHARDED_PUBSUB: &str = "sharded pub/sub is not proxied; SUBSCRIBE and PUBLISH are";
const ADMIN: &str = "server administration goes to each shard directly";

const KEYSPACE_OPS: &[(&str, i32, KeyspaceOp)] = &[
    ("scan", -2, KeyspaceOp::Scan),
    ("keys", 2, KeyspaceOp::Keys),
    ("randomkey", 1, KeyspaceOp::RandomKey),
    ("dbsize", 1, KeyspaceOp::DbSize),
    ("flushdb", -1, KeyspaceOp::FlushDb),
    ("flushall", -1, KeyspaceOp::FlushAll),
];

const REFUSED: &[(&str, &str)] = &[
    ("swapdb", DATABASES),
    ("move", DATABASES),
    ("ssubscribe", SHARDED_PUBSUB),
    ("sunsubscribe", SHARDED_PUBSUB),
    ("spublish", SHARDED_PUBSUB),
    ("wait", WAITING),
    ("waitaof", WAITING),
    ("migrate", ADMIN),
    ("dump", ADMIN),
    ("restore", ADMIN),
    ("object", ADMIN),
    ("debug", ADMIN),
    ("monitor", ADMIN),
    ("save", ADMIN),
    ("bgsave", ADMIN),
    ("bgrewriteaof", ADMIN),
    ("shutdown", ADMIN),
    ("slaveof", ADMIN),
    ("replicaof", ADMIN),
    ("sync", ADMIN),
    ("psync", ADMIN),
    ("cluster", ADMIN),
    ("acl", ADMIN),
    ("slowlog", ADMIN),
    ("latency", ADMIN),
    ("memory", ADMIN),
    ("module", ADMIN),
    ("failover", ADMIN),
    ("role", ADMIN),
    ("lolwut", ADMIN),
];

type Table = HashMap<&'static [u8], Spec, ahash::RandomState>;

fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = Table::default();
        let mut add = |name: &'static str, arity: i32, kind: Kind| {
            let dup = t.insert(name.as_bytes(), Spec { name, arity, kind });
            assert!(dup.is_none(), "command {name} listed twice");
        };
        for &(n, a) in SINGLE {
            add(n, a, Kind::Single);
        }
        for &(n, a, m) in MULTI {
            add(n, a, Kind::Multi(m));
        }
        for &(n, a, op) in COUNTER {
            add(n, a, Kind::Counter(op));
        }
        for &(n, a, op) in WINDOW {
            add(n, a, Kind::Window(op));
        }
        for &(n, a, k) in SAME_SHARD {
            add(n, a, Kind::SameShard(k));
        }
        for &(n, a, k) in BLOCKING {
            add(n, a, Kind::Blocking(k));
        }
        for &(n, a, op) in TRANSACTION {
            add(n, a, Kind::Transaction(op));
        }
        for &(n, a, op) in PUBSUB {
            add(n, a, Kind::PubSub(op));
        }
        add("script", -2, Kind::EveryShard);
        for &(n, a, op) in KEYSPACE_OPS {
            add(n, a, Kind::Keyspace(op));
        }
        add("function", -2, Kind::EveryShard);
        for &(n, a) in LOCAL {
            add(n, a, Kind::Local);
        }
        for &(n, why) in REFUSED {
            add(n, -1, Kind::Refused(why));
        }
        t
    })
}

/// Looks a command up by name, in any letter case.
pub fn lookup(name: &[u8]) -> Option<&'static Spec> {
    let mut lower = [0u8; 24];
    if name.len() > lower.len() {
        return None;
    }
    for (d, s) in lower.iter_mut().zip(name) {
        *d = s.to_ascii_lowercase();
    }
    table().get(&lower[..name.len()])
}

/// Every command the proxy knows, for `COMMAND` and `COMMAND COUNT`.
pub fn all() -> impl Iterator<Item = &'static Spec> {
    table().values()
}

/// Redis's wording for an unknown command, with the first arguments quoted.
pub fn unknown_command_error(args: &[bytes::Bytes]) -> String {
    let name = String::from_utf8_lossy(&args[0]);
    let mut msg = format!(
        "ERR unknown command '{}', with args beginning with: ",
        truncate(&name)
    );
    for a in args.iter().skip(1).take(8) {
        msg.push_str(&format!("'{}' ", truncate(&String::from_utf8_lossy(a))));
    }
    msg
}

pub fn arity_error(name: &str) -> String {
    format!("ERR wrong number of arguments for '{name}' command")
}

pub fn refused_error(name: &str, why: &str) -> String {
    format!("ERR command '{name}' is not supported by tallyproxy: {why}")
}

fn truncate(s: &str) -> String {
    s.chars().take(128).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_ignores_case_and_knows_arity() {
        let get = lookup(b"GeT").unwrap();
        assert_eq!(get.kind, Kind::Counter(CounterOp::Get));
        assert!(get.arity_ok(2) && !get.arity_ok(3));
        let set = lookup(b"SET").unwrap();
        assert!(set.arity_ok(3) && set.arity_ok(7) && !set.arity_ok(2));
        assert_eq!(lookup(b"mget").unwrap().kind, Kind::Multi(Merge::Values));
        assert_eq!(
            lookup(b"KEYS").unwrap().kind,
            Kind::Keyspace(KeyspaceOp::Keys)
        );
        assert_eq!(
            lookup(b"scan").unwrap().kind,
            Kind::Keyspace(KeyspaceOp::Scan)
        );
        assert!(matches!(lookup(b"SWAPDB").unwrap().kind, Kind::Refused(_)));
        assert!(matches!(lookup(b"move").unwrap().kind, Kind::Refused(_)));
        assert!(matches!(lookup(b"WAIT").unwrap().kind, Kind::Refused(_)));
        assert_eq!(
            lookup(b"multi").unwrap().kind,
            Kind::Transaction(TxnOp::Multi)
        );
        assert_eq!(lookup(b"BLPOP").unwrap().kind, Kind::Blocking(BEFORE_LAST));
        assert_eq!(
            lookup(b"subscribe").unwrap().kind,
            Kind::PubSub(PubSubOp::Subscription)
        );
        assert_eq!(lookup(b"function").unwrap().kind, Kind::EveryShard);
        assert_eq!(lookup(b"xadd").unwrap().kind, Kind::Single);
        assert!(lookup(b"nosuchcommand").is_none());
        assert!(lookup(&[b'x'; 100]).is_none());
    }

    fn keys_of(spec: Keys, args: &[&str]) -> Option<Vec<String>> {
        let args: Vec<bytes::Bytes> = args
            .iter()
            .map(|a| bytes::Bytes::copy_from_slice(a.as_bytes()))
            .collect();
        spec.of(&args).map(|k| {
            k.into_iter()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .collect()
        })
    }

    #[test]
    fn key_specs_find_stream_and_store_keys() {
        let xread = [
            "XREAD", "COUNT", "2", "BLOCK", "0", "STREAMS", "a", "b", "0", "$",
        ];
        assert_eq!(
            keys_of(Keys::Streams, &xread),
            Some(vec!["a".into(), "b".into()])
        );
        let group = ["XREADGROUP", "GROUP", "streams", "c", "STREAMS", "k", ">"];
        assert_eq!(keys_of(Keys::Streams, &group), Some(vec!["k".into()]));
        assert_eq!(keys_of(Keys::Streams, &["XREAD", "STREAMS", "a"]), None);
        let named = [
            "XREADGROUP",
            "GROUP",
            "block",
            "streams",
            "NOACK",
            "BLOCK",
            "5",
            "STREAMS",
            "k",
            ">",
        ];
        assert_eq!(keys_of(Keys::Streams, &named), Some(vec!["k".into()]));
        // An option Redis refuses ends the walk: the shard answers it.
        assert_eq!(
            keys_of(Keys::Streams, &["XREAD", "FOO", "STREAMS", "a", "0"]),
            None
        );
        let sort = ["SORT", "l", "LIMIT", "0", "5", "STORE", "d"];
        let store = Keys::Store { options_from: 2 };
        assert_eq!(keys_of(store, &sort), Some(vec!["l".into(), "d".into()]));
        let geo = [
            "GEORADIUSBYMEMBER",
            "g",
            "store",
            "1",
            "km",
            "STOREDIST",
            "d",
        ];
        let by_member = Keys::Store { options_from: 4 };
        assert_eq!(keys_of(by_member, &geo), Some(vec!["g".into(), "d".into()]));
        let blpop = ["BLPOP", "a", "b", "0"];
        assert_eq!(
            keys_of(BEFORE_LAST, &blpop),
            Some(vec!["a".into(), "b".into()])
        );
        let bzmpop = ["BZMPOP", "1", "2", "a", "b", "MIN"];
        assert_eq!(
            keys_of(BLOCKING_NUMKEYS, &bzmpop),
            Some(vec!["a".into(), "b".into()])
        );
    }

    #[test]
    fn errors_use_redis_wording() {
        assert_eq!(
            arity_error("get"),
            "ERR wrong number of arguments for 'get' command"
        );
        let args = [
            bytes::Bytes::from_static(b"foo"),
            bytes::Bytes::from_static(b"a"),
        ];
        assert_eq!(
            unknown_command_error(&args),
            "ERR unknown command 'foo', with args beginning with: 'a' "
        );
    }
}
