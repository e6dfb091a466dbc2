//! The string family beyond GET/SET/MSET/INCR: SETEX, PSETEX, GETSET, GETDEL, GETEX,
//! APPEND, GETRANGE/SUBSTR and SETRANGE, with Redis 7's replies, edge cases and error
//! wording (INCRBYFLOAT is routed here too, but not written yet).
//!
//! # How data enters and leaves
//!
//! A request enters [`dispatch`] (called by `commands::dispatch` once the arity is
//! checked) with the store's clock reading `now`.
//!
//! - Reads (GETRANGE, SUBSTR) answer at once under the map lock. They are `readonly` in
//!   the command table, so the server has applied the connection's earlier writes first.
//! - Writes are never executed here. Dispatch checks the arguments (the same errors, in
//!   the same order, as Redis; one exception: Redis answers nil, not an error, to GETEX
//!   with a bad time on a missing key, which only applying could know), turns relative
//!   times into absolute Unix-ms deadlines, and
//!   returns the log operation as [`Dispatched::Write`]. SETEX, PSETEX and GETSET are
//!   plain SETs, so they become a typed [`Op::Set`]; the others become a canonical
//!   [`Op::Cmd`]:
//!
//!   | client sends                          | logged as                       |
//!   |---------------------------------------|---------------------------------|
//!   | `SETEX k 10 v`, `PSETEX k 10000 v`    | `Op::Set` with `Expiry::At(ms)` |
//!   | `GETSET k v`                          | `Op::Set` with `get`, no expiry |
//!   | `APPEND k v`                          | `APPEND k v`                    |
//!   | `SETRANGE k 7 v`                      | `SETRANGE k 7 v`                |
//!   | `GETDEL k`                            | `GETDEL k`                      |
//!   | `GETEX k`                             | `GETEX k`                       |
//!   | `GETEX k EX 10` / `PX` / `EXAT`/`PXAT`| `GETEX k PXAT <unix ms>`        |
//!   | `GETEX k PERSIST`                     | `GETEX k PERSIST`               |
//!
//!   Once logged, the entry is applied by the state machine (`db/strings.rs`) with the
//!   entry's timestamp as `now`; the result ([`OpResult`](crate::db::OpResult)) becomes
//!   the reply through `commands::render_result`.
//!
//! # Why canonical forms
//!
//! The log is replayed at every restart and by every follower, possibly long after the
//! write: `GETEX k EX 10` replayed tomorrow would move the deadline, `GETEX k PXAT <ms>`
//! cannot. So the log holds absolute times only, and applying an entry reads no clock
//! (the entry's timestamp decides whether a key has expired). One spelling per meaning
//! (upper-case names, one time unit, options already checked) also means one small apply
//! path per command. The apply side still checks every argument, because a damaged or
//! foreign log must give an error result, never a panic or a huge allocation.
//!
//! # Why GETEX without options is logged too
//!
//! GETEX is a `write` command in the table, so the server dispatches it while this
//! connection's earlier pipelined writes may still be queued, not yet applied: answering
//! `GETEX k` from the map at dispatch time would miss a `SET k v` sent just before it in
//! the same pipeline (tried on a running server: 100 pipelines out of 100 got the old
//! value). Logging it, as an entry that changes nothing, orders it after those writes,
//! as Redis's single thread would. The cost is one log record per plain GETEX; clients
//! use GET for plain reads.
//!
//! # Limits
//!
//! A string may not grow past [`MAX_STRING_LEN`](crate::db::MAX_STRING_LEN) (512 MiB,
//! Redis's default `proto-max-bulk-len`). It is the state machine's constant rather than
//! the server's setting because APPEND's check depends on the stored value and so runs
//! when the entry is applied, and applying must give the same answer on every node
//! whatever its configuration. SETRANGE's offset is checked against it here too, so that
//! a request that can only fail is refused before it is logged.

use crate::commands::{Context, Dispatched, Reply, Session};
use crate::db::{
    Condition, ERR_NOT_INTEGER, ERR_TOO_BIG, Expiry, Op, parse_i64, string_fits as fits, substring,
};
use crate::protocol::{write_bulk, write_error};

