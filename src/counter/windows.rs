//! Time-windowed counts: every increment of a windowed key also counts into per-second,
//! per-minute, per-hour and per-day buckets, which answer "how many between these times".
//!
//! **In the proxy** an increment at second `t` of key `K` adds its delta to a second,
//! internal entry of the engine, the *window delta* `tally:p:a<t>K` (see [`pending_key`]),
//! beside `K`'s own. Window deltas are entries like any other: logged in the same record
//! stream, taken into the same flush batches, sent under the same sequence number, replayed
//! after a crash the same way. Nothing in the exactly-once protocol is new.
//!
//! **In Redis**, on `K`'s own shard, the flush adds a window delta to the bucket of every
//! kept granularity (seconds, minutes, hours, days) in `K`'s window hash: one hash per key,
//! one field per bucket, trimmed past retention (layout and script: `window_store`).
//!
//! **A read** plans the range ([`Windows::plan`]): the coarsest kept buckets that fit the
//! range exactly, finer ones at the edges; parts no kept granularity can answer exactly are
//! reported as uncovered, never guessed. The planned fields are read in one round trip on
//! the key's lane, so no flush of that shard is in flight meanwhile, and the window deltas
//! still in the proxy are added: the answer includes the last second's increments.
//!
//! Owns the bucket layout, the retention rules, query planning and answering ([`query`]).
//! Does not own the flush (the lane does), the text forms of times (`clock`) or the wire
//! (`connection`, `http`).

use crate::clock::format_time;
use crate::config::{Retention, WindowsConfig};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::Ordering;

/// Granularities, finest first: seconds, minutes, hours, days.
pub const GRANULARITIES: usize = 4;
/// Bucket length, in seconds.
pub const SIZE: [u64; GRANULARITIES] = [1, 60, 3600, 86400];
/// Letter of each granularity in key names.
pub const LETTER: [u8; GRANULARITIES] = [b's', b'm', b'h', b'd'];
/// Letter of a window delta that counts into every kept granularity (an increment).
pub const ALL: u8 = b'a';
/// Most buckets one query may read (a range or a whole series).
pub const MAX_BUCKETS: usize = 100_000;
/// Most points one series may have.
pub const MAX_POINTS: usize = 10_000;

/// Prefix of window deltas in the engine (never sent to Redis as keys).
pub const PENDING_PREFIX: &[u8] = b"tally:p:";
const PENDING_HEADER: usize = 8 + 1 + 8;

/// The window delta entry of `key` for granularity letter `g` (or [`ALL`]) at bucket `t`.
pub fn pending_key(g: u8, t: u64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(PENDING_HEADER + key.len());
    k.extend_from_slice(PENDING_PREFIX);
    k.push(g);
    k.extend_from_slice(&t.to_be_bytes());
    k.extend_from_slice(key);
    k
}

/// [`pending_key`] written into `buf` when it fits (no allocation on the hot path).
pub fn pending_key_in<'a>(buf: &'a mut [u8], g: u8, t: u64, key: &[u8]) -> Option<&'a [u8]> {
    let n = PENDING_HEADER + key.len();
    let out = buf.get_mut(..n)?;
    out[..8].copy_from_slice(PENDING_PREFIX);
    out[8] = g;
    out[9..17].copy_from_slice(&t.to_be_bytes());
    out[PENDING_HEADER..].copy_from_slice(key);
    Some(out)
}

/// Calls `f` with the window delta entry's key of `key` for `g`/`t`, built on the stack
/// when it fits (no allocation on the hot path).
pub fn with_pending_key<R>(g: u8, t: u64, key: &[u8], f: impl FnOnce(&[u8]) -> R) -> R {
    let mut stack = [0u8; 96];
    match pending_key_in(&mut stack, g, t, key) {
        Some(k) => f(k),
        None => f(&pending_key(g, t, key)),
    }
}

/// (letter, bucket start, counter key) of a window delta entry; None for any other key.
pub fn parse_pending(k: &[u8]) -> Option<(u8, u64, &[u8])> {
    if k.len() < PENDING_HEADER || !k.starts_with(PENDING_PREFIX) {
        return None;
    }
    let t = u64::from_be_bytes(k[9..17].try_into().ok()?);
    Some((k[8], t, &k[PENDING_HEADER..]))
}

