//! A cluster whose nodes require credentials (an ACL user, or the default user's
//! `requirepass`), in plain text and over TLS only (`--port 0 --tls-port`, `tls-cluster
//! yes`): the proxy reads the map with `[backend]`'s credentials and TLS, dials the nodes on
//! the ports the map names (the TLS ports, with TLS), lands increments exactly (counted on
//! the nodes), forwards commands and splits a cross-slot `MGET`; with a wrong password, or
//! none, start-up fails at once with the node's own words (`support::cluster::secure`); a
//! seed that trickles its reply to `AUTH` (a fake, `trickling_seed`) fails it within
//! `backend.timeout`.

use super::{admin_shards, entry, COUNTERS, PRIMARY};
use crate::cluster_support::SERIAL;
use crate::support::cluster::proxy_config_for;
use crate::support::cluster::secure::{SecureCluster, Transport, PASSWORD, USER, USER_PASSWORD};
use crate::support::{http_request, wait_until, Proxy, Raw, TempDir};
use std::time::Duration;

/// Counter keys of the test, spread over the three primaries.
const COUNTED: usize = 12;

fn counted(i: usize) -> String {
    format!("c:sec:{i}")
}

/// `[backend]` keys: `credentials`, a short connect timeout (start-up gives up after 10 of
/// them), and TLS with the cluster's CA when the cluster has one.
fn backend_keys(cluster: &SecureCluster, credentials: &str) -> String {
    let mut keys = format!("connect_timeout = \"200ms\"\n{credentials}");
    if let Some(t) = &cluster.certs {
        keys.push_str(&format!(
            "tls = true\ntls_ca_file = \"{}\"\n",
            t.ca.display()
        ));
    }
    keys
}

fn config(cluster: &SecureCluster, wal: &TempDir, credentials: &str) -> tallyproxy::Config {
    proxy_config_for(
        &cluster.seeds_toml(),
        wal,
        "",
        &backend_keys(cluster, credentials),
        COUNTERS,
    )
}

/// What the proxy in front of `cluster` must do: see the map (every node a primary, named by
/// the port it is dialled on), count exactly, forward, split a cross-slot `MGET`.
async fn serves(cluster: &SecureCluster, proxy: &Proxy) {
    let shards = admin_shards(proxy.http).await;
    for port in cluster.ports() {
        assert_eq!(entry(&shards, port)["role"], PRIMARY, "{shards}");
    }
    let owners = tokio::task::block_in_place(|| {
        (0..COUNTED)
            .map(|i| cluster.node_for_key(&counted(i)))
            .collect::<Vec<u16>>()
    });
    let mut spread = owners.clone();
    spread.sort();
    spread.dedup();
    assert_eq!(spread.len(), 3, "the counters are on every primary");

    // Key i is incremented i + 1 times; each reply is exact.
    let mut c = proxy.conn().await;
    for i in 0..COUNTED {
        for n in 1..=i + 1 {
            assert_eq!(
                c.cmd(&["INCR", &counted(i)]).await,
                format!(":{n}\r\n"),
                "{}",
                counted(i)
            );
        }
    }
    // Forwarded commands, each on the node of its slot, and a cross-slot MGET split and
    // merged in key order (a cluster node itself answers CROSSSLOT).
    let plain: Vec<String> = (0..6).map(|i| format!("p:sec:{i}")).collect();
    for (i, k) in plain.iter().enumerate() {
        assert_eq!(c.cmd(&["SET", k, &format!("v{i}")]).await, "+OK\r\n");
    }
    assert_eq!(c.cmd(&["GET", &plain[0]]).await, "$2\r\nv0\r\n");
    assert_eq!(c.cmd(&["HSET", "h:sec", "f", "v"]).await, ":1\r\n");
    assert_eq!(
        c.cmd(&["HGETALL", "h:sec"]).await,
        "*2\r\n$1\r\nf\r\n$1\r\nv\r\n"
    );
    let mut mget = vec!["MGET"];
    mget.extend(plain.iter().map(String::as_str));
    mget.push("p:sec:missing");
    let mut want = "*7\r\n".to_string();
    for i in 0..6 {
        want.push_str(&format!("$2\r\nv{i}\r\n"));
    }
    want.push_str("$-1\r\n");
    assert_eq!(c.cmd(&mget).await, want);
    let on = tokio::task::block_in_place(|| {
        let mut on: Vec<u16> = plain.iter().map(|k| cluster.node_for_key(k)).collect();
        on.sort();
        on.dedup();
        on
    });
    assert!(on.len() >= 2, "the MGET spans nodes: {on:?}");
    // Counters read back through the proxy, across slots too.
    let keys: Vec<String> = (0..COUNTED).map(counted).collect();
    let mut mget = vec!["MGET"];
    mget.extend(keys.iter().map(String::as_str));
    let mut want = format!("*{COUNTED}\r\n");
    for i in 0..COUNTED {
        let v = (i + 1).to_string();
        want.push_str(&format!("${}\r\n{v}\r\n", v.len()));
    }
    assert_eq!(c.cmd(&mget).await, want);

    // Landed exactly, each key on the node that serves its slot and on no other.
    let (status, body) = http_request(proxy.http, "POST", "/admin/flush").await;
    assert_eq!(status, 200, "{body}");
    tokio::task::block_in_place(|| {
        let landed = |i: usize| cluster.cli(owners[i], &["GET", &counted(i)]);
        let all = wait_until(Duration::from_secs(10), || {
            (0..COUNTED).all(|i| landed(i) == (i + 1).to_string())
        });
        let got: Vec<String> = (0..COUNTED).map(landed).collect();
        let want: Vec<String> = (1..=COUNTED).map(|n| n.to_string()).collect();
        assert!(all, "landed {got:?}");
        assert_eq!(got, want);
        let mut found = Vec::new();
        for port in cluster.ports() {
            for k in cluster.cli(port, &["KEYS", "c:sec:*"]).lines() {
                found.push((k.to_string(), port));
            }
        }
        found.sort();
        let mut placed: Vec<(String, u16)> =
            (0..COUNTED).map(|i| (counted(i), owners[i])).collect();
        placed.sort();
        assert_eq!(found, placed, "each key once, on its slot's node");
    });
    let (status, body) = http_request(proxy.http, "GET", "/readyz").await;
    assert_eq!(status, 200, "the health checks authenticate: {body}");
}

