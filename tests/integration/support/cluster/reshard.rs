//! Online resharding as `redis-cli --cluster reshard` does it: `CLUSTER SETSLOT IMPORTING`
//! on the target, `MIGRATING` on the source, the slot's keys moved with `CLUSTER
//! GETKEYSINSLOT` and `MIGRATE ... KEYS` in batches, then `SETSLOT NODE` on every primary.
//! One step at a time ([`Cluster::begin_move`], [`Cluster::step`], [`Cluster::finish`]), so
//! that a test can hold a slot half moved, or paced ([`Cluster::move_slots`]).

use super::{node_cmd, ok, text, Cluster, SETTLE};
use std::time::{Duration, Instant};

/// How fast [`Cluster::move_slots`] migrates keys.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// Keys per `MIGRATE`.
    pub batch: usize,
    /// Between two batches (the window in which a test's load meets a half-moved slot).
    pub pause: Duration,
}

impl Default for Pace {
    fn default() -> Pace {
        Pace {
            batch: 10,
            pause: Duration::ZERO,
        }
    }
}

/// A slot being moved, one step at a time (`begin`, `step` as often as wanted, `finish`),
/// so that a test can hold it mid-migration: `MIGRATING` on the source, `IMPORTING` on the
/// target, some keys on each.
#[derive(Debug)]
pub struct SlotMove {
    pub slot: u16,
    pub from: u16,
    pub to: u16,
    to_id: String,
    from_id: String,
}

impl Cluster {
    /// Moves `slots` from the primary at `from` to the one at `to`, online, as
    /// `redis-cli --cluster reshard` does (each slot: [`Cluster::begin_move`], its keys moved in
    /// batches of `pace.batch` with `pace.pause` between, [`Cluster::finish`]).
    pub fn move_slots(&self, slots: &[u16], from: u16, to: u16, pace: Pace) {
        for &slot in slots {
            let m = self.begin_move(slot, from, to);
            let deadline = Instant::now() + SETTLE;
            while self.step(&m, pace.batch) > 0 {
                assert!(Instant::now() < deadline, "slot {slot} still has keys");
                if !pace.pause.is_zero() {
                    std::thread::sleep(pace.pause);
                }
            }
            self.finish(&m);
        }
    }

    /// `CLUSTER SETSLOT <slot> IMPORTING` on the target, then `MIGRATING` on the source.
    pub fn begin_move(&self, slot: u16, from: u16, to: u16) -> SlotMove {
        let m = SlotMove {
            slot,
            from,
            to,
            to_id: self.id_of(to),
            from_id: self.id_of(from),
        };
        let s = slot.to_string();
        ok(node_cmd(
            to,
            &["CLUSTER", "SETSLOT", &s, "IMPORTING", &m.from_id],
        ));
        ok(node_cmd(
            from,
            &["CLUSTER", "SETSLOT", &s, "MIGRATING", &m.to_id],
        ));
        m
    }

    /// Moves up to `batch` keys of the slot (`CLUSTER GETKEYSINSLOT`, `MIGRATE ... KEYS`);
    /// returns how many it moved (0: the source holds none of the slot's keys any more).
    pub fn step(&self, m: &SlotMove, batch: usize) -> usize {
        let keys = match node_cmd(
            m.from,
            &[
                "CLUSTER",
                "GETKEYSINSLOT",
                &m.slot.to_string(),
                &batch.to_string(),
            ],
        ) {
            Ok(redis::Value::Array(v)) => v.iter().map(text).collect::<Vec<_>>(),
            other => panic!("GETKEYSINSLOT {}: {other:?}", m.slot),
        };
        if keys.is_empty() {
            return 0;
        }
        let port = m.to.to_string();
        let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
        args.extend(keys.iter().map(String::as_str));
        // BUSYKEY would mean the key lives on both nodes: a bug, never replaced here.
        ok(node_cmd(m.from, &args));
        keys.len()
    }

    /// Moves the slot's remaining keys, then `CLUSTER SETSLOT <slot> NODE <target>` on the
    /// target, the source and every other primary, and waits for the cluster to agree.
    pub fn finish(&self, m: &SlotMove) {
        let deadline = Instant::now() + SETTLE;
        while self.step(m, 100) > 0 {
            assert!(Instant::now() < deadline, "slot {} still has keys", m.slot);
        }
        let s = m.slot.to_string();
        ok(node_cmd(
            m.to,
            &["CLUSTER", "SETSLOT", &s, "NODE", &m.to_id],
        ));
        ok(node_cmd(
            m.from,
            &["CLUSTER", "SETSLOT", &s, "NODE", &m.to_id],
        ));
        for p in self.primaries() {
            if p != m.to && p != m.from {
                ok(node_cmd(p, &["CLUSTER", "SETSLOT", &s, "NODE", &m.to_id]));
            }
        }
        self.wait_settled("slot move");
        assert_eq!(self.node_for_slot(m.slot), m.to, "slot {} moved", m.slot);
    }
}
