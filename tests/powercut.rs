//! Power cuts (issue 13, item 4): what a node recovers from when the machine loses power,
//! not just the process.
//!
//! A kill -9 (tests/crash.rs) leaves the kernel's page cache alone: everything the server
//! had written reaches the disk. A power cut keeps only what an fsync made durable, plus
//! any part of what was written after it. This test records every file operation a real
//! `kvstore server` makes and then rebuilds, for many cut times, a data directory a power
//! cut at that time could have left, and recovers a node from each.
//!
//! # How
//!
//! 1. **Record.** `tests/powercut/shim.c` is compiled at test time (`cc`, into the target
//!    directory as `powercut-shim.so`) and preloaded into the server (`LD_PRELOAD`). For
//!    files under `$POWERCUT_DIR` it appends to `$POWERCUT_TRACE`, in the order they took
//!    effect and with `CLOCK_MONOTONIC` stamps taken after the real call returned: opens
//!    (fd → path, `O_CREAT`/`O_TRUNC`), closes, dups, `write`/`writev`/`pwrite*` (the file
//!    offset and the bytes), `ftruncate`, `fallocate`, `fsync`/`fdatasync`/
//!    `sync_file_range` (stamped before and after, with the trace position at which they
//!    began: the writes they cover), renames, unlinks, `mkdir`/`rmdir`. The shim's
//!    completeness is tested on its own ([`the_trace_rebuilds_the_data_directory`]):
//!    replaying a whole trace must give back, byte for byte, the directory the server left
//!    after a clean shutdown (and, in the main test, after its kill -9).
//! 2. **Run** a single node (`--fsync always`, the default; a 4 KiB segment size and an
//!    8 KiB compaction threshold, so that segments roll and compactions write snapshots,
//!    rename and unlink during the run) under the shim, with writer threads doing `SET`,
//!    `DEL` (of their own keys) and `INCR` (of a few shared counters) through the `redis`
//!    crate, each reply stamped with `CLOCK_MONOTONIC` when it arrived, in bursts (so that
//!    group commits take several writers' requests) and pauses, for at least
//!    [`RUN_TIME`] (so that the once-a-second `meta` rewrite happens during the writes);
//!    then kill -9 it while they write.
//! 3. **Cut.** Cut times: every completion of an fsync/fdatasync (file or directory) and
//!    the nanosecond before it (its writes done, the sync not: where the unsynced bytes
//!    are), random times between (up to [`DEFAULT_CUTS`] cut points in all, at least a
//!    third of that many), and the kill. For a cut at T the state is built from the
//!    trace:
//!    - a file holds every write an fsync/fdatasync covered that completed by T (the
//!      writes recorded before that sync began), then, of the later writes that completed
//!      by T, any subset of their 4 KiB pages (split at page boundaries of the file, so a
//!      later page may land while an earlier one does not), each page landing whole, not
//!      at all, or torn (a random subset of its 512-byte sectors, each sector atomic);
//!      unsynced truncations
//!      may or may not have happened; and the file's size may have reached its full
//!      written size with the pages that did not land reading as zeros;
//!    - names: creations (an open that made a file), renames and unlinks are durable once
//!      a directory fsync that began after them completed by T; of the later ones, a
//!      random prefix (in order) happened. A file whose rename is not durable is then
//!      still under its old name, an unlinked one still there;
//!    - the extremes too: one cut in eight keeps nothing unsynced (names nor data), one in
//!      eight keeps everything that completed (what a kill -9 at T would leave).
//! 4. **Recover.** Each state is written to a fresh directory (on `/dev/shm` when there
//!    is one: recovery fsyncs, and on a disk those fsyncs were most of the replay's time)
//!    and opened. Most are opened
//!    through the library's recovery, [`kvstore::Store::open`] with the options the
//!    server passes it (the server's `Server::bind` calls exactly that, so the same code
//!    runs, in-process and much faster); one in [`SERVER_EVERY`] (and every state whose
//!    library recovery failed) is started as a real `kvstore server` process and read
//!    over the network. Checks: (a) it opens (a refusal of a state that only lost
//!    unsynced bytes is a product bug: the test fails and keeps the state under
//!    `target/tmp/powercut-failures/`); (b) every write acknowledged before T is there: a
//!    key has the value of its writer's last acknowledged write to it (or of the one
//!    write in flight at T, if that was to it), a `DEL`'d key is gone unless set again,
//!    a counter is at least the last value acknowledged before T; (c) nothing else: no
//!    key that was never written, no value a key was never given, no counter above the
//!    `INCR`s sent before T.
//!
//! The same runs under `--fsync everysec` ([`fsynced_writes_survive_power_cuts_under_everysec`])
//! and `--fsync no` ([`fsynced_writes_survive_power_cuts_under_fsync_no`], where only a
//! segment roll, a snapshot and `meta` fsync),
//! where many batches are unsynced at once, so later pages landing while earlier ones do
//! not is common (the case the log's per-batch checksum and `synced` offset exist for).
//! There a power cut may lose acknowledged writes (documented), so (b)
//! asks only for the writes acknowledged before a sync of a log segment began that
//! completed by T, and allows a key any value its writer gave it since.
//!
//! A summary line per policy reports the cut points, states recovered and acknowledged
//! writes checked (each cut counts the acknowledged writes it requires), and one more how
//! many recoveries truncated a torn tail or started from a snapshot. `POWERCUT_SEED=<n>` replays a run's cut choices (the seed is printed; the
//! trace itself is new each run, so a seed replays the choices, not the timings),
//! `POWERCUT_CUTS=<n>` sets how many cut points (more: more random times between the
//! fsyncs), `POWERCUT_SERVER_EVERY=<n>` how often a real server process does the recovery.
//!
//! # What is not modelled
//!
//! - The disk's own volatile write cache and its flush commands: an fsync that returned
//!   is taken to be durable (the kernel sends the flush; a disk that lies is out of scope).
//! - File-system metadata journaling details. Names follow the strict POSIX rule (durable
//!   only after an fsync of their directory; an fsync of a file does not make its new name
//!   durable, though ext4 and XFS in practice do), in program order: a prefix, the way a
//!   journal commits them. Only the data directory's own fsyncs count for names
//!   (the server keeps no subdirectories). A file's size is modelled with its data:
//!   fdatasync covers size changes as the server relies on.
//! - An unsynced write may land in any subset of its pages, but a page that lands holds
//!   bytes of that write (or zeros, if only the size reached the disk): the disk never
//!   invents other bytes, and a 512-byte sector is atomic. A write still in progress at T
//!   (its record is stamped when it returns) is left out of the cut at T: no
//!   acknowledgment can depend on it, the shim holds its lock across the write so no
//!   other operation is recorded meanwhile, and the cut just before the next sync
//!   completes covers the same write landing in part. How likely a page is to land
//!   (7 in 20 whole, 6 in 20 not at all, 7 in 20 torn, each sector then a coin flip) and
//!   the zero-filled size (1 in 4) are arbitrary.
//! - `sync_file_range` is recorded but not counted as durable (it flushes no metadata and
//!   no disk cache). `fallocate` without `FALLOC_FL_KEEP_SIZE` is modelled as growing the
//!   file with zeros; other modes would fail the replay (the server uses none today).
//!   `mmap`ed writes, `sendfile`, `copy_file_range` and `io_uring` are not seen by the
//!   shim (the server uses none; the self-test would notice a gap).
//! - One node, one run per test: cluster members (whose recovery stops at the commit
//!   index in `meta`) are not covered.

