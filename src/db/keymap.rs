//! The key space's hash table: keys to items, with the bucket-level access that SCAN,
//! RANDOMKEY and the expiry index need.
//!
//! # What it owns, how data enters and leaves
//!
//! A [`KeyMap`] owns every key and item of one database. Items enter by [`KeyMap::insert`]
//! or through a vacant [`Slot`] (the SET hot path: one hash, one walk of one chain) and
//! leave by [`KeyMap::remove`] or an occupied [`Slot`]. Readers borrow: [`KeyMap::get`],
//! [`KeyMap::iter`], [`KeyMap::scan`] (one bucket per call, for SCAN's cursor),
//! [`KeyMap::random`] (RANDOMKEY) and [`KeyMap::find_by_hash`] (the expiry index holds
//! `(deadline, key hash)` pairs, 16 bytes each, instead of a second copy of every
//! expiring key). [`KeyMap::touch`] only loads: a pipeline's keys' buckets and nodes,
//! all at once before its requests run, so that their cache misses overlap.
//!
//! # Layout
//!
//! Redis's dict, in safe Rust: a power-of-two array of buckets, each the head of a chain
//! of boxed nodes; a key lives in bucket `hash & mask`. Each node stores its key's hash,
//! so moving it to another table never rehashes the key, and a chain walk compares keys
//! only when the hashes agree. Hashes are SipHash with a per-process random key (std's
//! `RandomState`), so a client cannot choose keys that collide; nothing on disk depends
//! on them.
//!
//! A node is 64 bytes, one cache line and one of mimalloc's size classes: next, hash,
//! the item (value pointer and length, deadline) and the key, which up to 22 bytes lives
//! in the node itself ([`Key`]; longer keys are boxed). So a lookup of a short key finds
//! the hash and the key's bytes in the line it loaded for the node, and a short key takes
//! no allocation of its own. Plus 8 to 16 bytes of bucket array per key (the table grows
//! at one key per bucket and shrinks below one in eight): with a million 16-byte keys
//! about 72 bytes a key, its bytes included, besides the value (80 when the key had its
//! own 16-byte block beside a 56-byte node), where `hashbrown`'s open table (which we
//! used before) took 41 bytes a slot at 48% load there, 86 a key, plus the key's block.
//! The price is one more dependent
//! load per lookup than `hashbrown`'s probe (bucket, then node); see `lookup_speed` below
//! and BENCHMARKS.md for what it costs.
//!
//! # Why our own table
//!
//! SCAN must cost O(COUNT) a call, return every key present for the whole scan at least
//! once, and keep its cursor below 2^53 (node-redis v4 turns a cursor into a JavaScript
//! number). Redis's answer is a cursor that walks the buckets in reverse-binary order
//! (`dictScan` in Redis's dict.c): increment the *reversed* bits of the bucket index.
//! When the table doubles, bucket `b` splits into `b` and `b | old_size`, which that order
//! visits one right after the other; when it halves, `b` and `b | new_size` merge into a
//! bucket the order has either fully visited or not at all. So a resize between two calls
//! never skips a key, and only a shrink can return a key twice. That needs the bucket
//! index of every key and the buckets themselves, which `hashbrown` (open addressing,
//! keys displaced from their home slot) does not offer; a chained table gives both.
//! RANDOMKEY likewise picks a random non-empty bucket, then a random node of its chain:
//! O(1) expected, as in Redis.
//!
//! # Incremental resizing
//!
//! Relinking every node at once stalls the whole key space (the caller holds the store
//! lock): 130 ms at two million keys on our shared machine, where `hashbrown`'s resize,
//! which the key space had before, took 0.5 to 0.9 s (it rehashes every key; see the
//! `resize_pause` measurement below). So, as Redis does, a resize allocates the new
//! table and moves the old one over a few buckets at a time: every [`KeyMap::slot`] (the
//! path of every insert and removal) first moves `REHASH_STEP` (2) non-empty buckets.
//! Meanwhile a key is in the old table if its bucket there is not yet moved, else in the
//! new one; new keys go to the new table; SCAN visits a bucket of the smaller table and
//! every bucket of the larger one it expands to (dictScan's two-table case). A doubling
//! started at `n` keys is done after about `n / REHASH_STEP` more writes, well before
//! the next one is due; should a resize be needed while one runs, the running one is
//! finished first. Reads take the lock shared and never move buckets; a table left
//! mid-resize by a pause in writes costs lookups one more bucket probe.
//!
//! # Tracking: a consistent view for a snapshot, without a copy
//!
//! Compaction must write the map exactly as it was at one log index (the log after it is
//! replayed on top, and INCR or APPEND are not idempotent), without stopping writers for
//! a copy of every key. [`KeyMap::start_tracking`] marks that moment; from then on the
//! map keeps, for each key that the snapshot has not walked yet, its *pre-image*: the
//! item it had at that moment (`None` if absent), recorded once, by the first mutation.
//! The hook is in the two places every mutation passes through ([`KeyMap::slot`], behind
//! `insert` and `remove`, and [`KeyMap::get_mut`]), so no caller can miss it; a `slot`
//! that ends up only reading records a pre-image equal to the current item, which is
//! harmless.
//!
//! The snapshot walks the map with SCAN's cursor, a few dozen buckets per call of
//! [`KeyMap::snapshot_step`] (the caller takes the store lock per call, so writers wait
//! for one step, not for the walk), and gets each key that has no pre-image with its
//! current item. In reverse-binary order the walked part is always a prefix: a key is
//! walked iff its hash, bit-reversed, is below the cursor bit-reversed, whatever the
//! table size (growth splits bucket `b` into buckets the order visits together). So a
//! mutation of a walked key needs no pre-image: it was emitted already if it existed, and
//! if it did not exist at the start it is not in the snapshot. When the walk ends,
//! [`KeyMap::end_tracking`] hands over the pre-images and the snapshot adds the `Some`
//! ones. Every key present at the start is then written exactly once: unchanged ones by
//! the walk, changed ones by their pre-image; keys created since never. That needs SCAN
//! to return no key twice, which only a shrink could break, so tracking suspends
//! shrinking (growth is fine). The memory this costs is the pre-images of the keys
//! written during the walk: nothing when writes are rare, the changed keys when not (a
//! fork's copy-on-write pays the same per touched page).

use super::Item;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};

/// The fewest buckets a non-empty table has.
const MIN_BUCKETS: usize = 4;

/// Non-empty buckets moved per write while a resize runs (and ten times as many empty
/// ones at most, as Redis's `dictRehash`).
const REHASH_STEP: usize = 2;

/// Random buckets [`KeyMap::random`] tries before it walks to the next non-empty one
/// (only a table much emptier than its shrink threshold, after `reserve`, gets there).
const RANDOM_TRIES: usize = 32;

/// Keys up to this many bytes live in their node (see [`Key`]).
const INLINE: usize = 22;

