//! The key space's hash table: keys to items, searchable by a key's hash alone.
//!
//! A thin wrapper over `hashbrown::HashTable` with the subset of `HashMap`'s interface the
//! store uses, plus one thing `HashMap` cannot do: find an entry from its hash
//! ([`KeyMap::find_by_hash`]). That lets the expiry index hold `(deadline, key hash)`
//! pairs, 16 bytes each, instead of a second copy of every expiring key: with a million
//! expiring keys that is the difference between using more memory than Redis and less.
//! Hashes are SipHash with a per-process random key (as `HashMap`'s), so a client cannot
//! choose keys that collide; the index lives only in memory, so the random key never
//! needs to survive a restart.

use crate::store::Item;
use hashbrown::HashTable;
use hashbrown::hash_table::Entry;
use std::hash::{BuildHasher, RandomState};

/// Keys to items.
pub struct KeyMap {
    table: HashTable<(Box<[u8]>, Item)>,
    hasher: RandomState,
}

impl Default for KeyMap {
    fn default() -> Self {
        // One random key per process: every map hashes alike, so two maps with the same
        // keys have the same expiry index (tests compare them).
        static HASHER: std::sync::OnceLock<RandomState> = std::sync::OnceLock::new();
        KeyMap {
            table: HashTable::new(),
            hasher: HASHER.get_or_init(RandomState::new).clone(),
        }
    }
}

impl std::fmt::Debug for KeyMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyMap")
            .field("len", &self.table.len())
            .finish()
    }
}

/// Where [`KeyMap::slot`] found a key, or where it would go.
pub enum Slot<'a> {
    Occupied(hashbrown::hash_table::OccupiedEntry<'a, (Box<[u8]>, Item)>),
    Vacant(hashbrown::hash_table::VacantEntry<'a, (Box<[u8]>, Item)>),
}

impl KeyMap {
    /// The hash `key` is stored under (what the expiry index records).
    pub fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    pub fn reserve(&mut self, n: usize) {
        let hasher = &self.hasher;
        self.table.reserve(n, |(k, _)| hasher.hash_one(&**k));
    }

    pub fn get(&self, key: &[u8]) -> Option<&Item> {
        let h = self.hash(key);
        self.table.find(h, |(k, _)| **k == *key).map(|(_, i)| i)
    }

    pub fn get_mut(&mut self, key: &[u8]) -> Option<&mut Item> {
        let h = self.hash(key);
        self.table.find_mut(h, |(k, _)| **k == *key).map(|(_, i)| i)
    }

    pub fn contains_key(&self, key: &[u8]) -> bool {
        self.get(key).is_some()
    }

    /// Inserts or replaces; returns the item replaced.
    pub fn insert(&mut self, key: Box<[u8]>, item: Item) -> Option<Item> {
        match self.slot(&key) {
            Slot::Occupied(mut o) => Some(std::mem::replace(&mut o.get_mut().1, item)),
            Slot::Vacant(v) => {
                v.insert((key, item));
                None
            }
        }
    }

    pub fn remove(&mut self, key: &[u8]) -> Option<Item> {
        match self.slot(key) {
            Slot::Occupied(o) => Some(o.remove().0.1),
            Slot::Vacant(_) => None,
        }
    }

    /// The entry for `key`, with one hash and one probe: the SET hot path decides what to
    /// do from it. A vacant slot stores whatever key it is given.
    pub fn slot(&mut self, key: &[u8]) -> Slot<'_> {
        let h = self.hasher.hash_one(key);
        let hasher = &self.hasher;
        match self
            .table
            .entry(h, |(k, _)| **k == *key, |(k, _)| hasher.hash_one(&**k))
        {
            Entry::Occupied(o) => Slot::Occupied(o),
            Entry::Vacant(v) => Slot::Vacant(v),
        }
    }

    /// The entry whose key hashes to `hash` and for which `pred` holds.
    ///
    /// The table only compares a few bits of the hash before calling its predicate, so
    /// an entry with another hash can be offered too: the full hash is checked here, or
    /// two keys with the same deadline could be mistaken for each other.
    pub fn find_by_hash(
        &self,
        hash: u64,
        mut pred: impl FnMut(&[u8], &Item) -> bool,
    ) -> Option<(&[u8], &Item)> {
        self.table
            .find(hash, |(k, i)| {
                self.hasher.hash_one(&**k) == hash && pred(k, i)
            })
            .map(|(k, i)| (&**k, i))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Box<[u8]>, &Item)> {
        self.table.iter().map(|(k, i)| (k, i))
    }
}

impl<'a> IntoIterator for &'a KeyMap {
    type Item = (&'a Box<[u8]>, &'a Item);
    type IntoIter = std::iter::Map<
        hashbrown::hash_table::Iter<'a, (Box<[u8]>, Item)>,
        fn(&'a (Box<[u8]>, Item)) -> (&'a Box<[u8]>, &'a Item),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.table.iter().map(|(k, i)| (k, i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(v: &str, at: u64) -> Item {
        Item {
            value: v.as_bytes().into(),
            expire_at: at,
        }
    }

    /// Many keys with one deadline: each hash finds its own key, never a neighbour whose
    /// hash shares the few tag bits the table compares.
    #[test]
    fn find_by_hash_never_returns_a_neighbour() {
        let mut m = KeyMap::default();
        let n = 50_000;
        for i in 0..n {
            m.insert(format!("k{i}").into_bytes().into(), item("v", 42));
        }
        for i in 0..n {
            let key = format!("k{i}").into_bytes();
            let (found, _) = m
                .find_by_hash(m.hash(&key), |_, it| it.expire_at == 42)
                .expect("every key is found");
            assert_eq!(found, &key[..], "key {i}");
        }
    }

    #[test]
    fn behaves_like_a_map_and_finds_by_hash() {
        let mut m = KeyMap::default();
        assert!(m.insert(b"a"[..].into(), item("1", 0)).is_none());
        assert_eq!(m.insert(b"a"[..].into(), item("2", 7)), Some(item("1", 0)));
        m.insert(b"b"[..].into(), item("3", 0));
        assert_eq!(m.len(), 2);
        assert_eq!(m.get(b"a"), Some(&item("2", 7)));
        let h = m.hash(b"a");
        let (k, i) = m.find_by_hash(h, |_, i| i.expire_at == 7).unwrap();
        assert_eq!((k, i.expire_at), (&b"a"[..], 7));
        assert!(m.find_by_hash(h, |_, i| i.expire_at == 8).is_none());
        m.get_mut(b"b").unwrap().expire_at = 9;
        assert_eq!(m.remove(b"b"), Some(item("3", 9)));
        assert!(m.remove(b"b").is_none());
        let keys: Vec<&Box<[u8]>> = m.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, vec![&Box::<[u8]>::from(&b"a"[..])]);
    }
}
