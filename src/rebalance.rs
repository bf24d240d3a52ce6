//! Adding and removing shards at run time: a new ring at once, keys moved in the background.
//!
//! A change ([`Rebalancer::change`]) is validated (unique names and addresses, new shards are Redis
//! servers (see `backend::identity`), at least one shard left, no rebalance already under
//! way), recorded in the log, and published: the new ring takes every new increment and flush at once, and a [`Migration`]
//! names the old ring until the keys whose owner changed have moved. A mover task scans
//! each old shard (SCAN, rate-limited) and moves those keys:
//!
//! each key with the engine's per-key move protocol (`counter::moving`: a counter's value
//! through a tombstone into the proxy's log and pending delta, a bucket hash the same way,
//! any other key with `MIGRATE`), then deletes the tombstones once the log is synced.
//!
//! An old shard that died for good can be declared lost ([`Rebalancer::declare_lost`]): nothing is moved
//! off it, and the rebalance can finish.
//!
//! Reads never see half a move: the first command that needs a key whole during a rebalance
//! moves that key first (`Engine::ensure_moved`), serialised with the mover per key.
//!
//! Owns the plan of a shard change, the scan of old owners and its progress. Does not own
//! placement (`router`), moving one key or the counting itself (`counter`).

use crate::backend::{health, Shard};
use crate::backoff::Backoff;
use crate::config::Config;
use crate::counter::window_store;
use crate::counter::Engine;
use crate::router::Router;
use crate::router::{Migration, Topology};
use crate::shutdown::ShutdownTrigger;
use crate::spec::{Placement, ShardSpec};
use bytes::Bytes;
use parking_lot::Mutex;
use redis_protocol::resp2::types::BytesFrame;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What `GET /admin/rebalance` shows.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Progress {
    pub state: String,
    pub id: u64,
    pub from_version: u64,
    pub to_version: u64,
    pub keys_scanned: u64,
    pub keys_moved: u64,
    /// Keys on the old shards when the rebalance started (DBSIZE), scanned or not.
    pub keys_total_estimate: u64,
    pub keys_remaining_estimate: u64,
    pub rate_keys_per_second: f64,
    pub elapsed_seconds: f64,
    pub error: Option<String>,
    /// Keys moved in, per shard name, over the life of the process.
    pub moved_into: HashMap<String, u64>,
    /// Old shards declared lost in the rebalance under way (nothing is moved off them).
    pub lost: Vec<String>,
    /// Of `keys_moved`, those moved before a restart (the rate counts this process's only).
    #[serde(skip)]
    pub moved_before_restart: u64,
}

/// The control plane's service for shard changes: it owns the handles it needs (the engine,
/// the router, the config for the shards it builds, the shutdown signal its mover obeys),
/// so that nothing below the front doors needs the application context.
pub struct Rebalancer {
    engine: Arc<Engine>,
    router: Arc<Router>,
    config: Config,
    shutdown: ShutdownTrigger,
    progress: Mutex<Progress>,
    started: Mutex<Option<Instant>>,
    /// A change is being validated or applied: a second one is refused meanwhile.
    busy: tokio::sync::Mutex<()>,
}

impl Rebalancer {
    pub fn new(
        engine: Arc<Engine>,
        router: Arc<Router>,
        config: Config,
        shutdown: ShutdownTrigger,
    ) -> Arc<Rebalancer> {
        Arc::new(Rebalancer {
            engine,
            router,
            config,
            shutdown,
            progress: Mutex::default(),
            started: Mutex::default(),
            busy: tokio::sync::Mutex::default(),
        })
    }
}

impl Rebalancer {
    /// Progress, with the moves of the rebalance under way (`m`) counted in.
    pub fn progress(&self, m: Option<&Migration>) -> Progress {
        let mut p = self.progress.lock().clone();
        if let Some(m) = m {
            for (k, v) in m.moved_into() {
                *p.moved_into.entry(k).or_default() += v;
            }
            p.keys_moved = m.moved_into().values().sum();
            p.lost = m.lost();
            p.lost = m.lost();
        }
        if p.state.is_empty() {
            p.state = "idle".into();
        }
        if let Some(t) = *self.started.lock() {
            if p.state == "running" {
                p.elapsed_seconds = t.elapsed().as_secs_f64();
            }
        }
        if p.elapsed_seconds > 0.0 {
            p.rate_keys_per_second =
                p.keys_moved.saturating_sub(p.moved_before_restart) as f64 / p.elapsed_seconds;
        }
        p.keys_remaining_estimate = p.keys_total_estimate.saturating_sub(p.keys_scanned);
        p
    }
}