/// A key as a node stores it: up to [`INLINE`] bytes in place (the length, then the
/// bytes), longer ones boxed. 24 bytes either way, so that a node is 64 bytes, one cache
/// line and one allocator size class, and a lookup of a short key finds the hash and the
/// key's bytes in the same line (a boxed key costs a dependent load more, and an
/// allocation of its own). Build one with `From`, read it with [`Key::as_bytes`].
#[derive(Clone)]
pub struct Key(KeyRepr);

#[derive(Clone)]
enum KeyRepr {
    Inline(u8, [u8; INLINE]),
    Boxed(Box<[u8]>),
}

impl Key {
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            KeyRepr::Inline(n, b) => &b[..*n as usize],
            KeyRepr::Boxed(b) => b,
        }
    }

    /// The short ones in place, copied; `None` for a longer one.
    fn inline(key: &[u8]) -> Option<Key> {
        let mut b = [0; INLINE];
        b.get_mut(..key.len())?.copy_from_slice(key);
        Some(Key(KeyRepr::Inline(key.len() as u8, b)))
    }
}

impl From<&[u8]> for Key {
    fn from(key: &[u8]) -> Key {
        Key::inline(key).unwrap_or_else(|| Key(KeyRepr::Boxed(key.into())))
    }
}

/// A long key keeps its allocation (no copy); a short one is copied in place.
impl From<Box<[u8]>> for Key {
    fn from(key: Box<[u8]>) -> Key {
        Key::inline(&key).unwrap_or(Key(KeyRepr::Boxed(key)))
    }
}

impl From<Vec<u8>> for Key {
    fn from(key: Vec<u8>) -> Key {
        Key::inline(&key).unwrap_or_else(|| Key(KeyRepr::Boxed(key.into_boxed_slice())))
    }
}

impl From<Key> for Box<[u8]> {
    fn from(key: Key) -> Box<[u8]> {
        match key.0 {
            KeyRepr::Inline(..) => key.as_bytes().into(),
            KeyRepr::Boxed(b) => b,
        }
    }
}

impl std::ops::Deref for Key {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_bytes().fmt(f)
    }
}

/// `Clone` only so that `vec![None; n]` can build a table: for `Option<Box<_>>` that is
/// one zeroed allocation, whose pages the OS hands out lazily as buckets are first
/// written (a filled-in table of millions of buckets took tens of ms to allocate).
#[derive(Clone)]
struct Node {
    next: Link,
    /// The key's hash (moving needs no rehash; walks skip other keys cheaply).
    hash: u64,
    key: Key,
    item: Item,
}

// One cache line, one mimalloc size class (module doc, "Layout").
const _: () = assert!(std::mem::size_of::<Key>() == 24 && std::mem::size_of::<Node>() == 64);

impl Node {
    /// Whether this is `key`'s node (`hash` is `key`'s): the hash first, which rules out
    /// other keys of the chain without touching key bytes.
    fn is(&self, hash: u64, key: &[u8]) -> bool {
        self.hash == hash && self.key.as_bytes() == key
    }
}

type Link = Option<Box<Node>>;

/// Which of the two tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Table {
    /// The table (or, during a resize, the one being emptied).
    Old,
    /// During a resize, the table being filled.
    New,
}

/// Keys to items.
pub struct KeyMap {
    /// Empty, or a power of two of chains.
    old: Box<[Link]>,
    /// Non-empty exactly while a resize runs: the table the keys move to.
    new: Box<[Link]>,
    /// While a resize runs: buckets of `old` below this index are moved (empty).
    moved: usize,
    len: usize,
    hasher: RandomState,
    /// While a snapshot walks this map: its cursor and the pre-images (module doc).
    tracking: Option<Box<Tracking>>,
}

/// A snapshot's view of one map: where its walk is, and what changed ahead of it.
#[derive(Debug)]
struct Tracking {
    /// Who tracks (the store checks it to notice a table replaced under the snapshot).
    tag: u64,
    /// The walk's next SCAN cursor; 0 with `done` false is the start.
    cursor: u64,
    /// The walk has returned every bucket.
    done: bool,
    /// Each key first changed ahead of the walk, with its item at the start (`None`:
    /// it was absent).
    preimages: HashMap<Box<[u8]>, Option<Item>>,
}

impl Tracking {
    /// Whether the walk has passed the bucket of a key with this hash (module doc: the
    /// walked part is the keys whose reversed hash is below the reversed cursor).
    fn walked(&self, hash: u64) -> bool {
        self.done || hash.reverse_bits() < self.cursor.reverse_bits()
    }
}

impl Default for KeyMap {
    fn default() -> Self {
        // One random key per process: every map hashes alike, so two maps with the same
        // keys have the same expiry index (tests compare them).
        static HASHER: std::sync::OnceLock<RandomState> = std::sync::OnceLock::new();
        KeyMap {
            old: Box::new([]),
            new: Box::new([]),
            moved: 0,
            len: 0,
            hasher: HASHER.get_or_init(RandomState::new).clone(),
            tracking: None,
        }
    }
}

/// Frees chain by chain, iteratively: a node's own drop would recurse down its chain.
fn free(buckets: &mut [Link]) {
    for b in buckets.iter_mut() {
        let mut cur = b.take();
        while let Some(mut n) = cur {
            cur = n.next.take();
        }
    }
}

impl Drop for KeyMap {
    fn drop(&mut self) {
        free(&mut self.old);
        free(&mut self.new);
    }
}

impl std::fmt::Debug for KeyMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyMap")
            .field("len", &self.len)
            .field("buckets", &self.old.len())
            .field("resizing_to", &self.new.len())
            .field("tracking", &self.tracking.as_ref().map(|t| t.tag))
            .finish()
    }
}

/// `n` empty buckets.
fn table(n: usize) -> Box<[Link]> {
    vec![None; n].into_boxed_slice()
}

/// The chain starting at `head`.
fn chain(head: &Link) -> impl Iterator<Item = &Node> {
    std::iter::successors(head.as_deref(), |n| n.next.as_deref())
}

/// Where [`KeyMap::slot`] found a key, or where it would go.
pub enum Slot<'a> {
    Occupied(OccupiedEntry<'a>),
    Vacant(VacantEntry<'a>),
}

/// A key that is in the map: the `depth`th node of a bucket's chain.
pub struct OccupiedEntry<'a> {
    map: &'a mut KeyMap,
    pos: Pos,
}

/// A key that is not in the map, with its hash.
pub struct VacantEntry<'a> {
    map: &'a mut KeyMap,
    hash: u64,
}

/// A node's place: table, bucket, position in the chain.
#[derive(Clone, Copy, Debug)]
struct Pos {
    table: Table,
    bucket: usize,
    depth: usize,
}

impl OccupiedEntry<'_> {
    pub fn get(&self) -> (&[u8], &Item) {
        let n = self.map.node(self.pos);
        (n.key.as_bytes(), &n.item)
    }

    pub fn get_mut(&mut self) -> (&[u8], &mut Item) {
        let n = self.map.node_mut(self.pos);
        (n.key.as_bytes(), &mut n.item)
    }

    /// Takes the key and item out (the second element mirrors `hashbrown`'s entry API).
    pub fn remove(self) -> ((Key, Item), ()) {
        let p = self.pos;
        let mut link = &mut self.map.buckets_mut(p.table)[p.bucket];
        for _ in 0..p.depth {
            link = &mut link.as_mut().expect("an occupied entry's node exists").next;
        }
        let mut node = link.take().expect("an occupied entry's node exists");
        *link = node.next.take();
        self.map.len -= 1;
        self.map.maybe_shrink();
        ((node.key, node.item), ())
    }
}

