//! Transactions against a real `kvstore server`: MULTI/EXEC/DISCARD/WATCH/UNWATCH with
//! the `redis` crate (`redis::pipe().atomic()` and plain commands), raw RESP2/RESP3
//! bytes, the cases of Redis's own tests/unit/multi.tcl that use only our commands,
//! atomicity under concurrent clients, durability across kill -9, and redis-cli.
//!
//! Every test starts its own server on a free port with its own temp dir (tests/common);
//! nothing sleeps and hopes, every socket has timeouts.

mod common;

use common::{DataDir, Server};
use redis::{RedisResult, Value};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::thread;

/// Runs one command line (words split on spaces) and returns the raw reply.
#[track_caller]
fn r(con: &mut redis::Connection, line: &str) -> RedisResult<Value> {
    let mut c = redis::cmd(line.split(' ').next().unwrap_or_default());
    for a in line.split(' ').skip(1) {
        c.arg(a);
    }
    c.query(con)
}

/// Runs one command line that must succeed.
#[track_caller]
fn ok(con: &mut redis::Connection, line: &str) -> Value {
    match r(con, line) {
        Ok(v) => v,
        Err(e) => panic!("{line}: {e}"),
    }
}

/// Runs one command line that must fail; returns the error as the server sent it
/// (`CODE detail`).
#[track_caller]
fn err(con: &mut redis::Connection, line: &str) -> String {
    match r(con, line) {
        Ok(v) => panic!("{line}: expected an error, got {v:?}"),
        Err(e) => match (e.code(), e.detail()) {
            (Some(code), Some(detail)) => format!("{code} {detail}"),
            (Some(code), None) => code.to_string(),
            _ => format!("<not a server error: {e}>"),
        },
    }
}

fn queued() -> Value {
    Value::SimpleString("QUEUED".into())
}

fn pong() -> Value {
    Value::SimpleString("PONG".into())
}

fn bulk(s: &str) -> Value {
    Value::BulkString(s.as_bytes().to_vec())
}

/// MULTI, the lines (each must answer QUEUED), EXEC: EXEC's reply.
#[track_caller]
fn transaction(con: &mut redis::Connection, lines: &[&str]) -> Value {
    assert_eq!(ok(con, "MULTI"), Value::Okay);
    for line in lines {
        assert_eq!(ok(con, line), queued(), "{line}");
    }
    ok(con, "EXEC")
}

// ---------------------------------------------------------------------------------------
// The redis crate's transactions

#[test]
fn atomic_pipeline_applies_everything_and_answers_each_command() {
    let server = Server::start(&[]);
    let mut con = server.conn();
    let (set, got, n, missing): (String, String, i64, Option<String>) = redis::pipe()
        .atomic()
        .set("k", "v")
        .get("k")
        .incr("n", 5)
        .get("missing")
        .query(&mut con)
        .expect("atomic pipeline");
    assert_eq!(
        (set.as_str(), got.as_str(), n, missing),
        ("OK", "v", 5, None)
    );
    // The client is back outside the transaction.
    assert_eq!(ok(&mut con, "GET n"), bulk("5"));
    assert_eq!(err(&mut con, "EXEC"), "ERR EXEC without MULTI");
}

#[test]
fn atomic_pipeline_with_watch_is_nil_when_the_key_changed() {
    let server = Server::start(&[]);
    let mut con = server.conn();
    let mut other = server.conn();
    ok(&mut con, "SET balance 10");
    ok(&mut con, "WATCH balance");
    ok(&mut other, "SET balance 20");
    let r: Option<(String,)> = redis::pipe()
        .atomic()
        .set("balance", "0")
        .query(&mut con)
        .expect("atomic pipeline");
    assert_eq!(r, None);
    assert_eq!(ok(&mut con, "GET balance"), bulk("20"));
}

