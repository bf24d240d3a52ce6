//! RESP3 per client connection: after `HELLO 3` a client gets, byte for byte, what Redis 7
//! sends a RESP3 client (maps, sets, doubles, `_` nulls), for forwarded, merged and local
//! replies; a client that never says HELLO, or goes back with `HELLO 2` or RESET, gets
//! RESP2 exactly as before.
//!
//! Most tests run the same commands on the proxy (two shards) and on a redis-server of its
//! own, and compare the raw replies.

use crate::support::{self, ring_owner, Proxy, Raw, Redis, TempDir};
use std::net::SocketAddr;

/// Two shards behind a proxy, and a server on its own to compare with.
struct Setup {
    shards: [Redis; 2],
    direct: Redis,
    proxy: Proxy,
    _wal: TempDir,
}

impl Setup {
    async fn start(tag: &str) -> Setup {
        let shards = [Redis::start(), Redis::start()];
        let direct = Redis::start();
        let wal = TempDir::new(tag);
        let proxy = Proxy::start(support::config(&[&shards[0], &shards[1]], &wal)).await;
        Setup {
            shards,
            direct,
            proxy,
            _wal: wal,
        }
    }

    fn direct_addr(&self) -> SocketAddr {
        self.direct.addr().parse().unwrap()
    }

    /// A key owned by shard `i`, starting with `prefix`.
    fn key_on(&self, i: usize, prefix: &str) -> String {
        let shards = [&self.shards[0], &self.shards[1]];
        (0..)
            .map(|n| format!("{prefix}{n}"))
            .find(|k| ring_owner(&shards, k) == self.shards[i].port)
            .unwrap()
    }

    /// A RESP3 connection to the proxy and one to the direct server.
    async fn resp3_pair(&self) -> (Raw, Raw) {
        (
            resp3(self.proxy.addr).await,
            resp3(self.direct_addr()).await,
        )
    }
}

/// A connection that said `HELLO 3`.
async fn resp3(addr: SocketAddr) -> Raw {
    let mut c = Raw::connect(addr).await;
    let hello = c.cmd(&["HELLO", "3"]).await;
    assert!(hello.starts_with("%7\r\n$6\r\nserver\r\n"), "{hello}");
    c
}

/// Runs each command on both connections and asserts the same reply bytes.
async fn same(proxy: &mut Raw, direct: &mut Raw, cmds: &[&[&str]]) {
    for cmd in cmds {
        let (p, d) = (proxy.cmd(cmd).await, direct.cmd(cmd).await);
        assert_eq!(p, d, "{cmd:?}");
    }
}