impl VacantEntry<'_> {
    /// Stores the pair under the hash this entry was looked up with.
    pub fn insert(self, entry: (impl Into<Key>, Item)) {
        self.map.push(self.hash, entry.0.into(), entry.1);
    }
}

impl KeyMap {
    /// The hash `key` is stored under (what the expiry index records).
    pub fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn resizing(&self) -> bool {
        !self.new.is_empty()
    }

    fn buckets(&self, t: Table) -> &[Link] {
        match t {
            Table::Old => &self.old,
            Table::New => &self.new,
        }
    }

    fn buckets_mut(&mut self, t: Table) -> &mut [Link] {
        match t {
            Table::Old => &mut self.old,
            Table::New => &mut self.new,
        }
    }

    /// The buckets new keys go to: the table being filled during a resize.
    fn target(&self) -> Table {
        if self.resizing() {
            Table::New
        } else {
            Table::Old
        }
    }

    /// The bucket a hash designates in table `t`, if it may hold keys (the old table's
    /// moved buckets are empty).
    fn bucket(&self, t: Table, hash: u64) -> Option<usize> {
        let b = self.buckets(t);
        if b.is_empty() {
            return None;
        }
        let i = hash as usize & (b.len() - 1);
        (t == Table::New || !self.resizing() || i >= self.moved).then_some(i)
    }

    /// Every node that may have this hash: its chain in each table.
    fn candidates(&self, hash: u64) -> impl Iterator<Item = &Node> {
        [Table::Old, Table::New]
            .into_iter()
            .filter_map(move |t| self.bucket(t, hash).map(|i| &self.buckets(t)[i]))
            .flat_map(chain)
    }

    /// Loads the bucket and then the first node of each of `hashes` (keys about to be
    /// looked up), so that their cache misses overlap: a lookup's two loads depend on each
    /// other (bucket, then node), but the keys of a batch do not, and two tight loops let
    /// the CPU have all of one kind in flight at once. A hint only: it changes nothing,
    /// and a key in a longer chain or the other table of a resize just misses later.
    /// Returns a value derived from the loads, so that they cannot be optimized away.
    pub fn touch(&self, hashes: &[u64]) -> u64 {
        let t = self.target();
        let b = self.buckets(t);
        if b.is_empty() {
            return 0;
        }
        let mask = b.len() - 1;
        let mut heads: [Option<&Node>; 32] = [None; 32];
        let mut sum = 0;
        for chunk in hashes.chunks(heads.len()) {
            for (h, head) in chunk.iter().zip(heads.iter_mut()) {
                *head = b[*h as usize & mask].as_deref();
            }
            for n in heads[..chunk.len()].iter().flatten() {
                sum ^= n.hash;
            }
        }
        sum
    }

    /// Makes room for `n` more keys without growing again.
    pub fn reserve(&mut self, n: usize) {
        let want = self.len.saturating_add(n);
        if want > self.buckets(self.target()).len() {
            self.start_resize(want.checked_next_power_of_two().unwrap_or(1 << 62));
        }
    }

    /// The place of `key`.
    fn position(&self, hash: u64, key: &[u8]) -> Option<Pos> {
        for table in [Table::Old, Table::New] {
            let Some(bucket) = self.bucket(table, hash) else {
                continue;
            };
            let found = chain(&self.buckets(table)[bucket]).position(|n| n.is(hash, key));
            if let Some(depth) = found {
                return Some(Pos {
                    table,
                    bucket,
                    depth,
                });
            }
        }
        None
    }

    /// The node at `p` (a place [`KeyMap::position`] just found).
    fn node(&self, p: Pos) -> &Node {
        chain(&self.buckets(p.table)[p.bucket])
            .nth(p.depth)
            .expect("an occupied entry's node exists")
    }

    fn node_mut(&mut self, p: Pos) -> &mut Node {
        let mut n = self.buckets_mut(p.table)[p.bucket].as_deref_mut();
        for _ in 0..p.depth {
            n = n.and_then(|n| n.next.as_deref_mut());
        }
        n.expect("an occupied entry's node exists")
    }

    /// The tracking hook, called before every mutation of `key` (at `pos`, if present):
    /// while a snapshot tracks this map, records the key's pre-image if the walk has not
    /// passed it and none is recorded yet. One branch when nothing tracks.
    fn note_write(&mut self, hash: u64, key: &[u8], pos: Option<Pos>) {
        let record = match self.tracking.as_deref() {
            None => return,
            Some(t) => !t.walked(hash) && !t.preimages.contains_key(key),
        };
        if record {
            let before = pos.map(|p| self.node(p).item.clone());
            if let Some(t) = self.tracking.as_deref_mut() {
                t.preimages.insert(key.into(), before);
            }
        }
    }

    pub fn get(&self, key: &[u8]) -> Option<&Item> {
        let h = self.hash(key);
        let is_it = |n: &&Node| n.is(h, key);
        if !self.resizing() {
            // The GET path: one chain, no second table to consider.
            let head = self.old.get(h as usize & self.old.len().wrapping_sub(1))?;
            return chain(head).find(is_it).map(|n| &n.item);
        }
        self.candidates(h).find(is_it).map(|n| &n.item)
    }

    pub fn get_mut(&mut self, key: &[u8]) -> Option<&mut Item> {
        let hash = self.hash(key);
        let pos = self.position(hash, key)?;
        self.note_write(hash, key, Some(pos));
        Some(&mut self.node_mut(pos).item)
    }

    pub fn contains_key(&self, key: &[u8]) -> bool {
        self.get(key).is_some()
    }

    /// Inserts or replaces; returns the item replaced.
    pub fn insert(&mut self, key: impl Into<Key>, item: Item) -> Option<Item> {
        let key = key.into();
        match self.slot(&key) {
            Slot::Occupied(mut o) => Some(std::mem::replace(o.get_mut().1, item)),
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

    /// The entry for `key`, with one hash and one walk of (at most two) chains: the SET
    /// hot path decides what to do from it. A vacant slot stores whatever key it is
    /// given (under `key`'s hash: give it `key`). Moves a step of a running resize first.
    pub fn slot(&mut self, key: &[u8]) -> Slot<'_> {
        let hash = self.hash(key);
        self.slot_hashed(hash, key)
    }

    /// [`KeyMap::slot`] for a caller that has `key`'s hash already ([`KeyMap::hash`]):
    /// SipHash is a good part of a lookup's cost, so the SET path hashes once for the
    /// expiry index and the map.
    pub fn slot_hashed(&mut self, hash: u64, key: &[u8]) -> Slot<'_> {
        debug_assert_eq!(hash, self.hash(key));
        self.rehash(REHASH_STEP);
        let pos = self.position(hash, key);
        self.note_write(hash, key, pos);
        match pos {
            Some(pos) => Slot::Occupied(OccupiedEntry { map: self, pos }),
            None => Slot::Vacant(VacantEntry { map: self, hash }),
        }
    }

