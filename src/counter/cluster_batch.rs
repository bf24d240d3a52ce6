//! A lane's batch on a Redis Cluster: one `EVAL` per slot, pipelined per node.
//!
//! A script in a cluster may only touch keys of one slot, and a slot may move to another
//! node between two flushes or during one. So the exactly-once record moves with the data
//! it protects: each slot has its own watermark, `tally:applied:{<tag>}` (the tag hashes to
//! the slot, `router::slots::slot_tag`), holding per proxy the highest batch number applied
//! to that slot. It lives in the slot, so it migrates with the slot's keys (`MIGRATE`) and
//! replicates with them; a part re-sent after a lost reply, a failover or a migration is
//! recognised wherever the slot is served by then. A batch is split into one part per slot;
//! every part carries the batch's number; the parts bound for one node are written in one
//! go and answered in one round trip (the economy of one round trip per node per batch).
//! The order a slot's parts must keep is kept by `slot_holds`.
//!
//! Each attempt sends the parts not yet landed to where their slot is served now:
//! `-MOVED` (the map is stale: reported, waited on briefly, retried with the batch's
//! back-off), `-ASK` (re-sent at once to the importing node after `ASKING`), `-TRYAGAIN` and
//! `-CLUSTERDOWN` (retried with the back-off). With `wait_replicas`, a node's parts count as
//! landed once one `WAIT` after them on the same connection confirms them.
//!
//! Owns the split and the sending of parts. Does not own the batch's life (retries,
//! settling: `lane`) or the script (`lane::SCRIPT`).

use super::lane::{encode_batch, parse_results, KeyValue, APPLIED_KEY};
use super::windows::{self, Windows};
use crate::backend::cluster::Redirect;
use crate::backend::{BackendError, Shard};
use crate::router::{slots, Router};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The slot's exactly-once watermark (a hash: proxy id -> last batch number applied).
pub fn applied_key(slot: u16) -> String {
    format!("{APPLIED_KEY}:{{{}}}", slots::slot_tag(slot))
}

/// A part that only reads one key: the reply has the shape of `lane::SCRIPT`'s.
const READ_SCRIPT: &str = "return {0, {redis.pcall('GET', KEYS[1])}}";

/// The part of a batch bound for one slot.
pub(super) struct Part {
    slot: u16,
    /// The batch's number, or 0 for a part that only reads.
    seq: u64,
    /// Positions in the batch's items of this part's items, in order.
    items: Vec<usize>,
    /// How many of them are counters (which the script answers a value for).
    counters: usize,
    frame: Bytes,
    /// Where an `-ASK` sent it: the next send goes there, after `ASKING`.
    ask: Option<SocketAddr>,
    /// Its counters' values, once it landed (and `WAIT` confirmed it).
    done: Option<Vec<KeyValue>>,
}

/// Splits a batch into parts, one per slot, and sums what they write.
pub(super) fn split(
    proxy_id: &str,
    windows: &Windows,
    now: u64,
    seq: u64,
    items: &[(Bytes, Option<i64>)],
) -> (Vec<Part>, (u64, u64)) {
    let mut by_slot: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
    for (i, (k, _)) in items.iter().enumerate() {
        by_slot
            .entry(slots::key_slot(windows::placement_key(k)))
            .or_default()
            .push(i);
    }
    let mut writes = (0, 0);
    let mut parts = Vec::new();
    for (slot, idx) in by_slot {
        let sub: Vec<(Bytes, Option<i64>)> = idx.iter().map(|&i| items[i].clone()).collect();
        if sub.iter().all(|(_, d)| d.is_none()) {
            // Only reads: one single-key script per key. It leaves the slot's watermark
            // alone (its slot need not be this lane's, see `slot_holds`, and a number written
            // there could overtake the batch of the lane that holds it), and a single key
            // follows `-ASK` during a migration where a multi-key script gets `-TRYAGAIN`
            // until the slot has moved (a key not created yet counts as missing).
            for (i, (k, _)) in idx.into_iter().zip(sub) {
                parts.push(Part {
                    slot,
                    seq: 0,
                    counters: 1,
                    items: vec![i],
                    frame: crate::backend::encode_command(&[
                        &b"EVAL"[..],
                        READ_SCRIPT.as_bytes(),
                        b"1",
                        &k,
                    ]),
                    ask: None,
                    done: None,
                });
            }
            continue;
        }
        let (frame, w) = encode_batch(
            proxy_id,
            windows,
            now,
            seq,
            &sub,
            applied_key(slot).as_bytes(),
        );
        writes.0 += w.0;
        writes.1 += w.1;
        parts.push(Part {
            slot,
            seq,
            counters: sub
                .iter()
                .filter(|(k, _)| windows::parse_pending(k).is_none())
                .count(),
            items: idx,
            frame,
            ask: None,
            done: None,
        });
    }
    (parts, writes)
}

