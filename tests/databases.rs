//! Integration tests for Redis's numbered databases (`SELECT`, `--databases`): each
//! database is its own key space for every command, through real `kvstore server`
//! processes and the `redis` crate, across kill -9 and compaction; and the cases of
//! Redis's own tests (tests/unit/keyspace.tcl, other.tcl) that touch our commands.
//!
//! As everywhere in tests/: free ports, own temp dirs, deadlines instead of sleeps.

mod common;

use common::{DataDir, KVSTORE_BIN, POLL, Server, wait_until};
use redis::{RedisResult, Value};
use std::fs::File;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const SOON: Duration = Duration::from_secs(10);

/// Runs `name args…` and converts the reply, with the command in the panic message.
#[track_caller]
fn q<T: redis::FromRedisValue>(con: &mut redis::Connection, name: &str, args: &[&str]) -> T {
    let mut c = redis::cmd(name);
    for a in args {
        c.arg(*a);
    }
    match c.query(con) {
        Ok(v) => v,
        Err(e) => panic!("{name} {args:?}: {e}"),
    }
}

/// Runs a command that must fail; returns the server's error text (`ERR …`).
#[track_caller]
fn err(con: &mut redis::Connection, name: &str, args: &[&str]) -> String {
    let mut c = redis::cmd(name);
    for a in args {
        c.arg(*a);
    }
    let r: RedisResult<Value> = c.query(con);
    match r {
        Ok(v) => panic!("{name} {args:?}: expected an error, got {v:?}"),
        Err(e) => match (e.code(), e.detail()) {
            (Some(code), Some(detail)) => format!("{code} {detail}"),
            (Some(code), None) => code.to_string(),
            _ => panic!("{name} {args:?}: not a server error: {e}"),
        },
    }
}

#[track_caller]
fn select(con: &mut redis::Connection, db: u32) {
    let r: String = q(con, "SELECT", &[&db.to_string()]);
    assert_eq!(r, "OK", "SELECT {db}");
}

#[track_caller]
fn get(con: &mut redis::Connection, key: &str) -> Option<String> {
    q(con, "GET", &[key])
}

#[track_caller]
fn dbsize(con: &mut redis::Connection) -> i64 {
    q(con, "DBSIZE", &[])
}

#[track_caller]
fn ttl(con: &mut redis::Connection, key: &str) -> i64 {
    q(con, "TTL", &[key])
}

/// The `dbN:` line of INFO keyspace, if there is one.
fn info_db(con: &mut redis::Connection, db: u32) -> Option<String> {
    let text: String = q(con, "INFO", &["keyspace"]);
    let prefix = format!("db{db}:");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().to_string())
}

