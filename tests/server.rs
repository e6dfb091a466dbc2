//! Integration tests for one `kvstore server` process: the commands through the
//! `redis` crate, exact Redis error wording, inline and malformed input over raw
//! sockets, pipelining, AUTH, client limits, concurrency, HELLO/RESP3, introspection
//! (COMMAND, CONFIG GET, INFO), graceful shutdown, durability across kill -9, and
//! `redis-cli` (required: the test fails, naming it, when it is missing).
//!
//! Every test starts its own server(s) on free ports with their own temp dirs
//! (tests/common), so they run in parallel. Nothing sleeps and hopes: whatever must
//! happen "eventually" is polled with `wait_until`, and every socket has timeouts.

mod common;

use common::{DataDir, Server, redis_conn, resp, wait_until};
use redis::{RedisError, RedisResult, Value};
use std::collections::{HashMap, HashSet};
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Deadline for anything that must happen "soon" (a slot freed, a key expired, …).
const SOON: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Helpers

/// The text of a server error as Redis sent it, without the leading `-`
/// (e.g. `ERR wrong number of arguments for 'get' command`).
fn err_text(e: &RedisError) -> String {
    match (e.code(), e.detail()) {
        (Some(code), Some(detail)) => format!("{code} {detail}"),
        (Some(code), None) => code.to_string(),
        _ => format!("<not a server error: {e}>"),
    }
}

/// Runs a command that must fail, and returns the server's error text.
#[track_caller]
fn query_err(con: &mut redis::Connection, cmd: &redis::Cmd) -> String {
    let r: RedisResult<Value> = cmd.query(con);
    match r {
        Ok(v) => panic!("expected an error reply, got {v:?}"),
        Err(e) => err_text(&e),
    }
}

/// `redis::cmd(name)` with arguments.
fn cmd(name: &str, args: &[&[u8]]) -> redis::Cmd {
    let mut c = redis::cmd(name);
    for a in args {
        c.arg(*a);
    }
    c
}

/// Runs a command and converts its reply, with the command in the panic message.
#[track_caller]
fn q<T: redis::FromRedisValue>(con: &mut redis::Connection, name: &str, args: &[&[u8]]) -> T {
    match cmd(name, args).query(con) {
        Ok(v) => v,
        Err(e) => panic!("{name} {}: {e}", show_args(args)),
    }
}

fn show_args(args: &[&[u8]]) -> String {
    args.iter()
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Bytes shown with escapes, for assertion messages.
fn show(b: &[u8]) -> String {
    b.escape_ascii().to_string()
}

/// A raw connection: the bytes we send, the replies we read one RESP value at a time.
/// The socket has the harness's read/write timeouts, so every read has a deadline.
struct Raw {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Raw {
    #[track_caller]
    fn connect(server: &Server) -> Raw {
        Raw::from_stream(server.raw())
    }

    fn from_stream(stream: TcpStream) -> Raw {
        let writer = stream.try_clone().expect("clone raw socket");
        Raw {
            reader: BufReader::new(stream),
            writer,
        }
    }

    #[track_caller]
    fn send(&mut self, bytes: &[u8]) {
        if let Err(e) = self.writer.write_all(bytes) {
            panic!("sending {}: {e}", show(bytes));
        }
    }

    /// Reads one complete reply (RESP2 or RESP3) and returns its bytes.
    #[track_caller]
    fn reply(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        match read_value(&mut self.reader, &mut out) {
            Ok(()) => out,
            Err(e) => panic!("reading a reply: {e} (got so far: \"{}\")", show(&out)),
        }
    }

    /// Sends a request and returns the reply as text.
    #[track_caller]
    fn call(&mut self, request: &[u8]) -> String {
        self.send(request);
        String::from_utf8_lossy(&self.reply()).into_owned()
    }

    /// Asserts the server closed the connection: the next read is end-of-input (or a
    /// reset), not data and not a timeout.
    #[track_caller]
    fn assert_closed(&mut self, what: &str) {
        let mut buf = [0u8; 256];
        match self.reader.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!(
                "{what}: expected the connection to be closed, got more data: \"{}\"",
                show(&buf[..n])
            ),
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {}
            Err(e) => panic!("{what}: expected the connection to be closed, read failed: {e}"),
        }
    }
}

fn read_line(r: &mut impl BufRead, out: &mut Vec<u8>) -> io::Result<Vec<u8>> {
    let start = out.len();
    let n = r.read_until(b'\n', out)?;
    if n == 0 || !out.ends_with(b"\r\n") {
        return Err(io::Error::new(
            ErrorKind::UnexpectedEof,
            "connection closed in the middle of a reply line",
        ));
    }
    Ok(out[start + 1..out.len() - 2].to_vec())
}

fn parse_len(line: &[u8]) -> io::Result<i64> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| io::Error::new(ErrorKind::InvalidData, "bad length in reply"))
}

/// Reads one RESP2/RESP3 value from `r`, appending its raw bytes to `out`.
fn read_value(r: &mut impl BufRead, out: &mut Vec<u8>) -> io::Result<()> {
    let start = out.len();
    let line = read_line(r, out)?;
    match out[start] {
        b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => Ok(()),
        b'$' | b'!' | b'=' => {
            let len = parse_len(&line)?;
            if len >= 0 {
                let mut body = vec![0u8; len as usize + 2];
                r.read_exact(&mut body)?;
                out.extend_from_slice(&body);
            }
            Ok(())
        }
        b'*' | b'~' | b'>' => {
            for _ in 0..parse_len(&line)?.max(0) {
                read_value(r, out)?;
            }
            Ok(())
        }
        b'%' | b'|' => {
            for _ in 0..2 * parse_len(&line)?.max(0) {
                read_value(r, out)?;
            }
            if out[start] == b'|' {
                // An attribute comes before the value it describes.
                read_value(r, out)?;
            }
            Ok(())
        }
        other => Err(io::Error::new(
            ErrorKind::InvalidData,
            format!("unknown reply type byte {:?}", char::from(other)),
        )),
    }
}

/// The `field:value` of an INFO text.
fn info_field(info: &str, field: &str) -> Option<String> {
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
}

fn info(con: &mut redis::Connection, section: &str) -> String {
    q(con, "INFO", &[section.as_bytes()])
}

/// `db0:keys=…,expires=…` of INFO keyspace as (keys, expires); (0, 0) when absent.
fn keyspace(con: &mut redis::Connection) -> (u64, u64) {
    let text = info(con, "keyspace");
    let Some(db0) = info_field(&text, "db0") else {
        return (0, 0);
    };
    let get = |name: &str| -> u64 {
        db0.split(',')
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name}= in INFO keyspace line db0:{db0}"))
    };
    (get("keys"), get("expires"))
}

/// Polls with a fresh raw connection until PING answers PONG.
fn fresh_ping_works(server: &Server) -> bool {
    let Ok(stream) = TcpStream::connect(server.addr()) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut raw = Raw::from_stream(stream);
    if raw.writer.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut out = Vec::new();
    read_value(&mut raw.reader, &mut out).is_ok() && out == b"+PONG\r\n"
}

/// Waits for the process to exit (after a signal we sent) and returns its status.
#[track_caller]
fn wait_exit(server: &mut Server) -> std::process::ExitStatus {
    wait_until(Duration::from_secs(20), "kvstore to exit", || {
        server.try_wait().is_some()
    });
    server.try_wait().expect("exit status after wait")
}

// ---------------------------------------------------------------------------------------
// 1. Commands through the redis crate

#[test]
fn string_commands_set_get_del_exists_mget_mset() {
    let server = Server::start(&[]);
    let mut con = server.conn();

    let r: Value = q(&mut con, "SET", &[b"a", b"1"]);
    assert_eq!(r, Value::Okay, "SET reply");
    let v: Option<String> = q(&mut con, "GET", &[b"a"]);
    assert_eq!(v.as_deref(), Some("1"));
    let v: Value = q(&mut con, "GET", &[b"missing"]);
    assert_eq!(v, Value::Nil, "GET of a missing key is nil");

    // MSET / MGET
    let r: Value = q(&mut con, "MSET", &[b"b", b"2", b"c", b"3", b"d", b"4"]);
    assert_eq!(r, Value::Okay, "MSET reply");
    let vals: Vec<Option<String>> = q(&mut con, "MGET", &[b"a", b"b", b"nope", b"c", b"d"]);
    assert_eq!(
        vals,
        vec![
            Some("1".into()),
            Some("2".into()),
            None,
            Some("3".into()),
            Some("4".into())
        ]
    );

    // EXISTS counts every argument, duplicates included.
    let n: i64 = q(&mut con, "EXISTS", &[b"a", b"a", b"a", b"nope", b"b"]);
    assert_eq!(n, 4, "EXISTS a a a nope b");

    // DEL many keys: counts only those that existed.
    let n: i64 = q(&mut con, "DEL", &[b"a", b"b", b"nope", b"c"]);
    assert_eq!(n, 3, "DEL a b nope c");
    let n: i64 = q(&mut con, "DEL", &[b"a"]);
    assert_eq!(n, 0, "DEL of a deleted key");
    let n: i64 = q(&mut con, "EXISTS", &[b"a", b"b", b"c", b"d"]);
    assert_eq!(n, 1, "only d is left");
    let n: i64 = q(&mut con, "DBSIZE", &[]);
    assert_eq!(n, 1, "DBSIZE after DEL");

    // MSETNX: all or nothing.
    let n: i64 = q(&mut con, "MSETNX", &[b"x1", b"a", b"x2", b"b"]);
    assert_eq!(n, 1, "MSETNX with no existing key");
    let n: i64 = q(&mut con, "MSETNX", &[b"x3", b"c", b"x1", b"changed"]);
    assert_eq!(n, 0, "MSETNX with one existing key");
    let vals: Vec<Option<String>> = q(&mut con, "MGET", &[b"x1", b"x2", b"x3"]);
    assert_eq!(
        vals,
        vec![Some("a".into()), Some("b".into()), None],
        "a refused MSETNX sets nothing"
    );

    // SETNX
    let n: i64 = q(&mut con, "SETNX", &[b"nx", b"first"]);
    assert_eq!(n, 1, "SETNX on a missing key");
    let n: i64 = q(&mut con, "SETNX", &[b"nx", b"second"]);
    assert_eq!(n, 0, "SETNX on an existing key");
    let v: String = q(&mut con, "GET", &[b"nx"]);
    assert_eq!(v, "first");

    // STRLEN, TYPE, DBSIZE
    let n: i64 = q(&mut con, "STRLEN", &[b"nx"]);
    assert_eq!(n, 5, "STRLEN nx");
    let n: i64 = q(&mut con, "STRLEN", &[b"missing"]);
    assert_eq!(n, 0, "STRLEN of a missing key");
    let t: Value = q(&mut con, "TYPE", &[b"nx"]);
    assert_eq!(t, Value::SimpleString("string".into()), "TYPE of a string");
    let t: Value = q(&mut con, "TYPE", &[b"missing"]);
    assert_eq!(
        t,
        Value::SimpleString("none".into()),
        "TYPE of a missing key"
    );
    let n: i64 = q(&mut con, "DBSIZE", &[]);
    assert_eq!(n, 4, "DBSIZE: d, x1, x2, nx");
}

