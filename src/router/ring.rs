//! The ketama ring: pure, synchronous, deterministic.
//!
//! Each shard places `vnodes × weight` points on a 32-bit circle; a key belongs to the first
//! point at or after its position, wrapping around. Positions are crc32 finished by a
//! mixer (see [`mix`] for why plain crc32 is not enough). The same shard list gives the same placement
//! on every proxy. Keys with a non-empty `{hash tag}` hash only the tag, as Redis Cluster does,
//! so `{visits:home}:m:1` lives with `visits:home`'s other buckets.
//!
//! Owns placement only: no sockets, no health. A down shard keeps its points (counts are never
//! split across shards by remapping).

/// A shard as the ring sees it: its name (hashed into points) and weight. `locate` answers
/// with the node's index in the list given to [`Ring::new`].
#[derive(Debug, Clone)]
pub struct Node {
    /// The name hashed into points; stable across restarts and proxies.
    pub name: String,
    pub weight: u32,
}

#[derive(Debug, Clone)]
pub struct Ring {
    /// Sorted by hash; the `u32` value is an index into `nodes`.
    points: Vec<(u32, u32)>,
    nodes: Vec<Node>,
    /// Per range of positions sharing their top [`TABLE_BITS`] bits: the node that owns the
    /// whole range, or [`MIXED`] when a point in it divides it between nodes. Most lookups
    /// end here; a flush locates every dirty key once per lane, and the binary search over
    /// the points was a twentieth of its CPU.
    table: Box<[u8]>,
}

/// Bits of a position that index [`Ring`]'s table: 16,384 ranges, 16 KiB. With 160 points
/// per shard about one range in 100 per shard is divided (152 of them for two shards).
const TABLE_BITS: u32 = 14;
/// A table entry whose range the points divide (or a ring of 255 nodes or more).
const MIXED: u8 = u8::MAX;

impl Ring {
    /// Builds a ring. Points are derived from each node's name, so order in `nodes` does not
    /// change placement. Ties on a point go to the lower name, for determinism.
    pub fn new(nodes: Vec<Node>, vnodes: u32) -> Ring {
        let mut points =
            Vec::with_capacity(nodes.iter().map(|n| (vnodes * n.weight) as usize).sum());
        for (i, node) in nodes.iter().enumerate() {
            for v in 0..vnodes * node.weight {
                let h = mix(crc32fast::hash(format!("{}-{}", node.name, v).as_bytes()));
                points.push((h, i as u32));
            }
        }
        points.sort_unstable_by(|a, b| {
            a.0.cmp(&b.0)
                .then_with(|| nodes[a.1 as usize].name.cmp(&nodes[b.1 as usize].name))
        });
        points.dedup_by_key(|p| p.0);
        let mut ring = Ring {
            points,
            nodes,
            table: Box::default(),
        };
        ring.table = ring.build_table();
        ring
    }

