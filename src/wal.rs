//! The write-ahead log: record codec, segment files, snapshots, recovery and repair.
//!
//! Every write becomes an [`Entry`] (log index, epoch, the leader's clock, an [`Op`]) and is
//! appended to the current segment file before the map changes. Data enters as entries
//! encoded by [`encode_entry`] (the caller batches many into one buffer for group commit) and
//! leaves through [`Wal::open`], which replays the newest snapshot and then every later
//! entry, in index order, through a callback.
//!
//! # On-disk format
//!
//! The data directory holds `snapshot-<index>.snap` files (a full image of the map at a log
//! index) and `wal-<first index>.log` segments. Every file starts with an 8-byte header
//! naming its kind and format version, then a sequence of frames:
//!
//! ```text
//! frame   := MAGIC (0xB7) | len: u32 LE | crc32(len bytes ++ payload): u32 LE | payload
//! entry   := version u8 | index u64 | epoch u64 | ts_ms u64 | op
//! op      := code u8 | fields            (0 Noop, 1 Set, 2 Del, 3 MSet, 4 IncrBy, 5 Cmd)
//!          | 6 | n: u32 LE | n × (db: u32 LE | op)
//! ```
//!
//! Code 6 is a MULTI/EXEC transaction ([`Op::Multi`]): one entry, so it is applied (and
//! will be replicated) whole or not at all. Its ops are never transactions themselves, and
//! the decoder refuses a count larger than the record could hold.
//!
//! The leading magic byte means a frame is never all zeros, so the zero-filled tail that a
//! power cut can leave reads as a torn write, not as records. The CRC covers the length too,
//! so a flipped length is caught. `epoch` is carried from the first version so the cluster
//! can use the same format; `ts_ms` is the leader's wall clock when it accepted the write,
//! which lets expiry be decided deterministically on replay (see `store.rs`).
//!
//! # Damage
//!
//! A bad frame at the end of the last segment, with no valid frame after it, is a torn tail
//! (a write cut short by a crash): recovery truncates it and logs a warning. A bad frame
//! followed by valid frames, damage in an older segment, a gap in the indexes, or a bad
//! snapshot is corruption: [`Wal::open`] refuses with [`WalError::Corrupt`], which names the
//! file and byte offset and points to `kvstore check-log`.
//!
//! # Files appear atomically
//!
//! New segments and snapshots are written under a `.tmp` name, fsync'd, renamed, and then
//! the directory is fsync'd, so a crash leaves either the whole file or none (stray `.tmp`
//! files are removed at startup).

use byteorder::{ByteOrder, LittleEndian};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// First byte of every frame.
pub const MAGIC: u8 = 0xB7;
/// Frame header: magic, length, crc.
pub const FRAME_HEADER: usize = 9;
/// Largest payload a frame may claim (one 512 MiB value plus its key and headers fits).
pub const MAX_FRAME: usize = 1 << 30;
const SEGMENT_HEADER: &[u8; 8] = b"KVLOG\x00\x00\x01";
const SNAPSHOT_HEADER: &[u8; 8] = b"KVSNP\x00\x00\x01";
const ENTRY_VERSION: u8 = 1;

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

/// How an operation treats an existing key's expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// No expiry: the key lives until deleted.
    Never,
    /// Expires at this absolute Unix time in milliseconds. Never a relative time: replay must
    /// not move a deadline.
    At(u64),
    /// Keep whatever expiry the key had (SET … KEEPTTL).
    Keep,
}

impl Expiry {
    /// `At(unix_ms)`, or `Never` for 0 (how items and snapshots store "no deadline").
    pub fn from_deadline(unix_ms: u64) -> Expiry {
        if unix_ms == 0 {
            Expiry::Never
        } else {
            Expiry::At(unix_ms)
        }
    }
}

/// A condition on whether the key exists, checked when the entry is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    Always,
    /// Only if the key does not exist (NX).
    IfMissing,
    /// Only if the key exists (XX).
    IfExists,
}