#[test]
fn incr_decr_family_and_integer_errors() {
    let server = Server::start(&[]);
    let mut con = server.conn();

    let n: i64 = q(&mut con, "INCR", &[b"n"]);
    assert_eq!(n, 1, "INCR of a missing key starts at 0");
    let n: i64 = q(&mut con, "INCRBY", &[b"n", b"41"]);
    assert_eq!(n, 42);
    let n: i64 = q(&mut con, "DECR", &[b"n"]);
    assert_eq!(n, 41);
    let n: i64 = q(&mut con, "DECRBY", &[b"n", b"50"]);
    assert_eq!(n, -9);
    let n: i64 = q(&mut con, "INCRBY", &[b"n", b"-1"]);
    assert_eq!(n, -10);
    let n: i64 = q(&mut con, "DECR", &[b"fresh"]);
    assert_eq!(n, -1, "DECR of a missing key");
    let v: String = q(&mut con, "GET", &[b"n"]);
    assert_eq!(v, "-10", "the counter is stored as a decimal string");

    // Non-integer values and arguments.
    let _: () = q(&mut con, "SET", &[b"s", b"abc"]);
    let not_int = "ERR value is not an integer or out of range";
    assert_eq!(query_err(&mut con, &cmd("INCR", &[b"s"])), not_int);
    assert_eq!(query_err(&mut con, &cmd("DECR", &[b"s"])), not_int);
    assert_eq!(query_err(&mut con, &cmd("INCRBY", &[b"n", b"x"])), not_int);
    assert_eq!(
        query_err(&mut con, &cmd("DECRBY", &[b"n", b"1.5"])),
        not_int
    );
    let _: () = q(&mut con, "SET", &[b"sp", b" 1"]);
    assert_eq!(
        query_err(&mut con, &cmd("INCR", &[b"sp"])),
        not_int,
        "a value with a leading space is not an integer"
    );
    let _: () = q(&mut con, "SET", &[b"big", b"9223372036854775808"]);
    assert_eq!(
        query_err(&mut con, &cmd("INCR", &[b"big"])),
        not_int,
        "a value past i64 is not an integer"
    );

    // Overflow, both ways.
    let overflow = "ERR increment or decrement would overflow";
    let _: () = q(&mut con, "SET", &[b"max", b"9223372036854775807"]);
    assert_eq!(query_err(&mut con, &cmd("INCR", &[b"max"])), overflow);
    assert_eq!(
        query_err(&mut con, &cmd("INCRBY", &[b"max", b"1"])),
        overflow
    );
    let _: () = q(&mut con, "SET", &[b"min", b"-9223372036854775808"]);
    assert_eq!(query_err(&mut con, &cmd("DECR", &[b"min"])), overflow);
    assert_eq!(
        query_err(&mut con, &cmd("DECRBY", &[b"min", b"1"])),
        overflow
    );
    // Redis refuses to negate i64::MIN with its own wording.
    assert_eq!(
        query_err(&mut con, &cmd("DECRBY", &[b"n", b"-9223372036854775808"])),
        "ERR decrement would overflow"
    );

    // Failed increments change nothing.
    let vals: Vec<String> = q(&mut con, "MGET", &[b"s", b"max", b"min", b"n"]);
    assert_eq!(
        vals,
        vec!["abc", "9223372036854775807", "-9223372036854775808", "-10"]
    );
}

#[test]
fn keys_with_glob_patterns() {
    let server = Server::start(&[]);
    let mut con = server.conn();
    let names: &[&[u8]] = &[
        b"hello",
        b"hallo",
        b"hxllo",
        b"hllo",
        b"heeeello",
        b"a*b",
        b"a?b",
        b"axb",
        b"user:1",
        b"user:2",
        b"user:10",
    ];
    for k in names {
        let _: () = q(&mut con, "SET", &[k, b"v"]);
    }
    let keys = |con: &mut redis::Connection, pattern: &str| -> Vec<String> {
        let mut v: Vec<String> = q(con, "KEYS", &[pattern.as_bytes()]);
        v.sort();
        v
    };
    let sorted = |v: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    };
    assert_eq!(keys(&mut con, "*").len(), names.len(), "KEYS *");
    assert_eq!(
        keys(&mut con, "h?llo"),
        sorted(&["hello", "hallo", "hxllo"])
    );
    assert_eq!(
        keys(&mut con, "h*llo"),
        sorted(&["hello", "hallo", "hxllo", "hllo", "heeeello"])
    );
    assert_eq!(keys(&mut con, "h[ae]llo"), sorted(&["hello", "hallo"]));
    assert_eq!(keys(&mut con, "h[^e]llo"), sorted(&["hallo", "hxllo"]));
    assert_eq!(keys(&mut con, "h[a-b]llo"), sorted(&["hallo"]));
    assert_eq!(keys(&mut con, "a\\*b"), sorted(&["a*b"]), "escaped *");
    assert_eq!(keys(&mut con, "a\\?b"), sorted(&["a?b"]), "escaped ?");
    assert_eq!(keys(&mut con, "a?b"), sorted(&["a*b", "a?b", "axb"]));
    assert_eq!(keys(&mut con, "user:?"), sorted(&["user:1", "user:2"]));
    assert_eq!(
        keys(&mut con, "user:*"),
        sorted(&["user:1", "user:2", "user:10"])
    );
    assert_eq!(keys(&mut con, "nothing*"), Vec::<String>::new());
}

/// Runs a whole SCAN iteration (to cursor 0) and returns every key it returned, in order.
fn scan_all(con: &mut redis::Connection, extra: &[&[u8]]) -> Vec<String> {
    let mut cursor = "0".to_string();
    let mut all = Vec::new();
    for _ in 0..100_000 {
        let mut args: Vec<&[u8]> = vec![cursor.as_bytes()];
        args.extend_from_slice(extra);
        let (next, batch): (String, Vec<String>) = q(con, "SCAN", &args);
        all.extend(batch);
        cursor = next;
        if cursor == "0" {
            return all;
        }
    }
    panic!("SCAN {} did not reach cursor 0", show_args(extra));
}

#[test]
fn scan_returns_every_key_exactly_once() {
    let server = Server::start(&[]);
    let mut con = server.conn();
    let keys: Vec<String> = (0..1000).map(|i| format!("key:{i}")).collect();
    let mut mset = redis::cmd("MSET");
    for k in &keys {
        mset.arg(k).arg("v");
    }
    let () = mset.query(&mut con).expect("MSET of 1000 keys");

    let got = scan_all(&mut con, &[b"COUNT", b"7"]);
    let unique: HashSet<&String> = got.iter().collect();
    assert_eq!(
        unique.len(),
        got.len(),
        "SCAN COUNT 7 returned some key twice"
    );
    let expected: HashSet<&String> = keys.iter().collect();
    assert_eq!(unique, expected, "SCAN COUNT 7 must return every key");

    // Default COUNT.
    let got = scan_all(&mut con, &[]);
    assert_eq!(got.len(), 1000, "SCAN without COUNT");
    assert_eq!(got.iter().collect::<HashSet<_>>(), expected);

    // MATCH filters, still exactly once.
    let got = scan_all(&mut con, &[b"MATCH", b"key:1*", b"COUNT", b"7"]);
    let unique: HashSet<&String> = got.iter().collect();
    assert_eq!(
        unique.len(),
        got.len(),
        "SCAN MATCH returned some key twice"
    );
    let expected: HashSet<&String> = keys.iter().filter(|k| k.starts_with("key:1")).collect();
    assert_eq!(expected.len(), 111, "key:1, key:10..19, key:100..199");
    assert_eq!(unique, expected, "SCAN MATCH key:1* COUNT 7");

    let got = scan_all(&mut con, &[b"MATCH", b"nomatch*", b"COUNT", b"50"]);
    assert!(got.is_empty(), "SCAN MATCH with no match returned {got:?}");

    // An empty database: one call, cursor 0, no keys.
    let empty = Server::start(&[]);
    let mut con = empty.conn();
    let (next, batch): (String, Vec<String>) = q(&mut con, "SCAN", &[b"0"]);
    assert_eq!(
        (next.as_str(), batch.len()),
        ("0", 0),
        "SCAN of an empty db"
    );
}

