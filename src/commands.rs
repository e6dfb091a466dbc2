//! Commands: the table of every command the server knows, and their execution.
//!
//! One table ([`COMMANDS`]) serves dispatch (arity checks), `COMMAND` (COUNT, INFO, DOCS,
//! LIST; DOCS's `arguments` are parsed from each row's synopsis by [`crate::docs`]), the
//! client's completion and hints, and the README's command list, so they cannot
//! disagree. The server commands (SAVE, SHUTDOWN, ROLE, …) live in [`crate::admin`].
//!
//! A request enters [`dispatch`] as its argument vector. Reads and connection commands
//! answer at once, appending their reply to the connection's output buffer; they see the
//! data only through the state machine's read API ([`Keyspace`](crate::db::Keyspace)
//! under [`Store::read`]). A write is not executed here: it comes back as
//! [`Dispatched::Write`] holding the log operation ([`Op`], with relative expiry times
//! already made absolute), which the caller batches with the connection's other pipelined
//! writes into one [`Store::write`] in the session's database ([`Session::db`]), then
//! renders each result ([`OpResult`]) with [`render_result`]. Reads look at the session's
//! database only; SELECT changes it. That is the single write path: the map changes only
//! by applying logged entries, in `src/db/`, which nothing here reaches into.
//!
//! On a cluster member, [`dispatch_spec`] serves a request only as the node's role
//! allows ([`Context::gate`], by the command's [`Gate`]): a refused one is answered
//! `-MOVED 0 <leader>` or `-CLUSTERDOWN no leader elected` and nothing is queued or
//! logged. Pipelined writes are each gated as they are dispatched (the log writer
//! checks again when it appends). WAIT waits for followers' acknowledgements of the
//! connection's last write ([`Session::last_write_index`]).

/// One row of the command table.
#[derive(Debug, Clone, Copy)]
pub struct CommandSpec {
    /// Lower-case name, as `COMMAND` reports it.
    pub name: &'static str,
    /// Redis arity: positive = exact argument count (name included), negative = at least.
    pub arity: i32,
    /// Redis command flags (`write`, `readonly`, `fast`, …).
    pub flags: &'static [&'static str],
    /// Changes data: executed by logging an entry (the `write` flag, as a bool so the
    /// connection loop can test it without comparing strings).
    pub write: bool,
    pub first_key: i32,
    pub last_key: i32,
    pub step: i32,
    /// Argument synopsis shown as a hint in the client, e.g. `key value [NX|XX] [EX seconds]`.
    pub args: &'static str,
    /// One-line description.
    pub summary: &'static str,
}

/// Which serving rule of a cluster member a command is under (`src/cluster.rs`), decided
/// from its row of the command table:
/// - [`Gate::Write`]: the `write` flag. Served only by a leader that may take writes
///   (`write_gate`); elsewhere `-MOVED 0 <leader>` or `-CLUSTERDOWN`, nothing logged.
/// - [`Gate::Read`]: reads the key space: not a write, and flagged `readonly` (Redis's
///   flag for commands that read data: GET, MGET, EXISTS, TTL, KEYS, SCAN, DBSIZE,
///   RANDOMKEY, …) or naming keys (`first_key > 0`, the keys Redis Cluster routes by:
///   that brings in WATCH). Served by a leader whose lease holds (`read_gate`: a
///   linearizable read), or from the local copy on a connection that sent READONLY.
/// - [`Gate::Any`]: everything else (connection and server commands: PING, HELLO, AUTH,
///   CLIENT, INFO, ROLE, CONFIG, COMMAND, SELECT, MULTI, EXEC, …), served on any node.
///   EXEC and WAIT apply their own rule (`src/multi.rs`, [`dispatch_spec`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Write,
    Read,
    Any,
}

impl Gate {
    pub fn of(spec: &CommandSpec) -> Gate {
        if spec.write {
            Gate::Write
        } else if spec.first_key > 0 || spec.flags.contains(&"readonly") {
            Gate::Read
        } else {
            Gate::Any
        }
    }
}

use crate::db::{Condition, ERR_NOT_INTEGER, Expiry, Item, Op, OpResult, parse_i64};
use crate::glob::glob_match;
use crate::protocol::{
    Proto, write_array_len, write_bulk, write_error, write_integer, write_map_len, write_null,
    write_null_array, write_set_len, write_simple, write_verbatim,
};
use crate::store::Store;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const W: &[&str] = &["write", "denyoom"];
const WF: &[&str] = &["write", "denyoom", "fast"];
const WD: &[&str] = &["write", "fast"];
const R: &[&str] = &["readonly"];
const RF: &[&str] = &["readonly", "fast"];
const F: &[&str] = &["fast"];
const NS: &[&str] = &["noscript", "loading", "stale", "fast"];
const ADMIN: &[&str] = &["admin", "noscript", "no_async_loading"];
const ADMIN_NM: &[&str] = &["admin", "noscript", "no_async_loading", "no_multi"];
const SHUT: &[&str] = &[
    "admin",
    "noscript",
    "loading",
    "stale",
    "no_multi",
    "allow_busy",
];
const ADMIN_STALE: &[&str] = &["admin", "noscript", "loading", "stale"];
const LASTSAVE: &[&str] = &["loading", "stale", "fast"];
const TX: &[&str] = &["noscript", "loading", "stale", "fast", "allow_busy"];
const AUTHF: &[&str] = &[
    "noscript",
    "loading",
    "stale",
    "fast",
    "no_auth",
    "allow_busy",
];

macro_rules! cmd {
    ($name:expr, $arity:expr, $flags:expr, $write:expr, $fk:expr, $lk:expr, $st:expr, $args:expr, $sum:expr) => {
        CommandSpec {
            name: $name,
            arity: $arity,
            flags: $flags,
            write: $write,
            first_key: $fk,
            last_key: $lk,
            step: $st,
            args: $args,
            summary: $sum,
        }
    };
}

