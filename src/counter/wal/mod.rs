//! The write-ahead log: no acknowledged increment is lost, none is applied twice.
//!
//! Records, each framed `[len u32][crc32 u32][type u8][payload]` (little endian):
//!
//! - `Incrs [(key or name, delta[, second])...]`: the increments of one commit, appended
//!   before their replies are written. The engine appends each as a bare entry into the
//!   buffer of the stripe it already holds locked, so the hot path takes no extra lock and
//!   computes no checksum; a commit drains every stripe's entries into one record, with one
//!   checksum over all of them, and writes it with the other buffered records in one write.
//!   An entry names its key by a short name once the segment gave it one ([`LogName`]):
//!   3 or 4 bytes for `INCR counter:000000001234` instead of 22 (4 once its stripe named 64
//!   keys; the log's bytes were most of its cost on the hot path: docs/performance.md). A
//!   windowed entry replays as `delta` to `key` and to its window delta
//!   `tally:p:a<second>key` (one entry for both: see `window_now`).
//! - `Incr { key, delta }`: one increment, framed alone (the slower paths: a flush's
//!   returned deltas, FLUSHDB's cancellations; and logs written before `Incrs` existed).
//! - `Batch { seq, shard, items }`: deltas a lane took for a flush; written (and, with
//!   `fsync = "always"`, synced) before the batch is sent.
//! - `Applied { seq }`: the shard confirmed the batch.
//! - `Moved { id, key, value }` / `Marked { id, key }`: a value taken off a key's old owner
//!   by a rebalance (replay adds it to pending and marks the key moved), or a key marked
//!   moved with nothing to add (a bucket hash, whose counts are `Moved` window deltas).
//! - `Checkpoint { next_seq, pending, unapplied }`: the whole state at a cut; replay starts
//!   over from it. Written as the first record of the segment the log opens with, and of
//!   the one a failed log recovers into; after it, older segments are deleted, so the log
//!   does not grow without bound.
//! - `CheckpointAt { index }`: the first record of a segment started by a checkpoint while
//!   the log runs, whose `Checkpoint` is written afterwards to a file of its own (see
//!   `checkpoint`).
//!
//! Replay: `pending[key] = Σ Incr − Σ Batch items`, and the batches without an `Applied`
//! are re-sent with their original ids, which the shards' exactly-once record turns into
//! reads if they had landed. A record that fails its length or checksum ends the segment:
//! a torn tail (kill -9 mid-write) is truncated, logged, and start-up continues with every
//! whole record before it.
//!
//! A checkpoint is a consistent cut (see `checkpoint`): it stalls increments for one pass
//! over the keys in memory, once per `segment_bytes` of log (or per checkpoint size, when
//! the state is larger: see `Segment::wants_checkpoint`); the snapshot is written after.
//!
//! fsync: `always`: a commit returns after `fdatasync`, shared by every increment that
//! arrived meanwhile (group commit); `everysec`: a background sync each second; `no`: the
//! OS decides. In every mode the record is in the OS before the reply is sent, so killing
//! the process loses nothing; losing the machine loses up to a second with `everysec`.

mod checkpoint;

use super::Engine;
use crate::backoff::Backoff;
use crate::config::{DurabilityConfig, Fsync};
use crate::spec::{Placement, ShardSpec};
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

const INCR: u8 = 1;
const BATCH: u8 = 2;
const APPLIED: u8 = 3;
const CHECKPOINT: u8 = 4;
const PLACEMENT: u8 = 5;
const MOVED: u8 = 6;
const MARKED: u8 = 7;
// 8 is not used: development builds between two releases wrote two different layouts under
// it; replay refuses it like any unknown type (the segment ends there).
/// `Incrs` as logs written before names (no longer written; replayed).
const INCRS: u8 = 9;
/// `Incrs` whose entries may name their keys ([`LogName`]).
const NAMED_INCRS: u8 = 10;
/// `CheckpointAt { index }`: the segment's checkpoint is in its own file (see `checkpoint`).
const CHECKPOINT_AT: u8 = 11;
/// Longest record accepted on replay; anything claiming more is corruption.
const MAX_RECORD: usize = 1 << 30;

pub type Unapplied = BTreeMap<u64, (String, Vec<(Bytes, i64)>)>;

/// A logged batch: sequence number, shard name, (key, delta) items.
type LoggedBatch = (u64, String, Vec<(Bytes, i64)>);

/// What replay found.
#[derive(Debug, Default)]
pub struct Recovered {
    pub proxy_id: String,
    pub next_seq: u64,
    pub pending: HashMap<Bytes, i64>,
    pub unapplied: Unapplied,
    /// The shard list last in force, and a rebalance under way (see `rebalance`).
    pub placement: Option<Placement>,
    /// Counter keys already moved by the rebalance under way.
    pub moved: HashSet<Bytes>,
    pub records: u64,
    pub truncated_bytes: u64,
    /// A checkpoint file replay could not read with no segment before it, and no later
    /// checkpoint since: the counts it held are not in what replay found (see `checkpoint`).
    pub lost_checkpoint: Option<PathBuf>,
    /// The index of the last segment replayed so far.
    pub replayed: Option<u64>,
}

#[derive(Debug, Default)]
pub struct WalStats {
    pub bytes: AtomicU64,
    pub writes: AtomicU64,
    pub fsyncs: AtomicU64,
    pub fsync_micros: AtomicU64,
    pub checkpoints: AtomicU64,
    /// Times the log went from working to failed.
    pub failures: AtomicU64,
    /// Times a failed log was written again from a fresh checkpoint.
    pub recoveries: AtomicU64,
}

struct Segment {
    file: Arc<File>,
    index: u64,
    size: u64,
    /// Bytes before the segment's records: its checkpoint when written inline, or the
    /// record naming its checkpoint file (see `checkpoint`).
    start: u64,
    /// Size of the segment's checkpoint, inline or in its file; `u64::MAX` while that file
    /// is being written; after a failed write, the records then plus `segment_bytes` (due
    /// again after that much more log).
    snapshot: u64,
}

impl Segment {
    /// Whether the segment has grown enough for a checkpoint: by `segment_bytes` of records
    /// since its own checkpoint, and by at least that checkpoint's size. A state larger than
    /// `segment_bytes` (millions of pending keys) would otherwise be snapshotted again every
    /// second, each time with every map shard locked; this way a checkpoint costs at most
    /// as much writing as the records it retires.
    fn wants_checkpoint(&self, segment_bytes: u64) -> bool {
        checkpoint_due(self.size - self.start, self.snapshot, segment_bytes)
    }
}

/// See [`Segment::wants_checkpoint`].
fn checkpoint_due(records: u64, snapshot: u64, segment_bytes: u64) -> bool {
    records > segment_bytes.max(snapshot)
}

struct Meta {
    buf: Vec<u8>,
    unapplied: Unapplied,
    placement: Option<Placement>,
}

/// The log could not be written or synced; nothing appended since can be acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalFailed;

pub struct Wal {
    dir: PathBuf,
    fsync: Fsync,
    segment_bytes: u64,
    /// Drains started, numbered from 1. A drain covers every record appended before it
    /// started, so a committer waits for a drain numbered above what it read after
    /// appending; no counter is touched per record.
    started: AtomicU64,
    /// The highest drain whose bytes are durable for the fsync mode.
    done: AtomicU64,
    /// Set by a failed write or sync (a checkpoint's included, not its file's: see
    /// `checkpoint`); cleared by [`Wal::recover`].
    failed: std::sync::atomic::AtomicBool,
    /// Bumped when the log fails and when it recovers: odd while failed (see
    /// [`Wal::refused_throughout`]).
    epoch: AtomicU64,
    last_error: Mutex<Option<String>>,
    meta: Mutex<Meta>,
    segment: tokio::sync::Mutex<Segment>,
    /// Lanes hold it (shared) from taking deltas to logging the batch, and from logging
    /// `Applied` to settling; a checkpoint holds it exclusively.
    pub lane_gate: tokio::sync::RwLock<()>,
    /// Held by a checkpoint, from its cut until its file is written, and by a recovery: one
    /// at a time.
    checkpointing: tokio::sync::Mutex<()>,
    /// The segment a checkpoint superseded, until it is synced (see `sync_now`).
    superseded: Mutex<Option<Arc<File>>>,
    engine: OnceLock<Weak<Engine>>,
    pub stats: WalStats,
}

