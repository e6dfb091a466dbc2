//! Transactions: MULTI, EXEC, DISCARD, WATCH and UNWATCH, as in Redis 7.
//!
//! A connection's transaction state is [`Session::multi`]. The connection loop (and the
//! repl) hands every request to [`handle`] while a transaction is open, and the five
//! transaction commands always ([`intercepts`]). Between MULTI and EXEC each command is
//! checked and queued (`+QUEUED`) as one of:
//! - a write, already parsed into its log [`Op`] by [`commands::dispatch_spec`] (so its
//!   relative times count from when it was queued);
//! - a read of the key space, as a canonical *read record* (`GET k`, `MGET k…`, …,
//!   see `read_record`; the state machine answers it when the entry is applied,
//!   `db/reads.rs`);
//! - anything else (PING, ECHO, CLIENT, INFO, SCAN, RANDOMKEY, …): its arguments, run at
//!   EXEC time.
//!
//! EXEC logs the writes and the read records together as ONE entry, [`Op::Multi`]
//! ([`Store::exec`](crate::Store::exec)): applied in order under one map lock, so nothing else happens in the
//! middle, a GET after a SET in the same transaction sees the SET, and a cluster will
//! replicate the transaction as one entry. Logging the reads costs a few bytes per read
//! and a lookup on replay; the other ways to make them atomic (holding the map lock from
//! the queueing of the entry to its apply, or a leader-only hook into the apply loop)
//! either stall every reader for an fsync or make the apply path differ between leader
//! and follower. Commands of the third kind do not read the key space (SCAN and
//! RANDOMKEY promise no particular state anyway), so they run on the connection's thread
//! after the entry is applied, their replies put at their place in EXEC's array.
//!
//! Errors, as in Redis: a command refused while queueing (unknown, or the wrong number of
//! arguments) answers its error and makes EXEC answer `-EXECABORT …` with nothing
//! applied. A command whose arguments are wrong (`SET k v XX NX`) is queued, and its
//! error is its element of EXEC's array (it is not logged); errors that depend on the
//! data (INCR of a non-integer) are per command in the array too, and the rest applies.
//!
//! WATCH registers keys with the store's watch registry (`src/watch.rs`); EXEC answers
//! nil, logging nothing, when one changed. EXEC, DISCARD and UNWATCH clear the watches,
//! and so does closing the connection ([`Context::unregister`]).
//!
//! On a cluster member ([`Context::gate`]): a command the node would not serve now is
//! answered with the redirect (`-MOVED`/`-CLUSTERDOWN`) while queueing and fails the
//! transaction (EXECABORT), as Redis Cluster does; and EXEC checks again, because the
//! role may change between MULTI and EXEC and only the check at EXEC holds where the
//! entry would be logged: a transaction with a write needs the write gate, a read-only
//! one the read gate (or READONLY, or a leader that may not write: then its reads are
//! answered from the local copy under one lock, and nothing is logged). Refused there,
//! the whole transaction is discarded with the redirect, nothing logged. WATCH is a
//! read (the read gate).

use crate::cluster::Redirect;
use crate::commands::{self, CommandSpec, Context, Dispatched, Reply, Session};
use crate::db::{ERR_NOT_INTEGER, Op, OpResult, parse_i64};
use crate::protocol::{write_array_len, write_error, write_null_array, write_simple};
use crate::store::StoreError;

const ERR_EXECABORT: &str = "EXECABORT Transaction discarded because of previous errors.";

/// Most bytes one transaction may queue, as counted by `queued_cost`. A queued command
/// has left the input buffer, so the input cap no longer bounds it: without this, MULTI
/// followed by an endless stream of SETs would grow without limit. It also keeps the
/// transaction's log entry within the frame size the log reader accepts (what the log
/// accepts it must read back): the cost counts 16 bytes per argument, more than an op's
/// encoding adds, and the margin covers the entry's header. A command past it is refused
/// (and EXEC answers EXECABORT).
pub const MAX_QUEUED_BYTES: usize = crate::wal::MAX_ENTRY - 4096;

/// Bytes a queued command is counted for: its arguments and 16 bytes each (at least what
/// encoding its op adds per argument: lengths, op code, flags, a deadline).
fn queued_cost(args: &[Vec<u8>]) -> usize {
    args.iter().map(|a| a.len() + 16).sum()
}

/// One queued command.
#[derive(Debug, Clone)]
enum Queued {
    /// Part of the logged entry, in the database given: replied as `Reply` says.
    Logged(u32, Op, Reply),
    /// Run at EXEC time, after the entry is applied.
    Local(Vec<Vec<u8>>),
    /// Refused for its arguments when queued: this error reply is its place in EXEC's
    /// array (Redis finds such errors only when it executes the command).
    Refused(Vec<u8>),
}

/// An open transaction (between MULTI and EXEC or DISCARD).
#[derive(Debug, Clone, Default)]
pub struct Transaction {
    queued: Vec<Queued>,
    /// The database the next queued command runs in: the connection's at MULTI, then as
    /// each queued SELECT leaves it (SELECT itself runs at EXEC, in its place).
    db: u32,
    /// [`queued_cost`] of everything queued.
    bytes: usize,
    /// A command was refused while queueing: EXEC will answer EXECABORT.
    failed: bool,
    /// A write was queued: on a cluster member, EXEC needs the write gate.
    writes: bool,
    /// A read of the key space was queued: without writes, EXEC needs the read gate.
    reads: bool,
}

