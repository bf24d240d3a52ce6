//! Integration tests: real redis-server processes, the proxy in-process or as the built
//! binary, real clients. One test binary (one link) for all suites.

mod support;

mod blocking;
mod cluster;
mod cluster_support;
mod core;
mod counters;
mod dashboard;
mod durability;
mod families;
mod full_disk;
mod hostile;
mod keyspace;
mod layers;
mod mget;
mod ops;
mod paced_flush;
mod protocol;
mod pubsub;
mod rebalance;
mod resp3;
mod same_shard;
mod security;
mod sentinel;
mod transactions;
mod window_flush;
mod windows;
