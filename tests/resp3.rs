//! RESP3 with real clients: the `redis` crate in RESP3 mode (`?protocol=resp3`,
//! which opens with `HELLO 3`) and, for contrast, explicitly in RESP2; and
//! `redis-cli -3` one-shot commands.
//!
//! The reply shapes asserted here are the ones Redis 7 gives. When `redis-server`
//! is on PATH, the `redis-cli` test also runs every command against a real Redis
//! started on another free port and asserts that kvstore prints the same.

mod common;

use common::{CONNECT_TIMEOUT, IO_TIMEOUT, START_DEADLINE, Server, free_port, wait_until};
use redis::{
    ConnectionAddr, ErrorKind, InfoDict, IntoConnectionInfo, ProtocolVersion, RedisConnectionInfo,
    Value, VerbatimFormat,
};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

// ---------------------------------------------------------------------------------------
// Helpers

/// A `redis` crate connection with the given `protocol=` URL parameter (and an
/// optional password), with the harness's timeouts.
#[track_caller]
fn connect_url(url: &str) -> redis::RedisResult<redis::Connection> {
    let client = redis::Client::open(url)?;
    let con = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    con.set_read_timeout(Some(IO_TIMEOUT))?;
    con.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(con)
}

#[track_caller]
fn connect(server: &Server, protocol: &str) -> redis::Connection {
    let url = format!("redis://127.0.0.1:{}/?protocol={protocol}", server.port);
    connect_url(&url).unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

/// Runs a command and returns its raw reply, with the command in the panic message.
#[track_caller]
fn raw_query(con: &mut redis::Connection, args: &[&str]) -> Value {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    match cmd.query::<Value>(con) {
        Ok(Value::ServerError(e)) => panic!("{args:?}: error reply {e:?}"),
        Ok(v) => v,
        Err(e) => panic!("{args:?}: {e}"),
    }
}

fn bulk(s: &str) -> Value {
    Value::BulkString(s.as_bytes().to_vec())
}

/// A map reply (RESP3 `%`) as pairs of strings, or panics.
#[track_caller]
fn map_entries(v: &Value) -> Vec<(String, Value)> {
    match v {
        Value::Map(pairs) => pairs
            .iter()
            .map(|(k, v)| match k {
                Value::BulkString(b) => (String::from_utf8_lossy(b).into_owned(), v.clone()),
                other => panic!("map key is not a bulk string: {other:?}"),
            })
            .collect(),
        other => panic!("expected a RESP3 map, got {other:?}"),
    }
}

/// A flat RESP2 array of name, value, name, value, … as pairs.
#[track_caller]
fn array_pairs(v: &Value) -> Vec<(String, Value)> {
    match v {
        Value::Array(items) => {
            assert!(items.len() % 2 == 0, "odd number of elements: {v:?}");
            items
                .chunks(2)
                .map(|kv| match &kv[0] {
                    Value::BulkString(b) => {
                        (String::from_utf8_lossy(b).into_owned(), kv[1].clone())
                    }
                    other => panic!("name is not a bulk string: {other:?}"),
                })
                .collect()
        }
        other => panic!("expected a RESP2 array, got {other:?}"),
    }
}

/// Checks a HELLO reply (as name/value pairs) for the given protocol and client id.
#[track_caller]
fn check_hello(pairs: &[(String, Value)], proto: i64, client_id: i64) {
    let names: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "server", "version", "proto", "id", "mode", "role", "modules"
        ],
        "HELLO fields (Redis's order)"
    );
    let fields: HashMap<&str, &Value> = pairs.iter().map(|(k, v)| (k.as_str(), v)).collect();
    assert_eq!(fields["server"], &bulk("redis"));
    assert!(
        matches!(fields["version"], Value::BulkString(v) if !v.is_empty()),
        "version: {:?}",
        fields["version"]
    );
    assert_eq!(fields["proto"], &Value::Int(proto));
    assert_eq!(fields["id"], &Value::Int(client_id));
    assert_eq!(fields["mode"], &bulk("standalone"));
    assert_eq!(fields["role"], &bulk("master"));
    assert_eq!(fields["modules"], &Value::Array(vec![]));
}

