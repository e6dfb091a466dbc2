//! The command line as a user types it: `kvstore client` one-shot forms and exit codes,
//! and `kvstore repl` on a data directory that a server then serves.

mod common;

use common::{DataDir, KVSTORE_BIN, Server};
use std::io::Write;
use std::process::{Command, Output, Stdio};

fn kvstore(args: &[&str], envs: &[(&str, &str)], stdin: &str) -> Output {
    let mut cmd = Command::new(KVSTORE_BIN);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KVSTORE_")) {
        cmd.env_remove(k);
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start kvstore");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("wait for kvstore")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn client_one_shot_forms_and_exit_codes() {
    let server = Server::start(&["--fsync", "no"]);
    let port = server.port.to_string();
    let set = kvstore(
        &[
            "client",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "SET",
            "greeting",
            "hello world",
        ],
        &[],
        "",
    );
    assert!(set.status.success(), "{set:?}");
    assert_eq!(stdout(&set), "OK\n");
    // No flags: host and port come from the environment.
    let get = kvstore(
        &["client", "GET", "greeting"],
        &[("KVSTORE_PORT", &port)],
        "",
    );
    assert_eq!(stdout(&get), "hello world\n");
    // A number as the command's argument is not mistaken for a port.
    let incr = kvstore(&["client", "--port", &port, "INCRBY", "n", "7001"], &[], "");
    assert_eq!(stdout(&incr), "7001\n");
    // An error reply exits 1; so does an unreachable server, with a clear message.
    let bad = kvstore(&["client", "-p", &port, "NOPE"], &[], "");
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
    let free = common::free_port().to_string();
    let down = kvstore(&["client", "-p", &free, "PING"], &[], "");
    assert_eq!(down.status.code(), Some(1));
    assert!(stderr(&down).contains("Could not connect"), "{down:?}");
    // Commands on stdin, one per line, as in a script.
    let piped = kvstore(
        &["client", "-h", "127.0.0.1", "-p", &port],
        &[],
        "SET k 1\nINCR k\nGET k\n",
    );
    assert_eq!(stdout(&piped), "OK\n2\n2\n");
}

/// redis-cli's flags, and a word that is not a command is sent as one: the server,
/// not the client, says it is unknown.
#[test]
fn client_takes_redis_cli_flags_and_never_guesses_a_host() {
    let server = Server::start(&["--fsync", "no"]);
    let port = server.port.to_string();
    let typo = kvstore(&["client", "-p", &port, "gte", "k"], &[], "");
    assert_eq!(typo.status.code(), Some(1), "{typo:?}");
    assert_eq!(
        stdout(&typo),
        "ERR unknown command 'gte', with args beginning with: 'k' \n\n",
        "{typo:?}"
    );
    // The same without any flag: `gte` is still the command, not a host.
    let typo = kvstore(&["client", "gte", "k"], &[("KVSTORE_PORT", &port)], "");
    assert!(
        stdout(&typo).starts_with("ERR unknown command 'gte'"),
        "{typo:?}"
    );
    // -h with an address, and the long forms.
    let ping = kvstore(
        &["client", "-h", "127.0.0.1", "--port", &port, "PING"],
        &[],
        "",
    );
    assert_eq!(stdout(&ping), "PONG\n", "{ping:?}");
    // --help still helps (-h is the host).
    let help = kvstore(&["client", "--help"], &[], "");
    assert!(help.status.success(), "{help:?}");
    assert!(stdout(&help).contains("-h, --host"), "{help:?}");
}

#[test]
fn client_authenticates_with_a() {
    let server = Server::start(&["--fsync", "no", "--requirepass", "s3cret"]);
    let port = server.port.to_string();
    let set = kvstore(
        &["client", "-p", &port, "-a", "s3cret", "SET", "k", "v"],
        &[],
        "",
    );
    assert_eq!(stdout(&set), "OK\n", "{set:?}");
    let noauth = kvstore(&["client", "-p", &port, "GET", "k"], &[], "");
    assert!(stdout(&noauth).starts_with("NOAUTH"), "{noauth:?}");
    let wrong = kvstore(&["client", "-p", &port, "-a", "nope", "GET", "k"], &[], "");
    assert!(
        stderr(&wrong).contains("AUTH failed: WRONGPASS"),
        "{wrong:?}"
    );
    assert_eq!(wrong.status.code(), Some(1));
}