/// Optimistic locking as clients use it: WATCH, read, MULTI, write, EXEC, retry on nil.
/// Concurrent incrementers lose no increment.
#[test]
fn watch_makes_read_modify_write_safe_under_contention() {
    let server = Server::start(&[]);
    const THREADS: usize = 4;
    const EACH: i64 = 25;
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            let mut con = server.conn();
            thread::spawn(move || {
                let mut retries = 0;
                for _ in 0..EACH {
                    loop {
                        ok(&mut con, "WATCH counter");
                        let cur: i64 = match ok(&mut con, "GET counter") {
                            Value::BulkString(b) => String::from_utf8(b).unwrap().parse().unwrap(),
                            Value::Nil => 0,
                            v => panic!("GET counter: {v:?}"),
                        };
                        assert_eq!(ok(&mut con, "MULTI"), Value::Okay);
                        assert_eq!(ok(&mut con, &format!("SET counter {}", cur + 1)), queued());
                        match ok(&mut con, "EXEC") {
                            Value::Nil => retries += 1,
                            Value::Array(v) => {
                                assert_eq!(v, vec![Value::Okay]);
                                break;
                            }
                            v => panic!("EXEC: {v:?}"),
                        }
                    }
                }
                retries
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker");
    }
    let mut con = server.conn();
    assert_eq!(
        ok(&mut con, "GET counter"),
        bulk(&(THREADS as i64 * EACH).to_string())
    );
}

/// Reads inside a transaction see one state: a writer increments two keys together in
/// transactions while a reader reads both in transactions; the reader never sees them
/// differ.
#[test]
fn reads_inside_a_transaction_see_no_other_write_in_between() {
    let server = Server::start(&[]);
    let mut w = server.conn();
    let mut rd = server.conn();
    ok(&mut w, "MSET a 0 b 0");
    let writer = thread::spawn(move || {
        for _ in 0..200 {
            transaction(&mut w, &["INCR a", "INCR b"]);
        }
    });
    let mut seen = 0;
    while !writer.is_finished() || seen == 0 {
        match transaction(&mut rd, &["GET a", "GET b"]) {
            Value::Array(v) => assert_eq!(v[0], v[1], "a and b read apart"),
            v => panic!("EXEC: {v:?}"),
        }
        seen += 1;
    }
    writer.join().expect("writer");
    assert_eq!(
        transaction(&mut rd, &["GET a", "GET b"]),
        Value::Array(vec![bulk("200"), bulk("200")])
    );
}

#[test]
fn an_acknowledged_transaction_survives_kill_9() {
    let dir = DataDir::new();
    let mut server = Server::start_in(&dir, &[]);
    let mut con = server.conn();
    assert_eq!(
        transaction(&mut con, &["SET a 1", "INCRBY a 9", "SET b x", "DEL gone"]),
        Value::Array(vec![
            Value::Okay,
            Value::Int(10),
            Value::Okay,
            Value::Int(0)
        ])
    );
    server.kill9();
    let server = Server::start_in(&dir, &[]);
    let mut con = server.conn();
    assert_eq!(
        ok(&mut con, "MGET a b"),
        Value::Array(vec![bulk("10"), bulk("x")])
    );
}

// ---------------------------------------------------------------------------------------
// Raw RESP

/// Sends `input` on a fresh socket and reads until the replies end with `want` (or the
/// socket's timeout).
fn raw_exchange(server: &Server, input: &[u8], want: &[u8]) -> Vec<u8> {
    let mut s = server.raw();
    s.write_all(input).expect("send");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(want) {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got
}

#[test]
fn raw_resp_pipelined_transactions_answer_as_redis_does() {
    let server = Server::start(&[]);
    let cases: &[(&[u8], &[u8])] = &[
        // One pipeline, as redis-py and ioredis send it.
        (
            b"*1\r\n$5\r\nMULTI\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$4\r\nEXEC\r\n",
            b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n+OK\r\n$1\r\nv\r\n",
        ),
        // Inline commands; an arity error aborts EXEC.
        (
            b"MULTI\r\nSET x\r\nSET y 1\r\nEXEC\r\nEXISTS y\r\n",
            b"+OK\r\n-ERR wrong number of arguments for 'set' command\r\n+QUEUED\r\n\
              -EXECABORT Transaction discarded because of previous errors.\r\n:0\r\n",
        ),
        // RESP3: a WATCH abort is a null.
        (
            b"HELLO 3\r\nWATCH w\r\nSET w 1\r\nMULTI\r\nPING\r\nEXEC\r\nMULTI\r\nEXEC\r\n",
            b"+OK\r\n+OK\r\n+OK\r\n+QUEUED\r\n_\r\n+OK\r\n*0\r\n",
        ),
        // A runtime error is one element of EXEC's array; the rest applies.
        (
            b"SET a notanumber\r\nMULTI\r\nINCR a\r\nSET b 1\r\nGET b\r\nEXEC\r\n",
            b"+OK\r\n+OK\r\n+QUEUED\r\n+QUEUED\r\n+QUEUED\r\n\
              *3\r\n-ERR value is not an integer or out of range\r\n+OK\r\n$1\r\n1\r\n",
        ),
        // RESP2: a null array.
        (
            b"WATCH w\r\nSET w 2\r\nMULTI\r\nEXEC\r\n",
            b"+OK\r\n+OK\r\n+OK\r\n*-1\r\n",
        ),
    ];
    for (input, want) in cases {
        let got = raw_exchange(&server, input, want);
        let got = if input.starts_with(b"HELLO") {
            // Skip HELLO's map: compare from its last field on.
            let at = got
                .windows(4)
                .position(|w| w == b"*0\r\n")
                .map_or(0, |p| p + 4);
            got[at..].to_vec()
        } else {
            got
        };
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(want),
            "input {:?}",
            String::from_utf8_lossy(input)
        );
    }
}

// ---------------------------------------------------------------------------------------
// Redis's tests/unit/multi.tcl, the cases that use only our commands

#[test]
fn redis_multi_tcl_basics_and_errors() {
    let server = Server::start(&[]);
    let mut c = server.conn();
    // MULTI / EXEC basics (with a string instead of a list).
    ok(&mut c, "SET mykey abc");
    assert_eq!(
        transaction(&mut c, &["GET mykey", "PING"]),
        Value::Array(vec![bulk("abc"), pong()])
    );
    // DISCARD.
    assert_eq!(ok(&mut c, "MULTI"), Value::Okay);
    assert_eq!(ok(&mut c, "DEL mykey"), queued());
    assert_eq!(ok(&mut c, "DISCARD"), Value::Okay);
    assert_eq!(ok(&mut c, "GET mykey"), bulk("abc"));
    // Nested MULTI are not allowed.
    ok(&mut c, "MULTI");
    assert_eq!(err(&mut c, "MULTI"), "ERR MULTI calls can not be nested");
    ok(&mut c, "EXEC");
    // MULTI where commands alter argc/argv (GETDEL for SPOP).
    assert_eq!(
        transaction(&mut c, &["GETDEL mykey"]),
        Value::Array(vec![bulk("abc")])
    );
    assert_eq!(ok(&mut c, "EXISTS mykey"), Value::Int(0));
    // WATCH inside MULTI is not allowed.
    ok(&mut c, "MULTI");
    assert_eq!(
        err(&mut c, "WATCH x"),
        "ERR WATCH inside MULTI is not allowed"
    );
    ok(&mut c, "EXEC");
    // EXEC fails if there are errors while queueing commands #1, and then the client's
    // MULTI state is cleared.
    ok(&mut c, "DEL foo1 foo2");
    ok(&mut c, "MULTI");
    ok(&mut c, "SET foo1 bar1");
    assert!(err(&mut c, "NON-EXISTING-COMMAND").starts_with("ERR unknown command"));
    ok(&mut c, "SET foo2 bar2");
    assert_eq!(
        err(&mut c, "EXEC"),
        "EXECABORT Transaction discarded because of previous errors."
    );
    assert_eq!(ok(&mut c, "EXISTS foo1 foo2"), Value::Int(0));
    assert_eq!(ok(&mut c, "PING"), pong());
    assert_eq!(err(&mut c, "DISCARD"), "ERR DISCARD without MULTI");
}

/// Runs multi.tcl's WATCH shape: `setup`, WATCH `watch`, `between`, then MULTI PING
/// EXEC; returns EXEC's reply. Each case on a fresh server.
fn watch_case(setup: &[&str], watch: &str, between: &[&str]) -> Value {
    let server = Server::start(&[]);
    let mut c = server.conn();
    for line in setup {
        ok(&mut c, line);
    }
    ok(&mut c, &format!("WATCH {watch}"));
    for line in between {
        ok(&mut c, line);
    }
    transaction(&mut c, &["PING"])
}

/// A multi.tcl WATCH case: name, setup, watched keys, commands in between, EXEC's reply.
type WatchCase<'a> = (&'a str, &'a [&'a str], &'a str, &'a [&'a str], &'a Value);