mod common;

use common::rng::Rng;

use common::{DataDir, KVSTORE_BIN, Server, redis_conn};
use kvstore::Store;
use kvstore::store::Options;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// Cut points tried by default: every fsync completion and the moment before it, then
/// random times up to this many (at least a third of this many random ones).
const DEFAULT_CUTS: usize = 300;
/// One state in this many is recovered by a real server process (the rest in-process).
const SERVER_EVERY: usize = 10;
/// Writer threads of the recorded run.
const WRITERS: usize = 4;
/// Keys each writer owns.
const KEYS_PER_WRITER: usize = 8;
/// Counters every writer increments.
const COUNTERS: usize = 3;
/// The run is killed once this many writes were acknowledged and [`RUN_TIME`] passed.
const ACKED_TARGET: usize = 240;
/// Long enough for the once-a-second `meta` rewrite (the commit index) to happen during
/// the writes, twice.
const RUN_TIME: Duration = Duration::from_millis(2500);
/// Server flags of the recorded run: tiny segments and compaction threshold, so that
/// segments roll and snapshots are written, renamed and old files unlinked.
fn server_args(fsync: &'static str) -> [&'static str; 6] {
    [
        "--fsync",
        fsync,
        "--segment-size",
        "4096",
        "--compact-min-size",
        "8192",
    ]
}
const PAGE: usize = 4096;
const SECTOR: usize = 512;

// ---------------------------------------------------------------------------------------
// Small helpers

/// CLOCK_MONOTONIC in nanoseconds: the clock the shim stamps its records with.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass and nothing else.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(r, 0, "clock_gettime(CLOCK_MONOTONIC)");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Rng {
    fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}

/// Compiles the shim once per test process into `<target dir>/powercut-shim.so` (through
/// a temporary name and a rename, so concurrent test processes never load a half-written
/// library). Panics when there is no `cc`: a test that cannot run fails.
fn shim() -> PathBuf {
    static SHIM: OnceLock<PathBuf> = OnceLock::new();
    SHIM.get_or_init(|| {
        let cc = common::require_tool("cc", "install a C compiler (apt-get install gcc)");
        let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .expect("the target directory")
            .to_path_buf();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/powercut/shim.c");
        let out = target.join("powercut-shim.so");
        let tmp = target.join(format!("powercut-shim.so.{}.tmp", std::process::id()));
        let res = Command::new(&cc)
            .args(["-shared", "-fPIC", "-O2", "-o"])
            .arg(&tmp)
            .arg(&src)
            .arg("-ldl")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", cc.display()));
        assert!(
            res.status.success(),
            "cc failed to build {}:\n{}",
            src.display(),
            String::from_utf8_lossy(&res.stderr)
        );
        fs::rename(&tmp, &out).expect("rename the shim into place");
        out
    })
    .clone()
}

// ---------------------------------------------------------------------------------------
// The trace

const OP_OPEN: u32 = 1;
const OP_CLOSE: u32 = 2;
const OP_WRITE: u32 = 3;
const OP_TRUNCATE: u32 = 4;
const OP_FALLOCATE: u32 = 5;
const OP_FSYNC: u32 = 6;
const OP_FDATASYNC: u32 = 7;
const OP_SYNC_FILE_RANGE: u32 = 8;
const OP_RENAME: u32 = 9;
const OP_UNLINK: u32 = 10;
const OP_MKDIR: u32 = 11;
const OP_RMDIR: u32 = 12;
const OP_DUP: u32 = 13;
const TRACE_MAGIC: u32 = 0x5043_5452;
const HEADER: usize = 80;

/// One record of the shim's trace (see the layout in shim.c).
#[derive(Debug, Clone)]
struct Rec {
    op: u32,
    seq: u64,
    t1: u64,
    fd: i64,
    fd2: i64,
    off: i64,
    arg: i64,
    a: Vec<u8>,
    b: Vec<u8>,
}

/// Reads a trace; a last record cut short (the process was killed while writing it) is
/// dropped.
fn read_trace(path: &Path) -> Vec<Rec> {
    let buf = fs::read(path).unwrap_or_else(|e| panic!("read trace {}: {e}", path.display()));
    let u32_at = |p: usize| u32::from_le_bytes(buf[p..p + 4].try_into().unwrap());
    let u64_at = |p: usize| u64::from_le_bytes(buf[p..p + 8].try_into().unwrap());
    let mut out = Vec::new();
    let mut p = 0;
    while p + HEADER <= buf.len() {
        assert_eq!(u32_at(p), TRACE_MAGIC, "trace damaged at byte {p}");
        let len_a = u32_at(p + 72) as usize;
        let len_b = u32_at(p + 76) as usize;
        let end = p + HEADER + len_a + len_b;
        if end > buf.len() {
            break;
        }
        let rec = Rec {
            op: u32_at(p + 4),
            seq: u64_at(p + 8),
            t1: u64_at(p + 24),
            fd: u64_at(p + 32) as i64,
            fd2: u64_at(p + 40) as i64,
            off: u64_at(p + 56) as i64,
            arg: u64_at(p + 64) as i64,
            a: buf[p + HEADER..p + HEADER + len_a].to_vec(),
            b: buf[p + HEADER + len_a..end].to_vec(),
        };
        assert_eq!(rec.seq, out.len() as u64, "trace records out of sequence");
        out.push(rec);
        p = end;
    }
    out
}

