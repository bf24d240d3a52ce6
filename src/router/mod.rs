//! Which shard owns a key: the current ring version and its shards, swapped atomically.
//!
//! Readers take a snapshot ([`Router::topology`]) that stays coherent for as long as they
//! hold it; a shard change publishes a whole new [`Topology`]. Owns placement; does not own
//! sockets (`backend`) or the moving of keys between owners.

pub mod ring;

use crate::backend::Shard;
use arc_swap::ArcSwap;
use ring::{Node, Ring};
use std::sync::Arc;

/// One version of the shard list and the ring built from it.
pub struct Topology {
    pub version: u64,
    pub ring: Ring,
    /// In ring node order: `shards[ring.locate(key)]` owns `key`.
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
            ring: Ring::new(nodes, vnodes),
            shards,
        }
    }

    /// No shards: memory mode.
    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    /// The shard that owns `key`. Callers check `is_empty` first.
    pub fn shard_for(&self, key: &[u8]) -> &Arc<Shard> {
        &self.shards[self.ring.locate(key)]
    }

    pub fn shard_index(&self, key: &[u8]) -> usize {
        self.ring.locate(key)
    }

    pub fn by_name(&self, name: &str) -> Option<&Arc<Shard>> {
        self.shards.iter().find(|s| s.name == name)
    }
}

pub struct Router {
    current: ArcSwap<Topology>,
}

impl Router {
    pub fn new(t: Topology) -> Router {
        Router {
            current: ArcSwap::from_pointee(t),
        }
    }

    pub fn topology(&self) -> Arc<Topology> {
        self.current.load_full()
    }

    pub fn publish(&self, t: Topology) {
        self.current.store(Arc::new(t));
    }
}
