//! The engine's map keys: short keys stored inline in the map slot, longer ones on the heap.
//!
//! Most counter keys are short (`visits:page-000123`, `counter:000000012345`). Kept inline,
//! such a key costs no allocation of its own (32 bytes with glibc's allocator, for a key of up
//! to 24 bytes), and a lookup compares it in the slot it already loaded instead of following a
//! pointer to another cache line: less memory per key and fewer cache misses per INCR.
//! A key hashes and compares exactly as the `[u8]` it holds, so maps are queried with `&[u8]`.

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};

/// Longest key stored inline: the enum stays 24 bytes (tag, length, 22 bytes).
pub const INLINE: usize = 22;

#[derive(Clone)]
pub enum Key {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Box<[u8]>),
}

impl Key {
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Key::Inline { len, bytes } => &bytes[..*len as usize],
            Key::Heap(b) => b,
        }
    }
}

impl From<&[u8]> for Key {
    fn from(k: &[u8]) -> Key {
        if k.len() <= INLINE {
            let mut bytes = [0u8; INLINE];
            bytes[..k.len()].copy_from_slice(k);
            Key::Inline {
                len: k.len() as u8,
                bytes,
            }
        } else {
            Key::Heap(k.into())
        }
    }
}

impl From<Vec<u8>> for Key {
    fn from(k: Vec<u8>) -> Key {
        if k.len() <= INLINE {
            Key::from(&k[..])
        } else {
            Key::Heap(k.into_boxed_slice())
        }
    }
}

impl std::ops::Deref for Key {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Exactly as `[u8]` hashes, so that `&[u8]` lookups find it (`Borrow`'s contract).
        self.as_bytes().hash(state)
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Key {}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn keys_are_24_bytes_and_behave_as_their_bytes() {
        assert_eq!(std::mem::size_of::<Key>(), 24);
        let mut m: HashMap<Key, u32, ahash::RandomState> = HashMap::default();
        let short = b"visits:page-000123".as_slice();
        let edge = [b'x'; INLINE];
        let long = b"a key longer than twenty-two bytes".as_slice();
        for (i, k) in [short, &edge[..], &edge[..INLINE - 1], long, b"".as_slice()]
            .into_iter()
            .enumerate()
        {
            m.insert(Key::from(k), i as u32);
            assert_eq!(m.get(k), Some(&(i as u32)));
            assert_eq!(&*Key::from(k.to_vec()), k);
        }
        assert!(matches!(Key::from(&edge[..]), Key::Inline { .. }));
        assert!(matches!(
            Key::from([b'x'; INLINE + 1].to_vec()),
            Key::Heap(_)
        ));
        assert_eq!(m.len(), 5);
        assert_eq!(m.get(&b"visits:page-00012"[..]), None);
    }
}
