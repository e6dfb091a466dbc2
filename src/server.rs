//! The TCP server: accept loop, one OS thread per connection, graceful shutdown.
//!
//! A connection thread owns its socket and an input buffer, and shares an output buffer
//! (its *outbox*) with the completions of its writes. Bytes enter through `recv` into the
//! input buffer; [`RequestParser`] cuts whole requests off its front;
//! [`commands::dispatch_spec`] answers reads into the outbox, and writes are collected and
//! submitted together ([`Store::submit`]) so a pipeline of N writes costs one log append.
//! A batch's completion runs on whichever thread committed it: on the connection's own
//! thread (under `--fsync everysec|no` it commits its own writes) it renders the replies
//! at once; on another (the log writer under `always`) it only hands the results over
//! and wakes the connection's thread, which renders and sends them, so the committing
//! thread never spends its time on a client's protocol or socket. Replies leave in
//! request order: a read (or an error) that follows writes waits until those writes are
//! answered, which also gives read-your-writes.
//!
//! Flow control, so a client that pipelines without reading cannot deadlock us (DESIGN.md,
//! "Limits on bad input"): replies are sent with `MSG_DONTWAIT`. If the client is not
//! reading, the rest waits in the outbox and the thread `ppoll`s for both directions,
//! still reading requests. A completion from another thread wakes the connection's
//! thread from `ppoll` with a signal ([`WAKE_SIGNAL`], blocked everywhere else) rather
//! than through a descriptor, so a connection costs one descriptor, its socket. Past
//! [`OUTPUT_PAUSE`] unsent bytes it stops executing, and input is only buffered; past
//! [`MAX_OUTPUT`] (one huge reply can get there) it closes the connection, like Redis's
//! `client-output-buffer-limit`. When nothing is owed and no write is in flight, the
//! thread simply blocks in `recv`.
//!
//! Input is capped in every path ([`Limits::max_query_buffer`], 1 GiB, Redis's
//! `client-query-buffer-limit`): after each read, the bytes buffered plus the arguments
//! the parser already copied out of an unfinished request are counted, and a client
//! over the cap is closed and logged. The parser releases the bytes it has copied out,
//! so a big request is held once. Before AUTH (with `--requirepass`) the cap is 1 MiB
//! and the parser reads only small requests, as in Redis 7.
//!
//! Descriptors: at start, [`fit_open_files_limit`] raises the soft `RLIMIT_NOFILE` as far
//! as the hard one allows and lowers `--max-clients` to what fits (as Redis's
//! `adjustOpenFilesLimit`), after keeping [`RESERVED_FDS`] for the server and, on a
//! cluster member, [`peer_fds`] for the peer links, so the next client gets `-ERR max
//! number of clients reached` instead of an accept that fails. If accept fails anyway (descriptors taken
//! elsewhere), the loop backs off and warns at most once a second.
//!
//! Shutdown ([`ShutdownHandle::shutdown`], SIGTERM/SIGINT in the binary, the SHUTDOWN
//! command through [`Context::request_shutdown`]): the accept loop
//! stops, every connection's read side is shut, so each thread sees end-of-input, answers
//! what it already received, flushes and exits; then the log is fsync'd.
//!
//! A panic in a connection thread is caught and logged; the connection closes, the
//! server goes on.
//!
//! Peer links: another node of the cluster dials the client port and opens with
//! `PEER HELLO …` ([`crate::peer`]). When a [`PeerNet`] is attached
//! ([`Server::attach_peers`]), the connection answers what it received before, stops
//! serving, and its thread becomes [`PeerNet::accept`], which finishes the handshake and
//! receives that peer's messages. Without one, or for a malformed `PEER`, the client
//! just gets an error reply.
//!
//! Slots ([`admit`]): a connection is accepted in one of `--max-clients` *client
//! slots* while one is free. Past them, a cluster member (only) still accepts up to
//! [`peer_reserve`] connections in *peer slots* (2 per configured peer and 4 more, see
//! [`PEER_SLOTS_PER_PEER`]), as Redis keeps its cluster bus off the client limit by
//! giving it its own port: such a connection is peer-only ([`serve_peer_only`]), its
//! first request must be `PEER HELLO` within [`PEER_ONLY_TIMEOUT`] (or `PEER ID`),
//! anything else gets `-ERR max number of clients reached` and is closed, so a client
//! gets exactly what it got before. Past the peer slots too, connections are refused at
//! accept. A connection that opened with `PEER HELLO` in a client slot keeps it until
//! the dialer proves the secret, then moves to a peer slot (if one is free), so proved
//! peer links never use up `--max-clients`, while a stranger's unproved HELLO costs a
//! client slot like any client. INFO: `connected_clients` counts client slots in use,
//! `cluster_connections` peer slots in use (proved inbound links included),
//! `rejected_connections` connections refused for lack of a slot (at accept, or in a
//! peer slot for not being a peer).

use crate::commands::{self, CommandSpec, Context, Dispatched, Reply, Session, Settings};
use crate::db::{Op, OpResult};
use crate::peer::{self, Hello, PeerNet};
use crate::protocol::Proto;
use crate::protocol::{Limits, RequestParser, UNAUTH_MAX_QUERY_BUFFER, write_error};
use crate::ratelog::{RateLimit, suppressed_note};
use crate::store::{Options, Store, StoreError};
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

/// Stop executing a connection's requests while this many reply bytes wait unsent.
pub const OUTPUT_PAUSE: usize = 64 << 20;
/// Close a connection whose unsent replies exceed this. Execution pauses at
/// [`OUTPUT_PAUSE`], so only a single reply larger than the difference gets here.
pub const MAX_OUTPUT: usize = 1 << 30;
const READ_CHUNK: usize = 16 * 1024;
/// An idle connection's input buffer is shrunk back when it grew past this.
const KEEP_INPUT_CAPACITY: usize = 4 << 20;
/// An input buffer that must grow past this grows to the input cap at once.
const GROW_TO_CAP_FROM: usize = 64 << 20;
/// Descriptors a connection holds: its socket, nothing else (see [`WAKE_SIGNAL`]).
pub const FDS_PER_CLIENT: u64 = 1;
/// Descriptors kept for everything but clients: stdio, the listener, log segments,
/// snapshots, the data directory, the socket of a client being refused (Redis keeps
/// the same 32, `CONFIG_MIN_RESERVED_FDS`).
pub const RESERVED_FDS: u64 = 32;
/// Peer slots per configured peer: its inbound link (a second one proving the same id
/// is refused as a duplicate, so one at a time), and its next dial while our side still
/// holds the old link (a link that broke on the way is noticed here only at the idle
/// timeout; meanwhile the peer redials every second at most, and each attempt is
/// refused as a duplicate once it has proved the secret).
pub const PEER_SLOTS_PER_PEER: usize = 2;
/// Peer slots on top of those, for reconnect churn: attempts that have not been
/// refused yet, a peer's `PEER ID` at its start, a stranger's connection that takes a
/// slot for the moment it needs to be answered.
pub const PEER_SLOTS_CHURN: usize = 4;
/// Descriptors a peer slot may hold: an inbound link keeps the server's socket, the
/// clone handed to the peer links, and the clone they keep to shut it down.
pub const FDS_PER_PEER_SLOT: u64 = 3;
/// Descriptors of one of our own dialers (its socket, and the clone kept to shut it).
pub const FDS_PER_DIALER: u64 = 2;
/// How long a connection in a peer slot may take to send its first request.
pub const PEER_ONLY_TIMEOUT: Duration = peer::HANDSHAKE_TIMEOUT;
/// The most a connection in a peer slot may send before its first request is whole
/// (`PEER HELLO` takes about 100 bytes).
const PEER_ONLY_MAX_INPUT: usize = 4096;