const ERR_OFFSET: &str = "ERR offset is out of range";
const ERR_SYNTAX: &str = "ERR syntax error";

/// Executes one string-family request (see the module doc): answers reads into `out`,
/// returns writes as log operations.
pub fn dispatch(
    ctx: &Context,
    s: &mut Session,
    name: &str,
    args: Vec<Vec<u8>>,
    now: u64,
    out: &mut Vec<u8>,
) -> Dispatched {
    let parsed = match name {
        "getrange" | "substr" => {
            getrange(ctx, s.db, &args, now, out);
            return Dispatched::Done;
        }
        "setex" | "psetex" => parse_setex(name, args, now),
        "getset" => Ok(set_op(args, Expiry::Never, true)),
        "getdel" => Ok(cmd(b"GETDEL", args)),
        "append" => Ok(cmd(b"APPEND", args)),
        "getex" => parse_getex(args, now),
        "setrange" => parse_setrange(args),
        "incrbyfloat" => {
            // The increment is checked here so a bad one is refused without a log entry;
            // the stored value can only be checked when the entry is applied.
            if crate::float::parse_float(&args[2]).is_none() {
                Err(crate::float::ERR_NOT_FLOAT.to_string())
            } else {
                Ok(cmd(b"INCRBYFLOAT", args))
            }
        }
        _ => Err(format!("ERR unknown command '{name}'")),
    };
    match parsed {
        Ok(op) => Dispatched::Write(op, Reply::Standard),
        Err(e) => {
            write_error(out, &e);
            Dispatched::Done
        }
    }
}

/// `[name, key, value]` as a SET of `value` with `expiry`.
fn set_op(mut args: Vec<Vec<u8>>, expiry: Expiry, get: bool) -> Op {
    let value = args.pop().unwrap_or_default();
    let key = std::mem::take(&mut args[1]);
    Op::Set {
        key,
        value,
        expiry,
        condition: Condition::Always,
        get,
    }
}

/// The request's arguments under the canonical (upper-case) command name.
fn cmd(name: &[u8], mut args: Vec<Vec<u8>>) -> Op {
    args[0] = name.to_vec();
    Op::Cmd { args }
}

/// Redis's `getExpireMillisecondsOrReply`: the time argument `arg`, in seconds or
/// milliseconds, relative to `now` or absolute, as an absolute Unix-ms deadline. Zero,
/// negative, and anything whose deadline would not fit in a signed 64-bit number of
/// milliseconds is an invalid expire time.
fn deadline(
    arg: &[u8],
    seconds: bool,
    relative: bool,
    now: u64,
    name: &str,
) -> Result<u64, String> {
    let n = parse_i64(arg).ok_or_else(|| ERR_NOT_INTEGER.to_string())?;
    let invalid = || format!("ERR invalid expire time in '{name}' command");
    if n <= 0 || (seconds && n > i64::MAX / 1000) {
        return Err(invalid());
    }
    let ms = if seconds { n * 1000 } else { n };
    let at = if relative {
        i64::try_from(now).ok().and_then(|now| ms.checked_add(now))
    } else {
        Some(ms)
    };
    at.map(|at| at as u64).ok_or_else(invalid)
}

/// `SETEX key seconds value` / `PSETEX key milliseconds value`.
fn parse_setex(name: &str, args: Vec<Vec<u8>>, now: u64) -> Result<Op, String> {
    let at = deadline(&args[2], name == "setex", true, now, name)?;
    Ok(set_op(args, Expiry::At(at), false))
}

/// GETEX's options; at most one kind (repeating the same one is allowed, the last time
/// wins, as in Redis).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GetexOpt {
    Persist,
    Ex,
    Px,
    ExAt,
    PxAt,
}