#[test]
fn connection_commands_ping_echo_select_time() {
    let server = Server::start(&[]);
    let mut con = server.conn();

    let r: Value = q(&mut con, "PING", &[]);
    assert_eq!(r, Value::SimpleString("PONG".into()), "PING");
    let r: Value = q(&mut con, "PING", &[b"hi there"]);
    assert_eq!(r, Value::BulkString(b"hi there".to_vec()), "PING msg");
    let r: Value = q(&mut con, "ECHO", &[b"hello\r\nworld"]);
    assert_eq!(r, Value::BulkString(b"hello\r\nworld".to_vec()), "ECHO");

    let r: Value = q(&mut con, "SELECT", &[b"0"]);
    assert_eq!(r, Value::Okay, "SELECT 0");
    assert_eq!(
        query_err(&mut con, &cmd("SELECT", &[b"16"])),
        "ERR DB index is out of range"
    );
    assert_eq!(
        query_err(&mut con, &cmd("SELECT", &[b"zero"])),
        "ERR value is not an integer or out of range"
    );

    let (secs, micros): (String, String) = q(&mut con, "TIME", &[]);
    let secs: u64 = secs.parse().expect("TIME seconds is an integer");
    let micros: u64 = micros.parse().expect("TIME microseconds is an integer");
    assert!(micros < 1_000_000, "TIME microseconds {micros}");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    // Same machine, same clock: a sanity bound, not a timing assertion.
    assert!(
        secs.abs_diff(now) < 3600,
        "TIME says {secs}, this machine says {now}"
    );
}

#[test]
fn set_options_nx_xx_get_ex_px_keepttl() {
    let server = Server::start(&[]);
    let mut con = server.conn();

    // NX
    let r: Value = q(&mut con, "SET", &[b"k", b"v1", b"NX"]);
    assert_eq!(r, Value::Okay, "SET NX on a missing key");
    let r: Value = q(&mut con, "SET", &[b"k", b"v2", b"NX"]);
    assert_eq!(r, Value::Nil, "SET NX on an existing key is nil");
    let v: String = q(&mut con, "GET", &[b"k"]);
    assert_eq!(v, "v1");

    // XX
    let r: Value = q(&mut con, "SET", &[b"other", b"x", b"XX"]);
    assert_eq!(r, Value::Nil, "SET XX on a missing key is nil");
    let n: i64 = q(&mut con, "EXISTS", &[b"other"]);
    assert_eq!(n, 0, "SET XX did not create the key");
    let r: Value = q(&mut con, "SET", &[b"k", b"v3", b"XX"]);
    assert_eq!(r, Value::Okay, "SET XX on an existing key");

    // GET returns the old value (nil when there was none).
    let r: Value = q(&mut con, "SET", &[b"k", b"v4", b"GET"]);
    assert_eq!(r, Value::BulkString(b"v3".to_vec()), "SET GET");
    let r: Value = q(&mut con, "SET", &[b"newkey", b"n", b"GET"]);
    assert_eq!(r, Value::Nil, "SET GET of a missing key");
    let v: String = q(&mut con, "GET", &[b"newkey"]);
    assert_eq!(v, "n", "SET GET sets the value");
    let r: Value = q(&mut con, "SET", &[b"k", b"v5", b"NX", b"GET"]);
    assert_eq!(
        r,
        Value::BulkString(b"v4".to_vec()),
        "SET NX GET on an existing key: old value, not set"
    );
    let v: String = q(&mut con, "GET", &[b"k"]);
    assert_eq!(v, "v4");
    let r: Value = q(&mut con, "SET", &[b"k", b"v6", b"XX", b"GET"]);
    assert_eq!(r, Value::BulkString(b"v4".to_vec()), "SET XX GET");

    // Expiry, seen through INFO keyspace's expires= (there is no TTL command yet).
    assert_eq!(keyspace(&mut con), (2, 0), "no key has a TTL yet");
    let r: Value = q(&mut con, "SET", &[b"t", b"1", b"EX", b"1000"]);
    assert_eq!(r, Value::Okay, "SET EX");
    assert_eq!(keyspace(&mut con), (3, 1), "SET EX gives a TTL");
    let r: Value = q(&mut con, "SET", &[b"t", b"2", b"KEEPTTL"]);
    assert_eq!(r, Value::Okay, "SET KEEPTTL");
    assert_eq!(keyspace(&mut con), (3, 1), "SET KEEPTTL keeps the TTL");
    let r: Value = q(&mut con, "SET", &[b"t", b"3"]);
    assert_eq!(r, Value::Okay);
    assert_eq!(keyspace(&mut con), (3, 0), "a plain SET clears the TTL");
    let r: Value = q(&mut con, "SET", &[b"t", b"4", b"PX", b"1000000"]);
    assert_eq!(r, Value::Okay, "SET PX");
    assert_eq!(keyspace(&mut con), (3, 1), "SET PX gives a TTL");
    let v: String = q(&mut con, "GET", &[b"t"]);
    assert_eq!(v, "4");

    // Short expiries do expire (polled, no timing assertion).
    let r: Value = q(&mut con, "SET", &[b"short", b"x", b"PX", b"200"]);
    assert_eq!(r, Value::Okay);
    let r: Value = q(&mut con, "SET", &[b"kept", b"x", b"PX", b"200"]);
    assert_eq!(r, Value::Okay);
    let r: Value = q(&mut con, "SET", &[b"kept", b"y", b"KEEPTTL"]);
    assert_eq!(r, Value::Okay);
    wait_until(
        SOON,
        "keys set with PX 200 (one via KEEPTTL) to expire",
        || {
            let n: i64 = q(&mut con, "EXISTS", &[b"short", b"kept"]);
            n == 0
        },
    );
    let v: Value = q(&mut con, "GET", &[b"short"]);
    assert_eq!(v, Value::Nil, "an expired key reads as nil");
    let r: Value = q(&mut con, "SET", &[b"short", b"again", b"NX"]);
    assert_eq!(r, Value::Okay, "SET NX treats an expired key as missing");
}

#[test]
fn binary_safe_keys_and_values_and_empty_value() {
    let server = Server::start(&[]);
    let mut con = server.conn();

    let key: Vec<u8> = (0..=255u8).collect();
    let mut value: Vec<u8> = (0..=255u8).rev().collect();
    value.extend_from_slice(b"\r\n*1\r\n$3\r\nGET\r\n\0");
    let r: Value = q(&mut con, "SET", &[&key, &value]);
    assert_eq!(r, Value::Okay);
    let got: Vec<u8> = q(&mut con, "GET", &[&key]);
    assert_eq!(got, value, "binary value read back byte for byte");
    let n: i64 = q(&mut con, "STRLEN", &[&key]);
    assert_eq!(n, value.len() as i64);
    let n: i64 = q(&mut con, "EXISTS", &[&key]);
    assert_eq!(n, 1);
    let listed: Vec<Vec<u8>> = q(&mut con, "KEYS", &[b"*"]);
    assert_eq!(
        listed,
        vec![key.clone()],
        "KEYS returns the binary key intact"
    );

    // Keys that differ only in a byte are distinct.
    let mut key2 = key.clone();
    key2[0] = 1;
    let v: Value = q(&mut con, "GET", &[&key2]);
    assert_eq!(v, Value::Nil);

    // The empty value is a value, not nil; the empty key is a key.
    let r: Value = q(&mut con, "SET", &[b"empty", b""]);
    assert_eq!(r, Value::Okay);
    let v: Value = q(&mut con, "GET", &[b"empty"]);
    assert_eq!(v, Value::BulkString(vec![]), "GET of an empty value");
    let n: i64 = q(&mut con, "STRLEN", &[b"empty"]);
    assert_eq!(n, 0);
    let n: i64 = q(&mut con, "EXISTS", &[b"empty"]);
    assert_eq!(n, 1, "a key with an empty value exists");
    let r: Value = q(&mut con, "SET", &[b"", b"empty key"]);
    assert_eq!(r, Value::Okay);
    let v: String = q(&mut con, "GET", &[b""]);
    assert_eq!(v, "empty key");
    let n: i64 = q(&mut con, "DBSIZE", &[]);
    assert_eq!(n, 3);

    // The same through a raw socket: byte-exact on the wire.
    let mut raw = Raw::connect(&server);
    raw.send(&resp(&[b"GET", &key]));
    let mut expected = format!("${}\r\n", value.len()).into_bytes();
    expected.extend_from_slice(&value);
    expected.extend_from_slice(b"\r\n");
    assert_eq!(
        show(&raw.reply()),
        show(&expected),
        "raw GET of the binary key"
    );
    assert_eq!(raw.call(&resp(&[b"GET", b"empty"])), "$0\r\n\r\n");
}

// ---------------------------------------------------------------------------------------
// 2. Error wording

