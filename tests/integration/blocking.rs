//! Blocking commands on dedicated connections: a blocked client unblocked by another
//! client's push, byte for byte what Redis answers; pipelined commands wait behind; a client
//! that leaves while blocked releases its connection (the shard stops counting it blocked);
//! the cap on dedicated connections; CROSSSLOT; an XREADGROUP whose group is named `streams`
//! blocks on its own connection, not on the shared pool.

use crate::support::{self, ring_owner, Proxy, Raw, Redis, TempDir};
use crate::transactions::{dedicated, gauge_becomes};
use std::time::Duration;

/// The shard's `blocked_clients`.
fn blocked(r: &Redis) -> u64 {
    let v = r.cmd(&["INFO", "clients"]);
    let redis::Value::BulkString(b) = v else {
        panic!("{v:?}")
    };
    parse_blocked(&String::from_utf8_lossy(&b))
}

fn parse_blocked(info: &str) -> u64 {
    info.lines()
        .find_map(|l| l.strip_prefix("blocked_clients:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

/// Waits (bounded: 5 s) until the shard counts `want` blocked clients.
async fn blocked_becomes(r: &Redis, want: u64) -> bool {
    for _ in 0..250 {
        if blocked(r) == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

fn owner<'a>(a: &'a Redis, b: &'a Redis, key: &str) -> &'a Redis {
    if ring_owner(&[a, b], key) == a.port {
        a
    } else {
        b
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_client_is_released_by_a_push_through_another_client() {
    let (a, b, direct) = (Redis::start(), Redis::start(), Redis::start());
    let wal = TempDir::new("blocking");
    let proxy = Proxy::start(support::config(&[&a, &b], &wal)).await;
    let shard = owner(&a, &b, "{q}list");
    // Each family: the blocked command, then what wakes it, through the proxy and direct.
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["BLPOP", "{q}list", "{q}other", "0"],
            &["RPUSH", "{q}list", "x"],
        ),
        (&["BRPOP", "{q}list", "5"], &["LPUSH", "{q}list", "y"]),
        (
            &["BLMOVE", "{q}list", "{q}dst", "LEFT", "RIGHT", "0"],
            &["RPUSH", "{q}list", "z"],
        ),
        (
            &["BRPOPLPUSH", "{q}list", "{q}dst", "0"],
            &["RPUSH", "{q}list", "w"],
        ),
        (
            &["BLMPOP", "0", "1", "{q}list", "LEFT"],
            &["RPUSH", "{q}list", "v"],
        ),
        (&["BZPOPMIN", "{q}z", "0"], &["ZADD", "{q}z", "1", "m"]),
        (
            &["BZMPOP", "0", "1", "{q}z", "MAX"],
            &["ZADD", "{q}z", "2", "n"],
        ),
        (
            &["XREAD", "BLOCK", "0", "STREAMS", "{q}s", "$"],
            &["XADD", "{q}s", "5-1", "f", "v"],
        ),
    ];
    for hello in [None, Some("3")] {
        for (block, wake) in cases {
            let mut results = Vec::new();
            for target in ["proxy", "direct"] {
                let addr = if target == "proxy" {
                    proxy.addr
                } else {
                    direct.addr().parse().unwrap()
                };
                let (mut waiter, mut pusher) = (Raw::connect(addr).await, Raw::connect(addr).await);
                if let Some(v) = hello {
                    waiter.cmd(&["HELLO", v]).await;
                }
                // The blocked command with a PING pipelined behind it.
                let mut burst = support::encode(block);
                burst.extend_from_slice(&support::encode(&["PING"]));
                waiter.send(&burst).await;
                let server = if target == "proxy" { shard } else { &direct };
                assert!(
                    blocked_becomes(server, 1).await,
                    "{block:?} blocks at {target}"
                );
                pusher.cmd(wake).await;
                results.push((waiter.reply().await, waiter.reply().await));
                assert!(blocked_becomes(server, 0).await);
            }
            assert_eq!(results[0], results[1], "{block:?} (HELLO {hello:?})");
            assert!(
                results[0].1.contains("PONG"),
                "the pipelined PING answered after"
            );
            for s in [&a, &b, &direct] {
                s.cmd(&["FLUSHALL"]);
            }
        }
    }
    // A timeout that expires: Redis's nil, and non-blocking XREAD goes the ordinary way.
    let mut p = proxy.conn().await;
    let mut d = Raw::connect(direct.addr().parse().unwrap()).await;
    for cmd in [
        &["BLPOP", "{q}none", "0.05"][..],
        &["XREAD", "BLOCK", "50", "STREAMS", "{q}s", "$"],
        &["XADD", "{q}s", "1-1", "a", "b"],
        &["XREAD", "COUNT", "5", "STREAMS", "{q}s", "0"],
        &["BLPOP", "{q}list", "notanumber"],
    ] {
        assert_eq!(p.cmd(cmd).await, d.cmd(cmd).await, "{cmd:?}");
    }
    assert_eq!(dedicated(&proxy).await, 0, "every connection released");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_while_blocked_releases_its_connection() {
    let (a, b) = (Redis::start(), Redis::start());
    let wal = TempDir::new("blocking-leave");
    let proxy = Proxy::start(support::config(&[&a, &b], &wal)).await;
    let shard = owner(&a, &b, "{q}list");
    let mut c = proxy.conn().await;
    c.send(&support::encode(&["BLPOP", "{q}list", "0"])).await;
    assert!(blocked_becomes(shard, 1).await);
    assert_eq!(dedicated(&proxy).await, 1);
    drop(c);
    assert!(
        blocked_becomes(shard, 0).await,
        "the shard no longer blocks for it"
    );
    assert!(gauge_becomes(&proxy, 0).await, "the connection is released");
    // A later push is not taken by a ghost.
    let mut c = proxy.conn().await;
    assert_eq!(c.cmd(&["RPUSH", "{q}list", "x"]).await, ":1\r\n");
    assert_eq!(c.cmd(&["LLEN", "{q}list"]).await, ":1\r\n");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedicated_connections_are_capped_and_blocking_keys_must_share_a_shard() {
    let (a, b) = (Redis::start(), Redis::start());
    let wal = TempDir::new("blocking-cap");
    let mut cfg = support::config(&[&a, &b], &wal);
    cfg.backend.max_dedicated = 1;
    let proxy = Proxy::start(cfg).await;
    let shard = owner(&a, &b, "{q}list");
    let mut c1 = proxy.conn().await;
    c1.send(&support::encode(&["BLPOP", "{q}list", "0"])).await;
    assert!(blocked_becomes(shard, 1).await);
    let mut c2 = proxy.conn().await;
    let refused = "-ERR tallyproxy has 1 dedicated backend connections open (backend.max_dedicated); transactions with WATCH, subscriptions and blocking commands need one, try again later\r\n";
    assert_eq!(c2.cmd(&["BLPOP", "{q}list", "0"]).await, refused);
    assert_eq!(c2.cmd(&["SUBSCRIBE", "ch"]).await, refused);
    assert_eq!(c2.cmd(&["WATCH", "k"]).await, refused);
    assert_eq!(c2.cmd(&["RPUSH", "{q}list", "x"]).await, ":1\r\n");
    assert_eq!(c1.reply().await, "*2\r\n$7\r\n{q}list\r\n$1\r\nx\r\n");
    assert!(gauge_becomes(&proxy, 0).await);
    assert_eq!(c2.cmd(&["BLPOP", "{q}list", "0.01"]).await, "*-1\r\n");
    // Keys on two shards.
    let shards = [&a, &b];
    let on = |port: u16| {
        (0..1000)
            .map(|i| format!("k{i}"))
            .find(|k| ring_owner(&shards, k) == port)
            .unwrap()
    };
    assert_eq!(
        c2.cmd(&["BLPOP", &on(a.port), &on(b.port), "0"]).await,
        "-CROSSSLOT Keys in request don't hash to the same slot\r\n"
    );
    proxy.stop().await;
}

/// A group named `streams` and a consumer named `block` are arguments, not keywords: the
/// XREADGROUP still blocks on a dedicated connection, so another client's commands to the
/// same shard (one pooled connection, `pool_size = 1`) are not stuck behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xreadgroup_with_a_group_named_streams_blocks_on_its_own_connection() {
    let (a, direct) = (Redis::start(), Redis::start());
    let wal = TempDir::new("blocking-xreadgroup");
    let mut cfg = support::config(&[&a], &wal);
    cfg.backend.pool_size = 1;
    cfg.counters.patterns = vec![tallyproxy::config::CounterPattern {
        pattern: "visits:*".into(),
        mode: tallyproxy::config::CounterMode::Batched,
    }];
    let proxy = Proxy::start(cfg).await;
    // In RESP2 and, after HELLO 3, in RESP3 (where the reply is a map of streams).
    for proto in ["2", "3"] {
        let (stream, plain) = (format!("s{proto}"), format!("plain{proto}"));
        let read = [
            "XREADGROUP",
            "GROUP",
            "streams",
            "block",
            "BLOCK",
            "0",
            "STREAMS",
            &stream,
            ">",
        ];
        let mut woken = Vec::new();
        for (addr, server) in [(proxy.addr, &a), (direct.addr().parse().unwrap(), &direct)] {
            let (mut reader, mut other) = (Raw::connect(addr).await, Raw::connect(addr).await);
            reader.hello(proto).await;
            other.hello(proto).await;
            let create = ["XGROUP", "CREATE", &stream, "streams", "$", "MKSTREAM"];
            assert_eq!(reader.cmd(&create).await, "+OK\r\n");
            reader.send(&support::encode(&read)).await;
            assert!(blocked_becomes(server, 1).await, "blocks at {addr}");
            // Answered while the reader blocks (bounded: 5 s each, a stuck reply fails).
            for (cmd, want) in [
                (&["PING"][..], "+PONG\r\n"),
                (&["INCR", &plain], ":1\r\n"),
                (&["INCR", &plain], ":2\r\n"),
                (&["INCR", &format!("visits:{proto}")], ":1\r\n"),
            ] {
                other.send(&support::encode(cmd)).await;
                let got = tokio::time::timeout(Duration::from_secs(5), other.reply()).await;
                assert_eq!(got.as_deref(), Ok(want), "{cmd:?} while blocked at {addr}");
            }
            assert_eq!(
                other.cmd(&["XADD", &stream, "7-1", "f", "v"]).await,
                "$3\r\n7-1\r\n"
            );
            woken.push(reader.reply().await);
            assert!(blocked_becomes(server, 0).await);
        }
        let entries = "*1\r\n*2\r\n$3\r\n7-1\r\n*2\r\n$1\r\nf\r\n$1\r\nv\r\n";
        let want = match proto {
            "2" => format!("*1\r\n*2\r\n$2\r\n{stream}\r\n{entries}"),
            _ => format!("%1\r\n$2\r\n{stream}\r\n{entries}"),
        };
        assert_eq!(woken[0], want, "RESP{proto}");
        assert_eq!(woken[0], woken[1], "byte for byte as Redis, RESP{proto}");
        assert_eq!(
            a.get(&plain).as_deref(),
            Some("2"),
            "the INCRs ran on the shard"
        );
    }
    assert_eq!(dedicated(&proxy).await, 0, "the connection is released");
    proxy.stop().await;
}
