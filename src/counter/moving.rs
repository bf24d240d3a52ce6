//! Keys moving during a rebalance: the per-key move protocol, and the engine's record of it.
//!
//! - a counter key is renamed on its old owner to a tombstone `tally:mv:<id>:<key>` (one
//!   atomic script), its value is added to the key's pending delta and logged (`Moved`) in
//!   one step; the value lands on the new owner with the next flush, added to whatever
//!   reached it meanwhile (counters merge). A crash at any point leaves the value in exactly
//!   one of: the key, the tombstone, the log; moving again handles each.
//! - a window hash (time windows, either layout of `window_store`) moves the same way: its
//!   fields become window deltas.
//! - any other key moves with Redis's own `MIGRATE` (TTL kept; a key the new owner already
//!   holds is newer and wins).
//!
//! The first command that needs a key whole during a rebalance moves that key first
//! ([`Engine::ensure_moved`]), serialised with the mover per key ([`Engine::move_once`]).
//!
//! Owns moving one key and the set of keys moved. Does not own the rebalance's plan, its
//! scan of old owners or the tombstones' deletion (`rebalance`).

use super::lane::LaneError;
use super::stripe::stripe_of;
use super::{parse_i64, wal, window_store, windows, Engine};
use crate::backend::Shard;
use crate::router::Migration;
use bytes::Bytes;
use redis_protocol::resp2::types::BytesFrame;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Renames a counter key to its tombstone and returns the value, or the value of a
/// tombstone a crash left behind. {0}: nothing to move; {1, v}: move v; {2}: not an integer
/// string, move the key as it is.
const MOVE_SCRIPT: &str = r#"
local t = redis.call('GET', KEYS[2])
if t then return {1, t} end
local v = redis.pcall('GET', KEYS[1])
if type(v) == 'table' then return {2} end
if not v then return {0} end
if not string.match(v, '^%-?%d+$') then return {2} end
redis.call('RENAME', KEYS[1], KEYS[2])
return {1, v}
"#;

/// Renames a bucket hash (time windows) to its tombstone and returns its fields, or those
/// of a tombstone a crash left behind. {0}: nothing to move; {1, fields}: move them; {2}:
/// not a hash, move the key as it is.
const MOVE_BUCKET_SCRIPT: &str = r#"
if redis.call('EXISTS', KEYS[2]) == 0 then
  local t = redis.call('TYPE', KEYS[1])['ok']
  if t == 'none' then return {0} end
  if t ~= 'hash' then return {2} end
  redis.call('RENAME', KEYS[1], KEYS[2])
end
return {1, redis.call('HGETALL', KEYS[2])}
"#;

pub(crate) fn tombstone(id: u64, key: &[u8]) -> Vec<u8> {
    let mut t = format!("tally:mv:{id}:").into_bytes();
    t.extend_from_slice(key);
    t
}

impl Engine {
    /// Adds `value`, moved off the key's old owner by rebalance `id`, to its pending delta,
    /// logged in the same step (replay restores both the delta and the fact of the move).
    pub fn apply_moved(&self, id: u64, key: &[u8], value: i64) {
        let cell = &self.stripes[stripe_of(key)];
        let mut guard = cell.lock.lock();
        let stripe = &mut *guard;
        if stripe.add_pending(key, value) {
            self.note_dirty();
        }
        stripe.unflushed = stripe.unflushed.wrapping_add(value);
        if self.wal.is_some() {
            wal::encode_moved(&mut stripe.log, id, key, value);
            cell.has_log.store(true, Ordering::SeqCst);
        }
        self.moved.lock().insert(Bytes::copy_from_slice(key));
    }

    /// Adds the counts of bucket hash `bk` of `key` ((granularity, bucket start, count)),
    /// moved off its old owner by rebalance `id`, to window deltas, logged in the same step
    /// with a record that the hash has moved.
    pub fn apply_moved_bucket(&self, id: u64, key: &[u8], bk: &[u8], fields: &[(usize, u64, i64)]) {
        let cell = &self.stripes[stripe_of(key)];
        let mut guard = cell.lock.lock();
        let stripe = &mut *guard;
        for &(g, t, v) in fields {
            let pk = windows::pending_key(windows::LETTER[g], t, key);
            if self.wal.is_some() {
                wal::encode_moved(&mut stripe.log, id, &pk, v);
            }
            if stripe.add_pending(&pk, v) {
                self.note_dirty();
            }
        }
        if self.wal.is_some() {
            wal::encode_marked(&mut stripe.log, id, bk);
            cell.has_log.store(true, Ordering::SeqCst);
        }
        self.moved_windows.store(true, Ordering::Relaxed);
        self.moved.lock().insert(Bytes::copy_from_slice(bk));
    }

