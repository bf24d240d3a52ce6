//! tallyproxy: a Redis protocol proxy built for counters.
//!
//! A map of the modules, in the order a request meets them:
//!
//! - [`config`]: `proxy.toml`, validated before anything binds.
//! - [`server`]: listeners, the connection cap, shutdown order; [`server::run`] is the entry.
//! - [`connection`]: one client: requests in, dispatch, replies out in order.
//! - [`resp`]: request framing (with its size guard) and reply encoding.
//! - [`command`]: the command table: arity and what each command is to the proxy.
//! - [`multi`]: multi-key commands split by shard and merged.
//! - [`local`]: commands answered by the proxy (PING, HELLO, COMMAND, INFO, ...).
//! - [`counter`]: merged increments, the read cache, exactly-once flushes, the log.
//! - [`router`]: the ketama ring and the current shard list.
//! - [`rebalance`]: shards added and removed at run time, keys moved online.
//! - [`backend`]: pipelined connections to shards, timeouts, health.
//! - [`http`]: the sidecar: /visits, /healthz, /readyz, /metrics, /admin.
//! - [`info`], [`metrics`]: figures for INFO and /metrics; [`activity`]: the busiest pages.
//! - [`auth`], [`tls`]: who may connect, and encryption on both sides.
//! - [`shutdown`]: the signal every task holds.
//! - [`clock`]: the wall clock of time windows (a test's own, in tests), and the text forms
//!   of times and spans.
#![forbid(unsafe_code)]

pub mod activity;
pub mod auth;
pub mod backend;
pub mod clock;
pub mod command;
pub mod config;
pub mod connection;
pub mod counter;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod info;
pub mod local;
pub mod metrics;
pub mod multi;
pub mod rebalance;
pub mod resp;
pub mod router;
pub mod server;
pub mod shutdown;
pub mod tls;

pub use config::Config;
pub use server::run;
