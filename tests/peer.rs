//! Peer links with real sockets, in one process: in-process [`Server`]s on free
//! 127.0.0.1 ports, each with a [`PeerNet`] attached, so the links go through the very
//! path a node uses (a dialer connects to the client port, the server recognises
//! `PEER HELLO` and hands the connection to the peer links).
//!
//! What is checked: messages flow both ways and in order between three nodes; a wrong
//! secret and a duplicate id are refused with the logged reason; a link comes back after
//! its socket is cut (a TCP proxy the test controls sits in front of a peer, which also
//! shows a node known by the id it proves behind another address); a frame that fails
//! its CRC closes the link; `PEER` typed by a client gets an error and the client stays
//! a client. Conditions are polled with deadlines; nothing sleeps and hopes.
//!
//! Logs are captured by a logger of this test binary; each test uses its own node ids,
//! so tests running in parallel do not read each other's lines.

mod common;

use common::wait_until;
use crossbeam_channel::Receiver;
use kvstore::commands::Settings;
use kvstore::config::{ClusterConfig, Peer};
use kvstore::peer::{
    FrameDecoder, HandshakeConfig, Incoming, NONCE_LEN, PEER_STARTING, PeerNet, PeerStatus,
    QUEUE_MESSAGES, STARTUP_GRACE, encode_frame,
};
use kvstore::protocol::Limits;
use kvstore::server::{Server, ServerConfig, ShutdownHandle};
use kvstore::store::Options;
use kvstore::wal::FsyncPolicy;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(20);

// --- captured logs ---------------------------------------------------------------------

struct Capture;

static CAPTURE: Capture = Capture;

static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Info
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            let line = format!("{} {}", r.level(), r.args());
            eprintln!("{line}");
            LINES.lock().unwrap().push(line);
        }
    }
    fn flush(&self) {}
}

fn capture_logs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        log::set_logger(&CAPTURE).expect("logger");
        log::set_max_level(log::LevelFilter::Info);
    });
}

/// Whether a line containing every one of `parts` was logged.
fn logged(parts: &[&str]) -> bool {
    LINES
        .lock()
        .unwrap()
        .iter()
        .any(|l| parts.iter().all(|p| l.contains(p)))
}

// --- nodes -----------------------------------------------------------------------------

/// A bound server that is not running yet (its address is needed for the others'
/// configurations first).
struct Bound {
    server: Server,
    dir: tempfile::TempDir,
}

fn bind() -> Bound {
    let dir = tempfile::Builder::new()
        .prefix("kvstore-peer-test-")
        .tempdir()
        .expect("temp dir");
    let cfg = ServerConfig {
        bind: "127.0.0.1".into(),
        port: 0,
        data_dir: dir.path().join("data"),
        store: Options {
            fsync: FsyncPolicy::No,
            ..Options::default()
        },
        settings: Settings::default(),
        limits: Limits::default(),
    };
    let server = Server::bind(cfg).expect("bind a server");
    Bound { server, dir }
}

/// A running server with its peer links.
struct Node {
    id: u64,
    addr: SocketAddr,
    net: Arc<PeerNet>,
    rx: Receiver<Incoming>,
    handle: ShutdownHandle,
    thread: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

/// Timers looser than the defaults: links here must not time out when a loaded machine
/// (the whole suite on two cores) stalls a thread for a moment.
fn cluster_config(id: u64, peers: &[(u64, String)], secret: &str) -> ClusterConfig {
    ClusterConfig {
        failure_timeout: Duration::from_secs(2),
        lease: Duration::from_secs(1),
        peers: peers
            .iter()
            .map(|(id, addr)| Peer {
                id: *id,
                addr: addr.clone(),
            })
            .collect(),
        secret: secret.as_bytes().to_vec(),
        ..ClusterConfig::single(id)
    }
}

impl Node {
    fn start(b: Bound, cfg: ClusterConfig) -> Node {
        let (net, rx) = PeerNet::start(&cfg, || 7).expect("start the peer links");
        let net = Arc::new(net);
        b.server.attach_peers(net.clone()).expect("attach once");
        let addr = b.server.local_addr();
        let handle = b.server.shutdown_handle();
        let server = b.server;
        let thread = thread::spawn(move || server.run().expect("server ran"));
        Node {
            id: cfg.id,
            addr,
            net,
            rx,
            handle,
            thread: Some(thread),
            _dir: b.dir,
        }
    }

    fn status(&self, peer: u64) -> PeerStatus {
        self.net
            .status()
            .into_iter()
            .find(|s| s.id == peer)
            .expect("a configured peer")
    }

