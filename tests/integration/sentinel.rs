//! Sentinel-managed shards followed through failover. Two shards, each a primary and one
//! replica, three sentinels; concurrent pipelined INCRs through the proxy while a shard's
//! primary changes; then each key is checked against what its client saw acknowledged,
//! summed over the primaries the sentinels name: 0 lost, 0 doubled.

use crate::support::load::{self, Load};
use crate::support::{self, ProxyProcess, Redis, Sentinel, TempDir};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MASTERS: [(&str, &str); 2] = [("redis_a", "shard-a"), ("redis_b", "shard-b")];

/// One of these tests at a time: each runs seven servers and a loaded proxy, and the
/// rest of the suite shares two cores with them.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Two shards of a primary and a replica each, and three sentinels that know them all.
struct Ha {
    nodes: Vec<Redis>,
    sentinels: Vec<Sentinel>,
    wal: TempDir,
    /// The HTTP ports of the proxies started, for what they say when a check fails.
    proxies: std::sync::Mutex<Vec<u16>>,
}

impl Ha {
    fn start(tag: &str) -> Ha {
        // A replica's first sync starts at once (Redis waits 5 s by default, for more
        // replicas to share it): a replica that has not synced is empty, yet Sentinel may
        // promote it.
        let now = ["--repl-diskless-sync-delay", "0"];
        let mut nodes = Vec::new();
        for _ in MASTERS {
            let primary = Redis::start_with(&now);
            let port = primary.port.to_string();
            let replica = Redis::start_with(&[now[0], now[1], "--replicaof", "127.0.0.1", &port]);
            nodes.push(primary);
            nodes.push(replica);
        }
        for replica in [&nodes[1], &nodes[3]] {
            assert!(
                support::wait_until(Duration::from_secs(10), || {
                    matches!(replica.cmd(&["INFO", "replication"]), redis::Value::BulkString(b)
                        if String::from_utf8_lossy(&b).contains("master_link_status:up"))
                }),
                "replica in sync"
            );
        }
        let watched = [(MASTERS[0].1, nodes[0].port), (MASTERS[1].1, nodes[2].port)];
        let sentinels: Vec<Sentinel> = (0..3).map(|_| Sentinel::start(&watched)).collect();
        // Each sentinel knows the replicas and the other two (a failover needs a majority).
        for s in &sentinels {
            for (_, master) in MASTERS {
                let ok = support::wait_until(Duration::from_secs(30), || {
                    let len = |args: &[&str]| match s.cmd(args) {
                        Ok(redis::Value::Array(v)) => v.len(),
                        _ => 0,
                    };
                    len(&["SENTINEL", "REPLICAS", master]) >= 1
                        && len(&["SENTINEL", "SENTINELS", master]) >= 2
                });
                assert!(ok, "sentinel {} knows {master}'s replica and peers", s.port);
            }
        }
        Ha {
            nodes,
            sentinels,
            wal: TempDir::new(tag),
            proxies: Default::default(),
        }
    }

    fn sentinel_addrs(&self) -> Vec<String> {
        self.sentinels.iter().map(|s| s.addr()).collect()
    }

    /// The primary's port of `master`, as the first sentinel that answers says.
    fn primary(&self, master: &str) -> Option<u16> {
        self.sentinels.iter().find_map(|s| s.master_port(master))
    }

    fn node(&self, port: u16) -> &Redis {
        self.nodes.iter().find(|n| n.port == port).expect("a node")
    }

    fn node_mut(&mut self, port: u16) -> &mut Redis {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("a node")
    }

    /// Waits (bounded) until the sentinels name a primary for `master` other than `old`
    /// and it answers ROLE as one.
    fn wait_switch(&self, master: &str, old: u16, limit: Duration) -> u16 {
        let mut new = old;
        let ok = support::wait_until(limit, || {
            new = self.primary(master).unwrap_or(old);
            new != old && support::role(new).as_deref() == Some("master")
        });
        assert!(ok, "{master} failed over from {old}");
        new
    }

    /// `SENTINEL FAILOVER master` (retried while the sentinel has no good replica yet).
    fn failover(&self, master: &str) -> u16 {
        let old = self.primary(master).expect("a primary");
        let ok = support::wait_until(Duration::from_secs(20), || {
            self.sentinels[0]
                .cmd(&["SENTINEL", "FAILOVER", master])
                .is_ok()
        });
        assert!(ok, "SENTINEL FAILOVER {master} accepted");
        self.wait_switch(master, old, Duration::from_secs(30))
    }

