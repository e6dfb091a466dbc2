//! The state machine: the databases, their keys, the expiry index, the operation type
//! and `apply`. Nothing outside this module changes a key.
//!
//! [`Db`] is Redis's numbered databases (`SELECT` indexes), each a [`Keyspace`]: its
//! keys in a [`KeyMap`], the expiry index over them, and its counters. Every field is
//! private; the rest of the crate sees the data only through the read API below.
//!
//! # How data enters
//!
//! - [`Db::apply`] of a committed log entry's [`Command`], in log order. The operation
//!   type, [`Op`], is the state machine's own (`op.rs`, with its byte codec): the command
//!   layer builds one from a request, the store wraps it in a [`Command`] (its database
//!   and the leader's clock; `command.rs`) whose bytes the log stores as an opaque
//!   payload, and applying it depends only on the databases and the command (its
//!   timestamp stands in for the clock), so a restart or a follower replaying the log
//!   reaches the same state. An empty payload is a no-op entry.
//!   Canonical commands ([`Op::Cmd`]) are applied by `exec.rs`, which hands each family
//!   to its file: `strings.rs` (APPEND, SETRANGE, GETDEL, GETEX, INCRBYFLOAT),
//!   `keyspace.rs` (RENAME, COPY, FLUSHDB, and MOVE, SWAPDB, COPY … DB, FLUSHALL, which
//!   span databases) and `reads.rs` (the reads a transaction logs).
//! - A snapshot, at recovery (`snapshot.rs`: [`Db::load`] and the methods around it).
//!
//! # How data leaves
//!
//! - The read API: [`Db::keyspace`] and [`Keyspace::get`], `iter`, `scan`, `due`,
//!   `random_key` and the counters. A reader passes its own clock reading and sees an
//!   expired key as missing.
//! - [`OpResult`]s, which the command layer turns into replies.
//! - The compaction walk (`snapshot.rs`: [`Db::start_tracking`], [`Db::snapshot_step`],
//!   [`Db::end_tracking`]), which reads the map as it was at one log index while writes
//!   go on (`keymap.rs` explains how).
//!
//! # Invariants
//!
//! Each database's expiry index holds exactly the (deadline, key hash) of its keys that
//! have a deadline, its deadline sum is their sum, and its live byte count is the sum of
//! `item_cost` over its keys: every change of a key goes through `Keyspace::insert`,
//! `Keyspace::remove`, `Keyspace::set_expiry` or one of the few hot paths that keep
//! them in step by hand (SET, INCRBY, APPEND/SETRANGE's in-place edit). Tests check this
//! after every operation (`Keyspace::check_invariants`).
//!
//! Whoever holds a `&mut Db` is applying committed entries: the store keeps its `Db`
//! under a mutex and hands out only shared references to readers.

mod command;
mod exec;
pub mod keymap;
mod keyspace;
pub mod op;
mod reads;
mod snapshot;
mod strings;

pub use command::Command;
pub use keyspace::{ERR_SAME, MAX_HINTS, spans_databases};
pub use op::{Condition, Expiry, Op};
pub use reads::is_read_record;
pub use strings::{ERR_TOO_BIG, MAX_STRING_LEN, fits as string_fits, substring};

use keymap::{KeyMap, Slot};
use std::collections::BTreeSet;

/// What applying one operation produced (the command layer turns it into a reply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpResult {
    /// Done (`+OK`).
    Ok,
    /// A condition (NX/XX) was not met; nothing changed (nil).
    NotSet,
    /// The previous value, for SET … GET (nil if there was none).
    Old(Option<Vec<u8>>),
    Int(i64),
    /// The operation was refused without effect; the text is the Redis error reply.
    Error(&'static str),
    /// A read inside a transaction that answers a status (TYPE).
    Status(&'static str),
    /// A read inside a transaction that answers an array (MGET, KEYS).
    Array(Vec<OpResult>),
    /// A transaction's results, one per op in order.
    Multi(Vec<OpResult>),
    /// A transaction not logged because a key its client WATCHed changed (EXEC's nil).
    Aborted,
}

/// A stored value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub value: Box<[u8]>,
    /// Absolute expiry in Unix ms; 0 = none.
    pub expire_at: u64,
}

impl Item {
    /// Whether the item is expired at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expire_at != 0 && self.expire_at <= now_ms
    }
}

/// Approximate bytes a key costs beyond its key and value (hash slot and allocations);
/// only used to decide when the log has outgrown the data.
const ITEM_OVERHEAD: u64 = 48;

/// Redis's default number of databases (`--databases`).
pub const DEFAULT_DATABASES: u32 = 16;

