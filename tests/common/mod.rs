//! Shared harness for the integration tests: real `kvstore` processes on
//! 127.0.0.1, talked to with the `redis` crate and with raw sockets.
//!
//! Use it with `mod common;` at the top of a `tests/*.rs` file.
//!
//! The rules every integration test follows (DESIGN.md, "Tests and benchmarks"):
//!
//! - **Free ports.** Never hard-code a port: [`Server::start`] picks one with
//!   [`free_port`] (bind `127.0.0.1:0`, read it, drop), so tests run in
//!   parallel with each other and with anything else on the machine.
//! - **Own temp dirs.** Every server gets its data directory from a
//!   [`DataDir`] (a [`tempfile::TempDir`]), removed when the last user drops
//!   it. A `DataDir` can outlive a server process, so a test can kill a node
//!   and start a new one on the same data ([`Server::start_in`],
//!   [`Server::start_with`], [`Server::restart`]).
//! - **Wait with deadlines, never sleep and hope.** Readiness is a `PING`
//!   answered within a deadline; anything else that must happen "soon" is
//!   polled with [`wait_until`], which panics with a description on timeout.
//!   Every socket the harness hands out has read/write timeouts, so a stuck
//!   server fails a test instead of hanging it. Timed assertions (speed) do
//!   not belong in tests; the benchmark scripts in `bench/` check those.
//! - **Clean up in `Drop`.** Dropping a [`Server`] kills its process (even
//!   when the test panics, and then it prints the tail of the server's log
//!   first); dropping the last handle on a [`DataDir`] removes the directory.
//!
//! The server's stdout and stderr go to a log file per start, next to (not
//! inside) its `--data-dir`; read it with [`Server::log`]. Variables named
//! `KVSTORE_*` in the test's environment are not passed to the server (every
//! flag also reads one), so a developer's shell cannot change what tests see;
//! use [`Server::start_with_env`] to set some on purpose.
//!
//! - **A test that cannot run fails.** A test that needs an external tool finds
//!   it with [`require_tool`] (or [`redis_cli`]), which panics with the tool's
//!   name and how to install it: a missing tool never turns into a silent pass.
#![allow(dead_code)]

pub mod cluster;
pub mod proxy;
pub mod rng;

use std::fmt;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// How long a server may take to answer its first `PING`.
pub const START_DEADLINE: Duration = Duration::from_secs(10);
/// How long a server may take to exit after SIGTERM.
pub const STOP_DEADLINE: Duration = Duration::from_secs(10);
/// Polling interval for [`wait_until`] and the readiness check.
pub const POLL: Duration = Duration::from_millis(20);
/// Read/write timeout of the connections from [`redis_conn`] and [`raw`].
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Connect timeout of [`redis_conn`] and [`raw`].
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Path of the binary under test (built by cargo for integration tests).
pub const KVSTORE_BIN: &str = env!("CARGO_BIN_EXE_kvstore");

/// Where cargo put example `name`'s binary: `target/<profile>/examples/<name>`, beside
/// the `kvstore` binary's directory. Plain `cargo test` builds examples; a filtered run
/// (`cargo test --test cli`) does not, so a missing one fails saying how.
#[track_caller]
pub fn example_binary(name: &str) -> std::path::PathBuf {
    let path = std::path::Path::new(KVSTORE_BIN)
        .parent()
        .expect("the kvstore binary's directory")
        .join("examples")
        .join(name);
    assert!(
        path.is_file(),
        "{} not found: build it with `cargo build --example {name}` (plain `cargo test` \
         builds it)",
        path.display()
    );
    path
}

/// A port on 127.0.0.1 that was free a moment ago (bind port 0, read, drop), and that
/// this test process has not handed out before: the kernel may give a port just
/// dropped again at once, and a test picking a cluster's five ports before starting any
/// node would then start two nodes on one port.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    // Ports handed out before stay bound until we have a new one, so the kernel must
    // pick another.
    let mut again = Vec::new();
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
        again.push(listener);
    }
}

/// A data directory that outlives server processes: cloning it is cheap and
/// shares the same directory, which is removed when the last clone (held by
/// the test or by a [`Server`]) is dropped.
#[derive(Clone)]
pub struct DataDir {
    inner: Arc<DataDirInner>,
}

struct DataDirInner {
    /// Root temp dir: holds `data/` (the `--data-dir`) and the server logs.
    root: tempfile::TempDir,
    data: PathBuf,
}

impl DataDir {
    pub fn new() -> DataDir {
        let root = tempfile::Builder::new()
            .prefix("kvstore-test-")
            .tempdir()
            .expect("create temp dir");
        let data = root.path().join("data");
        fs::create_dir(&data).expect("create data dir");
        DataDir {
            inner: Arc::new(DataDirInner { root, data }),
        }
    }

    /// The directory passed as `--data-dir`.
    pub fn path(&self) -> &Path {
        &self.inner.data
    }

    /// The temp dir around it, where the server logs live.
    pub fn root(&self) -> &Path {
        self.inner.root.path()
    }
}

impl Default for DataDir {
    fn default() -> Self {
        DataDir::new()
    }
}