#[test]
fn error_replies_use_redis_wording() {
    let server = Server::start(&[]);
    let mut raw = Raw::connect(&server);

    let r = raw.call(&resp(&[b"FOO", b"bar", b"baz"]));
    assert!(
        r.starts_with("-ERR unknown command 'FOO'"),
        "unknown command: {r:?}"
    );
    assert_eq!(
        r, "-ERR unknown command 'FOO', with args beginning with: 'bar' 'baz' \r\n",
        "Redis 7's full wording"
    );
    assert_eq!(
        raw.call(&resp(&[b"foo"])),
        "-ERR unknown command 'foo', with args beginning with: \r\n"
    );
    assert_eq!(
        raw.call(&resp(&[b"GET"])),
        "-ERR wrong number of arguments for 'get' command\r\n"
    );
    assert_eq!(
        raw.call(&resp(&[b"get", b"a", b"b"])),
        "-ERR wrong number of arguments for 'get' command\r\n"
    );
    assert_eq!(
        raw.call(&resp(&[b"SET", b"k"])),
        "-ERR wrong number of arguments for 'set' command\r\n"
    );
    assert_eq!(
        raw.call(&resp(&[b"MSET", b"a", b"1", b"b"])),
        "-ERR wrong number of arguments for 'mset' command\r\n"
    );
    assert_eq!(
        raw.call(&resp(&[b"SET", b"k", b"v", b"EX", b"0"])),
        "-ERR invalid expire time in 'set' command\r\n"
    );
    assert_eq!(
        raw.call(&resp(&[b"SET", b"k", b"v", b"PX", b"-5"])),
        "-ERR invalid expire time in 'set' command\r\n"
    );
    assert_eq!(
        raw.call(&resp(&[b"SET", b"k", b"v", b"EX", b"soon"])),
        "-ERR value is not an integer or out of range\r\n"
    );
    assert_eq!(
        raw.call(&resp(&[b"SET", b"k", b"v", b"NX", b"XX"])),
        "-ERR syntax error\r\n"
    );
    assert_eq!(
        raw.call(&resp(&[b"SET", b"k", b"v", b"EX", b"10", b"PX", b"10"])),
        "-ERR syntax error\r\n"
    );
    assert_eq!(
        raw.call(&resp(&[b"SET", b"k", b"v", b"KEEPTTL", b"EX", b"10"])),
        "-ERR syntax error\r\n"
    );
    assert_eq!(
        raw.call(&resp(&[b"SET", b"k", b"v", b"EX"])),
        "-ERR syntax error\r\n"
    );
    assert_eq!(
        raw.call(&resp(&[b"SET", b"k", b"v", b"BOGUS"])),
        "-ERR syntax error\r\n"
    );
    // None of the refused SETs wrote anything; the connection still works.
    assert_eq!(raw.call(&resp(&[b"EXISTS", b"k"])), ":0\r\n");
    assert_eq!(raw.call(&resp(&[b"PING"])), "+PONG\r\n");

    // The redis crate sees the same code and text.
    let mut con = server.conn();
    assert_eq!(
        query_err(&mut con, &cmd("GET", &[])),
        "ERR wrong number of arguments for 'get' command"
    );
    assert!(
        query_err(&mut con, &cmd("FOO", &[])).starts_with("ERR unknown command 'FOO'"),
        "unknown command through the redis crate"
    );
}

// ---------------------------------------------------------------------------------------
// 3. Inline commands (as nc or telnet send them)

#[test]
fn inline_commands_as_nc_sends_them() {
    let server = Server::start(&[]);
    let mut raw = Raw::connect(&server);

    raw.send(b"SET greeting \"hello world\"\r\n");
    assert_eq!(show(&raw.reply()), "+OK\\r\\n", "inline SET with quotes");
    raw.send(b"GET greeting\n");
    assert_eq!(
        show(&raw.reply()),
        show(b"$11\r\nhello world\r\n"),
        "inline GET ended by a bare \\n"
    );

    // Empty lines (CRLF or bare LF) are ignored: the next reply is PING's.
    raw.send(b"\r\n\n\r\n\n");
    raw.send(b"PING\r\n");
    assert_eq!(
        show(&raw.reply()),
        "+PONG\\r\\n",
        "empty lines get no reply"
    );

    // Double-quoted escapes: \x41, \n, \", \\.
    raw.send(b"SET q \"a\\x41\\n\\\"\\\\\"\r\n");
    assert_eq!(show(&raw.reply()), "+OK\\r\\n");
    raw.send(b"GET q\r\n");
    assert_eq!(show(&raw.reply()), show(b"$5\r\naA\n\"\\\r\n"));

    // Single quotes: literal, with \' as the only escape.
    raw.send(b"ECHO 'it\\'s a \\n'\r\n");
    assert_eq!(show(&raw.reply()), show(b"$9\r\nit's a \\n\r\n"));

    // Extra spaces and tabs between arguments; case-insensitive command names.
    raw.send(b"  set   spaced \t  value  \r\nget spaced\r\n");
    assert_eq!(show(&raw.reply()), "+OK\\r\\n");
    assert_eq!(show(&raw.reply()), show(b"$5\r\nvalue\r\n"));

    // An empty quoted argument is an argument.
    raw.send(b"SET emptyval \"\"\r\nSTRLEN emptyval\r\nEXISTS emptyval\r\n");
    assert_eq!(show(&raw.reply()), "+OK\\r\\n");
    assert_eq!(show(&raw.reply()), ":0\\r\\n");
    assert_eq!(show(&raw.reply()), ":1\\r\\n");

    // Several inline commands in one packet, answered in order.
    raw.send(b"INCR c\nINCR c\nGET c\n");
    assert_eq!(show(&raw.reply()), ":1\\r\\n");
    assert_eq!(show(&raw.reply()), ":2\\r\\n");
    assert_eq!(show(&raw.reply()), show(b"$1\r\n2\r\n"));

    // Inline and RESP mixed on one connection.
    raw.send(&resp(&[b"GET", b"greeting"]));
    assert_eq!(show(&raw.reply()), show(b"$11\r\nhello world\r\n"));

    // Inline errors use the same wording.
    raw.send(b"GET\r\n");
    assert_eq!(
        show(&raw.reply()),
        show(b"-ERR wrong number of arguments for 'get' command\r\n")
    );
}

#[test]
fn inline_unbalanced_quotes_close_only_that_connection() {
    let server = Server::start(&[]);
    let mut bystander = Raw::connect(&server);
    assert_eq!(bystander.call(b"SET before 1\r\n"), "+OK\r\n");

    for bad in [
        &b"SET a \"oops\r\n"[..],
        b"SET a 'oops\r\n",
        b"SET a \"closed\"but-not-separated\r\n",
    ] {
        let mut raw = Raw::connect(&server);
        raw.send(b"PING\r\n");
        assert_eq!(raw.reply(), b"+PONG\r\n");
        raw.send(bad);
        assert_eq!(
            show(&raw.reply()),
            show(b"-ERR Protocol error: unbalanced quotes in request\r\n"),
            "reply to {}",
            show(bad)
        );
        raw.assert_closed(&format!("after {}", show(bad)));

        // Everyone else is served as before.
        assert_eq!(bystander.call(b"PING\r\n"), "+PONG\r\n");
        assert!(
            fresh_ping_works(&server),
            "a new connection after {}",
            show(bad)
        );
    }
    assert_eq!(bystander.call(b"GET before\r\n"), "$1\r\n1\r\n");
    assert_eq!(
        bystander.call(b"EXISTS a\r\n"),
        ":0\r\n",
        "no bad SET applied"
    );
}

#[test]
fn inline_line_over_64k_is_refused() {
    let server = Server::start(&[]);
    let mut bystander = server.conn();
    let _: () = q(&mut bystander, "SET", &[b"kept", b"yes"]);

    // A line of exactly 64 KiB is still a request.
    let mut raw = Raw::connect(&server);
    let mut line = b"ECHO ".to_vec();
    line.resize(64 * 1024, b'a');
    line.extend_from_slice(b"\r\n");
    raw.send(&line);
    let reply = raw.reply();
    let expected_len = 64 * 1024 - 5;
    assert!(
        reply.starts_with(format!("${expected_len}\r\n").as_bytes()),
        "ECHO with a 64 KiB inline line: {}",
        show(&reply[..reply.len().min(40)])
    );
    assert_eq!(raw.call(b"PING\r\n"), "+PONG\r\n");

    // One byte more and no newline: the server must give up rather than buffer forever.
    // Exactly that many bytes, so the server has read all we sent when it closes (unread
    // input would turn its close into a reset that could swallow the error reply).
    let mut raw = Raw::connect(&server);
    raw.send(&vec![b'a'; 64 * 1024 + 1]);
    assert_eq!(
        show(&raw.reply()),
        show(b"-ERR Protocol error: too big inline request\r\n")
    );
    raw.assert_closed("after a too big inline request");

    let v: String = q(&mut bystander, "GET", &[b"kept"]);
    assert_eq!(v, "yes");
}

// ---------------------------------------------------------------------------------------
// 4. Malformed RESP

#[test]
fn malformed_resp_closes_only_that_connection() {
    let server = Server::start(&[]);
    let mut bystander = server.conn();
    let _: () = q(&mut bystander, "SET", &[b"intact", b"yes"]);

    let cases: &[(&[u8], &str)] = &[
        (
            b"*abc\r\n",
            "-ERR Protocol error: invalid multibulk length\r\n",
        ),
        (
            b"*1\r\n+foo\r\n",
            "-ERR Protocol error: expected '$', got '+'\r\n",
        ),
        (
            b"*1\r\n:12\r\n",
            "-ERR Protocol error: expected '$', got ':'\r\n",
        ),
        (
            b"*1\r\n$-5\r\n",
            "-ERR Protocol error: invalid bulk length\r\n",
        ),
        (
            b"*1\r\n$abc\r\n",
            "-ERR Protocol error: invalid bulk length\r\n",
        ),
        (
            b"*2000000\r\n",
            "-ERR Protocol error: invalid multibulk length\r\n",
        ),
        (
            b"*1\r\n$3\r\nGETxx",
            "-ERR Protocol error: expected CRLF after bulk string\r\n",
        ),
    ];
    for (bad, expected) in cases {
        let mut raw = Raw::connect(&server);
        // A good command first, in the same packet: it is answered before the error.
        let mut request = resp(&[b"SET", b"good", b"1"]);
        request.extend_from_slice(bad);
        raw.send(&request);
        assert_eq!(raw.reply(), b"+OK\r\n", "the command before {}", show(bad));
        assert_eq!(
            show(&raw.reply()),
            show(expected.as_bytes()),
            "reply to {}",
            show(bad)
        );
        raw.assert_closed(&format!("after {}", show(bad)));

        let v: String = q(&mut bystander, "GET", &[b"intact"]);
        assert_eq!(v, "yes", "data intact after {}", show(bad));
        assert!(
            fresh_ping_works(&server),
            "a new connection after {}",
            show(bad)
        );
    }
    let n: i64 = q(&mut bystander, "DBSIZE", &[]);
    assert_eq!(n, 2, "intact and good, nothing else");
}

