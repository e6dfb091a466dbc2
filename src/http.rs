//! The HTTP listener (`--http-port`): `GET /metrics`, `GET /status`, `GET /health`, and
//! the REST interface `GET/PUT/DELETE /v1/kv/{key}`.
//!
//! Owns: the HTTP socket, its accept thread, one thread per HTTP connection (at most
//! [`MAX_CONNECTIONS`]), and a small cache of the leader's HTTP port. Shares the server's
//! [`Context`]: requests enter as bytes on an HTTP connection, are cut into a request
//! head ([`parse_head`]) and a body (`Content-Length` only, capped at
//! `--proto-max-bulk-len`), routed ([`route`]), and a key-value request is turned into
//! the very Redis command a client would send (`GET k`, `SET k v [EX ttl]`, `DEL k`,
//! [`kv_command`]) and run through the same path a Redis connection takes
//! ([`commands::dispatch_spec`], which applies the cluster's serving gates, and
//! [`Store::write`](crate::store::Store::write) for writes, which logs and replicates
//! them as any write). The RESP reply is then mapped to HTTP ([`map_reply`]): the same
//! consistency and redirect rules as the Redis port, by construction.
//!
//! Why not tiny_http (or another crate): tiny_http 0.12 reads a request line and headers
//! with no size limit, starts a thread per connection with no cap, sets no read
//! timeout, and when a request's body is left unread it allocates a buffer of the
//! client's `Content-Length` to skip it (`EqualReader`'s `Drop`): one request with a
//! huge `Content-Length` that we refuse with 413 would abort the process. The subset
//! needed here (HTTP/1.1, keep-alive, `Content-Length` bodies, `Expect: 100-continue`)
//! is small, so it is done here with every limit explicit: the head is at most
//! [`MAX_HEAD`] bytes and [`MAX_HEADERS`] lines and must arrive within [`HEAD_TIMEOUT`];
//! a body is refused (413, before a byte of it is read) past `--proto-max-bulk-len` and
//! read through `take`; chunked bodies get 411.
//!
//! Redirects: a follower answers a key-value request with 307 to the leader's HTTP
//! address. Nodes know each other's client (Redis) addresses only, so the follower asks
//! the leader `PEER HTTP` on its client port (answered like `PEER ID`, by
//! `server.rs`: this node's HTTP port, 0 if none), caches the answer for
//! [`LEADER_PORT_TTL`] per (leader id, address), and builds the `Location` from the
//! host of the leader's client address (never its bind address, which may be 0.0.0.0)
//! and that port. A leader without an HTTP port, or one that cannot be asked, gives 503
//! with `Retry-After`.
//!
//! Auth: with `--requirepass`, every route but `/health` needs
//! `Authorization: Bearer <password>` (compared in constant time,
//! [`crate::auth::password_matches`]); `/metrics` too, as Prometheus can send a bearer
//! token. Failures count in INFO's `acl_access_denied_auth`.
//!
//! Keep-alive: a connection is kept open after a response only while at most
//! [`KEEP_ALIVE_MAX`] connections are open, so idle ones cannot hold every slot.
//!
//! Shutdown ([`HttpServer::stop`], which the server runs once its Redis clients are
//! drained and before its final fsync, `Server::on_drain`): the accept loop stops, every connection's read side
//! is shut (a request being served finishes and is answered), and the threads are
//! joined with a deadline. Requests arriving once the server is shutting down get 503.

use crate::commands::{self, Context, Dispatched, Session};
use crate::protocol::{Proto, Value, parse_value};
use crate::ratelog::{RateLimit, suppressed_note};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// HTTP connections served at once; one more is answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 64;
/// Past this many connections, a response closes its connection instead of keeping it
/// alive: idle keep-alive connections could otherwise hold every slot for
/// [`HEAD_TIMEOUT`] each while new clients get 503.
pub const KEEP_ALIVE_MAX: usize = MAX_CONNECTIONS * 3 / 4;
/// The most bytes a request line and its headers may take (431 past it; nginx's
/// default buffers are 1 KiB + 4 × 8 KiB).
pub const MAX_HEAD: usize = 16 * 1024;
/// The most header lines a request may have.
pub const MAX_HEADERS: usize = 100;
/// How long a request's head may take to arrive, and how long an idle keep-alive
/// connection is kept.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one read of a body, or one write of a response, may block.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// A refused request's body up to this size is read and dropped so the connection can
/// go on; a larger one closes the connection instead.
const DRAIN_MAX: usize = 64 * 1024;
/// What a closing connection reads and drops at most, and for how long
/// ([`linger_close`]).
const LINGER_BYTES: usize = 4 << 20;
const LINGER_TIME: Duration = Duration::from_secs(2);
/// How long the leader's HTTP port, once learned, is trusted.
pub const LEADER_PORT_TTL: Duration = Duration::from_secs(10);
/// How long a failed lookup of the leader's HTTP port is remembered (so a follower
/// does not dial the leader once per request while it cannot).
const LEADER_PORT_RETRY: Duration = Duration::from_secs(1);
/// Connect and read timeout of the `PEER HTTP` lookup.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------
// The pure part: request heads, routes, percent-decoding, reply mapping.

/// An HTTP response, before it is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    /// Extra headers (besides Content-Type, Content-Length, Connection).
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

const TEXT: &str = "text/plain; charset=utf-8";

impl Response {
    /// A one-line text/plain response (`msg` and a newline).
    pub fn text(status: u16, msg: &str) -> Response {
        Response {
            status,
            content_type: TEXT,
            headers: Vec::new(),
            body: format!("{msg}\n").into_bytes(),
        }
    }