/// A connection through a `redis://127.0.0.1:PORT/DB` URL, as a client library
/// configured with a database number makes it (the `redis` crate sends SELECT DB
/// when it connects, as ioredis's `db` and node-redis's `database` options do).
#[track_caller]
fn conn_db(server: &Server, db: u32) -> redis::Connection {
    let url = format!("redis://127.0.0.1:{}/{db}", server.port);
    let client = redis::Client::open(url.as_str()).expect("redis client");
    let con = client
        .get_connection_with_timeout(Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    con.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set_read_timeout");
    con
}

// ---------------------------------------------------------------------------------------
// Clients configured with a database

/// What ioredis (`db: 1`) and node-redis (`database: 1`) do: connect, SELECT 1, then
/// read and write. They must reach database 1, never fall back to 0.
#[test]
fn a_client_configured_with_db_1_reads_and_writes_database_1() {
    let server = Server::start(&[]);
    let mut one = conn_db(&server, 1);
    let mut zero = conn_db(&server, 0);
    let r: String = q(&mut one, "SET", &["k", "in-one"]);
    assert_eq!(r, "OK");
    assert_eq!(
        get(&mut zero, "k"),
        None,
        "database 0 does not see db 1's key"
    );
    let r: String = q(&mut zero, "SET", &["k", "in-zero"]);
    assert_eq!(r, "OK");
    assert_eq!(get(&mut one, "k").as_deref(), Some("in-one"));
    assert_eq!(get(&mut zero, "k").as_deref(), Some("in-zero"));
    assert_eq!(dbsize(&mut one), 1);
    let keys: Vec<String> = q(&mut one, "KEYS", &["*"]);
    assert_eq!(keys, vec!["k"]);
    // CLIENT LIST shows each connection's database.
    let list: String = q(&mut one, "CLIENT", &["INFO"]);
    assert!(list.contains(" db=1 "), "{list}");
}

// ---------------------------------------------------------------------------------------
// Redis's own tests (tests/unit/keyspace.tcl, tests/unit/other.tcl), on our commands. They
// run in databases 9 and 10, as Redis's test suite does.

#[test]
fn redis_keyspace_tcl_cases() {
    let server = Server::start(&[]);
    let mut r = server.conn();
    select(&mut r, 9);

    // DEL all keys again (DB 1)
    select(&mut r, 10);
    assert_eq!(dbsize(&mut r), 0);
    select(&mut r, 9);

    // COPY basic usage for string
    let _: String = q(&mut r, "SET", &["mykey{t}", "foobar"]);
    let n: i64 = q(&mut r, "COPY", &["mykey{t}", "mynewkey{t}"]);
    assert_eq!(n, 1);
    assert_eq!(get(&mut r, "mynewkey{t}").as_deref(), Some("foobar"));
    assert_eq!(dbsize(&mut r), 2);
    let n: i64 = q(&mut r, "COPY", &["mykey{t}", "mynewkey{t}", "DB", "10"]);
    assert_eq!(n, 1);
    select(&mut r, 10);
    assert_eq!(get(&mut r, "mynewkey{t}").as_deref(), Some("foobar"));
    assert_eq!(dbsize(&mut r), 1);
    select(&mut r, 9);

    // COPY for string does not replace an existing key without REPLACE option
    let _: String = q(&mut r, "SET", &["mykey2{t}", "hello"]);
    let n: i64 = q(&mut r, "COPY", &["mykey2{t}", "mynewkey{t}", "DB", "10"]);
    assert_eq!(n, 0);

    // COPY for string can replace an existing key with REPLACE option
    let n: i64 = q(
        &mut r,
        "COPY",
        &["mykey2{t}", "mynewkey{t}", "DB", "10", "REPLACE"],
    );
    assert_eq!(n, 1);
    select(&mut r, 10);
    assert_eq!(get(&mut r, "mynewkey{t}").as_deref(), Some("hello"));

    // COPY for string ensures that copied data is independent of copying data
    let _: String = q(&mut r, "FLUSHDB", &[]);
    select(&mut r, 9);
    let _: String = q(&mut r, "SET", &["mykey{t}", "foobar"]);
    let _: i64 = q(&mut r, "COPY", &["mykey{t}", "mynewkey{t}", "DB", "10"]);
    select(&mut r, 10);
    assert_eq!(get(&mut r, "mynewkey{t}").as_deref(), Some("foobar"));
    let _: String = q(&mut r, "SET", &["mynewkey{t}", "hoge"]);
    assert_eq!(get(&mut r, "mynewkey{t}").as_deref(), Some("hoge"));
    select(&mut r, 9);
    assert_eq!(get(&mut r, "mykey{t}").as_deref(), Some("foobar"));
    select(&mut r, 10);
    let _: String = q(&mut r, "FLUSHDB", &[]);
    select(&mut r, 9);

    // COPY for string does not copy data to no-integer DB
    assert_eq!(
        err(
            &mut r,
            "COPY",
            &["mykey{t}", "mynewkey{t}", "DB", "notanumber"]
        ),
        "ERR value is not an integer or out of range"
    );

    // COPY can copy key expire metadata as well
    let _: String = q(&mut r, "SET", &["mykey{t}", "foobar", "EX", "100"]);
    let _: i64 = q(&mut r, "COPY", &["mykey{t}", "mynewkey{t}", "REPLACE"]);
    let t = ttl(&mut r, "mynewkey{t}");
    assert!(t > 0 && t <= 100, "ttl {t}");

    // MOVE basic usage
    let _: i64 = q(&mut r, "DEL", &["mykey"]);
    let _: String = q(&mut r, "SET", &["mykey", "foobar"]);
    let before = dbsize(&mut r);
    let n: i64 = q(&mut r, "MOVE", &["mykey", "10"]);
    assert_eq!(n, 1);
    let e: i64 = q(&mut r, "EXISTS", &["mykey"]);
    assert_eq!((e, dbsize(&mut r)), (0, before - 1));
    select(&mut r, 10);
    assert_eq!(get(&mut r, "mykey").as_deref(), Some("foobar"));
    assert_eq!(dbsize(&mut r), 1);
    select(&mut r, 9);

    // MOVE against key existing in the target DB
    let _: String = q(&mut r, "SET", &["mykey", "hello"]);
    let n: i64 = q(&mut r, "MOVE", &["mykey", "10"]);
    assert_eq!(n, 0);

    // MOVE against non-integer DB (#1428)
    assert_eq!(
        err(&mut r, "MOVE", &["mykey", "notanumber"]),
        "ERR value is not an integer or out of range"
    );

    // MOVE can move key expire metadata as well
    select(&mut r, 10);
    let _: String = q(&mut r, "FLUSHDB", &[]);
    select(&mut r, 9);
    let _: String = q(&mut r, "SET", &["mykey", "foo", "EX", "100"]);
    let _: i64 = q(&mut r, "MOVE", &["mykey", "10"]);
    assert_eq!(ttl(&mut r, "mykey"), -2);
    select(&mut r, 10);
    let t = ttl(&mut r, "mykey");
    assert!(t > 0 && t <= 100, "ttl {t}");
    assert_eq!(get(&mut r, "mykey").as_deref(), Some("foo"));
    select(&mut r, 9);

    // MOVE does not create an expire if it does not exist
    select(&mut r, 10);
    let _: String = q(&mut r, "FLUSHDB", &[]);
    select(&mut r, 9);
    let _: String = q(&mut r, "SET", &["mykey", "foo"]);
    let _: i64 = q(&mut r, "MOVE", &["mykey", "10"]);
    assert_eq!(ttl(&mut r, "mykey"), -2);
    select(&mut r, 10);
    assert_eq!(ttl(&mut r, "mykey"), -1);
    assert_eq!(get(&mut r, "mykey").as_deref(), Some("foo"));
    select(&mut r, 9);

    // SET/GET keys in different DBs
    let _: String = q(&mut r, "SET", &["a", "hello"]);
    let _: String = q(&mut r, "SET", &["b", "world"]);
    select(&mut r, 10);
    let _: String = q(&mut r, "SET", &["a", "foo"]);
    let _: String = q(&mut r, "SET", &["b", "bared"]);
    select(&mut r, 9);
    let got = [
        get(&mut r, "a"),
        get(&mut r, "b"),
        {
            select(&mut r, 10);
            get(&mut r, "a")
        },
        get(&mut r, "b"),
    ];
    assert_eq!(
        got.map(|v| v.unwrap_or_default()),
        ["hello", "world", "foo", "bared"].map(String::from)
    );
    select(&mut r, 9);

    // RANDOMKEY against empty DB (and another database's keys are not offered)
    let _: String = q(&mut r, "FLUSHDB", &[]);
    let k: Option<String> = q(&mut r, "RANDOMKEY", &[]);
    assert_eq!(k, None);
    select(&mut r, 10);
    assert!(dbsize(&mut r) > 0, "database 10 still has keys");
    select(&mut r, 9);

    // Coverage: basic SWAPDB test and unhappy path
    let _: String = q(&mut r, "FLUSHALL", &[]);
    select(&mut r, 0);
    let _: String = q(&mut r, "SET", &["swapkey", "v1"]);
    select(&mut r, 1);
    assert_eq!(dbsize(&mut r), 0);
    let ok: String = q(&mut r, "SWAPDB", &["0", "1"]);
    assert_eq!(ok, "OK");
    assert_eq!(dbsize(&mut r), 1);
    select(&mut r, 0);
    assert_eq!(dbsize(&mut r), 0);
    let _: String = q(&mut r, "FLUSHALL", &[]);
    assert_eq!(
        err(&mut r, "SWAPDB", &["44", "55"]),
        "ERR DB index is out of range"
    );
    assert_eq!(
        err(&mut r, "SWAPDB", &["44", "a"]),
        "ERR invalid second DB index"
    );
    assert_eq!(
        err(&mut r, "SWAPDB", &["a", "55"]),
        "ERR invalid first DB index"
    );
    assert_eq!(
        err(&mut r, "SWAPDB", &["a", "b"]),
        "ERR invalid first DB index"
    );
    let ok: String = q(&mut r, "SWAPDB", &["0", "0"]);
    assert_eq!(ok, "OK");

    // Coverage: SWAPDB and FLUSHDB
    let _: String = q(&mut r, "FLUSHALL", &[]);
    select(&mut r, 0);
    let _: String = q(&mut r, "SET", &["swapkey", "v1"]);
    select(&mut r, 1);
    let _: String = q(&mut r, "SET", &["swapkey1", "v1"]);
    assert_eq!(info_db(&mut r, 2), None);
    let _: String = q(&mut r, "SWAPDB", &["0", "2"]);
    select(&mut r, 0);
    assert_eq!(dbsize(&mut r), 0);
    assert_eq!(info_db(&mut r, 0), None);
    select(&mut r, 2);
    let _: String = q(&mut r, "FLUSHDB", &[]);
    assert_eq!(dbsize(&mut r), 0);
    assert!(info_db(&mut r, 1).is_some());
    assert_eq!(info_db(&mut r, 0), None);
    assert_eq!(info_db(&mut r, 2), None);
    let _: String = q(&mut r, "FLUSHALL", &[]);

    // other.tcl: SELECT an out of range DB
    assert_eq!(
        err(&mut r, "SELECT", &["1000000"]),
        "ERR DB index is out of range"
    );
    // other.tcl: FLUSHDB
    for db in [9, 10] {
        select(&mut r, db);
        let _: String = q(&mut r, "FLUSHDB", &[]);
        assert_eq!(dbsize(&mut r), 0);
    }
}

/// Error wording and edge cases beyond Redis's test suite (Redis's src/db.c).
#[test]
fn database_errors_use_redis_wording() {
    let server = Server::start(&[]);
    let mut r = server.conn();
    let range = "ERR DB index is out of range";
    for bad in ["16", "-1", "2147483647"] {
        assert_eq!(err(&mut r, "SELECT", &[bad]), range, "SELECT {bad}");
        assert_eq!(err(&mut r, "MOVE", &["k", bad]), range, "MOVE {bad}");
        assert_eq!(
            err(&mut r, "COPY", &["k", "n", "DB", bad]),
            range,
            "COPY DB {bad}"
        );
    }
    let int_range = "ERR value is out of range, value must between -2147483648 and 2147483647";
    assert_eq!(err(&mut r, "SELECT", &["2147483648"]), int_range);
    assert_eq!(err(&mut r, "MOVE", &["k", "2147483648"]), int_range);
    assert_eq!(
        err(&mut r, "SWAPDB", &["2147483648", "0"]),
        "ERR invalid first DB index"
    );
    assert_eq!(err(&mut r, "SWAPDB", &["0", "16"]), range);
    let same = "ERR source and destination objects are the same";
    let _: String = q(&mut r, "SET", &["k", "v"]);
    assert_eq!(err(&mut r, "MOVE", &["k", "0"]), same);
    assert_eq!(err(&mut r, "COPY", &["k", "k", "DB", "0"]), same);
    // The same key name in another database is not the same object.
    let n: i64 = q(&mut r, "COPY", &["k", "k", "DB", "3"]);
    assert_eq!(n, 1);
    let n: i64 = q(&mut r, "MOVE", &["missing", "3"]);
    assert_eq!(n, 0);
    assert_eq!(
        err(&mut r, "MOVE", &["k"]),
        "ERR wrong number of arguments for 'move' command"
    );
    assert_eq!(
        err(&mut r, "SWAPDB", &["0"]),
        "ERR wrong number of arguments for 'swapdb' command"
    );
    let cfg: Vec<String> = q(&mut r, "CONFIG", &["GET", "databases"]);
    assert_eq!(cfg, vec!["databases", "16"]);
}

/// `--databases N` sets how many there are.
#[test]
fn databases_flag_sets_the_count() {
    let server = Server::start(&["--databases", "4"]);
    let mut r = server.conn();
    select(&mut r, 3);
    assert_eq!(
        err(&mut r, "SELECT", &["4"]),
        "ERR DB index is out of range"
    );
    let cfg: Vec<String> = q(&mut r, "CONFIG", &["GET", "databases"]);
    assert_eq!(cfg, vec!["databases", "4"]);
}

// ---------------------------------------------------------------------------------------
// Expiry and INFO per database

/// The active expirer deletes expired keys in every database, not only 0 (DBSIZE counts
/// expired keys until they are deleted, as Redis's does).
#[test]
fn active_expiry_covers_every_database() {
    let server = Server::start(&[]);
    let mut r = server.conn();
    for db in [0, 7, 15] {
        select(&mut r, db);
        let _: String = q(&mut r, "SET", &["short", "v", "PX", "30"]);
        let _: String = q(&mut r, "SET", &["long", "v", "EX", "1000"]);
    }
    for db in [0, 7, 15] {
        select(&mut r, db);
        wait_until(
            SOON,
            &format!("the expirer to delete db {db}'s key"),
            || dbsize(&mut r) == 1,
        );
        let e: i64 = q(&mut r, "EXISTS", &["long"]);
        assert_eq!(e, 1);
    }
    let stats: String = q(&mut r, "INFO", &["stats"]);
    assert!(stats.contains("expired_keys:3\r\n"), "{stats}");
}

/// INFO keyspace: one `dbN:keys=…,expires=…,avg_ttl=…` line per database with keys.
#[test]
fn info_keyspace_has_a_line_per_database() {
    let server = Server::start(&[]);
    let mut r = server.conn();
    assert_eq!(info_db(&mut r, 0), None);
    let _: String = q(&mut r, "SET", &["a", "1"]);
    select(&mut r, 3);
    let _: String = q(&mut r, "SET", &["b", "1", "EX", "100"]);
    let _: String = q(&mut r, "SET", &["c", "1"]);
    assert_eq!(
        info_db(&mut r, 0).as_deref(),
        Some("keys=1,expires=0,avg_ttl=0")
    );
    let line = info_db(&mut r, 3).expect("db3 line");
    let ttl: u64 = line
        .strip_prefix("keys=2,expires=1,avg_ttl=")
        .unwrap_or_else(|| panic!("db3:{line}"))
        .parse()
        .unwrap_or_else(|e| panic!("db3:{line}: {e}"));
    assert!(ttl > 0 && ttl <= 100_000, "avg_ttl {ttl}");
    for db in [1, 2, 4, 15] {
        assert_eq!(info_db(&mut r, db), None, "db{db}");
    }
}

// ---------------------------------------------------------------------------------------
// Durability

/// Writes a distinct state into several databases (same key names, different values,
/// deadlines, MOVE, SWAPDB, COPY … DB, FLUSHDB), returning what each must hold.
/// Per database, its (key, value, has a deadline), sorted by key.
type State = Vec<(u32, Vec<(String, String, bool)>)>;

fn write_state(r: &mut redis::Connection) -> State {
    for db in [0, 1, 2, 5, 15] {
        select(r, db);
        let _: String = q(r, "SET", &["same", &format!("db{db}")]);
        let _: String = q(r, "SET", &["ttl", &format!("t{db}"), "EX", "1000"]);
    }
    select(r, 1);
    let _: i64 = q(r, "MOVE", &["ttl", "3"]);
    let _: i64 = q(r, "COPY", &["same", "copied", "DB", "4"]);
    let _: String = q(r, "SWAPDB", &["2", "6"]);
    select(r, 5);
    let _: String = q(r, "FLUSHDB", &[]);
    // (db, [(key, value, has deadline)]), sorted by key.
    let s = |k: &str, v: &str, t: bool| (k.to_string(), v.to_string(), t);
    vec![
        (0, vec![s("same", "db0", false), s("ttl", "t0", true)]),
        (1, vec![s("same", "db1", false)]),
        (2, vec![]),
        (3, vec![s("ttl", "t1", true)]),
        (4, vec![s("copied", "db1", false)]),
        (5, vec![]),
        (6, vec![s("same", "db2", false), s("ttl", "t2", true)]),
        (15, vec![s("same", "db15", false), s("ttl", "t15", true)]),
    ]
}

#[track_caller]
fn check_state(r: &mut redis::Connection, want: &State) {
    for (db, keys) in want {
        select(r, *db);
        let mut got: Vec<String> = q(r, "KEYS", &["*"]);
        got.sort();
        let names: Vec<String> = keys.iter().map(|(k, _, _)| k.clone()).collect();
        assert_eq!(got, names, "keys of db {db}");
        for (k, v, has_ttl) in keys {
            assert_eq!(get(r, k).as_deref(), Some(v.as_str()), "db {db} {k}");
            let t = ttl(r, k);
            assert_eq!(t > 0, *has_ttl, "db {db} {k}: ttl {t}");
        }
    }
}

/// kill -9, restart: every database comes back with its own keys (the log carries each
/// entry's database).
#[test]
fn kill9_keeps_each_database_separate() {
    let mut server = Server::start(&[]);
    let mut r = server.conn();
    let want = write_state(&mut r);
    check_state(&mut r, &want);
    drop(r);
    server.kill9();
    server.restart();
    let mut r = server.conn();
    check_state(&mut r, &want);
}

/// The same through a snapshot: compaction writes every database's keys, a restart
/// loads them into the right databases.
#[test]
fn compaction_keeps_each_database_separate() {
    let mut server = Server::start(&[
        "--segment-size",
        "4096",
        "--compact-min-size",
        "16384",
        "--fsync",
        "no",
    ]);
    let mut r = server.conn();
    let want = write_state(&mut r);
    // Overwrite one key until the log outgrows the data and a snapshot is taken.
    select(&mut r, 9);
    let snapshots = |server: &Server| {
        std::fs::read_dir(server.data_dir().path())
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".snap"))
                    .count()
            })
            .unwrap_or(0)
    };
    let filler = "x".repeat(200);
    wait_until(SOON, "a snapshot to be written", || {
        for _ in 0..50 {
            let _: String = q(&mut r, "SET", &["churn", &filler]);
        }
        snapshots(&server) > 0
    });
    let _: i64 = q(&mut r, "DEL", &["churn"]);
    check_state(&mut r, &want);
    drop(r);
    server.kill9();
    server.restart();
    assert!(snapshots(&server) > 0);
    let mut r = server.conn();
    check_state(&mut r, &want);
    select(&mut r, 9);
    assert_eq!(dbsize(&mut r), 0);
}

