//! The TCP server: accept loop, one OS thread per connection, graceful shutdown.
//!
//! A connection thread owns its socket and an input buffer, and shares an output buffer
//! (its *outbox*) with the completions of its writes. Bytes enter through `recv` into the
//! input buffer; [`RequestParser`] cuts whole requests off its front;
//! [`commands::dispatch_spec`] answers reads into the outbox, and writes are collected and
//! submitted together ([`Store::submit`]) so a pipeline of N writes costs one log append.
//! Under `--fsync always` the log writer thread runs the completion, which renders the
//! replies into the outbox and sends them; otherwise the completion runs at once on the
//! connection's own thread. Replies leave in request order: a read (or an error) that
//! follows writes waits until those writes are answered, which also gives
//! read-your-writes.
//!
//! Flow control, so a client that pipelines without reading cannot deadlock us (DESIGN.md,
//! "Limits on bad input"): replies are sent with `MSG_DONTWAIT`. If the client is not
//! reading, the rest waits in the outbox and the thread `poll`s for both directions (and
//! for an eventfd the log writer signals when it leaves replies unsent), still reading
//! requests. Past [`OUTPUT_PAUSE`] unsent bytes it stops executing (but keeps buffering
//! input up to [`MAX_QUERY_BUFFER`]); past [`MAX_OUTPUT`] it closes the connection, like
//! Redis's `client-output-buffer-limit`. When nothing is owed and no write is in flight,
//! the thread simply blocks in `recv`.
//!
//! Shutdown ([`ShutdownHandle::shutdown`], SIGTERM/SIGINT in the binary): the accept loop
//! stops, every connection's read side is shut, so each thread sees end-of-input, answers
//! what it already received, flushes and exits; then the log is fsync'd.
//!
//! A panic in a connection thread is caught and logged; the connection closes, the
//! server goes on.

use crate::commands::{self, Context, Dispatched, Reply, Session, Settings};
use crate::protocol::Proto;
use crate::protocol::{Limits, RequestParser, write_error};
use crate::store::{OpResult, Options, Store, StoreError};
use crate::wal::Op;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

/// Stop executing a connection's requests while this many reply bytes wait unsent.
pub const OUTPUT_PAUSE: usize = 64 << 20;
/// Close a connection whose unsent replies exceed this.
pub const MAX_OUTPUT: usize = 1 << 30;
/// Close a connection whose unparsed input exceeds this (Redis's client-query-buffer-limit).
pub const MAX_QUERY_BUFFER: usize = 1 << 30;
const READ_CHUNK: usize = 16 * 1024;
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
    /// A clone of every open connection's socket, to shut its read side on shutdown.
    conns: Mutex<HashMap<u64, TcpStream>>,
}

