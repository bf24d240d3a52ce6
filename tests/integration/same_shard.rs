//! Multi-key commands whose keys must share a shard: forwarded whole (byte for byte what a
//! Redis answers, RESP2 and RESP3), refused with CROSSSLOT when the keys live on different
//! shards, and counter keys among them land their pending increments first.

use crate::support::{self, ring_owner, Proxy, Raw, Redis, TempDir};
use std::time::Duration;
use tallyproxy::config::HumanDuration;

const CROSSSLOT: &str = "-CROSSSLOT Keys in request don't hash to the same slot\r\n";

/// Every same-shard family, on keys that share the `{t}` tag.
const SCRIPT: &[&[&str]] = &[
    &["SET", "{t}a", "hello"],
    &["RENAME", "{t}a", "{t}b"],
    &["RENAMENX", "{t}b", "{t}c"],
    &["RENAMENX", "{t}c", "{t}c"],
    &["COPY", "{t}c", "{t}d"],
    &["COPY", "{t}c", "{t}d"],
    &["COPY", "{t}c", "{t}d", "REPLACE"],
    &["MSETNX", "{t}e", "1", "{t}f", "2"],
    &["MSETNX", "{t}e", "1", "{t}g", "2"],
    &["SADD", "{t}s1", "a", "b", "c"],
    &["SADD", "{t}s2", "b", "c", "d"],
    &["SMOVE", "{t}s1", "{t}s2", "a"],
    &["SINTERCARD", "2", "{t}s1", "{t}s2"],
    &["SINTERSTORE", "{t}si", "{t}s1", "{t}s2"],
    &["SUNIONSTORE", "{t}su", "{t}s1", "{t}s2"],
    &["SDIFFSTORE", "{t}sd", "{t}s2", "{t}s1"],
    &["SCARD", "{t}su"],
    &["RPUSH", "{t}l1", "x", "y", "z"],
    &["LMOVE", "{t}l1", "{t}l2", "LEFT", "RIGHT"],
    &["RPOPLPUSH", "{t}l1", "{t}l2"],
    &["LMPOP", "2", "{t}l1", "{t}l2", "LEFT", "COUNT", "2"],
    &["LRANGE", "{t}l2", "0", "-1"],
    &["ZADD", "{t}z1", "1", "a", "2", "b"],
    &["ZADD", "{t}z2", "3", "b", "4", "c"],
    &[
        "ZUNIONSTORE",
        "{t}zu",
        "2",
        "{t}z1",
        "{t}z2",
        "WEIGHTS",
        "1",
        "2",
    ],
    &["ZINTERSTORE", "{t}zi", "2", "{t}z1", "{t}z2"],
    &["ZDIFFSTORE", "{t}zd", "2", "{t}z1", "{t}z2"],
    &["ZINTERCARD", "2", "{t}z1", "{t}z2"],
    &["ZRANGESTORE", "{t}zr", "{t}zu", "0", "-1"],
    &["ZMPOP", "1", "{t}zr", "MIN"],
    &["PFADD", "{t}h1", "a", "b"],
    &["PFADD", "{t}h2", "b", "c"],
    &["PFMERGE", "{t}h3", "{t}h1", "{t}h2"],
    &["PFCOUNT", "{t}h1", "{t}h2"],
    &["SET", "{t}k1", "foobar"],
    &["SET", "{t}k2", "abcdef"],
    &["BITOP", "AND", "{t}k3", "{t}k1", "{t}k2"],
    &["GET", "{t}k3"],
    &["SET", "{t}lcs1", "ohmytext"],
    &["SET", "{t}lcs2", "mynewtext"],
    &["LCS", "{t}lcs1", "{t}lcs2"],
    &["EVAL", "return redis.call('GET', KEYS[1])", "1", "{t}k1"],
    &[
        "EVAL",
        "return {KEYS[1], KEYS[2], ARGV[1]}",
        "2",
        "{t}x",
        "{t}y",
        "v",
    ],
    &["EVAL", "return 7", "0"],
    &["EVAL_RO", "return redis.call('GET', KEYS[1])", "1", "{t}k2"],
    &["EVALSHA", "ffffffffffffffffffffffffffffffffffffffff", "0"],
    // Bad key counts: the shard answers in its own words.
    &["EVAL", "return 1", "5", "{t}x"],
    &["ZUNION", "x", "{t}z1"],
];

