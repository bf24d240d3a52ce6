//! How time-window buckets are stored in Redis: one hash per windowed key.
//!
//! **The window hash** `tally:win:{<K's hash part>}:<K>` ([`window_hash`]) holds every kept
//! granularity's buckets of counter key `K`: field `<letter><bucket start>` ([`field`], e.g.
//! `s1763917205`, `m1763917200`, `d1763856000`), value = count. The hash tag keeps it on
//! `K`'s shard (and slot). A flush writes a key's buckets in two commands whatever their
//! number: one `HMGET` of the fields it touches (and of the markers below), one `HSET` of
//! the sums. With the key's `INCRBY`, a windowed key costs three Redis commands per flush.
//!
//! **Retention** is trimming, not expiry: a bucket past its retention is never written, and
//! the hash holds three markers: `t`, the time of its last trim (no field of a granularity
//! lies below the oldest bucket it kept at `t`), `w`, a time no bucket written is later than
//! (set ten minutes ahead, so rarely rewritten), and `x`, the expiry set. A flush at least a
//! tenth of the shortest finite retention after `t` deletes the fields that passed retention
//! since (one `HDEL` per 1,000 names, bounded by `w`: for seconds kept an hour, about 360
//! names every 6 minutes per active key). A hash whose buckets are all kept for a finite time
//! also expires as a whole: `x` is renewed (`EXPIREAT`, an hour past what the newest bucket
//! needs) only when a bucket needs more; with a granularity kept forever the hash has no
//! expiry. The markers ride on the `HMGET` and `HSET` the flush sends anyway.
//!
//! **The layout before** (`tally:w:{tag}:<g>:<period start>:<K>`, a hash per key,
//! granularity and period, field = bucket start: [`legacy_bucket_key`]) is still read and
//! still moved by a rebalance, so counts written by an earlier build stay exact; nothing
//! writes it any more, and its hashes expire as they always did (days kept forever stay).
//!
//! Owns the names in Redis, the flush script's window part ([`SCRIPT_PART`] and
//! [`Writes`]) and the read's frame. Does not own the rules (`windows`) or the batch
//! and its exactly-once protocol (`lane`).

use super::windows::{Windows, GRANULARITIES, LETTER, SIZE};
use bytes::{Bytes, BytesMut};
use std::collections::BTreeMap;

/// Prefix of window hashes in Redis.
pub const HASH_PREFIX: &[u8] = b"tally:win:";
/// Prefix of the hashes of the layout before (one per granularity and period).
pub const LEGACY_PREFIX: &[u8] = b"tally:w:";
/// Period one hash of the layout before held, in seconds.
const LEGACY_PERIOD: [u64; GRANULARITIES] = [3600, 86400, 30 * 86400, 365 * 86400];
/// The `w` marker (no bucket written later) is set this far ahead, so that it is written
/// about once per this many seconds per key rather than on every flush.
const WRITTEN_AHEAD: u64 = 600;
/// A hash's expiry, once set, covers its newest bucket's retention plus this much, so that
/// it is renewed about once an hour per key rather than on every flush.
const EXPIRY_SLACK: u64 = 3600;

/// The window hash of `key`.
pub fn window_hash(key: &[u8]) -> Vec<u8> {
    let mut k = tagged(HASH_PREFIX, key);
    k.extend_from_slice(key);
    k
}

/// `<prefix>{<key's hash part>}:`, the start of a name in `key`'s slot.
fn tagged(prefix: &[u8], key: &[u8]) -> Vec<u8> {
    let tag = crate::router::ring::hash_slice(key);
    let mut k = Vec::with_capacity(prefix.len() + tag.len() + key.len() + 24);
    k.extend_from_slice(prefix);
    k.push(b'{');
    k.extend_from_slice(tag);
    k.extend_from_slice(b"}:");
    k
}

/// The counter key of a window hash.
pub fn parse_window_hash(k: &[u8]) -> Option<&[u8]> {
    untagged(HASH_PREFIX, k)
}

/// What follows `<prefix>{<tag>}:` in `k`.
fn untagged<'a>(prefix: &[u8], k: &'a [u8]) -> Option<&'a [u8]> {
    let rest = k.strip_prefix(prefix)?.strip_prefix(b"{")?;
    let close = rest.iter().position(|&b| b == b'}')?;
    rest[close + 1..].strip_prefix(b":")
}

