//! An order-independent 64-bit digest of a set of (key, version) pairs.
//!
//! The sum (mod 2⁶⁴) of a strong 64-bit hash of each pair: adding and removing a pair are O(1),
//! so both sides can keep it current as they go, and equal sets give equal digests whatever the
//! order they were built in. Comparing digests (plus counts) tells the cloud, in one round trip
//! of 16 bytes, whether its record of a node is still true.

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::key::ObjectKey;
use crate::version::ResourceVersion;

/// The digest of a set of (key, version) pairs, with the set's size; see the module docs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetDigest {
    sum: u64,
    count: u64,
}

fn pair_hash(key: &ObjectKey, rv: ResourceVersion) -> u64 {
    // The version seeds the hash of the key bytes: distinct pairs give independent hashes.
    xxh3_64_with_seed(key.as_bytes(), rv.get())
}

impl SetDigest {
    /// The digest of the empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The digest of `pairs` (assumed distinct).
    pub fn of<'a>(pairs: impl IntoIterator<Item = (&'a ObjectKey, ResourceVersion)>) -> Self {
        let mut digest = Self::new();
        for (key, rv) in pairs {
            digest.insert(key, rv);
        }
        digest
    }

    /// Adds a pair (not already in the set).
    pub fn insert(&mut self, key: &ObjectKey, rv: ResourceVersion) {
        self.sum = self.sum.wrapping_add(pair_hash(key, rv));
        self.count += 1;
    }

    /// Removes a pair (that is in the set).
    pub fn remove(&mut self, key: &ObjectKey, rv: ResourceVersion) {
        self.sum = self.sum.wrapping_sub(pair_hash(key, rv));
        self.count = self.count.saturating_sub(1);
    }

    /// Replaces `(key, old)` with `(key, new)`.
    pub fn replace(&mut self, key: &ObjectKey, old: ResourceVersion, new: ResourceVersion) {
        self.remove(key, old);
        self.insert(key, new);
    }

    /// The 64-bit digest: the wrapping sum of the pairs' XXH3-64 hashes (key bytes, seeded
    /// with the version).
    pub fn value(&self) -> u64 {
        self.sum
    }

    /// How many pairs the set has.
    pub fn count(&self) -> u64 {
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn order_and_history_do_not_matter(
            pairs in proptest::collection::btree_map("[a-z]{1,6}", 0u64..1000, 0..40),
            extra in proptest::collection::vec(("[a-z]{1,6}", 0u64..1000), 0..10),
        ) {
            let keys: Vec<(ObjectKey, u64)> = pairs
                .iter()
                .map(|(name, rv)| (ObjectKey::new("pods", "ns", name).unwrap(), *rv))
                .collect();
            let forward = SetDigest::of(keys.iter().map(|(k, v)| (k, ResourceVersion(*v))));
            let mut backward = SetDigest::new();
            // Insert noise, then the set in reverse, then remove the noise.
            let noise: Vec<(ObjectKey, u64)> = extra
                .iter()
                .map(|(name, rv)| (ObjectKey::new("cm", "ns", name).unwrap(), *rv))
                .collect();
            for (k, v) in &noise { backward.insert(k, ResourceVersion(*v)); }
            for (k, v) in keys.iter().rev() { backward.insert(k, ResourceVersion(*v)); }
            for (k, v) in &noise { backward.remove(k, ResourceVersion(*v)); }
            prop_assert_eq!(forward, backward);
        }
    }

    #[test]
    fn a_different_version_changes_the_digest() {
        let key = ObjectKey::parse("pods/a/b").unwrap();
        let mut one = SetDigest::new();
        one.insert(&key, ResourceVersion(1));
        let mut two = SetDigest::new();
        two.insert(&key, ResourceVersion(2));
        assert_ne!(one, two);
        two.replace(&key, ResourceVersion(2), ResourceVersion(1));
        assert_eq!(one, two);
    }
}
