//! What a real cluster will not do on demand, against a fake node (`support::fake_node`):
//! a forwarded command refused with `-TRYAGAIN` / `-CLUSTERDOWN` is sent again until it
//! runs, at most `1 + MAX_HOPS` times, then the client gets Redis's error
//! (`connection::redirect`); and a burst of `-MOVED` is a few looks at the slot map, at most
//! one per `cluster::MIN_GAP`, not one per redirection (`Router::report_stale`).
//!
//! No redis-server here, so these tests do not hold `cluster_support::SERIAL`.

use crate::support::fake_node::{FakeNode, CLUSTERDOWN, TRYAGAIN};
use crate::support::{eventually, Proxy, TempDir};
use std::time::{Duration, Instant};
use tallyproxy::cluster::MIN_GAP;
use tallyproxy::connection::redirect::MAX_HOPS;

/// A proxy whose one seed is `node`; no periodic look at the map (only a redirection
/// prompts one); counter keys `c:*` only, so every key here is forwarded.
async fn proxy_before(node: &FakeNode, wal: &TempDir) -> Proxy {
    let toml = format!(
        "listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n\
         [cluster]\nseeds = [\"{}\"]\nrefresh_interval = \"1h\"\n\
         [backend]\ntimeout = \"2s\"\nhealth_interval = \"100ms\"\nhealth_failures = 2\n\
         [counters]\nflush_interval = \"200ms\"\ncache_ttl = \"5s\"\n\
         [[counters.match]]\npattern = \"c:*\"\n\
         [durability]\nwal_dir = \"{}\"\n",
        node.addr,
        wal.path().display()
    );
    Proxy::start(tallyproxy::config::Config::from_toml_str(&toml).unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tryagain_and_clusterdown_are_sent_again_until_the_command_runs() {
    let node = FakeNode::start().await;
    let wal = TempDir::new("cl-retry");
    let proxy = proxy_before(&node, &wal).await;
    let mut c = proxy.conn().await;

    node.refuse(&[TRYAGAIN, CLUSTERDOWN, TRYAGAIN]);
    assert_eq!(c.cmd(&["SET", "k", "v1"]).await, "+OK\r\n");
    assert_eq!(node.calls("SET"), 4, "three refusals, then it ran");
    assert_eq!(node.value("k").as_deref(), Some("v1"));

    node.refuse(&[CLUSTERDOWN, CLUSTERDOWN]);
    assert_eq!(c.cmd(&["GET", "k"]).await, "$2\r\nv1\r\n");
    assert_eq!(node.calls("GET"), 3);

    // A multi-key command's piece (one slot: one piece) is sent again the same way.
    node.set("{t}a", "1");
    node.set("{t}b", "2");
    node.refuse(&[TRYAGAIN]);
    assert_eq!(
        c.cmd(&["MGET", "{t}a", "{t}b", "{t}c"]).await,
        "*3\r\n$1\r\n1\r\n$1\r\n2\r\n$-1\r\n"
    );
    assert_eq!(node.calls("MGET"), 2);
    assert_eq!(node.refusals_left(), 0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_end_after_max_hops_with_the_nodes_error() {
    let node = FakeNode::start().await;
    let wal = TempDir::new("cl-retry-bound");
    let proxy = proxy_before(&node, &wal).await;
    let mut c = proxy.conn().await;
    node.set("k", "v");

    let refusals = [TRYAGAIN; 20];
    node.refuse(&refusals);
    assert_eq!(c.cmd(&["GET", "k"]).await, format!("-{TRYAGAIN}\r\n"));
    let sends = 1 + MAX_HOPS as u64;
    assert_eq!(node.calls("GET"), sends, "the first send and MAX_HOPS more");
    assert_eq!(node.refusals_left() as u64, refusals.len() as u64 - sends);

    // The connection carries on.
    node.refuse(&[]);
    assert_eq!(c.cmd(&["GET", "k"]).await, "$1\r\nv\r\n");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_moved_is_at_most_one_look_at_the_map_per_min_gap() {
    const KEYS: usize = 500;
    let node = FakeNode::start().await;
    let wal = TempDir::new("cl-storm");
    let proxy = proxy_before(&node, &wal).await;
    let mut c = proxy.conn().await;
    for i in 0..KEYS {
        node.set(&format!("m{i}"), &i.to_string());
    }
    let before = node.map_reads();
    assert!(before >= 1, "start-up read the map");

    node.moved_once_per_key(true);
    let started = Instant::now();
    for i in 0..KEYS {
        let v = i.to_string();
        assert_eq!(
            c.cmd(&["GET", &format!("m{i}")]).await,
            format!("${}\r\n{v}\r\n", v.len())
        );
    }
    let elapsed = started.elapsed();
    let looks = node.map_reads() - before;
    // Each GET was answered -MOVED once (a report each), then followed.
    assert_eq!(node.calls("GET"), 2 * KEYS as u64);
    // Looks are MIN_GAP apart at least; one may have been under way when the burst began,
    // and one more starts at its end.
    let bound = (elapsed.as_millis() / MIN_GAP.as_millis()) as u64 + 2;
    eprintln!(
        "{KEYS} -MOVED in {} ms: {looks} looks at the map (bound {bound})",
        elapsed.as_millis()
    );
    assert!(
        looks <= bound,
        "{looks} looks at the map for {KEYS} -MOVED in {elapsed:?}: more than one per {MIN_GAP:?}"
    );
    // And a -MOVED does prompt a look (refresh_interval is an hour).
    assert!(
        eventually(Duration::from_secs(10), || node.map_reads() > before).await,
        "no look at the map after {KEYS} -MOVED"
    );
    proxy.stop().await;
}