impl Rebalancer {
    /// What holds the rebalance right now, shown until it is over.
    fn set_error(&self, e: String) {
        self.progress.lock().error = Some(e);
    }

    fn clear_error(&self) {
        self.progress.lock().error = None;
    }
}

/// Why `shard` cannot be used right now, when it cannot: down (with the operating system's
/// reason when a connection fails) or not known to be Redis.
async fn shard_trouble(shard: &Shard) -> Option<String> {
    if !shard.is_verified() {
        return Some(format!(
            "shard {} is not known to be a Redis server",
            shard.name
        ));
    }
    if shard.is_up() {
        return None;
    }
    let connect = tokio::net::TcpStream::connect(shard.addr());
    Some(
        match tokio::time::timeout(shard.conn_opts.connect_timeout, connect).await {
            Ok(Err(e)) => format!("shard {} unreachable: {e}", shard.name),
            Err(_) => format!("shard {} unreachable: connect timed out", shard.name),
            Ok(Ok(_)) => format!("shard {} is down (no answer to PING)", shard.name),
        },
    )
}

/// What holds a rebalance that cannot land or move: the troubles of its shards, old and new.
async fn holding(m: &Migration) -> String {
    let mut seen = HashSet::new();
    let mut troubles = Vec::new();
    for s in m.old.shards.iter().chain(m.new.shards.iter()) {
        if seen.insert(s.name.clone()) {
            if let Some(t) = shard_trouble(s).await {
                troubles.push(t);
            }
        }
    }
    if troubles.is_empty() {
        "a shard did not take its batch".into()
    } else {
        troubles.join(", ")
    }
}

/// Why a Sentinel-managed shard cannot join at run time.
const MASTER_JOIN: &str = "a Sentinel-managed shard (master) joins only at start-up, from the config; add it to [[shards]] and restart";

/// Why a change was refused. Nothing was changed.
#[derive(Debug)]
pub struct Refused(pub String);

/// The shard list a topology was built from.
pub fn specs_of(t: &Topology) -> Vec<ShardSpec> {
    t.shards
        .iter()
        .map(|s| ShardSpec {
            name: s.name.clone(),
            addr: s.spec_addr(),
            weight: s.weight,
        })
        .collect()
}

/// Builds a topology from specs, reusing the shards (and their connections) that stay.
fn build_topology(
    cfg: &Config,
    version: u64,
    specs: &[ShardSpec],
    reuse: &[Arc<Shard>],
) -> Result<Topology, Refused> {
    let mut shards = Vec::with_capacity(specs.len());
    for s in specs {
        if let Some(r) = reuse
            .iter()
            .find(|r| r.name == s.name && r.spec_addr() == s.addr)
        {
            shards.push(r.clone());
            continue;
        }
        let addr = joining_addr(s)?;
        let shard = Shard::new(s.name.clone(), addr, s.weight, cfg).map_err(Refused)?;
        shards.push(shard);
    }
    Ok(Topology::new(version, shards, cfg.ring.vnodes))
}

/// The address of a shard that joins at run time: an `ip:port` (a Sentinel master name joins
/// only from the config at start-up).
fn joining_addr(s: &ShardSpec) -> Result<std::net::SocketAddr, Refused> {
    if s.master().is_some() {
        return Err(Refused(MASTER_JOIN.into()));
    }
    s.addr
        .parse()
        .map_err(|_| Refused(format!("addr {:?} is not an ip:port address", s.addr)))
}

