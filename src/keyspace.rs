//! Keyspace commands: RENAME, RENAMENX, COPY, MOVE, SWAPDB, FLUSHDB/FLUSHALL (writes),
//! RANDOMKEY and TOUCH (reads), with Redis 7's reply shapes and error wording.
//!
//! # Writes
//!
//! [`dispatch`] only validates a write and turns it into a canonical logged command,
//! logged in the connection's database (the entry's `db`, see `wal.rs`); the map changes
//! when the entry is applied at the entry's timestamp: by `Keyspace::exec_keyspace` for
//! a command within that database, by `Db::exec_databases` for one that spans databases
//! ([`spans_databases`]). The canonical forms are:
//!
//! | request | logged |
//! |---|---|
//! | `RENAME k n` | `RENAME k n` |
//! | `RENAMENX k n` | `RENAMENX k n` |
//! | `COPY k n [DB d] [REPLACE]` | `COPY k n [REPLACE]`, or `COPY k n DB d [REPLACE]` when `d` is another database |
//! | `MOVE k d` | `MOVE k d` |
//! | `SWAPDB a b` | `SWAPDB a b` |
//! | `FLUSHDB [ASYNC\|SYNC]` | `FLUSHDB` (the entry's database) |
//! | `FLUSHALL [ASYNC\|SYNC]` | `FLUSHALL` (every database, whatever the entry's) |
//!
//! Errors that depend only on the arguments and the number of databases (`ERR syntax
//! error`, `ERR DB index is out of range`, `ERR source and destination objects are the
//! same`, SWAPDB's `ERR invalid first DB index`, …) are answered at dispatch and never
//! logged. Errors that depend on the data (`ERR no such key` for RENAME) are
//! decided when the entry is applied; such an entry changes nothing but the removal of an
//! already expired key, which no client can tell from its absence.
//!
//! Apply follows Redis's order of lookups: the source is looked up first (an expired
//! source is deleted and counts as missing), then the destination. A key's deadline moves
//! with RENAME and MOVE and is copied by COPY; the destination's own deadline is dropped
//! with its old value. Every change goes through `Keyspace::insert` and
//! `Keyspace::remove`, so each database's expiry index and `live_bytes` stay in step.
//! SWAPDB exchanges two databases whole (keys, deadlines and counters), as Redis does;
//! a connection keeps its database index, so it sees the other contents afterwards.
//!
//! FLUSHDB empties one database's map and expiry index at once, FLUSHALL every one. The old contents of a large key
//! space are freed on a background thread (as Redis's `FLUSHALL ASYNC` and
//! `lazyfree-lazy-user-flush` do), so the map lock is not held while a million values are
//! deallocated; `SYNC` is accepted but frees the same way (memory is not state: the log
//! need not know).
//!
//! # Reads
//!
//! RANDOMKEY and TOUCH answer at dispatch under the map lock, using the store's
//! clock, and report expired keys they meet to the active expirer (lazy expiry), as GET
//! does. TOUCH counts keyspace hits and misses as Redis's does; no access times are kept,
//! so it only counts the keys that exist.
//!
//! RANDOMKEY picks a random bucket of the table, then a random key of its chain
//! ([`KeyMap::random`], as Redis does): O(1) expected. An expired pick is reported and
//! another is drawn, up to `RANDOM_TRIES` (16); if all of those were expired (nearly
//! every key is, and the expirer is behind), it walks from a random bucket to the first
//! live key, so nil always means that no key is live. Keys in short chains are somewhat
//! likelier to be picked; Redis's pick is not uniform either.

use crate::commands::{Context, Dispatched, Reply, Session};
use crate::exec::ERR_BAD_RECORD;
use crate::keymap::mix;
use crate::protocol::{write_bulk, write_error, write_integer, write_null};
use crate::store::{Db, Keyspace, OpResult, parse_i64};
use crate::wal::Op;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};

const ERR_SYNTAX: &str = "ERR syntax error";
const ERR_NOT_INTEGER: &str = "ERR value is not an integer or out of range";
const ERR_INT_RANGE: &str =
    "ERR value is out of range, value must between -2147483648 and 2147483647";
use crate::store::ERR_DB_RANGE;
const ERR_SAME: &str = "ERR source and destination objects are the same";
const ERR_NO_SUCH_KEY: &str = "ERR no such key";

/// Expired keys a read reports to the expirer at most per command.
const MAX_HINTS: usize = 16;

/// Random picks RANDOMKEY tries before it walks to the next live key.
const RANDOM_TRIES: usize = 16;