/// Every command, sorted by name.
#[rustfmt::skip]
pub static COMMANDS: &[CommandSpec] = &[
    cmd!("append", 3, W, true, 1, 1, 1, "key value", "Appends a string to a key's value; returns the new length."),
    cmd!("auth", -2, AUTHF, false, 0, 0, 0, "[username] password", "Authenticates the connection."),
    cmd!("bgrewriteaof", 1, ADMIN, false, 0, 0, 0, "", "Compacts the log now, in the background (as BGSAVE here)."),
    cmd!("bgsave", -1, ADMIN, false, 0, 0, 0, "[SCHEDULE]", "Compacts the log now, in the background: a snapshot, then the log it covers is deleted."),
    cmd!("client", -2, NS, false, 0, 0, 0, "ID|GETNAME|SETNAME name|INFO|LIST|SETINFO attribute value", "Connection introspection and naming."),
    cmd!("command", -1, NS, false, 0, 0, 0, "[COUNT|DOCS [name [name …]]|INFO [name [name …]]|LIST]", "Describes the commands this server knows."),
    cmd!("config", -2, NS, false, 0, 0, 0, "GET parameter [parameter …]|SET parameter value|RESETSTAT", "Reads server settings; sets the slow log's; RESETSTAT clears the command statistics."),
    cmd!("copy", -3, W, true, 1, 2, 1, "source destination [DB destination-db] [REPLACE]", "Copies a key's value (and expiry) to another key."),
    cmd!("dbsize", 1, RF, false, 0, 0, 0, "", "Returns the number of keys in the selected database."),
    cmd!("debug", -2, AUTHF, false, 0, 0, 0, "PANIC|SLEEP seconds", "Debugging aids; refused unless the server runs with --enable-debug-command."),
    cmd!("decr", 2, WF, true, 1, 1, 1, "key", "Decrements the integer value of a key by one."),
    cmd!("decrby", 3, WF, true, 1, 1, 1, "key decrement", "Decrements the integer value of a key by a number."),
    cmd!("del", -2, W, true, 1, -1, 1, "key [key …]", "Deletes keys; returns how many existed."),
    cmd!("discard", 1, TX, false, 0, 0, 0, "", "Discards the transaction (and the WATCHed keys)."),
    cmd!("echo", 2, F, false, 0, 0, 0, "message", "Returns the message."),
    cmd!("exec", 1, &["noscript", "loading", "stale", "skip_slowlog"], false, 0, 0, 0, "", "Executes the queued commands as one atomic log entry (nil if a WATCHed key changed)."),
    cmd!("exists", -2, RF, false, 1, -1, 1, "key [key …]", "Counts how many of the keys exist."),
    cmd!("expire", -3, WF, true, 1, 1, 1, "key seconds [NX|XX|GT|LT]", "Sets a key's time to live in seconds."),
    cmd!("expireat", -3, WF, true, 1, 1, 1, "key unix-time-seconds [NX|XX|GT|LT]", "Sets a key's expiry as a Unix time in seconds."),
    cmd!("expiretime", 2, RF, false, 1, 1, 1, "key", "Returns a key's expiry as a Unix time in seconds (-1 none, -2 no key)."),
    cmd!("flushall", -1, W, true, 0, 0, 0, "[ASYNC|SYNC]", "Deletes every key of every database."),
    cmd!("flushdb", -1, W, true, 0, 0, 0, "[ASYNC|SYNC]", "Deletes every key of the selected database."),
    cmd!("get", 2, RF, false, 1, 1, 1, "key", "Returns the value of a key, or nil."),
    cmd!("getdel", 2, WF, true, 1, 1, 1, "key", "Returns a key's value and deletes the key."),
    cmd!("getex", -2, WF, true, 1, 1, 1, "key [EX seconds|PX milliseconds|EXAT unix-time-seconds|PXAT unix-time-milliseconds|PERSIST]", "Returns a key's value and optionally changes its expiry."),
    cmd!("getrange", 4, R, false, 1, 1, 1, "key start end", "Returns a substring of a value (negative offsets count from the end)."),
    cmd!("getset", 3, WF, true, 1, 1, 1, "key value", "Sets a key and returns its old value."),
    cmd!("hello", -1, AUTHF, false, 0, 0, 0, "[protover [AUTH username password] [SETNAME name]]", "Handshakes with the server."),
    cmd!("incr", 2, WF, true, 1, 1, 1, "key", "Increments the integer value of a key by one."),
    cmd!("incrby", 3, WF, true, 1, 1, 1, "key increment", "Increments the integer value of a key by a number."),
    cmd!("incrbyfloat", 3, WF, true, 1, 1, 1, "key increment", "Adds a floating-point number to a key's value."),
    cmd!("info", -1, NS, false, 0, 0, 0, "[section [section …]]", "Returns server information and statistics."),
    cmd!("keys", 2, R, false, 0, 0, 0, "pattern", "Returns all keys matching a glob pattern."),
    cmd!("lastsave", 1, LASTSAVE, false, 0, 0, 0, "", "Returns the Unix time of the last successful compaction (or of startup)."),
    cmd!("latency", -2, ADMIN_STALE, false, 0, 0, 0, "HISTOGRAM [command [command …]]|HELP", "Latency histograms of the commands executed so far."),
    cmd!("mget", -2, RF, false, 1, -1, 1, "key [key …]", "Returns the values of several keys."),
    cmd!("move", 3, WD, true, 1, 1, 1, "key db", "Moves a key (and its expiry) to another database."),
    cmd!("mset", -3, W, true, 1, -1, 2, "key value [key value …]", "Sets several keys at once (atomically)."),
    cmd!("msetnx", -3, W, true, 1, -1, 2, "key value [key value …]", "Sets several keys only if none of them exists."),
    cmd!("multi", 1, TX, false, 0, 0, 0, "", "Starts a transaction: later commands are queued until EXEC."),
    cmd!("persist", 2, WF, true, 1, 1, 1, "key", "Removes a key's expiry."),
    cmd!("pexpire", -3, WF, true, 1, 1, 1, "key milliseconds [NX|XX|GT|LT]", "Sets a key's time to live in milliseconds."),
    cmd!("pexpireat", -3, WF, true, 1, 1, 1, "key unix-time-milliseconds [NX|XX|GT|LT]", "Sets a key's expiry as a Unix time in milliseconds."),
    cmd!("pexpiretime", 2, RF, false, 1, 1, 1, "key", "Returns a key's expiry as a Unix time in milliseconds (-1 none, -2 no key)."),
    cmd!("ping", -1, F, false, 0, 0, 0, "[message]", "Returns PONG, or the message."),
    cmd!("psetex", 4, W, true, 1, 1, 1, "key milliseconds value", "Sets a key with a time to live in milliseconds."),
    cmd!("pttl", 2, RF, false, 1, 1, 1, "key", "Returns a key's time to live in milliseconds (-1 none, -2 no key)."),
    cmd!("quit", -1, AUTHF, false, 0, 0, 0, "", "Closes the connection."),
    cmd!("randomkey", 1, R, false, 0, 0, 0, "", "Returns a random key."),
    cmd!("readonly", 1, F, false, 0, 0, 0, "", "Allows reads from a follower on this connection."),
    cmd!("readwrite", 1, F, false, 0, 0, 0, "", "Ends READONLY on this connection."),
    cmd!("rename", 3, W, true, 1, 2, 1, "key newkey", "Renames a key (overwriting newkey)."),
    cmd!("renamenx", 3, WF, true, 1, 2, 1, "key newkey", "Renames a key only if newkey does not exist."),
    cmd!("role", 1, NS, false, 0, 0, 0, "", "Returns the replication role: master, its log index, its replicas."),
    cmd!("save", 1, ADMIN_NM, false, 0, 0, 0, "", "Compacts the log now and waits until the snapshot is written."),
    cmd!("scan", -2, R, false, 0, 0, 0, "cursor [MATCH pattern] [COUNT count] [TYPE type]", "Iterates over the keys."),
    cmd!("select", 2, NS, false, 0, 0, 0, "index", "Selects the connection's database (0 to --databases minus 1)."),
    cmd!("set", -3, W, true, 1, 1, 1, "key value [NX|XX] [GET] [EX seconds|PX milliseconds|EXAT unix-time-seconds|PXAT unix-time-milliseconds|KEEPTTL]", "Sets the value of a key."),
    cmd!("setex", 4, W, true, 1, 1, 1, "key seconds value", "Sets a key with a time to live in seconds."),
    cmd!("setnx", 3, WF, true, 1, 1, 1, "key value", "Sets a key only if it does not exist."),
    cmd!("setrange", 4, W, true, 1, 1, 1, "key offset value", "Overwrites part of a value at an offset (zero-padding)."),
    cmd!("shutdown", -1, SHUT, false, 0, 0, 0, "[NOSAVE|SAVE] [NOW] [FORCE] [ABORT]", "Stops the server as SIGTERM does (SAVE compacts first)."),
    cmd!("slowlog", -2, ADMIN_STALE, false, 0, 0, 0, "GET [count]|LEN|RESET|HELP", "The commands that took longer than slowlog-log-slower-than (µs)."),
    cmd!("strlen", 2, RF, false, 1, 1, 1, "key", "Returns the length of a value."),
    cmd!("substr", 4, R, false, 1, 1, 1, "key start end", "Same as GETRANGE."),
    cmd!("swapdb", 3, WD, true, 0, 0, 0, "index1 index2", "Swaps two databases (every connection sees the change)."),
    cmd!("time", 1, F, false, 0, 0, 0, "", "Returns the server time."),
    cmd!("touch", -2, RF, false, 1, -1, 1, "key [key …]", "Counts how many of the keys exist (no access times are kept)."),
    cmd!("ttl", 2, RF, false, 1, 1, 1, "key", "Returns a key's time to live in seconds (-1 none, -2 no key)."),
    cmd!("type", 2, RF, false, 1, 1, 1, "key", "Returns the type of a key."),
    cmd!("unlink", -2, WD, true, 1, -1, 1, "key [key …]", "Deletes keys (same as DEL here)."),
    cmd!("unwatch", 1, TX, false, 0, 0, 0, "", "Forgets every WATCHed key."),
    cmd!("wait", 3, NS, false, 0, 0, 0, "numreplicas timeout", "Waits until writes reach this many replicas."),
    cmd!("watch", -2, TX, false, 1, -1, 1, "key [key …]", "Makes the next EXEC fail (nil) if any of the keys changes before it."),
];

/// The command list as a Markdown table, for the README (kept equal by a test).
pub fn markdown_table() -> String {
    let mut out = String::from("| command | arguments | what it does |\n|---|---|---|\n");
    for c in COMMANDS {
        let args = c.args.replace('|', "\\|");
        out.push_str(&format!(
            "| `{}` | {} | {} |\n",
            c.name.to_ascii_uppercase(),
            if args.is_empty() {
                String::new()
            } else {
                format!("`{args}`")
            },
            c.summary
        ));
    }
    out
}

/// A command name (up to 16 bytes) packed into an integer, lower-cased: looking a name up
/// per request then compares integers, not strings.
fn pack_name(name: &[u8]) -> Option<u128> {
    // A NUL would be indistinguishable from the padding.
    if name.len() > 16 || name.contains(&0) {
        return None;
    }
    let mut b = [0u8; 16];
    for (d, s) in b.iter_mut().zip(name) {
        *d = s.to_ascii_lowercase();
    }
    Some(u128::from_be_bytes(b))
}