/// Whether [`handle`] takes this request rather than the normal dispatch.
pub fn intercepts(s: &Session, spec: Option<&CommandSpec>) -> bool {
    s.multi.is_some()
        || spec
            .is_some_and(|c| matches!(c.name, "multi" | "exec" | "discard" | "watch" | "unwatch"))
}

/// Executes or queues one request for a connection in (or entering) a transaction. May
/// block: EXEC waits for its entry to be committed, WATCH for earlier writes to apply. The
/// caller must have submitted (and had answered) the connection's earlier writes, so that
/// they come before this in the log.
pub fn handle(
    ctx: &Context,
    s: &mut Session,
    spec: Option<&'static CommandSpec>,
    args: Vec<Vec<u8>>,
    out: &mut Vec<u8>,
) {
    let name = spec.map_or("", |c| c.name);
    let checked = spec.is_some_and(|c| {
        commands::arity_ok(c, args.len())
            && (s.authenticated || matches!(c.name, "auth" | "hello" | "quit"))
    });
    if !checked {
        // Unknown command, wrong arity or not authenticated: the dispatcher words the
        // error (and executes nothing for these).
        let _ = commands::dispatch_spec(ctx, s, spec, args, out);
        refused(s);
        return;
    }
    match (name, s.multi.is_some()) {
        ("multi", true) => write_error(out, "ERR MULTI calls can not be nested"),
        ("watch", true) => write_error(out, "ERR WATCH inside MULTI is not allowed"),
        ("multi", false) => {
            s.multi = Some(Transaction {
                db: s.db,
                ..Transaction::default()
            });
            write_simple(out, "OK");
        }
        ("exec", false) => write_error(out, "ERR EXEC without MULTI"),
        ("discard", false) => write_error(out, "ERR DISCARD without MULTI"),
        ("discard", true) => {
            s.multi = None;
            ctx.store.unwatch(s.id);
            write_simple(out, "OK");
        }
        // WATCH reads the keys' state (the read gate on a cluster member).
        ("watch", false) => match spec.map(|c| ctx.gate(s, c)) {
            Some(Err(r)) => write_error(out, &r.reply()),
            _ => match ctx.store.watch(s.id, s.db, &args[1..]) {
                Ok(()) => write_simple(out, "OK"),
                Err(StoreError::Redirect(reply)) => write_error(out, &reply),
                Err(e) => write_error(out, &format!("IOERR {e}")),
            },
        },
        ("unwatch", _) => {
            // Inside MULTI too, as Redis: it is queued there, and then clears at EXEC,
            // which clears anyway; answering it at once is indistinguishable.
            if s.multi.is_some() {
                queue(ctx, s, spec, args, out);
            } else {
                ctx.store.unwatch(s.id);
                write_simple(out, "OK");
            }
        }
        ("exec", true) => {
            let tx = s.multi.take().unwrap_or_default();
            exec(ctx, s, tx, out);
        }
        // QUIT is never queued (Redis runs it at once).
        ("quit", true) => {
            let _ = commands::dispatch_spec(ctx, s, spec, args, out);
        }
        _ => queue(ctx, s, spec, args, out),
    }
}

/// Marks the open transaction (if any) to fail at EXEC.
fn refused(s: &mut Session) {
    if let Some(tx) = &mut s.multi {
        tx.failed = true;
    }
}

/// Checks and queues a command inside MULTI.
fn queue(
    ctx: &Context,
    s: &mut Session,
    spec: Option<&'static CommandSpec>,
    args: Vec<Vec<u8>>,
    out: &mut Vec<u8>,
) {
    let Some(c) = spec else { return };
    let cost = queued_cost(&args);
    if s.multi
        .as_ref()
        .is_some_and(|tx| tx.bytes.saturating_add(cost) > MAX_QUEUED_BYTES)
    {
        refused(s);
        write_error(
            out,
            &format!("ERR transaction too large: more than {MAX_QUEUED_BYTES} bytes queued"),
        );
        return;
    }
    // A cluster member refuses, at once, a command it would not serve outside the
    // transaction, and the transaction fails (as Redis Cluster: the redirect now,
    // EXECABORT at EXEC). EXEC checks again: the role may change in between.
    if let Err(r) = ctx.gate(s, c) {
        refused(s);
        write_error(out, &r.reply());
        return;
    }
    if let Some(tx) = &mut s.multi {
        match commands::Gate::of(c) {
            commands::Gate::Write => tx.writes = true,
            commands::Gate::Read => tx.reads = true,
            commands::Gate::Any => {}
        }
    }
    let db = s.multi.as_ref().map_or(s.db, |tx| tx.db);
    if c.name == "select"
        && let Ok(new) = crate::keyspace::parse_db(&args[1], ctx.store.databases())
        && let Some(tx) = &mut s.multi
    {
        // Queued like any command that reads no key (it answers at EXEC), but the commands
        // queued after it run in the database it selects.
        tx.db = new;
    }
    let item = if c.write {
        let mut early = Vec::new();
        // Dispatched as if the transaction's SELECTs had run (MOVE and COPY compare
        // databases).
        let own = std::mem::replace(&mut s.db, db);
        let dispatched = commands::dispatch_spec(ctx, s, spec, args, &mut early);
        s.db = own;
        match dispatched {
            Dispatched::Write(op, how) => Ok(Queued::Logged(db, op, how)),
            Dispatched::Done => Err(early),
        }
    } else {
        match read_record(c.name, args) {
            ReadRecord::Log(op) => Ok(Queued::Logged(db, op, Reply::Standard)),
            ReadRecord::Local(args) => Ok(Queued::Local(args)),
            ReadRecord::Refused(msg) => {
                let mut early = Vec::new();
                write_error(&mut early, msg);
                Err(early)
            }
        }
    };
    let Some(tx) = &mut s.multi else { return };
    match item {
        Ok(q) => {
            tx.queued.push(q);
            tx.bytes += cost;
            write_simple(out, "QUEUED");
        }
        Err(early) => {
            tx.queued.push(Queued::Refused(early));
            tx.bytes += cost;
            write_simple(out, "QUEUED");
        }
    }
}

