//! Shard health: a PING every `health_interval` on a connection of its own.
//!
//! After `health_failures` failed checks in a row a shard is marked down, after one success up
//! again; each change is one log line. Before a shard is marked up again (and before a shard
//! that could not be asked at start-up is used at all) it must still be Redis: it is asked
//! `INFO server` (see `identity`); a shard that answers as something else (a tallyproxy, say)
//! stays down, unused, with an error in the log. Down only changes how fast requests fail (at once
//! instead of after the timeout) and what the flusher waits for: the ring never changes on
//! health, so a down shard's keys are never remapped and counts are never split.

use super::{encode_command, identity, BackendConn, ConnOptions, Shard};
use crate::shutdown::Shutdown;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// [`spawn_checker`] with `[backend]`'s interval, failures and connect timeout.
pub fn spawn_for(
    shard: Arc<Shard>,
    cfg: &crate::config::BackendConfig,
    proxy_id: String,
    shutdown: Shutdown,
) {
    spawn_checker(
        shard,
        cfg.health_interval.0,
        cfg.health_failures,
        cfg.connect_timeout.0,
        proxy_id,
        shutdown,
    );
}

pub fn spawn_checker(
    shard: Arc<Shard>,
    interval: Duration,
    failures: u32,
    connect_timeout: Duration,
    proxy_id: String,
    mut shutdown: Shutdown,
) {
    let conn = BackendConn::spawn(ConnOptions {
        connect_timeout,
        request_timeout: interval,
        queue_depth: 4,
        ..shard.conn_opts.clone()
    });
    crate::task::spawn(
        tracing::info_span!("health", shard = %shard.name),
        async move {
            let ping = encode_command(&["PING"]);
            let mut failed = 0u32;
            // The last identity refusal logged, so that it is logged once, not every interval.
            let mut refused: Option<identity::NotRedis> = None;
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
                let mut ok = matches!(
                    crate::deadline::within_for(interval, conn.send(ping.clone())).await,
                    Ok(Ok(Ok(r))) if r.error().is_none()
                );
                if ok && (!shard.is_up() || !shard.is_verified()) {
                    match identity::verify(&shard.conn_opts, &proxy_id).await {
                        Ok(()) => {
                            refused = None;
                            if shard.unverified.swap(false, Ordering::Relaxed) {
                                tracing::info!(shard = %shard.name, "shard answers as a Redis server");
                            }
                        }
                        Err(e) if e.is_unreachable() => {
                            ok = false;
                            if matches!(e, identity::NotRedis::Refused(_))
                                && refused.as_ref() != Some(&e)
                            {
                                tracing::warn!(shard = %shard.name, error = %e.message(shard.addr()), "shard cannot be asked whether it is Redis; nothing is sent to it");
                                refused = Some(e);
                            }
                        }
                        Err(e) => {
                            ok = false;
                            failed = failures;
                            shard.unverified.store(true, Ordering::Relaxed);
                            if refused.as_ref() != Some(&e) {
                                tracing::error!(shard = %shard.name, error = %e.message(shard.addr()), "shard is not a Redis server; nothing is sent to it");
                                refused = Some(e);
                            }
                        }
                    }
                }
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
        },
    );
}