    /// No body (204).
    pub fn empty(status: u16) -> Response {
        Response {
            status,
            content_type: TEXT,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn with(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }

    /// The value of extra header `name` (case-insensitive), for tests.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The reason phrase of the statuses this module sends.
fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        307 => "Temporary Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    /// The request target as sent: path and query (`/v1/kv/k?ttl=5`).
    pub target: String,
    /// HTTP/1.1 (true) or HTTP/1.0 (false).
    pub http11: bool,
    /// Header names lowercased, values with surrounding blanks trimmed.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// Whether the client asks to keep the connection open after this request.
    pub fn keep_alive(&self) -> bool {
        let conn = self
            .header("connection")
            .map(|v| String::from_utf8_lossy(v).to_ascii_lowercase());
        match conn {
            Some(c) if c.split(',').any(|t| t.trim() == "close") => false,
            Some(c) if c.split(',').any(|t| t.trim() == "keep-alive") => true,
            _ => self.http11,
        }
    }

    /// The declared body length: `Ok(None)` without one; an error response for a
    /// malformed or conflicting `Content-Length`, or for `Transfer-Encoding` (chunked
    /// bodies are not read: 411, so the client resends with a length).
    pub fn content_length(&self) -> Result<Option<u64>, Response> {
        if self.header("transfer-encoding").is_some() {
            return Err(Response::text(
                411,
                "chunked request bodies are not supported: send Content-Length",
            ));
        }
        let mut len = None;
        for (n, v) in &self.headers {
            if n != "content-length" {
                continue;
            }
            let parsed = std::str::from_utf8(v)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok());
            match (parsed, len) {
                (None, _) => return Err(Response::text(400, "malformed Content-Length")),
                (Some(a), Some(b)) if a != b => {
                    return Err(Response::text(400, "conflicting Content-Length headers"));
                }
                (Some(a), _) => len = Some(a),
            }
        }
        Ok(len)
    }
}

/// Where the head of the request at the start of `buf` ends (just past its blank
/// line), if it is all there. A bare LF ends lines too (a person typing into nc).
pub fn head_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(p) = buf[i..].iter().position(|&b| b == b'\n') {
        let nl = i + p;
        let rest = &buf[nl + 1..];
        if rest.starts_with(b"\n") {
            return Some(nl + 2);
        }
        if rest.starts_with(b"\r\n") {
            return Some(nl + 3);
        }
        i = nl + 1;
    }
    None
}

/// Parses a request head (request line and headers, up to and including the blank
/// line). Errors are the response to send before closing.
pub fn parse_head(head: &[u8]) -> Result<Head, Response> {
    let text = std::str::from_utf8(head)
        .map_err(|_| Response::text(400, "the request head is not ASCII"))?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Response::text(400, "malformed request line"));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(Response::text(400, "malformed method"));
    }
    if !target.starts_with('/') {
        return Err(Response::text(400, "the request target must be a path"));
    }
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        v if v.starts_with("HTTP/") => {
            return Err(Response::text(505, "only HTTP/1.0 and HTTP/1.1"));
        }
        _ => return Err(Response::text(400, "malformed request line")),
    };
    let mut headers = Vec::new();
    for line in lines {
        if line.is_empty() {
            break;
        }
        if headers.len() == MAX_HEADERS {
            return Err(Response::text(431, "too many header fields"));
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(Response::text(400, "malformed header field"));
        };
        let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if name.is_empty() || !name.bytes().all(token) {
            return Err(Response::text(400, "malformed header field name"));
        }
        headers.push((
            name.to_ascii_lowercase(),
            value.trim_matches([' ', '\t']).as_bytes().to_vec(),
        ));
    }
    Ok(Head {
        method: method.to_string(),
        target: target.to_string(),
        http11,
        headers,
    })
}

/// Decodes `%XX` escapes (anything else is kept as is, `+` included: this is a path,
/// not a form). `None` for a `%` not followed by two hex digits.
pub fn percent_decode(s: &[u8]) -> Option<Vec<u8>> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            let hi = hex(*s.get(i + 1)?)?;
            let lo = hex(*s.get(i + 2)?)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    Some(out)
}

/// What a key-value request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvMethod {
    Get,
    Put,
    Delete,
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Metrics,
    Status,
    Health,
    Kv {
        method: KvMethod,
        key: Vec<u8>,
        db: u32,
        /// Seconds (PUT only).
        ttl: Option<u64>,
    },
}

impl Route {
    /// Whether the route needs the password (when one is set): all but `/health`, which
    /// load balancers and systemd probes call without credentials.
    pub fn needs_auth(&self) -> bool {
        !matches!(self, Route::Health)
    }
}

const KV_PREFIX: &str = "/v1/kv/";

/// Routes a request: `method` and `target` as sent, `databases` to validate `?db=`.
/// HEAD is served as GET without the body. Errors: 404 unknown path, 405 wrong method
/// (with `Allow`), 400 bad key, query or parameter.
pub fn route(method: &str, target: &str, databases: u32) -> Result<Route, Response> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let get_only = |r: Route| match method {
        "GET" | "HEAD" => Ok(r),
        _ => Err(Response::text(405, "method not allowed").with("Allow", "GET, HEAD")),
    };
    let simple = match path {
        "/metrics" => Some(Route::Metrics),
        "/status" => Some(Route::Status),
        "/health" => Some(Route::Health),
        _ => None,
    };
    if let Some(r) = simple {
        if !query.is_empty() {
            return Err(Response::text(400, &format!("{path} takes no parameters")));
        }
        return get_only(r);
    }
    let Some(raw_key) = path.strip_prefix(KV_PREFIX) else {
        return Err(Response::text(
            404,
            "no such resource (try /v1/kv/KEY, /status, /health, /metrics)",
        ));
    };
    let method = match method {
        "GET" | "HEAD" => KvMethod::Get,
        "PUT" => KvMethod::Put,
        "DELETE" => KvMethod::Delete,
        _ => {
            return Err(
                Response::text(405, "method not allowed").with("Allow", "GET, HEAD, PUT, DELETE")
            );
        }
    };
    let key = percent_decode(raw_key.as_bytes())
        .ok_or_else(|| Response::text(400, "malformed percent-encoding in the key"))?;
    if key.is_empty() {
        return Err(Response::text(400, "empty key: use /v1/kv/KEY"));
    }
    let mut db = None;
    let mut ttl = None;
    for param in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = param.split_once('=').unwrap_or((param, ""));
        let value = percent_decode(value.as_bytes())
            .ok_or_else(|| Response::text(400, "malformed percent-encoding in the query"))?;
        match name {
            "db" if db.is_none() => {
                let n = crate::keyspace::parse_db(&value, databases).map_err(|e| {
                    Response::text(400, &format!("db: {}", e.trim_start_matches("ERR ")))
                })?;
                db = Some(n);
            }
            "ttl" if ttl.is_none() => {
                if method != KvMethod::Put {
                    return Err(Response::text(400, "ttl applies to PUT only"));
                }
                let n = std::str::from_utf8(&value)
                    .ok()
                    .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse::<u64>().ok())
                    .filter(|n| *n > 0)
                    .ok_or_else(|| {
                        Response::text(400, "ttl must be a positive integer (seconds)")
                    })?;
                ttl = Some(n);
            }
            "db" | "ttl" => {
                return Err(Response::text(400, &format!("{name} given twice")));
            }
            _ => {
                return Err(Response::text(
                    400,
                    &format!(
                        "unknown query parameter '{}' (known: ttl, db)",
                        name.escape_default()
                    ),
                ));
            }
        }
    }
    Ok(Route::Kv {
        method,
        key,
        db: db.unwrap_or(0),
        ttl,
    })
}

