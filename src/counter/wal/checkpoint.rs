//! The log's checkpoint: a snapshot of the whole state that starts a new segment, after
//! which the older segments are deleted, so the log does not grow without bound.
//!
//! The cut must be consistent: it waits for the lanes to be between operations
//! (`lane_gate`), holds the segment, locks every map stripe at once, drains what is buffered
//! into the old segment and copies the state, then starts the new segment and lets go. That
//! stalls increments for one pass over the keys in memory (and, with `fsync = "always"`, the
//! sync of the old segment's last records).
//!
//! Writing the snapshot is not part of the stall. At ten million keys it is ~260 MB to
//! encode, write and sync, seconds during which every increment's acknowledgement would
//! wait for the segment. So the new segment starts with a `CheckpointAt` record naming a
//! file of its own, `wal-<index>.checkpoint`, increments are logged into the segment at
//! once, and the snapshot is written to that file afterwards (with the `everysec` syncs
//! going on meanwhile). Only once the old segment, the file and the new segment are synced
//! are the older segments deleted.
//!
//! Replay meets `CheckpointAt` and reads the file: when it holds one whole checkpoint
//! record, the state starts over from it, as from an inline checkpoint. When it does not (a
//! crash or a full disk before it was synced), replay goes on without it: the older
//! segments are still there, and what they replay to is exactly the snapshot, which was cut
//! at the end of the last of them. Either way the segment's own records apply on top. A
//! file that cannot be read with no segment left before it (lost after it was synced) stops
//! the start with an error instead of starting without its counts.
//!
//! Recovering a failed log is different: the old segment lost records in the failed write,
//! so the snapshot is the only true account and is written inline, synced, before any
//! increment is taken again.

use super::{
    file_index, segment_path, sync_dir, CheckpointParts, PendingItems, Recovered, Segment,
    Unapplied, Wal, WalFailed, CHECKPOINT, CHECKPOINT_AT, MAX_RECORD,
};
use crate::config::Fsync;
use crate::counter::Engine;
use crate::spec::Placement;
use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The state at a cut, owned, so that it can be encoded and written with no lock held.
pub(super) struct Snapshot {
    next_seq: u64,
    pending: PendingItems,
    unapplied: Unapplied,
    placement: Option<Placement>,
    moved: HashSet<Bytes>,
}

impl Snapshot {
    fn parts(&self) -> CheckpointParts<'_> {
        CheckpointParts::new(
            self.next_seq,
            &self.pending,
            &self.unapplied,
            self.placement.as_ref(),
            &self.moved,
        )
    }
}

/// A cut whose snapshot is still to be written.
struct Cut {
    index: u64,
    snapshot: Snapshot,
    /// The segment before the cut, to sync before it is superseded.
    old: Arc<File>,
    /// The segment the cut started, to sync before the older ones are deleted.
    new: Arc<File>,
    started: Instant,
    /// How long the cut held the segment (every acknowledgement waited that long).
    held: Duration,
}

/// The file holding the checkpoint of segment `index`, when it is not inline.
fn checkpoint_path(dir: &Path, index: u64) -> PathBuf {
    dir.join(format!("wal-{index:016}.checkpoint"))
}

/// The `CheckpointAt` record: the segment's index, so that a file is only ever read by the
/// segment that named it.
fn checkpoint_at(index: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(17);
    super::frame(&mut out, CHECKPOINT_AT, &index.to_le_bytes());
    out
}

