//! A local Redis Cluster for the tests: `redis-server --cluster-enabled yes` nodes on free
//! ports (the [`Redis`] launcher), joined by `redis-cli --cluster create`, and what the
//! tests do to it: read its slot map, reshard slots online the way redis-cli does (with a
//! pace a test can hold mid-migration), fail over by hand or by `kill -9`, read a key from
//! the node that owns it, and check that no key lives on two nodes.
//!
//! Every node is stopped by PID when the [`Cluster`] drops; every wait is bounded. The
//! helpers talk to the nodes directly, never through the proxy.

mod keys;
mod reshard;
pub mod secure;
mod slot;

pub use reshard::Pace;
pub use slot::{crc16, slot_of};

use super::{wait_until, Redis};
use std::process::Command;
use std::time::Duration;

/// Failure detection: short, so that an automatic failover takes a few seconds.
pub const NODE_TIMEOUT_MS: u64 = 2000;

/// How long a cluster may take to form, fail over or agree after a change.
const SETTLE: Duration = Duration::from_secs(30);

/// A node's role as the cluster says (`CLUSTER NODES`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: String,
    pub port: u16,
    pub primary: bool,
    /// The primary's node id, for a replica.
    pub replica_of: Option<String>,
    /// Flags `fail` or `fail?` are set.
    pub failing: bool,
    /// Slot ranges served, inclusive (import/migrate markers left out).
    pub slots: Vec<(u16, u16)>,
}

/// A connection to one node with timeouts, or the error.
pub fn node_conn(port: u16) -> redis::RedisResult<redis::Connection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let c = client.get_connection_with_timeout(Duration::from_secs(1))?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    c.set_write_timeout(Some(Duration::from_secs(5)))?;
    Ok(c)
}

/// Runs one command on the node at `port`.
pub fn node_cmd(port: u16, args: &[&str]) -> redis::RedisResult<redis::Value> {
    let mut c = node_conn(port)?;
    query(&mut c, args)
}

fn query(c: &mut redis::Connection, args: &[&str]) -> redis::RedisResult<redis::Value> {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(c)
}

/// A bulk or simple string reply as text ("" for anything else).
fn text(v: &redis::Value) -> String {
    match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).to_string(),
        redis::Value::SimpleString(s) => s.clone(),
        redis::Value::VerbatimString { text, .. } => text.clone(),
        _ => String::new(),
    }
}

/// `field` of an INFO-style reply (`CLUSTER INFO`, `INFO replication`) of the node.
fn info_field(port: u16, args: &[&str], field: &str) -> Option<String> {
    let reply = text(&node_cmd(port, args).ok()?);
    let prefix = format!("{field}:");
    reply
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().to_string())
}

/// Parses `CLUSTER NODES`.
pub fn parse_nodes(reply: &str) -> Vec<NodeInfo> {
    let mut out = Vec::new();
    for line in reply.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        // ip:port@cport[,hostname]
        let port = f[1]
            .split('@')
            .next()
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let flags: Vec<&str> = f[2].split(',').collect();
        let slots = f[8..]
            .iter()
            .filter(|s| !s.starts_with('['))
            .filter_map(|s| match s.split_once('-') {
                Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                None => s.parse().ok().map(|n| (n, n)),
            })
            .collect();
        out.push(NodeInfo {
            id: f[0].to_string(),
            port,
            primary: flags.contains(&"master"),
            replica_of: (f[3] != "-").then(|| f[3].to_string()),
            failing: flags.iter().any(|x| *x == "fail" || *x == "fail?"),
            slots,
        });
    }
    out
}

/// A local cluster of `redis-server --cluster-enabled yes` nodes, stopped on drop.
pub struct Cluster {
    pub nodes: Vec<Redis>,
}

impl Cluster {
    /// `primaries` primaries with `replicas_per_primary` replicas each, created with
    /// `redis-cli --cluster create`; returns once every node says `cluster_state:ok`, knows
    /// every other node and agrees on the slot map, and every replica is in sync.
    pub fn start(primaries: usize, replicas_per_primary: usize) -> Cluster {
        assert!(
            primaries >= 3,
            "redis-cli --cluster create needs 3 primaries"
        );
        let total = primaries * (1 + replicas_per_primary);
        let nodes: Vec<Redis> = (0..total)
            .map(|_| {
                let port = super::free_port();
                let conf = format!("nodes-{port}.conf");
                let timeout = NODE_TIMEOUT_MS.to_string();
                Redis::start_as(
                    port,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        &conf,
                        "--cluster-node-timeout",
                        &timeout,
                        // A replica may take over however long its link was down: the tests
                        // kill primaries under load and want the promotion, not a judgement.
                        "--cluster-replica-validity-factor",
                        "0",
                    ],
                )
            })
            .collect();
        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(nodes.iter().map(|n| n.addr()));
        args.extend([
            "--cluster-replicas".into(),
            replicas_per_primary.to_string(),
            "--cluster-yes".into(),
        ]);
        let out = Command::new("timeout")
            .arg("60")
            .arg("redis-cli")
            .args(&args)
            .output()
            .expect("redis-cli must be installed (scripts/ensure-deps.sh)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = Cluster { nodes };
        cluster.wait_settled("cluster create");
        assert_eq!(
            cluster.primaries().len(),
            primaries,
            "primaries after create"
        );
        cluster
    }