#[test]
fn bulk_over_proto_max_bulk_len_is_refused() {
    let server = Server::start(&["--proto-max-bulk-len", "1024"]);
    let mut con = server.conn();
    let before = vec![b'b'; 1000];
    let _: () = q(&mut con, "SET", &[b"before", &before]);

    // Exactly the limit is fine (Redis refuses only lengths above it).
    let at_limit = vec![b'x'; 1024];
    let r: Value = q(&mut con, "SET", &[b"at-limit", &at_limit]);
    assert_eq!(
        r,
        Value::Okay,
        "a 1024-byte bulk with --proto-max-bulk-len 1024"
    );

    // One byte more is refused as soon as the length is read: send only the header, so
    // no unread payload can turn the server's close into a reset.
    let mut raw = Raw::connect(&server);
    raw.send(b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$1025\r\n");
    assert_eq!(
        show(&raw.reply()),
        show(b"-ERR Protocol error: invalid bulk length\r\n")
    );
    raw.assert_closed("after a bulk over the limit");

    // A huge length, as an attacker would send.
    let mut raw = Raw::connect(&server);
    raw.send(b"*1\r\n$9999999999999\r\n");
    assert_eq!(
        show(&raw.reply()),
        show(b"-ERR Protocol error: invalid bulk length\r\n")
    );
    raw.assert_closed("after a huge bulk length");

    let v: Vec<u8> = q(&mut con, "GET", &[b"before"]);
    assert_eq!(v, before, "data written before is intact");
    let v: Vec<u8> = q(&mut con, "GET", &[b"at-limit"]);
    assert_eq!(v, at_limit);
    let n: i64 = q(&mut con, "EXISTS", &[b"big"]);
    assert_eq!(n, 0, "the refused SET was not applied");
    let n: i64 = q(&mut con, "DBSIZE", &[]);
    assert_eq!(n, 2);
}

// ---------------------------------------------------------------------------------------
// 5. Pipelining

#[test]
fn pipeline_200k_sets_without_reading_does_not_deadlock() {
    const N: usize = 200_000;
    let server = Server::start(&[]);
    let stream = server.raw();
    let mut writer_stream = stream.try_clone().expect("clone socket for the writer");

    // The whole pipeline, built up front.
    let mut request = Vec::with_capacity(N * 40);
    for i in 0..N {
        let k = format!("k{i}");
        let v = format!("v{i}");
        request.extend_from_slice(&resp(&[b"SET", k.as_bytes(), v.as_bytes()]));
    }
    let total = request.len();

    // The writer sends everything; nobody reads until it is done. If the server stopped
    // reading while its replies wait unread, the writer would stall here.
    let (done_tx, done_rx) = mpsc::channel();
    let writer = thread::spawn(move || {
        let r = writer_stream
            .write_all(&request)
            .and_then(|()| writer_stream.flush());
        let _ = done_tx.send(r.map_err(|e| e.to_string()));
    });
    match done_rx.recv_timeout(Duration::from_secs(300)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!(
            "writing {total} bytes of pipelined SETs failed before any reply was read \
             (did the server stop reading its input?): {e}"
        ),
        Err(_) => panic!(
            "the writer could not send {total} bytes of pipelined SETs without the client \
             reading replies: the server stopped reading its input"
        ),
    }
    writer.join().expect("writer thread");

    // Now read every reply, in order.
    let mut reader = BufReader::with_capacity(1 << 16, stream);
    let mut buf = vec![0u8; N * 5];
    reader
        .read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("reading {N} replies: {e}"));
    if let Some(i) = buf.chunks(5).position(|c| c != b"+OK\r\n") {
        panic!(
            "reply {i} is \"{}\", expected +OK",
            show(&buf[i * 5..(i * 5 + 40).min(buf.len())])
        );
    }
    let mut raw = Raw {
        writer: reader.get_ref().try_clone().expect("clone"),
        reader,
    };
    assert_eq!(raw.call(&resp(&[b"DBSIZE"])), format!(":{N}\r\n"));
    assert_eq!(raw.call(&resp(&[b"GET", b"k0"])), "$2\r\nv0\r\n");
    assert_eq!(raw.call(&resp(&[b"GET", b"k199999"])), "$7\r\nv199999\r\n");
}

#[test]
fn mixed_pipeline_replies_in_request_order() {
    let server = Server::start(&[]);
    let mut raw = Raw::connect(&server);
    let requests: &[&[&[u8]]] = &[
        &[b"SET", b"a", b"1"],
        &[b"GET", b"a"],
        &[b"INCR", b"n"],
        &[b"GET", b"n"],
        &[b"GET"],
        &[b"GET", b"a"],
        &[b"SET", b"b", b"2"],
        &[b"SET", b"c", b"3", b"EX", b"0"],
        &[b"SET", b"d", b"4"],
        &[b"INCR", b"a"],
        &[b"NOSUCHCMD", b"a", b"x"],
        &[b"INCR", b"n"],
        &[b"MGET", b"a", b"b", b"c", b"d", b"n"],
        &[b"DEL", b"a", b"b"],
        &[b"PING"],
        &[b"EXISTS", b"a", b"b", b"d"],
    ];
    let expected: &[&str] = &[
        "+OK\r\n",
        "$1\r\n1\r\n",
        ":1\r\n",
        "$1\r\n1\r\n",
        "-ERR wrong number of arguments for 'get' command\r\n",
        "$1\r\n1\r\n",
        "+OK\r\n",
        "-ERR invalid expire time in 'set' command\r\n",
        "+OK\r\n",
        ":2\r\n",
        "-ERR unknown command 'NOSUCHCMD', with args beginning with: 'a' 'x' \r\n",
        ":2\r\n",
        "*5\r\n$1\r\n2\r\n$1\r\n2\r\n$-1\r\n$1\r\n4\r\n$1\r\n2\r\n",
        ":2\r\n",
        "+PONG\r\n",
        ":1\r\n",
    ];
    let mut all = Vec::new();
    for r in requests {
        all.extend_from_slice(&resp(r));
    }
    raw.send(&all);
    for (i, want) in expected.iter().enumerate() {
        let got = String::from_utf8_lossy(&raw.reply()).into_owned();
        assert_eq!(got, *want, "reply {i} to {}", show_args(requests[i]));
    }

    // The same through the redis crate's pipeline.
    let mut con = server.conn();
    let (set, get, incr, del): (String, String, i64, i64) = redis::pipe()
        .cmd("SET")
        .arg("p")
        .arg("1")
        .cmd("GET")
        .arg("p")
        .cmd("INCR")
        .arg("p")
        .cmd("DEL")
        .arg("p")
        .query(&mut con)
        .expect("redis crate pipeline");
    assert_eq!((set.as_str(), get.as_str(), incr, del), ("OK", "1", 2, 1));
}

// ---------------------------------------------------------------------------------------
// 6. AUTH

#[test]
fn requirepass_needs_auth() {
    let server = Server::start(&["--requirepass", "secret"]);
    let mut raw = Raw::connect(&server);
    assert_eq!(
        raw.call(&resp(&[b"GET", b"a"])),
        "-NOAUTH Authentication required.\r\n"
    );
    assert_eq!(
        raw.call(&resp(&[b"SET", b"a", b"1"])),
        "-NOAUTH Authentication required.\r\n"
    );
    assert_eq!(
        raw.call(b"PING\r\n"),
        "-NOAUTH Authentication required.\r\n",
        "inline too"
    );
    assert_eq!(
        raw.call(&resp(&[b"AUTH", b"wrong"])),
        "-WRONGPASS invalid username-password pair or user is disabled.\r\n"
    );
    assert_eq!(
        raw.call(&resp(&[b"AUTH", b"default", b"wrong"])),
        "-WRONGPASS invalid username-password pair or user is disabled.\r\n"
    );
    assert_eq!(
        raw.call(&resp(&[b"AUTH", b"someone", b"secret"])),
        "-WRONGPASS invalid username-password pair or user is disabled.\r\n",
        "only the default user exists"
    );
    assert_eq!(
        raw.call(&resp(&[b"GET", b"a"])),
        "-NOAUTH Authentication required.\r\n",
        "still not authenticated after failed AUTHs"
    );
    assert_eq!(raw.call(&resp(&[b"AUTH", b"secret"])), "+OK\r\n");
    assert_eq!(raw.call(&resp(&[b"SET", b"a", b"1"])), "+OK\r\n");
    assert_eq!(raw.call(&resp(&[b"GET", b"a"])), "$1\r\n1\r\n");

    let mut raw2 = Raw::connect(&server);
    assert_eq!(
        raw2.call(&resp(&[b"AUTH", b"default", b"secret"])),
        "+OK\r\n"
    );
    assert_eq!(raw2.call(&resp(&[b"GET", b"a"])), "$1\r\n1\r\n");

    // HELLO with AUTH authenticates too.
    let mut raw3 = Raw::connect(&server);
    let hello = raw3.call(&resp(&[b"HELLO", b"2", b"AUTH", b"default", b"secret"]));
    assert!(hello.starts_with("*14\r\n"), "HELLO 2 AUTH: {hello:?}");
    assert_eq!(raw3.call(&resp(&[b"GET", b"a"])), "$1\r\n1\r\n");

    // The redis crate with the password in the URL.
    let url = format!("redis://:secret@127.0.0.1:{}/", server.port);
    let client = redis::Client::open(url.as_str()).expect("redis URL with a password");
    let mut con = client
        .get_connection_with_timeout(Duration::from_secs(5))
        .expect("redis connection with the password in the URL");
    con.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set_read_timeout");
    let v: String = q(&mut con, "GET", &[b"a"]);
    assert_eq!(v, "1");
    let _: () = q(&mut con, "SET", &[b"b", b"2"]);

    // A wrong password in the URL fails to connect.
    let url = format!("redis://:nope@127.0.0.1:{}/", server.port);
    let client = redis::Client::open(url.as_str()).expect("redis URL with a password");
    match client.get_connection_with_timeout(Duration::from_secs(5)) {
        Ok(_) => panic!("a connection with a wrong password succeeded"),
        Err(e) => assert!(
            e.kind() == redis::ErrorKind::AuthenticationFailed
                || err_text(&e).starts_with("WRONGPASS"),
            "wrong password error: {e}"
        ),
    }

    // And without a password the crate gets NOAUTH.
    let mut anon = server.conn();
    assert_eq!(
        query_err(&mut anon, &cmd("GET", &[b"a"])),
        "NOAUTH Authentication required."
    );
}

