//! Spawning tasks with a name: every long-lived task runs inside a tracing span (shard,
//! lane, mover, client, ...), so that a log line says whose it is.
//!
//! A leaf: names no other module.

use std::future::Future;
use tracing::Instrument;

/// Spawns `fut` on the runtime inside `span`.
pub fn spawn<F>(span: tracing::Span, fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(fut.instrument(span))
}