fn config(shards: &[&Redis], wal: &TempDir) -> tallyproxy::Config {
    let mut cfg = support::config(shards, wal);
    cfg.counters.flush_interval = HumanDuration(Duration::from_secs(3600));
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_shard_commands_answer_as_redis_in_both_protocols() {
    let (a, b, direct) = (Redis::start(), Redis::start(), Redis::start());
    let wal = TempDir::new("same-shard");
    let proxy = Proxy::start(config(&[&a, &b], &wal)).await;
    for hello in [None, Some("3")] {
        let (mut p, mut d) = support::raw_pair(proxy.addr, &direct, hello).await;
        support::assert_same_replies(&mut p, &mut d, SCRIPT, hello).await;
        // FLUSHALL through the proxy empties both shards, as on the direct server.
        assert_eq!(p.cmd(&["FLUSHALL"]).await, d.cmd(&["FLUSHALL"]).await);
        assert_eq!(p.cmd(&["DBSIZE"]).await, ":0\r\n");
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_on_different_shards_are_refused_with_crossslot_and_nothing_runs() {
    let (a, b) = (Redis::start(), Redis::start());
    let wal = TempDir::new("crossslot");
    let proxy = Proxy::start(config(&[&a, &b], &wal)).await;
    let shards = [&a, &b];
    let on_a = (0..1000)
        .map(|i| format!("k{i}"))
        .find(|k| ring_owner(&shards, k) == a.port)
        .unwrap();
    let on_b = (0..1000)
        .map(|i| format!("k{i}"))
        .find(|k| ring_owner(&shards, k) == b.port)
        .unwrap();
    let mut c = proxy.conn().await;
    assert_eq!(c.cmd(&["SET", &on_a, "v"]).await, "+OK\r\n");
    for cmd in [
        vec!["RENAME", &on_a, &on_b],
        vec!["SUNIONSTORE", &on_a, &on_a, &on_b],
        vec!["ZUNIONSTORE", &on_a, "2", &on_a, &on_b],
        vec![
            "EVAL",
            "return redis.call('DEL', KEYS[1])",
            "2",
            &on_a,
            &on_b,
        ],
        vec!["BITOP", "OR", &on_a, &on_b],
    ] {
        assert_eq!(c.cmd(&cmd).await, CROSSSLOT, "{cmd:?}");
    }
    assert_eq!(a.get(&on_a).as_deref(), Some("v"), "nothing ran");
    assert_eq!(b.get(&on_b), None);
    // The connection stays usable.
    assert_eq!(c.cmd(&["GET", &on_a]).await, "$1\r\nv\r\n");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counter_keys_land_their_increments_before_a_same_shard_command() {
    let (a, b) = (Redis::start(), Redis::start());
    let wal = TempDir::new("same-shard-counters");
    let proxy = Proxy::start(config(&[&a, &b], &wal)).await;
    let mut c = proxy.conn().await;
    for _ in 0..5 {
        c.cmd(&["INCR", "{v}hits"]).await;
    }
    assert_eq!(c.cmd(&["INCRBY", "{v}other", "7"]).await, ":7\r\n");
    let owner = if ring_owner(&[&a, &b], "{v}hits") == a.port {
        &a
    } else {
        &b
    };
    assert_eq!(
        owner.get("{v}hits"),
        None,
        "pending in the proxy (flush every hour)"
    );
    // RENAME of a counter with pending increments: the increments land first, so the
    // renamed key holds them all, and no later flush brings the old key back.
    assert_eq!(c.cmd(&["RENAME", "{v}hits", "{v}renamed"]).await, "+OK\r\n");
    assert_eq!(owner.get("{v}renamed").as_deref(), Some("5"));
    assert_eq!(c.cmd(&["GET", "{v}renamed"]).await, "$1\r\n5\r\n");
    assert_eq!(c.cmd(&["GET", "{v}hits"]).await, "$-1\r\n");
    // A script over two counters sees both totals.
    let sum = "return redis.call('GET', KEYS[1]) + redis.call('GET', KEYS[2])";
    assert_eq!(
        c.cmd(&["EVAL", sum, "2", "{v}renamed", "{v}other"]).await,
        ":12\r\n"
    );
    // Increments after a script that wrote a counter count on top of what it wrote.
    let set = "return redis.call('SET', KEYS[1], '100')";
    assert_eq!(c.cmd(&["EVAL", set, "1", "{v}other"]).await, "+OK\r\n");
    assert_eq!(c.cmd(&["INCR", "{v}other"]).await, ":101\r\n");
    let (status, _) = support::http_request(proxy.http, "POST", "/admin/flush").await;
    assert_eq!(status, 200);
    assert_eq!(
        owner.get("{v}hits"),
        None,
        "the renamed-away key stays gone"
    );
    assert_eq!(owner.get("{v}renamed").as_deref(), Some("5"));
    assert_eq!(owner.get("{v}other").as_deref(), Some("101"));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_load_exists_and_flush_reach_every_shard() {
    let (a, b, direct) = (Redis::start(), Redis::start(), Redis::start());
    let wal = TempDir::new("script-fanout");
    let proxy = Proxy::start(config(&[&a, &b], &wal)).await;
    let shards = [&a, &b];
    let on = |port: u16| {
        (0..1000)
            .map(|i| format!("s{i}"))
            .find(|k| ring_owner(&shards, k) == port)
            .unwrap()
    };
    let (on_a, on_b) = (on(a.port), on(b.port));
    let mut c = proxy.conn().await;
    let mut d = Raw::connect(direct.addr().parse().unwrap()).await;
    let body = "return redis.call('INCRBY', KEYS[1], ARGV[1])";
    let sha = c.cmd(&["SCRIPT", "LOAD", body]).await;
    assert_eq!(sha, d.cmd(&["SCRIPT", "LOAD", body]).await);
    let sha = sha.lines().nth(1).unwrap().to_string();
    // Loaded on every shard: EVALSHA works whichever shard the key leads to.
    assert_eq!(c.cmd(&["EVALSHA", &sha, "1", &on_a, "2"]).await, ":2\r\n");
    assert_eq!(c.cmd(&["EVALSHA", &sha, "1", &on_b, "3"]).await, ":3\r\n");
    let missing = "ffffffffffffffffffffffffffffffffffffffff";
    assert_eq!(
        c.cmd(&["SCRIPT", "EXISTS", &sha, missing]).await,
        "*2\r\n:1\r\n:0\r\n"
    );
    // On one shard only: it does not exist for the proxy (EVALSHA could miss it).
    let lone = a.cmd(&["SCRIPT", "LOAD", "return 1"]);
    let redis::Value::BulkString(lone) = lone else {
        panic!("{lone:?}")
    };
    let lone = String::from_utf8(lone).unwrap();
    assert_eq!(c.cmd(&["SCRIPT", "EXISTS", &lone]).await, "*1\r\n:0\r\n");
    assert_eq!(c.cmd(&["SCRIPT", "FLUSH"]).await, "+OK\r\n");
    assert_eq!(c.cmd(&["SCRIPT", "EXISTS", &sha]).await, "*1\r\n:0\r\n");
    let kill = c.cmd(&["SCRIPT", "KILL"]).await;
    assert!(
        kill.starts_with("-ERR SCRIPT subcommands other than"),
        "{kill}"
    );
    // RESP3 clients get the same shapes.
    c.cmd(&["HELLO", "3"]).await;
    assert_eq!(c.cmd(&["SCRIPT", "EXISTS", &sha]).await, "*1\r\n:0\r\n");
    proxy.stop().await;
}
