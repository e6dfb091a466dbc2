//! systemd integration (issue 14, item 1): a real `kvstore server` started with a fake
//! `$NOTIFY_SOCKET`, a Unix datagram socket the test binds, as systemd would for a
//! `Type=notify` unit. The test reads what the server sends and checks the messages
//! and their order:
//!
//! - nothing but `STATUS=` before `READY=1`; `READY=1` comes with a `STATUS=` that
//!   says what the node is (a cluster member: a leader, or a follower of a named
//!   leader); then `WATCHDOG=1` pings when `$WATCHDOG_USEC` is set; `SIGTERM` brings
//!   `STOPPING=1`, after READY, and nothing after it;
//! - the watchdog pings come from a health check, not a timer: while `DEBUG SLEEP`
//!   holds the store's map lock (a stuck node), the pings stop, and they resume after;
//! - `$NOTIFY_SOCKET=@name` (a Linux abstract socket) works too.
//!
//! `$WATCHDOG_PID` is left unset: the child's pid is not known before it is spawned,
//! and unset means "whoever reads it" (`sd_watchdog_enabled(3)`).
//!
//! Every wait has a deadline; the one count made over a stretch of time (pings during
//! the sleep) compares orders of magnitude (a timer would send ~25, the health check
//! sends none; a few are allowed for pings read late), never how long anything took.

mod common;

use common::cluster::{ELECTION_DEADLINE, SECRET};
use common::{DataDir, Server, free_port};
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

/// How long to wait for a message the server must send (READY on a cluster member
/// waits for an election: as long as the cluster tests allow one).
const MSG_DEADLINE: Duration = ELECTION_DEADLINE;

/// One datagram as received, stamped when the reader thread got it.
#[derive(Debug, Clone)]
struct Note {
    at: Instant,
    text: String,
}

impl Note {
    fn lines(&self) -> Vec<&str> {
        self.text.lines().collect()
    }

    fn has(&self, line: &str) -> bool {
        self.lines().contains(&line)
    }

    fn status(&self) -> Option<&str> {
        self.lines()
            .into_iter()
            .find_map(|l| l.strip_prefix("STATUS="))
    }

    /// Only STATUS lines.
    fn status_only(&self) -> bool {
        self.lines().iter().all(|l| l.starts_with("STATUS="))
    }
}

/// A fake service manager's notification socket: bound here, read by a thread that
/// stamps and forwards every datagram as soon as it arrives.
struct NotifySocket {
    /// The value for `$NOTIFY_SOCKET`.
    env: String,
    rx: Receiver<Note>,
    /// Everything received so far, in order.
    seen: Vec<Note>,
    _dir: Option<tempfile::TempDir>,
}

impl NotifySocket {
    /// A socket file in a temp dir.
    fn path() -> NotifySocket {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        NotifySocket::reading(sock, path.display().to_string(), Some(dir))
    }

    /// A Linux abstract socket (`@name`), named uniquely for this process and port.
    fn abstract_name(tag: &str) -> NotifySocket {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("kvstore-test-{}-{tag}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract name");
        let sock = UnixDatagram::bind_addr(&addr).expect("bind the abstract notify socket");
        NotifySocket::reading(sock, format!("@{name}"), None)
    }

    fn reading(sock: UnixDatagram, env: String, dir: Option<tempfile::TempDir>) -> NotifySocket {
        let (tx, rx) = mpsc::channel();
        // The thread ends when the test drops the receiver (the next datagram's send
        // fails) or, at the latest, with the test process.
        thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                let note = Note {
                    at: Instant::now(),
                    text: String::from_utf8_lossy(&buf[..n]).into_owned(),
                };
                if tx.send(note).is_err() {
                    return;
                }
            }
        });
        NotifySocket {
            env,
            rx,
            seen: Vec::new(),
            _dir: dir,
        }
    }

    /// Receives until a datagram satisfies `pred` (returned), panicking after
    /// [`MSG_DEADLINE`] with everything seen.
    #[track_caller]
    fn wait_for(&mut self, what: &str, pred: impl Fn(&Note) -> bool) -> Note {
        let end = Instant::now() + MSG_DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(n) => {
                    self.seen.push(n.clone());
                    if pred(&n) {
                        return n;
                    }
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                    panic!(
                        "no {what} within {MSG_DEADLINE:?}; received: {:?}",
                        self.texts()
                    )
                }
            }
        }
    }

    /// Takes in whatever has arrived by now, without waiting.
    fn drain(&mut self) {
        while let Ok(n) = self.rx.try_recv() {
            self.seen.push(n);
        }
    }

    fn texts(&self) -> Vec<&str> {
        self.seen.iter().map(|n| n.text.as_str()).collect()
    }

    /// The position of the first datagram with `line`.
    fn position(&self, line: &str) -> Option<usize> {
        self.seen.iter().position(|n| n.has(line))
    }

    /// Waits for READY=1 and checks that only STATUS came before it; returns its STATUS.
    #[track_caller]
    fn expect_ready(&mut self) -> String {
        let ready = self.wait_for("READY=1", |n| n.has("READY=1"));
        let i = self.position("READY=1").expect("READY=1 was seen");
        for n in &self.seen[..i] {
            assert!(n.status_only(), "before READY=1: {:?}", self.texts());
        }
        ready
            .status()
            .unwrap_or_else(|| panic!("READY=1 without STATUS=: {:?}", ready.text))
            .to_string()
    }

    /// After the server exited: STOPPING=1 came, after READY=1, and nothing after it.
    #[track_caller]
    fn expect_stopped_last(&mut self) {
        self.wait_for("STOPPING=1", |n| n.has("STOPPING=1"));
        self.drain();
        let stop = self.position("STOPPING=1").expect("STOPPING=1 was seen");
        let ready = self.position("READY=1").expect("READY=1 was seen");
        assert!(ready < stop, "READY after STOPPING: {:?}", self.texts());
        assert_eq!(
            stop,
            self.seen.len() - 1,
            "sent after STOPPING: {:?}",
            self.texts()
        );
    }

    fn pings(&self) -> usize {
        self.seen.iter().filter(|n| n.has("WATCHDOG=1")).count()
    }
}