/// `-n DB` selects the database after AUTH: `-n 0` runs the command in database 0, and
/// `-n 1` sends `SELECT 1` and shows the server's answer. A server that refuses it gets
/// no command at all (redis-cli would run it in database 0).
#[test]
fn client_selects_the_database_with_n() {
    let server = Server::start(&["--fsync", "no", "--requirepass", "pw"]);
    let port = server.port.to_string();
    let set = kvstore(
        &[
            "client", "-p", &port, "-a", "pw", "-n", "0", "SET", "k", "zero",
        ],
        &[],
        "",
    );
    assert_eq!(stdout(&set), "OK\n", "{set:?}");

    // What the server itself says to SELECT 1 (an error until databases exist).
    let mut c = redis::Client::open(format!("redis://:pw@127.0.0.1:{port}/"))
        .expect("client")
        .get_connection()
        .expect("connect");
    let select: redis::RedisResult<String> = redis::cmd("SELECT").arg(1).query(&mut c);
    let one = kvstore(
        &[
            "client", "-p", &port, "-a", "pw", "-n", "1", "SET", "k", "one",
        ],
        &[],
        "",
    );
    match select {
        Err(e) => {
            let code = e.code().unwrap_or("ERR");
            let detail = e.detail().unwrap_or_default();
            assert_eq!(
                stderr(&one),
                format!("SELECT 1 failed: {code} {detail}\n"),
                "{one:?}"
            );
            assert_eq!(one.status.code(), Some(1));
            assert_eq!(stdout(&one), "");
        }
        Ok(_) => {
            // Databases exist: the SET went to database 1 (the connection above is in it).
            assert_eq!(stdout(&one), "OK\n", "{one:?}");
            let v: String = redis::cmd("GET").arg("k").query(&mut c).expect("GET");
            assert_eq!(v, "one");
        }
    }
    let get = kvstore(&["client", "-p", &port, "-a", "pw", "GET", "k"], &[], "");
    assert_eq!(stdout(&get), "zero\n", "database 0 is untouched: {get:?}");
}

#[test]
fn repl_writes_a_data_dir_that_a_server_serves() {
    let dir = DataDir::new();
    let path = dir.path().to_str().expect("utf-8 temp path");
    let out = kvstore(
        &["repl", "--data-dir", path],
        &[],
        "SET k \"a b\"\nEXPIRE k 1000\nINCR n\n",
    );
    assert!(out.status.success(), "{out:?}");
    let server = Server::start_in(&dir, &["--fsync", "no"]);
    let mut c = server.conn();
    let v: String = redis::cmd("GET").arg("k").query(&mut c).expect("GET");
    assert_eq!(v, "a b");
    let ttl: i64 = redis::cmd("TTL").arg("k").query(&mut c).expect("TTL");
    assert!(ttl > 0 && ttl <= 1000, "TTL {ttl}");
    let n: String = redis::cmd("GET").arg("n").query(&mut c).expect("GET n");
    assert_eq!(n, "1");
}