/// Looks a command up by name, case-insensitively. It runs for every request, so the
/// sorted table is binary-searched by packed name (see [`pack_name`]).
pub fn lookup(name: &[u8]) -> Option<&'static CommandSpec> {
    static PACKED: std::sync::OnceLock<Vec<u128>> = std::sync::OnceLock::new();
    let packed = PACKED.get_or_init(|| {
        COMMANDS
            .iter()
            .map(|c| pack_name(c.name.as_bytes()).unwrap_or(u128::MAX))
            .collect()
    });
    let key = pack_name(name)?;
    // Big-endian packing keeps the table's alphabetical order.
    packed.binary_search(&key).ok().map(|i| &COMMANDS[i])
}

/// True if `argc` (name included) satisfies the command's arity.
pub fn arity_ok(spec: &CommandSpec, argc: usize) -> bool {
    let a = spec.arity;
    if a >= 0 {
        argc == a as usize
    } else {
        argc >= (-a) as usize
    }
}

/// The documentation group of a command (COMMAND DOCS, client help).
pub fn group(name: &str) -> &'static str {
    match name {
        "debug" => "server",
        "auth" | "client" | "echo" | "hello" | "ping" | "quit" | "select" | "readonly"
        | "readwrite" => "connection",
        "command" | "config" | "dbsize" | "info" | "time" | "flushall" | "flushdb" | "swapdb" => {
            "server"
        }
        "bgrewriteaof" | "bgsave" | "lastsave" | "role" | "save" | "shutdown" => "server",
        "multi" | "exec" | "discard" | "watch" | "unwatch" => "transactions",
        "del" | "exists" | "keys" | "scan" | "type" | "unlink" | "wait" | "copy" | "rename"
        | "renamenx" | "randomkey" | "touch" | "expire" | "pexpire" | "expireat" | "pexpireat"
        | "ttl" | "pttl" | "expiretime" | "pexpiretime" | "persist" | "move" => "generic",
        _ => "string",
    }
}

// ---------------------------------------------------------------------------------------
// Execution

/// Server-wide settings that commands report or enforce.
#[derive(Debug, Clone)]
pub struct Settings {
    pub requirepass: Option<String>,
    pub max_clients: usize,
    /// Connections a cluster member accepts past `max_clients` for its peers only
    /// ([`crate::server::peer_reserve`]); 0 on a single node.
    pub peer_reserve: usize,
    pub port: u16,
    pub bind: String,
    pub proto_max_bulk_len: usize,
    /// `--client-query-buffer-limit` (reported by CONFIG GET; the parser enforces it).
    pub client_query_buffer_limit: usize,
    pub node_id: u64,
    /// Allow DEBUG (PANIC, SLEEP), as Redis's `enable-debug-command`.
    pub enable_debug_command: bool,
    /// The HTTP listener's port (`--http-port`, `src/http.rs`), 0 without one; what
    /// `PEER HTTP` answers, so a follower can redirect HTTP clients here.
    pub http_port: u16,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            requirepass: None,
            max_clients: 10_000,
            peer_reserve: 0,
            port: 0,
            bind: "127.0.0.1".into(),
            proto_max_bulk_len: 512 << 20,
            client_query_buffer_limit: crate::protocol::DEFAULT_QUERY_BUFFER_LIMIT,
            node_id: 0,
            enable_debug_command: false,
            http_port: 0,
        }
    }
}

/// Server-wide counters (INFO stats).
#[derive(Debug, Default)]
pub struct ServerStats {
    pub total_connections: AtomicU64,
    pub rejected_connections: AtomicU64,
    /// Connections in client slots (`--max-clients`): clients, and connections that
    /// opened with `PEER HELLO` in a client slot until they prove the secret (INFO
    /// `connected_clients`).
    pub connected_clients: AtomicU64,
    /// Connections in peer slots (`Settings::peer_reserve`): those accepted in the
    /// reserve while the client slots were full (waiting for `PEER HELLO`, or in the
    /// handshake), and every inbound peer link that proved the secret, wherever it was
    /// accepted (INFO `cluster_connections`, as Redis names its cluster-bus links).
    pub peer_connections: AtomicU64,
    pub total_commands: AtomicU64,
    pub keyspace_hits: AtomicU64,
    pub keyspace_misses: AtomicU64,
    pub net_input_bytes: AtomicU64,
    pub net_output_bytes: AtomicU64,
    /// Failed AUTH / HELLO … AUTH (INFO `acl_access_denied_auth`).
    pub acl_access_denied_auth: AtomicU64,
    /// Clients closed past the input cap (INFO `client_query_buffer_limit_disconnections`).
    pub client_qbuf_limit_disconnections: AtomicU64,
}

/// What CLIENT LIST shows of a connection.
#[derive(Debug, Clone, Default)]
pub struct ClientInfo {
    pub addr: String,
    pub name: String,
    pub lib_name: String,
    pub lib_ver: String,
    pub connected_at: Option<Instant>,
    /// The selected database (kept in step by SELECT).
    pub db: u32,
}

/// Everything commands can reach: the store and the server around it.
#[derive(Debug)]
pub struct Context {
    pub store: Store,
    pub settings: Settings,
    pub stats: ServerStats,
    /// Per-command counts and latencies, the slow log (`src/metrics.rs`).
    pub metrics: crate::metrics::Metrics,
    pub clients: Mutex<HashMap<u64, ClientInfo>>,
    pub started: Instant,
    /// Unix time (seconds) of `started`, fixed once (LASTSAVE before any compaction).
    pub started_unix: u64,
    next_client_id: AtomicU64,
    /// How SHUTDOWN stops the server: set by the server ([`Context::set_shutdown_hook`]);
    /// the embedded repl has none.
    shutdown_hook: std::sync::OnceLock<ShutdownHook>,
    /// A cluster member's role and serving rules (`src/cluster.rs`), set once by the
    /// server before it accepts clients. Unset: a cluster of one, which always leads.
    cluster: std::sync::OnceLock<Arc<crate::cluster::ClusterState>>,
    /// The server is shutting down: a WAIT blocked on replicas answers what it has.
    shutting_down: std::sync::atomic::AtomicBool,
}

/// What [`Context::request_shutdown`] calls.
struct ShutdownHook(Box<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for ShutdownHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ShutdownHook")
    }
}

impl Context {
    pub fn new(store: Store, settings: Settings) -> Context {
        Context {
            store,
            settings,
            stats: ServerStats::default(),
            metrics: crate::metrics::Metrics::default(),
            clients: Mutex::new(HashMap::new()),
            started: Instant::now(),
            started_unix: crate::store::now_ms() / 1000,
            next_client_id: AtomicU64::new(1),
            shutdown_hook: std::sync::OnceLock::new(),
            cluster: std::sync::OnceLock::new(),
            shutting_down: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Marks the server as shutting down (the server, once it stops accepting), so that
    /// commands that block for a while (WAIT) return what they have.
    pub fn note_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Whether [`Context::note_shutdown`] was called.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// The serving rule of a cluster member for one command (`Ok` on a cluster of one,
    /// which always leads; see [`Gate`] for which commands need which gate).
    pub fn gate(&self, s: &Session, spec: &CommandSpec) -> Result<(), crate::cluster::Redirect> {
        match self.cluster() {
            None => Ok(()),
            Some(c) => match Gate::of(spec) {
                Gate::Write => c.write_gate(),
                Gate::Read if !s.readonly => c.read_gate(),
                Gate::Read | Gate::Any => Ok(()),
            },
        }
    }

    /// Makes this a cluster member's context (once; later calls are ignored).
    pub fn set_cluster(&self, state: Arc<crate::cluster::ClusterState>) {
        let _ = self.cluster.set(state);
    }

    /// The cluster state of a cluster member; `None` for a cluster of one.
    pub fn cluster(&self) -> Option<&Arc<crate::cluster::ClusterState>> {
        self.cluster.get()
    }

    /// Lets SHUTDOWN stop the server: `hook` starts the same graceful shutdown as
    /// SIGTERM. Set once, by the server; later calls are ignored.
    pub fn set_shutdown_hook(&self, hook: impl Fn() + Send + Sync + 'static) {
        let _ = self.shutdown_hook.set(ShutdownHook(Box::new(hook)));
    }

    /// Starts a graceful shutdown (see [`Context::set_shutdown_hook`]); false when
    /// there is no server to stop (the embedded store).
    pub fn request_shutdown(&self) -> bool {
        match self.shutdown_hook.get() {
            Some(hook) => {
                (hook.0)();
                true
            }
            None => false,
        }
    }

    /// A new connection's session (registered for CLIENT LIST until dropped via
    /// [`Context::unregister`]).
    pub fn register(&self, addr: String) -> Session {
        let id = self.next_client_id.fetch_add(1, Ordering::Relaxed);
        self.clients.lock().insert(
            id,
            ClientInfo {
                addr,
                connected_at: Some(Instant::now()),
                ..ClientInfo::default()
            },
        );
        Session {
            id,
            proto: Proto::Resp2,
            authenticated: self.settings.requirepass.is_none(),
            readonly: false,
            close: false,
            db: 0,
            multi: None,
            last_write_index: 0,
        }
    }

    /// A connection's address and name (CLIENT SETNAME), for the slow log.
    pub fn client_label(&self, id: u64) -> (String, String) {
        self.clients
            .lock()
            .get(&id)
            .map(|c| (c.addr.clone(), c.name.clone()))
            .unwrap_or_default()
    }

    pub fn unregister(&self, id: u64) {
        self.clients.lock().remove(&id);
        self.store.unwatch(id);
    }
}

/// Per-connection state.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: u64,
    pub proto: Proto,
    pub authenticated: bool,
    pub readonly: bool,
    /// Set by QUIT: close once the replies so far are written.
    pub close: bool,
    /// The selected database (SELECT; always below the store's `databases`): reads look
    /// here, and writes are logged in it.
    pub db: u32,
    /// The open transaction, between MULTI and EXEC/DISCARD (`src/multi.rs`).
    pub multi: Option<crate::multi::Transaction>,
    /// On a cluster member: an upper bound of the log index of this connection's last
    /// write (the store's applied index when its batch completed), what WAIT waits for
    /// followers to acknowledge. 0 before any write, and always 0 on a cluster of one.
    pub last_write_index: u64,
}

/// The outcome of [`dispatch`].
#[derive(Debug)]
pub enum Dispatched {
    /// The reply is in the output buffer.
    Done,
    /// A write: log it, then [`render_result`] its result as `Reply` says.
    Write(Op, Reply),
}

/// How a write's result becomes a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// As the result says (OK, nil, integer, old value, error).
    Standard,
    /// SETNX: `:1` if set, `:0` if not.
    SetNx,
}