fn segment_path(dir: &Path, index: u64) -> PathBuf {
    dir.join(format!("wal-{index:016}.log"))
}

/// The index in a log file's name `wal-<index><suffix>`.
fn file_index(path: &Path, suffix: &str) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_prefix("wal-")?
        .strip_suffix(suffix)?
        .parse()
        .ok()
}

fn segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if let Some(i) = file_index(&p, ".log") {
            v.push((i, p));
        }
    }
    v.sort();
    Ok(v)
}

impl Wal {
    /// Opens the log in `cfg.wal_dir`, replays it, and starts a fresh segment whose first
    /// record is a checkpoint of what was recovered.
    pub fn open(cfg: &DurabilityConfig) -> std::io::Result<(Arc<Wal>, Recovered)> {
        let dir = cfg.wal_dir.clone();
        std::fs::create_dir_all(&dir)?;
        let id_path = dir.join("proxy-id");
        let proxy_id = match std::fs::read_to_string(&id_path) {
            Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
            _ => {
                let id = format!("p{:x}{:x}", super::now_micros(), std::process::id());
                std::fs::write(&id_path, &id)?;
                id
            }
        };
        let segs = segments(&dir)?;
        let mut rec = Recovered {
            proxy_id,
            ..Recovered::default()
        };
        let last = segs.len().saturating_sub(1);
        for (i, (index, path)) in segs.iter().enumerate() {
            replay_file(path, i == last, &mut rec)?;
            rec.replayed = Some(*index);
        }
        if let Some(lost) = &rec.lost_checkpoint {
            // Starting would write what replay found as the whole state and delete the log:
            // the operator decides (move the log directory aside to start without it).
            return Err(std::io::Error::other(format!(
                "write-ahead log: checkpoint file {} is missing or damaged and the segment before it is gone, so the counts it held cannot be replayed; not starting (move wal_dir aside to start without them)",
                lost.display()
            )));
        }
        if rec.truncated_bytes > 0 {
            tracing::warn!(
                bytes = rec.truncated_bytes,
                "write-ahead log had a torn or corrupt tail; truncated it"
            );
        }
        for seq in rec.unapplied.keys() {
            rec.next_seq = rec.next_seq.max(seq + 1);
        }
        rec.pending.retain(|_, d| *d != 0);
        let index = segs.last().map(|(i, _)| i + 1).unwrap_or(1);
        let path = segment_path(&dir, index);
        let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
        let mut pending = PendingItems::default();
        for (k, d) in &rec.pending {
            pending.push(k, *d);
        }
        let cp = encode_checkpoint(
            rec.next_seq,
            &pending,
            &rec.unapplied,
            rec.placement.as_ref(),
            &rec.moved,
        );
        file.write_all(&cp)?;
        file.sync_all()?;
        sync_dir(&dir);
        for (_, p) in &segs {
            std::fs::remove_file(p)?;
        }
        checkpoint::remove_superseded(&dir, index);
        tracing::info!(
            records = rec.records,
            pending_keys = rec.pending.len(),
            unapplied_batches = rec.unapplied.len(),
            "write-ahead log replayed"
        );
        let wal = Arc::new(Wal {
            dir,
            fsync: cfg.fsync,
            segment_bytes: cfg.segment_bytes,
            started: AtomicU64::new(0),
            done: AtomicU64::new(0),
            failed: std::sync::atomic::AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            last_error: Mutex::new(None),
            meta: Mutex::new(Meta {
                buf: Vec::new(),
                unapplied: rec.unapplied.clone(),
                placement: rec.placement.clone(),
            }),
            segment: tokio::sync::Mutex::new(Segment {
                file: Arc::new(file),
                index,
                size: cp.len() as u64,
                start: cp.len() as u64,
                snapshot: cp.len() as u64,
            }),
            lane_gate: tokio::sync::RwLock::new(()),
            checkpointing: tokio::sync::Mutex::new(()),
            superseded: Mutex::new(None),
            engine: OnceLock::new(),
            stats: WalStats::default(),
        });
        Ok((wal, rec))
    }

    pub fn attach(&self, engine: &Arc<Engine>) {
        let _ = self.engine.set(Arc::downgrade(engine));
    }

    /// Makes every record appended so far (by this caller, before the call) durable for
    /// the configured fsync mode: written to the OS, and with `always` synced. Concurrent
    /// callers share one write and one sync (group commit).
    ///
    /// `Ok` means exactly that: the drain that covered the caller's records succeeded, or a
    /// recovery checkpoint (see [`Wal::recover`]) took them in. Every caller whose records
    /// were in a failed write, or are still buffered while the log is failed, gets
    /// `WalFailed` and must not acknowledge them.
    pub async fn commit(&self) -> Result<(), WalFailed> {
        let ticket = self.started.load(Ordering::SeqCst);
        if self.covered(ticket)? {
            return Ok(());
        }
        // Let the other connections this worker has ready append their records first: the
        // first of them to reach the lock then writes for all (one write per scheduler pass,
        // not one per client), and the rest find their records already written.
        tokio::task::yield_now().await;
        if self.covered(ticket)? {
            return Ok(());
        }
        let mut seg = self.segment.lock().await;
        if self.covered(ticket)? {
            return Ok(());
        }
        let n = self.started.fetch_add(1, Ordering::SeqCst) + 1;
        let mut buf = Vec::new();
        if let Some(engine) = self.engine.get().and_then(Weak::upgrade) {
            engine.drain_logs(&mut buf);
        }
        buf.append(&mut self.meta.lock().buf);
        if !buf.is_empty() {
            let at = seg.size;
            if let Err(e) = (&*seg.file).write_all(&buf) {
                // A short write leaves a torn record: cut it off (best effort; replay would
                // truncate it too), so that the segment ends on a whole record.
                let _ = seg.file.set_len(at);
                return Err(self.fail("write", &e));
            }
            seg.size += buf.len() as u64;
            self.stats
                .bytes
                .fetch_add(buf.len() as u64, Ordering::Relaxed);
            self.stats.writes.fetch_add(1, Ordering::Relaxed);
            if self.fsync == Fsync::Always {
                self.sync_file(seg.file.clone()).await?;
            }
        }
        self.done.store(n, Ordering::SeqCst);
        Ok(())
    }

    /// Whether a drain after `ticket` has made the caller's records durable; an error when
    /// none has and the log is failed (nothing buffered now can be made durable until a
    /// recovery, which answers the callers that come after it).
    fn covered(&self, ticket: u64) -> Result<bool, WalFailed> {
        if self.done.load(Ordering::SeqCst) > ticket {
            Ok(true)
        } else if self.failed() {
            Err(WalFailed)
        } else {
            Ok(false)
        }
    }

    /// Whether a write or sync has failed: the log is then closed for good (until restart).
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// The failure epoch, read before a burst of requests (see `refused_throughout`).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Whether the log has been failed without a break since `epoch` was read: then the
    /// engine refused every increment meanwhile (it checks before appending), so replies
    /// given since acknowledge nothing and may go out without a commit.
    pub fn refused_throughout(&self, epoch: u64) -> bool {
        epoch % 2 == 1 && self.epoch() == epoch
    }