/// The Redis command a key-value request is: `GET key`, `SET key value [EX ttl]`,
/// `DEL key`.
pub fn kv_command(method: KvMethod, key: &[u8], value: Vec<u8>, ttl: Option<u64>) -> Vec<Vec<u8>> {
    match method {
        KvMethod::Get => vec![b"GET".to_vec(), key.to_vec()],
        KvMethod::Put => {
            let mut argv = vec![b"SET".to_vec(), key.to_vec(), value];
            if let Some(t) = ttl {
                argv.push(b"EX".to_vec());
                argv.push(t.to_string().into_bytes());
            }
            argv
        }
        KvMethod::Delete => vec![b"DEL".to_vec(), key.to_vec()],
    }
}

/// What a key-value request's reply means over HTTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Respond(Response),
    /// `-MOVED`: the leader's client address (`host:port`); see [`redirect`].
    Moved(String),
}

/// Maps the Redis reply of [`kv_command`] to HTTP. GET: 200 with the value, 404 when
/// missing. PUT: 204. DELETE: 204 when the key existed, 404 when not. Errors:
/// `-MOVED` → [`Outcome::Moved`]; `-CLUSTERDOWN` → 503 with `Retry-After: 1`;
/// `-TIMEOUT` (the write's outcome is unknown) → 503; `-IOERR` → 500; `-NOAUTH` → 401;
/// anything else (`-ERR …`) → 400. Error bodies are the reply's text.
pub fn map_reply(method: KvMethod, reply: Value) -> Outcome {
    let r = match (method, reply) {
        (_, Value::Error(e)) => {
            let kind = e.split(' ').next().unwrap_or_default();
            match kind {
                "MOVED" => {
                    let addr = e.split(' ').nth(2).unwrap_or_default();
                    return Outcome::Moved(addr.to_string());
                }
                "CLUSTERDOWN" => Response::text(503, &e).with("Retry-After", "1"),
                "TIMEOUT" => Response::text(503, &e),
                "IOERR" => Response::text(500, &e),
                "NOAUTH" => Response::text(401, &e).with("WWW-Authenticate", BEARER),
                _ => Response::text(400, &e),
            }
        }
        (KvMethod::Get, Value::Bulk(v)) => Response {
            status: 200,
            content_type: "application/octet-stream",
            headers: Vec::new(),
            body: v,
        },
        (KvMethod::Get, Value::Null) => Response::text(404, "no such key"),
        (KvMethod::Put, Value::Simple(s)) if s == "OK" => Response::empty(204),
        (KvMethod::Delete, Value::Integer(n)) if n > 0 => Response::empty(204),
        (KvMethod::Delete, Value::Integer(_)) => Response::text(404, "no such key"),
        (_, other) => Response::text(500, &format!("unexpected reply {other:?}")),
    };
    Outcome::Respond(r)
}

/// The answer of a follower to a key-value request: 307 to the leader's HTTP address
/// (the host of its client address `leader_addr`, its HTTP port `http_port`, the same
/// path and query), or 503 when the leader's HTTP port is unknown or it has none.
pub fn redirect(leader_addr: &str, http_port: Option<u16>, target: &str) -> Response {
    let host = leader_addr
        .rsplit_once(':')
        .map_or(leader_addr, |(host, _)| host);
    match http_port {
        Some(port) if port != 0 => {
            let location = format!("http://{host}:{port}{target}");
            Response::text(307, &format!("the leader serves this: {location}"))
                .with("Location", location)
        }
        _ => Response::text(
            503,
            &format!(
                "this node follows the leader at {leader_addr} (its Redis port), which has no \
                 HTTP listener (--http-port) or did not say which: retry, or use the Redis port"
            ),
        )
        .with("Retry-After", "1"),
    }
}

/// The `WWW-Authenticate` challenge.
pub const BEARER: &str = "Bearer realm=\"kvstore\"";

/// Whether `authorization` (the header's value) carries `Bearer <password>`.
pub fn bearer_matches(authorization: Option<&[u8]>, password: &str) -> bool {
    let Some(v) = authorization else {
        return false;
    };
    let Some(scheme) = v.get(..7) else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return false;
    }
    let token = v[7..].trim_ascii();
    crate::auth::password_matches(token, password.as_bytes())
}

/// The answer of `/health`, from the published role (`None`: a cluster of one). Healthy
/// (200 `ok`): a cluster of one; a leader whose lease holds (it serves reads and
/// writes); a follower that knows its leader and whose link from it is up (requests
/// sent here reach a serving leader by a redirect). Else 503 with the reason. A node
/// shutting down is never healthy.
pub fn health_of(
    info: Option<&crate::cluster::RoleInfo>,
    now: Instant,
    stopping: bool,
) -> Response {
    use crate::cluster::Role;
    if stopping {
        return Response::text(503, "shutting down").with("Retry-After", "1");
    }
    let Some(info) = info else {
        return Response::text(200, "ok");
    };
    let leader_known = info.leader.is_some_and(|l| l != info.node_id);
    let why = match info.role {
        Role::Leader if info.lease_until.is_some_and(|t| now < t) => {
            return Response::text(200, "ok");
        }
        Role::Follower if leader_known && info.leader_link_up => {
            return Response::text(200, "ok");
        }
        Role::Leader => "leader without a lease: it cannot reach a majority".to_string(),
        Role::Follower if leader_known => format!(
            "follower of node {}, but the link from it is down",
            info.leader.unwrap_or_default()
        ),
        Role::Follower => "no leader known".to_string(),
        Role::Candidate => "election under way".to_string(),
    };
    Response::text(503, &why).with("Retry-After", "1")
}

