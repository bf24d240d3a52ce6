//! Reading the cluster's keys straight from the nodes: a key from the node that serves it
//! (following `MOVED` and `ASK`), every key per primary, and the check that no key lives on
//! two nodes or on a node that does not serve its slot.

use super::{node_conn, query, slot_of, text, Cluster};
use std::collections::HashMap;

impl Cluster {
    /// The value of `key` read straight from the node that serves it, following `MOVED`
    /// and `ASK` (at most 5 redirections).
    pub fn value_of(&self, key: &str) -> Option<String> {
        let mut port = self.node_for_key(key);
        let mut asking = false;
        for _ in 0..5 {
            let mut c = node_conn(port).expect("the owner answers");
            if asking {
                query(&mut c, &["ASKING"]).expect("ASKING");
            }
            match query(&mut c, &["GET", key]) {
                Ok(redis::Value::Nil) => return None,
                Ok(v) => return Some(text(&v)),
                Err(e) => match e.redirect_node() {
                    Some((addr, _)) => {
                        asking = e.kind() == redis::ErrorKind::Ask;
                        port = addr.rsplit(':').next().unwrap().parse().unwrap();
                    }
                    None => panic!("GET {key} on {port}: {e}"),
                },
            }
        }
        panic!("GET {key}: too many redirections");
    }

    /// The integer at `key` on the node that owns it (0 when missing).
    pub fn sum_of(&self, key: &str) -> i64 {
        self.value_of(key)
            .map(|v| v.parse().unwrap_or_else(|_| panic!("{key} = {v:?}")))
            .unwrap_or(0)
    }

    /// Every key on every live primary (`SCAN`), by port.
    pub fn keys_by_node(&self) -> HashMap<u16, Vec<String>> {
        let mut out = HashMap::new();
        for p in self.primaries() {
            let mut c = node_conn(p).expect("a primary answers");
            let mut keys = Vec::new();
            let mut cursor = "0".to_string();
            for _ in 0..100_000 {
                let v = query(&mut c, &["SCAN", &cursor, "COUNT", "1000"]).expect("SCAN");
                let redis::Value::Array(parts) = v else {
                    panic!("SCAN: {v:?}")
                };
                cursor = text(&parts[0]);
                if let redis::Value::Array(k) = &parts[1] {
                    keys.extend(k.iter().map(text));
                }
                if cursor == "0" {
                    break;
                }
            }
            let dbsize: i64 = redis::cmd("DBSIZE").query(&mut c).expect("DBSIZE");
            assert_eq!(keys.len() as i64, dbsize, "SCAN saw every key of {p}");
            out.insert(p, keys);
        }
        out
    }

    /// Asserts that no key lives on two primaries and that each key is on the primary that
    /// serves its slot; returns how many keys there are in all.
    pub fn assert_no_key_on_two_nodes(&self) -> usize {
        let view = self.view();
        let by_node = self.keys_by_node();
        let mut seen: HashMap<&str, u16> = HashMap::new();
        for (&port, keys) in &by_node {
            let ranges = &view.iter().find(|n| n.port == port).expect("a node").slots;
            for k in keys {
                if let Some(other) = seen.insert(k, port) {
                    panic!("{k} lives on {other} and {port}");
                }
                let s = slot_of(k.as_bytes());
                assert!(
                    ranges.iter().any(|&(a, b)| (a..=b).contains(&s)),
                    "{k} (slot {s}) is on {port}, which does not serve it"
                );
            }
        }
        seen.len()
    }
}
