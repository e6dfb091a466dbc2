//! The command-line client: `kvstore client [-h HOST] [-p PORT] [-a PASSWORD] [-n DB]
//! [COMMAND…]` (the flags are parsed in `main.rs` into [`ClientOptions`]).
//!
//! It behaves like `redis-cli`, so that the two can be used interchangeably:
//!
//! - [`Connection`] is a small blocking RESP client over one TCP socket, used by the
//!   CLI and by tests.
//! - [`format_reply`] prints a reply the way `redis-cli` does on a terminal
//!   (`"quoted"` strings, `(integer) 1`, numbered nested arrays, …) and
//!   [`format_reply_raw`] the way it does when stdout is not a terminal.
//! - [`split_args`] splits a typed line with `redis-cli`'s quoting rules.
//! - [`run`] is the whole program: one-shot mode when a command is given, otherwise a
//!   rustyline REPL with history, command completion and argument hints taken from
//!   [`crate::commands::COMMANDS`]. After every connect it authenticates and selects
//!   the database (`-n`, or the last `SELECT` typed), reconnects once when a connection
//!   drops, and follows `-MOVED` redirects to the leader, saying which node it went to
//!   (`-> Redirected to slot [0] located at host:port`, redis-cli -c's note: before the
//!   reply at the prompt, whose `host:port> ` then names that node; on stderr in one-shot
//!   mode, so stdout holds only the reply). As in redis-cli, every word
//!   after the options is the command, known or not: nothing is guessed to be a host.

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::io::{self, IsTerminal, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use rustyline::completion::Completer;
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::{Hint, Hinter};
use rustyline::history::DefaultHistory;
use rustyline::validate::Validator;
use rustyline::{Config, Context, Editor, Helper};

use crate::commands::{COMMANDS, CommandSpec};
use crate::protocol::{self, Value};

/// Smallest read from the socket; reads grow with the reply being received.
const READ_CHUNK: usize = 16 * 1024;
/// Largest single read, so a huge reply is not re-parsed after every small read.
const MAX_READ_CHUNK: usize = 4 * 1024 * 1024;
/// How many `-MOVED` redirects one command may follow.
const MAX_REDIRECTS: usize = 5;
/// Environment variable naming the history file.
const HISTFILE_ENV: &str = "KVSTORE_HISTFILE";
/// History file name under `$HOME` when [`HISTFILE_ENV`] is not set.
const HISTFILE_DEFAULT: &str = ".kvstore_history";

/// A blocking connection to a kvstore (or any Redis-protocol) server.
///
/// Requests are encoded as RESP multibulk; replies are read through an internal
/// buffer until [`protocol::parse_value`] yields a whole value, so a reply split
/// across many TCP segments (or several replies in one) is handled.
#[derive(Debug)]
pub struct Connection {
    stream: TcpStream,
    /// Bytes received but not yet parsed.
    rbuf: Vec<u8>,
}

impl Connection {
    /// Connects to `host:port`. `timeout` bounds the TCP connect (per resolved
    /// address); `None` waits as long as the OS does.
    ///
    /// The error keeps the OS error's kind and reads like redis-cli's:
    /// `Could not connect to kvstore at 127.0.0.1:7379: Connection refused`.
    pub fn connect(host: &str, port: u16, timeout: Option<Duration>) -> io::Result<Connection> {
        let stream = open_stream(host, port, timeout).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "Could not connect to kvstore at {}: {}",
                    fmt_addr(host, port),
                    describe_io_error(&e)
                ),
            )
        })?;
        // Requests are small and latency-bound; a failure here only costs latency.
        let _ = stream.set_nodelay(true);
        Ok(Connection {
            stream,
            rbuf: Vec::new(),
        })
    }

    /// Sets the read and write timeout of the socket (`None`: block indefinitely).
    /// A timed-out [`request`](Self::request) fails with `WouldBlock`/`TimedOut`.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        let timeout = timeout.filter(|t| !t.is_zero());
        self.stream.set_read_timeout(timeout)?;
        self.stream.set_write_timeout(timeout)
    }

    /// Sends one command (`args[0]` is its name) and waits for its reply.
    ///
    /// A server error reply is `Ok(Value::Error(_))`; `Err` means the connection
    /// failed: closed by the server (`UnexpectedEof`), reset, timed out, or a reply
    /// that is not valid RESP (`InvalidData`). After an `Err` the connection should
    /// be dropped.
    pub fn request(&mut self, args: &[Vec<u8>]) -> io::Result<Value> {
        let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        let mut out = Vec::new();
        protocol::encode_command(&refs, &mut out);
        self.stream.write_all(&out)?;
        self.read_value()
    }

    /// Reads the next value the server sends (the reply to an earlier request, or
    /// a RESP3 push).
    pub fn read_value(&mut self) -> io::Result<Value> {
        loop {
            if !self.rbuf.is_empty() {
                match protocol::parse_value(&self.rbuf) {
                    Ok(Some((value, used))) => {
                        self.rbuf.drain(..used.min(self.rbuf.len()));
                        return Ok(value);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.rbuf.clear();
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("Protocol error: {e}"),
                        ));
                    }
                }
            }
            self.fill()?;
        }
    }

    /// Appends at least one byte from the socket to `rbuf`.
    fn fill(&mut self) -> io::Result<()> {
        // Read as much as is available, in chunks that grow with the pending reply,
        // so a large reply is parsed a few times rather than once per 16 KiB.
        let chunk = self.rbuf.len().clamp(READ_CHUNK, MAX_READ_CHUNK);
        let start = self.rbuf.len();
        self.rbuf.resize(start + chunk, 0);
        loop {
            match self.stream.read(&mut self.rbuf[start..]) {
                Ok(0) => {
                    self.rbuf.truncate(start);
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "Server closed the connection",
                    ));
                }
                Ok(n) => {
                    self.rbuf.truncate(start + n);
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.rbuf.truncate(start);
                    return Err(e);
                }
            }
        }
    }
}

/// Opens the TCP stream, trying every resolved address when a timeout is given.
fn open_stream(host: &str, port: u16, timeout: Option<Duration>) -> io::Result<TcpStream> {
    let Some(timeout) = timeout.filter(|t| !t.is_zero()) else {
        return TcpStream::connect((host, port));
    };
    let mut last_err = None;
    for addr in (host, port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(stream) => return Ok(stream),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "could not resolve to any address",
        )
    }))
}

/// An OS error's text without Rust's ` (os error N)` suffix, as C's `strerror` gives it.
fn describe_io_error(e: &io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => text[..i].to_string(),
        _ => text,
    }
}