/// How EXEC runs a transaction on this node.
enum ExecMode {
    /// Logged as one entry (the normal path; a cluster of one always).
    Log,
    /// Read-only, answered from the local copy without logging: a node that may not
    /// write (a follower on a READONLY connection, a leader handing over) logs nothing.
    Local,
}

/// The serving rule for EXEC on a cluster member: a transaction with a write needs the
/// write gate; a read-only one the read gate, or READONLY on the connection; one that
/// touches no key runs anywhere. (Checked here, when the entry would be logged, and not
/// only while queueing: the role may have changed since.)
fn exec_mode(ctx: &Context, s: &Session, tx: &Transaction) -> Result<ExecMode, Redirect> {
    let Some(c) = ctx.cluster() else {
        return Ok(ExecMode::Log);
    };
    if tx.writes {
        return c.write_gate().map(|()| ExecMode::Log);
    }
    if !tx.reads {
        // Nothing is logged for it anyway (no read record, no write).
        return Ok(ExecMode::Log);
    }
    if c.write_gate().is_ok() {
        return Ok(ExecMode::Log);
    }
    match c.read_gate() {
        Ok(()) => Ok(ExecMode::Local),
        Err(_) if s.readonly => Ok(ExecMode::Local),
        Err(r) => Err(r),
    }
}

/// A read-only transaction's read records answered from the local copy, all under one
/// lock (so no apply lands in the middle), at one clock reading. Its WATCHes are not
/// checked: it changes nothing, and the answers are one consistent state anyway.
fn exec_locally(ctx: &Context, s: &Session, ops: Vec<(u32, Op)>) -> Vec<OpResult> {
    ctx.store.unwatch(s.id);
    let now = ctx.store.now_ms();
    ctx.store.read_all(|db| {
        ops.iter()
            .map(|(d, op)| match op {
                Op::Cmd { args } => db.keyspace(*d).exec_read(args, now),
                _ => OpResult::Error("ERR internal error: a write in a read-only transaction"),
            })
            .collect()
    })
}

/// EXEC of `tx`: logs its entry (unless aborted) and renders the array of its replies.
fn exec(ctx: &Context, s: &mut Session, tx: Transaction, out: &mut Vec<u8>) {
    let mode = match exec_mode(ctx, s, &tx) {
        Ok(m) => m,
        Err(r) => {
            // Refused as a whole, nothing logged (as Redis Cluster discards it).
            ctx.store.unwatch(s.id);
            write_error(out, &r.reply());
            return;
        }
    };
    if tx.failed {
        ctx.store.unwatch(s.id);
        write_error(out, ERR_EXECABORT);
        return;
    }
    let ops: Vec<(u32, Op)> = tx
        .queued
        .iter()
        .filter_map(|q| match q {
            Queued::Logged(db, op, _) => Some((*db, op.clone())),
            Queued::Local(_) | Queued::Refused(_) => None,
        })
        .collect();
    let logged = match mode {
        ExecMode::Local => Ok(Some(OpResult::Multi(exec_locally(ctx, s, ops)))),
        ExecMode::Log => ctx.store.exec(s.id, Op::Multi { ops }),
    };
    if tx.writes && ctx.cluster().is_some() {
        // What WAIT waits for (an upper bound of the entry's index once it is applied).
        s.last_write_index = s
            .last_write_index
            .max(ctx.store.read_all(|db| db.applied_index()));
    }
    let results = match logged {
        Ok(Some(OpResult::Multi(r))) => r,
        Ok(Some(other)) => vec![other],
        Ok(None) => {
            write_null_array(out, s.proto);
            return;
        }
        Err(e @ (StoreError::WriteFailed(_) | StoreError::Unknown(_))) => {
            // The entry may be on disk, or committed by a later leader: not an EXECABORT,
            // whose promise is "not applied" (`-IOERR`, `-TIMEOUT … outcome unknown`).
            write_error(out, &commands::store_error_reply(&e));
            return;
        }
        Err(e) => {
            write_error(
                out,
                &format!("EXECABORT Transaction discarded because of: {e}"),
            );
            return;
        }
    };
    let mut results = results.into_iter();
    write_array_len(out, tx.queued.len());
    for q in tx.queued {
        match q {
            Queued::Logged(_, _, how) => match results.next() {
                Some(r) => commands::render_result(&r, how, s.proto, out),
                None => write_error(out, "ERR internal error: missing transaction result"),
            },
            Queued::Refused(reply) => out.extend_from_slice(&reply),
            Queued::Local(args) => {
                let spec = commands::lookup(&args[0]);
                if spec.is_some_and(|c| c.name == "unwatch") {
                    // EXEC has cleared the watches already.
                    write_simple(out, "OK");
                } else if spec.is_some_and(|c| c.name == "wait") {
                    // As Redis 7: inside a transaction WAIT does not block, it answers
                    // how many replicas have the writes so far.
                    commands::wait(ctx, s, &args, false, out);
                } else if let Dispatched::Write(..) =
                    commands::dispatch_spec(ctx, s, spec, args, out)
                {
                    write_error(out, "ERR internal error: write run outside its transaction");
                }
            }
        }
    }
}

