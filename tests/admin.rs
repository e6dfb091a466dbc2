//! The commands that act on the server (issue 10, item 13): SHUTDOWN as SIGTERM does,
//! SAVE / BGSAVE / BGREWRITEAOF as a compaction with Redis's replies, LASTSAVE, ROLE,
//! and COMMAND DOCS with `arguments`, checked with a real `redis-cli` (its `help SET`
//! and its SHUTDOWN).

mod common;

use common::{KVSTORE_BIN, Server, wait_until};
use std::io::{Read, Write};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const SOON: Duration = Duration::from_secs(10);

fn q<T: redis::FromRedisValue>(c: &mut redis::Connection, cmd: &str, args: &[&str]) -> T {
    let mut command = redis::cmd(cmd);
    for a in args {
        command.arg(*a);
    }
    command
        .query(c)
        .unwrap_or_else(|e| panic!("{cmd} {args:?}: {e}"))
}

fn info_field(c: &mut redis::Connection, field: &str) -> String {
    let info: String = q(c, "INFO", &["persistence"]);
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in INFO:\n{info}"))
        .trim()
        .to_string()
}

/// Waits until the server process has exited and asserts it exited 0.
#[track_caller]
fn assert_exits_cleanly(server: &mut Server) {
    wait_until(SOON, "the server to exit after SHUTDOWN", || {
        !server.is_running()
    });
    let status = server.try_wait().expect("exit status");
    assert!(status.success(), "exit status {status}\n{}", server.log());
    assert!(
        server.log().contains("log fsync'd; bye"),
        "the shutdown path fsyncs the log:\n{}",
        server.log()
    );
}

/// Sends raw RESP and reads until the server closes the connection.
fn send_and_read_to_eof(server: &Server, bytes: &[u8]) -> Vec<u8> {
    let mut s = server.raw();
    s.write_all(bytes).expect("send");
    let mut got = Vec::new();
    s.read_to_end(&mut got)
        .expect("read until the server closes");
    got
}

/// SHUTDOWN answers what the client sent before it, closes without a reply, and the
/// server exits 0 with everything acknowledged on disk, as after SIGTERM.
#[test]
fn shutdown_drains_closes_and_exits_zero() {
    let mut server = Server::start(&[]);
    let other = server.raw(); // another client, idle: must not keep the server up
    let got = send_and_read_to_eof(
        &server,
        b"*3\r\n$3\r\nSET\r\n$1\r\na\r\n$1\r\n1\r\n*1\r\n$8\r\nSHUTDOWN\r\n*1\r\n$4\r\nPING\r\n",
    );
    // The SET is answered; SHUTDOWN closes without a reply; the PING after it never runs.
    assert_eq!(got, b"+OK\r\n");
    assert_exits_cleanly(&mut server);
    drop(other);
    server.restart();
    let mut c = server.conn();
    assert_eq!(q::<String>(&mut c, "GET", &["a"]), "1");
    // Nothing was compacted: SHUTDOWN without SAVE is SIGTERM.
    assert_eq!(info_field(&mut c, "log_recovered_snapshot_index"), "0");
}

#[test]
fn shutdown_save_compacts_first_and_nosave_does_not() {
    let mut server = Server::start(&[]);
    let mut c = server.conn();
    let _: () = q(&mut c, "SET", &["k", "v"]);
    let _: () = q(&mut c, "INCR", &["n"]);
    let got = send_and_read_to_eof(&server, b"SHUTDOWN SAVE\r\n");
    assert_eq!(got, b"");
    assert_exits_cleanly(&mut server);
    server.restart();
    let mut c = server.conn();
    assert_eq!(q::<String>(&mut c, "GET", &["k"]), "v");
    assert_eq!(info_field(&mut c, "log_recovered_snapshot_index"), "2");
    assert_eq!(info_field(&mut c, "log_recovered_entries"), "0");

    let _: () = q(&mut c, "SET", &["k", "w"]);
    assert_eq!(
        send_and_read_to_eof(&server, b"SHUTDOWN NOSAVE NOW\r\n"),
        b""
    );
    assert_exits_cleanly(&mut server);
    server.restart();
    let mut c = server.conn();
    assert_eq!(q::<String>(&mut c, "GET", &["k"]), "w");
    // The snapshot is still the one SHUTDOWN SAVE wrote; the SET came from the log.
    assert_eq!(info_field(&mut c, "log_recovered_snapshot_index"), "2");
    assert_eq!(info_field(&mut c, "log_recovered_entries"), "1");
}

#[test]
fn shutdown_errors_are_redis_errors_and_keep_the_server_up() {
    let mut server = Server::start(&["--fsync", "no"]);
    let mut c = server.conn();
    for (args, want) in [
        (&["NOSAVE", "SAVE"][..], "ERR syntax error"),
        (&["ABORT", "NOW"], "ERR syntax error"),
        (&["PLEASE"], "ERR syntax error"),
        (&["ABORT"], "ERR No shutdown in progress."),
    ] {
        let err = redis::cmd("SHUTDOWN")
            .arg(args)
            .query::<()>(&mut c)
            .expect_err("an error");
        let text = format!(
            "{} {}",
            err.code().unwrap_or("?"),
            err.detail().unwrap_or("")
        );
        assert_eq!(text, want, "SHUTDOWN {args:?}");
    }
    assert!(server.is_running());
    assert_eq!(q::<String>(&mut c, "PING", &[]), "PONG");
}

