//! Integration tests: real redis-server processes, the proxy in-process or as the built
//! binary, real clients. One test binary (one link) for all suites.

mod support;

mod cluster;
mod cluster_support;
mod core;
mod counters;
mod dashboard;
mod durability;
mod full_disk;
mod hostile;
mod keyspace;
mod layers;
mod ops;
mod protocol;
mod rebalance;
mod resp3;
mod same_shard;
mod security;
mod sentinel;
mod windows;
