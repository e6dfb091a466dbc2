//! The write-ahead log: record codec, segment files, snapshots, the meta file, the data
//! directory's lock, recovery and repair.
//!
//! Every write becomes an [`Entry`] (log index, epoch, the leader's clock, an [`Op`]) and is
//! appended to the current segment file before the map changes. The operation is the state
//! machine's type: this module frames entries and leaves the operation's own bytes to its
//! codec ([`crate::db::op`]). Data enters as entries
//! pushed into a [`BatchBuf`] (the store's group commit encodes many writers' entries into
//! one) and written by [`Wal::append`]; it leaves through [`Wal::open`], which replays the
//! newest snapshot and then every later entry, in index order, through a callback.
//!
//! # On-disk format (version 2)
//!
//! The data directory holds `snapshot-<index>.snap` files (a full image of the map at a log
//! index), `wal-<first index>.log` segments, `meta` ([`Meta`]: the commit index, and for
//! the cluster the epoch and vote) and `LOCK` ([`DirLock`]). A segment is a 16-byte header
//! (`KVLOG\0\0\x02` and a random per-segment salt) followed by batches, one per append (a
//! group commit, or a writer's own commit under `everysec`/`no`):
//!
//! ```text
//! batch   := 0xB8 | len: u32 LE | crc32(salt ++ len ++ body): u32 LE | body
//! body    := synced: u64 LE | count: u32 LE | record * count
//! record  := len: u32 LE | entry
//! entry   := version u8 (2) | index u64 | epoch u64 | ts_ms u64 | db u32 | op
//! op      := code u8 | fields            (0 Noop, 1 Set, 2 Del, 3 MSet, 4 IncrBy, 5 Cmd)
//!          | 6 | n: u32 LE | n × (db: u32 LE | op)     (written and read by `db/op.rs`)
//! ```
//!
//! `synced` is how far this segment had been fsync'd when the batch was written. The unit
//! of atomicity on disk is what one fsync covers, and a batch is never split across
//! fsyncs, so the checksum over a whole batch and that offset are what let recovery tell a
//! torn write from damage (below). The leading magic byte means a batch is never all
//! zeros, so the zero-filled tail a power cut can leave reads as torn, not as records. The
//! salt keeps a client's value, however crafted, from ever passing for a batch. Snapshots
//! and `meta` are written whole and atomically, as frames `0xB7 | len | crc32 | payload`.
//!
//! In an entry, `epoch` is the leader's term (the cluster's fencing token), `ts_ms` the
//! leader's wall clock when it accepted the write, which lets expiry be decided
//! deterministically on replay (see `store.rs`), and `db` the database (Redis's `SELECT`
//! index) the operation applies to. Commands that span databases name the others in their
//! arguments (`MOVE key 3`, `SWAPDB 0 1`, `COPY a b DB 2`); `FLUSHALL` empties every
//! database whatever its `db`.
//!
//! Code 6 is a MULTI/EXEC transaction ([`Op::Multi`]): one entry, so it is applied (and
//! will be replicated) whole or not at all; each of its ops names its own database (SELECT
//! may come between them). Its ops are never transactions themselves, and the decoder
//! refuses a count larger than the record could hold.
//!
//! A snapshot file (`KVSNP`, version 2) is the header, then frames: `M` (index, epoch,
//! key count), then for each database that has keys a `D` frame (db u32, its key count,
//! so loading can size its table once) followed by one `K` frame (deadline, key, value)
//! per key, and last `E` (the total count again). A version 1 snapshot, written before
//! databases existed, has no `D` frames: its keys are in database 0. Compaction streams
//! a snapshot to its file as it walks the map ([`SnapshotWriter`], chunk by chunk, the
//! counts known up front); [`encode_snapshot`] builds the same bytes in memory.
//!
//! # Limits
//!
//! [`MAX_ENTRY`] and [`MAX_BATCH`] bound what the writer writes and what the reader
//! accepts, in one place ([`Limits`]), so whatever the log accepts it reads back: an entry
//! over the limit is refused by [`BatchBuf::push`] before anything is written (the store
//! answers that write with an error and logs nothing of it).
//!
//! # Damage
//!
//! Recovery reads every batch. A bad batch (cut short, wrong magic, checksum mismatch) in
//! the last segment is a *torn tail* when no later valid batch records that the log was
//! fsync'd past it: the bytes were written after the last completed fsync, whatever order
//! their pages reached the disk in, so no acknowledged write under `--fsync always` is
//! there; recovery truncates them and logs a warning. Everything else is corruption, and
//! [`Wal::open`] refuses with [`WalError::Corrupt`], which names the file, the byte offset
//! and the cause, and points to `kvstore check-log`:
//! - a bad batch that a later batch proves was fsync'd, or one in a segment that is not the
//!   last (a segment is fsync'd before the next begins);
//! - a batch that passed its checksum but holds a record that does not decode;
//! - indexes that are not consecutive: a gap between segments, or a duplicate or backward
//!   index that no snapshot covers (two writers on one directory would leave that);
//! - a bad segment or snapshot header, or a damaged snapshot;
//! - a missing end: the segment that follows the newest snapshot is gone (compaction
//!   starts it before writing the snapshot), or the log ends before the commit index in
//!   `meta` (recorded at startup, at shutdown and once a second).
//!
//! What cannot be detected: the end of the log cut back or removed after the last time
//! `meta` recorded the commit index (up to a second of writes, or everything after a clean
//! shutdown if `meta` is removed with it), and a whole data directory replaced by an
//! older copy.
//!
//! # Files appear atomically
//!
//! New segments, snapshots and `meta` are written under a `.tmp` name, fsync'd, renamed,
//! and then the directory is fsync'd, so a crash leaves either the whole file or none
//! (stray `.tmp` files are removed at startup, and a failed write removes its own at once).

use byteorder::{ByteOrder, LittleEndian};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The operation type and its parts, re-exported from the state machine that owns them
/// (the log only frames their bytes).
pub use crate::db::{Condition, Expiry, Op};

/// First byte of every snapshot and meta frame.
pub const MAGIC: u8 = 0xB7;
/// First byte of every batch in a segment.
pub const BATCH_MAGIC: u8 = 0xB8;
/// Frame header: magic, length, crc.
pub const FRAME_HEADER: usize = 9;
/// Batch header: the frame header, then the fsync'd offset (u64) and the record count (u32).
pub const BATCH_HEADER: usize = FRAME_HEADER + 12;
/// Largest entry the log accepts, and so reads back. The server closes a client whose
/// request's arguments pass its input limit (Redis's `client-query-buffer-limit`, at most
/// 1 GiB), and such a request's entry is its arguments plus 4 bytes for each of at most 1M
/// arguments plus a small header (checked below), so one command always fits. What does
/// not is a transaction of several large commands: `Store::submit` refuses it before it
/// is logged.
pub const MAX_ENTRY: usize = (1 << 30) + (8 << 20);
/// Largest batch body, and largest snapshot or meta frame (a snapshot record holds a key
/// and a value, each of which may be up to an entry's size). Fits the u32 length.
pub const MAX_BATCH: usize = 2 * MAX_ENTRY;
// The largest request the server reads always fits one entry: its arguments (the query
// buffer limit, at most 1 GiB, counts their bytes), 4 bytes of length for each of at most
// 1M of them, and a few dozen bytes of entry header and canonical rewriting (EXPIRE's
// seconds become PEXPIREAT's milliseconds).
const _: () = assert!(
    MAX_ENTRY
        >= crate::protocol::DEFAULT_QUERY_BUFFER_LIMIT
            + 4 * crate::protocol::MAX_ARRAY_LEN
            + (64 << 10)
);
// A batch always has room for one entry at the limit, and its length fits the u32.
const _: () = assert!(MAX_BATCH >= MAX_ENTRY + BATCH_HEADER - FRAME_HEADER + 4);
const _: () = assert!(MAX_BATCH <= u32::MAX as usize);
const SEGMENT_MAGIC: &[u8; 8] = b"KVLOG\x00\x00\x02";
/// Segment header: magic and format version, then the segment's salt (u64).
const SEGMENT_HEADER_LEN: usize = 16;
const SNAPSHOT_HEADER: &[u8; 8] = b"KVSNP\x00\x00\x02";
/// Snapshots written before databases existed: no `D` frames, every key in database 0.
const SNAPSHOT_HEADER_V1: &[u8; 8] = b"KVSNP\x00\x00\x01";
const META_HEADER: &[u8; 8] = b"KVMETA\x00\x01";
const ENTRY_VERSION: u8 = 2;
/// Entries written before databases existed: no `db` field (database 0).
const ENTRY_VERSION_V1: u8 = 1;

/// When the log is fsync'd (`--fsync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Before any reply that depends on the write (group commit shares one fsync).
    Always,
    /// Once a second from a background thread: a power cut loses up to about a second.
    EverySec,
    /// Never explicitly: the OS decides. A kill -9 loses nothing, a power cut may.
    No,
}

impl std::str::FromStr for FsyncPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "always" => Ok(FsyncPolicy::Always),
            "everysec" => Ok(FsyncPolicy::EverySec),
            "no" => Ok(FsyncPolicy::No),
            _ => Err(format!(
                "invalid fsync policy '{s}' (expected always, everysec or no)"
            )),
        }
    }
}

impl fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FsyncPolicy::Always => "always",
            FsyncPolicy::EverySec => "everysec",
            FsyncPolicy::No => "no",
        })
    }
}

/// One log record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub index: u64,
    pub epoch: u64,
    /// The leader's wall clock (Unix ms) when it accepted the write.
    pub ts_ms: u64,
    /// The database (`SELECT` index) `op` applies to.
    pub db: u32,
    pub op: Op,
}

/// What can go wrong with the log.
#[derive(Debug)]
pub enum WalError {
    Io {
        path: PathBuf,
        source: io::Error,
    },
    /// Damage that is not a torn tail: the node refuses to start.
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    /// Another process has the data directory open.
    Locked {
        dir: PathBuf,
        pid: Option<u32>,
    },
}

impl WalError {
    fn io(path: &Path, source: io::Error) -> WalError {
        WalError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

impl fmt::Display for WalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            WalError::Corrupt {
                path,
                offset,
                reason,
            } => {
                let dir = if path.is_dir() {
                    path.as_path()
                } else {
                    path.parent().unwrap_or(Path::new("."))
                };
                write!(
                    f,
                    "log corrupted in {} at byte offset {offset}: {reason}. Refusing to \
                     start: inspect it with `kvstore check-log {}`",
                    path.display(),
                    dir.display()
                )
            }
            WalError::Locked { dir, pid } => {
                write!(
                    f,
                    "data directory {} is in use by another kvstore process",
                    dir.display()
                )?;
                match pid {
                    Some(pid) => write!(f, " (pid {pid})"),
                    None => Ok(()),
                }?;
                f.write_str(
                    ": one directory serves one node at a time (give each node its own \
                     --data-dir)",
                )
            }
        }
    }
}

impl std::error::Error for WalError {}

// ---------------------------------------------------------------------------------------
// Codec

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_u32(out, b.len() as u32);
    out.extend_from_slice(b);
}

/// Appends one frame holding `payload_fn`'s output to `out` (snapshots and the meta file).
fn frame(out: &mut Vec<u8>, payload_fn: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[MAGIC, 0, 0, 0, 0, 0, 0, 0, 0]);
    payload_fn(out);
    let len = (out.len() - start - FRAME_HEADER) as u32;
    LittleEndian::write_u32(&mut out[start + 1..start + 5], len);
    let mut h = crc32fast::Hasher::new();
    h.update(&out[start + 1..start + 5]);
    h.update(&out[start + FRAME_HEADER..]);
    let crc = h.finalize();
    LittleEndian::write_u32(&mut out[start + 5..start + 9], crc);
}

