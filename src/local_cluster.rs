//! `kvstore cluster --nodes N`: a local cluster in one command, in the foreground.
//!
//! What it owns: N child processes, each this same executable run as `kvstore server`
//! on 127.0.0.1 (ports `--base-port`..`--base-port + N - 1`, every other node as a peer,
//! data under `--data-dir/<port>`), and the terminal they share.
//!
//! How data flows:
//! - **Out of the children.** Each child's stdout and stderr are pipes, read line by line
//!   by one thread per pipe (`pump`) and written to our stdout behind a tag per node
//!   (`[7001] `), coloured when stdout is a terminal and `NO_COLOR` is unset. Our own
//!   notes go to the same stdout with the `kvstore cluster:` prefix, whole lines under
//!   the stdout lock, so lines never interleave mid-way.
//! - **From the nodes.** A watcher thread (`watch_leader`) asks every node `INFO
//!   replication` (a tiny RESP exchange through [`crate::client::Connection`]) a few
//!   times a second and prints which node leads whenever that changes: first with how to
//!   connect, later after a failover.
//! - **From the user.** SIGINT (Ctrl-C) and SIGTERM are blocked in every thread and
//!   taken by one thread with `sigwait` (as the server does, see
//!   [`crate::server::block_shutdown_signals`]), which hands them to the main loop over a
//!   channel. The main loop then stops every node: SIGTERM, a wait, SIGKILL for any node
//!   still running after [`STOP_TIMEOUT`], and returns 0.
//!
//! The children run in a process group of their own, so the terminal's Ctrl-C reaches
//! only us and the nodes stop in order, once, through us; and they get
//! `PR_SET_PDEATHSIG` (SIGTERM), so they stop too if we are killed without a chance to
//! stop them. A child that dies on its own (say, a user `kill`s the leader to watch a
//! failover) is reported with its exit status and how to start it again by hand; the
//! others keep running.
//!
//! Nothing is started when a port is taken: every port is checked first, and the error
//! says which.

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, IsTerminal, Read, Write};
use std::net::TcpListener;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use clap::Args;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::client::Connection;
use crate::config::Replication;
use crate::protocol::Value;
use crate::server::{ShutdownSignals, block_shutdown_signals};
use crate::wal::FsyncPolicy;

/// The most nodes `--nodes` accepts (the cluster sizes DESIGN.md supports, 1 included).
pub const MAX_NODES: u8 = 7;
/// How long a node may take to exit after SIGTERM before it gets SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the children are checked for exits while running.
const CHILD_POLL: Duration = Duration::from_millis(100);
/// How often the watcher asks the nodes who leads.
const LEADER_POLL: Duration = Duration::from_millis(300);
/// When no node leads this long after start, say so (once): something is wrong.
const LEADER_WARN_AFTER: Duration = Duration::from_secs(30);
/// Connect and I/O timeout of one watcher query, so a paused node cannot stall it.
const QUERY_TIMEOUT: Duration = Duration::from_millis(500);
/// A child's output line longer than this is cut into pieces (each tagged), so a
/// line with no end cannot grow a buffer without bound.
const MAX_LINE: u64 = 64 * 1024;
/// Variables that configure one node and would give every child the same value (the
/// same id, port or directory): removed from the children's environment. Settings all
/// nodes share (timers, fsync, …) pass through.
const PER_NODE_ENV: &[&str] = &[
    "KVSTORE_PORT",
    "KVSTORE_PEERS",
    "KVSTORE_ID",
    "KVSTORE_DATA_DIR",
    "KVSTORE_BIND",
    "KVSTORE_HTTP_PORT",
    // The cluster secret is ours to give (a file under --data-dir); a second one from
    // the environment would make the nodes refuse to start ("not both").
    "KVSTORE_CLUSTER_SECRET",
    "KVSTORE_CLUSTER_SECRET_FILE",
    // systemd's readiness socket is our unit's, not theirs.
    "NOTIFY_SOCKET",
];