/// An operation in the log. Applying one is deterministic: it depends only on the map and
/// on the entry (its `ts_ms` stands in for the clock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Does nothing; a new leader commits one in its own epoch.
    Noop,
    Set {
        key: Vec<u8>,
        value: Vec<u8>,
        expiry: Expiry,
        condition: Condition,
        /// Reply with the old value (SET … GET).
        get: bool,
    },
    Del {
        keys: Vec<Vec<u8>>,
    },
    /// Sets every pair, or (if `only_if_none_exist`, MSETNX) none of them.
    MSet {
        pairs: Vec<(Vec<u8>, Vec<u8>)>,
        only_if_none_exist: bool,
    },
    IncrBy {
        key: Vec<u8>,
        delta: i64,
    },
    /// Any other write, as a canonical command (name first, upper case): relative times
    /// already made absolute, options normalised, so that applying it is deterministic
    /// (`src/exec.rs`). Like Redis's append-only file, this lets a new command reach the
    /// log without a new record type.
    Cmd {
        args: Vec<Vec<u8>>,
    },
    /// A MULTI/EXEC transaction: every op applied in order, as one entry, so that no other
    /// entry (and, on a cluster, no follower's view) falls between them. Each op carries
    /// the index of the database it addresses. Read-only commands queued in the
    /// transaction are here too, as canonical read commands (`src/multi.rs`), so that
    /// they see the state at their place inside it. Never nested.
    Multi {
        ops: Vec<(u32, Op)>,
    },
}

/// One log record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub index: u64,
    pub epoch: u64,
    /// The leader's wall clock (Unix ms) when it accepted the write.
    pub ts_ms: u64,
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
            } => write!(
                f,
                "log corrupted in {} at byte offset {offset}: {reason}; valid records follow the \
                 damage, so this is not a torn write. Refusing to start: inspect it with \
                 `kvstore check-log {}`",
                path.display(),
                path.parent().unwrap_or(Path::new(".")).display()
            ),
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

/// Appends one frame holding `payload_fn`'s output to `out`.
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

/// Appends the frame of `entry` to `out`.
pub fn encode_entry(entry: &Entry, out: &mut Vec<u8>) {
    frame(out, |p| {
        p.push(ENTRY_VERSION);
        put_u64(p, entry.index);
        put_u64(p, entry.epoch);
        put_u64(p, entry.ts_ms);
        encode_op(&entry.op, p);
    })
}

