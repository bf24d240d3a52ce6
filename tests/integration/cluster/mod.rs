//! The proxy in front of a Redis Cluster (`[cluster] seeds`, issue 16): 3 primaries with a
//! replica each (`support::cluster`), concurrent pipelined INCRs through the proxy
//! (`support::load`), and each key checked against what its client saw acknowledged, on the
//! node that owns it: 0 lost, 0 doubled, no key on two nodes. In steady state (with replies
//! byte for byte against the cluster), while slots are resharded, through `CLUSTER
//! FAILOVER`, through `kill -9` of a primary with `wait_replicas = 1`, with the proxy killed
//! mid-reshard and restarted; time windows and `/visits` over the cluster; the seeds re-read
//! on SIGHUP (`reload`). What a real cluster cannot be made to do on demand (`-TRYAGAIN`,
//! `-CLUSTERDOWN`, a burst of `-MOVED`) is played by a fake node (`retries`). Nodes that
//! require a password, and nodes that speak only TLS, in `secure`. A transaction that
//! publishes, in `transactions`.

mod faults;
mod migrate;
mod redirects;
mod reload;
mod replies;
mod retries;
mod secure;
mod transactions;
mod windows;

use crate::support::cluster::Cluster;
use crate::support::http_json;
use crate::support::load::{self, Load};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Counter keys in these tests: `c:*` (the load) and `visits:*` (the HTTP API); every
/// other key is forwarded to the cluster untouched.
pub const COUNTERS: &str = "[[counters.match]]\npattern = \"c:*\"\n\
                        [[counters.match]]\npattern = \"visits:*\"\n";

/// `role` of a node in `/admin/shards`.
pub const PRIMARY: &str = "primary";
pub const REPLICA: &str = "replica";

/// The counting load, in the background until the flag is set: `clients` connections of
/// pipelines of 16 INCRs over their own 4 keys `<prefix>:<client>:<0..4>`.
pub fn start_load(
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

pub async fn stop_load(stop: Arc<AtomicBool>, task: tokio::task::JoinHandle<Load>) -> Load {
    stop.store(true, Ordering::Relaxed);
    task.await.unwrap()
}

/// The keys the load touches with `prefix` and `clients`.
pub fn load_keys(prefix: &str, clients: usize) -> Vec<String> {
    (0..clients)
        .flat_map(|c| (0..4).map(move |k| format!("{prefix}:{c}:{k}")))
        .collect()
}

/// Waits (bounded) for every acknowledged increment to land, read from the node that owns
/// each key, checking that nothing is ever doubled on the way; then asserts 0 lost, 0
/// doubled, and no key on two nodes.
pub fn check(cluster: &Cluster, load: &Load, when: &str) {
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
                    crate::support::cluster::slot_of(k.as_bytes()),
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
pub async fn admin_shards(http: SocketAddr) -> Value {
    let (status, body) = http_json(http, "GET", "/admin/shards", "").await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The node entry of `port` in `/admin/shards` (`nodes`, each named `redis_<port>`).
pub fn entry(shards: &Value, port: u16) -> Value {
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
pub async fn wait_proxy_sees_primary(http: SocketAddr, port: u16) {
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