/// `host:port`, with brackets around an IPv6 address (`[::1]:7379`).
fn fmt_addr(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

// ---------------------------------------------------------------------------
// Reply formatting
// ---------------------------------------------------------------------------

/// Formats a reply as `redis-cli` prints it on a terminal (its `cliFormatReplyTTY`),
/// without the final newline.
///
/// Bulk strings are quoted and escaped (`"a\nb"`, `"\xff"`), simple strings are
/// bare (`OK`), `(nil)`, `(integer) 1`, `(double) 1.5`, `(true)`, `(error) ERR …`,
/// `(empty array)`; aggregates are numbered (`1) `, maps `1# key => value`,
/// sets `1~ `) with nested elements indented under their parent's number.
pub fn format_reply(v: &Value) -> String {
    let mut out = String::new();
    format_tty(v, "", &mut out);
    if out.ends_with('\n') {
        out.pop();
    }
    out
}

/// Appends `v` in TTY form, ending with a newline. `prefix` is the indentation of
/// every line after the first (the first line follows the parent's index).
fn format_tty(v: &Value, prefix: &str, out: &mut String) {
    match v {
        Value::Error(s) => {
            out.push_str("(error) ");
            out.push_str(s);
        }
        Value::Simple(s) => out.push_str(s),
        Value::Integer(i) => {
            let _ = write!(out, "(integer) {i}");
        }
        Value::Double(d) => {
            out.push_str("(double) ");
            out.push_str(&fmt_double(*d));
        }
        Value::BigNumber(n) => {
            out.push_str("(big number) ");
            out.push_str(n);
        }
        Value::Bulk(b) => repr(b, out),
        Value::Verbatim { text, .. } => out.push_str(&String::from_utf8_lossy(text)),
        Value::Null => out.push_str("(nil)"),
        Value::Boolean(b) => out.push_str(if *b { "(true)" } else { "(false)" }),
        Value::Array(items) => return format_tty_seq(items, ')', "(empty array)", prefix, out),
        Value::Set(items) => return format_tty_seq(items, '~', "(empty set)", prefix, out),
        Value::Push(items) => return format_tty_seq(items, ')', "(empty push)", prefix, out),
        Value::Map(pairs) => return format_tty_map(pairs, prefix, out),
    }
    out.push('\n');
}

/// Number of decimal digits of `n` (at least 1).
fn digits(mut n: usize) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

fn format_tty_seq(items: &[Value], sep: char, empty: &str, prefix: &str, out: &mut String) {
    if items.is_empty() {
        out.push_str(empty);
        out.push('\n');
        return;
    }
    let width = digits(items.len());
    let child = format!("{prefix}{:w$}", "", w = width + 2);
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(prefix);
        }
        let _ = write!(out, "{:>width$}{sep} ", i + 1);
        format_tty(item, &child, out);
    }
}

fn format_tty_map(pairs: &[(Value, Value)], prefix: &str, out: &mut String) {
    if pairs.is_empty() {
        out.push_str("(empty hash)\n");
        return;
    }
    let width = digits(pairs.len());
    let child = format!("{prefix}{:w$}", "", w = width + 2);
    for (i, (key, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push_str(prefix);
        }
        let _ = write!(out, "{:>width$}# ", i + 1);
        format_tty(key, &child, out);
        out.pop(); // the key's newline
        out.push_str(" => ");
        if is_multiline_tty(value) {
            // Start a multi-line value on its own line so its numbers align.
            out.push('\n');
            out.push_str(&child);
        }
        format_tty(value, &child, out);
    }
}

/// Whether [`format_tty`] renders `v` on more than one line.
fn is_multiline_tty(v: &Value) -> bool {
    match v {
        Value::Array(items) | Value::Set(items) | Value::Push(items) => match items.as_slice() {
            [] => false,
            [only] => is_multiline_tty(only),
            _ => true,
        },
        Value::Map(pairs) => match pairs.as_slice() {
            [] => false,
            [(_, only)] => is_multiline_tty(only),
            _ => true,
        },
        _ => false,
    }
}

/// Appends `bytes` quoted the way redis-cli shows them (Redis's `sdscatrepr`):
/// `\\`, `\"`, `\n`, `\r`, `\t`, `\a`, `\b`, other non-printable bytes as `\xHH`.
fn repr(bytes: &[u8], out: &mut String) {
    out.push('"');
    for &b in bytes {
        match b {
            b'\\' => out.push_str("\\\\"),
            b'"' => out.push_str("\\\""),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            0x07 => out.push_str("\\a"),
            0x08 => out.push_str("\\b"),
            0x20..=0x7e => out.push(char::from(b)),
            _ => {
                let _ = write!(out, "\\x{b:02x}");
            }
        }
    }
    out.push('"');
}

/// A double as Redis writes it: shortest round-trip digits, `%g`-style exponent
/// for very large or small magnitudes, `inf`/`-inf`/`nan`.
fn fmt_double(d: f64) -> String {
    if d.is_nan() {
        return "nan".into();
    }
    if d.is_infinite() {
        return if d > 0.0 { "inf" } else { "-inf" }.into();
    }
    let a = d.abs();
    if a == 0.0 || (1e-4..1e17).contains(&a) {
        return format!("{d}");
    }
    // `{:e}` gives "1.5e-7"; C's %g gives "1.5e-07" and "1e+300".
    let s = format!("{d:e}");
    match s.split_once('e') {
        Some((mantissa, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(rest) => ('-', rest),
                None => ('+', exp),
            };
            format!("{mantissa}e{sign}{digits:0>2}")
        }
        None => s,
    }
}

/// Formats a reply as `redis-cli` prints it when stdout is not a terminal (its
/// `cliFormatReplyRaw`), without the final newline: strings verbatim (binary-safe,
/// hence bytes), integers and doubles bare, nil as nothing, errors as their text
/// followed by a newline, aggregate elements one per line, map entries as
/// `key value`.
pub fn format_reply_raw(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    format_raw(v, &mut out);
    out
}

