//! Forwarded commands follow the cluster's redirections (`connection::redirect`): `-ASK` for
//! a key already migrated out of a half-moved slot, `-MOVED` once the slot has moved and
//! before the proxy looked at the map again. A client of the proxy sees neither.

use crate::cluster_support::SERIAL;
use crate::support::cluster::{self, slot_of, Cluster};
use crate::support::{http_request, Proxy, TempDir};

/// `tallyproxy_cluster_redirects_total{kind="<kind>"}` in `/metrics` (process-wide: the
/// tests of this binary share it, so the test compares counts before and after).
async fn redirects(proxy: &Proxy, kind: &str) -> u64 {
    let (status, body) = http_request(proxy.http, "GET", "/metrics").await;
    assert_eq!(status, 200);
    let line = format!("tallyproxy_cluster_redirects_total{{kind=\"{kind}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&line))
        .unwrap_or_else(|| panic!("no {line} in /metrics"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_commands_follow_ask_and_moved() {
    let _serial = SERIAL.lock().await;
    let cluster = tokio::task::block_in_place(|| Cluster::start(3, 0));
    let wal = TempDir::new("cl-redirects");
    // No periodic look at the map during the test: only a -MOVED prompts one.
    let proxy = Proxy::start(cluster::proxy_config(
        &cluster,
        &wal,
        "refresh_interval = \"1h\"",
        "",
    ))
    .await;
    let mut c = proxy.conn().await;
    let keys: Vec<String> = (0..6).map(|i| format!("{{r}}k{i}")).collect();
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(c.cmd(&["SET", k, &format!("v{i}")]).await, "+OK\r\n");
    }
    let (ask0, moved0) = (
        redirects(&proxy, "ask").await,
        redirects(&proxy, "moved").await,
    );
    let slot = slot_of(b"r");
    let m = tokio::task::block_in_place(|| {
        let from = cluster.node_for_slot(slot);
        let to = *cluster.primaries().iter().find(|&&p| p != from).unwrap();
        let m = cluster.begin_move(slot, from, to);
        assert_eq!(cluster.step(&m, 3), 3);
        m
    });
    // Half moved: three keys on each node; each GET answered where its key lives.
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(c.cmd(&["GET", k]).await, format!("$2\r\nv{i}\r\n"), "{k}");
    }
    assert!(redirects(&proxy, "ask").await >= ask0 + 3);
    assert_eq!(redirects(&proxy, "moved").await, moved0);
    tokio::task::block_in_place(|| cluster.finish(&m));
    // Moved: the proxy's map still names the old node, which answers -MOVED.
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(c.cmd(&["APPEND", k, "x"]).await, ":3\r\n", "{k}");
        assert_eq!(c.cmd(&["GET", k]).await, format!("$3\r\nv{i}x\r\n"), "{k}");
    }
    assert!(redirects(&proxy, "moved").await > moved0);
    tokio::task::block_in_place(|| {
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(cluster.value_of(k), Some(format!("v{i}x")), "{k}");
        }
    });
    proxy.stop().await;
}
