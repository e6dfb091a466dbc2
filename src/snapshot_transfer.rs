//! Snapshot transfer between cluster members: the messages, the sender's paced stream
//! and the receiver's reassembly.
//!
//! A member behind its leader's compacted log (the node's `SendSnapshot`), or a
//! leader-elect that must take its best acceptor's state (`FetchSnapshot`), gets a whole
//! snapshot file from a peer. The driver (`driver.rs`) owns the transfers; this module
//! owns how the bytes travel:
//!
//! - **Messages** ([`SnapMsg`]) go on the peer link as frames of kind
//!   [`SNAPSHOT_MESSAGE`] (the node's own messages are `driver::NODE_MESSAGE`): `Request`
//!   (send me your newest snapshot), `Chunk` (index, epoch, offset, total length, bytes,
//!   and in the last chunk the CRC-32 of the whole file), `Ack` (received through `next`)
//!   and `Abort` (the receiver gave the transfer up).
//! - **Out:** [`send_file`] runs on a thread of its own per transfer (never on the node
//!   thread: a snapshot may be large). It sends one chunk of [`CHUNK_BYTES`] at a time
//!   and the next only once the receiver acknowledged the previous one: the peer link's
//!   queue drops its oldest message when full, so an unpaced stream would lose chunks.
//! - **In:** [`Reassembly`] writes the chunks into a temp file in the data directory,
//!   in order, never past the announced length (itself bounded by [`MAX_SNAPSHOT_BYTES`]),
//!   and hands back the whole file once its CRC checks. Dropping it (the transfer was
//!   abandoned, or is done) removes the temp file; one left by a crash ends in `.tmp`
//!   and recovery removes it.

use crate::peer::PeerNet;
use byteorder::{ByteOrder, LittleEndian};
use crossbeam_channel::{Receiver, RecvTimeoutError};
use std::fmt;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The frame kind of a snapshot transfer message on a peer link.
pub const SNAPSHOT_MESSAGE: u8 = 2;

/// Bytes per chunk: small enough that a chunk never nears the peer frame limit and the
/// receiver's write of one is short, large enough that one round trip per chunk still
/// moves a snapshot quickly.
pub const CHUNK_BYTES: usize = 1 << 20;

/// Largest chunk a receiver accepts (a sender never sends more than [`CHUNK_BYTES`]; some
/// room for a future larger setting).
const MAX_CHUNK_BYTES: usize = 4 * CHUNK_BYTES;

/// Largest snapshot a receiver accepts. The announced length comes from the network, so
/// it is bounded before anything is written; the installed snapshot is also read whole
/// into memory (`LogStore::install_snapshot` takes its bytes), so this is about the
/// largest data set a member can hold anyway.
pub const MAX_SNAPSHOT_BYTES: u64 = 1 << 36;

/// The temp file a receiver reassembles into (in the data directory; the `.tmp` suffix
/// makes recovery remove one left by a crash).
pub const TEMP_NAME: &str = "snapshot-transfer.tmp";

/// One chunk of a snapshot file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// The snapshot's index and epoch (its file header says the same).
    pub index: u64,
    pub epoch: u64,
    /// Where `bytes` go in the file.
    pub offset: u64,
    /// The whole file's length.
    pub total: u64,
    /// CRC-32 of the whole file: in the last chunk only.
    pub crc: Option<u32>,
    pub bytes: Vec<u8>,
}

/// A snapshot transfer message. See the module doc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapMsg {
    /// Send me your newest snapshot (a `FetchSnapshot`).
    Request,
    Chunk(Chunk),
    /// The receiver holds the snapshot at `index` through byte `next`: send from there.
    Ack {
        index: u64,
        next: u64,
    },
    /// The receiver gave up the transfer of the snapshot at `index`: stop sending.
    Abort {
        index: u64,
    },
}

const TAG_REQUEST: u8 = 0;
const TAG_CHUNK: u8 = 1;
const TAG_ACK: u8 = 2;
const TAG_ABORT: u8 = 3;
/// Tag, index, epoch, offset, total, crc flag, crc, length.
const CHUNK_HEADER: usize = 1 + 8 * 4 + 1 + 4 + 4;

