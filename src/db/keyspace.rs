//! The keyspace commands' apply side: RENAME, RENAMENX, COPY and FLUSHDB within the
//! entry's database ([`Keyspace`]), MOVE, SWAPDB, COPY … DB and FLUSHALL across databases
//! ([`Db`], chosen by [`spans_databases`]), and RANDOMKEY's pick. `keyspace.rs` at the
//! crate root parses the requests into the canonical commands applied here.
//!
//! Data enters as a canonical command routed here by `exec.rs` (or, for the commands
//! that span databases, by [`Db::apply_op`]) with the entry's time as `now`, and leaves as
//! an [`OpResult`].
//!
//! Apply follows Redis's order of lookups: the source is looked up first (an expired
//! source is deleted and counts as missing), then the destination. A key's deadline moves
//! with RENAME and MOVE and is copied by COPY; the destination's own deadline is dropped
//! with its old value. Every change goes through `Keyspace::insert` and
//! `Keyspace::remove`, so each database's expiry index and `live_bytes` stay in step.
//! SWAPDB exchanges two databases whole (keys, deadlines and counters), as Redis does;
//! a connection keeps its database index, so it sees the other contents afterwards.
//!
//! FLUSHDB empties one database's map and expiry index at once, FLUSHALL every one. The
//! old contents of a large key space are freed on a background thread (as Redis's
//! `FLUSHALL ASYNC` and `lazyfree-lazy-user-flush` do), so the map lock is not held while
//! a million values are deallocated; `SYNC` is accepted but frees the same way (memory is
//! not state: the log need not know).
//!
//! RANDOMKEY picks a random bucket of the table, then a random key of its chain
//! ([`KeyMap::random`], as Redis does): O(1) expected. An expired pick is reported and
//! another is drawn, up to `RANDOM_TRIES` (16); if all of those were expired (nearly
//! every key is, and the expirer is behind), it walks from a random bucket to the first
//! live key, so nil always means that no key is live. Keys in short chains are somewhat
//! likelier to be picked; Redis's pick is not uniform either.

use super::exec::ERR_BAD_RECORD;
#[cfg(doc)]
use super::keymap::KeyMap;
use super::keymap::mix;
use super::{Db, ERR_DB_RANGE, Keyspace, OpResult};

/// The error of a command whose source and destination are the same key or database.
pub const ERR_SAME: &str = "ERR source and destination objects are the same";
const ERR_NO_SUCH_KEY: &str = "ERR no such key";

/// Expired keys a read reports to the expirer at most per command.
pub const MAX_HINTS: usize = 16;

/// Random picks RANDOMKEY tries before it walks to the next live key.
const RANDOM_TRIES: usize = 16;

/// Key spaces at least this large are freed on a background thread by FLUSHALL.
const LAZYFREE_MIN_KEYS: usize = 4096;

impl Keyspace {
    /// A live key picked at random from `r` (64 random bits); `None` if no key is live.
    /// Also returns up to [`MAX_HINTS`] expired keys met on the way. See the module doc.
    pub fn random_key(&self, r: u64, now: u64) -> (Option<Vec<u8>>, Vec<Vec<u8>>) {
        let mut expired: Vec<Vec<u8>> = Vec::new();
        let note = |k: &[u8], expired: &mut Vec<Vec<u8>>| {
            if expired.len() < MAX_HINTS && !expired.iter().any(|e| e[..] == *k) {
                expired.push(k.to_vec());
            }
        };
        let mut bits = r;
        for _ in 0..RANDOM_TRIES {
            bits = mix(bits);
            let Some((k, i)) = self.map.random(bits) else {
                return (None, expired);
            };
            if !i.expired(now) {
                return (Some(k.to_vec()), expired);
            }
            note(k, &mut expired);
        }
        // Nearly every key is expired (the expirer is behind): walk from a random bucket
        // to the first live key, so that nil always means "no live key".
        let found = self.map.iter_from(mix(bits)).find(|(k, i)| {
            let dead = i.expired(now);
            if dead {
                note(k, &mut expired);
            }
            !dead
        });
        (found.map(|(k, _)| k.to_vec()), expired)
    }

