//! Pub/sub through the proxy: a RESP2 subscriber (subscribed-mode rules, `*2 pong`) and a
//! RESP3 subscriber (push frames, other commands meanwhile), byte for byte what a Redis
//! answers; unsubscribing from nothing; a subscriber that does not read is disconnected and
//! its dedicated connection released.

use crate::support::{self, Proxy, Raw, Redis, TempDir};
use crate::transactions::{dedicated, gauge_becomes};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// One step: a command from the subscriber (with the number of replies it gets), or a
/// PUBLISH from another client (with the subscriber's one frame after it).
enum Step {
    Sub(&'static [&'static str], usize),
    Publish(&'static str, &'static str),
}

async fn run(addr: SocketAddr, hello: Option<&str>, steps: &[Step]) -> Vec<String> {
    let (mut sub, mut publisher) = (Raw::connect(addr).await, Raw::connect(addr).await);
    if let Some(v) = hello {
        sub.cmd(&["HELLO", v]).await;
    }
    let mut seen = Vec::new();
    for s in steps {
        match s {
            Step::Sub(cmd, n) => {
                sub.send(&support::encode(cmd)).await;
                for _ in 0..*n {
                    seen.push(sub.reply().await);
                }
            }
            Step::Publish(ch, msg) => {
                seen.push(publisher.cmd(&["PUBLISH", ch, msg]).await);
                seen.push(sub.reply().await);
            }
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resp2_subscriber_sees_what_redis_sends() {
    let (a, b, direct) = (Redis::start(), Redis::start(), Redis::start());
    let wal = TempDir::new("pubsub2");
    let proxy = Proxy::start(support::config(&[&a, &b], &wal)).await;
    let steps = [
        Step::Sub(&["SUBSCRIBE", "a", "b"], 2),
        Step::Sub(&["GET", "x"], 1),
        Step::Sub(&["PING"], 1),
        Step::Sub(&["PING", "hi"], 1),
        Step::Sub(&["HELLO", "3"], 1),
        Step::Sub(&["NOSUCH"], 1),
        Step::Publish("a", "m1"),
        Step::Publish("b", "m2"),
        Step::Sub(&["PSUBSCRIBE", "p*"], 1),
        Step::Publish("pa", "m3"),
        Step::Sub(&["UNSUBSCRIBE", "a"], 1),
        Step::Publish("b", "m4"),
        Step::Sub(&["UNSUBSCRIBE"], 1),
        Step::Sub(&["PUNSUBSCRIBE"], 1),
        // Out of subscribed mode: ordinary commands again.
        Step::Sub(&["GET", "x"], 1),
        Step::Sub(&["PING"], 1),
        Step::Sub(&["UNSUBSCRIBE", "x", "y"], 2),
        Step::Sub(&["PUNSUBSCRIBE"], 1),
    ];
    let got = run(proxy.addr, None, &steps).await;
    let want = run(direct.addr().parse().unwrap(), None, &steps).await;
    assert_eq!(got, want);
    assert!(
        got[0].starts_with("*3\r\n$9\r\nsubscribe\r\n"),
        "{}",
        got[0]
    );
    assert!(
        gauge_becomes(&proxy, 0).await,
        "released once nothing is subscribed"
    );
    proxy.stop().await;
}

/// One write of several commands; every reply, as bytes.
async fn burst(addr: SocketAddr, cmds: &[&[&str]], replies: usize) -> Vec<String> {
    let mut c = Raw::connect(addr).await;
    let mut bytes = Vec::new();
    for cmd in cmds {
        bytes.extend_from_slice(&support::encode(cmd));
    }
    c.send(&bytes).await;
    let mut out = Vec::new();
    for _ in 0..replies {
        out.push(c.reply().await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_subscription_commands_keep_redis_order() {
    let (a, b, direct) = (Redis::start(), Redis::start(), Redis::start());
    let wal = TempDir::new("pubsub-pipelined");
    let proxy = Proxy::start(support::config(&[&a, &b], &wal)).await;
    let cmds: &[&[&str]] = &[
        // (One channel: UNSUBSCRIBE with none names them in the server's hash order.)
        &["SUBSCRIBE", "a"],
        &["GET", "x"],
        &["PING"],
        &["PSUBSCRIBE", "p*"],
        &["UNSUBSCRIBE"],
        &["SET", "x", "1"],
        &["PUNSUBSCRIBE"],
        &["GET", "x"],
        &["SUBSCRIBE", "c"],
        &["RESET"],
        &["GET", "x"],
    ];
    let want = burst(direct.addr().parse().unwrap(), cmds, 11).await;
    let got = burst(proxy.addr, cmds, 11).await;
    assert_eq!(got, want);
    // A RESET between two subscriptions: the first one does not come back.
    let mut sub = proxy.conn().await;
    let mut bytes = support::encode(&["SUBSCRIBE", "old"]);
    bytes.extend_from_slice(&support::encode(&["RESET"]));
    bytes.extend_from_slice(&support::encode(&["SUBSCRIBE", "new"]));
    sub.send(&bytes).await;
    assert_eq!(
        sub.reply().await,
        "*3\r\n$9\r\nsubscribe\r\n$3\r\nold\r\n:1\r\n"
    );
    assert_eq!(sub.reply().await, "+RESET\r\n");
    assert_eq!(
        sub.reply().await,
        "*3\r\n$9\r\nsubscribe\r\n$3\r\nnew\r\n:1\r\n"
    );
    let mut publisher = proxy.conn().await;
    publisher.cmd(&["PUBLISH", "old", "stale"]).await;
    assert_eq!(publisher.cmd(&["PUBLISH", "new", "fresh"]).await, ":1\r\n");
    assert_eq!(
        sub.reply().await,
        "*3\r\n$7\r\nmessage\r\n$3\r\nnew\r\n$5\r\nfresh\r\n"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resp3_subscriber_gets_push_frames_and_keeps_using_the_connection() {
    let (a, b, direct) = (Redis::start(), Redis::start(), Redis::start());
    let wal = TempDir::new("pubsub3");
    let proxy = Proxy::start(support::config(&[&a, &b], &wal)).await;
    let steps = [
        Step::Sub(&["SUBSCRIBE", "news"], 1),
        Step::Sub(&["SET", "k", "v"], 1),
        Step::Publish("news", "hello"),
        Step::Sub(&["GET", "k"], 1),
        Step::Sub(&["PING"], 1),
        Step::Sub(&["PSUBSCRIBE", "n*"], 1),
        Step::Sub(&["UNSUBSCRIBE"], 1),
        Step::Sub(&["PUNSUBSCRIBE", "n*"], 1),
        Step::Sub(&["UNSUBSCRIBE"], 1),
    ];
    let got = run(proxy.addr, Some("3"), &steps).await;
    for s in [&a, &b] {
        s.cmd(&["FLUSHALL"]);
    }
    let want = run(direct.addr().parse().unwrap(), Some("3"), &steps).await;
    assert_eq!(got, want);
    assert_eq!(got[0], ">3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n");
    assert_eq!(
        got[3],
        ">3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nhello\r\n"
    );
    // PUBSUB is answered by the pub/sub shard.
    let mut sub = proxy.conn().await;
    sub.cmd(&["SUBSCRIBE", "x"]).await;
    let mut other = proxy.conn().await;
    assert_eq!(
        other.cmd(&["PUBSUB", "NUMSUB", "x"]).await,
        "*2\r\n$1\r\nx\r\n:1\r\n"
    );
    assert_eq!(
        other.cmd(&["PUBSUB", "CHANNELS"]).await,
        "*1\r\n$1\r\nx\r\n"
    );
    assert_eq!(dedicated(&proxy).await, 1);
    let mut r3 = proxy.conn().await;
    r3.cmd(&["HELLO", "3"]).await;
    assert_eq!(
        r3.cmd(&["SUBSCRIBE", "y"]).await,
        ">3\r\n$9\r\nsubscribe\r\n$1\r\ny\r\n:1\r\n"
    );
    assert_eq!(
        r3.cmd(&["HELLO", "2"]).await,
        "-ERR HELLO while subscribed is not supported by tallyproxy: UNSUBSCRIBE (or RESET) first\r\n"
    );
    assert_eq!(r3.cmd(&["RESET"]).await, "+RESET\r\n");
    drop(r3);
    assert!(gauge_becomes(&proxy, 1).await);
    // RESET ends the subscription and releases the connection.
    assert_eq!(sub.cmd(&["RESET"]).await, "+RESET\r\n");
    assert!(gauge_becomes(&proxy, 0).await);
    assert_eq!(
        other.cmd(&["PUBSUB", "NUMSUB", "x"]).await,
        "*2\r\n$1\r\nx\r\n:0\r\n"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_does_not_read_is_disconnected() {
    let (a, b) = (Redis::start(), Redis::start());
    let wal = TempDir::new("pubsub-slow");
    let mut cfg = support::config(&[&a, &b], &wal);
    cfg.limits.max_output_bytes = 256 * 1024;
    let proxy = Proxy::start(cfg).await;
    let mut sub = proxy.conn().await;
    assert_eq!(
        sub.cmd(&["SUBSCRIBE", "flood"]).await,
        "*3\r\n$9\r\nsubscribe\r\n$5\r\nflood\r\n:1\r\n"
    );
    let payload = "x".repeat(64 * 1024);
    let mut publisher = proxy.conn().await;
    let mut dropped = false;
    for _ in 0..2000 {
        let r = publisher.cmd(&["PUBLISH", "flood", &payload]).await;
        if r == ":0\r\n" {
            dropped = true;
            break;
        }
        assert_eq!(r, ":1\r\n");
    }
    assert!(dropped, "the shard stopped counting the subscriber");
    assert!(gauge_becomes(&proxy, 0).await);
    // The subscriber's connection ends (after what was already written).
    let mut buf = vec![0u8; 1 << 20];
    let mut closed = false;
    for _ in 0..10_000 {
        match tokio::time::timeout(Duration::from_secs(10), sub.stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(_)) => {}
            Err(_) => break,
        }
    }
    assert!(closed, "disconnected");
    // Others are unaffected.
    assert_eq!(publisher.cmd(&["PING"]).await, "+PONG\r\n");
    proxy.stop().await;
}
