//! What the dashboard shows that no other figure keeps: the busiest pages (approximately),
//! and which source answered the sidecar's reads (`served_via`).
//!
//! Owns two small fixed-size structures. Does not own counting: the engine offers it a
//! sample of its increments, and reads the values of the pages it names from the engine.
//!
//! **Cost on the increment path.** The engine samples one increment in [`SAMPLE`] per map
//! shard (a modulo of a counter it already keeps, under the lock it already holds); only
//! the sampled ones call [`Activity::offer`], after that lock is released. `offer` ignores
//! keys outside `visits:*`, and never waits: when another thread holds the table, the
//! sample is dropped. The table is a Space-Saving summary of [`SLOTS`] pages (Metwally et
//! al., 2005): a linear scan of 64 short keys, no allocation unless a page enters it.
//!
//! **What the figures mean.** A page's `recent` figure estimates the increments it received,
//! in steps of [`SAMPLE`], with every figure halved each [`HALF_LIFE`] so that the list
//! follows what is busy now, not since start. A page that took more than 1/[`SLOTS`] of the
//! sampled increments is in the table; the order among pages of similar traffic is
//! approximate. Increments with a negative delta (DECR) are not visits and are not sampled.

use bytes::Bytes;
use parking_lot::Mutex;
use std::time::{Duration, Instant};

/// One increment in `SAMPLE` (per map shard of the engine) is offered to the table.
pub const SAMPLE: u64 = 16;
/// Pages the table holds.
pub const SLOTS: usize = 64;
/// Every figure is halved this often.
pub const HALF_LIFE: Duration = Duration::from_secs(600);
/// The `served_via` tally keeps at most this many sources (shard names and `in_memory`).
const MAX_SOURCES: usize = 256;

/// Whether the engine's `n`-th increment of a map shard is offered (see the module doc).
#[inline]
pub fn sampled(n: u64) -> bool {
    n.is_multiple_of(SAMPLE)
}

pub struct Activity {
    top: Mutex<Top>,
    served: Mutex<Vec<(String, u64)>>,
}

struct Top {
    slots: Vec<Slot>,
    halved_at: Instant,
    /// Slots are compared by a hash of the page first: a scan of 64 u64s, not 64 keys.
    hasher: ahash::RandomState,
}

struct Slot {
    hash: u64,
    /// The page id (the key without `visits:`); its buffer is reused when the slot changes
    /// hands, so the table stops allocating once it has grown.
    page: Vec<u8>,
    count: u64,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            top: Mutex::new(Top::new(Instant::now())),
            served: Mutex::new(Vec::new()),
        }
    }
}

impl Activity {
    /// A sampled increment of `key` (see the module doc); never blocks.
    pub fn offer(&self, key: &[u8], delta: i64) {
        let Some(page) = key.strip_prefix(b"visits:") else {
            return;
        };
        if delta <= 0 {
            return;
        }
        let Some(mut top) = self.top.try_lock() else {
            return;
        };
        top.add(page, SAMPLE, Instant::now());
    }

    /// The `n` busiest pages, busiest first: (page id, estimated recent increments).
    pub fn top(&self, n: usize) -> Vec<(Bytes, u64)> {
        let mut top = self.top.lock();
        top.decay(Instant::now());
        let mut v: Vec<(Bytes, u64)> = top
            .slots
            .iter()
            .map(|s| (Bytes::copy_from_slice(&s.page), s.count))
            .collect();
        drop(top);
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }

    /// One sidecar read answered from `via` (`in_memory` or a shard's name).
    pub fn served(&self, via: &str) {
        let mut s = self.served.lock();
        if let Some((_, n)) = s.iter_mut().find(|(name, _)| name == via) {
            *n += 1;
        } else if s.len() < MAX_SOURCES {
            s.push((via.to_string(), 1));
        }
    }

    /// Sidecar reads per source since start.
    pub fn served_counts(&self) -> Vec<(String, u64)> {
        self.served.lock().clone()
    }
}

impl Top {
    fn new(now: Instant) -> Top {
        Top {
            slots: Vec::with_capacity(SLOTS),
            halved_at: now,
            hasher: ahash::RandomState::new(),
        }
    }

    fn add(&mut self, page: &[u8], weight: u64, now: Instant) {
        self.decay(now);
        let hash = self.hasher.hash_one(page);
        if let Some(s) = self
            .slots
            .iter_mut()
            .find(|s| s.hash == hash && s.page == page)
        {
            s.count += weight;
            return;
        }
        if self.slots.len() < SLOTS {
            self.slots.push(Slot {
                hash,
                page: page.to_vec(),
                count: weight,
            });
            return;
        }
        // Space-Saving: the newcomer takes the smallest slot and inherits its count, so
        // that a page that keeps coming overtakes one that stopped.
        if let Some(min) = self.slots.iter_mut().min_by_key(|s| s.count) {
            min.hash = hash;
            min.page.clear();
            min.page.extend_from_slice(page);
            min.count += weight;
        }
    }

    fn decay(&mut self, now: Instant) {
        while now.duration_since(self.halved_at) >= HALF_LIFE {
            self.halved_at += HALF_LIFE;
            for s in &mut self.slots {
                s.count /= 2;
            }
            self.slots.retain(|s| s.count > 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_busiest_pages_come_first() {
        let a = Activity::default();
        for _ in 0..10 {
            a.offer(b"visits:home", 1);
        }
        for _ in 0..3 {
            a.offer(b"visits:about", 1);
        }
        a.offer(b"other:key", 1);
        a.offer(b"visits:home", -1);
        let top = a.top(10);
        assert_eq!(
            top,
            vec![
                (Bytes::from("home"), 10 * SAMPLE),
                (Bytes::from("about"), 3 * SAMPLE)
            ]
        );
        assert_eq!(a.top(1).len(), 1);
    }

    #[test]
    fn a_page_that_keeps_coming_displaces_one_that_stopped() {
        let a = Activity::default();
        for i in 0..SLOTS {
            a.offer(format!("visits:p{i}").as_bytes(), 1);
        }
        for _ in 0..5 {
            a.offer(b"visits:new", 1);
        }
        let top = a.top(1);
        assert_eq!(top[0].0, Bytes::from("new"));
        assert_eq!(a.top(1000).len(), SLOTS);
    }

    #[test]
    fn figures_halve_with_time() {
        let now = Instant::now();
        let mut t = Top::new(now);
        t.add(b"a", 8, now);
        t.add(b"b", 1, now);
        t.decay(now + HALF_LIFE);
        assert_eq!(t.slots.len(), 1);
        assert_eq!(t.slots[0].count, 4);
    }

    #[test]
    fn served_via_is_tallied() {
        let a = Activity::default();
        a.served("in_memory");
        a.served("redis_1");
        a.served("in_memory");
        assert_eq!(
            a.served_counts(),
            vec![("in_memory".to_string(), 2), ("redis_1".to_string(), 1)]
        );
    }

    #[test]
    fn one_in_sample_is_offered() {
        assert_eq!((1..=SAMPLE * 4).filter(|&n| sampled(n)).count(), 4);
    }
}