    /// See [`Ring::table`].
    fn build_table(&self) -> Box<[u8]> {
        if self.points.is_empty() || self.nodes.len() >= MIXED as usize {
            return Box::default();
        }
        let span = 1u32 << (32 - TABLE_BITS);
        (0..1u32 << TABLE_BITS)
            .map(|r| {
                let (lo, hi) = (r * span, r * span + (span - 1));
                let node = self.search(hi);
                // Every position of lo..=hi belongs to the first point at or after it: the
                // range is whole when each point inside it is the node that owns `hi`.
                let first = self.points.partition_point(|p| p.0 < lo);
                let whole = self.points[first..]
                    .iter()
                    .take_while(|p| p.0 < hi)
                    .all(|p| p.1 as usize == node);
                if whole {
                    node as u8
                } else {
                    MIXED
                }
            })
            .collect()
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// Index (into `nodes`) of the shard that owns `key`. Panics on an empty ring; callers
    /// check `is_empty` (memory mode) first.
    pub fn locate(&self, key: &[u8]) -> usize {
        self.locate_hash(key_hash(key))
    }

    fn locate_hash(&self, h: u32) -> usize {
        match self.table.get((h >> (32 - TABLE_BITS)) as usize) {
            Some(&n) if n != MIXED => n as usize,
            _ => self.search(h),
        }
    }

    /// [`Ring::locate_hash`] by binary search over the points.
    fn search(&self, h: u32) -> usize {
        let i = self.points.partition_point(|p| p.0 < h);
        let i = if i == self.points.len() { 0 } else { i };
        self.points[i].1 as usize
    }

    /// Fraction of the hash space each node owns, in `nodes` order.
    pub fn shares(&self) -> Vec<f64> {
        let mut owned = vec![0u64; self.nodes.len()];
        if self.points.is_empty() {
            return vec![0.0; self.nodes.len()];
        }
        let mut prev = self.points.last().unwrap().0;
        for &(h, node) in &self.points {
            owned[node as usize] += h.wrapping_sub(prev) as u64;
            prev = h;
        }
        // A single point owns the whole circle.
        if self.points.len() == 1 {
            owned[self.points[0].1 as usize] = 1 << 32;
        }
        owned
            .iter()
            .map(|&o| o as f64 / (1u64 << 32) as f64)
            .collect()
    }
}

/// The part of a key that is hashed, by Redis Cluster's rule: between the first `{` and the
/// next `}` when that is not empty; otherwise the whole key.
pub fn hash_slice(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        if let Some(len) = key[open + 1..].iter().position(|&b| b == b'}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// The ring position of a key: crc32 of its hashed part, finished by [`mix`].
pub fn key_hash(key: &[u8]) -> u32 {
    mix(crc32fast::hash(hash_slice(key)))
}

/// murmur3's 32-bit finaliser. crc32 is linear: names that differ in a digit
/// (`redis_7070-1`, `redis_7071-1`) and sequential keys get positions with structure, and
/// measured over 300 random pairs of `redis_<port>` names, 108 put more than 55 % of
/// 100,000 keys on one shard (worst 77 %). This bijection removes the structure: 32 of
/// 300 outside 45-55 % (worst 58 %), about what 160 truly random points per shard give.
pub fn mix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(names: &[&str]) -> Ring {
        let nodes = names
            .iter()
            .map(|n| Node {
                name: n.to_string(),
                weight: 1,
            })
            .collect();
        Ring::new(nodes, 160)
    }

    fn keys() -> impl Iterator<Item = Vec<u8>> {
        (0..100_000).map(|i| format!("visits:page:{i}").into_bytes())
    }

    #[test]
    fn two_shards_each_hold_45_to_55_percent() {
        let r = ring(&["redis_7070", "redis_7071"]);
        let mut count = [0usize; 2];
        for k in keys() {
            count[r.locate(&k)] += 1;
        }
        for c in count {
            let share = c as f64 / 100_000.0;
            assert!((0.45..=0.55).contains(&share), "share {share}");
        }
    }

    #[test]
    fn a_third_shard_takes_25_to_40_percent_and_only_to_itself() {
        let two = ring(&["redis_7070", "redis_7071"]);
        let three = ring(&["redis_7070", "redis_7071", "redis_7072"]);
        let mut moved = 0;
        for k in keys() {
            let (a, b) = (two.locate(&k), three.locate(&k));
            if a != b {
                assert_eq!(b, 2, "a key moved between old shards");
                moved += 1;
            }
        }
        let share = moved as f64 / 100_000.0;
        assert!((0.25..=0.40).contains(&share), "moved {share}");
    }

    #[test]
    fn placement_is_deterministic_and_independent_of_order() {
        let a = ring(&["x", "y", "z"]);
        let b = ring(&["z", "x", "y"]);
        for k in keys().take(10_000) {
            assert_eq!(a.nodes()[a.locate(&k)].name, b.nodes()[b.locate(&k)].name);
        }
    }

    #[test]
    fn hash_tags_hash_only_the_tag() {
        assert_eq!(hash_slice(b"{user1000}.following"), b"user1000");
        assert_eq!(hash_slice(b"foo{}{bar}"), b"foo{}{bar}");
        assert_eq!(hash_slice(b"foo{{bar}}zap"), b"{bar");
        assert_eq!(hash_slice(b"foo{bar}{zap}"), b"bar");
        assert_eq!(hash_slice(b"nobraces"), b"nobraces");
        let r = ring(&["a", "b", "c", "d"]);
        for i in 0..1000 {
            let k = format!("{{visits:home}}:m:{i}");
            assert_eq!(r.locate(k.as_bytes()), r.locate(b"visits:home"));
        }
    }

    /// "a" with weight 1 and "b" with weight 3.
    fn a1_b3() -> Ring {
        let node = |name: &str, weight| Node {
            name: name.into(),
            weight,
        };
        Ring::new(vec![node("a", 1), node("b", 3)], 160)
    }

    #[test]
    fn shares_sum_to_one_and_follow_weights() {
        let r = a1_b3();
        let s = r.shares();
        assert!((s.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert!(s[1] > 0.65 && s[1] < 0.85, "{s:?}");
    }

    /// The table answers as the binary search does, at range edges and between them.
    #[test]
    fn the_table_agrees_with_the_search() {
        let mut rings = vec![ring(&["a"]), ring(&["redis_7070", "redis_7071"]), a1_b3()];
        rings.push(ring(&["n0", "n1", "n2", "n3", "n4", "n5", "n6"]));
        for r in &rings {
            assert_eq!(r.table.len(), 1 << TABLE_BITS);
            let mixed = r.table.iter().filter(|&&n| n == MIXED).count();
            assert!(mixed < r.points.len() + 1, "{mixed} mixed ranges");
            let span = 1u32 << (32 - TABLE_BITS);
            let mut h = 0x9e37_79b9u32;
            for range in 0..1u32 << TABLE_BITS {
                h = mix(h.wrapping_add(range));
                for pos in [
                    range * span,
                    range * span + (span - 1),
                    range * span + h % span,
                ] {
                    assert_eq!(r.locate_hash(pos), r.search(pos), "position {pos}");
                }
            }
            for p in &r.points {
                for pos in [p.0.wrapping_sub(1), p.0, p.0.wrapping_add(1)] {
                    assert_eq!(r.locate_hash(pos), r.search(pos), "position {pos}");
                }
            }
        }
        // 255 nodes or more: no table, every lookup searches.
        let names: Vec<String> = (0..300).map(|i| format!("n{i}")).collect();
        let many = ring(&names.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(many.table.is_empty());
        for k in keys().take(1000) {
            assert_eq!(many.locate(&k), many.search(key_hash(&k)));
        }
    }

    /// Placement is persisted (the log records the shard list) and shared between proxies,
    /// so it must never change silently between versions: these owners are pinned, as
    /// pingora-ketama pins nginx's. A change that moves any of them is a format change.
    #[test]
    fn golden_placement() {
        let owners = |names: &[&str], keys: &[&str]| -> Vec<String> {
            let r = ring(names);
            keys.iter()
                .map(|k| r.nodes()[r.locate(k.as_bytes())].name.clone())
                .collect()
        };
        let keys = [
            "visits:home",
            "visits:about",
            "visits:0",
            "visits:1",
            "visits:2",
            "visits:3",
            "{user1000}.following",
            "{user1000}.followers",
            "tally:w:{visits:home}:m:0:visits:home",
            "",
            "k",
        ];
        let two = owners(&["redis_7070", "redis_7071"], &keys);
        let three = owners(&["redis_7070", "redis_7071", "redis_7072"], &keys);
        let (a, b, c) = ("redis_7070", "redis_7071", "redis_7072");
        assert_eq!(two, [b, a, b, a, b, b, b, b, b, a, b]);
        // The third shard takes keys only to itself.
        assert_eq!(three, [b, a, b, c, b, b, b, b, b, a, b]);
        // One figure over many keys: the owners of 10,000 keys, folded.
        let digest = |names: &[&str]| {
            let r = ring(names);
            let mut h = crc32fast::Hasher::new();
            for i in 0..10_000 {
                h.update(&(r.locate(format!("visits:page:{i}").as_bytes()) as u32).to_le_bytes());
            }
            h.finalize()
        };
        assert_eq!(digest(&["redis_7070", "redis_7071"]), 0xd94f_38e1);
        assert_eq!(digest(&["a", "b", "c", "d"]), 0xb9c0_9c35);
        let w = a1_b3();
        let weighted: Vec<usize> = keys.iter().map(|k| w.locate(k.as_bytes())).collect();
        assert_eq!(weighted, [1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1]);
    }
}