/// The field of bucket `t` of granularity `g` in a window hash.
pub fn field(g: usize, t: u64) -> Vec<u8> {
    let mut f = Vec::with_capacity(21);
    f.push(LETTER[g]);
    f.extend_from_slice(itoa::Buffer::new().format(t).as_bytes());
    f
}

/// (granularity, bucket start) of a window hash's field; None for a marker.
pub fn parse_field(f: &[u8]) -> Option<(usize, u64)> {
    let g = LETTER.iter().position(|&l| Some(&l) == f.first())?;
    let digits = &f[1..];
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some((g, std::str::from_utf8(digits).ok()?.parse().ok()?))
}

/// The hash of the layout before that held `key`'s bucket `t` of granularity `g`.
pub fn legacy_bucket_key(key: &[u8], g: usize, t: u64) -> Vec<u8> {
    let period = t - t % LEGACY_PERIOD[g];
    let mut k = tagged(LEGACY_PREFIX, key);
    k.push(LETTER[g]);
    k.push(b':');
    k.extend_from_slice(itoa::Buffer::new().format(period).as_bytes());
    k.push(b':');
    k.extend_from_slice(key);
    k
}

/// (granularity, counter key) of a hash of the layout before.
pub fn parse_legacy_bucket_key(k: &[u8]) -> Option<(usize, &[u8])> {
    let rest = untagged(LEGACY_PREFIX, k)?;
    let g = LETTER.iter().position(|&l| Some(&l) == rest.first())?;
    let rest = rest.get(1..)?.strip_prefix(b":")?;
    let colon = rest.iter().position(|&b| b == b':')?;
    std::str::from_utf8(&rest[..colon])
        .ok()?
        .parse::<u64>()
        .ok()?;
    Some((g, &rest[colon + 1..]))
}

/// The counter key whose buckets a Redis key holds (either layout); None for other keys.
pub fn bucket_owner(k: &[u8]) -> Option<&[u8]> {
    parse_window_hash(k).or_else(|| parse_legacy_bucket_key(k).map(|(_, key)| key))
}

/// Every hash that may hold the buckets of `key` named in `buckets`: its window hash and the
/// hashes of the layout before.
pub fn hashes_of(key: &[u8], buckets: &[(usize, u64)]) -> std::collections::BTreeSet<Vec<u8>> {
    let mut out: std::collections::BTreeSet<Vec<u8>> = buckets
        .iter()
        .map(|&(g, t)| legacy_bucket_key(key, g, t))
        .collect();
    out.insert(window_hash(key));
    out
}

/// The counts a moved hash held, as (granularity, bucket start, count); fields that are not
/// counts the proxy wrote (markers, foreign fields) are left out.
pub fn moved_fields(hash: &[u8], pairs: &[(Bytes, Bytes)]) -> Vec<(usize, u64, i64)> {
    let legacy = parse_legacy_bucket_key(hash).map(|(g, _)| g);
    pairs
        .iter()
        .filter_map(|(f, v)| {
            let (g, t) = match legacy {
                Some(g) => (g, std::str::from_utf8(f).ok()?.parse().ok()?),
                None => parse_field(f)?,
            };
            Some((g, t, super::parse_i64(v)?))
        })
        .collect()
}

/// The window part of the flush script ([`super::lane::SCRIPT`]), run when the batch is
/// fresh; `a` is the first ARGV of it, `first` the first window hash in KEYS. The proxy does
/// the planning, so that the script does little more than the two commands. ARGV: now, the
/// trim interval, the `w` marker to write, the retentions' signature (`k`), the count of
/// granularities kept for a finite time and for each its letter, bucket size and retention;
/// then per window hash (one KEYS entry per at most 1,000 fields; a hash may appear twice):
/// the expiry needed (0: none), the expiry to set, the field count `nf`, the `nf` field
/// names followed by `w`, `t`, `x` and `k` (what `HMGET` asks), and the `nf` deltas.
///
/// Markers: `t` the time of the last trim (no field of a granularity lies below its oldest
/// bucket kept at `t`), `w` a time no bucket written is later than (renewed ahead of time,
/// so rarely written), `x` the expiry set, `k` the retentions the hash was last written
/// under (when they change, the next write sweeps what they no longer keep).
macro_rules! script_part {
    () => {
        r#"
local now_s = ARGV[a]
local now = tonumber(now_s)
local every = tonumber(ARGV[a + 1])
local w_next = ARGV[a + 2]
local kept = ARGV[a + 3]
local nt = tonumber(ARGV[a + 4]) or 0
a = a + 5
local rules, by_letter = {}, {}
for k = 1, nt do
  rules[k] = {ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])}
  by_letter[ARGV[a]] = rules[k]
  a = a + 3