fn start_node(
    sock: &NotifySocket,
    port: Option<u16>,
    args: &[&str],
    env: &[(&str, &str)],
) -> Server {
    let mut envs = vec![("NOTIFY_SOCKET", sock.env.as_str())];
    envs.extend_from_slice(env);
    Server::start_with_env(&DataDir::new(), port, args, &envs)
}

#[test]
fn single_node_ready_watchdog_that_stops_when_stuck_then_stopping() {
    let mut sock = NotifySocket::path();
    // Pings every 200 ms (half the timeout).
    let mut server = start_node(
        &sock,
        None,
        &["--enable-debug-command"],
        &[("WATCHDOG_USEC", "400000")],
    );
    let status = sock.expect_ready();
    assert_eq!(
        status,
        format!("single node, serving on 127.0.0.1:{}", server.port)
    );
    for k in 1..=3 {
        sock.wait_for(&format!("WATCHDOG=1 #{k}"), |n| n.has("WATCHDOG=1"));
    }

    // A stuck node: DEBUG SLEEP holds the map lock for 5 s, so the health check blocks
    // and pings stop. A timer would send ~25 meanwhile; allow a few sent before the
    // server got to the command or read late by the reader thread (a loaded machine).
    let mut conn = server.conn();
    sock.drain();
    let sent = Instant::now();
    let reply: String = redis::cmd("DEBUG")
        .arg("SLEEP")
        .arg(5)
        .query(&mut conn)
        .expect("DEBUG SLEEP");
    let answered = Instant::now();
    assert_eq!(reply, "OK");
    sock.drain();
    // The status line said why (the check gives up on the lock after a ping interval).
    assert!(
        sock.seen.iter().any(|n| n.at > sent
            && n.text.contains("STATUS=single node")
            && n.text
                .contains("; unhealthy: the store's map has been locked for over")),
        "no STATUS saying the store was stuck: {:?}",
        sock.texts()
    );
    let during = sock
        .seen
        .iter()
        .filter(|n| n.has("WATCHDOG=1") && n.at > sent && n.at < answered)
        .count();
    assert!(
        during <= 8,
        "{during} watchdog pings while the node was stuck for 5 s (a timer, not a health \
         check?)"
    );
    // And they resume once it is not.
    let before = sock.pings();
    while sock.pings() < before + 2 {
        sock.wait_for("WATCHDOG=1 after the sleep", |n| n.has("WATCHDOG=1"));
    }

    assert!(server.terminate().success());
    sock.expect_stopped_last();
}

#[test]
fn abstract_notify_socket_and_shutdown_command() {
    let mut sock = NotifySocket::abstract_name("abstract");
    let server = start_node(&sock, None, &[], &[]);
    let status = sock.expect_ready();
    assert!(status.starts_with("single node, serving on"), "{status}");
    // SHUTDOWN (not a signal) also says STOPPING=1.
    let mut conn = server.conn();
    let _ = redis::cmd("SHUTDOWN").query::<()>(&mut conn);
    sock.expect_stopped_last();
    // No watchdog asked for: no pings.
    assert_eq!(sock.pings(), 0, "{:?}", sock.texts());
}

#[test]
fn cluster_members_are_ready_only_once_they_know_a_leader() {
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut socks: Vec<NotifySocket> = (0..3).map(|_| NotifySocket::path()).collect();
    let mut nodes = Vec::new();
    for (i, &port) in ports.iter().enumerate() {
        let peers: Vec<String> = ports
            .iter()
            .filter(|&&p| p != port)
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let peers = peers.join(",");
        nodes.push(start_node(
            &socks[i],
            Some(port),
            &[&peers, "--cluster-secret", SECRET],
            &[("WATCHDOG_USEC", "2000000")],
        ));
    }
    let ids: Vec<String> = ports.iter().map(|p| p.to_string()).collect();
    for (i, sock) in socks.iter_mut().enumerate() {
        let status = sock.expect_ready();
        let on = format!("on 127.0.0.1:{}", ports[i]);
        assert!(status.ends_with(&on), "{status}");
        let leads = status.starts_with("leader, epoch ");
        let follows = status
            .strip_prefix("follower of ")
            .and_then(|r| r.split(' ').next())
            .is_some_and(|leader| ids.iter().any(|id| id == leader) && *leader != ids[i]);
        assert!(leads || follows, "node {}: READY with {status:?}", ports[i]);
        sock.wait_for("WATCHDOG=1", |n| n.has("WATCHDOG=1"));
    }
    for (node, sock) in nodes.iter_mut().zip(socks.iter_mut()) {
        assert!(node.terminate().success());
        sock.expect_stopped_last();
    }
}
