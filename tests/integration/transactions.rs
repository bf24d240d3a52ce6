//! MULTI / EXEC / DISCARD / WATCH / UNWATCH through the proxy: byte for byte what a Redis
//! answers (RESP2 and RESP3) when every key lives on one shard, CROSSSLOT at the command that
//! would cross and EXECABORT after it, WATCH conflicts, counter increments inside a
//! transaction counted once, and the dedicated connection released afterwards.

use crate::support::{self, ring_owner, Proxy, Raw, Redis, TempDir};
use std::time::Duration;

const CROSSSLOT: &str = "-CROSSSLOT Keys in request don't hash to the same slot\r\n";
const EXECABORT: &str = "-EXECABORT Transaction discarded because of previous errors.\r\n";

/// Transactions on keys sharing the `{t}` tag, with the proxy's own commands inside.
const SCRIPT: &[&[&str]] = &[
    &["EXEC"],
    &["DISCARD"],
    &["MULTI"],
    &["MULTI"],
    &["WATCH", "{t}a"],
    &["SET", "{t}a", "1"],
    &["PING"],
    &["ECHO", "hi"],
    &["INCR", "{t}n"],
    &["GET", "{t}a"],
    &["LPUSH", "{t}l", "x", "y"],
    &["INCR", "{t}l"],
    &["PING", "again"],
    &["EXEC"],
    &["MULTI"],
    &["EXEC"],
    &["MULTI"],
    &["SET", "{t}a", "2"],
    &["DISCARD"],
    &["GET", "{t}a"],
    // An arity error at queue time: EXECABORT, nothing ran.
    &["MULTI"],
    &["SET", "{t}a", "3"],
    &["GET"],
    &["EXEC"],
    &["GET", "{t}a"],
    // An unknown command too.
    &["MULTI"],
    &["NOSUCHCOMMAND", "x"],
    &["EXEC"],
    // WATCH, nothing changes: EXEC runs.
    &["WATCH", "{t}a", "{t}n"],
    &["MULTI"],
    &["INCRBY", "{t}n", "10"],
    &["SET", "{t}a", "4"],
    &["EXEC"],
    &["UNWATCH"],
    &["GET", "{t}n"],
    &["WATCH", "{t}a"],
    &["UNWATCH"],
    &["MULTI"],
    &["BLPOP", "{t}empty", "0"],
    &["EXEC"],
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_answer_as_redis_in_both_protocols() {
    let (a, b, direct) = (Redis::start(), Redis::start(), Redis::start());
    let wal = TempDir::new("txn");
    let proxy = Proxy::start(support::config(&[&a, &b], &wal)).await;
    for hello in [None, Some("3")] {
        let (mut p, mut d) = support::raw_pair(proxy.addr, &direct, hello).await;
        support::assert_same_replies(&mut p, &mut d, SCRIPT, hello).await;
        // Pipelined as one write: the same bytes.
        let mut burst = Vec::new();
        for cmd in [
            &["MULTI"][..],
            &["SET", "{t}p", "v"],
            &["GET", "{t}p"],
            &["EXEC"],
            &["GET", "{t}p"],
        ] {
            burst.extend_from_slice(&support::encode(cmd));
        }
        p.send(&burst).await;
        d.send(&burst).await;
        for _ in 0..5 {
            assert_eq!(
                p.reply().await,
                d.reply().await,
                "pipelined (HELLO {hello:?})"
            );
        }
        for s in [&a, &b, &direct] {
            s.cmd(&["FLUSHALL"]);
        }
    }
    assert_eq!(dedicated(&proxy).await, 0, "every connection released");
    proxy.stop().await;
}

/// Two keys, one on each shard.
fn apart(a: &Redis, b: &Redis) -> (String, String) {
    let shards = [a, b];
    let on = |port: u16| {
        (0..1000)
            .map(|i| format!("k{i}"))
            .find(|k| ring_owner(&shards, k) == port)
            .unwrap()
    };
    (on(a.port), on(b.port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_across_shards_is_refused_at_the_crossing_command() {
    let (a, b) = (Redis::start(), Redis::start());
    let wal = TempDir::new("txn-crossslot");
    let proxy = Proxy::start(support::config(&[&a, &b], &wal)).await;
    let (on_a, on_b) = apart(&a, &b);
    let mut c = proxy.conn().await;
    assert_eq!(c.cmd(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(c.cmd(&["SET", &on_a, "1"]).await, "+QUEUED\r\n");
    assert_eq!(c.cmd(&["SET", &on_b, "1"]).await, CROSSSLOT);
    assert_eq!(c.cmd(&["MGET", &on_a, &on_b]).await, CROSSSLOT);
    assert_eq!(c.cmd(&["EXEC"]).await, EXECABORT);
    assert_eq!(a.get(&on_a), None, "nothing ran");
    assert_eq!(b.get(&on_b), None);
    assert_eq!(c.cmd(&["WATCH", &on_a, &on_b]).await, CROSSSLOT);
    // A WATCH fixes the shard: a queued command elsewhere crosses.
    assert_eq!(c.cmd(&["WATCH", &on_a]).await, "+OK\r\n");
    assert_eq!(c.cmd(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(c.cmd(&["SET", &on_b, "1"]).await, CROSSSLOT);
    assert_eq!(c.cmd(&["EXEC"]).await, EXECABORT);
    // Commands the proxy refuses inside MULTI abort it too, with a clear reason.
    assert_eq!(c.cmd(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(
        c.cmd(&["SUBSCRIBE", "ch"]).await,
        "-ERR SUBSCRIBE inside MULTI is not supported by tallyproxy\r\n"
    );
    assert_eq!(c.cmd(&["EXEC"]).await, EXECABORT);
    assert_eq!(c.cmd(&["SET", &on_b, "2"]).await, "+OK\r\n", "usable after");
    assert_eq!(dedicated(&proxy).await, 0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_key_changed_by_another_client_makes_exec_answer_nil() {
    let (a, b) = (Redis::start(), Redis::start());
    let wal = TempDir::new("txn-watch");
    let proxy = Proxy::start(support::config(&[&a, &b], &wal)).await;
    let (mut c1, mut c2) = (proxy.conn().await, proxy.conn().await);
    assert_eq!(c1.cmd(&["SET", "w", "1"]).await, "+OK\r\n");
    assert_eq!(c1.cmd(&["WATCH", "w"]).await, "+OK\r\n");
    assert_eq!(dedicated(&proxy).await, 1, "WATCH holds a connection");
    assert_eq!(c2.cmd(&["SET", "w", "2"]).await, "+OK\r\n");
    assert_eq!(c1.cmd(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(c1.cmd(&["SET", "w", "3"]).await, "+QUEUED\r\n");
    assert_eq!(c1.cmd(&["EXEC"]).await, "*-1\r\n");
    assert_eq!(c1.cmd(&["GET", "w"]).await, "$1\r\n2\r\n");
    assert_eq!(dedicated(&proxy).await, 0, "released at EXEC");
    // In RESP3 the nil is `_`.
    c1.cmd(&["HELLO", "3"]).await;
    assert_eq!(c1.cmd(&["WATCH", "w"]).await, "+OK\r\n");
    assert_eq!(c2.cmd(&["DEL", "w"]).await, ":1\r\n");
    assert_eq!(c1.cmd(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(c1.cmd(&["SET", "w", "3"]).await, "+QUEUED\r\n");
    assert_eq!(c1.cmd(&["EXEC"]).await, "_\r\n");
    // An increment buffered by another client after the WATCH lands before EXEC: a change.
    assert_eq!(c2.cmd(&["INCR", "visits:w"]).await, ":1\r\n");
    assert_eq!(c1.cmd(&["WATCH", "visits:w"]).await, "+OK\r\n");
    assert_eq!(c2.cmd(&["INCR", "visits:w"]).await, ":2\r\n");
    assert_eq!(c1.cmd(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(c1.cmd(&["INCRBY", "visits:w", "10"]).await, "+QUEUED\r\n");
    assert_eq!(c1.cmd(&["EXEC"]).await, "_\r\n");
    assert_eq!(c1.cmd(&["GET", "visits:w"]).await, "$1\r\n2\r\n");
    // A client that leaves while watching frees its connection.
    let mut c3 = proxy.conn().await;
    assert_eq!(c3.cmd(&["WATCH", "w"]).await, "+OK\r\n");
    assert_eq!(dedicated(&proxy).await, 1);
    drop(c3);
    assert!(
        gauge_becomes(&proxy, 0).await,
        "released when the client left"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counter_increments_inside_a_transaction_are_counted_once() {
    let (a, b) = (Redis::start(), Redis::start());
    let wal = TempDir::new("txn-counters");
    let proxy = Proxy::start(support::config(&[&a, &b], &wal)).await;
    let owner = if ring_owner(&[&a, &b], "visits:home") == a.port {
        &a
    } else {
        &b
    };
    let mut c = proxy.conn().await;
    for i in 1..=3 {
        assert_eq!(c.cmd(&["INCR", "visits:home"]).await, format!(":{i}\r\n"));
    }
    assert_eq!(
        owner.get("visits:home"),
        None,
        "buffered (flush every hour)"
    );
    assert_eq!(c.cmd(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(c.cmd(&["INCRBY", "visits:home", "10"]).await, "+QUEUED\r\n");
    assert_eq!(c.cmd(&["GET", "visits:home"]).await, "+QUEUED\r\n");
    assert_eq!(c.cmd(&["DECR", "visits:home"]).await, "+QUEUED\r\n");
    assert_eq!(
        c.cmd(&["EXEC"]).await,
        "*3\r\n:13\r\n$2\r\n13\r\n:12\r\n",
        "the buffered increments landed first"
    );
    assert_eq!(owner.get("visits:home").as_deref(), Some("12"));
    // Reads after EXEC see it, and later increments count on top.
    assert_eq!(c.cmd(&["GET", "visits:home"]).await, "$2\r\n12\r\n");
    assert_eq!(c.cmd(&["INCR", "visits:home"]).await, ":13\r\n");
    let (status, _) = support::http_request(proxy.http, "POST", "/admin/flush").await;
    assert_eq!(status, 200);
    assert_eq!(
        owner.get("visits:home").as_deref(),
        Some("13"),
        "none lost or doubled"
    );
    let (_, body) = support::http_request(proxy.http, "GET", "/visits/home").await;
    assert!(body.replace(' ', "").contains("\"visits\":13"), "{body}");
    proxy.stop().await;
}

/// The proxy's count of dedicated connections (INFO clients).
pub async fn dedicated(proxy: &Proxy) -> u64 {
    let mut c = proxy.conn().await;
    parse_gauge(&c.cmd(&["INFO", "clients"]).await)
}

fn parse_gauge(info: &str) -> u64 {
    info.lines()
        .find_map(|l| l.strip_prefix("dedicated_connections:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("INFO clients has dedicated_connections")
}

/// Waits (bounded: 5 s) until the proxy counts `want` dedicated connections.
pub async fn gauge_becomes(proxy: &Proxy, want: u64) -> bool {
    for _ in 0..250 {
        if dedicated(proxy).await == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_and_a_subscriber_are_bounded() {
    let a = Redis::start();
    let wal = TempDir::new("txn-bounds");
    let proxy = Proxy::start(support::config(&[&a], &wal)).await;
    let mut c = proxy.conn().await;
    assert_eq!(c.cmd(&["MULTI"]).await, "+OK\r\n");
    let mut burst = Vec::new();
    for _ in 0..10_001 {
        burst.extend_from_slice(&support::encode(&["PING"]));
    }
    c.send(&burst).await;
    for _ in 0..10_000 {
        assert_eq!(c.reply().await, "+QUEUED\r\n");
    }
    assert_eq!(
        c.reply().await,
        "-ERR tallyproxy queues at most 10000 commands (67108864 bytes) in a transaction\r\n"
    );
    assert_eq!(c.cmd(&["EXEC"]).await, EXECABORT);
    let many: Vec<String> = (0..10_001).map(|i| format!("ch{i}")).collect();
    let mut cmd = vec!["SUBSCRIBE"];
    cmd.extend(many.iter().map(|s| s.as_str()));
    assert_eq!(
        c.cmd(&cmd).await,
        "-ERR tallyproxy allows at most 10000 channels and patterns per client\r\n"
    );
    assert_eq!(c.cmd(&["PING"]).await, "+PONG\r\n", "still usable");
    assert_eq!(dedicated(&proxy).await, 0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_whose_keys_moved_while_queued_is_refused() {
    let (a, c) = (Redis::start(), Redis::start());
    let wal = TempDir::new("txn-moved");
    let proxy = Proxy::start(support::config(&[&a], &wal)).await;
    // A key that the ring gives to the shard about to join.
    let key = (0..1000)
        .map(|i| format!("m{i}"))
        .find(|k| ring_owner(&[&a, &c], k) == c.port)
        .unwrap();
    let mut t = proxy.conn().await;
    assert_eq!(t.cmd(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(t.cmd(&["SET", &key, "v"]).await, "+QUEUED\r\n");
    let body = format!("{{\"addr\": \"{}\"}}", c.addr());
    let (status, _) = support::http_json(proxy.http, "POST", "/admin/shards", &body).await;
    assert_eq!(status, 202);
    let mut done = false;
    for _ in 0..300 {
        let (_, p) = support::http_json(proxy.http, "GET", "/admin/rebalance", "").await;
        if p["state"] == "done" {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(done, "the rebalance finished within 30 s");
    assert_eq!(
        t.cmd(&["EXEC"]).await,
        "-TRYAGAIN the shards changed while the transaction was queued: its keys live elsewhere now; transaction discarded, run it again\r\n"
    );
    assert_eq!(a.get(&key), None, "nothing ran on the old owner");
    // Run again, it lands on the new owner.
    assert_eq!(t.cmd(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(t.cmd(&["SET", &key, "v"]).await, "+QUEUED\r\n");
    assert_eq!(t.cmd(&["EXEC"]).await, "*1\r\n+OK\r\n");
    assert_eq!(c.get(&key).as_deref(), Some("v"));
    proxy.stop().await;
}

/// Two shards where the ring gives the pub/sub shard's (the first's) own name, read as a
/// key, to the other shard: a transaction placed by that name lands on the wrong shard.
///
/// For about one first port in six, its own name hashes just behind one of its own points,
/// and hardly any second port takes it (measured over 150 random ports, each against the 40
/// after it: 24 had at most 4 that fit). So the ports are tried on the ring before any
/// server starts, with a fresh first port now and then.
fn pubsub_pair() -> (Redis, Redis) {
    let owner = |a: u16, b: u16| {
        let node = |port: u16| tallyproxy::router::ring::Node {
            name: format!("redis_{port}"),
            weight: 1,
        };
        let ring = tallyproxy::router::ring::Ring::new(vec![node(a), node(b)], 160);
        [a, b][ring.locate(format!("redis_{a}").as_bytes())]
    };
    for _ in 0..10 {
        let a = Redis::start();
        for _ in 0..40 {
            let port = support::free_port();
            if port != a.port && owner(a.port, port) == port {
                let b = Redis::start_on(port);
                assert_eq!(ring_owner(&[&a, &b], &format!("redis_{}", a.port)), b.port);
                return (a, b);
            }
        }
    }
    panic!("no pair of shards in 10 first ports with 40 second ports each");
}

const PUBLISH_ELSEWHERE: &str = "-CROSSSLOT PUBLISH and PUBSUB inside MULTI run on the pub/sub shard (the first shard listed): every key of the transaction must live there\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_in_a_transaction_runs_with_keys_of_the_pubsub_shard() {
    let ((a, b), direct) = (pubsub_pair(), Redis::start());
    let wal = TempDir::new("txn-publish");
    let proxy = Proxy::start(support::config(&[&a, &b], &wal)).await;
    let (on_a, _) = apart(&a, &b);
    // The key first, then PUBLISH first: each through the proxy and direct, byte for byte.
    let orders: [&[&[&str]]; 2] = [
        &[&["INCR", &on_a], &["PUBLISH", "ch", "m"]],
        &[&["PUBLISH", "ch", "m"], &["INCR", &on_a]],
    ];
    // In RESP2, then after HELLO 3 in RESP3 (where subscriber replies are pushes).
    let rounds = ["2", "3"]
        .into_iter()
        .flat_map(|proto| orders.map(|queued| (proto, queued)));
    for (round, (proto, queued)) in rounds.enumerate() {
        let incr = format!(":{}\r\n", round + 1);
        let exec = if round % 2 == 0 {
            format!("*2\r\n{incr}:1\r\n")
        } else {
            format!("*2\r\n:1\r\n{incr}")
        };
        let want = ["+OK\r\n", "+QUEUED\r\n", "+QUEUED\r\n", &exec];
        let push = ["*", ">"][(proto == "3") as usize];
        for addr in [proxy.addr, direct.addr().parse().unwrap()] {
            let (mut sub, mut c) = (Raw::connect(addr).await, Raw::connect(addr).await);
            sub.hello(proto).await;
            c.hello(proto).await;
            assert_eq!(
                sub.cmd(&["SUBSCRIBE", "ch"]).await,
                format!("{push}3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n")
            );
            let mut replies = vec![c.cmd(&["MULTI"]).await];
            for cmd in queued {
                replies.push(c.cmd(cmd).await);
            }
            replies.push(c.cmd(&["EXEC"]).await);
            // The same bytes from the proxy and from Redis.
            assert_eq!(replies, want, "{queued:?} at {addr}, RESP{proto}");
            assert_eq!(
                sub.reply().await,
                format!("{push}3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$1\r\nm\r\n"),
                "{queued:?} at {addr}, RESP{proto}"
            );
        }
    }
    assert_eq!(
        a.get(&on_a).as_deref(),
        Some("4"),
        "ran on the pub/sub shard"
    );
    // The subscribers' dedicated connections go when the proxy sees them close: a moment.
    assert!(gauge_becomes(&proxy, 0).await, "every connection released");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_in_a_transaction_with_a_key_of_another_shard_is_refused() {
    let (a, b) = pubsub_pair();
    let wal = TempDir::new("txn-publish-elsewhere");
    let proxy = Proxy::start(support::config(&[&a, &b], &wal)).await;
    let (_, on_b) = apart(&a, &b);
    let (mut sub, mut c) = (proxy.conn().await, proxy.conn().await);
    assert_eq!(
        sub.cmd(&["SUBSCRIBE", "ch"]).await,
        "*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n"
    );
    // The refusal falls on whichever command comes second; EXEC then runs nothing.
    let orders: [[&[&str]; 2]; 2] = [
        [&["INCR", &on_b], &["PUBLISH", "ch", "m"]],
        [&["PUBLISH", "ch", "m"], &["INCR", &on_b]],
    ];
    for [first, second] in orders {
        assert_eq!(c.cmd(&["MULTI"]).await, "+OK\r\n");
        assert_eq!(c.cmd(first).await, "+QUEUED\r\n", "{first:?}");
        assert_eq!(c.cmd(second).await, PUBLISH_ELSEWHERE, "{second:?}");
        assert_eq!(c.cmd(&["EXEC"]).await, EXECABORT);
    }
    assert_eq!(b.get(&on_b), None, "nothing applied");
    assert_eq!(c.cmd(&["GET", &on_b]).await, "$-1\r\n", "nothing buffered");
    // Nothing was published: the next message the subscriber gets is this one.
    assert_eq!(c.cmd(&["PUBLISH", "ch", "after"]).await, ":1\r\n");
    assert_eq!(
        sub.reply().await,
        "*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nafter\r\n"
    );
    drop(sub);
    assert!(gauge_becomes(&proxy, 0).await, "every connection released");
    proxy.stop().await;
}