/// Whether a shard about to join is a Redis server (see `backend::identity`), asked as the
/// proxy will connect (credentials, TLS), through a throwaway connection. A shard that
/// cannot be asked is refused too: nothing could be moved into it.
async fn verify(cfg: &Config, proxy_id: &str, s: &ShardSpec) -> Result<(), Refused> {
    let addr = joining_addr(s)?;
    let opts = Shard::conn_options(&s.name, addr, cfg).map_err(Refused)?;
    crate::backend::identity::verify(&opts, proxy_id)
        .await
        .map_err(|e| Refused(format!("shard {}: {}", s.name, e.message(addr))))
}

fn validate(specs: &[ShardSpec]) -> Result<(), Refused> {
    if specs.is_empty() {
        return Err(Refused("cannot remove the last shard".into()));
    }
    let (mut names, mut addrs) = (HashSet::new(), HashSet::new());
    for s in specs {
        if s.name.is_empty() || s.name.len() > 64 || s.name.contains(char::is_whitespace) {
            return Err(Refused(format!(
                "shard name {:?} must be 1-64 characters without spaces",
                s.name
            )));
        }
        if !names.insert(s.name.clone()) {
            return Err(Refused(format!("duplicate shard name {:?}", s.name)));
        }
        if s.master().is_some() {
            if !addrs.insert(s.addr.clone()) {
                return Err(Refused(format!("duplicate shard master {:?}", s.addr)));
            }
            if s.weight == 0 || s.weight > 100 {
                return Err(Refused(format!("weight of {:?} must be 1-100", s.name)));
            }
            continue;
        }
        let addr: std::net::SocketAddr = s
            .addr
            .parse()
            .map_err(|_| Refused(format!("addr {:?} is not an ip:port address", s.addr)))?;
        if !addrs.insert(addr.to_string()) {
            return Err(Refused(format!("duplicate shard addr {:?}", s.addr)));
        }
        if s.weight == 0 || s.weight > 100 {
            return Err(Refused(format!("weight of {:?} must be 1-100", s.name)));
        }
    }
    Ok(())
}

impl Rebalancer {
    /// Changes the shard list to `specs`: validates, records, publishes the new ring, and
    /// starts moving keys. Returns once the rebalance has started (see [`Rebalancer::progress`]).
    /// `cfg` gives the credentials and TLS settings of shards that join (the running config,
    /// or the re-read one on SIGHUP).
    pub async fn change(
        self: &Arc<Self>,
        specs: Vec<ShardSpec>,
        cfg: &Config,
    ) -> Result<Progress, Refused> {
        let _busy = self
            .busy
            .try_lock()
            .map_err(|_| Refused("another shard change is being applied".into()))?;
        if self.engine.is_memory_mode() {
            return Err(Refused(
                "no shards are configured (memory mode): restart with shards instead".into(),
            ));
        }
        if self.router.migration().is_some() {
            return Err(Refused(
                "a rebalance is in progress; wait until GET /admin/rebalance says done".into(),
            ));
        }
        validate(&specs)?;
        let old = self.router.topology();
        let old_specs = specs_of(&old);
        let sorted = |v: &[ShardSpec]| {
            let mut v: Vec<_> = v
                .iter()
                .map(|s| (s.name.clone(), s.addr.clone(), s.weight))
                .collect();
            v.sort();
            v
        };
        if sorted(&old_specs) == sorted(&specs) {
            return Err(Refused("the shard list is unchanged".into()));
        }
        for s in &specs {
            // A server keeps its shard's name: renamed, it would be an old shard removed and
            // a new one added on the same server, whose keys "move" onto themselves and whose
            // exactly-once record the removal deletes under the new shard's batches.
            if let Some(o) = old_specs
                .iter()
                .find(|o| o.addr == s.addr && o.name != s.name)
            {
                return Err(Refused(format!(
                    "{} is shard {} already; a shard keeps its name (keep {} or remove it first)",
                    s.addr, o.name, o.name
                )));
            }
            let known = old_specs
                .iter()
                .any(|o| o.name == s.name && o.addr == s.addr);
            if !known {
                verify(cfg, &self.engine.proxy_id, s).await?;
            }
            if let Some(o) = old_specs.iter().find(|o| o.name == s.name) {
                if o.addr != s.addr || o.weight != s.weight {
                    return Err(Refused(format!(
                        "shard {} exists with another address or weight; remove it first",
                        s.name
                    )));
                }
            }
        }
        let id = crate::counter::now_micros();
        let new = build_topology(cfg, old.version + 1, &specs, &old.shards)?;
        let placement = Placement {
            version: new.version,
            shards: specs.clone(),
            migration: Some((id, old_specs)),
        };
        self.engine
            .log_placement(&placement)
            .await
            .map_err(|_| Refused("the write-ahead log failed".into()))?;
        tracing::info!(id, from = old.version, to = new.version, shards = ?specs.iter().map(|s| &s.name).collect::<Vec<_>>(), "rebalance: new ring published");
        Ok(self
            .start(id, old, Arc::new(new), HashSet::new(), &[])
            .await)
    }
}