/// Appends `s` as a JSON string.
fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The `/status` document (JSON, written by hand: a dozen fields do not need serde).
/// `serving`: whether this node itself answers reads and writes now.
pub fn status_json(
    info: &crate::cluster::RoleInfo,
    serving: bool,
    version: &str,
    uptime_secs: u64,
) -> String {
    use crate::cluster::Role;
    let role = match info.role {
        Role::Leader => "leader",
        Role::Follower => "follower",
        Role::Candidate => "candidate",
    };
    let mut j = String::with_capacity(256);
    j.push_str(&format!("{{\"id\":{},\"role\":\"{role}\"", info.node_id));
    j.push_str(&format!(",\"epoch\":{}", info.epoch));
    j.push_str(",\"leader\":");
    match info.leader {
        Some(id) => {
            j.push_str(&format!("{{\"id\":{id},\"addr\":"));
            match &info.leader_addr {
                Some(a) => json_str(&mut j, a),
                None => j.push_str("null"),
            }
            j.push('}');
        }
        None => j.push_str("null"),
    }
    j.push_str(&format!(
        ",\"leader_link_up\":{},\"commit\":{},\"last_index\":{},\"serving\":{serving}",
        info.leader_link_up, info.commit, info.last_index
    ));
    j.push_str(",\"peers\":[");
    for (i, f) in info.followers.iter().enumerate() {
        if i > 0 {
            j.push(',');
        }
        j.push_str(&format!("{{\"id\":{},\"addr\":", f.id));
        json_str(&mut j, &f.addr);
        j.push_str(&format!(
            ",\"connected\":{},\"acked\":{},\"lag\":{}}}",
            f.connected, f.acked, f.lag
        ));
    }
    j.push_str("],\"version\":");
    json_str(&mut j, version);
    j.push_str(&format!(",\"uptime_seconds\":{uptime_secs}}}\n"));
    j
}

/// Writes `r` as an HTTP/1.1 response (no body for HEAD; none for 204 either).
pub fn encode_response(r: &Response, head_only: bool, keep_alive: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + r.body.len());
    out.extend_from_slice(format!("HTTP/1.1 {} {}\r\n", r.status, reason(r.status)).as_bytes());
    if r.status != 204 {
        out.extend_from_slice(format!("Content-Type: {}\r\n", r.content_type).as_bytes());
        out.extend_from_slice(format!("Content-Length: {}\r\n", r.body.len()).as_bytes());
    }
    for (n, v) in &r.headers {
        // Header values are ours (addresses, fixed words): no line breaks, but make sure.
        let v: String = v.chars().filter(|c| *c != '\r' && *c != '\n').collect();
        out.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
    }
    if !keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head_only && r.status != 204 {
        out.extend_from_slice(&r.body);
    }
    out
}

// ---------------------------------------------------------------------------------------
// The listener.

/// Binds the HTTP socket (before the server starts, so its port is known to
/// `Settings::http_port`, which `PEER HTTP` answers).
pub fn bind(host: &str, port: u16) -> Result<TcpListener, String> {
    TcpListener::bind((host, port))
        .map_err(|e| format!("cannot listen for HTTP on {host}:{port}: {e}"))
}

/// The leader's HTTP port as last learned.
#[derive(Debug, Clone)]
struct LeaderPort {
    leader: u64,
    addr: String,
    /// `None`: the lookup failed, or the leader has no HTTP port.
    port: Option<u16>,
    at: Instant,
}

#[derive(Debug)]
struct Shared {
    ctx: Arc<Context>,
    addr: SocketAddr,
    stopping: AtomicBool,
    /// Every open HTTP connection, to shut its read side on stop.
    conns: Mutex<HashMap<u64, TcpStream>>,
    active: AtomicUsize,
    next_id: AtomicU64,
    leader_port: Mutex<Option<LeaderPort>>,
}

/// A running HTTP listener.
#[derive(Debug)]
pub struct HttpServer {
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

static AUTH_LOG: RateLimit = RateLimit::new(Duration::from_secs(1));

impl HttpServer {
    /// Starts serving `listener` (from [`bind`]) for the server whose context is `ctx`.
    pub fn start(listener: TcpListener, ctx: Arc<Context>) -> Result<HttpServer, String> {
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let shared = Arc::new(Shared {
            ctx,
            addr,
            stopping: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            active: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            leader_port: Mutex::new(None),
        });
        let s = shared.clone();
        let accept = thread::Builder::new()
            .name("http-accept".into())
            .spawn(move || accept_loop(&s, listener))
            .map_err(|e| format!("cannot start the HTTP listener: {e}"))?;
        log::info!("HTTP listening on {addr}");
        Ok(HttpServer {
            shared,
            accept: Some(accept),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// Stops accepting, shuts every connection's read side (a request being served is
    /// still answered), and waits (at most a few seconds) for the connections to end.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        if self.shared.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut wake = self.shared.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip([127, 0, 0, 1].into());
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for c in self.shared.conns.lock().values() {
            let _ = c.shutdown(Shutdown::Read);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.shared.active.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: TcpListener) {
    for conn in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                static ACCEPT_LOG: RateLimit = RateLimit::new(Duration::from_secs(1));
                crate::server::accept_failed("an HTTP", &e, &ACCEPT_LOG);
                continue;
            }
        };
        let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
        if shared.active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
            let r = Response::text(503, "too many HTTP connections").with("Retry-After", "1");
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = (&stream).write_all(&encode_response(&r, false, false));
            continue;
        }
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        match stream.try_clone() {
            Ok(c) => {
                shared.conns.lock().insert(id, c);
            }
            Err(e) => {
                log::warn!("cannot serve an HTTP connection: {e}");
                continue;
            }
        }
        shared.active.fetch_add(1, Ordering::SeqCst);
        let s = shared.clone();
        let spawned = thread::Builder::new()
            .name(format!("http-{id}"))
            .stack_size(512 * 1024)
            .spawn(move || {
                let r =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| serve(&s, stream)));
                if r.is_err() {
                    log::error!("HTTP connection {id} panicked and was closed");
                }
                s.conns.lock().remove(&id);
                s.active.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            log::error!("cannot start a thread for an HTTP connection: {e}");
            shared.conns.lock().remove(&id);
            shared.active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Why reading a request head stopped.
enum HeadRead {
    /// A whole head: its length at the front of the buffer.
    Head(usize),
    /// The connection ended (or idled out) between requests: close quietly.
    Gone,
    /// Answer this and close.
    Fail(Response),
}

/// Reads until `buf` holds a whole request head, within [`HEAD_TIMEOUT`] and
/// [`MAX_HEAD`].
fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> HeadRead {
    let deadline = Instant::now() + HEAD_TIMEOUT;
    let mut chunk = [0u8; 4096];
    loop {
        match head_end(buf) {
            Some(end) if end <= MAX_HEAD => return HeadRead::Head(end),
            Some(_) => return HeadRead::Fail(head_too_large(buf)),
            None if buf.len() > MAX_HEAD => return HeadRead::Fail(head_too_large(buf)),
            None => {}
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return if buf.is_empty() {
                HeadRead::Gone
            } else {
                HeadRead::Fail(Response::text(408, "request head timed out"))
            };
        }
        match stream.read(&mut chunk) {
            Ok(0) => return HeadRead::Gone,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                // Loops to the deadline check above.
            }
            Err(_) => return HeadRead::Gone,
        }
    }
}

/// The answer to a head over [`MAX_HEAD`]: 414 when the request line (the URL) takes
/// most of it, else 431.
fn head_too_large(buf: &[u8]) -> Response {
    let line = buf.iter().position(|&b| b == b'\n').unwrap_or(buf.len());
    if line > MAX_HEAD / 2 {
        Response::text(414, "request line (URL) too long")
    } else {
        Response::text(431, "request header fields too large")
    }
}

/// Serves one HTTP connection's requests, one at a time, until it closes.
fn serve(shared: &Shared, mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let end = match read_head(&mut stream, &mut buf) {
            HeadRead::Head(end) => end,
            HeadRead::Gone => return,
            HeadRead::Fail(r) => {
                if stream.write_all(&encode_response(&r, false, false)).is_ok() {
                    linger_close(&mut stream);
                }
                return;
            }
        };
        let head = match parse_head(&buf[..end]) {
            Ok(h) => h,
            Err(r) => {
                if stream.write_all(&encode_response(&r, false, false)).is_ok() {
                    linger_close(&mut stream);
                }
                return;
            }
        };
        buf.drain(..end);
        let head_only = head.method == "HEAD";
        let (r, keep) = handle(shared, &head, &mut stream, &mut buf);
        let keep = keep
            && head.keep_alive()
            && !shared.stopping.load(Ordering::SeqCst)
            && shared.active.load(Ordering::SeqCst) <= KEEP_ALIVE_MAX;
        if stream
            .write_all(&encode_response(&r, head_only, keep))
            .is_err()
        {
            return;
        }
        if !keep {
            linger_close(&mut stream);
            return;
        }
    }
}

/// Closes a connection after its last response, reading (and dropping) what the client
/// may still be sending for a moment first: closing a socket with unread input sends a
/// reset, which can make the client lose the response it has not read yet (a 413 for a
/// body it is still uploading). At most [`LINGER_BYTES`] and [`LINGER_TIME`], as
/// nginx's `lingering_close`.
fn linger_close(stream: &mut TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let deadline = Instant::now() + LINGER_TIME;
    let mut chunk = [0u8; 16 * 1024];
    let mut drained = 0;
    while drained < LINGER_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => drained += n,
        }
    }
}