/// HELLO's map with the fields that legitimately differ (version, id) blanked.
fn hello_shape(reply: &str) -> Vec<String> {
    let mut lines: Vec<String> = reply.split("\r\n").map(str::to_string).collect();
    for i in [7, 8, 14] {
        lines[i] = "?".into();
    }
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_replies_are_redis_resp3_bytes_for_every_family() {
    let s = Setup::start("resp3-forward").await;
    let (mut p, mut d) = s.resp3_pair().await;
    same(
        &mut p,
        &mut d,
        &[
            // Connection.
            &["PING"],
            &["PING", "hi"],
            &["ECHO", "x y"],
            // Strings and nulls.
            &["SET", "str", "hello"],
            &["GET", "str"],
            &["GET", "nope"],
            &["GET", "nope"],
            &["APPEND", "str", "!"],
            &["STRLEN", "str"],
            &["GETRANGE", "str", "0", "2"],
            &["SET", "str", "v2", "GET"],
            &["SET", "fl", "1.5"],
            &["INCRBYFLOAT", "fl", "2.25"],
            &["GETDEL", "nope"],
            // Keys.
            &["EXISTS", "str"],
            &["TYPE", "str"],
            &["TTL", "str"],
            &["EXPIRE", "str", "100"],
            &["PERSIST", "str"],
            // Hashes: a map.
            &["HSET", "h", "a", "1", "b", "2"],
            &["HGETALL", "h"],
            &["HGETALL", "nope"],
            &["HGET", "h", "a"],
            &["HGET", "h", "nope"],
            &["HMGET", "h", "a", "nope"],
            &["HINCRBYFLOAT", "h", "a", "0.5"],
            &["HRANDFIELD", "nope"],
            // Lists.
            &["RPUSH", "l", "a", "b", "c"],
            &["LRANGE", "l", "0", "-1"],
            &["LPOS", "l", "x"],
            &["LPOP", "l"],
            &["LPOP", "nope"],
            &["LPOP", "nope", "2"],
            // Sets (an intset, so that the order is the same on both servers): a set.
            &["SADD", "s", "3", "1", "2"],
            &["SMEMBERS", "s"],
            &["SISMEMBER", "s", "1"],
            &["SMISMEMBER", "s", "1", "9"],
            &["SPOP", "nope"],
            // Sorted sets: doubles.
            &["ZADD", "z", "1.5", "a", "2", "b"],
            &["ZSCORE", "z", "a"],
            &["ZSCORE", "z", "nope"],
            &["ZMSCORE", "z", "a", "nope"],
            &["ZINCRBY", "z", "1", "a"],
            &["ZRANGE", "z", "0", "-1", "WITHSCORES"],
            &["ZRANGE", "z", "0", "-1"],
            &["ZRANK", "z", "nope"],
            &["ZPOPMIN", "nope"],
            &["ZADD", "z", "INCR", "inf", "b"],
            &["ZSCORE", "z", "b"],
            // HyperLogLog.
            &["PFADD", "hll", "a", "b", "c"],
            &["PFADD", "hll", "a"],
            &["GET", "hll"],
            // Errors.
            &["HGETALL", "str"],
            &["INCR", "str"],
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_and_split_commands_keep_resp3_types() {
    let s = Setup::start("resp3-split").await;
    let (a1, a2) = (s.key_on(0, "a"), s.key_on(0, "aa"));
    let (b1, b2) = (s.key_on(1, "b"), s.key_on(1, "bb"));
    let (mut p, mut d) = s.resp3_pair().await;
    same(
        &mut p,
        &mut d,
        &[
            // Counters: buffered in the proxy, read from its cache.
            &["INCR", "c"],
            &["INCRBY", "c", "10"],
            &["DECRBY", "c", "3"],
            &["DECR", "c"],
            &["GET", "c"],
            &["GET", "c"],
            // Split across both shards; MGET's nulls are `_`, from a shard or the cache.
            &["MSET", &a1, "1", &b1, "2"],
            &["MGET", &a1, &b1, &a2, &b2],
            &["GET", &a2],
            &["MGET", &a2, "c", &b2, &a1],
            &["EXISTS", &a1, &b1, &a2, &b1],
            &["TOUCH", &a1, &b1],
            &["INCR", &b2],
            &["MGET", &b2, &a2],
            &["DEL", &a1, &b1, &a2],
            &["UNLINK", &b2, "c"],
            &["MGET", &a1, &b1, &b2, "c"],
        ],
    )
    .await;
    // The increments reach the shards in RESP2 as before.
    s.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_replies_follow_redis_7_in_resp3() {
    let s = Setup::start("resp3-local").await;
    let (mut p, mut d) = s.resp3_pair().await;
    same(
        &mut p,
        &mut d,
        &[
            &["CONFIG", "GET", "save"],
            &["CONFIG", "GET", "maxmemory"],
            &["CONFIG", "GET", "appendonly"],
            &["CONFIG", "GET", "nothing-like-this"],
            &["CLIENT", "GETNAME"],
            &["COMMAND", "INFO", "no-such-command"],
            &["SELECT", "0"],
            &["HELLO", "4"],
            &["HELLO", "x"],
            &["HELLO", "3", "SETNAME", "a b"],
            &["HELLO", "3", "SETNAME"],
            &["HELLO", "3", "AUTH", "nobody", "pw"],
            &["CLIENT", "SETNAME", "me"],
            &["CLIENT", "GETNAME"],
        ],
    )
    .await;
    // Where the value differs (ids, versions, text), the type and shape are Redis's.
    let (hp, hd) = (p.cmd(&["HELLO"]).await, d.cmd(&["HELLO"]).await);
    assert_eq!(hello_shape(&hp), hello_shape(&hd), "{hp}\n{hd}");
    let (hp, hd) = (
        p.cmd(&["HELLO", "3", "AUTH", "default", "x", "SETNAME", "n"])
            .await,
        d.cmd(&["HELLO", "3", "AUTH", "default", "x", "SETNAME", "n"])
            .await,
    );
    assert_eq!(hello_shape(&hp), hello_shape(&hd), "{hp}\n{hd}");
    same(&mut p, &mut d, &[&["CLIENT", "GETNAME"]]).await;
    for info in [&["INFO"][..], &["INFO", "server"]] {
        let r = p.cmd(info).await;
        let len: usize = r[1..r.find("\r\n").unwrap()].parse().unwrap();
        assert!(r.starts_with('=') && r.contains("\r\ntxt:# "), "{r}");
        assert_eq!(r.len(), len + r.find("\r\n").unwrap() + 4, "{r}");
        assert!(d.cmd(info).await.starts_with('='));
    }
    let info = p.cmd(&["CLIENT", "INFO"]).await;
    assert!(info.starts_with('=') && info.contains("txt:id="), "{info}");
    assert!(d.cmd(&["CLIENT", "INFO"]).await.contains("txt:id="));
    // COMMAND entries: Redis 7.0's ten fields, flags and the rest as sets.
    let entry = p.cmd(&["COMMAND", "INFO", "get"]).await;
    assert_eq!(
        entry,
        "*1\r\n*10\r\n$3\r\nget\r\n:2\r\n~0\r\n:1\r\n:1\r\n:1\r\n~0\r\n~0\r\n~0\r\n~0\r\n"
    );
    assert!(d
        .cmd(&["COMMAND", "INFO", "get"])
        .await
        .starts_with("*1\r\n*10\r\n$3\r\nget\r\n:2\r\n~2\r\n"));
    assert_eq!(p.cmd(&["COMMAND", "DOCS"]).await, "%0\r\n");
    assert!(d
        .cmd(&["COMMAND", "DOCS", "get"])
        .await
        .starts_with("%1\r\n"));
    let all = p.cmd(&["COMMAND"]).await;
    assert!(all.starts_with('*') && all.contains("~0\r\n"), "{all}");
    let time = p.cmd(&["TIME"]).await;
    assert!(time.starts_with("*2\r\n$"), "{time}");
    assert!(p
        .cmd(&["CLIENT", "TRACKING", "on"])
        .await
        .starts_with("-ERR CLIENT TRACKING is not supported by tallyproxy: "));
    assert!(p.cmd(&["SSUBSCRIBE", "ch"]).await.starts_with("-ERR"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tally_queries_answer_the_same_in_both_protocols() {
    let s = Setup::start("resp3-tally").await;
    let mut r2 = s.proxy.conn().await;
    let mut r3 = resp3(s.proxy.addr).await;
    for _ in 0..3 {
        assert!(r3.cmd(&["INCR", "visits:home"]).await.starts_with(':'));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let (from, to) = ((now - 2).to_string(), (now + 2).to_string());
    for cmd in [
        &["TALLY.LAST", "visits:home", "1h"][..],
        &["TALLY.RANGE", "visits:home", &from, &to],
        &["TALLY.SERIES", "visits:home", &from, &to, "1"],
        &["TALLY.LAST", "plain", "1h"],
    ] {
        let (a, b) = (r2.cmd(cmd).await, r3.cmd(cmd).await);
        assert_eq!(a, b, "{cmd:?}");
    }
    let series = r3
        .cmd(&["TALLY.SERIES", "visits:home", &from, &to, "1"])
        .await;
    assert!(series.starts_with("*4\r\n*2\r\n:"), "{series}");
    assert_eq!(r3.cmd(&["TALLY.LAST", "visits:home", "1h"]).await, ":3\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp2_clients_are_unchanged_and_hello_2_or_reset_goes_back() {
    let s = Setup::start("resp3-back").await;
    let direct = s.direct_addr();
    let resp2_cmds: &[&[&str]] = &[
        &["HSET", "h", "a", "1"],
        &["ZADD", "z", "1.5", "a"],
        &["HGETALL", "h"],
        &["ZSCORE", "z", "a"],
        &["GET", "nope"],
        &["MGET", "nope", "h"],
        &["CONFIG", "GET", "save"],
        &["CLIENT", "GETNAME"],
        &["HELLO", "4"],
    ];
    let (mut p, mut d) = (s.proxy.conn().await, Raw::connect(direct).await);
    same(&mut p, &mut d, resp2_cmds).await;
    let hello = p.cmd(&["HELLO"]).await;
    assert!(hello.starts_with("*14\r\n"), "{hello}");
    assert!(hello.contains("$5\r\nproto\r\n:2\r\n"), "{hello}");
    // HELLO 3 then HELLO 2: RESP2 again.
    let (mut p, mut d) = s.resp3_pair().await;
    same(&mut p, &mut d, &[&["HGETALL", "h"], &["GET", "nope"]]).await;
    let (hp, hd) = (p.cmd(&["HELLO", "2"]).await, d.cmd(&["HELLO", "2"]).await);
    assert!(hp.starts_with("*14\r\n"), "{hp}");
    assert_eq!(hello_shape(&hp), hello_shape(&hd));
    same(&mut p, &mut d, resp2_cmds).await;
    // RESET too.
    let (mut p, mut d) = s.resp3_pair().await;
    same(
        &mut p,
        &mut d,
        &[&["RESET"], &["GET", "nope"], &["HGETALL", "h"]],
    )
    .await;
    assert_eq!(p.cmd(&["GET", "nope"]).await, "$-1\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_switch_keeps_order_and_protocol() {
    let s = Setup::start("resp3-pipe").await;
    let k = s.key_on(1, "p");
    for addr in [s.proxy.addr, s.direct_addr()] {
        let mut c = Raw::connect(addr).await;
        let mut burst = Vec::new();
        for cmd in [
            &["DEL", "h"][..],
            &["HSET", "h", "a", "1"],
            &["GET", "nope"],
            &["SET", &k, "x"],
            &["HELLO", "3"],
            &["GET", &k],
            &["HGETALL", "h"],
            &["GET", "nope"],
            &["HELLO", "2"],
            &["GET", "nope"],
        ] {
            burst.extend(support::encode(cmd));
        }
        c.send(&burst).await;
        let mut replies = Vec::new();
        for _ in 0..10 {
            replies.push(c.reply().await);
        }
        assert_eq!(replies[2], "$-1\r\n");
        assert!(replies[4].starts_with("%7\r\n"), "{replies:?}");
        assert_eq!(replies[5], "$1\r\nx\r\n");
        assert_eq!(replies[6], "%1\r\n$1\r\na\r\n$1\r\n1\r\n");
        assert_eq!(replies[7], "_\r\n");
        assert!(replies[8].starts_with("*14\r\n"), "{replies:?}");
        assert_eq!(replies[9], "$-1\r\n");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_crate_in_resp3_mode_gets_what_redis_gives_it() {
    use redis::AsyncCommands;
    let s = Setup::start("resp3-crate").await;
    let open = |url: String| async move {
        redis::Client::open(format!("{url}?protocol=resp3"))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    };
    let mut p = open(s.proxy.url()).await;
    let mut d = open(format!("redis://{}/", s.direct.addr())).await;
    for c in [&mut p, &mut d] {
        let _: () = c
            .hset_multiple("h", &[("a", "1"), ("b", "2")])
            .await
            .unwrap();
    }
    for args in [
        &["INCR", "c"][..],
        &["INCR", "c"],
        &["GET", "c"],
        &["GET", "nope"],
        &["HGETALL", "h"],
        &["MGET", "c", "nope", "h2"],
    ] {
        let mut cmd = redis::cmd(args[0]);
        cmd.arg(&args[1..]);
        let a: redis::Value = cmd.query_async(&mut p).await.unwrap();
        let b: redis::Value = cmd.query_async(&mut d).await.unwrap();
        assert_eq!(a, b, "{args:?}");
    }
    let h: redis::Value = redis::cmd("HGETALL")
        .arg("h")
        .query_async(&mut p)
        .await
        .unwrap();
    assert!(
        matches!(h, redis::Value::Map(ref m) if m.len() == 2),
        "{h:?}"
    );
    let v: i64 = p.get("c").await.unwrap();
    assert_eq!(v, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_3_authenticates_and_resp3_shard_connections_authenticate_too() {
    let shard = Redis::start_with(&["--requirepass", "shardpw"]);
    let wal = TempDir::new("resp3-auth");
    let toml = format!(
        "listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\nrequirepass = \"sesame\"\n\
         [[shards]]\naddr = \"{}\"\npassword = \"shardpw\"\n[durability]\nwal_dir = \"{}\"\n",
        shard.addr(),
        wal.path().display()
    );
    let proxy = Proxy::start(tallyproxy::Config::from_toml_str(&toml).unwrap()).await;
    let mut c = proxy.conn().await;
    assert!(c
        .cmd(&["HELLO", "3"])
        .await
        .starts_with("-NOAUTH HELLO must be called"));
    assert_eq!(
        c.cmd(&["HELLO", "3", "AUTH", "default", "wrong", "SETNAME", "x"])
            .await,
        "-WRONGPASS invalid username-password pair or user is disabled.\r\n"
    );
    // Nothing changed: still RESP2, unauthenticated, unnamed.
    assert!(c.cmd(&["GET", "k"]).await.starts_with("-NOAUTH"));
    let hello = c
        .cmd(&["HELLO", "3", "AUTH", "default", "sesame", "SETNAME", "x"])
        .await;
    assert!(hello.starts_with("%7\r\n"), "{hello}");
    assert!(hello.contains("$5\r\nproto\r\n:3\r\n"), "{hello}");
    assert_eq!(c.cmd(&["CLIENT", "GETNAME"]).await, "$1\r\nx\r\n");
    assert_eq!(c.cmd(&["HSET", "h", "f", "v"]).await, ":1\r\n");
    assert_eq!(
        c.cmd(&["HGETALL", "h"]).await,
        "%1\r\n$1\r\nf\r\n$1\r\nv\r\n"
    );
    assert_eq!(c.cmd(&["GET", "nope"]).await, "_\r\n");
    // RESET: RESP2 and unauthenticated again.
    assert_eq!(c.cmd(&["RESET"]).await, "+RESET\r\n");
    assert!(c.cmd(&["GET", "nope"]).await.starts_with("-NOAUTH"));
    assert_eq!(c.cmd(&["AUTH", "sesame"]).await, "+OK\r\n");
    assert_eq!(
        c.cmd(&["HGETALL", "h"]).await,
        "*2\r\n$1\r\nf\r\n$1\r\nv\r\n"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_mode_answers_resp3_clients_in_resp3() {
    let wal = TempDir::new("resp3-memory");
    let proxy = Proxy::start(support::config(&[], &wal)).await;
    let mut c = resp3(proxy.addr).await;
    assert_eq!(c.cmd(&["INCRBY", "a", "5"]).await, ":5\r\n");
    assert_eq!(c.cmd(&["GET", "a"]).await, "$1\r\n5\r\n");
    assert_eq!(c.cmd(&["GET", "nope"]).await, "_\r\n");
    assert_eq!(
        c.cmd(&["MGET", "a", "nope"]).await,
        "*2\r\n$1\r\n5\r\n_\r\n"
    );
    let mut r2 = proxy.conn().await;
    assert_eq!(
        r2.cmd(&["MGET", "a", "nope"]).await,
        "*2\r\n$1\r\n5\r\n$-1\r\n"
    );
    proxy.stop().await;
}

/// Runs `redis-cli -3` (and `redis-benchmark -3`) as users do: one-shot commands and a
/// script on stdin give the same output through the proxy as straight at a Redis.
fn cli3(port: u16, args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("redis-cli")
        .args(["-3", "-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("redis-cli runs");
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_and_redis_benchmark_in_resp3_mode_work_through_the_proxy() {
    let (a, b, direct) = (Redis::start(), Redis::start(), Redis::start());
    let wal = TempDir::new("cli3");
    let proxy = Proxy::start(support::config(&[&a, &b], &wal)).await;
    let port = proxy.addr.port();
    let setup: &[&[&str]] = &[
        &["HSET", "{h}cli", "a", "1", "b", "2"],
        &["SADD", "{s}cli", "x"],
        &["ZADD", "{z}cli", "1.5", "m"],
        &["SET", "plain", "v"],
    ];
    for cmd in setup {
        cli3(port, cmd, None);
        cli3(direct.port, cmd, None);
    }
    // One-shot: maps print as `field value` lines in RESP3 (`field\nvalue` in RESP2).
    for cmd in [
        &["HGETALL", "{h}cli"][..],
        &["SMEMBERS", "{s}cli"],
        &["ZSCORE", "{z}cli", "m"],
        &["GET", "missing"],
        &["INCR", "cli:counter"],
        &["MGET", "plain", "missing", "cli:counter"],
    ] {
        assert_eq!(
            cli3(port, cmd, None),
            cli3(direct.port, cmd, None),
            "{cmd:?}"
        );
    }
    assert_eq!(cli3(port, &["HGETALL", "{h}cli"], None), "a 1\nb 2\n");
    // Commands on stdin, as a script or an interactive session's lines.
    let script = "INCR cli:counter\nGET cli:counter\nHGETALL {h}cli\nGET missing\nHELLO 3\n";
    let through = cli3(port, &[], Some(script));
    let straight = cli3(direct.port, &[], Some(script));
    let strip = |s: &str| -> Vec<String> {
        // HELLO's id and version differ between the two servers.
        s.lines()
            .filter(|l| !l.starts_with("id ") && !l.starts_with("version "))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(strip(&through), strip(&straight));
    assert!(through.contains("proto 3"), "{through}");
    // redis-benchmark -3: runs, and every increment counts.
    let out = std::process::Command::new("redis-benchmark")
        .args(["-3", "-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-t", "incr,get", "-n", "2000", "-c", "10", "-P", "4", "-q"])
        .output()
        .expect("redis-benchmark runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("INCR:") && text.contains("GET:"), "{text}");
    assert_eq!(
        cli3(port, &["GET", "counter:__rand_int__"], None),
        "2000\n",
        "every INCR of the benchmark counted"
    );
    proxy.stop().await;
}