    /// Why the log failed, while it is failed (for INFO, /readyz and /metrics).
    pub fn failure(&self) -> Option<String> {
        if self.failed() {
            self.last_error.lock().clone()
        } else {
            None
        }
    }

    fn fail(&self, what: &str, e: &dyn std::fmt::Display) -> WalFailed {
        let why = format!("{what}: {e}");
        *self.last_error.lock() = Some(why.clone());
        if !self.failed.swap(true, Ordering::SeqCst) {
            self.epoch.fetch_add(1, Ordering::SeqCst);
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %why, "write-ahead log failed; increments are refused until it can be written again");
        }
        WalFailed
    }

    async fn sync_file(&self, file: Arc<File>) -> Result<(), WalFailed> {
        let t = Instant::now();
        match tokio::task::spawn_blocking(move || file.sync_data()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(self.fail("fsync", &e)),
            Err(e) => return Err(self.fail("fsync", &e)),
        }
        self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        fsync_histogram().record(t.elapsed().as_secs_f64());
        self.stats
            .fsync_micros
            .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Logs a batch before it is sent, and makes it durable.
    pub async fn log_batch(
        &self,
        seq: u64,
        shard: &str,
        items: &[(Bytes, Option<i64>)],
    ) -> Result<(), WalFailed> {
        let deltas: Vec<(Bytes, i64)> = items
            .iter()
            .filter_map(|(k, d)| d.map(|d| (k.clone(), d)))
            .collect();
        {
            let mut m = self.meta.lock();
            encode_batch(&mut m.buf, seq, shard, &deltas);
            m.unapplied.insert(seq, (shard.to_string(), deltas));
        }
        let r = self.commit().await;
        if r.is_err() {
            // Not logged, so it will not be sent: the lane gives its deltas back to pending,
            // and a recovery checkpoint must not count them as in flight too.
            self.meta.lock().unapplied.remove(&seq);
        }
        r
    }

    /// Records the shard list in force (and a rebalance under way), durably.
    pub async fn log_placement(&self, pl: &Placement) -> Result<(), WalFailed> {
        {
            let mut m = self.meta.lock();
            let mut p = Vec::new();
            put_placement(&mut p, pl);
            frame(&mut m.buf, PLACEMENT, &p);
            m.placement = Some(pl.clone());
        }
        self.commit().await
    }

    /// Records that a batch landed. Durable with the next commit; losing it only means
    /// the batch is re-sent and read back, never applied twice.
    pub fn log_applied(&self, seq: u64) {
        let mut m = self.meta.lock();
        let mut rec = Vec::with_capacity(8);
        rec.extend_from_slice(&seq.to_le_bytes());
        frame(&mut m.buf, APPLIED, &rec);
        m.unapplied.remove(&seq);
    }

    pub fn unapplied(&self) -> Unapplied {
        self.meta.lock().unapplied.clone()
    }

    /// Writes what is buffered and syncs it, whatever the mode (shutdown, a rebalance's
    /// end): the current segment, and the one a checkpoint just superseded if its last
    /// records are not synced yet.
    pub async fn sync_now(&self) {
        let _ = self.commit().await;
        // Read together under the segment lock, after the commit: the caller's records are
        // in the current segment, or in the one a cut since superseded, which stays in
        // `superseded` until it is synced.
        let (current, superseded) = {
            let seg = self.segment.lock().await;
            (seg.file.clone(), self.superseded.lock().clone())
        };
        if let Some(old) = superseded {
            let _ = self.sync_file(old).await;
        }
        let _ = self.sync_file(current).await;
    }

    /// Writes what is buffered and syncs the current segment.
    async fn sync_current(&self) {
        let _ = self.commit().await;
        let file = self.segment.lock().await.file.clone();
        let _ = self.sync_file(file).await;
    }

    /// everysec syncs, checkpoints when the segment passes `segment_bytes`, and recovery
    /// of a failed log: tried after 1 s, then at doubling intervals up to 32 s (each try
    /// snapshots the whole state, so a disk that stays full is not hammered).
    pub fn spawn_background(
        self: &Arc<Self>,
        engine: Arc<Engine>,
        mut shutdown: crate::shutdown::Shutdown,
    ) {
        let wal = self.clone();
        crate::task::spawn(tracing::info_span!("wal"), async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut retry = Backoff::new(Duration::from_secs(1), Duration::from_secs(32));
            let mut next_try = Instant::now();
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.wait() => return,
                }
                if wal.failed() {
                    if Instant::now() >= next_try {
                        if wal.recover(&engine).await.is_ok() {
                            retry.reset();
                        } else {
                            let wait = retry.next_wait();
                            tracing::warn!(
                                error = wal.failure().unwrap_or_default(),
                                retry_in_secs = wait.as_secs(),
                                "write-ahead log still cannot be written"
                            );
                            next_try = Instant::now() + wait;
                        }
                    }
                    continue;
                }
                if wal.fsync == Fsync::Everysec {
                    wal.sync_current().await;
                }
                let due = wal.segment.lock().await.wants_checkpoint(wal.segment_bytes);
                if due {
                    // A failure is logged by `fail` and recovered from above.
                    let _ = wal.checkpoint(&engine).await;
                }
            }
        });
    }

    pub fn info_lines(&self) -> Vec<(String, String)> {
        let s = &self.stats;
        let fsync = match self.fsync {
            Fsync::Always => "always",
            Fsync::Everysec => "everysec",
            Fsync::No => "no",
        };
        vec![
            ("wal_enabled".into(), "1".into()),
            ("wal_failed".into(), u8::from(self.failed()).to_string()),
            (
                "wal_failures_total".into(),
                s.failures.load(Ordering::Relaxed).to_string(),
            ),
            (
                "wal_recoveries_total".into(),
                s.recoveries.load(Ordering::Relaxed).to_string(),
            ),
            ("wal_fsync".into(), fsync.into()),
            (
                "wal_status".into(),
                match self.failure() {
                    None => "ok".into(),
                    Some(e) => format!("failed ({e})"),
                },
            ),
            (
                "wal_bytes_written_total".into(),
                s.bytes.load(Ordering::Relaxed).to_string(),
            ),
            (
                "wal_writes_total".into(),
                s.writes.load(Ordering::Relaxed).to_string(),
            ),
            (
                "wal_fsyncs_total".into(),
                s.fsyncs.load(Ordering::Relaxed).to_string(),
            ),
            (
                "wal_fsync_seconds_total".into(),
                format!("{:.6}", s.fsync_micros.load(Ordering::Relaxed) as f64 / 1e6),
            ),
            (
                "wal_checkpoints_total".into(),
                s.checkpoints.load(Ordering::Relaxed).to_string(),
            ),
            (
                "wal_unapplied_batches".into(),
                self.meta.lock().unapplied.len().to_string(),
            ),
        ]
    }
}

fn fsync_histogram() -> &'static metrics::Histogram {
    static H: OnceLock<metrics::Histogram> = OnceLock::new();
    crate::metrics::histogram_once(&H, "tallyproxy_wal_fsync_duration_seconds")
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Frames one record onto `out`.
fn frame(out: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    let len = (payload.len() + 1) as u32;
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(payload);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
}

/// Appends an `Incr` record (called by the engine under its map shard lock).
pub fn encode_incr(out: &mut Vec<u8>, key: &[u8], delta: i64) {
    let len = (1 + 4 + key.len() + 8) as u32;
    out.extend_from_slice(&len.to_le_bytes());
    let crc_at = out.len();
    out.extend_from_slice(&[0; 4]);
    let body = out.len();
    out.push(INCR);
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&delta.to_le_bytes());
    // One pass over the record in place (the framing of `frame`, without a copy).
    let crc = crc32fast::hash(&out[body..]);
    out[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
}

