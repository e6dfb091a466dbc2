//! Commands that act on the server rather than on keys: `SAVE`, `BGSAVE`,
//! `BGREWRITEAOF`, `LASTSAVE`, `SHUTDOWN` and `ROLE`.
//!
//! kvstore has one form of persistence, the log, and one way to shrink it, compaction (a
//! snapshot of the map, then the log segments it covers are deleted: see
//! [`Store::compact_now`](crate::store::Store::compact_now)). So Redis's RDB save and
//! AOF rewrite are both a compaction here, with Redis's replies: `SAVE` waits for it,
//! `BGSAVE` and `BGREWRITEAOF` start it and answer at once, and a compaction already
//! running is Redis's "already in progress" error. `LASTSAVE` is the Unix time of the
//! last successful compaction, or of startup before the first (as Redis's).
//!
//! `SHUTDOWN` does what SIGTERM does (stop accepting, answer what every client already
//! sent, fsync the log, exit 0) through the hook the server registers on the
//! [`Context`] ([`Context::request_shutdown`]); `SAVE` compacts first, and `NOSAVE`,
//! `NOW` and `FORCE` are accepted with Redis's meaning (there are no save points and no
//! replicas to wait for). The connection that asked is closed without a reply, which is
//! what redis-cli and client libraries expect.
//!
//! Requests enter through [`dispatch`] with their arguments already checked against
//! the table's arity; replies are appended to the connection's output buffer.

use crate::commands::{Context, Session};
use crate::protocol::{write_array_len, write_bulk, write_error, write_integer, write_simple};

const ERR_SYNTAX: &str = "ERR syntax error";

/// Executes one of this module's commands (`name` is the table's lower-case name).
pub fn dispatch(ctx: &Context, s: &mut Session, name: &str, args: &[Vec<u8>], out: &mut Vec<u8>) {
    match name {
        "save" => save(ctx, out),
        "bgsave" => bgsave(ctx, args, out),
        "bgrewriteaof" => bgrewriteaof(ctx, out),
        "lastsave" => write_integer(out, last_save(ctx) as i64),
        "role" => role(ctx, out),
        "shutdown" => shutdown(ctx, s, args, out),
        other => write_error(out, &format!("ERR unknown command '{other}'")),
    }
}

/// `LASTSAVE`: the last successful compaction, or the server's start before the first.
pub(crate) fn last_save(ctx: &Context) -> u64 {
    match ctx.store.log_info().last_save_unix {
        0 => ctx.started_unix,
        t => t,
    }
}

fn save(ctx: &Context, out: &mut Vec<u8>) {
    match ctx.store.compact_now(true) {
        Ok(true) => write_simple(out, "OK"),
        Ok(false) => write_error(out, "ERR Background save already in progress"),
        Err(e) => {
            log::error!("SAVE failed: {e}");
            write_error(out, &format!("ERR {e}"));
        }
    }
}

fn bgsave(ctx: &Context, args: &[Vec<u8>], out: &mut Vec<u8>) {
    // BGSAVE [SCHEDULE]: Redis schedules only behind an AOF rewrite; a save already
    // running is an error either way, and here every compaction is that save.
    if args.len() > 2 || (args.len() == 2 && !args[1].eq_ignore_ascii_case(b"schedule")) {
        write_error(out, ERR_SYNTAX);
        return;
    }
    match ctx.store.compact_now(false) {
        Ok(true) => write_simple(out, "Background saving started"),
        Ok(false) => write_error(out, "ERR Background save already in progress"),
        Err(e) => {
            log::error!("BGSAVE failed: {e}");
            write_error(out, &format!("ERR {e}"));
        }
    }
}

fn bgrewriteaof(ctx: &Context, out: &mut Vec<u8>) {
    match ctx.store.compact_now(false) {
        Ok(true) => write_simple(out, "Background append only file rewriting started"),
        Ok(false) => write_error(
            out,
            "ERR Background append only file rewriting already in progress",
        ),
        Err(e) => {
            log::error!("BGREWRITEAOF failed: {e}");
            write_error(
                out,
                "ERR Can't execute an AOF background rewriting. Please check the server logs \
                 for more information.",
            );
        }
    }
}