/// A change to a file's bytes.
#[derive(Debug, Clone)]
enum DataOp {
    Write {
        off: u64,
        data: Vec<u8>,
    },
    Truncate(u64),
    /// `fallocate` past the end: the file grows with zeros.
    Grow(u64),
}

/// One file (an inode): its data changes and its syncs, in trace order.
#[derive(Debug, Default)]
struct FileHist {
    /// The name it was created under.
    name: String,
    /// (seq, completion time, change)
    ops: Vec<(u64, u64, DataOp)>,
    /// (first record the sync did not cover, completion time)
    syncs: Vec<(u64, u64)>,
}

#[derive(Debug, Clone)]
enum NameOp {
    Create { name: String, file: usize },
    Rename { from: String, to: String },
    Unlink { name: String },
    Mkdir { name: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    File(usize),
    Dir,
}

/// Which extreme a cut takes for what was not synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keep {
    /// Only what an fsync made durable.
    Nothing,
    /// Everything that completed (what a kill -9 leaves).
    Everything,
    /// A random choice of pages, sectors and name changes.
    Random,
}

/// The recorded history of one data directory.
#[derive(Debug, Default)]
struct History {
    files: Vec<FileHist>,
    /// (seq, completion time, change)
    names: Vec<(u64, u64, NameOp)>,
    /// fsyncs of the data directory: (first record not covered, completion time)
    dir_syncs: Vec<(u64, u64)>,
    /// Completion times of every fsync/fdatasync, files and directory.
    sync_times: Vec<u64>,
    /// Every record's completion time, by number.
    rec_t1: Vec<u64>,
    first_t: u64,
    last_t: u64,
    records: usize,
    writes: usize,
    renames: usize,
    unlinks: usize,
    /// Renames onto `meta`.
    meta_writes: usize,
}

impl History {
    fn build(recs: &[Rec], root: &Path) -> History {
        let root = root.to_str().expect("a UTF-8 data dir path");
        let rel = |p: &[u8]| -> String {
            let p = std::str::from_utf8(p).expect("a UTF-8 path in the trace");
            let r = p
                .strip_prefix(root)
                .unwrap_or_else(|| panic!("trace path {p} is outside {root}"));
            r.trim_start_matches('/').to_string()
        };
        let mut h = History {
            records: recs.len(),
            first_t: recs.first().map_or(0, |r| r.t1),
            last_t: recs.last().map_or(0, |r| r.t1),
            ..History::default()
        };
        // The names as they are after every operation so far.
        let mut ns: BTreeMap<String, Node> = BTreeMap::new();
        let mut fds: HashMap<i64, Node> = HashMap::new();
        for r in recs {
            h.rec_t1.push(r.t1);
            let file_of = |fds: &HashMap<i64, Node>| match fds.get(&r.fd) {
                Some(Node::File(f)) => *f,
                other => panic!("record {} ({}) on fd {}: {other:?}", r.seq, r.op, r.fd),
            };
            match r.op {
                OP_OPEN => {
                    let name = rel(&r.a);
                    let node = match ns.get(&name) {
                        _ if name.is_empty() => Node::Dir,
                        Some(n) => *n,
                        None => {
                            assert!(
                                r.arg & libc::O_CREAT as i64 != 0,
                                "record {}: {name} opened without O_CREAT but never created",
                                r.seq
                            );
                            let f = h.files.len();
                            h.files.push(FileHist {
                                name: name.clone(),
                                ..FileHist::default()
                            });
                            ns.insert(name.clone(), Node::File(f));
                            h.names
                                .push((r.seq, r.t1, NameOp::Create { name, file: f }));
                            Node::File(f)
                        }
                    };
                    if let Node::File(f) = node
                        && r.arg & libc::O_TRUNC as i64 != 0
                    {
                        h.files[f].ops.push((r.seq, r.t1, DataOp::Truncate(0)));
                    }
                    fds.insert(r.fd, node);
                }
                OP_CLOSE => {
                    fds.remove(&r.fd);
                }
                OP_DUP => {
                    let node = fds[&r.fd];
                    fds.insert(r.fd2, node);
                }
                OP_WRITE => {
                    let f = file_of(&fds);
                    assert!(r.off >= 0, "record {}: write at an unknown offset", r.seq);
                    h.writes += 1;
                    h.files[f].ops.push((
                        r.seq,
                        r.t1,
                        DataOp::Write {
                            off: r.off as u64,
                            data: r.a.clone(),
                        },
                    ));
                }
                OP_TRUNCATE => {
                    let f = file_of(&fds);
                    h.files[f]
                        .ops
                        .push((r.seq, r.t1, DataOp::Truncate(r.arg as u64)));
                }
                OP_FALLOCATE => {
                    let f = file_of(&fds);
                    let mode = r.fd2;
                    if mode == libc::FALLOC_FL_KEEP_SIZE as i64 {
                        continue;
                    }
                    assert_eq!(
                        mode, 0,
                        "record {}: fallocate mode {mode} not modelled",
                        r.seq
                    );
                    h.files[f]
                        .ops
                        .push((r.seq, r.t1, DataOp::Grow((r.off + r.arg) as u64)));
                }
                OP_FSYNC | OP_FDATASYNC => {
                    h.sync_times.push(r.t1);
                    match fds.get(&r.fd) {
                        Some(Node::File(f)) => h.files[*f].syncs.push((r.off as u64, r.t1)),
                        Some(Node::Dir) => h.dir_syncs.push((r.off as u64, r.t1)),
                        None => panic!("record {}: sync of unknown fd {}", r.seq, r.fd),
                    }
                }
                OP_SYNC_FILE_RANGE => {}
                OP_RENAME => {
                    let (from, to) = (rel(&r.a), rel(&r.b));
                    let node = ns
                        .remove(&from)
                        .unwrap_or_else(|| panic!("record {}: rename of unknown {from}", r.seq));
                    ns.insert(to.clone(), node);
                    h.renames += 1;
                    h.meta_writes += (to == "meta") as usize;
                    h.names.push((r.seq, r.t1, NameOp::Rename { from, to }));
                }
                OP_UNLINK | OP_RMDIR => {
                    let name = rel(&r.a);
                    ns.remove(&name);
                    h.unlinks += 1;
                    h.names.push((r.seq, r.t1, NameOp::Unlink { name }));
                }
                OP_MKDIR => {
                    let name = rel(&r.a);
                    ns.insert(name.clone(), Node::Dir);
                    h.names.push((r.seq, r.t1, NameOp::Mkdir { name }));
                }
                op => panic!("record {}: unknown op {op}", r.seq),
            }
        }
        h.sync_times.sort_unstable();
        h
    }

