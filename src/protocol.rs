//! RESP2/RESP3 and inline protocol: a pure codec (bytes in, frames out).
//! (Skeleton: interface fixed, bodies being written.)

use std::fmt;

/// Limits on what one request may contain (see DESIGN.md "Limits on bad input").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest inline command line, in bytes (Redis: 64 KiB).
    pub max_inline_len: usize,
    /// Longest bulk string, in bytes (`--proto-max-bulk-len`, Redis: 512 MiB).
    pub max_bulk_len: usize,
    /// Most elements in one multibulk request (Redis: 1M... we use 1024*1024).
    pub max_array_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_inline_len: 64 * 1024,
            max_bulk_len: 512 * 1024 * 1024,
            max_array_len: 1024 * 1024,
        }
    }
}

/// A request that cannot be parsed. `Display` gives the Redis wording of the
/// error reply without the leading `-` (e.g. `ERR Protocol error: invalid bulk length`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    InvalidMultibulkLength,
    InvalidBulkLength,
    ExpectedDollar(u8),
    UnbalancedQuotes,
    TooBigInlineRequest,
    TooBigMultibulkCount,
    TooBigBulkCount,
    /// Bulk payload not followed by CRLF.
    MissingCrlf,
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, _f: &mut fmt::Formatter<'_>) -> fmt::Result {
        todo!()
    }
}

impl std::error::Error for ProtocolError {}

/// Incremental request parser: RESP2 multibulk (`*N\r\n$len\r\n…`) and inline
/// commands (`SET k "v"\r\n`, as nc/telnet send them).
#[derive(Debug)]
pub struct RequestParser {
    limits: Limits,
}

impl RequestParser {
    pub fn new(limits: Limits) -> Self {
        RequestParser { limits }
    }

    /// Parse one request from the front of `buf`.
    /// `Ok(Some((args, consumed)))`: a whole request; the caller drains `consumed` bytes.
    /// `Ok(None)`: incomplete; call again with the same bytes plus more.
    /// Empty inline lines are consumed and skipped (returns the next request or None).
    pub fn parse(&mut self, _buf: &[u8]) -> Result<Option<(Vec<Vec<u8>>, usize)>, ProtocolError> {
        let _ = self.limits;
        todo!()
    }
}

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
    Verbatim { format: String, text: Vec<u8> },
    BigNumber(String),
    Push(Vec<Value>),
}