fn format_raw(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Null => {}
        Value::Error(s) => {
            out.extend_from_slice(s.as_bytes());
            out.push(b'\n');
        }
        Value::Simple(s) => out.extend_from_slice(s.as_bytes()),
        Value::Bulk(b) => out.extend_from_slice(b),
        Value::Verbatim { text, .. } => out.extend_from_slice(text),
        Value::Boolean(b) => out.extend_from_slice(if *b { b"(true)" } else { b"(false)" }),
        Value::Integer(i) => out.extend_from_slice(i.to_string().as_bytes()),
        Value::Double(d) => out.extend_from_slice(fmt_double(*d).as_bytes()),
        Value::BigNumber(n) => out.extend_from_slice(n.as_bytes()),
        Value::Array(items) | Value::Set(items) | Value::Push(items) => {
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b'\n');
                }
                format_raw(item, out);
            }
        }
        Value::Map(pairs) => {
            for (i, (key, value)) in pairs.iter().enumerate() {
                if i > 0 {
                    out.push(b'\n');
                }
                format_raw(key, out);
                out.push(b' ');
                format_raw(value, out);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Line splitting
// ---------------------------------------------------------------------------

/// Splits a typed line into arguments with `redis-cli`'s rules (Redis's
/// `sdssplitargs`): arguments are separated by whitespace; `"double quotes"` allow
/// `\n \r \t \b \a \\ \"` and `\xHH` escapes (any other `\c` is `c`);
/// `'single quotes'` allow only `\'`. A closing quote must be followed by
/// whitespace or the end of the line. Unbalanced quotes give the error
/// `Invalid argument(s)`. An empty or blank line gives no arguments.
pub fn split_args(line: &str) -> Result<Vec<Vec<u8>>, String> {
    crate::protocol::split_inline(line.as_bytes()).ok_or_else(|| "Invalid argument(s)".into())
}

// ---------------------------------------------------------------------------
// The program
// ---------------------------------------------------------------------------

/// What `kvstore client` was asked to do, apart from the command itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOptions {
    /// Server host name or address.
    pub host: String,
    /// Server port.
    pub port: u16,
    /// Sent with `AUTH` after every connect (including reconnects and redirects).
    pub password: Option<String>,
    /// Output style: `Some(true)` raw (`--raw`), `Some(false)` TTY-style
    /// (`--no-raw`), `None` raw exactly when stdout is not a terminal.
    pub raw: Option<bool>,
    /// Bound on each TCP connect; `None` waits as long as the OS does.
    pub connect_timeout: Option<Duration>,
    /// Database to `SELECT` after every connect (`-n`); 0, the default, sends nothing.
    pub db: i64,
}

impl Default for ClientOptions {
    /// `127.0.0.1:7379`, no password, output style chosen by the terminal,
    /// 5-second connect timeout, database 0.
    fn default() -> Self {
        ClientOptions {
            host: "127.0.0.1".into(),
            port: 7379,
            password: None,
            raw: None,
            connect_timeout: Some(Duration::from_secs(5)),
            db: 0,
        }
    }
}

/// Runs the client and returns the process exit code.
///
/// With a non-empty `command`, sends it once, prints the reply (TTY-style or raw,
/// see [`ClientOptions::raw`]) and returns 0, or 1 when the reply is an error or the
/// server cannot be reached. Otherwise starts the interactive REPL (prompt
/// `host:port> `, or `not connected> `), which returns 0 on `quit`, `exit` or Ctrl-D.
pub fn run(opts: ClientOptions, command: Vec<String>) -> i32 {
    let raw = opts.raw.unwrap_or_else(|| !io::stdout().is_terminal());
    if command.is_empty() {
        return run_repl(&opts, raw);
    }
    let args: Vec<Vec<u8>> = command.into_iter().map(String::into_bytes).collect();
    let mut session = Session::new(&opts);
    let verbatim = prints_verbatim(&args);
    let result = session.execute(&args);
    for note in session.redirects.drain(..) {
        eprintln!("{note}");
    }
    match result {
        // SHUTDOWN succeeded: the server closed the connection, as redis-cli expects.
        Ok(None) => 0,
        Ok(Some(reply)) => {
            print_reply(&reply, raw, verbatim);
            if let Value::Error(e) = &reply
                && let Some(hint) = host_hint(&args, e)
            {
                eprintln!("{hint}");
            }
            i32::from(matches!(reply, Value::Error(_)))
        }
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

/// When a one-shot command starting with an address was unknown to the server, the
/// user probably meant the old `kvstore client HOST PORT …` form: say how to write it.
fn host_hint(args: &[Vec<u8>], error: &str) -> Option<String> {
    if !error.starts_with("ERR unknown command") {
        return None;
    }
    let first = std::str::from_utf8(args.first()?).ok()?;
    if first.parse::<std::net::IpAddr>().is_err() && first != "localhost" {
        return None;
    }
    let port = args
        .get(1)
        .and_then(|p| std::str::from_utf8(p).ok())
        .filter(|p| p.parse::<u16>().is_ok())
        .map(|p| format!(" -p {p}"))
        .unwrap_or_default();
    Some(format!(
        "(the command was sent as typed; to connect to {first}, use: kvstore client -h \
         {first}{port} …)"
    ))
}

/// Commands whose text replies redis-cli always prints verbatim, in either output
/// style and without adding a newline (INFO's text ends with its own CRLF).
fn prints_verbatim(args: &[Vec<u8>]) -> bool {
    let is = |i: usize, word: &str| {
        args.get(i)
            .is_some_and(|a| a.eq_ignore_ascii_case(word.as_bytes()))
    };
    is(0, "info")
        || is(0, "lolwut")
        || (is(0, "client") && (is(1, "list") || is(1, "info")))
        || (is(0, "memory") && (is(1, "doctor") || is(1, "malloc-stats")))
        || (args.len() == 2 && is(0, "cluster") && (is(1, "nodes") || is(1, "info")))
        || (args.len() == 2 && is(0, "latency") && is(1, "doctor"))
}

/// Writes a reply to stdout (ignoring a closed pipe): TTY-style or raw, followed by
/// a newline unless `verbatim` (see [`prints_verbatim`]).
fn print_reply(reply: &Value, raw: bool, verbatim: bool) {
    let mut bytes = if raw || verbatim {
        format_reply_raw(reply)
    } else {
        format_reply(reply).into_bytes()
    };
    if !verbatim {
        bytes.push(b'\n');
    }
    let mut stdout = io::stdout().lock();
    let _ = stdout.write_all(&bytes);
    let _ = stdout.flush();
}

/// Why a command got no reply.
#[derive(Debug)]
enum ClientError {
    /// The server could not be reached (message already says so).
    Connect(io::Error),
    /// The connection failed while talking to it.
    Io(io::Error),
    /// The server refused to SELECT the database asked for (`-n`): running the command
    /// in another database instead would be worse than not running it.
    Select { db: i64, error: String },
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Connect(e) => write!(f, "{e}"),
            ClientError::Io(e) => write!(f, "Error: {}", describe_io_error(e)),
            // redis-cli's wording.
            ClientError::Select { db, error } => write!(f, "SELECT {db} failed: {error}"),
        }
    }
}

/// A connection that comes and goes: the current server address (which `MOVED`
/// changes), the password to send after each connect, and the live connection.
struct Session {
    host: String,
    port: u16,
    password: Option<String>,
    /// The database to select after each connect: `-n`, then whatever `SELECT` last
    /// succeeded (as redis-cli, so a reconnect lands in the same database).
    db: i64,
    timeout: Option<Duration>,
    conn: Option<Connection>,
    /// The `-> Redirected to …` notes of the last command, one per `-MOVED` followed,
    /// for the caller to show: on stdout before the reply at the prompt (as redis-cli
    /// -c), on stderr in one-shot mode so that a script's stdout holds only the reply.
    redirects: Vec<String>,
    /// `READONLY` succeeded (and no `READWRITE` since): sent again after each connect,
    /// so a reconnect keeps reading a follower's copy.
    readonly: bool,
    /// Between a successful `MULTI` and the `EXEC`/`DISCARD` that ends it. A redirect is
    /// then shown, not followed (resending one queued command on another node would run
    /// it outside its transaction), and a lost connection is not retried.
    in_multi: bool,
}

impl Session {
    fn new(opts: &ClientOptions) -> Session {
        Session {
            host: opts.host.clone(),
            port: opts.port,
            password: opts.password.clone(),
            db: opts.db,
            timeout: opts.connect_timeout,
            conn: None,
            redirects: Vec::new(),
            readonly: false,
            in_multi: false,
        }
    }

    /// `host:port> ` (`host:port[db]> ` outside database 0) when connected, else
    /// `not connected> ` (as redis-cli).
    fn prompt(&self) -> String {
        match (&self.conn, self.db) {
            (None, _) => "not connected> ".into(),
            (Some(_), 0) => format!("{}> ", fmt_addr(&self.host, self.port)),
            (Some(_), db) => format!("{}[{db}]> ", fmt_addr(&self.host, self.port)),
        }
    }

    /// (Re)connects to the current address, authenticates and selects the database.
    fn connect(&mut self) -> Result<(), ClientError> {
        self.conn = None;
        let mut conn = Connection::connect(&self.host, self.port, self.timeout)
            .map_err(ClientError::Connect)?;
        if let Some(password) = &self.password {
            let auth = [b"AUTH".to_vec(), password.as_bytes().to_vec()];
            match conn.request(&auth) {
                Ok(Value::Error(e)) => eprintln!("AUTH failed: {e}"),
                Ok(_) => {}
                Err(e) => return Err(ClientError::Io(e)),
            }
        }
        // A new connection starts in database 0, so only another one needs a SELECT.
        if self.db != 0 {
            let select = [b"SELECT".to_vec(), self.db.to_string().into_bytes()];
            match conn.request(&select) {
                Ok(Value::Error(error)) => {
                    return Err(ClientError::Select { db: self.db, error });
                }
                Ok(_) => {}
                Err(e) => return Err(ClientError::Io(e)),
            }
        }
        if self.readonly {
            match conn.request(&[b"READONLY".to_vec()]) {
                Ok(Value::Error(e)) => eprintln!("READONLY failed: {e}"),
                Ok(_) => {}
                Err(e) => return Err(ClientError::Io(e)),
            }
        }
        self.conn = Some(conn);
        Ok(())
    }

    /// The live connection, connecting first if there is none.
    fn conn(&mut self) -> Result<&mut Connection, ClientError> {
        if self.conn.is_none() {
            self.connect()?;
        }
        self.conn.as_mut().ok_or_else(|| {
            ClientError::Io(io::Error::new(io::ErrorKind::NotConnected, "not connected"))
        })
    }

    /// Sends a command; if an established connection turns out to be dead,
    /// reconnects once and sends it again.
    fn request(&mut self, args: &[Vec<u8>]) -> Result<Value, ClientError> {
        let was_connected = self.conn.is_some();
        let first = self.conn()?.request(args);
        match first {
            Ok(v) => Ok(v),
            Err(e) => {
                self.conn = None;
                // A new connection has no open transaction: resending there would run
                // the command outside it.
                let in_multi = std::mem::take(&mut self.in_multi);
                if !(was_connected && is_disconnect(&e)) || in_multi {
                    return Err(ClientError::Io(e));
                }
                log::debug!("connection lost ({e}); reconnecting");
                let second = self.conn()?.request(args);
                second.map_err(|e| {
                    self.conn = None;
                    ClientError::Io(e)
                })
            }
        }
    }

    /// Sends a command, following up to [`MAX_REDIRECTS`] `-MOVED` replies, and
    /// remembers a database that `SELECT` switched to. `Ok(None)`: the command was
    /// `SHUTDOWN` and the server closed the connection, which is its success.
    fn execute(&mut self, args: &[Vec<u8>]) -> Result<Option<Value>, ClientError> {
        if is_command(args, "shutdown") {
            return self.shutdown(args);
        }
        let reply = self.follow_redirects(args)?;
        let ok = reply == Value::Simple("OK".into());
        if is_command(args, "multi") && ok {
            self.in_multi = true;
        } else if is_command(args, "exec") || is_command(args, "discard") {
            self.in_multi = false;
        } else if is_command(args, "readonly") && ok {
            self.readonly = true;
        } else if is_command(args, "readwrite") && ok {
            self.readonly = false;
        }
        if is_command(args, "select")
            && args.len() == 2
            && reply == Value::Simple("OK".into())
            && let Some(db) = std::str::from_utf8(&args[1])
                .ok()
                .and_then(|d| d.parse().ok())
        {
            self.db = db;
        }
        Ok(Some(reply))
    }

    /// `SHUTDOWN`: a reply is an error (the server stays up); the connection closing
    /// is success. Never retried on a new connection, unlike other commands.
    fn shutdown(&mut self, args: &[Vec<u8>]) -> Result<Option<Value>, ClientError> {
        let result = self.conn()?.request(args);
        match result {
            Ok(reply) => Ok(Some(reply)),
            Err(e) => {
                self.conn = None;
                if is_disconnect(&e) {
                    Ok(None)
                } else {
                    Err(ClientError::Io(e))
                }
            }
        }
    }

    /// Sends a command, following up to [`MAX_REDIRECTS`] `-MOVED` replies (a cluster
    /// follower's answer to a write or a read: reconnect to the leader, with the same
    /// password, database and READONLY, and send it again). Not inside a transaction.
    /// `-CLUSTERDOWN` (no leader yet) is returned as is: retrying is the user's call.
    fn follow_redirects(&mut self, args: &[Vec<u8>]) -> Result<Value, ClientError> {
        self.redirects.clear();
        let mut hops = 0;
        loop {
            let reply = self.request(args)?;
            if let Value::Error(msg) = &reply
                && hops < MAX_REDIRECTS
                && !self.in_multi
                && let Some((host, port)) = parse_moved(msg)
            {
                hops += 1;
                if !host.is_empty() {
                    self.host = host;
                }
                self.port = port;
                self.conn = None;
                // redis-cli -c's note (one shard here: the slot is always 0), so a
                // user sees which node answered.
                self.redirects.push(format!(
                    "-> Redirected to slot [0] located at {}",
                    fmt_addr(&self.host, self.port)
                ));
                continue;
            }
            return Ok(reply);
        }
    }
}

/// Whether the command's name (`args[0]`) is `name`, in any case.
fn is_command(args: &[Vec<u8>], name: &str) -> bool {
    args.first()
        .is_some_and(|a| a.eq_ignore_ascii_case(name.as_bytes()))
}

/// Errors after which a connection that used to work is worth one reconnect.
fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected
    )
}