impl Rebalancer {
    /// Publishes `new` with a migration from `old`, and starts the mover. Also used to resume.
    async fn start(
        self: &Arc<Self>,
        id: u64,
        old: Arc<Topology>,
        new: Arc<Topology>,
        moved: HashSet<Bytes>,
        lost: &[String],
    ) -> Progress {
        let engine = &self.engine;
        for s in &new.shards {
            if engine.lane(&s.name).is_none() {
                engine.add_lane(crate::counter::lane::Lane::spawn(s.clone(), engine));
                health::spawn_for(
                    s.clone(),
                    &self.config.backend,
                    engine.proxy_id.clone(),
                    self.shutdown.subscribe(),
                );
            }
        }
        let m = Arc::new(Migration::new(id, old.clone(), new.clone()));
        for name in lost {
            m.set_lost(name);
            if let Some(lane) = engine.lane(name) {
                lane.abandon();
            }
        }
        // Resumed: the keys the log says were moved before the restart count as moved, into
        // their new owners, so that `keys_moved` is the rebalance's whole and not what is left.
        // (The log's moved set also holds keys found with nothing to move, so this may count
        // a few more than carried a value.)
        let mut moved_before_restart = 0;
        for key in &moved {
            if m.owner_changed(key) && !m.is_lost(&old.shard_for(key).name) {
                m.note_moved(&new.shard_for(key).name);
                moved_before_restart += 1;
            }
        }
        engine.set_moved(moved);
        self.router.set_migration(Some(m.clone()));
        self.router.publish_arc(new.clone());
        engine.invalidate_all_bases();
        let total = dbsize_sum(&old).await;
        {
            let mut p = self.progress.lock();
            let moved_into = std::mem::take(&mut p.moved_into);
            *p = Progress {
                state: "running".into(),
                id,
                from_version: old.version,
                to_version: new.version,
                keys_total_estimate: total,
                moved_into,
                moved_before_restart,
                ..Progress::default()
            };
            *self.started.lock() = Some(Instant::now());
        }
        let me = self.clone();
        let m2 = m.clone();
        crate::task::spawn(tracing::info_span!("mover", id = m.id), async move {
            me.mover(m2).await
        });
        self.progress(Some(&m))
    }
}

/// Marks an old shard of a recorded rebalance as lost (see [`Rebalancer::declare_lost`]); stripped off
/// the weight when the rebalance is resumed. Weights are 1-100, so the bit is free.
const LOST_BIT: u32 = 1 << 31;