#[test]
fn auth_without_requirepass_is_an_error() {
    let server = Server::start(&[]);
    let mut raw = Raw::connect(&server);
    let r = raw.call(&resp(&[b"AUTH", b"x"]));
    assert!(
        r.starts_with("-ERR AUTH <password> called without any password configured"),
        "AUTH with no password configured: {r:?}"
    );
    assert_eq!(raw.call(&resp(&[b"PING"])), "+PONG\r\n");
}

// ---------------------------------------------------------------------------------------
// 7. --max-clients

#[test]
fn max_clients_refuses_extra_connections() {
    let server = Server::start(&["--max-clients", "3"]);

    // The first connection, retried while the harness's readiness probe may still count.
    let mut first = None;
    wait_until(SOON, "a first connection to be accepted", || {
        let mut raw = Raw::connect(&server);
        raw.send(b"PING\r\n");
        let mut out = Vec::new();
        let ok = read_value(&mut raw.reader, &mut out).is_ok() && out == b"+PONG\r\n";
        if ok {
            first = Some(raw);
        }
        ok
    });
    let mut first = first.expect("first connection");
    wait_until(SOON, "connected_clients:1 in INFO", || {
        first.send(&resp(&[b"INFO", b"clients"]));
        let text = String::from_utf8_lossy(&first.reply()).into_owned();
        info_field(&text, "connected_clients").as_deref() == Some("1")
    });
    let mut others: Vec<Raw> = (0..2)
        .map(|i| {
            let mut raw = Raw::connect(&server);
            assert_eq!(raw.call(b"PING\r\n"), "+PONG\r\n", "connection {}", i + 2);
            raw
        })
        .collect();

    // The fourth is told why, then closed.
    let mut fourth = Raw::connect(&server);
    assert_eq!(
        show(&fourth.reply()),
        show(b"-ERR max number of clients reached\r\n"),
        "the 4th connection"
    );
    fourth.assert_closed("the refused 4th connection");

    // The three keep working.
    assert_eq!(first.call(b"PING\r\n"), "+PONG\r\n");
    for raw in &mut others {
        assert_eq!(raw.call(b"PING\r\n"), "+PONG\r\n");
    }
    first.send(&resp(&[b"INFO", b"stats"]));
    let text = String::from_utf8_lossy(&first.reply()).into_owned();
    let rejected: u64 = info_field(&text, "rejected_connections")
        .and_then(|v| v.parse().ok())
        .expect("rejected_connections in INFO stats");
    assert!(rejected >= 1, "rejected_connections:{rejected}");

    // Close one; a new connection is accepted once the server has noticed.
    drop(others.pop());
    wait_until(SOON, "a new connection after one closed", || {
        fresh_ping_works(&server)
    });
    assert_eq!(first.call(b"PING\r\n"), "+PONG\r\n");
}

// ---------------------------------------------------------------------------------------
// 8. Concurrency