/// Answers one request whose head is `head`; its body (if any) is read from `buf` (bytes
/// already received) and then `stream`. Returns the response and whether the
/// connection may serve another request (false when the body was left unread).
fn handle(
    shared: &Shared,
    head: &Head,
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> (Response, bool) {
    let ctx = &shared.ctx;
    let len = match head.content_length() {
        Ok(n) => n.unwrap_or(0),
        Err(r) => return (r, false),
    };
    // An answer given without using the body: read and drop a small one so the
    // connection can go on; close after a large one (never read much of what we refuse).
    let refuse = |r: Response, stream: &mut TcpStream, buf: &mut Vec<u8>| -> (Response, bool) {
        if len == 0 {
            return (r, true);
        }
        if len <= DRAIN_MAX as u64 && !expects_continue(head) {
            let ok = read_body(stream, buf, len as usize).is_ok();
            return (r, ok);
        }
        (r, false)
    };
    if ctx.is_shutting_down() {
        return refuse(Response::text(503, "shutting down"), stream, buf);
    }
    let route = match route(&head.method, &head.target, ctx.store.databases()) {
        Ok(r) => r,
        Err(r) => return refuse(r, stream, buf),
    };
    if let Some(pw) = &ctx.settings.requirepass
        && route.needs_auth()
        && !bearer_matches(head.header("authorization"), pw)
    {
        ctx.stats
            .acl_access_denied_auth
            .fetch_add(1, Ordering::Relaxed);
        if let Some(n) = AUTH_LOG.check(Instant::now()) {
            let who = stream
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            log::warn!(
                "HTTP authentication failed from {who}{}",
                suppressed_note(n)
            );
        }
        let r = Response::text(
            401,
            "authentication required: Authorization: Bearer <password>",
        )
        .with("WWW-Authenticate", BEARER);
        return refuse(r, stream, buf);
    }
    let (method, key, db, ttl) = match route {
        Route::Metrics => {
            let mut r = Response::text(200, "");
            r.content_type = "text/plain; version=0.0.4; charset=utf-8";
            r.body = crate::metrics::render(ctx).into_bytes();
            return refuse(r, stream, buf);
        }
        Route::Status => {
            let mut r = Response::text(200, "");
            r.content_type = "application/json";
            r.body = status(ctx).into_bytes();
            return refuse(r, stream, buf);
        }
        Route::Health => {
            let info = ctx.cluster().map(|c| c.info());
            let r = health_of(info.as_ref(), Instant::now(), ctx.is_shutting_down());
            return refuse(r, stream, buf);
        }
        Route::Kv {
            method,
            key,
            db,
            ttl,
        } => (method, key, db, ttl),
    };
    let value = if method == KvMethod::Put {
        let max = ctx.settings.proto_max_bulk_len as u64;
        if len > max {
            let msg = format!("the value is larger than --proto-max-bulk-len ({max} bytes)");
            return refuse(Response::text(413, &msg), stream, buf);
        }
        if head.content_length().ok().flatten().is_none() {
            return refuse(
                Response::text(411, "PUT needs a Content-Length (the value is the body)"),
                stream,
                buf,
            );
        }
        if expects_continue(head) && stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err() {
            return (Response::text(400, "gone"), false);
        }
        // len <= proto_max_bulk_len, a usize: the cast is exact.
        match read_body(stream, buf, len as usize) {
            Ok(v) => v,
            Err(_) => return (Response::text(400, "the body ended early"), false),
        }
    } else {
        // GET and DELETE take no body; drop a small one.
        if len > 0 && (len > DRAIN_MAX as u64 || read_body(stream, buf, len as usize).is_err()) {
            let r = execute_kv(shared, method, &key, db, ttl, Vec::new(), &head.target);
            return (r, false);
        }
        Vec::new()
    };
    let r = execute_kv(shared, method, &key, db, ttl, value, &head.target);
    (r, true)
}

fn expects_continue(head: &Head) -> bool {
    head.header("expect")
        .is_some_and(|v| v.eq_ignore_ascii_case(b"100-continue"))
}

/// Reads a body of exactly `len` bytes: first what `buf` already holds (removed from
/// it), then from `stream` through `take`, so never more than `len` (checked against
/// the limit by the caller), and growing with the bytes that actually arrive.
fn read_body(stream: &mut TcpStream, buf: &mut Vec<u8>, len: usize) -> io::Result<Vec<u8>> {
    let have = buf.len().min(len);
    let mut body: Vec<u8> = buf.drain(..have).collect();
    if body.len() < len {
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        body.reserve((len - body.len()).min(1 << 20));
        let want = (len - body.len()) as u64;
        Read::take(&mut *stream, want).read_to_end(&mut body)?;
    }
    if body.len() < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the body ended early",
        ));
    }
    Ok(body)
}