/// A counter key's short name in the log's current segment, so that an increment of a key
/// the segment already named is logged in a few bytes instead of with the whole key.
///
/// Names are given per map stripe, under its lock (no shared counter on the hot path): the
/// `n`-th name of stripe `s` is `n << 5 | s`, and the entry keeps `n` (`Entry::log_name`).
/// The checkpoint's cut, which starts every segment after the first, forgets every name
/// (`Engine::cut`), and replay reads each segment with a dictionary of its own, so a name is
/// only ever read in the segment that gave it. A stripe that gave its 65,535 names in one
/// segment logs its further new keys whole until the next cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogName {
    /// Logged whole, unnamed.
    None,
    /// Logged whole, with the name it has from here to the end of the segment.
    Give(u32),
    /// Logged by the name given earlier in the segment.
    Use(u32),
}

/// Bits of a name that say its stripe.
const STRIPE_BITS: u32 = super::stripe::STRIPES.trailing_zeros();

impl LogName {
    /// The name to log a key with: `slot` is its entry's, `next` its stripe's next.
    pub(super) fn of(slot: &mut u16, next: &mut u16, stripe: usize) -> LogName {
        let full = |n: u16| u32::from(n) << STRIPE_BITS | stripe as u32;
        if *slot != 0 {
            return LogName::Use(full(*slot));
        }
        if *next == 0 {
            return LogName::None;
        }
        *slot = *next;
        *next = next.wrapping_add(1);
        LogName::Give(full(*slot))
    }
}

// An entry's head (a varint) says how the key is given and whether a second follows the
// delta: bit 0 windowed; bit 1 named; for a named key, bit 2 "given here". Then: the key
// length above bit 1 and the key (unnamed), the key length above bit 2, the key and the
// name (given), or the name above bit 2 (used). Then the zigzag varint delta, and for a
// windowed entry the varint second.
const HEAD_WINDOWED: u64 = 1;
const HEAD_NAMED: u64 = 2;
const HEAD_GIVEN: u64 = 4;

/// Appends one increment to a stripe's `Incrs` entries (by the engine, under the stripe's
/// lock): the hot path. `second`: the increment of a windowed key at that second, which
/// replays as `delta` to `key` and to its window delta of that second (see `window_now`).
/// Framed by the commit that drains it (`begin_incrs`).
pub fn append_named_incr(
    out: &mut Vec<u8>,
    key: &[u8],
    name: LogName,
    delta: i64,
    second: Option<u64>,
) {
    let w = if second.is_some() { HEAD_WINDOWED } else { 0 };
    match name {
        LogName::None => {
            put_varint(out, (key.len() as u64) << 2 | w);
            out.extend_from_slice(key);
        }
        LogName::Give(n) => {
            put_varint(out, (key.len() as u64) << 3 | HEAD_GIVEN | HEAD_NAMED | w);
            out.extend_from_slice(key);
            put_varint(out, u64::from(n));
        }
        LogName::Use(n) => put_varint(out, u64::from(n) << 3 | HEAD_NAMED | w),
    }
    put_varint(out, zigzag(delta));
    if let Some(t) = second {
        put_varint(out, t);
    }
}

/// [`append_named_incr`] of a key logged whole (a window delta's own key).
pub fn append_incr(out: &mut Vec<u8>, key: &[u8], delta: i64) {
    append_named_incr(out, key, LogName::None, delta, None);
}

fn zigzag(d: i64) -> u64 {
    ((d << 1) ^ (d >> 63)) as u64
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Starts an `Incrs` record at the end of `out`; the drained entries follow, then
/// [`end_incrs`] with the returned position.
pub(crate) fn begin_incrs(out: &mut Vec<u8>) -> usize {
    let at = out.len();
    out.extend_from_slice(&[0; 8]);
    out.push(NAMED_INCRS);
    at
}

/// Frames the `Incrs` record begun at `at` (length and one checksum over every entry), or
/// removes it when no entry followed.
pub(crate) fn end_incrs(out: &mut Vec<u8>, at: usize) {
    if out.len() == at + 9 {
        out.truncate(at);
        return;
    }
    let len = (out.len() - at - 8) as u32;
    let crc = crc32fast::hash(&out[at + 8..]);
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
    out[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
}

fn put_items<'a>(p: &mut Vec<u8>, items: impl ExactSizeIterator<Item = (&'a [u8], i64)>) {
    p.extend_from_slice(&(items.len() as u32).to_le_bytes());
    for (k, d) in items {
        p.extend_from_slice(&(k.len() as u32).to_le_bytes());
        p.extend_from_slice(k);
        p.extend_from_slice(&d.to_le_bytes());
    }
}

fn encode_batch(out: &mut Vec<u8>, seq: u64, shard: &str, items: &[(Bytes, i64)]) {
    let mut p = Vec::with_capacity(16 + shard.len() + items.len() * 32);
    put_batch(&mut p, seq, shard, items);
    frame(out, BATCH, &p);
}

fn put_batch(p: &mut Vec<u8>, seq: u64, shard: &str, items: &[(Bytes, i64)]) {
    p.extend_from_slice(&seq.to_le_bytes());
    p.extend_from_slice(&(shard.len() as u32).to_le_bytes());
    p.extend_from_slice(shard.as_bytes());
    put_items(p, items.iter().map(|(k, d)| (&k[..], *d)));
}

/// A checkpoint's pending counts, encoded as they are added: a cut adds millions with every
/// stripe locked, and this costs a copy of the key instead of an allocation per key.
#[derive(Default)]
pub(crate) struct PendingItems {
    count: u32,
    bytes: Vec<u8>,
}

impl PendingItems {
    pub(crate) fn push(&mut self, key: &[u8], delta: i64) {
        self.count += 1;
        self.bytes
            .extend_from_slice(&(key.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(key);
        self.bytes.extend_from_slice(&delta.to_le_bytes());
    }

    pub(crate) fn len(&self) -> usize {
        self.count as usize
    }

    /// The items, decoded (for tests).
    #[cfg(test)]
    pub(crate) fn to_vec(&self) -> Vec<(Bytes, i64)> {
        let mut p = self.count.to_le_bytes().to_vec();
        p.extend_from_slice(&self.bytes);
        Cursor(&p).items().expect("items encoded by push")
    }
}

/// A `Checkpoint` record in parts, so that one of millions of keys is framed and written
/// without copying its pending items again: `head` (next seq, item count), the items, and
/// `rest` (unapplied batches, placement, moved keys).
struct CheckpointParts<'a> {
    head: Vec<u8>,
    items: &'a [u8],
    rest: Vec<u8>,
}

impl<'a> CheckpointParts<'a> {
    fn new(
        next_seq: u64,
        pending: &'a PendingItems,
        unapplied: &Unapplied,
        placement: Option<&Placement>,
        moved: &HashSet<Bytes>,
    ) -> Self {
        let mut head = Vec::with_capacity(12);
        head.extend_from_slice(&next_seq.to_le_bytes());
        head.extend_from_slice(&pending.count.to_le_bytes());
        let mut rest = Vec::new();
        rest.extend_from_slice(&(unapplied.len() as u32).to_le_bytes());
        for (seq, (shard, items)) in unapplied {
            put_batch(&mut rest, *seq, shard, items);
        }
        match placement {
            Some(pl) => {
                rest.push(1);
                put_placement(&mut rest, pl);
            }
            None => rest.push(0),
        }
        rest.extend_from_slice(&(moved.len() as u32).to_le_bytes());
        for k in moved {
            put_str(&mut rest, k);
        }
        CheckpointParts {
            head,
            items: &pending.bytes,
            rest,
        }
    }

