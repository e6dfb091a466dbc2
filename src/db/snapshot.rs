//! The state machine's side of snapshots: loading one at recovery, and the walk that
//! compaction streams into a new one.
//!
//! # Loading
//!
//! Recovery (`Store::open`) feeds the parts of the newest snapshot in file order:
//! [`Db::set_applied`] with its index, [`Db::reserve`] per database with its key count,
//! [`Db::load`] per key, and [`Db::finish_load`] at its end; then the log's later entries
//! go through [`Db::apply`] as always. Loading skips what an overwrite needs (a
//! snapshot's keys are distinct) and builds each database's expiry index at once at the
//! end: a snapshot lists keys in hash order, and inserting their deadlines one by one in
//! that random order costs more than loading the keys themselves.
//!
//! # The compaction walk
//!
//! Compaction writes the map as it was at one log index while writes go on, without a
//! copy (`keymap.rs`, "Tracking", explains why the result is exact). The store, holding
//! the map lock for each call: [`Db::start_tracking`] in every non-empty database at that
//! index; then per database [`Db::snapshot_step`] until it reports the walk done, each
//! step a few dozen buckets so writers wait for one step at most; then
//! [`Db::end_tracking`] for the pre-images of the keys written meanwhile. A table
//! replaced meanwhile (FLUSHALL, FLUSHDB, SWAPDB) no longer carries the walk's tag
//! ([`Keyspace::tracking`]), which is how the store notices and gives the snapshot up
//! ([`Db::stop_tracking`]).

use super::{Db, ITEM_OVERHEAD, Item, Keyspace};
use crate::wal::SnapshotItem;

/// Largest number of keys a snapshot's count may make a table reserve room for up front:
/// the count comes from a file, so it must not size an allocation unchecked (a larger
/// database still loads, growing as it goes).
const MAX_RESERVE: u64 = 1 << 28;

impl Db {
    /// Recovery: the entries up to `index` are in (the snapshot's index).
    pub fn set_applied(&mut self, index: u64) {
        self.applied = index;
    }

    /// Recovery: database `db` is about to load `count` keys; sizes its table once
    /// (bounded by `MAX_RESERVE`). A database that does not exist is ignored: its keys
    /// are refused by [`Db::load`].
    pub fn reserve(&mut self, db: u32, count: u64) {
        if let Some(ks) = self.keyspace_mut(db) {
            ks.map.reserve(count.min(MAX_RESERVE) as usize);
        }
    }

    /// Recovery: adds a key from the snapshot. False, adding nothing, if its database
    /// does not exist (the snapshot was written with more databases). Its deadline joins
    /// the index at [`Db::finish_load`].
    #[must_use]
    pub fn load(&mut self, it: SnapshotItem) -> bool {
        match self.keyspace_mut(it.db) {
            Some(ks) => {
                ks.load(it);
                true
            }
            None => false,
        }
    }

    /// Recovery: the snapshot has ended; builds every database's expiry index from the
    /// deadlines of the keys loaded.
    pub fn finish_load(&mut self) {
        for ks in self.keyspaces_mut() {
            let deadlines = std::mem::take(&mut ks.loading);
            ks.deadline_sum = deadlines.iter().map(|&(at, _)| u128::from(at)).sum();
            ks.expires = deadlines.into_iter().collect();
        }
    }

    /// Compaction: switches on tracking in every non-empty database, database `d` under
    /// the tag `tag(d)`, and returns each one's index and key count at this moment
    /// (expired keys not yet removed included: they are in the map, and replay expects
    /// them). O(databases), no copy.
    pub fn start_tracking(&mut self, tag: impl Fn(u32) -> u64) -> Vec<(u32, u64)> {
        (0u32..)
            .zip(self.keyspaces_mut())
            .filter(|(_, ks)| !ks.map.is_empty())
            .map(|(d, ks)| {
                ks.map.start_tracking(tag(d));
                (d, ks.map.len() as u64)
            })
            .collect()
    }

    /// Compaction given up: stops the tracking of every database whose tag `mine`
    /// accepts, freeing its pre-images.
    pub fn stop_tracking(&mut self, mine: impl Fn(u64) -> bool) {
        for ks in self.keyspaces_mut() {
            if ks.map.tracking().is_some_and(&mine) {
                ks.map.stop_tracking();
            }
        }
    }

    /// Compaction: one step of database `db`'s walk, up to `buckets` buckets, calling `f`
    /// with each key not changed since tracking began and its item, until `f` returns
    /// false ([`KeyMap::snapshot_step`](super::keymap::KeyMap::snapshot_step)). True when
    /// the walk is over, or nothing tracks that database.
    pub fn snapshot_step(
        &mut self,
        db: u32,
        buckets: usize,
        f: impl FnMut(&[u8], &Item) -> bool,
    ) -> bool {
        match self.keyspace_mut(db) {
            Some(ks) => ks.map.snapshot_step(buckets, f),
            None => true,
        }
    }

    /// Compaction: ends database `db`'s tracking and hands over the pre-images of the
    /// keys that changed before the walk reached them (their items at the start; keys
    /// created since have none). O(1) under the lock; consume it after releasing.
    pub fn end_tracking(
        &mut self,
        db: u32,
    ) -> Option<impl Iterator<Item = (Box<[u8]>, Item)> + use<>> {
        self.keyspace_mut(db).map(|ks| ks.map.end_tracking())
    }
}

impl Keyspace {
    /// Adds a key from a snapshot. Its keys are distinct, so this skips the checks an
    /// overwrite needs: loading is one hash insert per key (plus the deadline, kept for
    /// the index built at the end).
    fn load(&mut self, it: SnapshotItem) {
        let key = it.key.into_boxed_slice();
        let expire_at = it.expire_at_ms.unwrap_or(0);
        self.live_bytes += (key.len() + it.value.len()) as u64 + ITEM_OVERHEAD;
        if expire_at != 0 {
            self.loading.push((expire_at, self.map.hash(&key)));
        }
        self.map.insert(
            key,
            Item {
                value: it.value.into_boxed_slice(),
                expire_at,
            },
        );
    }
}