/// Peer slots of a node with `peers` configured peers: connections it accepts past
/// `--max-clients`, for its peers only. 0 on a single node, where nothing changes.
pub fn peer_reserve(peers: usize) -> usize {
    if peers == 0 {
        0
    } else {
        peers * PEER_SLOTS_PER_PEER + PEER_SLOTS_CHURN
    }
}

/// Descriptors the peer links of a node with `peers` peers may hold: every peer slot
/// and our own dialers. Counted in the open-files plan ([`fit_open_files_limit`]).
pub fn peer_fds(peers: usize) -> u64 {
    (peer_reserve(peers) as u64)
        .saturating_mul(FDS_PER_PEER_SLOT)
        .saturating_add((peers as u64).saturating_mul(FDS_PER_DIALER))
}

/// What the accept loop does with a new connection ([`admit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// A client slot: served as any client.
    Client,
    /// The client slots are full, a peer slot is free: the connection may only open a
    /// peer link. Its first request must be `PEER HELLO` (or `PEER ID`); anything else
    /// gets `-ERR max number of clients reached` and is closed.
    PeerOnly,
    /// Nothing free: `-ERR max number of clients reached` at once.
    Refuse,
}

/// The accept decision: `clients` connections in client slots out of `max_clients`,
/// `peer_slots_used` in peer slots out of `peer_reserve` (0 on a single node).
pub fn admit(
    clients: usize,
    max_clients: usize,
    peer_slots_used: usize,
    peer_reserve: usize,
) -> Admit {
    if clients < max_clients {
        Admit::Client
    } else if peer_slots_used < peer_reserve {
        Admit::PeerOnly
    } else {
        Admit::Refuse
    }
}

/// Takes a peer slot if one is free (atomically: the accept loop and connections moving
/// out of client slots take them concurrently, and together never exceed `reserve`).
fn take_peer_slot(used: &AtomicU64, reserve: usize) -> bool {
    used.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
        (n < reserve as u64).then_some(n + 1)
    })
    .is_ok()
}

/// Wakes a connection thread from `ppoll` when the log writer hands it unsent replies.
/// Blocked in that thread except inside `ppoll` (so it cannot be missed: one sent early
/// stays pending), and handled by a no-op everywhere, so a stray one harms nothing.
/// SIGURG because nothing else here uses it (we never ask for out-of-band data) and its
/// default is to be ignored; Go's runtime uses it to interrupt threads the same way.
pub const WAKE_SIGNAL: i32 = libc::SIGURG;
/// Write batches one connection may have submitted and not yet answered.
const MAX_INFLIGHT_BATCHES: usize = 64;

/// Everything needed to start a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub bind: String,
    pub port: u16,
    pub data_dir: std::path::PathBuf,
    pub store: Options,
    pub settings: Settings,
    pub limits: Limits,
}

/// Stops a running server from another thread.
#[derive(Clone, Debug)]
pub struct ShutdownHandle {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    ctx: Arc<Context>,
    stopping: AtomicBool,
    addr: SocketAddr,
    /// Every open connection, to shut its socket's read side on shutdown.
    conns: Mutex<HashMap<u64, Arc<ConnShared>>>,
    /// The cluster's peer links, which take over connections that open with `PEER`.
    peers: std::sync::OnceLock<Arc<PeerNet>>,
    /// Told once when shutdown starts ([`Server::on_shutdown`]).
    on_shutdown: std::sync::OnceLock<OnShutdown>,
}

/// What [`Server::on_shutdown`] registered.
struct OnShutdown(Box<dyn Fn() + Send + Sync>);

impl fmt::Debug for OnShutdown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OnShutdown")
    }
}

/// Attaches the peer links to a running server ([`Server::peer_attacher`]).
pub struct PeerAttacher(Arc<Shared>);

impl PeerAttacher {
    /// As [`Server::attach_peers`].
    pub fn attach(&self, net: Arc<PeerNet>) -> Result<(), Arc<PeerNet>> {
        self.0.peers.set(net)
    }
}

impl ShutdownHandle {
    /// Stops accepting, lets every connection finish what it received, fsyncs the log.
    /// [`Server::run`] returns once that is done.
    pub fn shutdown(&self) {
        if self.inner.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(hook) = self.inner.on_shutdown.get() {
            (hook.0)();
        }
        // Wake the accept loop: it checks `stopping` after every accept.
        let mut wake = self.inner.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip([127, 0, 0, 1].into());
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
    }
}

/// A bound, not yet running server.
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
    limits: Limits,
    /// Run by [`Server::run`] once the clients are drained, before the final fsync.
    on_drain: Option<Box<dyn FnOnce() + Send>>,
}