/// The error reply for a write the store did not complete: `-ERR` when it was refused
/// before it was logged (a promise that it was not applied), `-IOERR … write outcome
/// unknown` when the log failed under it.
pub fn store_error_reply(e: &crate::store::StoreError) -> String {
    match e {
        crate::store::StoreError::TooLarge(_) => format!("ERR {e}"),
        // Already a whole reply: MOVED 0 host:port, CLUSTERDOWN …
        crate::store::StoreError::Redirect(reply) => reply.clone(),
        crate::store::StoreError::Unknown(_) => format!("TIMEOUT {e}"),
        _ => format!("IOERR {e}"),
    }
}

fn err_args(name: &str) -> String {
    format!("ERR wrong number of arguments for '{name}' command")
}

const ERR_SYNTAX: &str = "ERR syntax error";

/// Executes one request. See the module doc for how writes leave.
pub fn dispatch(
    ctx: &Context,
    s: &mut Session,
    args: Vec<Vec<u8>>,
    out: &mut Vec<u8>,
) -> Dispatched {
    let spec = args.first().and_then(|n| lookup(n));
    dispatch_spec(ctx, s, spec, args, out)
}

/// [`dispatch`] for a caller that already looked the command up.
pub fn dispatch_spec(
    ctx: &Context,
    s: &mut Session,
    spec: Option<&'static CommandSpec>,
    mut args: Vec<Vec<u8>>,
    out: &mut Vec<u8>,
) -> Dispatched {
    ctx.stats.total_commands.fetch_add(1, Ordering::Relaxed);
    let Some(spec) = spec else {
        let name = args
            .first()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .unwrap_or_default();
        let mut msg = format!(
            "ERR unknown command '{}', with args beginning with: ",
            truncate(&name)
        );
        for a in args.iter().skip(1).take(16) {
            msg.push_str(&format!("'{}' ", truncate(&String::from_utf8_lossy(a))));
        }
        write_error(out, &msg);
        return Dispatched::Done;
    };
    if !s.authenticated && !matches!(spec.name, "auth" | "hello" | "quit") {
        write_error(out, "NOAUTH Authentication required.");
        return Dispatched::Done;
    }
    if !arity_ok(spec, args.len()) {
        write_error(out, &err_args(spec.name));
        return Dispatched::Done;
    }
    // A cluster member serves a request here only as its role allows: a write or a read
    // refused now was not and will not be applied (the redirect's promise).
    if let Err(r) = ctx.gate(s, spec) {
        write_error(out, &r.reply());
        return Dispatched::Done;
    }
    let p = s.proto;
    let now = ctx.store.now_ms();
    match spec.name {
        "get" => {
            read_value(ctx, s.db, &args[1], now, |item| match item {
                Some(item) => write_bulk(out, &item.value),
                None => write_null(out, p),
            });
        }
        "set" => match parse_set(&mut args, now) {
            Ok(op) => return Dispatched::Write(op, Reply::Standard),
            Err(e) => write_error(out, &e),
        },
        "setnx" => {
            return Dispatched::Write(
                Op::Set {
                    value: args.pop().unwrap_or_default(),
                    key: args.pop().unwrap_or_default(),
                    expiry: Expiry::Never,
                    condition: Condition::IfMissing,
                    get: false,
                },
                Reply::SetNx,
            );
        }
        "del" | "unlink" => {
            args.remove(0);
            return Dispatched::Write(Op::Del { keys: args }, Reply::Standard);
        }
        "mset" | "msetnx" => {
            if args.len().is_multiple_of(2) {
                write_error(out, &err_args(spec.name));
                return Dispatched::Done;
            }
            let only_if_none_exist = spec.name == "msetnx";
            let mut it = args.into_iter().skip(1);
            let mut pairs = Vec::new();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                pairs.push((k, v));
            }
            return Dispatched::Write(
                Op::MSet {
                    pairs,
                    only_if_none_exist,
                },
                Reply::Standard,
            );
        }
        "incr" | "decr" | "incrby" | "decrby" => {
            let delta = if args.len() == 3 {
                match parse_i64(&args[2]) {
                    Some(d) => d,
                    None => {
                        write_error(out, ERR_NOT_INTEGER);
                        return Dispatched::Done;
                    }
                }
            } else {
                1
            };
            let delta = if spec.name.starts_with("decr") {
                match delta.checked_neg() {
                    Some(d) => d,
                    None => {
                        write_error(out, "ERR decrement would overflow");
                        return Dispatched::Done;
                    }
                }
            } else {
                delta
            };
            return Dispatched::Write(
                Op::IncrBy {
                    key: args.swap_remove(1),
                    delta,
                },
                Reply::Standard,
            );
        }
        "mget" => ctx.store.read(s.db, |db| {
            write_array_len(out, args.len() - 1);
            for k in &args[1..] {
                match db.get(k, now) {
                    Some(i) => write_bulk(out, &i.value),
                    None => write_null(out, p),
                }
            }
        }),
        "exists" => {
            let n = ctx.store.read(s.db, |db| {
                args[1..]
                    .iter()
                    .filter(|k| db.get(k, now).is_some())
                    .count()
            });
            write_integer(out, n as i64);
        }
        "strlen" => {
            let n = ctx.store.read(s.db, |db| {
                db.get(&args[1], now).map_or(0, |i| i.value.len())
            });
            write_integer(out, n as i64);
        }
        "type" => {
            let t = if ctx.store.read(s.db, |db| db.get(&args[1], now).is_some()) {
                "string"
            } else {
                "none"
            };
            write_simple(out, t);
        }
        "dbsize" => write_integer(out, ctx.store.read(s.db, |db| db.len()) as i64),
        "keys" => {
            let keys: Vec<Vec<u8>> = ctx.store.read(s.db, |db| {
                db.iter(now)
                    .filter(|(k, _)| glob_match(&args[1], k, false))
                    .map(|(k, _)| k.to_vec())
                    .collect()
            });
            write_array_len(out, keys.len());
            for k in keys {
                write_bulk(out, &k);
            }
        }
        "scan" => scan(ctx, s.db, &args, now, out),
        "ping" => match args.len() {
            1 => write_simple(out, "PONG"),
            2 => write_bulk(out, &args[1]),
            _ => write_error(out, &err_args("ping")),
        },
        "echo" => write_bulk(out, &args[1]),
        "time" => {
            let d = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            write_array_len(out, 2);
            write_bulk(out, d.as_secs().to_string().as_bytes());
            write_bulk(out, d.subsec_micros().to_string().as_bytes());
        }
        // Redis's wording: not an integer, beyond 32 bits, not a database.
        "select" => match crate::keyspace::parse_db(&args[1], ctx.store.databases()) {
            Ok(db) => {
                s.db = db;
                if let Some(c) = ctx.clients.lock().get_mut(&s.id) {
                    c.db = db;
                }
                write_simple(out, "OK");
            }
            Err(e) => write_error(out, e),
        },
        "quit" => {
            write_simple(out, "OK");
            s.close = true;
        }
        "auth" => auth(ctx, s, &args, out),
        "hello" => hello(ctx, s, &args, out),
        "client" => client(ctx, s, &args, out),
        "command" => command(s, &args, out),
        "config" => config(ctx, s, &args, out),
        "slowlog" => crate::metrics::slowlog_command(ctx, p, &args, out),
        "latency" => crate::metrics::latency_command(ctx, p, &args, out),
        "debug" => debug(ctx, s, &args, out),
        "bgrewriteaof" | "bgsave" | "lastsave" | "role" | "save" | "shutdown" => {
            crate::admin::dispatch(ctx, s, spec.name, &args, out);
        }
        "append" | "getdel" | "getex" | "getrange" | "getset" | "incrbyfloat" | "psetex"
        | "setex" | "setrange" | "substr" => {
            return crate::strings::dispatch(ctx, s, spec.name, args, now, out);
        }
        "copy" | "flushall" | "flushdb" | "move" | "randomkey" | "rename" | "renamenx"
        | "swapdb" | "touch" => {
            return crate::keyspace::dispatch(ctx, s, spec.name, args, now, out);
        }
        "expire" | "pexpire" | "expireat" | "pexpireat" => {
            match parse_expire(spec.name, &args, now) {
                Ok(op) => return Dispatched::Write(op, Reply::Standard),
                Err(e) => write_error(out, &e),
            }
        }
        "persist" => {
            return Dispatched::Write(
                Op::Cmd {
                    args: vec![b"PERSIST".to_vec(), args.swap_remove(1)],
                },
                Reply::Standard,
            );
        }
        "ttl" | "pttl" | "expiretime" | "pexpiretime" => {
            let at = ctx
                .store
                .read(s.db, |db| db.get(&args[1], now).map(|i| i.expire_at));
            let n = match at {
                None => -2,
                Some(0) => -1,
                Some(at) => match spec.name {
                    // Rounded to the nearest second, as Redis does.
                    "ttl" => ((at - now + 500) / 1000) as i64,
                    "pttl" => (at - now) as i64,
                    "expiretime" => ((at + 500) / 1000) as i64,
                    _ => at as i64,
                },
            };
            write_integer(out, n);
        }
        "info" => {
            let text = crate::info::render(ctx, &args[1..]);
            write_verbatim(out, "txt", text.as_bytes(), p);
        }
        "readonly" => {
            s.readonly = true;
            write_simple(out, "OK");
        }
        "readwrite" => {
            s.readonly = false;
            write_simple(out, "OK");
        }
        "wait" => wait(ctx, s, &args, true, out),
        other => write_error(out, &format!("ERR unknown command '{other}'")),
    }
    Dispatched::Done
}