/// The key whose placement (shard, map shard) an engine entry follows: a window delta
/// lives with its counter key.
pub fn placement_key(k: &[u8]) -> &[u8] {
    match parse_pending(k) {
        Some((_, _, key)) => key,
        None => k,
    }
}

/// Whether `key` can have buckets: its hash part, wrapped in braces, must be a hash tag
/// again (it cannot contain `}`).
pub fn taggable(key: &[u8]) -> bool {
    !crate::router::ring::hash_slice(key).contains(&b'}')
}

/// The window rules in force.
#[derive(Debug, Clone)]
pub struct Windows {
    patterns: Vec<Vec<u8>>,
    /// Seconds each granularity is kept: None off, Some(u64::MAX) forever.
    keep: [Option<u64>; GRANULARITIES],
}

/// Which buckets answer a range, and what no kept bucket can answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// (granularity, bucket start), in time order.
    pub buckets: Vec<(usize, u64)>,
    /// Half-open spans [from, to) left out, merged, in time order.
    pub uncovered: Vec<(u64, u64)>,
}

impl Windows {
    pub fn from_config(cfg: &WindowsConfig) -> Windows {
        let keep = |r: Retention| match r {
            Retention::Off => None,
            Retention::For(d) => Some(d.as_secs()),
            Retention::Forever => Some(u64::MAX),
        };
        Windows {
            patterns: cfg.patterns.iter().map(|p| p.as_bytes().to_vec()).collect(),
            keep: [
                keep(cfg.seconds),
                keep(cfg.minutes),
                keep(cfg.hours),
                keep(cfg.days),
            ],
        }
    }

    /// Whether any key can be windowed.
    pub fn enabled(&self) -> bool {
        !self.patterns.is_empty() && self.keep.iter().any(Option::is_some)
    }

    /// Whether increments of `key` count into buckets.
    pub fn matches(&self, key: &[u8]) -> bool {
        self.keep.iter().any(Option::is_some)
            && self.patterns.iter().any(|p| super::glob::matches(p, key))
            && taggable(key)
    }

    pub fn kept(&self, g: usize) -> bool {
        self.keep[g].is_some()
    }

    /// Whether bucket `t` of granularity `g` is still kept at `now` (its whole span is
    /// younger than the retention). Conservative: a kept bucket has not expired in Redis.
    pub fn retained(&self, g: usize, t: u64, now: u64) -> bool {
        match self.keep[g] {
            None => false,
            Some(k) => t.saturating_add(SIZE[g]).saturating_add(k) > now,
        }
    }

    /// Seconds granularity `g` is kept: None off, Some(u64::MAX) forever.
    pub fn keep(&self, g: usize) -> Option<u64> {
        self.keep[g]
    }

    /// Whether some granularity is kept forever (then a key's window hash never expires).
    pub fn keeps_forever(&self) -> bool {
        self.keep.contains(&Some(u64::MAX))
    }

    /// When bucket `t` of granularity `g` stops being kept ([`Windows::retained`] is false
    /// from then on); u64::MAX: never.
    pub fn kept_until(&self, g: usize, t: u64) -> u64 {
        match self.keep[g] {
            None => 0,
            Some(k) => t.saturating_add(SIZE[g]).saturating_add(k),
        }
    }

    /// The oldest bucket start of granularity `g` still kept at `now` (0: all of them).
    pub fn oldest_kept(&self, g: usize, now: u64) -> u64 {
        let Some(k) = self.keep[g] else { return 0 };
        match now.checked_sub(SIZE[g].saturating_add(k)) {
            None => 0,
            Some(gone) => (gone / SIZE[g] + 1) * SIZE[g],
        }
    }

    /// How far the fields of granularity `g` past retention may pile up before a flush
    /// deletes them: a tenth of the retention, at least one bucket (see `window_store`).
    pub fn trim_slack(&self, g: usize) -> u64 {
        let k = self.keep[g].unwrap_or(0);
        (k / 10 / SIZE[g]).max(1) * SIZE[g]
    }

