//! A local Redis Cluster that requires credentials, optionally over TLS only: three primaries
//! (`--cluster-enabled yes`) with `requirepass` and `masterauth`, an ACL user for the proxy,
//! and with [`Transport::Tls`] `--port 0 --tls-port <port> --tls-cluster yes
//! --tls-replication yes` (certificates from `support::certs`, no client certificates asked).
//!
//! The helpers talk to the nodes with `redis-cli` (credentials, `--tls`), never through the
//! proxy. Every node is stopped by PID on drop; every wait is bounded.

use super::super::certs::certificates;
use super::super::{free_port, wait_until, TempDir};
use super::{parse_nodes, slot_of, NodeInfo};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The default user's password (`requirepass`, `masterauth`): what redis-cli uses here.
pub const PASSWORD: &str = "cluster-pw";
/// The ACL user made for the proxy on every node, and its password.
pub const USER: &str = "tally";
pub const USER_PASSWORD: &str = "tally-pw";

/// How the nodes take connections.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A plain-text port only.
    Plain,
    /// A TLS port only (`--port 0`); the cluster bus and replication over TLS too.
    Tls,
}

/// One `redis-server` of the cluster, stopped by PID on drop.
struct Node {
    port: u16,
    child: Option<Child>,
    _dir: TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The certificates of a TLS cluster (they sign the nodes' and are what the proxy trusts).
pub struct Certs {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    _dir: TempDir,
}

/// A three-primary cluster that requires credentials (see the module doc).
pub struct SecureCluster {
    nodes: Vec<Node>,
    pub certs: Option<Certs>,
}

impl SecureCluster {
    /// Starts three nodes and creates the cluster with `redis-cli --cluster create`; returns
    /// once every node says `cluster_state:ok` and they agree on the slot map.
    pub fn start(transport: Transport) -> SecureCluster {
        let certs = (transport == Transport::Tls).then(|| {
            let dir = TempDir::new("cluster-certs");
            let (ca, cert, key) = certificates(&dir);
            Certs {
                ca,
                cert,
                key,
                _dir: dir,
            }
        });
        let mut c = SecureCluster {
            nodes: Vec::new(),
            certs,
        };
        for _ in 0..3 {
            let node = c.launch();
            c.nodes.push(node);
        }
        let mut args = vec!["--cluster".to_string(), "create".to_string()];
        args.extend(c.seeds());
        args.push("--cluster-yes".into());
        let out = c.cli_output(None, &args);
        assert!(
            out.contains("All 16384 slots covered"),
            "cluster create: {out}"
        );
        c.wait_settled();
        c
    }

    /// A node on a free port (moved to another one, at most 5 tries, if it does not come up).
    fn launch(&self) -> Node {
        for _ in 0..5 {
            let port = free_port();
            let dir = TempDir::new("cluster-node");
            let mut cmd = Command::new("redis-server");
            match &self.certs {
                None => cmd.args(["--port", &port.to_string()]),
                Some(t) => cmd
                    .args(["--port", "0", "--tls-port", &port.to_string()])
                    .args(["--tls-cluster", "yes", "--tls-replication", "yes"])
                    .args(["--tls-auth-clients", "no"])
                    .arg("--tls-cert-file")
                    .arg(&t.cert)
                    .arg("--tls-key-file")
                    .arg(&t.key)
                    .arg("--tls-ca-cert-file")
                    .arg(&t.ca),
            };
            let child = cmd
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                .args(["--cluster-node-timeout", "2000"])
                .args(["--requirepass", PASSWORD, "--masterauth", PASSWORD])
                // `user <name> on ><password> ~* &* +@all`: the proxy's own ACL user.
                .args(["--user", USER, "on", &format!(">{USER_PASSWORD}")])
                .args(["~*", "&*", "+@all"])
                .arg("--dir")
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server must be installed (scripts/ensure-deps.sh)");
            let mut node = Node {
                port,
                child: Some(child),
                _dir: dir,
            };
            if wait_until(Duration::from_secs(5), || {
                self.cli(port, &["PING"]) == "PONG"
            }) {
                return node;
            }
            if let Some(mut c) = node.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        panic!("a cluster node did not start");
    }

    /// `127.0.0.1:<port>` of every node (TLS ports with TLS), for `[cluster] seeds`.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect()
    }

    /// `seeds = [...]` as a TOML array.
    pub fn seeds_toml(&self) -> String {
        let quoted: Vec<String> = self.seeds().iter().map(|a| format!("\"{a}\"")).collect();
        format!("[{}]", quoted.join(", "))
    }

    /// redis-cli's arguments to reach this cluster: the password, and TLS with the CA.
    fn cli_access(&self) -> Vec<String> {
        let mut a = vec![
            "-a".to_string(),
            PASSWORD.to_string(),
            "--no-auth-warning".to_string(),
        ];
        if let Some(t) = &self.certs {
            a.extend(["--tls".to_string(), "--cacert".to_string()]);
            a.push(t.ca.display().to_string());
        }
        a
    }

    /// redis-cli (at most 30 s) with this cluster's credentials, to `port` when given:
    /// stdout and stderr, trimmed.
    fn cli_output(&self, port: Option<u16>, args: &[String]) -> String {
        let mut cmd = Command::new("timeout");
        cmd.args(["30", "redis-cli"]).args(self.cli_access());
        if let Some(p) = port {
            cmd.args(["-p", &p.to_string()]);
        }
        let out = cmd
            .args(args)
            .output()
            .expect("redis-cli must be installed (scripts/ensure-deps.sh)");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
            + String::from_utf8_lossy(&out.stderr).trim()
    }

    /// One command on the node at `port`, by redis-cli: its output, trimmed.
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        self.cli_output(Some(port), &args)
    }

    /// The cluster as the node at `port` sees it.
    fn view_of(&self, port: u16) -> Vec<NodeInfo> {
        parse_nodes(&self.cli(port, &["CLUSTER", "NODES"]))
    }

    fn wait_settled(&self) {
        let mut last = String::new();
        let ok = wait_until(Duration::from_secs(30), || {
            let mut maps = Vec::new();
            for n in &self.nodes {
                let info = self.cli(n.port, &["CLUSTER", "INFO"]);
                if !info.contains("cluster_state:ok") {
                    last = format!("{}: {info}", n.port);
                    return false;
                }
                let mut map: Vec<(u16, Vec<(u16, u16)>)> = self
                    .view_of(n.port)
                    .into_iter()
                    .filter(|v| v.primary && !v.slots.is_empty())
                    .map(|v| (v.port, v.slots))
                    .collect();
                map.sort();
                maps.push(map);
            }
            if maps.windows(2).any(|w| w[0] != w[1]) || maps[0].len() != 3 {
                last = format!("the nodes disagree: {maps:?}");
                return false;
            }
            true
        });
        assert!(ok, "the secure cluster did not settle in 30 s ({last})");
    }

    /// The port of the primary serving `key`'s slot.
    pub fn node_for_key(&self, key: &str) -> u16 {
        let slot = slot_of(key.as_bytes());
        self.view_of(self.nodes[0].port)
            .into_iter()
            .find(|n| n.primary && n.slots.iter().any(|&(a, b)| (a..=b).contains(&slot)))
            .map(|n| n.port)
            .unwrap_or_else(|| panic!("no primary serves slot {slot}"))
    }

    /// Every node's port.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }
}