end
-- A function that deletes the fields of `h` it is given, in HDELs of at most 1,000 names;
-- called with nothing, it sends what it holds.
local function deleter(h)
  local gone = {}
  return function(f)
    if f then gone[#gone + 1] = f end
    if #gone > 0 and (f == nil or #gone == 1000) then
      redis.pcall('HDEL', h, unpack(gone))
      gone = {}
    end
  end
end
-- The oldest bucket of size `size` kept for `keep` seconds at time `at`.
local function oldest(at, size, keep)
  local gone = at - size - keep
  if gone < 0 then return 0 end
  return (math.floor(gone / size) + 1) * size
end
for j = first, #KEYS do
  local h = KEYS[j]
  local need = tonumber(ARGV[a])
  local at = ARGV[a + 1]
  local nf = tonumber(ARGV[a + 2])
  local names = a + 3
  local deltas = names + nf + 4
  a = deltas + nf
  local cur = redis.pcall('HMGET', h, unpack(ARGV, names, deltas - 1))
  if type(cur) == 'table' and not cur.err then
    local w, t, x, k = tonumber(cur[nf + 1]), tonumber(cur[nf + 2]), cur[nf + 3], cur[nf + 4]
    local set = {}
    local n = 0
    for i = 1, nf do
      local c = cur[i]
      local d = ARGV[deltas + i - 1]
      local past = false
      if t ~= nil and t > now then
        -- A frame built before the hash's last trim (a retry landing late): a bucket below
        -- what that trim kept is past retention by its clock, and would never be trimmed.
        local name = ARGV[names + i - 1]
        local rule = by_letter[string.sub(name, 1, 1)]
        past = rule ~= nil and tonumber(string.sub(name, 2)) < oldest(t, rule[2], rule[3])
      end
      if past then
        -- Not written.
      elseif c == false then
        -- A new bucket: its count is the delta.
        set[n + 1] = ARGV[names + i - 1]
        set[n + 2] = d
        n = n + 2
      elseif type(c) ~= 'string' or not string.match(c, '^-?%d+$') then
        -- Not an integer: left alone, as HINCRBY would.
      elseif #c < 16 and #d < 16 then
        set[n + 1] = ARGV[names + i - 1]
        set[n + 2] = string.format('%.0f', tonumber(c) + tonumber(d))
        n = n + 2
      else
        -- Past what a Lua number holds exactly: Redis's own arithmetic.
        redis.pcall('HINCRBY', h, ARGV[names + i - 1], d)
      end
    end
    if k ~= false and k ~= kept then
      -- The retentions changed since this hash was last written: one sweep of its fields
      -- deletes what the rules now in force no longer keep (what a trim by the old rules
      -- left, and every field of a granularity turned off).
      local del = deleter(h)
      for _, f in ipairs(redis.call('HKEYS', h)) do
        local letter, b = string.sub(f, 1, 1), tonumber(string.sub(f, 2))
        if b ~= nil and string.find('smhd', letter, 1, true) then
          local rule = by_letter[letter]
          local keep = string.find(kept, letter, 1, true)
          if not keep or (rule and b < oldest(now, rule[2], rule[3])) then del(f) end
        end
      end
      del()
    end
    if k ~= kept then
      set[n + 1] = 'k'
      set[n + 2] = kept
      n = n + 2
    end
    if nt > 0 then
      if t == nil or now - t >= every then
        if t ~= nil then
          -- Fields that passed retention since the last trim go, at once (one HDEL per
          -- 1,000 names), up to the newest bucket that can have been written.
          local last = w or now
          local del = deleter(h)
          for _, rule in ipairs(rules) do
            local letter, size, keep = rule[1], rule[2], rule[3]
            local stop = math.min(oldest(now, size, keep), last - last % size + size)
            for b = oldest(t, size, keep), stop - 1, size do
              del(letter .. string.format('%.0f', b))
            end
          end
          del()
        end
        set[n + 1] = 't'
        set[n + 2] = now_s
        n = n + 2
      end
      if w == nil or w < now then
        set[n + 1] = 'w'
        set[n + 2] = w_next
        n = n + 2
      end
    end
    local renew = need > 0 and (x == false or tonumber(x) == nil or tonumber(x) < need)
    if renew then
      set[n + 1] = 'x'
      set[n + 2] = at
      n = n + 2
    end
    if n > 0 then redis.pcall('HSET', h, unpack(set)) end
    if renew then
      redis.pcall('EXPIREAT', h, at)
    elseif need == 0 and x ~= false then
      -- A granularity is kept forever now: so is the hash.
      redis.pcall('PERSIST', h)
      redis.pcall('HDEL', h, 'x')
    end
  end
end
"#
    };
}
pub(crate) use script_part;
pub const SCRIPT_PART: &str = script_part!();