/// `kvstore cluster`'s flags.
#[derive(Args, Debug, Clone)]
#[command(
    after_help = "Example:\n  kvstore cluster --nodes 3      nodes on 127.0.0.1:7001-7003\n  \
                        kvstore client -p 7001         in another terminal\n\n\
                        Ctrl-C stops every node. Kill one node's process (its pid is printed) \
                        to watch the others elect a new leader."
)]
pub struct LocalClusterArgs {
    /// How many nodes (1 to 7).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=MAX_NODES as i64))]
    pub nodes: u8,
    /// The first node's port; the others follow it (7001, 7002, …). A node's id is its
    /// port, so the highest port leads while it is up.
    #[arg(long, default_value_t = 7001, value_parser = clap::value_parser!(u16).range(1..))]
    pub base_port: u16,
    /// Directory holding each node's data directory (<DIR>/<port>), kept after exit: a
    /// second run picks up the same data.
    #[arg(long, value_name = "DIR", default_value = "kvstore-cluster")]
    pub data_dir: PathBuf,
    /// Give each node an HTTP listener (the server's `--http-port`: metrics, status,
    /// REST) on this port and the following ones, one per node.
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub http_port_base: Option<u16>,
    /// Passed to every node (async, quorum, all); the server's default when absent.
    #[arg(long, value_parser = parse_replication)]
    pub replication: Option<Replication>,
    /// Passed to every node (always, everysec, no); the server's default when absent.
    #[arg(long, value_parser = parse_fsync)]
    pub fsync: Option<FsyncPolicy>,
    /// Every node requires clients to AUTH with this password (handed to the nodes in
    /// their environment, not on their command lines).
    #[arg(long, env = "KVSTORE_REQUIREPASS", hide_env_values = true)]
    pub requirepass: Option<String>,
}

fn parse_replication(s: &str) -> Result<Replication, String> {
    s.parse()
}

fn parse_fsync(s: &str) -> Result<FsyncPolicy, String> {
    s.parse()
}

/// The client ports of `n` nodes from `base`, or why they do not fit below 65536.
pub fn node_ports(base: u16, n: u8) -> Result<Vec<u16>, String> {
    let ports: Vec<u16> = (0..u16::from(n))
        .map_while(|i| base.checked_add(i))
        .collect();
    if ports.len() != usize::from(n) || base == 0 {
        return Err(format!(
            "{n} nodes from port {base} do not fit in 1..=65535; choose a lower --base-port"
        ));
    }
    Ok(ports)
}

/// The `server` command line of node `i` (an index into `ports`), without the program.
/// The password is not here: it travels in the environment (`spawn_node`).
pub fn node_args(a: &LocalClusterArgs, ports: &[u16], i: usize) -> Vec<OsString> {
    let port = ports[i];
    let mut args: Vec<OsString> = vec!["server".into(), port.to_string().into()];
    let peers: Vec<String> = ports
        .iter()
        .filter(|&&p| p != port)
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    if !peers.is_empty() {
        args.push(peers.join(",").into());
    }
    args.push("--bind".into());
    args.push("127.0.0.1".into());
    args.push("--data-dir".into());
    args.push(node_dir(&a.data_dir, port).into_os_string());
    if ports.len() > 1 {
        args.push("--cluster-secret-file".into());
        args.push(secret_path(&a.data_dir).into_os_string());
    }
    if let Some(base) = a.http_port_base {
        // node_ports-style bounds were checked by check_ports before any start.
        let http = base.saturating_add(i as u16);
        args.push("--http-port".into());
        args.push(http.to_string().into());
    }
    if let Some(r) = a.replication {
        args.push("--replication".into());
        args.push(r.to_string().into());
    }
    if let Some(f) = a.fsync {
        args.push("--fsync".into());
        args.push(f.to_string().into());
    }
    args
}

/// `<data-dir>/<port>`.
fn node_dir(data_dir: &Path, port: u16) -> PathBuf {
    data_dir.join(port.to_string())
}

/// `<data-dir>/cluster-secret`: the secret the nodes prove to each other.
fn secret_path(data_dir: &Path) -> PathBuf {
    data_dir.join("cluster-secret")
}