/// The commands both protocols must answer alike once converted by the crate,
/// under keys starting with `prefix`.
fn common_commands(con: &mut redis::Connection, prefix: &str) {
    let k = format!("{prefix}:k");
    let n = format!("{prefix}:n");
    let missing = format!("{prefix}:missing");

    let () = redis::cmd("SET").arg(&k).arg("v").query(con).unwrap();
    let got: String = redis::cmd("GET").arg(&k).query(con).unwrap();
    assert_eq!(got, "v");
    let got: Option<String> = redis::cmd("GET").arg(&missing).query(con).unwrap();
    assert_eq!(got, None);
    let got: Vec<Option<String>> = redis::cmd("MGET")
        .arg(&k)
        .arg(&missing)
        .arg(&k)
        .query(con)
        .unwrap();
    assert_eq!(got, [Some("v".to_string()), None, Some("v".to_string())]);
    let got: i64 = redis::cmd("INCR").arg(&n).query(con).unwrap();
    assert_eq!(got, 1);
    let got: i64 = redis::cmd("INCR").arg(&n).query(con).unwrap();
    assert_eq!(got, 2);

    let info: InfoDict = redis::cmd("INFO").query(con).unwrap();
    assert_eq!(info.get::<String>("role").as_deref(), Some("master"));
    assert!(info.get::<i64>("connected_clients").unwrap_or(0) >= 1);
    let server: InfoDict = redis::cmd("INFO").arg("server").query(con).unwrap();
    assert!(server.get::<String>("redis_version").is_some());

    let config: HashMap<String, String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxclients")
        .query(con)
        .unwrap();
    assert_eq!(config.len(), 1, "{config:?}");
    assert!(config["maxclients"].parse::<u64>().unwrap() > 0);
    let config: HashMap<String, String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("no-such-setting-xyz")
        .query(con)
        .unwrap();
    assert!(config.is_empty(), "{config:?}");

    // Errors keep their Redis wording in both protocols.
    let err = redis::cmd("GET").query::<Value>(con).unwrap_err();
    assert_eq!(err.code(), Some("ERR"), "{err:?}");
    assert_eq!(
        err.detail(),
        Some("wrong number of arguments for 'get' command"),
        "{err:?}"
    );
    let () = redis::cmd("SET").arg(&n).arg("x").query(con).unwrap();
    let err = redis::cmd("INCR").arg(&n).query::<i64>(con).unwrap_err();
    assert_eq!(
        err.detail(),
        Some("value is not an integer or out of range")
    );
}

// ---------------------------------------------------------------------------------------
// The redis crate, RESP3