impl fmt::Debug for DataDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DataDir({})", self.path().display())
    }
}

static STARTS: AtomicUsize = AtomicUsize::new(0);

/// One `kvstore server` process.
pub struct Server {
    pub port: u16,
    child: Child,
    /// Set once the process has been reaped.
    status: Option<ExitStatus>,
    dir: DataDir,
    log_path: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
}

impl Server {
    /// A fresh server: new data dir, free port, `kvstore server PORT
    /// --data-dir DIR <args>`. Panics (with the server's log) unless it
    /// answers `PING` within [`START_DEADLINE`].
    #[track_caller]
    pub fn start(args: &[&str]) -> Server {
        Server::start_in(&DataDir::new(), args)
    }

    /// Like [`Server::start`], on an existing data dir (a restart).
    #[track_caller]
    pub fn start_in(dir: &DataDir, args: &[&str]) -> Server {
        Server::launch(dir, None, args, &[])
    }

    /// On an existing data dir and a given port (a node that comes back at
    /// the address its peers know).
    #[track_caller]
    pub fn start_with(dir: &DataDir, port: u16, args: &[&str]) -> Server {
        Server::launch(dir, Some(port), args, &[])
    }

    /// With environment variables set for the server process (`port`: None
    /// picks a free one).
    #[track_caller]
    pub fn start_with_env(
        dir: &DataDir,
        port: Option<u16>,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Server {
        Server::launch(dir, port, args, envs)
    }

    #[track_caller]
    fn launch(dir: &DataDir, port: Option<u16>, args: &[&str], envs: &[(&str, &str)]) -> Server {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let envs: Vec<(String, String)> = envs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        // A port picked by free_port() can be taken by someone else before
        // the server binds it; then try another one (only if we picked it).
        let attempts = if port.is_some() { 1 } else { 3 };
        for attempt in 1..=attempts {
            let port = port.unwrap_or_else(free_port);
            match Server::spawn(dir, port, &args, &envs) {
                Ok(server) => return server,
                Err(log) if attempt < attempts && log.contains("in use") => continue,
                Err(log) => panic!("{log}"),
            }
        }
        unreachable!()
    }

    /// Starts the process and waits until it is ready. Err carries a
    /// description with the server's log, for a panic or a retry.
    fn spawn(
        dir: &DataDir,
        port: u16,
        args: &[String],
        envs: &[(String, String)],
    ) -> Result<Server, String> {
        let n = STARTS.fetch_add(1, Ordering::Relaxed);
        let log_path = dir.root().join(format!("kvstore-{n}-port{port}.log"));
        let log = File::create(&log_path).expect("create server log");
        let log2 = log.try_clone().expect("clone log file handle");

        let mut cmd = Command::new(KVSTORE_BIN);
        cmd.arg("server")
            .arg(port.to_string())
            .arg("--data-dir")
            .arg(dir.path())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("KVSTORE_") {
                cmd.env_remove(&key);
            }
        }
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let cmdline = format!(
            "{KVSTORE_BIN} server {port} --data-dir {} {}",
            dir.path().display(),
            args.join(" ")
        );
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {cmdline}: {e}"));

        let mut server = Server {
            port,
            child,
            status: None,
            dir: dir.clone(),
            log_path,
            args: args.to_vec(),
            envs: envs.to_vec(),
        };
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(status) = server.try_wait() {
                return Err(format!(
                    "kvstore exited ({status}) before answering PING\n  command: {cmdline}\n{}",
                    server.log_excerpt()
                ));
            }
            if ping_ready(port) {
                return Ok(server);
            }
            if Instant::now() >= deadline {
                server.kill9();
                return Err(format!(
                    "kvstore did not answer PING on port {port} within {START_DEADLINE:?}\n  \
                     command: {cmdline}\n{}",
                    server.log_excerpt()
                ));
            }
            thread::sleep(POLL);
        }
    }

    /// Starts the server again on the same data dir, port and arguments,
    /// after [`Server::kill9`] or [`Server::terminate`].
    #[track_caller]
    pub fn restart(&mut self) {
        assert!(
            !self.is_running(),
            "restart(): the server on port {} is still running; kill9() or terminate() it first",
            self.port
        );
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let envs: Vec<(&str, &str)> = self
            .envs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        *self = Server::launch(&self.dir, Some(self.port), &args, &envs);
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn data_dir(&self) -> &DataDir {
        &self.dir
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the server wrote to stdout/stderr so far.
    pub fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("<cannot read {}: {e}>", self.log_path.display()))
    }

    /// A connection with the `redis` crate.
    #[track_caller]
    pub fn conn(&self) -> redis::Connection {
        redis_conn(self.port)
    }

    /// A raw socket, with timeouts.
    #[track_caller]
    pub fn raw(&self) -> TcpStream {
        raw(self.port)
    }

    /// Whether the process is still alive (a paused one is).
    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// The exit status, if the process has exited (reaps it).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait on kvstore");
        }
        self.status
    }

    /// SIGKILL, then reap. Nothing the process had not written survives
    /// in its memory; the page cache does (a kill -9 is not a power cut).
    pub fn kill9(&mut self) {
        if self.try_wait().is_none() {
            // Child::kill sends SIGKILL on Unix; it stops a SIGSTOPped process too.
            let _ = self.child.kill();
            self.status = Some(self.child.wait().expect("wait for kvstore"));
        }
    }

    /// SIGTERM, then wait up to [`STOP_DEADLINE`] for the exit status.
    /// Panics (after SIGKILL) with the log if the process does not exit.
    #[track_caller]
    pub fn terminate(&mut self) -> ExitStatus {
        if let Some(status) = self.try_wait() {
            return status;
        }
        self.resume(); // a stopped process would not act on SIGTERM
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + STOP_DEADLINE;
        loop {
            if let Some(status) = self.try_wait() {
                return status;
            }
            if Instant::now() >= deadline {
                self.kill9();
                panic!(
                    "kvstore on port {} did not exit within {STOP_DEADLINE:?} of SIGTERM\n{}",
                    self.port,
                    self.log_excerpt()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// SIGSTOP: the process stays, its sockets stay open, nothing answers.
    pub fn pause(&mut self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`Server::pause`].
    pub fn resume(&mut self) {
        self.signal(libc::SIGCONT);
    }

    /// Sends a signal to the process (if it has not been reaped yet).
    pub fn signal(&mut self, sig: libc::c_int) {
        if self.try_wait().is_some() {
            return;
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our
        // own unreaped child, so it cannot have been reused.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {sig}): {}",
            std::io::Error::last_os_error()
        );
    }

    /// The last lines of the log, framed, for panic messages.
    fn log_excerpt(&self) -> String {
        const LINES: usize = 80;
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let skip = lines.len().saturating_sub(LINES);
        let mut out = format!("--- {} ", self.log_path.display());
        if skip > 0 {
            out += &format!("(last {LINES} of {} lines) ", lines.len());
        }
        out += "---\n";
        for line in &lines[skip..] {
            out += line;
            out.push('\n');
        }
        out += "--- end of log ---";
        out
    }
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("port", &self.port)
            .field("pid", &self.child.id())
            .field("data_dir", &self.dir.path())
            .field("status", &self.status)
            .finish()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "kvstore on port {} (test failed):\n{}",
                self.port,
                self.log_excerpt()
            );
        }
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// True when a raw `PING` on the port gets `+PONG` (or `-NOAUTH`: a server
/// with `--requirepass` is up but wants AUTH first).
fn ping_ready(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = s.set_write_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    while !got.contains(&b'\n') {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got.starts_with(b"+PONG") || got.starts_with(b"-NOAUTH")
}

/// A `redis` crate connection to 127.0.0.1:port, with a connect timeout
/// and read/write timeouts of [`IO_TIMEOUT`].
#[track_caller]
pub fn redis_conn(port: u16) -> redis::Connection {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
        .expect("redis client for 127.0.0.1");
    let conn = match client.get_connection_with_timeout(CONNECT_TIMEOUT) {
        Ok(conn) => conn,
        Err(e) => panic!("redis connection to 127.0.0.1:{port}: {e}"),
    };
    conn.set_read_timeout(Some(IO_TIMEOUT))
        .expect("set_read_timeout");
    conn.set_write_timeout(Some(IO_TIMEOUT))
        .expect("set_write_timeout");
    conn
}

/// A plain TCP connection to 127.0.0.1:port with read/write timeouts of
/// [`IO_TIMEOUT`] (and TCP_NODELAY), for protocol-level tests.
#[track_caller]
pub fn raw(port: u16) -> TcpStream {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let s = match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(e) => panic!("connect to {addr}: {e}"),
    };
    s.set_read_timeout(Some(IO_TIMEOUT))
        .expect("set_read_timeout");
    s.set_write_timeout(Some(IO_TIMEOUT))
        .expect("set_write_timeout");
    s.set_nodelay(true).expect("set_nodelay");
    s
}

/// Polls `f` every [`POLL`] until it returns true; panics with `what` if it
/// has not within `deadline`. `f` is always called at least once, and once
/// more at the deadline.
#[track_caller]
pub fn wait_until(deadline: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    loop {
        if f() {
            return;
        }
        if Instant::now() >= end {
            // One last look, in case the poll interval straddled the deadline.
            if f() {
                return;
            }
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        thread::sleep(POLL);
    }
}

/// How to get `redis-cli`, for the panic of a test that needs it.
pub const REDIS_CLI_HINT: &str = "install redis-tools (apt-get install redis-tools)";

/// The path of the executable `name` on `PATH`. Panics with "`name` not found: `hint`"
/// when there is none: a test that needs a tool must fail without it, never pass
/// having tested nothing.
#[track_caller]
pub fn require_tool(name: &str, hint: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| {
                fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
    });
    match found {
        Some(p) => p,
        None => panic!("{name} not found: {hint}"),
    }
}

/// A `Command` for `redis-cli`; panics naming the tool when it is not installed.
#[track_caller]
pub fn redis_cli() -> Command {
    Command::new(require_tool("redis-cli", REDIS_CLI_HINT))
}

/// A request in RESP (an array of bulk strings).
pub fn resp(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}
