//! The `kvstore` command line: parses arguments and hands over to the library.

use clap::builder::BoolishValueParser;
use clap::{Args, Parser, Subcommand};
use kvstore::client::{self, ClientOptions};
use kvstore::cluster::{ClusterState, RoleInfo};
use kvstore::commands::Settings;
use kvstore::config::{self, ClusterArgs, ClusterConfig, Replication};
use kvstore::driver::Driver;
use kvstore::peer::PeerNet;
use kvstore::protocol::Limits;
use kvstore::sdnotify;
use kvstore::server::{self, Server, ServerConfig};
use kvstore::store::{DEFAULT_DATABASES, Options};
use kvstore::wal::{self, FsyncPolicy};
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The port a server listens on when none is given (Redis's 6379 + 1000).
const DEFAULT_PORT: u16 = 7379;

#[derive(Parser, Debug)]
#[command(
    name = "kvstore",
    version,
    about = "A durable key-value store that speaks the Redis protocol",
    long_about = "A durable key-value store that speaks the Redis protocol (RESP2, RESP3 and inline \
                  commands), so nc, redis-cli, redis-benchmark and Redis client libraries work \
                  with it unchanged.\n\nLogs go to stderr; set RUST_LOG (error, warn, info, \
                  debug, trace) to choose how much. Default: info."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a node: a durable server on PORT (default 7379).
    Server(ServerArgs),
    /// Talk to a server: an interactive prompt, or one command and exit.
    Client(ClientArgs),
    /// Use a data directory directly, with no network (the embedded store).
    Repl(ReplArgs),
    /// Verify a data directory's log and snapshots; explain any damage.
    CheckLog(CheckLogArgs),
    /// Run a local cluster in the foreground: N nodes on 127.0.0.1 (7001, 7002, …),
    /// their output tagged per node; Ctrl-C stops them all.
    Cluster(kvstore::local_cluster::LocalClusterArgs),
}