/// Key spaces at least this large are freed on a background thread by FLUSHALL.
const LAZYFREE_MIN_KEYS: usize = 4096;

/// Executes a keyspace command (`name` is the lower-case table name; the arity was
/// checked by the caller). See the module doc.
pub fn dispatch(
    ctx: &Context,
    s: &mut Session,
    name: &str,
    args: Vec<Vec<u8>>,
    now: u64,
    out: &mut Vec<u8>,
) -> Dispatched {
    let write = |args: Vec<Vec<u8>>| Dispatched::Write(Op::Cmd { args }, Reply::Standard);
    match name {
        "rename" | "renamenx" if args.len() == 3 => {
            let canonical: &[u8] = if name == "rename" {
                b"RENAME"
            } else {
                b"RENAMENX"
            };
            let mut args = args;
            args[0] = canonical.to_vec();
            return write(args);
        }
        "copy" if args.len() >= 3 => match parse_copy(&args, s.db, ctx.store.databases()) {
            Ok((to, replace)) => {
                let mut args = args;
                args.truncate(3);
                args[0] = b"COPY".to_vec();
                if to != s.db {
                    args.push(b"DB".to_vec());
                    args.push(to.to_string().into_bytes());
                }
                if replace {
                    args.push(b"REPLACE".to_vec());
                }
                return write(args);
            }
            Err(e) => write_error(out, e),
        },
        "move" if args.len() == 3 => {
            let to = parse_db(&args[2], ctx.store.databases())
                .and_then(|to| if to == s.db { Err(ERR_SAME) } else { Ok(to) });
            match to {
                Ok(to) => {
                    let mut args = args;
                    args[0] = b"MOVE".to_vec();
                    args[2] = to.to_string().into_bytes();
                    return write(args);
                }
                Err(e) => write_error(out, e),
            }
        }
        "swapdb" if args.len() == 3 => match parse_swapdb(&args, ctx.store.databases()) {
            Ok((a, b)) => {
                return write(vec![
                    b"SWAPDB".to_vec(),
                    a.to_string().into_bytes(),
                    b.to_string().into_bytes(),
                ]);
            }
            Err(e) => write_error(out, e),
        },
        "flushall" | "flushdb" => {
            let canonical: &[u8] = if name == "flushall" {
                b"FLUSHALL"
            } else {
                b"FLUSHDB"
            };
            match args.len() {
                1 => return write(vec![canonical.to_vec()]),
                2 if args[1].eq_ignore_ascii_case(b"ASYNC")
                    || args[1].eq_ignore_ascii_case(b"SYNC") =>
                {
                    return write(vec![canonical.to_vec()]);
                }
                _ => write_error(out, ERR_SYNTAX),
            }
        }
        "randomkey" if args.len() == 1 => randomkey(ctx, s, now, out),
        "touch" if args.len() >= 2 => touch(ctx, s.db, &args[1..], now, out),
        "rename" | "renamenx" | "copy" | "move" | "swapdb" | "randomkey" | "touch" => write_error(
            out,
            &format!("ERR wrong number of arguments for '{name}' command"),
        ),
        _ => write_error(out, &format!("ERR unknown command '{name}'")),
    }
    Dispatched::Done
}

/// Parses a database index as Redis's `getIntFromObjectOrReply` and `selectDb` do: not
/// an integer, then beyond 32 bits, then not one of the `databases`.
pub fn parse_db(arg: &[u8], databases: u32) -> Result<u32, &'static str> {
    let db = parse_i64(arg).ok_or(ERR_NOT_INTEGER)?;
    if i32::try_from(db).is_err() {
        return Err(ERR_INT_RANGE);
    }
    u32::try_from(db)
        .ok()
        .filter(|d| *d < databases)
        .ok_or(ERR_DB_RANGE)
}

/// Parses COPY's options (`args[3..]`) as Redis does, left to right, stopping at the first
/// error; returns the destination database (`from` unless DB names another) and whether
/// REPLACE was given.
fn parse_copy(args: &[Vec<u8>], from: u32, databases: u32) -> Result<(u32, bool), &'static str> {
    let mut replace = false;
    let mut to = from;
    let mut j = 3;
    while j < args.len() {
        let opt = &args[j];
        if opt.eq_ignore_ascii_case(b"REPLACE") {
            replace = true;
        } else if opt.eq_ignore_ascii_case(b"DB") && j + 1 < args.len() {
            to = parse_db(&args[j + 1], databases)?;
            j += 1;
        } else {
            return Err(ERR_SYNTAX);
        }
        j += 1;
    }
    if to == from && args[1] == args[2] {
        return Err(ERR_SAME);
    }
    Ok((to, replace))
}