/// `MOVED <slot> host:port` → `(host, port)`. The host may be empty (`:7001`),
/// meaning "the same host", or an IPv6 address with or without brackets.
fn parse_moved(msg: &str) -> Option<(String, u16)> {
    let mut words = msg.strip_prefix("MOVED ")?.split_whitespace();
    let _slot = words.next()?;
    let (host, port) = words.next()?.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Some((host.to_string(), port))
}

/// The history file: `$KVSTORE_HISTFILE` (`/dev/null` disables history), else
/// `$HOME/.kvstore_history`, else none.
fn history_path() -> Option<PathBuf> {
    match std::env::var_os(HISTFILE_ENV) {
        Some(path) if !path.is_empty() => (path != "/dev/null").then(|| PathBuf::from(path)),
        _ => {
            let home = std::env::var_os("HOME").filter(|h| !h.is_empty())?;
            Some(PathBuf::from(home).join(HISTFILE_DEFAULT))
        }
    }
}

/// Commands whose arguments carry secrets and stay out of the history file
/// (the same rule as redis-cli's).
fn is_sensitive(args: &[Vec<u8>]) -> bool {
    let eq = |a: &[u8], b: &str| a.eq_ignore_ascii_case(b.as_bytes());
    let Some(name) = args.first() else {
        return false;
    };
    if eq(name, "auth") {
        return true;
    }
    if eq(name, "hello") {
        return args.iter().skip(2).any(|a| eq(a, "auth"));
    }
    if eq(name, "config") && args.len() > 2 && eq(&args[1], "set") {
        return args.iter().skip(2).step_by(2).any(|a| {
            ["requirepass", "masterauth", "masteruser", "cluster-secret"]
                .iter()
                .any(|s| eq(a, s))
        });
    }
    false
}

/// The command table row for `name`, case-insensitively.
fn find_command(name: &str) -> Option<&'static CommandSpec> {
    COMMANDS.iter().find(|c| c.name.eq_ignore_ascii_case(name))
}