    /// Applies a logged RENAME, RENAMENX, COPY within this database or FLUSHDB (`args[0]`
    /// is the name) at the entry's time `now`.
    pub(super) fn exec_keyspace(&mut self, args: &[Vec<u8>], now: u64) -> OpResult {
        let Some((name, rest)) = args.split_first() else {
            return OpResult::Error(ERR_BAD_RECORD);
        };
        match (name.as_slice(), rest) {
            (b"RENAME", [src, dst]) => self.exec_rename(src, dst, false, now),
            (b"RENAMENX", [src, dst]) => self.exec_rename(src, dst, true, now),
            (b"COPY", [src, dst]) => self.exec_copy(src, dst, false, now),
            (b"COPY", [src, dst, opt]) if opt == b"REPLACE" => self.exec_copy(src, dst, true, now),
            (b"FLUSHDB", []) => {
                free_later(self.flush());
                OpResult::Ok
            }
            _ => OpResult::Error(ERR_BAD_RECORD),
        }
    }

    /// RENAME: OK (RENAMENX: 1), or RENAMENX's 0 if `dst` exists; `ERR no such key` if
    /// `src` does not. Renaming a key to itself changes nothing (OK; RENAMENX 0).
    fn exec_rename(&mut self, src: &[u8], dst: &[u8], nx: bool, now: u64) -> OpResult {
        self.purge_expired(src, now);
        if !self.map.contains_key(src) {
            return OpResult::Error(ERR_NO_SUCH_KEY);
        }
        if src == dst {
            return if nx { OpResult::Int(0) } else { OpResult::Ok };
        }
        self.purge_expired(dst, now);
        if nx && self.map.contains_key(dst) {
            return OpResult::Int(0);
        }
        let Some(item) = self.remove(src) else {
            return OpResult::Error(ERR_NO_SUCH_KEY);
        };
        // The value and its deadline move; whatever `dst` held (and its deadline) goes.
        self.insert(dst.into(), item);
        if nx { OpResult::Int(1) } else { OpResult::Ok }
    }

    /// COPY: 1 if copied (with the source's deadline), 0 if `src` is missing or `dst`
    /// exists without REPLACE.
    fn exec_copy(&mut self, src: &[u8], dst: &[u8], replace: bool, now: u64) -> OpResult {
        if src == dst {
            return OpResult::Error(ERR_SAME);
        }
        self.purge_expired(src, now);
        if !self.map.contains_key(src) {
            return OpResult::Int(0);
        }
        self.purge_expired(dst, now);
        if !replace && self.map.contains_key(dst) {
            return OpResult::Int(0);
        }
        let Some(item) = self.map.get(src).cloned() else {
            return OpResult::Int(0);
        };
        self.insert(dst.into(), item);
        OpResult::Int(1)
    }
}

/// Whether a logged command spans databases, so that `Db::exec_databases` applies it
/// rather than the entry's own database: MOVE, SWAPDB, FLUSHALL, and COPY to another
/// database (`COPY k n DB d [REPLACE]`).
pub fn spans_databases(args: &[Vec<u8>]) -> bool {
    match args.first().map(Vec::as_slice) {
        Some(b"MOVE" | b"SWAPDB" | b"FLUSHALL") => true,
        Some(b"COPY") => args.len() >= 5,
        _ => false,
    }
}

/// A database index as logged: decimal, within u32 (whether it exists is checked apart).
fn logged_db(arg: &[u8]) -> Option<u32> {
    std::str::from_utf8(arg).ok()?.parse().ok()
}