impl SnapMsg {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            SnapMsg::Request => vec![TAG_REQUEST],
            SnapMsg::Chunk(c) => {
                let mut out = vec![0u8; CHUNK_HEADER];
                out[0] = TAG_CHUNK;
                LittleEndian::write_u64(&mut out[1..9], c.index);
                LittleEndian::write_u64(&mut out[9..17], c.epoch);
                LittleEndian::write_u64(&mut out[17..25], c.offset);
                LittleEndian::write_u64(&mut out[25..33], c.total);
                out[33] = u8::from(c.crc.is_some());
                LittleEndian::write_u32(&mut out[34..38], c.crc.unwrap_or(0));
                LittleEndian::write_u32(&mut out[38..42], c.bytes.len() as u32);
                out.extend_from_slice(&c.bytes);
                out
            }
            SnapMsg::Ack { index, next } => {
                let mut out = vec![TAG_ACK; 17];
                LittleEndian::write_u64(&mut out[1..9], *index);
                LittleEndian::write_u64(&mut out[9..17], *next);
                out
            }
            SnapMsg::Abort { index } => {
                let mut out = vec![TAG_ABORT; 9];
                LittleEndian::write_u64(&mut out[1..9], *index);
                out
            }
        }
    }

    /// Decodes a message from the network: every length is checked against the bytes
    /// actually there, and a chunk's against [`MAX_CHUNK_BYTES`].
    pub fn decode(buf: &[u8]) -> Result<SnapMsg, String> {
        let u64_at = |at: usize| LittleEndian::read_u64(&buf[at..at + 8]);
        match buf.first() {
            Some(&TAG_REQUEST) if buf.len() == 1 => Ok(SnapMsg::Request),
            Some(&TAG_CHUNK) if buf.len() >= CHUNK_HEADER => {
                let len = LittleEndian::read_u32(&buf[38..42]) as usize;
                if len > MAX_CHUNK_BYTES {
                    return Err(format!(
                        "a chunk of {len} bytes (at most {MAX_CHUNK_BYTES})"
                    ));
                }
                if buf.len() != CHUNK_HEADER + len {
                    return Err(format!(
                        "a chunk says {len} bytes and carries {}",
                        buf.len() - CHUNK_HEADER
                    ));
                }
                let crc = match buf[33] {
                    0 => None,
                    1 => Some(LittleEndian::read_u32(&buf[34..38])),
                    f => return Err(format!("bad CRC flag {f}")),
                };
                Ok(SnapMsg::Chunk(Chunk {
                    index: u64_at(1),
                    epoch: u64_at(9),
                    offset: u64_at(17),
                    total: u64_at(25),
                    crc,
                    bytes: buf[CHUNK_HEADER..].to_vec(),
                }))
            }
            Some(&TAG_ACK) if buf.len() == 17 => Ok(SnapMsg::Ack {
                index: u64_at(1),
                next: u64_at(9),
            }),
            Some(&TAG_ABORT) if buf.len() == 9 => Ok(SnapMsg::Abort { index: u64_at(1) }),
            Some(t) => Err(format!(
                "a snapshot message of tag {t} and {} bytes",
                buf.len()
            )),
            None => Err("an empty snapshot message".into()),
        }
    }
}

/// Why a transfer was given up (its temp file goes with it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferError(pub String);

impl fmt::Display for TransferError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TransferError {}

fn fail<T>(why: impl Into<String>) -> Result<T, TransferError> {
    Err(TransferError(why.into()))
}

/// A snapshot being received into a temp file. See the module doc.
#[derive(Debug)]
pub struct Reassembly {
    pub index: u64,
    pub epoch: u64,
    total: u64,
    received: u64,
    crc: crc32fast::Hasher,
    path: PathBuf,
    file: File,
}

impl Reassembly {
    /// Starts a transfer with its first chunk (at offset 0), in a temp file in `dir`
    /// (replacing any earlier one). Writes the chunk; see [`Reassembly::push`] for what
    /// is returned.
    pub fn start(dir: &Path, first: Chunk) -> Result<(Reassembly, Option<Vec<u8>>), TransferError> {
        if first.offset != 0 {
            return fail(format!(
                "the transfer of the snapshot at {} starts at offset {}",
                first.index, first.offset
            ));
        }
        if first.total == 0 || first.total > MAX_SNAPSHOT_BYTES {
            return fail(format!(
                "a snapshot of {} bytes (at most {MAX_SNAPSHOT_BYTES})",
                first.total
            ));
        }
        let path = dir.join(TEMP_NAME);
        let file = File::create(&path)
            .map_err(|e| TransferError(format!("cannot create {}: {e}", path.display())))?;
        let mut r = Reassembly {
            index: first.index,
            epoch: first.epoch,
            total: first.total,
            received: 0,
            crc: crc32fast::Hasher::new(),
            path,
            file,
        };
        let done = r.push(first)?;
        Ok((r, done))
    }