/// The state machine that log entries drive: the databases (Redis's `SELECT` indexes),
/// each its own [`Keyspace`], and the index of the last entry applied.
///
/// A command names its database ([`Command::db`]); [`Db::apply_op`] runs an operation in
/// one database (a transaction calls it once per queued command, each with its own
/// database) and routes the commands that span databases (MOVE, SWAPDB, COPY … DB,
/// FLUSHALL) to the code that sees them all (`keyspace.rs`).
#[derive(Debug)]
pub struct Db {
    dbs: Vec<Keyspace>,
    /// What a read of a database that does not exist sees (never written).
    empty: Keyspace,
    /// Index of the last applied entry.
    applied: u64,
}

impl Default for Db {
    fn default() -> Self {
        Db::new(DEFAULT_DATABASES)
    }
}

/// One database: its keys, the expiry index over them, and its counters.
#[derive(Debug, Default)]
pub struct Keyspace {
    map: KeyMap,
    /// Every key with an expiry as (deadline, key hash), ordered by deadline, so the
    /// active expirer finds the expired ones without scanning (and without a pause that
    /// grows with the key count); 16 bytes a key, no copy of it ([`KeyMap`]).
    expires: BTreeSet<(u64, u64)>,
    /// Sum of the deadlines in `expires`, so INFO's `avg_ttl` costs nothing to compute.
    deadline_sum: u128,
    /// Approximate live bytes (keys, values, overhead).
    live_bytes: u64,
    /// Keys removed because they expired (INFO's `expired_keys`).
    expired_keys: u64,
    /// While a snapshot loads: the deadlines of its keys, from which the index is built
    /// at once when it ends ([`Db::finish_load`]). Empty otherwise.
    loading: Vec<(u64, u64)>,
}

/// INCRBY of a value that is not an integer (also the command layer's reply to an
/// argument that is not one).
pub const ERR_NOT_INTEGER: &str = "ERR value is not an integer or out of range";
/// INCRBY past the range of i64.
pub const ERR_OVERFLOW: &str = "ERR increment or decrement would overflow";
/// A database index beyond `--databases` (dispatch checks it too; only a log written
/// with more databases makes applying meet it).
pub const ERR_DB_RANGE: &str = "ERR DB index is out of range";

impl Db {
    /// `databases` empty databases (at least one).
    pub fn new(databases: u32) -> Db {
        Db {
            dbs: (0..databases.max(1)).map(|_| Keyspace::default()).collect(),
            empty: Keyspace::default(),
            applied: 0,
        }
    }

    /// How many databases there are (`SELECT` takes 0 to this minus one).
    pub fn databases(&self) -> u32 {
        self.dbs.len() as u32
    }

    /// Database `db`; one that does not exist reads as empty.
    pub fn keyspace(&self, db: u32) -> &Keyspace {
        self.dbs.get(db as usize).unwrap_or(&self.empty)
    }

    /// Every database, by index.
    pub fn keyspaces(&self) -> &[Keyspace] {
        &self.dbs
    }

    fn keyspace_mut(&mut self, db: u32) -> Option<&mut Keyspace> {
        self.dbs.get_mut(db as usize)
    }

    fn keyspaces_mut(&mut self) -> &mut [Keyspace] {
        &mut self.dbs
    }

    /// Keys in every database, including expired ones not yet removed.
    pub fn len(&self) -> usize {
        self.dbs.iter().map(Keyspace::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.dbs.iter().all(Keyspace::is_empty)
    }

    pub fn applied_index(&self) -> u64 {
        self.applied
    }

    /// Approximate live bytes of every database.
    pub fn live_bytes(&self) -> u64 {
        self.dbs.iter().map(|k| k.live_bytes).sum()
    }

    /// Keys removed because they expired, in every database (INFO's `expired_keys`).
    pub fn expired_keys(&self) -> u64 {
        self.dbs.iter().map(|k| k.expired_keys).sum()
    }

    /// Before a batch is applied: loads the table places of its SETs' keys, so that
    /// their cache misses overlap instead of coming one after the other
    /// ([`KeyMap::touch`]). Changes nothing.
    pub fn touch(&self, entries: &[(u64, Command)]) {
        let Some((_, first)) = entries.first() else {
            return;
        };
        if entries.len() < 2 {
            return;
        }
        let mut hashes = [0; crate::protocol::PEEK_KEYS];
        let mut n = 0;
        let ks = self.keyspace(first.db);
        for (_, c) in entries {
            if let (Op::Set { key, .. }, true) = (&c.op, c.db == first.db) {
                hashes[n] = ks.map.hash(key);
                n += 1;
                if n == hashes.len() {
                    break;
                }
            }
        }
        std::hint::black_box(ks.map.touch(&hashes[..n]));
    }

    /// Applies the command of the committed entry at log `index`. Deterministic: depends
    /// only on the databases and the command (a no-op, [`Command::noop`], moves the
    /// applied index and nothing else).
    pub fn apply(&mut self, index: u64, command: Command) -> OpResult {
        self.applied = index;
        self.apply_op(command.db, command.op, command.ts_ms)
    }

    /// Applies `op` in database `db` at the entry time `now` (what [`Db::apply`] does for
    /// one entry, and a transaction for each of its commands). A database that does not
    /// exist is `ERR DB index is out of range` without effect: dispatch checks indexes
    /// against the same count, so only a log written with more databases meets it.
    fn apply_op(&mut self, db: u32, op: Op, now: u64) -> OpResult {
        if let Op::Multi { ops } = op {
            // Every op in order, each in its own database, under the one map lock the
            // caller holds: no reader sees the transaction half done. The decoder refuses
            // nesting, so this recursion is one level.
            return OpResult::Multi(
                ops.into_iter()
                    .map(|(db, op)| match op {
                        Op::Multi { .. } => OpResult::Error(exec::ERR_BAD_RECORD),
                        op => self.apply_op(db, op, now),
                    })
                    .collect(),
            );
        }
        if let Op::Cmd { args } = &op
            && spans_databases(args)
        {
            return self.exec_databases(db, args, now);
        }
        match self.dbs.get_mut(db as usize) {
            Some(ks) => ks.apply_op(op, now),
            None => OpResult::Error(ERR_DB_RANGE),
        }
    }
}

fn item_cost(k: &[u8], v: &[u8]) -> u64 {
    (k.len() + v.len()) as u64 + ITEM_OVERHEAD
}

impl Keyspace {
    /// Loads the table places of `keys` (requests about to run), so that their cache
    /// misses overlap instead of coming one after the other ([`KeyMap::touch`]).
    /// Changes nothing.
    pub fn touch(&self, keys: &[&[u8]]) {
        let mut hashes = [0; crate::protocol::PEEK_KEYS];
        let n = keys.len().min(hashes.len());
        for (h, k) in hashes.iter_mut().zip(keys) {
            *h = self.map.hash(k);
        }
        std::hint::black_box(self.map.touch(&hashes[..n]));
    }