/// What a read-only command becomes inside MULTI.
enum ReadRecord {
    /// A read record, logged with the transaction.
    Log(Op),
    /// A command that does not read the key space: run at EXEC time.
    Local(Vec<Vec<u8>>),
    /// Arguments refused (GETRANGE offsets that are not integers).
    Refused(&'static str),
}

fn read_record(name: &str, mut args: Vec<Vec<u8>>) -> ReadRecord {
    let canonical: &str = match name {
        "get" | "mget" | "exists" | "strlen" | "type" | "ttl" | "pttl" | "expiretime"
        | "pexpiretime" | "dbsize" | "keys" => name,
        // TOUCH only counts keys here (no access times are kept).
        "touch" => "exists",
        "getrange" | "substr" => {
            if parse_i64(&args[2]).is_none() || parse_i64(&args[3]).is_none() {
                return ReadRecord::Refused(ERR_NOT_INTEGER);
            }
            "getrange"
        }
        _ => return ReadRecord::Local(args),
    };
    args[0] = canonical.to_ascii_uppercase().into_bytes();
    ReadRecord::Log(Op::Cmd { args })
}

#[cfg(test)]
mod tests {
    use crate::commands::{Context, Session, Settings};
    use crate::protocol::Value;
    use crate::repl::execute;
    use crate::store::{Clock, Options, Store};
    use crate::wal::FsyncPolicy;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    const T0: u64 = 1_700_000_000_000;

    /// A store on a fake clock, without the background expirer (tests call it).
    struct T {
        _dir: tempfile::TempDir,
        ctx: Context,
        clock: Arc<AtomicU64>,
    }

    fn open(fsync: FsyncPolicy) -> T {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(AtomicU64::new(T0));
        let c = clock.clone();
        let opts = Options {
            fsync,
            clock: Clock::new(move || c.load(Ordering::SeqCst)),
            active_expiry: false,
            ..Options::default()
        };
        let ctx = Context::new(Store::open(dir.path(), opts).unwrap(), Settings::default());
        T {
            _dir: dir,
            ctx,
            clock,
        }
    }

    /// Both commit paths: the caller's own (`no`) and the log writer's (`always`).
    fn each_store(f: impl Fn(T)) {
        for fsync in [FsyncPolicy::No, FsyncPolicy::Always] {
            f(open(fsync));
        }
    }

    fn run(ctx: &Context, s: &mut Session, line: &str) -> Value {
        execute(ctx, s, crate::client::split_args(line).unwrap())
    }

    fn ok() -> Value {
        Value::Simple("OK".into())
    }
    fn queued() -> Value {
        Value::Simple("QUEUED".into())
    }
    fn bulk(b: &str) -> Value {
        Value::Bulk(b.as_bytes().to_vec())
    }
    fn pong() -> Value {
        Value::Simple("PONG".into())
    }
    fn err(e: &str) -> Value {
        Value::Error(e.into())
    }
    fn arr(v: Vec<Value>) -> Value {
        Value::Array(v)
    }

    fn last_index(t: &T) -> u64 {
        t.ctx.store.read_all(|db| db.applied_index())
    }

    #[test]
    fn exec_applies_the_queue_as_one_entry_with_each_reply() {
        each_store(|t| {
            let mut s = t.ctx.register("t".into());
            let mut r = |line: &str| run(&t.ctx, &mut s, line);
            assert_eq!(r("set n 5"), ok());
            let before = last_index(&t);
            assert_eq!(r("multi"), ok());
            for line in [
                "set k 1",
                "get k",
                "incr k",
                "setnx k 9",
                "mget k nope",
                "type k",
                "exists k n nope",
                "ttl k",
                "getrange k 0 0",
                "strlen k",
                "ping",
                "echo hi",
                "del n",
                "get n",
                "unwatch",
            ] {
                assert_eq!(r(line), queued(), "{line}");
            }
            assert_eq!(
                r("exec"),
                arr(vec![
                    ok(),
                    bulk("1"),
                    Value::Integer(2),
                    Value::Integer(0),
                    arr(vec![bulk("2"), Value::Null]),
                    Value::Simple("string".into()),
                    Value::Integer(2),
                    Value::Integer(-1),
                    bulk("2"),
                    Value::Integer(1),
                    pong(),
                    bulk("hi"),
                    Value::Integer(1),
                    Value::Null,
                    ok(),
                ])
            );
            // One log entry for the whole transaction.
            assert_eq!(last_index(&t), before + 1);
            assert_eq!(r("get k"), bulk("2"));
        });
    }