fn encode_op(op: &Op, p: &mut Vec<u8>) {
    match op {
        Op::Noop => p.push(0),
        Op::Set {
            key,
            value,
            expiry,
            condition,
            get,
        } => {
            p.push(1);
            let (ecode, at) = match expiry {
                Expiry::Never => (0u8, 0),
                Expiry::At(t) => (1, *t),
                Expiry::Keep => (2, 0),
            };
            let ccode = match condition {
                Condition::Always => 0u8,
                Condition::IfMissing => 1,
                Condition::IfExists => 2,
            };
            p.push(ecode | (ccode << 2) | (u8::from(*get) << 4));
            if ecode == 1 {
                put_u64(p, at);
            }
            put_bytes(p, key);
            put_bytes(p, value);
        }
        Op::Del { keys } => {
            p.push(2);
            put_u32(p, keys.len() as u32);
            for k in keys {
                put_bytes(p, k);
            }
        }
        Op::MSet {
            pairs,
            only_if_none_exist,
        } => {
            p.push(3);
            p.push(u8::from(*only_if_none_exist));
            put_u32(p, pairs.len() as u32);
            for (k, v) in pairs {
                put_bytes(p, k);
                put_bytes(p, v);
            }
        }
        Op::IncrBy { key, delta } => {
            p.push(4);
            put_bytes(p, key);
            put_u64(p, *delta as u64);
        }
        Op::Cmd { args } => {
            p.push(5);
            put_u32(p, args.len() as u32);
            for a in args {
                put_bytes(p, a);
            }
        }
        Op::Multi { ops } => {
            p.push(6);
            put_u32(p, ops.len() as u32);
            for (db, op) in ops {
                put_u32(p, *db);
                encode_op(op, p);
            }
        }
    }
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
    fn count(&mut self) -> Result<usize, String> {
        let n = self.u32()? as usize;
        // Each element takes at least 4 bytes: a count beyond that is damage, and
        // refusing it here keeps a bad count from allocating gigabytes.
        if n > (self.buf.len() - self.pos) / 4 {
            return Err(format!("element count {n} exceeds the record"));
        }
        Ok(n)
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
    if version != ENTRY_VERSION {
        return Err(format!("unknown record version {version}"));
    }
    let index = r.u64()?;
    let epoch = r.u64()?;
    let ts_ms = r.u64()?;
    let op = decode_op(&mut r, true)?;
    r.done()?;
    Ok(Entry {
        index,
        epoch,
        ts_ms,
        op,
    })
}

/// Decodes one operation. Only a top-level op may be a transaction: its ops may not.
fn decode_op(r: &mut Reader<'_>, top_level: bool) -> Result<Op, String> {
    Ok(match r.u8()? {
        0 => Op::Noop,
        1 => {
            let flags = r.u8()?;
            let expiry = match flags & 3 {
                0 => Expiry::Never,
                1 => Expiry::At(r.u64()?),
                2 => Expiry::Keep,
                x => return Err(format!("unknown expiry code {x}")),
            };
            let condition = match (flags >> 2) & 3 {
                0 => Condition::Always,
                1 => Condition::IfMissing,
                2 => Condition::IfExists,
                x => return Err(format!("unknown condition code {x}")),
            };
            let get = flags & 0x10 != 0;
            let key = r.bytes()?;
            let value = r.bytes()?;
            Op::Set {
                key,
                value,
                expiry,
                condition,
                get,
            }
        }
        2 => {
            let n = r.count()?;
            let mut keys = Vec::with_capacity(n);
            for _ in 0..n {
                keys.push(r.bytes()?);
            }
            Op::Del { keys }
        }
        3 => {
            let only_if_none_exist = r.u8()? != 0;
            let n = r.count()?;
            let mut pairs = Vec::with_capacity(n);
            for _ in 0..n {
                pairs.push((r.bytes()?, r.bytes()?));
            }
            Op::MSet {
                pairs,
                only_if_none_exist,
            }
        }
        4 => Op::IncrBy {
            key: r.bytes()?,
            delta: r.u64()? as i64,
        },
        5 => {
            let n = r.count()?;
            if n == 0 {
                return Err("empty command record".into());
            }
            let mut args = Vec::with_capacity(n);
            for _ in 0..n {
                args.push(r.bytes()?);
            }
            Op::Cmd { args }
        }
        6 if !top_level => return Err("nested transaction record".into()),
        6 => {
            // `count` bounds n by the bytes left (each op takes at least 5), so a damaged
            // count cannot size a huge allocation.
            let n = r.count()?;
            let mut ops = Vec::with_capacity(n);
            for _ in 0..n {
                let db = r.u32()?;
                ops.push((db, decode_op(r, false)?));
            }
            Op::Multi { ops }
        }
        x => return Err(format!("unknown operation code {x}")),
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
    if len == 0 || len > MAX_FRAME {
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

/// Finds the first offset after `from` where a whole, valid entry frame with an index above
/// `min_index` starts. Used to tell a torn tail (nothing valid follows) from corruption.
fn next_valid_entry(buf: &[u8], from: usize, min_index: u64) -> Option<usize> {
    let mut pos = from;
    while pos < buf.len() {
        let rel = buf[pos..].iter().position(|&b| b == MAGIC)?;
        pos += rel;
        if let FrameRead::Frame(payload, _) = read_frame(&buf[pos..])
            && let Ok(e) = decode_entry(payload)
            && e.index > min_index
        {
            return Some(pos);
        }
        pos += 1;
    }
    None
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
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), WalError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let dst = dir.join(name);
    let mut f = File::create(&tmp).map_err(|e| WalError::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| WalError::io(&tmp, e))?;
    f.sync_all().map_err(|e| WalError::io(&tmp, e))?;
    drop(f);
    fs::rename(&tmp, &dst).map_err(|e| WalError::io(&dst, e))?;
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

/// One key of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotItem {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// Absolute expiry, Unix ms.
    pub expire_at_ms: Option<u64>,
}

/// Serialises a snapshot: header, one meta frame (index, epoch, count), one frame per key,
/// and a closing frame with the count again so a truncated snapshot cannot pass as whole.
pub fn encode_snapshot<'a>(
    index: u64,
    epoch: u64,
    items: impl ExactSizeIterator<Item = (&'a [u8], &'a [u8], Option<u64>)>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + items.len() * 48);
    out.extend_from_slice(SNAPSHOT_HEADER);
    let count = items.len() as u64;
    frame(&mut out, |p| {
        p.push(b'M');
        put_u64(p, index);
        put_u64(p, epoch);
        put_u64(p, count);
    });
    for (k, v, exp) in items {
        frame(&mut out, |p| {
            p.push(b'K');
            put_u64(p, exp.unwrap_or(0));
            put_bytes(p, k);
            put_bytes(p, v);
        });
    }
    frame(&mut out, |p| {
        p.push(b'E');
        put_u64(p, count);
    });
    out
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
        SnapshotPart::End => {}
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
    if buf.len() < 8 || &buf[..8] != SNAPSHOT_HEADER {
        return Err(corrupt(0, "not a kvstore snapshot (bad header)".into()));
    }
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
            b'K' if expected.is_some() => {
                let exp = r.u64()?;
                let key = r.bytes()?;
                let value = r.bytes()?;
                r.done()?;
                seen += 1;
                on_part(SnapshotPart::Item(SnapshotItem {
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
    /// Bytes in all segments (compaction compares this with the live data).
    log_bytes: u64,
    /// Index of the last entry written.
    last_index: u64,
    unsynced: bool,
}

/// A read-only scan of one data directory (recovery and `check-log`).
struct Scan {
    report: RecoveryReport,
    /// The torn tail to cut: (path, offset).
    cut: Option<(PathBuf, u64)>,
    log_bytes: u64,
}

/// Walks the directory: newest snapshot, then every segment, feeding `apply` in order.
/// Nothing is modified; the caller decides whether to truncate a torn tail.
fn scan(
    listing: &Listing,
    mut on_snapshot: impl FnMut(SnapshotPart),
    mut apply: impl FnMut(Entry),
) -> Result<Scan, WalError> {
    let mut report = RecoveryReport::default();
    let mut next = 1u64;
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
        next = index + 1;
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
        if buf.len() < SEGMENT_HEADER.len() {
            // A segment is created whole (header included) under a temporary name, so a
            // short one can only be damage.
            return Err(corrupt(0, "segment shorter than its header".into()));
        }
        if &buf[..8] != SEGMENT_HEADER {
            return Err(corrupt(0, "not a kvstore log segment (bad header)".into()));
        }
        if *first > next {
            return Err(corrupt(
                0,
                format!("log starts at index {first} but index {next} was expected"),
            ));
        }
        let mut pos = 8;
        while pos < buf.len() {
            let bad = match read_frame(&buf[pos..]) {
                FrameRead::Frame(payload, n) => match decode_entry(payload) {
                    Ok(e) => {
                        if e.index < next {
                            // Covered by the snapshot (compaction had not yet removed it).
                            pos += n;
                            continue;
                        }
                        if e.index != next {
                            return Err(corrupt(
                                pos,
                                format!("record has index {} but {next} was expected", e.index),
                            ));
                        }
                        next += 1;
                        report.last_index = e.index;
                        report.last_epoch = e.epoch;
                        report.entries_replayed += 1;
                        apply(e);
                        pos += n;
                        continue;
                    }
                    Err(why) => why,
                },
                FrameRead::Truncated => "record cut short".to_string(),
                FrameRead::Invalid(why) => why.to_string(),
            };
            // Damage at `pos`: a torn tail only if this is the last segment and nothing
            // valid follows it.
            if !last_segment {
                return Err(corrupt(
                    pos,
                    format!("{bad} (in a segment that is not the last)"),
                ));
            }
            if let Some(at) = next_valid_entry(&buf, pos + 1, next.saturating_sub(1)) {
                return Err(corrupt(
                    pos,
                    format!("{bad}; a valid record follows at offset {at}"),
                ));
            }
            report.torn_tail = Some((path.clone(), pos as u64, (buf.len() - pos) as u64));
            cut = Some((path.clone(), pos as u64));
            break;
        }
    }
    Ok(Scan {
        report,
        cut,
        log_bytes,
    })
}

impl Wal {
    /// Opens (creating if needed) the log in `dir`, replays it, and returns the writer.
    /// `on_snapshot` receives the newest snapshot, then `apply` every later entry in index
    /// order. A torn tail is truncated (with a warning); corruption is an error.
    pub fn open(
        dir: &Path,
        opts: WalOptions,
        on_snapshot: impl FnMut(SnapshotPart),
        apply: impl FnMut(Entry),
    ) -> Result<(Wal, RecoveryReport), WalError> {
        fs::create_dir_all(dir).map_err(|e| WalError::io(dir, e))?;
        let listing = list_dir(dir)?;
        for t in &listing.temps {
            log::warn!("removing leftover temporary file {}", t.display());
            fs::remove_file(t).map_err(|e| WalError::io(t, e))?;
        }
        let scan = scan(&listing, on_snapshot, apply)?;
        if let Some((path, offset)) = &scan.cut {
            let (_, _, dropped) = scan.report.torn_tail.clone().unwrap_or_default();
            log::warn!(
                "torn write at the end of {} (byte offset {offset}, {dropped} bytes): \
                 truncating it; every record before it is intact",
                path.display()
            );
            truncate(path, *offset)?;
        }
        let report = scan.report;
        let mut log_bytes = scan.log_bytes - report.torn_tail.as_ref().map_or(0, |t| t.2);
        let (file, first, len) = match listing.segments.last() {
            Some((first, path)) => {
                let f = OpenOptions::new()
                    .append(true)
                    .open(path)
                    .map_err(|e| WalError::io(path, e))?;
                let len = f.metadata().map_err(|e| WalError::io(path, e))?.len();
                (f, *first, len)
            }
            None => {
                let first = report.last_index + 1;
                let (f, len) = create_segment(dir, first)?;
                log_bytes += len;
                (f, first, len)
            }
        };
        let wal = Wal {
            dir: dir.to_path_buf(),
            opts,
            file: Arc::new(file),
            file_first_index: first,
            file_len: len,
            log_bytes,
            last_index: report.last_index,
            unsynced: false,
        };
        Ok((wal, report))
    }

    /// Appends already-encoded entries (`bytes`), whose last index is `last_index`, and
    /// fsyncs if the policy is `always`. Rolls to a new segment first if this one is full.
    pub fn append(&mut self, bytes: &[u8], last_index: u64) -> Result<(), WalError> {
        if bytes.is_empty() {
            return Ok(());
        }
        if self.file_len >= self.opts.segment_size {
            self.roll(self.last_index + 1)?;
        }
        let path = self.current_path();
        (&*self.file)
            .write_all(bytes)
            .map_err(|e| WalError::io(&path, e))?;
        self.file_len += bytes.len() as u64;
        self.log_bytes += bytes.len() as u64;
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
        }
        Ok(())
    }

    /// For the `everysec` syncer: the current segment if it has unsynced writes, marked as
    /// synced. The caller fsyncs it without holding the writer, so appends go on meanwhile
    /// (a roll fsyncs the old segment itself).
    pub fn take_sync_handle(&mut self) -> Option<Arc<File>> {
        std::mem::take(&mut self.unsynced).then(|| self.file.clone())
    }

    pub fn last_index(&self) -> u64 {
        self.last_index
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
        let (f, len) = create_segment(&self.dir, first_index)?;
        self.file = Arc::new(f);
        self.file_first_index = first_index;
        self.file_len = len;
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
        let listing = list_dir(dir)?;
        let mut freed = 0;
        for (first, path) in &listing.segments {
            if *first <= index {
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

fn create_segment(dir: &Path, first_index: u64) -> Result<(File, u64), WalError> {
    let name = segment_name(first_index);
    write_atomically(dir, &name, SEGMENT_HEADER)?;
    let path = dir.join(&name);
    let f = OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(|e| WalError::io(&path, e))?;
    Ok((f, SEGMENT_HEADER.len() as u64))
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

/// Verifies a data directory without changing it (unless `repair`, which truncates a torn
/// tail exactly as startup would). Corruption is returned as the error.
pub fn check(dir: &Path, repair: bool) -> Result<CheckReport, WalError> {
    if !dir.is_dir() {
        return Err(WalError::io(
            dir,
            io::Error::new(io::ErrorKind::NotFound, "no such data directory"),
        ));
    }
    let listing = list_dir(dir)?;
    let scan = scan(&listing, |_| {}, |_| {})?;
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

    fn payload(op: &Op) -> Vec<u8> {
        let mut p = Vec::new();
        p.push(ENTRY_VERSION);
        put_u64(&mut p, 1);
        put_u64(&mut p, 1);
        put_u64(&mut p, 1);
        encode_op(op, &mut p);
        p
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
        let err = decode_entry(&payload(&nested)).unwrap_err();
        assert!(err.contains("nested transaction"), "{err}");
        // A count of 2^32-1 ops in a record of a few bytes.
        let mut p = payload(&Op::Multi { ops: vec![] });
        let n = p.len();
        p[n - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = decode_entry(&p).unwrap_err();
        assert!(err.contains("exceeds the record"), "{err}");
        // An inner op cut short.
        let mut p = payload(&Op::Multi {
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
        for (i, op) in all_ops().into_iter().enumerate() {
            let e = Entry {
                index: i as u64 + 1,
                epoch: 7,
                ts_ms: 123,
                op,
            };
            let mut buf = Vec::new();
            encode_entry(&e, &mut buf);
            match read_frame(&buf) {
                FrameRead::Frame(p, n) => {
                    assert_eq!(n, buf.len());
                    assert_eq!(decode_entry(p).unwrap(), e);
                }
                other => panic!("{other:?}"),
            }
            // Every strict prefix is truncated, never a frame or garbage.
            for cut in 0..buf.len() {
                assert_eq!(read_frame(&buf[..cut]), FrameRead::Truncated, "cut {cut}");
            }
        }
    }

    #[test]
    fn zeros_are_not_a_frame() {
        assert!(matches!(read_frame(&[0u8; 64]), FrameRead::Invalid(_)));
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let mut buf = Vec::new();
        encode_entry(&set(1, "key", "value"), &mut buf);
        for byte in 0..buf.len() {
            for bit in 0..8 {
                let mut b = buf.clone();
                b[byte] ^= 1 << bit;
                assert!(
                    !matches!(read_frame(&b), FrameRead::Frame(..)),
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
            op: Op::Del { keys: vec![] },
        };
        let mut buf = Vec::new();
        encode_entry(&e, &mut buf);
        let FrameRead::Frame(p, _) = read_frame(&buf) else {
            panic!()
        };
        let mut p = p.to_vec();
        let n = p.len();
        p[n - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_entry(&p).is_err());
    }

    #[test]
    fn snapshot_round_trips_and_refuses_truncation() {
        let items: Vec<(Vec<u8>, Vec<u8>, Option<u64>)> = vec![
            (b"a".to_vec(), b"1".to_vec(), None),
            (b"b".to_vec(), vec![], Some(5)),
        ];
        let bytes = encode_snapshot(
            9,
            2,
            items
                .iter()
                .map(|(k, v, e)| (k.as_slice(), v.as_slice(), *e)),
        );
        let s = decode_snapshot(Path::new("x"), &bytes).unwrap();
        assert_eq!((s.index, s.epoch, s.items.len()), (9, 2, 2));
        assert_eq!(s.items[1].expire_at_ms, Some(5));
        for cut in 0..bytes.len() {
            assert!(
                decode_snapshot(Path::new("x"), &bytes[..cut]).is_err(),
                "cut {cut}"
            );
        }
    }

    fn open_collect(dir: &Path, opts: WalOptions) -> Result<(Wal, Vec<Entry>), WalError> {
        let mut got = Vec::new();
        let (w, _) = Wal::open(dir, opts, |_| {}, |e| got.push(e))?;
        Ok((w, got))
    }

    fn write_entries(w: &mut Wal, entries: &[Entry]) {
        for e in entries {
            let mut buf = Vec::new();
            encode_entry(e, &mut buf);
            w.append(&buf, e.index).unwrap();
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

    #[test]
    fn torn_tail_at_every_offset_recovers_every_earlier_record() {
        let entries: Vec<Entry> = (1..=3).map(|i| set(i, "key", "some value")).collect();
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = open_collect(dir.path(), WalOptions::default()).unwrap();
        write_entries(&mut w, &entries);
        drop(w);
        let seg = list_dir(dir.path()).unwrap().segments[0].1.clone();
        let whole = fs::read(&seg).unwrap();
        let mut last = Vec::new();
        encode_entry(&entries[2], &mut last);
        let last_start = whole.len() - last.len();
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

    #[test]
    fn flipped_byte_mid_log_is_refused_with_offset() {
        let entries: Vec<Entry> = (1..=5).map(|i| set(i, "key", "value")).collect();
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = open_collect(dir.path(), WalOptions::default()).unwrap();
        write_entries(&mut w, &entries);
        drop(w);
        let seg = list_dir(dir.path()).unwrap().segments[0].1.clone();
        let mut bytes = fs::read(&seg).unwrap();
        let mut one = Vec::new();
        encode_entry(&entries[0], &mut one);
        let second = 8 + one.len();
        bytes[second + 20] ^= 0x40;
        fs::write(&seg, &bytes).unwrap();
        let err = open_collect(dir.path(), WalOptions::default()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, WalError::Corrupt { offset, .. } if offset == second as u64));
        assert!(msg.contains(&format!("byte offset {second}")), "{msg}");
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
        let snap = encode_snapshot(10, 1, std::iter::once((&b"k"[..], &b"v"[..], None)));
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
