//! The core proxy: command groups against real shards, splits, pipelining, hash tags,
//! protocol errors and limits, a stopped shard, shutdown.

use crate::support::{self, encode, holder, ring_owner, Proxy, Raw, Redis, TempDir};
use std::time::{Duration, Instant};

/// Two shards, a proxy over them, and a direct connection to a third plain Redis that
/// serves as the reference for "what Redis would answer".
struct Setup {
    a: Redis,
    b: Redis,
    reference: Redis,
    proxy: Proxy,
    _wal: TempDir,
}

async fn setup() -> Setup {
    setup_with(false).await
}

/// `all_counters`: every key is a batched counter key (the product default); otherwise
/// only `visits:*` is, and the rest are plain forwarded keys.
async fn setup_with(all_counters: bool) -> Setup {
    let (a, b, reference) = (Redis::start(), Redis::start(), Redis::start());
    let wal = TempDir::new("wal");
    let mut cfg = support::config(&[&a, &b], &wal);
    if !all_counters {
        cfg.counters.patterns = vec![tallyproxy::config::CounterPattern {
            pattern: "visits:*".into(),
            mode: tallyproxy::config::CounterMode::Batched,
        }];
    }
    let proxy = Proxy::start(cfg).await;
    Setup {
        a,
        b,
        reference,
        proxy,
        _wal: wal,
    }
}

/// Runs each command through the proxy and directly on the reference Redis; the replies
/// must be byte for byte the same.
async fn same_as_redis(s: &Setup, script: &[&[&str]]) {
    let mut p = s.proxy.conn().await;
    let mut r = Raw::connect(format!("127.0.0.1:{}", s.reference.port).parse().unwrap()).await;
    for cmd in script {
        let (got, want) = (p.cmd(cmd).await, r.cmd(cmd).await);
        assert_eq!(got, want, "command {cmd:?}");
    }
}

