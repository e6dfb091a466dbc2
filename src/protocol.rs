//! The Redis wire protocol as a pure codec: bytes in, frames out.
//!
//! This module owns every byte that crosses a client connection, and nothing
//! else: no sockets, no threads, no clocks. A connection thread reads into its
//! own buffer and hands the bytes to [`RequestParser::parse`], which returns
//! one request (its arguments, and how many bytes it used) or asks for more.
//! Commands write their replies with the `write_*` encoders, which append to
//! the connection's output `Vec<u8>`. Clients and tests go the other way with
//! [`encode_command`] and [`parse_value`]. [`peek_keys`] only looks: the keys
//! of the GETs waiting in a connection's buffer, a hint for the key table
//! before they are parsed for real. Because it is all plain functions
//! on byte slices, every path (a request split at any byte, every malformed
//! input, every limit) is tested deterministically below, without a socket.
//!
//! # Requests
//!
//! Two framings, chosen by the first byte exactly as Redis does:
//!
//! - `*` starts a RESP2 multibulk: `*<n>\r\n` then `n` bulk strings
//!   `$<len>\r\n<len bytes>\r\n`. This is what every client library and
//!   `redis-benchmark` send, so it is the hot path: the parser jumps over
//!   payloads by their length and only scans the short header lines.
//! - anything else is an inline command, one line as typed into `nc` or
//!   `telnet`, split into words like Redis's `sdssplitargs` (double quotes
//!   with `\n \r \t \b \a \\ \" \xHH` escapes, single quotes with `\'`).
//!
//! Blank inline lines and empty arrays (`*0`, `*-1`) are consumed and
//! skipped, as Redis ignores them.
//!
//! The parser is incremental: it remembers how far into the current request
//! it has got (arguments already copied out, the offset of the next header,
//! how far a line was searched for its end), so a request arriving in many
//! small reads costs O(size) in total, not O(size²). A 1M-element `MSET`
//! trickling in is never re-parsed from its start.
//!
//! # Limits on bad input
//!
//! A client must not be able to make the server allocate or scan without
//! bound (DESIGN.md, "Limits on bad input"). [`Limits`] caps the three things
//! a request can make large, with Redis's defaults and wording:
//!
//! - a line (an inline command, a `*` count or a `$` length) longer than
//!   `max_inline_len` (64 KiB) is refused as soon as that many bytes have
//!   arrived without its end, so a client cannot grow the buffer with one
//!   endless line. Unlike Redis, a line over the limit is refused even when
//!   it arrived whole, so the outcome never depends on how reads were split;
//! - a bulk string longer than `max_bulk_len` (512 MiB) is refused from its
//!   header, before any of it is buffered;
//! - an array of more than `max_array_len` (1M) elements is refused from its
//!   header.
//!
//! Blank lines and empty arrays ahead of a request count as one line: more
//! than `max_inline_len` bytes of them are refused too, since the caller
//! keeps them buffered until the next request completes.
//!
//! Before the client has authenticated (on a server with a password,
//! [`RequestParser::set_authenticated`]) only small requests are read, as in
//! Redis 7: at most [`UNAUTH_MAX_ARRAY_LEN`] arguments of at most
//! [`UNAUTH_MAX_BULK_LEN`] bytes each, so a stranger cannot make the server
//! hold a large request for a password it does not know.
//!
//! What a whole connection may hold is the caller's to cap: the bytes it has
//! buffered plus those the parser already copied out of the current request
//! ([`RequestParser::buffered`]), against [`Limits::max_query_buffer`]. The
//! caller may drop the bytes already copied out ([`RequestParser::release`]),
//! so a large request is held once, not twice.
//!
//! Any [`ProtocolError`] is final: the connection replies with
//! `-<error>` ([`write_error`] with the error's `Display`) and closes, like
//! Redis, since the byte stream can no longer be trusted to be in sync.
//!
//! # Replies
//!
//! The encoders write RESP2 or RESP3 ([`Proto`], chosen by `HELLO`) with no
//! intermediate allocation: integers are formatted by hand into a stack
//! buffer. RESP3-only types degrade in RESP2 the way Redis degrades them
//! (a map becomes a flat array, a boolean the integer 1 or 0, a double a bulk
//! string). [`parse_value`] reads any RESP2 or RESP3 reply, with a nesting
//! limit so a hostile server cannot overflow the client's stack.

use std::fmt;

/// Limits on what one request may contain (see DESIGN.md "Limits on bad input").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest inline command line, in bytes (Redis: 64 KiB). Also bounds the
    /// `*<count>` and `$<len>` header lines, as Redis's `PROTO_INLINE_MAX_SIZE` does.
    pub max_inline_len: usize,
    /// Longest bulk string, in bytes (`--proto-max-bulk-len`, Redis: 512 MiB).
    pub max_bulk_len: usize,
    /// Most elements in one multibulk request (Redis: 1M... we use 1024*1024).
    pub max_array_len: usize,
    /// Most bytes of one client's unprocessed input: what it has buffered plus the
    /// arguments of the request being read (`--client-query-buffer-limit`, Redis's
    /// `client-query-buffer-limit`). Past it the connection is closed. Enforced by the
    /// connection, not the parser: it is about a client, not about one request.
    pub max_query_buffer: usize,
}

/// Default of [`Limits::max_query_buffer`]: 1 GiB, as Redis. No request can be larger,
/// which is also what bounds a log record (one request is one record).
pub const DEFAULT_QUERY_BUFFER_LIMIT: usize = 1 << 30;
/// Most arguments one request may have (Redis's 1M).
pub const MAX_ARRAY_LEN: usize = 1024 * 1024;
/// Before AUTH: most arguments in one multibulk request (Redis 7).
pub const UNAUTH_MAX_ARRAY_LEN: usize = 10;
/// Before AUTH: longest bulk string (Redis 7: 16 KiB).
pub const UNAUTH_MAX_BULK_LEN: usize = 16 * 1024;
/// Before AUTH: most unprocessed input a client may have (Redis 7: 1 MiB).
pub const UNAUTH_MAX_QUERY_BUFFER: usize = 1 << 20;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_inline_len: 64 * 1024,
            max_bulk_len: 512 * 1024 * 1024,
            max_array_len: MAX_ARRAY_LEN,
            max_query_buffer: DEFAULT_QUERY_BUFFER_LIMIT,
        }
    }
}

/// The deepest nesting of aggregates [`parse_value`] accepts. Redis itself
/// never nests replies more than a few levels; the limit only stops hostile
/// input from overflowing the stack of the recursive parser.
pub const MAX_REPLY_DEPTH: usize = 128;

/// A request (or reply) that cannot be parsed. `Display` gives the Redis
/// wording of the error reply without the leading `-`
/// (e.g. `ERR Protocol error: invalid bulk length`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// `*<count>` that is not an integer, exceeds `max_array_len`, or whose
    /// line does not end in CRLF.
    InvalidMultibulkLength,
    /// `$<len>` that is not an integer, is negative, exceeds `max_bulk_len`,
    /// or whose line does not end in CRLF.
    InvalidBulkLength,
    /// An element of a multibulk request that is not a bulk string; holds
    /// the byte found instead of `$`.
    ExpectedDollar(u8),
    /// An inline command with an unterminated quote, or a closing quote not
    /// followed by a space.
    UnbalancedQuotes,
    /// An inline line (or a run of blank lines) longer than `max_inline_len`.
    TooBigInlineRequest,
    /// A `*<count>` line longer than `max_inline_len`.
    TooBigMultibulkCount,
    /// A `$<len>` line longer than `max_inline_len`.
    TooBigBulkCount,
    /// Bulk payload not followed by CRLF.
    MissingCrlf,
    /// Before AUTH, a `*<count>` above [`UNAUTH_MAX_ARRAY_LEN`].
    UnauthenticatedMultibulkLength,
    /// Before AUTH, a `$<len>` above [`UNAUTH_MAX_BULK_LEN`].
    UnauthenticatedBulkLength,
    /// A reply starts with a byte that is no RESP2/RESP3 type.
    InvalidReplyType(u8),
    /// A reply is malformed; names the part that is wrong (e.g. `integer`).
    InvalidReply(&'static str),
    /// A reply nests aggregates deeper than [`MAX_REPLY_DEPTH`].
    ReplyTooDeep,
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ERR Protocol error: ")?;
        match self {
            ProtocolError::InvalidMultibulkLength => f.write_str("invalid multibulk length"),
            ProtocolError::InvalidBulkLength => f.write_str("invalid bulk length"),
            // Redis prints the byte with `%c`; a CR or LF there is turned into a
            // space by `write_error`, as Redis's addReplyErrorFormat does.
            ProtocolError::ExpectedDollar(b) => write!(f, "expected '$', got '{}'", char::from(*b)),
            ProtocolError::UnbalancedQuotes => f.write_str("unbalanced quotes in request"),
            ProtocolError::TooBigInlineRequest => f.write_str("too big inline request"),
            ProtocolError::TooBigMultibulkCount => f.write_str("too big mbulk count string"),
            ProtocolError::TooBigBulkCount => f.write_str("too big bulk count string"),
            ProtocolError::MissingCrlf => f.write_str("expected CRLF after bulk string"),
            ProtocolError::UnauthenticatedMultibulkLength => {
                f.write_str("unauthenticated multibulk length")
            }
            ProtocolError::UnauthenticatedBulkLength => f.write_str("unauthenticated bulk length"),
            ProtocolError::InvalidReplyType(b) => {
                write!(f, "invalid reply type byte {:?}", char::from(*b))
            }
            ProtocolError::InvalidReply(what) => write!(f, "invalid {what} in reply"),
            ProtocolError::ReplyTooDeep => {
                write!(f, "reply nested deeper than {MAX_REPLY_DEPTH} levels")
            }
        }
    }
}

impl std::error::Error for ProtocolError {}

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

/// One parsed request: its arguments, and how many bytes of the buffer it used.
type Request = (Vec<Vec<u8>>, usize);

/// At most this many argument slots are reserved up front for a multibulk
/// request, whatever its header claims: a client announcing 1M elements
/// and sending none must not cost 24 MiB (Redis caps its argv the same way).
const ARGS_PREALLOC: usize = 1024;

/// How many keys [`peek_keys`] returns at most: a pipeline's worth.
pub const PEEK_KEYS: usize = 32;