    /// Marks a key as moved without a value (its old owner had nothing for it).
    pub fn mark_moved(&self, key: &[u8]) {
        self.moved.lock().insert(Bytes::copy_from_slice(key));
    }

    pub fn is_moved(&self, key: &[u8]) -> bool {
        self.moved.lock().contains(key)
    }

    pub fn moved_count(&self) -> usize {
        self.moved.lock().len()
    }

    pub fn set_moved(&self, keys: std::collections::HashSet<Bytes>) {
        *self.moved.lock() = keys;
    }

    /// Whether `key`'s value may still be partly on its old owner (a rebalance is under
    /// way, its owner changed, and it has not been moved yet).
    pub fn needs_move(&self, key: &[u8]) -> bool {
        self.router
            .with_migration(|m| m.owner_changed(key) && !self.is_moved(key))
            .unwrap_or(false)
    }

    /// Makes sure `key` has no value left on its old owner before it is used whole.
    pub async fn ensure_moved(&self, m: &Migration, key: &[u8]) -> Result<(), LaneError> {
        if !m.owner_changed(key) || self.is_moved(key) {
            return Ok(());
        }
        let from = m.old.shard_for(key).clone();
        // A delta of the key in flight on its old owner (a batch cut for the old ring, not yet
        // settled) must land before the key moves: landing after, it would recreate the key
        // there, where nothing reads it any more. The mover lands every such batch before it
        // moves anything; a command may come first, so the old owner's lane is asked for a
        // flush, which settles every batch it holds (and ends a paced flush's waits).
        if self.inflight_of(key).is_some() {
            if let Some(lane) = self.lane(&from.name) {
                lane.flush(None).await;
            }
        }
        self.move_once(m, key, &from).await.map(|_| ()).map_err(|e| {
            tracing::warn!(key = %String::from_utf8_lossy(key), from = %from.name, error = %e, "rebalance: move failed");
            LaneError::Unavailable
        })
    }

    /// Makes sure the bucket hashes of `key` that a window read needs have no counts left on
    /// its old owner (see `counter::windows`).
    pub async fn ensure_buckets_moved(
        &self,
        m: &Migration,
        key: &[u8],
        buckets: &[(usize, u64)],
    ) -> Result<(), LaneError> {
        if !m.owner_changed(key) {
            return Ok(());
        }
        for bk in window_store::hashes_of(key, buckets) {
            self.ensure_moved(m, &bk).await?;
        }
        Ok(())
    }

    /// Moves a bucket hash: its fields become window deltas of the proxy (logged), which the
    /// next flush adds to the same hash on the new owner. Counts merge, as counters do.
    async fn move_bucket(
        &self,
        id: u64,
        bk: &[u8],
        from: &Arc<Shard>,
        to: &Arc<Shard>,
    ) -> Result<bool, String> {
        let Some(key) = window_store::bucket_owner(bk) else {
            return Err("not a bucket key".into());
        };
        let tomb = tombstone(id, bk);
        let eval: [&[u8]; 5] = [b"EVAL", MOVE_BUCKET_SCRIPT.as_bytes(), b"2", bk, &tomb];
        let r = from.call(&eval).await?;
        let BytesFrame::Array(parts) = r else {
            return Err(format!("unexpected bucket move reply {r:?}"));
        };
        match parts.as_slice() {
            [BytesFrame::Integer(0)] => {
                self.mark_moved(bk);
                Ok(false)
            }
            [BytesFrame::Integer(1), BytesFrame::Array(flat)] => {
                let mut pairs = Vec::with_capacity(flat.len() / 2);
                for pair in flat.chunks(2) {
                    let [BytesFrame::BulkString(f), BytesFrame::BulkString(v)] = pair else {
                        return Err(format!("unexpected bucket field {pair:?}"));
                    };
                    pairs.push((f.clone(), v.clone()));
                }
                let fields = window_store::moved_fields(bk, &pairs);
                self.apply_moved_bucket(id, key, bk, &fields);
                if let Some(w) = &self.wal {
                    w.commit()
                        .await
                        .map_err(|_| "the write-ahead log failed".to_string())?;
                }
                Ok(true)
            }
            [BytesFrame::Integer(2)] => self.migrate(bk, from, to).await,
            other => Err(format!("unexpected bucket move reply {other:?}")),
        }
    }

