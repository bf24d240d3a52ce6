//! A paced flush: the periodic flush spreads its batches over part of the flush interval
//! instead of sending them as fast as the shard takes them.
//!
//! **Why.** A full flush at full speed takes the proxy's worker and the shards' CPU from the
//! clients: a million pending keys cost ~0.9 s of the proxy's CPU and ~0.9 s of each shard's,
//! and INCR throughput fell to about half of idle while such a flush ran
//! ([performance.md](../../docs/performance.md), ninth round). Nothing waits for a periodic
//! flush but the next one, so it need not hurry.
//!
//! **The schedule.** A round that has sent a fraction `p` of its shard's keys waits, before
//! its next batch, until `p` of its spread (`flush_spread` × `flush_interval`) has passed
//! since it began. `p` is the round's stripe cursor (keys spread evenly over the stripes),
//! interpolated over the batches of the chunk being sent. Two exceptions:
//! - a round whose first take held every dirty key of the shard (at most `CHUNK_BATCHES`
//!   batches' worth, 4,000 keys by default) is not paced: a small flush costs the clients
//!   little, and stretching it over seconds would only delay it;
//! - behind schedule (more keys than the spread allows at the shard's speed) it does not wait
//!   at all: a paced flush is never slower than one at full speed would be from where it is.
//!
//! **While it waits** the lane sends plain reads as they come, each time in a gap of its own
//! (`lane_between::reads_now`), so that a base read waits for no batch. Anything else
//! queued on the lane ([`Lane::has_urgent`]: a flush wanted now (early, admin, shutdown,
//! rebalance), a landing, a FLUSHDB, a window read, a replay) ends the pacing for the rest of
//! the round: nothing else waits on a paced flush. So does a new ring (a rebalance): batches
//! cut for the old ring must not wait while their keys move to new owners.
//!
//! Only the periodic flush is paced, and never on a Redis Cluster (a cluster round holds the
//! slots it takes until it ends). Owns the schedule. Does not own the round (`lane`).

use super::lane::{Batch, Lane};
use super::lane_between::{reads_now, Ahead};
use super::stripe::STRIPES;
use super::Engine;
use std::sync::Arc;
use std::time::Instant;

pub(super) struct Pace {
    start: Instant,
    /// When the round should have sent its last batch.
    until: Instant,
    /// Stripes taken before the chunk being sent, and with it.
    from: usize,
    to: usize,
    /// The chunk's batches, and how many have gone.
    batches: usize,
    sent: usize,
    /// Whether more stripes are left to take after this chunk.
    more: bool,
    /// Pacing ended for this round (something urgent was queued).
    off: bool,
    /// Time spent waiting so far (a flush's own time excludes it).
    pub(super) waited: std::time::Duration,
    /// The ring's version when the chunk being sent was taken.
    ring: u64,
}

impl Pace {
    pub(super) fn new(start: Instant, until: Instant) -> Pace {
        Pace {
            start,
            until,
            from: 0,
            to: 0,
            batches: 0,
            sent: 0,
            more: true,
            off: false,
            waited: std::time::Duration::ZERO,
            ring: 0,
        }
    }

    /// The round took stripes `from..to` under ring version `ring` and is about to send them
    /// in `batches` batches. A round whose first take reached the last stripe is not paced.
    pub(super) fn chunk(&mut self, from: usize, to: usize, batches: usize, ring: u64) {
        self.ring = ring;
        self.from = from;
        self.to = to;
        self.batches = batches;
        self.sent = 0;
        self.more = to < STRIPES;
        self.off |= from == 0 && !self.more;
    }

    /// When the next batch is due, one batch of the chunk after the last; None when it goes
    /// at once (the round's last, pacing off, or behind schedule).
    fn due(&mut self, now: Instant) -> Option<Instant> {
        self.sent += 1;
        if self.off || (self.sent >= self.batches && !self.more) {
            return None;
        }
        let within = (self.to - self.from) as f64 * self.sent as f64 / self.batches.max(1) as f64;
        let p = ((self.from as f64 + within) / STRIPES as f64).clamp(0.0, 1.0);
        let due = self.start + self.until.saturating_duration_since(self.start).mul_f64(p);
        (due > now).then_some(due)
    }

    /// Called after each batch of a paced round: waits until the next is due, sending the
    /// plain reads queued meanwhile in gaps. `unsent` are the chunk's batches still to go
    /// (for `ahead`, see `lane_between`).
    pub(super) async fn after_batch(
        &mut self,
        lane: &Lane,
        engine: &Arc<Engine>,
        unsent: &[Batch],
        ahead: &mut Option<Ahead>,
    ) {
        let waiting = Instant::now();
        let Some(due) = self.due(waiting) else {
            return;
        };
        // Reads of keys in flight elsewhere wait for the round's end: kept here until the
        // wait ends, so that they do not wake this loop again and again.
        let mut later = Vec::new();
        loop {
            // A new ring: the chunk's batches were cut for the old one, and a key moving off
            // this shard must not find its delta still waiting here (`counter::moving`).
            if lane.has_urgent()
                || lane.is_abandoned()
                || engine.router().topology().version != self.ring
            {
                self.off = true;
                break;
            }
            // Checked before each gap: reads arriving faster than a round trip must not hold
            // the flush back.
            if Instant::now() >= due {
                break;
            }
            tokio::select! {
                biased;
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(due)) => break,
                _ = lane.wake.notified() => {
                    reads_now(lane, engine, unsent, ahead, &mut later).await;
                }
            }
        }
        lane.requeue_reads(later);
        self.waited += waiting.elapsed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_schedule_follows_the_stripes_sent() {
        let t0 = Instant::now();
        // A spread of 32 s: one second per stripe.
        let mut p = Pace::new(t0, t0 + Duration::from_secs(32));
        // Stripes 0..4 in 4 batches: each batch is a stripe's worth, due a second apart.
        p.chunk(0, 4, 4, 0);
        assert_eq!(p.due(t0 + ms(100)), Some(t0 + ms(1000)));
        assert_eq!(p.due(t0 + ms(1100)), Some(t0 + ms(2000)));
        // Behind schedule: no wait.
        assert_eq!(p.due(t0 + ms(5000)), None);
        // The chunk's last batch waits for the next chunk's turn.
        assert_eq!(p.due(t0 + ms(3500)), Some(t0 + ms(4000)));
        // The next chunk goes on from stripe 4.
        p.chunk(4, 8, 2, 0);
        assert_eq!(p.due(t0 + ms(4100)), Some(t0 + ms(6000)));
        assert_eq!(p.due(t0 + ms(6100)), Some(t0 + ms(8000)));
        // The round's last batch waits for nothing after it.
        p.chunk(8, STRIPES, 1, 0);
        assert_eq!(p.due(t0 + ms(8100)), None);
    }

    #[test]
    fn a_round_taken_whole_or_paced_off_goes_at_once() {
        let t0 = Instant::now();
        let spread = Duration::from_secs(32);
        let mut p = Pace::new(t0, t0 + spread);
        p.chunk(0, STRIPES, 4, 0);
        assert_eq!(p.due(t0), None);
        let mut p = Pace::new(t0, t0 + spread);
        p.chunk(0, 4, 4, 0);
        p.off = true;
        assert_eq!(p.due(t0), None);
    }
}