    /// Links a new node at the head of its chain, starting a doubling at one key per
    /// bucket.
    fn push(&mut self, hash: u64, key: Key, item: Item) {
        let size = self.buckets(self.target()).len();
        if self.len >= size {
            self.start_resize((size * 2).max(MIN_BUCKETS));
        }
        let t = self.target();
        let b = self.buckets_mut(t);
        let i = hash as usize & (b.len() - 1);
        let next = b[i].take();
        b[i] = Some(Box::new(Node {
            next,
            hash,
            key,
            item,
        }));
        self.len += 1;
    }

    /// Starts halving (or more) a table that fell below one key in eight buckets, as
    /// Redis does at 10%: a key space that was large once does not keep its bucket array
    /// for ever. Not while a resize runs (the next removal after it will), nor while a
    /// snapshot tracks the map (a shrink could make its walk return a key twice; the
    /// first removal after the snapshot shrinks).
    fn maybe_shrink(&mut self) {
        if self.tracking.is_some() {
            return;
        }
        if self.len == 0 {
            // Nothing to keep: back to the unallocated state of a new map.
            self.old = Box::new([]);
            self.new = Box::new([]);
            self.moved = 0;
            return;
        }
        let n = self.old.len();
        if !self.resizing() && n > MIN_BUCKETS && self.len.saturating_mul(8) < n {
            self.start_resize(self.len.next_power_of_two().max(MIN_BUCKETS));
        }
    }

    /// Resizes to `n` (a power of two) buckets: at once if there is nothing to move,
    /// else by starting an incremental move (finishing a running one first).
    fn start_resize(&mut self, n: usize) {
        debug_assert!(n.is_power_of_two());
        if self.resizing() {
            self.rehash(usize::MAX);
        }
        if self.len == 0 {
            self.old = table(n);
        } else if n != self.old.len() {
            self.new = table(n);
            self.moved = 0;
        }
    }

    /// Moves up to `steps` non-empty buckets (visiting ten times as many empty ones at
    /// most) of a running resize; ends the resize when the old table is empty. Only
    /// pointers move: each node's bucket comes from its stored hash.
    fn rehash(&mut self, steps: usize) {
        if !self.resizing() {
            return;
        }
        let mask = self.new.len() - 1;
        let mut steps = steps;
        let mut empty = steps.saturating_mul(10);
        while steps > 0 && self.moved < self.old.len() {
            let mut cur = self.old[self.moved].take();
            self.moved += 1;
            if cur.is_none() {
                empty -= 1;
                if empty == 0 {
                    break;
                }
                continue;
            }
            steps -= 1;
            while let Some(mut node) = cur {
                cur = node.next.take();
                let i = node.hash as usize & mask;
                node.next = self.new[i].take();
                self.new[i] = Some(node);
            }
        }
        if self.moved == self.old.len() {
            self.old = std::mem::replace(&mut self.new, Box::new([]));
            self.moved = 0;
        }
    }

    /// The entry whose key hashes to `hash` and for which `pred` holds.
    pub fn find_by_hash(
        &self,
        hash: u64,
        mut pred: impl FnMut(&[u8], &Item) -> bool,
    ) -> Option<(&[u8], &Item)> {
        self.candidates(hash)
            .find(|n| n.hash == hash && pred(n.key.as_bytes(), &n.item))
            .map(|n| (n.key.as_bytes(), &n.item))
    }

    /// Every key and item, bucket by bucket.
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            buckets: self.old.iter().chain(self.new.iter()),
            node: None,
        }
    }

    /// Every key and item, starting at a bucket chosen by `r` and wrapping around.
    pub fn iter_from(&self, r: u64) -> impl Iterator<Item = (&[u8], &Item)> {
        let all = self.old.len() + self.new.len();
        let start = if all == 0 {
            0
        } else {
            (r % all as u64) as usize
        };
        let both = || self.old.iter().chain(self.new.iter());
        both()
            .skip(start)
            .chain(both().take(start))
            .flat_map(chain)
            .map(|n| (n.key.as_bytes(), &n.item))
    }

    /// SCAN's step: calls `f` with every key of the bucket `cursor` designates (during a
    /// resize: that bucket of the smaller table and every bucket of the larger one it
    /// expands to) and returns the cursor of the next one, 0 when the pass is over. See
    /// the module doc; this is Redis's `dictScan`.
    ///
    /// Any `u64` is a valid cursor (a stale or made-up one just starts somewhere); the
    /// returned cursor is below the bucket count, so below 2^53 for any table that fits in
    /// memory.
    pub fn scan(&self, cursor: u64, mut f: impl FnMut(&[u8], &Item)) -> u64 {
        if self.len == 0 {
            return 0;
        }
        let mut emit = |head: &Link| {
            for n in chain(head) {
                f(n.key.as_bytes(), &n.item);
            }
        };
        // Increment the reversed bits under `mask`: set the bits above it so the carry
        // runs off the top, add one to the reversed value, reverse back.
        let next = |v: u64, mask: u64| (v | !mask).reverse_bits().wrapping_add(1).reverse_bits();
        let mut v = cursor;
        if !self.resizing() {
            let m0 = (self.old.len() - 1) as u64;
            emit(&self.old[(v & m0) as usize]);
            return next(v, m0);
        }
        let (small, large) = if self.old.len() <= self.new.len() {
            (&self.old, &self.new)
        } else {
            (&self.new, &self.old)
        };
        let m0 = (small.len() - 1) as u64;
        let m1 = (large.len() - 1) as u64;
        emit(&small[(v & m0) as usize]);
        // Every bucket of the larger table whose low bits are this bucket's index.
        loop {
            emit(&large[(v & m1) as usize]);
            v = next(v, m1);
            if v & (m0 ^ m1) == 0 {
                return v;
            }
        }
    }

    /// Starts a snapshot's view of the map as it is now (module doc, "Tracking"), under
    /// `tag`; a view already running is dropped. O(1).
    pub fn start_tracking(&mut self, tag: u64) {
        self.tracking = Some(Box::new(Tracking {
            tag,
            cursor: 0,
            done: false,
            preimages: HashMap::new(),
        }));
    }

    /// The tag of the snapshot tracking this map, if one does.
    pub fn tracking(&self) -> Option<u64> {
        self.tracking.as_ref().map(|t| t.tag)
    }

    /// Pre-images recorded so far (tests and logs: what tracking costs).
    pub fn preimages(&self) -> usize {
        self.tracking.as_ref().map_or(0, |t| t.preimages.len())
    }

    /// One step of the snapshot's walk: up to `buckets` buckets from where the last step
    /// ended, calling `f` with every key there that has no pre-image and its current
    /// item (its item at the start: it has not changed since). Stops after the bucket in
    /// which `f` returns false (a chunk is full). Returns true when the walk is over (and
    /// then [`KeyMap::end_tracking`] hands over the rest); also when nothing tracks.
    pub fn snapshot_step(
        &mut self,
        buckets: usize,
        mut f: impl FnMut(&[u8], &Item) -> bool,
    ) -> bool {
        let Some(t) = self.tracking.as_deref() else {
            return true;
        };
        if t.done {
            return true;
        }
        let skip = &t.preimages;
        let mut cursor = t.cursor;
        let mut full = false;
        for _ in 0..buckets {
            cursor = self.scan(cursor, |k, i| {
                if (skip.is_empty() || !skip.contains_key(k)) && !f(k, i) {
                    full = true;
                }
            });
            if cursor == 0 || full {
                break;
            }
        }
        if let Some(t) = self.tracking.as_deref_mut() {
            t.cursor = cursor;
            t.done = cursor == 0;
        }
        cursor == 0
    }

    /// Ends tracking and hands over the pre-images of the keys that existed at the start
    /// (what the walk skipped because they changed). O(1) under the caller's lock; the
    /// caller consumes the iterator after releasing it.
    pub fn end_tracking(&mut self) -> impl Iterator<Item = (Box<[u8]>, Item)> + use<> {
        let preimages = self
            .tracking
            .take()
            .map(|t| t.preimages)
            .unwrap_or_default();
        preimages.into_iter().filter_map(|(k, i)| Some((k, i?)))
    }

    /// Ends tracking without a result (an aborted snapshot), freeing the pre-images.
    pub fn stop_tracking(&mut self) {
        self.tracking = None;
    }

    /// A key and its item, picked at random from `r` (any 64 random bits): a random
    /// non-empty bucket, then a random node of its chain, as Redis's RANDOMKEY. O(1)
    /// expected; `None` only if the map is empty. Keys in short chains are somewhat
    /// likelier than keys in long ones (Redis's pick has the same bias).
    pub fn random(&self, r: u64) -> Option<(&[u8], &Item)> {
        if self.len == 0 {
            return None;
        }
        // The buckets that may hold keys: the old table's unmoved ones, then the new
        // table's.
        let old = &self.old[self.moved.min(self.old.len())..];
        let all = (old.len() + self.new.len()) as u64;
        let at = |i: u64| {
            let i = i as usize;
            old.get(i).unwrap_or_else(|| &self.new[i - old.len()])
        };
        let mut bits = r;
        let mut head = None;
        for _ in 0..RANDOM_TRIES {
            bits = mix(bits);
            let b = at(bits % all);
            if b.is_some() {
                head = Some(b);
                break;
            }
        }
        // A very sparse table (reserved ahead of its keys): the next non-empty bucket.
        let head = head.or_else(|| {
            let start = bits % all;
            (0..all)
                .map(|i| at((start + i) % all))
                .find(|b| b.is_some())
        })?;
        let len = chain(head).count() as u64;
        chain(head)
            .nth((mix(bits) % len) as usize)
            .map(|n| (n.key.as_bytes(), &n.item))
    }
}