#[test]
fn redis_multi_tcl_watch_cases() {
    let done = Value::Array(vec![pong()]);
    let nil = Value::Nil;
    let cases: &[WatchCase] = &[
        (
            "EXEC works on WATCHed key not modified",
            &[],
            "x y z",
            &[],
            &done,
        ),
        (
            "EXEC fail on WATCHed key modified (1 key of 1 watched)",
            &["SET x 30"],
            "x",
            &["SET x 40"],
            &nil,
        ),
        (
            "EXEC fail on WATCHed key modified (1 key of 5 watched)",
            &["SET x 30"],
            "a b x k z",
            &["SET x 40"],
            &nil,
        ),
        (
            "It is possible to UNWATCH",
            &["SET x 30"],
            "x",
            &["SET x 40", "UNWATCH"],
            &done,
        ),
        (
            "FLUSHALL is able to touch the watched keys",
            &["SET x 30"],
            "x",
            &["FLUSHALL"],
            &nil,
        ),
        (
            "FLUSHALL does not touch non affected keys",
            &["DEL x"],
            "x",
            &["FLUSHALL"],
            &done,
        ),
        (
            "FLUSHDB is able to touch the watched keys",
            &["SET x 30"],
            "x",
            &["FLUSHDB"],
            &nil,
        ),
        (
            "FLUSHDB does not touch non affected keys",
            &["DEL x"],
            "x",
            &["FLUSHDB"],
            &done,
        ),
        (
            "WATCH will consider touched keys target of EXPIRE",
            &["SET x foo"],
            "x",
            &["EXPIRE x 10"],
            &nil,
        ),
    ];
    for (name, setup, watch, between, want) in cases {
        assert_eq!(&watch_case(setup, watch, between), *want, "{name}");
    }
}