    /// The live item under `key` at `now_ms`, if any.
    pub fn get(&self, key: &[u8], now_ms: u64) -> Option<&Item> {
        self.map.get(key).filter(|i| !i.expired(now_ms))
    }

    /// Number of keys, including expired ones not yet removed (as Redis's DBSIZE).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn live_bytes(&self) -> u64 {
        self.live_bytes
    }

    /// Every live key and item (unordered).
    pub fn iter(&self, now_ms: u64) -> impl Iterator<Item = (&[u8], &Item)> {
        self.map.iter().filter(move |(_, i)| !i.expired(now_ms))
    }

    /// Number of keys with an expiry.
    pub fn expiring(&self) -> usize {
        self.expires.len()
    }

    /// The average time to live of the keys with an expiry at `now`, in ms (0 if none),
    /// as INFO's `avg_ttl` (Redis estimates it by sampling; this is exact).
    pub fn avg_ttl(&self, now: u64) -> u64 {
        let n = self.expires.len() as u128;
        if n == 0 {
            return 0;
        }
        (self.deadline_sum / n).saturating_sub(u128::from(now)) as u64
    }

    /// Adds `(at, hash)` to the expiry index.
    fn index_add(&mut self, at: u64, h: u64) {
        if self.expires.insert((at, h)) {
            self.deadline_sum += u128::from(at);
        }
    }

    /// Removes `(at, hash)` from the expiry index.
    fn index_remove(&mut self, at: u64, h: u64) {
        if self.expires.remove(&(at, h)) {
            self.deadline_sum -= u128::from(at);
        }
    }

    /// Empties the database (FLUSHDB), handing back its old contents to be freed; INFO's
    /// counters stay.
    fn flush(&mut self) -> Keyspace {
        let expired_keys = self.expired_keys;
        let old = std::mem::take(self);
        self.expired_keys = expired_keys;
        old
    }

    /// Up to `max` keys whose deadline is at or before `now`, earliest first.
    pub fn due(&self, now: u64, max: usize) -> Vec<Vec<u8>> {
        self.expires
            .iter()
            .take_while(|(at, _)| *at <= now)
            .filter_map(|&(at, h)| self.map.find_by_hash(h, |_, i| i.expire_at == at))
            .take(max)
            .map(|(k, _)| k.to_vec())
            .collect()
    }

    /// Whether `key` exists but is expired at `now` (a reader's hint for the expirer).
    pub fn is_expired(&self, key: &[u8], now: u64) -> bool {
        self.map.get(key).is_some_and(|i| i.expired(now))
    }

    /// Keys removed because they expired (INFO's `expired_keys`).
    pub fn expired_keys(&self) -> u64 {
        self.expired_keys
    }

    /// SCAN: calls `f` with every key (expired ones included: the caller filters) of the
    /// buckets at `cursor` and returns the next cursor, 0 when the walk is done
    /// ([`KeyMap::scan`] explains the guarantees).
    pub fn scan(&self, cursor: u64, f: impl FnMut(&[u8], &Item)) -> u64 {
        self.map.scan(cursor, f)
    }

    /// The tag of the compaction tracking this database, if one is
    /// ([`Db::start_tracking`]).
    pub fn tracking(&self) -> Option<u64> {
        self.map.tracking()
    }

