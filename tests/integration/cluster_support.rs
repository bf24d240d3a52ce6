//! The cluster test support itself (`support::cluster`), against real nodes: the cluster
//! forms with a replica per primary, `slot_of` agrees with `CLUSTER KEYSLOT`, a slot moved
//! online takes its keys (and is readable while half moved), a manual failover and a
//! `kill -9` promote a replica, and no key ever lives on two nodes.

use crate::support::cluster::{crc16, node_cmd, slot_of, Cluster, Pace};
use std::time::Duration;

/// One cluster at a time: six servers each, on two cores.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[test]
fn crc16_is_xmodem() {
    // The CRC-16/XMODEM check value, and Redis's own examples (cluster-spec).
    assert_eq!(crc16(b"123456789"), 0x31c3);
    assert_eq!(slot_of(b"123456789"), 12739);
    assert_eq!(
        slot_of(b"{user1000}.following"),
        slot_of(b"{user1000}.followers")
    );
    assert_eq!(slot_of(b"foo{}{bar}"), crc16(b"foo{}{bar}") % 16384);
    assert_eq!(slot_of(b"foo{{bar}}zap"), crc16(b"{bar") % 16384);
    assert_eq!(slot_of(b"foo{bar}{zap}"), crc16(b"bar") % 16384);
}

fn int(v: redis::Value) -> i64 {
    match v {
        redis::Value::Int(n) => n,
        other => panic!("not an integer: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_cluster_forms_reshards_and_fails_over() {
    let _serial = SERIAL.lock().await;
    tokio::task::block_in_place(|| {
        let mut c = Cluster::start(3, 1);
        let primaries = c.primaries();
        assert_eq!(primaries.len(), 3);
        for &p in &primaries {
            assert_eq!(c.replicas_of(p).len(), 1, "one replica of {p}");
        }

        // slot_of == CLUSTER KEYSLOT, hash tags included.
        let keys = [
            "",
            "a",
            "visits:home",
            "{user1000}.following",
            "foo{}{bar}",
            "foo{{bar}}zap",
            "foo{bar}{zap}",
            "{}",
            "{",
            "}",
            "x{y",
            "tally:applied{5}",
            "élan",
            "k:123456",
        ];
        for k in keys {
            let got = int(node_cmd(primaries[0], &["CLUSTER", "KEYSLOT", k]).unwrap());
            assert_eq!(slot_of(k.as_bytes()) as i64, got, "KEYSLOT {k:?}");
        }
        for i in 0..2000 {
            let k = format!("key:{i}");
            let got = int(node_cmd(primaries[i % 3], &["CLUSTER", "KEYSLOT", &k]).unwrap());
            assert_eq!(slot_of(k.as_bytes()) as i64, got, "KEYSLOT {k}");
        }

        // Five keys in one slot; the slot moves in batches of two, and while it is half
        // moved each key is still readable (MOVED/ASK followed).
        let from = c.node_for_key("{mv}");
        let to = *primaries.iter().find(|&&p| p != from).unwrap();
        for i in 0..5 {
            node_cmd(from, &["SET", &format!("{{mv}}:{i}"), &i.to_string()]).unwrap();
        }
        let slot = slot_of(b"{mv}");
        let m = c.begin_move(slot, from, to);
        assert_eq!(c.step(&m, 2), 2);
        let on_target =
            int(node_cmd(to, &["CLUSTER", "COUNTKEYSINSLOT", &slot.to_string()]).unwrap());
        assert_eq!(on_target, 2, "two keys moved");
        for i in 0..5 {
            assert_eq!(
                c.sum_of(&format!("{{mv}}:{i}")),
                i,
                "{{mv}}:{i} while half moved"
            );
        }
        c.finish(&m);
        assert_eq!(c.node_for_key("{mv}"), to);
        // And back, with move_slots, paced.
        c.move_slots(
            &[slot],
            to,
            from,
            Pace {
                batch: 1,
                pause: Duration::from_millis(10),
            },
        );
        assert_eq!(c.node_for_key("{mv}"), from);
        for i in 0..5 {
            assert_eq!(c.sum_of(&format!("{{mv}}:{i}")), i);
        }
        assert_eq!(c.assert_no_key_on_two_nodes(), 5);

        // A manual failover: the replica serves the slot, with the data.
        let replica = c.replicas_of(from)[0];
        c.failover(replica);
        assert_eq!(c.node_for_key("{mv}"), replica);
        assert!(
            c.replicas_of(replica).contains(&from),
            "the old primary follows"
        );
        assert_eq!(c.sum_of("{mv}:4"), 4);

        // kill -9 of a primary: its replica is promoted, the data is there, and the old
        // primary rejoins as a replica when restarted.
        node_cmd(replica, &["WAIT", "1", "2000"]).unwrap();
        let new = c.kill9(replica);
        assert_eq!(new, from);
        assert_eq!(c.node_for_key("{mv}"), from);
        assert_eq!(c.sum_of("{mv}:3"), 3);
        c.restart(replica);
        assert_eq!(c.replicas_of(from), vec![replica]);
        assert_eq!(c.assert_no_key_on_two_nodes(), 5);
    });
}