    /// The record's length field: type byte and payload.
    fn body_len(&self) -> usize {
        1 + self.head.len() + self.items.len() + self.rest.len()
    }

    /// Writes the framed record (as [`frame`] would).
    fn write_to(&self, out: &mut impl Write) -> std::io::Result<()> {
        let parts = [&[CHECKPOINT][..], &self.head, self.items, &self.rest];
        let mut h = crc32fast::Hasher::new();
        for part in parts {
            h.update(part);
        }
        out.write_all(&(self.body_len() as u32).to_le_bytes())?;
        out.write_all(&h.finalize().to_le_bytes())?;
        for part in parts {
            out.write_all(part)?;
        }
        Ok(())
    }
}

fn encode_checkpoint(
    next_seq: u64,
    pending: &PendingItems,
    unapplied: &Unapplied,
    placement: Option<&Placement>,
    moved: &HashSet<Bytes>,
) -> Vec<u8> {
    let parts = CheckpointParts::new(next_seq, pending, unapplied, placement, moved);
    let mut out = Vec::with_capacity(8 + parts.body_len());
    parts
        .write_to(&mut out)
        .expect("writing to a Vec does not fail");
    out
}

fn put_str(p: &mut Vec<u8>, s: &[u8]) {
    p.extend_from_slice(&(s.len() as u32).to_le_bytes());
    p.extend_from_slice(s);
}

fn put_specs(p: &mut Vec<u8>, specs: &[ShardSpec]) {
    p.extend_from_slice(&(specs.len() as u32).to_le_bytes());
    for s in specs {
        put_str(p, s.name.as_bytes());
        put_str(p, s.addr.as_bytes());
        p.extend_from_slice(&s.weight.to_le_bytes());
    }
}

fn put_placement(p: &mut Vec<u8>, pl: &Placement) {
    p.extend_from_slice(&pl.version.to_le_bytes());
    put_specs(p, &pl.shards);
    match &pl.migration {
        Some((id, from)) => {
            p.push(1);
            p.extend_from_slice(&id.to_le_bytes());
            put_specs(p, from);
        }
        None => p.push(0),
    }
}

/// Appends a `Moved` record: `value` moved off the key's old owner by rebalance `id`.
pub fn encode_moved(out: &mut Vec<u8>, id: u64, key: &[u8], value: i64) {
    let mut p = Vec::with_capacity(24 + key.len());
    p.extend_from_slice(&id.to_le_bytes());
    put_str(&mut p, key);
    p.extend_from_slice(&value.to_le_bytes());
    frame(out, MOVED, &p);
}

/// Appends a `Marked` record: `key` (a bucket hash, whose counts were logged as `Moved`
/// window deltas) has moved in rebalance `id`; nothing to add.
pub fn encode_marked(out: &mut Vec<u8>, id: u64, key: &[u8]) {
    let mut p = Vec::with_capacity(12 + key.len());
    p.extend_from_slice(&id.to_le_bytes());
    put_str(&mut p, key);
    frame(out, MARKED, &p);
}

/// A cursor over a record's payload; every read is bounds-checked.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn items(&mut self) -> Option<Vec<(Bytes, i64)>> {
        let n = self.u32()? as usize;
        let mut v = Vec::with_capacity(n.min(1 << 16));
        for _ in 0..n {
            let kl = self.u32()? as usize;
            let k = Bytes::copy_from_slice(self.take(kl)?);
            v.push((k, self.i64()?));
        }
        Some(v)
    }
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.take(1)?[0];
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    fn str(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn specs(&mut self) -> Option<Vec<ShardSpec>> {
        let n = self.u32()? as usize;
        let mut v = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            let name = String::from_utf8(self.str()?.to_vec()).ok()?;
            let addr = String::from_utf8(self.str()?.to_vec()).ok()?;
            v.push(ShardSpec {
                name,
                addr,
                weight: self.u32()?,
            });
        }
        Some(v)
    }
    fn placement(&mut self) -> Option<Placement> {
        let version = self.u64()?;
        let shards = self.specs()?;
        let migration = match self.take(1)?[0] {
            0 => None,
            _ => Some((self.u64()?, self.specs()?)),
        };
        Some(Placement {
            version,
            shards,
            migration,
        })
    }
    fn batch(&mut self) -> Option<LoggedBatch> {
        let seq = self.u64()?;
        let sl = self.u32()? as usize;
        let shard = String::from_utf8(self.take(sl)?.to_vec()).ok()?;
        Some((seq, shard, self.items()?))
    }
}

/// An `Incrs` entry's key: in the record, or by a name given earlier in the segment.
enum Who<'a> {
    Key(&'a [u8]),
    Name(u32),
}

/// Applies one record; `names` are the key names given so far in its segment.
fn apply(
    rec: &mut Recovered,
    names: &mut HashMap<u32, Bytes>,
    kind: u8,
    payload: &[u8],
) -> Option<()> {
    let mut c = Cursor(payload);
    match kind {
        INCR => {
            let kl = c.u32()? as usize;
            let k = Bytes::copy_from_slice(c.take(kl)?);
            let d = c.i64()?;
            let e = rec.pending.entry(k).or_insert(0);
            *e = e.wrapping_add(d);
        }
        INCRS | NAMED_INCRS => {
            // Parsed whole before any of it is applied: a record that does not parse is
            // refused whole, as a torn or corrupt one is. A name used before it is given is
            // such a record.
            let mut entries: Vec<(Who, i64, Option<u64>)> = Vec::new();
            while !c.0.is_empty() {
                let head = c.varint()?;
                let len = |bits: u32| usize::try_from(head >> bits).ok();
                let who = if kind == INCRS {
                    Who::Key(c.take(len(1)?)?)
                } else if head & HEAD_NAMED == 0 {
                    Who::Key(c.take(len(2)?)?)
                } else if head & HEAD_GIVEN != 0 {
                    let key = c.take(len(3)?)?;
                    let n = u32::try_from(c.varint()?).ok()?;
                    names.insert(n, Bytes::copy_from_slice(key));
                    Who::Key(key)
                } else {
                    let n = u32::try_from(head >> 3).ok()?;
                    names.contains_key(&n).then_some(())?;
                    Who::Name(n)
                };
                let z = c.varint()?;
                let d = (z >> 1) as i64 ^ -((z & 1) as i64);
                // Bit 0 in both formats.
                let t = if head & HEAD_WINDOWED != 0 {
                    Some(c.varint()?)
                } else {
                    None
                };
                entries.push((who, d, t));
            }
            let mut add = |key: &[u8], d: i64| match rec.pending.get_mut(key) {
                Some(e) => *e = e.wrapping_add(d),
                None => {
                    rec.pending.insert(Bytes::copy_from_slice(key), d);
                }
            };
            for (who, d, t) in entries {
                let key = match who {
                    Who::Key(k) => k,
                    Who::Name(n) => &names[&n][..],
                };
                if let Some(t) = t {
                    add(&super::windows::pending_key(super::windows::ALL, t, key), d);
                }
                add(key, d);
            }
        }
        BATCH => {
            let (seq, shard, items) = c.batch()?;
            for (k, d) in &items {
                let e = rec.pending.entry(k.clone()).or_insert(0);
                *e = e.wrapping_sub(*d);
            }
            rec.next_seq = rec.next_seq.max(seq + 1);
            rec.unapplied.insert(seq, (shard, items));
        }
        APPLIED => {
            let seq = c.u64()?;
            rec.unapplied.remove(&seq);
        }
        CHECKPOINT => {
            let next = c.u64()?;
            let pending = c.items()?;
            let n = c.u32()? as usize;
            let mut unapplied = Unapplied::new();
            for _ in 0..n {
                let (seq, shard, items) = c.batch()?;
                unapplied.insert(seq, (shard, items));
            }
            rec.pending = pending.into_iter().collect();
            rec.unapplied = unapplied;
            rec.lost_checkpoint = None;
            rec.next_seq = rec.next_seq.max(next);
            // Placement and moved keys follow when a shard list was ever recorded.
            rec.moved.clear();
            if !c.0.is_empty() {
                rec.placement = match c.take(1)?[0] {
                    0 => None,
                    _ => Some(c.placement()?),
                };
                let n = c.u32()? as usize;
                for _ in 0..n {
                    rec.moved.insert(Bytes::copy_from_slice(c.str()?));
                }
            }
        }
        PLACEMENT => {
            let pl = c.placement()?;
            let same = rec
                .placement
                .as_ref()
                .and_then(|p| p.migration.as_ref().map(|m| m.0))
                == pl.migration.as_ref().map(|m| m.0);
            if !same {
                rec.moved.clear();
            }
            rec.placement = Some(pl);
        }
        MOVED => {
            let _id = c.u64()?;
            let k = Bytes::copy_from_slice(c.str()?);
            let v = c.i64()?;
            let e = rec.pending.entry(k.clone()).or_insert(0);
            *e = e.wrapping_add(v);
            rec.moved.insert(k);
        }
        MARKED => {
            let _id = c.u64()?;
            rec.moved.insert(Bytes::copy_from_slice(c.str()?));
        }
        _ => return None,
    }
    Some(())
}

