//! Protected mode and secrets from files, on the real binary: a node bound where other
//! machines can reach it refuses to start open; a password or cluster secret, or
//! `--insecure`, lets it start; `--requirepass-file` keeps the password out of `ps`.
//! Every refusal is checked for its exit status (2: a configuration mistake) and for a
//! message that says what to change.

#![allow(dead_code)]

mod common;

use common::{DataDir, KVSTORE_BIN, Server, free_port, resp};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `kvstore server <free port> --data-dir <tmp> <args>` expecting it to refuse:
/// returns its exit code and stderr. A server that starts anyway is killed and the test
/// fails (it would otherwise serve forever).
#[track_caller]
fn refused(args: &[&str], envs: &[(&str, &str)]) -> (i32, String) {
    let dir = DataDir::new();
    let mut cmd = Command::new(KVSTORE_BIN);
    cmd.arg("server")
        .arg(free_port().to_string())
        .arg("--data-dir")
        .arg(dir.path())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("KVSTORE_") {
            cmd.env_remove(&key);
        }
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("run kvstore");
    let deadline = Instant::now() + common::START_DEADLINE;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for kvstore") {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kvstore {args:?} started instead of refusing");
        }
        std::thread::sleep(common::POLL);
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    (status.code().unwrap_or(-1), err)
}

#[test]
fn an_open_node_on_every_interface_is_refused() {
    let (code, err) = refused(&["--bind", "0.0.0.0"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("refusing to listen on 0.0.0.0"), "{err}");
    for way_out in [
        "--requirepass-file",
        "--cluster-secret",
        "--insecure",
        "127.0.0.1",
    ] {
        assert!(
            err.contains(way_out),
            "the refusal should name {way_out}: {err}"
        );
    }
    // The same from the environment (an env file under systemd), where a flag's "no"
    // is as good as leaving it out, and a typo is refused rather than taken for either.
    for insecure in [None, Some("no"), Some("0"), Some("false")] {
        let mut envs = vec![("KVSTORE_BIND", "0.0.0.0")];
        envs.extend(insecure.map(|v| ("KVSTORE_INSECURE", v)));
        let (code, err) = refused(&[], &envs);
        assert_eq!(code, 2, "{insecure:?}: {err}");
        assert!(
            err.contains("refusing to listen on 0.0.0.0"),
            "{insecure:?}: {err}"
        );
    }
    let (code, err) = refused(
        &[],
        &[("KVSTORE_BIND", "0.0.0.0"), ("KVSTORE_INSECURE", "yess")],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("invalid value 'yess' for '--insecure'"),
        "{err}"
    );
}

#[test]
fn a_cluster_secret_guards_only_a_member() {
    // A node with no peers has no links for the secret to guard: still open.
    let (code, err) = refused(&["--bind", "0.0.0.0", "--cluster-secret", "s3cret"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("refusing"), "{err}");
}

#[test]
fn an_empty_password_counts_as_none() {
    let (code, err) = refused(&["--bind", "0.0.0.0"], &[("KVSTORE_REQUIREPASS", "")]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("refusing"), "{err}");
}

#[test]
fn password_file_mistakes_are_refused() {
    let dir = DataDir::new();
    let missing = dir.root().join("no-such-file");
    let (code, err) = refused(&["--requirepass-file", missing.to_str().unwrap()], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot use --requirepass-file"), "{err}");

    let empty = dir.root().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let (code, err) = refused(&["--requirepass-file", empty.to_str().unwrap()], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("it is empty"), "{err}");

    let pw = dir.root().join("pw");
    std::fs::write(&pw, "s3cret\n").unwrap();
    let (code, err) = refused(
        &[
            "--requirepass",
            "x",
            "--requirepass-file",
            pw.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not both"), "{err}");
}

/// Sends one request on a raw connection and reads one line of reply.
fn ask(port: u16, req: &[&[u8]]) -> String {
    let mut s = common::raw(port);
    s.write_all(&resp(req)).unwrap();
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn a_password_from_a_file_protects_every_interface() {
    let dir = DataDir::new();
    let pw = dir.root().join("password");
    std::fs::write(&pw, "s3cret\n").unwrap();
    let server = Server::start_in(
        &dir,
        &[
            "--bind",
            "0.0.0.0",
            "--requirepass-file",
            pw.to_str().unwrap(),
        ],
    );
    assert!(ask(server.port, &[b"GET", b"k"]).starts_with("-NOAUTH"));
    // The file's trailing newline is not part of the password.
    assert_eq!(
        ask(server.port, &[b"AUTH", b"s3cret\n"]).lines().next(),
        Some("-WRONGPASS invalid username-password pair or user is disabled.")
    );
    assert_eq!(ask(server.port, &[b"AUTH", b"s3cret"]), "+OK\r\n");
    // And it is nowhere on the command line.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", server.pid())).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains("s3cret"));
}

#[test]
fn insecure_runs_open_on_purpose_and_says_so() {
    let server = Server::start(&["--bind", "0.0.0.0", "--insecure"]);
    assert_eq!(ask(server.port, &[b"PING"]), "+PONG\r\n");
    common::wait_until(Duration::from_secs(10), "the warning in the log", || {
        server.log().contains("--insecure")
    });
}

#[test]
fn insecure_from_an_env_file_takes_yes() {
    // systemd env files say yes/no as often as true/false.
    let dir = common::DataDir::new();
    let server = Server::start_with_env(
        &dir,
        None,
        &[],
        &[("KVSTORE_BIND", "0.0.0.0"), ("KVSTORE_INSECURE", "yes")],
    );
    assert_eq!(ask(server.port, &[b"PING"]), "+PONG\r\n");
}

#[test]
fn a_cluster_member_with_a_secret_may_listen_everywhere() {
    // Its peer is not running: the node starts anyway and waits for it.
    let peer = free_port();
    let server = Server::start(&[
        "--bind",
        "0.0.0.0",
        "--cluster-secret",
        "s3cret",
        &format!("127.0.0.1:{peer}"),
    ]);
    common::wait_until(Duration::from_secs(10), "the warning in the log", || {
        server.log().contains("no client password")
    });
}

#[test]
fn loopback_is_open_by_default() {
    let server = Server::start(&[]);
    assert_eq!(ask(server.port, &[b"PING"]), "+PONG\r\n");
}