#[derive(Args, Debug)]
struct ServerArgs {
    /// TCP port to listen on.
    #[arg(env = "KVSTORE_PORT", default_value_t = DEFAULT_PORT)]
    port: u16,
    /// The other nodes of the cluster, comma-separated: host:port (their client port;
    /// the node's id is that port) or ID@host:port (say which id answers there: needed
    /// when a proxy or NAT sits between nodes). Without peers the node is a cluster of
    /// one.
    #[arg(env = "KVSTORE_PEERS", value_name = "PEERS")]
    peers: Option<String>,
    /// Also serve HTTP on this port (same address as --bind): GET /metrics
    /// (Prometheus), /status (JSON), /health, and GET/PUT/DELETE /v1/kv/KEY. Off
    /// without it.
    #[arg(long, env = "KVSTORE_HTTP_PORT", value_name = "PORT")]
    http_port: Option<u16>,
    /// Address to bind; 0.0.0.0 listens on every interface.
    #[arg(long, env = "KVSTORE_BIND", default_value = "127.0.0.1")]
    bind: String,
    /// This node's id: its Bully priority (the highest alive id leads) and the name the
    /// other nodes know it by; unique in the cluster, never 0 [default: PORT, so nodes
    /// on one machine need no ids].
    #[arg(long, env = "KVSTORE_ID")]
    id: Option<u64>,
    /// The secret every node of the cluster shares; nodes prove it to each other (an
    /// HMAC challenge-response: it never crosses the network). Prefer
    /// --cluster-secret-file: a flag shows in `ps`.
    #[arg(long, env = "KVSTORE_CLUSTER_SECRET", hide_env_values = true)]
    cluster_secret: Option<String>,
    /// Read the cluster secret from this file (one trailing newline is ignored).
    #[arg(long, env = "KVSTORE_CLUSTER_SECRET_FILE", value_name = "PATH")]
    cluster_secret_file: Option<PathBuf>,
    /// When a write is acknowledged: async (once the leader's log has it; a failover
    /// may lose the last writes), quorum (once a majority, the leader included, has it
    /// on disk), all (once every node has).
    #[arg(long, env = "KVSTORE_REPLICATION", default_value = "quorum", value_parser = parse_replication)]
    replication: Replication,
    /// How often the leader sends heartbeats, in milliseconds.
    #[arg(long, env = "KVSTORE_HEARTBEAT_MS", default_value_t = config::DEFAULT_HEARTBEAT_MS)]
    heartbeat_ms: u64,
    /// A follower that hears no leader for this long (ms) starts an election.
    #[arg(long, env = "KVSTORE_FAILURE_TIMEOUT_MS", default_value_t = config::DEFAULT_FAILURE_TIMEOUT_MS)]
    failure_timeout_ms: u64,
    /// A leader that has not heard a majority for this long (ms) stops serving; must be
    /// longer than --heartbeat-ms and shorter than --failure-timeout-ms.
    #[arg(long, env = "KVSTORE_LEASE_MS", default_value_t = config::DEFAULT_LEASE_MS)]
    lease_ms: u64,
    /// Directory for the log, snapshots and meta, locked while the server runs (one
    /// process per directory) [default: ./kvstore-data-PORT].
    #[arg(long, env = "KVSTORE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// When to fsync the log: always (before every reply; group commit), everysec
    /// (once a second: a power cut may lose about a second), no (leave it to the OS).
    #[arg(long, env = "KVSTORE_FSYNC", default_value = "always", value_parser = parse_fsync)]
    fsync: FsyncPolicy,
    /// Require clients to AUTH with this password (HTTP: `Authorization: Bearer`).
    /// Prefer --requirepass-file: a flag shows in `ps`.
    #[arg(long, env = "KVSTORE_REQUIREPASS", hide_env_values = true)]
    requirepass: Option<String>,
    /// Read the client password from this file (one trailing newline is ignored).
    #[arg(long, env = "KVSTORE_REQUIREPASS_FILE", value_name = "PATH")]
    requirepass_file: Option<PathBuf>,
    /// Run open on an address other machines can reach: without this, a node bound to
    /// anything but loopback refuses to start unless a password or a cluster secret
    /// protects it (protected mode).
    #[arg(long, env = "KVSTORE_INSECURE", value_parser = BoolishValueParser::new())]
    insecure: bool,
    /// Refuse connections beyond this many clients (lowered at start to what the
    /// open-files limit allows, after raising it as far as possible). A cluster member
    /// keeps a few more slots for its peers' links, which never count here.
    #[arg(long, env = "KVSTORE_MAX_CLIENTS", default_value_t = 10_000)]
    max_clients: usize,
    /// Close a client whose unprocessed input (buffered bytes plus the arguments of an
    /// unfinished request) exceeds this many bytes, as Redis's client-query-buffer-limit.
    /// From 1 MiB to 1 GiB (a request of 1 GiB is the largest whose log entry always fits
    /// the log's entry limit).
    #[arg(
        long,
        env = "KVSTORE_CLIENT_QUERY_BUFFER_LIMIT",
        default_value_t = kvstore::protocol::DEFAULT_QUERY_BUFFER_LIMIT as u64,
        value_parser = clap::value_parser!(u64).range(1 << 20..=1 << 30)
    )]
    client_query_buffer_limit: u64,
    /// Largest bulk string a client may send, in bytes.
    #[arg(long, env = "KVSTORE_PROTO_MAX_BULK_LEN", default_value_t = 512 * 1024 * 1024)]
    proto_max_bulk_len: usize,
    /// Allow the DEBUG command (DEBUG PANIC, DEBUG SLEEP), for testing; off by default,
    /// as in Redis.
    #[arg(long, env = "KVSTORE_ENABLE_DEBUG_COMMAND", value_parser = BoolishValueParser::new())]
    enable_debug_command: bool,
    /// Start a new log segment past this many bytes.
    #[arg(long, env = "KVSTORE_SEGMENT_SIZE", default_value_t = 64 * 1024 * 1024)]
    segment_size: u64,
    /// Never compact a log smaller than this many bytes.
    #[arg(long, env = "KVSTORE_COMPACT_MIN_SIZE", default_value_t = 64 * 1024 * 1024)]
    compact_min_size: u64,
    /// Compact (snapshot the data, drop the log it covers) when the log grows past this
    /// percentage of the live data.
    #[arg(long, env = "KVSTORE_COMPACT_PERCENTAGE", default_value_t = 100)]
    compact_percentage: u64,
    /// Number of databases (SELECT 0 to N-1), as Redis's `databases`. A data directory
    /// written with more is refused.
    #[arg(long, env = "KVSTORE_DATABASES", default_value_t = DEFAULT_DATABASES,
          value_parser = clap::value_parser!(u32).range(1..=MAX_DATABASES))]
    databases: u32,
}