    #[test]
    fn an_empty_transaction_answers_an_empty_array_and_logs_nothing() {
        each_store(|t| {
            let mut s = t.ctx.register("t".into());
            let before = last_index(&t);
            assert_eq!(run(&t.ctx, &mut s, "multi"), ok());
            assert_eq!(run(&t.ctx, &mut s, "exec"), arr(vec![]));
            assert_eq!(run(&t.ctx, &mut s, "multi"), ok());
            assert_eq!(run(&t.ctx, &mut s, "ping"), queued());
            assert_eq!(run(&t.ctx, &mut s, "exec"), arr(vec![pong()]));
            assert_eq!(last_index(&t), before);
        });
    }

    #[test]
    fn a_command_refused_while_queueing_aborts_exec() {
        let t = open(FsyncPolicy::No);
        let mut s = t.ctx.register("t".into());
        let mut r = |line: &str| run(&t.ctx, &mut s, line);
        let abort = err("EXECABORT Transaction discarded because of previous errors.");
        for bad in ["nosuchcommand x", "get"] {
            assert_eq!(r("multi"), ok());
            assert_eq!(r("set foo1 bar1"), queued());
            assert!(matches!(r(bad), Value::Error(_)), "{bad}");
            assert_eq!(r("set foo2 bar2"), queued());
            assert_eq!(r("exec"), abort, "{bad}");
            assert_eq!(r("exists foo1 foo2"), Value::Integer(0), "{bad}");
            // The transaction is over.
            assert_eq!(r("ping"), pong());
            assert_eq!(r("exec"), err("ERR EXEC without MULTI"));
        }
        // Arguments refused: queued, answered in their place, the rest applies (Redis).
        assert_eq!(r("multi"), ok());
        assert_eq!(r("set foo1 bar1"), queued());
        assert_eq!(r("set k v nx xx"), queued());
        assert_eq!(r("getrange k a b"), queued());
        assert_eq!(
            r("exec"),
            arr(vec![
                ok(),
                err("ERR syntax error"),
                err("ERR value is not an integer or out of range"),
            ])
        );
        assert_eq!(r("exists foo1 k"), Value::Integer(1));
        // Errors that are not the queued command's: the transaction goes on.
        assert_eq!(r("multi"), ok());
        assert_eq!(r("multi"), err("ERR MULTI calls can not be nested"));
        assert_eq!(r("watch x"), err("ERR WATCH inside MULTI is not allowed"));
        assert_eq!(r("set x 1"), queued());
        assert_eq!(r("exec"), arr(vec![ok()]));
    }

    #[test]
    fn runtime_errors_are_per_command_and_the_rest_applies() {
        each_store(|t| {
            let mut s = t.ctx.register("t".into());
            let mut r = |line: &str| run(&t.ctx, &mut s, line);
            assert_eq!(r("set a x"), ok());
            assert_eq!(r("multi"), ok());
            assert_eq!(r("incr a"), queued());
            assert_eq!(r("set b 1"), queued());
            assert_eq!(
                r("exec"),
                arr(vec![
                    err("ERR value is not an integer or out of range"),
                    ok()
                ])
            );
            assert_eq!(r("get b"), bulk("1"));
        });
    }

    #[test]
    fn discard_and_the_without_multi_errors() {
        let t = open(FsyncPolicy::No);
        let mut s = t.ctx.register("t".into());
        let mut r = |line: &str| run(&t.ctx, &mut s, line);
        assert_eq!(r("exec"), err("ERR EXEC without MULTI"));
        assert_eq!(r("discard"), err("ERR DISCARD without MULTI"));
        assert_eq!(r("set l 1"), ok());
        assert_eq!(r("multi"), ok());
        assert_eq!(r("del l"), queued());
        assert_eq!(r("discard"), ok());
        assert_eq!(r("get l"), bulk("1"));
        assert_eq!(r("unwatch"), ok());
        assert_eq!(
            r("watch"),
            err("ERR wrong number of arguments for 'watch' command")
        );
    }