/// SplitMix64's output function: a well-spread 64-bit value from any input (a step of a
/// counter-based generator; `random` feeds each result back in).
pub fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Iterator over a [`KeyMap`]'s keys and items.
pub struct Iter<'a> {
    buckets: std::iter::Chain<std::slice::Iter<'a, Link>, std::slice::Iter<'a, Link>>,
    node: Option<&'a Node>,
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a [u8], &'a Item);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(n) = self.node {
                self.node = n.next.as_deref();
                return Some((n.key.as_bytes(), &n.item));
            }
            self.node = self.buckets.next()?.as_deref();
        }
    }
}

impl<'a> IntoIterator for &'a KeyMap {
    type Item = (&'a [u8], &'a Item);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    fn item(v: &str, at: u64) -> Item {
        Item {
            value: v.as_bytes().into(),
            expire_at: at,
        }
    }

    /// Buckets of the table keys go to (the new one during a resize).
    fn size(m: &KeyMap) -> usize {
        m.buckets(m.target()).len()
    }

    /// Buckets of the larger table: every cursor is below this.
    fn largest(m: &KeyMap) -> u64 {
        m.old.len().max(m.new.len()) as u64
    }

    fn key(i: usize) -> Box<[u8]> {
        format!("k{i}").into_bytes().into()
    }

    /// Many keys with one deadline: each hash finds its own key, never a neighbour in the
    /// same bucket.
    #[test]
    fn find_by_hash_never_returns_a_neighbour() {
        let mut m = KeyMap::default();
        let n = 50_000;
        for i in 0..n {
            m.insert(key(i), item("v", 42));
        }
        for i in 0..n {
            let key = key(i);
            let (found, _) = m
                .find_by_hash(m.hash(&key), |_, it| it.expire_at == 42)
                .expect("every key is found");
            assert_eq!(found, &key[..], "key {i}");
        }
    }

