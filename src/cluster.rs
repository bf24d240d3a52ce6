//! A Redis Cluster behind the proxy: its slot map learned from the seeds and followed
//! while the cluster reshards and fails over.
//!
//! Start-up asks the seeds (`[cluster] seeds`) in turn until one answers with the map; the
//! map's primaries become the topology's servers (named `redis_<port>`, as shards), with a
//! `router::slots::SlotMap` as its layout. Afterwards the map is asked for again every
//! `refresh_interval`, and soon after anyone reports the placement stale (a `-MOVED` seen by
//! a forwarded command or a flush: `Router::report_stale`), at most once per
//! [`MIN_GAP`] however many report it. A changed map is published as a new topology; a node
//! seen for the first time gets its connections, its counter lane and a health checker.
//! Nodes are kept once made (a demoted primary may be promoted again).
//!
//! Owns which nodes the proxy knows and when the map is asked for. Does not own how a
//! command follows a redirection (`connection::redirect`, `counter::lane`), nor the slot
//! hashing (`router::slots`).

use crate::backend::cluster::{ask_map, ShardInfo};
use crate::backend::{health, Shard};
use crate::config::Config;
use crate::counter::lane::Lane;
use crate::counter::Engine;
use crate::router::slots::SlotMap;
use crate::router::{Router, Topology};
use crate::shutdown::Shutdown;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The least time between two looks at the map: a burst of `-MOVED` is one refresh.
pub const MIN_GAP: Duration = Duration::from_millis(100);

pub struct Cluster {
    config: Config,
    /// `[cluster] seeds`, as last (re)read (SIGHUP).
    seeds: Mutex<Vec<SocketAddr>>,
    /// Every node made so far, by address.
    nodes: Mutex<HashMap<SocketAddr, Arc<Shard>>>,
    /// The map as last read, for `/admin/shards`.
    view: Mutex<Vec<ShardInfo>>,
    pub refreshes: AtomicU64,
    pub refresh_errors: AtomicU64,
    /// Why the last look failed, until one succeeds.
    last_error: Mutex<Option<String>>,
}

impl Cluster {
    /// Asks the seeds for the map (for up to `connect_timeout` × 10 in all, since a cluster
    /// may be forming) and builds the first topology. Fails when no seed answers with a map
    /// that serves slots: the proxy does not start against a cluster it cannot see.
    pub async fn start(config: &Config) -> Result<(Arc<Cluster>, Topology), String> {
        let c = Arc::new(Cluster {
            config: config.clone(),
            seeds: Mutex::new(
                config
                    .cluster
                    .as_ref()
                    .map(|c| c.seeds.clone())
                    .unwrap_or_default(),
            ),
            nodes: Mutex::default(),
            view: Mutex::default(),
            refreshes: AtomicU64::new(0),
            refresh_errors: AtomicU64::new(0),
            last_error: Mutex::default(),
        });
        let deadline = Instant::now() + config.backend.connect_timeout.0 * 10;
        let mut backoff =
            crate::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        loop {
            match c.ask(&[]).await {
                Ok(view) if serves_slots(&view) => {
                    let (t, _) = c.topology_of(1, &view)?;
                    *c.view.lock() = view;
                    return Ok((c, t));
                }
                Ok(view) => *c.last_error.lock() = Some(unserved(&view)),
                Err(e) => *c.last_error.lock() = Some(e),
            }
            if Instant::now() >= deadline {
                let why = c.last_error.lock().clone().unwrap_or_default();
                return Err(format!("cluster: no seed answered with a slot map: {why}"));
            }
            tokio::time::sleep(backoff.next_wait()).await;
        }
    }

    /// Asks the current primaries (`first`), then the seeds, until one answers.
    async fn ask(&self, first: &[SocketAddr]) -> Result<Vec<ShardInfo>, String> {
        let seeds = self.seeds.lock().clone();
        let wait = self
            .config
            .backend
            .timeout
            .0
            .max(Duration::from_millis(500));
        let mut errors = Vec::new();
        let mut asked = std::collections::HashSet::new();
        for addr in first.iter().chain(seeds.iter()) {
            if !asked.insert(*addr) {
                continue;
            }
            let opts = Shard::conn_options(&node_name(*addr), *addr, &self.config)?;
            match ask_map(&opts, wait).await {
                Ok(view) => return Ok(view),
                Err(e) => errors.push(format!("{addr}: {e}")),
            }
        }
        Err(errors.join("; "))
    }

    /// The topology of `view`: its primaries in address order, and which serves each slot.
    /// Also returns the nodes made for it (new ones need a lane and a health checker).
    fn topology_of(
        &self,
        version: u64,
        view: &[ShardInfo],
    ) -> Result<(Topology, Vec<Arc<Shard>>), String> {
        // Primaries serving slots, and healthy ones serving none yet (a node just added gets
        // its first slot by a migration, whose -ASK must find it); not a failed one left
        // without slots by a failover (fan-outs would wait on it).
        let mut primaries: Vec<SocketAddr> = view
            .iter()
            .filter(|s| !s.ranges.is_empty() || s.primary().is_some_and(|p| p.health == "online"))
            .filter_map(|s| s.primary().map(|p| p.addr))
            .collect();
        primaries.sort();
        primaries.dedup();
        let mut made = Vec::new();
        let mut shards = Vec::with_capacity(primaries.len());
        {
            let mut nodes = self.nodes.lock();
            for addr in &primaries {
                let shard = match nodes.get(addr) {
                    Some(s) => s.clone(),
                    None => {
                        let s = Shard::new(node_name(*addr), *addr, 1, &self.config)?;
                        nodes.insert(*addr, s.clone());
                        made.push(s.clone());
                        s
                    }
                };
                shards.push(shard);
            }
        }
        let mut map = SlotMap::default();
        for s in view {
            let Some(p) = s.primary() else { continue };
            let Some(i) = primaries.iter().position(|a| *a == p.addr) else {
                continue;
            };
            for &(a, b) in &s.ranges {
                map.assign(a, b, i);
            }
        }
        Ok((Topology::cluster(version, shards, map), made))
    }

