//! The TCP server: accept loop, one OS thread per connection, graceful shutdown.
//!
//! A connection thread owns its socket, an input buffer and an output buffer. Bytes enter
//! through `recv` into the input buffer; [`RequestParser`] cuts whole requests off its
//! front; [`commands::dispatch`] answers each into the output buffer, except writes, which
//! are collected and committed together ([`Store::write`]) so a pipeline of N writes costs
//! one log append and one fsync; all replies then leave in one `send`.
//!
//! Flow control, so a client that pipelines without reading cannot deadlock us (DESIGN.md,
//! "Limits on bad input"): replies are sent with `MSG_DONTWAIT`. If the client is not
//! reading, the rest waits in the output buffer and the thread switches to `poll`ing for
//! both directions, still reading requests. Past [`OUTPUT_PAUSE`] pending bytes it stops
//! executing (but keeps buffering input up to [`MAX_QUERY_BUFFER`]); past
//! [`MAX_OUTPUT`] it closes the connection, like Redis's `client-output-buffer-limit`.
//! When nothing is pending, the thread simply blocks in `recv`: two system calls per
//! request-reply round trip.
//!
//! Shutdown ([`ShutdownHandle::shutdown`], SIGTERM/SIGINT in the binary): the accept loop
//! stops, every connection's read side is shut, so each thread sees end-of-input, answers
//! what it already received, flushes and exits; then the log is fsync'd.
//!
//! A panic in a connection thread is caught and logged; the connection closes, the
//! server goes on.

use crate::commands::{self, Context, Dispatched, Reply, Session, Settings};
use crate::protocol::{Limits, RequestParser, write_error};
use crate::store::{Options, Store, StoreError};
use crate::wal::Op;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Stop executing a connection's requests while this many reply bytes wait unsent.
pub const OUTPUT_PAUSE: usize = 64 << 20;
/// Close a connection whose unsent replies exceed this.
pub const MAX_OUTPUT: usize = 1 << 30;
/// Close a connection whose unparsed input exceeds this (Redis's client-query-buffer-limit).
pub const MAX_QUERY_BUFFER: usize = 1 << 30;
const READ_CHUNK: usize = 16 * 1024;

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
                        Connection::new(ctx, session, stream, limits).serve()
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

/// One client connection.
struct Connection {
    ctx: Arc<Context>,
    session: Session,
    stream: TcpStream,
    parser: RequestParser,
    input: Vec<u8>,
    /// Bytes of `input` already parsed.
    consumed: usize,
    output: Vec<u8>,
    /// Bytes of `output` already sent.
    sent: usize,
    /// Writes parsed but not yet committed, in request order.
    pending: Vec<(Op, Reply)>,
    /// No more input will be read (end of input, QUIT or a protocol error).
    closing: bool,
    chunk: Box<[u8]>,
}

impl Connection {
    fn new(ctx: Arc<Context>, session: Session, stream: TcpStream, limits: Limits) -> Self {
        let _ = stream.set_nodelay(true);
        Connection {
            ctx,
            session,
            stream,
            parser: RequestParser::new(limits),
            input: Vec::new(),
            consumed: 0,
            output: Vec::with_capacity(16 * 1024),
            sent: 0,
            pending: Vec::new(),
            closing: false,
            chunk: vec![0u8; READ_CHUNK].into_boxed_slice(),
        }
    }

    fn unsent(&self) -> usize {
        self.output.len() - self.sent
    }