#[derive(Args, Debug)]
#[command(
    disable_help_flag = true,
    after_help = "Examples:\n  kvstore client                          prompt, 127.0.0.1:7379\n  \
                  kvstore client -h 10.0.0.5 -p 7001      prompt, another server\n  \
                  kvstore client SET greeting hello       one command, then exit\n  \
                  kvstore client -p 7001 -n 0 GET k       one command on another server\n\n\
                  As with redis-cli, every word after the options is the command: a word \
                  that is not a known command is sent anyway (the server answers `unknown \
                  command`), never taken for a host."
)]
struct ClientArgs {
    /// The command to run once (e.g. `SET k v`); without one, an interactive prompt
    /// starts.
    #[arg(
        value_name = "COMMAND",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    command: Vec<String>,
    /// Server host.
    #[arg(short = 'h', long, env = "KVSTORE_HOST", default_value = "127.0.0.1")]
    host: String,
    /// Server port.
    #[arg(short = 'p', long, env = "KVSTORE_PORT", default_value_t = DEFAULT_PORT)]
    port: u16,
    /// Password to AUTH with after connecting.
    #[arg(short = 'a', long, env = "KVSTORE_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Database number: SELECT it after connecting (and after every reconnect).
    #[arg(
        short = 'n',
        long = "db",
        value_name = "DB",
        allow_negative_numbers = true
    )]
    db: Option<i64>,
    /// Print replies raw (as when output is not a terminal).
    #[arg(long, conflicts_with = "no_raw")]
    raw: bool,
    /// Print replies formatted (as on a terminal), even into a pipe.
    #[arg(long)]
    no_raw: bool,
    /// Print help (`-h` is the host, as in redis-cli).
    #[arg(long, action = clap::ArgAction::Help)]
    help: Option<bool>,
}

#[derive(Args, Debug)]
struct ReplArgs {
    /// The data directory to open (created if missing).
    #[arg(long, env = "KVSTORE_DATA_DIR")]
    data_dir: PathBuf,
    /// When to fsync the log (as for `server`).
    #[arg(long, env = "KVSTORE_FSYNC", default_value = "always", value_parser = parse_fsync)]
    fsync: FsyncPolicy,
    /// Number of databases (as for `server`).
    #[arg(long, env = "KVSTORE_DATABASES", default_value_t = DEFAULT_DATABASES,
          value_parser = clap::value_parser!(u32).range(1..=MAX_DATABASES))]
    databases: u32,
}

/// The most databases `--databases` accepts (each costs memory and a look per expiry
/// cycle even when empty).
const MAX_DATABASES: i64 = 65536;

#[derive(Args, Debug)]
struct CheckLogArgs {
    /// The data directory to check (it may be in use by a running server).
    dir: PathBuf,
    /// Truncate a torn tail (bytes written after the last fsync, cut short by a crash),
    /// as startup would; takes the directory's lock, so not while a server has it open.
    /// Corruption (damage in data that was fsync'd, a missing part of the log) is never
    /// "repaired".
    #[arg(long)]
    repair: bool,
}