    /// Bytes received so far (the next chunk's offset).
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Writes the next chunk. It must belong to this snapshot, follow the previous one
    /// exactly and stay within the announced length; the last one must carry the CRC of
    /// the whole file, and only the last one may. Returns the whole file once complete
    /// and checked. Any error leaves the transfer unusable: drop it.
    pub fn push(&mut self, c: Chunk) -> Result<Option<Vec<u8>>, TransferError> {
        if (c.index, c.epoch, c.total) != (self.index, self.epoch, self.total) {
            return fail(format!(
                "a chunk of the snapshot ({}, {}) of {} bytes during the transfer of ({}, {}) \
                 of {} bytes",
                c.index, c.epoch, c.total, self.index, self.epoch, self.total
            ));
        }
        if c.offset != self.received {
            return fail(format!(
                "a chunk at offset {} where {} was expected",
                c.offset, self.received
            ));
        }
        let end = self.received.saturating_add(c.bytes.len() as u64);
        if end > self.total {
            return fail(format!(
                "a chunk ending at {end}, past the snapshot's {} bytes",
                self.total
            ));
        }
        if c.crc.is_some() != (end == self.total) {
            return fail(format!(
                "the snapshot's {} bytes ended at {end} (the last chunk carries the CRC)",
                self.total
            ));
        }
        self.file
            .write_all(&c.bytes)
            .map_err(|e| TransferError(format!("cannot write {}: {e}", self.path.display())))?;
        self.crc.update(&c.bytes);
        self.received = end;
        let Some(crc) = c.crc else { return Ok(None) };
        let ours = self.crc.clone().finalize();
        if ours != crc {
            return fail(format!(
                "the snapshot at {} has CRC {ours:08x}, its sender says {crc:08x}",
                self.index
            ));
        }
        // Read back what was written: the bytes installed are the bytes checked on disk.
        let mut data = Vec::with_capacity(self.total as usize);
        File::open(&self.path)
            .and_then(|f| f.take(self.total + 1).read_to_end(&mut data))
            .map_err(|e| TransferError(format!("cannot read {}: {e}", self.path.display())))?;
        if data.len() as u64 != self.total || crc32fast::hash(&data) != crc {
            return fail(format!(
                "{} changed while it was written",
                self.path.display()
            ));
        }
        Ok(Some(data))
    }
}

impl Drop for Reassembly {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Sends the snapshot `file` (opened from `path`, at index and epoch) to `to`, a chunk at
/// a time, each once the previous one is acknowledged on `replies` (what the driver
/// forwards from `to`). Gives up when `to` aborts, does not acknowledge within `stall`,
/// or the link refuses the message. Runs on its own thread. (Open the file first: a
/// later compaction may remove it, but not from under an open handle.)
pub fn send_file(
    net: &PeerNet,
    to: u64,
    (index, epoch, path, mut file): (u64, u64, &Path, File),
    replies: &Receiver<SnapMsg>,
    stall: Duration,
) -> Result<(), TransferError> {
    let total = file
        .metadata()
        .map_err(|e| TransferError(format!("cannot stat {}: {e}", path.display())))?
        .len();
    let mut crc = crc32fast::Hasher::new();
    let mut offset = 0u64;
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let want = (total - offset).min(CHUNK_BYTES as u64) as usize;
        file.read_exact(&mut buf[..want])
            .map_err(|e| TransferError(format!("cannot read {}: {e}", path.display())))?;
        crc.update(&buf[..want]);
        let last = offset + want as u64 == total;
        let chunk = Chunk {
            index,
            epoch,
            offset,
            total,
            crc: last.then(|| crc.clone().finalize()),
            bytes: buf[..want].to_vec(),
        };
        net.send(to, SNAPSHOT_MESSAGE, SnapMsg::Chunk(chunk).encode())
            .map_err(|e| TransferError(format!("cannot send to node {to}: {e}")))?;
        offset += want as u64;
        // Wait for this chunk's ack; acks of an earlier transfer are skipped.
        loop {
            match replies.recv_timeout(stall) {
                Ok(SnapMsg::Ack { index: i, next }) if i == index && next == offset => break,
                Ok(SnapMsg::Abort { index: i }) if i == index => {
                    return fail(format!("node {to} gave the transfer up"));
                }
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return fail(format!(
                        "node {to} acknowledged nothing for {stall:?} (at byte {offset} of \
                         {total})"
                    ));
                }
                Err(RecvTimeoutError::Disconnected) => return fail("the driver went away"),
            }
        }
        if last {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(data: &[u8], size: usize, index: u64) -> Vec<Chunk> {
        let crc = crc32fast::hash(data);
        let mut out = Vec::new();
        let mut offset = 0;
        for piece in data.chunks(size) {
            let end = offset + piece.len();
            out.push(Chunk {
                index,
                epoch: 3,
                offset: offset as u64,
                total: data.len() as u64,
                crc: (end == data.len()).then_some(crc),
                bytes: piece.to_vec(),
            });
            offset = end;
        }
        out
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn messages_round_trip() {
        let c = chunks(&data(10), 4, 9);
        for m in [
            SnapMsg::Request,
            SnapMsg::Chunk(c[0].clone()),
            SnapMsg::Chunk(c[2].clone()),
            SnapMsg::Ack { index: 9, next: 8 },
            SnapMsg::Abort { index: 9 },
        ] {
            assert_eq!(SnapMsg::decode(&m.encode()), Ok(m));
        }
    }

    #[test]
    fn damaged_messages_are_refused() {
        let enc = SnapMsg::Chunk(chunks(&data(10), 4, 9)[0].clone()).encode();
        for n in 0..enc.len() {
            assert!(SnapMsg::decode(&enc[..n]).is_err(), "cut at {n}");
        }
        let mut longer = enc.clone();
        longer.push(0);
        assert!(SnapMsg::decode(&longer).is_err());
        // A length over the limit is refused before anything is sized by it.
        let mut huge = enc.clone();
        LittleEndian::write_u32(&mut huge[38..42], u32::MAX);
        assert!(SnapMsg::decode(&huge).unwrap_err().contains("at most"));
        let mut flag = enc;
        flag[33] = 7;
        assert!(SnapMsg::decode(&flag).is_err());
        assert!(SnapMsg::decode(&[9]).is_err());
        assert!(SnapMsg::decode(&[TAG_ACK, 1]).is_err());
    }

    #[test]
    fn reassembles_in_order_and_removes_its_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = data(10_000);
        let mut cs = chunks(&d, 3000, 5).into_iter();
        let (mut r, done) =
            Reassembly::start(dir.path(), cs.next().expect("chunk")).expect("start");
        assert_eq!(done, None);
        assert!(dir.path().join(TEMP_NAME).exists());
        let mut whole = None;
        for c in cs {
            assert!(whole.is_none());
            whole = r.push(c).expect("push");
        }
        assert_eq!(whole.as_deref(), Some(&d[..]));
        assert_eq!(r.received(), 10_000);
        drop(r);
        assert!(!dir.path().join(TEMP_NAME).exists());
    }

    #[test]
    fn a_single_chunk_snapshot_completes_at_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = data(100);
        let c = chunks(&d, 1000, 5).remove(0);
        let (_r, done) = Reassembly::start(dir.path(), c).expect("start");
        assert_eq!(done.as_deref(), Some(&d[..]));
    }