/// Parses SWAPDB's two indexes with Redis's wording: either not a 32-bit integer is
/// `invalid first|second DB index`; either not a database is `DB index is out of range`.
fn parse_swapdb(args: &[Vec<u8>], databases: u32) -> Result<(u32, u32), &'static str> {
    let int = |a: &[u8]| parse_i64(a).and_then(|n| i32::try_from(n).ok());
    let a = int(&args[1]).ok_or("ERR invalid first DB index")?;
    let b = int(&args[2]).ok_or("ERR invalid second DB index")?;
    let db = |n: i32| u32::try_from(n).ok().filter(|d| *d < databases);
    match (db(a), db(b)) {
        (Some(a), Some(b)) => Ok((a, b)),
        _ => Err(ERR_DB_RANGE),
    }
}

/// A pseudo-random number: SipHash of a counter under a per-process random key (std's
/// `RandomState` is seeded from the OS). Cheap, and good enough to pick a key.
fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

fn randomkey(ctx: &Context, s: &Session, now: u64, out: &mut Vec<u8>) {
    let r = random_u64();
    let (key, expired) = ctx.store.read(s.db, |db| db.random_key(r, now));
    for k in &expired {
        ctx.store.note_expired(s.db, k);
    }
    match key {
        Some(k) => write_bulk(out, &k),
        None => write_null(out, s.proto),
    }
}

fn touch(ctx: &Context, db: u32, keys: &[Vec<u8>], now: u64, out: &mut Vec<u8>) {
    let (n, expired) = ctx.store.read(db, |db| {
        let mut expired = Vec::new();
        let mut n = 0;
        for k in keys {
            if db.get(k, now).is_some() {
                n += 1;
            } else if expired.len() < MAX_HINTS && db.is_expired(k, now) {
                expired.push(k);
            }
        }
        (n, expired)
    });
    for k in expired {
        ctx.store.note_expired(db, k);
    }
    ctx.stats.keyspace_hits.fetch_add(n, Ordering::Relaxed);
    ctx.stats
        .keyspace_misses
        .fetch_add(keys.len() as u64 - n, Ordering::Relaxed);
    write_integer(out, n as i64);
}

