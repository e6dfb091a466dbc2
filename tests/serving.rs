//! The serving rules of a cluster member, with real sockets, in one process: in-process
//! [`Server`]s on free 127.0.0.1 ports whose [`ClusterState`] the test publishes by
//! hand (no node thread runs), so each rule is checked against an exact role, leader,
//! lease and set of follower acknowledgements.
//!
//! What is checked: a follower answers `-MOVED 0 <leader>` to writes and reads (pipelined
//! ones too) and logs nothing, and `-CLUSTERDOWN` while no leader is known; READONLY
//! reads its local copy (an expired key reads as missing), READWRITE undoes it;
//! connection and server commands are served everywhere; a leader whose lease lapsed
//! serves nothing; a transaction is refused as a whole when the node stops leading
//! before EXEC, and a READONLY read-only transaction runs on a follower without
//! logging; INFO replication and ROLE on a leader and a follower; WAIT on a cluster of
//! one and on a leader with hand-set acknowledgements; `kvstore client` follows MOVED
//! from one in-process server to another, in one-shot and interactive mode.
//!
//! The stores are clusters of one underneath (they commit their own appends), so a
//! "follower" holds whatever the test wrote through the store API before publishing
//! its role, and a "leader" commits its clients' writes at once.

mod common;

use common::KVSTORE_BIN;
use kvstore::client::Connection;
use kvstore::cluster::{ClusterState, FollowerInfo, Role, RoleInfo};
use kvstore::commands::{Context, Settings};
use kvstore::db::{Condition, Expiry, Op};
use kvstore::protocol::{Limits, Value};
use kvstore::server::{Server, ServerConfig, ShutdownHandle};
use kvstore::store::{Clock, Options};
use kvstore::wal::FsyncPolicy;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

const T0: u64 = 1_700_000_000_000;
const LEADER_ADDR: &str = "127.0.0.1:7003";

/// A running in-process server, a cluster member whose role the test publishes.
struct Node {
    addr: SocketAddr,
    ctx: Arc<Context>,
    /// `None`: a cluster of one.
    state: Option<Arc<ClusterState>>,
    /// The store's clock (Unix ms), for expiry.
    clock: Arc<AtomicU64>,
    handle: ShutdownHandle,
    thread: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.handle.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts a server; `prepare` runs on its context before the role is published and the
/// server accepts clients (to put data in its store).
fn start(node_id: u64, role: Option<RoleInfo>, prepare: impl FnOnce(&Context)) -> Node {
    let dir = tempfile::Builder::new()
        .prefix("kvstore-serving-test-")
        .tempdir()
        .expect("temp dir");
    let clock = Arc::new(AtomicU64::new(T0));
    let c = clock.clone();
    let cfg = ServerConfig {
        bind: "127.0.0.1".into(),
        port: 0,
        data_dir: dir.path().join("data"),
        store: Options {
            fsync: FsyncPolicy::No,
            clock: Clock::new(move || c.load(Ordering::SeqCst)),
            // Only the leader expires keys; nothing here should delete on its own.
            active_expiry: false,
            ..Options::default()
        },
        settings: Settings {
            node_id,
            ..Settings::default()
        },
        limits: Limits::default(),
    };
    let server = Server::bind(cfg).expect("bind a server");
    let ctx = server.context();
    prepare(&ctx);
    let state = role.map(|r| {
        let st = Arc::new(ClusterState::new(r));
        ctx.set_cluster(st.clone());
        st
    });
    let addr = server.local_addr();
    let handle = server.shutdown_handle();
    let thread = thread::spawn(move || server.run().expect("server ran"));
    Node {
        addr,
        ctx,
        state,
        clock,
        handle,
        thread: Some(thread),
        _dir: dir,
    }
}

impl Node {
    fn conn(&self) -> Conn {
        Conn(
            Connection::connect("127.0.0.1", self.addr.port(), Some(Duration::from_secs(5)))
                .expect("connect"),
        )
    }

    fn redis(&self) -> redis::Connection {
        let c = redis::Client::open(format!("redis://{}/", self.addr)).expect("client");
        let conn = c
            .get_connection_with_timeout(Duration::from_secs(5))
            .expect("connect");
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        conn
    }