    /// Stores `item` under `key` and returns the item it replaced, keeping the expiry
    /// index and the byte count in step (the reference path: the hot paths that do this
    /// by hand are checked against it).
    fn insert(&mut self, key: Box<[u8]>, item: Item) -> Option<Item> {
        let key_len = key.len() as u64;
        let new_at = item.expire_at;
        let old_at = self.map.get(&key[..]).map_or(0, |o| o.expire_at);
        if old_at != new_at {
            let h = self.map.hash(&key);
            if old_at != 0 {
                self.index_remove(old_at, h);
            }
            if new_at != 0 {
                self.index_add(new_at, h);
            }
        }
        self.live_bytes += key_len + item.value.len() as u64 + ITEM_OVERHEAD;
        let old = self.map.insert(key, item);
        if let Some(o) = &old {
            self.live_bytes -= key_len + o.value.len() as u64 + ITEM_OVERHEAD;
        }
        old
    }

    /// Drops `key` and returns its item, keeping the index and byte count in step.
    fn remove(&mut self, key: &[u8]) -> Option<Item> {
        let old = self.map.remove(key);
        if let Some(o) = &old {
            self.live_bytes = self.live_bytes.saturating_sub(item_cost(key, &o.value));
            self.forget_expiry(o.expire_at, key);
        }
        old
    }

    /// Drops `key`'s entry from the expiry index (after its deadline changed or it went).
    fn forget_expiry(&mut self, at: u64, key: &[u8]) {
        if at != 0 {
            self.index_remove(at, self.map.hash(key));
        }
    }

    /// Sets `key`'s deadline (0 = none), keeping the index in step. The key must exist.
    fn set_expiry(&mut self, key: &[u8], at: u64) {
        let Some(item) = self.map.get_mut(key) else {
            return;
        };
        let old = std::mem::replace(&mut item.expire_at, at);
        if old == at {
            return;
        }
        self.forget_expiry(old, key);
        if at != 0 {
            self.index_add(at, self.map.hash(key));
        }
    }

    /// Removes `key` if it exists but expired at `now`, so that the operation applied next
    /// sees it as missing.
    fn purge_expired(&mut self, key: &[u8], now: u64) {
        if self.map.get(key).is_some_and(|i| i.expired(now)) {
            self.remove(key);
            self.expired_keys += 1;
        }
    }

    /// SET with one hash lookup: the hot path of every write benchmark.
    fn apply_set(
        &mut self,
        key: Vec<u8>,
        value: Vec<u8>,
        expiry: Expiry,
        condition: Condition,
        get: bool,
        now: u64,
    ) -> OpResult {
        let value = value.into_boxed_slice();
        let new_len = value.len() as u64;
        let key_len = key.len() as u64;
        let h = self.map.hash(&key);
        let slot = self.map.slot_hashed(h, &key);
        let live = match &slot {
            Slot::Occupied(o) if !o.get().1.expired(now) => Some(&o.get().1),
            _ => None,
        };
        let ok = match condition {
            Condition::Always => true,
            Condition::IfMissing => live.is_none(),
            Condition::IfExists => live.is_some(),
        };
        let old = if get {
            live.map(|i| i.value.to_vec())
        } else {
            None
        };
        let expire_at = match expiry {
            Expiry::Never => 0,
            Expiry::At(t) => t,
            Expiry::Keep => live.map_or(0, |i| i.expire_at),
        };
        // A deadline already past deletes the key, as in Redis.
        let delete = ok && expire_at != 0 && expire_at <= now;
        // The deadline index changes only for keys that have or get a deadline; the common
        // SET of a key without one touches nothing but the map.
        let mut index_out = 0;
        let mut index_in = 0;
        match slot {
            Slot::Occupied(mut o) => {
                let dead = o.get().1.expired(now);
                let old_at = o.get().1.expire_at;
                if delete || (dead && !ok) {
                    index_out = old_at;
                    let ((_, gone), _) = o.remove();
                    self.live_bytes -= key_len + gone.value.len() as u64 + ITEM_OVERHEAD;
                    if dead {
                        self.expired_keys += 1;
                    }
                } else if ok {
                    if old_at != expire_at {
                        index_out = old_at;
                        index_in = expire_at;
                    }
                    let prev = std::mem::replace(o.get_mut().1, Item { value, expire_at });
                    // Plus the new value, minus the old (wrapping: a shrink subtracts).
                    self.live_bytes = self
                        .live_bytes
                        .wrapping_add(new_len.wrapping_sub(prev.value.len() as u64));
                }
            }
            Slot::Vacant(v) => {
                if ok && !delete {
                    index_in = expire_at;
                    self.live_bytes += key_len + new_len + ITEM_OVERHEAD;
                    v.insert((key, Item { value, expire_at }));
                }
            }
        }
        if index_out != 0 {
            self.index_remove(index_out, h);
        }
        if index_in != 0 {
            self.index_add(index_in, h);
        }
        match (get, ok) {
            (true, _) => OpResult::Old(old),
            (false, true) => OpResult::Ok,
            (false, false) => OpResult::NotSet,
        }
    }