impl Keyspace {
    /// A live key picked at random from `r` (64 random bits); `None` if no key is live.
    /// Also returns up to [`MAX_HINTS`] expired keys met on the way. See the module doc.
    pub(crate) fn random_key(&self, r: u64, now: u64) -> (Option<Vec<u8>>, Vec<Vec<u8>>) {
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
    pub(crate) fn exec_keyspace(&mut self, args: &[Vec<u8>], now: u64) -> OpResult {
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

/// Whether a logged command spans databases, so that [`Db::exec_databases`] applies it
/// rather than the entry's own database: MOVE, SWAPDB, FLUSHALL, and COPY to another
/// database (`COPY k n DB d [REPLACE]`).
pub(crate) fn spans_databases(args: &[Vec<u8>]) -> bool {
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
    pub(crate) fn exec_databases(&mut self, db: u32, args: &[Vec<u8>], now: u64) -> OpResult {
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
    use crate::commands::Settings;
    use crate::protocol::Value;
    use crate::repl::execute;
    use crate::store::Item;
    use crate::store::{Clock, Options, Store};
    use crate::wal::{Condition, Entry, Expiry, FsyncPolicy};
    use std::collections::HashSet;
    use std::path::Path;
    use std::sync::Arc;

    // ---- apply level ------------------------------------------------------------------

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
            let r = self.db.apply(Entry {
                index: self.index,
                epoch: 0,
                ts_ms: now,
                db: 0,
                op,
            });
            for ks in self.db.keyspaces() {
                check_invariants(ks);
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

    /// The expiry index and live byte count agree with the map: rebuilding them from the
    /// map's items through `Db::insert` gives the same.
    fn check_invariants(db: &Keyspace) {
        let mut fresh = Keyspace::default();
        for (k, i) in &db.map {
            fresh.insert(k.into(), i.clone());
        }
        assert_eq!(db.expires, fresh.expires, "expiry index out of step");
        assert_eq!(db.live_bytes, fresh.live_bytes, "live_bytes out of step");
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

    // ---- dispatch level ----------------------------------------------------------------

    fn opts(clock: &Arc<AtomicU64>) -> Options {
        let c = clock.clone();
        Options {
            fsync: FsyncPolicy::No,
            clock: Clock::new(move || c.load(Ordering::SeqCst)),
            active_expiry: false,
            ..Options::default()
        }
    }

    fn open(dir: &Path, clock: &Arc<AtomicU64>) -> Context {
        Context::new(Store::open(dir, opts(clock)).unwrap(), Settings::default())
    }

    fn run(ctx: &Context, s: &mut Session, line: &str) -> Value {
        execute(ctx, s, crate::client::split_args(line).unwrap())
    }

    fn ok() -> Value {
        Value::Simple("OK".into())
    }

    fn err(e: &str) -> Value {
        Value::Error(e.into())
    }

    fn bulk(b: &str) -> Value {
        Value::Bulk(b.as_bytes().to_vec())
    }

    const T0: u64 = 1_700_000_000_000;

    #[test]
    fn rename_and_copy_through_dispatch() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(AtomicU64::new(T0));
        let ctx = open(dir.path(), &clock);
        let mut s = ctx.register("t".into());
        let mut r = |line: &str| run(&ctx, &mut s, line);
        assert_eq!(r("rename nope x"), err("ERR no such key"));
        assert_eq!(r("renamenx nope x"), err("ERR no such key"));
        assert_eq!(r("set a 1 px 5000"), ok());
        assert_eq!(r("rename a a"), ok());
        assert_eq!(r("renamenx a a"), Value::Integer(0));
        assert_eq!(r("set b 2"), ok());
        assert_eq!(r("rename a b"), ok());
        assert_eq!(r("exists a"), Value::Integer(0));
        assert_eq!(r("get b"), bulk("1"));
        assert_eq!(r("pttl b"), Value::Integer(5000));
        assert_eq!(r("set c 3"), ok());
        assert_eq!(r("renamenx b c"), Value::Integer(0));
        assert_eq!(r("RenameNX b d"), Value::Integer(1));
        assert_eq!(r("pttl d"), Value::Integer(5000));
        assert_eq!(
            r("rename"),
            err("ERR wrong number of arguments for 'rename' command")
        );
        assert_eq!(
            r("rename a b c"),
            err("ERR wrong number of arguments for 'rename' command")
        );
        // COPY.
        let same = err("ERR source and destination objects are the same");
        assert_eq!(r("copy d d"), same);
        assert_eq!(r("copy d d replace"), same);
        assert_eq!(r("copy d d db 0"), same);
        assert_eq!(r("copy zz e"), Value::Integer(0));
        assert_eq!(r("copy d c"), Value::Integer(0));
        assert_eq!(r("get c"), bulk("3"));
        assert_eq!(r("copy d c REPLACE"), Value::Integer(1));
        assert_eq!(r("get c"), bulk("1"));
        assert_eq!(r("pttl c"), Value::Integer(5000));
        assert_eq!(r("copy d e DB 0"), Value::Integer(1));
        assert_eq!(r("copy d e db 0 replace replace"), Value::Integer(1));
        let range = err("ERR DB index is out of range");
        assert_eq!(r("copy d f db 16"), range);
        assert_eq!(r("copy d f db -1"), range);
        assert_eq!(r("copy d f db 0 db 16"), range);
        assert_eq!(r("copy d d db 16"), range, "options are checked first");
        let not_int = err("ERR value is not an integer or out of range");
        for bad in ["x", "01", "-0", "+1", "1.0", "99999999999999999999", "' 1'"] {
            assert_eq!(r(&format!("copy d f db {bad}")), not_int, "{bad}");
        }
        let int_range =
            err("ERR value is out of range, value must between -2147483648 and 2147483647");
        assert_eq!(r("copy d f db 2147483648"), int_range);
        assert_eq!(r("copy d f db -2147483649"), int_range);
        let syntax = err("ERR syntax error");
        assert_eq!(r("copy d f db"), syntax);
        assert_eq!(r("copy d f foo"), syntax);
        assert_eq!(r("copy d f replace db"), syntax);
        assert_eq!(r("copy d f db 77 foo"), range, "left to right, as Redis");
        assert_eq!(r("copy d f foo db 77"), syntax);
        assert_eq!(r("exists f"), Value::Integer(0));
        assert_eq!(
            r("copy"),
            err("ERR wrong number of arguments for 'copy' command")
        );
        // Expiry decides by the entry's time.
        clock.store(T0 + 5000, Ordering::SeqCst);
        assert_eq!(r("rename d x"), err("ERR no such key"));
        assert_eq!(r("copy c x"), Value::Integer(0));
        assert_eq!(r("exists x"), Value::Integer(0));
        // Both expired sources were removed by the entries that met them; `e` (expired
        // too, never touched by a write) waits for the expirer.
        let left = ctx.store.read(0, |db| {
            let mut k: Vec<Vec<u8>> = db.map.iter().map(|(k, _)| k.to_vec()).collect();
            k.sort();
            (k, db.expired_keys, db.expiring())
        });
        assert_eq!(left, (vec![b"e".to_vec()], 2, 1));
    }

    #[test]
    fn flush_touch_randomkey_through_dispatch() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(AtomicU64::new(T0));
        let ctx = open(dir.path(), &clock);
        let mut s = ctx.register("t".into());
        let mut r = |line: &str| run(&ctx, &mut s, line);
        assert_eq!(r("randomkey"), Value::Null);
        assert_eq!(r("touch a b"), Value::Integer(0));
        assert_eq!(r("set x 1"), ok());
        assert_eq!(r("touch x x y"), Value::Integer(2));
        assert_eq!(r("randomkey"), bulk("x"));
        assert_eq!(r("set gone 1 px 10"), ok());
        assert_eq!(r("touch gone"), Value::Integer(1));
        clock.store(T0 + 10, Ordering::SeqCst);
        assert_eq!(r("touch gone x"), Value::Integer(1));
        for _ in 0..20 {
            assert_eq!(r("randomkey"), bulk("x"));
        }
        for i in 0..5 {
            assert_eq!(r(&format!("set k{i} v")), ok());
        }
        let mut seen = HashSet::new();
        for _ in 0..300 {
            match r("randomkey") {
                Value::Bulk(k) => {
                    seen.insert(k);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(seen.len(), 6, "every live key comes up: {seen:?}");
        assert!(!seen.contains(b"gone".as_slice()));
        // FLUSHDB / FLUSHALL and their options.
        let syntax = err("ERR syntax error");
        assert_eq!(r("flushall foo"), syntax);
        assert_eq!(r("flushall sync async"), syntax);
        assert_eq!(r("flushdb foo"), syntax);
        assert_eq!(r("dbsize"), Value::Integer(7));
        assert_eq!(r("flushdb ASYNC"), ok());
        assert_eq!(r("dbsize"), Value::Integer(0));
        assert_eq!(r("set y 1 px 100"), ok());
        assert_eq!(r("flushall sync"), ok());
        assert_eq!(r("set z 1"), ok());
        assert_eq!(r("flushall"), ok());
        assert_eq!(r("flushdb"), ok());
        assert_eq!(r("randomkey"), Value::Null);
        assert_eq!(
            ctx.store
                .read(0, |db| (db.len(), db.expiring(), db.live_bytes())),
            (0, 0, 0)
        );
        // RESP3 null.
        assert!(matches!(r("hello 3"), Value::Map(_)));
        let mut out = Vec::new();
        let d = crate::commands::dispatch(&ctx, &mut s, vec![b"RANDOMKEY".to_vec()], &mut out);
        assert!(matches!(d, Dispatched::Done));
        assert_eq!(out, b"_\r\n");
    }

    #[test]
    fn touch_counts_keyspace_hits_and_misses() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(AtomicU64::new(T0));
        let ctx = open(dir.path(), &clock);
        let mut s = ctx.register("t".into());
        run(&ctx, &mut s, "set x 1");
        let hits = ctx.stats.keyspace_hits.load(Ordering::Relaxed);
        let misses = ctx.stats.keyspace_misses.load(Ordering::Relaxed);
        assert_eq!(run(&ctx, &mut s, "touch x y y"), Value::Integer(1));
        assert_eq!(ctx.stats.keyspace_hits.load(Ordering::Relaxed), hits + 1);
        assert_eq!(
            ctx.stats.keyspace_misses.load(Ordering::Relaxed),
            misses + 2
        );
    }

    /// What a restart rebuilds from the log equals what the clients were told.
    #[test]
    fn restart_reproduces_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(AtomicU64::new(T0));
        let lines = [
            "set a 1 px 60000",
            "set b 2",
            "rename a b",
            "set c 3 px 1000",
            "copy b c replace",
            "copy b d",
            "renamenx d e",
            "set f 6",
            "rename nope x",
            "set short 1 px 10",
        ];
        let snapshot = |ctx: &Context| {
            ctx.store.read(0, |db| {
                let mut items: Vec<(Vec<u8>, Vec<u8>, u64)> = db
                    .map
                    .iter()
                    .map(|(k, i)| (k.to_vec(), i.value.to_vec(), i.expire_at))
                    .collect();
                items.sort();
                (items, db.expiring(), db.live_bytes())
            })
        };
        let before = {
            let ctx = open(dir.path(), &clock);
            let mut s = ctx.register("t".into());
            for l in lines {
                run(&ctx, &mut s, l);
            }
            // `short` expires; the rename that meets it is an error, and so on replay.
            clock.store(T0 + 10, Ordering::SeqCst);
            assert_eq!(run(&ctx, &mut s, "rename short z"), err("ERR no such key"));
            assert_eq!(run(&ctx, &mut s, "exists z"), Value::Integer(0));
            snapshot(&ctx)
        };
        assert_eq!(
            before.0,
            vec![
                (b"b".to_vec(), b"1".to_vec(), T0 + 60000),
                (b"c".to_vec(), b"1".to_vec(), T0 + 60000),
                (b"e".to_vec(), b"1".to_vec(), T0 + 60000),
                (b"f".to_vec(), b"6".to_vec(), 0),
            ]
        );
        assert_eq!(before.1, 3);
        // Replay happens under a later clock: the entries' own times still decide.
        clock.store(T0 + 30_000, Ordering::SeqCst);
        let ctx = open(dir.path(), &clock);
        assert_eq!(snapshot(&ctx), before);
        let mut s = ctx.register("t".into());
        assert_eq!(run(&ctx, &mut s, "flushall"), ok());
        assert_eq!(run(&ctx, &mut s, "set after 1 px 5000"), ok());
        drop(ctx);
        let ctx = open(dir.path(), &clock);
        let after = snapshot(&ctx);
        assert_eq!(
            after.0,
            vec![(b"after".to_vec(), b"1".to_vec(), T0 + 35_000)]
        );
        assert_eq!(after.1, 1);
    }

    /// SCAN's guarantees while the key space changes between calls: every key present for
    /// the whole iteration is returned, and no key is returned twice.
    #[test]
    fn scan_guarantees_hold_under_churn() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(AtomicU64::new(T0));
        let ctx = open(dir.path(), &clock);
        let mut s = ctx.register("t".into());
        let mut stable = HashSet::new();
        for i in 0..2000 {
            let k = format!("stable:{i}");
            assert_eq!(run(&ctx, &mut s, &format!("set {k} v")), ok());
            stable.insert(k.into_bytes());
        }
        // Keys that come and go during the iteration.
        for i in 0..500 {
            run(&ctx, &mut s, &format!("set doomed:{i} v"));
        }
        let mut returned: HashSet<Vec<u8>> = HashSet::new();
        let mut cursor = b"0".to_vec();
        let mut calls = 0;
        let mut added = 0;
        loop {
            let reply = execute(
                &ctx,
                &mut s,
                vec![
                    b"SCAN".to_vec(),
                    cursor.clone(),
                    b"COUNT".to_vec(),
                    b"10".to_vec(),
                ],
            );
            let Value::Array(parts) = reply else {
                panic!("{reply:?}")
            };
            let [Value::Bulk(next), Value::Array(keys)] = &parts[..] else {
                panic!("{parts:?}")
            };
            for k in keys {
                let Value::Bulk(k) = k else { panic!("{k:?}") };
                assert!(returned.insert(k.clone()), "returned twice: {k:?}");
            }
            calls += 1;
            // Churn: delete a few doomed keys, add new ones, delete some of those again,
            // and re-create a deleted key (it must still come back at most once).
            for j in 0..3 {
                let d = (calls * 3 + j) % 500;
                run(&ctx, &mut s, &format!("del doomed:{d}"));
            }
            for _ in 0..4 {
                run(&ctx, &mut s, &format!("set new:{added} v"));
                added += 1;
            }
            if added > 8 {
                run(&ctx, &mut s, &format!("del new:{}", added - 8));
            }
            if calls % 7 == 0 {
                run(&ctx, &mut s, &format!("set doomed:{} back", calls % 500));
            }
            cursor = next.clone();
            if cursor == b"0" {
                break;
            }
            assert!(calls < 10_000, "SCAN does not terminate");
        }
        let missing: Vec<_> = stable.iter().filter(|k| !returned.contains(*k)).collect();
        assert!(
            missing.is_empty(),
            "{} stable keys never returned",
            missing.len()
        );
        assert!(
            calls >= 200,
            "COUNT 10 over 2000+ keys takes many calls: {calls}"
        );
    }
}