    /// Moves one key from `from` to `to`; true when something was moved.
    async fn move_key(
        &self,
        id: u64,
        key: &[u8],
        from: &Arc<Shard>,
        to: &Arc<Shard>,
    ) -> Result<bool, String> {
        if window_store::bucket_owner(key).is_some() {
            return self.move_bucket(id, key, from, to).await;
        }
        let tomb = tombstone(id, key);
        if self.is_batched(key) {
            // One decision: the tombstone a crash left behind (its value was not logged yet),
            // or the key itself, renamed to its tombstone. Tombstones stay until the rebalance
            // ends with the log synced (see `finish`), so that no fsync mode can lose a value
            // between its `Moved` record and the tombstone's deletion.
            let eval: [&[u8]; 5] = [b"EVAL", MOVE_SCRIPT.as_bytes(), b"2", key, &tomb];
            let r = from.call(&eval).await?;
            let BytesFrame::Array(parts) = r else {
                return Err(format!("unexpected move reply {r:?}"));
            };
            match parts.as_slice() {
                [BytesFrame::Integer(0)] => {
                    self.mark_moved(key);
                    return Ok(false);
                }
                [BytesFrame::Integer(1), BytesFrame::BulkString(v)] => {
                    match parse_i64(v) {
                        Some(v) => {
                            self.apply_moved(id, key, v);
                            if let Some(w) = &self.wal {
                                w.commit()
                                    .await
                                    .map_err(|_| "the write-ahead log failed".to_string())?;
                            }
                            return Ok(true);
                        }
                        // Digits but past i64: not a counter Redis could increment; move it as is.
                        None => {
                            from.call(&[&b"RENAME"[..], &tomb[..], key]).await?;
                        }
                    }
                }
                [BytesFrame::Integer(2)] => {}
                other => return Err(format!("unexpected move reply {other:?}")),
            }
        }
        // Not a counter (or not an integer): Redis moves it, TTL and all.
        self.migrate(key, from, to).await
    }

    /// Moves `key` with Redis's `MIGRATE` (TTL kept); a key the new owner already holds is newer
    /// and wins. True when something was moved.
    async fn migrate(
        &self,
        key: &[u8],
        from: &Arc<Shard>,
        to: &Arc<Shard>,
    ) -> Result<bool, String> {
        let (host, port) = (to.addr().ip().to_string(), to.addr().port().to_string());
        let timeout_ms = (from.timeout.as_millis() * 4).to_string();
        let mut migrate: Vec<&[u8]> = vec![
            b"MIGRATE",
            host.as_bytes(),
            port.as_bytes(),
            key,
            b"0",
            timeout_ms.as_bytes(),
        ];
        // The old shard logs into the new one as the proxy does.
        match to.auth_args.as_deref() {
            Some([_, pw]) => migrate.extend([&b"AUTH"[..], pw.as_bytes()]),
            Some([_, user, pw]) => migrate.extend([&b"AUTH2"[..], user.as_bytes(), pw.as_bytes()]),
            _ => {}
        }
        let moved = match from.call(&migrate).await {
            Ok(BytesFrame::SimpleString(s)) if &s[..] == b"NOKEY" => false,
            Ok(_) => true,
            // The new owner already holds the key: it was written there since, and is newer.
            // MIGRATE relays the target's refusal: "ERR Target instance replied with error: BUSYKEY".
            Err(e) if e.contains("BUSYKEY") => {
                from.call(&[&b"DEL"[..], key]).await?;
                false
            }
            Err(e) => return Err(e),
        };
        self.mark_moved(key);
        Ok(moved)
    }

    pub async fn move_once(
        &self,
        m: &Migration,
        key: &[u8],
        from: &Arc<Shard>,
    ) -> Result<bool, String> {
        let _one = m.stripe(key).lock().await;
        if self.is_moved(key) {
            return Ok(false);
        }
        if m.is_lost(&from.name) {
            self.mark_moved(key);
            return Ok(false);
        }
        let to = m.new.shard_for(key);
        let moved = self.move_key(m.id, key, from, to).await?;
        if moved {
            m.note_moved(&to.name);
        }
        Ok(moved)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tombstones_name_the_rebalance_and_the_key() {
        assert_eq!(
            super::tombstone(42, b"visits:home"),
            b"tally:mv:42:visits:home"
        );
    }
}