/// Appends `entry` as a record (`len | payload`) to `out`, as it sits inside a batch.
pub fn encode_entry(entry: &Entry, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    encode_payload(entry, out);
    let len = (out.len() - start - 4) as u32;
    LittleEndian::write_u32(&mut out[start..start + 4], len);
}

/// The bytes of one entry (what a record's length counts and `decode_entry` reads).
pub fn encode_payload(entry: &Entry, p: &mut Vec<u8>) {
    p.push(ENTRY_VERSION);
    put_u64(p, entry.index);
    put_u64(p, entry.epoch);
    put_u64(p, entry.ts_ms);
    put_u32(p, entry.db);
    crate::db::op::encode(&entry.op, p);
}

/// A cursor over a payload that reports truncation instead of panicking.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.buf.len() - self.pos < n {
            return Err(format!("record truncated at payload byte {}", self.pos));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(LittleEndian::read_u32(self.take(4)?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(LittleEndian::read_u64(self.take(8)?))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, String> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn done(&self) -> Result<(), String> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(format!(
                "{} unexpected bytes after the record",
                self.buf.len() - self.pos
            ))
        }
    }
}

/// Decodes an entry payload (the bytes inside a frame).
pub fn decode_entry(payload: &[u8]) -> Result<Entry, String> {
    let mut r = Reader {
        buf: payload,
        pos: 0,
    };
    let version = r.u8()?;
    if version != ENTRY_VERSION && version != ENTRY_VERSION_V1 {
        return Err(format!("unknown record version {version}"));
    }
    let index = r.u64()?;
    let epoch = r.u64()?;
    let ts_ms = r.u64()?;
    let db = if version == ENTRY_VERSION_V1 {
        0
    } else {
        r.u32()?
    };
    let op = crate::db::op::decode(payload, r.pos)?;
    Ok(Entry {
        index,
        epoch,
        ts_ms,
        db,
        op,
    })
}

/// The outcome of reading one frame at the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameRead<'a> {
    /// A whole, checksummed frame: its payload and total length.
    Frame(&'a [u8], usize),
    /// The buffer ends inside the frame.
    Truncated,
    /// Not a valid frame: wrong magic, impossible length or CRC mismatch.
    Invalid(&'static str),
}

/// Reads the frame at the front of `buf`.
pub fn read_frame(buf: &[u8]) -> FrameRead<'_> {
    if buf.is_empty() {
        return FrameRead::Truncated;
    }
    if buf[0] != MAGIC {
        return FrameRead::Invalid("bad magic byte");
    }
    if buf.len() < FRAME_HEADER {
        return FrameRead::Truncated;
    }
    let len = LittleEndian::read_u32(&buf[1..5]) as usize;
    if len == 0 || len > MAX_BATCH {
        return FrameRead::Invalid("impossible record length");
    }
    if buf.len() < FRAME_HEADER + len {
        return FrameRead::Truncated;
    }
    let payload = &buf[FRAME_HEADER..FRAME_HEADER + len];
    let mut h = crc32fast::Hasher::new();
    h.update(&buf[1..5]);
    h.update(payload);
    if h.finalize() != LittleEndian::read_u32(&buf[5..9]) {
        return FrameRead::Invalid("checksum mismatch");
    }
    FrameRead::Frame(payload, FRAME_HEADER + len)
}

/// The size limits of the log, shared by the writer ([`BatchBuf::push`] refuses an entry
/// over `max_entry`, and starts a new batch before one would pass `max_batch`) and the
/// reader (which treats a larger length as damage). One place, so that whatever the log
/// accepts it can read back. Tests use small limits to hit the boundaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest entry payload.
    pub max_entry: usize,
    /// Largest batch body (and largest snapshot or meta frame).
    pub max_batch: usize,
}

impl Limits {
    /// The limits every log is written and read with.
    pub const DEFAULT: Limits = Limits {
        max_entry: MAX_ENTRY,
        max_batch: MAX_BATCH,
    };
}

/// An entry that the log refuses to hold (over [`Limits::max_entry`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryTooLarge {
    pub bytes: usize,
    pub limit: usize,
}

impl fmt::Display for EntryTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the write is too large for the log ({} bytes encoded, the limit is {})",
            self.bytes, self.limit
        )
    }
}

/// Entries encoded for one append, grouped into batch frames that [`Wal::append`] seals
/// (fills in the length, the fsync'd offset and the checksum) when it knows which segment
/// they go to. The store encodes into it under its queue lock, which fixes log order.
#[derive(Debug, Default)]
pub struct BatchBuf {
    buf: Vec<u8>,
    /// Start offset in `buf` and record count of each batch; the last one is open.
    batches: Vec<(usize, u32)>,
    last_index: u64,
    limits: Option<Limits>,
}

/// A point to [`BatchBuf::rollback`] to.
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    len: usize,
    batches: usize,
    last_count: u32,
    last_index: u64,
}

impl BatchBuf {
    /// A buffer with other limits than the default (tests).
    pub fn with_limits(limits: Limits) -> BatchBuf {
        BatchBuf {
            limits: Some(limits),
            ..BatchBuf::default()
        }
    }

    fn limits(&self) -> Limits {
        self.limits.unwrap_or(Limits::DEFAULT)
    }

    fn open_batch(&mut self) {
        self.batches.push((self.buf.len(), 0));
        self.buf.extend_from_slice(&[0; BATCH_HEADER]);
    }

    /// Encodes `entry` at the end of the open batch (or of a new one, if it would make the
    /// batch too large). Refuses, leaving the buffer as it was, an entry over the limit.
    pub fn push(&mut self, entry: &Entry) -> Result<(), EntryTooLarge> {
        let limits = self.limits();
        let mark = self.mark();
        if self.batches.is_empty() {
            self.open_batch();
        }
        let rec = self.buf.len();
        encode_entry(entry, &mut self.buf);
        let payload = self.buf.len() - rec - 4;
        if payload > limits.max_entry {
            self.rollback(mark);
            return Err(EntryTooLarge {
                bytes: payload,
                limit: limits.max_entry,
            });
        }
        let (start, count) = *self.batches.last().unwrap_or(&(0, 0));
        if count > 0 && self.buf.len() - start - FRAME_HEADER > limits.max_batch {
            let record = self.buf.split_off(rec);
            self.open_batch();
            self.buf.extend_from_slice(&record);
        }
        if let Some(last) = self.batches.last_mut() {
            last.1 += 1;
        }
        self.last_index = entry.index;
        Ok(())
    }

    /// Where the buffer is now.
    pub fn mark(&self) -> Mark {
        Mark {
            len: self.buf.len(),
            batches: self.batches.len(),
            last_count: self.batches.last().map_or(0, |b| b.1),
            last_index: self.last_index,
        }
    }

    /// Forgets every entry pushed since `m`.
    pub fn rollback(&mut self, m: Mark) {
        self.buf.truncate(m.len);
        self.batches.truncate(m.batches);
        if let Some(last) = self.batches.last_mut() {
            last.1 = m.last_count;
        }
        self.last_index = m.last_index;
    }

    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// Bytes encoded so far (headers included).
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Bytes the buffer can hold without growing.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Index of the last entry pushed.
    pub fn last_index(&self) -> u64 {
        self.last_index
    }

    /// Empties the buffer, keeping its capacity.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.batches.clear();
    }

    /// Fills in every batch header: `synced` is the segment offset up to which the log was
    /// fsync'd before these bytes were written, `salt` the segment's.
    fn seal(&mut self, synced: u64, salt: u64) -> &[u8] {
        for i in 0..self.batches.len() {
            let (start, count) = self.batches[i];
            let end = self.batches.get(i + 1).map_or(self.buf.len(), |b| b.0);
            let b = &mut self.buf[start..end];
            b[0] = BATCH_MAGIC;
            LittleEndian::write_u32(&mut b[1..5], (end - start - FRAME_HEADER) as u32);
            LittleEndian::write_u64(&mut b[9..17], synced);
            LittleEndian::write_u32(&mut b[17..21], count);
            let crc = batch_crc(salt, &b[1..5], &b[FRAME_HEADER..]);
            LittleEndian::write_u32(&mut b[5..9], crc);
        }
        &self.buf
    }
}

/// A batch's checksum: over the segment's salt, the length and the body. The salt (random
/// per segment, never sent to clients) means a client cannot store a value whose bytes
/// pass for a batch of this log, so nothing a client writes can make recovery mistake a
/// torn tail for corruption, or the other way round.
fn batch_crc(salt: u64, len: &[u8], body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&salt.to_le_bytes());
    h.update(len);
    h.update(body);
    h.finalize()
}

/// The outcome of reading one batch at the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum BatchRead<'a> {
    /// A whole, checksummed batch: the offset the log was fsync'd to before it was
    /// written, its record count, its records, and its total length.
    Batch {
        synced: u64,
        count: u32,
        records: &'a [u8],
        len: usize,
    },
    /// The buffer ends inside the batch.
    Truncated,
    /// Not a valid batch: wrong magic, impossible length or checksum mismatch.
    Invalid(&'static str),
}

/// Reads the batch at the front of `buf`, written to a segment with `salt`.
pub fn read_batch(buf: &[u8], salt: u64, limits: Limits) -> BatchRead<'_> {
    if buf.is_empty() {
        return BatchRead::Truncated;
    }
    if buf[0] != BATCH_MAGIC {
        return BatchRead::Invalid("bad magic byte");
    }
    if buf.len() < FRAME_HEADER {
        return BatchRead::Truncated;
    }
    let len = LittleEndian::read_u32(&buf[1..5]) as usize;
    if len < BATCH_HEADER - FRAME_HEADER || len > limits.max_batch {
        return BatchRead::Invalid("impossible batch length");
    }
    if buf.len() < FRAME_HEADER + len {
        return BatchRead::Truncated;
    }
    let body = &buf[FRAME_HEADER..FRAME_HEADER + len];
    if batch_crc(salt, &buf[1..5], body) != LittleEndian::read_u32(&buf[5..9]) {
        return BatchRead::Invalid("checksum mismatch");
    }
    BatchRead::Batch {
        synced: LittleEndian::read_u64(&body[0..8]),
        count: LittleEndian::read_u32(&body[8..12]),
        records: &body[12..],
        len: FRAME_HEADER + len,
    }
}

/// Splits a batch's records into entry payloads; an error names the record and why.
fn split_records(
    mut records: &[u8],
    count: u32,
    limits: Limits,
) -> impl Iterator<Item = Result<&[u8], String>> {
    let mut left = count;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed {
            return None;
        }
        if left == 0 {
            if records.is_empty() {
                return None;
            }
            failed = true;
            return Some(Err(format!(
                "{} bytes after the batch's {count} records",
                records.len()
            )));
        }
        let i = count - left;
        left -= 1;
        let fail = |why: String| Some(Err(format!("record {i} of the batch: {why}")));
        if records.len() < 4 {
            failed = true;
            return fail("cut short".into());
        }
        let len = LittleEndian::read_u32(&records[..4]) as usize;
        if len > limits.max_entry || len > records.len() - 4 {
            failed = true;
            return fail(format!("impossible length {len}"));
        }
        let payload = &records[4..4 + len];
        records = &records[4 + len..];
        Some(Ok(payload))
    })
}