/// The keys of the GET requests at the front of `buf` (RESP arrays, as clients send
/// them), at most [`PEEK_KEYS`], stopping at the first other or incomplete request.
/// Only a hint for the key table ([`crate::db::Keyspace::touch`]: load their places
/// before the requests run, so that a pipeline's cache misses overlap); the requests are
/// parsed for real by [`RequestParser`], so a request this misreads costs nothing but
/// the hint. Lengths are only compared with what `buf` holds: nothing is allocated.
pub fn peek_keys(mut buf: &[u8]) -> Vec<&[u8]> {
    /// `<tag><digits>\r\n`: the number and what follows.
    fn header(buf: &[u8], tag: u8) -> Option<(usize, &[u8])> {
        let rest = buf.strip_prefix(&[tag])?;
        let end = rest.iter().take(12).position(|&b| b == b'\r')?;
        let n = std::str::from_utf8(&rest[..end]).ok()?.parse().ok()?;
        Some((n, rest[end..].strip_prefix(b"\r\n")?))
    }
    /// `$<len>\r\n<bytes>\r\n`: the bytes and what follows.
    fn bulk(buf: &[u8]) -> Option<(&[u8], &[u8])> {
        let (len, rest) = header(buf, b'$')?;
        let after = rest.get(len..)?.strip_prefix(b"\r\n")?;
        Some((&rest[..len], after))
    }
    let mut keys = Vec::new();
    while keys.len() < PEEK_KEYS {
        let Some((n, rest)) = header(buf, b'*') else {
            break;
        };
        let Some((name, rest)) = bulk(rest) else {
            break;
        };
        if n != 2 || !name.eq_ignore_ascii_case(b"GET") {
            break;
        }
        let Some((key, rest)) = bulk(rest) else {
            break;
        };
        keys.push(key);
        buf = rest;
    }
    keys
}

/// Incremental request parser: RESP2 multibulk (`*N\r\n$len\r\n…`) and inline
/// commands (`SET k "v"\r\n`, as nc/telnet send them).
///
/// One parser per connection. Between calls it keeps the progress made on
/// the current request, which is why the caller must pass the same bytes
/// again (from the same start) plus whatever arrived since, until a request
/// completes; then the state resets and the caller drops the bytes consumed.
#[derive(Debug)]
pub struct RequestParser {
    limits: Limits,
    /// Offset in the caller's buffer of the first byte not yet used. Every
    /// byte before it is a skipped blank line or empty array, a header
    /// already read, or an argument already copied into `args`.
    pos: usize,
    /// How far the current line has been searched for its end without
    /// finding it, so a long line arriving in pieces is scanned only once.
    /// Meaningful only while it is greater than `pos`.
    scanned: usize,
    /// Bulk strings still expected by the current multibulk request;
    /// 0 between requests.
    pending: usize,
    /// Length of the bulk string whose `$<len>` header has been read but
    /// whose payload has not fully arrived.
    bulk_len: Option<usize>,
    /// Arguments of the current multibulk request parsed so far.
    args: Vec<Vec<u8>>,
    /// Total length of `args`, for the caller's input cap.
    args_bytes: usize,
    /// Refuse all but small requests (no AUTH yet on a server with a password).
    unauthenticated: bool,
}

impl RequestParser {
    /// A parser that enforces `limits`, waiting for the start of a request.
    pub fn new(limits: Limits) -> Self {
        RequestParser {
            limits,
            pos: 0,
            scanned: 0,
            pending: 0,
            bulk_len: None,
            args: Vec::new(),
            args_bytes: 0,
            unauthenticated: false,
        }
    }

    /// Whether the client has authenticated. Until it has, requests over the
    /// `UNAUTH_*` limits are refused. Takes effect from the next request: call it
    /// between requests (a connection calls it before every parse).
    pub fn set_authenticated(&mut self, yes: bool) {
        self.unauthenticated = !yes;
    }

    /// Bytes of the current, unfinished request already copied out of the
    /// caller's buffer (its completed arguments). The caller counts them with its
    /// buffer against [`Limits::max_query_buffer`].
    pub fn buffered(&self) -> usize {
        self.args_bytes
    }

    /// After `Ok(None)`: how many bytes at the front of the buffer last passed
    /// are no longer needed (skipped lines, headers, arguments already copied
    /// out). The caller must drop exactly that many from the front before the
    /// next call, which then continues from the byte after them; the parser
    /// forgets them here. Lets a request arriving in pieces be held once (as
    /// its copied arguments), not twice.
    ///
    /// Only bytes of a multibulk request being read are released: skipped
    /// blank lines ahead of nothing stay, so their limit keeps counting them.
    pub fn release(&mut self) -> usize {
        if self.pending == 0 {
            return 0;
        }
        let n = self.pos;
        self.pos = 0;
        self.scanned = self.scanned.saturating_sub(n);
        n
    }

    /// Parse one request from the front of `buf`.
    /// `Ok(Some((args, consumed)))`: a whole request; the caller drains `consumed` bytes.
    /// `Ok(None)`: incomplete; call again with the same bytes plus more.
    /// Empty inline lines are consumed and skipped (returns the next request or None).
    ///
    /// `args` is never empty. After an `Err` the stream is out of sync: reply
    /// with the error and close the connection (the parser is reset, but the
    /// bytes that follow cannot be trusted).
    // The signature is the module's fixed interface, spelled out in full.
    #[allow(clippy::type_complexity)]
    pub fn parse(&mut self, buf: &[u8]) -> Result<Option<(Vec<Vec<u8>>, usize)>, ProtocolError> {
        let result = self.parse_inner(buf);
        if result.is_err() {
            self.reset();
        }
        result
    }

    fn reset(&mut self) {
        self.pos = 0;
        self.scanned = 0;
        self.pending = 0;
        self.bulk_len = None;
        self.args = Vec::new();
        self.args_bytes = 0;
    }

    fn parse_inner(&mut self, buf: &[u8]) -> Result<Option<Request>, ProtocolError> {
        let max_line = self.limits.max_inline_len;
        // Between requests: find the start of the next one, skipping blank
        // lines and empty arrays.
        while self.pending == 0 {
            // Bytes before `pos` here are all skipped ones (args is empty):
            // bound them like a line, since the caller keeps them buffered.
            if self.pos > max_line {
                return Err(ProtocolError::TooBigInlineRequest);
            }
            let Some(&first) = buf.get(self.pos) else {
                return Ok(None);
            };
            if first == b'*' {
                let Some(cr) = self.header_line(buf, ProtocolError::TooBigMultibulkCount)? else {
                    return Ok(None);
                };
                let count = parse_request_int(buf, self.pos + 1, cr)
                    .ok_or(ProtocolError::InvalidMultibulkLength)?;
                if count > 0 && count as u64 > self.limits.max_array_len as u64 {
                    return Err(ProtocolError::InvalidMultibulkLength);
                }
                if self.unauthenticated && count > UNAUTH_MAX_ARRAY_LEN as i64 {
                    return Err(ProtocolError::UnauthenticatedMultibulkLength);
                }
                self.pos = cr + 2;
                if count > 0 {
                    self.pending = count as usize;
                    self.args = Vec::with_capacity(self.pending.min(ARGS_PREALLOC));
                }
                // `*0` and `*-1` (any count <= 0) are skipped, as in Redis.
            } else {
                let start = self.pos;
                let Some(nl) = find_byte(buf, self.scanned.max(start), b'\n') else {
                    // The line so far, not counting a `\r` that may be the
                    // first half of its CRLF (so a line of exactly the limit
                    // passes however it is split).
                    let mut len = buf.len() - start;
                    if buf.last() == Some(&b'\r') {
                        len -= 1;
                    }
                    if len > max_line {
                        return Err(ProtocolError::TooBigInlineRequest);
                    }
                    self.scanned = buf.len();
                    return Ok(None);
                };
                let end = if nl > start && buf[nl - 1] == b'\r' {
                    nl - 1
                } else {
                    nl
                };
                if end - start > max_line {
                    return Err(ProtocolError::TooBigInlineRequest);
                }
                let args = split_inline(&buf[start..end]).ok_or(ProtocolError::UnbalancedQuotes)?;
                self.pos = nl + 1;
                if !args.is_empty() {
                    let consumed = self.pos;
                    self.reset();
                    return Ok(Some((args, consumed)));
                }
            }
        }

        // Inside a multibulk request: read the remaining bulk strings.
        while self.pending > 0 {
            let len = match self.bulk_len {
                Some(len) => len,
                None => {
                    let Some(cr) = self.header_line(buf, ProtocolError::TooBigBulkCount)? else {
                        return Ok(None);
                    };
                    let first = buf[self.pos];
                    if first != b'$' {
                        return Err(ProtocolError::ExpectedDollar(first));
                    }
                    let len = parse_request_int(buf, self.pos + 1, cr)
                        .ok_or(ProtocolError::InvalidBulkLength)?;
                    if len < 0 || len as u64 > self.limits.max_bulk_len as u64 {
                        return Err(ProtocolError::InvalidBulkLength);
                    }
                    if self.unauthenticated && len > UNAUTH_MAX_BULK_LEN as i64 {
                        return Err(ProtocolError::UnauthenticatedBulkLength);
                    }
                    self.pos = cr + 2;
                    self.bulk_len = Some(len as usize);
                    len as usize
                }
            };
            // The payload is never scanned: it may hold any bytes, CRLF included.
            let end = self.pos.saturating_add(len);
            if end.saturating_add(2) > buf.len() {
                return Ok(None);
            }
            if buf[end] != b'\r' || buf[end + 1] != b'\n' {
                return Err(ProtocolError::MissingCrlf);
            }
            self.args.push(buf[self.pos..end].to_vec());
            self.args_bytes += len;
            self.pos = end + 2;
            self.bulk_len = None;
            self.pending -= 1;
        }

        let args = std::mem::take(&mut self.args);
        let consumed = self.pos;
        self.reset();
        Ok(Some((args, consumed)))
    }

    /// Finds the end of the `*<count>` or `$<len>` line starting at `pos`.
    /// Returns the offset of its `\r`, once the `\n` after it has arrived too;
    /// `None` if the line is incomplete; `too_big` if it exceeds the limit.
    /// Like Redis, the line ends at the first `\r`; unlike Redis, the byte
    /// after it must be `\n` (else the count is reported invalid, or the
    /// `$` missing, whichever Redis would have reported).
    fn header_line(
        &mut self,
        buf: &[u8],
        too_big: ProtocolError,
    ) -> Result<Option<usize>, ProtocolError> {
        let start = self.pos;
        let Some(cr) = find_byte(buf, self.scanned.max(start), b'\r') else {
            if buf.len() - start > self.limits.max_inline_len {
                return Err(too_big);
            }
            self.scanned = buf.len();
            return Ok(None);
        };
        if cr - start > self.limits.max_inline_len {
            return Err(too_big);
        }
        match buf.get(cr + 1) {
            None => {
                // Resume at the `\r` next time: it is found again at once.
                self.scanned = cr;
                Ok(None)
            }
            Some(b'\n') => {
                self.scanned = 0;
                Ok(Some(cr))
            }
            Some(_) => Err(match buf[start] {
                b'*' => ProtocolError::InvalidMultibulkLength,
                b'$' => ProtocolError::InvalidBulkLength,
                other => ProtocolError::ExpectedDollar(other),
            }),
        }
    }
}