/// `WAIT numreplicas timeout`, as Redis: blocks until at least `numreplicas` followers
/// have acknowledged this connection's last write ([`Session::last_write_index`]), or
/// for at most `timeout` ms (0: no limit), and answers how many have. A cluster of one
/// has no replicas: 0 at once. A node that is not the serving leader answers the write
/// gate's redirect (Redis refuses WAIT on a replica).
///
/// It polls the published [`RoleInfo`](crate::cluster::RoleInfo) rather than waiting on
/// a condition: the node thread publishes acknowledgements without knowing of waiters,
/// WAIT is rare, and a check is one short lock. The poll starts at 100 µs and backs off
/// to 5 ms, so a WAIT that the next acknowledgement satisfies answers within about one
/// round trip and an idle one costs ~200 wake-ups a second. It also stops when the node
/// stops leading (answering the count it can still show: a follower lists no
/// followers, 0) or the server shuts down. With `block` false (inside a transaction,
/// where Redis 7 does not block either) it answers the count at once.
pub(crate) fn wait(ctx: &Context, s: &Session, args: &[Vec<u8>], block: bool, out: &mut Vec<u8>) {
    let n = std::str::from_utf8(&args[1])
        .ok()
        .and_then(|x| x.parse::<i64>().ok());
    let t = std::str::from_utf8(&args[2])
        .ok()
        .and_then(|x| x.parse::<i64>().ok());
    let (want, timeout) = match (n, t) {
        (Some(n), Some(t)) if t >= 0 => (n, t as u64),
        (Some(_), Some(_)) => return write_error(out, "ERR timeout is negative"),
        _ => return write_error(out, ERR_NOT_INTEGER),
    };
    let Some(cluster) = ctx.cluster() else {
        return write_integer(out, 0);
    };
    if let Err(r) = cluster.write_gate() {
        return write_error(out, &r.reply());
    }
    let target = s.last_write_index;
    let deadline = (timeout > 0).then(|| Instant::now() + Duration::from_millis(timeout));
    let mut pause = Duration::from_micros(100);
    loop {
        let info = cluster.info();
        // Redis counts the replicas it is connected to whose acknowledged offset reached
        // the client's; ours acknowledge log indexes.
        let acked = info
            .followers
            .iter()
            .filter(|f| f.connected && f.acked >= target)
            .count() as i64;
        let leading = info.role == crate::cluster::Role::Leader;
        if acked >= want
            || !block
            || !leading
            || deadline.is_some_and(|d| Instant::now() >= d)
            || ctx.is_shutting_down()
        {
            return write_integer(out, acked);
        }
        let left = deadline.map_or(pause, |d| d.saturating_duration_since(Instant::now()));
        std::thread::sleep(pause.min(left));
        pause = (pause * 2).min(Duration::from_millis(5));
    }
}