    #[test]
    fn exec_is_nil_when_a_watched_key_was_written() {
        each_store(|t| {
            let mut s = t.ctx.register("t".into());
            let mut o = t.ctx.register("other".into());
            let ctx = &t.ctx;
            assert_eq!(run(ctx, &mut s, "set x 30"), ok());
            assert_eq!(run(ctx, &mut s, "watch a b x k z"), ok());
            assert_eq!(run(ctx, &mut o, "set x 40"), ok());
            assert_eq!(run(ctx, &mut s, "multi"), ok());
            assert_eq!(run(ctx, &mut s, "set y 1"), queued());
            assert_eq!(run(ctx, &mut s, "exec"), Value::Null);
            assert_eq!(run(ctx, &mut s, "exists y"), Value::Integer(0));
            // EXEC cleared the watch: the next one applies.
            assert_eq!(run(ctx, &mut o, "set x 50"), ok());
            assert_eq!(run(ctx, &mut s, "multi"), ok());
            assert_eq!(run(ctx, &mut s, "ping"), queued());
            assert_eq!(run(ctx, &mut s, "exec"), arr(vec![pong()]));
            // Unmodified keys: applies.
            assert_eq!(run(ctx, &mut s, "watch x"), ok());
            assert_eq!(run(ctx, &mut o, "set other 1"), ok());
            assert_eq!(run(ctx, &mut s, "multi"), ok());
            assert_eq!(run(ctx, &mut s, "incr x"), queued());
            assert_eq!(run(ctx, &mut s, "exec"), arr(vec![Value::Integer(51)]));
            // UNWATCH and DISCARD forget the key and the dirt.
            for clear in ["unwatch", "multi|discard"] {
                assert_eq!(run(ctx, &mut s, "watch x"), ok());
                assert_eq!(run(ctx, &mut o, "set x 10"), ok());
                for line in clear.split('|') {
                    assert_eq!(run(ctx, &mut s, line), ok());
                }
                assert_eq!(run(ctx, &mut s, "multi"), ok());
                assert_eq!(run(ctx, &mut s, "incr x"), queued());
                assert_eq!(run(ctx, &mut s, "exec"), arr(vec![Value::Integer(11)]));
            }
            assert_eq!(ctx.store.watched_keys(), 0);
        });
    }

    /// Runs WATCH x, then `between` (on another connection), then MULTI PING EXEC;
    /// returns EXEC's reply.
    fn watch_then(t: &T, setup: &[&str], between: &[&str]) -> Value {
        let mut s = t.ctx.register("t".into());
        let mut o = t.ctx.register("other".into());
        for line in setup {
            run(&t.ctx, &mut o, line);
        }
        assert_eq!(run(&t.ctx, &mut s, "watch x"), ok());
        for line in between {
            run(&t.ctx, &mut o, line);
        }
        assert_eq!(run(&t.ctx, &mut s, "multi"), ok());
        assert_eq!(run(&t.ctx, &mut s, "ping"), queued());
        let r = run(&t.ctx, &mut s, "exec");
        t.ctx.unregister(s.id);
        t.ctx.unregister(o.id);
        run(&t.ctx, &mut t.ctx.register("c".into()), "flushall");
        r
    }

    #[test]
    fn watch_follows_redis_rules_for_flush_expire_and_stale_keys() {
        each_store(|t| {
            let done = arr(vec![pong()]);
            let nil = Value::Null;
            // FLUSHALL/FLUSHDB touch a watched key only if it existed.
            assert_eq!(watch_then(&t, &["set x 30"], &["flushall"]), nil);
            assert_eq!(watch_then(&t, &["set x 30"], &["flushdb"]), nil);
            assert_eq!(watch_then(&t, &["del x"], &["flushall"]), done);
            // EXPIRE on the key touches it; DEL of a missing key does not.
            assert_eq!(watch_then(&t, &["set x foo"], &["expire x 10"]), nil);
            assert_eq!(watch_then(&t, &[], &["del x"]), done);
            assert_eq!(watch_then(&t, &["set x 1"], &["del x"]), nil);
            // A stale (expired, not yet deleted) key: WATCH, then deleting or flushing
            // it changes nothing.
            for between in [&[][..], &["del x"], &["exists x"], &["flushdb"]] {
                let stale = ["set x foo px 1"];
                t.clock.fetch_add(2, Ordering::SeqCst);
                let mut s = t.ctx.register("t".into());
                run(&t.ctx, &mut s, stale[0]);
                t.clock.fetch_add(2, Ordering::SeqCst);
                assert_eq!(watch_then(&t, &[], between), done, "{between:?}");
                t.ctx.store.expire_due(&[]).unwrap();
            }
        });
    }

    #[test]
    fn a_watched_key_expiring_before_exec_aborts_it() {
        each_store(|t| {
            let ctx = &t.ctx;
            let mut s = ctx.register("t".into());
            assert_eq!(run(ctx, &mut s, "set key 1 px 100"), ok());
            assert_eq!(run(ctx, &mut s, "watch key"), ok());
            t.clock.fetch_add(101, Ordering::SeqCst);
            assert_eq!(run(ctx, &mut s, "multi"), ok());
            assert_eq!(run(ctx, &mut s, "incr key"), queued());
            assert_eq!(run(ctx, &mut s, "exec"), Value::Null);
            // Also once the expirer has deleted it.
            assert_eq!(run(ctx, &mut s, "set key 1 px 100"), ok());
            assert_eq!(run(ctx, &mut s, "watch key"), ok());
            t.clock.fetch_add(101, Ordering::SeqCst);
            assert_eq!(ctx.store.expire_due(&[]).unwrap(), 1);
            assert_eq!(run(ctx, &mut s, "multi"), ok());
            assert_eq!(run(ctx, &mut s, "exec"), Value::Null);
        });
    }