    fn publish(&self, info: RoleInfo) {
        self.state.as_ref().expect("a cluster member").publish(info);
    }

    /// The log's last index: it must not move when a request is refused.
    fn last_index(&self) -> u64 {
        self.ctx.store.log_info().last_index
    }
}

/// A connection whose replies are compared exactly (the `redis` crate turns `-MOVED`
/// into its own error kinds).
struct Conn(Connection);

impl Conn {
    fn req(&mut self, line: &str) -> Value {
        let args = kvstore::client::split_args(line).expect("a command line");
        self.0.request(&args).expect("a reply")
    }
}

fn ok() -> Value {
    Value::Simple("OK".into())
}
fn bulk(s: &str) -> Value {
    Value::Bulk(s.as_bytes().to_vec())
}
fn moved() -> Value {
    Value::Error(format!("MOVED 0 {LEADER_ADDR}"))
}
fn clusterdown() -> Value {
    Value::Error("CLUSTERDOWN no leader elected".into())
}

/// Node 2 following node 3 (at [`LEADER_ADDR`]) in epoch 5, link up.
fn follower_info() -> RoleInfo {
    RoleInfo {
        leader: Some(3),
        leader_addr: Some(LEADER_ADDR.into()),
        leader_link_up: true,
        commit: 4,
        last_index: 4,
        ..RoleInfo::starting(2, 5)
    }
}

/// Node 3 leading epoch 5 with a lease a minute long and `followers`.
fn leader_info(followers: Vec<FollowerInfo>) -> RoleInfo {
    RoleInfo {
        role: Role::Leader,
        leader: Some(3),
        leader_addr: Some(LEADER_ADDR.into()),
        lease_until: Some(Instant::now() + Duration::from_secs(60)),
        followers,
        ..RoleInfo::starting(3, 5)
    }
}

fn follower(id: u64, port: u16, connected: bool, acked: u64, lag: u64) -> FollowerInfo {
    FollowerInfo {
        id,
        addr: format!("127.0.0.1:{port}"),
        connected,
        acked,
        lag,
    }
}

/// Writes `k` = `v` (and `gone`, expiring at T0 + 1 s) through the store API.
fn seed(ctx: &Context) {
    let set = |key: &str, value: &str, expiry| Op::Set {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        expiry,
        condition: Condition::Always,
        get: false,
    };
    ctx.store
        .write(
            0,
            vec![
                set("k", "v", Expiry::Never),
                set("gone", "x", Expiry::At(T0 + 1000)),
            ],
        )
        .expect("seed the store");
}

#[test]
fn a_follower_redirects_writes_and_reads_and_logs_nothing() {
    let n = start(2, Some(follower_info()), seed);
    let before = n.last_index();
    let mut c = n.conn();
    assert_eq!(c.req("SET k w"), moved());
    assert_eq!(c.req("GET k"), moved());
    for line in [
        "MGET k",
        "EXISTS k",
        "DBSIZE",
        "KEYS *",
        "SCAN 0",
        "TTL k",
        "RANDOMKEY",
    ] {
        assert_eq!(c.req(line), moved(), "{line}");
    }
    for line in ["DEL k", "INCR n", "FLUSHALL", "EXPIRE k 10", "MSET a 1 b 2"] {
        assert_eq!(c.req(line), moved(), "{line}");
    }
    // Connection and server commands are served on any node.
    assert_eq!(c.req("PING"), Value::Simple("PONG".into()));
    assert_eq!(c.req("ECHO hi"), bulk("hi"));
    assert_eq!(c.req("SELECT 1"), ok());
    assert_eq!(c.req("CLIENT SETNAME me"), ok());
    assert!(matches!(c.req("INFO server"), Value::Bulk(_)));
    assert!(matches!(c.req("CONFIG GET maxclients"), Value::Array(_)));
    // HELLO's role is Redis's word for a replica.
    let Value::Array(hello) = c.req("HELLO 2") else {
        panic!("HELLO 2 answers a flat array");
    };
    let role = hello.iter().position(|v| *v == bulk("role"));
    assert_eq!(role.and_then(|i| hello.get(i + 1)), Some(&bulk("replica")));
    assert_eq!(n.last_index(), before, "nothing refused was logged");
    assert_eq!(n.ctx.store.get(b"k"), Some(b"v".to_vec()));
    assert_eq!(n.ctx.store.get(b"a"), None);
}

#[test]
fn pipelined_requests_are_each_gated() {
    let n = start(2, Some(follower_info()), seed);
    let before = n.last_index();
    let mut pipeline = Vec::new();
    for line in [
        "SET a 1", "PING", "GET a", "SET b 2", "READONLY", "GET k", "SET c 3",
    ] {
        let args = kvstore::client::split_args(line).unwrap();
        let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        kvstore::protocol::encode_command(&refs, &mut pipeline);
    }
    let m = format!("-MOVED 0 {LEADER_ADDR}\r\n");
    let want = format!("{m}+PONG\r\n{m}{m}+OK\r\n$1\r\nv\r\n{m}");
    let mut raw = std::net::TcpStream::connect(n.addr).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    raw.write_all(&pipeline).unwrap();
    let mut got = vec![0; want.len()];
    raw.read_exact(&mut got).unwrap();
    assert_eq!(String::from_utf8_lossy(&got), want);
    assert_eq!(n.last_index(), before);
}

#[test]
fn with_no_leader_a_member_answers_clusterdown() {
    let n = start(2, Some(RoleInfo::starting(2, 5)), seed);
    let mut c = n.conn();
    assert_eq!(c.req("SET k w"), clusterdown());
    assert_eq!(c.req("GET k"), clusterdown());
    assert_eq!(c.req("WAIT 1 0"), clusterdown());
    assert_eq!(c.req("PING"), Value::Simple("PONG".into()));
    // A candidate knows no leader either.
    n.publish(RoleInfo {
        role: Role::Candidate,
        ..RoleInfo::starting(2, 6)
    });
    assert_eq!(c.req("SET k w"), clusterdown());
    assert_eq!(n.ctx.store.get(b"k"), Some(b"v".to_vec()));
}

#[test]
fn readonly_reads_the_local_copy_and_readwrite_undoes_it() {
    let n = start(2, Some(follower_info()), seed);
    let before = n.last_index();
    let mut c = n.conn();
    assert_eq!(c.req("READONLY"), ok());
    assert_eq!(c.req("GET k"), bulk("v"));
    assert_eq!(
        c.req("MGET k gone"),
        Value::Array(vec![bulk("v"), bulk("x")])
    );
    assert_eq!(c.req("DBSIZE"), Value::Integer(2));
    // Writes still go to the leader.
    assert_eq!(c.req("SET k w"), moved());
    // An expired key reads as missing by the clock, and the follower deletes nothing.
    n.clock.store(T0 + 5000, Ordering::SeqCst);
    assert_eq!(c.req("GET gone"), Value::Null);
    assert_eq!(c.req("EXISTS gone"), Value::Integer(0));
    assert_eq!(c.req("TTL gone"), Value::Integer(-2));
    assert_eq!(c.req("TOUCH gone"), Value::Integer(0));
    assert_eq!(c.req("READWRITE"), ok());
    assert_eq!(c.req("GET k"), moved());
    assert_eq!(
        n.last_index(),
        before,
        "a follower logs nothing, not even expiry"
    );
    // Another connection never said READONLY.
    assert_eq!(n.conn().req("GET k"), moved());
}

#[test]
fn a_leader_whose_lease_lapsed_serves_nothing() {
    let n = start(3, Some(leader_info(vec![])), |_| {});
    let mut c = n.conn();
    assert_eq!(c.req("SET k 1"), ok());
    assert_eq!(c.req("GET k"), bulk("1"));
    n.publish(RoleInfo {
        lease_until: Some(Instant::now() - Duration::from_millis(1)),
        ..leader_info(vec![])
    });
    // It says why: no election is under way.
    let lapsed = Value::Error(
        "CLUSTERDOWN this leader cannot reach a majority (its lease lapsed): retry".into(),
    );
    assert_eq!(c.req("GET k"), lapsed);
    assert_eq!(c.req("SET k 2"), lapsed);
    // A leader handing over reads but takes no write.
    n.publish(RoleInfo {
        handing_over: true,
        ..leader_info(vec![])
    });
    assert_eq!(c.req("GET k"), bulk("1"));
    assert_eq!(
        c.req("SET k 2"),
        Value::Error("CLUSTERDOWN this leader is handing over to a returning node: retry".into())
    );
    assert_eq!(n.ctx.store.get(b"k"), Some(b"1".to_vec()));
}

#[test]
fn a_transaction_is_refused_as_a_whole_when_the_node_stops_leading() {
    let n = start(3, Some(leader_info(vec![])), seed);
    let mut c = n.conn();
    assert_eq!(c.req("MULTI"), ok());
    assert_eq!(c.req("SET k w"), Value::Simple("QUEUED".into()));
    assert_eq!(c.req("INCR n"), Value::Simple("QUEUED".into()));
    let before = n.last_index();
    // Deposed between queueing and EXEC.
    n.publish(follower_info());
    assert_eq!(c.req("EXEC"), moved());
    assert_eq!(n.last_index(), before, "nothing logged");
    assert_eq!(n.ctx.store.get(b"k"), Some(b"v".to_vec()));
    assert_eq!(n.ctx.store.get(b"n"), None);
    assert_eq!(
        c.req("EXEC"),
        Value::Error("ERR EXEC without MULTI".into()),
        "the transaction is gone"
    );
    // On a follower, a write is refused while queueing and EXEC aborts (as Redis
    // Cluster: the redirect at once, then EXECABORT).
    assert_eq!(c.req("MULTI"), ok());
    assert_eq!(c.req("SET k w"), moved());
    assert_eq!(c.req("PING"), Value::Simple("QUEUED".into()));
    assert!(matches!(c.req("EXEC"), Value::Error(e) if e.starts_with("EXECABORT")));
    // WATCH reads: the read gate.
    assert_eq!(c.req("WATCH k"), moved());
    // A read-only transaction on a READONLY connection reads the local copy, logging
    // nothing.
    assert_eq!(c.req("READONLY"), ok());
    assert_eq!(c.req("WATCH k"), ok());
    assert_eq!(c.req("MULTI"), ok());
    assert_eq!(c.req("GET k"), Value::Simple("QUEUED".into()));
    assert_eq!(c.req("EXISTS k nope"), Value::Simple("QUEUED".into()));
    assert_eq!(c.req("PING"), Value::Simple("QUEUED".into()));
    assert_eq!(
        c.req("EXEC"),
        Value::Array(vec![
            bulk("v"),
            Value::Integer(1),
            Value::Simple("PONG".into())
        ])
    );
    // ... but a write in it sends the whole transaction to the leader.
    assert_eq!(c.req("MULTI"), ok());
    assert_eq!(c.req("GET k"), Value::Simple("QUEUED".into()));
    assert_eq!(c.req("SET k w"), moved());
    assert!(matches!(c.req("EXEC"), Value::Error(e) if e.starts_with("EXECABORT")));
    assert_eq!(n.last_index(), before);
}

#[test]
fn info_replication_on_a_leader_and_a_follower() {
    let leader = start(
        3,
        Some(RoleInfo {
            commit: 9,
            last_index: 10,
            ..leader_info(vec![
                follower(1, 7001, true, 10, 0),
                follower(2, 7002, false, 6, 4),
            ])
        }),
        |_| {},
    );
    let info: redis::InfoDict = redis::cmd("INFO")
        .arg("replication")
        .query(&mut leader.redis())
        .expect("INFO");
    let get = |k: &str| info.get::<String>(k);
    assert_eq!(get("role").as_deref(), Some("master"));
    assert_eq!(get("connected_slaves").as_deref(), Some("1"));
    assert_eq!(
        get("slave0").as_deref(),
        Some("ip=127.0.0.1,port=7001,state=online,offset=10,lag=0")
    );
    assert_eq!(
        get("slave1").as_deref(),
        Some("ip=127.0.0.1,port=7002,state=wait_bgsave,offset=6,lag=4")
    );
    assert_eq!(get("epoch").as_deref(), Some("5"));
    assert_eq!(get("leader_id").as_deref(), Some("3"));
    assert_eq!(get("node_id").as_deref(), Some("3"));
    assert_eq!(get("commit_index").as_deref(), Some("9"));
    assert_eq!(get("last_index").as_deref(), Some("10"));
    assert_eq!(get("master_host"), None);

    let f = start(2, Some(follower_info()), |_| {});
    let mut c = f.redis();
    let info: redis::InfoDict = redis::cmd("INFO").query(&mut c).expect("INFO");
    let get = |k: &str| info.get::<String>(k);
    assert_eq!(get("role").as_deref(), Some("slave"));
    assert_eq!(get("master_host").as_deref(), Some("127.0.0.1"));
    assert_eq!(get("master_port").as_deref(), Some("7003"));
    assert_eq!(get("master_link_status").as_deref(), Some("up"));
    assert_eq!(get("epoch").as_deref(), Some("5"));
    assert_eq!(get("leader_id").as_deref(), Some("3"));
    assert_eq!(get("node_id").as_deref(), Some("2"));
    assert_eq!(get("commit_index").as_deref(), Some("4"));
    f.publish(RoleInfo {
        leader_link_up: false,
        ..follower_info()
    });
    let info: redis::InfoDict = redis::cmd("INFO").arg("replication").query(&mut c).unwrap();
    assert_eq!(
        info.get::<String>("master_link_status").as_deref(),
        Some("down")
    );
    // No leader: leader_id 0, no master address.
    f.publish(RoleInfo::starting(2, 6));
    let info: redis::InfoDict = redis::cmd("INFO").arg("replication").query(&mut c).unwrap();
    assert_eq!(info.get::<String>("leader_id").as_deref(), Some("0"));
    assert_eq!(info.get::<String>("epoch").as_deref(), Some("6"));
    assert_eq!(info.get::<String>("master_host"), None);
    assert_eq!(
        info.get::<String>("master_link_status").as_deref(),
        Some("down")
    );

    // A cluster of one leads itself.
    let one = start(7, None, |_| {});
    let info: redis::InfoDict = redis::cmd("INFO")
        .arg("replication")
        .query(&mut one.redis())
        .unwrap();
    assert_eq!(info.get::<String>("role").as_deref(), Some("master"));
    assert_eq!(info.get::<String>("connected_slaves").as_deref(), Some("0"));
    assert_eq!(info.get::<String>("leader_id").as_deref(), Some("7"));
    assert_eq!(info.get::<String>("node_id").as_deref(), Some("7"));
}

#[test]
fn role_as_redis_7_shapes_it() {
    let leader = start(
        3,
        Some(RoleInfo {
            last_index: 10,
            ..leader_info(vec![
                follower(1, 7001, true, 10, 0),
                follower(2, 7002, false, 6, 4),
            ])
        }),
        |_| {},
    );
    assert_eq!(
        leader.conn().req("ROLE"),
        Value::Array(vec![
            bulk("master"),
            Value::Integer(10),
            Value::Array(vec![Value::Array(vec![
                bulk("127.0.0.1"),
                bulk("7001"),
                bulk("10")
            ])]),
        ])
    );
    let f = start(2, Some(follower_info()), |_| {});
    let mut c = f.conn();
    assert_eq!(
        c.req("ROLE"),
        Value::Array(vec![
            bulk("slave"),
            bulk("127.0.0.1"),
            Value::Integer(7003),
            bulk("connected"),
            Value::Integer(4),
        ])
    );
    f.publish(RoleInfo::starting(2, 6));
    assert_eq!(
        c.req("ROLE"),
        Value::Array(vec![
            bulk("slave"),
            bulk(""),
            Value::Integer(0),
            bulk("connect"),
            Value::Integer(0),
        ])
    );
    // Parsed by a client library too.
    let (kind, rest): (String, redis::Value) = {
        let v: Vec<redis::Value> = redis::cmd("ROLE").query(&mut leader.redis()).unwrap();
        let kind = redis::from_redis_value(v[0].clone()).unwrap();
        (kind, v[2].clone())
    };
    assert_eq!(kind, "master");
    assert!(matches!(rest, redis::Value::Array(ref r) if r.len() == 1));
}

#[test]
fn wait_on_a_cluster_of_one_and_on_a_leader() {
    let one = start(1, None, |_| {});
    let mut c = one.conn();
    assert_eq!(c.req("SET k v"), ok());
    assert_eq!(c.req("WAIT 1 0"), Value::Integer(0), "no replicas: at once");
    assert_eq!(
        c.req("WAIT 1 -1"),
        Value::Error("ERR timeout is negative".into())
    );

    let n = start(3, Some(leader_info(vec![])), |_| {});
    let mut c = n.conn();
    assert_eq!(c.req("SET k 1"), ok());
    assert_eq!(c.req("SET k 2"), ok());
    let written = n.last_index();
    // Followers behind this connection's last write: WAIT times out with what it has.
    n.publish(leader_info(vec![
        follower(1, 7001, true, written, 0),
        follower(2, 7002, true, written - 1, 1),
    ]));
    assert_eq!(c.req("WAIT 2 50"), Value::Integer(1));
    assert_eq!(c.req("WAIT 0 0"), Value::Integer(1), "nothing to wait for");
    // Released by an acknowledgement published while it waits (or before it started:
    // the answer is the same).
    let waiter = {
        let addr = n.addr;
        thread::spawn(move || {
            let mut c = Connection::connect("127.0.0.1", addr.port(), None).unwrap();
            let w = |l: &str| kvstore::client::split_args(l).unwrap();
            c.request(&w("SET k 3")).unwrap();
            c.request(&w("WAIT 2 0")).unwrap()
        })
    };
    common::wait_until(Duration::from_secs(20), "the waiter's write", || {
        n.ctx.store.get(b"k") == Some(b"3".to_vec())
    });
    let written = n.last_index();
    n.publish(leader_info(vec![
        follower(1, 7001, true, written, 0),
        follower(2, 7002, true, written, 0),
    ]));
    assert_eq!(waiter.join().unwrap(), Value::Integer(2));
    // A follower whose link is down does not count (as Redis counts its connected
    // replicas).
    n.publish(leader_info(vec![
        follower(1, 7001, true, written, 0),
        follower(2, 7002, false, written, 0),
    ]));
    assert_eq!(c.req("WAIT 2 20"), Value::Integer(1));
    // Inside a transaction WAIT does not block (Redis 7): after the transaction's own
    // write no follower has acknowledged it yet.
    assert_eq!(c.req("MULTI"), ok());
    assert_eq!(c.req("SET k 4"), Value::Simple("QUEUED".into()));
    assert_eq!(c.req("WAIT 2 0"), Value::Simple("QUEUED".into()));
    assert_eq!(c.req("EXEC"), Value::Array(vec![ok(), Value::Integer(0)]));
    // A follower refuses WAIT with the redirect.
    n.publish(follower_info());
    assert_eq!(c.req("WAIT 1 0"), moved());
}

/// The client binary against two in-process servers: a follower that redirects to a
/// leader.
#[test]
fn the_client_follows_moved_to_the_leader() {
    let leader = start(3, None, |_| {});
    let leader_addr = leader.addr.to_string();
    let info = RoleInfo {
        leader: Some(3),
        leader_addr: Some(leader_addr.clone()),
        leader_link_up: true,
        ..RoleInfo::starting(2, 5)
    };
    let f = start(2, Some(info), |_| {});
    let port = f.addr.port().to_string();
    // One-shot mode.
    let out = Command::new(KVSTORE_BIN)
        .args(["client", "-p", &port, "-n", "2", "SET", "k", "v"])
        .output()
        .expect("run kvstore client");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "OK\n");
    let mut on_leader = leader.conn();
    assert_eq!(on_leader.req("SELECT 2"), ok());
    assert_eq!(
        on_leader.req("GET k"),
        bulk("v"),
        "in the database selected"
    );
    // Interactive mode says where it went.
    let mut child = Command::new(KVSTORE_BIN)
        .args(["client", "-p", &port])
        .env("KVSTORE_HISTFILE", "/dev/null")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kvstore client");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"SET j w\nGET j\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains(&format!(
            "-> Redirected to slot [0] located at {leader_addr}"
        )),
        "{stdout}"
    );
    assert!(stdout.contains("OK") && stdout.contains('w'), "{stdout}");
    assert_eq!(on_leader.req("SELECT 0"), ok());
    assert_eq!(on_leader.req("GET j"), bulk("w"));
    // CLUSTERDOWN is shown as is.
    f.publish(RoleInfo::starting(2, 6));
    let out = Command::new(KVSTORE_BIN)
        .args(["client", "-p", &port, "SET", "k", "v"])
        .output()
        .expect("run kvstore client");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("CLUSTERDOWN no leader elected"),
        "{out:?}"
    );
}