#[test]
fn redis_multi_tcl_watch_state_is_cleared() {
    let server = Server::start(&[]);
    let mut c = server.conn();
    let done = Value::Array(vec![pong()]);
    // After successful EXEC key is no longer watched.
    ok(&mut c, "SET x 30");
    ok(&mut c, "WATCH x");
    assert_eq!(transaction(&mut c, &["PING"]), done);
    ok(&mut c, "SET x 40");
    assert_eq!(transaction(&mut c, &["PING"]), done);
    // After failed EXEC key is no longer watched.
    ok(&mut c, "WATCH x");
    ok(&mut c, "SET x 50");
    assert_eq!(transaction(&mut c, &["PING"]), Value::Nil);
    ok(&mut c, "SET x 60");
    assert_eq!(transaction(&mut c, &["PING"]), done);
    // UNWATCH when there is nothing watched works as expected.
    assert_eq!(ok(&mut c, "UNWATCH"), Value::Okay);
    // DISCARD should clear the WATCH dirty flag on the client / UNWATCH all the keys.
    for _ in 0..2 {
        ok(&mut c, "WATCH x");
        ok(&mut c, "SET x 10");
        ok(&mut c, "MULTI");
        ok(&mut c, "DISCARD");
        assert_eq!(
            transaction(&mut c, &["INCR x"]),
            Value::Array(vec![Value::Int(11)])
        );
    }
    // Flushall while watching several keys by one client.
    ok(&mut c, "FLUSHALL");
    ok(&mut c, "MSET a a b b");
    ok(&mut c, "WATCH b a");
    ok(&mut c, "FLUSHALL");
    assert_eq!(ok(&mut c, "PING"), pong());
}