/// `ROLE`, shaped as Redis 7's (the same arrays in RESP2 and RESP3):
/// - a leader (and a cluster of one): `["master", offset, [[ip, port, offset], …]]`,
///   its offset the last log index (INFO's `master_repl_offset`), one entry per
///   follower whose link is up (the replicas one could read from), with its client
///   address and acknowledged index, as bulk strings like Redis's;
/// - any other cluster member: `["slave", host, port, state, offset]`: the leader's
///   client address (`""` and 0 while none is known), `connected` while the link from
///   the leader is up, else `connect` (looking for one), and the commit index.
fn role(ctx: &Context, out: &mut Vec<u8>) {
    let Some(cluster) = ctx.cluster() else {
        let offset = ctx.store.log_info().last_index;
        write_array_len(out, 3);
        write_bulk(out, b"master");
        write_integer(out, offset as i64);
        write_array_len(out, 0);
        return;
    };
    let info = cluster.info();
    if info.role == crate::cluster::Role::Leader {
        let replicas: Vec<_> = info.followers.iter().filter(|f| f.connected).collect();
        write_array_len(out, 3);
        write_bulk(out, b"master");
        write_integer(out, info.last_index as i64);
        write_array_len(out, replicas.len());
        for f in replicas {
            let (ip, port) = crate::info::split_addr(&f.addr);
            write_array_len(out, 3);
            write_bulk(out, ip.as_bytes());
            write_bulk(out, port.to_string().as_bytes());
            write_bulk(out, f.acked.to_string().as_bytes());
        }
    } else {
        let (host, port) = info
            .leader_addr
            .as_deref()
            .map_or((String::new(), 0), crate::info::split_addr);
        let up = info.leader.is_some() && info.leader_link_up;
        write_array_len(out, 5);
        write_bulk(out, b"slave");
        write_bulk(out, host.as_bytes());
        write_integer(out, i64::from(port));
        write_bulk(out, if up { b"connected" } else { b"connect" });
        write_integer(out, info.commit as i64);
    }
}

/// `SHUTDOWN [NOSAVE|SAVE] [NOW] [FORCE] [ABORT]`, parsed and refused as Redis does.
fn shutdown(ctx: &Context, s: &mut Session, args: &[Vec<u8>], out: &mut Vec<u8>) {
    let (mut nosave, mut save, mut force, mut abort, mut any) = (false, false, false, false, false);
    for a in &args[1..] {
        match &a.to_ascii_lowercase()[..] {
            b"nosave" => nosave = true,
            b"save" => save = true,
            // No replicas to wait for: NOW changes nothing.
            b"now" => {}
            b"force" => force = true,
            b"abort" => {
                abort = true;
                continue;
            }
            _ => {
                write_error(out, ERR_SYNTAX);
                return;
            }
        }
        any = true;
    }
    if (abort && any) || (nosave && save) {
        write_error(out, ERR_SYNTAX);
        return;
    }
    if abort {
        // A shutdown here never waits (no replicas), so none is ever in progress.
        write_error(out, "ERR No shutdown in progress.");
        return;
    }
    if save && let Err(e) = compact_for_shutdown(ctx) {
        if force {
            log::warn!("error trying to save before shutting down ({e}); exiting anyway");
        } else {
            log::error!("error trying to save before shutting down ({e}); not shutting down");
            write_error(out, "ERR Errors trying to SHUTDOWN. Check logs.");
            return;
        }
    }
    log::info!("user requested shutdown (client {})", s.id);
    if !ctx.request_shutdown() {
        write_error(
            out,
            "ERR SHUTDOWN needs a server: this is the embedded store (type quit to leave)",
        );
        return;
    }
    // No reply: the connection closes once the replies owed before this one are sent.
    s.close = true;
}