    /// The buckets that answer [from, to) at `now`; Err when more than [`MAX_BUCKETS`].
    pub fn plan(&self, from: u64, to: u64, now: u64) -> Result<Plan, String> {
        let mut plan = Plan::default();
        self.cover(from, to, GRANULARITIES as i32 - 1, now, &mut plan)?;
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(plan.uncovered.len());
        for (a, b) in plan.uncovered.drain(..) {
            match merged.last_mut() {
                Some(last) if last.1 == a => last.1 = b,
                _ => merged.push((a, b)),
            }
        }
        plan.uncovered = merged;
        Ok(plan)
    }

    /// Whether some granularity finer than `g` keeps anything of [a, b).
    fn finer_keeps(&self, g: usize, b: u64, now: u64) -> bool {
        (0..g).any(|f| {
            b.checked_sub(SIZE[f])
                .is_some_and(|last| self.retained(f, last, now))
        })
    }

    fn cover(&self, a: u64, b: u64, level: i32, now: u64, out: &mut Plan) -> Result<(), String> {
        if a >= b {
            return Ok(());
        }
        if level < 0 {
            out.uncovered.push((a, b));
            return Ok(());
        }
        let g = level as usize;
        if !self.kept(g) {
            return self.cover(a, b, level - 1, now, out);
        }
        let size = SIZE[g];
        let first = a.div_ceil(size).saturating_mul(size);
        let last = b / size * size;
        if first >= last {
            return self.cover(a, b, level - 1, now, out);
        }
        self.cover(a, first, level - 1, now, out)?;
        let mut t = first;
        while t < last {
            if self.retained(g, t, now) {
                if out.buckets.len() >= MAX_BUCKETS {
                    return Err(format!(
                        "the range needs more than {MAX_BUCKETS} buckets; ask for less"
                    ));
                }
                out.buckets.push((g, t));
                t += size;
            } else if !self.finer_keeps(g, t + size, now) {
                // Nothing finer keeps this span either (finer buckets go sooner, usually):
                // the whole run of such buckets is uncovered at once.
                let mut end = t + size;
                while end < last
                    && !self.retained(g, end, now)
                    && !self.finer_keeps(g, end + size, now)
                {
                    end += size;
                }
                out.uncovered.push((t, end));
                t = end;
            } else {
                self.cover(t, t + size, level - 1, now, out)?;
                t += size;
            }
        }
        self.cover(last, b, level - 1, now, out)
    }
}

/// Window deltas still in the proxy: per second (increments), and per bucket (moved).
pub type Deltas = (Vec<(u64, i64)>, HashMap<(usize, u64), i64>);

/// The answer to a window query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// One count per range asked, in order.
    pub counts: Vec<i64>,
    /// Per range, the spans no kept bucket could answer (left out of its count).
    pub uncovered: Vec<Vec<(u64, u64)>>,
    /// The shard that was read.
    pub served_via: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryError {
    /// The key does not count into buckets (`[windows] match`, or a `}` in its hash part).
    NotWindowed,
    /// A range that cannot be answered as asked.
    Invalid(String),
    /// The shard could not answer; the message is for the client (`TRYAGAIN ...`, `ERR ...`).
    Shard(String),
}

impl QueryError {
    pub fn message(&self) -> String {
        match self {
            QueryError::NotWindowed => {
                "ERR the key does not count into time windows (see [windows] match)".into()
            }
            QueryError::Invalid(m) => format!("ERR {m}"),
            QueryError::Shard(m) => m.clone(),
        }
    }
}

/// Counts of `key` over each of `ranges` (half-open [from, to) in Unix seconds, in time
/// order, not overlapping): the kept buckets on its shard plus what the proxy still holds.
pub async fn query(
    engine: &std::sync::Arc<super::Engine>,
    key: &Bytes,
    ranges: &[(u64, u64)],
) -> Result<Answer, QueryError> {
    let r = query_inner(engine, key, ranges).await;
    let stats = &engine.stats;
    stats.window_queries.fetch_add(1, Ordering::Relaxed);
    if r.is_err() {
        stats.window_query_errors.fetch_add(1, Ordering::Relaxed);
    }
    r
}

