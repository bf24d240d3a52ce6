//! Redis Cluster's placement: 16,384 hash slots, a key's slot by CRC16 of its hashed part
//! (`{hash tag}` rule, [`super::ring::hash_slice`]), and the slot map that says which node
//! serves each slot.
//!
//! Also the slot tags: for every slot, a short string that hashes to it, so that the proxy
//! can name a key of its own in any slot (`tally:applied:{<tag>}`, the exactly-once
//! watermark that must live, migrate and replicate with the counters it protects).
//!
//! Pure and synchronous. Owns the hashing and the map; does not own how the map is learned
//! (`backend::cluster`, `cluster`).

use std::sync::OnceLock;

/// Slots in a Redis Cluster.
pub const SLOTS: usize = 16384;

/// CRC16-CCITT (XMODEM: polynomial 0x1021, initial 0), as Redis's `crc16.c`.
pub fn crc16(data: &[u8]) -> u16 {
    static TABLE: OnceLock<[u16; 256]> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u16; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = (i as u16) << 8;
            for _ in 0..8 {
                c = if c & 0x8000 != 0 {
                    (c << 1) ^ 0x1021
                } else {
                    c << 1
                };
            }
            *e = c;
        }
        t
    });
    data.iter().fold(0u16, |crc, &b| {
        (crc << 8) ^ table[((crc >> 8) as u8 ^ b) as usize]
    })
}

/// The slot of `key`, as `CLUSTER KEYSLOT` answers.
pub fn key_slot(key: &[u8]) -> u16 {
    crc16(super::ring::hash_slice(key)) & (SLOTS as u16 - 1)
}

/// A short string whose slot is `slot`: `{tag}` in a key name puts that key in `slot`.
pub fn slot_tag(slot: u16) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let mut tags: Vec<Option<String>> = vec![None; SLOTS];
        let mut left = SLOTS;
        // Decimal numbers cover every slot long before 10^6 (about 170,000 tries).
        for n in 0u32..10_000_000 {
            let s = n.to_string();
            let e = &mut tags[(crc16(s.as_bytes()) as usize) & (SLOTS - 1)];
            if e.is_none() {
                *e = Some(s);
                left -= 1;
                if left == 0 {
                    break;
                }
            }
        }
        tags.into_iter()
            .map(|t| t.expect("every slot has a decimal tag"))
            .collect()
    });
    &tags[slot as usize]
}

/// Which node serves each slot: an index into the topology's server list, or none
/// (a slot no node serves: the cluster is down for it).
#[derive(Clone)]
pub struct SlotMap {
    owner: Box<[u16]>,
}

/// No node serves the slot.
const NONE: u16 = u16::MAX;

impl Default for SlotMap {
    fn default() -> Self {
        SlotMap {
            owner: vec![NONE; SLOTS].into_boxed_slice(),
        }
    }
}

impl SlotMap {
    /// Slots `start..=end` are served by node `node`.
    pub fn assign(&mut self, start: u16, end: u16, node: usize) {
        for s in start..=end.min(SLOTS as u16 - 1) {
            self.owner[s as usize] = node as u16;
        }
    }

    pub fn node_of(&self, slot: u16) -> Option<usize> {
        match self.owner[slot as usize] {
            NONE => None,
            n => Some(n as usize),
        }
    }

    /// The slot ranges of `node`, as (first, last) pairs in order.
    pub fn ranges_of(&self, node: usize) -> Vec<(u16, u16)> {
        let mut out: Vec<(u16, u16)> = Vec::new();
        for (s, &o) in self.owner.iter().enumerate() {
            if o as usize != node || o == NONE {
                continue;
            }
            let s = s as u16;
            match out.last_mut() {
                Some((_, last)) if *last + 1 == s => *last = s,
                _ => out.push((s, s)),
            }
        }
        out
    }

    /// Slots served by no node.
    pub fn unserved(&self) -> usize {
        self.owner.iter().filter(|&&o| o == NONE).count()
    }

    /// Fraction of the slots each of `nodes` nodes serves.
    pub fn shares(&self, nodes: usize) -> Vec<f64> {
        let mut n = vec![0usize; nodes];
        for &o in self.owner.iter() {
            if let Some(c) = n.get_mut(o as usize) {
                *c += 1;
            }
        }
        n.into_iter().map(|c| c as f64 / SLOTS as f64).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_redis_clusters() {
        // From the Redis Cluster specification and `CLUSTER KEYSLOT` on redis-server 7.0.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"));
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        assert_eq!(key_slot(b""), 0);
    }

    #[test]
    fn every_slot_has_a_tag_that_hashes_to_it() {
        for s in 0..SLOTS as u16 {
            let tag = slot_tag(s);
            assert_eq!(key_slot(format!("tally:applied:{{{tag}}}").as_bytes()), s);
        }
    }

    #[test]
    fn ranges_are_contiguous_runs() {
        let mut m = SlotMap::default();
        m.assign(0, 5460, 0);
        m.assign(5461, 10922, 1);
        m.assign(10923, 16383, 2);
        m.assign(100, 100, 1);
        assert_eq!(m.ranges_of(0), vec![(0, 99), (101, 5460)]);
        assert_eq!(m.ranges_of(1), vec![(100, 100), (5461, 10922)]);
        assert_eq!(m.node_of(16383), Some(2));
        assert_eq!(m.unserved(), 0);
    }
}
