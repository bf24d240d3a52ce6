//! "Outgrowing two shards" (docs/operations.md), step by step on real servers: counts and
//! time windows on two `[[shards]]`, the final flush and an orderly stop, the old ring's
//! `tally:applied` deleted, each shard copied in with `redis-cli --cluster import
//! --cluster-copy`, and the proxy started again with `[cluster]` and a fresh log: every
//! count, window and other key is there, once, on the node that serves its slot.

use super::COUNTERS;
use crate::cluster_support::SERIAL;
use crate::support::cluster::{self, Cluster};
use crate::support::{self, http_json, Proxy, Redis, TempDir};
use serde_json::Value;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tallyproxy::clock::Clock;

use crate::support::int_reply as int;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_shards_imported_into_a_cluster_keep_every_count_and_window() {
    let _serial = SERIAL.lock().await;
    let (a, b) = (Redis::start(), Redis::start());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let t0 = (now / 3600 + 2) * 3600;
    let clock = Clock::manual(t0 * 1000 + 500);

    // 1. Counts on two shards: 40 counters, 5 windowed visits, a plain key.
    let wal = TempDir::new("cl-import-shards");
    let mut config = support::config(&[&a, &b], &wal);
    config.clock = clock.clone();
    let proxy = Proxy::start(config).await;
    let mut c = proxy.conn().await;
    for i in 0..40 {
        let r = c
            .cmd(&["INCRBY", &format!("c:{i}"), &(i + 1).to_string()])
            .await;
        assert_eq!(r, format!(":{}\r\n", i + 1));
    }
    for _ in 0..5 {
        assert_eq!(proxy.http("POST", "/visits/home").await.0, 200);
    }
    assert_eq!(c.cmd(&["SET", "plain:x", "hello"]).await, "+OK\r\n");

    // 2. The final flush, then the orderly stop (which flushes again: nothing is pending).
    let (status, body) = http_json(proxy.http, "POST", "/admin/flush", "").await;
    assert_eq!(status, 200, "{body}");
    drop(c);
    proxy.stop().await;

    // 3. The old ring's bookkeeping goes: the cluster mode keeps per-slot watermarks of its
    //    own. No rebalance ran, so there is no tombstone `tally:mv:*` to finish first.
    for shard in [&a, &b] {
        let applied: i64 = redis::cmd("DEL")
            .arg("tally:applied")
            .query(&mut shard.client())
            .unwrap();
        assert_eq!(applied, 1, "{} had the ring's watermark", shard.port);
        let left: Vec<String> = redis::cmd("KEYS")
            .arg("tally:mv:*")
            .query(&mut shard.client())
            .unwrap();
        assert!(left.is_empty(), "{left:?}");
    }

    // 4. Each shard copied into the cluster.
    let cluster = tokio::task::block_in_place(|| Cluster::start(3, 0));
    for shard in [&a, &b] {
        let out = Command::new("timeout")
            .args(["60", "redis-cli", "--cluster", "import"])
            .arg(cluster.seeds()[0].as_str())
            .args(["--cluster-from", &shard.addr(), "--cluster-copy"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "import of {}: {}{}",
            shard.port,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let keys = tokio::task::block_in_place(|| {
        for i in 0..40 {
            assert_eq!(cluster.sum_of(&format!("c:{i}")), i + 1, "c:{i}");
        }
        assert_eq!(cluster.sum_of("visits:home"), 5);
        assert_eq!(cluster.value_of("plain:x").as_deref(), Some("hello"));
        cluster.assert_no_key_on_two_nodes()
    });
    let on_shards: usize = [&a, &b]
        .iter()
        .map(|s| match s.cmd(&["DBSIZE"]) {
            redis::Value::Int(n) => n as usize,
            other => panic!("DBSIZE: {other:?}"),
        })
        .sum();
    assert_eq!(keys, on_shards, "every key of both shards, once");

    // 5. The proxy with [cluster] and a fresh log: the same counts, windows and keys.
    let wal = TempDir::new("cl-import-cluster");
    let mut config = cluster::proxy_config(&cluster, &wal, "", COUNTERS);
    config.clock = clock.clone();
    let proxy = Proxy::start(config).await;
    let mut c = proxy.conn().await;
    for i in 0..40 {
        let v = (i + 1).to_string();
        let want = format!("${}\r\n{v}\r\n", v.len());
        assert_eq!(c.cmd(&["GET", &format!("c:{i}")]).await, want, "c:{i}");
    }
    assert_eq!(int(&c.cmd(&["INCR", "c:0"]).await), 2);
    assert_eq!(c.cmd(&["GET", "plain:x"]).await, "$5\r\nhello\r\n");
    assert_eq!(int(&c.cmd(&["TALLY.LAST", "visits:home", "1h"]).await), 5);
    let owner = tokio::task::block_in_place(|| cluster.node_for_key("visits:home"));
    let (s, v) = http_json(proxy.http, "GET", "/visits/home?last=1h", "").await;
    assert_eq!((s, v["visits"].clone()), (200, Value::from(5)), "{v}");
    assert_eq!(v["served_via"], format!("redis_{owner}").as_str(), "{v}");
    let (status, body) = http_json(proxy.http, "POST", "/admin/flush", "").await;
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    tokio::task::block_in_place(|| {
        assert_eq!(cluster.sum_of("c:0"), 2);
        cluster.assert_no_key_on_two_nodes();
    });
    proxy.stop().await;
}