/// Replays one segment into `rec`. A bad record ends the segment; in the last segment the
/// file is truncated there.
fn replay_file(path: &Path, last: bool, rec: &mut Recovered) -> std::io::Result<()> {
    let mut data = Vec::new();
    File::open(path)?.read_to_end(&mut data)?;
    let mut at = 0usize;
    // A segment's names are its own (see `LogName`).
    let mut names = HashMap::new();
    while at < data.len() {
        let whole = (|| {
            let len = u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?) as usize;
            let crc = u32::from_le_bytes(data.get(at + 4..at + 8)?.try_into().ok()?);
            if len == 0 || len > MAX_RECORD {
                return None;
            }
            let body = data.get(at + 8..at + 8 + len)?;
            (crc32fast::hash(body) == crc).then_some((len, body))
        })();
        let Some((len, body)) = whole else { break };
        let applied = match body[0] {
            CHECKPOINT_AT => checkpoint::replay_at(path, &body[1..], rec)?,
            kind => apply(rec, &mut names, kind, &body[1..]),
        };
        if applied.is_none() {
            break;
        }
        rec.records += 1;
        at += 8 + len;
    }
    if at < data.len() {
        let lost = (data.len() - at) as u64;
        rec.truncated_bytes += lost;
        tracing::warn!(segment = %path.display(), offset = at, bytes = lost, "write-ahead log record is torn or corrupt");
        if last {
            OpenOptions::new()
                .write(true)
                .open(path)?
                .set_len(at as u64)?;
        }
    }
    Ok(())
}

