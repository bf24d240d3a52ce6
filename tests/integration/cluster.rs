//! The proxy in front of a Redis Cluster (`[cluster] seeds`, issue 16): 3 primaries with a
//! replica each (`support::cluster`), concurrent pipelined INCRs through the proxy
//! (`support::load`), and each key checked against what its client saw acknowledged, on the
//! node that owns it: 0 lost, 0 doubled, no key on two nodes. In steady state (with replies
//! byte for byte against the cluster), while slots are resharded, through `CLUSTER
//! FAILOVER`, through `kill -9` of a primary with `wait_replicas = 1`, with the proxy killed
//! mid-reshard and restarted; and time windows and `/visits` over the cluster.

use crate::cluster_support::SERIAL;
use crate::support::cluster::{self, slot_of, Cluster, Pace};
use crate::support::load::{self, Load};
use crate::support::{http_json, Proxy, ProxyProcess, Raw, Redis, TempDir};
use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Counter keys in these tests: `c:*` (the load) and `visits:*` (the HTTP API); every
/// other key is forwarded to the cluster untouched.
const COUNTERS: &str = "[[counters.match]]\npattern = \"c:*\"\n\
                        [[counters.match]]\npattern = \"visits:*\"\n";

/// `role` of a node in `/admin/shards`.
const PRIMARY: &str = "primary";
const REPLICA: &str = "replica";

// ---------------------------------------------------------------------------------------
// Load and checks
// ---------------------------------------------------------------------------------------

/// The counting load, in the background until the flag is set: `clients` connections of
/// pipelines of 16 INCRs over their own 4 keys `<prefix>:<client>:<0..4>`.
fn start_load(
    addr: SocketAddr,
    prefix: &str,
    clients: usize,
) -> (Arc<AtomicBool>, tokio::task::JoinHandle<Load>) {
    let stop = Arc::new(AtomicBool::new(false));
    let spec = load::Spec {
        clients,
        depth: 16,
        prefix: prefix.to_string(),
        pause: Duration::from_millis(5),
        refused_rounds: None,
        limit: Duration::from_secs(60),
    };
    let task = tokio::spawn(load::pipelined(addr, spec, stop.clone()));
    (stop, task)
}

async fn stop_load(stop: Arc<AtomicBool>, task: tokio::task::JoinHandle<Load>) -> Load {
    stop.store(true, Ordering::Relaxed);
    task.await.unwrap()
}

/// The keys the load touches with `prefix` and `clients`.
fn load_keys(prefix: &str, clients: usize) -> Vec<String> {
    (0..clients)
        .flat_map(|c| (0..4).map(move |k| format!("{prefix}:{c}:{k}")))
        .collect()
}