/// Runs a key-value request as its Redis command, through the same gates and write path
/// as a Redis connection, and maps the reply to HTTP.
fn execute_kv(
    shared: &Shared,
    method: KvMethod,
    key: &[u8],
    db: u32,
    ttl: Option<u64>,
    value: Vec<u8>,
    target: &str,
) -> Response {
    let ctx = &shared.ctx;
    let argv = kv_command(method, key, value, ttl);
    // A session of its own, not registered (CLIENT LIST shows Redis connections only),
    // authenticated (the bearer token was checked), RESP2, not READONLY: reads go
    // through the leader's lease, as a Redis client's do by default.
    let mut session = Session {
        id: 0,
        proto: Proto::Resp2,
        authenticated: true,
        readonly: false,
        close: false,
        db,
        multi: None,
        last_write_index: 0,
    };
    let spec = commands::lookup(&argv[0]);
    let (argc, started) = (argv.len(), Instant::now());
    let mut out = Vec::new();
    match commands::dispatch_spec(ctx, &mut session, spec, argv, &mut out) {
        Dispatched::Done => {}
        Dispatched::Write(op, how) => match ctx.store.write(db, vec![op]) {
            Ok(results) => match results.first() {
                Some(r) => commands::render_result(r, how, Proto::Resp2, &mut out),
                None => return Response::text(500, "the write returned no result"),
            },
            Err(e) => {
                crate::protocol::write_error(&mut out, &commands::store_error_reply(&e));
            }
        },
    }
    // Counted with the Redis port's commands (INFO commandstats, /metrics): it is one.
    if let Some(spec) = spec {
        ctx.metrics.record(spec, argc, started.elapsed(), || {
            ("http".to_string(), String::new())
        });
    }
    let reply = match parse_value(&out) {
        Ok(Some((v, _))) => v,
        _ => return Response::text(500, "could not read the command's reply"),
    };
    match map_reply(method, reply) {
        Outcome::Respond(r) => r,
        Outcome::Moved(addr) => {
            let leader = ctx
                .cluster()
                .and_then(|c| c.info().leader)
                .unwrap_or_default();
            let port = leader_http_port(shared, leader, &addr);
            redirect(&addr, port, target)
        }
    }
}

/// The HTTP port of the leader `leader` at client address `addr`, from the cache or by
/// asking it (`PEER HTTP`). `None` if it has none or cannot be asked.
fn leader_http_port(shared: &Shared, leader: u64, addr: &str) -> Option<u16> {
    let now = Instant::now();
    if let Some(c) = shared.leader_port.lock().as_ref()
        && c.leader == leader
        && c.addr == addr
    {
        let ttl = if c.port.is_some() {
            LEADER_PORT_TTL
        } else {
            LEADER_PORT_RETRY
        };
        if now.duration_since(c.at) < ttl {
            return c.port;
        }
    }
    let port = match ask_http_port(addr) {
        Ok(0) => None,
        Ok(p) => Some(p),
        Err(e) => {
            log::info!("cannot learn the HTTP port of the leader at {addr}: {e}");
            None
        }
    };
    *shared.leader_port.lock() = Some(LeaderPort {
        leader,
        addr: addr.to_string(),
        port,
        at: Instant::now(),
    });
    port
}

/// `PEER HTTP` on `addr`'s client port: the HTTP port it says it has (0: none).
fn ask_http_port(addr: &str) -> io::Result<u16> {
    let sa = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::other("the address resolves to nothing"))?;
    let mut s = TcpStream::connect_timeout(&sa, LOOKUP_TIMEOUT)?;
    s.set_read_timeout(Some(LOOKUP_TIMEOUT))?;
    s.set_write_timeout(Some(LOOKUP_TIMEOUT))?;
    s.write_all(b"*2\r\n$4\r\nPEER\r\n$4\r\nHTTP\r\n")?;
    // One short line: `:<port>\r\n` (or an error from a node that predates PEER HTTP).
    // The connection stays open after it: read the line, not to the end.
    let mut line = String::new();
    io::BufRead::read_line(&mut io::BufReader::new(s.take(64)), &mut line)?;
    line.trim_end()
        .strip_prefix(':')
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| io::Error::other(format!("unexpected answer {line:?}")))
}

