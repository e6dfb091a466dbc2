//! `kvstore repl --data-dir DIR`: the embedded store with a prompt and no network.
//!
//! Lines are split like the client's ([`client::split_args`]), executed by the same
//! [`commands::dispatch`] the server uses, committed through the same log, and the reply
//! bytes are decoded and printed exactly as `kvstore client` prints a server's reply. So
//! the repl is the server's command set minus the socket, and a directory written here
//! can later be served by `kvstore server --data-dir DIR`, and the other way round.

use crate::client;
use crate::commands::{self, Context, Dispatched, Session, Settings};
use crate::protocol::{self, Value, write_error};
use crate::store::{Options, Store};
use std::io::{self, BufRead, IsTerminal, Write};
use std::path::Path;

/// Executes one command line against `ctx` and returns the decoded reply.
pub fn execute(ctx: &Context, session: &mut Session, args: Vec<Vec<u8>>) -> Value {
    let mut out = Vec::new();
    let spec = args.first().and_then(|n| commands::lookup(n));
    if crate::multi::intercepts(session, spec) {
        crate::multi::handle(ctx, session, spec, args, &mut out);
        return decode(&out);
    }
    match commands::dispatch_spec(ctx, session, spec, args, &mut out) {
        Dispatched::Done => {}
        Dispatched::Write(op, how) => match ctx.store.write(session.db, vec![op]) {
            Ok(results) => {
                for r in &results {
                    commands::render_result(r, how, session.proto, &mut out);
                }
            }
            Err(e) => write_error(&mut out, &commands::store_error_reply(&e)),
        },
    }
    decode(&out)
}

fn decode(out: &[u8]) -> Value {
    match protocol::parse_value(out) {
        Ok(Some((v, _))) => v,
        _ => Value::Error("ERR internal error: unreadable reply".into()),
    }
}

/// Runs the prompt until EOF or `quit`; returns the exit code.
pub fn run(dir: &Path, opts: Options) -> i32 {
    let store = match Store::open(dir, opts) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kvstore: {e}");
            return 1;
        }
    };
    let ctx = Context::new(store, Settings::default());
    let mut session = ctx.register("repl".into());
    let interactive = io::stdin().is_terminal();
    let mut editor = if interactive {
        rustyline::DefaultEditor::new().ok()
    } else {
        None
    };
    let stdin = io::stdin();
    let mut lines = stdin.lock().lines();
    let prompt = format!("{}> ", dir.display());
    loop {
        let line = match &mut editor {
            Some(ed) => match ed.readline(&prompt) {
                Ok(l) => {
                    let _ = ed.add_history_entry(l.as_str());
                    l
                }
                Err(rustyline::error::ReadlineError::Interrupted) => continue,
                Err(_) => break,
            },
            None => match lines.next() {
                Some(Ok(l)) => l,
                _ => break,
            },
        };
        let args = match client::split_args(&line) {
            Ok(a) if a.is_empty() => continue,
            Ok(a) => a,
            Err(e) => {
                eprintln!("{e}");
                continue;
            }
        };
        let first = String::from_utf8_lossy(&args[0]).to_ascii_lowercase();
        if first == "exit" || first == "quit" {
            break;
        }
        let reply = execute(&ctx, &mut session, args);
        let text = client::format_reply(&reply);
        let mut stdout = io::stdout().lock();
        let _ = writeln!(stdout, "{text}");
    }
    if let Err(e) = ctx.store.sync() {
        eprintln!("kvstore: {e}");
        return 1;
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::FsyncPolicy;

    #[test]
    fn repl_executes_like_the_server_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        let opts = Options {
            fsync: FsyncPolicy::No,
            ..Options::default()
        };
        let args = |s: &str| client::split_args(s).unwrap();
        {
            let ctx = Context::new(
                Store::open(dir.path(), opts.clone()).unwrap(),
                Settings::default(),
            );
            let mut s = ctx.register("t".into());
            assert_eq!(
                execute(&ctx, &mut s, args("SET k \"a b\"")),
                Value::Simple("OK".into())
            );
            assert_eq!(execute(&ctx, &mut s, args("INCR n")), Value::Integer(1));
            assert_eq!(
                execute(&ctx, &mut s, args("GET k")),
                Value::Bulk(b"a b".to_vec())
            );
            assert!(
                matches!(execute(&ctx, &mut s, args("NOPE")), Value::Error(e) if e.starts_with("ERR unknown command 'NOPE'"))
            );
        }
        let ctx = Context::new(Store::open(dir.path(), opts).unwrap(), Settings::default());
        let mut s = ctx.register("t".into());
        assert_eq!(
            execute(&ctx, &mut s, args("GET n")),
            Value::Bulk(b"1".to_vec())
        );
    }
}