/// Most fields of one window hash written by one `HMGET` and `HSET` (Lua's `unpack` takes
/// at most 8000 values); a hash with more takes several entries of the batch.
const FIELDS_PER_ENTRY: usize = 1000;

/// A window hash's part of a batch: the expiry it needs (0: none) and (g, t) -> delta.
type HashWrite = (u64, BTreeMap<(usize, u64), i64>);

/// The window writes of a batch, built from its window deltas: what [`SCRIPT_PART`] reads.
#[derive(Default)]
pub struct Writes {
    hashes: BTreeMap<Vec<u8>, HashWrite>,
}

/// One KEYS entry of the script: a hash, the expiry it needs, and up to
/// [`FIELDS_PER_ENTRY`] of its fields.
type Entry<'a> = (&'a [u8], u64, Vec<((usize, u64), i64)>);

impl Writes {
    /// Adds the window delta of `key` at second (or bucket) `t` for letter `letter`, `d`,
    /// to every kept granularity it counts into, leaving out buckets past retention at `now`.
    pub fn add(&mut self, windows: &Windows, now: u64, letter: u8, t: u64, key: &[u8], d: i64) {
        let mut kept = (0..GRANULARITIES)
            .filter_map(|g| {
                let wanted = letter == super::windows::ALL || letter == LETTER[g];
                let bucket = t - t % SIZE[g];
                (wanted && windows.retained(g, bucket, now)).then_some((g, bucket))
            })
            .peekable();
        if kept.peek().is_none() {
            return;
        }
        // The hash's name is built (and looked up) once per delta.
        let slot = self.hashes.entry(window_hash(key)).or_default();
        for (g, bucket) in kept {
            let need = match windows.keeps_forever() {
                true => 0,
                false => windows.kept_until(g, bucket),
            };
            slot.0 = slot.0.max(need);
            let f = slot.1.entry((g, bucket)).or_insert(0);
            *f = f.wrapping_add(d);
        }
    }

    pub fn field_count(&self) -> usize {
        self.hashes.values().map(|h| h.1.len()).sum()
    }