async fn query_inner(
    engine: &std::sync::Arc<super::Engine>,
    key: &Bytes,
    ranges: &[(u64, u64)],
) -> Result<Answer, QueryError> {
    if !engine.is_windowed(key) {
        return Err(QueryError::NotWindowed);
    }
    let w = engine.windows();
    let now = engine.wall_clock().now_secs();
    let mut plans = Vec::with_capacity(ranges.len());
    let mut all = std::collections::BTreeSet::new();
    for &(from, to) in ranges {
        ordered(from, to)?;
        let plan = w.plan(from, to, now).map_err(QueryError::Invalid)?;
        all.extend(plan.buckets.iter().copied());
        if all.len() > MAX_BUCKETS {
            return Err(QueryError::Invalid(format!(
                "the query needs more than {MAX_BUCKETS} buckets; ask for less"
            )));
        }
        plans.push(plan);
    }
    let buckets: Vec<(usize, u64)> = all.into_iter().collect();
    if engine.is_memory_mode() {
        // The buckets are the engine's own entries.
        let (_, per_bucket) = engine.window_deltas(key, 0, 0, &buckets);
        let (counts, uncovered) = combine(ranges, plans, &HashMap::new(), &[], &per_bucket);
        return Ok(Answer {
            counts,
            uncovered,
            served_via: "in_memory".into(),
        });
    }
    if let Some(m) = engine.router().migration() {
        engine
            .ensure_buckets_moved(&m, key, &buckets)
            .await
            .map_err(|e| QueryError::Shard(e.client_message(&engine.owner_name(key))))?;
    }
    let topo = engine.router().topology();
    let shard = topo.shard_for(key).name.clone();
    let lane = engine
        .lane(&shard)
        .ok_or_else(|| QueryError::Shard(format!("TRYAGAIN shard {shard} is unavailable")))?;
    let (frame, order) = super::window_store::read_frame(key, &buckets);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (engine2, key2, ranges2, shard2) =
        (engine.clone(), key.clone(), ranges.to_vec(), shard.clone());
    lane.read_between(
        frame,
        Box::new(move |reply| {
            let r = reply
                .map_err(|e| QueryError::Shard(e.client_message(&shard2)))
                .and_then(|frame| stored_values(frame, &order))
                .map(|stored| {
                    let lo = ranges2.first().map(|r| r.0).unwrap_or(0);
                    let hi = ranges2.last().map(|r| r.1).unwrap_or(0);
                    let (seconds, moved) = engine2.window_deltas(&key2, lo, hi, &buckets);
                    combine(&ranges2, plans, &stored, &seconds, &moved)
                });
            let _ = tx.send(r);
        }),
    );
    let (counts, uncovered) = rx.await.unwrap_or_else(|_| {
        Err(QueryError::Shard(format!(
            "TRYAGAIN shard {shard} is unavailable"
        )))
    })?;
    Ok(Answer {
        counts,
        uncovered,
        served_via: shard,
    })
}

/// The shard's reply to `window_store::read_frame`, per bucket (a bucket's values in both
/// layouts summed).
fn stored_values(
    frame: redis_protocol::resp2::types::BytesFrame,
    order: &[(usize, u64)],
) -> Result<HashMap<(usize, u64), i64>, QueryError> {
    use redis_protocol::resp2::types::BytesFrame as F;
    let values = match frame {
        F::Array(v) if v.len() == order.len() => v,
        F::Error(e) => return Err(QueryError::Shard(e.to_string())),
        other => {
            return Err(QueryError::Shard(format!(
                "ERR unexpected reply to a window read: {other:?}"
            )))
        }
    };
    let mut out = HashMap::with_capacity(order.len());
    for (b, v) in order.iter().zip(values) {
        let n = match &v {
            F::BulkString(s) => super::parse_i64(s).unwrap_or(0),
            F::Integer(i) => *i,
            _ => 0,
        };
        let v = out.entry(*b).or_insert(0i64);
        *v = v.wrapping_add(n);
    }
    Ok(out)
}

type Counts = (Vec<i64>, Vec<Vec<(u64, u64)>>);

