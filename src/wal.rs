//! The write-ahead log: record codec, segment files, snapshots, the meta file, the data
//! directory's lock, recovery and repair.
//!
//! Every write becomes a log entry (index, epoch, and an opaque payload: the state
//! machine's encoding of the command, `db/command.rs`; empty for a no-op) and is appended
//! to the current segment file before the map changes. This module frames entries and
//! never looks inside a payload. Data enters as entries pushed into a [`BatchBuf`] (the
//! store's group commit encodes many writers' commands straight into one, with
//! [`BatchBuf::push_with`]) and written by [`Wal::append`], or through the node's
//! [`LogStore`] interface (`impl LogStore for Wal`, at the end of this file); it leaves
//! through [`Wal::open`], which replays the newest snapshot and then every later entry, in
//! index order, through a callback that borrows each payload ([`EntryRef`]), and through
//! [`LogStore::read`].
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
//! entry   := version u8 (2) | index u64 | epoch u64 | payload
//! payload := (empty: a no-op entry) | ts_ms u64 | db u32 | op    (the state machine's:
//!                                                    `db/command.rs` and `db/op.rs`)
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
//! In an entry, `epoch` is the leader's term (the cluster's fencing token). The payload is
//! the state machine's business (today: the leader's clock, the database and the
//! operation); a payload the store cannot decode during recovery is reported here as
//! corruption at its batch's file and offset, like any other damage. Entry version 1
//! (before databases existed) cannot occur: its segments have format 1, whose header
//! recovery refuses.
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
//! over the limit is refused by [`BatchBuf::push_with`] before anything is written (the
//! store answers that write with an error and logs nothing of it).
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
//! - a batch that passed its checksum but holds a record that does not decode (the log's
//!   header, or the payload as the replay callback decodes it);
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
//! # The log as the node sees it
//!
//! `impl LogStore for Wal` serves the replication node from the same files. An in-memory
//! index, built by recovery and kept by every append, holds per segment the offsets of
//! some of its batches (the first, then one per 4 KiB of segment: a read seeks to
//! the mark before the index it wants and reads on from there) and, for the whole log,
//! the runs of entries of one epoch, so `epoch_at` needs no I/O. `truncate_after` cuts at
//! a batch boundary by truncating the file, and inside a batch by rewriting the segment
//! atomically (every batch keeps its own checksum); `install_snapshot` orders its steps
//! so that every state between them is a log recovery reads (see there). A compaction
//! prunes segments on its own thread; [`Wal::note_pruned`] brings the index up to date.
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

pub use crate::log::LogEntry;
use crate::log::LogStore;

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
/// Bytes of an entry's own header: version, index, epoch. The payload follows.
pub const ENTRY_HEADER: usize = 17;
/// Bytes a record adds to its payload: its length, then the entry header.
pub const RECORD_HEADER: usize = 4 + ENTRY_HEADER;

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

/// One entry as the log reads it, its payload borrowed from the log's buffer: replay
/// hands these out so that the store decodes each value once, straight from the bytes
/// read (replay speed matters), never through a copy of the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryRef<'a> {
    pub index: u64,
    pub epoch: u64,
    /// Opaque to the log; empty for a no-op entry.
    pub payload: &'a [u8],
}

impl EntryRef<'_> {
    /// An owned copy.
    pub fn to_entry(&self) -> LogEntry {
        LogEntry {
            index: self.index,
            epoch: self.epoch,
            payload: self.payload.to_vec(),
        }
    }
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
    /// A request the log refuses, with nothing changed: an append that does not follow
    /// the last entry, a read of entries compacted into the snapshot, a truncation below
    /// the commit index, an entry over the size limit, a snapshot that does not decode.
    Refused(String),
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
            WalError::Refused(why) => write!(f, "log request refused: {why}"),
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