    /// The script's KEYS entries, in order.
    pub fn entries(&self) -> Vec<Entry<'_>> {
        let mut out = Vec::with_capacity(self.hashes.len());
        for (name, (need, fields)) in &self.hashes {
            let mut rest = fields.iter().map(|(&b, &d)| (b, d)).peekable();
            while rest.peek().is_some() {
                let part = rest.by_ref().take(FIELDS_PER_ENTRY).collect();
                out.push((&name[..], *need, part));
            }
        }
        out
    }

    /// How many ARGV entries [`Writes::encode_args`] writes for `entries`.
    pub fn arg_count(windows: &Windows, entries: &[Entry<'_>]) -> usize {
        let fields: usize = entries.iter().map(|e| e.2.len()).sum();
        5 + 3 * trimmed(windows).count() + entries.len() * 7 + 2 * fields
    }

    /// The ARGV part of [`SCRIPT_PART`] at `now`: the trim rules, then each entry's writes.
    pub fn encode_args(out: &mut BytesMut, windows: &Windows, now: u64, entries: &[Entry<'_>]) {
        let bulk = crate::resp::reply::bulk;
        let mut num = itoa::Buffer::new();
        bulk(out, num.format(now).as_bytes());
        let every = trimmed(windows)
            .map(|g| windows.trim_slack(g))
            .min()
            .unwrap_or(u64::MAX);
        bulk(out, num.format(every).as_bytes());
        bulk(out, num.format(now + WRITTEN_AHEAD).as_bytes());
        bulk(out, &kept_signature(windows));
        bulk(out, num.format(trimmed(windows).count()).as_bytes());
        for g in trimmed(windows) {
            bulk(out, &[LETTER[g]]);
            bulk(out, num.format(SIZE[g]).as_bytes());
            bulk(out, num.format(windows.keep(g).unwrap_or(0)).as_bytes());
        }
        let mut name = Vec::with_capacity(21);
        for (_, need, fields) in entries {
            bulk(out, num.format(*need).as_bytes());
            let at = match need {
                0 => 0,
                n => n + EXPIRY_SLACK,
            };
            bulk(out, num.format(at).as_bytes());
            bulk(out, num.format(fields.len()).as_bytes());
            for &((g, t), _) in fields {
                name.clear();
                name.push(LETTER[g]);
                name.extend_from_slice(num.format(t).as_bytes());
                bulk(out, &name);
            }
            for marker in [b"w", b"t", b"x", b"k"] {
                bulk(out, marker);
            }
            for (_, d) in fields {
                bulk(out, num.format(*d).as_bytes());
            }
        }
    }
}

/// The retentions in force, as the `k` marker holds them: per kept granularity its letter
/// and seconds (`F`: forever), e.g. `s3600 m604800 h7776000 dF`.
fn kept_signature(windows: &Windows) -> Vec<u8> {
    let mut out = Vec::with_capacity(40);
    for (g, &letter) in LETTER.iter().enumerate() {
        let Some(k) = windows.keep(g) else { continue };
        if !out.is_empty() {
            out.push(b' ');
        }
        out.push(letter);
        match k {
            u64::MAX => out.push(b'F'),
            k => out.extend_from_slice(itoa::Buffer::new().format(k).as_bytes()),
        }
    }
    out
}

/// The granularities kept for a finite time (their fields are trimmed).
fn trimmed(windows: &Windows) -> impl Iterator<Item = usize> + '_ {
    (0..GRANULARITIES).filter(|&g| windows.keep(g).is_some_and(|k| k != u64::MAX))
}