/// This node's `/status` document.
fn status(ctx: &Context) -> String {
    let uptime = ctx.started.elapsed().as_secs();
    let version = env!("CARGO_PKG_VERSION");
    match ctx.cluster() {
        Some(c) => {
            let info = c.info();
            let serving = c.read_gate().is_ok();
            status_json(&info, serving, version, uptime)
        }
        None => {
            // A cluster of one: always the leader of itself, every logged write committed.
            let last = ctx.store.log_info().last_index;
            let me = ctx.settings.node_id;
            let mut info = crate::cluster::RoleInfo::starting(me, 0);
            info.role = crate::cluster::Role::Leader;
            info.leader = Some(me);
            info.leader_addr = Some(format!("{}:{}", ctx.settings.bind, ctx.settings.port));
            info.leader_link_up = true;
            info.commit = last;
            info.last_index = last;
            status_json(&info, !ctx.is_shutting_down(), version, uptime)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{FollowerInfo, Role, RoleInfo};

    fn head(text: &str) -> Head {
        let bytes = text.as_bytes();
        let end = head_end(bytes).expect("whole head");
        parse_head(&bytes[..end]).expect("parses")
    }

    #[test]
    fn heads_end_at_the_blank_line_with_crlf_or_lf() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\nA: b\n\nrest"), Some(21));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
        assert_eq!(head_end(b""), None);
        let h = head("PUT /v1/kv/k?ttl=5 HTTP/1.1\r\nHost: x\r\nContent-Length:  12 \r\n\r\n");
        assert_eq!(h.method, "PUT");
        assert_eq!(h.target, "/v1/kv/k?ttl=5");
        assert!(h.http11 && h.keep_alive());
        assert_eq!(h.content_length(), Ok(Some(12)));
        assert_eq!(h.header("host"), Some(&b"x"[..]));
        let h = head("GET / HTTP/1.0\r\n\r\n");
        assert!(!h.keep_alive());
        assert_eq!(h.content_length(), Ok(None));
        let h = head("GET / HTTP/1.1\r\nConnection: Close\r\n\r\n");
        assert!(!h.keep_alive());
    }

    #[test]
    fn bad_heads_get_clear_statuses() {
        let status = |t: &str| parse_head(t.as_bytes()).unwrap_err().status;
        assert_eq!(status("GET /\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1 x\r\n\r\n"), 400);
        assert_eq!(status("get / HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status("GET http://x/ HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/2.0\r\n\r\n"), 505);
        assert_eq!(status("GET / FOO\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\r\nno colon\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\r\nbad name: x\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\r\n\u{e9}: x\r\n\r\n"), 400);
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "A: b\r\n".repeat(MAX_HEADERS + 1)
        );
        assert_eq!(status(&many), 431);
        let cl = |v: &str| {
            head(&format!("PUT / HTTP/1.1\r\n{v}\r\n\r\n"))
                .content_length()
                .map_err(|r| r.status)
        };
        assert_eq!(cl("Content-Length: x"), Err(400));
        assert_eq!(cl("Content-Length: -1"), Err(400));
        assert_eq!(cl("Content-Length: +1"), Err(400));
        assert_eq!(cl("Content-Length: 99999999999999999999999"), Err(400));
        assert_eq!(cl("Content-Length: 1\r\nContent-Length: 2"), Err(400));
        assert_eq!(cl("Content-Length: 2\r\nContent-Length: 2"), Ok(Some(2)));
        assert_eq!(cl("Transfer-Encoding: chunked"), Err(411));
    }

    #[test]
    fn percent_decoding_is_binary_safe_and_strict() {
        assert_eq!(
            percent_decode(b"a%00b%2Fc%ff+"),
            Some(b"a\0b/c\xff+".to_vec())
        );
        assert_eq!(percent_decode(b"%E2%82%AC"), Some("€".as_bytes().to_vec()));
        assert_eq!(percent_decode(b""), Some(Vec::new()));
        for bad in [&b"%"[..], b"%4", b"%zz", b"a%g0"] {
            assert_eq!(percent_decode(bad), None, "{bad:?}");
        }
        // Every byte value survives a round trip through %XX.
        let all: Vec<u8> = (0..=255).collect();
        let enc: String = all.iter().map(|b| format!("%{b:02X}")).collect();
        assert_eq!(percent_decode(enc.as_bytes()), Some(all));
    }

    #[test]
    fn routes_methods_and_parameters() {
        assert_eq!(route("GET", "/metrics", 16), Ok(Route::Metrics));
        assert_eq!(route("HEAD", "/status", 16), Ok(Route::Status));
        assert_eq!(route("GET", "/health", 16), Ok(Route::Health));
        let r = route("POST", "/health", 16).unwrap_err();
        assert_eq!((r.status, r.header("Allow")), (405, Some("GET, HEAD")));
        assert_eq!(route("GET", "/health?x=1", 16).unwrap_err().status, 400);
        assert_eq!(route("GET", "/nope", 16).unwrap_err().status, 404);
        assert_eq!(route("GET", "/v1/kv", 16).unwrap_err().status, 404);
        assert_eq!(
            route("GET", "/v1/kv/a%2Fb/c%00", 16),
            Ok(Route::Kv {
                method: KvMethod::Get,
                key: b"a/b/c\0".to_vec(),
                db: 0,
                ttl: None
            })
        );
        assert_eq!(
            route("PUT", "/v1/kv/k?ttl=30&db=3", 16),
            Ok(Route::Kv {
                method: KvMethod::Put,
                key: b"k".to_vec(),
                db: 3,
                ttl: Some(30)
            })
        );
        assert_eq!(
            route("DELETE", "/v1/kv/k?db=1", 16).map(|r| r.needs_auth()),
            Ok(true)
        );
        assert!(!Route::Health.needs_auth());
        let r = route("POST", "/v1/kv/k", 16).unwrap_err();
        assert_eq!(
            (r.status, r.header("Allow")),
            (405, Some("GET, HEAD, PUT, DELETE"))
        );
        let status = |m: &str, t: &str| route(m, t, 16).unwrap_err().status;
        assert_eq!(status("GET", "/v1/kv/"), 400);
        assert_eq!(status("GET", "/v1/kv/%zz"), 400);
        for bad in ["0", "-1", "1.5", "x", "", "+3", "99999999999999999999999"] {
            assert_eq!(status("PUT", &format!("/v1/kv/k?ttl={bad}")), 400, "{bad}");
        }
        assert_eq!(status("GET", "/v1/kv/k?ttl=5"), 400);
        assert_eq!(status("PUT", "/v1/kv/k?ttl=5&ttl=6"), 400);
        for bad in ["16", "-1", "x", ""] {
            assert_eq!(status("GET", &format!("/v1/kv/k?db={bad}")), 400, "{bad}");
        }
        assert_eq!(status("GET", "/v1/kv/k?foo=1"), 400);
    }

    #[test]
    fn commands_are_the_redis_ones() {
        assert_eq!(
            kv_command(KvMethod::Put, b"k", b"v".to_vec(), Some(5)),
            vec![
                b"SET".to_vec(),
                b"k".to_vec(),
                b"v".to_vec(),
                b"EX".to_vec(),
                b"5".to_vec()
            ]
        );
        assert_eq!(
            kv_command(KvMethod::Put, b"k", b"v".to_vec(), None).len(),
            3
        );
        assert_eq!(kv_command(KvMethod::Get, b"k", Vec::new(), None)[0], b"GET");
        assert_eq!(
            kv_command(KvMethod::Delete, b"k", Vec::new(), None)[0],
            b"DEL"
        );
    }

    fn status_of(m: KvMethod, v: Value) -> (u16, Option<String>, Option<String>) {
        match map_reply(m, v) {
            Outcome::Respond(r) => (
                r.status,
                r.header("Retry-After").map(str::to_string),
                r.header("WWW-Authenticate").map(str::to_string),
            ),
            Outcome::Moved(a) => panic!("moved to {a}"),
        }
    }

    #[test]
    fn replies_map_to_statuses() {
        use KvMethod::*;
        let Outcome::Respond(r) = map_reply(Get, Value::Bulk(vec![0, 255])) else {
            panic!()
        };
        assert_eq!(
            (r.status, r.body, r.content_type),
            (200, vec![0, 255], "application/octet-stream")
        );
        assert_eq!(status_of(Get, Value::Null).0, 404);
        assert_eq!(status_of(Put, Value::Simple("OK".into())).0, 204);
        assert_eq!(status_of(Delete, Value::Integer(1)).0, 204);
        assert_eq!(status_of(Delete, Value::Integer(0)).0, 404);
        assert_eq!(
            map_reply(Put, Value::Error("MOVED 0 10.0.0.2:7001".into())),
            Outcome::Moved("10.0.0.2:7001".into())
        );
        let down = status_of(Get, Value::Error("CLUSTERDOWN no leader elected".into()));
        assert_eq!((down.0, down.1.as_deref()), (503, Some("1")));
        assert_eq!(
            status_of(Put, Value::Error("TIMEOUT outcome unknown".into())).0,
            503
        );
        assert_eq!(status_of(Put, Value::Error("IOERR disk".into())).0, 500);
        let na = status_of(Get, Value::Error("NOAUTH Authentication required.".into()));
        assert_eq!((na.0, na.2.as_deref()), (401, Some(BEARER)));
        assert_eq!(
            status_of(Put, Value::Error("ERR invalid expire time".into())).0,
            400
        );
        assert_eq!(status_of(Put, Value::Integer(3)).0, 500);
    }

    #[test]
    fn redirects_use_the_leaders_host_and_http_port() {
        let r = redirect("10.0.0.2:7001", Some(8001), "/v1/kv/a%00?ttl=5");
        assert_eq!(r.status, 307);
        assert_eq!(
            r.header("Location"),
            Some("http://10.0.0.2:8001/v1/kv/a%00?ttl=5")
        );
        let r = redirect("[::1]:7001", Some(8001), "/v1/kv/k");
        assert_eq!(r.header("Location"), Some("http://[::1]:8001/v1/kv/k"));
        for port in [None, Some(0)] {
            let r = redirect("10.0.0.2:7001", port, "/v1/kv/k");
            assert_eq!((r.status, r.header("Retry-After")), (503, Some("1")));
            assert!(String::from_utf8_lossy(&r.body).contains("10.0.0.2:7001"));
        }
    }

    #[test]
    fn bearer_tokens() {
        assert!(bearer_matches(Some(b"Bearer s3cret"), "s3cret"));
        assert!(bearer_matches(Some(b"bearer   s3cret "), "s3cret"));
        assert!(!bearer_matches(Some(b"Bearer s3cre"), "s3cret"));
        assert!(!bearer_matches(Some(b"Basic s3cret"), "s3cret"));
        assert!(!bearer_matches(Some(b"Bearer"), "s3cret"));
        assert!(!bearer_matches(None, "s3cret"));
    }

    #[test]
    fn health_follows_role_lease_and_link() {
        let now = Instant::now();
        assert_eq!(health_of(None, now, false).status, 200);
        assert_eq!(health_of(None, now, true).status, 503);
        let mut info = RoleInfo::starting(2, 1);
        let r = health_of(Some(&info), now, false);
        assert_eq!((r.status, r.header("Retry-After")), (503, Some("1")));
        info.leader = Some(3);
        assert_eq!(health_of(Some(&info), now, false).status, 503);
        info.leader_link_up = true;
        assert_eq!(health_of(Some(&info), now, false).status, 200);
        info.role = Role::Candidate;
        assert_eq!(health_of(Some(&info), now, false).status, 503);
        info.role = Role::Leader;
        info.leader = Some(2);
        assert_eq!(health_of(Some(&info), now, false).status, 503);
        info.lease_until = Some(now + Duration::from_secs(5));
        assert_eq!(health_of(Some(&info), now, false).status, 200);
        assert_eq!(
            health_of(Some(&info), now + Duration::from_secs(6), false).status,
            503
        );
    }

    #[test]
    fn status_is_json_with_every_field() {
        let mut info = RoleInfo::starting(1, 4);
        info.role = Role::Leader;
        info.leader = Some(1);
        info.leader_addr = Some("h\"x:1".into());
        info.followers.push(FollowerInfo {
            id: 2,
            addr: "127.0.0.1:7002".into(),
            connected: true,
            acked: 9,
            lag: 1,
        });
        let j = status_json(&info, true, "0.1.0", 7);
        assert_eq!(
            j,
            "{\"id\":1,\"role\":\"leader\",\"epoch\":4,\"leader\":{\"id\":1,\"addr\":\"h\\\"x:1\"},\
             \"leader_link_up\":false,\"commit\":0,\"last_index\":0,\"serving\":true,\"peers\":\
             [{\"id\":2,\"addr\":\"127.0.0.1:7002\",\"connected\":true,\"acked\":9,\"lag\":1}],\
             \"version\":\"0.1.0\",\"uptime_seconds\":7}\n"
        );
        let j = status_json(&RoleInfo::starting(3, 0), false, "v", 0);
        assert!(j.contains("\"role\":\"follower\"") && j.contains("\"leader\":null"));
    }

    #[test]
    fn responses_encode() {
        let r = Response::text(404, "no such key");
        let out = String::from_utf8(encode_response(&r, false, true)).unwrap();
        assert_eq!(
            out,
            "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: 12\r\n\r\nno such key\n"
        );
        let out = String::from_utf8(encode_response(&r, true, false)).unwrap();
        assert!(out.ends_with("Content-Length: 12\r\nConnection: close\r\n\r\n"));
        let out = encode_response(&Response::empty(204).with("X", "a\r\nb"), false, true);
        assert_eq!(out, b"HTTP/1.1 204 No Content\r\nX: ab\r\n\r\n");
    }
}