    #[test]
    fn out_of_order_and_foreign_chunks_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cs = chunks(&data(1000), 300, 5);
        assert!(
            Reassembly::start(dir.path(), cs[1].clone()).is_err(),
            "not at 0"
        );
        let (mut r, _) = Reassembly::start(dir.path(), cs[0].clone()).expect("start");
        assert!(r.push(cs[2].clone()).is_err(), "skips a chunk");
        let (mut r, _) = Reassembly::start(dir.path(), cs[0].clone()).expect("start");
        assert!(r.push(cs[0].clone()).is_err(), "repeats a chunk");
        let (mut r, _) = Reassembly::start(dir.path(), cs[0].clone()).expect("start");
        let other = chunks(&data(1000), 300, 6);
        assert!(
            r.push(other[1].clone()).is_err(),
            "another snapshot's chunk"
        );
    }

    #[test]
    fn oversize_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = chunks(&data(100), 50, 5);
        let mut big = c[0].clone();
        big.total = MAX_SNAPSHOT_BYTES + 1;
        assert!(Reassembly::start(dir.path(), big).is_err());
        assert!(!dir.path().join(TEMP_NAME).exists());
        // A chunk that runs past the announced length.
        let (mut r, _) = Reassembly::start(dir.path(), c[0].clone()).expect("start");
        c[1].bytes.push(0);
        assert!(r.push(c[1].clone()).unwrap_err().0.contains("past"));
    }

    #[test]
    fn truncation_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = chunks(&data(100), 50, 5);
        // The last chunk arrives short: it claims to end the file before its length.
        let (mut r, _) = Reassembly::start(dir.path(), c[0].clone()).expect("start");
        c[1].bytes.pop();
        assert!(r.push(c[1].clone()).is_err());
        // A CRC before the end, or none at the end.
        let mut c = chunks(&data(150), 50, 5);
        let (mut r, _) = Reassembly::start(dir.path(), c[0].clone()).expect("start");
        c[1].crc = Some(0);
        assert!(r.push(c[1].clone()).is_err());
        let mut c = chunks(&data(100), 50, 5);
        let (mut r, _) = Reassembly::start(dir.path(), c[0].clone()).expect("start");
        c[1].crc = None;
        assert!(r.push(c[1].clone()).is_err());
    }

    #[test]
    fn bad_crc_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = chunks(&data(100), 50, 5);
        let (mut r, _) = Reassembly::start(dir.path(), c[0].clone()).expect("start");
        c[1].bytes[3] ^= 1;
        assert!(r.push(c[1].clone()).unwrap_err().0.contains("CRC"));
        drop(r);
        assert!(!dir.path().join(TEMP_NAME).exists());
    }
}
