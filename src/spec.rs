//! Shard lists as data: what `[[shards]]` declares, what the write-ahead log records, and
//! what a rebalance moves between. A leaf: the config, the log, the router and the control
//! plane all speak of shards with these types, and none of them owns them.

/// A shard as the log records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSpec {
    pub name: String,
    pub addr: String,
    pub weight: u32,
}

/// How a Sentinel-managed shard's address is recorded: `master:<master name>`.
pub const MASTER_PREFIX: &str = "master:";

impl ShardSpec {
    /// The Sentinel master name of a shard recorded as `master:<name>`.
    pub fn master(&self) -> Option<&str> {
        self.addr.strip_prefix(MASTER_PREFIX)
    }
}

/// The shard list in force and, while keys move, the list they move from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Placement {
    pub version: u64,
    pub shards: Vec<ShardSpec>,
    /// (rebalance id, the previous shard list) while a rebalance is under way.
    pub migration: Option<(u64, Vec<ShardSpec>)>,
}