    /// The latest time such that every log write acknowledged by then is durable at `t`:
    /// the last record before the start of the newest sync of a segment file that completed
    /// by `t` (a roll fsyncs the segment it leaves, so a sync of any later segment covers
    /// the earlier ones; a compaction fsyncs its snapshot before it removes them).
    fn segment_synced_before(&self, t: u64) -> u64 {
        self.files
            .iter()
            .filter(|f| f.name.starts_with("wal-"))
            .flat_map(|f| &f.syncs)
            .filter(|(b, t1)| *t1 <= t && *b > 0)
            .map(|(b, _)| self.rec_t1[*b as usize - 1])
            .max()
            .unwrap_or(0)
    }

    /// The directory a power cut at `t` could leave: file name → contents (None: a
    /// directory).
    fn state_at(&self, t: u64, keep: Keep, rng: &mut Rng) -> BTreeMap<String, Option<Vec<u8>>> {
        // Names: the durable ones, then a prefix of the rest that completed by t.
        let durable = durable_boundary(&self.dir_syncs, t);
        let pending = self
            .names
            .iter()
            .filter(|(seq, t1, _)| *seq >= durable && *t1 <= t)
            .count();
        let happened = self
            .names
            .iter()
            .filter(|(seq, _, _)| *seq < durable)
            .count()
            + match keep {
                Keep::Nothing => 0,
                Keep::Everything => pending,
                Keep::Random => rng.below(pending as u64 + 1) as usize,
            };
        let mut ns: BTreeMap<String, Node> = BTreeMap::new();
        for (_, _, op) in self.names.iter().take(happened) {
            match op {
                NameOp::Create { name, file } => {
                    ns.insert(name.clone(), Node::File(*file));
                }
                NameOp::Rename { from, to } => {
                    if let Some(n) = ns.remove(from) {
                        ns.insert(to.clone(), n);
                    }
                }
                NameOp::Unlink { name } => {
                    ns.remove(name);
                }
                NameOp::Mkdir { name } => {
                    ns.insert(name.clone(), Node::Dir);
                }
            }
        }
        ns.into_iter()
            .map(|(name, node)| {
                let content = match node {
                    Node::Dir => None,
                    Node::File(f) => Some(self.file_at(f, t, keep, rng)),
                };
                (name, content)
            })
            .collect()
    }

    /// File `f`'s bytes after a power cut at `t`.
    fn file_at(&self, f: usize, t: u64, keep: Keep, rng: &mut Rng) -> Vec<u8> {
        let h = &self.files[f];
        let durable = durable_boundary(&h.syncs, t);
        let mut data = Vec::new();
        let mut full = Vec::new();
        for (seq, t1, op) in &h.ops {
            if *t1 > t {
                break;
            }
            apply(&mut full, op);
            if *seq < durable {
                apply(&mut data, op);
                continue;
            }
            match keep {
                Keep::Nothing => {}
                Keep::Everything => apply(&mut data, op),
                Keep::Random => match op {
                    DataOp::Write { off, data: bytes } => {
                        // Page by page (pages of the file), each whole, lost, or torn.
                        let mut start = *off as usize;
                        let end = start + bytes.len();
                        while start < end {
                            let page_end = ((start / PAGE + 1) * PAGE).min(end);
                            let chunk = &bytes[start - *off as usize..page_end - *off as usize];
                            match rng.below(20) {
                                0..=6 => put(&mut data, start, chunk),
                                7..=12 => {}
                                _ => {
                                    // Torn: a random subset of the page's sectors.
                                    let mut s = start;
                                    while s < page_end {
                                        let s_end = ((s / SECTOR + 1) * SECTOR).min(page_end);
                                        if rng.chance(1, 2) {
                                            let c =
                                                &bytes[s - *off as usize..s_end - *off as usize];
                                            put(&mut data, s, c);
                                        }
                                        s = s_end;
                                    }
                                }
                            }
                            start = page_end;
                        }
                    }
                    other => {
                        if rng.chance(1, 2) {
                            apply(&mut data, other);
                        }
                    }
                },
            }
        }
        // The size may have reached the disk without some of the data: zeros.
        if keep == Keep::Random && full.len() > data.len() && rng.chance(1, 4) {
            data.resize(full.len(), 0);
        }
        data
    }
}

/// The first record a completed sync did not cover: everything before the largest such
/// boundary among the syncs that completed by `t` is durable.
fn durable_boundary(syncs: &[(u64, u64)], t: u64) -> u64 {
    syncs
        .iter()
        .filter(|(_, t1)| *t1 <= t)
        .map(|(b, _)| *b)
        .max()
        .unwrap_or(0)
}

fn put(data: &mut Vec<u8>, at: usize, bytes: &[u8]) {
    if data.len() < at + bytes.len() {
        data.resize(at + bytes.len(), 0);
    }
    data[at..at + bytes.len()].copy_from_slice(bytes);
}

fn apply(data: &mut Vec<u8>, op: &DataOp) {
    match op {
        DataOp::Write { off, data: bytes } => put(data, *off as usize, bytes),
        DataOp::Truncate(len) => data.resize(*len as usize, 0),
        DataOp::Grow(len) => {
            if data.len() < *len as usize {
                data.resize(*len as usize, 0);
            }
        }
    }
}