fn parse_fsync(s: &str) -> Result<FsyncPolicy, String> {
    s.parse()
}

fn parse_replication(s: &str) -> Result<Replication, String> {
    s.parse()
}

fn main() -> ExitCode {
    // Every connection is a thread, and the allocator gives each thread its own heap: with
    // transparent huge pages each heap would start as a 2 MiB page, over a megabyte of
    // RSS per idle connection. Small pages keep an idle connection at a few KiB.
    // SAFETY: prctl with integer arguments only; failure just leaves THP as it was.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Server(a) => run_server(a),
        Command::Client(a) => {
            let opts = ClientOptions {
                host: a.host,
                port: a.port,
                password: a.password,
                db: a.db.unwrap_or(0),
                raw: if a.raw {
                    Some(true)
                } else if a.no_raw {
                    Some(false)
                } else {
                    None
                },
                ..ClientOptions::default()
            };
            ExitCode::from(client::run(opts, a.command).clamp(0, 255) as u8)
        }
        Command::Repl(a) => {
            let opts = Options {
                fsync: a.fsync,
                databases: a.databases,
                ..Options::default()
            };
            ExitCode::from(kvstore::repl::run(&a.data_dir, opts).clamp(0, 255) as u8)
        }
        Command::CheckLog(a) => check_log(a),
        Command::Cluster(a) => ExitCode::from(kvstore::local_cluster::run(a).clamp(0, 255) as u8),
    }
}