    /// What the primaries hold for `key`, summed.
    fn landed(&self, key: &str) -> i64 {
        MASTERS
            .iter()
            .filter_map(|(_, m)| self.primary(m))
            .filter_map(|p| self.node(p).get(key))
            .map(|v| v.parse::<i64>().unwrap())
            .sum()
    }

    /// Waits (bounded) for every acknowledged increment to land, checking that nothing is
    /// ever doubled on the way, then asserts 0 lost and 0 doubled.
    fn check(&self, load: &Load, when: &str) {
        let acked = load.acked();
        let deadline = Instant::now() + Duration::from_secs(60);
        let (lost, doubled) = loop {
            let (lost, doubled) = load.lost_and_doubled(|k| self.landed(k));
            if doubled > 0 || lost == 0 || Instant::now() > deadline {
                break (lost, doubled);
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        eprintln!(
            "sentinel, {when}: {acked} acknowledged, {} refused, {} connections closed; lost {lost}, doubled {doubled}",
            load.refusals, load.closed
        );
        assert!(acked > 1000, "{when}: the load ran ({acked} acknowledged)");
        if (lost, doubled) != (0, 0) {
            self.explain(load);
        }
        assert_eq!((lost, doubled), (0, 0), "{when}: (lost, doubled)");
        // Nor did any server lose what the proxy running now had settled on it
        // (`shard_lost_data_total`, one line per shard; an earlier proxy may have been killed).
        let http = *self.proxies.lock().unwrap().last().expect("a proxy");
        let metrics = http_get_blocking(http, "/metrics").expect("the proxy's /metrics");
        let lines: Vec<&str> = metrics
            .lines()
            .filter(|l| l.starts_with("tallyproxy_shard_lost_data_total{"))
            .collect();
        assert_eq!(lines.len(), MASTERS.len(), "{when}: {lines:?}");
        assert!(lines.iter().all(|l| l.ends_with(" 0")), "{when}: {lines:?}");
    }

    /// For a failed check: each key short or over, what every node holds of it, what the
    /// proxies still have pending, and the tail of their logs.
    fn explain(&self, load: &Load) {
        for (key, seen) in &load.keys {
            let landed = self.landed(key);
            if landed == seen.acked {
                continue;
            }
            let on: Vec<String> = self
                .nodes
                .iter()
                .map(|n| {
                    let role = support::role(n.port).unwrap_or_default();
                    format!("{}({role})={:?}", n.port, n.get(key))
                })
                .collect();
            eprintln!(
                "  {key}: acked {}, sent {}, landed {landed}; {}",
                seen.acked,
                seen.sent,
                on.join(" ")
            );
        }
        for http in self.proxies.lock().unwrap().iter() {
            let metrics = http_get_blocking(*http, "/metrics").unwrap_or_default();
            for line in metrics.lines().filter(|l| {
                !l.starts_with('#')
                    && ["pending", "retries", "failover", "lost_data"]
                        .iter()
                        .any(|w| l.contains(w))
            }) {
                eprintln!("  proxy :{http}: {line}");
            }
        }
        for n in &self.nodes {
            eprintln!("  redis {}:", n.port);
            for l in n.log().lines().filter(|l| {
                ["MASTER", "master", "REPLICA", "replica", "Ready", "role"]
                    .iter()
                    .any(|w| l.contains(w))
            }) {
                eprintln!("    {l}");
            }
        }
        for s in &self.sentinels {
            eprintln!("  sentinel {}:", s.port);
            for l in s
                .log()
                .lines()
                .filter(|l| l.contains(" +") || l.contains(" -"))
            {
                eprintln!("    {l}");
            }
        }
        let mut logs: Vec<_> = std::fs::read_dir(self.wal.path())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        logs.sort();
        for path in logs {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("  {} ({} lines), last 80:", path.display(), lines.len());
            for l in &lines[lines.len().saturating_sub(80)..] {
                eprintln!("    {l}");
            }
        }
    }
}

/// The load, run in the background until the returned flag is set.
fn start_load(
    proxy: &ProxyProcess,
    tag: &'static str,
) -> (Arc<AtomicBool>, tokio::task::JoinHandle<Load>) {
    let stop = Arc::new(AtomicBool::new(false));
    let spec = load::Spec {
        clients: 4,
        depth: 16,
        prefix: format!("ha:{tag}"),
        pause: Duration::from_millis(5),
        refused_rounds: None,
        limit: Duration::from_secs(60),
    };
    let task = tokio::spawn(load::pipelined(proxy.addr(), spec, stop.clone()));
    (stop, task)
}

/// A proxy in front of `ha`, its log kept in the test's directory for [`Ha::check`].
fn start_proxy(ha: &Ha, backend: &str) -> ProxyProcess {
    let mut proxies = ha.proxies.lock().unwrap();
    let log = ha.wal.path().join(format!("proxy-{}.log", proxies.len()));
    let proxy =
        ProxyProcess::start_masters(&MASTERS, &ha.sentinel_addrs(), &ha.wal, backend, Some(&log));
    proxies.push(proxy.http);
    proxy
}

/// `/admin/shards` says where each shard's primary is, and its last failover.
async fn admin_primary(proxy: &ProxyProcess, shard: &str) -> serde_json::Value {
    let addr: SocketAddr = format!("127.0.0.1:{}", proxy.http).parse().unwrap();
    let (status, body) = support::http_json(addr, "GET", "/admin/shards", "").await;
    assert_eq!(status, 200);
    body["shards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == shard)
        .map(|s| s["sentinel"].clone())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_of_each_shard_in_turn_loses_and_doubles_nothing() {
    let _serial = SERIAL.lock().await;
    let ha = Ha::start("ha-failover");
    let proxy = start_proxy(&ha, "wait_replicas = 1\nwait_timeout = \"200ms\"");
    let (stop, task) = start_load(&proxy, "failover");
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (shard, master) in MASTERS {
        let new = tokio::task::block_in_place(|| ha.failover(master));
        let followed = support::eventually(Duration::from_secs(20), || {
            admin_primary_addr(&proxy, shard) == Some(format!("127.0.0.1:{new}"))
        })
        .await;
        assert!(followed, "the proxy follows {shard} to {new}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let load = task.await.unwrap();
    let info = admin_primary(&proxy, "redis_a").await;
    assert!(info["last_failover"].is_object(), "{info}");
    tokio::task::block_in_place(|| ha.check(&load, "SENTINEL FAILOVER of each shard"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_of_a_primary_with_wait_replicas_loses_nothing_acknowledged() {
    let _serial = SERIAL.lock().await;
    let mut ha = Ha::start("ha-kill9");
    let proxy = start_proxy(&ha, "wait_replicas = 1\nwait_timeout = \"200ms\"");
    let (stop, task) = start_load(&proxy, "kill9");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let old = ha.primary("shard-a").unwrap();
    ha.node_mut(old).stop();
    let new =
        tokio::task::block_in_place(|| ha.wait_switch("shard-a", old, Duration::from_secs(40)));
    // The old primary returns, so that WAIT can confirm again: as the new one's replica, as
    // Redis advises for a server without persistence. Restarted as a primary it would be an
    // empty one for the seconds until the sentinels demote it, and a second failover then
    // (a sentinel that finds the new primary slow to answer, under load) can promote it and
    // wipe, by the resync, what the other had confirmed: `docs/guarantees.md`.
    ha.node_mut(old).restart_as_replica_of(new);
    let followed = support::eventually(Duration::from_secs(20), || {
        admin_primary_addr(&proxy, "redis_a") == Some(format!("127.0.0.1:{new}"))
    })
    .await;
    assert!(followed, "the proxy follows redis_a to {new}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let load = task.await.unwrap();
    tokio::task::block_in_place(|| ha.check(&load, "kill -9 of a primary, wait_replicas = 1"));
}

/// The body of a blocking HTTP GET to the sidecar on `port` (for conditions and failures).
fn http_get_blocking(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out.split_once("\r\n\r\n")?.1.to_string())
}

/// The primary `/admin/shards` names for `shard` (a blocking HTTP GET, for conditions).
fn admin_primary_addr(proxy: &ProxyProcess, shard: &str) -> Option<String> {
    let body = http_get_blocking(proxy.http, "/admin/shards")?;
    let v: serde_json::Value = serde_json::from_str(body.trim()).ok()?;
    v["shards"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == shard)?["sentinel"]["primary"]
        .as_str()
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_killed_during_a_failover_and_restarted_loses_and_doubles_nothing() {
    let _serial = SERIAL.lock().await;
    let ha = Ha::start("ha-proxy-kill9");
    let backend = "wait_replicas = 1\nwait_timeout = \"200ms\"";
    let mut proxy = start_proxy(&ha, backend);
    let (stop, task) = start_load(&proxy, "pk1");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let old = ha.primary("shard-a").unwrap();
    tokio::task::block_in_place(|| {
        assert!(
            support::wait_until(Duration::from_secs(20), || ha.sentinels[0]
                .cmd(&["SENTINEL", "FAILOVER", "shard-a"])
                .is_ok()),
            "SENTINEL FAILOVER shard-a accepted"
        )
    });
    // The proxy dies while the shard's primary changes: batches in flight, some applied
    // on the old primary and not confirmed, the rest in the log only.
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.kill9();
    stop.store(true, Ordering::Relaxed);
    let mut load = task.await.unwrap();
    let new =
        tokio::task::block_in_place(|| ha.wait_switch("shard-a", old, Duration::from_secs(30)));
    let proxy = start_proxy(&ha, backend);
    let (stop, task) = start_load(&proxy, "pk2");
    let followed = support::eventually(Duration::from_secs(20), || {
        admin_primary_addr(&proxy, "redis_a") == Some(format!("127.0.0.1:{new}"))
    })
    .await;
    assert!(
        followed,
        "the restarted proxy uses redis_a's new primary {new}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    load.merge(task.await.unwrap());
    tokio::task::block_in_place(|| ha.check(&load, "proxy kill -9 during a failover, restarted"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_down_the_proxy_keeps_its_primaries_then_follows_again() {
    let _serial = SERIAL.lock().await;
    let mut ha = Ha::start("ha-sentinels-down");
    let proxy = start_proxy(&ha, "wait_replicas = 1\nwait_timeout = \"200ms\"");
    let (stop, task) = start_load(&proxy, "sdown");
    tokio::time::sleep(Duration::from_secs(1)).await;
    // One sentinel down: a failover through another is still followed.
    ha.sentinels[0].stop();
    let old = ha.primary("shard-a").unwrap();
    tokio::task::block_in_place(|| {
        assert!(
            support::wait_until(Duration::from_secs(20), || ha.sentinels[1]
                .cmd(&["SENTINEL", "FAILOVER", "shard-a"])
                .is_ok()),
            "SENTINEL FAILOVER shard-a accepted"
        )
    });
    let new =
        tokio::task::block_in_place(|| ha.wait_switch("shard-a", old, Duration::from_secs(30)));
    let followed = support::eventually(Duration::from_secs(20), || {
        admin_primary_addr(&proxy, "redis_a") == Some(format!("127.0.0.1:{new}"))
    })
    .await;
    assert!(
        followed,
        "with one sentinel down the proxy follows redis_a to {new}"
    );
    // A majority down: no failover can be agreed; the proxy keeps serving from the
    // primaries it knows, and its increments keep landing there.
    ha.sentinels[1].stop();
    ha.sentinels[2].stop();
    let before = support::role(new);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(before.as_deref(), Some("master"));
    assert_eq!(
        admin_primary_addr(&proxy, "redis_a"),
        Some(format!("127.0.0.1:{new}")),
        "the known primary is kept while no sentinel answers"
    );
    // Recovery: the sentinels return and a later failover is followed again.
    for s in &mut ha.sentinels {
        s.restart();
    }
    let old_b = tokio::task::block_in_place(|| {
        let mut p = None;
        assert!(support::wait_until(Duration::from_secs(20), || {
            p = ha.primary("shard-b");
            p.is_some()
        }));
        p.unwrap()
    });
    let new_b = tokio::task::block_in_place(|| {
        assert!(
            support::wait_until(Duration::from_secs(30), || ha.sentinels[0]
                .cmd(&["SENTINEL", "FAILOVER", "shard-b"])
                .is_ok()),
            "SENTINEL FAILOVER shard-b accepted"
        );
        ha.wait_switch("shard-b", old_b, Duration::from_secs(30))
    });
    let followed = support::eventually(Duration::from_secs(20), || {
        admin_primary_addr(&proxy, "redis_b") == Some(format!("127.0.0.1:{new_b}"))
    })
    .await;
    assert!(
        followed,
        "after recovery the proxy follows redis_b to {new_b}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let load = task.await.unwrap();
    assert_eq!(load.closed, 0, "no client connection closed");
    tokio::task::block_in_place(|| ha.check(&load, "sentinels down, then a majority, then back"));
}