impl ShutdownHandle {
    /// Stops accepting, lets every connection finish what it received, fsyncs the log.
    /// [`Server::run`] returns once that is done.
    pub fn shutdown(&self) {
        if self.inner.stopping.swap(true, Ordering::SeqCst) {
            return;
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
        settings.bind = cfg.bind.clone();
        let ctx = Arc::new(Context::new(store, settings));
        Ok(Server {
            listener,
            shared: Arc::new(Shared {
                ctx,
                stopping: AtomicBool::new(false),
                addr,
                conns: Mutex::new(HashMap::new()),
            }),
            limits: cfg.limits,
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

    pub fn context(&self) -> Arc<Context> {
        self.shared.ctx.clone()
    }

    /// Accepts connections until shut down, then drains them and fsyncs the log.
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
                    // EMFILE and friends: back off instead of spinning.
                    log::warn!("accept failed: {e}");
                    thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            ctx.stats.total_connections.fetch_add(1, Ordering::Relaxed);
            let clients = ctx.stats.connected_clients.load(Ordering::Relaxed) as usize;
            if clients >= ctx.settings.max_clients {
                ctx.stats
                    .rejected_connections
                    .fetch_add(1, Ordering::Relaxed);
                reject(stream, "ERR max number of clients reached");
                continue;
            }
            self.spawn_connection(stream);
        }
        drop(self.listener);
        log::info!("shutting down: no longer accepting connections");
        for s in self.shared.conns.lock().values() {
            let _ = s.shutdown(Shutdown::Read);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while ctx.stats.connected_clients.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
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
        if let Ok(clone) = stream.try_clone() {
            shared.conns.lock().insert(id, clone);
        }
        let cleanup = {
            let shared = shared.clone();
            move || {
                shared.conns.lock().remove(&id);
                shared.ctx.unregister(id);
                shared
                    .ctx
                    .stats
                    .connected_clients
                    .fetch_sub(1, Ordering::SeqCst);
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
                        match Connection::new(ctx, session, stream, limits) {
                            Ok(c) => c.serve(),
                            Err(e) => log::error!("cannot set up connection {id}: {e}"),
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

/// Replies waiting to be sent. Shared between the connection's thread and the log
/// writer, which answers a committed write itself (render, send), so a connection thread
/// wakes only for its client's input, not once more for every commit.
#[derive(Default)]
struct Outbox {
    buf: Vec<u8>,
    /// Bytes of `buf` already sent.
    sent: usize,
    /// Write batches submitted to the store and not answered yet. Replies must leave in
    /// request order, so the connection thread appends a reply of its own only when this
    /// is zero (and anything it appended before a submission is already in `buf`).
    inflight: usize,
    /// The connection thread, parked until `inflight` is zero.
    waiter: Option<Thread>,
}

impl Outbox {
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

/// What a connection shares with the completions of its writes.
struct ConnShared {
    ctx: Arc<Context>,
    outbox: Mutex<Outbox>,
    stream: TcpStream,
    /// Signalled by a completion that could not send everything, so the connection
    /// thread (perhaps asleep in `poll`) takes over the rest.
    wake: OwnedFd,
    owner: thread::ThreadId,
}

impl ConnShared {
    fn signal(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a valid buffer to our own eventfd.
        unsafe {
            libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), 8);
        }
    }

    fn drain_signal(&self) {
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a valid buffer from our own (non-blocking)
        // eventfd.
        unsafe {
            libc::read(self.wake.as_raw_fd(), buf.as_mut_ptr().cast(), 8);
        }
    }

    /// The completion of a batch of writes: render each result in order, and if running
    /// on the log writer's thread, send them right away.
    fn complete(&self, res: Result<Vec<OpResult>, StoreError>, hows: Vec<Reply>, proto: Proto) {
        let mut ob = self.outbox.lock();
        match res {
            Ok(results) => {
                for (r, how) in results.iter().zip(hows) {
                    commands::render_result(r, how, proto, &mut ob.buf);
                }
            }
            Err(e) => {
                let msg = format!("IOERR {e}");
                for _ in hows {
                    write_error(&mut ob.buf, &msg);
                }
            }
        }
        ob.inflight -= 1;
        if ob.inflight == 0
            && let Some(w) = ob.waiter.take()
        {
            w.unpark();
        }
        if thread::current().id() != self.owner {
            // A send error means the client is gone; its thread will find out itself.
            let _ = ob.send(&self.stream, &self.ctx);
            if ob.unsent() > 0 {
                self.signal();
            }
        }
    }
}

/// One client connection.
struct Connection {
    /// What completions need too; the server context is `shared.ctx`.
    shared: Arc<ConnShared>,
    session: Session,
    stream: TcpStream,
    parser: RequestParser,
    input: Vec<u8>,
    /// Bytes of `input` already parsed.
    consumed: usize,
    /// Writes parsed but not yet submitted, in request order.
    pending: Vec<(Op, Reply)>,
    /// No more input will be read (end of input, QUIT or a protocol error).
    closing: bool,
    chunk: Box<[u8]>,
}

impl Connection {
    fn new(
        ctx: Arc<Context>,
        session: Session,
        stream: TcpStream,
        limits: Limits,
    ) -> io::Result<Self> {
        let _ = stream.set_nodelay(true);
        // SAFETY: eventfd returns a new descriptor we own, or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid descriptor owned by nobody else.
        let wake = unsafe { OwnedFd::from_raw_fd(fd) };
        let shared = Arc::new(ConnShared {
            ctx,
            outbox: Mutex::new(Outbox {
                buf: Vec::with_capacity(16 * 1024),
                ..Outbox::default()
            }),
            stream: stream.try_clone()?,
            wake,
            owner: thread::current().id(),
        });
        Ok(Connection {
            shared,
            session,
            stream,
            parser: RequestParser::new(limits),
            input: Vec::new(),
            consumed: 0,
            pending: Vec::new(),
            closing: false,
            chunk: vec![0u8; READ_CHUNK].into_boxed_slice(),
        })
    }

    fn serve(mut self) {
        loop {
            let (unsent, inflight) = {
                let mut ob = self.shared.outbox.lock();
                if ob.unsent() > 0 && ob.send(&self.stream, &self.shared.ctx).is_err() {
                    return;
                }
                (ob.unsent(), ob.inflight)
            };
            if unsent > MAX_OUTPUT {
                log::warn!(
                    "closing client {}: {unsent} bytes of replies unread (limit {MAX_OUTPUT})",
                    self.session.id
                );
                return;
            }
            if self.closing && unsent == 0 {
                if inflight == 0 {
                    return;
                }
                // Answer every write the client sent before it went away.
                self.wait_for_inflight();
                continue;
            }
            if unsent == 0 && inflight == 0 {
                // Nothing owed to the client and nothing can arrive for it: block for input.
                match self.stream.read(&mut self.chunk) {
                    Ok(0) => self.closing = true,
                    Ok(n) => self.take_input(n),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                }
            } else {
                // Replies are queued or will be: wait for input, for room to send, or for
                // the log writer to hand back replies it could not send.
                let want_read =
                    !self.closing && self.input.len() - self.consumed < MAX_QUERY_BUFFER;
                let (readable, woken) = match poll(
                    self.stream.as_raw_fd(),
                    want_read,
                    unsent > 0,
                    self.shared.wake.as_raw_fd(),
                ) {
                    Ok(r) => r,
                    Err(_) => return,
                };
                if woken {
                    self.shared.drain_signal();
                }
                if readable {
                    match recv_nonblocking(&self.stream, &mut self.chunk) {
                        Ok(Some(0)) => self.closing = true,
                        Ok(Some(n)) => self.take_input(n),
                        Ok(None) => {}
                        Err(_) => return,
                    }
                }
            }
            if self.shared.outbox.lock().unsent() < OUTPUT_PAUSE {
                self.process();
            }
        }
    }

    fn take_input(&mut self, n: usize) {
        if self.consumed > 0 {
            // Keep only the unparsed tail; usually that is nothing and this is free.
            self.input.drain(..self.consumed);
            self.consumed = 0;
        }
        self.input.extend_from_slice(&self.chunk[..n]);
        self.shared
            .ctx
            .stats
            .net_input_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Parks until every submitted write has been answered.
    fn wait_for_inflight(&self) {
        loop {
            {
                let mut ob = self.shared.outbox.lock();
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
        let mut ob = self.shared.outbox.lock();
        f(&mut self.session, &mut ob.buf);
    }

    /// Executes every whole request buffered, submitting writes in batches.
    fn process(&mut self) {
        let ctx = self.shared.ctx.clone();
        while !self.session.close {
            if self.shared.outbox.lock().unsent() >= OUTPUT_PAUSE {
                break;
            }
            let parsed = self.parser.parse(&self.input[self.consumed..]);
            let args = match parsed {
                Ok(Some((args, used))) => {
                    self.consumed += used;
                    args
                }
                Ok(None) => break,
                Err(e) => {
                    log::debug!("client {}: protocol error: {e}", self.session.id);
                    self.reply(|_, out| write_error(out, &e.to_string()));
                    self.closing = true;
                    self.session.close = true;
                    break;
                }
            };
            let spec = commands::lookup(&args[0]);
            if crate::multi::intercepts(&self.session, spec) {
                // A transaction's place in the log must follow this connection's earlier
                // writes (and WATCH's barrier must cover them): submit them and wait for
                // their replies first. EXEC and WATCH then block this thread until done.
                self.submit();
                self.wait_for_inflight();
                let mut out = Vec::new();
                crate::multi::handle(&ctx, &mut self.session, spec, args, &mut out);
                self.shared.outbox.lock().buf.extend_from_slice(&out);
                continue;
            }
            if !spec.is_some_and(|c| c.write) {
                self.reply(|session, out| {
                    let _ = commands::dispatch_spec(&ctx, session, spec, args, out);
                });
                continue;
            }
            let mut early = Vec::new();
            match commands::dispatch_spec(&ctx, &mut self.session, spec, args, &mut early) {
                Dispatched::Write(op, how) => self.pending.push((op, how)),
                // A write refused at once: its error must not overtake the replies of the
                // writes queued before it.
                Dispatched::Done => self.reply(|_, out| out.extend_from_slice(&early)),
            }
        }
        self.submit();
        if self.session.close {
            self.closing = true;
        }
        if self.consumed == self.input.len() {
            self.input.clear();
            self.consumed = 0;
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
        let proto = self.session.proto;
        self.shared.outbox.lock().inflight += 1;
        let shared = self.shared.clone();
        self.shared
            .ctx
            .store
            .submit(ops, Box::new(move |res| shared.complete(res, hows, proto)));
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

/// Waits until `fd` is readable (if `read`) or writable (if `write`), or `wake` is
/// readable. Returns (fd readable or closed, wake signalled).
fn poll(fd: i32, read: bool, write: bool, wake: i32) -> io::Result<(bool, bool)> {
    let mut events = 0;
    if read {
        events |= libc::POLLIN;
    }
    if write {
        events |= libc::POLLOUT;
    }
    let mut fds = [
        libc::pollfd {
            fd,
            events,
            revents: 0,
        },
        libc::pollfd {
            fd: wake,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: two valid pollfds.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r >= 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    let hup = fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0;
    Ok((
        fds[0].revents & libc::POLLIN != 0 || (hup && read),
        fds[1].revents & libc::POLLIN != 0,
    ))
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
    /// Starts the thread that waits for the signals and shuts the server down. A signal
    /// that arrived earlier (say, during recovery) is pending and is handled at once.
    pub fn shut_down_on_signal(self, handle: ShutdownHandle) -> io::Result<()> {
        thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut sig = 0;
                // SAFETY: waits on a valid, initialised signal set.
                if unsafe { libc::sigwait(&self.set, &mut sig) } == 0 {
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