/// Puts what replay found back into the engine and queues the unapplied batches on their
/// lanes, oldest first, ahead of any new work.
pub async fn restore(engine: &Arc<Engine>, rec: Recovered) {
    for (k, d) in &rec.pending {
        engine.restore_pending(k, *d);
    }
    for (seq, (shard, items)) in rec.unapplied {
        // In a cluster the batch's parts go where their slots are served now, whichever
        // lane sends them: all replays go to one lane, in order, so that no two lanes hold
        // (and send) batches of one slot at once (see `slot_holds`).
        let lane = match engine.any_lane() {
            Some(any) => Some(any),
            None => engine.lane(&shard),
        };
        match lane {
            Some(lane) => {
                engine.restore_inflight(&items);
                lane.replay(seq, items);
            }
            None => {
                // The shard is gone from the config: whether the batch landed there cannot be
                // known. Keep the deltas pending for the current owners, and say so.
                tracing::warn!(seq, shard = %shard, keys = items.len(), "unapplied batch for a shard no longer configured; its deltas go to the current owners");
                for (k, d) in &items {
                    engine.restore_pending(k, *d);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_is_due_after_segment_bytes_of_records_or_its_own_size() {
        const MIB: u64 = 1 << 20;
        // A small state: every 64 MiB of records, as before.
        assert!(!checkpoint_due(64 * MIB, MIB, 64 * MIB));
        assert!(checkpoint_due(64 * MIB + 1, MIB, 64 * MIB));
        // A state of 300 MiB (ten million keys): not again at once, but after as much again.
        assert!(!checkpoint_due(0, 300 * MIB, 64 * MIB));
        assert!(!checkpoint_due(300 * MIB, 300 * MIB, 64 * MIB));
        assert!(checkpoint_due(300 * MIB + 1, 300 * MIB, 64 * MIB));
        // Not while the last checkpoint's file is still being written.
        assert!(!checkpoint_due(1 << 40, u64::MAX, 64 * MIB));
    }

    fn roundtrip(bytes: &[u8]) -> Recovered {
        let dir = std::env::temp_dir().join(format!(
            "tally-wal-test-{}-{}",
            std::process::id(),
            super::super::now_micros()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("wal-0000000000000001.log");
        std::fs::write(&p, bytes).unwrap();
        let mut rec = Recovered::default();
        replay_file(&p, true, &mut rec).unwrap();
        let len = std::fs::metadata(&p).unwrap().len();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(len <= bytes.len() as u64);
        rec
    }

    #[test]
    fn incr_batch_applied_replay_to_the_right_state() {
        let mut b = Vec::new();
        encode_incr(&mut b, b"a", 5);
        encode_incr(&mut b, b"b", 2);
        encode_batch(&mut b, 10, "s1", &[(Bytes::from_static(b"a"), 5)]);
        encode_incr(&mut b, b"a", 1);
        encode_batch(&mut b, 11, "s1", &[(Bytes::from_static(b"b"), 2)]);
        frame(&mut b, APPLIED, &10u64.to_le_bytes());
        let r = roundtrip(&b);
        assert_eq!(r.pending[&Bytes::from_static(b"a")], 1);
        assert_eq!(r.pending[&Bytes::from_static(b"b")], 0);
        assert_eq!(r.unapplied.keys().copied().collect::<Vec<_>>(), vec![11]);
        assert_eq!(r.next_seq, 12);
        assert_eq!(r.truncated_bytes, 0);
    }

    #[test]
    fn a_windowed_incr_replays_as_the_key_and_its_window_delta() {
        use super::super::windows::{pending_key, ALL};
        let mut b = Vec::new();
        let at = begin_incrs(&mut b);
        append_named_incr(&mut b, b"visits:a", LogName::None, 3, Some(1_800_000_000));
        append_named_incr(&mut b, b"visits:a", LogName::None, 2, Some(1_800_000_001));
        append_incr(&mut b, b"visits:a", 1);
        end_incrs(&mut b, at);
        let w0 = Bytes::from(pending_key(ALL, 1_800_000_000, b"visits:a"));
        let w1 = Bytes::from(pending_key(ALL, 1_800_000_001, b"visits:a"));
        encode_batch(&mut b, 10, "s1", &[(w0.clone(), 3)]);
        let r = roundtrip(&b);
        assert_eq!(r.pending[&Bytes::from_static(b"visits:a")], 6);
        assert_eq!(r.pending[&w0], 0);
        assert_eq!(r.pending[&w1], 2);
        assert_eq!(r.pending.len(), 3);
    }

    #[test]
    fn moved_values_count_and_marked_keys_only_mark() {
        let mut b = Vec::new();
        encode_moved(&mut b, 7, b"k", 40);
        encode_marked(&mut b, 7, b"tally:w:{k}:m:0:k");
        let r = roundtrip(&b);
        assert_eq!(r.pending.get(&Bytes::from_static(b"k")), Some(&40));
        assert_eq!(
            r.pending.len(),
            1,
            "a marked key adds nothing: {:?}",
            r.pending
        );
        assert!(r.moved.contains(&Bytes::from_static(b"k")));
        assert!(r.moved.contains(&Bytes::from_static(b"tally:w:{k}:m:0:k")));
    }

    #[test]
    fn the_incr_record_is_framed_as_any_other() {
        let mut fast = Vec::new();
        encode_incr(&mut fast, b"visits:home", -3);
        let mut payload = Vec::new();
        payload.extend_from_slice(&11u32.to_le_bytes());
        payload.extend_from_slice(b"visits:home");
        payload.extend_from_slice(&(-3i64).to_le_bytes());
        let mut framed = Vec::new();
        frame(&mut framed, INCR, &payload);
        assert_eq!(fast, framed);
    }

    /// The entries of a drain, as `Engine::drain_logs` frames them.
    fn incrs(entries: &[(&[u8], i64)]) -> Vec<u8> {
        let mut b = Vec::new();
        let at = begin_incrs(&mut b);
        for (k, d) in entries {
            append_incr(&mut b, k, *d);
        }
        end_incrs(&mut b, at);
        b
    }

    #[test]
    fn a_group_of_increments_replays_as_its_sum_with_the_other_records() {
        let long = vec![b'k'; 300];
        let mut b = Vec::new();
        encode_incr(&mut b, b"a", 5);
        b.extend(incrs(&[
            (b"a", 1),
            (b"b", -7),
            (b"a", i64::MAX),
            (&long, i64::MIN),
            (b"", 0),
            (b"c", 63),
            (b"c", -64),
        ]));
        encode_batch(&mut b, 3, "s1", &[(Bytes::from_static(b"b"), -7)]);
        let r = roundtrip(&b);
        assert_eq!(
            r.pending[&Bytes::from_static(b"a")],
            6i64.wrapping_add(i64::MAX)
        );
        assert_eq!(r.pending[&Bytes::from_static(b"b")], 0);
        assert_eq!(r.pending[&Bytes::from(long)], i64::MIN);
        assert_eq!(r.pending[&Bytes::from_static(b"c")], -1);
        assert_eq!(r.pending[&Bytes::from_static(b"")], 0);
        assert_eq!(r.records, 3);
        assert_eq!(r.truncated_bytes, 0);
    }

    #[test]
    fn an_empty_group_writes_nothing_and_a_delta_of_one_takes_one_byte() {
        assert!(incrs(&[]).is_empty());
        let mut e = Vec::new();
        append_incr(&mut e, b"counter:000000001234", 1);
        assert_eq!(e.len(), 1 + 20 + 1);
    }

    /// Stripe `s`'s names for keys, given in turn as an engine stripe gives them.
    struct Namer {
        next: u16,
        slots: HashMap<Vec<u8>, u16>,
        stripe: usize,
    }

    impl Namer {
        fn new(stripe: usize) -> Namer {
            Namer {
                next: 1,
                slots: HashMap::new(),
                stripe,
            }
        }
        fn append(&mut self, out: &mut Vec<u8>, key: &[u8], d: i64, t: Option<u64>) {
            let slot = self.slots.entry(key.to_vec()).or_insert(0);
            let name = LogName::of(slot, &mut self.next, self.stripe);
            append_named_incr(out, key, name, d, t);
        }
    }

    #[test]
    fn a_named_key_is_logged_in_a_few_bytes_and_replays_by_its_name() {
        use super::super::windows::{pending_key, ALL};
        let (mut s0, mut s7) = (Namer::new(0), Namer::new(7));
        let key = b"counter:000000001234";
        let mut b = Vec::new();
        let at = begin_incrs(&mut b);
        let before = b.len();
        s0.append(&mut b, key, 1, None);
        let given = b.len() - before;
        s0.append(&mut b, key, 1, None);
        assert_eq!(given, 2 + 20 + 1 + 1, "head, key, name, delta");
        assert_eq!(b.len() - before - given, 2 + 1, "head with the name, delta");
        s7.append(&mut b, b"visits:a", 5, Some(1_800_000_000));
        end_incrs(&mut b, at);
        // Names used in a later record of the segment, and a name per stripe.
        let at = begin_incrs(&mut b);
        s0.append(&mut b, key, -3, None);
        s7.append(&mut b, b"visits:a", 2, Some(1_800_000_001));
        s7.append(&mut b, b"visits:b", 1, None);
        end_incrs(&mut b, at);
        assert_eq!(s7.slots[&b"visits:b"[..]], 2);
        let r = roundtrip(&b);
        assert_eq!(r.pending[&Bytes::from_static(key)], -1);
        assert_eq!(r.pending[&Bytes::from_static(b"visits:a")], 7);
        assert_eq!(r.pending[&Bytes::from_static(b"visits:b")], 1);
        let w = |t| Bytes::from(pending_key(ALL, t, b"visits:a"));
        assert_eq!(r.pending[&w(1_800_000_000)], 5);
        assert_eq!(r.pending[&w(1_800_000_001)], 2);
        assert_eq!((r.records, r.truncated_bytes), (2, 0));
    }

    #[test]
    fn a_name_not_given_in_its_segment_ends_replay_there() {
        // A segment that uses a name given only in the one before: its names are its own.
        let mut s = Namer::new(3);
        let mut first = Vec::new();
        first.extend({
            let mut b = Vec::new();
            let at = begin_incrs(&mut b);
            s.append(&mut b, b"k", 1, None);
            end_incrs(&mut b, at);
            b
        });
        let mut second = Vec::new();
        encode_incr(&mut second, b"j", 1);
        let at = begin_incrs(&mut second);
        s.append(&mut second, b"k", 1, None);
        end_incrs(&mut second, at);
        assert_eq!(roundtrip(&first).pending[&Bytes::from_static(b"k")], 1);
        let r = roundtrip(&second);
        assert_eq!(r.pending.get(&Bytes::from_static(b"k")), None);
        assert_eq!(r.pending[&Bytes::from_static(b"j")], 1);
        assert_eq!(r.records, 1);
        assert!(r.truncated_bytes > 0);
    }

    #[test]
    fn a_group_written_before_names_still_replays() {
        use super::super::windows::{pending_key, ALL};
        // Type 9 as builds before names wrote it: head = key length << 1 | windowed.
        let mut body = vec![6 << 1];
        body.extend_from_slice(b"page:a");
        body.push(0x0a); // zigzag(5)
        body.push(8 << 1 | 1);
        body.extend_from_slice(b"visits:a");
        body.push(0x05); // zigzag(-3)
        put_varint(&mut body, 1_800_000_000);
        let mut b = Vec::new();
        frame(&mut b, INCRS, &body);
        let r = roundtrip(&b);
        assert_eq!(r.pending[&Bytes::from_static(b"page:a")], 5);
        assert_eq!(r.pending[&Bytes::from_static(b"visits:a")], -3);
        let w = Bytes::from(pending_key(ALL, 1_800_000_000, b"visits:a"));
        assert_eq!(r.pending[&w], -3);
        assert_eq!((r.records, r.truncated_bytes), (1, 0));
    }

    #[test]
    fn a_named_group_that_does_not_parse_ends_replay() {
        // CRC-valid, after a whole record: a given key longer than the record, a name past
        // u32, a name used and never given, a head that never ends.
        let mut past_u32 = vec![(1 << 3 | HEAD_GIVEN | HEAD_NAMED) as u8, b'k'];
        put_varint(&mut past_u32, 1 << 32);
        past_u32.push(2);
        for body in [
            &[5 << 3 | HEAD_GIVEN as u8 | HEAD_NAMED as u8, b'k', 1, 2][..],
            &past_u32[..],
            &[32 << 3 | HEAD_NAMED as u8, 2][..],
            &[0xff; 11][..],
        ] {
            let mut b = Vec::new();
            encode_incr(&mut b, b"j", 1);
            let whole = b.len();
            frame(&mut b, NAMED_INCRS, body);
            let r = roundtrip(&b);
            assert_eq!(r.pending.len(), 1, "{body:?}: {:?}", r.pending);
            assert_eq!(r.truncated_bytes, (b.len() - whole) as u64, "{body:?}");
        }
    }

    #[test]
    fn a_stripe_out_of_names_logs_its_new_keys_whole() {
        let mut next = u16::MAX;
        let (mut a, mut b, mut c) = (0, 0, 0);
        assert_eq!(
            LogName::of(&mut a, &mut next, 31),
            LogName::Give(u32::from(u16::MAX) << 5 | 31)
        );
        assert_eq!(LogName::of(&mut b, &mut next, 31), LogName::None);
        assert_eq!((b, next), (0, 0));
        assert_eq!(
            LogName::of(&mut a, &mut next, 31),
            LogName::Use(u32::from(u16::MAX) << 5 | 31)
        );
        assert_eq!(LogName::of(&mut c, &mut next, 31), LogName::None);
    }

    #[test]
    fn a_torn_or_corrupt_group_is_dropped_whole() {
        let mut b = Vec::new();
        encode_incr(&mut b, b"k", 1);
        let whole = b.len();
        b.extend(incrs(&[(b"k", 2), (b"k", 4), (b"j", 8)]));
        for cut in whole..b.len() {
            let r = roundtrip(&b[..cut]);
            assert_eq!(r.pending[&Bytes::from_static(b"k")], 1, "cut at {cut}");
            assert_eq!(r.records, 1);
        }
        let mut bad = b.clone();
        bad[whole + 12] ^= 0x01;
        let r = roundtrip(&bad);
        assert_eq!(r.pending[&Bytes::from_static(b"k")], 1);
        assert!(r.truncated_bytes > 0);
    }

    #[test]
    fn a_group_with_one_bad_entry_applies_none_of_it() {
        // CRC-valid: a whole first entry ("a" +1), then a key longer than what is left.
        let mut b = Vec::new();
        encode_incr(&mut b, b"k", 1);
        frame(&mut b, INCRS, &[0x02, b'a', 0x02, 0x7f, b'a']);
        let r = roundtrip(&b);
        assert_eq!(
            r.pending.get(&Bytes::from_static(b"a")),
            None,
            "{:?}",
            r.pending
        );
        assert_eq!(r.pending[&Bytes::from_static(b"k")], 1);
        assert_eq!(r.records, 1);
    }

    #[test]
    fn a_record_of_type_8_ends_replay() {
        let mut b = Vec::new();
        encode_incr(&mut b, b"k", 1);
        frame(&mut b, 8, &[0x02, b'a', 0x02]);
        encode_incr(&mut b, b"j", 1);
        let r = roundtrip(&b);
        assert_eq!(r.pending.len(), 1, "{:?}", r.pending);
        assert!(r.truncated_bytes > 0);
    }

    #[test]
    fn a_group_whose_entries_overrun_it_ends_replay() {
        // A checksum that matches over entries that do not parse: a key longer than the
        // record, a varint that never ends. Refused, not read past.
        for body in [
            &[0x05, b'a'][..],
            &[0x01, b'a', 0xff, 0xff][..],
            &[0xff; 11][..],
        ] {
            let mut b = Vec::new();
            frame(&mut b, INCRS, body);
            let r = roundtrip(&b);
            assert!(r.pending.is_empty(), "{body:?}");
            assert_eq!(r.truncated_bytes, b.len() as u64);
        }
    }

    #[test]
    fn a_torn_tail_keeps_every_whole_record() {
        let mut b = Vec::new();
        for i in 0..10 {
            encode_incr(&mut b, b"k", i);
        }
        let whole = b.len();
        encode_incr(&mut b, b"k", 1000);
        for cut in whole..b.len() {
            let r = roundtrip(&b[..cut]);
            assert_eq!(r.pending[&Bytes::from_static(b"k")], 45, "cut at {cut}");
            assert_eq!(r.records, 10);
        }
    }

    #[test]
    fn a_corrupt_record_ends_replay_there() {
        let mut b = Vec::new();
        encode_incr(&mut b, b"k", 1);
        let first = b.len();
        encode_incr(&mut b, b"k", 2);
        encode_incr(&mut b, b"k", 4);
        b[first + 10] ^= 0xff; // inside the second record
        let r = roundtrip(&b);
        assert_eq!(r.pending[&Bytes::from_static(b"k")], 1);
        assert!(r.truncated_bytes > 0);
    }

    #[test]
    fn a_checkpoint_replaces_what_came_before() {
        let mut b = Vec::new();
        encode_incr(&mut b, b"old", 7);
        let mut u = Unapplied::new();
        u.insert(3, ("s".into(), vec![(Bytes::from_static(b"x"), 9)]));
        let mut pending = PendingItems::default();
        pending.push(b"k", 4);
        b.extend(encode_checkpoint(50, &pending, &u, None, &HashSet::new()));
        encode_incr(&mut b, b"k", 1);
        let r = roundtrip(&b);
        assert_eq!(r.pending.get(&Bytes::from_static(b"old")), None);
        assert_eq!(r.pending[&Bytes::from_static(b"k")], 5);
        assert_eq!(r.unapplied[&3].1[0].1, 9);
        assert_eq!(r.next_seq, 50);
    }
    /// A log whose segment is `/dev/full`: every write fails with ENOSPC, as on a full disk.
    async fn full_disk_log(tag: &str) -> (Arc<Wal>, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "tally-wal-full-{tag}-{}-{}",
            std::process::id(),
            super::super::now_micros()
        ));
        let cfg = DurabilityConfig {
            wal_dir: dir.clone(),
            fsync: Fsync::Always,
            ..DurabilityConfig::default()
        };
        let (wal, _) = Wal::open(&cfg).unwrap();
        let full = OpenOptions::new().append(true).open("/dev/full").unwrap();
        wal.segment.lock().await.file = Arc::new(full);
        (wal, dir)
    }

    #[tokio::test]
    async fn every_caller_whose_records_were_in_a_failed_write_is_told_so() {
        let (wal, dir) = full_disk_log("shared").await;
        // Two callers append before either commits: the first commit writes both records
        // in one write, which fails. Neither may be told its record is durable.
        wal.log_applied(1);
        wal.log_applied(2);
        assert_eq!(wal.commit().await, Err(WalFailed));
        assert_eq!(
            wal.commit().await,
            Err(WalFailed),
            "the second caller's record was in the failed write"
        );
        assert!(wal.failed());
        assert!(
            wal.failure().unwrap().contains("write"),
            "{:?}",
            wal.failure()
        );
        assert_eq!(wal.stats.failures.load(Ordering::Relaxed), 1);
        // Concurrent callers, each with its own record, all see the failure.
        let mut tasks = Vec::new();
        for seq in 10..20 {
            let w = wal.clone();
            tasks.push(tokio::spawn(async move {
                w.log_applied(seq);
                w.commit().await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), Err(WalFailed));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_batch_that_could_not_be_logged_is_not_counted_in_flight() {
        let (wal, dir) = full_disk_log("batch").await;
        let items = [(Bytes::from_static(b"k"), Some(3))];
        assert_eq!(wal.log_batch(7, "s", &items).await, Err(WalFailed));
        assert!(
            wal.unapplied().is_empty(),
            "a batch not logged is not sent, so not in flight"
        );
        assert!(wal.refused_throughout(wal.epoch()));
        assert!(!wal.refused_throughout(0));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