/// Writes a state into `dir` (which exists and is empty).
fn materialize(state: &BTreeMap<String, Option<Vec<u8>>>, dir: &Path) {
    for (name, content) in state {
        let path = dir.join(name);
        match content {
            None => fs::create_dir_all(&path).expect("create dir of a state"),
            Some(bytes) => {
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent).expect("create dir of a state");
                }
                fs::write(&path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()))
            }
        }
    }
}

/// Every file under `dir`: relative name → contents (None: a directory).
fn read_tree(dir: &Path) -> BTreeMap<String, Option<Vec<u8>>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, Option<Vec<u8>>>) {
        for ent in fs::read_dir(dir).expect("read_dir") {
            let ent = ent.expect("dir entry");
            let path = ent.path();
            let name = path
                .strip_prefix(base)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if ent.file_type().expect("file type").is_dir() {
                out.insert(name, None);
                walk(base, &path, out);
            } else {
                out.insert(name, Some(fs::read(&path).expect("read file")));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Panics with the first difference between the rebuilt and the real directory.
fn assert_same_tree(
    rebuilt: &BTreeMap<String, Option<Vec<u8>>>,
    real: &BTreeMap<String, Option<Vec<u8>>>,
    what: &str,
) {
    let names = |m: &BTreeMap<String, Option<Vec<u8>>>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        names(rebuilt),
        names(real),
        "{what}: the files rebuilt from the trace differ from the real ones"
    );
    for (name, content) in real {
        let got = &rebuilt[name];
        if got != content {
            let (a, b) = (
                got.as_deref().unwrap_or(&[]),
                content.as_deref().unwrap_or(&[]),
            );
            let first = a.iter().zip(b).position(|(x, y)| x != y);
            panic!(
                "{what}: {name} rebuilt from the trace differs from the real file: {} bytes vs \
                 {}, first difference at {first:?}",
                a.len(),
                b.len()
            );
        }
    }
}

/// [`assert_same_tree`] after a kill -9, which may have come between the server's last
/// call and its record: at most one difference, a file the trace left short of its last
/// append, or one name change (two names) the trace did not see.
fn assert_same_but_the_last_call(
    rebuilt: &BTreeMap<String, Option<Vec<u8>>>,
    real: &BTreeMap<String, Option<Vec<u8>>>,
) {
    let mut differences = std::collections::BTreeSet::new();
    for name in rebuilt.keys().chain(real.keys()) {
        match (rebuilt.get(name), real.get(name)) {
            (Some(a), Some(b)) if a == b => {}
            (Some(Some(a)), Some(Some(b))) if b.starts_with(a) => {
                differences.insert(name);
            }
            (Some(_), None) | (None, Some(_)) => {
                differences.insert(name);
            }
            _ => assert_same_tree(rebuilt, real, "after kill -9"),
        }
    }
    // A rename the trace missed shows as two names.
    if differences.len() > 2 {
        assert_same_tree(rebuilt, real, "after kill -9");
    }
}

// ---------------------------------------------------------------------------------------
// The recorded run

#[derive(Debug, Clone)]
enum Kind {
    Set(String),
    Del,
    Incr,
}

/// One request of a writer, and what came of it.
#[derive(Debug, Clone)]
struct ClientOp {
    key: String,
    kind: Kind,
    sent: u64,
    /// When the reply arrived (None: no reply, the server was killed).
    acked: Option<u64>,
    /// INCR's reply.
    reply: i64,
}

fn writer_key(t: usize, j: usize) -> String {
    format!("key-{t}-{j}")
}

fn counter_key(c: usize) -> String {
    format!("counter-{c}")
}

fn all_keys() -> Vec<String> {
    let mut keys: Vec<String> = (0..WRITERS)
        .flat_map(|t| (0..KEYS_PER_WRITER).map(move |j| writer_key(t, j)))
        .collect();
    keys.extend((0..COUNTERS).map(counter_key));
    keys
}

/// Writes until `stop` (or the connection fails: the server was killed); returns every
/// request sent, in order.
fn writer(port: u16, t: usize, seed: u64, acked: &AtomicUsize, stop: &AtomicBool) -> Vec<ClientOp> {
    let mut conn = redis_conn(port);
    let mut rng = Rng(seed ^ (t as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407));
    let mut ops = Vec::new();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let roll = rng.below(20);
        let (key, kind) = if roll < 13 {
            let key = writer_key(t, rng.below(KEYS_PER_WRITER as u64) as usize);
            let value = format!("v-{t}-{i}-{:016x}-{:-<40}", rng.next(), "");
            (key, Kind::Set(value))
        } else if roll < 16 {
            (
                writer_key(t, rng.below(KEYS_PER_WRITER as u64) as usize),
                Kind::Del,
            )
        } else {
            (counter_key(rng.below(COUNTERS as u64) as usize), Kind::Incr)
        };
        let cmd = match &kind {
            Kind::Set(v) => {
                let mut c = redis::cmd("SET");
                c.arg(&key).arg(v);
                c
            }
            Kind::Del => {
                let mut c = redis::cmd("DEL");
                c.arg(&key);
                c
            }
            Kind::Incr => {
                let mut c = redis::cmd("INCR");
                c.arg(&key);
                c
            }
        };
        let sent = mono_ns();
        let res: redis::RedisResult<redis::Value> = cmd.query(&mut conn);
        let now = mono_ns();
        let mut op = ClientOp {
            key,
            kind,
            sent,
            acked: None,
            reply: 0,
        };
        match res {
            Ok(redis::Value::Okay) | Ok(redis::Value::Int(_)) => {
                if let Ok(redis::Value::Int(n)) = res {
                    op.reply = n;
                }
                op.acked = Some(now);
                ops.push(op);
                acked.fetch_add(1, Ordering::Relaxed);
                // Bursts (several writers' requests share a group commit) and pauses.
                if rng.chance(1, 4) {
                    thread::sleep(Duration::from_millis(50 + rng.below(100)));
                }
            }
            Ok(other) => panic!("writer {t}: unexpected reply {other:?}"),
            Err(_) => {
                // The server is gone: this request's outcome is unknown.
                ops.push(op);
                break;
            }
        }
    }
    ops
}

/// A recorded run: the trace and what the clients saw.
struct Recorded {
    history: History,
    /// Per writer, its requests in order.
    clients: Vec<Vec<ClientOp>>,
    kill_time: u64,
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Starts a node under the shim on `dir`, with the trace next to it.
fn start_traced(dir: &DataDir, fsync: &'static str) -> (Server, PathBuf) {
    let trace = dir.root().join("trace.bin");
    let so = shim();
    let server = Server::start_with_env(
        dir,
        None,
        &server_args(fsync),
        &[
            ("LD_PRELOAD", so.to_str().unwrap()),
            ("POWERCUT_DIR", dir.path().to_str().unwrap()),
            ("POWERCUT_TRACE", trace.to_str().unwrap()),
        ],
    );
    (server, trace)
}

fn record_run(seed: u64, fsync: &'static str) -> Recorded {
    let dir = DataDir::new();
    let (mut server, trace) = start_traced(&dir, fsync);
    let acked = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let port = server.port;
    let (clients, kill_time) = thread::scope(|s| {
        // The writers stop when this closure ends, a failed assertion included (the scope
        // waits for them before it lets the panic go on).
        let _stop_writers = StopOnDrop(&stop);
        let handles: Vec<_> = (0..WRITERS)
            .map(|t| {
                let (acked, stop) = (&acked, &stop);
                s.spawn(move || writer(port, t, seed, acked, stop))
            })
            .collect();
        let start = Instant::now();
        let deadline = start + Duration::from_secs(30);
        while acked.load(Ordering::Relaxed) < ACKED_TARGET || start.elapsed() < RUN_TIME {
            assert!(
                Instant::now() < deadline,
                "the writers did not reach {ACKED_TARGET} acknowledged writes in 30 s"
            );
            thread::sleep(Duration::from_millis(2));
        }
        // Killed while they write: the last requests have no reply.
        server.kill9();
        let kill_time = mono_ns();
        stop.store(true, Ordering::Relaxed);
        let clients: Vec<Vec<ClientOp>> = handles
            .into_iter()
            .map(|h| h.join().expect("writer thread panicked"))
            .collect();
        (clients, kill_time)
    });
    let recs = read_trace(&trace);
    let history = History::build(&recs, dir.path());
    // The trace is complete: replayed whole it gives the directory the kill left (a kill
    // -9 keeps the page cache, so that is everything written), but for the last call,
    // if the kill fell between it and its record (an append or a name change: no reply
    // can depend on it, since its record would come before the fsync's).
    let mut rng = Rng(0);
    let rebuilt = history.state_at(u64::MAX, Keep::Everything, &mut rng);
    assert_same_but_the_last_call(&rebuilt, &read_tree(dir.path()));
    Recorded {
        history,
        clients,
        kill_time,
    }
}

// ---------------------------------------------------------------------------------------
// Checking a recovered node

/// What a node recovered from a cut at `t` may hold.
struct Expected {
    /// Per writer key: the values it may have (None: absent).
    keys: Vec<(String, Vec<Option<String>>)>,
    /// Per counter: (lowest, highest) value.
    counters: Vec<(String, i64, i64)>,
    /// Acknowledged writes this cut checks.
    acked: usize,
}

/// What a node recovered from a cut at `t` may hold, when every write acknowledged by
/// `required` must be there (`t` itself under `--fsync always`).
fn expected_at(clients: &[Vec<ClientOp>], required: u64, t: u64) -> Expected {
    let mut keys = Vec::new();
    let mut acked = 0;
    for (w, ops) in clients.iter().enumerate() {
        // A writer waits for each reply, so the writes acknowledged by then are a prefix.
        let done = ops
            .iter()
            .take_while(|o| o.acked.is_some_and(|a| a <= required))
            .count();
        acked += done;
        // The requests sent after them (under `always`, at most one: the one in flight)
        // may or may not be there; the log keeps a prefix of them, in order.
        let maybe = ops[done..].iter().take_while(|o| o.sent <= t).count();
        for j in 0..KEYS_PER_WRITER {
            let key = writer_key(w, j);
            let mut value: Option<String> = None;
            let mut allowed = Vec::new();
            for (n, o) in ops[..done + maybe].iter().enumerate() {
                if o.key == key {
                    match &o.kind {
                        Kind::Set(v) => value = Some(v.clone()),
                        Kind::Del => value = None,
                        Kind::Incr => unreachable!(),
                    }
                }
                if n + 1 >= done && !allowed.contains(&value) {
                    allowed.push(value.clone());
                }
            }
            if done == 0 {
                allowed.insert(0, None);
            }
            allowed.dedup();
            keys.push((key, allowed));
        }
    }
    let counters = (0..COUNTERS)
        .map(|c| {
            let key = counter_key(c);
            let incrs = clients.iter().flatten().filter(|o| o.key == key);
            let lo = incrs
                .clone()
                .filter(|o| o.acked.is_some_and(|a| a <= required))
                .map(|o| o.reply)
                .max()
                .unwrap_or(0);
            let hi = incrs.filter(|o| o.sent <= t).count() as i64;
            (key, lo, hi)
        })
        .collect();
    Expected {
        keys,
        counters,
        acked,
    }
}

/// What a recovered node holds: the value of every key the test knows, how many keys it
/// has in all, and how its recovery went.
struct Seen {
    values: BTreeMap<String, Option<String>>,
    total: usize,
    /// Recovery truncated a torn tail.
    torn: bool,
    /// Recovery started from a snapshot.
    from_snapshot: bool,
}

fn check(seen: &Seen, exp: &Expected) -> Vec<String> {
    let Seen { values, total, .. } = seen;
    let mut bad = Vec::new();
    for (key, allowed) in &exp.keys {
        let got = &values[key];
        if !allowed.contains(got) {
            bad.push(format!("{key} = {got:?}, expected one of {allowed:?}"));
        }
    }
    for (key, lo, hi) in &exp.counters {
        let got = values[key]
            .as_deref()
            .map_or(Ok(0), |v| v.parse::<i64>().map_err(|_| v.to_string()));
        match got {
            Ok(n) if n >= *lo && n <= *hi => {}
            other => bad.push(format!("{key} = {other:?}, expected {lo}..={hi}")),
        }
    }
    let known = values.values().filter(|v| v.is_some()).count();
    if *total != known {
        bad.push(format!(
            "{total} keys in all, but only {known} of them are keys the test wrote"
        ));
    }
    bad
}

fn store_options(fsync: &str) -> Options {
    Options {
        fsync: fsync.parse().expect("an fsync policy"),
        segment_size: 4096,
        compact_min_bytes: 8192,
        cluster_of_one: true,
        ..Options::default()
    }
}

/// Recovers through the library (what `kvstore server` runs at start).
fn recover_in_process(dir: &Path, fsync: &str) -> Result<Seen, String> {
    let store = Store::open(dir, store_options(fsync)).map_err(|e| format!("Store::open: {e}"))?;
    let values = all_keys()
        .into_iter()
        .map(|k| {
            let v = store
                .get(k.as_bytes())
                .map(|v| String::from_utf8_lossy(&v).into_owned());
            (k, v)
        })
        .collect();
    let report = store.recovery();
    Ok(Seen {
        values,
        total: store.len(),
        torn: report.torn_tail.is_some(),
        from_snapshot: report.snapshot_index.is_some(),
    })
}

fn dir_has_snapshot(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|d| {
        d.flatten().any(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with("snapshot-") && n.ends_with(".snap")
        })
    })
}

