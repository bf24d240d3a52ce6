//! Issue 16, tests 2-4: under the counting load, slots resharded (paced, and one held half
//! moved), `CLUSTER FAILOVER`, `kill -9` of a primary with `wait_replicas = 1`, and the proxy
//! killed mid-reshard and restarted: 0 lost, 0 doubled, no key on two nodes.

use super::{check, load_keys, start_load, stop_load, wait_proxy_sees_primary, COUNTERS};
use crate::cluster_support::SERIAL;
use crate::support::cluster::{self, slot_of, Cluster, Pace};
use crate::support::{Proxy, ProxyProcess, TempDir};
use std::time::Duration;

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
// 4. The proxy stopped mid-reshard and started again
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_killed_mid_reshard_and_restarted_loses_and_doubles_nothing() {
    restarted_mid_reshard(Stop::Kill9).await;
}

/// The same with an orderly stop (SIGTERM: final flush, nothing left to replay), which tells
/// a fault of the restart with a half-moved slot from one of the log's replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_stopped_mid_reshard_and_restarted_loses_and_doubles_nothing() {
    restarted_mid_reshard(Stop::Term).await;
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Stop {
    Kill9,
    Term,
}

/// Load on a slot of eight keys and on keys spread over the nodes; the slot half moved
/// (`MIGRATING`/`IMPORTING`, some keys on each node); the proxy stopped (`how`); two more
/// keys moved while it is down; the proxy started again on the same log, the load again,
/// the move finished under it; then every key checked.
async fn restarted_mid_reshard(how: Stop) {
    let _serial = SERIAL.lock().await;
    let cluster = tokio::task::block_in_place(|| Cluster::start(3, 1));
    let wal = TempDir::new("cl-proxy-restart");
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
    // With kill -9, increments are in the log; either way the clients see their connections
    // close (what was unanswered counts as sent, not acknowledged).
    match how {
        Stop::Kill9 => proxy.kill9(),
        Stop::Term => proxy.terminate(),
    }
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
    let when = format!("proxy stopped ({how:?}) mid-reshard and restarted");
    tokio::task::block_in_place(|| check(&cluster, &load, &when));
}