/// A node started from the repo without `--data-dir` keeps its data in
/// `./kvstore-data-PORT`, and `.gitignore` keeps that directory out of git.
#[test]
fn default_data_dir_is_ignored_by_git() {
    let cwd = DataDir::new();
    let port = common::free_port();
    let mut child = Command::new(KVSTORE_BIN)
        .args(["server", &port.to_string(), "--fsync", "no"])
        .current_dir(cwd.path())
        .env_remove("KVSTORE_DATA_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start kvstore server");
    let name = format!("kvstore-data-{port}");
    let dir = cwd.path().join(&name);
    let created = std::time::Instant::now() + common::START_DEADLINE;
    while !dir.is_dir() && std::time::Instant::now() < created {
        std::thread::sleep(common::POLL);
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(dir.is_dir(), "the server did not create ./{name}");

    let gitignore = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.gitignore"))
        .expect("read .gitignore");
    // Only root-anchored directory patterns (`/name*/`) are considered: that is the
    // form that ignores the directory at the top of the repo and nothing else.
    let ignored = gitignore.lines().any(|line| {
        line.trim()
            .strip_prefix('/')
            .and_then(|p| p.strip_suffix('/'))
            .is_some_and(|p| kvstore::glob::glob_match(p.as_bytes(), name.as_bytes(), false))
    });
    assert!(ignored, ".gitignore does not ignore /{name}/:\n{gitignore}");
}

/// The cluster flags are checked before anything is opened: a mistake in them is
/// reported (exit 2) ahead of "clustering is not available yet", and no data directory
/// is created. Every flag also reads its `KVSTORE_…` variable.
#[test]
fn server_checks_the_cluster_flags_first() {
    let dir = DataDir::new();
    let data = dir.path().join("never-created");
    let data = data.to_str().expect("utf-8 temp path");
    let refused = |args: &[&str], envs: &[(&str, &str)], want: &str| {
        let mut all = vec!["server", "--data-dir", data];
        all.extend_from_slice(args);
        let out = kvstore(&all, envs, "");
        assert_eq!(out.status.code(), Some(2), "{args:?} {envs:?}: {out:?}");
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
        assert!(!std::path::Path::new(data).exists(), "{args:?}");
    };
    let peers = "127.0.0.1:7002,127.0.0.1:7003";
    refused(&["7001", peers, "--id", "0"], &[], "--id 0 is reserved");
    refused(
        &["7001", peers],
        &[("KVSTORE_ID", "0")],
        "--id 0 is reserved",
    );
    refused(&["7002", peers], &[], "this node's own id 7002");
    refused(
        &["7001", "10.0.0.1:7002,10.0.0.2:7002"],
        &[],
        "have the same id 7002",
    );
    refused(&["7001", "localhost"], &[], "bad peer 'localhost'");
    refused(
        &["0", peers],
        &[],
        "port 0 (any free port) cannot be a node's id",
    );
    refused(
        &[
            "7001",
            peers,
            "--cluster-secret",
            "a",
            "--cluster-secret-file",
            "/nonexistent",
        ],
        &[],
        "not both",
    );
    refused(
        &[
            "7001",
            peers,
            "--cluster-secret-file",
            "/nonexistent/secret",
        ],
        &[],
        "cannot use --cluster-secret-file /nonexistent/secret",
    );
    refused(
        &["7001", "--lease-ms", "500"],
        &[],
        "must be shorter than --failure-timeout-ms",
    );
    refused(
        &["7001"],
        &[
            ("KVSTORE_LEASE_MS", "900"),
            ("KVSTORE_FAILURE_TIMEOUT_MS", "800"),
        ],
        "--lease-ms (900) must be shorter than --failure-timeout-ms (800)",
    );
    refused(
        &["7001", "--heartbeat-ms", "400"],
        &[],
        "longer than --heartbeat-ms",
    );
    let out = kvstore(&["server", "--replication", "most"], &[], "");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        stderr(&out).contains("expected async, quorum or all"),
        "{out:?}"
    );
    let out = kvstore(&["server"], &[("KVSTORE_REPLICATION", "sometimes")], "");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// Pointed at a follower, the client follows `-MOVED` and says which node answered:
/// on stderr in one-shot mode (stdout holds only the reply, for scripts), before the
/// reply at the prompt (whose address then names that node).
#[test]
fn client_shows_which_node_answered_after_a_redirect() {
    let mut cluster = common::cluster::Cluster::start(3, &["--fsync", "no"]);
    let leader = cluster.wait_for_leader();
    let follower = if leader == 1 { 2 } else { 1 };
    let port = cluster.port(follower).to_string();
    // The new leader serves once its lease and first entry are in: retry a moment's
    // -CLUSTERDOWN rather than assume the first answer.
    let mut set = None;
    common::wait_until(
        common::cluster::ELECTION_DEADLINE,
        "the leader to serve",
        || {
            let out = kvstore(&["client", "-p", &port, "SET", "k", "v"], &[], "");
            let ok = out.status.success();
            set = Some(out);
            ok
        },
    );
    let set = set.expect("at least one try");
    assert_eq!(stdout(&set), "OK\n", "{set:?}");
    let note = "-> Redirected to slot [0] located at 127.0.0.1:";
    assert!(stderr(&set).starts_with(note), "{set:?}");

    let repl = kvstore(&["client", "-p", &port], &[], "GET k\n");
    let out = stdout(&repl);
    assert!(out.starts_with(note), "{repl:?}");
    assert!(
        out.ends_with("\nv\n"),
        "the note comes before the reply: {repl:?}"
    );
}

#[test]
fn the_embedded_example_keeps_its_data_across_runs() {
    let dir = DataDir::new();
    let run = || {
        let out = Command::new(common::example_binary("embedded"))
            .arg(dir.path())
            .output()
            .expect("run examples/embedded");
        assert!(out.status.success(), "{out:?}");
        stdout(&out)
    };
    let first = run();
    assert!(
        first.contains("greeting = Some(\"hello\"), this program has run 1 time(s)"),
        "{first}"
    );
    assert!(first.contains("removed 1 key(s); 1 key(s) left"), "{first}");
    // The counter came back from the log.
    let second = run();
    assert!(second.contains("has run 2 time(s)"), "{second}");
}