/// Every key the test knows and DBSIZE, over the network, from the server with process
/// id `pid` (another test's server may have taken the port picked for this one).
fn read_keys(port: u16, pid: u32) -> redis::RedisResult<(BTreeMap<String, Option<String>>, usize)> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let mut conn = client.get_connection_with_timeout(common::CONNECT_TIMEOUT)?;
    conn.set_read_timeout(Some(common::IO_TIMEOUT))?;
    conn.set_write_timeout(Some(common::IO_TIMEOUT))?;
    let info: String = redis::cmd("INFO").arg("server").query(&mut conn)?;
    if !info
        .lines()
        .any(|l| l.trim() == format!("process_id:{pid}"))
    {
        return Err(redis::RedisError::from(std::io::Error::other(
            "another process answers on this port",
        )));
    }
    let keys = all_keys();
    let got: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(&mut conn)?;
    let total: usize = redis::cmd("DBSIZE").query(&mut conn)?;
    Ok((keys.into_iter().zip(got).collect(), total))
}

/// A server process that is killed and reaped when dropped, a panic included.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Recovers with a real `kvstore server` process; Err carries its log when it refuses.
fn recover_with_server(dir: &Path, log: &Path, fsync: &'static str) -> Result<Seen, String> {
    for _attempt in 0..3 {
        let port = common::free_port();
        let logf = fs::File::create(log).expect("server log");
        let mut child = Reaped(
            Command::new(KVSTORE_BIN)
                .arg("server")
                .arg(port.to_string())
                .arg("--data-dir")
                .arg(dir)
                .args(server_args(fsync))
                .env_remove("LD_PRELOAD")
                .stdin(Stdio::null())
                .stdout(Stdio::from(logf.try_clone().unwrap()))
                .stderr(Stdio::from(logf))
                .spawn()
                .expect("spawn kvstore"),
        );
        let deadline = Instant::now() + common::START_DEADLINE;
        let result = loop {
            if let Some(status) = child.0.try_wait().expect("try_wait") {
                break Err(format!(
                    "kvstore server exited ({status}) at start:\n{}",
                    fs::read_to_string(log).unwrap_or_default()
                ));
            }
            // Not yet listening, or still recovering: try again until the deadline.
            if TcpStream::connect(("127.0.0.1", port)).is_ok()
                && let Ok((values, total)) = read_keys(port, child.0.id())
            {
                let log = fs::read_to_string(log).unwrap_or_default();
                break Ok(Seen {
                    values,
                    total,
                    torn: log.contains("torn write"),
                    from_snapshot: dir_has_snapshot(dir),
                });
            }
            if Instant::now() > deadline {
                break Err("kvstore server did not start in time".to_string());
            }
            thread::sleep(Duration::from_millis(5));
        };
        drop(child);
        match result {
            Err(e) if e.contains("in use") => continue,
            other => return other,
        }
    }
    Err("no free port in three attempts".to_string())
}