    /// Applies an operation that stays within this database, at the entry time `now`.
    /// Deterministic: depends only on the map and the operation.
    fn apply_op(&mut self, op: Op, now: u64) -> OpResult {
        match op {
            Op::Noop => OpResult::Ok,
            // A transaction spans databases, so `Db::apply_op` takes it apart; one here is
            // nested inside another, which the decoder refuses.
            Op::Multi { .. } => OpResult::Error(exec::ERR_BAD_RECORD),
            Op::Cmd { args } => self.exec(args, now),
            Op::Set {
                key,
                value,
                expiry,
                condition,
                get,
            } => self.apply_set(key, value, expiry, condition, get, now),
            Op::Del { keys } => {
                let mut n = 0;
                for k in keys {
                    self.purge_expired(&k, now);
                    if self.remove(&k).is_some() {
                        n += 1;
                    }
                }
                OpResult::Int(n)
            }
            Op::MSet {
                pairs,
                only_if_none_exist,
            } => {
                if only_if_none_exist {
                    for (k, _) in &pairs {
                        self.purge_expired(k, now);
                    }
                    if pairs.iter().any(|(k, _)| self.map.contains_key(&k[..])) {
                        return OpResult::Int(0);
                    }
                }
                for (k, v) in pairs {
                    self.insert(
                        k.into_boxed_slice(),
                        Item {
                            value: v.into_boxed_slice(),
                            expire_at: 0,
                        },
                    );
                }
                if only_if_none_exist {
                    OpResult::Int(1)
                } else {
                    OpResult::Ok
                }
            }
            Op::IncrBy { key, delta } => {
                // The hot path of counters: one lookup. The deadline is kept, so the
                // expiry index is untouched unless the key had expired.
                if let Some(item) = self.map.get_mut(&key[..])
                    && !item.expired(now)
                {
                    let Some(cur) = parse_i64(&item.value) else {
                        return OpResult::Error(ERR_NOT_INTEGER);
                    };
                    let Some(new) = cur.checked_add(delta) else {
                        return OpResult::Error(ERR_OVERFLOW);
                    };
                    let text = new.to_string().into_bytes().into_boxed_slice();
                    let old_len = std::mem::replace(&mut item.value, text).len();
                    let new_len = item.value.len();
                    self.live_bytes = self.live_bytes + new_len as u64 - old_len as u64;
                    return OpResult::Int(new);
                }
                // A missing (or expired) key counts as 0.
                self.purge_expired(&key, now);
                let new = delta;
                self.insert(
                    key.into_boxed_slice(),
                    Item {
                        value: new.to_string().into_bytes().into_boxed_slice(),
                        expire_at: 0,
                    },
                );
                OpResult::Int(new)
            }
        }
    }
}