    #[test]
    fn a_transaction_past_the_queue_limit_is_refused() {
        let t = open(FsyncPolicy::No);
        let mut s = t.ctx.register("t".into());
        assert_eq!(run(&t.ctx, &mut s, "multi"), ok());
        assert_eq!(run(&t.ctx, &mut s, "set a 1"), queued());
        // As if nearly 1 GiB had been queued already.
        if let Some(tx) = &mut s.multi {
            tx.bytes = super::MAX_QUEUED_BYTES - 40;
        }
        assert_eq!(
            run(&t.ctx, &mut s, "set b 1"),
            err(&format!(
                "ERR transaction too large: more than {} bytes queued",
                super::MAX_QUEUED_BYTES
            ))
        );
        assert_eq!(
            run(&t.ctx, &mut s, "exec"),
            err("EXECABORT Transaction discarded because of previous errors.")
        );
        assert_eq!(run(&t.ctx, &mut s, "exists a"), Value::Integer(0));
    }

    /// The queue cap keeps the log entry readable: an entry never encodes larger than
    /// the cost counted for its commands plus the margin.
    #[test]
    fn the_counted_cost_bounds_the_encoded_entry() {
        let t = open(FsyncPolicy::No);
        let mut s = t.ctx.register("t".into());
        assert_eq!(run(&t.ctx, &mut s, "multi"), ok());
        for line in [
            "set k v ex 1",
            "set k v pxat 1 get nx",
            "incr k",
            "decrby k 1",
            "expire k 1",
            "pexpireat k 1 gt",
            "getex k ex 1",
            "mset a 1 b 2",
            "del a b c",
            "get k",
            "mget a b",
            "ttl k",
            "getrange k 0 -1",
            "setnx k v",
            "copy a b replace",
            "flushall",
            "ping",
        ] {
            assert_eq!(run(&t.ctx, &mut s, line), queued(), "{line}");
        }
        let tx = s.multi.clone().unwrap();
        let ops: Vec<(u32, crate::db::Op)> = tx
            .queued
            .iter()
            .filter_map(|q| match q {
                super::Queued::Logged(_, op, _) => Some((u32::MAX, op.clone())),
                super::Queued::Local(_) | super::Queued::Refused(_) => None,
            })
            .collect();
        let command = crate::db::Command {
            ts_ms: u64::MAX,
            db: u32::MAX,
            op: crate::db::Op::Multi { ops },
        };
        // The record as the log holds it: its length and header, then the payload.
        let mut buf = vec![0; crate::wal::RECORD_HEADER];
        command.encode(&mut buf);
        assert!(
            buf.len() <= tx.bytes + 64,
            "{} > {} + 64",
            buf.len(),
            tx.bytes
        );
    }

    #[test]
    fn select_inside_multi_moves_the_commands_after_it() {
        each_store(|t| {
            let mut s = t.ctx.register("t".into());
            let mut r = |line: &str| run(&t.ctx, &mut s, line);
            assert_eq!(r("multi"), ok());
            assert_eq!(r("set a zero"), queued());
            assert_eq!(r("select 2"), queued());
            assert_eq!(r("set a two"), queued());
            assert_eq!(r("get a"), queued());
            assert_eq!(r("exec"), arr(vec![ok(), ok(), ok(), bulk("two")]));
            // The connection is in database 2 now, as after a SELECT outside MULTI.
            assert_eq!(r("get a"), bulk("two"));
            assert_eq!(r("select 0"), ok());
            assert_eq!(r("get a"), bulk("zero"));
        });
    }

    /// Redis's multi.tcl: "WATCH is able to remember the DB a key belongs to".
    #[test]
    fn watch_remembers_the_database_of_a_key() {
        each_store(|t| {
            let mut s = t.ctx.register("t".into());
            let mut r = |line: &str| run(&t.ctx, &mut s, line);
            assert_eq!(r("select 5"), ok());
            assert_eq!(r("set x 30"), ok());
            assert_eq!(r("watch x"), ok());
            assert_eq!(r("select 1"), ok());
            assert_eq!(r("set x 10"), ok());
            assert_eq!(r("select 5"), ok());
            assert_eq!(r("multi"), ok());
            assert_eq!(r("ping"), queued());
            assert_eq!(r("exec"), arr(vec![pong()]));
            // And a write in the watched key's own database still aborts.
            assert_eq!(r("watch x"), ok());
            assert_eq!(r("set x 31"), ok());
            assert_eq!(r("multi"), ok());
            assert_eq!(r("ping"), queued());
            assert_eq!(r("exec"), Value::Null);
            // Redis's "FLUSHDB does not touch non affected keys": a FLUSHDB of another
            // database leaves the watch alone; one of the key's own aborts.
            assert_eq!(r("watch x"), ok());
            assert_eq!(r("select 1"), ok());
            assert_eq!(r("flushdb"), ok());
            assert_eq!(r("select 5"), ok());
            assert_eq!(r("multi"), ok());
            assert_eq!(r("ping"), queued());
            assert_eq!(r("exec"), arr(vec![pong()]));
            assert_eq!(r("watch x"), ok());
            assert_eq!(r("flushdb"), ok());
            assert_eq!(r("multi"), ok());
            assert_eq!(r("ping"), queued());
            assert_eq!(r("exec"), Value::Null);
        });
    }

