//! Issue 16, test 1: steady state. Forwarded command groups (strings, hashes, lists, sets,
//! sorted sets, counters, hash-tag multi-key commands, errors) answer byte for byte what the
//! cluster answers a cluster client; multi-key commands spread over the nodes answer what one
//! standalone redis-server answers; the counting load lands exactly; `/admin/shards` lists
//! the nodes; the rebalance routes answer 409.

use super::{admin_shards, check, entry, start_load, stop_load, COUNTERS, PRIMARY, REPLICA};
use crate::cluster_support::SERIAL;
use crate::support::cluster::{self, Cluster};
use crate::support::{http_json, Proxy, Raw, Redis, TempDir};
use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

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