/// Renders the result of a write.
pub fn render_result(r: &OpResult, how: Reply, p: Proto, out: &mut Vec<u8>) {
    if how == Reply::SetNx {
        write_integer(out, i64::from(*r == OpResult::Ok));
        return;
    }
    match r {
        OpResult::Ok => write_simple(out, "OK"),
        OpResult::NotSet => write_null(out, p),
        OpResult::Old(Some(v)) => write_bulk(out, v),
        OpResult::Old(None) => write_null(out, p),
        OpResult::Int(n) => write_integer(out, *n),
        OpResult::Error(e) => write_error(out, e),
        OpResult::Status(s) => write_simple(out, s),
        OpResult::Array(items) | OpResult::Multi(items) => {
            write_array_len(out, items.len());
            for r in items {
                render_result(r, Reply::Standard, p, out);
            }
        }
        OpResult::Aborted => write_null_array(out, p),
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(128).collect()
}

/// Looks `key` up for a reading command, under one lock: `f` sees the live item (or
/// none), the keyspace hit/miss counters move, and a key found expired is handed to the
/// expirer (lazy expiry) without a second lookup.
pub(crate) fn read_value<R>(
    ctx: &Context,
    db: u32,
    key: &[u8],
    now: u64,
    f: impl FnOnce(Option<&Item>) -> R,
) -> R {
    let (r, hit, expired) = ctx.store.read(db, |ks| match ks.get(key, now) {
        Some(item) => (f(Some(item)), true, false),
        None => (f(None), false, ks.is_expired(key, now)),
    });
    count_hit(ctx, hit);
    if expired {
        note_expired(ctx, db, key);
    }
    r
}

/// Hands a key a reader found expired to the expirer (lazy expiry), on a node that may
/// write: only the leader expires keys (as log entries), so a follower (or a leader that
/// may not write now) leaves it; its reader already saw the key as missing, by the
/// clock, and the leader's expirer deletes it for everyone.
pub(crate) fn note_expired(ctx: &Context, db: u32, key: &[u8]) {
    if ctx.cluster().is_none_or(|c| c.write_gate().is_ok()) {
        ctx.store.note_expired(db, key);
    }
}

pub(crate) fn count_hit(ctx: &Context, hit: bool) {
    let c = if hit {
        &ctx.stats.keyspace_hits
    } else {
        &ctx.stats.keyspace_misses
    };
    c.fetch_add(1, Ordering::Relaxed);
}

/// Parses `SET key value [NX|XX] [GET] [EX|PX|EXAT|PXAT n|KEEPTTL]` into a log op with an
/// absolute expiry.
fn parse_set(args: &mut Vec<Vec<u8>>, now: u64) -> Result<Op, String> {
    let mut condition = Condition::Always;
    let mut expiry = Expiry::Never;
    let mut get = false;
    let mut expiry_set = false;
    let mut i = 3;
    let invalid = || "ERR invalid expire time in 'set' command".to_string();
    while i < args.len() {
        let opt = args[i].to_ascii_uppercase();
        match &opt[..] {
            b"NX" if condition != Condition::IfExists => condition = Condition::IfMissing,
            b"XX" if condition != Condition::IfMissing => condition = Condition::IfExists,
            b"GET" => get = true,
            b"KEEPTTL" if !expiry_set => {
                expiry = Expiry::Keep;
                expiry_set = true;
            }
            b"EX" | b"PX" | b"EXAT" | b"PXAT" if !expiry_set && i + 1 < args.len() => {
                let n = parse_i64(&args[i + 1]).ok_or_else(|| ERR_NOT_INTEGER.to_string())?;
                if n <= 0 {
                    return Err(invalid());
                }
                let n = n as u64;
                let at = match &opt[..] {
                    b"EX" => n.checked_mul(1000).and_then(|ms| ms.checked_add(now)),
                    b"PX" => n.checked_add(now),
                    b"EXAT" => n.checked_mul(1000),
                    _ => Some(n),
                };
                match at {
                    Some(at) if at <= i64::MAX as u64 => expiry = Expiry::At(at),
                    _ => return Err(invalid()),
                }
                expiry_set = true;
                i += 1;
            }
            _ => return Err(ERR_SYNTAX.to_string()),
        }
        i += 1;
    }
    args.truncate(3);
    let value = args.pop().unwrap_or_default();
    let key = args.pop().unwrap_or_default();
    Ok(Op::Set {
        key,
        value,
        expiry,
        condition,
        get,
    })
}

/// Parses `EXPIRE|PEXPIRE|EXPIREAT|PEXPIREAT key time [NX|XX|GT|LT]` into the canonical
/// `PEXPIREAT key <unix ms> [cond]` (absolute, so replaying the log never moves it).
fn parse_expire(name: &str, args: &[Vec<u8>], now: u64) -> Result<Op, String> {
    let n = parse_i64(&args[2]).ok_or_else(|| ERR_NOT_INTEGER.to_string())?;
    let invalid = || format!("ERR invalid expire time in '{name}' command");
    let ms = match name {
        "expire" | "expireat" => n.checked_mul(1000).ok_or_else(invalid)?,
        _ => n,
    };
    let at = if name.ends_with("at") {
        ms
    } else {
        ms.checked_add(now as i64).ok_or_else(invalid)?
    };
    let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
    for opt in &args[3..] {
        match &opt.to_ascii_uppercase()[..] {
            b"NX" => nx = true,
            b"XX" => xx = true,
            b"GT" => gt = true,
            b"LT" => lt = true,
            _ => {
                return Err(format!(
                    "ERR Unsupported option {}",
                    String::from_utf8_lossy(opt)
                ));
            }
        }
    }
    if nx && (xx || gt || lt) {
        return Err("ERR NX and XX, GT or LT options at the same time are not compatible".into());
    }
    if gt && lt {
        return Err("ERR GT and LT options at the same time are not compatible".into());
    }
    // A time at or before the epoch is simply "already expired".
    let at = at.max(0) as u64;
    let mut canonical = vec![
        b"PEXPIREAT".to_vec(),
        args[1].clone(),
        at.to_string().into_bytes(),
    ];
    for (on, word) in [(nx, "NX"), (xx, "XX"), (gt, "GT"), (lt, "LT")] {
        if on {
            canonical.push(word.as_bytes().to_vec());
        }
    }
    Ok(Op::Cmd { args: canonical })
}

/// SCAN: the cursor is a bucket of the key space's table in reverse-binary order
/// ([`Keyspace::scan`](crate::db::Keyspace::scan), Redis's `dictScan`), so a key present for the whole
/// iteration is returned however the table grows or shrinks meanwhile (twice only if it
/// shrank), each call costs O(COUNT), and cursors stay below the bucket count (node-redis
/// v4 needs them below 2^53). MATCH and TYPE filter after the buckets are read, so a
/// call may return fewer than COUNT keys, or none, before the pass ends, as in Redis.
fn scan(ctx: &Context, db: u32, args: &[Vec<u8>], now: u64, out: &mut Vec<u8>) {
    let Some(cursor) = std::str::from_utf8(&args[1])
        .ok()
        .and_then(|c| c.parse::<u64>().ok())
    else {
        write_error(out, "ERR invalid cursor");
        return;
    };
    let mut pattern: Option<&[u8]> = None;
    let mut count = 10usize;
    let mut type_filter: Option<Vec<u8>> = None;
    let mut i = 2;
    while i < args.len() {
        let opt = args[i].to_ascii_uppercase();
        if i + 1 >= args.len() {
            write_error(out, ERR_SYNTAX);
            return;
        }
        match &opt[..] {
            b"MATCH" => pattern = Some(&args[i + 1]),
            b"COUNT" => match parse_i64(&args[i + 1]) {
                Some(n) if n >= 1 => count = n as usize,
                Some(_) => {
                    write_error(out, ERR_SYNTAX);
                    return;
                }
                None => {
                    write_error(out, ERR_NOT_INTEGER);
                    return;
                }
            },
            b"TYPE" => type_filter = Some(args[i + 1].to_ascii_lowercase()),
            _ => {
                write_error(out, ERR_SYNTAX);
                return;
            }
        }
        i += 2;
    }
    // Redis's loop (scanGenericCommand): whole buckets until `count` keys are collected,
    // the pass ends, or ten buckets per key asked for were empty. O(count) a call; only
    // what is returned is copied, and COUNT sizes nothing (`Vec` grows as keys come).
    let (found, next): (Vec<Vec<u8>>, u64) = ctx.store.read(db, |db| {
        let mut found = Vec::new();
        let mut cursor = cursor;
        let mut buckets = count.saturating_mul(10);
        loop {
            cursor = db.scan(cursor, |k, i| {
                if !i.expired(now) {
                    found.push(k.to_vec());
                }
            });
            buckets -= 1;
            if cursor == 0 || buckets == 0 || found.len() >= count {
                return (found, cursor);
            }
        }
    });
    let keep = |k: &[u8]| {
        pattern.is_none_or(|p| glob_match(p, k, false))
            && type_filter.as_deref().is_none_or(|t| t == b"string")
    };
    let keys: Vec<&Vec<u8>> = found.iter().filter(|k| keep(k)).collect();
    write_array_len(out, 2);
    write_bulk(out, next.to_string().as_bytes());
    write_array_len(out, keys.len());
    for k in keys {
        write_bulk(out, k);
    }
}

fn auth(ctx: &Context, s: &mut Session, args: &[Vec<u8>], out: &mut Vec<u8>) {
    if args.len() > 3 {
        write_error(out, ERR_SYNTAX);
        return;
    }
    let Some(pass) = &ctx.settings.requirepass else {
        // Without a password the default user accepts any; only the one-argument form,
        // which can only mean "the server's password", is an error (Redis 7).
        if args.len() == 3 {
            if args[1] == b"default" {
                s.authenticated = true;
                write_simple(out, "OK");
            } else {
                crate::auth::denied(ctx, s);
                write_error(out, crate::auth::WRONGPASS);
            }
            return;
        }
        write_error(
            out,
            "ERR AUTH <password> called without any password configured for the default user. \
             Are you sure your configuration is correct?",
        );
        return;
    };
    // The user name is no secret; the password is compared in constant time.
    let user_ok = args.len() == 2 || args[1] == b"default";
    if crate::auth::password_matches(&args[args.len() - 1], pass.as_bytes()) && user_ok {
        s.authenticated = true;
        write_simple(out, "OK");
    } else {
        crate::auth::denied(ctx, s);
        write_error(out, crate::auth::WRONGPASS);
    }
}

fn hello(ctx: &Context, s: &mut Session, args: &[Vec<u8>], out: &mut Vec<u8>) {
    let mut proto = s.proto;
    let mut i = 1;
    if args.len() > 1 {
        match parse_i64(&args[1]) {
            Some(2) => proto = Proto::Resp2,
            Some(3) => proto = Proto::Resp3,
            Some(_) => {
                write_error(out, "NOPROTO unsupported protocol version");
                return;
            }
            None => {
                write_error(
                    out,
                    "ERR Protocol version is not an integer or out of range",
                );
                return;
            }
        }
        i = 2;
    }
    let mut auth: Option<(&[u8], &[u8])> = None;
    let mut name: Option<&[u8]> = None;
    while i < args.len() {
        let opt = args[i].to_ascii_uppercase();
        if opt == b"AUTH" && i + 2 < args.len() {
            auth = Some((&args[i + 1], &args[i + 2]));
            i += 3;
        } else if opt == b"SETNAME" && i + 1 < args.len() {
            name = Some(&args[i + 1]);
            i += 2;
        } else {
            write_error(
                out,
                &format!(
                    "ERR Syntax error in HELLO option '{}'",
                    String::from_utf8_lossy(&args[i])
                ),
            );
            return;
        }
    }
    if let Some((user, pass)) = auth {
        // The same check as AUTH: constant-time, counted and logged when it fails.
        let ok = user == b"default"
            && ctx
                .settings
                .requirepass
                .as_ref()
                .is_none_or(|p| crate::auth::password_matches(pass, p.as_bytes()));
        if !ok {
            crate::auth::denied(ctx, s);
            write_error(out, crate::auth::WRONGPASS);
            return;
        }
        s.authenticated = true;
    }
    if !s.authenticated {
        write_error(
            out,
            "NOAUTH HELLO must be called with the client already authenticated, otherwise the \
             HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and \
             select the RESP protocol version at the same time",
        );
        return;
    }
    if let Some(n) = name
        && let Err(e) = set_name(ctx, s, n)
    {
        write_error(out, e);
        return;
    }
    s.proto = proto;
    write_map_len(out, 7, proto);
    write_bulk(out, b"server");
    write_bulk(out, b"redis");
    write_bulk(out, b"version");
    write_bulk(out, crate::info::REDIS_VERSION.as_bytes());
    write_bulk(out, b"proto");
    write_integer(out, if proto == Proto::Resp3 { 3 } else { 2 });
    write_bulk(out, b"id");
    write_integer(out, s.id as i64);
    write_bulk(out, b"mode");
    write_bulk(out, b"standalone");
    write_bulk(out, b"role");
    // Redis's words: "replica" for a cluster member that does not lead.
    let leads = ctx
        .cluster()
        .is_none_or(|c| c.info().role == crate::cluster::Role::Leader);
    write_bulk(out, if leads { b"master" } else { b"replica" });
    write_bulk(out, b"modules");
    write_array_len(out, 0);
}

fn debug(ctx: &Context, s: &Session, args: &[Vec<u8>], out: &mut Vec<u8>) {
    if !ctx.settings.enable_debug_command {
        write_error(
            out,
            "ERR DEBUG command not allowed. If the enable-debug-command option is set to \"no\", \
             you can change it by starting the server with --enable-debug-command",
        );
        return;
    }
    let sub = args[1].to_ascii_uppercase();
    match (&sub[..], args.len()) {
        // Exercises the server's promise that a panic in one connection's thread closes
        // that connection only.
        (b"PANIC", 2) => panic!("DEBUG PANIC requested by client {}", s.id),
        (b"SLEEP", 3) => {
            match std::str::from_utf8(&args[2])
                .ok()
                .and_then(|x| x.parse::<f64>().ok())
            {
                Some(secs) if (0.0..=3600.0).contains(&secs) => {
                    // With the map locked, as Redis's DEBUG SLEEP stalls its whole
                    // server: every command that touches data waits, and so does the
                    // systemd watchdog's health check (tests/systemd.rs shows the pings
                    // stop while a node is stuck like this).
                    let pause = std::time::Duration::from_secs_f64(secs);
                    ctx.store.read_all(|_| std::thread::sleep(pause));
                    write_simple(out, "OK");
                }
                _ => write_error(out, "ERR value is not a valid float"),
            }
        }
        _ => subcommand_error(out, "debug", &args[1], &["panic", "sleep"]),
    }
}

/// Redis's two errors for a container command: a known subcommand with the wrong number
/// of arguments, or an unknown one.
fn subcommand_error(out: &mut Vec<u8>, cmd: &str, sub: &[u8], known: &[&str]) {
    let lower = String::from_utf8_lossy(sub).to_ascii_lowercase();
    if known.contains(&lower.as_str()) {
        write_error(out, &err_args(&format!("{cmd}|{lower}")));
    } else {
        write_error(
            out,
            &format!(
                "ERR unknown subcommand '{}'. Try {} HELP.",
                truncate(&String::from_utf8_lossy(sub)),
                cmd.to_ascii_uppercase()
            ),
        );
    }
}

fn set_name(ctx: &Context, s: &Session, name: &[u8]) -> Result<(), &'static str> {
    if name.iter().any(|&c| c <= b' ' || c > b'~') {
        return Err("ERR Client names cannot contain spaces, newlines or special characters.");
    }
    if let Some(c) = ctx.clients.lock().get_mut(&s.id) {
        c.name = String::from_utf8_lossy(name).into_owned();
    }
    Ok(())
}