/// Creates the cluster secret file (128 random bits in hex, mode 0600) unless it
/// exists. A file rather than a flag: it stays out of `ps`, the next run reuses it, and
/// a node restarted by hand finds it. Without one, every node would warn that anyone
/// can join as a peer.
fn ensure_secret(data_dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = secret_path(data_dir);
    if path.exists() {
        return Ok(());
    }
    let mut random = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut random))
        .map_err(|e| format!("cannot read /dev/urandom for a cluster secret: {e}"))?;
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let write = || -> io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(hex.as_bytes())?;
        f.sync_all()
    };
    write().map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Fails, naming the port, unless every port can be bound on 127.0.0.1 right now.
/// (A port can still be taken between this check and the node's bind; the node then
/// says so itself, and is reported like any child that exits.)
fn check_ports(ports: &[u16], what: &str) -> Result<(), String> {
    for &p in ports {
        if let Err(e) = TcpListener::bind(("127.0.0.1", p)) {
            return Err(format!(
                "{what} port {p} is not available on 127.0.0.1 ({e}); nothing was started. \
                 Stop whatever uses it, or choose other ports (--base-port, --http-port-base)."
            ));
        }
    }
    Ok(())
}

/// The tag in front of a node's lines: `[7001] `, coloured by node when `colour`.
pub fn tag(port: u16, index: usize, colour: bool) -> String {
    // Red is left out: it reads as an error. Cyan, green, yellow, blue, magenta, then
    // the bright ones.
    const COLOURS: [u8; 7] = [36, 32, 33, 34, 35, 96, 92];
    if colour {
        let c = COLOURS[index % COLOURS.len()];
        format!("\x1b[{c}m[{port}]\x1b[0m ")
    } else {
        format!("[{port}] ")
    }
}

/// Colours when stdout is a terminal and `NO_COLOR` is unset or empty (no-color.org).
fn use_colour() -> bool {
    io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Prints one of our own notes (whole line, under the stdout lock).
fn note(msg: &str) {
    let mut out = io::stdout().lock();
    // A closed stdout must not stop the nodes or their shutdown.
    let _ = writeln!(out, "kvstore cluster: {msg}");
    let _ = out.flush();
}

/// A readable exit status: `exit code 1`, `killed by signal 9 (SIGKILL)`.
pub fn describe_exit(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exit code {code}");
    }
    match status.signal() {
        Some(sig) => {
            let name = match sig {
                libc::SIGKILL => " (SIGKILL)",
                libc::SIGTERM => " (SIGTERM)",
                libc::SIGINT => " (SIGINT)",
                libc::SIGSEGV => " (SIGSEGV)",
                libc::SIGABRT => " (SIGABRT)",
                _ => "",
            };
            format!("killed by signal {sig}{name}")
        }
        None => format!("{status}"),
    }
}

/// One node as the parent sees it.
struct Node {
    port: u16,
    child: Child,
    /// Set once reaped.
    status: Option<ExitStatus>,
    pumps: Vec<thread::JoinHandle<()>>,
}

impl Node {
    fn running(&mut self) -> bool {
        if self.status.is_none() {
            match self.child.try_wait() {
                Ok(s) => self.status = s,
                Err(e) => log::warn!("cannot check node {}: {e}", self.port),
            }
        }
        self.status.is_none()
    }

    fn signal(&mut self, sig: libc::c_int) {
        if self.running() {
            let Ok(pid) = libc::pid_t::try_from(self.child.id()) else {
                return;
            };
            // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own
            // child and not yet reaped (running() just said so), so it is not reused.
            unsafe { libc::kill(pid, sig) };
        }
    }
}

/// Copies `from` to stdout line by line, each line behind `tag`. Ends at end of input
/// (the child exited and closed its end) or a read error.
fn pump(from: impl Read, tag: String) {
    let mut reader = BufReader::new(from);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.by_ref().take(MAX_LINE).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.last() != Some(&b'\n') {
            line.push(b'\n');
        }
        let mut out = io::stdout().lock();
        let _ = out.write_all(tag.as_bytes());
        let _ = out.write_all(&line);
        let _ = out.flush();
    }
}