// ---------------------------------------------------------------------------------------
// The tests

/// The shim's self-test: a clean run's whole trace, replayed, rebuilds the data directory
/// byte for byte (every file, its name and its contents), compactions included.
#[test]
fn the_trace_rebuilds_the_data_directory() {
    let dir = DataDir::new();
    let (mut server, trace) = start_traced(&dir, "always");
    let mut conn = server.conn();
    for i in 0..300u32 {
        let key = format!("k{}", i % 20);
        if i % 7 == 3 {
            let _: i64 = redis::cmd("DEL").arg(&key).query(&mut conn).expect("DEL");
        } else {
            let () = redis::cmd("SET")
                .arg(&key)
                .arg(format!("value-{i}-{:-<60}", ""))
                .query(&mut conn)
                .expect("SET");
        }
    }
    let _: i64 = redis::cmd("INCR").arg("c").query(&mut conn).expect("INCR");
    drop(conn);
    let status = server.terminate();
    assert!(status.success(), "kvstore exited with {status}");
    let history = History::build(&read_trace(&trace), dir.path());
    assert!(
        history.renames > 0 && history.unlinks > 0,
        "no compaction in the run ({} renames, {} unlinks)",
        history.renames,
        history.unlinks
    );
    let rebuilt = history.state_at(u64::MAX, Keep::Everything, &mut Rng(0));
    let real = read_tree(dir.path());
    assert_same_tree(&rebuilt, &real, "after a clean shutdown");
    println!(
        "powercut shim self-test: {} records ({} writes, {} syncs, {} renames, {} unlinks), \
         {} files rebuilt byte for byte",
        history.records,
        history.writes,
        history.sync_times.len(),
        history.renames,
        history.unlinks,
        real.len()
    );
}

#[test]
fn acknowledged_writes_survive_power_cuts() {
    power_cuts("always");
}

/// Under `--fsync everysec` a power cut may lose the last second of acknowledged writes
/// (documented), so the writes that must be there are those acknowledged before a sync of
/// the log began that completed by the cut; many batches are unsynced at once, which is
/// where a torn tail (later pages landed, earlier ones not) must still not read as damage.
#[test]
fn fsynced_writes_survive_power_cuts_under_everysec() {
    power_cuts("everysec");
}

