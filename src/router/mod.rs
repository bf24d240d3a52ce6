//! Placement: which server owns a key, and whether it is moving. This is the seam every
//! other module asks ([`Router::owner`], [`Router::moving_from`], or a [`Topology`]
//! snapshot); how keys map to servers is the topology's [`Layout`]: today the ketama ring
//! of standalone shards, with a [`Migration`] while a rebalance moves keys; a Redis Cluster
//! slot map is the next layout, whose moves the cluster makes itself.
//!
//! Readers take a snapshot ([`Router::topology`]) that stays coherent for as long as they
//! hold it; a shard change publishes a whole new [`Topology`], with a [`Migration`] naming
//! the old one while keys move. Owns placement; does not own sockets (`backend`) or the
//! moving of keys between owners (`counter::moving`, `rebalance`).

pub mod ring;
pub mod slots;

use crate::backend::Shard;
use arc_swap::ArcSwap;
use ring::{Node, Ring};
use std::sync::Arc;

/// How keys map to the servers of a topology.
pub enum Layout {
    /// Consistent hashing over named shards (`ring`): `shards[ring.locate(key)]` owns `key`.
    Ring(Ring),
    /// A Redis Cluster's slot map (`slots`): the node serving `key_slot(key)` owns `key`.
    /// The cluster moves slots itself; the proxy follows (`cluster`).
    Cluster(slots::SlotMap),
}

/// One version of the server list and the layout built from it.
pub struct Topology {
    pub version: u64,
    layout: Layout,
    /// In layout order: the index the layout answers is an index into this list.
    pub shards: Vec<Arc<Shard>>,
}

impl Topology {
    pub fn new(version: u64, shards: Vec<Arc<Shard>>, vnodes: u32) -> Topology {
        let nodes = shards
            .iter()
            .map(|s| Node {
                name: s.name.clone(),
                weight: s.weight,
            })
            .collect();
        Topology {
            version,
            layout: Layout::Ring(Ring::new(nodes, vnodes)),
            shards,
        }
    }

    /// A Redis Cluster's nodes (the primaries, in `shards`) and which slots each serves.
    pub fn cluster(version: u64, shards: Vec<Arc<Shard>>, map: slots::SlotMap) -> Topology {
        Topology {
            version,
            layout: Layout::Cluster(map),
            shards,
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self.layout, Layout::Cluster(_))
    }

    /// The slot map, in cluster mode.
    pub fn slot_map(&self) -> Option<&slots::SlotMap> {
        match &self.layout {
            Layout::Cluster(m) => Some(m),
            Layout::Ring(_) => None,
        }
    }

    /// The unit of placement of `key`: keys with the same unit are served whole by one
    /// server, in one command (the shard in a ring; the slot in a cluster, which refuses a
    /// command whose keys span slots even on one node).
    pub fn place(&self, key: &[u8]) -> usize {
        match &self.layout {
            Layout::Ring(ring) => ring.locate(key),
            Layout::Cluster(_) => slots::key_slot(key) as usize,
        }
    }

    /// No shards: memory mode.
    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    /// The shard that owns `key`. Callers check `is_empty` first.
    pub fn shard_for(&self, key: &[u8]) -> &Arc<Shard> {
        &self.shards[self.shard_index(key)]
    }

    /// The server of cluster slot `slot` (the first server for an unserved slot, or in a
    /// ring, where slots mean nothing).
    pub fn slot_server(&self, slot: u16) -> &Arc<Shard> {
        let i = match &self.layout {
            Layout::Cluster(m) => m.node_of(slot).unwrap_or(0),
            Layout::Ring(_) => 0,
        };
        &self.shards[i]
    }

    pub fn shard_index(&self, key: &[u8]) -> usize {
        match &self.layout {
            Layout::Ring(ring) => ring.locate(key),
            // A slot no node serves goes to the first node, which answers CLUSTERDOWN.
            Layout::Cluster(m) => m.node_of(slots::key_slot(key)).unwrap_or(0),
        }
    }

    /// Fraction of the key space each shard owns, in `shards` order.
    pub fn shares(&self) -> Vec<f64> {
        match &self.layout {
            Layout::Ring(ring) => ring.shares(),
            Layout::Cluster(m) => m.shares(self.shards.len()),
        }
    }

    pub fn by_name(&self, name: &str) -> Option<&Arc<Shard>> {
        self.shards.iter().find(|s| s.name == name)
    }

    /// The shard (a cluster node) at `addr` now, e.g. where a `-MOVED` or `-ASK` points.
    pub fn by_addr(&self, addr: std::net::SocketAddr) -> Option<&Arc<Shard>> {
        self.shards.iter().find(|s| s.addr() == addr)
    }
}

