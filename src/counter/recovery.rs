//! The engine's side of the write-ahead log: draining the records appended under the stripe
//! locks into a commit, the consistent cut of a checkpoint, putting replayed state back, and
//! the log's operations as the rest of the crate sees them (commit before a reply, placement
//! records, sync, failure state, figures). The log itself is private to the engine.
//!
//! Owns the engine's state as the log sees it. Does not own the file or its format (`wal`).

use super::stripe::{BaseState, Cell, Entry, Stripe, DIRTY, INFLIGHT};
use super::{wal, windows, Engine};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Engine {
    /// Makes every record appended so far durable for the fsync mode (group commit; see
    /// `Wal::commit`). Ok when there is no log.
    pub async fn commit_log(&self) -> Result<(), wal::WalFailed> {
        match &self.wal {
            Some(w) => w.commit().await,
            None => Ok(()),
        }
    }

    /// The log checkpoint's gate, held for reading by a lane while it takes deltas and logs
    /// their batches, or settles a reply (a checkpoint's cut holds it for writing); None
    /// without a log.
    pub(crate) async fn lane_gate(&self) -> Option<tokio::sync::RwLockReadGuard<'_, ()>> {
        match &self.wal {
            Some(w) => Some(w.lane_gate.read().await),
            None => None,
        }
    }

    /// Whether increments are logged at all (`[durability] enabled`).
    pub fn has_log(&self) -> bool {
        self.wal.is_some()
    }

    /// The log's failure epoch, read before a burst of requests (0 without a log).
    pub fn log_epoch(&self) -> u64 {
        self.wal.as_ref().map_or(0, |w| w.epoch())
    }

    /// Whether the log has been failed without a break since `epoch` was read (see
    /// `Wal::refused_throughout`): replies given since acknowledge nothing.
    pub fn log_refused_throughout(&self, epoch: u64) -> bool {
        self.wal
            .as_ref()
            .is_some_and(|w| w.refused_throughout(epoch))
    }

    /// Why the log failed, while it is failed.
    pub fn log_failure(&self) -> Option<String> {
        self.wal.as_ref().and_then(|w| w.failure())
    }

    /// Records the shard list in force (and a rebalance under way), durably. Ok without a log.
    pub async fn log_placement(&self, pl: &crate::spec::Placement) -> Result<(), wal::WalFailed> {
        match &self.wal {
            Some(w) => w.log_placement(pl).await,
            None => Ok(()),
        }
    }

    /// Writes what is buffered and syncs it, whatever the fsync mode.
    pub async fn sync_log(&self) {
        if let Some(w) = &self.wal {
            w.sync_now().await;
        }
    }

    /// Brings a failed log back if the disk lets it (see `Wal::recover`). Ok without a log.
    pub async fn recover_log(&self) -> Result<(), wal::WalFailed> {
        match &self.wal {
            Some(w) => w.recover(self).await,
            None => Ok(()),
        }
    }

    /// The log's figures for INFO and /metrics (`wal_enabled:0` without a log).
    pub fn log_info_lines(&self) -> Vec<(String, String)> {
        match &self.wal {
            Some(w) => w.info_lines(),
            None => vec![("wal_enabled".into(), "0".into())],
        }
    }

    /// Starts the log's background task (everysec syncs, checkpoints, recovery).
    pub fn spawn_log_background(self: &Arc<Self>, shutdown: crate::shutdown::Shutdown) {
        if let Some(w) = &self.wal {
            w.spawn_background(self.clone(), shutdown);
        }
    }

    /// Restores a delta from the log at start-up (before any client connects).
    pub fn restore_pending(&self, key: &[u8], delta: i64) {
        if delta == 0 && windows::parse_pending(key).is_some() {
            // A window entry whose records cancel out (swept past retention).
            return;
        }
        self.note_window(key);
        let mut stripe = self.lock(key);
        if windows::parse_pending(key).is_none() {
            stripe.unflushed = stripe.unflushed.wrapping_add(delta);
        }
        let e = stripe.map.entry(key.into()).or_insert(Entry {
            state: if self.memory_mode {
                BaseState::Absent
            } else {
                BaseState::Unknown
            },
            ..Entry::NEW
        });
        e.pending = e.pending.saturating_add(delta);
        if e.flags & DIRTY == 0 {
            e.flags |= DIRTY;
            self.dirty_keys.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn set_wal(self: &mut Arc<Self>, wal: Arc<wal::Wal>) {
        Arc::get_mut(self)
            .expect("the log is attached before the engine is shared")
            .wal = Some(wal.clone());
        wal.attach(self);
    }

    /// Moves every buffered log record into `out` (a log commit).
    pub(crate) fn drain_logs(&self, out: &mut Vec<u8>) {
        let mut drain = Drain::new(out);
        for cell in self.stripes.iter() {
            if cell.has_log.load(Ordering::SeqCst) {
                drain.take(&mut cell.lock.lock(), cell);
            }
        }
        drain.finish();
    }

    /// A consistent cut for a log checkpoint: with every stripe locked at once, drains
    /// the buffered records (they belong before the cut) and computes, per key, the deltas
    /// not covered by a logged unapplied batch.
    pub(crate) fn cut(
        &self,
        unapplied: &wal::Unapplied,
    ) -> (Vec<u8>, wal::PendingItems, std::collections::HashSet<Bytes>) {
        let mut guards: Vec<_> = self.stripes.iter().map(|c| c.lock.lock()).collect();
        let mut tail = Vec::new();
        let mut drain = Drain::new(&mut tail);
        let mut covered: HashMap<&[u8], i64, ahash::RandomState> = HashMap::default();
        for (_, items) in unapplied.values() {
            for (k, d) in items {
                *covered.entry(&k[..]).or_insert(0) += d;
            }
        }
        let mut pending = wal::PendingItems::default();
        let mut spilled = 0;
        for (g, cell) in guards.iter_mut().zip(self.stripes.iter()) {
            drain.take(g, cell);
            // The checkpoint lists window deltas under their own keys (see `window_now`).
            spilled += g.spill_all(|_| true);
            // The new segment names its keys afresh (see `wal::LogName`).
            g.next_log_name = 1;
            for (k, e) in g.map.iter_mut() {
                e.log_name = 0;
                if !e.unflushed() {
                    continue;
                }
                let mut p = e.pending.wrapping_add(e.inflight);
                if !covered.is_empty() {
                    // With batches in flight (a flush under way) every pending key is looked
                    // up: a fast hash, as the stripes' own maps use.
                    p = p.wrapping_sub(covered.get(&k[..]).copied().unwrap_or(0));
                }
                if p != 0 {
                    pending.push(k, p);
                }
            }
        }
        self.dirty_keys.fetch_add(spilled, Ordering::Relaxed);
        drain.finish();
        let moved = self.moved.lock().clone();
        (tail, pending, moved)
    }

    pub(crate) fn peek_seq(&self) -> u64 {
        self.next_seq.load(Ordering::Relaxed)
    }

    /// Marks replayed batch deltas as in flight (their batch is queued for re-sending).
    pub fn restore_inflight(&self, items: &[(Bytes, i64)]) {
        for (k, d) in items {
            self.note_window(k);
            let mut stripe = self.lock(k);
            if windows::parse_pending(k).is_none() {
                stripe.unflushed = stripe.unflushed.wrapping_add(*d);
            }
            let e = stripe.map.entry(k[..].into()).or_insert(Entry::NEW);
            e.inflight = e.inflight.wrapping_add(*d);
            e.flags |= INFLIGHT;
        }
    }

    pub fn ensure_seq_above(&self, seq: u64) {
        self.next_seq.fetch_max(seq + 1, Ordering::Relaxed);
    }
}

/// Stripes' buffered records on their way into one write: their increments as one `Incrs`
/// record, then their other records (replay only adds them up, so the order of the two does
/// not matter).
struct Drain<'a> {
    out: &'a mut Vec<u8>,
    at: usize,
    framed: Vec<u8>,
}

impl<'a> Drain<'a> {
    fn new(out: &'a mut Vec<u8>) -> Drain<'a> {
        let at = wal::begin_incrs(out);
        Drain {
            out,
            at,
            framed: Vec::new(),
        }
    }

    /// Takes the buffers of `stripe` (locked; `cell` is its own) and clears its flag.
    fn take(&mut self, stripe: &mut Stripe, cell: &Cell) {
        self.out.append(&mut stripe.incrs);
        self.framed.append(&mut stripe.log);
        cell.has_log.store(false, Ordering::SeqCst);
    }

    fn finish(self) {
        wal::end_incrs(self.out, self.at);
        self.out.append(&mut { self.framed });
    }
}