    /// New seeds (a re-read config): asked from the next look on.
    pub fn set_seeds(&self, seeds: Vec<SocketAddr>) {
        *self.seeds.lock() = seeds;
    }

    /// The node at `addr`, if the proxy has made it.
    pub fn node(&self, addr: SocketAddr) -> Option<Arc<Shard>> {
        self.nodes.lock().get(&addr).cloned()
    }

    /// The map as last read.
    pub fn view(&self) -> Vec<ShardInfo> {
        self.view.lock().clone()
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().clone()
    }

    /// Follows the map until shutdown (see the module doc). Nodes made at start-up must
    /// already have their lanes; their health checkers are started here.
    pub fn spawn(self: &Arc<Self>, router: Arc<Router>, engine: Arc<Engine>, shutdown: Shutdown) {
        for s in router.topology().shards.iter() {
            self.check_health(s, &engine, &shutdown);
        }
        let c = self.clone();
        crate::task::spawn(tracing::info_span!("cluster"), async move {
            let every = c
                .config
                .cluster
                .as_ref()
                .map(|c| c.refresh_interval.0)
                .unwrap_or(Duration::from_secs(5));
            let mut stop = shutdown.clone();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = router.stale_reported() => {}
                    _ = stop.wait() => return,
                }
                c.refresh(&router, &engine, &shutdown).await;
                // However many report it meanwhile, the next look waits this long.
                tokio::time::sleep(MIN_GAP).await;
            }
        });
    }

    fn check_health(&self, s: &Arc<Shard>, engine: &Engine, shutdown: &Shutdown) {
        health::spawn_for(
            s.clone(),
            &self.config.backend,
            engine.proxy_id.clone(),
            shutdown.clone(),
        );
    }

    /// Asks for the map once and publishes it when it changed.
    pub async fn refresh(&self, router: &Router, engine: &Arc<Engine>, shutdown: &Shutdown) {
        let current = router.topology();
        let first: Vec<SocketAddr> = current.shards.iter().map(|s| s.addr()).collect();
        self.refreshes.fetch_add(1, Ordering::Relaxed);
        let view = match self.ask(&first).await {
            Ok(v) if serves_slots(&v) => v,
            Ok(v) => return self.failed(unserved(&v)),
            Err(e) => return self.failed(e),
        };
        *self.last_error.lock() = None;
        let (next, made) = match self.topology_of(current.version + 1, &view) {
            Ok(t) => t,
            Err(e) => return self.failed(e),
        };
        *self.view.lock() = view;
        for s in &made {
            engine.add_lane(Lane::spawn(s.clone(), engine));
            self.check_health(s, engine, shutdown);
        }
        if same(&current, &next) {
            return;
        }
        tracing::info!(
            version = next.version,
            primaries = %next.shards.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(","),
            "cluster slot map changed"
        );
        router.publish(next);
    }

    fn failed(&self, why: String) {
        self.refresh_errors.fetch_add(1, Ordering::Relaxed);
        let mut last = self.last_error.lock();
        if last.as_deref() != Some(why.as_str()) {
            tracing::warn!(error = %why, "cluster slot map could not be read");
        }
        *last = Some(why);
    }
}

/// Whether a map serves any slot from a primary the proxy can dial (a cluster still forming
/// serves none; a map whose primaries list no port of the proxy's kind, plain or TLS, is
/// not served either: its slots would have no server).
fn serves_slots(view: &[ShardInfo]) -> bool {
    view.iter()
        .any(|s| !s.ranges.is_empty() && s.primary().is_some())
}

/// Why a map that does not [`serves_slots`] is not used.
fn unserved(view: &[ShardInfo]) -> String {
    if view.iter().any(|s| !s.ranges.is_empty()) {
        "the slot map names no primary with a port the proxy can dial \
         (nodes with only a TLS port need [backend] tls = true)"
            .to_string()
    } else {
        "the cluster serves no slots yet".to_string()
    }
}

/// Whether two topologies route every slot to the same servers.
fn same(a: &Topology, b: &Topology) -> bool {
    let names = |t: &Topology| t.shards.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
    if names(a) != names(b) {
        return false;
    }
    match (a.slot_map(), b.slot_map()) {
        (Some(x), Some(y)) => (0..a.shards.len()).all(|i| x.ranges_of(i) == y.ranges_of(i)),
        _ => false,
    }
}

/// A node's name (`served_via` says it): `redis_<port>` on this host, as a shard's default;
/// `redis_<ip>_<port>` elsewhere, where clusters often use one port on every host.
pub fn node_name(addr: SocketAddr) -> String {
    if addr.ip().is_loopback() {
        format!("redis_{}", addr.port())
    } else {
        format!("redis_{}_{}", addr.ip(), addr.port())
    }
}