/// A rebalance under way: keys whose owner differs between `old` and `new` may still have
/// (part of) their value on the old owner until they are moved (see `rebalance`).
pub struct Migration {
    pub id: u64,
    pub old: Arc<Topology>,
    pub new: Arc<Topology>,
    /// Moves of one key are serialised (by key hash), against each other and against the
    /// first read that needs the key whole.
    stripes: Vec<tokio::sync::Mutex<()>>,
    /// Keys moved so far (by the mover or by a first touch), per new owner.
    moved_into: parking_lot::Mutex<std::collections::HashMap<String, u64>>,
    /// Old shards an operator declared lost: nothing is moved off them.
    lost: parking_lot::RwLock<std::collections::HashSet<String>>,
}

impl Migration {
    pub fn new(id: u64, old: Arc<Topology>, new: Arc<Topology>) -> Migration {
        Migration {
            id,
            old,
            new,
            stripes: (0..64).map(|_| tokio::sync::Mutex::new(())).collect(),
            moved_into: Default::default(),
            lost: Default::default(),
        }
    }

    /// Declares old shard `name` lost: its values are gone, nothing is moved off it.
    pub fn set_lost(&self, name: &str) {
        self.lost.write().insert(name.to_string());
    }

    pub fn is_lost(&self, name: &str) -> bool {
        self.lost.read().contains(name)
    }

    pub fn lost(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lost.read().iter().cloned().collect();
        v.sort();
        v
    }

    /// Whether `key` changes owner in this rebalance.
    pub fn owner_changed(&self, key: &[u8]) -> bool {
        if self.old.is_empty() {
            return false;
        }
        self.old.shard_for(key).name != self.new.shard_for(key).name
    }

    pub fn note_moved(&self, into: &str) {
        *self.moved_into.lock().entry(into.to_string()).or_default() += 1;
    }

    pub fn moved_into(&self) -> std::collections::HashMap<String, u64> {
        self.moved_into.lock().clone()
    }

    pub fn stripe(&self, key: &[u8]) -> &tokio::sync::Mutex<()> {
        &self.stripes[ring::key_hash(key) as usize % self.stripes.len()]
    }
}

pub struct Router {
    current: ArcSwap<Topology>,
    migration: arc_swap::ArcSwapOption<Migration>,
    /// The version of each topology published, for those who wait for a newer one.
    published: tokio::sync::watch::Sender<u64>,
    /// Someone saw the placement go stale (a cluster's `-MOVED`): whoever maintains it
    /// (`cluster`) should look again soon.
    stale: tokio::sync::Notify,
}

impl Router {
    pub fn new(t: Topology) -> Router {
        let (published, _) = tokio::sync::watch::channel(t.version);
        Router {
            current: ArcSwap::from_pointee(t),
            migration: arc_swap::ArcSwapOption::empty(),
            published,
            stale: tokio::sync::Notify::new(),
        }
    }

    /// Says the placement looks stale. Cheap; many calls before the next look are one.
    pub fn report_stale(&self) {
        self.stale.notify_one();
    }

    /// Waits until someone reports the placement stale.
    pub async fn stale_reported(&self) {
        self.stale.notified().await
    }

    /// Waits (at most `max`) for a topology newer than version `than`; the current one.
    pub async fn newer_than(&self, than: u64, max: std::time::Duration) -> Arc<Topology> {
        let mut rx = self.published.subscribe();
        let _ = tokio::time::timeout(max, rx.wait_for(|&v| v > than)).await;
        self.topology()
    }

    /// The rebalance under way, if any.
    pub fn migration(&self) -> Option<Arc<Migration>> {
        self.migration.load_full()
    }

    /// Runs `f` on the rebalance under way, if any, without touching a reference count
    /// (this is on the hot path of every forwarded command).
    pub fn with_migration<R>(&self, f: impl FnOnce(&Migration) -> R) -> Option<R> {
        self.migration.load().as_deref().map(f)
    }

    /// Whether a rebalance is under way: one look for a command of many keys, which then
    /// asks [`Migration::owner_changed`] per key only when one is.
    pub fn rebalancing(&self) -> bool {
        self.migration.load().is_some()
    }

    /// Starts (or ends, with None) a rebalance. Set before the new ring is published, so
    /// that whoever sees the new ring also sees the rebalance.
    pub fn set_migration(&self, m: Option<Arc<Migration>>) {
        self.migration.store(m);
    }

    pub fn topology(&self) -> Arc<Topology> {
        self.current.load_full()
    }

    /// The server that owns `key` now (None in memory mode: no servers).
    pub fn owner(&self, key: &[u8]) -> Option<Arc<Shard>> {
        let t = self.current.load();
        (!t.is_empty()).then(|| t.shard_for(key).clone())
    }

    /// Whether `key` is moving: the server that may still hold (part of) its value, while a
    /// rebalance under way changes its owner.
    pub fn moving_from(&self, key: &[u8]) -> Option<Arc<Shard>> {
        self.with_migration(|m| m.owner_changed(key).then(|| m.old.shard_for(key).clone()))
            .flatten()
    }

    pub fn publish(&self, t: Topology) {
        self.publish_arc(Arc::new(t));
    }

    pub fn publish_arc(&self, t: Arc<Topology>) {
        let v = t.version;
        self.current.store(t);
        self.published.send_replace(v);
    }
}