/// `GETEX key [EX seconds|PX ms|EXAT unix-s|PXAT unix-ms|PERSIST]`. Syntax is checked
/// before the time, as Redis does.
fn parse_getex(mut args: Vec<Vec<u8>>, now: u64) -> Result<Op, String> {
    let mut kind: Option<GetexOpt> = None;
    let mut time: Option<usize> = None;
    let mut i = 2;
    while i < args.len() {
        let opt = match &args[i].to_ascii_uppercase()[..] {
            b"PERSIST" => GetexOpt::Persist,
            b"EX" => GetexOpt::Ex,
            b"PX" => GetexOpt::Px,
            b"EXAT" => GetexOpt::ExAt,
            b"PXAT" => GetexOpt::PxAt,
            _ => return Err(ERR_SYNTAX.into()),
        };
        if kind.is_some_and(|k| k != opt) {
            return Err(ERR_SYNTAX.into());
        }
        kind = Some(opt);
        if opt != GetexOpt::Persist {
            if i + 1 >= args.len() {
                return Err(ERR_SYNTAX.into());
            }
            time = Some(i + 1);
            i += 1;
        }
        i += 1;
    }
    let key = std::mem::take(&mut args[1]);
    let mut canonical = vec![b"GETEX".to_vec(), key];
    match (kind, time) {
        (None, _) => {}
        (Some(GetexOpt::Persist), _) => canonical.push(b"PERSIST".to_vec()),
        (Some(k), Some(t)) => {
            let seconds = matches!(k, GetexOpt::Ex | GetexOpt::ExAt);
            let relative = matches!(k, GetexOpt::Ex | GetexOpt::Px);
            let at = deadline(&args[t], seconds, relative, now, "getex")?;
            canonical.push(b"PXAT".to_vec());
            canonical.push(at.to_string().into_bytes());
        }
        (Some(_), None) => return Err(ERR_SYNTAX.into()),
    }
    Ok(Op::Cmd { args: canonical })
}

/// `SETRANGE key offset value`. The size limit holds only for a non-empty value: with
/// an empty one Redis answers the current length (or 0) whatever the offset.
fn parse_setrange(mut args: Vec<Vec<u8>>) -> Result<Op, String> {
    let offset = parse_i64(&args[2]).ok_or_else(|| ERR_NOT_INTEGER.to_string())?;
    if offset < 0 {
        return Err(ERR_OFFSET.into());
    }
    let len = args[3].len();
    if len > 0 && !fits(offset as u64, len) {
        return Err(ERR_TOO_BIG.into());
    }
    args[0] = b"SETRANGE".to_vec();
    args[2] = offset.to_string().into_bytes();
    Ok(Op::Cmd { args })
}