/// A data directory that uses database 10, opened with `--databases 4`, is refused with
/// a message that says why (as Redis refuses an RDB with more databases), rather than
/// dropping or misplacing its keys.
#[test]
fn fewer_databases_than_the_data_uses_is_refused() {
    let dir = DataDir::new();
    let mut server = Server::start_in(&dir, &[]);
    let mut r = server.conn();
    select(&mut r, 10);
    let _: String = q(&mut r, "SET", &["k", "v"]);
    drop(r);
    server.terminate();

    let log = dir.root().join("refused.log");
    let mut child = Command::new(KVSTORE_BIN)
        .args(["server", "0", "--databases", "4", "--data-dir"])
        .arg(dir.path())
        .env_remove("KVSTORE_DATABASES")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log).expect("log file"))
        .spawn()
        .expect("start kvstore");
    let end = Instant::now() + SOON;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "kvstore --databases 4 started on data that uses database 10:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        thread::sleep(POLL);
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!status.success(), "{text}");
    assert!(
        text.contains("database 10") && text.contains("--databases"),
        "the refusal names the database and the flag: {text}"
    );
    // With enough databases it starts and has the key.
    let server = Server::start_in(&dir, &["--databases", "11"]);
    let mut r = server.conn();
    select(&mut r, 10);
    assert_eq!(get(&mut r, "k").as_deref(), Some("v"));
}