#[test]
fn redis_crate_resp3_url() {
    let server = Server::start(&["--fsync", "no"]);
    let mut con = connect(&server, "resp3");
    common_commands(&mut con, "resp3");

    // The exact RESP3 shapes (as Redis 7 sends them).
    let id = match raw_query(&mut con, &["CLIENT", "ID"]) {
        Value::Int(id) => id,
        other => panic!("CLIENT ID: {other:?}"),
    };
    let hello = raw_query(&mut con, &["HELLO"]);
    check_hello(&map_entries(&hello), 3, id);
    let hello = raw_query(&mut con, &["HELLO", "3"]);
    check_hello(&map_entries(&hello), 3, id);

    assert_eq!(raw_query(&mut con, &["SET", "r3:a", "1"]), Value::Okay);
    assert_eq!(raw_query(&mut con, &["GET", "r3:a"]), bulk("1"));
    assert_eq!(raw_query(&mut con, &["GET", "r3:nope"]), Value::Nil);
    assert_eq!(
        raw_query(&mut con, &["MGET", "r3:a", "r3:nope"]),
        Value::Array(vec![bulk("1"), Value::Nil])
    );
    assert_eq!(raw_query(&mut con, &["INCR", "r3:a"]), Value::Int(2));
    assert_eq!(
        raw_query(&mut con, &["PING"]),
        Value::SimpleString("PONG".into())
    );
    assert_eq!(
        raw_query(&mut con, &["TYPE", "r3:a"]),
        Value::SimpleString("string".into())
    );
    assert_eq!(
        raw_query(&mut con, &["CONFIG", "GET", "maxclients"]),
        Value::Map(vec![(bulk("maxclients"), bulk("10000"))])
    );
    assert_eq!(
        raw_query(&mut con, &["CONFIG", "GET", "no-such-setting-xyz"]),
        Value::Map(vec![])
    );
    match raw_query(&mut con, &["INFO", "server"]) {
        Value::VerbatimString {
            format: VerbatimFormat::Text,
            text,
        } => {
            assert!(text.starts_with("# Server\r\n"), "{text:?}");
            assert!(text.contains("\r\nredis_version:"), "{text:?}");
        }
        other => panic!("INFO in RESP3 is a verbatim string (=…txt:), got {other:?}"),
    }
    match raw_query(&mut con, &["CLIENT", "INFO"]) {
        Value::VerbatimString { text, .. } => {
            assert!(text.contains(" resp=3"), "{text:?}");
        }
        other => panic!("CLIENT INFO in RESP3 is a verbatim string, got {other:?}"),
    }

    // HELLO 2 on the same connection switches back: an array and RESP2 nulls.
    let hello = raw_query(&mut con, &["HELLO", "2"]);
    check_hello(&array_pairs(&hello), 2, id);
    assert_eq!(raw_query(&mut con, &["GET", "r3:nope"]), Value::Nil);
}

#[test]
fn redis_crate_resp3_connection_info() {
    let server = Server::start(&["--fsync", "no"]);
    let info = ConnectionAddr::Tcp("127.0.0.1".into(), server.port)
        .into_connection_info()
        .unwrap()
        .set_redis_settings(RedisConnectionInfo::default().set_protocol(ProtocolVersion::RESP3));
    let client = redis::Client::open(info).unwrap();
    let mut con = client.get_connection_with_timeout(CONNECT_TIMEOUT).unwrap();
    con.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    common_commands(&mut con, "ci3");
    let id = match raw_query(&mut con, &["CLIENT", "ID"]) {
        Value::Int(id) => id,
        other => panic!("CLIENT ID: {other:?}"),
    };
    check_hello(&map_entries(&raw_query(&mut con, &["HELLO"])), 3, id);
    assert_eq!(raw_query(&mut con, &["GET", "ci3:nope"]), Value::Nil);
}

#[test]
fn redis_crate_resp2_url() {
    let server = Server::start(&["--fsync", "no"]);
    let mut con = connect(&server, "resp2");
    common_commands(&mut con, "resp2");

    let id = match raw_query(&mut con, &["CLIENT", "ID"]) {
        Value::Int(id) => id,
        other => panic!("CLIENT ID: {other:?}"),
    };
    // HELLO with no argument keeps RESP2: a flat array of 14.
    let hello = raw_query(&mut con, &["HELLO"]);
    check_hello(&array_pairs(&hello), 2, id);

    assert_eq!(raw_query(&mut con, &["SET", "r2:a", "1"]), Value::Okay);
    assert_eq!(raw_query(&mut con, &["GET", "r2:a"]), bulk("1"));
    assert_eq!(raw_query(&mut con, &["GET", "r2:nope"]), Value::Nil);
    assert_eq!(
        raw_query(&mut con, &["MGET", "r2:a", "r2:nope"]),
        Value::Array(vec![bulk("1"), Value::Nil])
    );
    assert_eq!(
        raw_query(&mut con, &["CONFIG", "GET", "maxclients"]),
        Value::Array(vec![bulk("maxclients"), bulk("10000")])
    );
    match raw_query(&mut con, &["INFO", "server"]) {
        Value::BulkString(text) => {
            let text = String::from_utf8(text).unwrap();
            assert!(text.starts_with("# Server\r\n"), "{text:?}");
            assert!(text.contains("\r\nredis_version:"), "{text:?}");
        }
        other => panic!("INFO in RESP2 is a bulk string, got {other:?}"),
    }
    match raw_query(&mut con, &["CLIENT", "INFO"]) {
        Value::BulkString(text) => {
            let text = String::from_utf8(text).unwrap();
            assert!(text.contains(" resp=2"), "{text:?}");
        }
        other => panic!("CLIENT INFO in RESP2 is a bulk string, got {other:?}"),
    }
}