/// Starts node `i`: its own process group, SIGTERM when we die, piped output.
fn spawn_node(
    exe: &Path,
    a: &LocalClusterArgs,
    ports: &[u16],
    i: usize,
    colour: bool,
) -> io::Result<Node> {
    let port = ports[i];
    let mut cmd = Command::new(exe);
    cmd.args(node_args(a, ports, i))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Ctrl-C in the terminal goes to the foreground process group: only to us, so
        // the nodes are stopped once, in order, by us.
        .process_group(0);
    for var in PER_NODE_ENV {
        cmd.env_remove(var);
    }
    match &a.requirepass {
        Some(p) => cmd.env("KVSTORE_REQUIREPASS", p),
        None => cmd.env_remove("KVSTORE_REQUIREPASS"),
    };
    // SAFETY: between fork and exec only async-signal-safe calls (prctl, getppid, _exit)
    // and no allocation.
    let parent = std::process::id();
    unsafe {
        cmd.pre_exec(move || {
            // If we die without stopping the nodes (SIGKILL), they stop too.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // We may have died before the prctl took effect.
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let mut pumps = Vec::new();
    let t = tag(port, i, colour);
    if let Some(out) = child.stdout.take() {
        let t = t.clone();
        pumps.push(
            thread::Builder::new()
                .name(format!("out-{port}"))
                .spawn(move || pump(out, t))?,
        );
    }
    if let Some(err) = child.stderr.take() {
        pumps.push(
            thread::Builder::new()
                .name(format!("err-{port}"))
                .spawn(move || pump(err, t))?,
        );
    }
    Ok(Node {
        port,
        child,
        status: None,
        pumps,
    })
}

/// The command that starts node `i` again by hand, for the note when it dies.
fn restart_hint(a: &LocalClusterArgs, ports: &[u16], i: usize) -> String {
    let args: Vec<String> = node_args(a, ports, i)
        .iter()
        .map(|s| s.to_string_lossy().into_owned())
        .collect();
    let pass = if a.requirepass.is_some() {
        "KVSTORE_REQUIREPASS=… "
    } else {
        ""
    };
    format!("{pass}kvstore {}", args.join(" "))
}

/// What the watcher learns from one node's `INFO replication`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRole {
    pub port: u16,
    pub leads: bool,
    pub epoch: u64,
}

/// Reads `role`, `node_role` and `epoch` out of an `INFO replication` text. A node
/// leads when it says `role:master` and (when it says) `node_role:leader`.
pub fn parse_role(port: u16, info: &str) -> Option<NodeRole> {
    let field = |name: &str| {
        info.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim() == name)
            .map(|(_, v)| v.trim().to_string())
    };
    let role = field("role")?;
    let leads = role == "master" && field("node_role").is_none_or(|r| r == "leader");
    let epoch = field("epoch").and_then(|e| e.parse().ok()).unwrap_or(0);
    Some(NodeRole { port, leads, epoch })
}

/// The leader among the answers: the one that leads in the highest epoch (an old
/// leader cut off from the others can still think it leads, in an older epoch).
pub fn pick_leader(roles: &[NodeRole]) -> Option<(u16, u64)> {
    roles
        .iter()
        .filter(|r| r.leads)
        .max_by_key(|r| r.epoch)
        .map(|r| (r.port, r.epoch))
}

/// One node's role, or None when it does not answer in time.
fn query_role(port: u16, password: Option<&str>) -> Option<NodeRole> {
    let mut conn = Connection::connect("127.0.0.1", port, Some(QUERY_TIMEOUT)).ok()?;
    conn.set_timeout(Some(QUERY_TIMEOUT)).ok()?;
    if let Some(p) = password {
        let auth = [b"AUTH".to_vec(), p.as_bytes().to_vec()];
        if let Value::Error(_) = conn.request(&auth).ok()? {
            return None;
        }
    }
    let info = [b"INFO".to_vec(), b"replication".to_vec()];
    match conn.request(&info).ok()? {
        Value::Bulk(b) => parse_role(port, &String::from_utf8_lossy(&b)),
        Value::Verbatim { text, .. } => parse_role(port, &String::from_utf8_lossy(&text)),
        _ => None,
    }
}

/// How to reach the leader over HTTP (`--http-port-base`): a REST write and read, and
/// the metrics, as curl commands to paste.
fn http_hint(port: u16, password: bool) -> String {
    let auth = if password {
        " -H 'Authorization: Bearer PASSWORD'"
    } else {
        ""
    };
    format!(
        "HTTP on the leader: curl -L{auth} -X PUT --data-binary hello \
         http://127.0.0.1:{port}/v1/kv/greeting   then: curl -L{auth} \
         http://127.0.0.1:{port}/v1/kv/greeting   and: curl{auth} \
         http://127.0.0.1:{port}/metrics (every node serves /status, /health, /metrics)"
    )
}

/// Polls the nodes until `stop`, printing who leads whenever that changes: the first
/// time with how to connect (over HTTP too with `--http-port-base`).
fn watch_leader(
    ports: Vec<u16>,
    http: Option<Vec<u16>>,
    password: Option<String>,
    stop: Arc<AtomicBool>,
) {
    let start = Instant::now();
    let mut current: Option<u16> = None;
    let mut ever = false;
    let mut warned = false;
    let mut misses = 0;
    while !stop.load(Ordering::Relaxed) {
        let roles: Vec<NodeRole> = ports
            .iter()
            .filter_map(|&p| query_role(p, password.as_deref()))
            .collect();
        if stop.load(Ordering::Relaxed) {
            return;
        }
        match pick_leader(&roles) {
            Some((port, epoch)) if current != Some(port) => {
                current = Some(port);
                misses = 0;
                if ever {
                    note(&format!("node {port} now leads (epoch {epoch})"));
                } else {
                    ever = true;
                    let auth = if password.is_some() {
                        " -a PASSWORD"
                    } else {
                        ""
                    };
                    note(&format!(
                        "node {port} leads (epoch {epoch}). Connect with: kvstore client -p \
                         {port}{auth}   or: redis-cli -p {port}{auth}"
                    ));
                    if ports.len() > 1 {
                        note(
                            "the followers answer writes with -MOVED to the leader; kvstore \
                             client follows it (and shows where it went)",
                        );
                    }
                    let leader_http = ports
                        .iter()
                        .position(|&p| p == port)
                        .and_then(|i| http.as_ref()?.get(i).copied());
                    if let Some(h) = leader_http {
                        note(&http_hint(h, password.is_some()));
                    }
                }
            }
            Some(_) => misses = 0,
            None => {
                misses += 1;
                // Two polls in a row, so a query that just timed out does not count.
                if misses == 2 && current.take().is_some() {
                    note("no node leads right now (an election is under way?)");
                }
                if !ever && !warned && start.elapsed() >= LEADER_WARN_AFTER {
                    warned = true;
                    note(&format!(
                        "no node leads after {}s: see the nodes' output above",
                        LEADER_WARN_AFTER.as_secs()
                    ));
                }
            }
        }
        thread::sleep(LEADER_POLL);
    }
}

/// Takes SIGINT and SIGTERM as they come and passes them on, until the receiver is gone.
fn forward_signals(signals: ShutdownSignals, to: Sender<libc::c_int>) {
    loop {
        let sig = match signals.wait() {
            Ok(sig) => sig,
            Err(e) => {
                log::error!("sigwait: {e}");
                return;
            }
        };
        if to.send(sig).is_err() {
            return;
        }
    }
}

/// Runs the cluster until SIGINT/SIGTERM; returns the exit code (0 after a signal, 1
/// when the nodes could not be started or all of them exited on their own).
pub fn run(a: LocalClusterArgs) -> i32 {
    // First, before any thread exists: every thread started later inherits the mask.
    let signals = match block_shutdown_signals() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kvstore cluster: cannot block shutdown signals: {e}");
            return 1;
        }
    };
    match start_and_run(a, signals) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kvstore cluster: {e}");
            1
        }
    }
}