/// SAVE, BGSAVE and BGREWRITEAOF compact the log (a snapshot, then the covered log is
/// deleted), with Redis's replies; LASTSAVE moves only when one succeeds.
#[test]
fn save_bgsave_bgrewriteaof_and_lastsave() {
    let mut server = Server::start(&[]);
    let mut c = server.conn();
    let started: i64 = q(&mut c, "LASTSAVE", &[]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    assert!(
        (now - 600..=now).contains(&started),
        "LASTSAVE before any save is the start: {started} (now {now})"
    );
    assert_eq!(
        q::<i64>(&mut c, "LASTSAVE", &[]),
        started,
        "LASTSAVE is stable"
    );
    for i in 0..10 {
        let _: () = q(&mut c, "SET", &[&format!("k{i}"), "v"]);
    }
    assert_eq!(q::<String>(&mut c, "SAVE", &[]), "OK");
    assert_eq!(info_field(&mut c, "log_compactions"), "1");
    let saved: i64 = q(&mut c, "LASTSAVE", &[]);
    assert!(saved >= started, "{saved} < {started}");
    // INFO persistence says the same, under Redis's name (what monitoring reads).
    assert_eq!(info_field(&mut c, "rdb_last_save_time"), saved.to_string());

    let _: () = q(&mut c, "SET", &["k10", "v"]);
    let reply: String = q(&mut c, "BGSAVE", &[]);
    assert_eq!(reply, "Background saving started");
    wait_until(SOON, "BGSAVE to finish", || {
        info_field(&mut c, "log_compactions") == "2"
    });
    let reply: String = q(&mut c, "BGREWRITEAOF", &[]);
    assert_eq!(reply, "Background append only file rewriting started");
    wait_until(SOON, "BGREWRITEAOF to finish", || {
        info_field(&mut c, "log_compactions") == "3"
    });
    let err = redis::cmd("BGSAVE")
        .arg("NOW")
        .query::<()>(&mut c)
        .expect_err("syntax");
    assert_eq!(err.code(), Some("ERR"));
    assert_eq!(err.detail(), Some("syntax error"));

    // What the compactions kept is what a restart finds, from the snapshot alone.
    server.terminate();
    server.restart();
    let mut c = server.conn();
    assert_eq!(q::<i64>(&mut c, "DBSIZE", &[]), 11);
    assert_eq!(info_field(&mut c, "log_recovered_snapshot_index"), "11");
}

/// ROLE: a master, its offset the last log index, no replicas; the same array in RESP2
/// and RESP3.
#[test]
fn role_in_resp2_and_resp3() {
    let server = Server::start(&["--fsync", "no"]);
    let mut c = server.conn();
    let _: () = q(&mut c, "SET", &["a", "1"]);
    let _: () = q(&mut c, "SET", &["b", "2"]);
    let mut raw = server.raw();
    raw.write_all(b"ROLE\r\nHELLO 3\r\nROLE\r\nQUIT\r\n")
        .expect("send");
    let mut got = Vec::new();
    raw.read_to_end(&mut got).expect("read");
    let role = b"*3\r\n$6\r\nmaster\r\n:2\r\n*0\r\n";
    assert!(got.starts_with(role), "{}", String::from_utf8_lossy(&got));
    let rest = &got[role.len()..];
    let hello_end = rest
        .windows(role.len())
        .position(|w| w == role)
        .unwrap_or_else(|| panic!("ROLE in RESP3: {}", String::from_utf8_lossy(rest)));
    assert_eq!(&rest[hello_end + role.len()..], b"+OK\r\n");
}

/// COMMAND DOCS has Redis 7's `arguments`, and redis-cli (which builds `help <command>`
/// and its hints from them) shows the table's synopsis, as it does against Redis.
#[test]
fn command_docs_arguments_drive_redis_cli_help() {
    let server = Server::start(&["--fsync", "no"]);
    let mut c = server.conn();
    let docs: redis::Value = q(&mut c, "COMMAND", &["DOCS", "set"]);
    let text = format!("{docs:?}");
    for part in [
        "arguments",
        "\"key\"",
        "oneof",
        "pure-token",
        "\"NX\"",
        "optional",
        "unix-time",
    ] {
        assert!(text.contains(part), "COMMAND DOCS set lacks {part}: {text}");
    }

    let out = common::redis_cli()
        .args(["-p", &server.port.to_string(), "help", "SET"])
        .stdin(Stdio::null())
        .output()
        .expect("run redis-cli");
    assert!(out.status.success(), "{out:?}");
    // redis-cli colours its help with ANSI escapes even into a pipe: drop them.
    let mut plain = String::new();
    let mut escape = false;
    for ch in String::from_utf8_lossy(&out.stdout).chars() {
        match ch {
            '\x1b' => escape = true,
            'm' if escape => escape = false,
            _ if escape => {}
            '\r' => {}
            _ => plain.push(ch),
        }
    }
    let set = kvstore::commands::lookup(b"set").expect("SET in the table");
    let synopsis = set.args.replace('…', "...");
    assert!(
        plain.contains(&format!("SET {synopsis}\n")),
        "redis-cli help SET:\n{plain}"
    );
    assert!(
        plain.contains(&format!("summary: {}", set.summary)),
        "{plain}"
    );
    assert!(plain.contains("group: string"), "{plain}");
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("run")
}

/// `redis-cli SHUTDOWN` and `kvstore client SHUTDOWN` both see success (exit 0, no
/// output): the closed connection is SHUTDOWN's answer.
#[test]
fn clients_shut_the_server_down() {
    let mut server = Server::start(&["--fsync", "no"]);
    let out = run(common::redis_cli().args(["-p", &server.port.to_string(), "SHUTDOWN"]));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"", "{out:?}");
    assert_exits_cleanly(&mut server);

    server.restart();
    let out = run(Command::new(KVSTORE_BIN).args([
        "client",
        "-p",
        &server.port.to_string(),
        "shutdown",
        "nosave",
    ]));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"", "{out:?}");
    assert_exits_cleanly(&mut server);
}