/// `GETRANGE|SUBSTR key start end`: both offsets are parsed before the key is looked
/// up; a missing key is an empty string, not nil.
fn getrange(ctx: &Context, db: u32, args: &[Vec<u8>], now: u64, out: &mut Vec<u8>) {
    let (Some(start), Some(end)) = (parse_i64(&args[2]), parse_i64(&args[3])) else {
        write_error(out, ERR_NOT_INTEGER);
        return;
    };
    crate::commands::read_value(ctx, db, &args[1], now, |item| match item {
        Some(item) => write_bulk(out, substring(&item.value, start, end)),
        None => write_bulk(out, b""),
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::{Context, Settings};
    use crate::db::OpResult;
    use crate::protocol::{Proto, Value};
    use crate::repl::execute;
    use crate::store::{Clock, Options, Store};
    use crate::wal::FsyncPolicy;
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;
    use std::sync::atomic::Ordering;

    // ---- dispatch level ---------------------------------------------------------------
    // (the apply level is tested in `db/strings.rs`)

    /// A canonical command as logged.
    fn c(parts: &[&str]) -> Op {
        Op::Cmd {
            args: parts.iter().map(|p| p.as_bytes().to_vec()).collect(),
        }
    }

    struct T {
        ctx: Context,
        s: Session,
        now: Arc<AtomicU64>,
        _dir: Option<tempfile::TempDir>,
    }

    const T0: u64 = 1_700_000_000_000;

    fn opts(now: &Arc<AtomicU64>) -> Options {
        let n = now.clone();
        Options {
            fsync: FsyncPolicy::No,
            clock: Clock::new(move || n.load(Ordering::SeqCst)),
            active_expiry: false,
            ..Options::default()
        }
    }

    fn open(dir: &std::path::Path, now: &Arc<AtomicU64>) -> (Context, Session) {
        let ctx = Context::new(Store::open(dir, opts(now)).unwrap(), Settings::default());
        let s = ctx.register("test".into());
        (ctx, s)
    }

    impl T {
        fn new() -> T {
            let dir = tempfile::tempdir().unwrap();
            let now = Arc::new(AtomicU64::new(T0));
            let (ctx, s) = open(dir.path(), &now);
            T {
                ctx,
                s,
                now,
                _dir: Some(dir),
            }
        }

        fn x(&mut self, line: &str) -> Value {
            let args = crate::client::split_args(line).unwrap();
            execute(&self.ctx, &mut self.s, args)
        }

        fn bytes(&mut self, args: &[&[u8]]) -> Value {
            let args = args.iter().map(|a| a.to_vec()).collect();
            execute(&self.ctx, &mut self.s, args)
        }

        fn advance(&self, ms: u64) {
            self.now.fetch_add(ms, Ordering::SeqCst);
        }

        fn last_index(&self) -> u64 {
            self.ctx.store.log_info().last_index
        }
    }

    fn ok() -> Value {
        Value::Simple("OK".into())
    }
    fn bulk(s: &str) -> Value {
        Value::Bulk(s.as_bytes().to_vec())
    }
    fn int(n: i64) -> Value {
        Value::Integer(n)
    }
    fn err(s: &str) -> Value {
        Value::Error(s.into())
    }

    #[test]
    fn setex_and_psetex() {
        let mut t = T::new();
        assert_eq!(t.x("SETEX k 10 v"), ok());
        assert_eq!(t.x("PTTL k"), int(10_000));
        assert_eq!(t.x("PSETEX p 1500 v"), ok());
        assert_eq!(t.x("PTTL p"), int(1500));
        assert_eq!(t.x("GET p"), bulk("v"));
        t.advance(1500);
        assert_eq!(t.x("GET p"), Value::Null);
        // Largest SETEX whose deadline still fits (as in Redis: TTL 9223372036854).
        assert_eq!(t.x("SETEX big 9223372036854 v"), ok());
        assert_eq!(t.x("TTL big"), int(9_223_372_036_854));
        let before = t.last_index();
        for (cmd, want) in [
            ("SETEX k 0 v", "ERR invalid expire time in 'setex' command"),
            ("SETEX k -1 v", "ERR invalid expire time in 'setex' command"),
            (
                "SETEX k 9223372036854775807 v",
                "ERR invalid expire time in 'setex' command",
            ),
            (
                "SETEX k 9223372036854775 v",
                "ERR invalid expire time in 'setex' command",
            ),
            (
                "SETEX k 9223372036854774 v",
                "ERR invalid expire time in 'setex' command",
            ),
            ("SETEX k abc v", ERR_NOT_INTEGER),
            ("SETEX k 1.5 v", ERR_NOT_INTEGER),
            (
                "PSETEX k 0 v",
                "ERR invalid expire time in 'psetex' command",
            ),
            (
                "PSETEX k 9223372036854775807 v",
                "ERR invalid expire time in 'psetex' command",
            ),
            (
                "PSETEX k 9223372036854775000 v",
                "ERR invalid expire time in 'psetex' command",
            ),
            ("PSETEX k 1.5 v", ERR_NOT_INTEGER),
            (
                "SETEX k 10",
                "ERR wrong number of arguments for 'setex' command",
            ),
        ] {
            assert_eq!(t.x(cmd), err(want), "{cmd}");
        }
        assert_eq!(t.last_index(), before, "refused writes are not logged");
        assert_eq!(t.x("PTTL k"), int(8_500), "and change nothing");
    }

    #[test]
    fn getset_returns_the_old_value_and_clears_the_ttl() {
        let mut t = T::new();
        assert_eq!(t.x("GETSET k a"), Value::Null);
        assert_eq!(t.x("GET k"), bulk("a"));
        assert_eq!(t.x("SETEX k 100 v"), ok());
        assert_eq!(t.x("GETSET k w"), bulk("v"));
        assert_eq!(t.x("TTL k"), int(-1));
        assert_eq!(t.x("GET k"), bulk("w"));
        // An expired key has no old value.
        assert_eq!(t.x("PSETEX k 10 old"), ok());
        t.advance(10);
        assert_eq!(t.x("GETSET k new"), Value::Null);
        assert_eq!(t.x("GET k"), bulk("new"));
    }

    #[test]
    fn getdel() {
        let mut t = T::new();
        assert_eq!(t.x("SETEX k 100 v"), ok());
        assert_eq!(t.x("GETDEL k"), bulk("v"));
        assert_eq!(t.x("GETDEL k"), Value::Null);
        assert_eq!(t.x("EXISTS k"), int(0));
        assert_eq!(t.ctx.store.read(0, |db| db.expiring()), 0);
    }

    #[test]
    fn getex_options() {
        let mut t = T::new();
        assert_eq!(t.x("GETEX nokey"), Value::Null);
        assert_eq!(t.x("GETEX nokey EX 10"), Value::Null);
        assert_eq!(t.x("EXISTS nokey"), int(0));
        assert_eq!(t.x("SET g val"), ok());
        assert_eq!(t.x("EXPIRE g 100"), int(1));
        assert_eq!(t.x("GETEX g"), bulk("val"));
        assert_eq!(t.x("TTL g"), int(100), "no option: the TTL is untouched");
        assert_eq!(t.x("GETEX g EX 10"), bulk("val"));
        assert_eq!(t.x("PTTL g"), int(10_000));
        assert_eq!(t.x("GETEX g px 2500"), bulk("val"));
        assert_eq!(t.x("PTTL g"), int(2500));
        assert_eq!(
            t.x(&format!("GETEX g EXAT {}", T0 / 1000 + 50)),
            bulk("val")
        );
        assert_eq!(t.x("PTTL g"), int(50_000));
        assert_eq!(t.x(&format!("GETEX g PXAT {}", T0 + 1234)), bulk("val"));
        assert_eq!(t.x("PTTL g"), int(1234));
        // Repeating the same option is allowed; the last time wins.
        assert_eq!(t.x("GETEX g EX abc EX 20"), bulk("val"));
        assert_eq!(t.x("PTTL g"), int(20_000));
        assert_eq!(t.x("GETEX g PERSIST persist"), bulk("val"));
        assert_eq!(t.x("TTL g"), int(-1));
        // PXAT at the very limit is accepted, as in Redis.
        assert_eq!(t.x("GETEX g PXAT 9223372036854775807"), bulk("val"));
        assert_eq!(t.x("PEXPIRETIME g"), int(i64::MAX));
        assert_eq!(t.x("GETEX g PERSIST"), bulk("val"));
        let before = t.last_index();
        let invalid = "ERR invalid expire time in 'getex' command";
        for (cmd, want) in [
            ("GETEX g EX 10 PX 10", ERR_SYNTAX),
            ("GETEX g EX", ERR_SYNTAX),
            ("GETEX g FOO", ERR_SYNTAX),
            ("GETEX nokey FOO", ERR_SYNTAX),
            ("GETEX g KEEPTTL", ERR_SYNTAX),
            ("GETEX g PERSIST EX 10", ERR_SYNTAX),
            ("GETEX g EX 10 PERSIST", ERR_SYNTAX),
            ("GETEX g EX abc", ERR_NOT_INTEGER),
            ("GETEX g EX 0", invalid),
            ("GETEX g EX -5", invalid),
            ("GETEX g PX 0", invalid),
            ("GETEX g EXAT 0", invalid),
            ("GETEX g PXAT 0", invalid),
            ("GETEX g EX 9223372036854775807", invalid),
            ("GETEX g PX 9223372036854775807", invalid),
            ("GETEX g EXAT 9223372036854775807", invalid),
        ] {
            assert_eq!(t.x(cmd), err(want), "{cmd}");
        }
        assert_eq!(t.last_index(), before, "refused GETEX is not logged");
        assert_eq!(t.x("TTL g"), int(-1));
        // A deadline in the past: the value, then the key is deleted.
        assert_eq!(t.x("GETEX g pxat 1"), bulk("val"));
        assert_eq!(t.x("EXISTS g"), int(0));
        assert_eq!(t.x("SET g val"), ok());
        assert_eq!(t.x("GETEX g EXAT 1"), bulk("val"));
        assert_eq!(t.x("PTTL g"), int(-2));
    }

    #[test]
    fn getex_is_logged_with_an_absolute_deadline() {
        let mut t = T::new();
        t.x("SET g v");
        assert_eq!(
            dispatch_op(&t, "GETEX g EX 10"),
            c(&["GETEX", "g", "PXAT", &(T0 + 10_000).to_string()])
        );
        assert_eq!(
            dispatch_op(&t, "getex g exat 5"),
            c(&["GETEX", "g", "PXAT", "5000"])
        );
        assert_eq!(
            dispatch_op(&t, "GETEX g persist"),
            c(&["GETEX", "g", "PERSIST"])
        );
        assert_eq!(dispatch_op(&t, "getex g"), c(&["GETEX", "g"]));
        assert_eq!(dispatch_op(&t, "getdel g"), c(&["GETDEL", "g"]));
        assert_eq!(dispatch_op(&t, "append g x"), c(&["APPEND", "g", "x"]));
        assert_eq!(
            dispatch_op(&t, "setrange g 0 x"),
            c(&["SETRANGE", "g", "0", "x"])
        );
        assert_eq!(
            dispatch_op(&t, "psetex g 5 v"),
            Op::Set {
                key: b"g".to_vec(),
                value: b"v".to_vec(),
                expiry: Expiry::At(T0 + 5),
                condition: Condition::Always,
                get: false
            }
        );
        assert_eq!(
            dispatch_op(&t, "getset g v"),
            Op::Set {
                key: b"g".to_vec(),
                value: b"v".to_vec(),
                expiry: Expiry::Never,
                condition: Condition::Always,
                get: true
            }
        );
    }

    fn dispatch_op(t: &T, line: &str) -> Op {
        let args = crate::client::split_args(line).unwrap();
        let mut s = t.s.clone();
        let mut out = Vec::new();
        match crate::commands::dispatch(&t.ctx, &mut s, args, &mut out) {
            Dispatched::Write(op, Reply::Standard) => op,
            other => panic!("{line}: {other:?} {}", String::from_utf8_lossy(&out)),
        }
    }

    #[test]
    fn append_end_to_end() {
        let mut t = T::new();
        assert_eq!(t.x("APPEND a foo"), int(3));
        assert_eq!(t.x("APPEND a bar"), int(6));
        assert_eq!(t.x("GET a"), bulk("foobar"));
        assert_eq!(t.x("APPEND a \"\""), int(6));
        assert_eq!(t.x("SETEX a 100 x"), ok());
        assert_eq!(t.x("APPEND a yz"), int(3));
        assert_eq!(t.x("TTL a"), int(100));
        assert_eq!(t.x("GET a"), bulk("xyz"));
        assert_eq!(t.x("APPEND e2 \"\""), int(0));
        assert_eq!(t.x("EXISTS e2"), int(1));
        assert_eq!(t.x("STRLEN e2"), int(0));
        // Binary-safe.
        assert_eq!(t.bytes(&[b"APPEND", b"b", b"\0\xff\r\n"]), int(4));
        assert_eq!(
            t.bytes(&[b"GET", b"b"]),
            Value::Bulk(b"\0\xff\r\n".to_vec())
        );
    }

    #[test]
    fn setrange_end_to_end() {
        let mut t = T::new();
        assert_eq!(t.x("SETRANGE s 0 \"\""), int(0));
        assert_eq!(t.x("EXISTS s"), int(0));
        assert_eq!(t.x("SETRANGE s 5 x"), int(6));
        assert_eq!(t.x("GET s"), Value::Bulk(b"\0\0\0\0\0x".to_vec()));
        assert_eq!(t.x("SETRANGE s 100 \"\""), int(6));
        assert_eq!(t.x("SETRANGE s 536870912 \"\""), int(6));
        assert_eq!(t.x("SETRANGE s 536870911 \"\""), int(6));
        let before = t.last_index();
        let too_big = "ERR string exceeds maximum allowed size (proto-max-bulk-len)";
        for (cmd, want) in [
            ("SETRANGE s -1 x", "ERR offset is out of range"),
            ("SETRANGE s -1 \"\"", "ERR offset is out of range"),
            ("SETRANGE s abc x", ERR_NOT_INTEGER),
            ("SETRANGE s 1.0 x", ERR_NOT_INTEGER),
            ("SETRANGE s \" 1\" x", ERR_NOT_INTEGER),
            ("SETRANGE s 536870912 x", too_big),
            ("SETRANGE s 536870911 xy", too_big),
            ("SETRANGE s 9223372036854775807 x", too_big),
            ("SETRANGE nokey 536870912 x", too_big),
        ] {
            assert_eq!(t.x(cmd), err(want), "{cmd}");
        }
        assert_eq!(t.last_index(), before);
        assert_eq!(t.x("SETRANGE nokey 536870912 \"\""), int(0));
        assert_eq!(t.x("EXISTS nokey"), int(0));
        assert_eq!(t.x("SET s \"Hello World\""), ok());
        assert_eq!(t.x("EXPIRE s 100"), int(1));
        assert_eq!(t.x("SETRANGE s 6 Redis"), int(11));
        assert_eq!(t.x("GET s"), bulk("Hello Redis"));
        assert_eq!(t.x("TTL s"), int(100));
        assert_eq!(t.x("SETRANGE s 20 !"), int(21));
        assert_eq!(t.x("STRLEN s"), int(21));
        assert_eq!(t.x("TTL s"), int(100));
        assert_eq!(t.x("SET e \"\""), ok());
        assert_eq!(t.x("SETRANGE e 0 \"\""), int(0));
        assert_eq!(t.x("EXISTS e"), int(1));
    }

    #[test]
    fn getrange_end_to_end() {
        let mut t = T::new();
        t.x("SET hw \"Hello World\"");
        assert_eq!(t.x("GETRANGE hw 0 3"), bulk("Hell"));
        assert_eq!(t.x("GETRANGE hw 0 -1"), bulk("Hello World"));
        assert_eq!(t.x("GETRANGE hw -100 -50"), bulk("H"));
        assert_eq!(t.x("GETRANGE hw 11 20"), bulk(""));
        assert_eq!(t.x("SUBSTR hw 0 4"), bulk("Hello"));
        assert_eq!(
            t.x("GETRANGE nokey 0 -1"),
            bulk(""),
            "empty string, not nil"
        );
        t.x("SET n 12345");
        assert_eq!(t.x("GETRANGE n 1 -2"), bulk("234"));
        for cmd in [
            "GETRANGE nokey a 0",
            "GETRANGE hw 0 a",
            "GETRANGE hw 1.5 2",
            "GETRANGE hw +1 2",
            "GETRANGE hw 01 2",
            "GETRANGE hw -0 2",
        ] {
            assert_eq!(t.x(cmd), err(ERR_NOT_INTEGER), "{cmd}");
        }
        assert_eq!(
            t.x("GETRANGE hw 0"),
            err("ERR wrong number of arguments for 'getrange' command")
        );
        // An expired key reads as missing.
        t.x("PSETEX x 5 abc");
        t.advance(5);
        assert_eq!(t.x("GETRANGE x 0 -1"), bulk(""));
    }

    #[test]
    fn nil_replies_follow_the_protocol() {
        let mut t = T::new();
        t.s.proto = Proto::Resp3;
        for cmd in [
            "GETEX nokey",
            "GETEX nokey PERSIST",
            "GETDEL nokey",
            "GETSET k v",
        ] {
            assert_eq!(t.x(cmd), Value::Null, "{cmd}");
        }
        let mut out = Vec::new();
        crate::commands::render_result(
            &OpResult::Old(None),
            Reply::Standard,
            Proto::Resp3,
            &mut out,
        );
        assert_eq!(out, b"_\r\n");
    }

    #[test]
    fn incrbyfloat_like_redis() {
        let mut t = T::new();
        let bulk = |s: &str| Value::Bulk(s.as_bytes().to_vec());
        assert_eq!(t.x("INCRBYFLOAT k 10.5"), bulk("10.5"));
        assert_eq!(t.x("INCRBYFLOAT k 0.1"), bulk("10.6"));
        // Long double arithmetic, as redis-server 7.0.15 prints it.
        assert_eq!(t.x("INCRBYFLOAT k -5.0e3"), bulk("-4989.39999999999999991"));
        assert_eq!(t.x("GET k"), bulk("-4989.39999999999999991"));
        // A bad increment is refused before the log; a bad stored value when applied.
        let before = t.last_index();
        assert_eq!(t.x("INCRBYFLOAT k abc"), err(crate::float::ERR_NOT_FLOAT));
        assert_eq!(t.last_index(), before);
        t.x("SET s hello");
        assert_eq!(t.x("INCRBYFLOAT s 1"), err(crate::float::ERR_NOT_FLOAT));
        assert_eq!(t.x("INCRBYFLOAT k inf"), err(crate::float::ERR_NAN_OR_INF));
        // The deadline is kept.
        t.x("SET e 1 EX 100");
        assert_eq!(t.x("INCRBYFLOAT e 1"), bulk("2"));
        assert!(matches!(t.x("TTL e"), Value::Integer(n) if n > 0));
    }

    /// Every (key, value, deadline) in the map, sorted, expired keys included; the live
    /// bytes; the number of keys with a deadline.
    type Contents = (Vec<(Vec<u8>, Vec<u8>, u64)>, u64, usize);

    fn contents(ctx: &Context) -> Contents {
        ctx.store.read(0, |db| {
            db.check_invariants();
            (db.contents(), db.live_bytes(), db.expiring())
        })
    }

    /// Replaying the log reaches exactly the state the writes produced, even when the
    /// store reopens much later: the log holds absolute deadlines and applying reads the
    /// entry's time, never the clock.
    #[test]
    fn replay_is_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let now = Arc::new(AtomicU64::new(T0));
        let (ctx, mut s) = open(dir.path(), &now);
        let script = [
            "SETEX a 10 one",
            "APPEND a two",
            "PSETEX b 500 x",
            "SETRANGE b 3 yz",
            "GETSET c 1",
            "APPEND c 23",
            "SETRANGE d 2 pad",
            "SET e v",
            "GETEX e EX 100",
            "SET f v",
            "EXPIRE f 50",
            "GETEX f PERSIST",
            "SET g v",
            "GETEX g EXAT 1",
            "SET h v",
            "GETDEL h",
            "GETEX a PX 20000",
            "SETRANGE a 0 X",
        ];
        let mut replies = Vec::new();
        for (i, line) in script.iter().enumerate() {
            now.fetch_add(10 * i as u64, Ordering::SeqCst);
            let args = crate::client::split_args(line).unwrap();
            replies.push(execute(&ctx, &mut s, args));
        }
        // b expired during the script; a SETRANGE on it afterwards starts afresh.
        now.fetch_add(1000, Ordering::SeqCst);
        replies.push(execute(
            &ctx,
            &mut s,
            crate::client::split_args("SETRANGE b 0 new").unwrap(),
        ));
        assert!(
            !replies.iter().any(|r| matches!(r, Value::Error(_))),
            "{replies:?}"
        );
        let before = contents(&ctx);
        assert_eq!(before.2, 2, "a and e have deadlines");
        drop(ctx);
        // Reopen a day later: a replay that read the clock would expire a, b and e.
        now.fetch_add(86_400_000, Ordering::SeqCst);
        let (ctx, _s) = open(dir.path(), &now);
        assert_eq!(contents(&ctx), before);
        // And a second replay agrees with the first.
        drop(ctx);
        let (ctx, _s) = open(dir.path(), &now);
        assert_eq!(contents(&ctx), before);
    }
}
