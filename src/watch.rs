//! WATCH: which clients watch which keys, and whether a write has touched them since.
//!
//! [`Watches`] lives in the [`Store`](crate::Store) and is fed from two sides:
//! - WATCH, UNWATCH, EXEC, DISCARD and closing connections register and clear a client's
//!   keys ([`Watches::watch`], [`Watches::settle`], [`Watches::unwatch`]);
//! - the write path tells it of every operation *as it is queued* for the log
//!   ([`Watches::on_queue`], called under the lock that assigns log order). A write to a
//!   watched key marks each of its watchers dirty; an EXEC (a transaction queued with its
//!   client's id) is checked in the same call, so the check sits exactly at the
//!   transaction's place in the log order.
//!
//! # Why at queue time, not at apply time
//!
//! Writes are applied by the log writer after their fsync, later than they were queued.
//! Checking EXEC against the applied map would miss writes that are queued ahead of the
//! transaction but not yet applied; checking it when the transaction is *applied* would
//! make the logged entry conditional on leader-only state that followers do not have.
//! Deciding when the entry is queued needs neither: the logged transaction is
//! unconditional, and the leader alone decides whether to log it.
//!
//! # What counts as a change (Redis 7 semantics, tests/unit/multi.tcl)
//!
//! WATCH records whether each key was present (live) and, if so, its deadline. Then:
//! - an op that may create or overwrite the key (SET, INCR, APPEND, …) marks it dirty;
//! - an op that can only remove or alter an existing key (DEL, EXPIRE, PERSIST, GETDEL,
//!   the expirer's deletions, the source of RENAME) marks it dirty only if the key was
//!   present at WATCH: had it been created since, that write would have marked it
//!   already, so an absent (or already expired, "stale") key is still absent and the op
//!   changes nothing;
//! - FLUSHALL/FLUSHDB mark every watched key that was present, by the same argument;
//! - keys are watched in a database (WATCH remembers the connection's SELECT), and a
//!   write marks only the watchers of its key in its own database; commands that span
//!   databases (MOVE, SWAPDB, COPY … DB) count as touching every database, FLUSHDB every
//!   key of its own;
//! - a key present at WATCH whose deadline has passed by the EXEC's time aborts it (it
//!   expired in between), whether or not the expirer has deleted it yet.
//!
//! The rules are conservative where the queue cannot know the outcome (a SET NX that
//! will not apply still marks its key): a needless abort makes a client retry, a missed
//! one would break its transaction. Op shapes are matched here rather than through the
//! command table's key positions because the log holds canonical forms (`PEXPIREAT` for
//! EXPIRE, `EXPIRED` for the expirer), and a canonical name this module does not know
//! marks everything, so a new write command can never slip past a WATCH.

use crate::db::Op;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

/// What WATCH saw of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// Registered, not yet read (WATCH is waiting for earlier writes to apply).
    Unknown,
    /// Missing or already expired.
    Absent,
    /// Live, with this deadline (Unix ms, 0 = none).
    Present { deadline: u64 },
}

/// A key in its database.
type DbKey = (u32, Vec<u8>);

#[derive(Debug, Default)]
struct Client {
    dirty: bool,
    keys: HashMap<DbKey, KeyState>,
}

#[derive(Debug, Default)]
struct Registry {
    /// Watched key -> the clients watching it.
    keys: HashMap<DbKey, Vec<u64>>,
    clients: HashMap<u64, Client>,
}

/// The watch registry (see the module doc).
#[derive(Debug, Default)]
pub struct Watches {
    /// Watched (client, key) pairs: zero lets the write path skip the lock.
    count: AtomicUsize,
    reg: Mutex<Registry>,
}

