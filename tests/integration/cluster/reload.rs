//! SIGHUP re-reads `[cluster] seeds` (`server::run_with_reload`, `Cluster::set_seeds`): a
//! proxy that knows only nodes which are all gone (its primaries and its one seed) finds the
//! cluster again through the seeds of its re-read config, and follows its map: forwarded
//! commands, counter reads and landings go to the new primaries.

use super::{admin_shards, wait_proxy_sees_primary, COUNTERS};
use crate::cluster_support::SERIAL;
use crate::support::cluster::Cluster;
use crate::support::{wait_until, ProxyProcess, Raw, TempDir};
use std::time::{Duration, Instant};
use tokio::task::block_in_place;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_new_seeds_finds_the_cluster_after_every_known_node_is_gone() {
    let _serial = SERIAL.lock().await;
    let mut cluster = block_in_place(|| Cluster::start(3, 1));
    let old = block_in_place(|| cluster.primaries());
    let seed = format!("127.0.0.1:{}", old[0]);
    let wal = TempDir::new("cl-reload");
    // One seed; no periodic look at the map: the proxy learns of a change only when a
    // command or a flush meets one.
    let proxy = block_in_place(|| {
        ProxyProcess::start_cluster(
            std::slice::from_ref(&seed),
            "refresh_interval = \"1h\"",
            &wal,
            COUNTERS,
            None,
        )
    });
    let mut c = Raw::connect(proxy.addr()).await;
    let keys: Vec<String> = (0..30).map(|i| format!("r:{i}")).collect();
    let mut owners: Vec<u16> =
        block_in_place(|| keys.iter().map(|k| cluster.node_for_key(k)).collect());
    owners.sort();
    owners.dedup();
    assert_eq!(owners, old, "the keys cover every primary");
    let first_owner = block_in_place(|| cluster.node_for_key(&keys[0]));
    for k in &keys {
        assert_eq!(c.cmd(&["SET", k, &format!("v-{k}")]).await, "+OK\r\n");
    }
    let counters: Vec<String> = (0..6).map(|i| format!("c:{i}")).collect();
    for (i, k) in counters.iter().enumerate() {
        assert_eq!(
            c.cmd(&["INCRBY", k, &(i + 1).to_string()]).await,
            format!(":{}\r\n", i + 1)
        );
    }
    let landed = block_in_place(|| {
        wait_until(Duration::from_secs(20), || {
            counters
                .iter()
                .enumerate()
                .all(|(i, k)| cluster.sum_of(k) == i as i64 + 1)
        })
    });
    assert!(landed, "the increments landed before the change");

    // Every primary replaced: its replica takes over (CLUSTER FAILOVER, in sync), then the
    // old primaries, now replicas, are stopped. Nothing goes through the proxy meanwhile.
    let new = block_in_place(|| {
        for &p in &old {
            let r = cluster.replicas_of(p)[0];
            cluster.failover(r);
        }
        for &p in &old {
            cluster.stop_node(p);
        }
        cluster.primaries()
    });
    assert!(new.iter().all(|p| !old.contains(p)), "{new:?} vs {old:?}");

    // Stuck: every node the proxy knows is gone, so a look at the map finds nothing.
    let stuck = c.cmd(&["GET", &keys[0]]).await;
    assert_eq!(
        stuck,
        format!("-TRYAGAIN shard redis_{} is unavailable\r\n", first_owner),
        "GET while the proxy knows no live node"
    );
    let started = Instant::now();
    loop {
        let shards = admin_shards(proxy_http(&proxy)).await;
        if shards["last_error"].is_string() {
            assert_eq!(
                shards["map_version"], 1,
                "no new map without a live seed: {shards}"
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the failed look at the map is not reported: {shards}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A config naming a live node, re-read on SIGHUP.
    proxy.edit_config(
        &format!("seeds = [\"{seed}\"]"),
        &format!("seeds = [\"127.0.0.1:{}\"]", new[0]),
    );
    proxy.signal("HUP");
    for &p in &new {
        wait_proxy_sees_primary(proxy_http(&proxy), p).await;
    }
    for k in &keys {
        assert_eq!(
            c.cmd(&["GET", k]).await,
            format!("${}\r\nv-{k}\r\n", k.len() + 2),
            "{k}"
        );
        assert_eq!(
            c.cmd(&["APPEND", k, "+"]).await,
            format!(":{}\r\n", k.len() + 3)
        );
    }
    // Counters: landings go to the new primaries' lanes.
    for (i, k) in counters.iter().enumerate() {
        assert_eq!(
            c.cmd(&["INCRBY", k, "10"]).await,
            format!(":{}\r\n", i + 11),
            "{k}"
        );
    }
    let landed = block_in_place(|| {
        wait_until(Duration::from_secs(20), || {
            counters
                .iter()
                .enumerate()
                .all(|(i, k)| cluster.sum_of(k) == i as i64 + 11)
        })
    });
    assert!(landed, "the increments landed on the new primaries");
    block_in_place(|| {
        for k in &keys {
            assert_eq!(cluster.value_of(k), Some(format!("v-{k}+")), "{k}");
        }
    });
}

fn proxy_http(p: &ProxyProcess) -> std::net::SocketAddr {
    format!("127.0.0.1:{}", p.http).parse().unwrap()
}
