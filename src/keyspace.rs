//! Keyspace commands: RENAME, RENAMENX, COPY, MOVE, SWAPDB, FLUSHDB/FLUSHALL (writes),
//! RANDOMKEY and TOUCH (reads), with Redis 7's reply shapes and error wording.
//!
//! # Writes
//!
//! [`dispatch`] only validates a write and turns it into a canonical logged command,
//! logged in the connection's database (the entry's `db`, see `wal.rs`); the map changes
//! when the entry is applied at the entry's timestamp, by the state machine
//! (`db/keyspace.rs`: within that database, or across databases for the commands that
//! span them, [`spans_databases`]). The canonical forms are:
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
//! How the entries are applied (the order of lookups, deadlines, SWAPDB, and why a
//! large flushed database is freed on another thread) is described where it is done,
//! in `db/keyspace.rs`.
//!
//! # Reads
//!
//! RANDOMKEY and TOUCH answer at dispatch under the map lock, using the store's
//! clock, and report expired keys they meet to the active expirer (lazy expiry), as GET
//! does. TOUCH counts keyspace hits and misses as Redis's does; no access times are kept,
//! so it only counts the keys that exist.
//!
//! RANDOMKEY's pick is the state machine's ([`Keyspace::random_key`]: a random bucket,
//! then a random key of its chain, as Redis does).

use crate::commands::{Context, Dispatched, Reply, Session};
use crate::db::{ERR_DB_RANGE, ERR_SAME, MAX_HINTS, Op, parse_i64};
#[cfg(doc)]
use crate::db::{Keyspace, spans_databases};
use crate::protocol::{write_bulk, write_error, write_integer, write_null};
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};

const ERR_SYNTAX: &str = "ERR syntax error";
const ERR_NOT_INTEGER: &str = "ERR value is not an integer or out of range";
const ERR_INT_RANGE: &str =
    "ERR value is out of range, value must between -2147483648 and 2147483647";

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
        crate::commands::note_expired(ctx, s.db, k);
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
        crate::commands::note_expired(ctx, db, k);
    }
    ctx.stats.keyspace_hits.fetch_add(n, Ordering::Relaxed);
    ctx.stats
        .keyspace_misses
        .fetch_add(keys.len() as u64 - n, Ordering::Relaxed);
    write_integer(out, n as i64);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::Settings;
    use crate::protocol::Value;
    use crate::repl::execute;
    use crate::store::{Clock, Options, Store};
    use crate::wal::FsyncPolicy;
    use std::collections::HashSet;
    use std::path::Path;
    use std::sync::Arc;

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
            let k: Vec<Vec<u8>> = db.contents().into_iter().map(|(k, _, _)| k).collect();
            (k, db.expired_keys(), db.expiring())
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
            ctx.store
                .read(0, |db| (db.contents(), db.expiring(), db.live_bytes()))
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
