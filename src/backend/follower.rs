//! Following Sentinel-managed shards' primaries through failovers.
//!
//! A primary is whatever the sentinels name (`SENTINEL GET-MASTER-ADDR-BY-NAME`, asked of
//! each sentinel in turn) and itself answers `ROLE` as `master`; only then does the shard
//! move to it ([`sentinel::Primary::set`]), and every connection of the shard drops and
//! reconnects there. The question is asked at start-up, every `interval`, when a sentinel
//! publishes `+switch-master` (one subscription at a time, on the next sentinel when it
//! drops), and when a connection finds a replica where the primary was (`-READONLY`, or
//! `ROLE` on connect: `Primary::recheck`). Until a primary is confirmed the shard keeps the
//! one it knew: writes that reach a demoted one are refused by it, never applied.
//!
//! A new primary is also asked whether it is Redis at all (`identity`) before the shard
//! moves to it.
//!
//! Owns when the question is asked and what follows from the answer. Does not own the
//! sentinel protocol (`sentinel`) nor the connections (`conn`).

use super::sentinel::{self, Primary, Sentinels};
use super::{encode_command, identity, BackendConn, ConnOptions, Shard};
use crate::shutdown::Shutdown;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The sentinels as `config` names them.
pub fn sentinels(config: &crate::config::Config) -> Result<Sentinels, String> {
    let s = &config.sentinel;
    let auth = match &s.password {
        Some(pw) => {
            let mut args = vec!["AUTH".to_string()];
            args.extend(s.username.clone());
            args.push(pw.resolve("sentinel.password")?);
            Some(encode_command(&args))
        }
        None => None,
    };
    Ok(Sentinels {
        addrs: s.addrs.clone(),
        auth,
        timeout: config
            .backend
            .connect_timeout
            .0
            .max(config.backend.timeout.0),
    })
}

/// Where `master`'s primary is, confirmed by its own `ROLE`, and its replicas. `opts` says
/// how to connect to the shard (credentials, TLS).
pub async fn discover(
    s: &Sentinels,
    master: &str,
    opts: &ConnOptions,
) -> Result<(SocketAddr, Vec<SocketAddr>), String> {
    let addr = sentinel::master_addr(s, master).await?;
    let replicas = role(addr, opts).await?;
    Ok((addr, replicas))
}

/// Asks the server at `addr` its `ROLE`: its replicas when it is a primary.
pub async fn role(addr: SocketAddr, opts: &ConnOptions) -> Result<Vec<SocketAddr>, String> {
    let conn = BackendConn::spawn(ConnOptions {
        addr,
        primary: None,
        queue_depth: 2,
        ..opts.clone()
    });
    let wait = opts.connect_timeout + opts.request_timeout;
    match crate::deadline::within_for(wait, conn.send(encode_command(&["ROLE"]))).await {
        Ok(Ok(Ok(r))) => sentinel::parse_role(&r.frame)
            .ok_or_else(|| format!("{addr} is not a primary (ROLE answered {:?})", r.frame)),
        _ => Err(format!("{addr} did not answer ROLE")),
    }
}

/// Follows every Sentinel-managed shard of `shards` until shutdown.
/// Before the shard moves to a new primary, that server is asked whether it is Redis
/// (`identity`), as any shard is before it is used.
pub fn spawn(
    shards: Vec<Arc<Shard>>,
    s: Sentinels,
    interval: Duration,
    proxy_id: String,
    shutdown: Shutdown,
) {
    let followed: Vec<(Arc<Shard>, Arc<Primary>)> = shards
        .into_iter()
        .filter_map(|sh| sh.primary.clone().map(|p| (sh, p)))
        .collect();
    if followed.is_empty() {
        return;
    }
    for (shard, primary) in &followed {
        let (shard, primary, s, mut stop, proxy_id) = (
            shard.clone(),
            primary.clone(),
            s.clone(),
            shutdown.clone(),
            proxy_id.clone(),
        );
        crate::task::spawn(
            tracing::info_span!("follower", shard = %shard.name),
            async move {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut failing: Option<String> = None;
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = primary.recheck.notified() => {}
                        _ = stop.wait() => return,
                    }
                    if shard.retired.load(std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                    match discover(&s, &primary.master, &shard.conn_opts).await {
                        Ok((addr, replicas)) => {
                            if addr != primary.addr() {
                                let opts = ConnOptions {
                                    addr,
                                    primary: None,
                                    ..shard.conn_opts.clone()
                                };
                                if let Err(e) = identity::verify(&opts, &proxy_id).await {
                                    let e = e.message(addr);
                                    if failing.as_ref() != Some(&e) {
                                        tracing::error!(shard = %shard.name, master = %primary.master, error = %e, "the sentinels name a primary that is not usable as a shard; keeping the one known");
                                        failing = Some(e);
                                    }
                                    continue;
                                }
                            }
                            *primary.replicas.lock() = replicas;
                            let from = primary.addr();
                            if primary.set(addr) {
                                tracing::warn!(shard = %shard.name, master = %primary.master, %from, to = %addr, "primary moved");
                            }
                            if failing.take().is_some() {
                                tracing::info!(shard = %shard.name, primary = %addr, "primary confirmed");
                            }
                        }
                        Err(e) => {
                            if failing.as_ref() != Some(&e) {
                                tracing::warn!(shard = %shard.name, master = %primary.master, error = %e, "primary not confirmed; keeping the one known");
                                failing = Some(e);
                            }
                        }
                    }
                }
            },
        );
    }
    let mut stop = shutdown;
    crate::task::spawn(tracing::info_span!("sentinel_subscription"), async move {
        let mut next = 0usize;
        loop {
            let addr = s.addrs[next % s.addrs.len()];
            next += 1;
            let follow = sentinel::follow_switches(addr, &s, |msg| {
                let Some((name, to)) = sentinel::parse_switch(msg) else {
                    return;
                };
                for (shard, p) in &followed {
                    if p.master == name {
                        tracing::info!(shard = %shard.name, master = name, to = %to, "sentinel announced +switch-master");
                        p.recheck.notify_one();
                    }
                }
            });
            tokio::select! {
                why = follow => tracing::debug!(sentinel = %addr, error = %why, "sentinel subscription ended; trying the next"),
                _ = stop.wait() => return,
            }
            // Other shards re-check on their own ticks meanwhile: a switch missed while no
            // subscription stood is found within one interval.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = stop.wait() => return,
            }
        }
    });
}