    /// Both links with `peer` are up, as seen from here.
    fn linked(&self, peer: u64) -> bool {
        let s = self.status(peer);
        s.outbound.connected && s.inbound.connected
    }

    /// The next message, within the deadline.
    fn recv(&self) -> Incoming {
        self.rx
            .recv_timeout(DEADLINE)
            .unwrap_or_else(|_| panic!("node {} received nothing", self.id))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.net.shutdown();
        self.handle.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Binds `ids.len()` servers and starts them as one cluster with `secret`.
fn cluster(ids: &[u64], secret: &str) -> Vec<Node> {
    let bound: Vec<Bound> = ids.iter().map(|_| bind()).collect();
    let addrs: Vec<String> = bound
        .iter()
        .map(|b| b.server.local_addr().to_string())
        .collect();
    bound
        .into_iter()
        .enumerate()
        .map(|(i, b)| {
            let peers: Vec<(u64, String)> = ids
                .iter()
                .zip(&addrs)
                .filter(|(id, _)| **id != ids[i])
                .map(|(id, a)| (*id, a.clone()))
                .collect();
            Node::start(b, cluster_config(ids[i], &peers, secret))
        })
        .collect()
}

// --- a TCP proxy the test can cut --------------------------------------------------------

/// Forwards connections to `upstream`; [`Proxy::cut`] kills every connection it
/// carries (new ones still go through); while closed ([`Proxy::set_open`]) it accepts
/// connections and closes them at once.
struct Proxy {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    open: Arc<AtomicBool>,
}

impl Proxy {
    fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let conns = Arc::new(Mutex::new(Vec::new()));
        let open = Arc::new(AtomicBool::new(true));
        let kept = conns.clone();
        let is_open = open.clone();
        thread::spawn(move || {
            for down in listener.incoming() {
                let Ok(down) = down else { return };
                if !is_open.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(up) = TcpStream::connect(upstream) else {
                    continue;
                };
                let pipe = |mut from: TcpStream, mut to: TcpStream| {
                    thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Both);
                        let _ = from.shutdown(Shutdown::Both);
                    });
                };
                let mut k = kept.lock().unwrap();
                k.push(down.try_clone().expect("clone"));
                k.push(up.try_clone().expect("clone"));
                pipe(
                    down.try_clone().expect("clone"),
                    up.try_clone().expect("clone"),
                );
                pipe(up, down);
            }
        });
        Proxy { addr, conns, open }
    }

    fn set_open(&self, open: bool) {
        self.open.store(open, Ordering::SeqCst);
    }

    /// Kills every connection through the proxy, both ways.
    fn cut(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

// --- tests -------------------------------------------------------------------------------

#[test]
fn messages_flow_both_ways_between_three_nodes() {
    capture_logs();
    let nodes = cluster(&[11, 12, 13], "s3cret");
    wait_until(DEADLINE, "every link of the 3 nodes up", || {
        nodes.iter().all(|n| {
            nodes
                .iter()
                .filter(|m| m.id != n.id)
                .all(|m| n.linked(m.id))
        })
    });
    // The epoch each side gave in the handshake.
    assert_eq!(nodes[0].status(12).epoch, Some(7));
    // Every ordered pair, 100 messages each, in order on each link; a large one too.
    for from in &nodes {
        for to in nodes.iter().filter(|n| n.id != from.id) {
            for i in 0..100u32 {
                let payload = format!("{}->{} #{i}", from.id, to.id).into_bytes();
                from.net.send(to.id, 1 + (i % 3) as u8, payload).unwrap();
            }
            from.net
                .send(to.id, 9, vec![from.id as u8; 1 << 20])
                .unwrap();
        }
    }
    for to in &nodes {
        let mut next = std::collections::HashMap::new();
        for _ in 0..2 * 101 {
            let m = to.recv();
            let i: &mut u32 = next.entry(m.from).or_default();
            if *i == 100 {
                assert_eq!(m.kind, 9);
                assert_eq!(m.payload, vec![m.from as u8; 1 << 20]);
            } else {
                assert_eq!(m.kind, 1 + (*i % 3) as u8);
                assert_eq!(
                    m.payload,
                    format!("{}->{} #{i}", m.from, to.id).into_bytes(),
                    "in order"
                );
            }
            *i += 1;
        }
        let mut senders: Vec<u64> = next.keys().copied().collect();
        senders.sort();
        let mut want: Vec<u64> = nodes
            .iter()
            .map(|n| n.id)
            .filter(|&id| id != to.id)
            .collect();
        want.sort();
        assert_eq!(senders, want, "known by the ids they proved");
    }
    // The node's own limits.
    let n = &nodes[0];
    assert!(n.net.send(99, 1, vec![]).is_err(), "unknown peer");
    assert!(n.net.send(12, 0, vec![]).is_err(), "kind 0 is the link's");
}

#[test]
fn a_wrong_secret_is_refused_with_the_logged_reason() {
    capture_logs();
    let (a, b) = (bind(), bind());
    let (a_addr, b_addr) = (
        a.server.local_addr().to_string(),
        b.server.local_addr().to_string(),
    );
    let na = Node::start(a, cluster_config(21, &[(22, b_addr)], "right"));
    let nb = Node::start(b, cluster_config(22, &[(21, a_addr)], "wrong"));
    // Each side refuses the other's dialer, says why, and tells the dialer.
    wait_until(DEADLINE, "the acceptor logs the wrong secret", || {
        logged(&["WARN", "(claims id 22) refused: wrong cluster secret"])
            && logged(&["WARN", "(claims id 21) refused: wrong cluster secret"])
    });
    wait_until(DEADLINE, "the dialer's status says why", || {
        nb.status(21)
            .outbound
            .last_error
            .is_some_and(|e| e.contains("refused by the other side: wrong cluster secret"))
    });
    assert!(logged(&[
        "WARN",
        "peer link to node 22",
        "refused by the other side: wrong cluster secret"
    ]));
    for (n, peer) in [(&na, 22), (&nb, 21)] {
        let s = n.status(peer);
        assert!(!s.outbound.connected && !s.inbound.connected, "{s:?}");
    }
    assert!(na.rx.try_recv().is_err() && nb.rx.try_recv().is_err());
}

#[test]
fn a_duplicate_id_is_refused_with_the_logged_reason() {
    capture_logs();
    let (a, b, c) = (bind(), bind(), bind());
    let a_addr = a.server.local_addr().to_string();
    let b_addr = b.server.local_addr().to_string();
    let na = Node::start(a, cluster_config(31, &[(32, b_addr)], "s"));
    let nb = Node::start(b, cluster_config(32, &[(31, a_addr.clone())], "s"));
    wait_until(DEADLINE, "31 and 32 linked", || {
        na.linked(32) && nb.linked(31)
    });
    // A second node started by mistake with id 32, and the cluster's secret.
    let impostor = Node::start(c, cluster_config(32, &[(31, a_addr)], "s"));
    wait_until(DEADLINE, "the duplicate refused and logged", || {
        logged(&["WARN", "(claims id 32) refused: duplicate id 32"])
    });
    wait_until(DEADLINE, "the impostor told why", || {
        impostor
            .status(31)
            .outbound
            .last_error
            .is_some_and(|e| e.contains("duplicate id 32"))
    });
    assert!(!impostor.status(31).outbound.connected);
    // The real link is untouched: messages still flow.
    nb.net.send(31, 4, b"still here".to_vec()).unwrap();
    let m = na.recv();
    assert_eq!(
        (m.from, m.kind, &m.payload[..]),
        (32, 4, &b"still here"[..])
    );
}

#[test]
fn a_link_comes_back_after_its_socket_is_cut() {
    capture_logs();
    let (a, b) = (bind(), bind());
    let a_addr = a.server.local_addr().to_string();
    // 41 reaches 42 through a proxy: the address is the proxy's, the id 42's.
    let proxy = Proxy::start(b.server.local_addr());
    let na = Node::start(a, cluster_config(41, &[(42, proxy.addr.to_string())], "s"));
    let nb = Node::start(b, cluster_config(42, &[(41, a_addr)], "s"));
    wait_until(DEADLINE, "41 and 42 linked", || {
        na.linked(42) && nb.linked(41)
    });
    na.net.send(42, 1, b"before".to_vec()).unwrap();
    assert_eq!(nb.recv().payload, b"before");
    let up_since = na.status(42).outbound.since;

    proxy.cut();
    // The dialer notices, reconnects through the proxy and proves itself again.
    wait_until(DEADLINE, "41's link to 42 re-established", || {
        let s = na.status(42);
        s.outbound.connected && s.outbound.since != up_since
    });
    // Messages sent while the link was down or breaking may be lost (the node resends);
    // once it is up, they arrive again.
    let deadline = Instant::now() + DEADLINE;
    loop {
        na.net.send(42, 2, b"after".to_vec()).unwrap();
        match nb.rx.recv_timeout(Duration::from_millis(200)) {
            Ok(m) if m.payload == b"after" => {
                assert_eq!((m.from, m.kind), (41, 2));
                break;
            }
            _ => assert!(Instant::now() < deadline, "no message after the cut"),
        }
    }
    wait_until(DEADLINE, "42 sees the inbound link again", || {
        nb.status(41).inbound.connected
    });
    // The other direction was never cut.
    nb.net.send(41, 3, b"reply".to_vec()).unwrap();
    assert_eq!(na.recv().payload, b"reply");
}

/// The dialer's side of the handshake done by hand over a raw socket: the acceptor
/// delivers what it sends, and closes the link at a frame that fails its CRC.
#[test]
fn a_frame_that_fails_its_crc_closes_the_link() {
    capture_logs();
    let a = bind();
    let addr = a.server.local_addr();
    // Node 51 expects a peer 52 at an address nobody listens on (its dialer just
    // retries); we play 52's dialer.
    let na = Node::start(a, cluster_config(51, &[(52, "127.0.0.1:1".into())], "s"));
    let me = HandshakeConfig {
        id: 52,
        members: vec![51],
        secret: b"s".to_vec(),
    };
    let mut s = common::raw(addr.port());
    let (dialing, hello) = me.dial(51, 3, [5; NONCE_LEN]);
    s.write_all(&hello).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let (challenged, proof, used) = loop {
        if let Some(c) = dialing.on_challenge(&me, &buf).unwrap() {
            break c;
        }
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed during the handshake");
        buf.extend_from_slice(&chunk[..n]);
    };
    s.write_all(&proof).unwrap();
    let mut dec = FrameDecoder::new();
    dec.extend(&buf[used..]);
    let welcome = loop {
        if let Some(f) = dec.next_frame().unwrap() {
            break f;
        }
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed during the handshake");
        dec.extend(&chunk[..n]);
    };
    challenged
        .on_welcome(&me, &welcome)
        .expect("51 proves itself");

    let mut out = Vec::new();
    encode_frame(6, b"good", &mut out);
    s.write_all(&out).unwrap();
    let m = na.recv();
    assert_eq!((m.from, m.kind, &m.payload[..]), (52, 6, &b"good"[..]));
    wait_until(DEADLINE, "51 sees the inbound link", || {
        na.status(52).inbound.connected
    });

    let mut bad = Vec::new();
    encode_frame(6, b"flipped", &mut bad);
    let last = bad.len() - 1;
    bad[last] ^= 0x20;
    s.write_all(&bad).unwrap();
    // The link is closed: end of input (or a reset) on our side.
    match s.read(&mut chunk) {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("expected the link closed, read {n} bytes"),
    }
    wait_until(DEADLINE, "the CRC failure logged", || {
        logged(&["WARN", "peer link from node 52 closed", "failed its CRC"])
    });
    wait_until(DEADLINE, "51 marks the link down", || {
        !na.status(52).inbound.connected
    });
    assert!(na.rx.try_recv().is_err(), "the bad frame was not delivered");
}

/// One reply line (up to its CRLF), read a byte at a time so nothing after it is taken.
fn read_reply(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "closed");
        buf.push(byte[0]);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// `PEER` typed by a person gets an error reply, and the connection stays a client.
#[test]
fn peer_typed_by_a_client_is_an_error_not_a_hand_over() {
    capture_logs();
    // A server with no cluster.
    let plain = bind();
    let port = plain.server.local_addr().port();
    let handle = plain.server.shutdown_handle();
    let server = plain.server;
    let t = thread::spawn(move || server.run().expect("server ran"));
    let mut s = common::raw(port);
    s.write_all(b"PEER\r\n").unwrap();
    assert!(read_reply(&mut s).starts_with("-ERR PEER opens a link between cluster nodes"));
    let hello = format!("PEER HELLO 1 9 {port} 0 {}\r\n", "ab".repeat(NONCE_LEN));
    s.write_all(hello.as_bytes()).unwrap();
    assert_eq!(
        read_reply(&mut s),
        "-ERR PEER refused: this node is not part of a cluster (it was started without \
         peers)\r\n"
    );
    s.write_all(b"PING\r\n").unwrap();
    assert_eq!(read_reply(&mut s), "+PONG\r\n");
    handle.shutdown();
    t.join().unwrap();

    // A cluster node: a malformed PEER is an error too; a well-formed HELLO from a
    // stranger is refused with the reason, and the connection closed.
    let n = Node::start(
        bind(),
        cluster_config(61, &[(62, "127.0.0.1:1".into())], "s"),
    );
    let mut s = common::raw(n.addr.port());
    s.write_all(b"PEER HELLO 1 62 61 0 nothex\r\nPING\r\n")
        .unwrap();
    assert!(read_reply(&mut s).starts_with("-ERR PEER opens a link"));
    assert_eq!(read_reply(&mut s), "+PONG\r\n");
    let hello = format!("PEER HELLO 1 77 61 0 {}\r\n", "ab".repeat(NONCE_LEN));
    s.write_all(hello.as_bytes()).unwrap();
    assert_eq!(
        read_reply(&mut s),
        "-ERR PEER refused: node id 77 is not a member of this cluster\r\n"
    );
    let mut rest = [0u8; 16];
    assert!(matches!(s.read(&mut rest), Ok(0) | Err(_)), "closed");
    wait_until(DEADLINE, "the refusal logged", || {
        logged(&["(claims id 77) refused: node id 77 is not a member"])
    });
}

/// While a peer cannot be reached, its queue fills; past its limit the oldest messages
/// are dropped and `send` never blocks. When the link comes up, the rest arrive in order.
#[test]
fn a_full_queue_drops_the_oldest_and_never_blocks() {
    capture_logs();
    let (a, b) = (bind(), bind());
    let a_addr = a.server.local_addr().to_string();
    let proxy = Proxy::start(b.server.local_addr());
    proxy.set_open(false);
    let na = Node::start(a, cluster_config(71, &[(72, proxy.addr.to_string())], "s"));
    let nb = Node::start(b, cluster_config(72, &[(71, a_addr)], "s"));
    let extra = 10;
    let total = (QUEUE_MESSAGES + extra) as u32;
    for i in 0..total {
        na.net.send(72, 1, i.to_le_bytes().to_vec()).unwrap();
    }
    let s = na.status(72);
    assert!(!s.outbound.connected);
    assert_eq!((s.queued, s.dropped), (QUEUE_MESSAGES, extra as u64));

    proxy.set_open(true);
    for want in extra as u32..total {
        let m = nb.recv();
        assert_eq!(m.from, 71);
        assert_eq!(
            m.payload,
            want.to_le_bytes(),
            "the oldest were dropped, in order"
        );
    }
    wait_until(DEADLINE, "the queue drained", || na.status(72).queued == 0);
}

#[test]
fn a_peer_still_starting_is_not_warned_about_until_the_grace_ends() {
    capture_logs();
    // A peer whose port stays closed: as if it had not started yet, then for good.
    let closed = common::free_port();
    let start = Instant::now();
    let a = bind();
    let na = Node::start(
        a,
        cluster_config(71, &[(72, format!("127.0.0.1:{closed}"))], "s"),
    );
    wait_until(
        DEADLINE,
        "the dialer's status says it cannot connect",
        || na.status(72).outbound.last_error.is_some(),
    );
    let warned = || logged(&["WARN", "peer link to node 72 at", "failed"]);
    wait_until(DEADLINE, "the warning once the grace is over", warned);
    // The warning cannot come before the grace (which started after `start`); the
    // status above said why all along.
    assert!(start.elapsed() >= STARTUP_GRACE);
}

/// A member whose peer links are not attached yet (it is learning its peers' ids) says it
/// is starting, not that it is no cluster node; once they are attached, a connection
/// accepted before then is judged by the links (here: a stranger's id is refused).
#[test]
fn a_member_still_starting_says_so_and_later_judges_old_connections_by_its_links() {
    use kvstore::cluster::{ClusterState, RoleInfo};
    capture_logs();
    let b = bind();
    let port = b.server.local_addr().port();
    b.server
        .context()
        .set_cluster(Arc::new(ClusterState::new(RoleInfo::starting(81, 0))));
    let attacher = b.server.peer_attacher();
    let handle = b.server.shutdown_handle();
    let server = b.server;
    let t = thread::spawn(move || server.run().expect("server ran"));
    let mut s = common::raw(port);
    let hello = format!("PEER HELLO 1 77 81 0 {}\r\n", "ab".repeat(NONCE_LEN));
    s.write_all(hello.as_bytes()).unwrap();
    assert_eq!(
        read_reply(&mut s),
        format!("-ERR PEER refused: {PEER_STARTING}\r\n")
    );
    let cfg = cluster_config(81, &[(82, "127.0.0.1:1".into())], "s");
    let (net, _rx) = PeerNet::start(&cfg, || 0).expect("start the peer links");
    assert!(attacher.attach(Arc::new(net)).is_ok());
    // The same connection, now handed to the links: they refuse the stranger with the
    // reason and close it.
    s.write_all(hello.as_bytes()).unwrap();
    let mut rest = String::new();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let _ = s.read_to_string(&mut rest);
    assert!(
        rest.contains("not a member") && !rest.contains(PEER_STARTING),
        "{rest:?}"
    );
    handle.shutdown();
    t.join().unwrap();
}