/// Parses a value as Redis does for INCR: optional `-`, decimal digits, no leading `+`,
/// spaces or leading zeros, within i64.
pub fn parse_i64(b: &[u8]) -> Option<i64> {
    if b.is_empty() || b.len() > 20 {
        return None;
    }
    let s = std::str::from_utf8(b).ok()?;
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.is_empty()
        || !digits.bytes().all(|c| c.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
        || s == "-0"
    {
        return None;
    }
    s.parse().ok()
}

/// Test helpers shared by the tests of this module and of the store and commands.
#[cfg(test)]
impl Keyspace {
    /// Every (key, value, deadline), sorted, expired keys included.
    pub(crate) fn contents(&self) -> Vec<(Vec<u8>, Vec<u8>, u64)> {
        let mut v: Vec<_> = self
            .map
            .iter()
            .map(|(k, i)| (k.to_vec(), i.value.to_vec(), i.expire_at))
            .collect();
        v.sort();
        v
    }

    /// Pre-images the compaction tracking this database holds (what tracking costs).
    pub(crate) fn preimages(&self) -> usize {
        self.map.preimages()
    }

    /// The expiry index, the deadline sum and the live byte count agree with the map:
    /// rebuilding them from its items through [`Keyspace::insert`] gives the same.
    pub(crate) fn check_invariants(&self) {
        let mut fresh = Keyspace::default();
        for (k, i) in &self.map {
            fresh.insert(k.into(), i.clone());
        }
        assert_eq!(self.expires, fresh.expires, "expiry index out of step");
        assert_eq!(
            self.deadline_sum, fresh.deadline_sum,
            "deadline sum out of step"
        );
        assert_eq!(self.live_bytes, fresh.live_bytes, "live_bytes out of step");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command in database 0 at log `index`.
    fn entry(index: u64, ts_ms: u64, op: Op) -> (u64, Command) {
        (index, Command { ts_ms, db: 0, op })
    }

    /// [`Db::apply`] of what [`entry`] built.
    trait ApplyEntry {
        fn apply_entry(&mut self, e: (u64, Command)) -> OpResult;
    }

    impl ApplyEntry for Db {
        fn apply_entry(&mut self, (index, command): (u64, Command)) -> OpResult {
            self.apply(index, command)
        }
    }

    fn set_op(k: &str, v: &str, expiry: Expiry, condition: Condition, get: bool) -> Op {
        Op::Set {
            key: k.into(),
            value: v.into(),
            expiry,
            condition,
            get,
        }
    }

    fn cmd(parts: &[&str]) -> Op {
        Op::Cmd {
            args: parts.iter().map(|p| p.as_bytes().to_vec()).collect(),
        }
    }

    /// One database's (key, value, deadline), sorted, expired keys included.
    type Contents = Vec<(Vec<u8>, Vec<u8>, u64)>;

    /// Each database's contents.
    fn contents(db: &Db) -> Vec<Contents> {
        db.keyspaces().iter().map(Keyspace::contents).collect()
    }

    /// Every database's expiry index, deadline sum and live bytes agree with its map.
    fn check_invariants(db: &Db) {
        for ks in db.keyspaces() {
            ks.check_invariants();
        }
    }

    #[test]
    fn set_conditions_and_get() {
        let mut db = Db::default();
        let a = Condition::Always;
        assert_eq!(
            db.apply_entry(entry(
                1,
                0,
                set_op("k", "1", Expiry::Never, Condition::IfExists, false)
            )),
            OpResult::NotSet
        );
        assert_eq!(
            db.apply_entry(entry(
                2,
                0,
                set_op("k", "1", Expiry::Never, Condition::IfMissing, false)
            )),
            OpResult::Ok
        );
        assert_eq!(
            db.apply_entry(entry(
                3,
                0,
                set_op("k", "2", Expiry::Never, Condition::IfMissing, true)
            )),
            OpResult::Old(Some(b"1".to_vec()))
        );
        assert_eq!(db.keyspace(0).get(b"k", 0).unwrap().value[..], b"1"[..]);
        assert_eq!(
            db.apply_entry(entry(4, 0, set_op("k", "3", Expiry::Never, a, true))),
            OpResult::Old(Some(b"1".to_vec()))
        );
        assert_eq!(db.applied_index(), 4);
    }

    #[test]
    fn expiry_is_decided_by_entry_time_not_the_clock() {
        let mut db = Db::default();
        db.apply_entry(entry(
            1,
            100,
            set_op("k", "v", Expiry::At(200), Condition::Always, false),
        ));
        assert!(db.keyspace(0).get(b"k", 150).is_some());
        assert!(db.keyspace(0).get(b"k", 200).is_none());
        // NX at ts 150: key still live, refused; at ts 250: expired, so missing, accepted.
        let nx = set_op("k", "w", Expiry::Never, Condition::IfMissing, false);
        assert_eq!(db.apply_entry(entry(2, 150, nx.clone())), OpResult::NotSet);
        assert_eq!(db.apply_entry(entry(3, 250, nx)), OpResult::Ok);
        assert_eq!(
            db.keyspace(0).get(b"k", u64::MAX).unwrap().value[..],
            b"w"[..]
        );
        // KEEPTTL keeps the deadline.
        db.apply_entry(entry(
            4,
            300,
            set_op("t", "1", Expiry::At(900), Condition::Always, false),
        ));
        db.apply_entry(entry(
            5,
            300,
            set_op("t", "2", Expiry::Keep, Condition::Always, false),
        ));
        assert_eq!(db.keyspace(0).get(b"t", 0).unwrap().expire_at, 900);
        // A deadline already past deletes.
        db.apply_entry(entry(
            6,
            1000,
            set_op("t", "3", Expiry::At(999), Condition::Always, false),
        ));
        assert!(db.keyspace(0).get(b"t", 0).is_none());
    }

    #[test]
    fn incr_rules() {
        let mut db = Db::default();
        let incr = |k: &str, d| Op::IncrBy {
            key: k.into(),
            delta: d,
        };
        assert_eq!(db.apply_entry(entry(1, 0, incr("n", 5))), OpResult::Int(5));
        assert_eq!(
            db.apply_entry(entry(2, 0, incr("n", -7))),
            OpResult::Int(-2)
        );
        db.apply_entry(entry(
            3,
            0,
            set_op("s", "abc", Expiry::Never, Condition::Always, false),
        ));
        assert_eq!(
            db.apply_entry(entry(4, 0, incr("s", 1))),
            OpResult::Error(ERR_NOT_INTEGER)
        );
        db.apply_entry(entry(5, 0, incr("m", i64::MAX)));
        assert_eq!(
            db.apply_entry(entry(6, 0, incr("m", 1))),
            OpResult::Error(ERR_OVERFLOW)
        );
        assert_eq!(
            db.keyspace(0).get(b"m", 0).unwrap().value[..],
            i64::MAX.to_string().as_bytes()[..]
        );
        for bad in ["", " 1", "+1", "01", "-0", "1.0", "99999999999999999999"] {
            assert_eq!(parse_i64(bad.as_bytes()), None, "{bad:?}");
        }
        assert_eq!(parse_i64(b"-9223372036854775808"), Some(i64::MIN));
    }

    #[test]
    fn del_and_msetnx() {
        let mut db = Db::default();
        let pairs = |ps: &[(&str, &str)]| {
            ps.iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect::<Vec<_>>()
        };
        let mset = |ps, nx| Op::MSet {
            pairs: ps,
            only_if_none_exist: nx,
        };
        assert_eq!(
            db.apply_entry(entry(1, 0, mset(pairs(&[("a", "1"), ("b", "2")]), true))),
            OpResult::Int(1)
        );
        assert_eq!(
            db.apply_entry(entry(2, 0, mset(pairs(&[("b", "3"), ("c", "4")]), true))),
            OpResult::Int(0)
        );
        assert!(db.keyspace(0).get(b"c", 0).is_none());
        let del = Op::Del {
            keys: vec![b"a".to_vec(), b"a".to_vec(), b"zz".to_vec(), b"b".to_vec()],
        };
        assert_eq!(db.apply_entry(entry(3, 0, del)), OpResult::Int(2));
        assert!(db.is_empty());
        assert_eq!(db.live_bytes(), 0);
    }

    #[test]
    fn live_bytes_tracks_overwrites() {
        let mut db = Db::default();
        db.apply_entry(entry(
            1,
            0,
            set_op("k", "aaaa", Expiry::Never, Condition::Always, false),
        ));
        let one = db.live_bytes();
        db.apply_entry(entry(
            2,
            0,
            set_op("k", "bbbb", Expiry::Never, Condition::Always, false),
        ));
        assert_eq!(db.live_bytes(), one);
        db.apply_entry(entry(
            3,
            0,
            Op::Del {
                keys: vec![b"k".to_vec()],
            },
        ));
        assert_eq!(db.live_bytes(), 0);
    }

    /// The log's no-op entry (an empty payload) moves the applied index and nothing else.
    #[test]
    fn a_noop_entry_only_moves_the_applied_index() {
        let mut db = Db::new(2);
        db.apply_entry(entry(
            1,
            0,
            set_op("k", "v", Expiry::Never, Condition::Always, false),
        ));
        let noop = Command::decode(&[]).unwrap();
        assert_eq!(db.apply(2, noop), OpResult::Ok);
        assert_eq!(db.applied_index(), 2);
        assert_eq!(db.keyspace(0).len(), 1);
        assert_eq!(db.keyspace(1).len(), 0);
    }

    /// Operations apply to their own database only; MOVE, SWAPDB, COPY … DB, FLUSHDB and
    /// FLUSHALL act across databases as Redis's do, and an index beyond the count is
    /// refused without effect.
    #[test]
    fn apply_keeps_databases_apart() {
        let mut db = Db::new(4);
        let mut i = 0;
        let mut ap = |db: &mut Db, d: u32, now: u64, op: Op| {
            i += 1;
            let r = db.apply(
                i,
                Command {
                    ts_ms: now,
                    db: d,
                    op,
                },
            );
            check_invariants(db);
            r
        };
        let set = |k: &str, v: &str, at: u64| Op::Set {
            key: k.into(),
            value: v.into(),
            expiry: Expiry::from_deadline(at),
            condition: Condition::Always,
            get: false,
        };
        for d in 0..4 {
            ap(&mut db, d, 0, set("k", &format!("v{d}"), 0));
        }
        assert_eq!(
            ap(&mut db, 4, 0, set("k", "x", 0)),
            OpResult::Error(ERR_DB_RANGE)
        );
        assert_eq!(
            ap(
                &mut db,
                1,
                0,
                Op::IncrBy {
                    key: b"n".to_vec(),
                    delta: 2
                }
            ),
            OpResult::Int(2)
        );
        assert_eq!(
            db.keyspace(1).get(b"n", 0).map(|i| &i.value[..]),
            Some(&b"2"[..])
        );
        assert!(db.keyspace(0).get(b"n", 0).is_none());
        assert_eq!(db.len(), 5);
        assert!(
            db.keyspace(9).is_empty(),
            "a database that does not exist reads empty"
        );
        // MOVE: the key and its deadline go; not onto an existing key; not to itself.
        ap(&mut db, 0, 0, set("t", "tv", 500));
        assert_eq!(
            ap(&mut db, 0, 10, cmd(&["MOVE", "t", "2"])),
            OpResult::Int(1)
        );
        assert!(db.keyspace(0).get(b"t", 10).is_none());
        assert_eq!(db.keyspace(2).get(b"t", 10).map(|i| i.expire_at), Some(500));
        assert_eq!(db.keyspace(2).expiring(), 1);
        assert_eq!(db.keyspace(0).expiring(), 0);
        assert_eq!(
            ap(&mut db, 0, 10, cmd(&["MOVE", "k", "2"])),
            OpResult::Int(0)
        );
        assert_eq!(
            ap(&mut db, 0, 10, cmd(&["MOVE", "nope", "2"])),
            OpResult::Int(0)
        );
        assert_eq!(
            ap(&mut db, 0, 10, cmd(&["MOVE", "k", "0"])),
            OpResult::Error("ERR source and destination objects are the same")
        );
        assert_eq!(
            ap(&mut db, 0, 10, cmd(&["MOVE", "k", "4"])),
            OpResult::Error(ERR_DB_RANGE)
        );
        assert_eq!(
            ap(&mut db, 0, 10, cmd(&["MOVE", "k", "x"])),
            OpResult::Error(exec::ERR_BAD_RECORD)
        );
        // An expired key in the target does not block a MOVE (it is deleted first); an
        // expired source is missing.
        assert_eq!(
            ap(&mut db, 2, 600, cmd(&["MOVE", "t", "0"])),
            OpResult::Int(0)
        );
        assert_eq!(db.keyspace(2).expired_keys, 1);
        ap(&mut db, 3, 600, set("e", "old", 700));
        ap(&mut db, 1, 600, set("e", "new", 0));
        assert_eq!(
            ap(&mut db, 1, 800, cmd(&["MOVE", "e", "3"])),
            OpResult::Int(1)
        );
        assert_eq!(
            db.keyspace(3).get(b"e", 800).map(|i| &i.value[..]),
            Some(&b"new"[..])
        );
        // COPY … DB keeps the source, copies the deadline, REPLACE overwrites.
        ap(&mut db, 0, 0, set("c", "cv", 9000));
        assert_eq!(
            ap(&mut db, 0, 0, cmd(&["COPY", "c", "k", "DB", "1"])),
            OpResult::Int(0)
        );
        assert_eq!(
            ap(
                &mut db,
                0,
                0,
                cmd(&["COPY", "c", "k", "DB", "1", "REPLACE"])
            ),
            OpResult::Int(1)
        );
        assert_eq!(db.keyspace(1).get(b"k", 0).map(|i| i.expire_at), Some(9000));
        assert!(db.keyspace(0).get(b"c", 0).is_some());
        assert_eq!(
            ap(&mut db, 0, 0, cmd(&["COPY", "c", "c", "DB", "2"])),
            OpResult::Int(1)
        );
        assert_eq!(
            ap(&mut db, 0, 0, cmd(&["COPY", "c", "z", "DB", "9"])),
            OpResult::Error(ERR_DB_RANGE)
        );
        // SWAPDB exchanges whole databases.
        let before = contents(&db);
        assert_eq!(ap(&mut db, 3, 0, cmd(&["SWAPDB", "0", "2"])), OpResult::Ok);
        let after = contents(&db);
        assert_eq!((&after[0], &after[2]), (&before[2], &before[0]));
        assert_eq!((&after[1], &after[3]), (&before[1], &before[3]));
        assert_eq!(ap(&mut db, 0, 0, cmd(&["SWAPDB", "1", "1"])), OpResult::Ok);
        assert_eq!(
            ap(&mut db, 0, 0, cmd(&["SWAPDB", "1", "4"])),
            OpResult::Error(ERR_DB_RANGE)
        );
        assert_eq!(contents(&db), after);
        // FLUSHDB empties its own database, FLUSHALL every one.
        assert_eq!(ap(&mut db, 1, 0, cmd(&["FLUSHDB"])), OpResult::Ok);
        assert!(db.keyspace(1).is_empty());
        assert!(!db.keyspace(0).is_empty() && !db.keyspace(3).is_empty());
        assert_eq!(ap(&mut db, 2, 0, cmd(&["FLUSHALL"])), OpResult::Ok);
        assert!(db.is_empty());
        assert_eq!((db.live_bytes(), db.expired_keys()), (0, 2));
        assert_eq!(db.applied_index(), i);
        // A transaction applies each of its operations in its own database.
        assert_eq!(db.apply_op(3, set("m", "1", 0), 0), OpResult::Ok);
        assert_eq!(db.keyspace(3).len(), 1);
    }

    #[test]
    fn avg_ttl_is_the_mean_time_left() {
        let mut ks = Keyspace::default();
        assert_eq!(ks.avg_ttl(0), 0);
        let item = |at| Item {
            value: Box::from(&b"v"[..]),
            expire_at: at,
        };
        ks.insert(Box::from(&b"a"[..]), item(1000));
        ks.insert(Box::from(&b"b"[..]), item(3000));
        ks.insert(Box::from(&b"c"[..]), item(0));
        assert_eq!(ks.avg_ttl(0), 2000);
        assert_eq!(ks.avg_ttl(500), 1500);
        assert_eq!(ks.avg_ttl(10_000), 0);
        ks.remove(b"b");
        assert_eq!(ks.avg_ttl(0), 1000);
    }
}
