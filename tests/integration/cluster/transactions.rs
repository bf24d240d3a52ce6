//! A transaction that publishes, over the cluster: it runs on the pub/sub node (where the
//! proxy's subscribers are) with keys of one slot of that node; a key of another node is
//! refused with the documented error and nothing runs.

use crate::cluster_support::SERIAL;
use crate::support::cluster::{self, node_cmd, Cluster};
use crate::support::{Proxy, TempDir};

const PUBLISH_ELSEWHERE: &str = "-CROSSSLOT PUBLISH and PUBSUB inside MULTI run on the pub/sub shard (the first shard listed): every key of the transaction must live there\r\n";

/// Subscribers of `channel` on the node at `port` (PUBSUB NUMSUB counts that node's own).
fn numsub(port: u16, channel: &str) -> i64 {
    match node_cmd(port, &["PUBSUB", "NUMSUB", channel]).unwrap() {
        redis::Value::Array(v) => match v.as_slice() {
            [_, redis::Value::Int(n)] => *n,
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_that_publishes_runs_on_the_pubsub_node() {
    let _serial = SERIAL.lock().await;
    let cluster = tokio::task::block_in_place(|| Cluster::start(3, 0));
    let wal = TempDir::new("cl-publish");
    let proxy = Proxy::start(cluster::proxy_config(&cluster, &wal, "", "")).await;
    let (mut sub, mut c) = (proxy.conn().await, proxy.conn().await);
    assert_eq!(
        sub.cmd(&["SUBSCRIBE", "ch"]).await,
        "*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n"
    );
    let (here, key_here, key_there) = tokio::task::block_in_place(|| {
        let primaries = cluster.primaries();
        let here: Vec<u16> = primaries
            .iter()
            .copied()
            .filter(|p| numsub(*p, "ch") == 1)
            .collect();
        assert_eq!(here.len(), 1, "one node holds the subscription: {here:?}");
        let on = |pick: &dyn Fn(u16) -> bool| {
            (0..10_000)
                .map(|i| format!("t{i}"))
                .find(|k| pick(cluster.node_for_key(k)))
                .unwrap()
        };
        let key_here = on(&|n| n == here[0]);
        let key_there = on(&|n| n != here[0]);
        (here[0], key_here, key_there)
    });
    assert_eq!(c.cmd(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(c.cmd(&["INCR", &key_here]).await, "+QUEUED\r\n");
    assert_eq!(c.cmd(&["PUBLISH", "ch", "m"]).await, "+QUEUED\r\n");
    assert_eq!(c.cmd(&["EXEC"]).await, "*2\r\n:1\r\n:1\r\n");
    assert_eq!(
        sub.reply().await,
        "*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$1\r\nm\r\n"
    );
    assert_eq!(
        node_cmd(here, &["GET", &key_here]).unwrap(),
        redis::Value::BulkString(b"1".to_vec())
    );
    // A key of another node, after the PUBLISH: refused, nothing runs.
    assert_eq!(c.cmd(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(c.cmd(&["PUBLISH", "ch", "no"]).await, "+QUEUED\r\n");
    assert_eq!(c.cmd(&["INCR", &key_there]).await, PUBLISH_ELSEWHERE);
    assert_eq!(
        c.cmd(&["EXEC"]).await,
        "-EXECABORT Transaction discarded because of previous errors.\r\n"
    );
    assert_eq!(c.cmd(&["GET", &key_there]).await, "$-1\r\n", "nothing ran");
    assert_eq!(c.cmd(&["PUBLISH", "ch", "after"]).await, ":1\r\n");
    assert_eq!(
        sub.reply().await,
        "*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nafter\r\n",
        "nothing was published by the refused transaction"
    );
    drop(sub);
    proxy.stop().await;
}