    /// Keys on both sides of the inline limit (and the empty key) go in, are found,
    /// walked and taken out with their bytes intact.
    #[test]
    fn keys_of_every_length_round_trip() {
        let mut m = KeyMap::default();
        let keys: Vec<Vec<u8>> = (0..=INLINE + 10)
            .map(|n| (0..n).map(|i| b'a' + (i % 26) as u8).collect())
            .collect();
        for (i, k) in keys.iter().enumerate() {
            let how = i % 3;
            match how {
                0 => m.insert(k.clone(), item("v", i as u64)),
                1 => m.insert(&k[..], item("v", i as u64)),
                _ => m.insert(Box::<[u8]>::from(&k[..]), item("v", i as u64)),
            };
        }
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(m.get(k).map(|it| it.expire_at), Some(i as u64), "{k:?}");
            let (found, _) = m
                .find_by_hash(m.hash(k), |_, it| it.expire_at == i as u64)
                .expect("found by hash");
            assert_eq!(found, &k[..]);
        }
        // Touching is only loads, whatever the batch (longer than its chunks, and hashes
        // of absent keys too).
        let hashes: Vec<u64> = keys.iter().chain(&keys).map(|k| m.hash(k) ^ 1).collect();
        std::hint::black_box(m.touch(&hashes));
        assert_eq!(
            KeyMap::default().touch(&hashes),
            0,
            "an empty map has no buckets"
        );
        let mut all: Vec<Vec<u8>> = m.iter().map(|(k, _)| k.to_vec()).collect();
        all.sort_by_key(Vec::len);
        assert_eq!(all, keys);
        for k in &keys {
            let Slot::Occupied(o) = m.slot(k) else {
                panic!("{k:?} present")
            };
            assert_eq!(o.get().0, &k[..]);
            let ((gone, _), ()) = o.remove();
            assert_eq!(
                (&*gone, &*Box::<[u8]>::from(gone.clone())),
                (&k[..], &k[..])
            );
        }
        assert!(m.is_empty());
    }

    #[test]
    fn behaves_like_a_map_and_finds_by_hash() {
        let mut m = KeyMap::default();
        assert!(m.get(b"a").is_none() && m.get_mut(b"a").is_none());
        assert!(m.remove(b"a").is_none());
        assert!(m.insert(&b"a"[..], item("1", 0)).is_none());
        assert_eq!(m.insert(&b"a"[..], item("2", 7)), Some(item("1", 0)));
        m.insert(&b"b"[..], item("3", 0));
        assert_eq!(m.len(), 2);
        assert_eq!(m.get(b"a"), Some(&item("2", 7)));
        let h = m.hash(b"a");
        let (k, i) = m.find_by_hash(h, |_, i| i.expire_at == 7).unwrap();
        assert_eq!((k, i.expire_at), (&b"a"[..], 7));
        assert!(m.find_by_hash(h, |_, i| i.expire_at == 8).is_none());
        m.get_mut(b"b").unwrap().expire_at = 9;
        assert_eq!(m.remove(b"b"), Some(item("3", 9)));
        assert!(m.remove(b"b").is_none());
        let keys: Vec<&[u8]> = m.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, vec![&b"a"[..]]);
    }

    /// A random sequence of inserts, removals and slot operations agrees with std's
    /// HashMap, through growth and shrinking.
    #[test]
    fn agrees_with_a_hashmap_through_growth_and_shrink() {
        let mut m = KeyMap::default();
        let mut model: HashMap<Box<[u8]>, Item> = HashMap::new();
        let mut r = 1u64;
        for round in 0..4 {
            // Grow to a few thousand keys, then shrink to a handful.
            let (ops, range) = if round % 2 == 0 {
                (20_000, 5_000)
            } else {
                (20_000, 50)
            };
            for _ in 0..ops {
                r = mix(r);
                let k = key((r % range) as usize);
                match (r >> 32) % 4 {
                    0 | 1 if round % 2 == 0 => {
                        assert_eq!(
                            m.insert(k.clone(), item("v", r)),
                            model.insert(k, item("v", r))
                        )
                    }
                    0 => match m.slot(&k) {
                        Slot::Occupied(o) => {
                            assert_eq!(Some(o.remove().0.1), model.remove(&k));
                        }
                        Slot::Vacant(v) => {
                            assert!(!model.contains_key(&k));
                            v.insert((k.clone(), item("s", 1)));
                            model.insert(k, item("s", 1));
                        }
                    },
                    _ => assert_eq!(m.remove(&k), model.remove(&k)),
                }
                assert_eq!(m.len(), model.len());
            }
            m.rehash(usize::MAX);
            let table = size(&m);
            assert!(!m.resizing());
            assert!(
                m.len() <= table && table <= (m.len().next_power_of_two() * 16).max(MIN_BUCKETS)
            );
            let all: HashMap<Box<[u8]>, Item> =
                m.iter().map(|(k, i)| (k.into(), i.clone())).collect();
            assert_eq!(all, model, "round {round}");
            for (k, i) in &model {
                assert_eq!(m.get(k), Some(i));
            }
        }
        while let Some(k) = model.keys().next().cloned() {
            model.remove(&k);
            m.remove(&k);
        }
        assert_eq!(
            (m.len(), m.old.len() + m.new.len()),
            (0, 0),
            "an emptied map frees its table"
        );
    }

    /// Everything a reader can ask agrees with the keys present while a resize is half
    /// done, growing and shrinking.
    #[test]
    fn reads_agree_in_the_middle_of_a_resize() {
        let check = |m: &KeyMap, model: &HashSet<Box<[u8]>>| {
            assert!(m.resizing(), "the check runs mid-resize");
            assert_eq!(m.len(), model.len());
            let all: Vec<Box<[u8]>> = m.iter().map(|(k, _)| k.into()).collect();
            assert_eq!(all.len(), model.len());
            assert_eq!(all.into_iter().collect::<HashSet<_>>(), *model);
            let from: HashSet<Box<[u8]>> = m.iter_from(77).map(|(k, _)| k.into()).collect();
            assert_eq!(from, *model);
            let scanned: HashSet<Box<[u8]>> = full_scan(m).into_iter().collect();
            assert_eq!(scanned, *model);
            for k in model {
                assert!(m.get(k).is_some() && m.contains_key(k));
                assert!(m.find_by_hash(m.hash(k), |kk, _| kk == &k[..]).is_some());
            }
            assert!(m.get(b"absent").is_none());
            for r in 0..200 {
                let (k, _) = m.random(r).expect("non-empty");
                assert!(model.contains(k));
            }
        };
        let mut m = KeyMap::default();
        let mut model = HashSet::new();
        // 1024 keys fill 1024 buckets; the next insert starts a doubling, and a few
        // writes move only a few buckets of it.
        for i in 0..1030 {
            m.insert(key(i), item("v", 0));
            model.insert(key(i));
        }
        check(&m, &model);
        // Overwrites and removals mid-resize land in the right table.
        for i in 0..20 {
            m.get_mut(&key(i)).expect("present").expire_at = 5;
            assert!(m.remove(&key(i + 500)).is_some());
            model.remove(&key(i + 500));
        }
        check(&m, &model);
        assert!((0..20).all(|i| m.get(&key(i)).is_some_and(|it| it.expire_at == 5)));
        // Shrinking: below 256 keys a table of 2048 buckets starts to shrink.
        m.rehash(usize::MAX);
        assert_eq!(size(&m), 2048);
        let mut i = 0;
        while !m.resizing() {
            if m.remove(&key(i)).is_some() {
                model.remove(&key(i));
            }
            i += 1;
        }
        assert!(m.len() < 256 && size(&m) < 2048, "a shrink started");
        check(&m, &model);
    }

    /// A full pass from cursor 0 to cursor 0, returning every key it sees.
    fn full_scan(m: &KeyMap) -> Vec<Box<[u8]>> {
        let mut seen = Vec::new();
        let mut c = 0;
        loop {
            c = m.scan(c, |k, _| seen.push(k.into()));
            if c == 0 {
                return seen;
            }
        }
    }

    #[test]
    fn scan_of_a_quiet_map_returns_each_key_once() {
        let mut m = KeyMap::default();
        assert_eq!(m.scan(0, |_, _| panic!("empty")), 0);
        assert_eq!(m.scan(12345, |_, _| panic!("empty")), 0);
        for n in [1, 3, 4, 5, 100, 4097] {
            m = KeyMap::default();
            for i in 0..n {
                m.insert(key(i), item("v", 0));
            }
            let seen = full_scan(&m);
            assert_eq!(seen.len(), n);
            let set: HashSet<_> = seen.into_iter().collect();
            assert_eq!(set.len(), n);
        }
    }

    /// SCAN's guarantee: a key present for the whole pass is returned at least once, even
    /// when keys come and go between calls and the table grows or shrinks meanwhile; no
    /// key is returned twice unless the table shrank. Cursors stay below the table size.
    #[test]
    fn scan_returns_every_stable_key_under_churn_and_resizing() {
        // (seed, SCAN steps between mutations, inserts, removals): growth, shrinking,
        // balanced churn. A step is one bucket; a SCAN COUNT 10 call takes ten or so.
        for (seed, steps, grow, shrink) in [
            (1u64, 10, 4usize, 0usize),
            (2, 10, 0, 40),
            (3, 10, 6, 6),
            (4, 2, 1, 0),
            (5, 5, 0, 200),
        ] {
            let mut m = KeyMap::default();
            let stable: Vec<Box<[u8]>> = (0..2_000)
                .map(|i| format!("s{i}").into_bytes().into())
                .collect();
            for k in &stable {
                m.insert(k.clone(), item("v", 0));
            }
            // Transient keys, present at the start when the phase removes them.
            let mut transient: Vec<Box<[u8]>> = Vec::new();
            let mut next_t = 0usize;
            let mut add = |m: &mut KeyMap, transient: &mut Vec<Box<[u8]>>| {
                let k: Box<[u8]> = format!("t{next_t}").into_bytes().into();
                next_t += 1;
                m.insert(k.clone(), item("v", 0));
                transient.push(k);
            };
            if shrink > 0 {
                for _ in 0..20_000 {
                    add(&mut m, &mut transient);
                }
            }
            let start_table = size(&m);
            let mut mid_resize = false;
            let mut r = seed;
            let mut seen: HashMap<Box<[u8]>, usize> = HashMap::new();
            let mut cursor = 0u64;
            let mut shrank = false;
            let mut max_table = 0;
            'pass: loop {
                let before = size(&m);
                for _ in 0..steps {
                    mid_resize |= m.resizing();
                    cursor = m.scan(cursor, |k, _| *seen.entry(k.into()).or_default() += 1);
                    assert!(cursor < largest(&m), "cursor within the table");
                    if cursor == 0 {
                        break 'pass;
                    }
                }
                for _ in 0..grow {
                    add(&mut m, &mut transient);
                }
                for _ in 0..shrink.min(transient.len()) {
                    r = mix(r);
                    let i = (r % transient.len() as u64) as usize;
                    m.remove(&transient.swap_remove(i));
                }
                shrank |= size(&m) < before;
                max_table = max_table.max(size(&m));
            }
            for k in &stable {
                let n = seen.get(k).copied().unwrap_or(0);
                assert!(n >= 1, "seed {seed}: stable key {k:?} missed");
                if !shrank {
                    assert_eq!(n, 1, "seed {seed}: {k:?} returned twice without a shrink");
                }
            }
            if grow > shrink {
                assert!(
                    max_table > start_table,
                    "seed {seed}: the table grew during the pass"
                );
            }
            if grow != shrink {
                assert!(mid_resize, "seed {seed}: some calls ran during a resize");
            }
            if shrink > grow {
                assert!(shrank, "seed {seed}: the table shrank during the pass");
            }
        }
    }

    /// A cursor from before a resize (or any number a client sends) is accepted.
    #[test]
    fn scan_accepts_any_cursor() {
        let mut m = KeyMap::default();
        for i in 0..1000 {
            m.insert(key(i), item("v", 0));
        }
        for c in [1u64, 7, u64::MAX, 1 << 53, 0x8000_0000_0000_0000] {
            let next = m.scan(c, |_, _| {});
            assert!(next < largest(&m), "{c} -> {next}");
        }
    }

    #[test]
    fn random_picks_every_key_and_none_from_an_empty_map() {
        let mut m = KeyMap::default();
        assert!(m.random(1).is_none());
        for i in 0..50 {
            m.insert(key(i), item("v", 0));
        }
        let mut seen = HashSet::new();
        let mut r = 0;
        for _ in 0..5_000 {
            r = mix(r);
            let (k, _) = m.random(r).expect("non-empty");
            seen.insert(k.to_vec());
        }
        assert_eq!(seen.len(), 50);
        // A sparse table (room reserved for far more keys) still finds its one key.
        let mut m = KeyMap::default();
        m.reserve(1 << 16);
        m.insert(key(7), item("v", 0));
        for r in 0..100 {
            assert_eq!(m.random(r).map(|(k, _)| k), Some(&key(7)[..]));
        }
        let all: Vec<_> = m.iter_from(12345).map(|(k, _)| k.to_vec()).collect();
        assert_eq!(all, vec![key(7).to_vec()]);
    }

    /// Every mutating entry point records a key's pre-image, once, with the item it had
    /// when tracking started (`None` for a key created since); reads record nothing.
    #[test]
    fn tracking_records_each_preimage_once() {
        let mut m = KeyMap::default();
        for i in 0..10 {
            m.insert(key(i), item("v", i as u64));
        }
        m.start_tracking(7);
        assert_eq!(m.tracking(), Some(7));
        assert!(m.get(&key(0)).is_some() && m.contains_key(&key(1)));
        let _ = m.iter().count();
        assert_eq!(m.preimages(), 0, "reads record nothing");
        m.insert(key(0), item("new", 0));
        m.insert(key(0), item("newer", 0));
        m.get_mut(&key(1)).expect("present").expire_at = 99;
        m.remove(&key(2));
        m.remove(&key(2));
        if let Slot::Occupied(o) = m.slot(&key(3)) {
            o.remove();
        }
        if let Slot::Occupied(mut o) = m.slot(&key(4)) {
            o.get_mut().1.value = b"x"[..].into();
        }
        m.insert(key(100), item("created", 0));
        m.remove(&key(100));
        m.insert(key(100), item("again", 0));
        assert!(m.get_mut(&key(101)).is_none());
        assert_eq!(m.preimages(), 6, "0, 1, 2, 3, 4 and 100, each once");
        let mut pre: Vec<(Box<[u8]>, Item)> = m.end_tracking().collect();
        pre.sort_by(|a, b| a.0.cmp(&b.0));
        let want: Vec<(Box<[u8]>, Item)> = (0..5).map(|i| (key(i), item("v", i as u64))).collect();
        assert_eq!(
            pre, want,
            "the items at the start; none for the key created since"
        );
        assert_eq!(m.tracking(), None);
        m.insert(key(5), item("w", 0));
        assert_eq!(m.preimages(), 0);
    }

    /// While tracked, a map that loses nearly all its keys keeps its table (a shrink could
    /// make the snapshot's walk return a key twice); the first removal after shrinks it.
    #[test]
    fn tracking_suspends_shrinking() {
        let mut m = KeyMap::default();
        for i in 0..2048 {
            m.insert(key(i), item("v", 0));
        }
        m.rehash(usize::MAX);
        let before = size(&m);
        m.start_tracking(1);
        for i in 0..2048 {
            m.remove(&key(i));
        }
        assert_eq!((m.len(), size(&m), m.resizing()), (0, before, false));
        m.insert(key(1), item("v", 0));
        m.insert(key(2), item("v", 0));
        m.stop_tracking();
        m.remove(&key(1));
        assert!(size(&m) < before, "shrinks once tracking stops");
    }

    /// The snapshot's view: whatever writes (overwrites, removals, creations, growth of
    /// the table and its incremental resize) run between the walk's steps, the walk plus
    /// the pre-images yield exactly the map at the start, each key once.
    #[test]
    fn a_tracked_walk_yields_exactly_the_map_at_the_start() {
        for seed in 1..=12u64 {
            let mut m = KeyMap::default();
            let mut r = seed;
            let start_keys = 500 + (seed as usize % 4) * 700;
            for i in 0..start_keys {
                m.insert(key(i), item("v", i as u64));
            }
            // Some seeds start in the middle of a growing resize.
            if seed % 3 == 0 {
                while !m.resizing() {
                    m.insert(key(m.len()), item("v", 0));
                }
            }
            let at_start: HashMap<Box<[u8]>, Item> =
                m.iter().map(|(k, i)| (k.into(), i.clone())).collect();
            m.start_tracking(seed);
            let mut out: Vec<(Box<[u8]>, Item)> = Vec::new();
            let mut fresh = 100_000;
            let mut grew = false;
            loop {
                let before = size(&m);
                let done = m.snapshot_step(1 + (r % 5) as usize, |k, i| {
                    out.push((k.into(), i.clone()));
                    true
                });
                if done {
                    break;
                }
                for _ in 0..(seed as usize % 4 + 1) * 3 {
                    r = mix(r);
                    let k = key((r % (start_keys as u64 + 200)) as usize);
                    match (r >> 40) % 6 {
                        0 => {
                            m.insert(k, item("over", r));
                        }
                        1 => {
                            m.remove(&k);
                        }
                        2 => {
                            if let Some(i) = m.get_mut(&k) {
                                i.expire_at = r;
                            }
                        }
                        3 => {
                            if let Slot::Vacant(v) = m.slot(&k) {
                                v.insert((k.clone(), item("set-nx", 0)));
                            }
                        }
                        _ => {
                            // New keys: the table grows during the walk.
                            fresh += 1;
                            m.insert(key(fresh), item("new", 0));
                        }
                    }
                }
                grew |= size(&m) > before || m.resizing();
            }
            let walked = out.len();
            out.extend(m.end_tracking());
            let mut seen = HashSet::new();
            for (k, _) in &out {
                assert!(seen.insert(k.clone()), "seed {seed}: {k:?} written twice");
            }
            let got: HashMap<Box<[u8]>, Item> = out.into_iter().collect();
            assert_eq!(got.len(), at_start.len(), "seed {seed}");
            assert!(
                got == at_start,
                "seed {seed}: the snapshot differs from the start"
            );
            assert!(
                walked < at_start.len(),
                "seed {seed}: some keys changed ahead of the walk"
            );
            assert!(
                grew,
                "seed {seed}: the table grew (or was resizing) during the walk"
            );
        }
    }

    /// The pause of the one insert that doubles the table, against std's `HashMap` (the
    /// `hashbrown` table the key space used before, with the same SipHash keys). A
    /// measurement, not a test: run it in a release build with
    /// `cargo test --release --lib keymap::tests::resize_pause -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement; see the doc comment"]
    fn resize_pause() {
        use std::time::{Duration, Instant};
        let n = (1 << 21) + 1;
        let keys: Vec<Box<[u8]>> = (0..n)
            .map(|i| format!("key:{i:012}").into_bytes().into())
            .collect();
        let mut ours = KeyMap::default();
        let mut std_map: HashMap<Box<[u8]>, Item> = HashMap::new();
        let (mut worst_ours, mut worst_std) = ((0, Duration::ZERO), (0, Duration::ZERO));
        for k in &keys {
            let (a, b) = (k.clone(), k.clone());
            let t = Instant::now();
            ours.insert(a, item("v", 0));
            let e = t.elapsed();
            if e > worst_ours.1 {
                worst_ours = (ours.len(), e);
            }
            let t = Instant::now();
            std_map.insert(b, item("v", 0));
            let e = t.elapsed();
            if e > worst_std.1 {
                worst_std = (std_map.len(), e);
            }
        }
        println!(
            "slowest insert of {n} keys: KeyMap {:?} at key {}; std HashMap {:?} at key {}",
            worst_ours.1, worst_ours.0, worst_std.1, worst_std.0
        );
    }

    /// Lookups and overwrites of 100,000 keys (or `KEYMAP_KEYS`) in random order, against
    /// std's `HashMap` (`hashbrown`, what the key space used before). A measurement, not
    /// a test: `cargo test --release --lib keymap::tests::lookup_speed -- --ignored
    /// --nocapture`. Chains cost a dependent load more than `hashbrown`'s probe (bucket,
    /// then node; a short key's bytes are in the node): the price of SCAN and RANDOMKEY
    /// by bucket (Redis's dict pays it too). With keys boxed, about 40 ns at 100,000 keys
    /// and 140 ns at a million; with short keys in the node, 8% (get) to 17% (slot and
    /// get_mut) of a lookup less (BENCHMARKS.md). Iterating every key costs a node visit
    /// each: 20-30 ms per million keys against `hashbrown`'s 2-4.5 ms (whose slots hold
    /// the key's and value's lengths inline).
    #[test]
    #[ignore = "a measurement; see the doc comment"]
    fn lookup_speed() {
        use std::time::Instant;
        let n: usize = std::env::var("KEYMAP_KEYS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100_000);
        let keys: Vec<Box<[u8]>> = (0..n)
            .map(|i| format!("key:{i:012}").into_bytes().into())
            .collect();
        let mut order: Vec<usize> = (0..2_000_000)
            .map(|i| (mix(i) % n as u64) as usize)
            .collect();
        order.shrink_to_fit();
        let mut ours = KeyMap::default();
        let mut std_map: HashMap<Box<[u8]>, Item> = HashMap::new();
        for k in &keys {
            ours.insert(k.clone(), item("v", 0));
            std_map.insert(k.clone(), item("v", 0));
        }
        for round in 0..3 {
            let t = Instant::now();
            let total: usize = ours.iter().map(|(k, i)| k.len() + i.value.len()).sum();
            let iter_ours = t.elapsed();
            let t = Instant::now();
            let total_std: usize = std_map.iter().map(|(k, i)| k.len() + i.value.len()).sum();
            let iter_std = t.elapsed();
            assert_eq!(total, total_std);
            println!("round {round}: iterating all: {iter_ours:?} (std {iter_std:?})");
            let t = Instant::now();
            let mut hits = 0;
            for &i in &order {
                hits += ours.get(&keys[i]).map_or(0, |it| it.value.len());
            }
            let get_ours = t.elapsed() / order.len() as u32;
            let t = Instant::now();
            for &i in &order {
                hits += std_map.get(&keys[i]).map_or(0, |it| it.value.len());
            }
            let get_std = t.elapsed() / order.len() as u32;
            let t = Instant::now();
            for &i in &order[..500_000] {
                if let Slot::Occupied(mut o) = ours.slot(&keys[i]) {
                    o.get_mut().1.expire_at += 1;
                }
            }
            let set_ours = t.elapsed() / 500_000;
            let t = Instant::now();
            for &i in &order[..500_000] {
                if let Some(it) = std_map.get_mut(&keys[i]) {
                    it.expire_at += 1;
                }
            }
            let set_std = t.elapsed() / 500_000;
            println!(
                "round {round}: get {get_ours:?} (std {get_std:?}), slot+get_mut {set_ours:?} (std get_mut {set_std:?}), {hits}"
            );
        }
    }
}