/// Waits (bounded) for every acknowledged increment to land, read from the node that owns
/// each key, checking that nothing is ever doubled on the way; then asserts 0 lost, 0
/// doubled, and no key on two nodes.
fn check(cluster: &Cluster, load: &Load, when: &str) {
    let acked = load.acked();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (lost, doubled) = loop {
        let (lost, doubled) = load.lost_and_doubled(|k| cluster.sum_of(k));
        if doubled > 0 || lost == 0 || Instant::now() > deadline {
            break (lost, doubled);
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    eprintln!(
        "cluster, {when}: {acked} acknowledged over {} keys, {} refused, {} connections closed; lost {lost}, doubled {doubled}",
        load.keys.len(),
        load.refusals,
        load.closed
    );
    if (lost, doubled) != (0, 0) {
        let mut keys: Vec<_> = load.keys.iter().collect();
        keys.sort_by_key(|(k, _)| k.as_str());
        for (k, seen) in keys {
            let got = cluster.sum_of(k);
            if got < seen.acked || got > seen.sent {
                eprintln!(
                    "  {k} (slot {}, on {}): acknowledged {}, sent {}, landed {got}",
                    slot_of(k.as_bytes()),
                    cluster.node_for_key(k),
                    seen.acked,
                    seen.sent
                );
            }
        }
    }
    assert!(acked > 1000, "{when}: the load ran ({acked} acknowledged)");
    assert_eq!((lost, doubled), (0, 0), "{when}: (lost, doubled)");
    cluster.assert_no_key_on_two_nodes();
}

/// `/admin/shards` of the proxy whose sidecar is at `http`.
async fn admin_shards(http: SocketAddr) -> Value {
    let (status, body) = http_json(http, "GET", "/admin/shards", "").await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The node entry of `port` in `/admin/shards` (`nodes`, each named `redis_<port>`).
fn entry(shards: &Value, port: u16) -> Value {
    let name = format!("redis_{port}");
    shards["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("no node list: {shards}"))
        .iter()
        .find(|s| s["name"] == name.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("{name} not in {shards}"))
}

/// Waits (bounded) until `/admin/shards` says `port` is a primary.
async fn wait_proxy_sees_primary(http: SocketAddr, port: u16) {
    let start = Instant::now();
    loop {
        let (_, body) = http_json(http, "GET", "/admin/shards", "").await;
        if body["nodes"].as_array().is_some_and(|nodes| {
            nodes
                .iter()
                .any(|n| n["name"] == format!("redis_{port}").as_str() && n["role"] == PRIMARY)
        }) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the proxy does not see {port} as a primary: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Byte for byte
// ---------------------------------------------------------------------------------------

/// Raw connections to the cluster's nodes, following `-MOVED` (at most 3 times): what a
/// cluster-aware client sends, for the reference replies.
struct Direct {
    conns: HashMap<u16, Raw>,
    port: u16,
}

impl Direct {
    fn new(port: u16) -> Direct {
        Direct {
            conns: HashMap::new(),
            port,
        }
    }

    async fn cmd(&mut self, args: &[&str]) -> String {
        for _ in 0..3 {
            if !self.conns.contains_key(&self.port) {
                let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
                self.conns.insert(self.port, Raw::connect(addr).await);
            }
            let reply = self.conns.get_mut(&self.port).unwrap().cmd(args).await;
            match reply.strip_prefix("-MOVED ") {
                Some(rest) => {
                    let addr = rest.trim_end().split(' ').nth(1).unwrap();
                    self.port = addr.rsplit(':').next().unwrap().parse().unwrap();
                }
                None => return reply,
            }
        }
        panic!("{args:?}: too many redirections");
    }
}

/// Commands of one slot each (or of one hash tag), with keys under `p`: strings, hashes,
/// lists, sets, sorted sets, counters, hash-tag multi-key commands, and errors.
fn single_slot_script(p: &str) -> Vec<Vec<String>> {
    let k = |s: &str| format!("{p}{s}");
    let lines: Vec<Vec<String>> = vec![
        // strings
        vec!["SET".into(), k("s:a"), "hello".into()],
        vec!["GET".into(), k("s:a")],
        vec!["APPEND".into(), k("s:a"), " world".into()],
        vec!["STRLEN".into(), k("s:a")],
        vec!["GETRANGE".into(), k("s:a"), "0".into(), "4".into()],
        vec!["SETRANGE".into(), k("s:a"), "6".into(), "there".into()],
        vec!["GET".into(), k("s:a")],
        vec!["SETNX".into(), k("s:a"), "no".into()],
        vec!["INCRBYFLOAT".into(), k("s:f"), "1.5".into()],
        vec!["GETDEL".into(), k("s:f")],
        vec!["GET".into(), k("s:missing")],
        vec!["SET".into(), k("s:b"), "v".into(), "GET".into()],
        // hashes
        vec![
            "HSET".into(),
            k("h:a"),
            "f1".into(),
            "v1".into(),
            "f2".into(),
            "v2".into(),
        ],
        vec!["HGET".into(), k("h:a"), "f1".into()],
        vec![
            "HMGET".into(),
            k("h:a"),
            "f1".into(),
            "nope".into(),
            "f2".into(),
        ],
        vec!["HINCRBY".into(), k("h:a"), "n".into(), "5".into()],
        vec!["HGETALL".into(), k("h:a")],
        vec!["HDEL".into(), k("h:a"), "f2".into(), "nope".into()],
        vec!["HLEN".into(), k("h:a")],
        vec!["HEXISTS".into(), k("h:a"), "f1".into()],
        vec!["HINCRBYFLOAT".into(), k("h:a"), "x".into(), "0.25".into()],
        // lists
        vec![
            "RPUSH".into(),
            k("l:a"),
            "a".into(),
            "b".into(),
            "c".into(),
            "b".into(),
        ],
        vec!["LPUSH".into(), k("l:a"), "z".into()],
        vec!["LRANGE".into(), k("l:a"), "0".into(), "-1".into()],
        vec![
            "LPOS".into(),
            k("l:a"),
            "b".into(),
            "COUNT".into(),
            "0".into(),
        ],
        vec!["LINDEX".into(), k("l:a"), "-1".into()],
        vec!["LPOP".into(), k("l:a")],
        vec!["RPOP".into(), k("l:a"), "2".into()],
        vec!["LLEN".into(), k("l:a")],
        // sets
        vec![
            "SADD".into(),
            k("st:a"),
            "x".into(),
            "y".into(),
            "z".into(),
            "x".into(),
        ],
        vec!["SCARD".into(), k("st:a")],
        vec!["SISMEMBER".into(), k("st:a"), "y".into()],
        vec!["SMISMEMBER".into(), k("st:a"), "y".into(), "w".into()],
        vec!["SREM".into(), k("st:a"), "z".into()],
        vec!["SMEMBERS".into(), k("st:a")],
        // sorted sets
        vec![
            "ZADD".into(),
            k("z:a"),
            "1".into(),
            "a".into(),
            "2".into(),
            "b".into(),
            "3.5".into(),
            "c".into(),
        ],
        vec![
            "ZRANGE".into(),
            k("z:a"),
            "0".into(),
            "-1".into(),
            "WITHSCORES".into(),
        ],
        vec!["ZSCORE".into(), k("z:a"), "c".into()],
        vec!["ZINCRBY".into(), k("z:a"), "0.5".into(), "a".into()],
        vec!["ZRANK".into(), k("z:a"), "b".into()],
        vec!["ZRANGEBYSCORE".into(), k("z:a"), "(1".into(), "+inf".into()],
        vec!["ZREM".into(), k("z:a"), "b".into()],
        vec!["ZCARD".into(), k("z:a")],
        // counters (through the engine on the proxy, Redis's INCR directly)
        vec!["INCRBY".into(), format!("c:{p}n"), "5".into()],
        vec!["DECR".into(), format!("c:{p}n")],
        vec!["GET".into(), format!("c:{p}n")],
        // hash-tag multi-key commands: one slot, forwarded whole
        vec!["SADD".into(), k("{t}s1"), "a".into(), "b".into()],
        vec!["SADD".into(), k("{t}s2"), "b".into(), "c".into()],
        vec!["SINTER".into(), k("{t}s1"), k("{t}s2")],
        vec!["SUNIONSTORE".into(), k("{t}u"), k("{t}s1"), k("{t}s2")],
        vec!["SMOVE".into(), k("{t}s1"), k("{t}s2"), "a".into()],
        vec![
            "RPUSH".into(),
            k("{t}l1"),
            "1".into(),
            "2".into(),
            "3".into(),
        ],
        vec![
            "LMOVE".into(),
            k("{t}l1"),
            k("{t}l2"),
            "LEFT".into(),
            "RIGHT".into(),
        ],
        vec!["RPOPLPUSH".into(), k("{t}l1"), k("{t}l2")],
        vec!["LRANGE".into(), k("{t}l2"), "0".into(), "-1".into()],
        vec!["RENAME".into(), k("{t}l2"), k("{t}l3")],
        vec![
            "ZADD".into(),
            k("{t}z1"),
            "1".into(),
            "a".into(),
            "2".into(),
            "b".into(),
        ],
        vec!["ZADD".into(), k("{t}z2"), "5".into(), "b".into()],
        vec![
            "ZUNIONSTORE".into(),
            k("{t}zu"),
            "2".into(),
            k("{t}z1"),
            k("{t}z2"),
        ],
        vec![
            "ZRANGE".into(),
            k("{t}zu"),
            "0".into(),
            "-1".into(),
            "WITHSCORES".into(),
        ],
        vec!["MSET".into(), k("{t}a"), "1".into(), k("{t}b"), "2".into()],
        vec!["MGET".into(), k("{t}a"), k("{t}nope"), k("{t}b")],
        vec!["EXISTS".into(), k("{t}a"), k("{t}b"), k("{t}nope")],
        vec!["DEL".into(), k("{t}a"), k("{t}b")],
        // errors, in Redis's words
        vec!["LPUSH".into(), k("s:a"), "x".into()],
        vec!["HGET".into(), k("l:a"), "f".into()],
        vec!["INCR".into(), k("s:a")],
        vec!["ZADD".into(), k("z:a"), "x".into(), "a".into()],
    ];
    lines
}

/// Multi-key commands whose keys are spread over the nodes, with keys under `p`: split per
/// node by the proxy and merged in key order. The reference is one standalone redis-server.
fn cross_slot_script(p: &str) -> Vec<Vec<String>> {
    let keys: Vec<String> = (0..12).map(|i| format!("{p}m:{i}")).collect();
    let mut mset = vec!["MSET".to_string()];
    for (i, k) in keys.iter().enumerate() {
        mset.push(k.clone());
        mset.push(format!("v{i}"));
    }
    let with = |cmd: &str, ks: &[String]| {
        let mut v = vec![cmd.to_string()];
        v.extend(ks.iter().cloned());
        v
    };
    let mut some = keys[..6].to_vec();
    some.push(format!("{p}m:nope"));
    vec![
        mset,
        with("MGET", &keys),
        with("MGET", &some),
        with("EXISTS", &some),
        with("TOUCH", &some),
        with("DEL", &keys[..3]),
        with("UNLINK", &keys[3..5]),
        with("MGET", &keys),
        with("EXISTS", &keys),
    ]
}

async fn run_raw(c: &mut Raw, script: &[Vec<String>]) -> Vec<String> {
    let mut out = Vec::new();
    for line in script {
        let args: Vec<&str> = line.iter().map(String::as_str).collect();
        out.push(c.cmd(&args).await);
    }
    out
}

async fn run_direct(d: &mut Direct, script: &[Vec<String>]) -> Vec<String> {
    let mut out = Vec::new();
    for line in script {
        let args: Vec<&str> = line.iter().map(String::as_str).collect();
        out.push(d.cmd(&args).await);
    }
    out
}

fn assert_same(script: &[Vec<String>], proxy: &[String], direct: &[String], against: &str) {
    for (i, line) in script.iter().enumerate() {
        assert_eq!(
            proxy[i], direct[i],
            "{:?}: the proxy answers differently from {against}",
            line
        );
    }
}

// ---------------------------------------------------------------------------------------
// 1. Steady state
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_steady_state_replies_byte_for_byte_and_counts_exactly() {
    let _serial = SERIAL.lock().await;
    let cluster = tokio::task::block_in_place(|| Cluster::start(3, 1));
    let wal = TempDir::new("cl-steady");
    let proxy = Proxy::start(cluster::proxy_config(&cluster, &wal, "", COUNTERS)).await;

    // Single-slot groups: the proxy with keys under "p", the cluster directly under "d".
    let script = single_slot_script("p");
    let mut c = proxy.conn().await;
    let through = run_raw(&mut c, &script).await;
    let mut direct = Direct::new(cluster.primaries()[0]);
    let reference = run_direct(&mut direct, &single_slot_script("d")).await;
    assert_same(&script, &through, &reference, "the cluster");

    // Keys spread over the nodes: against one standalone redis-server.
    let standalone = Redis::start();
    let script = cross_slot_script("p");
    let through = run_raw(&mut c, &script).await;
    let mut s = Raw::connect(standalone.addr().parse().unwrap()).await;
    let reference = run_raw(&mut s, &script).await;
    assert_same(&script, &through, &reference, "a standalone redis-server");
    // ... and the keys went to their slots' nodes.
    let nodes: std::collections::HashSet<u16> = tokio::task::block_in_place(|| {
        (5..12)
            .map(|i| {
                let key = format!("pm:{i}");
                assert_eq!(cluster.value_of(&key), Some(format!("v{i}")), "{key}");
                cluster.node_for_key(&key)
            })
            .collect()
    });
    assert!(nodes.len() > 1, "the MSET spanned nodes");

    // The counting load.
    let (stop, task) = start_load(proxy.addr, "c:steady", 4);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let load = stop_load(stop, task).await;
    assert_eq!(load.refusals, 0, "nothing refused in steady state");
    tokio::task::block_in_place(|| check(&cluster, &load, "steady state"));

    // /admin/shards: every node, its role, the primaries' slot ranges, health.
    let shards = admin_shards(proxy.http).await;
    let view = tokio::task::block_in_place(|| cluster.view());
    assert_eq!(shards["nodes"].as_array().unwrap().len(), 6, "{shards}");
    for n in &view {
        let e = entry(&shards, n.port);
        assert_eq!(e["addr"], format!("127.0.0.1:{}", n.port).as_str(), "{e}");
        if n.primary {
            assert_eq!(e["health"], "up", "{e}");
            assert_eq!(e["role"], PRIMARY, "{e}");
            let ranges: Vec<Value> = n
                .slots
                .iter()
                .map(|&(a, b)| serde_json::json!([a, b]))
                .collect();
            assert_eq!(e["slots"], Value::Array(ranges), "{e}");
        } else {
            // The proxy sends nothing to replicas: their health is the cluster's word.
            assert_eq!(e["role"], REPLICA, "{e}");
            assert!(e["health"].is_string(), "{e}");
        }
    }
    // Resharding is the cluster's job: the rebalance routes say so.
    for (method, path, body) in [
        ("POST", "/admin/shards", r#"{"addr": "127.0.0.1:1"}"#),
        ("DELETE", "/admin/shards/redis_1", ""),
        ("POST", "/admin/rebalance/lost", r#"{"shard": "redis_1"}"#),
    ] {
        let (status, v) = http_json(proxy.http, method, path, body).await;
        assert_eq!(status, 409, "{method} {path}: {v}");
        let msg = v["error"].as_str().unwrap_or_default();
        assert!(
            msg.contains("redis-cli --cluster reshard"),
            "{method} {path}: {v}"
        );
    }
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------
// 2. Resharding under load
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_resharded_under_load_lose_and_double_nothing() {
    let _serial = SERIAL.lock().await;
    let cluster = tokio::task::block_in_place(|| Cluster::start(3, 1));
    let wal = TempDir::new("cl-reshard");
    let proxy = Proxy::start(cluster::proxy_config(&cluster, &wal, "", COUNTERS)).await;
    // "c:{hot}:<c>:<k>": eight keys in one slot (with the proxy's watermark for it);
    // "c:rs:<c>:<k>": sixteen keys spread over the nodes.
    let (stop_hot, hot) = start_load(proxy.addr, "c:{hot}", 2);
    let (stop_rs, rs) = start_load(proxy.addr, "c:rs", 4);
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::task::block_in_place(|| {
        let primaries = cluster.primaries();
        // The hot slot, two keys per MIGRATE, 100 ms between: a second or so half moved.
        let slot = slot_of(b"{hot}");
        let from = cluster.node_for_slot(slot);
        let to = *primaries.iter().find(|&&p| p != from).unwrap();
        let pace = Pace {
            batch: 2,
            pause: Duration::from_millis(100),
        };
        cluster.move_slots(&[slot], from, to, pace);
        // Every slot of the spread keys that `from` serves, one key at a time.
        let mut slots: Vec<u16> = load_keys("c:rs", 4)
            .iter()
            .map(|k| slot_of(k.as_bytes()))
            .filter(|&s| cluster.node_for_slot(s) == from)
            .collect();
        slots.sort();
        slots.dedup();
        assert!(!slots.is_empty(), "some spread keys are on {from}");
        let pace = Pace {
            batch: 1,
            pause: Duration::from_millis(20),
        };
        cluster.move_slots(&slots, from, to, pace);
        // A slot held half moved for a second under load, then finished.
        let slot = slot_of(b"{hot}");
        let m = cluster.begin_move(slot, to, from);
        cluster.step(&m, 3);
        std::thread::sleep(Duration::from_secs(1));
        cluster.finish(&m);
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut load = stop_load(stop_hot, hot).await;
    load.merge(stop_load(stop_rs, rs).await);
    tokio::task::block_in_place(|| check(&cluster, &load, "slots resharded under load"));
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------
// 3. Failover
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failover_under_load_loses_and_doubles_nothing() {
    let _serial = SERIAL.lock().await;
    let cluster = tokio::task::block_in_place(|| Cluster::start(3, 1));
    let wal = TempDir::new("cl-failover");
    let proxy = Proxy::start(cluster::proxy_config(&cluster, &wal, "", COUNTERS)).await;
    let (stop, task) = start_load(proxy.addr, "c:fo", 4);
    tokio::time::sleep(Duration::from_secs(1)).await;
    for primary in tokio::task::block_in_place(|| cluster.primaries())
        .into_iter()
        .take(2)
    {
        let replica = tokio::task::block_in_place(|| {
            let replica = cluster.replicas_of(primary)[0];
            cluster.failover(replica);
            replica
        });
        wait_proxy_sees_primary(proxy.http, replica).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let load = stop_load(stop, task).await;
    tokio::task::block_in_place(|| check(&cluster, &load, "CLUSTER FAILOVER under load"));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_of_a_cluster_primary_with_wait_replicas_loses_nothing_acknowledged() {
    let _serial = SERIAL.lock().await;
    let mut cluster = tokio::task::block_in_place(|| Cluster::start(3, 1));
    let wal = TempDir::new("cl-kill9");
    let keys = "wait_replicas = 1\nwait_timeout = \"200ms\"";
    let proxy = Proxy::start(cluster::proxy_config(&cluster, &wal, keys, COUNTERS)).await;
    let (stop, task) = start_load(proxy.addr, "c:k9", 4);
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The primary that owns the first load key: flushes to it are in flight when it dies.
    let victim = tokio::task::block_in_place(|| cluster.node_for_key("c:k9:0:0"));
    let new = tokio::task::block_in_place(|| cluster.kill9(victim));
    wait_proxy_sees_primary(proxy.http, new).await;
    // The old primary returns empty, as the new one's replica, so WAIT confirms again.
    tokio::task::block_in_place(|| cluster.restart(victim));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let load = stop_load(stop, task).await;
    tokio::task::block_in_place(|| {
        check(&cluster, &load, "kill -9 of a primary, wait_replicas = 1")
    });
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------
// 4. The proxy killed mid-reshard
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_killed_mid_reshard_and_restarted_loses_and_doubles_nothing() {
    let _serial = SERIAL.lock().await;
    let cluster = tokio::task::block_in_place(|| Cluster::start(3, 1));
    let wal = TempDir::new("cl-proxy-kill9");
    let start = || ProxyProcess::start_cluster(&cluster.seeds(), "", &wal, COUNTERS, None);
    let mut proxy = start();
    let (stop_hot, hot) = start_load(proxy.addr(), "c:{pk}", 2);
    let (stop_rs, rs) = start_load(proxy.addr(), "c:pk", 4);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let slot = slot_of(b"{pk}");
    let (from, to) = tokio::task::block_in_place(|| {
        let from = cluster.node_for_slot(slot);
        let to = *cluster.primaries().iter().find(|&&p| p != from).unwrap();
        (from, to)
    });
    let m = tokio::task::block_in_place(|| {
        let m = cluster.begin_move(slot, from, to);
        cluster.step(&m, 3);
        m
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // kill -9 with the slot half moved and increments in the log; the clients see their
    // connections close (what was unanswered counts as sent, not acknowledged).
    proxy.kill9();
    let mut load = stop_load(stop_hot, hot).await;
    load.merge(stop_load(stop_rs, rs).await);
    tokio::task::block_in_place(|| {
        cluster.step(&m, 2);
    });
    let proxy = start();
    let (stop_hot, hot) = start_load(proxy.addr(), "c:{pk}", 2);
    let (stop_rs, rs) = start_load(proxy.addr(), "c:pk", 4);
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::task::block_in_place(|| cluster.finish(&m));
    tokio::time::sleep(Duration::from_millis(500)).await;
    load.merge(stop_load(stop_hot, hot).await);
    load.merge(stop_load(stop_rs, rs).await);
    tokio::task::block_in_place(|| check(&cluster, &load, "proxy killed mid-reshard"));
}

// ---------------------------------------------------------------------------------------
// 5. Windows and /visits
// ---------------------------------------------------------------------------------------

fn int(reply: &str) -> i64 {
    reply
        .strip_prefix(':')
        .and_then(|r| r.strip_suffix("\r\n"))
        .unwrap_or_else(|| panic!("not an integer reply: {reply:?}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_and_visits_over_the_cluster_follow_the_slot() {
    use tallyproxy::clock::Clock;
    let _serial = SERIAL.lock().await;
    let cluster = tokio::task::block_in_place(|| Cluster::start(3, 1));
    let wal = TempDir::new("cl-windows");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // An hour boundary ahead of the real clock (Redis expires buckets by its own).
    let t0 = (now / 3600 + 2) * 3600;
    let clock = Clock::manual(t0 * 1000 + 500);
    let mut config = cluster::proxy_config(&cluster, &wal, "", COUNTERS);
    config.clock = clock.clone();
    // Reads go to the cluster after 100 ms, so that served_via names the node.
    config.counters.cache_ttl = tallyproxy::config::HumanDuration(Duration::from_millis(100));
    let proxy = Proxy::start(config).await;
    let owner = tokio::task::block_in_place(|| cluster.node_for_key("visits:home"));

    for _ in 0..3 {
        assert_eq!(proxy.http("POST", "/visits/home").await.0, 200);
    }
    let mut c = proxy.conn().await;
    for _ in 0..2 {
        assert!(c.cmd(&["INCR", "visits:home"]).await.starts_with(':'));
    }
    clock.advance(90);
    for _ in 0..2 {
        assert_eq!(proxy.http("POST", "/visits/home").await.0, 200);
    }
    let (status, _) = http_json(proxy.http, "POST", "/admin/flush", "").await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let via = format!("redis_{owner}");
    let (s, v) = http_json(proxy.http, "GET", "/visits/home", "").await;
    assert_eq!((s, v["visits"].clone()), (200, Value::from(7)), "{v}");
    assert_eq!(v["served_via"], via.as_str(), "{v}");
    let (s, v) = http_json(proxy.http, "GET", "/visits/home?last=60s", "").await;
    assert_eq!((s, v["visits"].clone()), (200, Value::from(2)), "{v}");
    assert_eq!(v["served_via"], via.as_str(), "{v}");
    assert_eq!(int(&c.cmd(&["TALLY.LAST", "visits:home", "1h"]).await), 7);
    let (from, to) = (t0.to_string(), (t0 + 60).to_string());
    assert_eq!(
        int(&c.cmd(&["TALLY.RANGE", "visits:home", &from, &to]).await),
        5
    );

    // The buckets live in the key's slot, on its node, beside the total.
    tokio::task::block_in_place(|| {
        assert_eq!(cluster.sum_of("visits:home"), 7);
        let slot = slot_of(b"visits:home");
        for g in 0..3 {
            let b = tallyproxy::counter::windows::bucket_key(b"visits:home", g, t0);
            assert_eq!(slot_of(&b), slot, "{}", String::from_utf8_lossy(&b));
        }
        let by_node = cluster.keys_by_node();
        let buckets: Vec<&String> = by_node[&owner]
            .iter()
            .filter(|k| k.starts_with("tally:w:") && k.ends_with("visits:home"))
            .collect();
        assert!(!buckets.is_empty(), "buckets on {owner}: {by_node:?}");
        cluster.assert_no_key_on_two_nodes();
    });

    // The slot moves: the total and its buckets go with it; the proxy follows.
    let new = tokio::task::block_in_place(|| {
        let new = *cluster.primaries().iter().find(|&&p| p != owner).unwrap();
        cluster.move_slots(&[slot_of(b"visits:home")], owner, new, Pace::default());
        new
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Counted either way: 200 with the total, or 202 when the read of its base met the
    // slot's move (accepted blind, logged, landed with the next flush).
    let posted = proxy.http("POST", "/visits/home").await.0;
    assert!(
        posted == 200 || posted == 202,
        "POST after the move: {posted}"
    );
    let (status, _) = http_json(proxy.http, "POST", "/admin/flush", "").await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (s, v) = http_json(proxy.http, "GET", "/visits/home", "").await;
    assert_eq!((s, v["visits"].clone()), (200, Value::from(8)), "{v}");
    assert_eq!(v["served_via"], format!("redis_{new}").as_str(), "{v}");
    let (s, v) = http_json(proxy.http, "GET", "/visits/home?last=60s", "").await;
    assert_eq!((s, v["visits"].clone()), (200, Value::from(3)), "{v}");
    assert_eq!(int(&c.cmd(&["TALLY.LAST", "visits:home", "1h"]).await), 8);
    tokio::task::block_in_place(|| {
        assert_eq!(cluster.sum_of("visits:home"), 8);
        cluster.assert_no_key_on_two_nodes();
    });
    proxy.stop().await;
}
