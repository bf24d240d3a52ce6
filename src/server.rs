//! The proxy as a whole: start-up, the RESP listener, and orderly shutdown.
//!
//! [`run`] takes a validated config and bound listeners (so tests bind port 0 and read the
//! address) and returns when shutdown has completed: stop accepting (RESP and HTTP), let
//! connections finish the command in hand, final flush, sync the log, wait for the sidecar
//! to drain its requests, all under `shutdown_timeout`.
//!
//! Owns the listener, the connection cap and the shutdown order. Does not own what happens
//! on a connection (`connection`).

use crate::backend::sentinel::{Primary, Sentinels};
use crate::backend::{follower, health, Shard};
use crate::backoff::Backoff;
use crate::config::Config;
use crate::context::Context;
use crate::counter::{self, lane::Lane, Engine};
use crate::rebalance::Rebalancer;
use crate::resp::Limits;
use crate::router::{Router, Topology};
use crate::shutdown::{Shutdown, ShutdownTrigger};
use crate::spec::{Placement, ShardSpec};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// What the log said about shards at start-up, for `settle_shards` once everything runs.
pub struct Startup {
    configured: Vec<ShardSpec>,
    placement: Option<Placement>,
    moved: std::collections::HashSet<bytes::Bytes>,
}

/// Whether two shard lists are the same set (order in the file does not matter).
fn same_shards(a: &[ShardSpec], b: &[ShardSpec]) -> bool {
    let key = |s: &ShardSpec| (s.name.clone(), s.addr.clone(), s.weight);
    let mut a: Vec<_> = a.iter().map(key).collect();
    let mut b: Vec<_> = b.iter().map(key).collect();
    a.sort();
    b.sort();
    a == b
}

/// Records the shard list at first start, resumes a rebalance a restart interrupted, and
/// applies a config whose shard list differs from the recorded one, as a rebalance.
async fn settle_shards(ctx: &Arc<Context>, st: Startup) {
    // A cluster places keys itself: no shard list to record or rebalance to.
    if ctx.engine.is_memory_mode() || ctx.cluster.is_some() {
        return;
    }
    match &st.placement {
        Some(p) if p.migration.is_some() => {
            ctx.rebalancer.resume(p, st.moved).await;
            if !same_shards(&p.shards, &st.configured) {
                tracing::warn!("the config's shard list differs from the rebalance under way; apply it with SIGHUP once GET /admin/rebalance says done");
            }
        }
        Some(p) if !same_shards(&p.shards, &st.configured) => {
            tracing::info!(
                "the config's shard list differs from the recorded one; applying it as a rebalance"
            );
            if let Err(e) = ctx.rebalancer.change(st.configured, &ctx.config).await {
                tracing::error!(error = %e.0, "the config's shard list was not applied; the recorded one stays in force");
            }
        }
        Some(_) => {}
        None => {
            let pl = Placement {
                version: 1,
                shards: st.configured,
                migration: None,
            };
            let _ = ctx.engine.log_placement(&pl).await;
        }
    }
}

/// Asks every shard whether it is Redis (see `backend::identity`), all at once, before
/// anything is sent to them. One that answers as something else (a tallyproxy, say) stops
/// start-up. One that cannot be asked (down: a supported state) is allowed, marked down and
/// unverified; the health checker asks it when it answers, and nothing is sent to it before.
async fn verify_shards(shards: &[Arc<Shard>], proxy_id: &str) -> std::io::Result<()> {
    let mut checks = tokio::task::JoinSet::new();
    for s in shards {
        let (s, id) = (s.clone(), proxy_id.to_string());
        checks.spawn(async move {
            let r = crate::backend::identity::verify(&s.conn_opts, &id).await;
            (s, r)
        });
    }
    let mut refused = Vec::new();
    while let Some(done) = checks.join_next().await {
        let Ok((s, r)) = done else { continue };
        match r {
            Ok(()) => {}
            Err(e) if e.is_unreachable() => {
                tracing::warn!(shard = %s.name, error = %e.message(s.addr()), "shard cannot be asked whether it is Redis; it is used once it answers as Redis");
                s.unverified.store(true, Ordering::Relaxed);
                s.up.store(false, Ordering::Relaxed);
            }
            Err(e) => refused.push(format!("shard {}: {}", s.name, e.message(s.addr()))),
        }
    }
    if refused.is_empty() {
        Ok(())
    } else {
        refused.sort();
        Err(std::io::Error::other(refused.join("; ")))
    }
}