/// Sends every part not yet landed; the counters' values in item order once all landed.
pub(super) async fn attempt(
    router: &Router,
    parts: &mut [Part],
    items: &[(Bytes, Option<i64>)],
) -> Result<Vec<KeyValue>, BackendError> {
    let mut last_err = None;
    // Parts an `-ASK` redirected are sent again at once, a few times at most.
    for _ in 0..4 {
        let topo = router.topology();
        let mut sent = Vec::new();
        for (i, p) in parts.iter_mut().enumerate() {
            if p.done.is_some() {
                continue;
            }
            let (node, asking) = match p.ask.take() {
                Some(addr) => match topo.by_addr(addr) {
                    Some(n) => (n.clone(), true),
                    None => {
                        router.report_stale();
                        last_err = Some(BackendError::Unavailable);
                        continue;
                    }
                },
                None => (topo.slot_server(p.slot).clone(), false),
            };
            let connects = node.lane_conn.connects();
            let rx = if asking {
                node.lane_send_asking(&p.frame)
            } else {
                node.lane_send(p.frame.clone())
            };
            sent.push((i, node, connects, rx));
        }
        if sent.is_empty() {
            break;
        }
        let mut asked = false;
        let mut moved = false;
        let mut unanswered = false;
        let mut landed: Vec<(usize, Arc<Shard>, u64, Vec<KeyValue>)> = Vec::new();
        // Every part was sent at once: one deadline for all their replies.
        let deadline = tokio::time::Instant::now()
            + sent
                .iter()
                .map(|(_, n, _, _)| n.timeout)
                .max()
                .unwrap_or_default();
        for (i, node, connects, rx) in sent {
            let reply = match crate::deadline::within(deadline, rx).await {
                Ok(Ok(Ok(r))) => r,
                failed => {
                    last_err = Some(match failed {
                        Ok(Ok(Err(e))) => e,
                        Ok(Err(_)) => BackendError::Lost,
                        _ => BackendError::Timeout,
                    });
                    unanswered = true;
                    continue;
                }
            };
            match Redirect::of_raw(&reply.raw).inspect(Redirect::count) {
                Some(Redirect::Ask { addr, .. }) => {
                    parts[i].ask = Some(addr);
                    asked = true;
                    continue;
                }
                Some(Redirect::Moved { .. }) | Some(Redirect::Retry) => {
                    moved = true;
                    last_err = Some(BackendError::Unavailable);
                    continue;
                }
                None => {}
            }
            match parse_results(&reply, parts[i].counters) {
                Some(v) => landed.push((i, node, connects, v)),
                None => {
                    tracing::warn!(node = %node.name, reply = ?reply.frame, "unexpected flush reply");
                    last_err = Some(BackendError::Lost);
                }
            }
        }
        // One WAIT per node, after all its parts, on the one connection that sent them all
        // (a reconnect in between: not confirmed). Only a node that took a write has
        // something for its replicas to confirm.
        type Landed = Vec<(usize, u64, Vec<KeyValue>)>;
        let mut by_node: BTreeMap<String, (Arc<Shard>, Landed)> = BTreeMap::new();
        for (i, n, connects, v) in landed {
            let e = by_node
                .entry(n.name.clone())
                .or_insert_with(|| (n, Vec::new()));
            e.1.push((i, connects, v));
        }
        for (node, done) in by_node.into_values() {
            let connects = done[0].1;
            let confirmed = if done.iter().all(|(i, _, _)| parts[*i].seq == 0) {
                Ok(true)
            } else if done.iter().any(|(_, c, _)| *c != connects) {
                Ok(false)
            } else {
                node.lane_wait(connects).await
            };
            match confirmed {
                Ok(true) => {
                    for (i, _, v) in done {
                        parts[i].done = Some(v);
                    }
                }
                Ok(false) => last_err = Some(BackendError::Timeout),
                Err(e) => last_err = Some(e),
            }
        }
        if unanswered {
            // A node that did not answer may have failed over: have the map looked at.
            router.report_stale();
        }
        if moved {
            // Give the map a moment to catch up before the batch's back-off resends.
            router.report_stale();
            let v = topo.version;
            router.newer_than(v, Duration::from_millis(500)).await;
        }
        if !asked {
            break;
        }
    }
    if parts.iter().any(|p| p.done.is_none()) {
        return Err(last_err.unwrap_or(BackendError::Unavailable));
    }
    // The counters' values in item order, as the lane settles them.
    let mut by_item: Vec<Option<KeyValue>> = vec![None; items.len()];
    for p in parts.iter_mut() {
        let mut values = p.done.take().unwrap_or_default().into_iter();
        for &i in &p.items {
            if windows::parse_pending(&items[i].0).is_none() {
                by_item[i] = values.next();
            }
        }
    }
    Ok(by_item.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_splits_into_one_part_per_slot_each_with_its_slots_watermark() {
        let windows = Windows::from_config(&crate::config::WindowsConfig::default());
        let win = windows::pending_key(windows::ALL, 1_800_000_000, b"visits:{a}home");
        let items: Vec<(Bytes, Option<i64>)> = vec![
            (Bytes::from_static(b"visits:{a}home"), Some(3)),
            (Bytes::from_static(b"visits:{b}x"), Some(1)),
            (Bytes::from(win), Some(3)),
            (Bytes::from_static(b"{a}other"), None),
            (Bytes::from_static(b"{c}only-read"), None),
        ];
        let (parts, writes) = split("p1", &windows, 1_800_000_000, 42, &items);
        assert_eq!(parts.len(), 3);
        // A part that only reads leaves its slot's watermark alone: another lane may hold it.
        let read = parts
            .iter()
            .find(|p| p.slot == slots::key_slot(b"c"))
            .unwrap();
        assert_eq!(read.seq, 0);
        assert!(std::str::from_utf8(&read.frame)
            .unwrap()
            .contains(READ_SCRIPT));
        assert!(!std::str::from_utf8(&read.frame)
            .unwrap()
            .contains("tally:applied"));
        assert!(parts
            .iter()
            .filter(|p| p.slot != read.slot)
            .all(|p| p.seq == 42));
        assert_eq!(writes.0, 2, "two counter deltas");
        for p in &parts {
            let key = applied_key(p.slot);
            assert_eq!(slots::key_slot(key.as_bytes()), p.slot);
            let frame = std::str::from_utf8(&p.frame).unwrap();
            assert_eq!(frame.contains(&key), p.seq != 0, "{frame}");
            for &i in &p.items {
                let k = windows::placement_key(&items[i].0);
                assert_eq!(slots::key_slot(k), p.slot);
            }
        }
        let a = parts
            .iter()
            .find(|p| p.slot == slots::key_slot(b"a"))
            .unwrap();
        assert_eq!(a.items, vec![0, 2, 3]);
        assert_eq!(a.counters, 2, "the window delta has no value of its own");
        // The windowed key's window hash is in its slot: the same EVAL writes it.
        assert!(std::str::from_utf8(&a.frame)
            .unwrap()
            .contains("tally:win:{a}:visits:{a}home"));
    }
}