fn start_and_run(a: LocalClusterArgs, signals: ShutdownSignals) -> Result<i32, String> {
    let ports = node_ports(a.base_port, a.nodes)?;
    check_ports(&ports, "node")?;
    let http_ports = match a.http_port_base {
        Some(base) => {
            let http = node_ports(base, a.nodes)
                .map_err(|e| e.replace("--base-port", "--http-port-base"))?;
            if let Some(p) = http.iter().find(|p| ports.contains(p)) {
                return Err(format!(
                    "HTTP port {p} is also a node's client port; choose another --http-port-base"
                ));
            }
            check_ports(&http, "HTTP")?;
            Some(http)
        }
        None => None,
    };
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find the kvstore executable to run the nodes: {e}"))?;
    std::fs::create_dir_all(&a.data_dir)
        .map_err(|e| format!("cannot create {}: {e}", a.data_dir.display()))?;
    if ports.len() > 1 {
        ensure_secret(&a.data_dir)?;
    }

    let (sig_tx, sig_rx) = crossbeam_channel::unbounded();
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || forward_signals(signals, sig_tx))
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;

    let colour = use_colour();
    let first = ports[0];
    let last = ports[ports.len() - 1];
    note(&format!(
        "starting {} node(s) on 127.0.0.1:{first}{}, data in {}",
        ports.len(),
        if first == last {
            String::new()
        } else {
            format!("-{last}")
        },
        a.data_dir.display()
    ));
    let mut nodes: Vec<Node> = Vec::new();
    for i in 0..ports.len() {
        match spawn_node(&exe, &a, &ports, i, colour) {
            Ok(node) => {
                note(&format!(
                    "node {} started (pid {}, data {})",
                    node.port,
                    node.child.id(),
                    node_dir(&a.data_dir, node.port).display()
                ));
                nodes.push(node);
            }
            Err(e) => {
                note(&format!("cannot start node {}: {e}", ports[i]));
                stop_all(&mut nodes, &sig_rx);
                return Ok(1);
            }
        }
    }
    if nodes.len() > 1 {
        note(
            "Ctrl-C stops every node. Kill one node's process (kill PID) to watch a \
             failover: the others keep running.",
        );
    } else {
        note("Ctrl-C stops the node.");
    }

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (ports, pass, stop) = (ports.clone(), a.requirepass.clone(), stop.clone());
        let http = http_ports.clone();
        thread::Builder::new()
            .name("leader-watch".into())
            .spawn(move || watch_leader(ports, http, pass, stop))
            .map_err(|e| format!("cannot start the leader watcher: {e}"))?
    };

    let code = loop {
        match sig_rx.recv_timeout(CHILD_POLL) {
            Ok(sig) => {
                let name = if sig == libc::SIGINT {
                    "SIGINT"
                } else {
                    "SIGTERM"
                };
                note(&format!("{name}: stopping every node"));
                break 0;
            }
            Err(RecvTimeoutError::Disconnected) => {
                note("signal handling failed: stopping every node");
                break 1;
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        for (i, node) in nodes.iter_mut().enumerate() {
            let was = node.status.is_none();
            if was && !node.running() {
                let how = node.status.map(describe_exit).unwrap_or_default();
                note(&format!(
                    "node {} exited ({how}); the other nodes keep running. To start it again \
                     by hand (its output then stays in that terminal): {}",
                    node.port,
                    restart_hint(&a, &ports, i)
                ));
            }
        }
        if nodes.iter().all(|n| n.status.is_some()) {
            note("every node has exited; stopping");
            break 1;
        }
    };
    stop.store(true, Ordering::Relaxed);
    stop_all(&mut nodes, &sig_rx);
    let _ = watcher.join();
    Ok(code)
}

/// SIGTERM to every running node, then wait for each; SIGKILL whatever still runs
/// after [`STOP_TIMEOUT`]. Waits for the output pumps, so the nodes' last lines are
/// printed before we return.
///
/// A further SIGINT/SIGTERM does not hurry this along: one event often delivers two
/// (`timeout` and a terminal's Ctrl-C signal the process and then its whole group), and
/// a clean stop takes milliseconds anyway; so they are only acknowledged.
fn stop_all(nodes: &mut [Node], signals: &Receiver<libc::c_int>) {
    for node in nodes.iter_mut() {
        node.signal(libc::SIGTERM);
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    let mut forced = false;
    while nodes.iter_mut().any(Node::running) {
        while signals.try_recv().is_ok() {}
        if !forced && Instant::now() >= deadline {
            forced = true;
            for node in nodes.iter_mut() {
                if node.running() {
                    note(&format!(
                        "node {} still runs {}s after SIGTERM: sending SIGKILL",
                        node.port,
                        STOP_TIMEOUT.as_secs()
                    ));
                    node.signal(libc::SIGKILL);
                }
            }
        }
        thread::sleep(CHILD_POLL / 2);
    }
    for node in nodes.iter_mut() {
        for p in node.pumps.drain(..) {
            let _ = p.join();
        }
    }
    let stopped: Vec<String> = nodes
        .iter()
        .map(|n| {
            let how = n.status.map(describe_exit).unwrap_or_default();
            format!("{} ({how})", n.port)
        })
        .collect();
    if !stopped.is_empty() {
        note(&format!("stopped: {}", stopped.join(", ")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(n: u8) -> LocalClusterArgs {
        LocalClusterArgs {
            nodes: n,
            base_port: 7001,
            data_dir: "kc".into(),
            http_port_base: None,
            replication: None,
            fsync: None,
            requirepass: None,
        }
    }

    fn strings(v: Vec<OsString>) -> Vec<String> {
        v.into_iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn ports_follow_the_base_and_must_fit() {
        assert_eq!(node_ports(7001, 3), Ok(vec![7001, 7002, 7003]));
        assert_eq!(node_ports(65535, 1), Ok(vec![65535]));
        assert!(node_ports(65534, 3).is_err());
        assert!(node_ports(0, 1).is_err());
    }

    #[test]
    fn every_node_has_the_others_as_peers() {
        let a = args(3);
        let ports = node_ports(7001, 3).unwrap();
        assert_eq!(
            strings(node_args(&a, &ports, 1)),
            [
                "server",
                "7002",
                "127.0.0.1:7001,127.0.0.1:7003",
                "--bind",
                "127.0.0.1",
                "--data-dir",
                "kc/7002",
                "--cluster-secret-file",
                "kc/cluster-secret"
            ]
        );
        // A cluster of one has no peers.
        assert_eq!(
            strings(node_args(&args(1), &[7001], 0))[..3],
            ["server", "7001", "--bind"]
        );
    }

    #[test]
    fn shared_settings_pass_through() {
        let mut a = args(2);
        a.http_port_base = Some(8001);
        a.replication = Some(Replication::All);
        a.fsync = Some(FsyncPolicy::EverySec);
        a.requirepass = Some("pw".into());
        let got = strings(node_args(&a, &[7001, 7002], 1)).join(" ");
        assert!(
            got.ends_with("--http-port 8002 --replication all --fsync everysec"),
            "{got}"
        );
        assert!(
            !got.contains("pw"),
            "the password stays out of the command line"
        );
        assert!(
            restart_hint(&a, &[7001, 7002], 1)
                .starts_with("KVSTORE_REQUIREPASS=… kvstore server 7002")
        );
    }

    #[test]
    fn tags_are_coloured_only_when_asked() {
        assert_eq!(tag(7001, 0, false), "[7001] ");
        assert_eq!(tag(7002, 1, true), "\x1b[32m[7002]\x1b[0m ");
    }

    #[test]
    fn the_leader_is_the_one_leading_the_highest_epoch() {
        let info = |role: &str, node_role: &str, epoch: u64| {
            format!("# Replication\r\nrole:{role}\r\nepoch:{epoch}\r\nnode_role:{node_role}\r\n")
        };
        let a = parse_role(7001, &info("master", "leader", 3)).unwrap();
        let b = parse_role(7002, &info("slave", "follower", 4)).unwrap();
        let c = parse_role(7003, &info("master", "leader", 4)).unwrap();
        assert!(a.leads && !b.leads && c.leads);
        assert_eq!(pick_leader(&[a.clone(), b.clone(), c]), Some((7003, 4)));
        assert_eq!(pick_leader(std::slice::from_ref(&b)), None);
        assert_eq!(pick_leader(&[a, b]), Some((7001, 3)));
        assert_eq!(parse_role(1, "garbage"), None);
    }

    #[test]
    fn exits_read_well() {
        assert_eq!(describe_exit(ExitStatus::from_raw(256)), "exit code 1");
        assert_eq!(
            describe_exit(ExitStatus::from_raw(9)),
            "killed by signal 9 (SIGKILL)"
        );
    }

    #[test]
    fn a_taken_port_is_refused() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        let e = check_ports(&[p], "node").unwrap_err();
        assert!(e.contains(&format!("port {p} is not available")), "{e}");
    }
}