const STRING_SCRIPT: &[&[&str]] = &[
    &["SET", "s1", "hello"],
    &["GET", "s1"],
    &["SET", "s1", "x", "NX"],
    &["SET", "s1", "world", "XX", "GET"],
    &["SET", "s2", "v", "EX", "100"],
    &["GETSET", "s1", "again"],
    &["APPEND", "s1", "!"],
    &["STRLEN", "s1"],
    &["GETRANGE", "s1", "0", "2"],
    &["SETRANGE", "s1", "1", "XY"],
    &["GETDEL", "s1"],
    &["GET", "s1"],
    &["SETNX", "s3", "1"],
    &["SETNX", "s3", "2"],
    &["SETEX", "s4", "100", "v"],
    &["PSETEX", "s5", "100000", "v"],
    &["INCR", "n1"],
    &["INCRBY", "n1", "41"],
    &["DECR", "n1"],
    &["DECRBY", "n1", "2"],
    &["INCRBYFLOAT", "n2", "1.5"],
    &["GETEX", "n1", "PERSIST"],
    &["INCR", "s2"],
    &["GET", "missing"],
    &["INCR", "c1"],
    &["INCR", "c1"],
    &["GET", "c1"],
    &["APPEND", "c1", "0"],
    &["INCR", "c1"],
    &["DECRBY", "c1", "-5"],
    &["SET", "c1", "abc"],
    &["INCR", "c1"],
    &["GET", "c1"],
    &["INCR", "c2"],
    &["DEL", "c2"],
    &["GET", "c2"],
    &["INCRBY", "c3", "9223372036854775807"],
    &["INCR", "c3"],
    &["INCRBY", "c3", "x"],
    &["RPUSH", "c4", "a"],
    &["INCR", "c4"],
    &["GET", "c4"],
    &["INCR", "c5"],
    &["DECR", "c5"],
    &["EXISTS", "c5"],
    &["GET", "c5"],
    &["MGET", "c1", "c5", "nope", "s4"],
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn string_commands_answer_as_redis_does() {
    same_as_redis(&setup_with(false).await, STRING_SCRIPT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn string_commands_answer_as_redis_does_when_every_key_is_a_counter() {
    same_as_redis(&setup_with(true).await, STRING_SCRIPT).await;
}

const KEY_SCRIPT: &[&[&str]] = &[
    &["SET", "k", "v"],
    &["EXPIRE", "k", "100"],
    &["PERSIST", "k"],
    &["TTL", "k"],
    &["PEXPIRE", "k", "100000"],
    &["TYPE", "k"],
    &["EXPIREAT", "k", "4000000000"],
    &["TTL", "nokey"],
    &["HSET", "h", "a", "1", "b", "2"],
    &["HGET", "h", "a"],
    &["HINCRBY", "h", "a", "5"],
    &["HMGET", "h", "a", "b", "c"],
    &["HLEN", "h"],
    &["HDEL", "h", "b"],
    &["HGETALL", "h"],
    &["HEXISTS", "h", "a"],
    &["RPUSH", "l", "a", "b", "c"],
    &["LPUSH", "l", "z"],
    &["LRANGE", "l", "0", "-1"],
    &["LPOP", "l"],
    &["LLEN", "l"],
    &["LINDEX", "l", "1"],
    &["SADD", "set", "a", "b", "c"],
    &["SISMEMBER", "set", "b"],
    &["SREM", "set", "a"],
    &["SCARD", "set"],
    &["ZADD", "z", "1", "one", "2", "two"],
    &["ZINCRBY", "z", "5", "one"],
    &["ZRANGE", "z", "0", "-1", "WITHSCORES"],
    &["ZSCORE", "z", "two"],
    &["ZRANK", "z", "one"],
    &["ZCARD", "z"],
    &["TYPE", "z"],
    &["LPUSH", "k", "x"],
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_hash_list_set_and_zset_commands_answer_as_redis_does() {
    same_as_redis(&setup_with(false).await, KEY_SCRIPT).await;
    same_as_redis(&setup_with(true).await, KEY_SCRIPT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_sits_on_the_shard_the_ring_names() {
    let s = setup().await;
    let mut c = s.proxy.conn().await;
    for i in 0..200 {
        assert_eq!(c.cmd(&["SET", &format!("key:{i}"), "v"]).await, "+OK\r\n");
    }
    let shards = [&s.a, &s.b];
    let mut per = [0; 2];
    for i in 0..200 {
        let k = format!("key:{i}");
        let owner = ring_owner(&shards, &k);
        assert_eq!(holder(&shards, &k), vec![owner], "{k}");
        per[usize::from(owner == s.b.port)] += 1;
    }
    assert!(per[0] > 50 && per[1] > 50, "both shards hold keys: {per:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_tags_keep_keys_together() {
    let s = setup().await;
    let mut c = s.proxy.conn().await;
    for i in 0..50 {
        c.cmd(&["SET", &format!("{{user:7}}:field{i}"), "v"]).await;
    }
    let shards = [&s.a, &s.b];
    let owner = ring_owner(&shards, "user:7");
    for i in 0..50 {
        assert_eq!(
            holder(&shards, &format!("{{user:7}}:field{i}")),
            vec![owner]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_key_commands_split_by_shard_and_merge_in_order() {
    let s = setup().await;
    let mut c = s.proxy.conn().await;
    let keys: Vec<String> = (0..20).map(|i| format!("m:{i}")).collect();
    let mut mset = vec!["MSET"];
    let vals: Vec<String> = (0..20).map(|i| format!("v{i}")).collect();
    for (k, v) in keys.iter().zip(&vals) {
        mset.push(k);
        mset.push(v);
    }
    assert_eq!(c.cmd(&mset).await, "+OK\r\n");
    let shards = [&s.a, &s.b];
    let on_a = keys
        .iter()
        .filter(|k| ring_owner(&shards, k) == s.a.port)
        .count();
    assert!(on_a > 0 && on_a < 20, "keys span both shards");

    let mut mget = vec!["MGET"];
    mget.extend(keys.iter().map(|k| k.as_str()));
    mget.push("m:none");
    let mut want = format!("*{}\r\n", keys.len() + 1);
    for v in &vals {
        want.push_str(&format!("${}\r\n{}\r\n", v.len(), v));
    }
    want.push_str("$-1\r\n");
    assert_eq!(c.cmd(&mget).await, want);

    let mut exists = vec!["EXISTS"];
    exists.extend(keys.iter().map(|k| k.as_str()));
    exists.push("m:0"); // counted twice, as Redis does
    exists.push("m:none");
    assert_eq!(c.cmd(&exists).await, ":21\r\n");
    assert_eq!(c.cmd(&["TOUCH", "m:1", "m:2", "m:none"]).await, ":2\r\n");
    assert_eq!(c.cmd(&["UNLINK", "m:1", "m:2"]).await, ":2\r\n");
    let mut del = vec!["DEL"];
    del.extend(keys.iter().map(|k| k.as_str()));
    assert_eq!(c.cmd(&del).await, ":18\r\n");
    for k in &keys {
        assert!(holder(&shards, k).is_empty(), "{k} deleted on its shard");
    }
    assert_eq!(
        c.cmd(&["MSET", "a", "1", "b"]).await,
        "-ERR wrong number of arguments for 'mset' command\r\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_pipelined_commands_across_shards_come_back_in_order() {
    let s = setup().await;
    let mut c = s.proxy.conn().await;
    let n = 5000;
    let mut burst = Vec::new();
    for i in 0..n {
        burst.extend(encode(&["SET", &format!("p:{i}"), &i.to_string()]));
        burst.extend(encode(&["GET", &format!("p:{i}")]));
        burst.extend(encode(&["PING"]));
    }
    // Write everything before reading anything.
    c.send(&burst).await;
    for i in 0..n {
        assert_eq!(c.reply().await, "+OK\r\n");
        let v = i.to_string();
        assert_eq!(
            c.reply().await,
            format!("${}\r\n{}\r\n", v.len(), v),
            "reply {i}"
        );
        assert_eq!(c.reply().await, "+PONG\r\n");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_commands_are_answered_by_the_proxy() {
    let s = setup().await;
    let mut c = s.proxy.conn().await;
    assert_eq!(c.cmd(&["PING"]).await, "+PONG\r\n");
    assert_eq!(c.cmd(&["PING", "hi"]).await, "$2\r\nhi\r\n");
    assert_eq!(c.cmd(&["ECHO", "x y"]).await, "$3\r\nx y\r\n");
    assert_eq!(c.cmd(&["SELECT", "0"]).await, "+OK\r\n");
    assert_eq!(
        c.cmd(&["SELECT", "1"]).await,
        "-ERR DB index is out of range\r\n"
    );
    assert!(c
        .cmd(&["AUTH", "pw"])
        .await
        .starts_with("-ERR AUTH <password> called without any password configured"));
    assert_eq!(
        c.cmd(&["HELLO", "4"]).await,
        "-NOPROTO unsupported protocol version\r\n"
    );
    let hello = c.cmd(&["HELLO", "2", "SETNAME", "me"]).await;
    assert!(
        hello.starts_with("*14\r\n$6\r\nserver\r\n$5\r\nredis\r\n"),
        "{hello}"
    );
    assert_eq!(c.cmd(&["CLIENT", "GETNAME"]).await, "$2\r\nme\r\n");
    assert_eq!(c.cmd(&["CLIENT", "SETNAME", "conn1"]).await, "+OK\r\n");
    assert_eq!(c.cmd(&["CLIENT", "GETNAME"]).await, "$5\r\nconn1\r\n");
    assert!(c.cmd(&["CLIENT", "ID"]).await.starts_with(':'));
    assert_eq!(
        c.cmd(&["CLIENT", "SETINFO", "lib-name", "x"]).await,
        "+OK\r\n"
    );
    let count = c.cmd(&["COMMAND", "COUNT"]).await;
    let n: usize = count.trim_start_matches(':').trim().parse().unwrap();
    assert!(n > 100, "{count}");
    assert!(c.cmd(&["COMMAND"]).await.starts_with(&format!("*{n}\r\n")));
    assert_eq!(c.cmd(&["COMMAND", "DOCS"]).await, "*0\r\n");
    assert!(c.cmd(&["TIME"]).await.starts_with("*2\r\n"));
    assert_eq!(
        c.cmd(&["CONFIG", "GET", "save"]).await,
        "*2\r\n$4\r\nsave\r\n$0\r\n\r\n"
    );
    let info = c.cmd(&["INFO"]).await;
    for section in ["# Server", "# Clients", "# Stats", "# Shards", "# Counters"] {
        assert!(info.contains(section), "INFO has {section}");
    }
    assert!(info.contains("redis_version:"));
    c.cmd(&["SET", "d1", "1"]).await;
    c.cmd(&["SET", "d2", "1"]).await;
    let direct: i64 = [&s.a, &s.b]
        .iter()
        .map(|r| match r.cmd(&["DBSIZE"]) {
            redis::Value::Int(n) => n,
            v => panic!("{v:?}"),
        })
        .sum();
    assert_eq!(c.cmd(&["DBSIZE"]).await, format!(":{direct}\r\n"));
    assert_eq!(c.cmd(&["QUIT"]).await, "+OK\r\n");
    assert!(c.closed().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_unknown_commands_keep_the_connection_usable() {
    let s = setup().await;
    let mut c = s.proxy.conn().await;
    for cmd in [
        &["SWAPDB", "0", "1"][..],
        &["MULTI"],
        &["SUBSCRIBE", "ch"],
        &["BLPOP", "l", "0"],
        &["FUNCTION", "FLUSH"],
        &["MOVE", "k", "1"],
        &["CONFIG", "SET", "x", "y"],
    ] {
        let r = c.cmd(cmd).await;
        assert!(r.starts_with("-ERR"), "{cmd:?}: {r}");
    }
    assert_eq!(
        c.cmd(&["SWAPDB", "0", "1"]).await,
        "-ERR command 'swapdb' is not supported by tallyproxy: each shard has one database\r\n"
    );
    assert_eq!(
        c.cmd(&["FOO", "bar"]).await,
        "-ERR unknown command 'FOO', with args beginning with: 'bar' \r\n"
    );
    assert_eq!(
        c.cmd(&["GET"]).await,
        "-ERR wrong number of arguments for 'get' command\r\n"
    );
    assert_eq!(
        c.cmd(&["SET", "k"]).await,
        "-ERR wrong number of arguments for 'set' command\r\n"
    );
    assert_eq!(c.cmd(&["PING"]).await, "+PONG\r\n");
    // Inline commands work too.
    c.send(b"PING\r\n").await;
    assert_eq!(c.reply().await, "+PONG\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_a_protocol_error_and_the_connection_closes() {
    let s = setup().await;
    let cases: &[&[u8]] = &[
        b"*1\r\n*1\r\n$4\r\nPING\r\n",
        b"*x\r\n",
        b"*1\r\n$-2\r\n",
        b"*1\r\n$4\r\nPINGxx",
        b"*1\r\n$536870913\r\n",
        b"*999999999999\r\n",
        b"*1\r\n:1\r\n",
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$9999999999\r\n",
    ];
    for bytes in cases {
        let mut c = s.proxy.conn().await;
        c.send(bytes).await;
        let r = c.reply().await;
        assert!(
            r.starts_with("-ERR Protocol error: "),
            "{:?} -> {r}",
            String::from_utf8_lossy(bytes)
        );
        assert!(
            c.closed().await,
            "closed after {:?}",
            String::from_utf8_lossy(bytes)
        );
    }
    // A deeply nested array is refused at its first element: no recursion, no stack overflow.
    let mut c = s.proxy.conn().await;
    c.send(&b"*1\r\n".repeat(100_000)).await;
    assert_eq!(
        c.reply().await,
        "-ERR Protocol error: expected '$', got '*'\r\n"
    );
    // Other clients were never affected.
    let mut other = s.proxy.conn().await;
    assert_eq!(other.cmd(&["PING"]).await, "+PONG\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_length_claim_is_refused_without_waiting_for_the_bytes() {
    let s = setup().await;
    let mut c = s.proxy.conn().await;
    // 512 MiB is the default bulk limit (Redis's): a claim of 600 MiB is refused at the header.
    c.send(b"*2\r\n$3\r\nGET\r\n$629145600\r\nabc").await;
    let started = Instant::now();
    assert_eq!(
        c.reply().await,
        "-ERR Protocol error: invalid bulk length\r\n"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maxclients_refuses_with_redis_wording() {
    let (a, wal) = (Redis::start(), TempDir::new("wal"));
    let mut cfg = support::config(&[&a], &wal);
    cfg.maxclients = 2;
    let proxy = Proxy::start(cfg).await;
    // The start-up check's connection may still hold a slot for a moment: wait until two
    // clients are in.
    let mut c1 = proxy.conn().await;
    assert_eq!(c1.cmd(&["PING"]).await, "+PONG\r\n");
    let mut c2 = None;
    for _ in 0..100 {
        let mut c = proxy.conn().await;
        if c.cmd(&["PING"]).await == "+PONG\r\n" {
            c2 = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _c2 = c2.expect("a second client gets in");
    let mut c3 = proxy.conn().await;
    assert_eq!(c3.reply().await, "-ERR max number of clients reached\r\n");
    drop(c1);
    // The slot frees once the first client is gone.
    let mut ok = false;
    for _ in 0..50 {
        let mut c = proxy.conn().await;
        if c.cmd(&["PING"]).await == "+PONG\r\n" {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_shard_answers_an_error_in_time_and_the_other_shard_still_serves() {
    let mut s = setup().await;
    let shards = [&s.a, &s.b];
    let key_b = (0..)
        .map(|i| format!("k{i}"))
        .find(|k| ring_owner(&shards, k) == s.b.port)
        .unwrap();
    let key_a = (0..)
        .map(|i| format!("k{i}"))
        .find(|k| ring_owner(&shards, k) == s.a.port)
        .unwrap();
    let mut c = s.proxy.conn().await;
    assert_eq!(c.cmd(&["SET", &key_b, "1"]).await, "+OK\r\n");
    let b_name = format!("redis_{}", s.b.port);
    s.b.stop();
    let started = Instant::now();
    let r = c.cmd(&["GET", &key_b]).await;
    assert!(r.contains(&b_name), "{r}");
    assert!(r.starts_with('-'), "{r}");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "within the timeout"
    );
    assert_eq!(c.cmd(&["SET", &key_a, "1"]).await, "+OK\r\n");
    assert_eq!(c.cmd(&["GET", &key_a]).await, "$1\r\n1\r\n");
    // Once marked down (2 failed checks 100 ms apart), requests fail fast.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let started = Instant::now();
    assert_eq!(
        c.cmd(&["GET", &key_b]).await,
        format!("-TRYAGAIN shard {b_name} is unavailable\r\n")
    );
    assert!(started.elapsed() < Duration::from_millis(100));
    // And it comes back.
    s.b.restart();
    let mut back = false;
    for _ in 0..100 {
        if c.cmd(&["SET", &key_b, "2"]).await == "+OK\r\n" {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back, "the shard is served again after it returns");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_commands_and_returns() {
    let s = setup().await;
    let mut c = s.proxy.conn().await;
    let mut burst = Vec::new();
    for i in 0..1000 {
        burst.extend(encode(&["SET", &format!("sd:{i}"), "v"]));
    }
    c.send(&burst).await;
    assert_eq!(c.reply().await, "+OK\r\n");
    let started = Instant::now();
    let Setup { proxy, a, b, .. } = s;
    proxy.stop().await;
    assert!(started.elapsed() < Duration::from_secs(10));
    // Whatever the proxy answered before closing was answered in full; no half reply.
    for _ in 1..1000 {
        let r = c.reply().await;
        if r.starts_with("<closed>") {
            assert_eq!(r, "<closed>");
            break;
        }
        assert_eq!(r, "+OK\r\n");
    }
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_and_the_redis_crate_work_through_the_proxy() {
    let s = setup().await;
    let port = s.proxy.addr.port().to_string();
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &port, "SET", "cli", "42"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &port, "GET", "cli"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    let mut c = s.proxy.client().await;
    let v: i64 = redis::cmd("INCRBY")
        .arg("lib")
        .arg(5)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(v, 5);
    let (x, y): (Option<String>, Option<String>) = redis::pipe()
        .get("cli")
        .get("nothing")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!((x.as_deref(), y), (Some("42"), None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sees_its_own_write_to_a_counter_key_while_others_read_it() {
    let s = setup_with(true).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (stop, addr) = (stop.clone(), s.proxy.addr);
        tokio::spawn(async move {
            let mut c = Raw::connect(addr).await;
            let mut reads = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && reads < 200_000 {
                c.cmd(&["GET", "own"]).await;
                reads += 1;
            }
            reads
        })
    };
    let mut c = s.proxy.conn().await;
    for i in 0..300 {
        // Alternately a single-key and a split multi-key write.
        let mut burst = if i % 2 == 0 {
            encode(&["SET", "own", &i.to_string()])
        } else {
            encode(&["MSET", "own", &i.to_string(), "own:other", "x"])
        };
        burst.extend(encode(&["INCR", "own"]));
        c.send(&burst).await;
        assert_eq!(c.reply().await, "+OK\r\n");
        assert_eq!(c.reply().await, format!(":{}\r\n", i + 1), "iteration {i}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(reader.await.unwrap() > 0);
}