// ---------------------------------------------------------------------------------------
// Files

fn segment_name(first_index: u64) -> String {
    format!("wal-{first_index:020}.log")
}
fn snapshot_name(index: u64) -> String {
    format!("snapshot-{index:020}.snap")
}
fn parse_numbered(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    name.strip_prefix(prefix)?
        .strip_suffix(suffix)?
        .parse()
        .ok()
}

/// fsyncs a directory so that renames and new names in it survive a power cut.
pub fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| WalError::io(dir, e))
}

/// Writes `bytes` to `dir/name` atomically: temp file, fsync, rename, fsync the directory.
/// A failed attempt removes its temp file at once (a full disk must not stay full of them).
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), WalError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let dst = dir.join(name);
    let written = File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .map_err(|e| WalError::io(&tmp, e));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    if let Err(e) = fs::rename(&tmp, &dst) {
        let _ = fs::remove_file(&tmp);
        return Err(WalError::io(&dst, e));
    }
    sync_dir(dir)
}

/// The files of a data directory, sorted.
#[derive(Debug, Default)]
struct Listing {
    /// (first index, path), ascending.
    segments: Vec<(u64, PathBuf)>,
    /// (index, path), ascending.
    snapshots: Vec<(u64, PathBuf)>,
    temps: Vec<PathBuf>,
}

fn list_dir(dir: &Path) -> Result<Listing, WalError> {
    let mut l = Listing::default();
    for ent in fs::read_dir(dir).map_err(|e| WalError::io(dir, e))? {
        let ent = ent.map_err(|e| WalError::io(dir, e))?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(".tmp") {
            l.temps.push(ent.path());
        } else if let Some(i) = parse_numbered(name, "wal-", ".log") {
            l.segments.push((i, ent.path()));
        } else if let Some(i) = parse_numbered(name, "snapshot-", ".snap") {
            l.snapshots.push((i, ent.path()));
        }
    }
    l.segments.sort();
    l.snapshots.sort();
    Ok(l)
}

fn read_file(path: &Path) -> Result<Vec<u8>, WalError> {
    let mut buf = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut buf))
        .map_err(|e| WalError::io(path, e))?;
    Ok(buf)
}

/// A segment's salt: random, so that no client can predict it (see [`batch_crc`]). std
/// has no random number generator, but its `RandomState` is seeded from the OS.
fn new_salt() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// The file a data directory's lock is held on.
pub const LOCK_FILE: &str = "LOCK";

/// An exclusive lock on a data directory, held for as long as this value lives (the
/// store keeps it with its log). Two processes appending to one log would each
/// acknowledge writes the other's recovery cannot see, so a second opener is refused,
/// with the holder's pid. `flock` locks go away with the process, so a kill -9 never
/// leaves a stale lock behind.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock on `dir`, or says who holds it. A holder in this same process is
    /// usually a store being dropped while one of its background threads finishes, so
    /// that case waits a little before giving up.
    pub fn acquire(dir: &Path) -> Result<DirLock, WalError> {
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| WalError::io(&path, e))?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            // SAFETY: flock on a descriptor we own; no memory is passed.
            let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if r == 0 {
                break;
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(WalError::io(&path, err));
            }
            let mut text = String::new();
            let _ = (&file).read_to_string(&mut text);
            let _ = (&file).seek(io::SeekFrom::Start(0));
            let pid = text.trim().parse::<u32>().ok();
            if pid != Some(std::process::id()) || std::time::Instant::now() >= deadline {
                return Err(WalError::Locked {
                    dir: dir.to_path_buf(),
                    pid,
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        file.set_len(0).map_err(|e| WalError::io(&path, e))?;
        file.write_all(format!("{}\n", std::process::id()).as_bytes())
            .map_err(|e| WalError::io(&path, e))?;
        Ok(DirLock { _file: file })
    }
}

/// The state that safety rests on and that the log itself cannot show: the commit index
/// (a log that ends before it lost acknowledged writes), and for the cluster the current
/// epoch and whom this node accepted as coordinator in it. Kept in `meta`, replaced
/// atomically.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Meta {
    pub epoch: u64,
    /// The node accepted as coordinator in `epoch` (0: none).
    pub voted_for: u64,
    /// Every entry up to here was committed (and, on this node, fsync'd).
    pub commit_index: u64,
}

/// The file [`Meta`] lives in.
pub const META_FILE: &str = "meta";

/// Writes `meta` to `dir` durably (temp file, fsync, rename, fsync the directory).
pub fn write_meta(dir: &Path, meta: &Meta) -> Result<(), WalError> {
    let mut out = META_HEADER.to_vec();
    frame(&mut out, |p| {
        put_u64(p, meta.epoch);
        put_u64(p, meta.voted_for);
        put_u64(p, meta.commit_index);
    });
    write_atomically(dir, META_FILE, &out)
}

/// Reads `dir`'s meta file; none yet is the default. It is replaced atomically, so any
/// damage is corruption.
pub fn read_meta(dir: &Path) -> Result<Meta, WalError> {
    let path = dir.join(META_FILE);
    let buf = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Meta::default()),
        Err(e) => return Err(WalError::io(&path, e)),
    };
    let corrupt = |reason: &str| WalError::Corrupt {
        path: path.clone(),
        offset: 0,
        reason: reason.into(),
    };
    if buf.len() < 8 || buf[..8] != *META_HEADER {
        return Err(corrupt("not a kvstore meta file (bad header)"));
    }
    match read_frame(&buf[8..]) {
        FrameRead::Frame(p, n) if p.len() == 24 && 8 + n == buf.len() => Ok(Meta {
            epoch: LittleEndian::read_u64(&p[0..8]),
            voted_for: LittleEndian::read_u64(&p[8..16]),
            commit_index: LittleEndian::read_u64(&p[16..24]),
        }),
        FrameRead::Invalid(why) => Err(corrupt(why)),
        _ => Err(corrupt("meta record has the wrong size")),
    }
}

/// One key of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotItem {
    /// The database the key is in.
    pub db: u32,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// Absolute expiry, Unix ms.
    pub expire_at_ms: Option<u64>,
}

/// Serialises a snapshot: header, one meta frame (index, epoch, count), per database a
/// `D` frame (its index and key count) and one frame per key, and a closing frame with
/// the count again so a truncated snapshot cannot pass as whole. `databases` holds each
/// database's index and its keys as (key, value, deadline); empty ones are left out.
pub fn encode_snapshot<'a, I>(index: u64, epoch: u64, databases: Vec<(u32, I)>) -> Vec<u8>
where
    I: ExactSizeIterator<Item = (&'a [u8], &'a [u8], Option<u64>)>,
{
    let count: u64 = databases.iter().map(|(_, keys)| keys.len() as u64).sum();
    let mut out = Vec::with_capacity(64 + (count as usize).saturating_mul(48));
    out.extend_from_slice(SNAPSHOT_HEADER);
    frame(&mut out, |p| {
        p.push(b'M');
        put_u64(p, index);
        put_u64(p, epoch);
        put_u64(p, count);
    });
    for (db, keys) in databases {
        if keys.len() == 0 {
            continue;
        }
        frame(&mut out, |p| {
            p.push(b'D');
            put_u32(p, db);
            put_u64(p, keys.len() as u64);
        });
        for (k, v, exp) in keys {
            frame(&mut out, |p| {
                p.push(b'K');
                put_u64(p, exp.unwrap_or(0));
                put_bytes(p, k);
                put_bytes(p, v);
            });
        }
    }
    frame(&mut out, |p| {
        p.push(b'E');
        put_u64(p, count);
    });
    out
}

/// Snapshot key frames encoded in memory: what the compaction thread gathers under the
/// store lock (a copy of a few dozen keys' bytes, cheaper than cloning their items) and
/// hands to [`SnapshotWriter::write`] after releasing it.
#[derive(Debug, Default)]
pub struct SnapshotChunk {
    buf: Vec<u8>,
    keys: u64,
}

