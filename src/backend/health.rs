//! Shard health: a PING every `health_interval` on a connection of its own.
//!
//! After `health_failures` failed checks in a row a shard is marked down, after one success up
//! again; each change is one log line. Down only changes how fast requests fail (at once
//! instead of after the timeout) and what the flusher waits for: the ring never changes on
//! health, so a down shard's keys are never remapped and counts are never split.

use super::{encode_command, BackendConn, ConnOptions, Shard};
use crate::shutdown::Shutdown;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

pub fn spawn_checker(
    shard: Arc<Shard>,
    interval: Duration,
    failures: u32,
    connect_timeout: Duration,
    mut shutdown: Shutdown,
) {
    let conn = BackendConn::spawn(ConnOptions {
        connect_timeout,
        request_timeout: interval,
        queue_depth: 4,
        ..shard.conn_opts.clone()
    });
    tokio::spawn(async move {
        let ping = encode_command(&["PING"]);
        let mut failed = 0u32;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.wait() => return,
            }
            if shard.retired.load(Ordering::Relaxed) {
                return;
            }
            let ok = matches!(
                tokio::time::timeout(interval, conn.send(ping.clone())).await,
                Ok(Ok(Ok(r))) if r.error().is_none()
            );
            if ok {
                failed = 0;
                if !shard.up.swap(true, Ordering::Relaxed) {
                    tracing::info!(shard = %shard.name, "shard is up");
                    crate::metrics::global()
                        .shard_transitions
                        .fetch_add(1, Ordering::Relaxed);
                }
            } else {
                failed += 1;
                if failed >= failures && shard.up.swap(false, Ordering::Relaxed) {
                    tracing::warn!(shard = %shard.name, failed_checks = failed, "shard is down");
                    crate::metrics::global()
                        .shard_transitions
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
}