impl Rebalancer {
    /// Declares `name`, a shard the rebalance under way removes, lost: an operator's statement
    /// that its data is gone for good (the machine died, the disk is lost). Recorded in the log
    /// first; then nothing is moved off it, keys it owned start from what this proxy still holds
    /// for them (its unlanded increments land on their new owners), its lane gives up the batch
    /// it was retrying (the deltas go back to pending, logged), and the rebalance can finish.
    /// Without it, a dead old shard holds the rebalance (and the keys it owned) forever.
    pub async fn declare_lost(self: &Arc<Self>, name: &str) -> Result<Progress, Refused> {
        let m = self
            .router
            .migration()
            .ok_or_else(|| Refused("no rebalance is under way".into()))?;
        if m.old.by_name(name).is_none() {
            return Err(Refused(format!(
                "shard {name:?} is not in the old shard list of the rebalance under way"
            )));
        }
        if m.new.by_name(name).is_some() {
            return Err(Refused(format!(
                "shard {name:?} stays in the ring; only a shard being removed can be declared lost"
            )));
        }
        if !m.is_lost(name) {
            let old_specs = specs_of(&m.old)
                .into_iter()
                .map(|mut s| {
                    if s.name == name || m.is_lost(&s.name) {
                        s.weight |= LOST_BIT;
                    }
                    s
                })
                .collect();
            let placement = Placement {
                version: m.new.version,
                shards: specs_of(&m.new),
                migration: Some((m.id, old_specs)),
            };
            self.engine
                .log_placement(&placement)
                .await
                .map_err(|_| Refused("the write-ahead log failed".into()))?;
            m.set_lost(name);
            if let Some(lane) = self.engine.lane(name) {
                lane.abandon();
            }
            tracing::warn!(
                id = m.id,
                shard = name,
                "rebalance: shard declared lost; its values are not moved"
            );
        }
        Ok(self.progress(Some(&m)))
    }
}

impl Rebalancer {
    /// Resumes a rebalance recorded in the log (called at start-up).
    pub async fn resume(self: &Arc<Self>, placement: &Placement, moved: HashSet<Bytes>) {
        let Some((id, from)) = &placement.migration else {
            return;
        };
        let lost: Vec<String> = from
            .iter()
            .filter(|s| s.weight & LOST_BIT != 0)
            .map(|s| s.name.clone())
            .collect();
        let from: Vec<ShardSpec> = from
            .iter()
            .map(|s| ShardSpec {
                weight: s.weight & !LOST_BIT,
                ..s.clone()
            })
            .collect();
        let from = &from;
        let current = self.router.topology();
        let old = match build_topology(
            &self.config,
            placement.version.saturating_sub(1),
            from,
            &current.shards,
        ) {
            Ok(t) => Arc::new(t),
            Err(e) => {
                tracing::error!(error = %e.0, "rebalance: cannot resume, the recorded old shard list is invalid");
                return;
            }
        };
        tracing::info!(
            id,
            moved = moved.len(),
            "rebalance: resuming after a restart"
        );
        self.start(*id, old, current, moved, &lost).await;
    }
}

async fn dbsize_sum(t: &Topology) -> u64 {
    let mut sum = 0;
    for s in &t.shards {
        if let Ok(BytesFrame::Integer(n)) = s.call(&["DBSIZE"]).await {
            sum += n.max(0) as u64;
        }
    }
    sum
}