    /// The addresses of every node, for `[cluster] seeds`.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr()).collect()
    }

    /// `seeds = [...]` as a TOML array.
    pub fn seeds_toml(&self) -> String {
        let quoted: Vec<String> = self.seeds().iter().map(|a| format!("\"{a}\"")).collect();
        format!("[{}]", quoted.join(", "))
    }

    pub fn node(&self, port: u16) -> &Redis {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node on port {port}"))
    }

    fn node_mut(&mut self, port: u16) -> &mut Redis {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node on port {port}"))
    }

    /// The cluster as the first node that answers sees it.
    pub fn view(&self) -> Vec<NodeInfo> {
        for n in &self.nodes {
            if let Ok(v) = node_cmd(n.port, &["CLUSTER", "NODES"]) {
                return parse_nodes(&text(&v));
            }
        }
        panic!("no cluster node answers CLUSTER NODES");
    }

    /// What `port` itself says of the cluster, if it answers.
    fn view_of(port: u16) -> Option<Vec<NodeInfo>> {
        node_cmd(port, &["CLUSTER", "NODES"])
            .ok()
            .map(|v| parse_nodes(&text(&v)))
    }

    /// Ports of the primaries that serve slots, in port order.
    pub fn primaries(&self) -> Vec<u16> {
        let mut p: Vec<u16> = self
            .view()
            .iter()
            .filter(|n| n.primary && !n.failing && !n.slots.is_empty())
            .map(|n| n.port)
            .collect();
        p.sort();
        p
    }

    /// Ports of the replicas of the primary at `primary`.
    pub fn replicas_of(&self, primary: u16) -> Vec<u16> {
        let view = self.view();
        let Some(id) = view
            .iter()
            .find(|n| n.port == primary)
            .map(|n| n.id.clone())
        else {
            return Vec::new();
        };
        let mut r: Vec<u16> = view
            .iter()
            .filter(|n| n.replica_of.as_deref() == Some(&id) && !n.failing)
            .map(|n| n.port)
            .collect();
        r.sort();
        r
    }

    fn id_of(&self, port: u16) -> String {
        self.view()
            .into_iter()
            .find(|n| n.port == port)
            .map(|n| n.id)
            .unwrap_or_else(|| panic!("node {port} is not in the cluster"))
    }

    /// The port of the primary serving `slot`.
    pub fn node_for_slot(&self, slot: u16) -> u16 {
        self.view()
            .iter()
            .filter(|n| n.primary && !n.failing)
            .find(|n| n.slots.iter().any(|&(a, b)| (a..=b).contains(&slot)))
            .map(|n| n.port)
            .unwrap_or_else(|| panic!("no primary serves slot {slot}"))
    }

    /// The port of the primary serving `key`'s slot.
    pub fn node_for_key(&self, key: &str) -> u16 {
        self.node_for_slot(slot_of(key.as_bytes()))
    }

    /// Waits (bounded) until every live node says `cluster_state:ok`, knows as many nodes
    /// as the others, every node's view agrees on who serves which slot, and every replica
    /// has its link to its primary up.
    pub fn wait_settled(&self, when: &str) {
        let live: Vec<u16> = self
            .nodes
            .iter()
            .filter(|n| n.running())
            .map(|n| n.port)
            .collect();
        let mut last = String::new();
        let ok = wait_until(SETTLE, || {
            let mut maps = Vec::new();
            for &p in &live {
                if info_field(p, &["CLUSTER", "INFO"], "cluster_state").as_deref() != Some("ok") {
                    last = format!("{p}: cluster_state not ok");
                    return false;
                }
                let Some(view) = Self::view_of(p) else {
                    last = format!("{p}: no CLUSTER NODES");
                    return false;
                };
                let mut map: Vec<(u16, Vec<(u16, u16)>)> = view
                    .iter()
                    .filter(|n| n.primary && !n.slots.is_empty())
                    .map(|n| (n.port, n.slots.clone()))
                    .collect();
                map.sort();
                maps.push(map);
                let me = view.iter().find(|n| n.port == p);
                if let Some(me) = me.filter(|m| !m.primary) {
                    let up = info_field(p, &["INFO", "replication"], "master_link_status");
                    if up.as_deref() != Some("up") || me.replica_of.is_none() {
                        last = format!("{p}: replica not in sync");
                        return false;
                    }
                }
            }
            if maps.windows(2).any(|w| w[0] != w[1]) {
                last = "the nodes disagree on the slot map".into();
                return false;
            }
            true
        });
        assert!(
            ok,
            "{when}: the cluster did not settle in {SETTLE:?} ({last})"
        );
    }

    /// `CLUSTER FAILOVER` on `replica`; waits until it is a primary, its old primary
    /// follows it in sync, and the cluster is ok.
    pub fn failover(&self, replica: u16) {
        let old = self
            .view()
            .iter()
            .find(|n| n.port == replica)
            .and_then(|n| n.replica_of.clone())
            .unwrap_or_else(|| panic!("{replica} is not a replica"));
        let old = self
            .view()
            .into_iter()
            .find(|n| n.id == old)
            .map(|n| n.port)
            .expect("its primary");
        let ok = wait_until(SETTLE, || {
            node_cmd(replica, &["CLUSTER", "FAILOVER"]).is_ok()
        });
        assert!(ok, "CLUSTER FAILOVER accepted by {replica}");
        self.wait_primary(replica, "CLUSTER FAILOVER");
        let ok = wait_until(SETTLE, || {
            super::role(old).as_deref() == Some("slave") && self.replicas_of(replica).contains(&old)
        });
        assert!(
            ok,
            "CLUSTER FAILOVER: {old} did not become {replica}'s replica"
        );
        self.wait_settled("CLUSTER FAILOVER");
    }

    fn wait_primary(&self, port: u16, when: &str) {
        let ok = wait_until(SETTLE, || {
            super::role(port).as_deref() == Some("master") && self.primaries().contains(&port)
        });
        assert!(ok, "{when}: {port} did not become a primary");
        self.wait_settled(when);
    }

    /// Kills the primary at `primary` (SIGKILL by PID) and waits until the cluster promotes
    /// one of its replicas and is ok again; returns the new primary's port. The killed node
    /// stays down until [`Cluster::restart`].
    pub fn kill9(&mut self, primary: u16) -> u16 {
        let replicas = self.replicas_of(primary);
        assert!(!replicas.is_empty(), "{primary} has no replica to promote");
        self.node_mut(primary).stop();
        let mut new = 0;
        let ok = wait_until(SETTLE, || {
            match replicas
                .iter()
                .find(|&&r| super::role(r).as_deref() == Some("master"))
            {
                Some(&r) => {
                    new = r;
                    true
                }
                None => false,
            }
        });
        assert!(ok, "no replica of {primary} was promoted");
        self.wait_primary(new, "automatic failover");
        new
    }

    /// Stops the node at `port` (SIGKILL by PID), which must serve no slots (a replica), and
    /// waits until the others are ok without it. It stays down until [`Cluster::restart`].
    pub fn stop_node(&mut self, port: u16) {
        assert!(
            !self.primaries().contains(&port),
            "{port} serves slots: use kill9"
        );
        self.node_mut(port).stop();
        self.wait_settled("node stopped");
    }

    /// Starts a killed node again on its port with its nodes file (its data is gone): it
    /// rejoins as a replica of whoever took its slots.
    pub fn restart(&mut self, port: u16) {
        self.node_mut(port).restart();
        self.wait_settled("node restarted");
    }
}