/// `EVAL` of [`READ_SCRIPT`]: KEYS = [the window hash]; ARGV = per hash (the window hash,
/// then those of the layout before, named in ARGV: in the same slot, and undeclared so that
/// a cluster node migrating the slot does not answer `-TRYAGAIN` for hashes that do not
/// exist), its name (empty for the window hash), the field count, the fields.
pub const READ_SCRIPT: &str = r#"
local out = {}
local a = 1
while a <= #ARGV do
  local h = ARGV[a]
  if h == '' then h = KEYS[1] end
  local n = tonumber(ARGV[a + 1])
  -- At most 1,000 fields per HMGET (Lua's unpack limit is 8000).
  for from = a + 2, a + n + 1, 1000 do
    local last = math.min(from + 999, a + n + 1)
    local v = redis.pcall('HMGET', h, unpack(ARGV, from, last))
    if v.err then
      -- An undeclared hash of the layout before, in a slot that is migrating and not on
      -- this side of the move ("non local key"): it counts nothing here (read_frame).
      if h == KEYS[1] then return v end
      v = {}
    end
    for j = 1, last - from + 1 do out[#out + 1] = v[j] or '0' end
  end
  a = a + n + 2
end
return out
"#;

/// The read of `buckets` of `key` from its window hash and the hashes of the layout before:
/// the frame, and the bucket each value of its reply counts into (each bucket twice).
pub fn read_frame(key: &[u8], buckets: &[(usize, u64)]) -> (Bytes, Vec<(usize, u64)>) {
    let mut legacy: BTreeMap<Vec<u8>, Vec<(usize, u64)>> = BTreeMap::new();
    for &(g, t) in buckets {
        legacy
            .entry(legacy_bucket_key(key, g, t))
            .or_default()
            .push((g, t));
    }
    let mut out = BytesMut::new();
    let bulk = crate::resp::reply::bulk;
    crate::resp::reply::array(&mut out, 4 + 2 * (1 + legacy.len()) + 2 * buckets.len());
    bulk(&mut out, b"EVAL");
    bulk(&mut out, READ_SCRIPT.as_bytes());
    bulk(&mut out, b"1");
    bulk(&mut out, &window_hash(key));
    let mut num = itoa::Buffer::new();
    let mut order = Vec::with_capacity(2 * buckets.len());
    bulk(&mut out, b"");
    bulk(&mut out, num.format(buckets.len()).as_bytes());
    for &(g, t) in buckets {
        bulk(&mut out, &field(g, t));
        order.push((g, t));
    }
    for (name, fields) in &legacy {
        bulk(&mut out, name);
        bulk(&mut out, num.format(fields.len()).as_bytes());
        for &(g, t) in fields {
            bulk(&mut out, num.format(t).as_bytes());
            order.push((g, t));
        }
    }
    (out.freeze(), order)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY0: u64 = 1_763_856_000; // 2025-11-23T00:00:00Z

    #[test]
    fn names_keep_the_counters_hash_tag_and_parse_back() {
        let k = window_hash(b"visits:home");
        assert_eq!(k, b"tally:win:{visits:home}:visits:home");
        assert_eq!(parse_window_hash(&k), Some(&b"visits:home"[..]));
        assert_eq!(bucket_owner(&k), Some(&b"visits:home"[..]));
        let tagged = window_hash(b"visits:{eu}:home");
        assert_eq!(tagged, b"tally:win:{eu}:visits:{eu}:home");
        assert_eq!(
            crate::router::ring::key_hash(&tagged),
            crate::router::ring::key_hash(b"visits:{eu}:home")
        );
        assert_eq!(field(0, DAY0 + 5), format!("s{}", DAY0 + 5).into_bytes());
        assert_eq!(parse_field(&field(3, DAY0)), Some((3, DAY0)));
        for marker in [&b"s<"[..], b"s>", b"x", b"s", b"q12"] {
            assert_eq!(parse_field(marker), None);
        }
        let old = legacy_bucket_key(b"visits:home", 1, DAY0 + 3600 + 60);
        assert_eq!(
            old,
            format!("tally:w:{{visits:home}}:m:{DAY0}:visits:home").as_bytes()
        );
        assert_eq!(
            parse_legacy_bucket_key(&old),
            Some((1, &b"visits:home"[..]))
        );
        assert_eq!(bucket_owner(&old), Some(&b"visits:home"[..]));
        assert_eq!(bucket_owner(b"tally:w:x"), None);
        assert_eq!(bucket_owner(b"visits:home"), None);
    }

    #[test]
    fn a_moved_hash_gives_back_its_counts_and_not_its_markers() {
        let b = |s: &str| Bytes::copy_from_slice(s.as_bytes());
        let pairs = vec![
            (b(&format!("s{DAY0}")), b("3")),
            (b("s<"), b(&DAY0.to_string())),
            (b("x"), b("99")),
            (b(&format!("d{DAY0}")), b("-2")),
            (b("foreign"), b("1")),
        ];
        assert_eq!(
            moved_fields(&window_hash(b"k"), &pairs),
            vec![(0, DAY0, 3), (3, DAY0, -2)]
        );
        let old = legacy_bucket_key(b"k", 2, DAY0);
        let pairs = vec![(b(&DAY0.to_string()), b("7")), (b("junk"), b("1"))];
        assert_eq!(moved_fields(&old, &pairs), vec![(2, DAY0, 7)]);
    }

    #[test]
    fn a_read_asks_both_layouts_for_each_bucket() {
        let (frame, order) = read_frame(b"k", &[(0, DAY0), (1, DAY0)]);
        // The window hash first, then the hashes of the layout before, by name.
        assert_eq!(order, vec![(0, DAY0), (1, DAY0), (1, DAY0), (0, DAY0)]);
        let text = String::from_utf8_lossy(&frame);
        assert!(text.contains("tally:win:{k}:k"), "{text}");
        assert!(text.contains(&format!("s{DAY0}")), "{text}");
        assert!(
            text.contains(&format!("tally:w:{{k}}:m:{DAY0}:k")),
            "{text}"
        );
    }
}