fn client(ctx: &Context, s: &mut Session, args: &[Vec<u8>], out: &mut Vec<u8>) {
    let sub = args[1].to_ascii_uppercase();
    let p = s.proto;
    match (&sub[..], args.len()) {
        (b"ID", 2) => write_integer(out, s.id as i64),
        (b"GETNAME", 2) => {
            let name = ctx
                .clients
                .lock()
                .get(&s.id)
                .map(|c| c.name.clone())
                .unwrap_or_default();
            if name.is_empty() {
                write_null(out, p);
            } else {
                write_bulk(out, name.as_bytes());
            }
        }
        (b"SETNAME", 3) => match set_name(ctx, s, &args[2]) {
            Ok(()) => write_simple(out, "OK"),
            Err(e) => write_error(out, e),
        },
        (b"SETINFO", 4) => {
            let attr = args[2].to_ascii_uppercase();
            let val = String::from_utf8_lossy(&args[3]).into_owned();
            let mut clients = ctx.clients.lock();
            let c = clients.entry(s.id).or_default();
            match &attr[..] {
                b"LIB-NAME" => c.lib_name = val,
                b"LIB-VER" => c.lib_ver = val,
                _ => {
                    drop(clients);
                    write_error(
                        out,
                        &format!(
                            "ERR Unrecognized option '{}'",
                            String::from_utf8_lossy(&args[2])
                        ),
                    );
                    return;
                }
            }
            write_simple(out, "OK");
        }
        (b"NO-EVICT" | b"NO-TOUCH", 3) => write_simple(out, "OK"),
        (b"LIST", _) | (b"INFO", 2) => {
            let clients = ctx.clients.lock();
            let mut text = String::new();
            let mut ids: Vec<&u64> = clients.keys().collect();
            ids.sort();
            for id in ids {
                if sub == b"INFO" && *id != s.id {
                    continue;
                }
                let c = &clients[id];
                let age = c.connected_at.map_or(0, |t| t.elapsed().as_secs());
                text.push_str(&format!(
                    "id={id} addr={} laddr={}:{} fd=0 name={} age={age} idle=0 flags=N db={} \
                     sub=0 psub=0 ssub=0 multi=-1 qbuf=0 qbuf-free=0 argv-mem=0 multi-mem=0 \
                     rbs=0 rbp=0 obl=0 oll=0 omem=0 tot-mem=0 events=r cmd=client|{} user=default \
                     redir=-1 resp={} lib-name={} lib-ver={}\n",
                    c.addr,
                    ctx.settings.bind,
                    ctx.settings.port,
                    c.name,
                    c.db,
                    if sub == b"INFO" { "info" } else { "list" },
                    if *id == s.id && p == Proto::Resp3 {
                        3
                    } else {
                        2
                    },
                    c.lib_name,
                    c.lib_ver
                ));
            }
            write_verbatim(out, "txt", text.as_bytes(), p);
        }
        _ => subcommand_error(
            out,
            "client",
            &args[1],
            &[
                "id", "getname", "setname", "setinfo", "no-evict", "no-touch", "list", "info",
            ],
        ),
    }
}