/// A Sentinel-managed shard, at the primary the sentinels name and `ROLE` confirms. When
/// none is confirmed now the shard starts at no address (down, unverified) and the
/// follower finds the primary later.
async fn primary_shard(
    s: &ShardSpec,
    master: &str,
    sentinels: &Sentinels,
    config: &Config,
) -> Result<Arc<Shard>, String> {
    let nowhere = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let opts = Shard::conn_options(&s.name, nowhere, config)?;
    let (addr, replicas) = match follower::discover(sentinels, master, &opts).await {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(shard = %s.name, master, error = %e, "no primary confirmed at start-up; following the sentinels");
            (nowhere, Vec::new())
        }
    };
    let primary = Arc::new(Primary::new(master.to_string(), addr));
    *primary.replicas.lock() = replicas;
    Shard::with_primary(s.name.clone(), primary, s.weight, config)
}

/// Builds the shards, the engine and its lanes, and replays the log. Nothing listens yet.
/// Returns the context and what start-up still has to apply (see `settle_shards`).
pub async fn build(
    config: Config,
    shutdown: ShutdownTrigger,
) -> std::io::Result<(Arc<Context>, Startup)> {
    let configured = config.shard_specs();
    let (wal, mut recovered) = if config.durability.enabled {
        let (w, r) = counter::wal::Wal::open(&config.durability)?;
        (Some(w), Some(r))
    } else {
        (None, None)
    };
    // The shard list in force is the one the log recorded last (runtime changes are
    // recorded there); the config's list is applied over it as a change (see `run`).
    // Memory mode (no shards configured) ignores any recorded list.
    let placement = recovered
        .as_mut()
        .and_then(|r| r.placement.take())
        .filter(|p| !configured.is_empty() && !p.shards.is_empty());
    let moved = recovered
        .as_mut()
        .map(|r| std::mem::take(&mut r.moved))
        .unwrap_or_default();
    let (specs, version) = match &placement {
        Some(p) => (p.shards.clone(), p.version),
        None => (configured.clone(), 1),
    };
    let sentinels = follower::sentinels(&config).map_err(std::io::Error::other)?;
    let mut shards: Vec<Arc<Shard>> = Vec::with_capacity(specs.len());
    let cluster = match &config.cluster {
        Some(_) => {
            let (c, t) = crate::cluster::Cluster::start(&config)
                .await
                .map_err(std::io::Error::other)?;
            shards = t.shards.clone();
            Some((c, t))
        }
        None => None,
    };
    for s in &specs {
        let shard = match s.master() {
            Some(master) => primary_shard(s, master, &sentinels, &config).await,
            None => Shard::new(
                s.name.clone(),
                s.addr.parse().expect("validated when recorded"),
                s.weight,
                &config,
            ),
        };
        shards.push(shard.map_err(std::io::Error::other)?);
    }
    let proxy_id = match (&config.durability.proxy_id, &recovered) {
        (Some(id), _) => id.clone(),
        (None, Some(r)) => r.proxy_id.clone(),
        (None, None) => format!("p{:x}", counter::now_micros()),
    };
    verify_shards(&shards, &proxy_id).await?;
    let (cluster, topology) = match cluster {
        Some((c, t)) => (Some(c), t),
        None => (
            None,
            Topology::new(version, shards.clone(), config.ring.vnodes),
        ),
    };
    let router = Arc::new(Router::new(topology));
    let first_seq = recovered.as_ref().map(|r| r.next_seq).unwrap_or(0);
    let mut engine = Engine::new(
        &config.counters,
        counter::windows::Windows::from_config(&config.windows),
        config.clock.clone(),
        router.clone(),
        proxy_id,
        first_seq,
    );
    if let Some(w) = &wal {
        engine.set_wal(w.clone());
    }
    for s in &shards {
        engine.add_lane(Lane::spawn(s.clone(), &engine));
    }
    if let Some(r) = recovered {
        counter::wal::restore(&engine, r).await;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let ctx = Context {
        limits: Limits::from(&config.limits),
        input_budget: crate::resp::budget::InputBudget::new(config.limits.max_input_bytes),
        dedicated: crate::backend::dedicated::Limit::new(config.backend.max_dedicated),
        users: crate::auth::Users::from_config(&config).map_err(std::io::Error::other)?,
        admin_token: match &config.admin_token {
            Some(t) => Some(t.resolve("admin_token").map_err(std::io::Error::other)?),
            None => None,
        },
        rebalancer: Rebalancer::new(
            engine.clone(),
            router.clone(),
            config.clone(),
            shutdown.clone(),
        ),
        config,
        router,
        engine,
        cluster,
        started: Instant::now(),
        started_unix: now,
        next_client_id: AtomicU64::new(1),
        shutdown,
    };
    let startup = Startup {
        configured,
        placement,
        moved,
    };
    Ok((Arc::new(ctx), startup))
}

/// Runs the proxy on bound listeners until `shutdown` fires, then shuts down in order.
pub async fn run(
    config: Config,
    listener: TcpListener,
    http: TcpListener,
    trigger: ShutdownTrigger,
) -> std::io::Result<()> {
    run_with_reload(config, listener, http, trigger, None).await
}

/// [`run`], plus re-read configs (SIGHUP): their shard list is applied as a rebalance.
pub async fn run_with_reload(
    config: Config,
    listener: TcpListener,
    http: TcpListener,
    trigger: ShutdownTrigger,
    reload: Option<tokio::sync::mpsc::Receiver<Config>>,
) -> std::io::Result<()> {
    let shutdown = trigger.subscribe();
    let (ctx, startup) = build(config, trigger.clone()).await?;
    if let Some(c) = &ctx.cluster {
        c.spawn(ctx.router.clone(), ctx.engine.clone(), shutdown.clone());
    }
    for s in ctx
        .router
        .topology()
        .shards
        .iter()
        .filter(|_| ctx.cluster.is_none())
    {
        health::spawn_for(
            s.clone(),
            &ctx.config.backend,
            ctx.engine.proxy_id.clone(),
            shutdown.clone(),
        );
    }
    {
        let b = &ctx.config.backend;
        let sentinels = follower::sentinels(&ctx.config).map_err(std::io::Error::other)?;
        follower::spawn(
            ctx.router.topology().shards.clone(),
            sentinels,
            b.health_interval.0,
            ctx.engine.proxy_id.clone(),
            shutdown.clone(),
        );
    }
    counter::spawn_background(
        ctx.engine.clone(),
        ctx.config.counters.flush_interval.0,
        ctx.config.counters.flush_spread_time(),
        ctx.config.counters.cache_ttl.0,
        shutdown.clone(),
    );
    ctx.engine.spawn_log_background(shutdown.clone());
    settle_shards(&ctx, startup).await;
    {
        // Histogram buffers drain on scrape or here, whichever comes first.
        let mut stop = shutdown.clone();
        crate::task::spawn(tracing::info_span!("metrics_upkeep"), async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = tick.tick() => crate::metrics::upkeep(),
                    _ = stop.wait() => return,
                }
            }
        });
    }
    if let Some(mut reload) = reload {
        let ctx = ctx.clone();
        crate::task::spawn(tracing::info_span!("reload"), async move {
            while let Some(cfg) = reload.recv().await {
                if let Some(c) = &ctx.cluster {
                    match &cfg.cluster {
                        Some(new) => {
                            c.set_seeds(new.seeds.clone());
                            ctx.router.report_stale();
                            tracing::info!(seeds = new.seeds.len(), "config reloaded: cluster seeds re-read");
                        }
                        None => tracing::warn!("config reloaded: it has no [cluster]; a cluster proxy cannot change to shards without a restart"),
                    }
                    continue;
                }
                let specs = cfg.shard_specs();
                match ctx.rebalancer.change(specs, &cfg).await {
                    Ok(p) => tracing::info!(
                        id = p.id,
                        to = p.to_version,
                        "config reloaded: rebalancing to the new shard list"
                    ),
                    Err(e) => {
                        tracing::warn!(error = %e.0, "config reloaded: shard list not changed")
                    }
                }
            }
        });
    }
    let http_task = crate::task::spawn(
        tracing::info_span!("http"),
        crate::http::serve(http, ctx.clone(), shutdown.clone()),
    );
    tracing::info!(
        listen = %listener.local_addr()?,
        shards = ctx.router.topology().shards.len(),
        memory_mode = ctx.engine.is_memory_mode(),
        "tallyproxy ready"
    );

    let limit = Arc::new(Semaphore::new(ctx.config.maxclients));
    accept_loop(&ctx, &listener, &limit, shutdown.clone()).await;
    drop(listener);

    let deadline = tokio::time::Instant::now() + ctx.config.shutdown_timeout.0;
    tracing::info!("shutdown: stopped accepting; finishing commands in hand");
    let all = ctx.config.maxclients as u32;
    if tokio::time::timeout_at(deadline, limit.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("shutdown: some connections did not finish in time");
    }
    // A log that failed and has room again takes the final flush; one still failing keeps
    // what it holds for the next start.
    if ctx.engine.recover_log().await.is_err() {
        tracing::warn!(
            "shutdown: the write-ahead log is failed; pending increments stay in it as they were"
        );
    }
    tracing::info!("shutdown: final flush");
    // Retried until it lands or the deadline: a batch whose reply was lost is re-sent with
    // its id and lands once; a shard that stays down keeps its deltas in the log.
    let flushed = async {
        loop {
            if ctx.engine.flush_all().await {
                return true;
            }
            if ctx.engine.log_failed() {
                // Nothing can be logged, so nothing is sent: what the log holds stays there.
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    match tokio::time::timeout_at(deadline, flushed).await {
        Ok(true) => tracing::info!("shutdown: every increment landed"),
        Ok(false) => tracing::warn!("shutdown: the write-ahead log is failed; pending increments stay in it for the next start"),
        Err(_) => tracing::warn!("shutdown: some shards did not take the final flush in time; their increments stay in the log"),
    }
    ctx.engine.sync_log().await;
    tracing::info!("shutdown: draining the http sidecar");
    let _ = tokio::time::timeout_at(deadline, http_task).await;
    tracing::info!("shutdown: done");
    Ok(())
}

async fn accept_loop(
    ctx: &Arc<Context>,
    listener: &TcpListener,
    limit: &Arc<Semaphore>,
    mut shutdown: Shutdown,
) {
    let metrics = crate::metrics::global();
    let tls = ctx
        .config
        .tls
        .as_ref()
        .map(|t| crate::tls::acceptor(t).expect("validated with the config"));
    let mut backoff = Backoff::new(Duration::from_millis(5), Duration::from_secs(1));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.wait() => return,
        };
        let (mut stream, peer) = match accepted {
            Ok(s) => {
                backoff.reset();
                s
            }
            Err(e) => {
                // Out of file descriptors and the like: back off rather than spin.
                tracing::warn!(error = %e, "accept failed");
                if !backoff.sleep(&mut shutdown).await {
                    return;
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        metrics.connections_total.fetch_add(1, Ordering::Relaxed);
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
            if tls.is_some() {
                // No TLS session to write the error in, and no handshake for a refused
                // client (see `maxclients` in docs/security.md): closed at once, as Redis does.
                close_unread(stream);
                continue;
            }
            tokio::spawn(async move {
                let _ = stream
                    .write_all(b"-ERR max number of clients reached\r\n")
                    .await;
                let _ = stream.shutdown().await;
            });
            continue;
        };
        metrics.connections_current.fetch_add(1, Ordering::Relaxed);
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        crate::task::spawn(tracing::info_span!("client", %peer), async move {
            tracing::trace!("client connected");
            match tls {
                // The handshake runs in the connection's own task, bounded, so that a slow
                // or silent client holds nothing but its own slot.
                Some(acceptor) => {
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(tls)) => crate::connection::handle(tls, ctx, shutdown).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
                None => crate::connection::handle(stream, ctx, shutdown).await,
            }
            crate::metrics::global()
                .connections_current
                .fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
}

/// Closes a refused connection without writing anything, in the accept loop (no task, no
/// wait). What the client has already sent (its ClientHello, usually) is read and dropped
/// first, without waiting, so that the close reaches it as an end of stream, not a reset.
fn close_unread(stream: tokio::net::TcpStream) {
    use std::io::Read;
    // `into_std` leaves the socket non-blocking.
    if let Ok(mut s) = stream.into_std() {
        let mut sink = [0u8; 4096];
        for _ in 0..4 {
            match s.read(&mut sink) {
                Ok(n) if n > 0 => continue,
                _ => break,
            }
        }
    }
}