impl Db {
    /// Applies a logged command that spans databases ([`spans_databases`]), issued from
    /// database `db`, at the entry's time `now`. A database index beyond the configured
    /// count is `ERR DB index is out of range` without effect (a log written with more
    /// databases: recovery refuses it).
    pub(super) fn exec_databases(&mut self, db: u32, args: &[Vec<u8>], now: u64) -> OpResult {
        let Some((name, rest)) = args.split_first() else {
            return OpResult::Error(ERR_BAD_RECORD);
        };
        match (name.as_slice(), rest) {
            (b"FLUSHALL", []) => {
                for ks in self.keyspaces_mut() {
                    free_later(ks.flush());
                }
                OpResult::Ok
            }
            (b"MOVE", [key, to]) => match logged_db(to) {
                Some(to) => self.exec_move(db, to, key, now),
                None => OpResult::Error(ERR_BAD_RECORD),
            },
            (b"SWAPDB", [a, b]) => match (logged_db(a), logged_db(b)) {
                (Some(a), Some(b)) if a.max(b) < self.databases() => {
                    self.keyspaces_mut().swap(a as usize, b as usize);
                    OpResult::Ok
                }
                (Some(_), Some(_)) => OpResult::Error(ERR_DB_RANGE),
                _ => OpResult::Error(ERR_BAD_RECORD),
            },
            (b"COPY", [src, dst, kw, to, opts @ ..]) if kw == b"DB" => {
                let replace = match opts {
                    [] => false,
                    [r] if r == b"REPLACE" => true,
                    _ => return OpResult::Error(ERR_BAD_RECORD),
                };
                match logged_db(to) {
                    Some(to) => self.exec_copy_to(db, to, src, dst, replace, now),
                    None => OpResult::Error(ERR_BAD_RECORD),
                }
            }
            _ => OpResult::Error(ERR_BAD_RECORD),
        }
    }

    /// Databases `a` and `b` (distinct), both mutable.
    fn two_mut(&mut self, a: u32, b: u32) -> Option<(&mut Keyspace, &mut Keyspace)> {
        let (a, b) = (a as usize, b as usize);
        let dbs = self.keyspaces_mut();
        if a == b || a.max(b) >= dbs.len() {
            return None;
        }
        if a < b {
            let (lo, hi) = dbs.split_at_mut(b);
            Some((&mut lo[a], &mut hi[0]))
        } else {
            let (lo, hi) = dbs.split_at_mut(a);
            Some((&mut hi[0], &mut lo[b]))
        }
    }

    /// MOVE: 1 if `key` moved from `from` to `to` (with its deadline), 0 if it is missing
    /// in `from` or exists in `to`.
    fn exec_move(&mut self, from: u32, to: u32, key: &[u8], now: u64) -> OpResult {
        if from == to {
            return OpResult::Error(ERR_SAME);
        }
        let Some((src, dst)) = self.two_mut(from, to) else {
            return OpResult::Error(ERR_DB_RANGE);
        };
        src.purge_expired(key, now);
        if !src.map.contains_key(key) {
            return OpResult::Int(0);
        }
        dst.purge_expired(key, now);
        if dst.map.contains_key(key) {
            return OpResult::Int(0);
        }
        let Some(item) = src.remove(key) else {
            return OpResult::Int(0);
        };
        dst.insert(key.into(), item);
        OpResult::Int(1)
    }

    /// COPY … DB: 1 if `src` of database `from` was copied (with its deadline) to `dst` of
    /// database `to`, 0 if `src` is missing or `dst` exists without REPLACE.
    fn exec_copy_to(
        &mut self,
        from: u32,
        to: u32,
        src: &[u8],
        dst: &[u8],
        replace: bool,
        now: u64,
    ) -> OpResult {
        if from == to {
            return match self.keyspace_mut(from) {
                Some(ks) => ks.exec_copy(src, dst, replace, now),
                None => OpResult::Error(ERR_DB_RANGE),
            };
        }
        let Some((a, b)) = self.two_mut(from, to) else {
            return OpResult::Error(ERR_DB_RANGE);
        };
        a.purge_expired(src, now);
        let Some(item) = a.map.get(src).cloned() else {
            return OpResult::Int(0);
        };
        b.purge_expired(dst, now);
        if !replace && b.map.contains_key(dst) {
            return OpResult::Int(0);
        }
        b.insert(dst.into(), item);
        OpResult::Int(1)
    }
}