impl Rebalancer {
    /// Scans every old shard and moves the keys whose owner changed, at the configured rate;
    /// then ends the rebalance.
    async fn mover(self: Arc<Self>, m: Arc<Migration>) {
        let engine = &self.engine;
        let rate = self.config.rebalance.keys_per_second.max(1) as f64;
        let mut shutdown = self.shutdown.subscribe();
        let started = Instant::now();
        let mut done: u64 = 0;
        // Batches taken before the new ring (for old owners) must land before anything moves:
        // one landing after its key moved would recreate the key on the old owner.
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        while !engine.flush_all().await {
            let why = holding(&m).await;
            self.set_error(format!(
                "landing pending increments before the move: {why}; retrying"
            ));
            if !backoff.sleep(&mut shutdown).await {
                return;
            }
        }
        // Keys whose move failed (a shard briefly unreachable): retried after the scan.
        let mut failed: Vec<(Arc<Shard>, Bytes)> = Vec::new();
        let prefix = format!("tally:mv:{}:", m.id).into_bytes();
        for from in m.old.shards.iter() {
            let mut cursor = b"0".to_vec();
            let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
            // Keys moved off this shard by the scan (`done` counts them all).
            let mut moved_off: u64 = 0;
            loop {
                if shutdown.is_triggered() {
                    return;
                }
                if m.is_lost(&from.name) {
                    tracing::warn!(id = m.id, shard = %from.name, "rebalance: shard declared lost; its keys are not scanned");
                    break;
                }
                let scan: [&[u8]; 4] = [b"SCAN", &cursor, b"COUNT", b"100"];
                let reply = from.call(&scan).await;
                let (next, keys) = match reply {
                    Ok(BytesFrame::Array(parts)) if parts.len() == 2 => {
                        match (&parts[0], &parts[1]) {
                            (BytesFrame::BulkString(c), BytesFrame::Array(ks)) => (
                                c.to_vec(),
                                ks.iter()
                                    .filter_map(|k| match k {
                                        BytesFrame::BulkString(b) => Some(b.clone()),
                                        _ => None,
                                    })
                                    .collect::<Vec<Bytes>>(),
                            ),
                            _ => (b"0".to_vec(), Vec::new()),
                        }
                    }
                    other => {
                        let why = match (shard_trouble(from).await, other) {
                            (Some(t), _) => t,
                            (None, Err(e)) => e,
                            (None, Ok(f)) => format!("unexpected SCAN reply {f:?}"),
                        };
                        self.set_error(format!("scanning {}: {why}; retrying", from.name));
                        if !backoff.sleep(&mut shutdown).await {
                            return;
                        }
                        continue;
                    }
                };
                backoff.reset();
                // The scan goes on: whatever held it is over (a failed move sets it again).
                self.clear_error();
                for key in keys {
                    self.progress.lock().keys_scanned += 1;
                    let result = if let Some(k) = key.strip_prefix(&prefix[..]) {
                        // A tombstone: finish its move if the log does not have it yet (it
                        // is deleted with the others when the rebalance ends).
                        if engine.is_moved(k) {
                            Ok(false)
                        } else {
                            engine.move_once(&m, k, from).await
                        }
                    } else if window_store::bucket_owner(&key).is_some()
                        && m.old.shard_for(&key).name == from.name
                        && m.owner_changed(&key)
                    {
                        // A bucket hash of time windows: merged into the new owner's.
                        engine.move_once(&m, &key, from).await
                    } else if key.starts_with(b"tally:")
                        || m.old.shard_for(&key).name != from.name
                        || !m.owner_changed(&key)
                    {
                        Ok(false)
                    } else {
                        engine.move_once(&m, &key, from).await
                    };
                    match result {
                        Ok(true) => {
                            done += 1;
                            moved_off += 1;
                            // Rate limit: never ahead of `rate` keys per second.
                            let ahead = Duration::from_secs_f64(done as f64 / rate)
                                .saturating_sub(started.elapsed());
                            if !ahead.is_zero() {
                                tokio::time::sleep(ahead).await;
                            }
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(key = %String::from_utf8_lossy(&key), from = %from.name, error = %e, "rebalance: move failed; will retry");
                            self.set_error(format!(
                                "moving {} off {}: {e}; retrying",
                                String::from_utf8_lossy(&key),
                                from.name
                            ));
                            let k = key
                                .strip_prefix(&prefix[..])
                                .map(Bytes::copy_from_slice)
                                .unwrap_or(key.clone());
                            failed.push((from.clone(), k));
                        }
                    }
                }
                cursor = next;
                if cursor == b"0" {
                    break;
                }
            }
            tracing::info!(id = m.id, shard = %from.name, moved = moved_off, "rebalance: shard scanned");
        }
        // The rebalance is not done while any value is stranded on an old owner.
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        while !failed.is_empty() {
            if !backoff.sleep(&mut shutdown).await {
                return;
            }
            let mut still = Vec::new();
            for (from, key) in failed {
                if m.is_lost(&from.name) {
                    continue;
                }
                if let Err(e) = engine.move_once(&m, &key, &from).await {
                    self.set_error(format!(
                        "moving {} off {}: {e}; retrying",
                        String::from_utf8_lossy(&key),
                        from.name
                    ));
                    still.push((from, key));
                }
            }
            failed = still;
        }
        self.clear_error();
        self.finish(&m, &mut shutdown).await;
    }
}