impl Server {
    /// Opens the store (recovering it) and binds the listener.
    pub fn bind(cfg: ServerConfig) -> Result<Server, String> {
        let store = Store::open(&cfg.data_dir, cfg.store.clone()).map_err(|e| match e {
            StoreError::Wal(e) => e.to_string(),
            e => e.to_string(),
        })?;
        let r = store.recovery();
        log::info!(
            "recovered {} log entries{} from {} (last index {})",
            r.entries_replayed,
            r.snapshot_index
                .map(|i| format!(" after a snapshot at index {i}"))
                .unwrap_or_default(),
            cfg.data_dir.display(),
            r.last_index
        );
        let listener = TcpListener::bind((cfg.bind.as_str(), cfg.port))
            .map_err(|e| format!("cannot listen on {}:{}: {e}", cfg.bind, cfg.port))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let mut settings = cfg.settings.clone();
        settings.port = addr.port();
        if settings.node_id == 0 {
            // A cluster of one on port 0: its id defaults to its port, known only now.
            settings.node_id = u64::from(addr.port());
        }
        settings.bind = cfg.bind.clone();
        let ctx = Arc::new(Context::new(store, settings));
        let shared = Arc::new(Shared {
            ctx,
            stopping: AtomicBool::new(false),
            addr,
            conns: Mutex::new(HashMap::new()),
            peers: std::sync::OnceLock::new(),
            on_shutdown: std::sync::OnceLock::new(),
        });
        // SHUTDOWN reaches the server through the context. A weak reference: the
        // context belongs to `shared` and must not keep it alive.
        let weak = Arc::downgrade(&shared);
        shared.ctx.set_shutdown_hook(move || {
            if let Some(inner) = weak.upgrade() {
                ShutdownHandle { inner }.shutdown();
            }
        });
        install_wake_handler().map_err(|e| format!("cannot install the wake-up handler: {e}"))?;
        Ok(Server {
            listener,
            shared,
            limits: cfg.limits,
            on_drain: None,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.shared.addr
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            inner: self.shared.clone(),
        }
    }

    /// Calls `hook` once, on the thread that starts the shutdown (SIGTERM's, SHUTDOWN's),
    /// before anything stops: the binary tells systemd `STOPPING=1` there. Once only.
    pub fn on_shutdown(&self, hook: impl Fn() + Send + Sync + 'static) {
        let _ = self.shared.on_shutdown.set(OnShutdown(Box::new(hook)));
    }

    /// Registers what [`Server::run`] does at shutdown once its clients are drained and
    /// before its final fsync: stopping the other ways writes come in (the HTTP
    /// listener), so that a write they answer is in the log the fsync makes durable.
    pub fn on_drain(&mut self, hook: impl FnOnce() + Send + 'static) {
        self.on_drain = Some(Box::new(hook));
    }

    pub fn context(&self) -> Arc<Context> {
        self.shared.ctx.clone()
    }

    /// Lets connections that open with `PEER HELLO` become peer links of `net`. Call
    /// before [`Server::run`] (connections accepted earlier answer `PEER` with an
    /// error). Once only: a second call returns `net` back. Shutdown shuts `net` down.
    pub fn attach_peers(&self, net: Arc<PeerNet>) -> Result<(), Arc<PeerNet>> {
        self.shared.peers.set(net)
    }

    /// [`Server::attach_peers`] for later, from another thread: a node that must first
    /// learn its peers' ids (`peer::learn_ids`) attaches its links once it has, while
    /// the server already runs (and answers `PEER ID`).
    pub fn peer_attacher(&self) -> PeerAttacher {
        PeerAttacher(self.shared.clone())
    }

    /// Accepts connections until shut down, then drains them, runs the
    /// [`Server::on_drain`] hook, and fsyncs the log.
    pub fn run(self) -> Result<(), String> {
        log::info!("kvstore listening on {}", self.shared.addr);
        let ctx = &self.shared.ctx;
        for conn in self.listener.incoming() {
            if self.shared.stopping.load(Ordering::SeqCst) {
                break;
            }
            let stream = match conn {
                Ok(s) => s,
                Err(e) => {
                    static ACCEPT_LOG: RateLimit = RateLimit::new(Duration::from_secs(1));
                    accept_failed("a client", &e, &ACCEPT_LOG);
                    continue;
                }
            };
            ctx.stats.total_connections.fetch_add(1, Ordering::Relaxed);
            let st = &ctx.stats;
            let reserve = ctx.settings.peer_reserve;
            let decision = admit(
                st.connected_clients.load(Ordering::SeqCst) as usize,
                ctx.settings.max_clients,
                st.peer_connections.load(Ordering::SeqCst) as usize,
                reserve,
            );
            match decision {
                Admit::Client => self.spawn_connection(stream),
                Admit::PeerOnly if take_peer_slot(&st.peer_connections, reserve) => {
                    self.spawn_peer_only(stream)
                }
                Admit::PeerOnly | Admit::Refuse => {
                    st.rejected_connections.fetch_add(1, Ordering::Relaxed);
                    reject(stream, MAX_CLIENTS_REACHED);
                }
            }
        }
        drop(self.listener);
        ctx.note_shutdown();
        log::info!("shutting down: no longer accepting connections");
        if let Some(net) = self.shared.peers.get() {
            net.shutdown();
        }
        for c in self.shared.conns.lock().values() {
            let _ = c.stream.shutdown(Shutdown::Read);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while ctx.stats.connected_clients.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        if let Some(hook) = self.on_drain {
            hook();
        }
        ctx.store.sync().map_err(|e| e.to_string())?;
        ctx.store.wait_for_compaction();
        log::info!("log fsync'd; bye");
        Ok(())
    }

    fn spawn_connection(&self, stream: TcpStream) {
        let shared = self.shared.clone();
        let ctx = shared.ctx.clone();
        let limits = self.limits;
        let addr = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        let session = ctx.register(addr);
        let id = session.id;
        ctx.stats.connected_clients.fetch_add(1, Ordering::SeqCst);
        // Set when the connection became a proved peer link and moved to a peer slot.
        let in_peer_slot = Arc::new(AtomicBool::new(false));
        let _ = stream.set_nodelay(true);
        let conn = Arc::new(ConnShared {
            ctx: ctx.clone(),
            outbox: Mutex::new(Outbox {
                buf: Vec::with_capacity(16 * 1024),
                ..Outbox::default()
            }),
            stream,
            last_write: AtomicU64::new(0),
        });
        shared.conns.lock().insert(id, conn.clone());
        let cleanup = {
            let shared = shared.clone();
            let in_peer_slot = in_peer_slot.clone();
            move || {
                shared.conns.lock().remove(&id);
                shared.ctx.unregister(id);
                let st = &shared.ctx.stats;
                if in_peer_slot.load(Ordering::SeqCst) {
                    st.peer_connections.fetch_sub(1, Ordering::SeqCst);
                } else {
                    st.connected_clients.fetch_sub(1, Ordering::SeqCst);
                }
            }
        };
        let spawned = thread::Builder::new()
            .name(format!("conn-{id}"))
            .stack_size(512 * 1024)
            .spawn({
                let cleanup = cleanup.clone();
                move || {
                    let _guard = Guard(Some(cleanup));
                    let r = catch_unwind(AssertUnwindSafe(|| {
                        let handoff =
                            match Connection::new(conn.clone(), session, limits, shared.clone()) {
                                Ok(c) => c.serve(),
                                Err(e) => {
                                    log::error!("cannot set up connection {id}: {e}");
                                    None
                                }
                            };
                        // The connection opened a peer link: this thread is its receiver now.
                        if let (Some((hello, leftover)), Some(net)) = (handoff, shared.peers.get())
                        {
                            // Once the dialer has proved the secret, the link leaves its
                            // client slot for a peer slot (if one is free: else it keeps
                            // the client slot), so peers never use up `--max-clients`.
                            let on_up = || {
                                let st = &ctx.stats;
                                let reserve = ctx.settings.peer_reserve;
                                if take_peer_slot(&st.peer_connections, reserve) {
                                    in_peer_slot.store(true, Ordering::SeqCst);
                                    st.connected_clients.fetch_sub(1, Ordering::SeqCst);
                                    ctx.unregister(id);
                                }
                            };
                            match conn.stream.try_clone() {
                                Ok(stream) => net.accept(stream, hello, &leftover, on_up),
                                Err(e) => log::error!(
                                    "cannot hand connection {id} to the peer links: {e}"
                                ),
                            }
                        }
                    }));
                    if let Err(panic) = r {
                        let msg = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        log::error!("connection {id} panicked and was closed: {msg}");
                    }
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot start a thread for a new connection: {e}");
            cleanup();
        }
    }

    /// Starts the thread of a connection accepted in a peer slot (already taken, in
    /// `peer_connections`): [`serve_peer_only`], then the slot is given back.
    fn spawn_peer_only(&self, stream: TcpStream) {
        let shared = self.shared.clone();
        let limits = self.limits;
        let release = {
            let shared = shared.clone();
            move || {
                shared
                    .ctx
                    .stats
                    .peer_connections
                    .fetch_sub(1, Ordering::SeqCst);
            }
        };
        let spawned = thread::Builder::new()
            .name("peer-slot".into())
            .stack_size(512 * 1024)
            .spawn({
                let release = release.clone();
                move || {
                    let _guard = Guard(Some(release));
                    let r = catch_unwind(AssertUnwindSafe(|| {
                        serve_peer_only(&shared, stream, limits)
                    }));
                    if r.is_err() {
                        log::error!("a connection in a peer slot panicked and was closed");
                    }
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot start a thread for a new connection: {e}");
            release();
        }
    }
}

/// What an accept loop does when `accept` fails (`what` names the listener's
/// connections in the log): out of descriptors or memory, the pending connection
/// stays queued and accept would fail again at once, so it backs off instead of
/// spinning, and says so at most once a second (`log`). Shared by the client listener
/// and the HTTP one (`src/http.rs`).
pub(crate) fn accept_failed(what: &str, e: &io::Error, log: &RateLimit) {
    if let Some(n) = log.check(Instant::now()) {
        log::warn!(
            "accepting {what} connection failed: {e}{}",
            suppressed_note(n)
        );
    }
    let exhausted = matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    );
    if exhausted {
        thread::sleep(Duration::from_millis(100));
    } else if e.kind() != io::ErrorKind::ConnectionAborted {
        thread::sleep(Duration::from_millis(10));
    }
}

/// The reply of a connection refused for lack of a slot (Redis's words).
const MAX_CLIENTS_REACHED: &str = "ERR max number of clients reached";

/// A connection in a peer slot (the client slots were full when it came): reads its
/// first request, for at most [`PEER_ONLY_TIMEOUT`] and [`PEER_ONLY_MAX_INPUT`] bytes.
/// `PEER HELLO` (with the peer links attached) hands it to them; `PEER ID` is answered
/// (a peer with plain `host:port` peers asks it at its start, `peer::learn_ids`), and
/// so is `PEER HTTP` (a follower learning our HTTP port, `src/http.rs`), and the
/// connection closed; anything else, or nothing in time, gets
/// `-ERR max number of clients reached`, as at accept, and is counted in
/// `rejected_connections`.
fn serve_peer_only(shared: &Shared, stream: TcpStream, limits: Limits) {
    let ctx = &shared.ctx;
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(PEER_ONLY_TIMEOUT));
    let deadline = Instant::now() + PEER_ONLY_TIMEOUT;
    let mut input = Vec::new();
    let mut chunk = [0u8; 1024];
    let first = loop {
        // A fresh parser on the whole input each time: it is at most a few KiB.
        let mut parser = RequestParser::new(limits);
        parser.set_authenticated(false);
        match parser.parse(&input) {
            Ok(Some(request)) => break Some(request),
            Ok(None) if input.len() < PEER_ONLY_MAX_INPUT => {}
            _ => break None,
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break None;
        }
        match (&stream).read(&mut chunk) {
            // Gone without a request: nothing to answer.
            Ok(0) => return,
            Ok(n) => {
                input.extend_from_slice(&chunk[..n]);
                ctx.stats
                    .net_input_bytes
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break None,
        }
    };
    if let Some((args, used)) = first
        && peer::is_peer_command(&args[0])
    {
        if args.len() == 2 && args[1].eq_ignore_ascii_case(b"ID") {
            let id = ctx.settings.node_id;
            let _ = io::Write::write_all(&mut &stream, format!(":{id}\r\n").as_bytes());
            return;
        }
        if args.len() == 2 && args[1].eq_ignore_ascii_case(b"HTTP") {
            let port = ctx.settings.http_port;
            let _ = io::Write::write_all(&mut &stream, format!(":{port}\r\n").as_bytes());
            return;
        }
        if let (Ok(hello), Some(net)) = (Hello::parse(&args), shared.peers.get()) {
            // Already in a peer slot: nothing moves when the link proves itself.
            net.accept(stream, hello, &input[used..], || {});
            return;
        }
    }
    ctx.stats
        .rejected_connections
        .fetch_add(1, Ordering::Relaxed);
    reject(stream, MAX_CLIENTS_REACHED);
}

/// Runs its closure on drop, so a connection is unregistered even if its thread unwinds.
struct Guard<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> Drop for Guard<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

fn reject(mut stream: TcpStream, msg: &str) {
    let mut out = Vec::new();
    write_error(&mut out, msg);
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    let _ = io::Write::write_all(&mut stream, &out);
}

/// A write batch's outcome, with how to render each reply.
struct Completed {
    res: Result<Vec<OpResult>, StoreError>,
    hows: Vec<Reply>,
    proto: Proto,
}

/// Replies waiting to be sent, and write outcomes waiting to be rendered. Shared between
/// the connection's thread and the completions of its writes.
#[derive(Default)]
struct Outbox {
    buf: Vec<u8>,
    /// Bytes of `buf` already sent.
    sent: usize,
    /// Outcomes handed over by another thread, in submission order; the connection's
    /// thread renders them into `buf`.
    completed: VecDeque<Completed>,
    /// Write batches submitted to the store and not rendered yet. Replies must leave in
    /// request order, so the connection thread appends a reply of its own only when this
    /// is zero (and anything it appended before a submission is already in `buf`).
    inflight: usize,
    /// The connection thread, parked until `inflight` is zero.
    waiter: Option<Thread>,
    /// The connection thread is in (or about to enter) `ppoll`: a completion must signal
    /// it. Set under this lock after finding nothing to render, so none is missed: a
    /// signal sent before the thread reaches `ppoll` stays pending (it is blocked outside
    /// `ppoll`) and makes `ppoll` return at once.
    polling: bool,
    /// The connection thread while it runs (cleared, under this lock, before it ends, so
    /// a completion never signals a thread that is gone).
    owner: Option<(thread::ThreadId, libc::pthread_t)>,
}

/// Renders one batch's replies.
fn render_batch(c: Completed, out: &mut Vec<u8>) {
    match c.res {
        Ok(results) => {
            for (r, how) in results.iter().zip(c.hows) {
                commands::render_result(r, how, c.proto, out);
            }
        }
        Err(e) => {
            let msg = commands::store_error_reply(&e);
            for _ in c.hows {
                write_error(out, &msg);
            }
        }
    }
}

impl Outbox {
    /// Renders every outcome handed over so far (the connection's thread only).
    fn render_completed(&mut self) {
        while let Some(c) = self.completed.pop_front() {
            render_batch(c, &mut self.buf);
            self.inflight -= 1;
        }
    }

    fn unsent(&self) -> usize {
        self.buf.len() - self.sent
    }

    /// Sends as much as the socket takes without blocking.
    fn send(&mut self, stream: &TcpStream, ctx: &Context) -> io::Result<()> {
        while self.sent < self.buf.len() {
            match send_nonblocking(stream, &self.buf[self.sent..])? {
                Some(n) => {
                    self.sent += n;
                    ctx.stats
                        .net_output_bytes
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
                None => return Ok(()),
            }
        }
        self.buf.clear();
        self.sent = 0;
        if self.buf.capacity() > 4 << 20 {
            // Don't keep a huge buffer alive for an idle connection.
            self.buf.shrink_to(16 * 1024);
        }
        Ok(())
    }
}

/// What a connection shares with the completions of its writes (and, for shutdown,
/// with the server). Holds the connection's only descriptor, its socket.
struct ConnShared {
    ctx: Arc<Context>,
    outbox: Mutex<Outbox>,
    stream: TcpStream,
    /// On a cluster member: the store's applied index when this connection's last write
    /// batch completed (an upper bound of its writes' indexes), for WAIT. Set by the
    /// completion, on whichever thread runs it; copied into the session before the
    /// connection's own commands run ([`Session::last_write_index`]).
    last_write: AtomicU64,
}

impl fmt::Debug for ConnShared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnShared")
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

impl ConnShared {
    /// The completion of a batch of writes. On the connection's own thread, renders the
    /// replies at once; on any other, hands the outcome to the connection's thread and
    /// wakes it (from `park` or `ppoll`), so the committing thread does no rendering and
    /// no socket I/O for the client.
    fn complete(&self, res: Result<Vec<OpResult>, StoreError>, hows: Vec<Reply>, proto: Proto) {
        if self.ctx.cluster().is_some() {
            // Completions run outside the store's locks, so reading the index is safe
            // here; a cluster of one skips it (WAIT answers 0 there) and keeps its
            // write path free of one more map lock per batch.
            let applied = self.ctx.store.read_all(|db| db.applied_index());
            self.last_write.fetch_max(applied, Ordering::Relaxed);
        }
        let mut ob = self.outbox.lock();
        let c = Completed { res, hows, proto };
        let owner = ob.owner;
        if owner.is_some_and(|(id, _)| id == thread::current().id()) {
            ob.render_completed();
            render_batch(c, &mut ob.buf);
            ob.inflight -= 1;
            return;
        }
        ob.completed.push_back(c);
        if let Some(w) = ob.waiter.take() {
            w.unpark();
        } else if ob.polling
            && let Some((_, pthread)) = owner
        {
            // SAFETY: `owner` is set only while that thread runs (cleared under this
            // lock, which we hold, before it ends), so the pthread_t is valid.
            unsafe {
                libc::pthread_kill(pthread, WAKE_SIGNAL);
            }
        }
    }
}

/// One client connection.
struct Connection {
    /// What completions need too (the socket is `shared.stream`, the server context
    /// `shared.ctx`).
    shared: Arc<ConnShared>,
    session: Session,
    parser: RequestParser,
    limits: Limits,
    /// The signal mask for `ppoll`: this thread's, with [`WAKE_SIGNAL`] let through.
    poll_mask: libc::sigset_t,
    input: Vec<u8>,
    /// Bytes of `input` already parsed.
    consumed: usize,
    /// Writes parsed but not yet submitted, in request order.
    pending: Vec<(Op, Reply)>,
    /// What each pending write is, and its argument count, for the metrics.
    pending_cmds: Vec<(&'static CommandSpec, usize)>,
    /// No more input will be read (end of input, QUIT or a protocol error).
    closing: bool,
    chunk: Box<[u8]>,
    /// The last read filled `chunk`: more input is likely waiting in the socket.
    more_input: bool,
    /// The server: whether a `PEER HELLO` may hand this connection to the peer links
    /// is asked when one comes (they are attached after the server starts, on a node
    /// that learns its peers' ids first).
    server: Arc<Shared>,
    /// Set when it opened with a well-formed `PEER HELLO`: [`Connection::serve`] stops
    /// and returns it.
    handoff: Option<Hello>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        // From now on no completion may signal this thread (see `Outbox::owner`).
        self.shared.outbox.lock().owner = None;
    }
}

impl Connection {
    /// Sets up the connection on its own thread (the one that will serve it).
    fn new(
        shared: Arc<ConnShared>,
        session: Session,
        limits: Limits,
        server: Arc<Shared>,
    ) -> io::Result<Self> {
        // Block the wake-up signal in this thread, so that one sent while we are not in
        // ppoll waits for it; ppoll lets it through with `poll_mask` (the old mask, which
        // keeps SIGTERM/SIGINT blocked, minus the wake-up signal).
        // SAFETY: plain signal-set manipulation on initialised local sets.
        let poll_mask = unsafe {
            let mut block: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut block);
            libc::sigaddset(&mut block, WAKE_SIGNAL);
            let r = libc::pthread_sigmask(libc::SIG_BLOCK, &block, &mut old);
            if r != 0 {
                return Err(io::Error::from_raw_os_error(r));
            }
            libc::sigdelset(&mut old, WAKE_SIGNAL);
            old
        };
        // SAFETY: pthread_self has no preconditions.
        let me = (thread::current().id(), unsafe { libc::pthread_self() });
        shared.outbox.lock().owner = Some(me);
        Ok(Connection {
            shared,
            session,
            parser: RequestParser::new(limits),
            limits,
            poll_mask,
            input: Vec::new(),
            consumed: 0,
            pending: Vec::new(),
            pending_cmds: Vec::new(),
            closing: false,
            chunk: vec![0u8; READ_CHUNK].into_boxed_slice(),
            more_input: false,
            server,
            handoff: None,
        })
    }

    /// Serves the client until it goes. Returns the `PEER HELLO` (and the bytes that
    /// followed it) if the connection turned out to be a peer link.
    fn serve(mut self) -> Option<(Hello, Vec<u8>)> {
        loop {
            let (unsent, inflight) = {
                let mut ob = self.shared.outbox.lock();
                ob.render_completed();
                if ob.unsent() > 0 && ob.send(&self.shared.stream, &self.shared.ctx).is_err() {
                    return None;
                }
                // A completion arriving from now on must signal us if we are about to
                // `ppoll` (replies unsent and outcomes owed). If we end up not polling,
                // the signal waits, blocked, and costs one spurious wake-up.
                ob.polling = ob.inflight > 0 && ob.unsent() > 0;
                (ob.unsent(), ob.inflight)
            };
            if unsent > MAX_OUTPUT {
                log::warn!(
                    "closing client {}: {unsent} bytes of replies unread (limit {MAX_OUTPUT})",
                    self.session.id
                );
                return None;
            }
            if self.closing && unsent == 0 {
                if inflight == 0 {
                    return None;
                }
                // Answer every write the client sent before it went away.
                self.wait_for_inflight();
                continue;
            }
            if unsent == 0 && inflight == 0 {
                // Nothing owed to the client and nothing can arrive for it: block for input.
                match (&self.shared.stream).read(&mut self.chunk) {
                    Ok(0) => self.closing = true,
                    Ok(n) => {
                        if !self.take_input(n) {
                            return None;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return None,
                }
            } else if unsent == 0 {
                // Only write outcomes are owed. Take input likely waiting (a pipelining
                // client's next batch then joins the next group commit), else sleep until
                // an outcome arrives: a futex wake-up costs the committing thread far
                // less than a signal through `ppoll`. Waiting without reading is safe:
                // the outcome does not depend on this client.
                if !self.more_input {
                    self.wait_for_completion();
                    continue;
                }
                match recv_nonblocking(&self.shared.stream, &mut self.chunk) {
                    Ok(Some(0)) => self.closing = true,
                    Ok(Some(n)) => {
                        if !self.take_input(n) {
                            return None;
                        }
                    }
                    Ok(None) => {
                        self.wait_for_completion();
                        continue;
                    }
                    Err(_) => return None,
                }
            } else {
                // Replies wait to be sent: wait for input, for room to send, or for an
                // outcome handed over by another thread (a signal, which interrupts
                // ppoll).
                let readable = match poll(
                    self.shared.stream.as_raw_fd(),
                    !self.closing,
                    unsent > 0,
                    &self.poll_mask,
                ) {
                    Ok(r) => r,
                    Err(_) => return None,
                };
                if readable {
                    match recv_nonblocking(&self.shared.stream, &mut self.chunk) {
                        Ok(Some(0)) => self.closing = true,
                        Ok(Some(n)) => {
                            if !self.take_input(n) {
                                return None;
                            }
                        }
                        Ok(None) => {}
                        Err(_) => return None,
                    }
                }
            }
            if self.shared.outbox.lock().unsent() < OUTPUT_PAUSE {
                self.process();
            }
            if let Some(hello) = self.handoff.take() {
                // Everything owed to the client goes first; the peer links own the
                // socket from here.
                if !self.flush() {
                    return None;
                }
                return Some((hello, self.input[self.consumed..].to_vec()));
            }
        }
    }

    /// Sends every unsent reply, waiting for the socket as needed. False if the client
    /// is gone.
    fn flush(&self) -> bool {
        loop {
            {
                let mut ob = self.shared.outbox.lock();
                if ob.send(&self.shared.stream, &self.shared.ctx).is_err() {
                    return false;
                }
                if ob.unsent() == 0 {
                    return true;
                }
            }
            if poll(self.shared.stream.as_raw_fd(), false, true, &self.poll_mask).is_err() {
                return false;
            }
        }
    }

    /// Appends `n` bytes just read. False if that took the client over its input cap:
    /// it has been logged and counted, and the caller closes the connection.
    fn take_input(&mut self, n: usize) -> bool {
        self.more_input = n == self.chunk.len();
        if self.consumed > 0 {
            // Keep only the unparsed tail; usually that is nothing and this is free.
            self.input.drain(..self.consumed);
            self.consumed = 0;
        }
        let limit = if self.session.authenticated {
            self.limits.max_query_buffer
        } else {
            self.limits.max_query_buffer.min(UNAUTH_MAX_QUERY_BUFFER)
        };
        let len = self.input.len() + n;
        if len > self.input.capacity() && len > GROW_TO_CAP_FROM {
            // Doubling a large buffer copies it, holding old and new at once: 2x the
            // input at that moment, and more if the allocator keeps the old pages. Past
            // GROW_TO_CAP_FROM, reserve up to the cap in one step instead: its pages stay
            // virtual until input fills them. (If that much address space cannot be
            // had, extend below falls back to ordinary growth.)
            let want = limit
                .saturating_add(READ_CHUNK)
                .saturating_sub(self.input.len());
            let _ = self.input.try_reserve_exact(want);
        }
        self.input.extend_from_slice(&self.chunk[..n]);
        let ctx = &self.shared.ctx;
        ctx.stats
            .net_input_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
        // What this client makes us hold: unparsed input, and the arguments of an
        // unfinished request that the parser already copied out (Redis counts both).
        let held = self.input.len() + self.parser.buffered();
        if held <= limit {
            return true;
        }
        ctx.stats
            .client_qbuf_limit_disconnections
            .fetch_add(1, Ordering::Relaxed);
        let addr = ctx
            .clients
            .lock()
            .get(&self.session.id)
            .map(|c| c.addr.clone())
            .unwrap_or_default();
        let head: String = self.input[..self.input.len().min(64)]
            .escape_ascii()
            .to_string();
        // Redis's wording, so log searches find it.
        log::warn!(
            "Closing client that reached max query buffer length: id={} addr={addr} \
             qbuf={held} limit={limit}{} (qbuf initial bytes: \"{head}\")",
            self.session.id,
            if self.session.authenticated {
                ""
            } else {
                " (not authenticated)"
            },
        );
        false
    }

    /// Parks until an outcome is handed over (or none is owed any more).
    fn wait_for_completion(&self) {
        loop {
            {
                let mut ob = self.shared.outbox.lock();
                if !ob.completed.is_empty() || ob.inflight == 0 {
                    ob.waiter = None;
                    return;
                }
                ob.waiter = Some(thread::current());
            }
            thread::park();
        }
    }

    /// Parks until every submitted write has been answered.
    fn wait_for_inflight(&self) {
        loop {
            {
                let mut ob = self.shared.outbox.lock();
                ob.render_completed();
                if ob.inflight == 0 {
                    ob.waiter = None;
                    return;
                }
                ob.waiter = Some(thread::current());
            }
            thread::park();
        }
    }

    /// Appends a reply of the connection's own, after every write reply owed before it.
    fn reply(&mut self, f: impl FnOnce(&mut Session, &mut Vec<u8>)) {
        self.submit();
        self.wait_for_inflight();
        self.note_last_write();
        let mut ob = self.shared.outbox.lock();
        f(&mut self.session, &mut ob.buf);
    }

    /// Copies the index of the last completed write batch into the session (call with
    /// nothing in flight: then every earlier write has completed), for WAIT.
    fn note_last_write(&mut self) {
        let last = self.shared.last_write.load(Ordering::Relaxed);
        self.session.last_write_index = self.session.last_write_index.max(last);
    }

    /// Executes every whole request buffered, submitting writes in batches.
    fn process(&mut self) {
        let ctx = self.shared.ctx.clone();
        // A pipeline of GETs: load their keys' places in the table first, all at once, so
        // that their cache misses overlap (about one miss's time for the lot, instead of
        // two misses per request one after the other). Not for a lone request: it would
        // only hash its key twice. (SETs get theirs when their batch is applied,
        // `Db::touch`: here it would take the map lock once more per batch, which
        // writers contend for: -17% on SET -P16.)
        let ahead = if self.session.authenticated {
            crate::protocol::peek_keys(&self.input[self.consumed..])
        } else {
            Vec::new()
        };
        if ahead.len() > 1 {
            ctx.store.read(self.session.db, |ks| ks.touch(&ahead));
        }
        while !self.session.close {
            if self.shared.outbox.lock().unsent() >= OUTPUT_PAUSE {
                break;
            }
            // AUTH may have just succeeded: the next request gets the larger limits.
            self.parser.set_authenticated(self.session.authenticated);
            let parsed = self.parser.parse(&self.input[self.consumed..]);
            let args = match parsed {
                Ok(Some((args, used))) => {
                    self.consumed += used;
                    args
                }
                Ok(None) => {
                    // Drop what the parser copied out of the unfinished request, so it
                    // is held once (as arguments), not twice.
                    self.consumed += self.parser.release();
                    break;
                }
                Err(e) => {
                    log::debug!("client {}: protocol error: {e}", self.session.id);
                    self.reply(|_, out| write_error(out, &e.to_string()));
                    self.closing = true;
                    self.session.close = true;
                    break;
                }
            };
            if peer::is_peer_command(&args[0]) {
                if args.len() == 2 && args[1].eq_ignore_ascii_case(b"ID") {
                    // A node learning a peer's id from its address (`peer::learn_ids`);
                    // the id is no secret: every handshake proves it again.
                    let id = ctx.settings.node_id;
                    self.reply(|_, out| out.extend_from_slice(format!(":{id}\r\n").as_bytes()));
                    continue;
                }
                if args.len() == 2 && args[1].eq_ignore_ascii_case(b"HTTP") {
                    // A follower learning where to redirect HTTP clients (`src/http.rs`).
                    let port = ctx.settings.http_port;
                    self.reply(|_, out| out.extend_from_slice(format!(":{port}\r\n").as_bytes()));
                    continue;
                }
                match Hello::parse(&args) {
                    Ok(hello) if self.server.peers.get().is_some() => {
                        // A node of the cluster dialing in: answer what came before, then
                        // hand the connection over (serve returns it).
                        self.submit();
                        self.wait_for_inflight();
                        self.handoff = Some(hello);
                        break;
                    }
                    // A member whose links are not attached yet (it is learning its
                    // peers' ids): the dialer retries quietly (`peer::PEER_STARTING`).
                    Ok(_) if ctx.cluster().is_some() => self.reply(|_, out| {
                        write_error(out, &format!("ERR PEER refused: {}", peer::PEER_STARTING))
                    }),
                    Ok(_) => self.reply(|_, out| {
                        write_error(
                            out,
                            "ERR PEER refused: this node is not part of a cluster (it was \
                             started without peers)",
                        )
                    }),
                    Err(e) => self.reply(|_, out| write_error(out, &e)),
                }
                continue;
            }
            let spec = commands::lookup(&args[0]);
            if crate::multi::intercepts(&self.session, spec) {
                // A transaction's place in the log must follow this connection's earlier
                // writes (and WATCH's barrier must cover them): submit them and wait for
                // their replies first. EXEC and WATCH then block this thread until done.
                self.submit();
                self.wait_for_inflight();
                self.note_last_write();
                let mut out = Vec::new();
                let (argc, started) = (args.len(), Instant::now());
                crate::multi::handle(&ctx, &mut self.session, spec, args, &mut out);
                if let Some(spec) = spec {
                    let id = self.session.id;
                    ctx.metrics
                        .record(spec, argc, started.elapsed(), || ctx.client_label(id));
                }
                self.shared.outbox.lock().buf.extend_from_slice(&out);
                continue;
            }
            let argc = args.len();
            let Some(write) = spec.filter(|c| c.write) else {
                self.reply(|session, out| {
                    let started = Instant::now();
                    let _ = commands::dispatch_spec(&ctx, session, spec, args, out);
                    if let Some(spec) = spec {
                        let id = session.id;
                        ctx.metrics
                            .record(spec, argc, started.elapsed(), || ctx.client_label(id));
                    }
                });
                continue;
            };
            let mut early = Vec::new();
            let started = Instant::now();
            match commands::dispatch_spec(&ctx, &mut self.session, spec, args, &mut early) {
                Dispatched::Write(op, how) => {
                    self.pending.push((op, how));
                    self.pending_cmds.push((write, argc));
                }
                // A write refused at once: its error must not overtake the replies of the
                // writes queued before it.
                Dispatched::Done => {
                    let id = self.session.id;
                    ctx.metrics
                        .record(write, argc, started.elapsed(), || ctx.client_label(id));
                    self.reply(|_, out| out.extend_from_slice(&early));
                }
            }
        }
        self.submit();
        if self.session.close {
            self.closing = true;
        }
        if self.consumed == self.input.len() {
            self.input.clear();
            self.consumed = 0;
            if self.input.capacity() > KEEP_INPUT_CAPACITY {
                // One big request must not keep its buffer for the connection's life.
                self.input.shrink_to(READ_CHUNK);
            }
        }
    }

    /// Submits the pending writes as one batch; the completion appends their replies.
    fn submit(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        // Backpressure: a client streaming writes faster than the log commits them waits
        // here (and stops reading) instead of queueing without bound.
        if self.shared.outbox.lock().inflight >= MAX_INFLIGHT_BATCHES {
            self.wait_for_inflight();
        }
        let (ops, hows): (Vec<Op>, Vec<Reply>) = self.pending.drain(..).unzip();
        let cmds = std::mem::take(&mut self.pending_cmds);
        let proto = self.session.proto;
        self.shared.outbox.lock().inflight += 1;
        let shared = self.shared.clone();
        let (id, started) = (self.session.id, Instant::now());
        self.shared.ctx.store.submit(
            self.session.db,
            ops,
            Box::new(move |res| {
                // Every write of the batch waited for the same log append and commit.
                let took = started.elapsed();
                let ctx = &shared.ctx;
                for (spec, argc) in cmds {
                    ctx.metrics
                        .record(spec, argc, took, || ctx.client_label(id));
                }
                shared.complete(res, hows, proto)
            }),
        );
    }
}

/// `send(MSG_DONTWAIT)`: Some(n) bytes sent, None if the socket buffer is full.
fn send_nonblocking(s: &TcpStream, buf: &[u8]) -> io::Result<Option<usize>> {
    nonblocking(|| {
        // SAFETY: buf is a valid slice for its length; the fd is owned by `s`.
        unsafe {
            libc::send(
                s.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        }
    })
}

/// `recv(MSG_DONTWAIT)`: Some(n) bytes read (0 = end of input), None if nothing waits.
fn recv_nonblocking(s: &TcpStream, buf: &mut [u8]) -> io::Result<Option<usize>> {
    nonblocking(|| {
        // SAFETY: buf is a valid, writable slice for its length.
        unsafe {
            libc::recv(
                s.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        }
    })
}

/// Runs a non-blocking socket call: Some(bytes), None for EAGAIN, retried on EINTR.
fn nonblocking(mut call: impl FnMut() -> isize) -> io::Result<Option<usize>> {
    loop {
        let n = call();
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock => return Ok(None),
            io::ErrorKind::Interrupted => continue,
            _ => return Err(e),
        }
    }
}

/// Waits until `fd` is readable (if `read`) or writable (if `write`), or a signal that
/// `mask` lets through arrives ([`WAKE_SIGNAL`]: the caller then looks at its outbox
/// again). Returns whether `fd` is readable or closed.
fn poll(fd: i32, read: bool, write: bool, mask: &libc::sigset_t) -> io::Result<bool> {
    let mut events = 0;
    if read {
        events |= libc::POLLIN;
    }
    if write {
        events |= libc::POLLOUT;
    }
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no timeout, an initialised signal mask.
    let r = unsafe { libc::ppoll(&mut pfd, 1, std::ptr::null(), mask) };
    if r < 0 {
        let e = io::Error::last_os_error();
        // Woken by the signal (or another one): the caller re-checks its state.
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    let hup = pfd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0;
    Ok(pfd.revents & libc::POLLIN != 0 || (hup && read))
}

/// Installs the no-op handler for [`WAKE_SIGNAL`] (once per process). Without one the
/// signal would be ignored and would not interrupt `ppoll`.
fn install_wake_handler() -> io::Result<()> {
    extern "C" fn on_wake(_: libc::c_int) {}
    static INSTALLED: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    let r = INSTALLED.get_or_init(|| {
        // SAFETY: installs an async-signal-safe (empty) handler with an initialised
        // sigaction. SA_RESTART: a stray signal must not fail another thread's blocking
        // call; ppoll is never restarted, whatever the flag, which is what wakes us.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_wake as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(WAKE_SIGNAL, &sa, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
        }
        Ok(())
    });
    r.map_err(io::Error::from_raw_os_error)
}

/// What [`fd_plan`] decided: the soft `RLIMIT_NOFILE` to ask for, and the clients
/// that fit in what it gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FdPlan {
    /// Descriptors `max_clients` would need.
    needed: u64,
    /// The soft limit to set (`None`: the current one is enough, or cannot be raised).
    raise_to: Option<u64>,
    /// Clients that fit.
    max_clients: usize,
}

/// Pure arithmetic of [`fit_open_files_limit`]: with soft limit `soft` and hard limit
/// `hard`, and `peer_fds` descriptors kept for the peer links ([`peer_fds`]), how far to raise the soft one and how many clients then fit. Err when not
/// even one client fits.
fn fd_plan(max_clients: usize, peer_fds: u64, soft: u64, hard: u64) -> Result<FdPlan, String> {
    // Kept for everything but clients: the server's own, and the peer links'.
    let kept = RESERVED_FDS.saturating_add(peer_fds);
    let needed = (max_clients as u64)
        .saturating_mul(FDS_PER_CLIENT)
        .saturating_add(kept);
    if soft >= needed {
        return Ok(FdPlan {
            needed,
            raise_to: None,
            max_clients,
        });
    }
    let best = needed.min(hard).max(soft);
    if best <= kept {
        return Err(format!(
            "Your current 'ulimit -n' of {soft} is not enough for the server to start. Please \
             increase your open file limit to at least {needed}. Exiting."
        ));
    }
    let fit = ((best - kept) / FDS_PER_CLIENT).min(max_clients as u64) as usize;
    Ok(FdPlan {
        needed,
        raise_to: (best > soft).then_some(best),
        max_clients: fit,
    })
}

/// Fits `--max-clients` to the process's descriptor limit, as Redis's
/// `adjustOpenFilesLimit` does: raises the soft `RLIMIT_NOFILE` as far as the hard one
/// allows (never above what is needed), and if that is still short, returns a lower
/// number of clients, saying so in the log. Err (with Redis's message) if the limit is
/// too low to start at all. Call once at start, before accepting. `peers`: the
/// configured peers, whose links' descriptors ([`peer_fds`]: the peer slots past
/// `--max-clients` and our dialers) are kept on top of the clients'.
pub fn fit_open_files_limit(max_clients: usize, peers: usize) -> Result<usize, String> {
    let kept = RESERVED_FDS.saturating_add(peer_fds(peers));
    // SAFETY: getrlimit/setrlimit with a valid, initialised struct.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        let e = io::Error::last_os_error();
        let fit = 1024u64.saturating_sub(kept) / FDS_PER_CLIENT;
        let fit = (fit as usize).min(max_clients);
        log::warn!(
            "Unable to obtain the current NOFILE limit ({e}), assuming 1024 and setting the \
             max clients configuration accordingly ({fit})."
        );
        return Ok(fit);
    }
    let (soft, hard) = (lim.rlim_cur as u64, lim.rlim_max as u64);
    let mut plan = fd_plan(max_clients, peer_fds(peers), soft, hard)?;
    let mut os_error = None;
    if let Some(to) = plan.raise_to {
        lim.rlim_cur = to as libc::rlim_t;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            os_error = Some(io::Error::last_os_error());
            plan = fd_plan(max_clients, peer_fds(peers), soft, soft)?;
        }
    }
    let now = plan.raise_to.unwrap_or(soft);
    if plan.max_clients < max_clients {
        let why = match os_error {
            Some(e) => format!("because of OS error: {e}"),
            None => format!("because the hard limit is {hard}"),
        };
        log::warn!(
            "You requested maxclients of {max_clients} requiring at least {} max file \
             descriptors.",
            plan.needed
        );
        log::warn!(
            "Server can't set maximum open files to {} {why}.",
            plan.needed
        );
        log::warn!(
            "Current maximum open files is {now}. maxclients has been reduced to {} to \
             compensate for low ulimit. If you need higher maxclients increase 'ulimit -n'.",
            plan.max_clients
        );
    } else if plan.raise_to.is_some() {
        log::info!(
            "Increased maximum number of open files to {now} (it was originally set to {soft})."
        );
    }
    Ok(plan.max_clients)
}

/// SIGTERM and SIGINT, blocked so that only a dedicated thread receives them.
pub struct ShutdownSignals {
    set: libc::sigset_t,
}

/// Blocks SIGTERM and SIGINT in the calling thread and every thread it starts later. Call
/// first thing in `main`, before any thread exists (the store's background threads
/// included): a thread started earlier would still receive them and die of them.
pub fn block_shutdown_signals() -> io::Result<ShutdownSignals> {
    // SAFETY: plain libc signal-set manipulation on a local, initialised set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let r = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        Ok(ShutdownSignals { set })
    }
}

impl ShutdownSignals {
    /// Waits for the next SIGTERM or SIGINT (one that arrived earlier is pending and
    /// returns at once) and says which. `kvstore cluster` waits in a loop, to pass each
    /// one on to its nodes.
    pub fn wait(&self) -> io::Result<libc::c_int> {
        let mut sig = 0;
        // SAFETY: waits on a valid, initialised signal set.
        match unsafe { libc::sigwait(&self.set, &mut sig) } {
            0 => Ok(sig),
            r => Err(io::Error::from_raw_os_error(r)),
        }
    }

    /// Starts the thread that waits for the signals and shuts the server down. A signal
    /// that arrived earlier (say, during recovery) is pending and is handled at once.
    pub fn shut_down_on_signal(self, handle: ShutdownHandle) -> io::Result<()> {
        thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Ok(sig) = self.wait() {
                    log::info!(
                        "received {}, shutting down",
                        if sig == libc::SIGTERM {
                            "SIGTERM"
                        } else {
                            "SIGINT"
                        }
                    );
                    handle.shutdown();
                }
            })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_plan_raises_the_soft_limit_then_lowers_max_clients() {
        let need = |clients: u64| clients * FDS_PER_CLIENT + RESERVED_FDS;
        // Enough already: nothing changes.
        assert_eq!(
            fd_plan(100, 0, 1_000_000, 1_000_000),
            Ok(FdPlan {
                needed: need(100),
                raise_to: None,
                max_clients: 100
            })
        );
        // Soft too low, hard enough: raise to exactly what is needed.
        assert_eq!(
            fd_plan(10_000, 0, 1024, 1 << 20),
            Ok(FdPlan {
                needed: need(10_000),
                raise_to: Some(need(10_000)),
                max_clients: 10_000
            })
        );
        // Unlimited hard limit.
        assert_eq!(
            fd_plan(10_000, 0, 1024, u64::MAX).unwrap().raise_to,
            Some(need(10_000))
        );
        // Hard too low: raise to it and fit the clients in.
        let p = fd_plan(10_000, 0, 1024, 4096).unwrap();
        assert_eq!(p.raise_to, Some(4096));
        assert_eq!(
            p.max_clients,
            ((4096 - RESERVED_FDS) / FDS_PER_CLIENT) as usize
        );
        // Soft == hard, too low.
        let p = fd_plan(10_000, 0, 64, 64).unwrap();
        assert_eq!(p.raise_to, None);
        assert_eq!(
            p.max_clients,
            ((64 - RESERVED_FDS) / FDS_PER_CLIENT) as usize
        );
        // Not even one client fits.
        let e = fd_plan(10, 0, 32, 32).unwrap_err();
        assert!(e.contains("'ulimit -n' of 32 is not enough"), "{e}");
        // Huge requests do not overflow.
        assert_eq!(
            fd_plan(usize::MAX, 0, 1024, u64::MAX).unwrap().needed,
            u64::MAX
        );
    }

    #[test]
    fn fd_plan_keeps_descriptors_for_the_peer_links() {
        // A member of three: 2 peers, 8 peer slots of 3 descriptors, 2 dialers of 2.
        assert_eq!(peer_reserve(0), 0);
        assert_eq!(peer_reserve(2), 8);
        assert_eq!(peer_fds(0), 0);
        assert_eq!(peer_fds(2), 8 * FDS_PER_PEER_SLOT + 2 * FDS_PER_DIALER);
        let kept = RESERVED_FDS + peer_fds(2);
        let p = fd_plan(100, peer_fds(2), 1024, 1024).unwrap();
        assert_eq!(p.needed, 100 + kept);
        assert_eq!((p.raise_to, p.max_clients), (None, 100));
        // The peers' descriptors come off the clients, not off the server's own.
        let p = fd_plan(10_000, peer_fds(2), 1024, 1024).unwrap();
        assert_eq!(p.max_clients, ((1024 - kept) / FDS_PER_CLIENT) as usize);
        // Room for the peers but not one client: refused, as with no peers.
        let e = fd_plan(10, peer_fds(2), kept, kept).unwrap_err();
        assert!(e.contains("is not enough"), "{e}");
    }

    #[test]
    fn admit_reserves_peer_slots_past_max_clients() {
        // Client slots free: a client, whatever the reserve.
        assert_eq!(admit(0, 10, 0, 0), Admit::Client);
        assert_eq!(admit(9, 10, 8, 8), Admit::Client);
        // A single node (no reserve): full means refused, as before.
        assert_eq!(admit(10, 10, 0, 0), Admit::Refuse);
        assert_eq!(admit(11, 10, 0, 0), Admit::Refuse);
        // A member with client slots full: peer-only while the reserve lasts.
        assert_eq!(admit(10, 10, 0, 8), Admit::PeerOnly);
        assert_eq!(admit(10, 10, 7, 8), Admit::PeerOnly);
        assert_eq!(admit(10, 10, 8, 8), Admit::Refuse);
        // --max-clients 0 (everything refused) still lets peers in.
        assert_eq!(admit(0, 0, 0, 8), Admit::PeerOnly);
    }

    #[test]
    fn peer_slots_are_never_taken_past_the_reserve() {
        let used = AtomicU64::new(0);
        assert!(!take_peer_slot(&used, 0));
        assert!(take_peer_slot(&used, 2));
        assert!(take_peer_slot(&used, 2));
        assert!(!take_peer_slot(&used, 2));
        assert_eq!(used.load(Ordering::SeqCst), 2);
        // From many threads at once: exactly the reserve is taken.
        let used = Arc::new(AtomicU64::new(0));
        let taken: usize = (0..8)
            .map(|_| {
                let used = used.clone();
                thread::spawn(move || (0..100).filter(|_| take_peer_slot(&used, 50)).count())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .sum();
        assert_eq!(taken, 50);
        assert_eq!(used.load(Ordering::SeqCst), 50);
    }
}
