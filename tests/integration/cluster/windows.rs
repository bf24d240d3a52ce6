//! Issue 16, test 5: time windows and `/visits` over the cluster: exact counts and ranges,
//! `served_via` naming the node, buckets in the counter's slot on its node, and all of it
//! following the slot when it moves.

use super::COUNTERS;
use crate::cluster_support::SERIAL;
use crate::support::cluster::{self, slot_of, Cluster, Pace};
use crate::support::{http_json, Proxy, TempDir};
use serde_json::Value;
use std::time::Duration;

use crate::support::int_reply as int;

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
        let b = tallyproxy::counter::window_store::window_hash(b"visits:home");
        assert_eq!(slot_of(&b), slot, "{}", String::from_utf8_lossy(&b));
        let by_node = cluster.keys_by_node();
        let buckets: Vec<&String> = by_node[&owner]
            .iter()
            .filter(|k| k.starts_with("tally:win:") && k.ends_with("visits:home"))
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

/// A window read while its slot migrates: the window hash is the one key the read declares
/// (the hashes of the layout before are named in ARGV), so the migrating node answers it
/// while it still holds the hash, and redirects it with `-ASK` once the hash has moved,
/// never `-TRYAGAIN` for hashes that do not exist. Exact counts at every stage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_read_while_its_slot_migrates_is_answered_at_every_stage() {
    let _serial = SERIAL.lock().await;
    let cluster = tokio::task::block_in_place(|| Cluster::start(3, 1));
    let wal = TempDir::new("cl-windows-migrating");
    let mut config = cluster::proxy_config(&cluster, &wal, "", COUNTERS);
    // Every read below goes to the cluster, not the cache.
    config.counters.cache_ttl = tallyproxy::config::HumanDuration(Duration::from_millis(50));
    let proxy = Proxy::start(config).await;
    let owner = tokio::task::block_in_place(|| cluster.node_for_key("visits:mig"));
    let new = *cluster.primaries().iter().find(|&&p| p != owner).unwrap();
    for _ in 0..3 {
        assert_eq!(proxy.http("POST", "/visits/mig").await.0, 200);
    }
    let (status, _) = http_json(proxy.http, "POST", "/admin/flush", "").await;
    assert_eq!(status, 200);
    let mut c = proxy.conn().await;
    let hash = tallyproxy::counter::window_store::window_hash(b"visits:mig");
    let hash = String::from_utf8(hash.to_vec()).unwrap();
    let mut read = async |stage: &str| {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let reply = c.cmd(&["TALLY.LAST", "visits:mig", "1h"]).await;
        assert_eq!(reply, ":3\r\n", "{stage}");
        let (s, v) = http_json(proxy.http, "GET", "/visits/mig?last=1h", "").await;
        assert_eq!(
            (s, v["visits"].clone()),
            (200, Value::from(3)),
            "{stage}: {v}"
        );
    };
    read("before the move").await;
    let m = tokio::task::block_in_place(|| cluster.begin_move(slot_of(b"visits:mig"), owner, new));
    read("slot migrating, the hash still on its old node").await;
    tokio::task::block_in_place(|| {
        let to = new.to_string();
        let migrate = ["MIGRATE", "127.0.0.1", &to, "", "0", "5000", "KEYS", &hash];
        assert_eq!(
            cluster::node_cmd(owner, &migrate),
            Ok(redis::Value::Okay),
            "the window hash alone moves"
        );
    });
    read("slot migrating, the hash on the new node (-ASK)").await;
    tokio::task::block_in_place(|| cluster.finish(&m));
    read("slot moved").await;
    tokio::task::block_in_place(|| {
        assert_eq!(cluster.sum_of("visits:mig"), 3);
        cluster.assert_no_key_on_two_nodes();
    });
    proxy.stop().await;
}