/// Deletes this rebalance's tombstones on every old shard (after the log is synced).
async fn delete_tombstones(
    rebalancer: &Rebalancer,
    m: &Migration,
    shutdown: &mut crate::shutdown::Shutdown,
) -> bool {
    let pattern = format!("tally:mv:{}:*", m.id);
    for from in m.old.shards.iter().filter(|s| !m.is_lost(&s.name)) {
        let mut cursor = b"0".to_vec();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let scan: [&[u8]; 6] = [
                b"SCAN",
                &cursor,
                b"MATCH",
                pattern.as_bytes(),
                b"COUNT",
                b"500",
            ];
            let page = match from.call(&scan).await {
                Ok(BytesFrame::Array(parts)) if parts.len() == 2 => parts,
                other => {
                    let why = match (shard_trouble(from).await, other) {
                        (Some(t), _) => t,
                        (None, Err(e)) => e,
                        (None, Ok(f)) => format!("unexpected SCAN reply {f:?}"),
                    };
                    rebalancer.set_error(format!(
                        "deleting tombstones on {}: {why}; retrying",
                        from.name
                    ));
                    if !backoff.sleep(shutdown).await {
                        return false;
                    }
                    continue;
                }
            };
            let (BytesFrame::BulkString(next), BytesFrame::Array(keys)) = (&page[0], &page[1])
            else {
                return false;
            };
            let mut del: Vec<&[u8]> = vec![b"DEL"];
            del.extend(keys.iter().filter_map(|k| match k {
                BytesFrame::BulkString(b) => Some(&b[..]),
                _ => None,
            }));
            if del.len() > 1 && from.call(&del).await.is_err() {
                continue;
            }
            cursor = next.to_vec();
            if cursor == b"0" {
                break;
            }
        }
    }
    true
}

impl Rebalancer {
    async fn finish(self: &Arc<Self>, m: &Migration, shutdown: &mut crate::shutdown::Shutdown) {
        // Every Moved record on disk first; then the tombstones can go.
        self.engine.sync_log().await;
        if !delete_tombstones(self, m, shutdown).await {
            return;
        }
        let placement = Placement {
            version: m.new.version,
            shards: specs_of(&m.new),
            migration: None,
        };
        if self.engine.log_placement(&placement).await.is_err() {
            self.progress.lock().state = "failed".into();
            return;
        }
        let counted = self.progress(Some(m));
        self.router.set_migration(None);
        self.engine.set_moved(HashSet::new());
        for s in &m.old.shards {
            if m.new.by_name(&s.name).is_none() && m.is_lost(&s.name) {
                self.engine.remove_lane(&s.name);
                s.retire();
            } else if m.new.by_name(&s.name).is_none() {
                // Its keys are gone; so is this proxy's exactly-once record there.
                let _ = s
                    .call(&[
                        b"HDEL",
                        crate::counter::lane::APPLIED_KEY.as_bytes(),
                        self.engine.proxy_id.as_bytes(),
                    ])
                    .await;
                self.engine.remove_lane(&s.name);
                s.retire();
            }
        }
        let mut p = self.progress.lock();
        p.keys_moved = counted.keys_moved;
        p.moved_into = counted.moved_into;
        p.state = "done".into();
        if let Some(t) = *self.started.lock() {
            p.elapsed_seconds = t.elapsed().as_secs_f64();
        }
        tracing::info!(
            id = m.id,
            moved = p.keys_moved,
            scanned = p.keys_scanned,
            "rebalance: done"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, addr: &str) -> ShardSpec {
        ShardSpec {
            name: name.into(),
            addr: addr.into(),
            weight: 1,
        }
    }

    #[test]
    fn invalid_changes_are_refused() {
        assert!(validate(&[]).unwrap_err().0.contains("last shard"));
        let dup = [spec("a", "127.0.0.1:1"), spec("a", "127.0.0.1:2")];
        assert!(validate(&dup)
            .unwrap_err()
            .0
            .contains("duplicate shard name"));
        let dup = [spec("a", "127.0.0.1:1"), spec("b", "127.0.0.1:1")];
        assert!(validate(&dup)
            .unwrap_err()
            .0
            .contains("duplicate shard addr"));
        assert!(validate(&[spec("a", "nohost")])
            .unwrap_err()
            .0
            .contains("ip:port"));
        assert!(validate(&[spec("a b", "127.0.0.1:1")]).is_err());
        assert!(validate(&[spec("a", "127.0.0.1:1"), spec("b", "127.0.0.1:2")]).is_ok());
    }
}