/// Parses the integer in `buf[from..to]` as the header of a request line
/// (after `*` or `$`).
fn parse_request_int(buf: &[u8], from: usize, to: usize) -> Option<i64> {
    parse_i64(&buf[from..to])
}

/// Finds `needle` in `hay[from..]`, returning its offset in `hay`.
///
/// Header lines are a few bytes long, so a plain loop over the first bytes
/// finds their end before a vectorised search would have set up; longer
/// lines (inline commands) go to the C library's `memchr`, which std's
/// `BufRead::skip_until` on a byte slice calls without copying anything.
fn find_byte(hay: &[u8], from: usize, needle: u8) -> Option<usize> {
    let rest = hay.get(from..)?;
    let head = rest.len().min(16);
    if let Some(i) = rest[..head].iter().position(|&b| b == needle) {
        return Some(from + i);
    }
    let mut tail = &rest[head..];
    let taken = std::io::BufRead::skip_until(&mut tail, needle).ok()?;
    if taken > 0 && rest[head + taken - 1] == needle {
        Some(from + head + taken - 1)
    } else {
        None
    }
}

/// Redis's `string2ll`: a strict decimal `i64`. No sign but `-`, no leading
/// zeros, no spaces, at most 20 characters, no overflow.
fn parse_i64(s: &[u8]) -> Option<i64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    if s == b"0" {
        return Some(0);
    }
    let (negative, digits) = match s {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, s),
    };
    match digits.first() {
        Some(b'1'..=b'9') => {}
        _ => return None,
    }
    let mut v: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    if negative {
        if v > i64::MAX as u64 + 1 {
            return None;
        }
        Some((v as i64).wrapping_neg())
    } else {
        i64::try_from(v).ok()
    }
}

/// C's `isspace` in the "C" locale, which `sdssplitargs` uses to skip blanks.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Splits an inline command line into arguments the way Redis's
/// `sdssplitargs` does; `None` on unbalanced quotes. The client splits what a user
/// types with the same function, as redis-cli does.
///
/// Redis hands the line over as a C string, so it ends at the first NUL
/// byte: the slice is cut there, and reading past its end yields 0, which
/// keeps every rule below a transcription of the C one. Quotes can start in
/// the middle of a word (`a"b c"` is the single argument `ab c`), and a
/// closing quote must be followed by a space or the end of the line.
pub fn split_inline(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    let line = match line.iter().position(|&b| b == 0) {
        Some(nul) => &line[..nul],
        None => line,
    };
    let at = |i: usize| line.get(i).copied().unwrap_or(0);
    let mut args = Vec::new();
    let mut i = 0;
    loop {
        while i < line.len() && is_c_space(line[i]) {
            i += 1;
        }
        if i >= line.len() {
            return Some(args);
        }
        let mut current = Vec::new();
        let mut in_double = false;
        let mut in_single = false;
        loop {
            let c = at(i);
            if in_double {
                if c == b'\\'
                    && at(i + 1) == b'x'
                    && let (Some(hi), Some(lo)) = (hex_value(at(i + 2)), hex_value(at(i + 3)))
                {
                    current.push(hi * 16 + lo);
                    i += 4;
                    continue;
                }
                if c == b'\\' && at(i + 1) != 0 {
                    current.push(match at(i + 1) {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        other => other,
                    });
                    i += 2;
                } else if c == b'"' {
                    if at(i + 1) != 0 && !is_c_space(at(i + 1)) {
                        return None;
                    }
                    i += 1;
                    break;
                } else if c == 0 {
                    return None;
                } else {
                    current.push(c);
                    i += 1;
                }
            } else if in_single {
                if c == b'\\' && at(i + 1) == b'\'' {
                    current.push(b'\'');
                    i += 2;
                } else if c == b'\'' {
                    if at(i + 1) != 0 && !is_c_space(at(i + 1)) {
                        return None;
                    }
                    i += 1;
                    break;
                } else if c == 0 {
                    return None;
                } else {
                    current.push(c);
                    i += 1;
                }
            } else {
                match c {
                    // Only these end an unquoted word (not \v or \f, which
                    // the blank-skipping loop does treat as spaces).
                    b' ' | b'\n' | b'\r' | b'\t' => {
                        i += 1;
                        break;
                    }
                    0 => break,
                    b'"' => in_double = true,
                    b'\'' => in_single = true,
                    _ => current.push(c),
                }
                i += 1;
            }
        }
        args.push(current);
    }
}

// ---------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------

/// Which reply protocol a connection speaks (HELLO 2 / HELLO 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Proto {
    #[default]
    Resp2,
    Resp3,
}

/// A decoded reply (or any RESP2/RESP3 value): what the client prints and tests inspect.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Vec<u8>),
    Array(Vec<Value>),
    /// `$-1`, `*-1` (RESP2) or `_` (RESP3).
    Null,
    Map(Vec<(Value, Value)>),
    Set(Vec<Value>),
    Double(f64),
    Boolean(bool),
    Verbatim {
        format: String,
        text: Vec<u8>,
    },
    BigNumber(String),
    Push(Vec<Value>),
}

/// `"00" "01" … "99"`: integers are formatted two digits per division.
const DIGIT_PAIRS: [u8; 200] = {
    let mut table = [0u8; 200];
    let mut i = 0;
    while i < 100 {
        table[2 * i] = b'0' + (i / 10) as u8;
        table[2 * i + 1] = b'0' + (i % 10) as u8;
        i += 1;
    }
    table
};

/// Appends the decimal digits of `v`, without allocating.
fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    while v >= 100 {
        let pair = (v % 100) as usize * 2;
        v /= 100;
        i -= 2;
        buf[i..i + 2].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
    }
    if v >= 10 {
        let pair = v as usize * 2;
        i -= 2;
        buf[i..i + 2].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
    } else {
        i -= 1;
        buf[i] = b'0' + v as u8;
    }
    out.extend_from_slice(&buf[i..]);
}

fn push_i64(out: &mut Vec<u8>, v: i64) {
    if v < 0 {
        out.push(b'-');
    }
    push_u64(out, v.unsigned_abs());
}

/// Appends `<prefix><n>\r\n`, the header of every length-prefixed type.
fn write_header(out: &mut Vec<u8>, prefix: u8, n: usize) {
    out.push(prefix);
    push_u64(out, n as u64);
    out.extend_from_slice(b"\r\n");
}