impl SnapshotChunk {
    /// Appends one key's `K` frame (deadline 0: none).
    pub fn push(&mut self, key: &[u8], value: &[u8], expire_at: u64) {
        frame(&mut self.buf, |p| {
            p.push(b'K');
            put_u64(p, expire_at);
            put_bytes(p, key);
            put_bytes(p, value);
        });
        self.keys += 1;
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// Keys held.
    pub fn keys(&self) -> u64 {
        self.keys
    }
}

/// Writes a snapshot file as it is produced, in the format [`encode_snapshot`] builds in
/// memory (the bytes are the same), so that a compaction holds one chunk of it at a time
/// instead of the whole image. The counts are given up front: the total to
/// [`SnapshotWriter::create`] (the `M` frame), each database's to
/// [`SnapshotWriter::database`] (its `D` frame). [`SnapshotWriter::finish`] checks that
/// exactly that many keys were written, adds the `E` frame and makes the file appear
/// atomically (fsync, rename, fsync the directory). A writer dropped unfinished, or a
/// failed write or finish, removes its temp file at once.
#[derive(Debug)]
pub struct SnapshotWriter {
    dir: PathBuf,
    index: u64,
    tmp: PathBuf,
    /// `None` once finished (nothing left for `Drop` to remove).
    out: Option<io::BufWriter<File>>,
    count: u64,
    written: u64,
    bytes: u64,
}

impl SnapshotWriter {
    /// Starts `snapshot-<index>.snap` (as a temp file) holding `count` keys in all.
    pub fn create(dir: &Path, index: u64, epoch: u64, count: u64) -> Result<Self, WalError> {
        let tmp = dir.join(format!("{}.tmp", snapshot_name(index)));
        let file = File::create(&tmp).map_err(|e| WalError::io(&tmp, e))?;
        let mut w = SnapshotWriter {
            dir: dir.to_path_buf(),
            index,
            tmp,
            out: Some(io::BufWriter::with_capacity(1 << 20, file)),
            count,
            written: 0,
            bytes: 0,
        };
        let mut head = SNAPSHOT_HEADER.to_vec();
        frame(&mut head, |p| {
            p.push(b'M');
            put_u64(p, index);
            put_u64(p, epoch);
            put_u64(p, count);
        });
        w.put(&head)?;
        Ok(w)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), WalError> {
        let out = self.out.as_mut().ok_or_else(|| {
            WalError::io(&self.tmp, io::Error::other("snapshot already finished"))
        })?;
        out.write_all(bytes)
            .map_err(|e| WalError::io(&self.tmp, e))?;
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    /// Starts database `db`, whose `count` keys follow (leave out empty databases).
    pub fn database(&mut self, db: u32, count: u64) -> Result<(), WalError> {
        let mut d = Vec::with_capacity(32);
        frame(&mut d, |p| {
            p.push(b'D');
            put_u32(p, db);
            put_u64(p, count);
        });
        self.put(&d)
    }

    /// Writes the chunk's keys (to the current database) and empties it.
    pub fn write(&mut self, chunk: &mut SnapshotChunk) -> Result<(), WalError> {
        self.put(&chunk.buf)?;
        self.written += chunk.keys;
        chunk.buf.clear();
        chunk.keys = 0;
        Ok(())
    }

    /// Ends the snapshot: checks the key count, writes the `E` frame, fsyncs, renames
    /// the file into place and fsyncs the directory. Returns the file's size.
    pub fn finish(mut self) -> Result<u64, WalError> {
        if self.written != self.count {
            return Err(WalError::io(
                &self.tmp,
                io::Error::other(format!(
                    "snapshot holds {} keys, its header says {}",
                    self.written, self.count
                )),
            ));
        }
        let mut end = Vec::with_capacity(32);
        frame(&mut end, |p| {
            p.push(b'E');
            put_u64(p, self.count);
        });
        self.put(&end)?;
        let Some(out) = self.out.as_mut() else {
            return Err(WalError::io(
                &self.tmp,
                io::Error::other("snapshot already finished"),
            ));
        };
        out.flush()
            .and_then(|()| out.get_ref().sync_all())
            .map_err(|e| WalError::io(&self.tmp, e))?;
        let dst = self.dir.join(snapshot_name(self.index));
        fs::rename(&self.tmp, &dst).map_err(|e| WalError::io(&dst, e))?;
        // In place: nothing for `Drop` to remove any more.
        self.out = None;
        sync_dir(&self.dir)?;
        Ok(self.bytes)
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// A decoded snapshot.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub index: u64,
    pub epoch: u64,
    pub items: Vec<SnapshotItem>,
}

/// What a snapshot yields as it is decoded: its header once, then every key.
#[derive(Debug)]
pub enum SnapshotPart {
    Header {
        index: u64,
        epoch: u64,
        count: u64,
    },
    /// The keys that follow, up to the next `Database`, are `count` keys of database
    /// `db` (the count is the snapshot's claim: use it as a hint, capped).
    Database {
        db: u32,
        count: u64,
    },
    Item(SnapshotItem),
    /// The last part: every key was handed over and the snapshot checked whole.
    End,
}

/// Decodes a snapshot file into memory, refusing anything short of a whole, checksummed
/// image.
pub fn decode_snapshot(path: &Path, buf: &[u8]) -> Result<Snapshot, WalError> {
    let mut snap = Snapshot::default();
    decode_snapshot_with(path, buf, |part| match part {
        SnapshotPart::Header { index, epoch, .. } => {
            snap.index = index;
            snap.epoch = epoch;
        }
        SnapshotPart::Item(it) => snap.items.push(it),
        SnapshotPart::Database { .. } | SnapshotPart::End => {}
    })?;
    Ok(snap)
}

/// Decodes a snapshot, handing each part to `on_part` as it goes (recovery inserts keys
/// straight into the map instead of building a second copy of the data set first).
/// Damage anywhere is an error, possibly after some parts were handed over: the caller
/// must then discard what it built.
pub fn decode_snapshot_with(
    path: &Path,
    buf: &[u8],
    mut on_part: impl FnMut(SnapshotPart),
) -> Result<(), WalError> {
    let corrupt = |offset: usize, reason: String| WalError::Corrupt {
        path: path.to_path_buf(),
        offset: offset as u64,
        reason,
    };
    if buf.len() < 8 || (&buf[..8] != SNAPSHOT_HEADER && &buf[..8] != SNAPSHOT_HEADER_V1) {
        return Err(corrupt(0, "not a kvstore snapshot (bad header)".into()));
    }
    let v1 = &buf[..8] == SNAPSHOT_HEADER_V1;
    let mut db = 0u32;
    let mut pos = 8;
    let mut expected = None;
    let mut seen = 0u64;
    loop {
        let (payload, n) = match read_frame(&buf[pos..]) {
            FrameRead::Frame(p, n) => (p, n),
            FrameRead::Truncated => return Err(corrupt(pos, "snapshot ends early".into())),
            FrameRead::Invalid(why) => return Err(corrupt(pos, why.into())),
        };
        let mut r = Reader {
            buf: payload,
            pos: 0,
        };
        let res: Result<bool, String> = (|| match r.u8()? {
            b'M' if expected.is_none() => {
                let index = r.u64()?;
                let epoch = r.u64()?;
                let count = r.u64()?;
                r.done()?;
                expected = Some(count);
                on_part(SnapshotPart::Header {
                    index,
                    epoch,
                    count,
                });
                Ok(false)
            }
            b'D' if expected.is_some() && !v1 => {
                db = r.u32()?;
                let count = r.u64()?;
                r.done()?;
                on_part(SnapshotPart::Database { db, count });
                Ok(false)
            }
            b'K' if expected.is_some() => {
                let exp = r.u64()?;
                let key = r.bytes()?;
                let value = r.bytes()?;
                r.done()?;
                seen += 1;
                on_part(SnapshotPart::Item(SnapshotItem {
                    db,
                    key,
                    value,
                    expire_at_ms: (exp != 0).then_some(exp),
                }));
                Ok(false)
            }
            b'E' if expected.is_some() => {
                let count = r.u64()?;
                r.done()?;
                if Some(count) != expected || count != seen {
                    return Err(format!(
                        "snapshot holds {seen} keys, its header says {expected:?}"
                    ));
                }
                Ok(true)
            }
            t => Err(format!("unexpected snapshot record type {t}")),
        })();
        match res {
            Ok(true) => {
                if pos + n != buf.len() {
                    return Err(corrupt(
                        pos + n,
                        "bytes after the end of the snapshot".into(),
                    ));
                }
                on_part(SnapshotPart::End);
                return Ok(());
            }
            Ok(false) => pos += n,
            Err(why) => return Err(corrupt(pos, why)),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Recovery and the writer

/// Settings of the log.
#[derive(Debug, Clone)]
pub struct WalOptions {
    pub fsync: FsyncPolicy,
    /// A segment that grows past this many bytes is closed and a new one started.
    pub segment_size: u64,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            fsync: FsyncPolicy::Always,
            segment_size: 64 << 20,
        }
    }
}

/// What recovery found, for logs and INFO.
#[derive(Debug, Default, Clone)]
pub struct RecoveryReport {
    pub snapshot_index: Option<u64>,
    pub entries_replayed: u64,
    pub last_index: u64,
    pub last_epoch: u64,
    /// (segment, offset, bytes dropped) if a torn tail was truncated.
    pub torn_tail: Option<(PathBuf, u64, u64)>,
    /// What the meta file holds.
    pub meta: Meta,
}

/// The append side of the log. Single-threaded: the store's group commit hands it to one
/// flushing thread at a time.
#[derive(Debug)]
pub struct Wal {
    dir: PathBuf,
    opts: WalOptions,
    /// The segment being appended to; shared with the `everysec` syncer, which fsyncs it
    /// without taking the writer's lock.
    file: Arc<File>,
    file_first_index: u64,
    file_len: u64,
    file_salt: u64,
    /// Bytes of the current segment known to be fsync'd: each batch records it, so that
    /// recovery can tell damage in fsync'd data (corruption) from a torn tail.
    synced_len: u64,
    /// Bytes in all segments (compaction compares this with the live data).
    log_bytes: u64,
    /// Index of the last entry written.
    last_index: u64,
    /// Index of the last entry known to be fsync'd.
    durable_index: u64,
    unsynced: bool,
    _lock: DirLock,
}

/// What the `everysec` syncer fsyncs: a segment, and what was written to it when taken.
#[derive(Debug)]
pub struct SyncHandle {
    pub file: Arc<File>,
    first_index: u64,
    len: u64,
    last_index: u64,
}

/// A read-only scan of one data directory (recovery and `check-log`).
struct Scan {
    report: RecoveryReport,
    /// The torn tail to cut: (path, offset).
    cut: Option<(PathBuf, u64)>,
    log_bytes: u64,
}

/// Why a segment's batch at some offset cannot be a torn write: a later valid batch
/// records that the log was fsync'd past it. Returns (offset of that batch, its claim).
fn fsync_proof(buf: &[u8], damage: usize, salt: u64) -> Option<(usize, u64)> {
    let mut pos = damage + 1;
    while pos < buf.len() {
        let rel = buf[pos..].iter().position(|&b| b == BATCH_MAGIC)?;
        pos += rel;
        if let BatchRead::Batch { synced, .. } = read_batch(&buf[pos..], salt, Limits::DEFAULT)
            && synced > damage as u64
            && synced <= pos as u64
        {
            return Some((pos, synced));
        }
        pos += 1;
    }
    None
}

/// Walks the directory: newest snapshot, then every segment, feeding `apply` in order.
/// Nothing is modified; the caller decides whether to truncate a torn tail.
fn scan(
    dir: &Path,
    listing: &Listing,
    mut on_snapshot: impl FnMut(SnapshotPart),
    mut apply: impl FnMut(Entry),
) -> Result<Scan, WalError> {
    let mut report = RecoveryReport {
        meta: read_meta(dir)?,
        ..RecoveryReport::default()
    };
    let mut next = 1u64;
    let mut snap_index = 0;
    let mut missing_after_snapshot: Option<PathBuf> = None;
    if let Some((_, path)) = listing.snapshots.last() {
        let mut header = (0, 0);
        decode_snapshot_with(path, &read_file(path)?, |part| {
            if let SnapshotPart::Header { index, epoch, .. } = &part {
                header = (*index, *epoch);
            }
            on_snapshot(part);
        })?;
        let (index, epoch) = header;
        report.snapshot_index = Some(index);
        report.last_index = index;
        report.last_epoch = epoch;
        snap_index = index;
        next = index + 1;
        // Compaction rolls to a new segment before writing the snapshot and prunes only
        // the segments it covers whole, so the log goes on right after the snapshot (a
        // segment starts at `index + 1`, or one holds that entry) unless someone removed
        // a segment, and the writes in it: checked once the segments are read.
        missing_after_snapshot = Some(path.clone());
        if listing.segments.iter().any(|(f, _)| *f == index + 1) {
            missing_after_snapshot = None;
        }
    }
    let mut cut = None;
    let mut log_bytes = 0;
    let nseg = listing.segments.len();
    for (si, (first, path)) in listing.segments.iter().enumerate() {
        let buf = read_file(path)?;
        log_bytes += buf.len() as u64;
        let last_segment = si + 1 == nseg;
        let corrupt = |offset: usize, reason: String| WalError::Corrupt {
            path: path.clone(),
            offset: offset as u64,
            reason,
        };
        if buf.len() < SEGMENT_HEADER_LEN {
            // A segment is created whole (header included) under a temporary name, so a
            // short one can only be damage.
            return Err(corrupt(
                0,
                "bad header: segment shorter than its header".into(),
            ));
        }
        if buf[..8] != *SEGMENT_MAGIC {
            return Err(corrupt(
                0,
                if buf[..5] == SEGMENT_MAGIC[..5] {
                    format!(
                        "bad header: log format version {} is not {} (written by another \
                         kvstore version)",
                        buf[7], SEGMENT_MAGIC[7]
                    )
                } else {
                    "bad header: not a kvstore log segment".into()
                },
            ));
        }
        let salt = LittleEndian::read_u64(&buf[8..16]);
        if *first > next {
            return Err(corrupt(
                0,
                format!(
                    "index gap: this segment starts at index {first} but the log before it \
                     ends at {} (a segment is missing or was cut short)",
                    next - 1
                ),
            ));
        }
        let mut seg_next = *first;
        let mut pos = SEGMENT_HEADER_LEN;
        while pos < buf.len() {
            let bad = match read_batch(&buf[pos..], salt, Limits::DEFAULT) {
                BatchRead::Batch {
                    synced,
                    count,
                    records,
                    len,
                } => {
                    if synced > pos as u64 || synced < SEGMENT_HEADER_LEN as u64 {
                        return Err(corrupt(
                            pos,
                            format!("bad batch: it claims the log was fsync'd to byte {synced}"),
                        ));
                    }
                    for payload in split_records(records, count, Limits::DEFAULT) {
                        let e = payload
                            .and_then(decode_entry)
                            .map_err(|why| corrupt(pos, format!("bad record: {why}")))?;
                        if e.index != seg_next {
                            return Err(corrupt(
                                pos,
                                format!(
                                    "index out of order: record has index {} but {seg_next} \
                                     was expected",
                                    e.index
                                ),
                            ));
                        }
                        seg_next += 1;
                        if e.index < next {
                            if e.index <= snap_index {
                                // Covered by the snapshot (compaction had not yet removed
                                // this segment).
                                continue;
                            }
                            return Err(corrupt(
                                pos,
                                format!(
                                    "duplicate index: record {} was already read from an \
                                     earlier segment and no snapshot covers it",
                                    e.index
                                ),
                            ));
                        }
                        if e.index == snap_index + 1 {
                            missing_after_snapshot = None;
                        }
                        next += 1;
                        report.last_index = e.index;
                        report.last_epoch = e.epoch;
                        report.entries_replayed += 1;
                        apply(e);
                    }
                    pos += len;
                    continue;
                }
                BatchRead::Truncated => "batch cut short".to_string(),
                BatchRead::Invalid(why) => why.to_string(),
            };
            // Damage at `pos`: a torn tail only if it is in the last segment and in bytes
            // written after the last fsync that completed. Every later batch records how
            // far the log had been fsync'd when it was written.
            if !last_segment {
                return Err(corrupt(
                    pos,
                    format!(
                        "{bad} in a segment that is not the last (it was fsync'd before the \
                         next one began)"
                    ),
                ));
            }
            if let Some((at, synced)) = fsync_proof(&buf, pos, salt) {
                return Err(corrupt(
                    pos,
                    format!(
                        "{bad}, in data that was fsync'd: the batch at offset {at} records \
                         that the log was on disk up to byte {synced}"
                    ),
                ));
            }
            report.torn_tail = Some((path.clone(), pos as u64, (buf.len() - pos) as u64));
            cut = Some((path.clone(), pos as u64));
            break;
        }
    }
    if let Some(snapshot) = missing_after_snapshot {
        return Err(WalError::Corrupt {
            path: dir.join(segment_name(snap_index + 1)),
            offset: 0,
            reason: format!(
                "the segment that follows snapshot {} is missing (the writes after the \
                 snapshot are gone)",
                snapshot.display()
            ),
        });
    }
    if report.last_index < report.meta.commit_index {
        let (path, offset) = match listing.segments.last() {
            Some((_, p)) => {
                let len = cut
                    .as_ref()
                    .map(|c| c.1)
                    .unwrap_or_else(|| fs::metadata(p).map_or(0, |m| m.len()));
                (p.clone(), len)
            }
            None => (dir.to_path_buf(), 0),
        };
        return Err(WalError::Corrupt {
            path,
            offset,
            reason: format!(
                "the log ends at index {} but {} records that index {} was committed: \
                 acknowledged writes are missing (a segment was removed or cut short)",
                report.last_index,
                dir.join(META_FILE).display(),
                report.meta.commit_index
            ),
        });
    }
    Ok(Scan {
        report,
        cut,
        log_bytes,
    })
}

impl Wal {
    /// Opens (creating if needed) the log in `dir`, locks it, replays it, and returns the
    /// writer. `on_snapshot` receives the newest snapshot, then `apply` every later entry
    /// in index order. A torn tail is truncated (with a warning); corruption is an error.
    pub fn open(
        dir: &Path,
        opts: WalOptions,
        on_snapshot: impl FnMut(SnapshotPart),
        apply: impl FnMut(Entry),
    ) -> Result<(Wal, RecoveryReport), WalError> {
        fs::create_dir_all(dir).map_err(|e| WalError::io(dir, e))?;
        let lock = DirLock::acquire(dir)?;
        let listing = list_dir(dir)?;
        for t in &listing.temps {
            log::warn!("removing leftover temporary file {}", t.display());
            fs::remove_file(t).map_err(|e| WalError::io(t, e))?;
        }
        let scan = scan(dir, &listing, on_snapshot, apply)?;
        if let Some((path, offset)) = &scan.cut {
            let (_, _, dropped) = scan.report.torn_tail.clone().unwrap_or_default();
            log::warn!(
                "torn write at the end of {} (byte offset {offset}, {dropped} bytes written \
                 after the last fsync): truncating it; every record before it is intact",
                path.display()
            );
            truncate(path, *offset)?;
        }
        let report = scan.report;
        let mut log_bytes = scan.log_bytes - report.torn_tail.as_ref().map_or(0, |t| t.2);
        let (file, first, len, salt) = match listing.segments.last() {
            Some((first, path)) => {
                let f = OpenOptions::new()
                    .read(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| WalError::io(path, e))?;
                let len = f.metadata().map_err(|e| WalError::io(path, e))?.len();
                let mut header = [0u8; SEGMENT_HEADER_LEN];
                f.read_exact_at(&mut header, 0)
                    .map_err(|e| WalError::io(path, e))?;
                (f, *first, len, LittleEndian::read_u64(&header[8..16]))
            }
            None => {
                let first = report.last_index + 1;
                let (f, len, salt) = create_segment(dir, first)?;
                log_bytes += len;
                (f, first, len, salt)
            }
        };
        // Everything recovered is on disk now: a torn tail was truncated and fsync'd, and
        // what a kill -9 left in the page cache is fsync'd here, so that the first batch
        // written from now on may say so.
        file.sync_data().map_err(|e| WalError::io(dir, e))?;
        let wal = Wal {
            dir: dir.to_path_buf(),
            opts,
            file: Arc::new(file),
            file_first_index: first,
            file_len: len,
            file_salt: salt,
            synced_len: len,
            log_bytes,
            last_index: report.last_index,
            durable_index: report.last_index,
            unsynced: false,
            _lock: lock,
        };
        Ok((wal, report))
    }

    /// Appends the entries of `batch` (sealing its batches for this segment) and fsyncs if
    /// the policy is `always`. Rolls to a new segment first if this one is full. The
    /// buffer is emptied either way.
    pub fn append(&mut self, batch: &mut BatchBuf) -> Result<(), WalError> {
        if batch.is_empty() {
            return Ok(());
        }
        let last_index = batch.last_index();
        if self.file_len >= self.opts.segment_size
            && let Err(e) = self.roll(self.last_index + 1)
        {
            batch.clear();
            return Err(e);
        }
        let path = self.current_path();
        let bytes = batch.seal(self.synced_len, self.file_salt);
        let n = bytes.len() as u64;
        let written = (&*self.file).write_all(bytes);
        batch.clear();
        written.map_err(|e| WalError::io(&path, e))?;
        self.file_len += n;
        self.log_bytes += n;
        self.last_index = last_index;
        self.unsynced = true;
        if self.opts.fsync == FsyncPolicy::Always {
            self.sync()?;
        }
        Ok(())
    }

    /// fsyncs the current segment (data only: its size is fixed by appends that fsync'd
    /// metadata when the file was created, and fdatasync covers size changes).
    pub fn sync(&mut self) -> Result<(), WalError> {
        if self.unsynced {
            let path = self.current_path();
            self.file.sync_data().map_err(|e| WalError::io(&path, e))?;
            self.unsynced = false;
            self.synced_len = self.file_len;
            self.durable_index = self.last_index;
        }
        Ok(())
    }

    /// For the `everysec` syncer: the current segment if it has unsynced writes. The
    /// caller fsyncs it without holding the writer, so appends go on meanwhile (a roll
    /// fsyncs the old segment itself), then reports back with [`Wal::synced`].
    pub fn take_sync_handle(&mut self) -> Option<SyncHandle> {
        std::mem::take(&mut self.unsynced).then(|| SyncHandle {
            file: self.file.clone(),
            first_index: self.file_first_index,
            len: self.file_len,
            last_index: self.last_index,
        })
    }

    /// Records that the fsync of `h` completed.
    pub fn synced(&mut self, h: &SyncHandle) {
        if h.first_index == self.file_first_index {
            self.synced_len = self.synced_len.max(h.len);
        }
        self.durable_index = self.durable_index.max(h.last_index);
    }

    /// A failed background fsync: the bytes it covered are in doubt, so they must be
    /// fsync'd again before anything may rely on them.
    pub fn sync_failed(&mut self) {
        self.unsynced = true;
    }

    pub fn last_index(&self) -> u64 {
        self.last_index
    }

    /// Index of the last entry known to be on disk.
    pub fn durable_index(&self) -> u64 {
        self.durable_index
    }

    /// Bytes in all segments.
    pub fn log_bytes(&self) -> u64 {
        self.log_bytes
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn current_path(&self) -> PathBuf {
        self.dir.join(segment_name(self.file_first_index))
    }

    /// Closes the current segment (fsync'd whatever the policy, so damage in a segment
    /// that is not the last is always corruption) and starts one at `first_index`.
    pub fn roll(&mut self, first_index: u64) -> Result<(), WalError> {
        self.unsynced = true;
        self.sync()?;
        let (f, len, salt) = create_segment(&self.dir, first_index)?;
        self.file = Arc::new(f);
        self.file_first_index = first_index;
        self.file_len = len;
        self.file_salt = salt;
        self.synced_len = len;
        self.log_bytes += len;
        Ok(())
    }

    /// Writes a snapshot at `index` and removes the segments and snapshots it covers.
    /// The caller must have rolled to a segment starting at `index + 1` first, so every
    /// older segment is covered. Safe to run from another thread while appends continue
    /// (it touches only older files); returns the bytes freed.
    pub fn write_snapshot_and_prune(
        dir: &Path,
        index: u64,
        snapshot: &[u8],
    ) -> Result<u64, WalError> {
        write_atomically(dir, &snapshot_name(index), snapshot)?;
        Wal::prune_covered(dir, index)
    }

    /// Removes the segments and snapshots that the snapshot at `index`, already in place,
    /// covers (what [`Wal::write_snapshot_and_prune`] does after writing it; a
    /// [`SnapshotWriter`] is the streaming way to write it). Returns the bytes freed.
    pub fn prune_covered(dir: &Path, index: u64) -> Result<u64, WalError> {
        let listing = list_dir(dir)?;
        let mut freed = 0;
        // A segment goes when the snapshot covers all of it: when the next one starts at
        // or before `index + 1`. The one holding `index + 1` stays, even if it starts
        // earlier (a snapshot at the applied index, with later entries not committed).
        let starts: Vec<u64> = listing.segments.iter().map(|(f, _)| *f).collect();
        for (i, (_, path)) in listing.segments.iter().enumerate() {
            if starts.get(i + 1).is_some_and(|next| *next <= index + 1) {
                freed += fs::metadata(path).map(|m| m.len()).unwrap_or(0);
                fs::remove_file(path).map_err(|e| WalError::io(path, e))?;
            }
        }
        for (i, path) in &listing.snapshots {
            if *i < index {
                fs::remove_file(path).map_err(|e| WalError::io(path, e))?;
            }
        }
        sync_dir(dir)?;
        Ok(freed)
    }

    /// Records that `bytes` of old segments were removed by compaction.
    pub fn note_pruned(&mut self, bytes: u64) {
        self.log_bytes = self.log_bytes.saturating_sub(bytes);
    }
}

/// Creates segment `first_index` (header and a new salt) atomically; returns it open for
/// appending, its length and its salt.
fn create_segment(dir: &Path, first_index: u64) -> Result<(File, u64, u64), WalError> {
    let name = segment_name(first_index);
    let salt = new_salt();
    let mut header = SEGMENT_MAGIC.to_vec();
    header.extend_from_slice(&salt.to_le_bytes());
    write_atomically(dir, &name, &header)?;
    let path = dir.join(&name);
    let f = OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(|e| WalError::io(&path, e))?;
    Ok((f, SEGMENT_HEADER_LEN as u64, salt))
}

fn truncate(path: &Path, len: u64) -> Result<(), WalError> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| WalError::io(path, e))?;
    f.set_len(len).map_err(|e| WalError::io(path, e))?;
    f.sync_all().map_err(|e| WalError::io(path, e))
}

// ---------------------------------------------------------------------------------------
// check-log

/// The verdict of `kvstore check-log`.
#[derive(Debug)]
pub struct CheckReport {
    pub report: RecoveryReport,
    pub segments: usize,
    pub snapshots: usize,
    pub log_bytes: u64,
}

/// Verifies a data directory without changing it, and without its lock, so a live
/// directory can be checked (a segment being appended to may show a torn tail that is
/// only a write in progress). `repair` takes the lock (refused while a server has the
/// directory open) and truncates a torn tail exactly as startup would. Corruption is
/// returned as the error.
pub fn check(dir: &Path, repair: bool) -> Result<CheckReport, WalError> {
    if !dir.is_dir() {
        return Err(WalError::io(
            dir,
            io::Error::new(io::ErrorKind::NotFound, "no such data directory"),
        ));
    }
    let _lock = if repair {
        Some(DirLock::acquire(dir)?)
    } else {
        None
    };
    let listing = list_dir(dir)?;
    let scan = scan(dir, &listing, |_| {}, |_| {})?;
    if repair && let Some((path, offset)) = &scan.cut {
        truncate(path, *offset)?;
    }
    Ok(CheckReport {
        report: scan.report,
        segments: listing.segments.len(),
        snapshots: listing.snapshots.len(),
        log_bytes: scan.log_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(i: u64, k: &str, v: &str) -> Entry {
        Entry {
            index: i,
            epoch: 1,
            ts_ms: 1000 + i,
            db: (i % 3) as u32,
            op: Op::Set {
                key: k.into(),
                value: v.into(),
                expiry: if i.is_multiple_of(2) {
                    Expiry::At(99_000 + i)
                } else {
                    Expiry::Never
                },
                condition: Condition::Always,
                get: false,
            },
        }
    }

    fn all_ops() -> Vec<Op> {
        vec![
            Op::Noop,
            Op::Set {
                key: b"k\r\n\0".to_vec(),
                value: vec![0, 1, 2, 255],
                expiry: Expiry::Keep,
                condition: Condition::IfExists,
                get: true,
            },
            Op::Set {
                key: vec![],
                value: vec![],
                expiry: Expiry::At(u64::MAX),
                condition: Condition::IfMissing,
                get: false,
            },
            Op::Del {
                keys: vec![b"a".to_vec(), vec![], b"c".to_vec()],
            },
            Op::MSet {
                pairs: vec![(b"a".to_vec(), b"1".to_vec()), (b"b".to_vec(), vec![])],
                only_if_none_exist: true,
            },
            Op::IncrBy {
                key: b"n".to_vec(),
                delta: i64::MIN,
            },
            Op::Cmd {
                args: vec![b"PEXPIREAT".to_vec(), b"k".to_vec(), b"123".to_vec()],
            },
            Op::Multi { ops: vec![] },
            Op::Multi {
                ops: vec![
                    (
                        0,
                        Op::Set {
                            key: b"k".to_vec(),
                            value: b"v".to_vec(),
                            expiry: Expiry::At(7),
                            condition: Condition::Always,
                            get: true,
                        },
                    ),
                    (
                        15,
                        Op::Cmd {
                            args: vec![b"GET".to_vec(), b"k".to_vec()],
                        },
                    ),
                    (u32::MAX, Op::Noop),
                    (
                        1,
                        Op::Del {
                            keys: vec![b"a".to_vec()],
                        },
                    ),
                ],
            },
        ]
    }

    /// One sealed batch holding `entries`, as a fresh segment would get it.
    fn batch_bytes(entries: &[Entry], salt: u64) -> Vec<u8> {
        let mut b = BatchBuf::default();
        for e in entries {
            b.push(e).unwrap();
        }
        b.seal(SEGMENT_HEADER_LEN as u64, salt).to_vec()
    }

    fn payload(e: &Entry) -> Vec<u8> {
        let mut p = Vec::new();
        encode_payload(e, &mut p);
        p
    }

    fn op_payload(op: &Op) -> Vec<u8> {
        payload(&Entry {
            index: 1,
            epoch: 1,
            ts_ms: 1,
            db: 0,
            op: op.clone(),
        })
    }

    #[test]
    fn a_transaction_record_refuses_nesting_and_absurd_counts() {
        let inner = Op::Multi {
            ops: vec![(0, Op::Noop)],
        };
        // Hand-made nesting (the encoder has no reason to refuse it; the decoder must).
        let nested = Op::Multi {
            ops: vec![(0, inner)],
        };
        let err = decode_entry(&op_payload(&nested)).unwrap_err();
        assert!(err.contains("nested transaction"), "{err}");
        // A count of 2^32-1 ops in a record of a few bytes.
        let mut p = op_payload(&Op::Multi { ops: vec![] });
        let n = p.len();
        p[n - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = decode_entry(&p).unwrap_err();
        assert!(err.contains("exceeds the record"), "{err}");
        // An inner op cut short.
        let mut p = op_payload(&Op::Multi {
            ops: vec![(
                3,
                Op::Del {
                    keys: vec![b"abc".to_vec()],
                },
            )],
        });
        p.pop();
        assert!(decode_entry(&p).is_err());
    }

    #[test]
    fn every_op_round_trips() {
        let entries: Vec<Entry> = all_ops()
            .into_iter()
            .enumerate()
            .map(|(i, op)| Entry {
                index: i as u64 + 1,
                epoch: 7,
                ts_ms: 123,
                db: [0, 1, 15, u32::MAX][i % 4],
                op,
            })
            .collect();
        for e in &entries {
            assert_eq!(&decode_entry(&payload(e)).unwrap(), e);
        }
        let buf = batch_bytes(&entries, 42);
        let BatchRead::Batch {
            synced,
            count,
            records,
            len,
        } = read_batch(&buf, 42, Limits::DEFAULT)
        else {
            panic!("not a batch")
        };
        assert_eq!(
            (synced, count as usize, len),
            (16, entries.len(), buf.len())
        );
        let got: Vec<Entry> = split_records(records, count, Limits::DEFAULT)
            .map(|p| decode_entry(p.unwrap()).unwrap())
            .collect();
        assert_eq!(got, entries);
        // Every strict prefix is truncated, never a batch or garbage.
        for cut in 0..buf.len() {
            assert_eq!(
                read_batch(&buf[..cut], 42, Limits::DEFAULT),
                BatchRead::Truncated,
                "cut {cut}"
            );
        }
        // Another segment's salt does not read it.
        assert_eq!(
            read_batch(&buf, 43, Limits::DEFAULT),
            BatchRead::Invalid("checksum mismatch")
        );
    }

    #[test]
    fn version_1_records_read_as_database_0() {
        // A version 1 entry as written before databases existed: no `db` field.
        let mut buf = Vec::new();
        frame(&mut buf, |p| {
            p.push(ENTRY_VERSION_V1);
            put_u64(p, 5);
            put_u64(p, 1);
            put_u64(p, 77);
            crate::db::op::encode(&Op::Noop, p);
        });
        let FrameRead::Frame(p, _) = read_frame(&buf) else {
            panic!()
        };
        let e = decode_entry(p).unwrap();
        assert_eq!((e.index, e.ts_ms, e.db, e.op), (5, 77, 0, Op::Noop));
        // A version 1 snapshot: every key in database 0, and a `D` frame is refused.
        let mut snap = SNAPSHOT_HEADER_V1.to_vec();
        frame(&mut snap, |p| {
            p.push(b'M');
            put_u64(p, 4);
            put_u64(p, 1);
            put_u64(p, 1);
        });
        frame(&mut snap, |p| {
            p.push(b'K');
            put_u64(p, 0);
            put_bytes(p, b"k");
            put_bytes(p, b"v");
        });
        frame(&mut snap, |p| {
            p.push(b'E');
            put_u64(p, 1);
        });
        let s = decode_snapshot(Path::new("x"), &snap).unwrap();
        assert_eq!((s.items[0].db, &s.items[0].key[..]), (0, &b"k"[..]));
        // The same with a `D` frame is not version 1.
        let one = vec![(&b"k"[..], &b"v"[..], None)].into_iter();
        let mut snap = encode_snapshot(4, 1, vec![(2, one)]);
        assert_eq!(
            decode_snapshot(Path::new("x"), &snap).unwrap().items[0].db,
            2
        );
        snap[..8].copy_from_slice(SNAPSHOT_HEADER_V1);
        assert!(decode_snapshot(Path::new("x"), &snap).is_err());
    }

    #[test]
    fn zeros_are_not_a_frame() {
        assert!(matches!(read_frame(&[0u8; 64]), FrameRead::Invalid(_)));
        assert!(matches!(
            read_batch(&[0u8; 64], 0, Limits::DEFAULT),
            BatchRead::Invalid(_)
        ));
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let buf = batch_bytes(&[set(1, "key", "value"), set(2, "k", "v")], 7);
        for byte in 0..buf.len() {
            for bit in 0..8 {
                let mut b = buf.clone();
                b[byte] ^= 1 << bit;
                assert!(
                    !matches!(read_batch(&b, 7, Limits::DEFAULT), BatchRead::Batch { .. }),
                    "flip of byte {byte} bit {bit} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn decode_refuses_hostile_counts() {
        let e = Entry {
            index: 1,
            epoch: 1,
            ts_ms: 1,
            db: 0,
            op: Op::Del { keys: vec![] },
        };
        let mut p = payload(&e);
        let n = p.len();
        p[n - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_entry(&p).is_err());
        // A record length beyond the batch, or a count beyond its records.
        let buf = batch_bytes(std::slice::from_ref(&e), 1);
        let BatchRead::Batch { records, .. } = read_batch(&buf, 1, Limits::DEFAULT) else {
            panic!()
        };
        assert!(split_records(records, 2, Limits::DEFAULT).any(|r| r.is_err()));
        let mut bad = records.to_vec();
        bad[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(split_records(&bad, 1, Limits::DEFAULT).any(|r| r.is_err()));
    }

    /// The writer and the reader share one limit: an entry of exactly `max_entry` bytes is
    /// accepted and read back, one byte more is refused before anything is written.
    #[test]
    fn entry_limit_is_the_same_for_writer_and_reader() {
        let base = payload(&set(1, "k", "")).len();
        let limits = Limits {
            max_entry: base + 100,
            max_batch: 3 * (base + 100),
        };
        let at_limit = set(1, "k", &"v".repeat(100));
        let over = set(3, "k", &"v".repeat(101));
        assert_eq!(payload(&at_limit).len(), limits.max_entry);
        let mut b = BatchBuf::with_limits(limits);
        b.push(&at_limit).unwrap();
        let before = b.len();
        let err = b.push(&over).unwrap_err();
        assert_eq!(err.limit, limits.max_entry);
        assert_eq!(err.bytes, limits.max_entry + 1);
        assert_eq!((b.len(), b.last_index()), (before, 1));
        let buf = b.seal(16, 5).to_vec();
        let BatchRead::Batch { records, count, .. } = read_batch(&buf, 5, limits) else {
            panic!()
        };
        let got: Vec<Entry> = split_records(records, count, limits)
            .map(|p| decode_entry(p.unwrap()).unwrap())
            .collect();
        assert_eq!(got, vec![at_limit.clone()]);
        // The reader refuses what the writer would have refused.
        let mut big = BatchBuf::with_limits(Limits {
            max_entry: limits.max_entry + 1,
            max_batch: limits.max_batch,
        });
        big.push(&over).unwrap();
        let buf = big.seal(16, 5).to_vec();
        let BatchRead::Batch { records, count, .. } = read_batch(&buf, 5, limits) else {
            panic!()
        };
        assert!(split_records(records, count, limits).any(|r| r.is_err()));
        // Batches split before they pass max_batch; each still reads back.
        let mut b = BatchBuf::with_limits(limits);
        for i in 1..=10 {
            b.push(&set(i, "k", &"v".repeat(90))).unwrap();
        }
        let buf = b.seal(16, 5).to_vec();
        let (mut pos, mut n) = (0, 0);
        while pos < buf.len() {
            let BatchRead::Batch {
                records,
                count,
                len,
                ..
            } = read_batch(&buf[pos..], 5, limits)
            else {
                panic!("batch at {pos}")
            };
            assert!(len - FRAME_HEADER <= limits.max_batch);
            n += split_records(records, count, limits).count();
            pos += len;
        }
        assert_eq!(n, 10);
    }

    /// A snapshot key as the tests write it: database, key, value, deadline.
    type Row = (u32, Vec<u8>, Vec<u8>, Option<u64>);

    #[test]
    fn snapshot_round_trips_and_refuses_truncation() {
        let items: Vec<Row> = vec![
            (0, b"a".to_vec(), b"1".to_vec(), None),
            (0, b"b".to_vec(), vec![], Some(5)),
            (3, b"a".to_vec(), b"other".to_vec(), None),
            (3, b"c".to_vec(), b"x".to_vec(), Some(7)),
            (15, b"a".to_vec(), b"last".to_vec(), None),
        ];
        let of = |db: u32| {
            items
                .iter()
                .filter(move |i| i.0 == db)
                .map(|(_, k, v, e)| (k.as_slice(), v.as_slice(), *e))
                .collect::<Vec<_>>()
                .into_iter()
        };
        let bytes = encode_snapshot(9, 2, vec![(0, of(0)), (1, of(1)), (3, of(3)), (15, of(15))]);
        let s = decode_snapshot(Path::new("x"), &bytes).unwrap();
        assert_eq!((s.index, s.epoch, s.items.len()), (9, 2, 5));
        assert_eq!(s.items[1].expire_at_ms, Some(5));
        let got: Vec<Row> = s
            .items
            .into_iter()
            .map(|i| (i.db, i.key, i.value, i.expire_at_ms))
            .collect();
        assert_eq!(got, items, "every key comes back in its own database");
        for cut in 0..bytes.len() {
            assert!(
                decode_snapshot(Path::new("x"), &bytes[..cut]).is_err(),
                "cut {cut}"
            );
        }
    }

    /// The streaming writer writes the very bytes `encode_snapshot` builds, whatever the
    /// chunking; a count that does not match, or a writer dropped unfinished, leaves no
    /// file behind (neither the snapshot nor its temp file).
    #[test]
    fn snapshot_writer_streams_the_same_bytes_and_cleans_up() {
        type Keys = Vec<(Vec<u8>, Vec<u8>, Option<u64>)>;
        let dbs: Vec<(u32, Keys)> = vec![
            (
                0,
                (0..1000)
                    .map(|i| (format!("k{i}").into_bytes(), vec![b'v'; i % 50], None))
                    .collect(),
            ),
            (5, vec![(b"a".to_vec(), b"1".to_vec(), Some(77))]),
        ];
        let want = encode_snapshot(
            12,
            3,
            dbs.iter()
                .map(|(d, keys)| (*d, keys.iter().map(|(k, v, e)| (&k[..], &v[..], *e))))
                .collect(),
        );
        let dir = tempfile::tempdir().unwrap();
        let mut w = SnapshotWriter::create(dir.path(), 12, 3, 1001).unwrap();
        let mut chunk = SnapshotChunk::default();
        for (d, keys) in &dbs {
            w.database(*d, keys.len() as u64).unwrap();
            for (i, (k, v, e)) in keys.iter().enumerate() {
                chunk.push(k, v, e.unwrap_or(0));
                if i % 7 == 0 {
                    w.write(&mut chunk).unwrap();
                    assert_eq!((chunk.keys(), chunk.bytes()), (0, 0));
                }
            }
            w.write(&mut chunk).unwrap();
        }
        let size = w.finish().unwrap();
        let path = dir.path().join(snapshot_name(12));
        let got = fs::read(&path).unwrap();
        assert_eq!(size, got.len() as u64);
        assert!(got == want, "streamed and in-memory snapshots differ");
        let names = || {
            let mut n: Vec<String> = fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            n.sort();
            n
        };
        assert_eq!(names(), vec![snapshot_name(12)]);
        // One key short of the header's count: refused, nothing left behind.
        let mut w = SnapshotWriter::create(dir.path(), 13, 3, 2).unwrap();
        w.database(0, 2).unwrap();
        chunk.push(b"k", b"v", 0);
        w.write(&mut chunk).unwrap();
        assert!(w.finish().is_err());
        // Dropped half written (an aborted compaction).
        let mut w = SnapshotWriter::create(dir.path(), 14, 3, 1).unwrap();
        w.database(0, 1).unwrap();
        assert!(
            dir.path()
                .join(format!("{}.tmp", snapshot_name(14)))
                .exists()
        );
        drop(w);
        assert_eq!(names(), vec![snapshot_name(12)]);
    }

    fn open_collect(dir: &Path, opts: WalOptions) -> Result<(Wal, Vec<Entry>), WalError> {
        let mut got = Vec::new();
        let (w, _) = Wal::open(dir, opts, |_| {}, |e| got.push(e))?;
        Ok((w, got))
    }

    /// Appends each entry as its own batch (one append, one fsync under `always`).
    fn write_entries(w: &mut Wal, entries: &[Entry]) {
        for e in entries {
            let mut b = BatchBuf::default();
            b.push(e).unwrap();
            w.append(&mut b).unwrap();
        }
    }

    #[test]
    fn recovers_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let opts = WalOptions {
            fsync: FsyncPolicy::No,
            segment_size: 100,
        };
        let entries: Vec<Entry> = (1..=50).map(|i| set(i, &format!("k{i}"), "v")).collect();
        let (mut w, got) = open_collect(dir.path(), opts.clone()).unwrap();
        assert!(got.is_empty());
        write_entries(&mut w, &entries);
        drop(w);
        assert!(list_dir(dir.path()).unwrap().segments.len() > 5);
        let (w, got) = open_collect(dir.path(), opts).unwrap();
        assert_eq!(got, entries);
        assert_eq!(w.last_index(), 50);
    }

    fn seg_len(dir: &Path) -> usize {
        let l = list_dir(dir).unwrap();
        fs::metadata(&l.segments.last().unwrap().1).unwrap().len() as usize
    }

    #[test]
    fn torn_tail_at_every_offset_recovers_every_earlier_record() {
        let entries: Vec<Entry> = (1..=3).map(|i| set(i, "key", "some value")).collect();
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = open_collect(dir.path(), WalOptions::default()).unwrap();
        write_entries(&mut w, &entries[..2]);
        let last_start = seg_len(dir.path());
        write_entries(&mut w, &entries[2..]);
        drop(w);
        let seg = list_dir(dir.path()).unwrap().segments[0].1.clone();
        let whole = fs::read(&seg).unwrap();
        for cut in last_start..whole.len() {
            fs::write(&seg, &whole[..cut]).unwrap();
            let (mut w, got) = open_collect(dir.path(), WalOptions::default()).unwrap();
            assert_eq!(got, entries[..2], "cut at {cut}");
            assert_eq!(fs::metadata(&seg).unwrap().len(), last_start as u64);
            // The repaired log takes new appends and recovers them.
            write_entries(&mut w, &entries[2..]);
            drop(w);
            let (_, got) = open_collect(dir.path(), WalOptions::default()).unwrap();
            assert_eq!(got, entries, "after re-append at cut {cut}");
        }
    }

    #[test]
    fn zero_filled_tail_is_torn() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = open_collect(dir.path(), WalOptions::default()).unwrap();
        write_entries(&mut w, &[set(1, "a", "b")]);
        drop(w);
        let seg = list_dir(dir.path()).unwrap().segments[0].1.clone();
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[0u8; 4096]).unwrap();
        let (_, got) = open_collect(dir.path(), WalOptions::default()).unwrap();
        assert_eq!(got.len(), 1);
    }

    /// What a power cut can leave of the writes after the last fsync: the page cache
    /// writes pages back in any order, so any subset of the 512-byte pages written since
    /// may have reached the disk, and the others read as what was there before (zeros for
    /// a file that grew, or whatever stale bytes the blocks held), or the file may end
    /// early. Recovery must keep every fsync'd batch and never refuse.
    fn power_cut_images(durable: &[u8], written: &[u8]) -> Vec<Vec<u8>> {
        const PAGE: usize = 512;
        let first_page = durable.len() / PAGE;
        let pages = written.len().div_ceil(PAGE) - first_page;
        assert!(pages <= 12, "too many pages to try every subset: {pages}");
        let mut images = Vec::new();
        for subset in 0u32..(1 << pages) {
            for old in [0u8, 0xB8, 0x5A] {
                let mut img = written.to_vec();
                for p in 0..pages {
                    if subset & (1 << p) == 0 {
                        let start = ((first_page + p) * PAGE).max(durable.len());
                        let end = ((first_page + p + 1) * PAGE).min(written.len());
                        img[start..end].fill(old);
                    }
                }
                images.push(img);
            }
            // The size update made it, but only up to the last page kept.
            let keep = (0..pages).rev().find(|p| subset & (1 << p) != 0);
            let end = keep.map_or(durable.len(), |p| {
                ((first_page + p + 1) * PAGE).min(written.len())
            });
            let mut img = written[..end].to_vec();
            for p in 0..pages {
                if subset & (1 << p) == 0 {
                    let start = ((first_page + p) * PAGE).max(durable.len());
                    let stop = ((first_page + p + 1) * PAGE).min(img.len());
                    if start < stop {
                        img[start..stop].fill(0);
                    }
                }
            }
            images.push(img);
        }
        images
    }

    #[test]
    fn power_cut_with_pages_out_of_order_is_a_torn_tail() {
        // fsync always: three batches fsync'd, then one of ~3.5 KiB that was being written.
        let entries: Vec<Entry> = (1..=3).map(|i| set(i, "key", "value")).collect();
        let last: Vec<Entry> = (4..=10).map(|i| set(i, "k", &"x".repeat(500))).collect();
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = open_collect(dir.path(), WalOptions::default()).unwrap();
        write_entries(&mut w, &entries);
        let mut b = BatchBuf::default();
        for e in &last {
            b.push(e).unwrap();
        }
        w.append(&mut b).unwrap();
        drop(w);
        let seg = list_dir(dir.path()).unwrap().segments[0].1.clone();
        let written = fs::read(&seg).unwrap();
        // The last batch starts where the three fsync'd ones end.
        let salt = LittleEndian::read_u64(&written[8..16]);
        let mut durable = SEGMENT_HEADER_LEN;
        for _ in 0..3 {
            let BatchRead::Batch { len, .. } =
                read_batch(&written[durable..], salt, Limits::DEFAULT)
            else {
                panic!("batch at {durable}")
            };
            durable += len;
        }
        let images = power_cut_images(&written[..durable], &written);
        assert!(images.len() > 100);
        for (n, img) in images.iter().enumerate() {
            fs::write(&seg, img).unwrap();
            let (_, got) = open_collect(dir.path(), WalOptions::default())
                .unwrap_or_else(|e| panic!("image {n} refused: {e}"));
            if got.len() == 10 {
                assert_eq!(&got[3..], &last[..], "image {n}");
            } else {
                assert_eq!(got, entries, "image {n}");
            }
        }
    }

    #[test]
    fn power_cut_under_everysec_loses_only_unsynced_batches() {
        // fsync no/everysec: several batches written since the last fsync; any of their
        // pages may be missing. Whatever survives, the fsync'd prefix is kept.
        let synced: Vec<Entry> = (1..=2).map(|i| set(i, "key", "value")).collect();
        let unsynced: Vec<Entry> = (3..=8).map(|i| set(i, "k", &"y".repeat(300))).collect();
        let dir = tempfile::tempdir().unwrap();
        let opts = WalOptions {
            fsync: FsyncPolicy::No,
            segment_size: 1 << 20,
        };
        let (mut w, _) = open_collect(dir.path(), opts.clone()).unwrap();
        write_entries(&mut w, &synced);
        w.sync().unwrap();
        let durable = seg_len(dir.path());
        write_entries(&mut w, &unsynced);
        drop(w);
        let seg = list_dir(dir.path()).unwrap().segments[0].1.clone();
        let written = fs::read(&seg).unwrap();
        for (n, img) in power_cut_images(&written[..durable], &written)
            .iter()
            .enumerate()
        {
            fs::write(&seg, img).unwrap();
            let (_, got) = open_collect(dir.path(), opts.clone())
                .unwrap_or_else(|e| panic!("image {n} refused: {e}"));
            assert!(got.len() >= 2, "image {n} lost fsync'd entries");
            let all: Vec<Entry> = synced.iter().chain(&unsynced).cloned().collect();
            assert_eq!(got[..], all[..got.len()], "image {n}");
        }
    }

    #[test]
    fn flipped_byte_mid_log_is_refused_with_offset() {
        let entries: Vec<Entry> = (1..=5).map(|i| set(i, "key", "value")).collect();
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = open_collect(dir.path(), WalOptions::default()).unwrap();
        write_entries(&mut w, &entries[..1]);
        let second = seg_len(dir.path());
        write_entries(&mut w, &entries[1..]);
        drop(w);
        let seg = list_dir(dir.path()).unwrap().segments[0].1.clone();
        let mut bytes = fs::read(&seg).unwrap();
        bytes[second + 30] ^= 0x40;
        fs::write(&seg, &bytes).unwrap();
        let err = open_collect(dir.path(), WalOptions::default()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, WalError::Corrupt { offset, .. } if offset == second as u64));
        assert!(msg.contains(&format!("byte offset {second}")), "{msg}");
        assert!(msg.contains("checksum mismatch"), "{msg}");
        assert!(msg.contains("fsync'd"), "{msg}");
        assert!(msg.contains("check-log"), "{msg}");
        // Nothing was truncated.
        assert_eq!(fs::read(&seg).unwrap(), bytes);
        // check-log says the same, and --repair does not "fix" corruption.
        assert!(matches!(
            check(dir.path(), true),
            Err(WalError::Corrupt { .. })
        ));
        assert_eq!(fs::read(&seg).unwrap(), bytes);
    }

    /// Writes `entries` as batches straight into segment `first` (bypassing the writer's
    /// checks), to build logs the writer never would.
    fn raw_segment(dir: &Path, first: u64, entries: &[Entry]) {
        let salt = 99u64;
        let mut bytes = SEGMENT_MAGIC.to_vec();
        bytes.extend_from_slice(&salt.to_le_bytes());
        for e in entries {
            let mut b = BatchBuf::default();
            b.push(e).unwrap();
            let synced = bytes.len() as u64;
            bytes.extend_from_slice(b.seal(synced, salt));
        }
        fs::write(dir.join(segment_name(first)), bytes).unwrap();
    }

    #[test]
    fn duplicate_or_backward_indexes_are_corruption() {
        // Within a segment.
        let dir = tempfile::tempdir().unwrap();
        raw_segment(
            dir.path(),
            1,
            &[set(1, "a", "1"), set(2, "b", "2"), set(2, "c", "3")],
        );
        let err = open_collect(dir.path(), WalOptions::default()).unwrap_err();
        assert!(err.to_string().contains("index out of order"), "{err}");
        assert!(matches!(
            check(dir.path(), false),
            Err(WalError::Corrupt { .. })
        ));
        // Across segments, with no snapshot covering the repeat (two writers on one
        // directory would leave this).
        let dir = tempfile::tempdir().unwrap();
        raw_segment(
            dir.path(),
            1,
            &[set(1, "a", "1"), set(2, "b", "2"), set(3, "c", "3")],
        );
        raw_segment(dir.path(), 3, &[set(3, "d", "4"), set(4, "e", "5")]);
        let err = open_collect(dir.path(), WalOptions::default()).unwrap_err();
        assert!(err.to_string().contains("duplicate index"), "{err}");
        assert!(matches!(
            check(dir.path(), false),
            Err(WalError::Corrupt { .. })
        ));
        // Backward: a record below its segment's first index.
        let dir = tempfile::tempdir().unwrap();
        raw_segment(dir.path(), 1, &[set(1, "a", "1"), set(2, "b", "2")]);
        raw_segment(dir.path(), 3, &[set(1, "d", "4")]);
        assert!(open_collect(dir.path(), WalOptions::default()).is_err());
    }

    #[test]
    fn missing_segment_after_a_snapshot_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let opts = WalOptions {
            fsync: FsyncPolicy::Always,
            segment_size: 1 << 20,
        };
        let (mut w, _) = open_collect(dir.path(), opts.clone()).unwrap();
        let entries: Vec<Entry> = (1..=6).map(|i| set(i, &format!("k{i}"), "v")).collect();
        write_entries(&mut w, &entries[..3]);
        w.roll(4).unwrap();
        let snap = encode_snapshot(
            3,
            1,
            vec![(0, std::iter::once((&b"k"[..], &b"v"[..], None)))],
        );
        Wal::write_snapshot_and_prune(dir.path(), 3, &snap).unwrap();
        write_entries(&mut w, &entries[3..]);
        drop(w);
        fs::remove_file(dir.path().join(segment_name(4))).unwrap();
        let err = open_collect(dir.path(), opts).unwrap_err();
        assert!(err.to_string().contains("is missing"), "{err}");
    }

    #[test]
    fn a_log_shorter_than_the_recorded_commit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = open_collect(dir.path(), WalOptions::default()).unwrap();
        write_entries(&mut w, &[set(1, "a", "1"), set(2, "b", "2")]);
        write_meta(
            dir.path(),
            &Meta {
                commit_index: w.durable_index(),
                ..Meta::default()
            },
        )
        .unwrap();
        drop(w);
        // Cut to its header: every record is gone, and nothing in the segment shows it.
        let seg = list_dir(dir.path()).unwrap().segments[0].1.clone();
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(SEGMENT_HEADER_LEN as u64)
            .unwrap();
        let err = open_collect(dir.path(), WalOptions::default()).unwrap_err();
        assert!(err.to_string().contains("index 2 was committed"), "{err}");
        assert!(matches!(
            check(dir.path(), false),
            Err(WalError::Corrupt { .. })
        ));
        // Deleted altogether: the same.
        fs::remove_file(&seg).unwrap();
        assert!(open_collect(dir.path(), WalOptions::default()).is_err());
    }

    #[test]
    fn meta_round_trips_and_refuses_damage() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_meta(dir.path()).unwrap(), Meta::default());
        let m = Meta {
            epoch: 3,
            voted_for: 2,
            commit_index: 99,
        };
        write_meta(dir.path(), &m).unwrap();
        assert_eq!(read_meta(dir.path()).unwrap(), m);
        let path = dir.path().join(META_FILE);
        let mut bytes = fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 1] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert!(read_meta(dir.path()).is_err());
    }

