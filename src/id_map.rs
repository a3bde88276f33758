//! Hash maps keyed by counters the library hands out itself (operation ids, window
//! registration numbers): the key is its own hash, so a lookup costs no hashing.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// The identity hash of a `u64` key.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | b as u64;
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// A map from library-issued `u64` ids.
pub(crate) type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;