/// Appends `text` with every CR and LF replaced by a space: a simple string
/// or error is one line, and a stray newline would desynchronise the client.
fn push_line(out: &mut Vec<u8>, text: &str) {
    let bytes = text.as_bytes();
    if bytes.iter().any(|&b| b == b'\r' || b == b'\n') {
        out.extend(
            bytes
                .iter()
                .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
        );
    } else {
        out.extend_from_slice(bytes);
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends a simple string, `+OK\r\n`. CR and LF in `s` become spaces.
pub fn write_simple(out: &mut Vec<u8>, s: &str) {
    out.push(b'+');
    push_line(out, s);
}

/// Appends an error reply. `msg` includes its code (`ERR unknown command 'x'`,
/// `MOVED 0 host:port`); the `-` is added here. CR and LF become spaces, as
/// Redis does, since an error may quote client input.
pub fn write_error(out: &mut Vec<u8>, msg: &str) {
    out.push(b'-');
    push_line(out, msg);
}

/// Appends an integer reply, `:42\r\n`.
pub fn write_integer(out: &mut Vec<u8>, n: i64) {
    out.push(b':');
    push_i64(out, n);
    out.extend_from_slice(b"\r\n");
}

/// Appends a bulk string, `$<len>\r\n<data>\r\n`; binary safe.
pub fn write_bulk(out: &mut Vec<u8>, data: &[u8]) {
    out.reserve(data.len() + 24);
    write_header(out, b'$', data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// Appends the null reply: `$-1\r\n` (RESP2's null bulk string) or `_\r\n`.
pub fn write_null(out: &mut Vec<u8>, proto: Proto) {
    out.extend_from_slice(match proto {
        Proto::Resp2 => b"$-1\r\n",
        Proto::Resp3 => b"_\r\n",
    });
}

/// Appends the null array: `*-1\r\n` in RESP2, `_\r\n` in RESP3 (which has
/// one null for everything).
pub fn write_null_array(out: &mut Vec<u8>, proto: Proto) {
    out.extend_from_slice(match proto {
        Proto::Resp2 => b"*-1\r\n",
        Proto::Resp3 => b"_\r\n",
    });
}

/// Appends an array header, `*<n>\r\n`; the caller then writes `n` values.
pub fn write_array_len(out: &mut Vec<u8>, n: usize) {
    write_header(out, b'*', n);
}

/// Appends a map header for `n` key/value pairs: `%<n>\r\n` in RESP3, a flat
/// array of `2n` elements in RESP2. The caller then writes key, value, key, …
pub fn write_map_len(out: &mut Vec<u8>, n: usize, proto: Proto) {
    match proto {
        Proto::Resp2 => write_header(out, b'*', n * 2),
        Proto::Resp3 => write_header(out, b'%', n),
    }
}

/// Appends a set header: `~<n>\r\n` in RESP3, `*<n>\r\n` in RESP2.
pub fn write_set_len(out: &mut Vec<u8>, n: usize, proto: Proto) {
    match proto {
        Proto::Resp2 => write_header(out, b'*', n),
        Proto::Resp3 => write_header(out, b'~', n),
    }
}

/// Appends a double: `,<d>\r\n` in RESP3, a bulk string of the same text in
/// RESP2. The text is Redis's (`d2string`): `inf`, `-inf`, `nan`, `0`, `-0`;
/// integral values as integers; otherwise the shortest digits that read
/// back as the same double, in plain notation for moderate exponents and
/// `1.5e+20` / `1.5e-7` beyond.
pub fn write_double(out: &mut Vec<u8>, d: f64, proto: Proto) {
    let mut buf = [0u8; 40];
    let len = format_double(d, &mut buf);
    match proto {
        Proto::Resp2 => write_bulk(out, &buf[..len]),
        Proto::Resp3 => {
            out.push(b',');
            out.extend_from_slice(&buf[..len]);
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// Appends a boolean: `#t\r\n` / `#f\r\n` in RESP3, `:1\r\n` / `:0\r\n` in RESP2.
pub fn write_bool(out: &mut Vec<u8>, b: bool, proto: Proto) {
    out.extend_from_slice(match (proto, b) {
        (Proto::Resp2, true) => b":1\r\n",
        (Proto::Resp2, false) => b":0\r\n",
        (Proto::Resp3, true) => b"#t\r\n",
        (Proto::Resp3, false) => b"#f\r\n",
    });
}

/// Appends a verbatim string (`INFO`, `CLIENT LIST`): `=<len>\r\n<fmt>:<text>\r\n`
/// in RESP3, a plain bulk string of `text` in RESP2. `fmt` is three bytes
/// (`txt`, `mkd`); like Redis, a shorter one is padded with spaces and a
/// longer one cut.
pub fn write_verbatim(out: &mut Vec<u8>, fmt: &str, text: &[u8], proto: Proto) {
    match proto {
        Proto::Resp2 => write_bulk(out, text),
        Proto::Resp3 => {
            out.reserve(text.len() + 28);
            write_header(out, b'=', text.len() + 4);
            let f = fmt.as_bytes();
            for i in 0..3 {
                out.push(f.get(i).copied().unwrap_or(b' '));
            }
            out.push(b':');
            out.extend_from_slice(text);
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// Writes `d` as Redis's `d2string` would into `buf`; returns the length.
fn format_double(d: f64, buf: &mut [u8; 40]) -> usize {
    fn put(buf: &mut [u8; 40], s: &[u8]) -> usize {
        buf[..s.len()].copy_from_slice(s);
        s.len()
    }
    if d.is_nan() {
        return put(buf, b"nan");
    }
    if d.is_infinite() {
        return put(buf, if d < 0.0 { b"-inf" } else { b"inf" });
    }
    if d == 0.0 {
        return put(buf, if d.is_sign_negative() { b"-0" } else { b"0" });
    }
    // Integral and well inside i64: print as an integer (Redis's double2ll).
    let bound = (i64::MAX / 2) as f64;
    if (-bound..=bound).contains(&d) && (d as i64) as f64 == d {
        let mut tmp = Vec::new();
        push_i64(&mut tmp, d as i64);
        return put(buf, &tmp);
    }
    // Otherwise Redis uses fpconv_dtoa (Grisu: shortest round-trip digits).
    // Rust's `{:e}` yields the same shortest digits as `d.ddde<exp>`; lay
    // them out with fpconv's rules.
    let mut sci = [0u8; 40];
    let sci_len = {
        let mut w: &mut [u8] = &mut sci;
        let before = w.len();
        // Cannot fail: the longest `{:e}` of an f64 is 24 bytes.
        let _ = std::io::Write::write_fmt(&mut w, format_args!("{:e}", d.abs()));
        before - w.len()
    };
    let sci = &sci[..sci_len];
    let e_at = sci.iter().position(|&b| b == b'e').unwrap_or(sci.len());
    let mut digits = [0u8; 20];
    let mut ndigits = 0;
    for &b in &sci[..e_at] {
        if b.is_ascii_digit() && ndigits < digits.len() {
            digits[ndigits] = b;
            ndigits += 1;
        }
    }
    let exp10: i32 = std::str::from_utf8(&sci[(e_at + 1).min(sci.len())..])
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let negative = d < 0.0;
    let mut n = 0;
    if negative {
        buf[0] = b'-';
        n = 1;
    }
    // fpconv's K: the value is digits * 10^k.
    let k = exp10 - (ndigits as i32 - 1);
    let exp = exp10.unsigned_abs() as usize;
    if k >= 0 && exp < ndigits + 7 {
        // Plain integer (only reached beyond the double2ll range).
        n += put_at(buf, n, &digits[..ndigits]);
        for _ in 0..k {
            buf[n] = b'0';
            n += 1;
        }
        return n;
    }
    if k < 0 && (k > -7 || exp < 4) {
        let offset = ndigits as i32 + k;
        if offset <= 0 {
            n += put_at(buf, n, b"0.");
            for _ in 0..(-offset) {
                buf[n] = b'0';
                n += 1;
            }
            n += put_at(buf, n, &digits[..ndigits]);
        } else {
            let offset = offset as usize;
            n += put_at(buf, n, &digits[..offset]);
            buf[n] = b'.';
            n += 1;
            n += put_at(buf, n, &digits[offset..ndigits]);
        }
        return n;
    }
    // Scientific notation, `1.5e+20`, exponent without leading zeros.
    let ndigits = ndigits.min(18 - usize::from(negative));
    buf[n] = digits[0];
    n += 1;
    if ndigits > 1 {
        buf[n] = b'.';
        n += 1;
        n += put_at(buf, n, &digits[1..ndigits]);
    }
    buf[n] = b'e';
    buf[n + 1] = if exp10 < 0 { b'-' } else { b'+' };
    n += 2;
    let mut tmp = Vec::new();
    push_u64(&mut tmp, exp as u64);
    n += put_at(buf, n, &tmp);
    n
}

fn put_at(buf: &mut [u8; 40], at: usize, s: &[u8]) -> usize {
    buf[at..at + s.len()].copy_from_slice(s);
    s.len()
}

/// Writes any [`Value`], in its RESP3 form for the RESP3 types (null as
/// `_`, maps as `%`, …). See [`encode_value_proto`] for RESP2.
pub fn encode_value(value: &Value, out: &mut Vec<u8>) {
    encode_value_proto(value, Proto::Resp3, out);
}

/// Writes any [`Value`] as a connection speaking `proto` would receive it:
/// in RESP2 the RESP3 types degrade as Redis degrades them (null → `$-1`,
/// map → flat array, set and push → array, double, big number and verbatim
/// → bulk string, boolean → integer).
pub fn encode_value_proto(value: &Value, proto: Proto, out: &mut Vec<u8>) {
    match value {
        Value::Simple(s) => write_simple(out, s),
        Value::Error(e) => write_error(out, e),
        Value::Integer(n) => write_integer(out, *n),
        Value::Bulk(b) => write_bulk(out, b),
        Value::Array(items) => {
            write_array_len(out, items.len());
            for item in items {
                encode_value_proto(item, proto, out);
            }
        }
        Value::Null => write_null(out, proto),
        Value::Map(pairs) => {
            write_map_len(out, pairs.len(), proto);
            for (k, v) in pairs {
                encode_value_proto(k, proto, out);
                encode_value_proto(v, proto, out);
            }
        }
        Value::Set(items) => {
            write_set_len(out, items.len(), proto);
            for item in items {
                encode_value_proto(item, proto, out);
            }
        }
        Value::Double(d) => write_double(out, *d, proto),
        Value::Boolean(b) => write_bool(out, *b, proto),
        Value::Verbatim { format, text } => write_verbatim(out, format, text, proto),
        Value::BigNumber(n) => match proto {
            Proto::Resp2 => write_bulk(out, n.as_bytes()),
            Proto::Resp3 => {
                out.push(b'(');
                push_line(out, n);
            }
        },
        Value::Push(items) => {
            match proto {
                Proto::Resp2 => write_header(out, b'*', items.len()),
                Proto::Resp3 => write_header(out, b'>', items.len()),
            }
            for item in items {
                encode_value_proto(item, proto, out);
            }
        }
    }
}

/// Writes a request as a client sends it: a multibulk of bulk strings,
/// `*<n>\r\n$<len>\r\n<arg>\r\n…`.
pub fn encode_command(args: &[&[u8]], out: &mut Vec<u8>) {
    out.reserve(args.iter().map(|a| a.len() + 16).sum::<usize>() + 16);
    write_array_len(out, args.len());
    for arg in args {
        write_bulk(out, arg);
    }
}

// ---------------------------------------------------------------------------
// Reply parsing (clients and tests)
// ---------------------------------------------------------------------------

/// Parses one RESP2 or RESP3 value from the front of `buf`.
///
/// `Ok(Some((value, consumed)))` for a whole value; `Ok(None)` if `buf` holds
/// only the start of one (call again with more bytes: parsing restarts from
/// the beginning, which is fine for replies); `Err` on bytes that are no
/// RESP at all. `$-1`, `*-1` and `_` all give [`Value::Null`]; a blob error
/// (`!`) gives [`Value::Error`]; attributes (`|`) are read and dropped, and
/// the value they annotate is returned. Nesting deeper than
/// [`MAX_REPLY_DEPTH`] is an error, so hostile input cannot exhaust the stack.
pub fn parse_value(buf: &[u8]) -> Result<Option<(Value, usize)>, ProtocolError> {
    let mut reader = ReplyReader { buf, pos: 0 };
    match reader.value(0) {
        Ok(value) => Ok(Some((value, reader.pos))),
        Err(Stop::Incomplete) => Ok(None),
        Err(Stop::Invalid(e)) => Err(e),
    }
}

/// Why the reply reader stopped: `?` carries both out of nested calls.
enum Stop {
    Incomplete,
    Invalid(ProtocolError),
}

impl From<ProtocolError> for Stop {
    fn from(e: ProtocolError) -> Self {
        Stop::Invalid(e)
    }
}

fn bad(what: &'static str) -> Stop {
    Stop::Invalid(ProtocolError::InvalidReply(what))
}

struct ReplyReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> ReplyReader<'a> {
    /// One line after the type byte, without its CRLF.
    fn line(&mut self) -> Result<&'a [u8], Stop> {
        let buf = self.buf;
        let cr = find_byte(buf, self.pos, b'\r').ok_or(Stop::Incomplete)?;
        match buf.get(cr + 1) {
            None => Err(Stop::Incomplete),
            Some(b'\n') => {
                let line = &buf[self.pos..cr];
                self.pos = cr + 2;
                Ok(line)
            }
            Some(_) => Err(bad("line ending")),
        }
    }

    fn int_line(&mut self, what: &'static str) -> Result<i64, Stop> {
        let line = self.line()?;
        parse_i64(line).ok_or(bad(what))
    }

    /// An aggregate's element count: `Ok(None)` for `-1` where `nullable`.
    fn count(&mut self, nullable: bool) -> Result<Option<usize>, Stop> {
        match self.int_line("length")? {
            -1 if nullable => Ok(None),
            n if n < 0 => Err(bad("length")),
            n => usize::try_from(n).map(Some).map_err(|_| bad("length")),
        }
    }

    /// The payload of a length-prefixed string, with its trailing CRLF.
    fn blob(&mut self, len: usize) -> Result<&'a [u8], Stop> {
        let buf = self.buf;
        let end = self.pos.checked_add(len).ok_or(bad("length"))?;
        if end.saturating_add(2) > buf.len() {
            // A payload split before its CRLF: wrong bytes already in place
            // are an error even though more could come.
            if end < buf.len() && buf[end] != b'\r' {
                return Err(bad("bulk string ending"));
            }
            return Err(Stop::Incomplete);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err(bad("bulk string ending"));
        }
        let data = &buf[self.pos..end];
        self.pos = end + 2;
        Ok(data)
    }

    /// Room to reserve for `n` elements of at least `size` bytes each: never
    /// more than the bytes left could hold, whatever the header claims.
    fn capacity(&self, n: usize, size: usize) -> usize {
        n.min((self.buf.len() - self.pos) / size)
    }

    fn items(&mut self, n: usize, depth: usize) -> Result<Vec<Value>, Stop> {
        let mut items = Vec::with_capacity(self.capacity(n, 3));
        for _ in 0..n {
            items.push(self.value(depth + 1)?);
        }
        Ok(items)
    }

    fn value(&mut self, depth: usize) -> Result<Value, Stop> {
        if depth > MAX_REPLY_DEPTH {
            return Err(Stop::Invalid(ProtocolError::ReplyTooDeep));
        }
        loop {
            let &kind = self.buf.get(self.pos).ok_or(Stop::Incomplete)?;
            self.pos += 1;
            return Ok(match kind {
                b'+' => Value::Simple(String::from_utf8_lossy(self.line()?).into_owned()),
                b'-' => Value::Error(String::from_utf8_lossy(self.line()?).into_owned()),
                b':' => Value::Integer(self.int_line("integer")?),
                b'$' => match self.count(true)? {
                    None => Value::Null,
                    Some(len) => Value::Bulk(self.blob(len)?.to_vec()),
                },
                b'!' => {
                    let len = self.count(false)?.unwrap_or(0);
                    Value::Error(String::from_utf8_lossy(self.blob(len)?).into_owned())
                }
                b'=' => {
                    let len = self.count(false)?.unwrap_or(0);
                    let payload = self.blob(len)?;
                    if payload.len() < 4 || payload[3] != b':' {
                        return Err(bad("verbatim string"));
                    }
                    Value::Verbatim {
                        format: String::from_utf8_lossy(&payload[..3]).into_owned(),
                        text: payload[4..].to_vec(),
                    }
                }
                b'*' => match self.count(true)? {
                    None => Value::Null,
                    Some(n) => Value::Array(self.items(n, depth)?),
                },
                b'~' => {
                    let n = self.count(false)?.unwrap_or(0);
                    Value::Set(self.items(n, depth)?)
                }
                b'>' => {
                    let n = self.count(false)?.unwrap_or(0);
                    Value::Push(self.items(n, depth)?)
                }
                b'%' => {
                    let n = self.count(false)?.unwrap_or(0);
                    let mut pairs = Vec::with_capacity(self.capacity(n, 6));
                    for _ in 0..n {
                        let k = self.value(depth + 1)?;
                        let v = self.value(depth + 1)?;
                        pairs.push((k, v));
                    }
                    Value::Map(pairs)
                }
                b'|' => {
                    // An attribute annotates the value after it: read it,
                    // drop it, and loop (not recurse) to that value.
                    let n = self.count(false)?.unwrap_or(0);
                    for _ in 0..n {
                        self.value(depth + 1)?;
                        self.value(depth + 1)?;
                    }
                    continue;
                }
                b'_' => {
                    if !self.line()?.is_empty() {
                        return Err(bad("null"));
                    }
                    Value::Null
                }
                b'#' => match self.line()? {
                    b"t" => Value::Boolean(true),
                    b"f" => Value::Boolean(false),
                    _ => return Err(bad("boolean")),
                },
                b',' => {
                    let line = self.line()?;
                    let d = std::str::from_utf8(line)
                        .ok()
                        .and_then(|s| s.parse::<f64>().ok())
                        .ok_or(bad("double"))?;
                    Value::Double(d)
                }
                b'(' => {
                    let line = self.line()?;
                    let digits = line.strip_prefix(b"-").unwrap_or(line);
                    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                        return Err(bad("big number"));
                    }
                    // ASCII only, checked just above.
                    Value::BigNumber(String::from_utf8_lossy(line).into_owned())
                }
                other => return Err(Stop::Invalid(ProtocolError::InvalidReplyType(other))),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Requests = Vec<Vec<Vec<u8>>>;

    /// Drives a parser as a connection does: append each chunk to the
    /// buffer, take every complete request, drop the bytes they used.
    /// Returns the requests and how many bytes were left unconsumed.
    fn drive(limits: Limits, chunks: &[&[u8]]) -> Result<(Requests, usize), ProtocolError> {
        let mut parser = RequestParser::new(limits);
        let mut buf = Vec::new();
        let mut requests = Vec::new();
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            while let Some((args, consumed)) = parser.parse(&buf)? {
                assert!(!args.is_empty());
                assert!(consumed > 0 && consumed <= buf.len());
                buf.drain(..consumed);
                requests.push(args);
            }
        }
        Ok((requests, buf.len()))
    }

    /// [`drive`] for a caller that drops what the parser releases after every
    /// incomplete parse, as a connection does. Returns the requests and the most
    /// bytes held at any time (buffer plus copied-out arguments).
    fn drive_releasing(
        limits: Limits,
        chunks: &[&[u8]],
    ) -> Result<(Requests, usize), ProtocolError> {
        let mut parser = RequestParser::new(limits);
        let mut buf = Vec::new();
        let mut requests = Vec::new();
        let mut peak = 0;
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            peak = peak.max(buf.len() + parser.buffered());
            while let Some((args, consumed)) = parser.parse(&buf)? {
                buf.drain(..consumed);
                requests.push(args);
            }
            let n = parser.release();
            buf.drain(..n);
        }
        Ok((requests, peak))
    }

    /// Every way of cutting `input`: whole, at every single split point,
    /// at every pair of split points, and byte by byte. All must agree.
    fn drive_all_splits(limits: Limits, input: &[u8]) -> Result<(Requests, usize), ProtocolError> {
        let whole = drive(limits, &[input]);
        for i in 0..=input.len() {
            let got = drive(limits, &[&input[..i], &input[i..]]);
            assert_eq!(
                got,
                whole,
                "split at {i} of {:?}",
                String::from_utf8_lossy(input)
            );
        }
        if input.len() <= 200 {
            for i in 0..=input.len() {
                for j in i..=input.len() {
                    let got = drive(limits, &[&input[..i], &input[i..j], &input[j..]]);
                    assert_eq!(
                        got,
                        whole,
                        "splits at {i},{j} of {:?}",
                        String::from_utf8_lossy(input)
                    );
                }
            }
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(
            drive(limits, &bytes),
            whole,
            "byte by byte: {:?}",
            String::from_utf8_lossy(input)
        );
        // Dropping released bytes never changes what is parsed.
        for i in 0..=input.len() {
            let got = drive_releasing(limits, &[&input[..i], &input[i..]]).map(|(r, _)| r);
            assert_eq!(
                got,
                whole.clone().map(|(r, _)| r),
                "releasing, split at {i}"
            );
        }
        let got = drive_releasing(limits, &bytes).map(|(r, _)| r);
        assert_eq!(
            got,
            whole.clone().map(|(r, _)| r),
            "releasing, byte by byte"
        );
        whole
    }

    fn args(list: &[&[u8]]) -> Vec<Vec<u8>> {
        list.iter().map(|a| a.to_vec()).collect()
    }

    fn parses_to(input: &[u8], expected: &[&[&[u8]]]) {
        let expected: Requests = expected.iter().map(|r| args(r)).collect();
        assert_eq!(
            drive_all_splits(Limits::default(), input),
            Ok((expected, 0))
        );
    }

    fn fails_with(limits: Limits, input: &[u8], message: &str) {
        match drive_all_splits(limits, input) {
            Err(e) => assert_eq!(
                e.to_string(),
                message,
                "input {:?}",
                String::from_utf8_lossy(input)
            ),
            Ok(r) => panic!("{:?} parsed as {r:?}", String::from_utf8_lossy(input)),
        }
    }

    const SMALL: Limits = Limits {
        max_inline_len: 16,
        max_bulk_len: 8,
        max_array_len: 4,
        max_query_buffer: 1 << 20,
    };

    /// Valid requests of every kind, with what they parse to.
    fn samples() -> Vec<(&'static [u8], Vec<Vec<u8>>)> {
        vec![
            (
                b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n",
                args(&[b"SET", b"k", b"v"]),
            ),
            (b"*1\r\n$4\r\nPING\r\n", args(&[b"PING"])),
            (b"*2\r\n$3\r\nGET\r\n$0\r\n\r\n", args(&[b"GET", b""])),
            (
                b"*2\r\n$4\r\nECHO\r\n$7\r\na\r\nb\0c\n\r\n",
                args(&[b"ECHO", b"a\r\nb\0c\n"]),
            ),
            (
                b"*2\r\n$4\r\nECHO\r\n$2\r\n\r\n\r\n",
                args(&[b"ECHO", b"\r\n"]),
            ),
            (b"PING\r\n", args(&[b"PING"])),
            (b"set k v\n", args(&[b"set", b"k", b"v"])),
            (b"  SET   k \t v  \r\n", args(&[b"SET", b"k", b"v"])),
            (b"SET \"a b\" 'c d'\r\n", args(&[b"SET", b"a b", b"c d"])),
            (
                b"ECHO \"\\x41\\x7a\\n\\r\\t\\b\\a\\\\\\\"\\q\\xZZ\"\r\n",
                args(&[b"ECHO", b"Az\n\r\t\x08\x07\\\"qxZZ"]),
            ),
            (
                b"ECHO 'it\\'s \\n \"x\"'\r\n",
                args(&[b"ECHO", b"it's \\n \"x\""]),
            ),
            (
                b"SET a\"b c\" \"\" ''\r\n",
                args(&[b"SET", b"ab c", b"", b""]),
            ),
            (b"GET a\0b c\r\n", args(&[b"GET", b"a"])),
            (b"\r\n \t\r\n\n\x0b\r\nPING x\r\n", args(&[b"PING", b"x"])),
            (b"*0\r\n*-1\r\n*-5\r\nPING\r\n", args(&[b"PING"])),
            (b"GET a\rb\r\n", args(&[b"GET", b"a", b"b"])),
        ]
    }

    #[test]
    fn every_sample_parses_the_same_however_split() {
        for (input, expected) in samples() {
            parses_to(
                input,
                &[&expected.iter().map(|a| a.as_slice()).collect::<Vec<_>>()],
            );
        }
    }

    #[test]
    fn a_pipeline_of_every_sample_parses_the_same_however_split() {
        let mut input = Vec::new();
        let mut expected = Vec::new();
        for (bytes, args) in samples() {
            input.extend_from_slice(bytes);
            expected.push(args);
        }
        assert_eq!(
            drive_all_splits(Limits::default(), &input),
            Ok((expected, 0))
        );
    }

    #[test]
    fn consumed_covers_skipped_lines_and_only_one_request() {
        let mut p = RequestParser::new(Limits::default());
        let buf = b"\r\n*0\r\nPING\r\nGET k\r\n";
        let (args, consumed) = p.parse(buf).unwrap().unwrap();
        assert_eq!(args, vec![b"PING".to_vec()]);
        assert_eq!(consumed, 12);
        let (args, consumed) = p.parse(&buf[12..]).unwrap().unwrap();
        assert_eq!(args, vec![b"GET".to_vec(), b"k".to_vec()]);
        assert_eq!(consumed, 7);
        assert_eq!(p.parse(b"").unwrap(), None);
    }

    #[test]
    fn blank_lines_alone_wait_for_a_request() {
        assert_eq!(
            drive_all_splits(Limits::default(), b"\r\n\r\n  \n"),
            Ok((vec![], 7))
        );
        assert_eq!(
            drive_all_splits(Limits::default(), b"*0\r\n*-1\r\nPIN"),
            Ok((vec![], 12))
        );
    }

    #[test]
    fn a_large_array_arriving_in_pieces_is_parsed_once() {
        let n = 1000;
        let mut input = b"*1000\r\n".to_vec();
        for i in 0..n {
            let arg = format!("v{i}");
            input.extend_from_slice(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
        }
        let mut p = RequestParser::new(Limits::default());
        // Half of it: the elements that arrived whole are kept, and parsing
        // resumes at the first one that did not.
        let half = input.len() / 2;
        assert_eq!(p.parse(&input[..half]).unwrap(), None);
        let done = p.args.len();
        assert!(done > 400 && done < 600, "{done}");
        assert_eq!(p.args[done - 1], format!("v{}", done - 1).into_bytes());
        let resume = p.pos;
        assert!(resume <= half && half - resume < 12);
        let (args, consumed) = p.parse(&input).unwrap().unwrap();
        assert_eq!(consumed, input.len());
        assert_eq!(args.len(), n);
        assert_eq!(args[n - 1], b"v999".to_vec());
        // And the state is reset for the next request.
        assert_eq!(
            (p.pos, p.pending, p.args.len(), p.bulk_len),
            (0, 0, 0, None)
        );
    }

    #[test]
    fn a_long_line_arriving_in_pieces_is_scanned_once() {
        let mut p = RequestParser::new(Limits::default());
        let line = [b"ECHO ".as_slice(), &[b'x'; 1000], b"\r\n"].concat();
        assert_eq!(p.parse(&line[..600]).unwrap(), None);
        assert_eq!(p.scanned, 600);
        let (args, consumed) = p.parse(&line).unwrap().unwrap();
        assert_eq!((args[1].len(), consumed), (1000, line.len()));
    }

    #[test]
    fn a_big_bulk_arriving_in_pieces_waits_without_rescanning() {
        let mut p = RequestParser::new(Limits::default());
        let payload = vec![b'\r'; 100_000];
        let mut input = b"*2\r\n$3\r\nSET\r\n$100000\r\n".to_vec();
        input.extend_from_slice(&payload);
        input.extend_from_slice(b"\r\n");
        for cut in (30..input.len()).step_by(4096) {
            assert_eq!(p.parse(&input[..cut]).unwrap(), None);
            assert_eq!(p.bulk_len, Some(100_000));
        }
        let (args, _) = p.parse(&input).unwrap().unwrap();
        assert_eq!(args[1], payload);
    }

    #[test]
    fn malformed_requests_give_redis_errors() {
        let d = Limits::default();
        let cases: &[(&[u8], &str)] = &[
            (b"*abc\r\n", "ERR Protocol error: invalid multibulk length"),
            (b"*01\r\n", "ERR Protocol error: invalid multibulk length"),
            (b"*+1\r\n", "ERR Protocol error: invalid multibulk length"),
            (b"*\r\n", "ERR Protocol error: invalid multibulk length"),
            (b"*1 \r\n", "ERR Protocol error: invalid multibulk length"),
            (
                b"*99999999999999999999\r\n",
                "ERR Protocol error: invalid multibulk length",
            ),
            (b"*1\rX", "ERR Protocol error: invalid multibulk length"),
            (b"*1\r\n$x\r\n", "ERR Protocol error: invalid bulk length"),
            (b"*1\r\n$-1\r\n", "ERR Protocol error: invalid bulk length"),
            (b"*1\r\n$\r\n", "ERR Protocol error: invalid bulk length"),
            (b"*1\r\n$3\rX", "ERR Protocol error: invalid bulk length"),
            (
                b"*1\r\nfoo\r\n",
                "ERR Protocol error: expected '$', got 'f'",
            ),
            (
                b"*2\r\n$3\r\nfoo\r\n:1\r\n",
                "ERR Protocol error: expected '$', got ':'",
            ),
            (b"*1\r\n\r\n", "ERR Protocol error: expected '$', got '\r'"),
            (b"*1\r\n\rX", "ERR Protocol error: expected '$', got '\r'"),
            (b"*1\r\nab\rX", "ERR Protocol error: expected '$', got 'a'"),
            (
                b"*1\r\n$3\r\nfooXY",
                "ERR Protocol error: expected CRLF after bulk string",
            ),
            (
                b"*1\r\n$3\r\nfoo\rX",
                "ERR Protocol error: expected CRLF after bulk string",
            ),
            (
                b"*1\r\n$3\r\nfoo\n\r",
                "ERR Protocol error: expected CRLF after bulk string",
            ),
            (
                b"*1\r\n$0\r\nab",
                "ERR Protocol error: expected CRLF after bulk string",
            ),
            (
                b"SET \"a\r\n",
                "ERR Protocol error: unbalanced quotes in request",
            ),
            (
                b"SET \"a\"b\r\n",
                "ERR Protocol error: unbalanced quotes in request",
            ),
            (
                b"SET 'a'b\r\n",
                "ERR Protocol error: unbalanced quotes in request",
            ),
            (
                b"SET 'abc\n",
                "ERR Protocol error: unbalanced quotes in request",
            ),
            (
                b"SET \"a\\\"\r\n",
                "ERR Protocol error: unbalanced quotes in request",
            ),
            (
                b"SET \"a\0\"\r\n",
                "ERR Protocol error: unbalanced quotes in request",
            ),
            // A good request first: the error comes after it.
            (
                b"PING\r\nSET \"x\r\n",
                "ERR Protocol error: unbalanced quotes in request",
            ),
        ];
        for (input, message) in cases {
            fails_with(d, input, message);
        }
    }

    #[test]
    fn expected_dollar_is_written_on_one_line() {
        let e = ProtocolError::ExpectedDollar(b'\r');
        let mut out = Vec::new();
        write_error(&mut out, &e.to_string());
        assert_eq!(out, b"-ERR Protocol error: expected '$', got ' '\r\n");
    }

    #[test]
    fn inline_limit_is_exact() {
        // 16 bytes of line: fine, however the CRLF arrives.
        let ok = b"ECHO 0123456789a\r\n";
        assert_eq!(
            drive_all_splits(SMALL, ok),
            Ok((vec![args(&[b"ECHO", b"0123456789a"])], 0))
        );
        assert_eq!(
            drive_all_splits(SMALL, b"ECHO 0123456789a\n"),
            Ok((vec![args(&[b"ECHO", b"0123456789a"])], 0))
        );
        // 17 bytes: refused whether or not its end has arrived.
        fails_with(
            SMALL,
            b"ECHO 0123456789ab\r\n",
            "ERR Protocol error: too big inline request",
        );
        fails_with(
            SMALL,
            b"ECHO 0123456789ab",
            "ERR Protocol error: too big inline request",
        );
        fails_with(
            SMALL,
            b"ECHO 0123456789abcdefghijklmnop",
            "ERR Protocol error: too big inline request",
        );
        // Blank lines ahead of a request count as one line.
        assert_eq!(
            drive_all_splits(SMALL, b"\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\nPING\r\n"),
            Ok((vec![args(&[b"PING"])], 0))
        );
        fails_with(
            SMALL,
            b"\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\nPING\r\n",
            "ERR Protocol error: too big inline request",
        );
        fails_with(
            SMALL,
            b"*0\r\n*0\r\n*0\r\n*0\r\n*0\r\n",
            "ERR Protocol error: too big inline request",
        );
    }

    #[test]
    fn header_line_limits_are_exact() {
        let limits = Limits {
            max_inline_len: 4,
            ..SMALL
        };
        // `*123` is 4 bytes: within the limit, then refused for its value.
        fails_with(
            limits,
            b"*123\r\n",
            "ERR Protocol error: invalid multibulk length",
        );
        fails_with(
            limits,
            b"*1234\r\n",
            "ERR Protocol error: too big mbulk count string",
        );
        fails_with(
            limits,
            b"*12345",
            "ERR Protocol error: too big mbulk count string",
        );
        fails_with(
            limits,
            b"*1\r\n$123\r\n",
            "ERR Protocol error: invalid bulk length",
        );
        fails_with(
            limits,
            b"*1\r\n$1234\r\n",
            "ERR Protocol error: too big bulk count string",
        );
        fails_with(
            limits,
            b"*1\r\nfooba",
            "ERR Protocol error: too big bulk count string",
        );
        assert_eq!(
            drive_all_splits(limits, b"*1\r\n$4\r\nPING\r\n"),
            Ok((vec![args(&[b"PING"])], 0))
        );
        // Default limits: 64 KiB.
        let mut long = b"*1".to_vec();
        long.extend(std::iter::repeat_n(b'1', 64 * 1024));
        let mut p = RequestParser::new(Limits::default());
        assert_eq!(p.parse(&long[..64 * 1024]).unwrap(), None);
        assert_eq!(p.parse(&long), Err(ProtocolError::TooBigMultibulkCount));
    }

    #[test]
    fn array_and_bulk_limits_are_exact() {
        let four = b"*4\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n$1\r\nd\r\n";
        assert_eq!(
            drive_all_splits(SMALL, four),
            Ok((vec![args(&[b"a", b"b", b"c", b"d"])], 0))
        );
        fails_with(
            SMALL,
            b"*5\r\n",
            "ERR Protocol error: invalid multibulk length",
        );
        let eight = b"*1\r\n$8\r\n12345678\r\n";
        assert_eq!(
            drive_all_splits(SMALL, eight),
            Ok((vec![args(&[b"12345678"])], 0))
        );
        fails_with(
            SMALL,
            b"*1\r\n$9\r\n",
            "ERR Protocol error: invalid bulk length",
        );
        let d = Limits::default();
        assert_eq!(RequestParser::new(d).parse(b"*1048576\r\n"), Ok(None));
        assert_eq!(
            RequestParser::new(d).parse(b"*1048577\r\n"),
            Err(ProtocolError::InvalidMultibulkLength)
        );
        assert_eq!(
            RequestParser::new(d).parse(b"*1\r\n$536870912\r\n"),
            Ok(None)
        );
        assert_eq!(
            RequestParser::new(d).parse(b"*1\r\n$536870913\r\n"),
            Err(ProtocolError::InvalidBulkLength)
        );
    }

    #[test]
    fn before_auth_only_small_requests_are_read() {
        let unauth = || {
            let mut p = RequestParser::new(Limits::default());
            p.set_authenticated(false);
            p
        };
        // Redis 7's limits, exactly: 10 arguments, 16 KiB each.
        assert_eq!(unauth().parse(b"*10\r\n"), Ok(None));
        let e = unauth().parse(b"*11\r\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "ERR Protocol error: unauthenticated multibulk length"
        );
        assert_eq!(unauth().parse(b"*1\r\n$16384\r\n"), Ok(None));
        let e = unauth().parse(b"*1\r\n$16385\r\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "ERR Protocol error: unauthenticated bulk length"
        );
        // Over the general limits it is the general error, as in Redis.
        assert_eq!(
            unauth().parse(b"*1\r\n$536870913\r\n"),
            Err(ProtocolError::InvalidBulkLength)
        );
        // A huge MSET is refused from its first big argument's header, before any
        // payload: nothing of it is held.
        let mut p = unauth();
        let mset = b"*3\r\n$4\r\nMSET\r\n$1\r\nk\r\n$1500000000\r\n";
        assert_eq!(
            p.parse(mset),
            Err(ProtocolError::InvalidBulkLength),
            "over proto-max-bulk-len"
        );
        let mut p = unauth();
        let mset = b"*3\r\n$4\r\nMSET\r\n$1\r\nk\r\n$100000\r\n";
        assert_eq!(p.parse(mset), Err(ProtocolError::UnauthenticatedBulkLength));
        // Authenticated, the same request is fine; AUTH itself is small.
        let mut p = unauth();
        let auth = b"*2\r\n$4\r\nAUTH\r\n$2\r\npw\r\n";
        assert_eq!(
            p.parse(auth),
            Ok(Some((args(&[b"AUTH", b"pw"]), auth.len())))
        );
        p.set_authenticated(true);
        assert_eq!(p.parse(b"*11\r\n"), Ok(None));
    }

    /// The pipeline hint: the keys of the GETs in front, nothing past the first other or
    /// incomplete request, never more than `PEEK_KEYS`, and no panic or allocation on
    /// made-up lengths.
    #[test]
    fn peek_keys_finds_the_gets_in_front() {
        let get = |k: &str| format!("*2\r\n$3\r\nGET\r\n${}\r\n{k}\r\n", k.len());
        let mut buf = get("a") + &get("key:000000000042") + "*2\r\n$3\r\nget\r\n$0\r\n\r\n";
        buf += "*3\r\n$3\r\nSET\r\n$1\r\nb\r\n$1\r\nv\r\n";
        buf += &get("after-a-set");
        let keys: Vec<&[u8]> = vec![b"a", b"key:000000000042", b""];
        assert_eq!(peek_keys(buf.as_bytes()), keys);
        // An incomplete request ends the peek; so does anything but a RESP array.
        let cut = get("a") + &get("bb")[..10];
        assert_eq!(peek_keys(cut.as_bytes()), vec![&b"a"[..]]);
        assert!(peek_keys(b"GET a\r\n").is_empty());
        assert!(peek_keys(b"").is_empty());
        for bad in [
            "*2\r\n$3\r\nGET\r\n$99999999999999999999\r\nk\r\n",
            "*2\r\n$3\r\nGET\r\n$18446744073709551615\r\nk\r\n",
            "*2\r\n$3\r\nGET\r\n$-1\r\n",
            "*2\r\n$3\r\nGET\r\n$1\r\nkXX",
            "*3\r\n$3\r\nGET\r\n$1\r\nk\r\n",
            "*2\r\n$4\r\nGETX\r\n$1\r\nk\r\n",
        ] {
            assert!(peek_keys(bad.as_bytes()).is_empty(), "{bad:?}");
        }
        let many = get("k").repeat(PEEK_KEYS + 5);
        assert_eq!(peek_keys(many.as_bytes()).len(), PEEK_KEYS);
    }

    #[test]
    fn released_bytes_are_held_once() {
        // A request of many arguments arriving in small pieces: with released bytes
        // dropped, buffer plus copied-out arguments stay about the request's size.
        let mut req = b"*201\r\n$4\r\nMSET\r\n".to_vec();
        for i in 0..100 {
            req.extend_from_slice(format!("$3\r\nk{i:02}\r\n$100\r\n").as_bytes());
            req.extend_from_slice(&[b'v'; 100]);
            req.extend_from_slice(b"\r\n");
        }
        let chunks: Vec<&[u8]> = req.chunks(7).collect();
        let (requests, peak) = drive_releasing(Limits::default(), &chunks).unwrap();
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].len(), 201);
        let payload: usize = requests[0].iter().map(Vec::len).sum();
        assert!(peak <= payload + 7 + 16, "peak {peak}, payload {payload}");

        // buffered() counts the copied-out arguments of the unfinished request.
        let mut p = RequestParser::new(Limits::default());
        let part = b"*3\r\n$3\r\nSET\r\n$5\r\nhello\r\n$10\r\nabc";
        assert_eq!(p.parse(part), Ok(None));
        assert_eq!(p.buffered(), 8);
        let n = p.release();
        // The header of the argument being read is done with too.
        assert_eq!(&part[n..], b"abc");
        assert_eq!(p.release(), 0, "released bytes are forgotten");
        let mut rest = part[n..].to_vec();
        rest.extend_from_slice(b"defghij\r\n");
        let done = p.parse(&rest).unwrap().unwrap();
        assert_eq!(done, (args(&[b"SET", b"hello", b"abcdefghij"]), rest.len()));
        assert_eq!(p.buffered(), 0);
        // Nothing to release between requests (blank lines stay counted).
        assert_eq!(p.parse(b"\r\n\r\n"), Ok(None));
        assert_eq!(p.release(), 0);
    }

    #[test]
    fn unbounded_limits_do_not_wrap() {
        let limits = Limits {
            max_inline_len: usize::MAX,
            max_bulk_len: usize::MAX,
            max_array_len: usize::MAX,
            max_query_buffer: usize::MAX,
        };
        let input = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\n";
        assert_eq!(
            drive_all_splits(limits, input),
            Ok((vec![args(&[b"GET", b"k"]), args(&[b"PING"])], 0))
        );
    }

    #[test]
    fn a_huge_announced_array_reserves_little() {
        let mut p = RequestParser::new(Limits::default());
        assert_eq!(p.parse(b"*1048576\r\n").unwrap(), None);
        assert!(p.args.capacity() <= ARGS_PREALLOC);
    }

    #[test]
    fn parse_i64_is_redis_string2ll() {
        assert_eq!(parse_i64(b"0"), Some(0));
        assert_eq!(parse_i64(b"-1"), Some(-1));
        assert_eq!(parse_i64(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_i64(b"-9223372036854775808"), Some(i64::MIN));
        for bad in [
            &b""[..],
            b"-",
            b"-0",
            b"00",
            b"01",
            b"+1",
            b" 1",
            b"1 ",
            b"9223372036854775808",
            b"1a",
        ] {
            assert_eq!(parse_i64(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn find_byte_finds_near_and_far() {
        let mut hay = vec![b'a'; 100];
        assert_eq!(find_byte(&hay, 0, b'\n'), None);
        hay[3] = b'\n';
        hay[70] = b'\n';
        hay[99] = b'\n';
        assert_eq!(find_byte(&hay, 0, b'\n'), Some(3));
        assert_eq!(find_byte(&hay, 4, b'\n'), Some(70));
        assert_eq!(find_byte(&hay, 71, b'\n'), Some(99));
        assert_eq!(find_byte(&hay, 100, b'\n'), None);
        assert_eq!(find_byte(&hay, 200, b'\n'), None);
    }

    fn encoded(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut out = Vec::new();
        f(&mut out);
        out
    }

    #[test]
    fn encoders_write_exact_bytes() {
        use Proto::{Resp2, Resp3};
        let cases: Vec<(Vec<u8>, &[u8])> = vec![
            (encoded(|o| write_simple(o, "OK")), b"+OK\r\n"),
            (encoded(|o| write_simple(o, "a\r\nb")), b"+a  b\r\n"),
            (
                encoded(|o| write_error(o, "ERR unknown command 'x'")),
                b"-ERR unknown command 'x'\r\n",
            ),
            (
                encoded(|o| write_error(o, "ERR bad\nthing\r")),
                b"-ERR bad thing \r\n",
            ),
            (encoded(|o| write_integer(o, 0)), b":0\r\n"),
            (encoded(|o| write_integer(o, 7)), b":7\r\n"),
            (encoded(|o| write_integer(o, 42)), b":42\r\n"),
            (encoded(|o| write_integer(o, -1234567)), b":-1234567\r\n"),
            (
                encoded(|o| write_integer(o, i64::MAX)),
                b":9223372036854775807\r\n",
            ),
            (
                encoded(|o| write_integer(o, i64::MIN)),
                b":-9223372036854775808\r\n",
            ),
            (encoded(|o| write_bulk(o, b"")), b"$0\r\n\r\n"),
            (encoded(|o| write_bulk(o, b"a\r\nb")), b"$4\r\na\r\nb\r\n"),
            (encoded(|o| write_null(o, Resp2)), b"$-1\r\n"),
            (encoded(|o| write_null(o, Resp3)), b"_\r\n"),
            (encoded(|o| write_null_array(o, Resp2)), b"*-1\r\n"),
            (encoded(|o| write_null_array(o, Resp3)), b"_\r\n"),
            (encoded(|o| write_array_len(o, 3)), b"*3\r\n"),
            (encoded(|o| write_map_len(o, 2, Resp2)), b"*4\r\n"),
            (encoded(|o| write_map_len(o, 2, Resp3)), b"%2\r\n"),
            (encoded(|o| write_set_len(o, 5, Resp2)), b"*5\r\n"),
            (encoded(|o| write_set_len(o, 5, Resp3)), b"~5\r\n"),
            (encoded(|o| write_bool(o, true, Resp3)), b"#t\r\n"),
            (encoded(|o| write_bool(o, false, Resp3)), b"#f\r\n"),
            (encoded(|o| write_bool(o, true, Resp2)), b":1\r\n"),
            (encoded(|o| write_bool(o, false, Resp2)), b":0\r\n"),
            (
                encoded(|o| write_verbatim(o, "txt", b"hi", Resp3)),
                b"=6\r\ntxt:hi\r\n",
            ),
            (
                encoded(|o| write_verbatim(o, "md", b"x", Resp3)),
                b"=5\r\nmd :x\r\n",
            ),
            (
                encoded(|o| write_verbatim(o, "markdown", b"", Resp3)),
                b"=4\r\nmar:\r\n",
            ),
            (
                encoded(|o| write_verbatim(o, "txt", b"hi", Resp2)),
                b"$2\r\nhi\r\n",
            ),
            (
                encoded(|o| encode_command(&[b"SET", b"k", b""], o)),
                b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n",
            ),
            (encoded(|o| encode_command(&[], o)), b"*0\r\n"),
        ];
        for (got, want) in cases {
            assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(want));
        }
    }

    #[test]
    fn integers_format_at_every_width() {
        let mut v: i64 = 1;
        for _ in 0..19 {
            for n in [v - 1, v, v + 1, -v, -(v - 1), -(v + 1)] {
                let mut out = Vec::new();
                write_integer(&mut out, n);
                assert_eq!(out, format!(":{n}\r\n").into_bytes());
            }
            v = v.saturating_mul(10);
        }
    }

    #[test]
    fn doubles_are_written_as_redis_writes_them() {
        let cases: &[(f64, &str)] = &[
            (1.5, "1.5"),
            (3.0, "3"),
            (-42.0, "-42"),
            (0.0, "0"),
            (-0.0, "-0"),
            (f64::INFINITY, "inf"),
            (f64::NEG_INFINITY, "-inf"),
            (f64::NAN, "nan"),
            (0.1, "0.1"),
            (-0.25, "-0.25"),
            (123.456, "123.456"),
            (3e-5, "0.00003"),
            (1.5e-7, "1.5e-7"),
            (-1.5e-7, "-1.5e-7"),
            (1e21, "1e+21"),
            (1.5e20, "1.5e+20"),
            (1e100, "1e+100"),
            (1.2345e300, "1.2345e+300"),
            (1e-300, "1e-300"),
            (5e-324, "5e-324"),
            (f64::MAX, "1.7976931348623157e+308"),
            (4611686018427387904.0, "4611686018427387904"),
            (1e19, "1e+19"),
            (1.2345678901234567e19, "12345678901234567000"),
            (-1.2345678901234567e19, "-12345678901234567000"),
            (0.3333333333333333, "0.3333333333333333"),
            (1234567.125, "1234567.125"),
        ];
        for &(d, text) in cases {
            let mut out = Vec::new();
            write_double(&mut out, d, Proto::Resp3);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                format!(",{text}\r\n"),
                "{d:e}"
            );
            let mut out = Vec::new();
            write_double(&mut out, d, Proto::Resp2);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                format!("${}\r\n{text}\r\n", text.len())
            );
            if !d.is_nan() {
                assert_eq!(text.parse::<f64>().unwrap(), d, "{text} reads back");
            }
        }
    }

    /// One value of every variant, nested in every aggregate.
    fn all_values() -> Vec<Value> {
        let scalars = vec![
            Value::Simple("OK".into()),
            Value::Error("ERR boom".into()),
            Value::Integer(-12),
            Value::Bulk(b"bin\r\n\0ary".to_vec()),
            Value::Bulk(Vec::new()),
            Value::Null,
            Value::Double(1.5),
            Value::Double(f64::INFINITY),
            Value::Double(-2.5e-9),
            Value::Boolean(true),
            Value::Boolean(false),
            Value::Verbatim {
                format: "txt".into(),
                text: b"a\r\nb".to_vec(),
            },
            Value::BigNumber("-3492890328409238509324850943850943825024385".into()),
        ];
        let mut all = scalars.clone();
        all.push(Value::Array(scalars.clone()));
        all.push(Value::Array(Vec::new()));
        all.push(Value::Set(scalars.clone()));
        all.push(Value::Push(vec![
            Value::Bulk(b"message".to_vec()),
            Value::Array(scalars.clone()),
        ]));
        all.push(Value::Map(
            scalars
                .iter()
                .cloned()
                .zip(scalars.iter().rev().cloned())
                .collect(),
        ));
        all.push(Value::Map(vec![(
            Value::Simple("nested".into()),
            Value::Array(vec![Value::Map(vec![(
                Value::Integer(1),
                Value::Set(vec![Value::Null]),
            )])]),
        )]));
        all
    }

    #[test]
    fn parse_value_round_trips_every_variant() {
        for value in all_values() {
            let mut bytes = Vec::new();
            encode_value(&value, &mut bytes);
            assert_eq!(
                parse_value(&bytes),
                Ok(Some((value.clone(), bytes.len()))),
                "{value:?}"
            );
            // Followed by more: only the first value is consumed.
            let mut two = bytes.clone();
            two.extend_from_slice(b"+next\r\n");
            assert_eq!(parse_value(&two), Ok(Some((value.clone(), bytes.len()))));
            // Every proper prefix is incomplete, never an error.
            for cut in 0..bytes.len() {
                assert_eq!(
                    parse_value(&bytes[..cut]),
                    Ok(None),
                    "{value:?} cut at {cut}"
                );
            }
        }
        let mut nan = Vec::new();
        encode_value(&Value::Double(f64::NAN), &mut nan);
        assert!(matches!(parse_value(&nan), Ok(Some((Value::Double(d), 6))) if d.is_nan()));
    }

    #[test]
    fn resp2_encoding_degrades_resp3_types() {
        let value = Value::Array(vec![
            Value::Null,
            Value::Map(vec![(Value::Bulk(b"k".to_vec()), Value::Boolean(true))]),
            Value::Set(vec![Value::Double(2.5)]),
            Value::Verbatim {
                format: "txt".into(),
                text: b"v".to_vec(),
            },
            Value::BigNumber("12".into()),
            Value::Push(vec![]),
        ]);
        let mut out = Vec::new();
        encode_value_proto(&value, Proto::Resp2, &mut out);
        let want: &[u8] =
            b"*6\r\n$-1\r\n*2\r\n$1\r\nk\r\n:1\r\n*1\r\n$3\r\n2.5\r\n$1\r\nv\r\n$2\r\n12\r\n*0\r\n";
        assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(want));
    }

    #[test]
    fn parse_value_reads_resp2_nulls_attributes_and_blob_errors() {
        assert_eq!(parse_value(b"$-1\r\n"), Ok(Some((Value::Null, 5))));
        assert_eq!(parse_value(b"*-1\r\n"), Ok(Some((Value::Null, 5))));
        assert_eq!(parse_value(b"_\r\n"), Ok(Some((Value::Null, 3))));
        assert_eq!(
            parse_value(b"!5\r\nERR x\r\n"),
            Ok(Some((Value::Error("ERR x".into()), 11)))
        );
        let attr = b"|1\r\n+key-popularity\r\n%1\r\n$1\r\na\r\n,0.19\r\n:5\r\n";
        assert_eq!(parse_value(attr), Ok(Some((Value::Integer(5), attr.len()))));
        for cut in 0..attr.len() {
            assert_eq!(parse_value(&attr[..cut]), Ok(None));
        }
        let inside = b"*2\r\n|1\r\n+a\r\n+b\r\n:1\r\n:2\r\n";
        assert_eq!(
            parse_value(inside),
            Ok(Some((
                Value::Array(vec![Value::Integer(1), Value::Integer(2)]),
                inside.len()
            )))
        );
    }

    #[test]
    fn parse_value_refuses_garbage() {
        let bad = |what| ProtocolError::InvalidReply(what);
        let cases: &[(&[u8], ProtocolError)] = &[
            (b"?foo\r\n", ProtocolError::InvalidReplyType(b'?')),
            (b"PING\r\n", ProtocolError::InvalidReplyType(b'P')),
            (b":abc\r\n", bad("integer")),
            (b":1\rx", bad("line ending")),
            (b"$abc\r\n", bad("length")),
            (b"$-2\r\n", bad("length")),
            (b"%-1\r\n", bad("length")),
            (b"$3\r\nfooXY", bad("bulk string ending")),
            (b"$3\r\nfooX", bad("bulk string ending")),
            (b"#x\r\n", bad("boolean")),
            (b",abc\r\n", bad("double")),
            (b"(12a\r\n", bad("big number")),
            (b"_x\r\n", bad("null")),
            (b"=3\r\ntxt\r\n", bad("verbatim string")),
            (b"=5\r\ntxt!x\r\n", bad("verbatim string")),
            (b"*2\r\n:1\r\n?\r\n", ProtocolError::InvalidReplyType(b'?')),
        ];
        for (input, error) in cases {
            assert_eq!(
                parse_value(input),
                Err(error.clone()),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        assert_eq!(
            ProtocolError::InvalidReply("integer").to_string(),
            "ERR Protocol error: invalid integer in reply"
        );
    }

    #[test]
    fn parse_value_limits_nesting() {
        let nested = |depth: usize| {
            let mut bytes = b"*1\r\n".repeat(depth);
            bytes.extend_from_slice(b":1\r\n");
            bytes
        };
        let ok = nested(MAX_REPLY_DEPTH);
        assert!(matches!(parse_value(&ok), Ok(Some((_, n))) if n == ok.len()));
        assert_eq!(
            parse_value(&nested(MAX_REPLY_DEPTH + 1)),
            Err(ProtocolError::ReplyTooDeep)
        );
        assert_eq!(
            parse_value(&nested(100_000)),
            Err(ProtocolError::ReplyTooDeep)
        );
        // A huge announced length costs nothing until its elements arrive.
        assert_eq!(parse_value(b"*9223372036854775807\r\n:1\r\n"), Ok(None));
        assert_eq!(parse_value(b"$9223372036854775807\r\nabc"), Ok(None));
    }

    #[test]
    fn encoded_commands_parse_back_as_requests() {
        let cmd: &[&[u8]] = &[b"MSET", b"a b", b"\r\n", b"", b"\xff\x00"];
        let mut bytes = Vec::new();
        encode_command(cmd, &mut bytes);
        let expected: Requests = vec![cmd.iter().map(|a| a.to_vec()).collect()];
        assert_eq!(
            drive_all_splits(Limits::default(), &bytes),
            Ok((expected, 0))
        );
        let parsed = parse_value(&bytes).unwrap().unwrap().0;
        assert_eq!(
            parsed,
            Value::Array(cmd.iter().map(|a| Value::Bulk(a.to_vec())).collect())
        );
    }
}