/// Drops a flushed database, on a background thread if it is large (inline if a thread
/// cannot be started).
fn free_later(old: Keyspace) {
    if old.map.len() < LAZYFREE_MIN_KEYS {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("lazyfree".into())
        .spawn(move || drop(old));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::Command;
    use crate::db::{Condition, Expiry, Item, Op};

    struct T {
        db: Db,
        index: u64,
    }

    impl T {
        fn new() -> T {
            T {
                db: Db::default(),
                index: 0,
            }
        }

        fn op(&mut self, now: u64, op: Op) -> OpResult {
            self.index += 1;
            let r = self.db.apply(
                self.index,
                Command {
                    ts_ms: now,
                    db: 0,
                    op,
                },
            );
            for ks in self.db.keyspaces() {
                ks.check_invariants();
            }
            r
        }

        /// Database 0, where these tests write.
        fn ks(&self) -> &Keyspace {
            self.db.keyspace(0)
        }

        fn cmd(&mut self, now: u64, parts: &[&str]) -> OpResult {
            self.op(
                now,
                Op::Cmd {
                    args: parts.iter().map(|p| p.as_bytes().to_vec()).collect(),
                },
            )
        }

        /// SET key value, with an absolute deadline (0 = none).
        fn set(&mut self, now: u64, k: &str, v: &str, at: u64) {
            let r = self.op(
                now,
                Op::Set {
                    key: k.into(),
                    value: v.into(),
                    expiry: Expiry::from_deadline(at),
                    condition: Condition::Always,
                    get: false,
                },
            );
            assert_eq!(r, OpResult::Ok);
        }

        /// The value and deadline of `k`, ignoring expiry.
        fn raw(&self, k: &str) -> Option<(String, u64)> {
            self.ks()
                .map
                .get(k.as_bytes())
                .map(|i| (String::from_utf8(i.value.to_vec()).unwrap(), i.expire_at))
        }
    }

    #[test]
    fn rename_moves_value_and_deadline() {
        let mut t = T::new();
        t.set(0, "a", "va", 1000);
        t.set(0, "b", "vb", 0);
        assert_eq!(t.cmd(10, &["RENAME", "a", "b"]), OpResult::Ok);
        assert_eq!(t.raw("a"), None);
        assert_eq!(t.raw("b"), Some(("va".into(), 1000)));
        assert_eq!(t.ks().expiring(), 1);
        assert_eq!(t.ks().due(u64::MAX, 10), vec![b"b".to_vec()]);
        // To a fresh name.
        assert_eq!(t.cmd(10, &["RENAME", "b", "c"]), OpResult::Ok);
        assert_eq!(t.raw("c"), Some(("va".into(), 1000)));
        assert_eq!(t.ks().len(), 1);
    }

    #[test]
    fn rename_drops_the_destination_deadline() {
        let mut t = T::new();
        t.set(0, "src", "1", 0);
        t.set(0, "dst", "2", 5000);
        assert_eq!(t.cmd(10, &["RENAME", "src", "dst"]), OpResult::Ok);
        assert_eq!(t.raw("dst"), Some(("1".into(), 0)));
        assert_eq!(t.ks().expiring(), 0);
        // Both with deadlines: the source's wins.
        t.set(0, "x", "x", 700);
        t.set(0, "y", "y", 900);
        assert_eq!(t.cmd(10, &["RENAME", "x", "y"]), OpResult::Ok);
        assert_eq!(t.raw("y"), Some(("x".into(), 700)));
        // Same deadline on both.
        t.set(0, "p", "p", 800);
        t.set(0, "q", "q", 800);
        assert_eq!(t.cmd(10, &["RENAME", "p", "q"]), OpResult::Ok);
        assert_eq!(t.raw("q"), Some(("p".into(), 800)));
        assert_eq!(t.ks().expiring(), 2);
    }

    #[test]
    fn rename_missing_expired_and_same_key() {
        let mut t = T::new();
        assert_eq!(
            t.cmd(0, &["RENAME", "nope", "x"]),
            OpResult::Error("ERR no such key")
        );
        assert_eq!(
            t.cmd(0, &["RENAMENX", "nope", "x"]),
            OpResult::Error("ERR no such key")
        );
        assert_eq!(
            t.cmd(0, &["RENAME", "nope", "nope"]),
            OpResult::Error("ERR no such key")
        );
        t.set(0, "k", "v", 100);
        assert_eq!(t.cmd(50, &["RENAME", "k", "k"]), OpResult::Ok);
        assert_eq!(t.cmd(50, &["RENAMENX", "k", "k"]), OpResult::Int(0));
        assert_eq!(t.raw("k"), Some(("v".into(), 100)));
        // Expired at the entry's time: missing, and removed.
        assert_eq!(
            t.cmd(100, &["RENAME", "k", "z"]),
            OpResult::Error("ERR no such key")
        );
        assert_eq!(t.raw("k"), None);
        assert_eq!(t.raw("z"), None);
        assert_eq!(t.ks().expired_keys, 1);
        assert_eq!(t.ks().expiring(), 0);
        assert!(t.ks().is_empty());
    }

    #[test]
    fn renamenx_rules() {
        let mut t = T::new();
        t.set(0, "a", "1", 0);
        t.set(0, "b", "2", 0);
        assert_eq!(t.cmd(0, &["RENAMENX", "a", "b"]), OpResult::Int(0));
        assert_eq!(t.raw("a"), Some(("1".into(), 0)));
        assert_eq!(t.raw("b"), Some(("2".into(), 0)));
        t.set(0, "c", "3", 500);
        assert_eq!(t.cmd(0, &["RENAMENX", "c", "d"]), OpResult::Int(1));
        assert_eq!(t.raw("d"), Some(("3".into(), 500)));
        // An expired destination counts as missing.
        t.set(0, "old", "o", 100);
        assert_eq!(t.cmd(200, &["RENAMENX", "a", "old"]), OpResult::Int(1));
        assert_eq!(t.raw("old"), Some(("1".into(), 0)));
        assert_eq!(t.ks().expired_keys, 1);
        assert_eq!(t.ks().expiring(), 1);
    }

    #[test]
    fn copy_rules() {
        let mut t = T::new();
        t.set(0, "s", "val", 900);
        t.set(0, "d", "old", 0);
        assert_eq!(t.cmd(0, &["COPY", "missing", "x"]), OpResult::Int(0));
        assert_eq!(t.cmd(0, &["COPY", "s", "d"]), OpResult::Int(0));
        assert_eq!(t.raw("d"), Some(("old".into(), 0)));
        assert_eq!(t.cmd(0, &["COPY", "s", "d", "REPLACE"]), OpResult::Int(1));
        assert_eq!(t.raw("d"), Some(("val".into(), 900)), "deadline copied");
        assert_eq!(t.raw("s"), Some(("val".into(), 900)), "source intact");
        assert_eq!(t.cmd(0, &["COPY", "s", "n"]), OpResult::Int(1));
        assert_eq!(t.ks().expiring(), 3);
        assert_eq!(t.ks().due(u64::MAX, 10).len(), 3);
        // REPLACE over a key with a deadline, from a key without one.
        t.set(0, "plain", "p", 0);
        assert_eq!(
            t.cmd(0, &["COPY", "plain", "n", "REPLACE"]),
            OpResult::Int(1)
        );
        assert_eq!(t.raw("n"), Some(("p".into(), 0)));
        assert_eq!(t.ks().expiring(), 2);
        // An expired source is missing (and removed); an expired destination too.
        t.set(0, "e", "e", 100);
        assert_eq!(t.cmd(100, &["COPY", "e", "x"]), OpResult::Int(0));
        assert_eq!(t.raw("e"), None);
        t.set(0, "gone", "g", 100);
        assert_eq!(t.cmd(150, &["COPY", "plain", "gone"]), OpResult::Int(1));
        assert_eq!(t.raw("gone"), Some(("p".into(), 0)));
        assert_eq!(t.ks().expired_keys, 2);
        // Never logged by dispatch, but refused if a log says so.
        assert_eq!(
            t.cmd(0, &["COPY", "s", "s"]),
            OpResult::Error("ERR source and destination objects are the same")
        );
    }

    #[test]
    fn flushall_empties_map_index_and_bytes() {
        let mut t = T::new();
        for i in 0..50 {
            t.set(
                0,
                &format!("k{i}"),
                "v",
                if i % 2 == 0 { 1000 + i } else { 0 },
            );
        }
        t.set(0, "dead", "v", 10);
        assert_eq!(t.ks().expiring(), 26);
        assert_eq!(t.cmd(20, &["FLUSHALL"]), OpResult::Ok);
        assert!(t.ks().is_empty());
        assert_eq!(t.ks().expiring(), 0);
        assert_eq!(t.ks().live_bytes(), 0);
        assert_eq!(t.ks().due(u64::MAX, 10), Vec::<Vec<u8>>::new());
        // The store works on afterwards.
        t.set(30, "k1", "again", 2000);
        assert_eq!(t.ks().expiring(), 1);
        assert_eq!(t.cmd(30, &["FLUSHALL"]), OpResult::Ok);
        assert_eq!(t.cmd(30, &["FLUSHALL"]), OpResult::Ok);
        assert!(t.ks().is_empty());
    }

    #[test]
    fn flushall_of_a_large_key_space() {
        let mut db = Keyspace::default();
        for i in 0..(LAZYFREE_MIN_KEYS * 2) {
            db.insert(
                format!("k{i}").into_bytes().into(),
                Item {
                    value: b"v".to_vec().into(),
                    expire_at: i as u64 + 1,
                },
            );
        }
        assert_eq!(db.exec_keyspace(&[b"FLUSHDB".to_vec()], 0), OpResult::Ok);
        assert!(db.is_empty());
        assert_eq!(db.expiring(), 0);
        assert_eq!(db.live_bytes(), 0);
    }

    #[test]
    fn malformed_records_are_errors_not_panics() {
        let mut t = T::new();
        t.set(0, "a", "1", 0);
        let bad = OpResult::Error(ERR_BAD_RECORD);
        for parts in [
            &["RENAME"][..],
            &["RENAME", "a"],
            &["RENAME", "a", "b", "c"],
            &["RENAMENX", "a"],
            &["COPY", "a"],
            &["COPY", "a", "b", "NOPE"],
            &["COPY", "a", "b", "REPLACE", "x"],
            &["FLUSHALL", "x"],
        ] {
            assert_eq!(t.cmd(0, parts), bad, "{parts:?}");
        }
        assert_eq!(t.db.keyspace_mut(0).unwrap().exec_keyspace(&[], 0), bad);
        assert_eq!(t.raw("a"), Some(("1".into(), 0)));
    }

    #[test]
    fn random_key_skips_expired_and_wraps() {
        let mut t = T::new();
        assert_eq!(t.ks().random_key(7, 0), (None, vec![]));
        for i in 0..20 {
            t.set(0, &format!("dead{i}"), "v", 100);
        }
        t.set(0, "live", "v", 0);
        // Whatever the starting position, the one live key is found.
        for r in 0..21 {
            let (k, expired) = t.ks().random_key(r, 500);
            assert_eq!(k.as_deref(), Some(&b"live"[..]), "r={r}");
            assert!(expired.len() <= MAX_HINTS);
            assert!(expired.iter().all(|k| k.starts_with(b"dead")));
        }
        let (k, expired) = t.ks().random_key(3, 0);
        assert!(k.is_some());
        assert!(expired.is_empty());
        // All expired: none, and hints for the expirer.
        t.set(0, "live", "v", 100);
        let (k, expired) = t.ks().random_key(5, 500);
        assert_eq!(k, None);
        assert_eq!(expired.len(), MAX_HINTS);
        assert!(t.ks().random_key(5, 50).0.is_some());
    }
}
