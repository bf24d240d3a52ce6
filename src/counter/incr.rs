//! The hot increment: INCR/INCRBY/DECR/DECRBY buffered into a key's pending delta under
//! its stripe's lock, answered `base + inflight + pending`, with its log record appended in
//! the same critical section (and the window delta of a windowed key beside it: in the
//! entry itself while its second lasts, see `window_now`).
//!
//! Owns the decision to buffer or refuse. Does not own the base (`cache`) or landing
//! (`flush`).

use super::stripe::{stripe_of, BaseState, Entry, Stripe, DIRTY, NOT_WINDOWED, WINDOWED};
use super::{wal, windows, Engine, Incr, Refusal};
use std::sync::atomic::Ordering;

impl Engine {
    /// INCRBY `delta` if the base is fresh; see [`Incr`].
    pub fn try_incr(&self, key: &[u8], delta: i64) -> Incr {
        let r = self.incr(key, delta, Base::Fresh);
        // A fresh base is a known one (`incr`): nothing is buffered unless answered.
        debug_assert!(
            !matches!(r, Incr::Pending),
            "try_incr buffered without a base"
        );
        r
    }

    /// INCRBY on a key whose owner is down: a known base is used however old it is.
    pub fn try_incr_stale(&self, key: &[u8], delta: i64) -> Incr {
        self.incr(key, delta, Base::AnyKnown)
    }

    /// An increment accepted with no known base (its owner is down): buffered and logged,
    /// the total unknown until the shard returns. Refused once the buffer is full.
    pub fn incr_blind(&self, key: &[u8], delta: i64) -> Incr {
        self.incr(key, delta, Base::NotNeeded)
    }

    fn incr(&self, key: &[u8], delta: i64, need: Base) -> Incr {
        if self.log_failed() {
            return Incr::Refused(Refusal::LogFailed);
        }
        let now = self.now_ms();
        let index = stripe_of(key);
        let cell = &self.stripes[index];
        let mut guard = cell.lock.lock();
        let stripe = &mut *guard;
        // One lookup on the hot path; the key is copied only when it is new.
        let e = match stripe.map.get_mut(key) {
            Some(e) => e,
            None => {
                match need {
                    _ if self.memory_mode => {}
                    Base::NotNeeded
                        if self.dirty_keys.load(Ordering::Relaxed) < self.max_pending_keys => {}
                    Base::NotNeeded => return Incr::Refused(Refusal::BufferFull),
                    _ => return Incr::NeedBase,
                }
                let state = if self.memory_mode {
                    BaseState::Absent
                } else {
                    BaseState::Unknown
                };
                stripe.map.entry(key.into()).or_insert(Entry {
                    state,
                    ..Entry::NEW
                })
            }
        };
        let known = !matches!(e.state, BaseState::Unknown);
        let usable = match need {
            Base::Fresh => known && self.is_fresh(e, now),
            Base::AnyKnown => known,
            Base::NotNeeded => true,
        };
        if !usable {
            return Incr::NeedBase;
        }
        match e.state {
            BaseState::NotInt => return Incr::Refused(Refusal::NotInteger),
            BaseState::WrongType => return Incr::Refused(Refusal::WrongType),
            _ => {}
        }
        let Some(new) = e.value().and_then(|v| v.checked_add(delta)) else {
            return Incr::Refused(Refusal::Overflow);
        };
        let Some(pending) = e.pending.checked_add(delta) else {
            return Incr::Refused(Refusal::Overflow);
        };
        // Marked queued only here, where the read-ahead is sure to be queued below.
        let refresh = matches!(need, Base::Fresh) && self.wants_refresh(e, now);
        e.pending = pending;
        if e.flags & DIRTY == 0 {
            e.flags |= DIRTY;
            self.note_dirty();
        }
        let windowed = match e.flags & (WINDOWED | NOT_WINDOWED) {
            WINDOWED => true,
            NOT_WINDOWED => false,
            _ => {
                let w = self.is_windowed(key);
                e.flags |= if w { WINDOWED } else { NOT_WINDOWED };
                w
            }
        };
        let t = if windowed { self.window_second() } else { 0 };
        // The key by its short name in the current segment, once it has one.
        let name = match self.wal {
            Some(_) => wal::LogName::of(&mut e.log_name, &mut stripe.next_log_name, index),
            None => wal::LogName::None,
        };
        // Same stripe, same lock, same log buffer: the increment and its window delta reach
        // the log in one write, or neither does.
        let held = if windowed && !self.memory_mode {
            Some(self.count_window_now(&mut stripe.incrs, e, key, name, t, delta))
        } else {
            if self.wal.is_some() {
                wal::append_named_incr(&mut stripe.incrs, key, name, delta, None);
            }
            None
        };
        if self.wal.is_some() {
            // The flag is cleared only under the stripe's lock, with the buffers taken: one
            // still set here is cleared by a drain that takes this entry too.
            if !cell.has_log.load(Ordering::Relaxed) {
                cell.has_log.store(true, Ordering::SeqCst);
            }
        }
        if let Some(add) = held {
            self.apply_spills(stripe, key, t, delta, add);
        } else if windowed {
            // No shard to expand a window delta into buckets: the buckets are entries here,
            // one per kept granularity; `sweep_windows` drops them past retention.
            for g in (0..windows::GRANULARITIES).filter(|&g| self.windows.kept(g)) {
                let bucket = t - t % windows::SIZE[g];
                self.add_window_delta(stripe, windows::LETTER[g], bucket, key, delta);
            }
        }
        stripe.increments += 1;
        stripe.unflushed = stripe.unflushed.wrapping_add(delta);
        let sampled = crate::activity::sampled(stripe.increments);
        drop(guard);
        if sampled {
            self.activity.offer(key, delta);
        }
        if refresh {
            self.refresh_ahead(key);
        }
        if known {
            Incr::Value(new)
        } else {
            Incr::Pending
        }
    }

    /// Adds `delta` to the window delta `g`/`t` of `key` in `stripe` (locked), logged.
    pub(super) fn add_window_delta(
        &self,
        stripe: &mut Stripe,
        g: u8,
        t: u64,
        key: &[u8],
        delta: i64,
    ) {
        let newly_dirty = windows::with_pending_key(g, t, key, |wk| {
            if self.wal.is_some() {
                wal::append_incr(&mut stripe.incrs, wk, delta);
            }
            stripe.add_pending(wk, delta)
        });
        if newly_dirty {
            self.note_dirty();
        }
    }

    pub(super) fn note_dirty(&self) {
        let n = self.dirty_keys.fetch_add(1, Ordering::Relaxed) + 1;
        if n > self.max_pending_keys
            && !self.memory_mode
            && self.early_flush_armed.swap(false, Ordering::Relaxed)
        {
            self.early_flush.notify_one();
        }
    }
}

/// How much of a base an increment needs.
#[derive(Clone, Copy)]
enum Base {
    Fresh,
    AnyKnown,
    NotNeeded,
}