fn ok(r: redis::RedisResult<redis::Value>) {
    if let Err(e) = r {
        panic!("cluster command failed: {e}");
    }
}

/// A proxy config in front of `cluster`, for [`super::Proxy::start`]: ports 0, a private
/// log directory, short timers (flushes every 200 ms, so that landings meet the cluster's
/// moves), `cluster_keys` more `[cluster]` keys (e.g. `wait_replicas = 1`) and `extra` more
/// TOML appended (whole sections, e.g. `[[counters.match]]`).
pub fn proxy_config(
    cluster: &Cluster,
    wal: &super::TempDir,
    cluster_keys: &str,
    extra: &str,
) -> tallyproxy::config::Config {
    proxy_config_for(&cluster.seeds_toml(), wal, cluster_keys, "", extra)
}

/// [`proxy_config`] for the cluster whose `seeds = ...` array is `seeds`, with `backend_keys`
/// more `[backend]` keys (e.g. credentials and TLS).
pub fn proxy_config_for(
    seeds: &str,
    wal: &super::TempDir,
    cluster_keys: &str,
    backend_keys: &str,
    extra: &str,
) -> tallyproxy::config::Config {
    let toml = format!(
        "listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n\
         [cluster]\nseeds = {seeds}\n{cluster_keys}\n\
         [backend]\ntimeout = \"2s\"\nhealth_interval = \"100ms\"\nhealth_failures = 2\n{backend_keys}\n\
         [counters]\nflush_interval = \"200ms\"\ncache_ttl = \"5s\"\n\
         [durability]\nwal_dir = \"{}\"\n{extra}",
        wal.path().display()
    );
    tallyproxy::config::Config::from_toml_str(&toml)
        .unwrap_or_else(|e| panic!("the [cluster] config is refused: {e}\n{toml}"))
}