fn command(s: &Session, args: &[Vec<u8>], out: &mut Vec<u8>) {
    let p = s.proto;
    let sub = args.get(1).map(|a| a.to_ascii_uppercase());
    let write_info = |spec: &CommandSpec, out: &mut Vec<u8>| {
        write_array_len(out, 10);
        write_bulk(out, spec.name.as_bytes());
        write_integer(out, spec.arity as i64);
        write_set_len(out, spec.flags.len(), p);
        for f in spec.flags {
            write_simple(out, f);
        }
        write_integer(out, spec.first_key as i64);
        write_integer(out, spec.last_key as i64);
        write_integer(out, spec.step as i64);
        write_set_len(out, 0, p); // ACL categories
        write_set_len(out, 0, p); // tips
        write_array_len(out, 0); // key specs
        write_array_len(out, 0); // subcommands
    };
    match sub.as_deref() {
        None => {
            write_array_len(out, COMMANDS.len());
            for c in COMMANDS {
                write_info(c, out);
            }
        }
        Some(b"COUNT") => write_integer(out, COMMANDS.len() as i64),
        Some(b"LIST") => {
            write_array_len(out, COMMANDS.len());
            for c in COMMANDS {
                write_bulk(out, c.name.as_bytes());
            }
        }
        Some(b"INFO") => {
            write_array_len(out, args.len() - 2);
            for name in &args[2..] {
                match lookup(name) {
                    Some(c) => write_info(c, out),
                    None => write_null_array(out, p),
                }
            }
        }
        Some(b"DOCS") => {
            let specs: Vec<&CommandSpec> = if args.len() > 2 {
                args[2..].iter().filter_map(|n| lookup(n)).collect()
            } else {
                COMMANDS.iter().collect()
            };
            write_map_len(out, specs.len(), p);
            for c in specs {
                // The table's synopses are checked by a test, so this never fails; an
                // error would just leave the arguments out.
                let args = crate::docs::parse(c.name, c.args).unwrap_or_default();
                write_bulk(out, c.name.as_bytes());
                write_map_len(out, 3 + usize::from(!args.is_empty()), p);
                write_bulk(out, b"summary");
                write_bulk(out, c.summary.as_bytes());
                write_bulk(out, b"since");
                write_bulk(out, b"1.0.0");
                write_bulk(out, b"group");
                write_bulk(out, group(c.name).as_bytes());
                if !args.is_empty() {
                    // What redis-cli builds its hints and `help <command>` from.
                    write_bulk(out, b"arguments");
                    crate::docs::write_arguments(out, &args, p);
                }
            }
        }
        Some(_) => write_error(
            out,
            &format!(
                "ERR unknown subcommand '{}'. Try COMMAND HELP.",
                String::from_utf8_lossy(&args[1])
            ),
        ),
    }
}

fn config(ctx: &Context, s: &Session, args: &[Vec<u8>], out: &mut Vec<u8>) {
    let sub = args[1].to_ascii_uppercase();
    match &sub[..] {
        b"GET" if args.len() >= 3 => {
            let st = &ctx.settings;
            let opts = ctx.store.options();
            let params: Vec<(&str, String)> = vec![
                ("appendfsync", opts.fsync.to_string()),
                ("appendonly", "yes".into()),
                ("bind", st.bind.clone()),
                (
                    "client-query-buffer-limit",
                    st.client_query_buffer_limit.to_string(),
                ),
                ("databases", ctx.store.databases().to_string()),
                ("dir", ctx.store.dir().display().to_string()),
                ("maxclients", st.max_clients.to_string()),
                ("maxmemory", "0".into()),
                ("port", st.port.to_string()),
                ("proto-max-bulk-len", st.proto_max_bulk_len.to_string()),
                ("requirepass", st.requirepass.clone().unwrap_or_default()),
                ("save", String::new()),
                (
                    "slowlog-log-slower-than",
                    ctx.metrics
                        .slowlog_slower_than_us
                        .load(Ordering::Relaxed)
                        .to_string(),
                ),
                (
                    "slowlog-max-len",
                    ctx.metrics
                        .slowlog_max_len
                        .load(Ordering::Relaxed)
                        .to_string(),
                ),
            ];
            let hits: Vec<&(&str, String)> = params
                .iter()
                .filter(|(name, _)| {
                    args[2..]
                        .iter()
                        .any(|pat| glob_match(pat, name.as_bytes(), true))
                })
                .collect();
            write_map_len(out, hits.len(), s.proto);
            for (name, value) in hits {
                write_bulk(out, name.as_bytes());
                write_bulk(out, value.as_bytes());
            }
        }
        b"RESETSTAT" if args.len() == 2 => {
            ctx.metrics.reset();
            write_simple(out, "OK");
        }
        b"SET" if args.len() >= 4 && args.len().is_multiple_of(2) => {
            config_set(ctx, &args[2..], out)
        }
        _ => subcommand_error(out, "config", &args[1], &["get", "set", "resetstat"]),
    }
}

/// CONFIG SET for the settings that may change at run time (the slow log's); every
/// other parameter is refused, as Redis refuses an unknown one. All or nothing: one bad
/// pair leaves every setting as it was.
fn config_set(ctx: &Context, pairs: &[Vec<u8>], out: &mut Vec<u8>) {
    let mut slower_than = None;
    let mut max_len = None;
    for pair in pairs.chunks(2) {
        let (name, value) = (pair[0].to_ascii_lowercase(), &pair[1]);
        let int = std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.parse::<i64>().ok());
        let bad = |why: &str| {
            format!(
                "ERR CONFIG SET failed (possibly related to argument '{}') - {why}",
                String::from_utf8_lossy(&pair[0])
            )
        };
        match (&name[..], int) {
            (b"slowlog-log-slower-than", Some(n)) => slower_than = Some(n),
            (b"slowlog-max-len", Some(n)) if n >= 0 => max_len = Some(n as usize),
            (b"slowlog-log-slower-than" | b"slowlog-max-len", _) => {
                write_error(out, &bad("argument couldn't be parsed into an integer"));
                return;
            }
            _ => {
                write_error(
                    out,
                    &format!(
                        "ERR Unknown option or number of arguments for CONFIG SET - '{}'",
                        String::from_utf8_lossy(&pair[0])
                    ),
                );
                return;
            }
        }
    }
    if let Some(n) = slower_than {
        ctx.metrics
            .slowlog_slower_than_us
            .store(n, Ordering::Relaxed);
    }
    if let Some(n) = max_len {
        ctx.metrics.slowlog_max_len.store(n, Ordering::Relaxed);
    }
    write_simple(out, "OK");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The serving rule of every command, spelled out: a change to the table that moves
    /// a command to another gate shows up here.
    #[test]
    fn each_command_is_under_the_gate_its_flags_say() {
        let reads = [
            "dbsize",
            "exists",
            "expiretime",
            "get",
            "getrange",
            "keys",
            "mget",
            "pexpiretime",
            "pttl",
            "randomkey",
            "scan",
            "strlen",
            "substr",
            "touch",
            "ttl",
            "type",
            "watch",
        ];
        for c in COMMANDS {
            let want = if c.write {
                Gate::Write
            } else if reads.contains(&c.name) {
                Gate::Read
            } else {
                Gate::Any
            };
            assert_eq!(Gate::of(c), want, "{}", c.name);
        }
        for name in [
            "ping", "info", "role", "wait", "exec", "multi", "select", "client",
        ] {
            assert_eq!(lookup(name.as_bytes()).map(Gate::of), Some(Gate::Any));
        }
    }

    #[test]
    fn table_is_sorted_and_unique() {
        for w in COMMANDS.windows(2) {
            assert!(w[0].name < w[1].name, "{} before {}", w[0].name, w[1].name);
        }
    }

    /// The README's command list is generated from this table; run with
    /// `UPDATE_README=1` to regenerate it after changing the table.
    #[test]
    fn readme_lists_exactly_the_command_table() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
        let readme = std::fs::read_to_string(&path).expect("README.md");
        let start_marker = "<!-- commands:start";
        let end_marker = "<!-- commands:end -->";
        let start = readme.find(start_marker).expect("start marker in README");
        let start = start + readme[start..].find('\n').expect("newline") + 1;
        let end = readme.find(end_marker).expect("end marker in README");
        let want = markdown_table();
        if std::env::var_os("UPDATE_README").is_some() {
            let new = format!("{}{}{}", &readme[..start], want, &readme[end..]);
            std::fs::write(&path, new).expect("write README.md");
            return;
        }
        assert_eq!(
            &readme[start..end],
            want,
            "README's command list is stale: run `UPDATE_README=1 cargo test readme`"
        );
    }

    #[test]
    fn write_flag_matches_flags() {
        for c in COMMANDS {
            assert_eq!(c.write, c.flags.contains(&"write"), "{}", c.name);
        }
    }

    #[test]
    fn every_command_is_found_by_packed_name() {
        for c in COMMANDS {
            assert!(c.name.len() <= 16, "{} is too long to pack", c.name);
            let upper = c.name.to_ascii_uppercase();
            assert_eq!(lookup(upper.as_bytes()).map(|x| x.name), Some(c.name));
        }
        assert!(lookup(b"").is_none());
        assert!(lookup(b"getx").is_none());
        assert!(lookup(b"get\0").is_none());
        assert!(lookup(b"a-name-longer-than-sixteen").is_none());
    }

    #[test]
    fn lookup_ignores_case() {
        assert_eq!(lookup(b"GeT").map(|c| c.name), Some("get"));
        assert!(lookup(b"nosuch").is_none());
    }
}