/// The REPL; see [`run`].
fn run_repl(opts: &ClientOptions, raw: bool) -> i32 {
    let mut session = Session::new(opts);
    if let Err(e) = session.connect() {
        eprintln!("{e}");
    }
    let config = Config::builder().auto_add_history(false).build();
    let mut editor: Editor<ReplHelper, DefaultHistory> = match Editor::with_config(config) {
        Ok(editor) => editor,
        Err(e) => {
            eprintln!("Error: cannot start the line editor: {e}");
            return 1;
        }
    };
    editor.set_helper(Some(ReplHelper));
    // As redis-cli: history only when a person is typing.
    let history = if io::stdin().is_terminal() {
        history_path()
    } else {
        None
    };
    if let Some(path) = &history {
        // A missing or unreadable file just means no history yet.
        let _ = editor.load_history(path);
    }
    loop {
        let line = match editor.readline(&session.prompt()) {
            Ok(line) => line,
            Err(ReadlineError::Interrupted) => continue, // Ctrl-C: drop the line
            Err(ReadlineError::Eof) => break,            // Ctrl-D
            Err(e) => {
                eprintln!("Error: {e}");
                return 1;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let args = match split_args(&line) {
            Ok(args) => args,
            Err(e) => {
                println!("{e}");
                continue;
            }
        };
        if let Some(path) = &history
            && !is_sensitive(&args)
        {
            let _ = editor.add_history_entry(line.as_str());
            if let Err(e) = editor.append_history(path) {
                log::debug!("cannot write history file {}: {e}", path.display());
            }
        }
        let name = String::from_utf8_lossy(&args[0]).to_ascii_lowercase();
        match name.as_str() {
            "quit" | "exit" => break,
            "help" => {
                print!("{}", help_text(&args[1..]));
                let _ = io::stdout().flush();
                continue;
            }
            _ => {}
        }
        let result = session.execute(&args);
        for note in session.redirects.drain(..) {
            println!("{note}");
        }
        match result {
            Ok(Some(reply)) => print_reply(&reply, raw, prints_verbatim(&args)),
            Ok(None) => {}
            Err(e) => eprintln!("{e}"),
        }
    }
    0
}

/// The text `help` / `help <command>` prints.
fn help_text(topic: &[Vec<u8>]) -> String {
    let mut out = String::new();
    let Some(name) = topic.first() else {
        let _ = writeln!(out, "kvstore client {}", env!("CARGO_PKG_VERSION"));
        out.push_str("To get help about commands type:\n");
        out.push_str("      \"help <command>\" for help on <command>\n");
        out.push_str("      \"help <tab>\" to get a list of possible help topics\n");
        out.push_str("      \"quit\" to exit\n\n");
        out.push_str("Commands:\n");
        let mut line = String::from("     ");
        for spec in COMMANDS {
            if line.len() + spec.name.len() + 1 > 78 {
                out.push_str(&line);
                out.push('\n');
                line = String::from("     ");
            }
            line.push(' ');
            line.push_str(&spec.name.to_ascii_uppercase());
        }
        out.push_str(&line);
        out.push('\n');
        return out;
    };
    let name = String::from_utf8_lossy(name);
    match find_command(&name) {
        Some(spec) => {
            let _ = write!(out, "\n  {}", spec.name.to_ascii_uppercase());
            if !spec.args.is_empty() {
                let _ = write!(out, " {}", spec.args);
            }
            let _ = writeln!(out, "\n  summary: {}\n", spec.summary);
        }
        None => {
            let _ = writeln!(out, "No help for '{name}'. Type \"help\" for the commands.");
        }
    }
    out
}

/// Completion candidates for a command-name prefix: case-insensitive match,
/// returned in the case the user is typing (upper-case unless the prefix has a
/// lower-case letter).
fn complete_command(prefix: &str) -> Vec<String> {
    let lower = prefix.bytes().any(|b| b.is_ascii_lowercase());
    let mut names: Vec<String> = COMMANDS
        .iter()
        .map(|c| c.name)
        .chain(["help", "exit"])
        .filter(|name| {
            name.len() >= prefix.len()
                && name.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
        })
        .map(|name| {
            if lower {
                name.to_ascii_lowercase()
            } else {
                name.to_ascii_uppercase()
            }
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The hint shown after the text typed so far: the command's argument synopsis,
/// minus one word per argument already typed (stopping at the first optional
/// `[…]` part), as redis-cli does. `None` when the first word is not a command.
fn hint_for(line: &str) -> Option<String> {
    let args = split_args(line).ok()?;
    let name = std::str::from_utf8(args.first()?).ok()?;
    let spec = find_command(name)?;
    let mut hint = spec.args.chars();
    let mut to_remove = args.len() - 1;
    while to_remove > 0 {
        let rest = hint.as_str();
        if rest.is_empty() || rest.starts_with('[') {
            break;
        }
        if rest.starts_with(' ') {
            to_remove -= 1;
        }
        hint.next();
    }
    let hint = hint.as_str();
    if hint.is_empty() {
        return None;
    }
    if line.ends_with(|c: char| c.is_ascii_whitespace()) {
        Some(hint.to_string())
    } else {
        Some(format!(" {hint}"))
    }
}

/// The rustyline helper: completion, hints and hint dimming.
struct ReplHelper;

/// A hint that is only shown: accepting it (→ at the end of the line) must not
/// paste the synopsis into the command.
struct ArgsHint(String);

impl Hint for ArgsHint {
    fn display(&self) -> &str {
        &self.0
    }

    fn completion(&self) -> Option<&str> {
        None
    }
}

impl Completer for ReplHelper {
    type Candidate = String;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _ctx: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<String>)> {
        let before = line.get(..pos).unwrap_or(line);
        let start = before.len() - before.trim_start().len();
        let word = &before[start..];
        if !word.contains(char::is_whitespace) {
            return Ok((start, complete_command(word)));
        }
        // `help <command>`
        if let Some((first, rest)) = word.split_once(char::is_whitespace)
            && first.eq_ignore_ascii_case("help")
        {
            let topic = rest.trim_start();
            if !topic.contains(char::is_whitespace) {
                return Ok((pos - topic.len(), complete_command(topic)));
            }
        }
        Ok((pos, Vec::new()))
    }
}

impl Hinter for ReplHelper {
    type Hint = ArgsHint;

    fn hint(&self, line: &str, pos: usize, _ctx: &Context<'_>) -> Option<ArgsHint> {
        if pos < line.len() {
            return None;
        }
        hint_for(line).map(ArgsHint)
    }
}

impl Highlighter for ReplHelper {
    fn highlight_hint<'h>(&self, hint: &'h str) -> Cow<'h, str> {
        // Dark grey, as redis-cli's hints.
        Cow::Owned(format!("\x1b[90m{hint}\x1b[0m"))
    }
}

impl Validator for ReplHelper {}

impl Helper for ReplHelper {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;

    fn bulk(s: &str) -> Value {
        Value::Bulk(s.as_bytes().to_vec())
    }

    fn args(words: &[&str]) -> Vec<Vec<u8>> {
        words.iter().map(|w| w.as_bytes().to_vec()).collect()
    }

    #[test]
    fn format_scalars() {
        assert_eq!(format_reply(&Value::Simple("OK".into())), "OK");
        assert_eq!(format_reply(&Value::Simple("PONG".into())), "PONG");
        assert_eq!(
            format_reply(&Value::Error("ERR unknown command 'x'".into())),
            "(error) ERR unknown command 'x'"
        );
        assert_eq!(format_reply(&Value::Integer(1)), "(integer) 1");
        assert_eq!(format_reply(&Value::Integer(-42)), "(integer) -42");
        assert_eq!(format_reply(&bulk("hello")), "\"hello\"");
        assert_eq!(format_reply(&bulk("")), "\"\"");
        assert_eq!(format_reply(&Value::Null), "(nil)");
        assert_eq!(format_reply(&Value::Double(1.5)), "(double) 1.5");
        assert_eq!(format_reply(&Value::Double(3.0)), "(double) 3");
        assert_eq!(format_reply(&Value::Double(f64::INFINITY)), "(double) inf");
        assert_eq!(
            format_reply(&Value::Double(f64::NEG_INFINITY)),
            "(double) -inf"
        );
        assert_eq!(format_reply(&Value::Double(1e300)), "(double) 1e+300");
        assert_eq!(format_reply(&Value::Double(1.5e-7)), "(double) 1.5e-07");
        assert_eq!(format_reply(&Value::Boolean(true)), "(true)");
        assert_eq!(format_reply(&Value::Boolean(false)), "(false)");
        assert_eq!(
            format_reply(&Value::BigNumber("12345678901234567890".into())),
            "(big number) 12345678901234567890"
        );
        assert_eq!(
            format_reply(&Value::Verbatim {
                format: "txt".into(),
                text: b"# Server\r\nrole:master".to_vec()
            }),
            "# Server\r\nrole:master"
        );
    }

    #[test]
    fn format_escapes_like_sdscatrepr() {
        let v = Value::Bulk(b"a\"b\\c\n\r\t\x07\x08\x00\x7f\xff~ ".to_vec());
        assert_eq!(format_reply(&v), r#""a\"b\\c\n\r\t\a\b\x00\x7f\xff~ ""#);
        // UTF-8 is not printable ASCII: byte escapes, as redis-cli shows it.
        assert_eq!(format_reply(&bulk("é")), r#""\xc3\xa9""#);
    }

    #[test]
    fn format_empty_aggregates() {
        assert_eq!(format_reply(&Value::Array(vec![])), "(empty array)");
        assert_eq!(format_reply(&Value::Map(vec![])), "(empty hash)");
        assert_eq!(format_reply(&Value::Set(vec![])), "(empty set)");
        assert_eq!(format_reply(&Value::Push(vec![])), "(empty push)");
    }

    #[test]
    fn format_arrays() {
        let flat = Value::Array(vec![bulk("a"), bulk("b")]);
        assert_eq!(format_reply(&flat), "1) \"a\"\n2) \"b\"");

        let nested = Value::Array(vec![
            bulk("a"),
            Value::Array(vec![bulk("b"), Value::Array(vec![bulk("c"), Value::Null])]),
            Value::Integer(3),
            Value::Array(vec![]),
        ]);
        assert_eq!(
            format_reply(&nested),
            "1) \"a\"\n\
             2) 1) \"b\"\n\
             \x20  2) 1) \"c\"\n\
             \x20     2) (nil)\n\
             3) (integer) 3\n\
             4) (empty array)"
        );
    }

    #[test]
    fn format_wide_index_aligns() {
        let mut items: Vec<Value> = (1..=10).map(Value::Integer).collect();
        items[9] = Value::Array(vec![bulk("x"), bulk("y")]);
        let text = format_reply(&Value::Array(items));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], " 1) (integer) 1");
        assert_eq!(lines[8], " 9) (integer) 9");
        assert_eq!(lines[9], "10) 1) \"x\"");
        assert_eq!(lines[10], "    2) \"y\"");
        assert_eq!(lines.len(), 11);
    }

    #[test]
    fn format_maps_and_sets() {
        let map = Value::Map(vec![
            (bulk("k1"), bulk("v1")),
            (bulk("k2"), Value::Array(vec![bulk("a"), bulk("b")])),
            (bulk("k3"), Value::Array(vec![bulk("only")])),
            (Value::Simple("k4".into()), Value::Integer(4)),
        ]);
        assert_eq!(
            format_reply(&map),
            "1# \"k1\" => \"v1\"\n\
             2# \"k2\" => \n\
             \x20  1) \"a\"\n\
             \x20  2) \"b\"\n\
             3# \"k3\" => 1) \"only\"\n\
             4# k4 => (integer) 4"
        );
        let set = Value::Set(vec![bulk("x"), bulk("y")]);
        assert_eq!(format_reply(&set), "1~ \"x\"\n2~ \"y\"");
        let push = Value::Push(vec![bulk("message"), bulk("ch")]);
        assert_eq!(format_reply(&push), "1) \"message\"\n2) \"ch\"");
        let nested_in_set = Value::Array(vec![Value::Set(vec![bulk("x"), bulk("y")])]);
        assert_eq!(format_reply(&nested_in_set), "1) 1~ \"x\"\n   2~ \"y\"");
    }

    #[test]
    fn format_raw_like_redis_cli_pipe() {
        let raw = |v: &Value| String::from_utf8(format_reply_raw(v)).unwrap();
        assert_eq!(raw(&bulk("a\nb")), "a\nb");
        assert_eq!(raw(&Value::Simple("OK".into())), "OK");
        assert_eq!(raw(&Value::Integer(7)), "7");
        assert_eq!(raw(&Value::Null), "");
        assert_eq!(raw(&Value::Error("ERR x".into())), "ERR x\n");
        assert_eq!(raw(&Value::Double(2.5)), "2.5");
        assert_eq!(raw(&Value::Boolean(true)), "(true)");
        assert_eq!(
            raw(&Value::Array(vec![bulk("a"), Value::Null, bulk("b")])),
            "a\n\nb"
        );
        assert_eq!(
            raw(&Value::Map(vec![
                (bulk("k"), bulk("v")),
                (bulk("n"), Value::Integer(1))
            ])),
            "k v\nn 1"
        );
        assert_eq!(format_reply_raw(&Value::Bulk(vec![0, 0xff])), vec![0, 0xff]);
    }

    #[test]
    fn split_plain_and_quoted() {
        assert_eq!(split_args("set k v").unwrap(), args(&["set", "k", "v"]));
        assert_eq!(split_args("  get   k \t ").unwrap(), args(&["get", "k"]));
        assert!(split_args("").unwrap().is_empty());
        assert!(split_args("   ").unwrap().is_empty());
        assert_eq!(
            split_args(r#"set "hello world" 'it''s'"#),
            Err("Invalid argument(s)".into())
        );
        assert_eq!(
            split_args(r#"set "hello world" 'x y'"#).unwrap(),
            args(&["set", "hello world", "x y"])
        );
        assert_eq!(split_args(r#"echo """#).unwrap(), args(&["echo", ""]));
        assert_eq!(split_args("echo ''").unwrap(), args(&["echo", ""]));
        // A quote inside a word starts a quoted part of that word.
        assert_eq!(split_args(r#"a"b c""#).unwrap(), args(&["ab c"]));
    }

    #[test]
    fn split_escapes() {
        assert_eq!(
            split_args(r#""a\nb\r\t\b\a\\\"\q""#).unwrap(),
            vec![b"a\nb\r\t\x08\x07\\\"q".to_vec()]
        );
        assert_eq!(
            split_args(r#""\x41\xff\x00" "\xZZ""#).unwrap(),
            vec![vec![0x41, 0xff, 0x00], b"xZZ".to_vec()]
        );
        // Single quotes: only \' is an escape.
        assert_eq!(
            split_args(r"'it\'s \n'").unwrap(),
            vec![b"it's \\n".to_vec()]
        );
        // Outside quotes a backslash is literal.
        assert_eq!(split_args(r"a\nb").unwrap(), vec![b"a\\nb".to_vec()]);
        assert_eq!(split_args("k é").unwrap(), args(&["k", "é"]));
    }

    #[test]
    fn split_unbalanced() {
        for bad in [
            r#"get "k"#,
            "get 'k",
            r#""a"b"#,
            "'a'b",
            r#""abc\"#,
            r#"set k "v\""#,
        ] {
            assert_eq!(
                split_args(bad),
                Err("Invalid argument(s)".to_string()),
                "{bad}"
            );
        }
    }

    #[test]
    fn moved_parsing() {
        assert_eq!(
            parse_moved("MOVED 0 127.0.0.1:7001"),
            Some(("127.0.0.1".into(), 7001))
        );
        assert_eq!(parse_moved("MOVED 3999 :7002"), Some((String::new(), 7002)));
        assert_eq!(parse_moved("MOVED 0 ::1:7003"), Some(("::1".into(), 7003)));
        assert_eq!(
            parse_moved("MOVED 0 [::1]:7003"),
            Some(("::1".into(), 7003))
        );
        assert_eq!(parse_moved("MOVED 0"), None);
        assert_eq!(parse_moved("MOVED 0 host:notaport"), None);
        assert_eq!(parse_moved("ERR MOVED 0 h:1"), None);
    }

    #[test]
    fn completion_and_hints() {
        // Case-insensitive prefix match, in the case being typed, sorted.
        let lower = complete_command("se");
        assert!(lower.contains(&"select".to_string()) && lower.contains(&"set".to_string()));
        assert!(lower.iter().all(|c| c.starts_with("se")));
        assert!(lower.windows(2).all(|w| w[0] < w[1]));
        let upper: Vec<String> = lower.iter().map(|c| c.to_ascii_uppercase()).collect();
        assert_eq!(complete_command("SE"), upper);
        let mixed = complete_command("Inc");
        assert!(mixed.contains(&"incr".to_string()) && mixed.contains(&"incrby".to_string()));
        assert!(mixed.iter().all(|c| c.starts_with("inc")));
        assert!(complete_command("").contains(&"GET".to_string()));
        assert!(complete_command("zz").is_empty());

        let set_args = find_command("set").unwrap().args;
        assert_eq!(
            hint_for("set").as_deref(),
            Some(format!(" {set_args}").as_str())
        );
        assert_eq!(hint_for("SET ").as_deref(), Some(set_args));
        assert!(hint_for("set k ").unwrap().starts_with("value ["));
        assert!(hint_for("set k v ").unwrap().starts_with("[NX|XX]"));
        assert_eq!(hint_for("get k"), None);
        assert_eq!(hint_for("dbsize"), None);
        assert_eq!(hint_for("nosuch"), None);
        assert_eq!(hint_for(""), None);
        assert_eq!(hint_for("get \"unbalanced"), None);
    }

    #[test]
    fn help_and_history_rules() {
        assert!(help_text(&args(&["get"])).contains("GET key"));
        assert!(help_text(&args(&["GET"])).contains("summary: "));
        assert!(help_text(&args(&["nosuch"])).contains("No help"));
        assert!(help_text(&[]).contains("SET"));
        assert!(is_sensitive(&args(&["AUTH", "pw"])));
        assert!(is_sensitive(&args(&["hello", "3", "AUTH", "u", "p"])));
        assert!(is_sensitive(&args(&["config", "set", "requirepass", "x"])));
        assert!(!is_sensitive(&args(&["config", "get", "requirepass"])));
        assert!(!is_sensitive(&args(&["set", "auth", "x"])));
    }

    /// One exchange of the fake server: the exact request bytes expected, then
    /// the reply in pieces (`None`: close the connection after the request).
    type Exchange = (Vec<u8>, Option<Vec<String>>);

    fn pieces(parts: &[&str]) -> Option<Vec<String>> {
        Some(parts.iter().map(|p| p.to_string()).collect())
    }

    /// A fake server taking one connection per entry of `script`, in order. Each
    /// reply piece is written and flushed separately, with a pause in between, so
    /// the client sees replies split across reads.
    fn fake_server(script: Vec<Vec<Exchange>>) -> (u16, thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let handle = thread::spawn(move || {
            for exchanges in script {
                let (mut sock, _) = listener.accept().unwrap();
                for (expected, reply) in exchanges {
                    let mut got = vec![0; expected.len()];
                    sock.read_exact(&mut got).unwrap();
                    assert_eq!(got, expected, "request bytes");
                    let Some(reply) = reply else { break };
                    for piece in reply {
                        sock.write_all(piece.as_bytes()).unwrap();
                        sock.flush().unwrap();
                        thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        });
        (port, handle)
    }

    fn encoded(words: &[&str]) -> Vec<u8> {
        let mut out = format!("*{}\r\n", words.len()).into_bytes();
        for w in words {
            out.extend_from_slice(format!("${}\r\n{w}\r\n", w.len()).as_bytes());
        }
        out
    }

    #[test]
    fn connection_reads_split_replies() {
        let (port, server) = fake_server(vec![vec![
            (
                encoded(&["GET", "k"]),
                pieces(&["$", "5\r", "\nhel", "lo\r", "\n"]),
            ),
            (
                encoded(&["MGET", "a", "b"]),
                pieces(&["*2\r\n$1\r\nx", "\r\n$-", "1\r\n"]),
            ),
            (
                encoded(&["INCR", "n"]),
                // Two values in one write: the second stays buffered.
                pieces(&[":42\r\n-ERR boom\r\n"]),
            ),
            (encoded(&["PING"]), None),
        ]]);
        let mut conn =
            Connection::connect("127.0.0.1", port, Some(Duration::from_secs(5))).unwrap();
        conn.set_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(conn.request(&args(&["GET", "k"])).unwrap(), bulk("hello"));
        assert_eq!(
            conn.request(&args(&["MGET", "a", "b"])).unwrap(),
            Value::Array(vec![bulk("x"), Value::Null])
        );
        assert_eq!(
            conn.request(&args(&["INCR", "n"])).unwrap(),
            Value::Integer(42)
        );
        assert_eq!(conn.read_value().unwrap(), Value::Error("ERR boom".into()));
        let err = conn.request(&args(&["PING"])).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        server.join().unwrap();
    }

    #[test]
    fn connect_error_is_clear() {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let err = Connection::connect("127.0.0.1", port, Some(Duration::from_secs(2))).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        assert_eq!(
            err.to_string(),
            format!("Could not connect to kvstore at 127.0.0.1:{port}: Connection refused")
        );
    }

    fn session_for(port: u16, password: Option<&str>) -> Session {
        let opts = ClientOptions {
            port,
            password: password.map(str::to_string),
            ..ClientOptions::default()
        };
        Session::new(&opts)
    }

    #[test]
    fn session_authenticates_and_reconnects_once() {
        let (port, server) = fake_server(vec![
            vec![
                (encoded(&["AUTH", "pw"]), pieces(&["+OK\r\n"])),
                (encoded(&["SET", "k", "v"]), pieces(&["+OK\r\n"])),
                // The server drops the connection on the next command...
                (encoded(&["GET", "k"]), None),
            ],
            // ...the client reconnects, authenticates again and retries.
            vec![
                (encoded(&["AUTH", "pw"]), pieces(&["+OK\r\n"])),
                (encoded(&["GET", "k"]), pieces(&["$1\r\nv\r\n"])),
            ],
        ]);
        let mut session = session_for(port, Some("pw"));
        assert_eq!(
            session.execute(&args(&["SET", "k", "v"])).unwrap(),
            Some(Value::Simple("OK".into()))
        );
        assert_eq!(
            session.execute(&args(&["GET", "k"])).unwrap(),
            Some(bulk("v"))
        );
        server.join().unwrap();
    }

    #[test]
    fn session_selects_the_database_after_auth_and_every_reconnect() {
        let (port, server) = fake_server(vec![
            vec![
                (encoded(&["AUTH", "pw"]), pieces(&["+OK\r\n"])),
                (encoded(&["SELECT", "1"]), pieces(&["+OK\r\n"])),
                (encoded(&["SET", "k", "v"]), pieces(&["+OK\r\n"])),
                // A SELECT typed at the prompt is remembered...
                (encoded(&["select", "2"]), pieces(&["+OK\r\n"])),
                (encoded(&["GET", "k"]), None),
            ],
            // ...so the reconnect lands in database 2, not 1 or 0.
            vec![
                (encoded(&["AUTH", "pw"]), pieces(&["+OK\r\n"])),
                (encoded(&["SELECT", "2"]), pieces(&["+OK\r\n"])),
                (encoded(&["GET", "k"]), pieces(&["$1\r\nv\r\n"])),
            ],
        ]);
        let opts = ClientOptions {
            port,
            password: Some("pw".into()),
            db: 1,
            ..ClientOptions::default()
        };
        let mut session = Session::new(&opts);
        assert_eq!(
            session.execute(&args(&["SET", "k", "v"])).unwrap(),
            Some(Value::Simple("OK".into()))
        );
        assert_eq!(session.prompt(), format!("127.0.0.1:{port}[1]> "));
        session.execute(&args(&["select", "2"])).unwrap();
        assert_eq!(session.prompt(), format!("127.0.0.1:{port}[2]> "));
        assert_eq!(
            session.execute(&args(&["GET", "k"])).unwrap(),
            Some(bulk("v"))
        );
        server.join().unwrap();
    }

    #[test]
    fn a_refused_select_runs_nothing() {
        // The fake server fails the test if anything but SELECT arrives.
        let (port, server) = fake_server(vec![vec![(
            encoded(&["SELECT", "1"]),
            pieces(&["-ERR DB index is out of range\r\n"]),
        )]]);
        let opts = ClientOptions {
            port,
            db: 1,
            ..ClientOptions::default()
        };
        let mut session = Session::new(&opts);
        let err = session.execute(&args(&["SET", "k", "v"])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "SELECT 1 failed: ERR DB index is out of range"
        );
        server.join().unwrap();
    }

    #[test]
    fn shutdown_closing_the_connection_is_success_and_never_retried() {
        // One connection only: a retry would find nobody listening and fail.
        let (port, server) = fake_server(vec![vec![(encoded(&["SHUTDOWN"]), None)]]);
        let mut session = session_for(port, None);
        session.conn().unwrap();
        assert_eq!(session.execute(&args(&["SHUTDOWN"])).unwrap(), None);
        assert_eq!(session.prompt(), "not connected> ");
        server.join().unwrap();
        // An error reply is shown: the server stays up.
        let (port, server) = fake_server(vec![vec![(
            encoded(&["shutdown", "save"]),
            pieces(&["-ERR Errors trying to SHUTDOWN. Check logs.\r\n"]),
        )]]);
        let mut session = session_for(port, None);
        assert_eq!(
            session.execute(&args(&["shutdown", "save"])).unwrap(),
            Some(Value::Error(
                "ERR Errors trying to SHUTDOWN. Check logs.".into()
            ))
        );
        server.join().unwrap();
    }

    #[test]
    fn an_address_as_command_gets_a_hint() {
        let unknown = "ERR unknown command '10.0.0.5', with args beginning with: '7001' ";
        let hint = host_hint(&args(&["10.0.0.5", "7001", "GET", "k"]), unknown).unwrap();
        assert!(
            hint.contains("kvstore client -h 10.0.0.5 -p 7001"),
            "{hint}"
        );
        assert!(host_hint(&args(&["gte", "k"]), unknown).is_none());
        assert!(host_hint(&args(&["127.0.0.1"]), "ERR other").is_none());
    }

    #[test]
    fn session_follows_moved() {
        let (leader, leader_thread) = fake_server(vec![vec![(
            encoded(&["SET", "k", "v"]),
            pieces(&["+OK\r\n"]),
        )]]);
        let moved = format!("-MOVED 0 127.0.0.1:{leader}\r\n");
        let (follower, follower_thread) =
            fake_server(vec![vec![(encoded(&["SET", "k", "v"]), Some(vec![moved]))]]);
        let mut session = session_for(follower, None);
        assert_eq!(
            session.execute(&args(&["SET", "k", "v"])).unwrap(),
            Some(Value::Simple("OK".into()))
        );
        assert_eq!(session.port, leader);
        assert_eq!(session.prompt(), format!("127.0.0.1:{leader}> "));
        // Which node answered, for the caller to show.
        assert_eq!(
            session.redirects,
            [format!(
                "-> Redirected to slot [0] located at 127.0.0.1:{leader}"
            )]
        );
        follower_thread.join().unwrap();
        leader_thread.join().unwrap();
    }

    #[test]
    fn session_sends_readonly_again_after_a_redirect() {
        let (leader, leader_thread) = fake_server(vec![vec![
            (encoded(&["READONLY"]), pieces(&["+OK\r\n"])),
            (encoded(&["SET", "k", "v"]), pieces(&["+OK\r\n"])),
        ]]);
        let moved = format!("-MOVED 0 127.0.0.1:{leader}\r\n");
        let (follower, follower_thread) = fake_server(vec![vec![
            (encoded(&["READONLY"]), pieces(&["+OK\r\n"])),
            (encoded(&["SET", "k", "v"]), Some(vec![moved])),
        ]]);
        let mut session = session_for(follower, None);
        let ok = Some(Value::Simple("OK".into()));
        assert_eq!(session.execute(&args(&["READONLY"])).unwrap(), ok);
        assert_eq!(session.execute(&args(&["SET", "k", "v"])).unwrap(), ok);
        assert_eq!(session.port, leader);
        follower_thread.join().unwrap();
        leader_thread.join().unwrap();
    }

    #[test]
    fn session_does_not_follow_moved_inside_multi() {
        // Resending a queued command on the leader would run it outside its transaction.
        let moved = "-MOVED 0 127.0.0.1:1\r\n".to_string();
        let (follower, follower_thread) = fake_server(vec![vec![
            (encoded(&["MULTI"]), pieces(&["+OK\r\n"])),
            (encoded(&["SET", "k", "v"]), Some(vec![moved.clone()])),
            (encoded(&["EXEC"]), Some(vec![moved])),
        ]]);
        let mut session = session_for(follower, None);
        let moved = Some(Value::Error("MOVED 0 127.0.0.1:1".into()));
        assert_eq!(
            session.execute(&args(&["MULTI"])).unwrap(),
            Some(Value::Simple("OK".into()))
        );
        assert_eq!(session.execute(&args(&["SET", "k", "v"])).unwrap(), moved);
        assert_eq!(session.execute(&args(&["EXEC"])).unwrap(), moved);
        assert_eq!(session.port, follower);
        assert!(
            !session.in_multi,
            "EXEC ends the transaction, whatever it answered"
        );
        follower_thread.join().unwrap();
    }

    #[test]
    fn session_stops_after_five_redirects() {
        // A node that keeps redirecting to itself.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = thread::spawn(move || {
            let reply = format!("-MOVED 0 127.0.0.1:{port}\r\n");
            let request = encoded(&["GET", "k"]);
            for _ in 0..=MAX_REDIRECTS {
                let (mut sock, _) = listener.accept().unwrap();
                let mut got = vec![0; request.len()];
                sock.read_exact(&mut got).unwrap();
                sock.write_all(reply.as_bytes()).unwrap();
            }
        });
        let mut session = session_for(port, None);
        let reply = session.execute(&args(&["GET", "k"])).unwrap();
        assert!(matches!(reply, Some(Value::Error(ref e)) if e.starts_with("MOVED ")));
        server.join().unwrap();
    }

    #[test]
    fn session_reports_unreachable_server() {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut session = session_for(port, None);
        assert_eq!(session.prompt(), "not connected> ");
        let err = session.execute(&args(&["PING"])).unwrap_err();
        assert!(matches!(err, ClientError::Connect(_)));
        assert!(
            err.to_string()
                .starts_with("Could not connect to kvstore at 127.0.0.1:")
        );
    }
}