/// A compaction that covers every write so far: one already running started earlier, so
/// wait for it and start another.
fn compact_for_shutdown(ctx: &Context) -> Result<(), crate::store::StoreError> {
    loop {
        if ctx.store.compact_now(true)? {
            return Ok(());
        }
        ctx.store.wait_for_compaction();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::Settings;
    use crate::protocol::{Value, parse_value};
    use crate::store::{Options, Store};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn run(ctx: &Context, s: &mut Session, words: &[&str]) -> Value {
        let args: Vec<Vec<u8>> = words.iter().map(|w| w.as_bytes().to_vec()).collect();
        let mut out = Vec::new();
        dispatch(ctx, s, &words[0].to_ascii_lowercase(), &args, &mut out);
        if out.is_empty() {
            return Value::Null; // no reply at all
        }
        parse_value(&out).unwrap().unwrap().0
    }

    fn err(text: &str) -> Value {
        Value::Error(text.into())
    }

    #[test]
    fn shutdown_parses_like_redis_and_calls_the_hook_once_asked() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = Context::new(
            Store::open(dir.path(), Options::default()).unwrap(),
            Settings::default(),
        );
        let mut s = ctx.register("test".into());
        // No server: refused, the session stays open.
        assert!(
            matches!(run(&ctx, &mut s, &["SHUTDOWN"]), Value::Error(e) if e.contains("embedded"))
        );
        assert!(!s.close);
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        ctx.set_shutdown_hook(move || {
            c.fetch_add(1, Ordering::SeqCst);
        });
        for bad in [
            &["SHUTDOWN", "NOSAVE", "SAVE"][..],
            &["SHUTDOWN", "ABORT", "NOW"],
            &["SHUTDOWN", "LATER"],
        ] {
            assert_eq!(run(&ctx, &mut s, bad), err("ERR syntax error"), "{bad:?}");
        }
        assert_eq!(
            run(&ctx, &mut s, &["shutdown", "abort"]),
            err("ERR No shutdown in progress.")
        );
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        assert_eq!(
            run(&ctx, &mut s, &["SHUTDOWN", "NOW", "NOSAVE", "FORCE"]),
            Value::Null
        );
        assert!(s.close);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn save_bgsave_lastsave_and_role() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = Context::new(
            Store::open(dir.path(), Options::default()).unwrap(),
            Settings::default(),
        );
        let mut s = ctx.register("test".into());
        // Before any compaction, LASTSAVE is the start.
        assert_eq!(
            run(&ctx, &mut s, &["LASTSAVE"]),
            Value::Integer(ctx.started_unix as i64)
        );
        ctx.store.set(b"k", b"v").unwrap();
        assert_eq!(
            run(&ctx, &mut s, &["ROLE"]),
            Value::Array(vec![
                Value::Bulk(b"master".to_vec()),
                Value::Integer(1),
                Value::Array(vec![])
            ])
        );
        assert_eq!(run(&ctx, &mut s, &["SAVE"]), Value::Simple("OK".into()));
        let after = ctx.store.log_info();
        assert_eq!(after.compactions, 1);
        assert!(after.last_save_unix >= ctx.started_unix);
        assert_eq!(
            run(&ctx, &mut s, &["LASTSAVE"]),
            Value::Integer(after.last_save_unix as i64)
        );
        // Twice in a row, with nothing new to cover, still works.
        assert_eq!(run(&ctx, &mut s, &["SAVE"]), Value::Simple("OK".into()));
        assert_eq!(
            run(&ctx, &mut s, &["BGSAVE", "FOO"]),
            err("ERR syntax error")
        );
        let started = run(&ctx, &mut s, &["BGSAVE", "SCHEDULE"]);
        assert!(
            started == Value::Simple("Background saving started".into())
                || started == err("ERR Background save already in progress"),
            "{started:?}"
        );
        ctx.store.wait_for_compaction();
        assert_eq!(
            run(&ctx, &mut s, &["BGREWRITEAOF"]),
            Value::Simple("Background append only file rewriting started".into())
        );
        ctx.store.wait_for_compaction();
        drop(ctx);
        // What the compactions kept is what a restart finds.
        let store = Store::open(dir.path(), Options::default()).unwrap();
        assert_eq!(store.get(b"k").as_deref(), Some(&b"v"[..]));
    }
}