/// The error `tallyproxy::run` stops with for `config` (it must stop within 15 s).
async fn start_up_error(config: tallyproxy::Config) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (trigger, _) = tallyproxy::shutdown::channel();
    let task = tokio::spawn(tallyproxy::run(config, listener, http, trigger.clone()));
    let ended = tokio::time::timeout(Duration::from_secs(15), task).await;
    trigger.trigger();
    ended
        .expect("start-up stops, it does not hang")
        .unwrap()
        .expect_err("start-up refused")
        .to_string()
}

/// Start-up with these credentials fails naming the seeds and the node's refusal.
async fn refused(cluster: &SecureCluster, credentials: &str, want: &str) {
    let wal = TempDir::new("cl-secure-refused");
    let e = start_up_error(config(cluster, &wal, credentials)).await;
    assert!(
        e.contains("cluster: no seed answered with a slot map") && e.contains(want),
        "{e} should say {want}"
    );
    for seed in cluster.seeds() {
        assert!(e.contains(&format!("{seed}: ")), "{e} names {seed}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_requires_a_password_is_served_with_the_backend_credentials() {
    let _serial = SERIAL.lock().await;
    let cluster = tokio::task::block_in_place(|| SecureCluster::start(Transport::Plain));
    let wal = TempDir::new("cl-secure-auth");
    let user = format!("username = \"{USER}\"\npassword = \"{USER_PASSWORD}\"\n");
    let proxy = Proxy::start(config(&cluster, &wal, &user)).await;
    serves(&cluster, &proxy).await;
    proxy.stop().await;

    let wrong = format!("username = \"{USER}\"\npassword = \"wrong\"\n");
    refused(
        &cluster,
        &wrong,
        "handshake refused: WRONGPASS invalid username-password pair or user is disabled.",
    )
    .await;
    refused(&cluster, "", "NOAUTH Authentication required.").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_speaks_only_tls_is_served_on_its_tls_ports() {
    let _serial = SERIAL.lock().await;
    let cluster = tokio::task::block_in_place(|| SecureCluster::start(Transport::Tls));
    // The nodes have no plain-text port at all.
    for port in cluster.ports() {
        let plain = std::process::Command::new("redis-cli")
            .args(["-p", &port.to_string(), "-a", PASSWORD, "--no-auth-warning"])
            .arg("PING")
            .output()
            .unwrap();
        assert_ne!(String::from_utf8_lossy(&plain.stdout).trim(), "PONG");
    }
    let wal = TempDir::new("cl-secure-tls");
    let password = format!("password = \"{PASSWORD}\"\n");
    let proxy = Proxy::start(config(&cluster, &wal, &password)).await;
    // RESP3 clients' connections to the nodes are made over TLS too.
    let mut r3 = Raw::connect(proxy.addr).await;
    assert!(r3.cmd(&["HELLO", "3"]).await.starts_with("%7\r\n"));
    assert_eq!(r3.cmd(&["SET", "r3:sec", "x"]).await, "+OK\r\n");
    assert_eq!(r3.cmd(&["GET", "r3:sec"]).await, "$1\r\nx\r\n");
    serves(&cluster, &proxy).await;
    proxy.stop().await;

    refused(&cluster, "password = \"wrong\"\n", "WRONGPASS").await;
}

/// A seed that reads the proxy's first command (its `AUTH`) and answers with a bulk string
/// that arrives one byte every 100 ms (at most 300 bytes: 30 s), so that no single read
/// waits long. Stops, with every connection, when its task is aborted.
async fn trickling_seed() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        for _ in 0..100 {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            conns.spawn(async move {
                let mut buf = [0u8; 1024];
                if sock.read(&mut buf).await.unwrap_or(0) == 0 {
                    return;
                }
                let _ = sock.write_all(b"$100000\r\n").await;
                for _ in 0..300 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if sock.write_all(b"x").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

/// A node's handshake reply is awaited within `backend.timeout` in all, not per read: a
/// seed that trickles its answer to `AUTH` fails start-up with the reason, it does not
/// hold it for as long as the bytes keep coming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_that_trickles_its_auth_reply_fails_start_up_with_the_reason() {
    let (seed, task) = trickling_seed().await;
    let wal = TempDir::new("cl-secure-trickle");
    let config = proxy_config_for(
        &format!("[\"{seed}\"]"),
        &wal,
        "",
        "connect_timeout = \"200ms\"\npassword = \"p\"\n",
        COUNTERS,
    );
    let e = start_up_error(config).await;
    task.abort();
    assert_eq!(
        e,
        format!("cluster: no seed answered with a slot map: {seed}: handshake timed out")
    );
}