    #[test]
    fn closing_a_connection_forgets_its_watches() {
        let t = open(FsyncPolicy::No);
        let mut s = t.ctx.register("t".into());
        assert_eq!(run(&t.ctx, &mut s, "watch a b c"), ok());
        assert_eq!(t.ctx.store.watched_keys(), 3);
        t.ctx.unregister(s.id);
        assert_eq!(t.ctx.store.watched_keys(), 0);
    }

    #[test]
    fn a_transaction_survives_a_restart_as_one_entry() {
        let dir = tempfile::tempdir().unwrap();
        let opts = Options {
            fsync: FsyncPolicy::Always,
            ..Options::default()
        };
        {
            let ctx = Context::new(
                Store::open(dir.path(), opts.clone()).unwrap(),
                Settings::default(),
            );
            let mut s = ctx.register("t".into());
            for line in ["multi", "set a 1", "incrby a 5", "get a", "set b x"] {
                run(&ctx, &mut s, line);
            }
            assert_eq!(
                run(&ctx, &mut s, "exec"),
                arr(vec![ok(), Value::Integer(6), bulk("6"), ok()])
            );
        }
        let store = Store::open(dir.path(), opts).unwrap();
        assert_eq!(store.recovery().entries_replayed, 1);
        assert_eq!(store.get(b"a").as_deref(), Some(&b"6"[..]));
        assert_eq!(store.get(b"b").as_deref(), Some(&b"x"[..]));
    }

    /// A cluster member's replication that appends what it is given and commits only
    /// when the test says (`MemberLog::commit_to`), or steps down (`fail_waiting`).
    struct HeldCommits;

    impl crate::store::Replicator for HeldCommits {
        fn propose(
            &self,
            log: &mut crate::store::MemberLog<'_>,
            payloads: Vec<Vec<u8>>,
        ) -> Result<u64, crate::store::StoreError> {
            let first = log.log().last().0 + 1;
            let entries: Vec<crate::log::LogEntry> = (first..)
                .zip(payloads)
                .map(|(index, payload)| crate::log::LogEntry {
                    index,
                    epoch: 1,
                    payload,
                })
                .collect();
            log.append(&entries)?;
            Ok(first)
        }
        fn persisted(&self, _: &mut crate::store::MemberLog<'_>) {}
    }

    fn member() -> T {
        let t = open(FsyncPolicy::Always);
        t.ctx.store.set_replicator(Arc::new(HeldCommits));
        t
    }

    /// Waits (yielding, no sleep) until the member's log holds `index`.
    fn logged(t: &T, index: u64) {
        while t.ctx.store.with_log(|l| l.log().last().0) < index {
            std::thread::yield_now();
        }
    }

    #[test]
    fn on_a_member_watch_reads_after_the_writes_queued_before_it_commit() {
        // Found by tests/nemesis.rs: WATCH returned once earlier writes were in the log,
        // not applied, so the GET after it missed a SET that then landed before the
        // EXEC without marking the watch: two CAS from the same value both applied.
        let t = member();
        std::thread::scope(|sc| {
            let writer = sc.spawn(|| {
                let mut s = t.ctx.register("w".into());
                run(&t.ctx, &mut s, "set x a")
            });
            logged(&t, 1);
            let mut s = t.ctx.register("c".into());
            // Not committed: WATCH cannot read a state that includes it, and says so.
            let r = run(&t.ctx, &mut s, "watch x");
            assert!(
                matches!(&r, Value::Error(e) if e.starts_with("CLUSTERDOWN")),
                "{r:?}"
            );
            // An EXEC after that failed WATCH aborts rather than trusting it.
            assert_eq!(run(&t.ctx, &mut s, "multi"), ok());
            assert_eq!(run(&t.ctx, &mut s, "set x c"), queued());
            assert_eq!(run(&t.ctx, &mut s, "exec"), Value::Null);
            t.ctx.store.with_log(|l| l.commit_to(1));
            assert_eq!(writer.join().unwrap(), ok());
            // Committed: WATCH succeeds and what it reads includes the write.
            assert_eq!(run(&t.ctx, &mut s, "watch x"), ok());
            assert_eq!(run(&t.ctx, &mut s, "get x"), bulk("a"));
        });
    }

    #[test]
    fn on_a_member_exec_whose_outcome_is_unknown_is_not_an_execabort() {
        // Found by tests/nemesis.rs: a transaction logged but not known committed when
        // its leader stepped down was answered EXECABORT ("discarded"), and then a later
        // leader committed it.
        let t = member();
        std::thread::scope(|sc| {
            let client = sc.spawn(|| {
                let mut s = t.ctx.register("c".into());
                assert_eq!(run(&t.ctx, &mut s, "multi"), ok());
                assert_eq!(run(&t.ctx, &mut s, "set x 1"), queued());
                run(&t.ctx, &mut s, "exec")
            });
            logged(&t, 1);
            t.ctx.store.with_log(|l| l.fail_waiting("stepped down"));
            let r = client.join().unwrap();
            assert!(
                matches!(&r, Value::Error(e) if e.starts_with("TIMEOUT") && e.contains("unknown")),
                "{r:?}"
            );
        });
    }
}