/// Per range: stored buckets, plus moved deltas of those buckets, plus the pending seconds
/// the range covers.
fn combine(
    ranges: &[(u64, u64)],
    plans: Vec<Plan>,
    stored: &HashMap<(usize, u64), i64>,
    seconds: &[(u64, i64)],
    moved: &HashMap<(usize, u64), i64>,
) -> Counts {
    let mut counts: Vec<i64> = plans
        .iter()
        .map(|p| {
            p.buckets.iter().fold(0i64, |acc, b| {
                acc.wrapping_add(stored.get(b).copied().unwrap_or(0))
                    .wrapping_add(moved.get(b).copied().unwrap_or(0))
            })
        })
        .collect();
    for &(t, d) in seconds {
        let i = ranges.partition_point(|r| r.1 <= t);
        let Some(&(from, to)) = ranges.get(i) else {
            continue;
        };
        if (from..to).contains(&t) && !plans[i].uncovered.iter().any(|u| (u.0..u.1).contains(&t)) {
            counts[i] = counts[i].wrapping_add(d);
        }
    }
    (counts, plans.into_iter().map(|p| p.uncovered).collect())
}

/// Refuses a range that does not end after it starts.
fn ordered(from: u64, to: u64) -> Result<(), QueryError> {
    if from >= to {
        return Err(QueryError::Invalid(format!(
            "the range must end after it starts ({} >= {})",
            format_time(from),
            format_time(to)
        )));
    }
    Ok(())
}

/// The last `span` seconds at `now`, the current second included: [now + 1 - span, now + 1).
pub fn last(now: u64, span: u64) -> (u64, u64) {
    ((now + 1).saturating_sub(span), now + 1)
}