    fn serve(mut self) {
        loop {
            if self.unsent() == 0 {
                if self.closing {
                    return;
                }
                // Nothing to send: block for input.
                match self.stream.read(&mut self.chunk) {
                    Ok(0) => self.closing = true,
                    Ok(n) => self.take_input(n),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                }
            } else {
                // Replies are waiting: wait until we can send, or read more.
                let want_read =
                    !self.closing && self.input.len() - self.consumed < MAX_QUERY_BUFFER;
                let (readable, writable) = match poll(self.stream.as_raw_fd(), want_read, true) {
                    Ok(r) => r,
                    Err(_) => return,
                };
                if readable {
                    match recv_nonblocking(&self.stream, &mut self.chunk) {
                        Ok(Some(0)) => self.closing = true,
                        Ok(Some(n)) => self.take_input(n),
                        Ok(None) => {}
                        Err(_) => return,
                    }
                }
                if writable && self.send().is_err() {
                    return;
                }
            }
            if self.unsent() < OUTPUT_PAUSE {
                self.process();
            }
            if self.unsent() > MAX_OUTPUT {
                log::warn!(
                    "closing client {}: {} bytes of replies unread (limit {MAX_OUTPUT})",
                    self.session.id,
                    self.unsent()
                );
                return;
            }
            if self.unsent() > 0 && self.send().is_err() {
                return;
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
        self.ctx
            .stats
            .net_input_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Executes every whole request buffered, committing writes in batches.
    fn process(&mut self) {
        let ctx = self.ctx.clone();
        while !self.session.close && self.unsent() < OUTPUT_PAUSE {
            let parsed = self.parser.parse(&self.input[self.consumed..]);
            let args = match parsed {
                Ok(Some((args, used))) => {
                    self.consumed += used;
                    args
                }
                Ok(None) => break,
                Err(e) => {
                    self.commit();
                    write_error(&mut self.output, &e.to_string());
                    log::debug!("client {}: protocol error: {e}", self.session.id);
                    self.closing = true;
                    self.session.close = true;
                    break;
                }
            };
            let spec = commands::lookup(&args[0]);
            if !spec.is_some_and(|c| c.write) {
                self.commit();
                let _ =
                    commands::dispatch_spec(&ctx, &mut self.session, spec, args, &mut self.output);
                continue;
            }
            // A write that fails validation answers at once: its error must not overtake
            // the replies of the writes queued before it.
            let mut early = Vec::new();
            match commands::dispatch_spec(&ctx, &mut self.session, spec, args, &mut early) {
                Dispatched::Write(op, how) => self.pending.push((op, how)),
                Dispatched::Done => {
                    self.commit();
                    self.output.extend_from_slice(&early);
                }
            }
        }
        self.commit();
        if self.session.close {
            self.closing = true;
        }
        if self.consumed == self.input.len() {
            self.input.clear();
            self.consumed = 0;
        }
    }

    /// Commits the pending writes and appends their replies.
    fn commit(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let (ops, hows): (Vec<Op>, Vec<Reply>) = self.pending.drain(..).unzip();
        let proto = self.session.proto;
        match self.ctx.store.write(ops) {
            Ok(results) => {
                for (r, how) in results.iter().zip(hows) {
                    commands::render_result(r, how, proto, &mut self.output);
                }
            }
            Err(e) => {
                let msg = format!("IOERR {e}");
                for _ in hows {
                    write_error(&mut self.output, &msg);
                }
            }
        }
    }

    /// Sends as much of the output as the socket takes without blocking.
    fn send(&mut self) -> io::Result<()> {
        while self.sent < self.output.len() {
            match send_nonblocking(&self.stream, &self.output[self.sent..])? {
                Some(n) => {
                    self.sent += n;
                    self.ctx
                        .stats
                        .net_output_bytes
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
                None => return Ok(()),
            }
        }
        self.output.clear();
        self.sent = 0;
        if self.output.capacity() > 4 << 20 {
            // Don't keep a huge buffer alive for an idle connection.
            self.output.shrink_to(16 * 1024);
        }
        Ok(())
    }
}

/// `send(MSG_DONTWAIT)`: Some(n) bytes sent, None if the socket buffer is full.
fn send_nonblocking(s: &TcpStream, buf: &[u8]) -> io::Result<Option<usize>> {
    loop {
        // SAFETY: buf is a valid slice for its length; the fd is owned by `s`.
        let n = unsafe {
            libc::send(
                s.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
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

/// `recv(MSG_DONTWAIT)`: Some(n) bytes read (0 = end of input), None if nothing waits.
fn recv_nonblocking(s: &TcpStream, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        // SAFETY: buf is a valid, writable slice for its length.
        let n = unsafe {
            libc::recv(
                s.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
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

/// Waits until `fd` is readable (if `read`) or writable (if `write`).
fn poll(fd: i32, read: bool, write: bool) -> io::Result<(bool, bool)> {
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
    loop {
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, -1) };
        if r >= 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    let hup = pfd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0;
    Ok((
        pfd.revents & libc::POLLIN != 0 || (hup && read),
        pfd.revents & libc::POLLOUT != 0 || hup,
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