fn run_server(a: ServerArgs) -> ExitCode {
    // The cluster flags are checked first, before anything is opened, so a mistake in
    // them is what the operator hears about.
    let cluster_args = ClusterArgs {
        port: a.port,
        peers: a.peers.clone(),
        id: a.id,
        secret: a.cluster_secret.clone(),
        secret_file: a.cluster_secret_file.clone(),
        replication: a.replication,
        heartbeat_ms: a.heartbeat_ms,
        failure_timeout_ms: a.failure_timeout_ms,
        lease_ms: a.lease_ms,
    };
    let cluster = match ClusterConfig::from_args(&cluster_args, |p| std::fs::read(p)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kvstore: {e}");
            return ExitCode::from(2);
        }
    };
    let member = !cluster.peers.is_empty();
    let password = match config::client_password(
        a.requirepass.as_deref(),
        a.requirepass_file.as_deref(),
        |p| std::fs::read(p),
    ) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("kvstore: {e}");
            return ExitCode::from(2);
        }
    };
    // Protected mode: decided on what --bind resolves to, before anything listens.
    let addrs: Vec<std::net::IpAddr> = match (a.bind.as_str(), 0).to_socket_addrs() {
        Ok(it) => it.map(|sa| sa.ip()).collect(),
        Err(e) => {
            eprintln!("kvstore: cannot resolve --bind {}: {e}", a.bind);
            return ExitCode::from(2);
        }
    };
    match config::protected_mode(
        &a.bind,
        &addrs,
        password.is_some(),
        // A secret guards the links between members; a node with no peers has none.
        member && !cluster.secret.is_empty(),
        a.insecure,
    ) {
        Ok(None) => {}
        Ok(Some(warning)) => log::warn!("{warning}"),
        Err(e) => {
            log::error!("{e}");
            eprintln!("kvstore: {e}");
            return ExitCode::from(2);
        }
    }
    // Before anything opens files: raise the descriptor limit, or fit the clients in it.
    let max_clients = match server::fit_open_files_limit(a.max_clients, cluster.peers.len()) {
        Ok(n) => n,
        Err(e) => {
            log::error!("{e}");
            eprintln!("kvstore: {e}");
            return ExitCode::FAILURE;
        }
    };
    if a.proto_max_bulk_len as u64 > a.client_query_buffer_limit {
        log::warn!(
            "--proto-max-bulk-len ({}) is larger than --client-query-buffer-limit ({}): a \
             client sending a bulk string that long is closed before it arrives",
            a.proto_max_bulk_len,
            a.client_query_buffer_limit
        );
    }
    let data_dir = a
        .data_dir
        .unwrap_or_else(|| PathBuf::from(format!("kvstore-data-{}", a.port)));
    // systemd (Type=notify): a no-op unless $NOTIFY_SOCKET is set (src/sdnotify.rs).
    let notifier = Arc::new(sdnotify::Notifier::from_env());
    notifier.status(&format!("recovering the log in {}", data_dir.display()));
    if a.http_port.is_some_and(|p| p != 0 && p == a.port) {
        eprintln!(
            "kvstore: --http-port must differ from the server's PORT ({})",
            a.port
        );
        return ExitCode::from(2);
    }
    // Bound before the server, so that its port is in the settings (`PEER HTTP`).
    let http_listener = match a.http_port.map(|p| kvstore::http::bind(&a.bind, p)) {
        None => None,
        Some(Ok(l)) => Some(l),
        Some(Err(e)) => {
            log::error!("{e}");
            eprintln!("kvstore: {e}");
            return ExitCode::FAILURE;
        }
    };
    let http_port = http_listener
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map_or(0, |a| a.port());
    let cfg = ServerConfig {
        bind: a.bind.clone(),
        port: a.port,
        data_dir,
        store: Options {
            fsync: a.fsync,
            segment_size: a.segment_size.max(4096),
            compact_min_bytes: a.compact_min_size,
            compact_percentage: a.compact_percentage,
            databases: a.databases,
            cluster_of_one: !member,
            ..Options::default()
        },
        settings: Settings {
            requirepass: password,
            max_clients,
            peer_reserve: server::peer_reserve(cluster.peers.len()),
            port: a.port,
            bind: a.bind,
            proto_max_bulk_len: a.proto_max_bulk_len,
            client_query_buffer_limit: usize::try_from(a.client_query_buffer_limit)
                .unwrap_or(usize::MAX),
            node_id: cluster.id,
            enable_debug_command: a.enable_debug_command,
            http_port,
        },
        limits: Limits {
            max_bulk_len: a.proto_max_bulk_len,
            max_query_buffer: usize::try_from(a.client_query_buffer_limit).unwrap_or(usize::MAX),
            ..Limits::default()
        },
    };
    let signals = match server::block_shutdown_signals() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kvstore: cannot block shutdown signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut server = match Server::bind(cfg) {
        Ok(s) => s,
        Err(e) => {
            log::error!("{e}");
            eprintln!("kvstore: {e}");
            return ExitCode::FAILURE;
        }
    };
    if member && let Err(e) = join_cluster(&server, &cluster) {
        log::error!("{e}");
        eprintln!("kvstore: {e}");
        return ExitCode::FAILURE;
    }
    supervise(&server, notifier);
    if let Err(e) = signals.shut_down_on_signal(server.shutdown_handle()) {
        eprintln!("kvstore: cannot install signal handlers: {e}");
        return ExitCode::FAILURE;
    }
    let http = match http_listener.map(|l| kvstore::http::HttpServer::start(l, server.context())) {
        None => None,
        Some(Ok(h)) => Some(h),
        Some(Err(e)) => {
            log::error!("{e}");
            eprintln!("kvstore: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(h) = http {
        server.on_drain(move || h.stop());
    }
    let result = server.run();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvstore: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Tells systemd when the server is ready, how it is doing, and when it stops; pings
/// its watchdog while healthy (`src/sdnotify.rs`). Nothing here is fatal.
fn supervise(server: &Server, notifier: Arc<sdnotify::Notifier>) {
    let n = notifier.clone();
    server.on_shutdown(move || n.stopping());
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    let watchdog = sdnotify::watchdog_timeout(usec.as_deref(), pid.as_deref(), std::process::id())
        .unwrap_or_else(|e| {
            log::warn!("ignoring systemd's watchdog: {e}");
            None
        });
    let listen = server.local_addr().to_string();
    if let Err(e) = sdnotify::Supervisor::start(server.context(), notifier, watchdog, listen) {
        log::warn!("cannot start the systemd notification thread: {e}");
    }
}

/// Starts a cluster member's peer links and node driver on a bound server. Until they
/// run, the node answers clients `-CLUSTERDOWN`. Peers given as plain `host:port` to a
/// node with its own `--id` have their ids learned first (`peer::learn_ids`), which
/// needs the server running (peers ask us too): so this happens on its own thread, and
/// a failure there stops the process.
fn join_cluster(server: &Server, cluster: &ClusterConfig) -> Result<(), String> {
    let ctx = server.context();
    let epoch = ctx.store.with_log(|log| log.log().meta().epoch);
    let state = Arc::new(ClusterState::new(RoleInfo::starting(cluster.id, epoch)));
    ctx.set_cluster(state.clone());
    let attacher = server.peer_attacher();
    let own_addr = format!("{}:{}", ctx.settings.bind, server.local_addr().port());
    let mut cluster = cluster.clone();
    let start = move || -> Result<(), String> {
        kvstore::peer::learn_ids(&mut cluster, ctx.store.dir())?;
        let st = state.clone();
        let (net, incoming) = PeerNet::start(&cluster, move || st.info().epoch)
            .map_err(|e| format!("cannot start the peer links: {e}"))?;
        let net = Arc::new(net);
        if attacher.attach(net.clone()).is_err() {
            return Err("peer links attached twice".into());
        }
        Driver::start(ctx.store.clone(), &cluster, own_addr, net, incoming, state)?;
        Ok(())
    };
    std::thread::Builder::new()
        .name("join".into())
        .spawn(move || {
            if let Err(e) = start() {
                log::error!("{e}");
                eprintln!("kvstore: {e}");
                std::process::exit(1);
            }
        })
        .map_err(|e| format!("cannot start the cluster: {e}"))?;
    Ok(())
}

fn check_log(a: CheckLogArgs) -> ExitCode {
    // The log frames entries; whether a payload decodes is the state machine's to say.
    let validate = |e: wal::EntryRef<'_>| kvstore::db::Command::decode(e.payload).map(drop);
    match wal::check(&a.dir, a.repair, validate) {
        Ok(r) => {
            let rep = &r.report;
            println!(
                "{}: {} segment(s), {} snapshot(s), {} bytes of log",
                a.dir.display(),
                r.segments,
                r.snapshots,
                r.log_bytes
            );
            if let Some(i) = rep.snapshot_index {
                println!("snapshot at index {i}");
            }
            println!(
                "{} log records after it, last index {} (epoch {})",
                rep.entries_replayed, rep.last_index, rep.last_epoch
            );
            match &rep.torn_tail {
                Some((path, off, bytes)) if a.repair => {
                    println!(
                        "torn tail repaired: truncated {} at byte offset {off} ({bytes} bytes of an \
                         incomplete last record)",
                        path.display()
                    );
                    ExitCode::SUCCESS
                }
                Some((path, off, bytes)) => {
                    println!(
                        "torn tail: {} ends with {bytes} bytes of an incomplete record at byte \
                         offset {off} (a write cut short by a crash). Every record before it is \
                         intact; the server truncates it on start, or run with --repair.",
                        path.display()
                    );
                    ExitCode::from(1)
                }
                None => {
                    println!("OK: no damage");
                    ExitCode::SUCCESS
                }
            }
        }
        Err(e) => {
            println!("{e}");
            if matches!(e, wal::WalError::Corrupt { .. }) {
                println!(
                    "This is not a torn write (bytes written after the last fsync): the damage \
                     is in data that was on disk, or part of the log is missing, so --repair \
                     will not truncate it. Restore the directory from a replica or a backup, or \
                     move the damaged file aside knowing what it held."
                );
            }
            ExitCode::from(2)
        }
    }
}