#[test]
fn concurrent_incr_from_20_connections() {
    let server = Server::start(&[]);
    let port = server.port;
    thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|t| {
                s.spawn(move || {
                    let mut con = redis_conn(port);
                    for i in 0..500 {
                        let r: RedisResult<i64> = redis::cmd("INCR").arg("counter").query(&mut con);
                        if let Err(e) = r {
                            panic!("thread {t}, INCR {i}: {e}");
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("an INCR thread panicked");
        }
    });
    let mut con = server.conn();
    let v: i64 = q(&mut con, "GET", &[b"counter"]);
    assert_eq!(v, 10_000, "20 threads x 500 INCR");
}

#[test]
fn concurrent_writers_of_distinct_keys() {
    let server = Server::start(&[]);
    let port = server.port;
    thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|t| {
                s.spawn(move || {
                    let mut con = redis_conn(port);
                    for i in 0..200 {
                        let r: RedisResult<()> = redis::cmd("SET")
                            .arg(format!("t{t}:k{i}"))
                            .arg(format!("{t}-{i}"))
                            .query(&mut con);
                        if let Err(e) = r {
                            panic!("thread {t}, SET {i}: {e}");
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("a writer thread panicked");
        }
    });
    let mut con = server.conn();
    let n: i64 = q(&mut con, "DBSIZE", &[]);
    assert_eq!(n, 4000, "20 threads x 200 keys");
    for t in 0..20 {
        let mut mget = redis::cmd("MGET");
        for i in 0..200 {
            mget.arg(format!("t{t}:k{i}"));
        }
        let vals: Vec<Option<String>> = mget.query(&mut con).expect("MGET");
        for (i, v) in vals.iter().enumerate() {
            assert_eq!(v.as_deref(), Some(format!("{t}-{i}").as_str()), "t{t}:k{i}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// 9. HELLO, RESP3, CLIENT

#[test]
fn hello_2_reply_fields() {
    let server = Server::start(&[]);
    let mut con = server.conn();
    let map: HashMap<String, Value> = q(&mut con, "HELLO", &[b"2"]);
    for field in [
        "server", "version", "proto", "id", "mode", "role", "modules",
    ] {
        assert!(map.contains_key(field), "HELLO 2 has no {field}: {map:?}");
    }
    assert_eq!(map["proto"], Value::Int(2), "proto");
    assert_eq!(
        map["server"],
        Value::BulkString(b"redis".to_vec()),
        "server"
    );
    assert_eq!(map["role"], Value::BulkString(b"master".to_vec()), "role");
    assert_eq!(
        map["mode"],
        Value::BulkString(b"standalone".to_vec()),
        "mode"
    );
    let Value::BulkString(version) = &map["version"] else {
        panic!("version is not a bulk string: {:?}", map["version"]);
    };
    let version = String::from_utf8_lossy(version);
    assert!(
        version.split('.').count() == 3 && version.split('.').all(|p| p.parse::<u32>().is_ok()),
        "version {version:?} is not x.y.z"
    );
    let Value::Int(id) = map["id"] else {
        panic!("id is not an integer: {:?}", map["id"]);
    };
    let client_id: i64 = q(&mut con, "CLIENT", &[b"ID"]);
    assert_eq!(id, client_id, "HELLO's id is CLIENT ID");

    // HELLO with no version answers without switching.
    let map: HashMap<String, Value> = q(&mut con, "HELLO", &[]);
    assert_eq!(map["proto"], Value::Int(2));
    // SETNAME through HELLO.
    let _: HashMap<String, Value> = q(&mut con, "HELLO", &[b"2", b"SETNAME", b"via-hello"]);
    let name: String = q(&mut con, "CLIENT", &[b"GETNAME"]);
    assert_eq!(name, "via-hello");
}

#[test]
fn hello_3_switches_the_connection_to_resp3() {
    let server = Server::start(&[]);
    let mut raw = Raw::connect(&server);

    assert_eq!(
        raw.call(&resp(&[b"GET", b"missing"])),
        "$-1\r\n",
        "RESP2 nil"
    );
    let hello = raw.call(&resp(&[b"HELLO", b"3"]));
    assert!(
        hello.starts_with("%7\r\n"),
        "HELLO 3 reply is a map: {hello:?}"
    );
    assert!(
        hello.contains("$5\r\nproto\r\n:3\r\n"),
        "HELLO 3 says proto 3: {hello:?}"
    );
    assert_eq!(
        raw.call(&resp(&[b"GET", b"missing"])),
        "_\r\n",
        "RESP3 null"
    );
    assert_eq!(
        raw.call(&resp(&[b"MGET", b"missing", b"missing2"])),
        "*2\r\n_\r\n_\r\n"
    );
    assert_eq!(raw.call(&resp(&[b"CLIENT", b"GETNAME"])), "_\r\n");
    assert_eq!(raw.call(b"SET k v\r\n"), "+OK\r\n");
    assert_eq!(raw.call(b"GET k\r\n"), "$1\r\nv\r\n");
    assert_eq!(raw.call(b"SET k w NX\r\n"), "_\r\n", "SET NX refused: null");
    let cfg = raw.call(&resp(&[b"CONFIG", b"GET", b"appendonly"]));
    assert_eq!(
        cfg, "%1\r\n$10\r\nappendonly\r\n$3\r\nyes\r\n",
        "CONFIG GET is a map in RESP3"
    );
    let info = raw.call(&resp(&[b"INFO", b"server"]));
    assert!(
        info.starts_with("=") && info.contains("txt:"),
        "INFO is a verbatim string in RESP3: {:?}",
        &info[..info.len().min(40)]
    );

    // Other connections stay on RESP2.
    let mut other = Raw::connect(&server);
    assert_eq!(other.call(&resp(&[b"GET", b"missing"])), "$-1\r\n");

    // Back to RESP2.
    let hello = raw.call(&resp(&[b"HELLO", b"2"]));
    assert!(
        hello.starts_with("*14\r\n"),
        "HELLO 2 reply is a flat array: {hello:?}"
    );
    assert_eq!(raw.call(&resp(&[b"GET", b"missing"])), "$-1\r\n");

    // Unsupported versions leave the protocol as it was.
    assert_eq!(
        raw.call(&resp(&[b"HELLO", b"4"])),
        "-NOPROTO unsupported protocol version\r\n"
    );
    assert_eq!(
        raw.call(&resp(&[b"HELLO", b"1"])),
        "-NOPROTO unsupported protocol version\r\n"
    );
    assert_eq!(raw.call(&resp(&[b"GET", b"missing"])), "$-1\r\n");
}

#[test]
fn client_setname_getname_id_setinfo() {
    let server = Server::start(&[]);
    let mut con = server.conn();
    let mut other = server.conn();

    let v: Value = q(&mut con, "CLIENT", &[b"GETNAME"]);
    assert_eq!(v, Value::Nil, "no name yet");
    let r: Value = q(&mut con, "CLIENT", &[b"SETNAME", b"worker-1"]);
    assert_eq!(r, Value::Okay, "CLIENT SETNAME");
    let name: String = q(&mut con, "CLIENT", &[b"GETNAME"]);
    assert_eq!(name, "worker-1");
    let v: Value = q(&mut other, "CLIENT", &[b"GETNAME"]);
    assert_eq!(v, Value::Nil, "names are per connection");
    assert_eq!(
        query_err(&mut con, &cmd("CLIENT", &[b"SETNAME", b"has space"])),
        "ERR Client names cannot contain spaces, newlines or special characters."
    );

    let id1: i64 = q(&mut con, "CLIENT", &[b"ID"]);
    let id2: i64 = q(&mut other, "CLIENT", &[b"ID"]);
    assert!(id1 > 0 && id2 > 0, "ids {id1} {id2}");
    assert_ne!(id1, id2, "each connection has its own id");
    let again: i64 = q(&mut con, "CLIENT", &[b"ID"]);
    assert_eq!(again, id1, "CLIENT ID is stable");

    let r: Value = q(&mut con, "CLIENT", &[b"SETINFO", b"LIB-NAME", b"x"]);
    assert_eq!(r, Value::Okay, "CLIENT SETINFO LIB-NAME");
    let r: Value = q(&mut con, "CLIENT", &[b"SETINFO", b"LIB-VER", b"1.2.3"]);
    assert_eq!(r, Value::Okay, "CLIENT SETINFO LIB-VER");
    let list: String = q(&mut con, "CLIENT", &[b"LIST"]);
    let mine = list
        .lines()
        .find(|l| l.starts_with(&format!("id={id1} ")))
        .unwrap_or_else(|| panic!("no id={id1} in CLIENT LIST:\n{list}"));
    assert!(mine.contains(" name=worker-1 "), "CLIENT LIST line: {mine}");
    assert!(mine.contains(" lib-name=x "), "CLIENT LIST line: {mine}");
    assert!(mine.contains(" lib-ver=1.2.3"), "CLIENT LIST line: {mine}");
}

// ---------------------------------------------------------------------------------------
// 10. COMMAND, CONFIG GET, INFO

#[test]
fn command_count_list_docs() {
    let server = Server::start(&[]);
    let mut con = server.conn();
    let count: i64 = q(&mut con, "COMMAND", &[b"COUNT"]);
    let list: Vec<String> = q(&mut con, "COMMAND", &[b"LIST"]);
    assert_eq!(count as usize, list.len(), "COMMAND COUNT vs COMMAND LIST");
    for name in ["get", "set", "del", "ping", "hello", "command", "info"] {
        assert!(list.iter().any(|c| c == name), "{name} not in COMMAND LIST");
    }
    let all: Vec<Value> = q(&mut con, "COMMAND", &[]);
    assert_eq!(all.len(), list.len(), "COMMAND lists every command");

    // COMMAND DOCS: a map (a flat name/doc array in RESP2).
    let docs: Value = q(&mut con, "COMMAND", &[b"DOCS"]);
    let Value::Array(items) = &docs else {
        panic!("COMMAND DOCS in RESP2 is not an array: {docs:?}");
    };
    assert_eq!(
        items.len(),
        2 * list.len(),
        "COMMAND DOCS has one entry per command"
    );
    let names: Vec<Vec<u8>> = items
        .chunks(2)
        .map(|pair| match &pair[0] {
            Value::BulkString(b) => b.clone(),
            other => panic!("COMMAND DOCS key is not a bulk string: {other:?}"),
        })
        .collect();
    assert!(names.iter().any(|n| n == b"get"), "COMMAND DOCS has no get");
    let docs: HashMap<String, HashMap<String, Value>> = q(&mut con, "COMMAND", &[b"DOCS", b"get"]);
    let get = docs.get("get").expect("COMMAND DOCS get has get");
    assert!(get.contains_key("summary"), "get docs: {get:?}");

    // COMMAND INFO get: name, arity -> Redis's shape.
    let info: Vec<Value> = q(&mut con, "COMMAND", &[b"INFO", b"get", b"nosuch"]);
    assert_eq!(info.len(), 2);
    let Value::Array(get) = &info[0] else {
        panic!("COMMAND INFO get: {:?}", info[0]);
    };
    assert_eq!(get[0], Value::BulkString(b"get".to_vec()));
    assert_eq!(get[1], Value::Int(2), "arity of get");
    assert_eq!(info[1], Value::Nil, "COMMAND INFO of an unknown command");
}

#[test]
fn config_get_shapes() {
    let server = Server::start(&["--max-clients", "77"]);
    let mut con = server.conn();
    let pair = |con: &mut redis::Connection, name: &str| -> Vec<String> {
        q(con, "CONFIG", &[b"GET", name.as_bytes()])
    };
    assert_eq!(pair(&mut con, "save"), vec!["save", ""]);
    assert_eq!(pair(&mut con, "appendonly"), vec!["appendonly", "yes"]);
    assert_eq!(pair(&mut con, "maxclients"), vec!["maxclients", "77"]);
    assert_eq!(pair(&mut con, "databases"), vec!["databases", "16"]);
    assert_eq!(pair(&mut con, "nosuchparam"), Vec::<String>::new());
    assert_eq!(pair(&mut con, "appendfsync"), vec!["appendfsync", "always"]);

    // Several parameters and globs; flat name/value pairs.
    let v: Vec<String> = q(&mut con, "CONFIG", &[b"GET", b"save", b"appendonly"]);
    let m: HashMap<String, String> = v.chunks(2).map(|p| (p[0].clone(), p[1].clone())).collect();
    assert_eq!(m.len(), 2, "CONFIG GET save appendonly: {v:?}");
    assert_eq!(m["save"], "");
    assert_eq!(m["appendonly"], "yes");
    let m: HashMap<String, String> = q(&mut con, "CONFIG", &[b"GET", b"max*"]);
    assert_eq!(m.get("maxclients").map(String::as_str), Some("77"), "{m:?}");
    assert!(
        m.keys().all(|k| k.starts_with("max")),
        "CONFIG GET max*: {m:?}"
    );
    let m: HashMap<String, String> = q(&mut con, "CONFIG", &[b"GET", b"*"]);
    assert_eq!(
        m.get("port").map(String::as_str),
        Some(server.port.to_string().as_str())
    );
    assert_eq!(
        m.get("client-query-buffer-limit").map(String::as_str),
        Some("1073741824"),
        "{m:?}"
    );
}

#[test]
fn info_sections_and_fields() {
    let server = Server::start(&[]);
    let mut con = server.conn();
    let _: () = q(&mut con, "MSET", &[b"a", b"1", b"b", b"2", b"c", b"3"]);

    let all = info(&mut con, "all");
    let plain: String = q(&mut con, "INFO", &[]);
    for text in [&all, &plain] {
        assert!(text.contains("role:master"), "INFO has role:master");
        assert!(
            text.contains("connected_clients:"),
            "INFO has connected_clients"
        );
        assert!(text.contains("aof_enabled:1"), "INFO has aof_enabled:1");
        assert!(text.contains("# Keyspace"), "INFO has # Keyspace");
        assert!(text.contains("# Server"), "INFO has # Server");
        assert!(text.contains("# Persistence"), "INFO has # Persistence");
        assert!(text.contains("# Replication"), "INFO has # Replication");
        assert!(text.contains("# Stats"), "INFO has # Stats");
        assert!(text.contains("# Clients"), "INFO has # Clients");
    }
    let db0 = info_field(&all, "db0").expect("db0 line in INFO keyspace");
    assert!(db0.starts_with("keys=3,"), "db0:{db0}");
    assert_eq!(
        info_field(&all, "tcp_port"),
        Some(server.port.to_string()),
        "tcp_port"
    );
    assert_eq!(info_field(&all, "connected_slaves").as_deref(), Some("0"));
    // Lines are CRLF-terminated, as Redis's.
    assert!(all.contains("role:master\r\n"), "INFO lines end in CRLF");

    let persistence = info(&mut con, "persistence");
    assert!(persistence.starts_with("# Persistence"), "{persistence}");
    let headers: Vec<&str> = persistence.lines().filter(|l| l.starts_with('#')).collect();
    assert_eq!(
        headers,
        vec!["# Persistence"],
        "INFO persistence has only that section"
    );
    assert!(persistence.contains("aof_enabled:1"));
    assert!(!persistence.contains("role:"), "no replication fields");

    // Section names are case-insensitive; several sections at once.
    let two = info(&mut con, "CLIENTS");
    assert!(two.starts_with("# Clients"), "INFO CLIENTS: {two}");
    let multi: String = q(&mut con, "INFO", &[b"server", b"keyspace"]);
    let headers: Vec<&str> = multi.lines().filter(|l| l.starts_with('#')).collect();
    assert_eq!(headers, vec!["# Server", "# Keyspace"]);
}

// ---------------------------------------------------------------------------------------
// 11. Graceful shutdown

/// Starts a server with `args`, writes, leaves a client mid-session (an idle redis
/// connection and a raw one halfway through a request), sends `sig`, expects exit status
/// 0, restarts on the same data and checks every acknowledged write.
fn graceful_stop_keeps_acknowledged_writes(args: &[&str], sig: libc::c_int) {
    let dir = DataDir::new();
    let mut server = Server::start_in(&dir, args);
    let mut con = server.conn();
    for i in 0..200 {
        let _: () = q(&mut con, "SET", &[format!("k{i}").as_bytes(), b"v"]);
    }
    let n: i64 = q(&mut con, "INCRBY", &[b"counter", b"7"]);
    assert_eq!(n, 7);

    let mut partial = Raw::connect(&server);
    partial.send(b"*3\r\n$3\r\nSET\r\n$7\r\npartial");

    let status = if sig == libc::SIGTERM {
        server.terminate()
    } else {
        server.signal(sig);
        wait_exit(&mut server)
    };
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after signal {sig} with {args:?}: {status}"
    );
    partial.assert_closed("a half-sent request at shutdown");
    let r: RedisResult<Value> = redis::cmd("PING").query(&mut con);
    assert!(r.is_err(), "the server is gone, yet PING answered {r:?}");

    let server = Server::start_in(&dir, args);
    let mut con = server.conn();
    let n: i64 = q(&mut con, "DBSIZE", &[]);
    assert_eq!(n, 201, "200 keys and the counter after restart");
    let v: String = q(&mut con, "GET", &[b"counter"]);
    assert_eq!(v, "7");
    let n: i64 = q(&mut con, "EXISTS", &[b"partial"]);
    assert_eq!(n, 0, "the half-sent SET was not applied");
}

#[test]
fn sigterm_exits_cleanly_and_keeps_acknowledged_writes() {
    graceful_stop_keeps_acknowledged_writes(&[], libc::SIGTERM);
}

#[test]
fn sigint_exits_cleanly_and_keeps_acknowledged_writes() {
    graceful_stop_keeps_acknowledged_writes(&[], libc::SIGINT);
}

#[test]
fn sigterm_exits_cleanly_with_fsync_no() {
    graceful_stop_keeps_acknowledged_writes(&["--fsync", "no"], libc::SIGTERM);
}

// Regression: the fsync-everysec thread once started before SIGTERM/SIGINT were blocked,
// so the signal could land on it and kill the process (status: signal 15).
#[test]
fn sigterm_and_sigint_exit_cleanly_with_fsync_everysec() {
    // The kernel hands a process-wide signal to any thread not blocking it: repeat so a
    // thread that forgot to block it is likely to be picked.
    for round in 0..3 {
        eprintln!("round {round}");
        graceful_stop_keeps_acknowledged_writes(&["--fsync", "everysec"], libc::SIGTERM);
        graceful_stop_keeps_acknowledged_writes(&["--fsync", "everysec"], libc::SIGINT);
    }
}

// ---------------------------------------------------------------------------------------
// 12. Durability across kill -9, in every fsync mode

/// Writes a known set of data (single commands and a pipeline), kills -9, restarts, writes
/// more, kills -9 again, restarts and checks everything acknowledged is there.
fn durability_across_kill9(fsync: &str) {
    let dir = DataDir::new();
    let args = ["--fsync", fsync];
    let mut server = Server::start_in(&dir, &args);
    let mut con = server.conn();
    for i in 0..300 {
        let _: () = q(
            &mut con,
            "SET",
            &[format!("k{i}").as_bytes(), format!("v{i}").as_bytes()],
        );
    }
    for _ in 0..50 {
        let _: i64 = q(&mut con, "INCR", &[b"counter"]);
    }
    let n: i64 = q(&mut con, "DEL", &[b"k0", b"k1", b"k2"]);
    assert_eq!(n, 3);
    let mut pipe = redis::pipe();
    for i in 0..500 {
        pipe.cmd("SET").arg(format!("p{i}")).arg(i).ignore();
    }
    let () = pipe.query(&mut con).expect("pipeline of 500 SETs");
    let _: () = q(&mut con, "SET", &[b"ttl", b"x", b"EX", b"100000"]);
    drop(con);

    server.kill9();
    let mut server = Server::start_in(&dir, &args);
    let mut con = server.conn();
    let check = |con: &mut redis::Connection, round: &str| {
        let n: i64 = q(con, "DBSIZE", &[]);
        assert_eq!(n, 297 + 1 + 500 + 1 + 100, "DBSIZE {round}");
        for i in 3..300 {
            let v: Option<String> = q(con, "GET", &[format!("k{i}").as_bytes()]);
            assert_eq!(v, Some(format!("v{i}")), "k{i} {round}");
        }
        let n: i64 = q(con, "EXISTS", &[b"k0", b"k1", b"k2"]);
        assert_eq!(n, 0, "deleted keys stay deleted {round}");
        let v: i64 = q(con, "GET", &[b"counter"]);
        assert_eq!(v, 50, "counter {round}");
        for i in 0..500 {
            let v: Option<i64> = q(con, "GET", &[format!("p{i}").as_bytes()]);
            assert_eq!(v, Some(i), "p{i} {round}");
        }
        assert_eq!(keyspace(con).1, 1, "the TTL survives {round}");
    };
    // Round two: the restarted server appends to the recovered log.
    for i in 0..100 {
        let _: () = q(&mut con, "SET", &[format!("after{i}").as_bytes(), b"x"]);
    }
    check(&mut con, "after the first kill -9");
    drop(con);

    server.kill9();
    let server = Server::start_in(&dir, &args);
    let mut con = server.conn();
    check(&mut con, "after the second kill -9");
    for i in 0..100 {
        let v: Option<String> = q(&mut con, "GET", &[format!("after{i}").as_bytes()]);
        assert_eq!(v.as_deref(), Some("x"), "after{i}");
    }
}

#[test]
fn durability_fsync_always_survives_kill9() {
    durability_across_kill9("always");
}

#[test]
fn durability_fsync_everysec_survives_kill9() {
    durability_across_kill9("everysec");
}

#[test]
fn durability_fsync_no_survives_kill9() {
    durability_across_kill9("no");
}

// ---------------------------------------------------------------------------------------
// 13. redis-cli

/// Runs redis-cli against the server with `stdin`, returns stdout; panics on failure.
#[track_caller]
fn redis_cli(server: &Server, args: &[&str], stdin: Option<&[u8]>) -> String {
    let port = server.port.to_string();
    let mut child = common::redis_cli()
        .args(["-h", "127.0.0.1", "-p", &port])
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run redis-cli");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("redis-cli stdin");
        pipe.write_all(input).expect("write to redis-cli");
    }
    let (tx, rx) = mpsc::channel();
    let waiter = thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(r) => r.expect("redis-cli output"),
        Err(_) => panic!("redis-cli {args:?} did not finish within 60 s"),
    };
    waiter.join().expect("redis-cli waiter");
    assert!(
        out.status.success(),
        "redis-cli {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn redis_cli_talks_to_kvstore() {
    // Fails (naming the tool) rather than passing when redis-cli is missing.
    common::redis_cli();
    let server = Server::start(&[]);
    assert_eq!(redis_cli(&server, &["SET", "a", "b"], None), "OK\n");
    assert_eq!(redis_cli(&server, &["GET", "a"], None), "b\n");
    assert_eq!(redis_cli(&server, &["GET", "missing"], None), "\n");
    assert_eq!(redis_cli(&server, &["INCR", "n"], None), "1\n");
    assert_eq!(
        redis_cli(&server, &["MGET", "a", "missing", "n"], None),
        "b\n\n1\n"
    );

    // Commands on stdin, one a line (redis-cli sends COMMAND DOCS first on its own).
    let out = redis_cli(&server, &[], Some(b"SET x 1\nGET x\n"));
    assert_eq!(out, "OK\n1\n", "redis-cli reading commands from stdin");

    // Mass insertion with --pipe.
    let mut input = Vec::new();
    for i in 0..1000 {
        input.extend_from_slice(format!("SET pipe:{i} value-{i}\r\n").as_bytes());
    }
    let out = redis_cli(&server, &["--pipe"], Some(&input));
    assert!(
        out.contains("errors: 0, replies: 1000"),
        "redis-cli --pipe summary: {out}"
    );
    let mut con = server.conn();
    let v: String = q(&mut con, "GET", &[b"pipe:999"]);
    assert_eq!(v, "value-999");
    let n: i64 = q(&mut con, "DBSIZE", &[]);
    assert_eq!(n, 3 + 1000, "a, n, x and the piped keys");

    // redis-cli --pipe also with RESP input.
    let mut input = Vec::new();
    for i in 0..100 {
        input.extend_from_slice(&resp(&[b"DEL", format!("pipe:{i}").as_bytes()]));
    }
    let out = redis_cli(&server, &["--pipe"], Some(&input));
    assert!(out.contains("errors: 0, replies: 100"), "{out}");
    let n: i64 = q(&mut con, "DBSIZE", &[]);
    assert_eq!(n, 3 + 900);
}
