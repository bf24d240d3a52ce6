//! tallyproxy: a Redis protocol proxy built for counters.
//!
//! A map of the modules, in the order a request meets them:
//!
//! - [`config`]: `proxy.toml`, validated before anything binds.
//! - [`server`]: listeners, the connection cap, shutdown order; [`server::run`] is the entry.
//! - [`context`]: what the front doors and the server share.
//! - [`connection`]: one client: requests in, dispatch, replies out in order; with
//!   `connection::local` (commands the proxy answers: PING, HELLO, COMMAND, INFO, ...) and
//!   `connection::multi` (multi-key commands split by shard and merged).
//! - [`resp`]: request framing (with its size guard) and reply encoding.
//! - [`command`]: the command table: arity and what each command is to the proxy.
//! - [`counter`]: merged increments, the read cache, exactly-once flushes, the log.
//! - [`router`]: the ketama ring and the current shard list.
//! - [`rebalance`]: shards added and removed at run time, keys moved online.
//! - [`backend`]: pipelined connections to shards, timeouts, health.
//! - [`http`]: the sidecar: /visits, /healthz, /readyz, /metrics, /admin.
//! - [`info`], [`metrics`]: figures for INFO and /metrics; [`activity`]: the busiest pages.
//! - [`auth`], [`tls`]: who may connect, and encryption on both sides.
//! - [`shutdown`]: the signal every task holds; [`backoff`]: waits between retries.
//! - [`task`]: spawning tasks inside a named tracing span.
//! - [`spec`]: shard lists as data (config, log, rebalance).
//! - [`clock`]: the wall clock of time windows (a test's own, in tests), and the text forms
//!   of times and spans.
#![forbid(unsafe_code)]

pub mod activity;
pub mod auth;
pub mod backend;
pub mod backoff;
pub mod clock;
pub mod cluster;
pub mod command;
pub mod config;
pub mod connection;
pub mod context;
pub mod counter;
pub mod deadline;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod info;
pub mod metrics;
pub mod rebalance;
pub mod resp;
pub mod router;
pub mod server;
pub mod shutdown;
pub mod spec;
pub mod task;
pub mod tls;

pub use config::Config;
pub use server::run;