#[test]
fn redis_crate_auth_in_both_protocols() {
    let server = Server::start(&["--fsync", "no", "--requirepass", "pw-123"]);
    for protocol in ["resp2", "resp3"] {
        // RESP3 authenticates with HELLO 3 AUTH default pw-123, RESP2 with AUTH pw-123.
        let url = format!(
            "redis://:pw-123@127.0.0.1:{}/?protocol={protocol}",
            server.port
        );
        let mut con = connect_url(&url).unwrap_or_else(|e| panic!("{url}: {e}"));
        common_commands(&mut con, &format!("auth-{protocol}"));

        let url = format!(
            "redis://:wrong@127.0.0.1:{}/?protocol={protocol}",
            server.port
        );
        match connect_url(&url) {
            Ok(_) => panic!("{url}: a wrong password was accepted"),
            Err(e) => assert!(
                e.kind() == ErrorKind::AuthenticationFailed || e.code() == Some("WRONGPASS"),
                "{url}: {e:?}"
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------
// redis-cli -3

/// Runs `redis-cli -3 -h 127.0.0.1 -p PORT ARGS…` (stdout is a pipe, not a tty:
/// raw output) with a deadline; returns its output whatever its exit status.
#[track_caller]
fn redis_cli3(port: u16, args: &[&str]) -> Output {
    let child = common::redis_cli()
        .args(["-3", "-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run redis-cli");
    let (tx, rx) = mpsc::channel();
    let waiter = thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(r) => r.expect("redis-cli output"),
        Err(_) => panic!("redis-cli -3 {args:?} did not finish within 60 s"),
    };
    waiter.join().expect("redis-cli waiter");
    out
}

/// stdout of a successful `redis-cli -3` run.
#[track_caller]
fn cli_stdout(port: u16, args: &[&str]) -> String {
    let out = redis_cli3(port, args);
    assert!(
        out.status.success(),
        "redis-cli -3 {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A real `redis-server` on a free port (no persistence), killed on drop.
struct RealRedis {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl RealRedis {
    /// None when `redis-server` is not installed.
    fn start() -> Option<RealRedis> {
        let available = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !available {
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("kvstore-test-redis-")
            .tempdir()
            .expect("temp dir");
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run redis-server");
        let mut redis = RealRedis {
            port,
            child,
            _dir: dir,
        };
        wait_until(START_DEADLINE, "redis-server to answer PING", || {
            if let Ok(Some(status)) = redis.child.try_wait() {
                panic!("redis-server on port {port} exited: {status}");
            }
            ping(port)
        });
        Some(redis)
    }
}

impl Drop for RealRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ping(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// The `HELLO` output of redis-cli with the server version and the client id
/// (which differ between servers and connections) blanked out.
fn normalize_hello(out: &str, sep: &str) -> String {
    let mut lines: Vec<String> = out.lines().map(str::to_string).collect();
    for i in 0..lines.len() {
        for field in ["version", "id"] {
            if sep == " " {
                if lines[i].starts_with(&format!("{field} ")) {
                    lines[i] = format!("{field} <{field}>");
                }
            } else if lines[i] == field && i + 1 < lines.len() {
                lines[i + 1] = format!("<{field}>");
            }
        }
    }
    lines.join("\n") + "\n"
}

/// One-shot `redis-cli -3` commands against kvstore, with the exact tty-less output
/// of Redis 7, and, when `redis-server` is installed, the same output as a real Redis.
#[test]
fn redis_cli_resp3_one_shot() {
    // Fails (naming the tool) rather than passing when redis-cli is missing.
    common::redis_cli();
    let server = Server::start(&["--fsync", "no"]);
    let real = RealRedis::start();
    if real.is_none() {
        eprintln!("note: redis-server is not on PATH; not comparing with a real Redis");
    }

    // (command, expected stdout) for the deterministic replies.
    let cases: &[(&[&str], &str)] = &[
        (&["SET", "a", "b"], "OK\n"),
        (&["GET", "a"], "b\n"),
        // A RESP3 null (`_`) prints as an empty line when stdout is not a tty.
        (&["GET", "nope"], "\n"),
        (&["MGET", "a", "nope", "a"], "b\n\nb\n"),
        (&["INCR", "n"], "1\n"),
        (&["EXISTS", "a", "nope"], "1\n"),
        (&["TYPE", "a"], "string\n"),
        (&["PING"], "PONG\n"),
        (&["ECHO", "hi there"], "hi there\n"),
        // CONFIG GET is a RESP3 map: one "name value" line per entry.
        (&["CONFIG", "GET", "maxclients"], "maxclients 10000\n"),
        (&["CONFIG", "GET", "no-such-setting-xyz"], "\n"),
        (&["CLIENT", "GETNAME"], "\n"),
        // redis-cli 7.0 follows an error with an empty line when not on a tty.
        (
            &["GET"],
            "ERR wrong number of arguments for 'get' command\n\n",
        ),
        (&["DEL", "a", "nope"], "1\n"),
    ];
    for (args, want) in cases {
        let out = redis_cli3(server.port, args);
        let got = String::from_utf8_lossy(&out.stdout);
        assert_eq!(got, *want, "kvstore: redis-cli -3 {args:?}");
        if let Some(real) = &real {
            let theirs = redis_cli3(real.port, args);
            assert_eq!(
                got,
                String::from_utf8_lossy(&theirs.stdout),
                "redis-cli -3 {args:?}: kvstore and redis-server print differently"
            );
            assert_eq!(
                out.status.code(),
                theirs.status.code(),
                "redis-cli -3 {args:?}: exit status differs from redis-server's"
            );
        }
    }

    // HELLO 3: the map, one "name value" line per field (version and id vary).
    let hello = cli_stdout(server.port, &["HELLO", "3"]);
    let want = "server redis\nversion <version>\nproto 3\nid <id>\nmode standalone\n\
                role master\nmodules \n";
    assert_eq!(normalize_hello(&hello, " "), want, "HELLO 3: {hello:?}");
    // HELLO 2 (redis-cli -3 has already said HELLO 3; this switches back): a flat
    // array, one element a line.
    let hello2 = cli_stdout(server.port, &["HELLO", "2"]);
    let want2 = "server\nredis\nversion\n<version>\nproto\n2\nid\n<id>\nmode\nstandalone\n\
                 role\nmaster\nmodules\n\n";
    assert_eq!(normalize_hello(&hello2, "\n"), want2, "HELLO 2: {hello2:?}");
    if let Some(real) = &real {
        let theirs = cli_stdout(real.port, &["HELLO", "3"]);
        assert_eq!(normalize_hello(&theirs, " "), want, "redis-server HELLO 3");
        let theirs = cli_stdout(real.port, &["HELLO", "2"]);
        assert_eq!(
            normalize_hello(&theirs, "\n"),
            want2,
            "redis-server HELLO 2"
        );
    }

    // INFO server: a verbatim string, printed as its text (CRLF line ends kept).
    let info = cli_stdout(server.port, &["INFO", "server"]);
    assert!(info.starts_with("# Server\r\n"), "{info:?}");
    assert!(
        info.lines().any(|l| l.starts_with("redis_version:")),
        "{info:?}"
    );
    if let Some(real) = &real {
        let theirs = cli_stdout(real.port, &["INFO", "server"]);
        assert!(theirs.starts_with("# Server\r\n"), "{theirs:?}");
    }
}