/// Deletes the segments and checkpoint files before segment `index`: its checkpoint is
/// durable and holds their effect. One that cannot be removed now is replayed before that
/// checkpoint, which resets the state, so it does no harm.
pub(super) fn remove_superseded(dir: &Path, index: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let i = file_index(&p, ".log").or_else(|| file_index(&p, ".checkpoint"));
        if i.is_some_and(|i| i < index) {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Replays a `CheckpointAt` record met in `segment`: the state starts over from the file it
/// names when that file holds one whole checkpoint, and goes on as it is when it does not
/// (see the module doc). `Ok(None)`: the record itself does not parse, which ends the
/// segment; an error: the file could not be read (not a missing or damaged file), which
/// stops the replay rather than pass over counts that may be there.
pub(super) fn replay_at(
    segment: &Path,
    payload: &[u8],
    rec: &mut Recovered,
) -> std::io::Result<Option<()>> {
    let Some(named) = payload.try_into().ok().map(u64::from_le_bytes) else {
        return Ok(None);
    };
    let index = file_index(segment, ".log").unwrap_or(named);
    let path = checkpoint_path(segment.parent().unwrap_or(Path::new(".")), index);
    // A record naming another segment's file is not this segment's checkpoint.
    let found = if named == index {
        read_whole(&path)?
    } else {
        None
    };
    if let Some(data) = found {
        // Applied to a fresh state first: a record that passes its checksum but does not
        // parse is passed over like a damaged file, not half applied.
        let mut fresh = Recovered {
            next_seq: rec.next_seq,
            placement: rec.placement.clone(),
            ..Recovered::default()
        };
        if super::apply(&mut fresh, &mut HashMap::new(), CHECKPOINT, &data[9..]).is_some() {
            rec.pending = fresh.pending;
            rec.unapplied = fresh.unapplied;
            rec.next_seq = fresh.next_seq;
            rec.placement = fresh.placement;
            rec.moved = fresh.moved;
            rec.lost_checkpoint = None;
            return Ok(Some(()));
        }
    }
    if rec.replayed != index.checked_sub(1) {
        // The segment just before it is gone (deleted once the file was synced): what the
        // file held is not in the older ones. A later checkpoint may still supersede it.
        tracing::warn!(checkpoint = %path.display(), "write-ahead log checkpoint file is missing or damaged and the segment before it is gone");
        rec.lost_checkpoint = Some(path);
    } else {
        tracing::warn!(checkpoint = %path.display(), "write-ahead log checkpoint file was not completed; replaying the segments before it instead");
    }
    Ok(Some(()))
}

/// The bytes of a checkpoint file that holds exactly one whole `Checkpoint` record, `None`
/// when it is missing, torn, corrupt or holds anything else; an error when it cannot be read.
fn read_whole(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut head = [0u8; 8];
    match file.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(head[..4].try_into().unwrap()) as usize;
    let crc = u32::from_le_bytes(head[4..].try_into().unwrap());
    if len == 0 || len > MAX_RECORD || file.metadata()?.len() != 8 + len as u64 {
        return Ok(None);
    }
    let mut data = Vec::with_capacity(8 + len);
    data.extend_from_slice(&head);
    file.read_to_end(&mut data)?;
    let whole =
        data.len() == 8 + len && data[8] == CHECKPOINT && crc32fast::hash(&data[8..]) == crc;
    Ok(whole.then_some(data))
}

fn hold_histogram() -> &'static metrics::Histogram {
    static H: OnceLock<metrics::Histogram> = OnceLock::new();
    crate::metrics::histogram_once(&H, "tallyproxy_wal_checkpoint_hold_seconds")
}

impl Wal {
    /// Cuts the state and starts a new segment whose checkpoint is written to a file of its
    /// own after the locks are let go (see the module doc); deletes the older segments once
    /// that file is synced. A failure to write or sync the old segment's last records marks
    /// the log failed; a failure to write the checkpoint file only keeps the older segments.
    pub async fn checkpoint(&self, engine: &Engine) -> Result<(), WalFailed> {
        let _one = self.checkpointing.lock().await;
        let cut = self.start_checkpoint(engine).await?;
        self.write_checkpoint(cut).await;
        Ok(())
    }

    /// The cut: with the lanes between operations, the segment held and every stripe
    /// locked, drains what is buffered into the old segment, copies the state and starts
    /// the new segment with its `CheckpointAt`. Increments are logged into it as soon as
    /// this returns.
    async fn start_checkpoint(&self, engine: &Engine) -> Result<Cut, WalFailed> {
        let started = Instant::now();
        let _gate = self.lane_gate.write().await;
        let mut seg = self.segment.lock().await;
        let holding = Instant::now();
        if self.failed() {
            return Err(WalFailed);
        }
        let n = self.started.fetch_add(1, Ordering::SeqCst) + 1;
        let (tail, snapshot) = self.cut(engine);
        if let Err(e) = (&*seg.file).write_all(&tail) {
            return Err(self.fail("checkpoint write", &e));
        }
        let old = seg.file.clone();
        if self.fsync == Fsync::Always {
            // The drained records are acknowledged below, so they must be synced first.
            self.sync_file(old.clone()).await?;
        } else {
            *self.superseded.lock() = Some(old.clone());
        }
        let index = seg.index + 1;
        let at = checkpoint_at(index);
        let new = self.create_segment(index, &at)?;
        *seg = Segment {
            file: new.clone(),
            index,
            size: at.len() as u64,
            start: at.len() as u64,
            snapshot: u64::MAX,
        };
        self.done.store(n, Ordering::SeqCst);
        let held = holding.elapsed();
        hold_histogram().record(held.as_secs_f64());
        Ok(Cut {
            index,
            snapshot,
            old,
            new,
            started,
            held,
        })
    }

    /// With no lock held: syncs the old segment (whatever the mode: it is about to be
    /// superseded), writes and syncs the checkpoint file, syncs the new segment (its
    /// `CheckpointAt` must be on disk before what it stands for is deleted), then deletes
    /// what the checkpoint supersedes. With `everysec`, the new segment is synced each
    /// second meanwhile. A failed sync of the old segment fails the log (the recovery's
    /// inline checkpoint is then what puts its last records on disk); a failure to write
    /// the checkpoint file only keeps the older segments, and the next checkpoint is due
    /// after `segment_bytes` more of log.
    async fn write_checkpoint(&self, cut: Cut) {
        let Cut {
            index,
            snapshot,
            old,
            new,
            started,
            held,
        } = cut;
        if self.fsync != Fsync::Always && self.sync_file(old).await.is_err() {
            return;
        }
        *self.superseded.lock() = None;
        let keys = snapshot.pending.len();
        let dir = self.dir.clone();
        let mut writing = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
            let parts = snapshot.parts();
            if parts.body_len() > MAX_RECORD {
                return Err(std::io::Error::other(format!(
                    "a checkpoint of {} bytes is larger than a record may be",
                    parts.body_len()
                )));
            }
            let mut file = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(checkpoint_path(&dir, index))?;
            parts.write_to(&mut file)?;
            file.sync_data()?;
            Ok(8 + parts.body_len() as u64)
        });
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        let written = loop {
            tokio::select! {
                r = &mut writing => break r,
                _ = tick.tick() => {
                    if self.fsync == Fsync::Everysec {
                        self.sync_current().await;
                    }
                }
            }
        };
        let bytes = match written.map_err(std::io::Error::other).and_then(|r| r) {
            Ok(bytes) => bytes,
            Err(e) => {
                {
                    let mut seg = self.segment.lock().await;
                    if seg.index == index {
                        // Due again after `segment_bytes` more of log.
                        seg.snapshot = (seg.size - seg.start).saturating_add(self.segment_bytes);
                    }
                }
                let path = checkpoint_path(&self.dir, index);
                let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(path)).await;
                tracing::warn!(segment = index, error = %e, "write-ahead log checkpoint file could not be written; the older segments are kept");
                return;
            }
        };
        // The new segment's `CheckpointAt` must be on disk before what it stands for is
        // deleted; a failure here is the live segment's, so it fails the log.
        if self.sync_file(new).await.is_err() {
            return;
        }
        let dir = self.dir.clone();
        let _ = tokio::task::spawn_blocking(move || {
            sync_dir(&dir);
            remove_superseded(&dir, index);
        })
        .await;
        {
            let mut seg = self.segment.lock().await;
            if seg.index == index {
                seg.snapshot = bytes;
            }
        }
        self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            segment = index,
            keys,
            bytes,
            held_ms = held.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "write-ahead log checkpoint"
        );
    }

    /// Brings a failed log back: a fresh segment whose first record is a checkpoint of the
    /// engine's whole state, synced, after which the older segments (with their failed
    /// tail) are deleted and increments are taken again. The checkpoint is what memory
    /// holds, so increments whose records were lost in the failed write (their clients were
    /// told nothing, an unknown outcome) are kept, and batches that were not logged were
    /// not sent. Fails, and leaves the log failed, while the disk still refuses it.
    pub async fn recover(&self, engine: &Engine) -> Result<(), WalFailed> {
        if !self.failed() {
            // Without waiting for a checkpoint file being written (shutdown asks this).
            return Ok(());
        }
        // One at a time, and never while a checkpoint is written: two recoveries would
        // count one recovery twice in the epoch.
        let _one = self.checkpointing.lock().await;
        if !self.failed() {
            return Ok(());
        }
        self.recovery_cut(engine).await?;
        *self.last_error.lock() = None;
        self.failed.store(false, Ordering::SeqCst);
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.stats.recoveries.fetch_add(1, Ordering::Relaxed);
        tracing::info!("write-ahead log recovered: increments are taken again");
        Ok(())
    }

    /// With the lanes between operations, the segment held and every map stripe locked,
    /// writes the state inline as a new segment's first record and syncs it. The old
    /// segment is not trusted, so the records buffered since its last good write are
    /// dropped (the snapshot holds their effect) instead of appended to it.
    async fn recovery_cut(&self, engine: &Engine) -> Result<(), WalFailed> {
        let _gate = self.lane_gate.write().await;
        let mut seg = self.segment.lock().await;
        let n = self.started.fetch_add(1, Ordering::SeqCst) + 1;
        let (_, snapshot) = self.cut(engine);
        let mut cp = Vec::new();
        snapshot
            .parts()
            .write_to(&mut cp)
            .expect("writing to a Vec does not fail");
        let index = seg.index + 1;
        let file = self.create_segment(index, &cp)?;
        if let Err(e) = self.sync_file(file.clone()).await {
            let _ = std::fs::remove_file(segment_path(&self.dir, index));
            return Err(e);
        }
        *seg = Segment {
            file,
            index,
            size: cp.len() as u64,
            start: cp.len() as u64,
            snapshot: cp.len() as u64,
        };
        *self.superseded.lock() = None;
        self.done.store(n, Ordering::SeqCst);
        drop(seg);
        drop(_gate);
        let dir = self.dir.clone();
        let _ = tokio::task::spawn_blocking(move || {
            sync_dir(&dir);
            remove_superseded(&dir, index);
        })
        .await;
        self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            segment = index,
            bytes = cp.len(),
            "write-ahead log checkpoint"
        );
        Ok(())
    }

    /// Creates segment `index` with its first record (a `CheckpointAt`, or a recovery's
    /// inline `Checkpoint`); leftovers of an earlier failed attempt at that index go first.
    /// On failure nothing of it is left (a replay must not meet half a checkpoint) and the
    /// log is failed.
    fn create_segment(&self, index: u64, first: &[u8]) -> Result<Arc<File>, WalFailed> {
        let path = segment_path(&self.dir, index);
        let file = (|| -> std::io::Result<File> {
            let _ = std::fs::remove_file(checkpoint_path(&self.dir, index));
            let _ = std::fs::remove_file(&path);
            let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
            file.write_all(first)?;
            Ok(file)
        })();
        file.map(Arc::new).map_err(|e| {
            let _ = std::fs::remove_file(&path);
            self.fail("checkpoint write", &e)
        })
    }

    /// The consistent cut, called with the lane gate and the segment held: every stripe's
    /// buffered entries and the log's own buffered records (the tail, for the old segment),
    /// and a copy of the state.
    fn cut(&self, engine: &Engine) -> (Vec<u8>, Snapshot) {
        let meta = &mut *self.meta.lock();
        let (mut tail, pending, moved) = engine.cut(&meta.unapplied);
        tail.append(&mut meta.buf);
        let snapshot = Snapshot {
            next_seq: engine.peek_seq(),
            pending,
            unapplied: meta.unapplied.clone(),
            placement: meta.placement.clone(),
            moved,
        };
        (tail, snapshot)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{encode_checkpoint, encode_incr, Wal};
    use super::*;
    use crate::backend::Shard;
    use crate::config::{Config, DurabilityConfig};
    use crate::counter::windows;
    use crate::router::{Router, Topology};

    /// Pending counts by key, sorted.
    type Counts = Vec<(String, i64)>;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "tally-cp-{tag}-{}-{}",
            std::process::id(),
            crate::counter::now_micros()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn cfg(dir: &Path) -> DurabilityConfig {
        DurabilityConfig {
            wal_dir: dir.to_path_buf(),
            ..DurabilityConfig::default()
        }
    }

    fn items(kv: &[(&[u8], i64)]) -> PendingItems {
        let mut p = PendingItems::default();
        for (k, d) in kv {
            p.push(k, *d);
        }
        p
    }

    fn checkpoint_record(kv: &[(&[u8], i64)]) -> Vec<u8> {
        encode_checkpoint(1, &items(kv), &Unapplied::new(), None, &HashSet::new())
    }

    fn counts(pending: &HashMap<Bytes, i64>) -> Counts {
        let mut v: Vec<_> = pending
            .iter()
            .map(|(k, d)| (String::from_utf8_lossy(k).into_owned(), *d))
            .collect();
        v.sort();
        v
    }

    fn pairs(kv: &[(&str, i64)]) -> Counts {
        kv.iter().map(|(k, d)| (k.to_string(), *d)).collect()
    }

    /// The files of a log directory, by name.
    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("wal-"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_checkpoint_file_is_read_when_whole_and_passed_over_when_not() {
        // Segment 1 replays to a 3, b 3. Segment 2 is cut after it, adds a 10, and names a
        // checkpoint file; the file also holds c 7 (a real one never differs from the
        // segments before it), which shows whether it was read.
        let mut one = checkpoint_record(&[(b"a", 1)]);
        encode_incr(&mut one, b"a", 2);
        encode_incr(&mut one, b"b", 3);
        let mut two = checkpoint_at(2);
        encode_incr(&mut two, b"a", 10);
        let file = checkpoint_record(&[(b"a", 3), (b"b", 3), (b"c", 7)]);
        let mut torn = file.clone();
        torn.pop();
        let mut corrupt = file.clone();
        *corrupt.last_mut().unwrap() ^= 1;
        let mut other_kind = Vec::new();
        encode_incr(&mut other_kind, b"c", 7);
        let read = pairs(&[("a", 13), ("b", 3), ("c", 7)]);
        let passed_over = pairs(&[("a", 13), ("b", 3)]);
        let cases: [(&str, Option<&[u8]>, &Counts); 5] = [
            ("whole", Some(&file), &read),
            ("missing", None, &passed_over),
            ("torn", Some(&torn), &passed_over),
            ("corrupt", Some(&corrupt), &passed_over),
            ("another record", Some(&other_kind), &passed_over),
        ];
        for (case, cp, want) in cases {
            let dir = temp_dir("replay");
            std::fs::write(segment_path(&dir, 1), &one).unwrap();
            std::fs::write(segment_path(&dir, 2), &two).unwrap();
            if let Some(cp) = cp {
                std::fs::write(checkpoint_path(&dir, 2), cp).unwrap();
            }
            let (_wal, rec) = Wal::open(&cfg(&dir)).unwrap();
            assert_eq!(&counts(&rec.pending), want, "{case}");
            // The log starts again from one inline checkpoint; nothing older is kept.
            assert_eq!(files(&dir), ["wal-0000000000000003.log"], "{case}");
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn segments_whose_checkpoint_files_are_missing_replay_in_order() {
        let dir = temp_dir("chain");
        let mut one = checkpoint_record(&[(b"a", 1)]);
        encode_incr(&mut one, b"a", 2);
        // A batch logged in segment 2 and confirmed in segment 3: in flight only if the
        // order were lost.
        let mut two = checkpoint_at(2);
        encode_incr(&mut two, b"b", 3);
        super::super::encode_batch(&mut two, 9, "s", &[(Bytes::from_static(b"b"), 3)]);
        let mut three = checkpoint_at(3);
        encode_incr(&mut three, b"a", 4);
        super::super::frame(&mut three, super::super::APPLIED, &9u64.to_le_bytes());
        for (i, seg) in [(1, &one), (2, &two), (3, &three)] {
            std::fs::write(segment_path(&dir, i), seg).unwrap();
        }
        let (_wal, rec) = Wal::open(&cfg(&dir)).unwrap();
        assert_eq!(counts(&rec.pending), pairs(&[("a", 7)]));
        assert_eq!(in_flight(&rec), vec![]);
        assert_eq!(rec.next_seq, 10);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_lost_checkpoint_file_with_nothing_before_it_stops_the_start() {
        let dir = temp_dir("lost");
        let mut two = checkpoint_at(2);
        encode_incr(&mut two, b"a", 10);
        std::fs::write(segment_path(&dir, 2), &two).unwrap();
        let err = Wal::open(&cfg(&dir)).err().expect("the start is refused");
        assert!(
            err.to_string().contains("wal-0000000000000002.checkpoint"),
            "{err}"
        );
        assert_eq!(files(&dir), ["wal-0000000000000002.log"], "nothing deleted");
        // The same with an older segment left over (its deletion failed), but not the one
        // just before: the segments between them are gone.
        let mut zero = checkpoint_record(&[(b"z", 1)]);
        encode_incr(&mut zero, b"z", 1);
        std::fs::write(segment_path(&dir, 0), &zero).unwrap();
        let err = Wal::open(&cfg(&dir)).err().expect("the start is refused");
        assert!(
            err.to_string().contains("wal-0000000000000002.checkpoint"),
            "{err}"
        );
        // A later segment whose checkpoint file is whole supersedes it (a segment left over
        // because it could not be deleted): the start goes on from that checkpoint.
        let mut three = checkpoint_at(3);
        encode_incr(&mut three, b"a", 1);
        std::fs::write(segment_path(&dir, 3), &three).unwrap();
        std::fs::write(
            checkpoint_path(&dir, 3),
            checkpoint_record(&[(b"a", 10), (b"b", 2)]),
        )
        .unwrap();
        let (_wal, rec) = Wal::open(&cfg(&dir)).unwrap();
        assert_eq!(counts(&rec.pending), pairs(&[("a", 11), ("b", 2)]));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_checkpoint_file_names_its_own_segment() {
        // A segment naming another segment's file does not read it.
        let dir = temp_dir("own");
        let mut one = checkpoint_record(&[(b"a", 1)]);
        encode_incr(&mut one, b"a", 2);
        let mut two = checkpoint_at(5);
        encode_incr(&mut two, b"a", 10);
        std::fs::write(segment_path(&dir, 1), &one).unwrap();
        std::fs::write(segment_path(&dir, 2), &two).unwrap();
        std::fs::write(checkpoint_path(&dir, 2), checkpoint_record(&[(b"z", 1)])).unwrap();
        let (_wal, rec) = Wal::open(&cfg(&dir)).unwrap();
        assert_eq!(counts(&rec.pending), pairs(&[("a", 13)]));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn engine_with_log(dir: &Path) -> (Arc<Engine>, Arc<Wal>, Arc<Topology>) {
        let config = Config::from_toml_str("[durability]\nenabled = false\n").unwrap();
        let addr = "127.0.0.1:1".parse().unwrap();
        let shard = Shard::new("s".into(), addr, 1, &config).unwrap();
        let topo = Topology::new(1, vec![shard], config.ring.vnodes);
        let router = Arc::new(Router::new(topo));
        let topo = router.topology();
        let mut engine = Engine::new(
            &config.counters,
            windows::Windows::from_config(&config.windows),
            crate::clock::Clock::manual(1_800_000_000_000),
            router,
            "t".into(),
            1,
        );
        let (wal, _) = Wal::open(&cfg(dir)).unwrap();
        engine.set_wal(wal.clone());
        (engine, wal, topo)
    }

    /// An increment with no base (the test's shard does not exist), logged.
    fn incr(engine: &Engine, key: &[u8], delta: i64) {
        assert!(matches!(
            engine.incr_blind(key, delta),
            crate::counter::Incr::Pending
        ));
    }

    /// What a replay of a copy of `dir`'s files (a machine stopped at this point) recovers.
    fn replay_copy(dir: &Path, tag: &str) -> Counts {
        counts(&replay_whole(dir, tag).pending)
    }

    fn replay_whole(dir: &Path, tag: &str) -> Recovered {
        let copy = temp_dir(tag);
        for f in files(dir) {
            if dir.join(&f).is_file() {
                std::fs::copy(dir.join(&f), copy.join(&f)).unwrap();
            }
        }
        let (_wal, rec) = Wal::open(&cfg(&copy)).unwrap();
        std::fs::remove_dir_all(&copy).unwrap();
        rec
    }

    /// The keys of the batches replay found in flight, by sequence number.
    fn in_flight(rec: &Recovered) -> Vec<(u64, Counts)> {
        rec.unapplied
            .iter()
            .map(|(seq, (_, items))| (*seq, counts(&items.iter().cloned().collect())))
            .collect()
    }

    #[tokio::test]
    async fn a_batch_logged_before_the_cut_and_applied_after_it_replays_once() {
        let dir = temp_dir("batch");
        let (engine, wal, topo) = engine_with_log(&dir);
        incr(&engine, b"a", 5);
        incr(&engine, b"b", 1);
        wal.commit().await.unwrap();
        // A flush takes a and b and logs its batch; then the cut, with the batch in flight.
        let mut taken = engine.take(Some((&topo, 0, &mut 0)), None, usize::MAX, 0);
        taken.sort();
        assert_eq!(
            counts(&taken.iter().cloned().collect()),
            pairs(&[("a", 5), ("b", 1)])
        );
        let items: Vec<_> = taken.iter().map(|(k, d)| (k.clone(), Some(*d))).collect();
        wal.log_batch(1, "s", &items).await.unwrap();
        let cut = wal.start_checkpoint(&engine).await.unwrap();
        incr(&engine, b"a", 2);
        wal.commit().await.unwrap();
        let in_flight_1 = vec![(1, pairs(&[("a", 5), ("b", 1)]))];
        // Without the checkpoint file (the old segment stands in for it), then with it.
        for (when, rec) in [
            ("before its file", replay_whole(&dir, "batch-crash")),
            ("after its file", {
                wal.write_checkpoint(cut).await;
                replay_whole(&dir, "batch-file")
            }),
        ] {
            assert_eq!(counts(&rec.pending), pairs(&[("a", 2)]), "{when}");
            assert_eq!(in_flight(&rec), in_flight_1, "{when}");
            assert!(rec.next_seq > 1, "{when}: seq 1 is never given again");
        }
        // The batch lands: its Applied is in the new segment, after the checkpoint.
        wal.log_applied(1);
        wal.commit().await.unwrap();
        let rec = replay_whole(&dir, "batch-applied");
        assert_eq!(counts(&rec.pending), pairs(&[("a", 2)]));
        assert_eq!(in_flight(&rec), vec![]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_checkpoint_file_that_cannot_be_written_keeps_the_older_segments() {
        let dir = temp_dir("unwritable");
        let (engine, wal, _) = engine_with_log(&dir);
        incr(&engine, b"a", 5);
        wal.commit().await.unwrap();
        // A directory where the file should go: creating the file fails.
        std::fs::create_dir(checkpoint_path(&dir, 2)).unwrap();
        let cut = wal.start_checkpoint(&engine).await.unwrap();
        incr(&engine, b"a", 1);
        wal.commit().await.unwrap();
        wal.write_checkpoint(cut).await;
        assert!(
            !wal.failed(),
            "a checkpoint file not written is not a failed log"
        );
        assert_eq!(wal.stats.checkpoints.load(Ordering::Relaxed), 0);
        assert_eq!(
            files(&dir),
            [
                "wal-0000000000000001.log",
                "wal-0000000000000002.checkpoint",
                "wal-0000000000000002.log"
            ]
        );
        {
            let seg = wal.segment.lock().await;
            let records = seg.size - seg.start;
            assert!(records > 0);
            assert_eq!(
                seg.snapshot,
                records + DurabilityConfig::default().segment_bytes,
                "due again after segment_bytes more of log, not at once"
            );
        }
        assert_eq!(replay_copy(&dir, "unwritable-replay"), pairs(&[("a", 6)]));
        // The next checkpoint writes its file and supersedes the whole chain.
        std::fs::remove_dir(checkpoint_path(&dir, 2)).unwrap();
        wal.checkpoint(&engine).await.unwrap();
        assert_eq!(
            files(&dir),
            [
                "wal-0000000000000003.checkpoint",
                "wal-0000000000000003.log"
            ]
        );
        assert_eq!(replay_copy(&dir, "unwritable-next"), pairs(&[("a", 6)]));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn increments_logged_while_the_checkpoint_is_written_replay_exactly() {
        let dir = temp_dir("engine");
        let (engine, wal, _) = engine_with_log(&dir);
        for (k, d) in [(&b"a"[..], 5), (b"b", 7), (b"a", 1)] {
            incr(&engine, k, d);
        }
        // Logged but not yet written: the cut drains it into the old segment.
        wal.commit().await.unwrap();
        incr(&engine, b"b", 1);
        let cut = wal.start_checkpoint(&engine).await.unwrap();
        assert_eq!(
            files(&dir),
            ["wal-0000000000000001.log", "wal-0000000000000002.log"],
            "the new segment starts before its checkpoint file is written"
        );
        // Increments go on into the new segment meanwhile, by names given afresh.
        for (k, d) in [(&b"a"[..], 10), (b"c", 2), (b"a", 1)] {
            incr(&engine, k, d);
        }
        wal.commit().await.unwrap();
        // A crash now: the checkpoint file is not there; the old segment stands in for it.
        let crashed = pairs(&[("a", 17), ("b", 8), ("c", 2)]);
        assert_eq!(replay_copy(&dir, "crash"), crashed);
        wal.write_checkpoint(cut).await;
        assert_eq!(
            files(&dir),
            [
                "wal-0000000000000002.checkpoint",
                "wal-0000000000000002.log"
            ],
            "the older segment is deleted once the checkpoint file is synced"
        );
        assert_eq!(replay_copy(&dir, "after"), crashed);
        incr(&engine, b"a", 100);
        wal.commit().await.unwrap();
        assert_eq!(
            replay_copy(&dir, "later"),
            pairs(&[("a", 117), ("b", 8), ("c", 2)])
        );
        assert_eq!(wal.stats.checkpoints.load(Ordering::Relaxed), 1);
        // The segment is due again only after as many bytes of records as the checkpoint.
        let seg = wal.segment.lock().await;
        assert_eq!(
            seg.snapshot,
            std::fs::metadata(dir.join("wal-0000000000000002.checkpoint"))
                .unwrap()
                .len()
        );
        drop(seg);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