/// How an op may affect a key.
enum Touch<'a> {
    /// May create or overwrite it (in the database given).
    Write(u32, &'a [u8]),
    /// Changes it only if it exists.
    IfPresent(u32, &'a [u8]),
    /// May change every key (FLUSHALL, or an op this module does not know).
    All,
    /// May change every key of one database (FLUSHDB).
    AllIn(u32),
}

/// Calls `f` for every key `op`, applied in database `db`, may touch.
fn touches<'a>(db: u32, op: &'a Op, f: &mut impl FnMut(Touch<'a>)) {
    match op {
        Op::Noop => {}
        Op::Set { key, .. } | Op::IncrBy { key, .. } => f(Touch::Write(db, key)),
        Op::Del { keys } => keys.iter().for_each(|k| f(Touch::IfPresent(db, k))),
        Op::MSet { pairs, .. } => pairs.iter().for_each(|(k, _)| f(Touch::Write(db, k))),
        Op::Multi { ops } => ops.iter().for_each(|(db, op)| touches(*db, op, f)),
        Op::Cmd { args } => {
            let name = args.first().map_or(&[][..], |n| n.as_slice());
            let arg = |i: usize| args.get(i).map_or(&[][..], |a| a.as_slice());
            match name {
                b"EXPIRED" => args[1..].iter().for_each(|k| f(Touch::IfPresent(db, k))),
                b"PEXPIREAT" | b"PERSIST" | b"GETDEL" | b"GETEX" => f(Touch::IfPresent(db, arg(1))),
                b"APPEND" | b"SETRANGE" | b"INCRBYFLOAT" => f(Touch::Write(db, arg(1))),
                b"RENAME" | b"RENAMENX" => {
                    f(Touch::IfPresent(db, arg(1)));
                    f(Touch::Write(db, arg(2)));
                }
                b"FLUSHDB" => f(Touch::AllIn(db)),
                // Within one database; COPY … DB n spans two, and is matched below.
                b"COPY" if !crate::db::spans_databases(args) => f(Touch::Write(db, arg(2))),
                n if crate::db::is_read_record(n) => {}
                _ => f(Touch::All),
            }
        }
    }
}

impl Watches {
    /// Adds `keys` of database `db` to `client`'s watched keys (a key already watched
    /// keeps its state).
    pub fn watch(&self, client: u64, db: u32, keys: &[Vec<u8>]) {
        let mut reg = self.reg.lock();
        let reg = &mut *reg;
        let c = reg.clients.entry(client).or_default();
        for k in keys {
            let key = (db, k.clone());
            if c.keys.contains_key(&key) {
                continue;
            }
            c.keys.insert(key.clone(), KeyState::Unknown);
            reg.keys.entry(key).or_default().push(client);
            self.count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records what WATCH read of `client`'s new keys (`state` of a database's key).
    pub fn settle(&self, client: u64, state: impl Fn(u32, &[u8]) -> KeyState) {
        let mut reg = self.reg.lock();
        if let Some(c) = reg.clients.get_mut(&client) {
            for ((db, k), s) in c.keys.iter_mut() {
                if *s == KeyState::Unknown {
                    *s = state(*db, k);
                }
            }
        }
    }

    /// Marks `client` dirty: its next EXEC aborts (a WATCH that could not read its keys'
    /// state).
    pub fn spoil(&self, client: u64) {
        if let Some(c) = self.reg.lock().clients.get_mut(&client) {
            c.dirty = true;
        }
    }

    /// Forgets every key `client` watches, and its dirty flag.
    pub fn unwatch(&self, client: u64) {
        if self.count.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut reg = self.reg.lock();
        let Some(c) = reg.clients.remove(&client) else {
            return;
        };
        for k in c.keys.keys() {
            if let Some(w) = reg.keys.get_mut(k) {
                w.retain(|&id| id != client);
                if w.is_empty() {
                    reg.keys.remove(k);
                }
            }
        }
        self.count.fetch_sub(c.keys.len(), Ordering::Relaxed);
    }

    /// Number of watched (client, key) pairs (INFO's `watching_clients` and tests).
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Called with `ops` about to be queued for the log at time `now`, under the lock
    /// that assigns their log order. If `exec_of` names a client (its EXEC) whose watched
    /// keys changed, returns false: the ops must not be logged. Otherwise marks the
    /// watchers of every key the ops touch and returns true.
    pub fn on_queue(&self, db: u32, ops: &[Op], exec_of: Option<u64>, now: u64) -> bool {
        // The hot path: nobody watches anything.
        if self.count.load(Ordering::Relaxed) == 0 {
            return true;
        }
        let mut reg = self.reg.lock();
        if let Some(id) = exec_of
            && let Some(c) = reg.clients.get(&id)
        {
            let expired = c.keys.values().any(|s| {
                matches!(s, KeyState::Present { deadline } if *deadline != 0 && *deadline <= now)
            });
            if c.dirty || expired {
                return false;
            }
        }
        let reg = &mut *reg;
        for op in ops {
            touches(db, op, &mut |t| match t {
                Touch::All => {
                    for c in reg.clients.values_mut() {
                        if c.keys.values().any(|s| *s != KeyState::Absent) {
                            c.dirty = true;
                        }
                    }
                }
                Touch::AllIn(db) => {
                    for c in reg.clients.values_mut() {
                        if c.keys
                            .iter()
                            .any(|((d, _), s)| *d == db && *s != KeyState::Absent)
                        {
                            c.dirty = true;
                        }
                    }
                }
                Touch::Write(db, k) => mark(reg, db, k, false),
                Touch::IfPresent(db, k) => mark(reg, db, k, true),
            });
        }
        true
    }
}

/// Marks the watchers of `k` dirty (only those that saw it present, if `only_present`).
fn mark(reg: &mut Registry, db: u32, k: &[u8], only_present: bool) {
    let key = (db, k.to_vec());
    for id in reg.keys.get(&key).into_iter().flatten() {
        if let Some(c) = reg.clients.get_mut(id) {
            let state = c.keys.get(&key).copied();
            if !only_present || state != Some(KeyState::Absent) {
                c.dirty = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{Condition, Expiry};

    fn set(k: &str) -> Op {
        Op::Set {
            key: k.into(),
            value: b"v".to_vec(),
            expiry: Expiry::Never,
            condition: Condition::Always,
            get: false,
        }
    }

    fn cmd(args: &[&str]) -> Op {
        Op::Cmd {
            args: args.iter().map(|a| a.as_bytes().to_vec()).collect(),
        }
    }

    /// Watches `key` for client 1 as WATCH would, with `state` as what it read.
    fn watched(key: &str, state: KeyState) -> Watches {
        let w = Watches::default();
        w.watch(1, 0, &[key.as_bytes().to_vec()]);
        w.settle(1, |_, _| state);
        w
    }

    fn exec_ok(w: &Watches, now: u64) -> bool {
        w.on_queue(0, &[Op::Multi { ops: vec![] }], Some(1), now)
    }

    const PRESENT: KeyState = KeyState::Present { deadline: 0 };

    #[test]
    fn a_write_to_a_watched_key_aborts_exec() {
        for op in [
            set("k"),
            Op::IncrBy {
                key: b"k".to_vec(),
                delta: 1,
            },
            cmd(&["APPEND", "k", "x"]),
            cmd(&["RENAME", "other", "k"]),
            cmd(&["COPY", "other", "k"]),
            Op::Multi {
                ops: vec![(0, set("k"))],
            },
        ] {
            for state in [PRESENT, KeyState::Absent] {
                let w = watched("k", state);
                assert!(w.on_queue(0, std::slice::from_ref(&op), None, 0));
                assert!(!exec_ok(&w, 0), "{op:?} on {state:?}");
            }
        }
    }

    #[test]
    fn other_keys_and_reads_do_not_abort() {
        let w = watched("k", PRESENT);
        assert!(w.on_queue(
            0,
            &[set("j"), cmd(&["GET", "k"]), cmd(&["MGET", "k"])],
            None,
            0
        ));
        assert!(exec_ok(&w, 0));
    }

    #[test]
    fn deleting_only_touches_keys_that_were_present() {
        for op in [
            Op::Del {
                keys: vec![b"k".to_vec()],
            },
            cmd(&["EXPIRED", "k"]),
            cmd(&["PEXPIREAT", "k", "5"]),
            cmd(&["PERSIST", "k"]),
            cmd(&["GETDEL", "k"]),
            cmd(&["FLUSHALL"]),
        ] {
            let w = watched("k", PRESENT);
            w.on_queue(0, std::slice::from_ref(&op), None, 0);
            assert!(!exec_ok(&w, 0), "{op:?} on a present key");
            let w = watched("k", KeyState::Absent);
            w.on_queue(0, std::slice::from_ref(&op), None, 0);
            assert!(exec_ok(&w, 0), "{op:?} on an absent (or stale) key");
        }
    }

    #[test]
    fn an_unknown_canonical_command_touches_everything() {
        let w = watched("k", PRESENT);
        w.on_queue(0, &[cmd(&["SOMETHINGNEW", "x"])], None, 0);
        assert!(!exec_ok(&w, 0));
    }

    #[test]
    fn a_deadline_passing_before_exec_aborts_it() {
        let w = watched("k", KeyState::Present { deadline: 100 });
        assert!(exec_ok(&w, 99));
        assert!(!exec_ok(&w, 100));
    }

    #[test]
    fn a_refused_exec_logs_nothing_so_touches_nothing() {
        let w = Watches::default();
        w.watch(1, 0, &[b"k".to_vec()]);
        w.settle(1, |_, _| PRESENT);
        w.watch(2, 0, &[b"j".to_vec()]);
        w.settle(2, |_, _| PRESENT);
        w.on_queue(0, &[set("k")], None, 0);
        // Client 1's EXEC would write j, but is refused: client 2 stays clean.
        assert!(!w.on_queue(0, &[set("j")], Some(1), 0));
        assert!(w.on_queue(0, &[Op::Noop], Some(2), 0));
    }

    #[test]
    fn unwatch_clears_keys_and_dirt() {
        let w = watched("k", PRESENT);
        w.on_queue(0, &[set("k")], None, 0);
        assert_eq!(w.len(), 1);
        w.unwatch(1);
        assert!(w.is_empty());
        assert!(exec_ok(&w, 0));
        // Watching the same key twice counts it once.
        w.watch(1, 0, &[b"a".to_vec(), b"a".to_vec()]);
        w.watch(1, 0, &[b"a".to_vec()]);
        assert_eq!(w.len(), 1);
        w.unwatch(1);
        assert!(w.is_empty());
        assert!(w.reg.lock().keys.is_empty());
    }

    #[test]
    fn a_write_while_watch_waits_for_its_barrier_counts() {
        // Registered but not yet settled: any write to the key is a change.
        let w = Watches::default();
        w.watch(1, 0, &[b"k".to_vec()]);
        w.on_queue(0, &[cmd(&["EXPIRED", "k"])], None, 0);
        w.settle(1, |_, _| KeyState::Absent);
        assert!(!exec_ok(&w, 0));
    }
}