/// Under `--fsync no` only a segment roll, a snapshot and `meta` are fsync'd: the unsynced
/// tail is long, and what must survive is what those syncs covered.
#[test]
fn fsynced_writes_survive_power_cuts_under_fsync_no() {
    power_cuts("no");
}

/// Records a run under `--fsync <fsync>`, then recovers and checks every cut point.
fn power_cuts(fsync: &'static str) {
    let seed = env_u64("POWERCUT_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    let cuts_wanted = env_u64("POWERCUT_CUTS").map_or(DEFAULT_CUTS, |n| n as usize);
    let server_every = env_u64("POWERCUT_SERVER_EVERY").map_or(SERVER_EVERY, |n| n.max(1) as usize);
    println!("powercut ({fsync}): seed {seed} (POWERCUT_SEED={seed} replays the cut choices)");
    let rec = record_run(seed, fsync);
    let h = &rec.history;
    assert!(
        h.renames > 0 && h.unlinks > 0,
        "no compaction during the run ({} renames, {} unlinks)",
        h.renames,
        h.unlinks
    );

    // Cut times: every sync completion and the moment before it (its writes done, the
    // sync not: where unsynced bytes are), then random times up to the number wanted.
    let mut rng = Rng(seed);
    let mut cuts: Vec<u64> = h.sync_times.iter().flat_map(|&t| [t - 1, t]).collect();
    let end = rec.kill_time.max(h.last_t);
    let random = cuts_wanted.saturating_sub(cuts.len()).max(cuts_wanted / 3);
    for _ in 0..random {
        cuts.push(h.first_t + rng.below(end - h.first_t + 1));
    }
    cuts.push(end);
    cuts.sort_unstable();

    // The states live in memory when the machine has a tmpfs there: recovery fsyncs
    // (truncating a torn tail, a new segment, meta), and on a real disk those fsyncs were
    // most of the replay's time.
    let shm = Path::new("/dev/shm");
    let work = tempfile::Builder::new()
        .prefix("kvstore-powercut-")
        .tempdir_in(if shm.is_dir() {
            shm
        } else {
            Path::new(env!("CARGO_TARGET_TMPDIR"))
        })
        .or_else(|_| {
            tempfile::Builder::new()
                .prefix("kvstore-powercut-")
                .tempdir()
        })
        .expect("temp dir");
    let failures = Path::new(env!("CARGO_TARGET_TMPDIR")).join("powercut-failures");
    let violations = Mutex::new(Vec::<String>::new());
    let (mut recovered, mut by_server, mut checked) = (0usize, 0usize, 0usize);
    let (mut torn, mut from_snapshot) = (0usize, 0usize);
    let started = Instant::now();
    for (i, &t) in cuts.iter().enumerate() {
        let keep = match i % 8 {
            0 => Keep::Nothing,
            1 => Keep::Everything,
            _ => Keep::Random,
        };
        let state = h.state_at(t, keep, &mut rng);
        let dir = work.path().join(format!("cut-{i}"));
        fs::create_dir(&dir).expect("create state dir");
        materialize(&state, &dir);
        let required = match fsync {
            "always" => t,
            _ => h.segment_synced_before(t).min(t),
        };
        let exp = expected_at(&rec.clients, required, t);
        let use_server = i % server_every == 0;
        let mut result = if use_server {
            recover_with_server(&dir, &work.path().join(format!("cut-{i}.log")), fsync)
        } else {
            recover_in_process(&dir, fsync)
        };
        if result.is_err() && !use_server {
            // Confirm a library refusal with the real server, on a fresh copy.
            let again = work.path().join(format!("cut-{i}-server"));
            fs::create_dir(&again).expect("create state dir");
            materialize(&state, &again);
            result = recover_with_server(&again, &work.path().join(format!("cut-{i}.log")), fsync);
        }
        let problems = match &result {
            Ok(seen) => {
                recovered += 1;
                by_server += use_server as usize;
                torn += seen.torn as usize;
                from_snapshot += seen.from_snapshot as usize;
                checked += exp.acked;
                check(seen, &exp)
            }
            Err(e) => vec![format!("recovery refused: {e}")],
        };
        if !problems.is_empty() {
            let keep_at = failures.join(format!("{fsync}-seed-{seed}-cut-{i}"));
            let _ = fs::remove_dir_all(&keep_at);
            fs::create_dir_all(&keep_at).expect("create failure dir");
            materialize(&state, &keep_at);
            let files: Vec<String> = state
                .iter()
                .map(|(n, c)| format!("{n} ({} bytes)", c.as_ref().map_or(0, Vec::len)))
                .collect();
            violations.lock().unwrap().push(format!(
                "cut {i} at +{:.3} ms ({keep:?}; state kept in {}; files: {}):\n    {}",
                (t - h.first_t) as f64 / 1e6,
                keep_at.display(),
                files.join(", "),
                problems.join("\n    ")
            ));
        }
        fs::remove_dir_all(&dir).expect("remove state dir");
    }
    let violations = violations.into_inner().unwrap();
    println!(
        "powercut ({fsync}): {} cut points, {recovered} states recovered, {checked} acked writes \
         checked, {} violations",
        cuts.len(),
        violations.len()
    );
    println!(
        "powercut ({fsync}): cuts at {} fsync completions (and just before each), {} random times \
         and the kill; {by_server} states \
         recovered by a server process, the rest in-process; {torn} recoveries truncated a \
         torn tail, {from_snapshot} started from a snapshot; trace of {:.0} ms: {} records, \
         {} writes, {} renames ({} of meta), {} unlinks; replay took {:?}",
        h.sync_times.len(),
        cuts.len() - 2 * h.sync_times.len() - 1,
        (h.last_t - h.first_t) as f64 / 1e6,
        h.records,
        h.writes,
        h.renames,
        h.meta_writes,
        h.unlinks,
        started.elapsed()
    );
    assert!(
        violations.is_empty(),
        "power-cut states that lost acknowledged writes or did not recover (--fsync {fsync}, \
         seed {seed}):\n{}",
        violations.join("\n")
    );
}