/// Appends a record (`len | version | index | epoch | payload`) to `out`, as it sits
/// inside a batch, with `payload` writing the payload's bytes straight into `out`.
fn encode_record(out: &mut Vec<u8>, index: u64, epoch: u64, payload: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.push(ENTRY_VERSION);
    put_u64(out, index);
    put_u64(out, epoch);
    payload(out);
    let len = (out.len() - start - 4) as u32;
    LittleEndian::write_u32(&mut out[start..start + 4], len);
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

/// Decodes an entry (the bytes a record's length counts): the log's header, and the
/// payload as a borrowed slice.
pub fn decode_entry(entry: &[u8]) -> Result<EntryRef<'_>, String> {
    let Some(&version) = entry.first() else {
        return Err("record truncated at payload byte 0".into());
    };
    if version != ENTRY_VERSION {
        return Err(format!("unknown record version {version}"));
    }
    if entry.len() < ENTRY_HEADER {
        return Err(format!("record truncated at payload byte {}", entry.len()));
    }
    Ok(EntryRef {
        index: LittleEndian::read_u64(&entry[1..9]),
        epoch: LittleEndian::read_u64(&entry[9..17]),
        payload: &entry[ENTRY_HEADER..],
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
    /// Start offset in `buf`, record count and first index of each batch; the last one is
    /// open.
    batches: Vec<(usize, u32, u64)>,
    /// (first index, epoch) of each run of entries of one epoch, in order (the log's
    /// epoch index learns them on append).
    epochs: Vec<(u64, u64)>,
    last_index: u64,
    limits: Option<Limits>,
}

/// A point to [`BatchBuf::rollback`] to.
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    len: usize,
    batches: usize,
    last_count: u32,
    epochs: usize,
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

    fn open_batch(&mut self, first_index: u64) {
        self.batches.push((self.buf.len(), 0, first_index));
        self.buf.extend_from_slice(&[0; BATCH_HEADER]);
    }

    /// Encodes an entry at `index` in `epoch` at the end of the open batch (or of a new
    /// one, if it would make the batch too large), `payload` writing its payload straight
    /// into the buffer (so a value is copied once, from the request into the batch).
    /// Refuses, leaving the buffer as it was, an entry over the limit. The caller pushes
    /// consecutive indexes.
    pub fn push_with(
        &mut self,
        index: u64,
        epoch: u64,
        payload: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), EntryTooLarge> {
        let limits = self.limits();
        let mark = self.mark();
        if self.batches.is_empty() {
            self.open_batch(index);
        }
        let rec = self.buf.len();
        encode_record(&mut self.buf, index, epoch, payload);
        let entry = self.buf.len() - rec - 4;
        if entry > limits.max_entry {
            self.rollback(mark);
            return Err(EntryTooLarge {
                bytes: entry,
                limit: limits.max_entry,
            });
        }
        let (start, count, _) = *self.batches.last().unwrap_or(&(0, 0, 0));
        if count > 0 && self.buf.len() - start - FRAME_HEADER > limits.max_batch {
            let record = self.buf.split_off(rec);
            self.open_batch(index);
            self.buf.extend_from_slice(&record);
        }
        if let Some(last) = self.batches.last_mut() {
            last.1 += 1;
        }
        if self.epochs.last().map(|r| r.1) != Some(epoch) {
            self.epochs.push((index, epoch));
        }
        self.last_index = index;
        Ok(())
    }

    /// Encodes `entry` (see [`BatchBuf::push_with`]).
    pub fn push(&mut self, entry: &LogEntry) -> Result<(), EntryTooLarge> {
        self.push_with(entry.index, entry.epoch, |out| {
            out.extend_from_slice(&entry.payload)
        })
    }

    /// Where the buffer is now.
    pub fn mark(&self) -> Mark {
        Mark {
            len: self.buf.len(),
            batches: self.batches.len(),
            last_count: self.batches.last().map_or(0, |b| b.1),
            epochs: self.epochs.len(),
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
        self.epochs.truncate(m.epochs);
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
        self.epochs.clear();
    }

    /// Fills in every batch header: `synced` is the segment offset up to which the log was
    /// fsync'd before these bytes were written, `salt` the segment's.
    fn seal(&mut self, synced: u64, salt: u64) -> &[u8] {
        for i in 0..self.batches.len() {
            let (start, count, _) = self.batches[i];
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
                // The count only sizes the database's table before its keys load, and it
                // comes from a file (or a peer): never more than the rest of the image
                // could hold (each key takes a frame of at least 8 bytes), so a short
                // file that claims 2^64 keys cannot make us allocate gigabytes.
                let room = (buf.len().saturating_sub(pos) / 8) as u64;
                let count = count.min(room);
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
    /// Every segment, oldest first (the last is `file`'s), with where its batches are:
    /// what [`LogStore::read`] and [`LogStore::truncate_after`] seek with.
    segments: Vec<SegmentIndex>,
    /// (first index, epoch) of each run of entries of one epoch after the snapshot, in
    /// order: epochs change only at elections, so this is a few words, and
    /// [`LogStore::epoch_at`] answers from it for any index without I/O.
    epochs: Vec<(u64, u64)>,
    /// Index and epoch of the newest snapshot ((0, 0): none).
    snapshot: (u64, u64),
    /// The meta file as last read or written through this log.
    meta: Meta,
    /// Bumped whenever the log is cut back ([`LogStore::truncate_after`], an install): a
    /// [`SyncHandle`] taken before covers bytes that may no longer be there, so its
    /// report must not move `synced_len` or `durable_index`.
    generation: u64,
    /// Times every fsync of the log (see [`FsyncClock`]).
    fsync_clock: Arc<FsyncClock>,
    _lock: DirLock,
}

/// A segment as the in-memory index knows it.
#[derive(Debug, Clone)]
struct SegmentIndex {
    /// The index its name gives (that of its first entry, if it has one).
    first: u64,
    salt: u64,
    /// Bytes in the file.
    len: u64,
    /// (first index, offset) of some of its batches, ascending: always its first batch,
    /// then the first batch starting at least [`MARK_SPACING`] bytes past the previous
    /// mark. Finding an entry reads from the mark before it: at most that many bytes
    /// (and one batch) more than needed, for 16 bytes of memory per mark.
    marks: Vec<(u64, u64)>,
}

/// Bytes of segment between two marks of the in-memory index: one mark per 4 KiB costs
/// 0.4% of the log's size in memory (a batch of its own per write, say under `everysec`,
/// would cost a mark of 16 bytes for every write), and a read seeks within 4 KiB.
const MARK_SPACING: u64 = 4096;

impl SegmentIndex {
    fn new(first: u64, salt: u64, len: u64) -> SegmentIndex {
        SegmentIndex {
            first,
            salt,
            len,
            marks: Vec::new(),
        }
    }

    /// Remembers the batch at `offset`, whose first entry is `index`, if it is due a mark.
    fn note_batch(&mut self, index: u64, offset: u64) {
        if self
            .marks
            .last()
            .is_none_or(|m| offset >= m.1 + MARK_SPACING)
        {
            self.marks.push((index, offset));
        }
    }
}

/// Adds `epoch` for the entry at `index` to a list of epoch runs.
fn note_epoch(runs: &mut Vec<(u64, u64)>, index: u64, epoch: u64) {
    if runs.last().map(|r| r.1) != Some(epoch) {
        runs.push((index, epoch));
    }
}

/// When the fsync of the log now under way began, for a health check that must tell
/// a slow disk from a stuck one (the systemd watchdog, `src/sdnotify.rs`): every fsync
/// of a segment after recovery, under the writer's lock ([`Wal::sync`]) or outside it
/// ([`SyncHandle::sync_data`]), is timed here. Two at once (the `everysec` syncer and a
/// shutdown's sync) keep the older start until it ends, then none: never later than
/// the truth while the older runs, which is what a stall check needs.
#[derive(Debug)]
pub struct FsyncClock {
    base: std::time::Instant,
    /// Nanoseconds from `base` to the start of the fsync under way, plus one; 0: none.
    since: std::sync::atomic::AtomicU64,
}

impl FsyncClock {
    fn new() -> FsyncClock {
        FsyncClock {
            base: std::time::Instant::now(),
            since: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// How long the fsync under way has been running; `None` when none is.
    pub fn in_progress(&self) -> Option<std::time::Duration> {
        let since = self.since.load(std::sync::atomic::Ordering::SeqCst);
        let started = std::time::Duration::from_nanos(since.checked_sub(1)?);
        Some(self.base.elapsed().saturating_sub(started))
    }

    /// Times `f` (an fsync) as under way while it runs.
    fn time<R>(&self, f: impl FnOnce() -> R) -> R {
        use std::sync::atomic::Ordering;
        let now = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX - 1) + 1;
        let mine = self
            .since
            .compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        let r = f();
        if mine {
            self.since.store(0, Ordering::SeqCst);
        }
        r
    }
}

/// What the `everysec` syncer fsyncs: a segment, and what was written to it when taken.
#[derive(Debug)]
pub struct SyncHandle {
    pub file: Arc<File>,
    clock: Arc<FsyncClock>,
    first_index: u64,
    len: u64,
    last_index: u64,
    generation: u64,
}

impl SyncHandle {
    /// fsyncs the segment (data only), timed on the log's [`FsyncClock`].
    pub fn sync_data(&self) -> io::Result<()> {
        self.clock.time(|| self.file.sync_data())
    }
}

/// A read-only scan of one data directory (recovery and `check-log`).
struct Scan {
    report: RecoveryReport,
    /// The torn tail to cut: (path, offset).
    cut: Option<(PathBuf, u64)>,
    log_bytes: u64,
    /// The segments as read (a torn tail already left out).
    segments: Vec<SegmentIndex>,
    /// Epoch runs of the entries after the snapshot.
    epochs: Vec<(u64, u64)>,
    snapshot: (u64, u64),
    /// The newest snapshot was installed from a leader and the process stopped before it
    /// started the segment that follows it (see [`LogStore::install_snapshot`]): the
    /// opener starts it.
    install_cut_short: bool,
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
/// Nothing is modified; the caller decides whether to truncate a torn tail. An error from
/// `apply` (a payload it cannot decode) is corruption at that entry's batch.
fn scan(
    dir: &Path,
    listing: &Listing,
    mut on_snapshot: impl FnMut(SnapshotPart),
    mut apply: impl FnMut(EntryRef<'_>) -> Result<(), String>,
) -> Result<Scan, WalError> {
    let mut report = RecoveryReport {
        meta: read_meta(dir)?,
        ..RecoveryReport::default()
    };
    let mut next = 1u64;
    let mut snap_index = 0;
    let mut missing_after_snapshot: Option<PathBuf> = None;
    let mut snapshot = (0, 0);
    let mut segments = Vec::with_capacity(listing.segments.len());
    let mut epochs = Vec::new();
    // The highest index any segment holds (or would hold next, less one, if empty).
    let mut max_seen = 0;
    if let Some((_, path)) = listing.snapshots.last() {
        let mut header = (0, 0);
        decode_snapshot_with(path, &read_file(path)?, |part| {
            if let SnapshotPart::Header { index, epoch, .. } = &part {
                header = (*index, *epoch);
            }
            on_snapshot(part);
        })?;
        let (index, epoch) = header;
        snapshot = header;
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
        let mut seg = SegmentIndex::new(*first, salt, buf.len() as u64);
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
                    for (i, payload) in split_records(records, count, Limits::DEFAULT).enumerate() {
                        let e = payload
                            .and_then(decode_entry)
                            .map_err(|why| corrupt(pos, format!("bad record: {why}")))?;
                        if i == 0 {
                            seg.note_batch(e.index, pos as u64);
                        }
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
                        note_epoch(&mut epochs, e.index, e.epoch);
                        apply(e).map_err(|why| {
                            corrupt(pos, format!("bad record: entry {}: {why}", e.index))
                        })?;
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
            seg.len = pos as u64;
            break;
        }
        max_seen = max_seen.max(seg_next.saturating_sub(1));
        segments.push(seg);
    }
    // A snapshot installed from a leader is written before the segment that follows it
    // is started (until then the log it replaces must stay readable): a process stopped
    // in between leaves segments that all end before the snapshot. Compaction never does
    // (its snapshot is at or below the end of the log it keeps), and removing the segment
    // after a compaction's snapshot leaves either no segment or one that reaches its
    // index, which stays an error.
    let install_cut_short =
        missing_after_snapshot.is_some() && !segments.is_empty() && max_seen < snap_index;
    if let Some(snapshot) = missing_after_snapshot.filter(|_| !install_cut_short) {
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
        segments,
        epochs,
        snapshot,
        install_cut_short,
    })
}

impl Wal {
    /// Opens (creating if needed) the log in `dir`, locks it, replays it, and returns the
    /// writer. `on_snapshot` receives the newest snapshot, then `apply` every later entry
    /// in index order, its payload borrowed; an error from `apply` (a payload the caller
    /// cannot decode) makes the open fail as corruption at that entry's file and offset.
    /// A torn tail is truncated (with a warning); corruption is an error.
    pub fn open(
        dir: &Path,
        opts: WalOptions,
        on_snapshot: impl FnMut(SnapshotPart),
        apply: impl FnMut(EntryRef<'_>) -> Result<(), String>,
    ) -> Result<(Wal, RecoveryReport), WalError> {
        fs::create_dir_all(dir).map_err(|e| WalError::io(dir, e))?;
        let lock = DirLock::acquire(dir)?;
        let listing = list_dir(dir)?;
        for t in &listing.temps {
            log::warn!("removing leftover temporary file {}", t.display());
            fs::remove_file(t).map_err(|e| WalError::io(t, e))?;
        }
        let mut scan = scan(dir, &listing, on_snapshot, apply)?;
        if scan.install_cut_short {
            finish_install(dir, &mut scan)?;
        }
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
        let mut segments = scan.segments;
        let mut log_bytes = scan.log_bytes - report.torn_tail.as_ref().map_or(0, |t| t.2);
        let (file, first, len, salt) = match segments.last() {
            Some(seg) => {
                let path = dir.join(segment_name(seg.first));
                let f = open_segment(&path)?;
                let len = f.metadata().map_err(|e| WalError::io(&path, e))?.len();
                (f, seg.first, len, seg.salt)
            }
            None => {
                let first = report.last_index + 1;
                let (f, len, salt) = create_segment(dir, first)?;
                log_bytes += len;
                segments.push(SegmentIndex::new(first, salt, len));
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
            segments,
            epochs: scan.epochs,
            snapshot: scan.snapshot,
            meta: report.meta,
            generation: 0,
            fsync_clock: Arc::new(FsyncClock::new()),
            _lock: lock,
        };
        Ok((wal, report))
    }

    /// Appends the entries of `batch` (sealing its batches for this segment) and fsyncs if
    /// the policy is `always`. Rolls to a new segment first if this one is full. The
    /// buffer is emptied either way.
    pub fn append(&mut self, batch: &mut BatchBuf) -> Result<(), WalError> {
        self.append_batch(batch, true)
    }

    /// [`Wal::append`] with the fsync that `always` asks for left to a later
    /// [`Wal::sync`] when `sync` is false: a follower writes every `Append` its leader
    /// sent since it last looked, then makes them all durable with one fsync.
    fn append_batch(&mut self, batch: &mut BatchBuf, sync: bool) -> Result<(), WalError> {
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
        if written.is_ok() {
            self.note_appended(batch);
        }
        batch.clear();
        written.map_err(|e| WalError::io(&path, e))?;
        self.file_len += n;
        self.log_bytes += n;
        self.last_index = last_index;
        self.unsynced = true;
        if sync && self.opts.fsync == FsyncPolicy::Always {
            self.sync()?;
        }
        Ok(())
    }

    /// Records the batches and epochs of `batch`, just written at the end of the current
    /// segment, in the in-memory index.
    fn note_appended(&mut self, batch: &BatchBuf) {
        let base = self.file_len;
        if let Some(seg) = self.segments.last_mut() {
            for &(start, _, first) in &batch.batches {
                seg.note_batch(first, base + start as u64);
            }
            seg.len = base + batch.len() as u64;
        }
        for &(index, epoch) in &batch.epochs {
            note_epoch(&mut self.epochs, index, epoch);
        }
    }

    /// fsyncs the current segment (data only: its size is fixed by appends that fsync'd
    /// metadata when the file was created, and fdatasync covers size changes).
    pub fn sync(&mut self) -> Result<(), WalError> {
        if self.unsynced {
            let path = self.current_path();
            let file = &self.file;
            self.fsync_clock
                .time(|| file.sync_data())
                .map_err(|e| WalError::io(&path, e))?;
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
            clock: self.fsync_clock.clone(),
            first_index: self.file_first_index,
            len: self.file_len,
            last_index: self.last_index,
            generation: self.generation,
        })
    }

    /// The clock every fsync of this log is timed on (for health checks).
    pub fn fsync_clock(&self) -> Arc<FsyncClock> {
        self.fsync_clock.clone()
    }

    /// Records that the fsync of `h` completed.
    pub fn synced(&mut self, h: &SyncHandle) {
        if h.generation != self.generation {
            // The log was cut back meanwhile (and the cut fsync'd what it kept).
            return;
        }
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
        self.segments
            .push(SegmentIndex::new(first_index, salt, len));
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

    /// Records that `meta` was written to the meta file by its other writer (the store).
    pub fn note_meta(&mut self, meta: Meta) {
        self.meta = meta;
    }

    /// Records that `bytes` of old segments were removed by compaction (on another
    /// thread, through [`Wal::prune_covered`]): the in-memory index forgets them and
    /// learns the new snapshot.
    pub fn note_pruned(&mut self, bytes: u64) {
        self.log_bytes = self.log_bytes.saturating_sub(bytes);
        if let Err(e) = self.forget_pruned() {
            log::warn!("cannot list the log after a compaction: {e}");
        }
    }

    /// Brings the in-memory index in line with the directory after a compaction: drops
    /// the segments no longer there, and takes the newest snapshot's index and epoch.
    fn forget_pruned(&mut self) -> Result<(), WalError> {
        let listing = list_dir(&self.dir)?;
        if let Some((index, path)) = listing.snapshots.last()
            && *index > self.snapshot.0
        {
            self.snapshot = (*index, snapshot_header(path)?.1);
        }
        let current = self.file_first_index;
        self.segments
            .retain(|s| s.first == current || listing.segments.iter().any(|(f, _)| *f == s.first));
        self.trim_epochs();
        Ok(())
    }

    /// Drops the epoch runs that end at or before the snapshot.
    fn trim_epochs(&mut self) {
        let keep_from = self
            .epochs
            .partition_point(|r| r.0 <= self.snapshot.0 + 1)
            .saturating_sub(1);
        self.epochs.drain(..keep_from);
    }
}

/// Opens a segment for reading and appending.
fn open_segment(path: &Path) -> Result<File, WalError> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .open(path)
        .map_err(|e| WalError::io(path, e))
}

/// Index and epoch of the snapshot in `path`, from its `M` frame (the rest is not read).
/// The newest snapshot file in `dir` as (index, epoch, path), if any: what a cluster
/// leader sends a follower that is behind its log's start (`snapshot_transfer.rs`).
/// Temp files (a snapshot being written) are not listed.
pub fn newest_snapshot(dir: &Path) -> Result<Option<(u64, u64, PathBuf)>, WalError> {
    let listing = list_dir(dir)?;
    match listing.snapshots.last() {
        Some((index, path)) => Ok(Some((*index, snapshot_header(path)?.1, path.clone()))),
        None => Ok(None),
    }
}

fn snapshot_header(path: &Path) -> Result<(u64, u64), WalError> {
    let mut head = [0u8; 8 + FRAME_HEADER + 25];
    File::open(path)
        .and_then(|f| f.read_exact_at(&mut head, 0))
        .map_err(|e| WalError::io(path, e))?;
    let corrupt = |why: &str| WalError::Corrupt {
        path: path.to_path_buf(),
        offset: 8,
        reason: why.into(),
    };
    match read_frame(&head[8..]) {
        FrameRead::Frame(p, _) if p.len() == 25 && p[0] == b'M' => Ok((
            LittleEndian::read_u64(&p[1..9]),
            LittleEndian::read_u64(&p[9..17]),
        )),
        _ => Err(corrupt("bad snapshot header frame")),
    }
}

/// Finishes the install of a snapshot that stopped after writing it (see
/// [`Scan::install_cut_short`]): starts the segment that follows it, then removes the
/// segments it covers, as [`LogStore::install_snapshot`] would have.
fn finish_install(dir: &Path, scan: &mut Scan) -> Result<(), WalError> {
    let index = scan.snapshot.0;
    log::warn!(
        "the snapshot at index {index} was installed but its log segment not started \
         (the process stopped in between): finishing the install"
    );
    let (_, len, salt) = create_segment(dir, index + 1)?;
    let freed = Wal::prune_covered(dir, index)?;
    scan.log_bytes = (scan.log_bytes + len).saturating_sub(freed);
    scan.segments = vec![SegmentIndex::new(index + 1, salt, len)];
    scan.epochs.clear();
    scan.cut = None;
    scan.report.torn_tail = None;
    scan.install_cut_short = false;
    Ok(())
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
// The log as the node sees it

/// Bytes a [`SegmentReader`] reads at a time when the batch it needs is smaller: reads
/// of consecutive batches (`read`, the seek from a mark) cost one system call per 64 KiB.
const READ_AHEAD: usize = 64 << 10;

/// Reads one segment's batches through a window of the file.
struct SegmentReader {
    file: File,
    path: PathBuf,
    salt: u64,
    /// The segment's length as the index knows it: nothing past it is read.
    end: u64,
    /// The window: `win` holds the file's bytes from `win_start` on.
    win_start: u64,
    win: Vec<u8>,
}

impl SegmentReader {
    fn open(dir: &Path, seg: &SegmentIndex) -> Result<SegmentReader, WalError> {
        let path = dir.join(segment_name(seg.first));
        let file = File::open(&path).map_err(|e| WalError::io(&path, e))?;
        Ok(SegmentReader {
            file,
            path,
            salt: seg.salt,
            end: seg.len,
            win_start: 0,
            win: Vec::new(),
        })
    }

    fn corrupt(&self, offset: u64, reason: String) -> WalError {
        WalError::Corrupt {
            path: self.path.clone(),
            offset,
            reason,
        }
    }

    /// Makes the window hold bytes `off..off + n` (the caller checked they are below
    /// `end`, so `n` is bounded by the file).
    fn fill(&mut self, off: u64, n: usize) -> Result<(), WalError> {
        let have =
            off >= self.win_start && off + n as u64 <= self.win_start + self.win.len() as u64;
        if have {
            return Ok(());
        }
        let want = n.max(READ_AHEAD).min((self.end - off) as usize);
        self.win.clear();
        self.win.resize(want, 0);
        self.win_start = off;
        self.file
            .read_exact_at(&mut self.win, off)
            .map_err(|e| WalError::io(&self.path, e))
    }

    /// The batch at `off`: its records, their count, and the batch's length. These bytes
    /// were read whole at recovery or written by this process, so damage is corruption.
    fn batch(&mut self, off: u64) -> Result<(&[u8], u32, u64), WalError> {
        if off + FRAME_HEADER as u64 > self.end {
            return Err(self.corrupt(off, "batch header past the end of the segment".into()));
        }
        self.fill(off, FRAME_HEADER)?;
        let rel = (off - self.win_start) as usize;
        let len = LittleEndian::read_u32(&self.win[rel + 1..rel + 5]) as u64;
        let total = FRAME_HEADER as u64 + len;
        if len > MAX_BATCH as u64 || off + total > self.end {
            return Err(self.corrupt(off, format!("impossible batch length {len}")));
        }
        self.fill(off, total as usize)?;
        let rel = (off - self.win_start) as usize;
        match read_batch(
            &self.win[rel..rel + total as usize],
            self.salt,
            Limits::DEFAULT,
        ) {
            BatchRead::Batch { count, records, .. } => Ok((records, count, total)),
            BatchRead::Truncated => Err(self.corrupt(off, "batch cut short".into())),
            BatchRead::Invalid(why) => Err(self.corrupt(off, why.into())),
        }
    }
}

impl Wal {
    /// The segment holding `index`, if any, and the offset of the batch to read from to
    /// find it (the mark at or before it).
    fn locate(&self, index: u64) -> Option<(usize, u64)> {
        let si = self
            .segments
            .partition_point(|s| s.first <= index)
            .checked_sub(1)?;
        let marks = &self.segments[si].marks;
        let off = match marks.partition_point(|m| m.0 <= index) {
            0 => SEGMENT_HEADER_LEN as u64,
            m => marks[m - 1].1,
        };
        Some((si, off))
    }

    /// Calls `f` with every entry from `from` on, in order, until it returns false or the
    /// log ends. Checks that the indexes follow each other.
    fn for_each_from(
        &self,
        from: u64,
        mut f: impl FnMut(EntryRef<'_>) -> bool,
    ) -> Result<(), WalError> {
        let Some((mut si, mut off)) = self.locate(from) else {
            return Ok(());
        };
        let mut expect = from;
        loop {
            let mut r = SegmentReader::open(&self.dir, &self.segments[si])?;
            let path = r.path.clone();
            let corrupt = |offset: u64, reason: String| WalError::Corrupt {
                path: path.clone(),
                offset,
                reason,
            };
            while off < r.end {
                let (records, count, len) = r.batch(off)?;
                for rec in split_records(records, count, Limits::DEFAULT) {
                    let e = rec
                        .and_then(decode_entry)
                        .map_err(|why| corrupt(off, format!("bad record: {why}")))?;
                    if e.index < from {
                        continue;
                    }
                    if e.index != expect {
                        return Err(corrupt(
                            off,
                            format!(
                                "index out of order: record has index {} but {expect} was \
                                 expected",
                                e.index
                            ),
                        ));
                    }
                    expect += 1;
                    if !f(e) {
                        return Ok(());
                    }
                }
                off += len;
            }
            si += 1;
            if si == self.segments.len() {
                return Ok(());
            }
            off = SEGMENT_HEADER_LEN as u64;
        }
    }

    /// The epoch of the last entry (of the snapshot, if the log holds none after it).
    fn last_epoch(&self) -> u64 {
        if self.last_index <= self.snapshot.0 {
            return self.snapshot.1;
        }
        self.epochs.last().map_or(self.snapshot.1, |r| r.1)
    }

    /// Drops every entry after `index` (below the end of the log, at or above the
    /// snapshot), durably. Segments after the one holding `index + 1` are removed, newest
    /// first, so that a crash on the way leaves a shorter log, never one with a hole. In
    /// that segment, a cut at a batch boundary truncates the file; a cut inside a batch
    /// rewrites the segment (a temp file with every batch before it and the kept records
    /// of the cut batch as a new batch, then renamed over it), because a batch's checksum
    /// covers all of it and cutting the file there and appending the kept records after
    /// would, if the process stopped in between, lose entries that may be committed.
    fn cut_after(&mut self, index: u64) -> Result<(), WalError> {
        let Some((si, mut off)) = self.locate(index + 1) else {
            return Err(WalError::Refused(format!(
                "cannot cut the log after index {index}: no segment holds index {}",
                index + 1
            )));
        };
        self.generation += 1;
        for seg in self.segments[si + 1..].iter().rev() {
            let path = self.dir.join(segment_name(seg.first));
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(WalError::io(&path, e)),
            }
            self.log_bytes = self.log_bytes.saturating_sub(seg.len);
        }
        if si + 1 < self.segments.len() {
            sync_dir(&self.dir)?;
            self.segments.truncate(si + 1);
        }
        // The batch holding `index + 1`, and the records before it in that batch.
        let seg = self.segments[si].clone();
        let path = self.dir.join(segment_name(seg.first));
        let mut kept = BatchBuf::default();
        let mut cut_at = None;
        {
            let mut r = SegmentReader::open(&self.dir, &seg)?;
            while off < seg.len {
                let (records, count, len) = r.batch(off)?;
                kept.clear();
                for rec in split_records(records, count, Limits::DEFAULT) {
                    let e = rec
                        .and_then(decode_entry)
                        .map_err(|why| WalError::Corrupt {
                            path: path.clone(),
                            offset: off,
                            reason: format!("bad record: {why}"),
                        })?;
                    if e.index > index {
                        cut_at = Some(off);
                        break;
                    }
                    kept.push_with(e.index, e.epoch, |out| out.extend_from_slice(e.payload))
                        .map_err(|e| WalError::Refused(e.to_string()))?;
                }
                if cut_at.is_some() {
                    break;
                }
                off += len;
            }
        }
        let Some(cut_at) = cut_at else {
            return Err(WalError::Corrupt {
                path,
                offset: seg.len,
                reason: format!("index {} is not in the segment meant to hold it", index + 1),
            });
        };
        let new_len = if kept.is_empty() {
            truncate(&path, cut_at)?;
            cut_at
        } else {
            let tmp = self.dir.join(format!("{}.tmp", segment_name(seg.first)));
            let bytes = kept.seal(cut_at, seg.salt);
            let written = File::open(&path)
                .and_then(|src| {
                    let mut out = File::create(&tmp)?;
                    if io::copy(&mut src.take(cut_at), &mut out)? != cut_at {
                        return Err(io::Error::other("segment shorter than its index says"));
                    }
                    out.write_all(bytes)?;
                    out.sync_all()
                })
                .map_err(|e| WalError::io(&tmp, e));
            if let Err(e) = written {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
            let n = cut_at + bytes.len() as u64;
            fs::rename(&tmp, &path).map_err(|e| WalError::io(&path, e))?;
            sync_dir(&self.dir)?;
            n
        };
        let seg = &mut self.segments[si];
        self.log_bytes = (self.log_bytes + new_len).saturating_sub(seg.len);
        seg.len = new_len;
        seg.marks.retain(|m| m.1 < cut_at);
        if let Some(&(_, _, first)) = kept.batches.first() {
            seg.note_batch(first, cut_at);
        }
        let (first, salt) = (seg.first, seg.salt);
        self.file = Arc::new(open_segment(&path)?);
        self.file_first_index = first;
        self.file_len = new_len;
        self.file_salt = salt;
        self.synced_len = new_len;
        self.unsynced = false;
        self.last_index = index;
        // What is left was fsync'd: by the truncation, or written whole by the rewrite,
        // or, in an earlier segment, when the next one began.
        self.durable_index = index;
        self.epochs.retain(|r| r.0 <= index);
        Ok(())
    }
}

/// The real log behind the node's interface. Everything goes through the same segment
/// files, format and recovery as the store's own write path.
impl Wal {
    /// The log store's `append` (consecutive entries at the log's end), with the fsync
    /// that `always` asks for left to a later [`Wal::sync`] when `sync` is false.
    pub fn append_entries(&mut self, entries: &[LogEntry], sync: bool) -> Result<(), WalError> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        if first.index != self.last_index + 1 {
            return Err(WalError::Refused(format!(
                "append at index {} but the log ends at {}",
                first.index, self.last_index
            )));
        }
        let mut buf = BatchBuf::default();
        for (i, e) in entries.iter().enumerate() {
            if e.index != first.index + i as u64 {
                return Err(WalError::Refused(format!(
                    "append of index {} after {}: indexes must be consecutive",
                    e.index,
                    first.index + i as u64 - 1
                )));
            }
            buf.push(e).map_err(|e| WalError::Refused(e.to_string()))?;
        }
        self.append_batch(&mut buf, sync)
    }
}

impl LogStore for Wal {
    fn last(&self) -> (u64, u64) {
        (self.last_index, self.last_epoch())
    }

    fn snapshot(&self) -> (u64, u64) {
        self.snapshot
    }

    fn epoch_at(&self, index: u64) -> Result<Option<u64>, WalError> {
        if index == 0 {
            return Ok(Some(0));
        }
        if index == self.snapshot.0 {
            return Ok(Some(self.snapshot.1));
        }
        if index < self.snapshot.0 || index > self.last_index {
            return Ok(None);
        }
        Ok(self
            .epochs
            .partition_point(|r| r.0 <= index)
            .checked_sub(1)
            .map(|i| self.epochs[i].1))
    }

    fn read(&self, from: u64, max_bytes: usize) -> Result<Vec<LogEntry>, WalError> {
        if from <= self.snapshot.0 {
            return Err(WalError::Refused(format!(
                "index {from} is compacted into the snapshot at index {} (send the snapshot)",
                self.snapshot.0
            )));
        }
        let mut out = Vec::new();
        if from > self.last_index {
            return Ok(out);
        }
        let mut bytes = 0usize;
        let last = self.last_index;
        self.for_each_from(from, |e| {
            if !out.is_empty() && bytes.saturating_add(e.payload.len()) > max_bytes {
                return false;
            }
            bytes += e.payload.len();
            out.push(e.to_entry());
            e.index < last
        })?;
        Ok(out)
    }

    fn append(&mut self, entries: &[LogEntry]) -> Result<(), WalError> {
        self.append_entries(entries, true)
    }

    fn truncate_after(&mut self, index: u64) -> Result<(), WalError> {
        if index < self.meta.commit_index {
            return Err(WalError::Refused(format!(
                "cannot drop entries after index {index}: index {} is committed",
                self.meta.commit_index
            )));
        }
        if index < self.snapshot.0 {
            return Err(WalError::Refused(format!(
                "cannot drop entries after index {index}: the snapshot at {} covers them",
                self.snapshot.0
            )));
        }
        if index >= self.last_index {
            return Ok(());
        }
        self.cut_after(index)
    }

    fn sync(&mut self) -> Result<(), WalError> {
        Wal::sync(self)
    }

    fn durable_index(&self) -> u64 {
        self.durable_index
    }

    fn meta(&self) -> Meta {
        self.meta
    }

    fn save_meta(&mut self, meta: Meta) -> Result<(), WalError> {
        write_meta(&self.dir, &meta)?;
        self.meta = meta;
        Ok(())
    }

    /// Every step leaves a directory that recovery reads: first the divergent suffix is
    /// cut (if the log does not hold `index` in `epoch`); if the log then ends exactly at
    /// `index`, the segment that follows the snapshot is started; then the snapshot is
    /// written (atomically: the install's commit point); if the log ended before `index`,
    /// the segment is started now (recovery finishes this step if the process stopped
    /// just before it, see `scan`); last the segments it covers are removed.
    fn install_snapshot(&mut self, index: u64, epoch: u64, data: &[u8]) -> Result<(), WalError> {
        let mut header = None;
        decode_snapshot_with(Path::new("the snapshot to install"), data, |p| {
            if let SnapshotPart::Header { index, epoch, .. } = p {
                header = Some((index, epoch));
            }
        })
        .map_err(|e| WalError::Refused(format!("not a whole snapshot: {e}")))?;
        if header != Some((index, epoch)) {
            return Err(WalError::Refused(format!(
                "the snapshot's header says (index, epoch) {header:?}, not ({index}, {epoch})"
            )));
        }
        if index < self.snapshot.0 || (index == self.snapshot.0 && epoch != self.snapshot.1) {
            return Err(WalError::Refused(format!(
                "a snapshot at index {index} would replace the newer one at {}",
                self.snapshot.0
            )));
        }
        if index == self.snapshot.0 {
            return Ok(());
        }
        let keep = self.last_index >= index && self.epoch_at(index)? == Some(epoch);
        if !keep && self.last_index > index {
            self.cut_after(index)?;
        }
        if self.last_index == index && self.file_first_index != index + 1 {
            Wal::roll(self, index + 1)?;
        }
        write_atomically(&self.dir, &snapshot_name(index), data)?;
        if self.last_index < index {
            Wal::roll(self, index + 1)?;
        }
        let freed = Wal::prune_covered(&self.dir, index)?;
        self.log_bytes = self.log_bytes.saturating_sub(freed);
        let starts: Vec<u64> = self.segments.iter().map(|s| s.first).collect();
        let mut i = 0;
        self.segments.retain(|_| {
            i += 1;
            starts.get(i).is_none_or(|next| *next > index + 1)
        });
        self.snapshot = (index, epoch);
        if self.last_index <= index {
            self.last_index = index;
            self.durable_index = index;
            self.epochs.clear();
        } else {
            self.trim_epochs();
        }
        Ok(())
    }
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
/// only a write in progress). `validate` checks each entry's payload as the store would
/// decode it (the log cannot). `repair` takes the lock (refused while a server has the
/// directory open) and truncates a torn tail (or finishes a snapshot install) exactly as
/// startup would. Corruption is returned as the error.
pub fn check(
    dir: &Path,
    repair: bool,
    validate: impl FnMut(EntryRef<'_>) -> Result<(), String>,
) -> Result<CheckReport, WalError> {
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
    let mut scan = scan(dir, &listing, |_| {}, validate)?;
    if repair && scan.install_cut_short {
        finish_install(dir, &mut scan)?;
    }
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

// ---------------------------------------------------------------------------------------
// The LogStore contract, for any implementation

/// The contract of [`LogStore`], checked against any implementation (the tests below run
/// it against [`Wal`]; the same function can run it against the in-memory log).
/// `open(None)` returns a new, empty log; `open(Some(log))` closes `log` and opens it
/// again, as a restart would (the suite syncs before every reopen, so a log that keeps
/// only what was synced keeps everything). Snapshots are given in the snapshot file
/// format ([`encode_snapshot`]). Panics on the first broken rule.
#[cfg(test)]
pub(crate) fn log_store_contract<L: LogStore>(mut open: impl FnMut(Option<L>) -> L) {
    /// Entry `i` in `epoch`: every fifth a no-op (empty payload), the others of varied
    /// sizes.
    fn entry(i: u64, epoch: u64) -> LogEntry {
        let payload = if i.is_multiple_of(5) {
            Vec::new()
        } else {
            format!("entry {i:03} ")
                .repeat(1 + (i % 3) as usize)
                .into_bytes()
        };
        LogEntry {
            index: i,
            epoch,
            payload,
        }
    }
    /// The reference log: 1..=30, epochs 1 (1..=10), 2 (11..=20), 4 (21..=30).
    fn all() -> Vec<LogEntry> {
        (1..=30)
            .map(|i| entry(i, [1, 2, 4][((i - 1) / 10) as usize]))
            .collect()
    }
    /// Appends [`all`] in appends of several sizes (so batches of several entries).
    fn fill<L: LogStore>(log: &mut L) {
        let all = all();
        for range in [0..1, 1..10, 10..25, 25..30] {
            log.append(&all[range]).unwrap();
        }
    }
    fn snap(index: u64, epoch: u64) -> Vec<u8> {
        encode_snapshot(
            index,
            epoch,
            vec![(0, std::iter::once((&b"k"[..], &b"v"[..], None)))],
        )
    }
    fn everything<L: LogStore>(log: &L, from: u64) -> Vec<LogEntry> {
        log.read(from, usize::MAX).unwrap()
    }
    /// Closes and reopens, after a sync.
    fn reopen<L: LogStore>(open: &mut impl FnMut(Option<L>) -> L, mut log: L) -> L {
        log.sync().unwrap();
        open(Some(log))
    }

    // A new log.
    let mut log = open(None);
    assert_eq!((log.last(), log.snapshot()), ((0, 0), (0, 0)));
    assert_eq!(log.epoch_at(0).unwrap(), Some(0));
    assert_eq!(log.epoch_at(1).unwrap(), None);
    assert!(everything(&log, 1).is_empty());
    assert_eq!(log.durable_index(), 0);
    assert_eq!(log.meta(), Meta::default());

    // Append, read, epochs; refused appends change nothing.
    fill(&mut log);
    let all = all();
    let check_all = |log: &L| {
        assert_eq!(log.last(), (30, 4));
        assert_eq!(everything(log, 1), all);
        assert_eq!(everything(log, 17), all[16..]);
        for e in &all {
            assert_eq!(log.epoch_at(e.index).unwrap(), Some(e.epoch), "{}", e.index);
        }
        assert_eq!(log.epoch_at(31).unwrap(), None);
        assert!(everything(log, 31).is_empty());
        assert!(everything(log, 1000).is_empty());
    };
    check_all(&log);
    assert!(log.append(&[entry(32, 4)]).is_err(), "gap");
    assert!(log.append(&[entry(30, 4)]).is_err(), "overlap");
    assert!(
        log.append(&[entry(31, 4), entry(33, 4)]).is_err(),
        "not consecutive"
    );
    check_all(&log);
    assert!(log.durable_index() <= 30);
    log.sync().unwrap();
    assert_eq!(log.durable_index(), 30);
    // Read limits: payload bytes up to max_bytes, but always at least one entry.
    let size = |range: std::ops::Range<usize>| -> usize {
        all[range].iter().map(|e| e.payload.len()).sum()
    };
    assert_eq!(log.read(1, size(0..3)).unwrap(), all[0..3]);
    assert_eq!(log.read(1, size(0..3) - 1).unwrap(), all[0..2]);
    assert_eq!(log.read(2, 0).unwrap(), all[1..2]);
    assert_eq!(log.read(5, 0).unwrap(), all[4..5], "a no-op entry alone");
    assert_eq!(log.read(12, size(11..20)).unwrap(), all[11..20]);
    let mut log = reopen(&mut open, log);
    check_all(&log);

    // Truncation: inside a batch, at a batch boundary, to nothing; durable at once.
    log.truncate_after(30).unwrap();
    log.truncate_after(100).unwrap();
    check_all(&log);
    log.truncate_after(17).unwrap();
    assert_eq!(log.last(), (17, 2));
    assert_eq!(log.durable_index(), 17);
    assert_eq!(everything(&log, 1), all[..17]);
    assert_eq!(log.epoch_at(18).unwrap(), None);
    let new: Vec<LogEntry> = (18..=22).map(|i| entry(i, 5)).collect();
    log.append(&new).unwrap();
    assert_eq!(log.last(), (22, 5));
    assert_eq!(everything(&log, 16), [&all[15..17], &new[..]].concat());
    assert_eq!(log.epoch_at(17).unwrap(), Some(2));
    assert_eq!(log.epoch_at(18).unwrap(), Some(5));
    let mut log = reopen(&mut open, log);
    assert_eq!(everything(&log, 1), [&all[..17], &new[..]].concat());
    log.truncate_after(10).unwrap();
    assert_eq!(log.last(), (10, 1));
    let mut log = open(Some(log));
    assert_eq!(log.last(), (10, 1));
    assert_eq!(everything(&log, 1), all[..10]);
    log.append(&[entry(11, 6)]).unwrap();
    let mut log = reopen(&mut open, log);
    assert_eq!(log.last(), (11, 6));
    log.truncate_after(0).unwrap();
    assert_eq!(log.last(), (0, 0));
    let mut log = open(Some(log));
    assert_eq!(log.last(), (0, 0));
    assert!(everything(&log, 1).is_empty());

    // Meta, and no truncation below the commit index.
    fill(&mut log);
    let meta = Meta {
        epoch: 3,
        voted_for: 2,
        commit_index: 12,
    };
    log.save_meta(meta).unwrap();
    assert_eq!(log.meta(), meta);
    assert!(log.truncate_after(11).is_err());
    let mut log = reopen(&mut open, log);
    assert_eq!(log.meta(), meta);
    assert!(log.truncate_after(11).is_err());
    check_all(&log);
    log.truncate_after(12).unwrap();
    assert_eq!(log.last(), (12, 2));
    drop(log);

    // A snapshot the log agrees with: the entries after it stay.
    let mut log = open(None);
    fill(&mut log);
    log.install_snapshot(15, 2, &snap(15, 2)).unwrap();
    let check_kept = |log: &L| {
        assert_eq!((log.snapshot(), log.last()), ((15, 2), (30, 4)));
        assert!(
            log.read(15, usize::MAX).is_err(),
            "read of the snapshot's index"
        );
        assert!(log.read(3, usize::MAX).is_err(), "read below the snapshot");
        assert_eq!(everything(log, 16), all[15..]);
        assert_eq!(log.epoch_at(15).unwrap(), Some(2));
        assert_eq!(log.epoch_at(14).unwrap(), None);
        assert_eq!(log.epoch_at(16).unwrap(), Some(2));
        assert_eq!(log.epoch_at(30).unwrap(), Some(4));
    };
    check_kept(&log);
    let mut log = reopen(&mut open, log);
    check_kept(&log);
    assert!(log.truncate_after(14).is_err(), "below the snapshot");
    assert!(
        log.install_snapshot(10, 1, &snap(10, 1)).is_err(),
        "older than the snapshot"
    );
    check_kept(&log);
    log.truncate_after(15).unwrap();
    assert_eq!(log.last(), (15, 2));
    assert!(everything(&log, 16).is_empty());
    log.append(&[entry(16, 7)]).unwrap();
    let log = reopen(&mut open, log);
    assert_eq!((log.snapshot(), log.last()), ((15, 2), (16, 7)));
    assert_eq!(everything(&log, 16), vec![entry(16, 7)]);
    drop(log);

    // A snapshot at the last index, in its epoch.
    let mut log = open(None);
    fill(&mut log);
    log.install_snapshot(30, 4, &snap(30, 4)).unwrap();
    assert_eq!((log.snapshot(), log.last()), ((30, 4), (30, 4)));
    let mut log = reopen(&mut open, log);
    assert_eq!((log.snapshot(), log.last()), ((30, 4), (30, 4)));
    log.append(&[entry(31, 4)]).unwrap();
    let log = reopen(&mut open, log);
    assert_eq!(everything(&log, 31), vec![entry(31, 4)]);
    drop(log);

    // A snapshot the log disagrees with (another epoch at its index): every entry goes.
    let mut log = open(None);
    fill(&mut log);
    log.install_snapshot(20, 9, &snap(20, 9)).unwrap();
    let check_fresh = |log: &L| {
        assert_eq!((log.snapshot(), log.last()), ((20, 9), (20, 9)));
        assert!(everything(log, 21).is_empty());
        assert_eq!(log.epoch_at(20).unwrap(), Some(9));
        assert_eq!(log.epoch_at(19).unwrap(), None);
        assert_eq!(log.epoch_at(21).unwrap(), None);
        assert!(log.durable_index() >= 20);
    };
    check_fresh(&log);
    let mut log = reopen(&mut open, log);
    check_fresh(&log);
    assert!(log.append(&[entry(22, 9)]).is_err());
    log.append(&[entry(21, 9)]).unwrap();
    let log = reopen(&mut open, log);
    assert_eq!(log.last(), (21, 9));
    assert_eq!(everything(&log, 21), vec![entry(21, 9)]);
    drop(log);

    // A snapshot past the end of the log.
    let mut log = open(None);
    fill(&mut log);
    log.install_snapshot(100, 7, &snap(100, 7)).unwrap();
    assert_eq!((log.snapshot(), log.last()), ((100, 7), (100, 7)));
    let mut log = reopen(&mut open, log);
    assert_eq!((log.snapshot(), log.last()), ((100, 7), (100, 7)));
    assert!(log.read(30, usize::MAX).is_err());
    log.append(&[entry(101, 7)]).unwrap();
    let log = reopen(&mut open, log);
    assert_eq!(everything(&log, 101), vec![entry(101, 7)]);
    drop(log);

    // Many entries, in batches of every size: paged reads return each exactly once.
    let mut log = open(None);
    let many: Vec<LogEntry> = (1..=600).map(|i| entry(i, 1 + i / 200)).collect();
    let mut at = 0;
    for n in (1..).cycle() {
        if at == many.len() {
            break;
        }
        let end = (at + n % 17).min(many.len()).max(at + 1);
        log.append(&many[at..end]).unwrap();
        at = end;
    }
    let log = reopen(&mut open, log);
    for max_bytes in [0, 100, 5000] {
        let mut got = Vec::new();
        while let Some(next) = got.last().map_or(Some(1), |e: &LogEntry| {
            (e.index < 600).then_some(e.index + 1)
        }) {
            let page = log.read(next, max_bytes).unwrap();
            assert!(!page.is_empty());
            let bytes: usize = page.iter().map(|e| e.payload.len()).sum();
            assert!(page.len() == 1 || bytes <= max_bytes);
            got.extend(page);
        }
        assert_eq!(got, many);
    }
    for e in &many {
        assert_eq!(log.epoch_at(e.index).unwrap(), Some(e.epoch));
        assert_eq!(log.read(e.index, 0).unwrap(), vec![e.clone()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsync_clock_times_the_fsync_under_way_and_keeps_the_oldest() {
        let c = FsyncClock::new();
        assert_eq!(c.in_progress(), None);
        c.time(|| {
            assert!(c.in_progress().is_some());
            // A second, overlapping fsync leaves the older start in place.
            let outer = c.since.load(std::sync::atomic::Ordering::SeqCst);
            c.time(|| assert!(c.in_progress().is_some()));
            assert_eq!(c.since.load(std::sync::atomic::Ordering::SeqCst), outer);
        });
        assert_eq!(c.in_progress(), None);
    }

    /// An entry whose payload names its key and value (every seventh one a no-op, with
    /// an empty payload); the log never looks inside.
    fn set(i: u64, k: &str, v: &str) -> LogEntry {
        LogEntry {
            index: i,
            epoch: 1,
            payload: if i.is_multiple_of(7) {
                Vec::new()
            } else {
                format!("{k}={v}").into_bytes()
            },
        }
    }

    /// One sealed batch holding `entries`, as a fresh segment would get it.
    fn batch_bytes(entries: &[LogEntry], salt: u64) -> Vec<u8> {
        let mut b = BatchBuf::default();
        for e in entries {
            b.push(e).unwrap();
        }
        b.seal(SEGMENT_HEADER_LEN as u64, salt).to_vec()
    }

    /// The bytes of one entry (what a record's length counts).
    fn entry_bytes(e: &LogEntry) -> Vec<u8> {
        let mut p = Vec::new();
        encode_record(&mut p, e.index, e.epoch, |out| {
            out.extend_from_slice(&e.payload)
        });
        p.split_off(4)
    }

    fn decode_all(records: &[u8], count: u32, limits: Limits) -> Vec<LogEntry> {
        split_records(records, count, limits)
            .map(|p| decode_entry(p.unwrap()).unwrap().to_entry())
            .collect()
    }

    #[test]
    fn every_entry_round_trips() {
        let payloads: Vec<Vec<u8>> = vec![
            Vec::new(),
            b"k\r\n\0".to_vec(),
            vec![0, 1, 2, 255],
            vec![BATCH_MAGIC; 300],
            (0..=255).collect(),
        ];
        let entries: Vec<LogEntry> = payloads
            .into_iter()
            .enumerate()
            .map(|(i, payload)| LogEntry {
                index: i as u64 + 1,
                epoch: [0, 1, 7, u64::MAX][i % 4],
                payload,
            })
            .collect();
        for e in &entries {
            let bytes = entry_bytes(e);
            assert_eq!(bytes.len(), ENTRY_HEADER + e.payload.len());
            assert_eq!(decode_entry(&bytes).unwrap().to_entry(), *e);
            // push and push_with write the same bytes.
            let (mut a, mut b) = (BatchBuf::default(), BatchBuf::default());
            a.push(e).unwrap();
            b.push_with(e.index, e.epoch, |out| out.extend_from_slice(&e.payload))
                .unwrap();
            assert_eq!(a.seal(16, 1), b.seal(16, 1));
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
        assert_eq!(decode_all(records, count, Limits::DEFAULT), entries);
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

    /// The log's own header is checked; a version 1 entry (before databases existed)
    /// cannot occur any more and is refused like any unknown version.
    #[test]
    fn an_entry_header_is_checked() {
        let mut p = entry_bytes(&set(1, "k", "v"));
        for cut in 0..ENTRY_HEADER {
            assert!(decode_entry(&p[..cut]).is_err(), "cut {cut}");
        }
        assert_eq!(decode_entry(&p[..ENTRY_HEADER]).unwrap().payload, b"");
        p[0] = 1;
        assert_eq!(
            decode_entry(&p).unwrap_err(),
            "unknown record version 1".to_string()
        );
    }

    #[test]
    fn version_1_snapshots_read_as_database_0() {
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
        let e = set(1, "k", "v");
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
        let base = entry_bytes(&set(1, "k", "")).len();
        let limits = Limits {
            max_entry: base + 100,
            max_batch: 3 * (base + 100),
        };
        let at_limit = set(1, "k", &"v".repeat(100));
        let over = set(3, "k", &"v".repeat(101));
        assert_eq!(entry_bytes(&at_limit).len(), limits.max_entry);
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
        assert_eq!(decode_all(records, count, limits), vec![at_limit.clone()]);
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

    fn open_collect(dir: &Path, opts: WalOptions) -> Result<(Wal, Vec<LogEntry>), WalError> {
        let mut got = Vec::new();
        let (w, _) = Wal::open(
            dir,
            opts,
            |_| {},
            |e| {
                got.push(e.to_entry());
                Ok(())
            },
        )?;
        Ok((w, got))
    }

    /// Appends each entry as its own batch (one append, one fsync under `always`).
    fn write_entries(w: &mut Wal, entries: &[LogEntry]) {
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
        let entries: Vec<LogEntry> = (1..=50).map(|i| set(i, &format!("k{i}"), "v")).collect();
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
        let entries: Vec<LogEntry> = (1..=3).map(|i| set(i, "key", "some value")).collect();
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
        let entries: Vec<LogEntry> = (1..=3).map(|i| set(i, "key", "value")).collect();
        let last: Vec<LogEntry> = (4..=10).map(|i| set(i, "k", &"x".repeat(500))).collect();
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
        let synced: Vec<LogEntry> = (1..=2).map(|i| set(i, "key", "value")).collect();
        let unsynced: Vec<LogEntry> = (3..=8).map(|i| set(i, "k", &"y".repeat(300))).collect();
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
            let all: Vec<LogEntry> = synced.iter().chain(&unsynced).cloned().collect();
            assert_eq!(got[..], all[..got.len()], "image {n}");
        }
    }

    #[test]
    fn flipped_byte_mid_log_is_refused_with_offset() {
        let entries: Vec<LogEntry> = (1..=5).map(|i| set(i, "key", "value")).collect();
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
            check(dir.path(), true, |_| Ok(())),
            Err(WalError::Corrupt { .. })
        ));
        assert_eq!(fs::read(&seg).unwrap(), bytes);
    }

    /// Writes `entries` as batches straight into segment `first` (bypassing the writer's
    /// checks), to build logs the writer never would.
    fn raw_segment(dir: &Path, first: u64, entries: &[LogEntry]) {
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
            check(dir.path(), false, |_| Ok(())),
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
            check(dir.path(), false, |_| Ok(())),
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
        let entries: Vec<LogEntry> = (1..=6).map(|i| set(i, &format!("k{i}"), "v")).collect();
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
            check(dir.path(), false, |_| Ok(())),
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
        let r = check(dir.path(), false, |_| Ok(())).unwrap();
        assert!(r.report.torn_tail.is_some());
        assert_eq!(fs::metadata(&seg).unwrap().len(), len - 3);
        check(dir.path(), true, |_| Ok(())).unwrap();
        let r = check(dir.path(), false, |_| Ok(())).unwrap();
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
        let entries: Vec<LogEntry> = (1..=20).map(|i| set(i, &format!("k{i}"), "v")).collect();
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
        let (w, rep) = Wal::open(
            dir.path(),
            opts,
            |p| snap_seen.push(p),
            |e| {
                got.push(e.to_entry());
                Ok(())
            },
        )
        .unwrap();
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

    /// Opens a `Wal` for [`log_store_contract`]: a new directory for `None`, the same one
    /// again for `Some`.
    fn wal_opener(segment_size: u64) -> impl FnMut(Option<Wal>) -> Wal {
        let mut dirs = Vec::new();
        move |old| {
            let dir = match old {
                Some(w) => {
                    let d = w.dir().to_path_buf();
                    drop(w);
                    d
                }
                None => {
                    let t = tempfile::tempdir().unwrap();
                    let d = t.path().to_path_buf();
                    dirs.push(t);
                    d
                }
            };
            let opts = WalOptions {
                fsync: FsyncPolicy::No,
                segment_size,
            };
            let (w, rep) = Wal::open(&dir, opts, |_| {}, |_| Ok(())).unwrap();
            // Whatever the log did, it left no damage behind.
            assert!(rep.torn_tail.is_none(), "{:?}", rep.torn_tail);
            check(&dir, false, |_| Ok(())).unwrap();
            w
        }
    }

    #[test]
    fn the_wal_keeps_the_log_store_contract() {
        // One segment with many batches (the index's marks), and many small segments.
        log_store_contract(wal_opener(64 << 20));
        log_store_contract(wal_opener(300));
    }

    /// A snapshot installed from a leader whose process stopped before the segment after
    /// it was started: recovery finishes the install.
    #[test]
    fn an_install_cut_short_is_finished_by_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = open_collect(dir.path(), WalOptions::default()).unwrap();
        let entries: Vec<LogEntry> = (1..=10).map(|i| set(i, "k", "v")).collect();
        LogStore::append(&mut w, &entries).unwrap();
        drop(w);
        let snap = encode_snapshot(
            50,
            3,
            vec![(0, std::iter::once((&b"k"[..], &b"v"[..], None)))],
        );
        write_atomically(dir.path(), &snapshot_name(50), &snap).unwrap();
        // Read-only, check-log sees nothing wrong; --repair finishes it as startup would.
        assert_eq!(
            check(dir.path(), false, |_| Ok(()))
                .unwrap()
                .report
                .last_index,
            50
        );
        let (mut w, got) = open_collect(dir.path(), WalOptions::default()).unwrap();
        assert!(got.is_empty());
        assert_eq!((w.snapshot(), w.last()), ((50, 3), (50, 3)));
        let l = list_dir(dir.path()).unwrap();
        assert_eq!(l.segments.iter().map(|s| s.0).collect::<Vec<_>>(), vec![51]);
        LogStore::append(&mut w, &[set(51, "k", "v")]).unwrap();
        drop(w);
        let (_, got) = open_collect(dir.path(), WalOptions::default()).unwrap();
        assert_eq!(got, vec![set(51, "k", "v")]);
        // Without any segment left, a snapshot's missing successor is still an error.
        let dir = tempfile::tempdir().unwrap();
        write_atomically(dir.path(), &snapshot_name(50), &snap).unwrap();
        let err = open_collect(dir.path(), WalOptions::default()).unwrap_err();
        assert!(err.to_string().contains("is missing"), "{err}");
    }

    /// A payload the replay callback cannot decode is corruption at its batch.
    #[test]
    fn an_undecodable_payload_is_corruption_at_its_offset() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = open_collect(dir.path(), WalOptions::default()).unwrap();
        write_entries(&mut w, &[set(1, "a", "1")]);
        let second = seg_len(dir.path());
        write_entries(&mut w, &[set(2, "bad", "x"), set(3, "c", "3")]);
        drop(w);
        let refuse = |e: EntryRef<'_>| {
            if e.payload.starts_with(b"bad") {
                Err("unknown operation code 98".to_string())
            } else {
                Ok(())
            }
        };
        let err = Wal::open(dir.path(), WalOptions::default(), |_| {}, refuse).unwrap_err();
        assert!(
            matches!(&err, WalError::Corrupt { offset, .. } if *offset == second as u64),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.contains("entry 2: unknown operation code 98"), "{msg}");
        assert!(check(dir.path(), false, refuse).is_err());
    }

    /// A log request that breaks the rules is refused and changes nothing; a snapshot
    /// that is not what it claims is never installed.
    #[test]
    fn bad_snapshots_are_not_installed() {
        let mut open = wal_opener(1 << 20);
        let mut w = open(None);
        LogStore::append(&mut w, &[set(1, "a", "1"), set(2, "b", "2")]).unwrap();
        let one = || vec![(0, std::iter::once((&b"k"[..], &b"v"[..], None)))];
        let mut good = encode_snapshot(5, 1, one());
        assert!(w.install_snapshot(6, 1, &good).is_err(), "another index");
        assert!(w.install_snapshot(5, 2, &good).is_err(), "another epoch");
        good.pop();
        assert!(w.install_snapshot(5, 1, &good).is_err(), "cut short");
        assert_eq!((w.snapshot(), w.last()), ((0, 0), (2, 1)));
        assert!(list_dir(w.dir()).unwrap().snapshots.is_empty());
        assert!(matches!(
            LogStore::append(&mut w, &[set(4, "a", "1")]),
            Err(WalError::Refused(_))
        ));
    }

    /// After a compaction (snapshot and pruning on another thread), the log's index
    /// learns the snapshot and forgets the segments.
    #[test]
    fn the_index_follows_compaction() {
        let mut open = wal_opener(200);
        let mut w = open(None);
        let entries: Vec<LogEntry> = (1..=20).map(|i| set(i, &format!("k{i}"), "v")).collect();
        LogStore::append(&mut w, &entries[..10]).unwrap();
        w.roll(11).unwrap();
        let snap = encode_snapshot(
            10,
            1,
            vec![(0, std::iter::once((&b"k"[..], &b"v"[..], None)))],
        );
        let freed = Wal::write_snapshot_and_prune(w.dir(), 10, &snap).unwrap();
        w.note_pruned(freed);
        LogStore::append(&mut w, &entries[10..]).unwrap();
        assert_eq!((w.snapshot(), w.last()), ((10, 1), (20, 1)));
        assert!(w.read(10, usize::MAX).is_err());
        assert_eq!(w.read(11, usize::MAX).unwrap(), entries[10..]);
        assert_eq!(w.segments.len(), list_dir(w.dir()).unwrap().segments.len());
        let w = open(Some(w));
        assert_eq!(w.read(11, usize::MAX).unwrap(), entries[10..]);
    }

    /// An `everysec` fsync that was under way when the log was cut back reports on bytes
    /// that are gone: it must not move what the log claims is on disk.
    #[test]
    fn a_sync_from_before_a_cut_claims_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let opts = WalOptions {
            fsync: FsyncPolicy::EverySec,
            segment_size: 1 << 20,
        };
        let (mut w, _) = open_collect(dir.path(), opts.clone()).unwrap();
        let entries: Vec<LogEntry> = (1..=6).map(|i| set(i, "k", "v")).collect();
        LogStore::append(&mut w, &entries).unwrap();
        let h = w.take_sync_handle().unwrap();
        h.file.sync_data().unwrap();
        w.truncate_after(2).unwrap();
        w.synced(&h);
        assert_eq!((w.durable_index(), w.synced_len), (2, w.file_len));
        LogStore::append(&mut w, &[set(3, "x", "y")]).unwrap();
        drop(w);
        let (_, got) = open_collect(dir.path(), opts).unwrap();
        assert_eq!(got, [&entries[..2], &[set(3, "x", "y")]].concat());
    }
}