/// WATCH will consider touched expired keys: a watched key that expires (and is deleted
/// by the active expirer) before EXEC aborts it.
#[test]
fn redis_multi_tcl_watch_expired_key() {
    let server = Server::start(&[]);
    let mut c = server.conn();
    ok(&mut c, "SET x foo");
    ok(&mut c, "PEXPIRE x 50");
    ok(&mut c, "WATCH x");
    common::wait_until(
        std::time::Duration::from_secs(10),
        "the key to expire and be deleted",
        || ok(&mut server.conn(), "DBSIZE") == Value::Int(0),
    );
    assert_eq!(transaction(&mut c, &["PING"]), Value::Nil);
}

/// WATCH stale keys should not fail EXEC; nor deleting (or reading, which deletes
/// lazily) or flushing them: an expired key is absent, and stays absent.
#[test]
fn redis_multi_tcl_stale_keys() {
    let server = Server::start(&[]);
    let mut c = server.conn();
    let cases: &[&[&str]] = &[&[], &["EXISTS x"], &["DEL x"], &["FLUSHDB"]];
    for between in cases {
        ok(&mut c, "SET x foo PX 1");
        common::wait_until(std::time::Duration::from_secs(10), "x to expire", || {
            ok(&mut server.conn(), "PTTL x") == Value::Int(-2)
        });
        ok(&mut c, "WATCH x");
        for line in *between {
            ok(&mut c, line);
        }
        assert_eq!(
            transaction(&mut c, &["PING"]),
            Value::Array(vec![pong()]),
            "{between:?}"
        );
    }
}

#[test]
fn closing_a_connection_drops_its_watches() {
    let server = Server::start(&[]);
    let mut c = server.conn();
    ok(&mut c, "WATCH x");
    drop(c);
    // A new connection's transaction is unaffected by writes to x.
    let mut c = server.conn();
    ok(&mut c, "SET x 1");
    assert_eq!(transaction(&mut c, &["PING"]), Value::Array(vec![pong()]));
}

// ---------------------------------------------------------------------------------------
// redis-cli

/// MULTI/SET/GET/EXEC typed into one redis-cli session (commands on stdin, one
/// connection), with the output Redis 7 gives for the same input.
#[test]
fn redis_cli_transaction_in_one_connection() {
    let server = Server::start(&[]);
    let input = "MULTI\nSET k v\nGET k\nINCR k\nEXEC\nEXEC\nMULTI\nNOPE\nEXEC\nGET k\n";
    let mut child = match Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &server.port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => panic!(
            "this test needs redis-cli (from Redis 7, e.g. apt-get install redis-tools): {e}"
        ),
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write to redis-cli");
    let out = child.wait_with_output().expect("redis-cli output");
    assert!(out.status.success(), "redis-cli failed: {out:?}");
    // Checked against redis-server 7.0.15 with the same input.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "OK\nQUEUED\nQUEUED\nQUEUED\nOK\nv\nERR value is not an integer or out of range\n\n\
         ERR EXEC without MULTI\n\nOK\n\
         ERR unknown command 'NOPE', with args beginning with: \n\n\
         EXECABORT Transaction discarded because of previous errors.\n\nv\n"
    );
}