    #[test]
    fn a_failed_atomic_write_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        // Renaming over a non-empty directory fails after the temp file was written.
        let blocker = dir.path().join("snapshot-00000000000000000001.snap");
        fs::create_dir(&blocker).unwrap();
        fs::write(blocker.join("x"), b"x").unwrap();
        assert!(Wal::write_snapshot_and_prune(dir.path(), 1, b"data").is_err());
        assert!(list_dir(dir.path()).unwrap().temps.is_empty());
    }

    #[test]
    fn check_repair_truncates_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = open_collect(dir.path(), WalOptions::default()).unwrap();
        write_entries(&mut w, &[set(1, "a", "b"), set(2, "c", "d")]);
        drop(w);
        let seg = list_dir(dir.path()).unwrap().segments[0].1.clone();
        let len = fs::metadata(&seg).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let r = check(dir.path(), false).unwrap();
        assert!(r.report.torn_tail.is_some());
        assert_eq!(fs::metadata(&seg).unwrap().len(), len - 3);
        check(dir.path(), true).unwrap();
        let r = check(dir.path(), false).unwrap();
        assert!(r.report.torn_tail.is_none());
        assert_eq!(r.report.last_index, 1);
    }

    #[test]
    fn snapshot_then_tail_and_pruning() {
        let dir = tempfile::tempdir().unwrap();
        let opts = WalOptions {
            fsync: FsyncPolicy::No,
            segment_size: 200,
        };
        let (mut w, _) = open_collect(dir.path(), opts.clone()).unwrap();
        let entries: Vec<Entry> = (1..=20).map(|i| set(i, &format!("k{i}"), "v")).collect();
        write_entries(&mut w, &entries[..10]);
        w.roll(11).unwrap();
        let snap = encode_snapshot(
            10,
            1,
            vec![(0, std::iter::once((&b"k"[..], &b"v"[..], None)))],
        );
        let freed = Wal::write_snapshot_and_prune(dir.path(), 10, &snap).unwrap();
        assert!(freed > 0);
        w.note_pruned(freed);
        write_entries(&mut w, &entries[10..]);
        drop(w);
        let l = list_dir(dir.path()).unwrap();
        assert_eq!(l.snapshots.len(), 1);
        assert!(l.segments.iter().all(|(f, _)| *f > 10));
        let mut snap_seen = Vec::new();
        let mut got = Vec::new();
        let (w, rep) = Wal::open(dir.path(), opts, |p| snap_seen.push(p), |e| got.push(e)).unwrap();
        assert!(matches!(
            snap_seen[..],
            [
                SnapshotPart::Header {
                    index: 10,
                    count: 1,
                    ..
                },
                SnapshotPart::Database { db: 0, count: 1 },
                SnapshotPart::Item(_),
                SnapshotPart::End
            ]
        ));
        assert_eq!(got, entries[10..]);
        assert_eq!(rep.snapshot_index, Some(10));
        assert_eq!(w.last_index(), 20);
    }

    #[test]
    fn leftover_temp_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("snapshot-00000000000000000005.snap.tmp"),
            b"junk",
        )
        .unwrap();
        open_collect(dir.path(), WalOptions::default()).unwrap();
        assert!(list_dir(dir.path()).unwrap().temps.is_empty());
    }
}