/// The ranges of a series: [from, to) cut into `step`s (the last one may be shorter).
pub fn series_ranges(from: u64, to: u64, step: u64) -> Result<Vec<(u64, u64)>, QueryError> {
    ordered(from, to)?;
    let points = (to - from).div_ceil(step);
    if points > MAX_POINTS as u64 {
        return Err(QueryError::Invalid(format!(
            "the series would have {points} points; at most {MAX_POINTS} (use a larger step)"
        )));
    }
    Ok((0..points)
        .map(|i| (from + i * step, (from + (i + 1) * step).min(to)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn windows(keep: [Retention; 4]) -> Windows {
        Windows::from_config(&WindowsConfig {
            patterns: vec!["visits:*".into()],
            seconds: keep[0],
            minutes: keep[1],
            hours: keep[2],
            days: keep[3],
        })
    }

    fn defaults() -> Windows {
        Windows::from_config(&WindowsConfig::default())
    }

    const DAY0: u64 = 1_763_856_000; // 2025-11-23T00:00:00Z

    #[test]
    fn keys_name_their_counter_and_keep_its_hash_tag() {
        assert!(taggable(b"visits:a{b") && taggable(b"visits:{x}}"));
        assert!(!taggable(b"visits:a}b") && !taggable(b"{}x}"));
        let p = pending_key(ALL, DAY0, b"visits:home");
        assert_eq!(parse_pending(&p), Some((ALL, DAY0, &b"visits:home"[..])));
        let mut buf = [0u8; 32];
        assert_eq!(
            pending_key_in(&mut buf, ALL, DAY0, b"visits:home"),
            Some(&p[..])
        );
        assert_eq!(
            pending_key_in(&mut buf, ALL, DAY0, b"visits:a-longer-page-id"),
            None
        );
        assert_eq!(placement_key(&p), b"visits:home");
        assert_eq!(placement_key(b"visits:home"), b"visits:home");
        assert_eq!(parse_pending(b"tally:p:short"), None);
    }

    #[test]
    fn a_range_uses_the_coarsest_buckets_that_fit_and_finer_ones_at_the_edges() {
        let w = defaults();
        let now = DAY0 + 3 * 86400;
        // 2 days + 1 h + 1 min + 1 s, starting 1 s before a minute, within every retention
        // but the seconds' (the left edge is 3 days old): seconds there are not kept.
        let from = DAY0 + 86400 - 3600 - 61;
        let to = DAY0 + 3 * 86400 + 1;
        let plan = w.plan(from, to, now).unwrap();
        let count = |g| plan.buckets.iter().filter(|b| b.0 == g).count();
        assert_eq!(count(3), 2, "{plan:?}");
        assert_eq!(count(2), 1);
        assert_eq!(count(1), 1);
        // The left edge [from, next minute) is 1 s of a minute that seconds no longer keep.
        assert_eq!(plan.uncovered, vec![(from, from + 1)]);
        // The right second (now) is kept.
        assert_eq!(plan.buckets.last(), Some(&(0, DAY0 + 3 * 86400)));
        // Buckets tile the covered part exactly.
        let covered: u64 = plan.buckets.iter().map(|&(g, _)| SIZE[g]).sum();
        assert_eq!(covered + 1, to - from);
    }

    #[test]
    fn a_recent_range_is_exact_and_mixes_granularities() {
        let w = defaults();
        // Seconds are kept for an hour: the left edge is 1 h 56 min old at `now`.
        let now = DAY0 + 7000;
        let plan = w.plan(DAY0 + 3600 - 5, DAY0 + 3 * 3600 + 125, now).unwrap();
        assert!(plan.uncovered.is_empty());
        assert_eq!(
            plan.buckets.iter().map(|b| b.0).collect::<Vec<_>>(),
            [vec![0; 5], vec![2, 2], vec![1, 1], vec![0; 5]].concat()
        );
    }

    #[test]
    fn what_no_granularity_keeps_is_reported_not_guessed() {
        let w = windows([
            Retention::For(Duration::from_secs(3600)),
            Retention::Off,
            Retention::For(Duration::from_secs(86400)),
            Retention::Off,
        ]);
        let now = DAY0 + 30 * 86400;
        let plan = w.plan(DAY0, now, now).unwrap();
        // Hours keep a bucket while its end is younger than a day: the last 24.
        assert_eq!(plan.uncovered, vec![(DAY0, now - 86400)]);
        assert_eq!(plan.buckets.len(), 24);
        // Everything off: all uncovered.
        let none = windows([Retention::Off; 4]);
        let plan = none.plan(DAY0, DAY0 + 100, now).unwrap();
        assert_eq!(plan.uncovered, vec![(DAY0, DAY0 + 100)]);
        assert!(plan.buckets.is_empty());
        // Too many buckets is an error, not a slow answer.
        let secs = windows([
            Retention::Forever,
            Retention::Off,
            Retention::Off,
            Retention::Off,
        ]);
        assert!(secs.plan(0, 200_000, 200_000).is_err());
    }

    #[test]
    fn retention_names_the_oldest_kept_bucket_and_when_a_bucket_goes() {
        let w = defaults();
        // Seconds are kept an hour: at `now`, the bucket one hour and one second old is gone.
        let now = DAY0 + 7200;
        assert_eq!(w.oldest_kept(0, now), DAY0 + 3600);
        assert!(w.retained(0, DAY0 + 3600, now) && !w.retained(0, DAY0 + 3599, now));
        assert_eq!(w.kept_until(0, DAY0 + 3600), now + 1);
        // Minutes a week: the oldest kept minute starts a week and a minute before, plus one.
        let m = w.oldest_kept(1, now);
        assert_eq!(m % 60, 0);
        assert!(w.retained(1, m, now) && !w.retained(1, m - 60, now));
        assert_eq!(w.kept_until(1, m), m + 60 + 7 * 86400);
        assert!(w.kept_until(1, m) > now);
        // Early in time nothing is gone yet; days are kept forever.
        assert_eq!(w.oldest_kept(0, 100), 0);
        assert!(w.keeps_forever());
        assert_eq!(w.kept_until(3, DAY0), u64::MAX);
        // A tenth of the retention, in whole buckets, at least one.
        assert_eq!(w.trim_slack(0), 360);
        assert_eq!(w.trim_slack(1), 7 * 86400 / 10 / 60 * 60);
        let short = windows([
            Retention::For(Duration::from_secs(5)),
            Retention::Off,
            Retention::Off,
            Retention::Off,
        ]);
        assert_eq!(short.trim_slack(0), 1);
        assert!(!short.keeps_forever());
    }
}
