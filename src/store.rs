//! The store: the one write path into the state machine, and the threads around it.
//!
//! [`Store`] owns the data (a `parking_lot` mutex around a [`Db`]: Redis's numbered
//! databases, each a [`Keyspace`] of keys, deadlines and counters; the map, the expiry
//! index, the operation type and `apply` are the state machine's, in `src/db/`, with
//! private fields) and the write-ahead log. Reads lock the map and look at one database
//! ([`Store::read`]). Writes never touch the map directly: a write becomes
//! [`Command`]s naming their database, encoded as the payloads of log entries, which are
//! appended (and fsync'd as `--fsync` asks), and only then are the commands applied, in
//! log order, by [`Db::apply`]. Recovery is the same `apply` run over the snapshot and the log, so
//! what a client was told is exactly what a restart rebuilds; a snapshot or log that
//! names a database beyond [`Options::databases`] is refused rather than half applied.
//!
//! # Group commit
//!
//! Under `--fsync always`, writers hand their entries to a dedicated *log writer* thread:
//! [`Store::submit`] encodes them into a shared queue under a short lock (which fixes
//! their log order), unparks the writer and returns. The writer takes the whole queue,
//! writes it with one `write`, fsyncs once, applies every entry, and then runs each
//! submitter's completion with its results. The server's completions render and send the
//! replies themselves, so a connection thread is woken only by its client's input, never
//! once more per commit. When the last batch covered several writers the writer first
//! waits briefly for them to queue their next writes (`Store::linger`, PostgreSQL's
//! `commit_delay` made adaptive), so one fsync covers more of them.
//!
//! Without an fsync to share (`everysec`, `no`) a commit is one short `write`: the caller
//! takes the writer lock and commits its own entries on its own thread, which costs less
//! than handing them to another thread and back.
//!
//! [`Store::write`] is the blocking form of `submit` for library users and the repl.
//!
//! # When the log fails
//!
//! A write whose entry would be larger than the log accepts ([`wal::MAX_ENTRY`], say a
//! transaction of several huge values) is refused before anything of its submission is
//! logged ([`StoreError::TooLarge`]: not applied, and never will be). A failed append or
//! fsync, under any policy (the `everysec` fsync runs on the *log upkeep* thread), makes
//! every later write fail with [`StoreError::WriteFailed`] ("write outcome unknown") until
//! a restart recovers from what is on disk: after a failed fsync the kernel may have
//! dropped the dirty pages, so nothing more may be acknowledged. A panic in the log writer
//! does the same instead of leaving writers waiting forever. The upkeep thread also
//! records, once a second, how far the log is known to be on disk (`meta`), so that a log
//! later found shorter is refused rather than replayed short (see `wal.rs`).
//!
//! # Time and expiry
//!
//! Each entry carries the leader's clock (`ts_ms`) from when it was queued. `apply` uses
//! that, never the local clock, to decide whether a key has expired, so replaying a log
//! (or a follower applying it) reaches the same state. Readers use the real clock and
//! report an expired key as missing.
//!
//! # Compaction
//!
//! When the log outgrows the live data (`compact_percentage`, above `compact_min_bytes`),
//! or on SAVE/BGSAVE, the flusher (holding the log writer, so every logged entry is
//! applied) rolls to a fresh segment at `index + 1` and, under the map lock, switches on
//! *tracking* in every non-empty database ([`Db::start_tracking`]: O(databases), no
//! copy). A background thread then streams the snapshot of the map as it was at `index`
//! to a temp file ([`wal::SnapshotWriter`]): per database, it walks the table with SCAN's
//! cursor 64 buckets per lock acquisition, encoding the keys not changed since
//! into a chunk that it writes after releasing the lock, and last adds the pre-images of
//! the keys that changed ahead of the walk (`db/keymap.rs` explains why that is exactly the
//! state at `index`). Then it renames the file into place and deletes the segments it
//! covers. Writers wait for one step at most, never for the walk, and the memory the
//! compaction takes is one chunk plus the pre-images of the keys written during it,
//! not a copy of the data set (Redis forks instead, and pays copy-on-write for the
//! pages written meanwhile). Each database must yield its key count at `index`;
//! anything else, a failed write, or a table replaced meanwhile (FLUSHALL, FLUSHDB,
//! SWAPDB: Redis's FLUSHALL kills a running BGSAVE too) gives the snapshot up: its temp
//! file goes, nothing is pruned, and the log still holds every write.

use crate::db::{
    Command, Condition, Db, ERR_DB_RANGE, ERR_NOT_INTEGER, Expiry, Keyspace, Op, OpResult,
};
use crate::log::{LogEntry, LogStore};
use crate::wal::{
    self, BatchBuf, FsyncPolicy, RecoveryReport, SnapshotPart, Wal, WalError, WalOptions,
};
use crate::watch::{KeyState, Watches};
use parking_lot::{Condvar, Mutex, MutexGuard};
use std::collections::VecDeque;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::{self, Thread};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `Options::databases`' default (Redis's), re-exported from the state machine.
pub use crate::db::DEFAULT_DATABASES;

/// Where the store reads the time: the system clock, or a test's fake clock, so expiry
/// can be tested without sleeping.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> u64 + Send + Sync>);

impl Clock {
    /// The wall clock (Unix milliseconds).
    pub fn system() -> Clock {
        Clock(Arc::new(now_ms))
    }

    /// A clock reading `f` (Unix milliseconds).
    pub fn new(f: impl Fn() -> u64 + Send + Sync + 'static) -> Clock {
        Clock(Arc::new(f))
    }

    pub fn now_ms(&self) -> u64 {
        (self.0)()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Clock")
    }
}

/// Settings of a store.
#[derive(Debug, Clone)]
pub struct Options {
    pub fsync: FsyncPolicy,
    /// Segment files roll over past this size.
    pub segment_size: u64,
    /// Never compact a log smaller than this.
    pub compact_min_bytes: u64,
    /// Compact when the log is larger than this percentage of the live data.
    pub compact_percentage: u64,
    /// The time source for expiry.
    pub clock: Clock,
    /// Delete expired keys in the background (the leader's job: a follower only applies
    /// the deletions the leader logs).
    pub active_expiry: bool,
    /// Number of databases (Redis's `databases`, `SELECT 0` to this minus one). A log or
    /// snapshot that uses a database beyond it is refused at open.
    pub databases: u32,
    /// A cluster of one (a single node, the embedded store, the repl): an entry commits
    /// as soon as its own append is as durable as `fsync` asks, and recovery applies the
    /// whole log, since nobody else could have decided otherwise. A cluster member
    /// instead commits what its node decides ([`Store::commit_to`]); its recovery
    /// applies only up to the commit index recorded in `meta`, and the rest of its log
    /// waits for the leader's word.
    pub cluster_of_one: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            fsync: FsyncPolicy::Always,
            segment_size: 64 << 20,
            compact_min_bytes: 64 << 20,
            compact_percentage: 100,
            clock: Clock::system(),
            active_expiry: true,
            databases: DEFAULT_DATABASES,
            cluster_of_one: true,
        }
    }
}

/// How long WATCH on a cluster member waits for the writes queued before it to commit
/// and apply (a leader that lost its majority commits nothing; its lease ends sooner).
const WATCH_COMMIT_WAIT: Duration = Duration::from_secs(2);

/// Errors of the store.
#[derive(Debug)]
pub enum StoreError {
    /// Opening or recovering the log failed (including corruption).
    Wal(WalError),
    /// A write to the log failed. The writes in that batch may or may not be on disk, and
    /// the store refuses further writes until it is restarted and recovers from the log.
    WriteFailed(String),
    /// The writes were refused before they were logged: nothing of them was applied.
    TooLarge(wal::EntryTooLarge),
    /// A cluster member that may not take writes now refused them before they were
    /// logged: nothing of them was applied, and never will be. The text is the reply
    /// (`MOVED 0 host:port`, `CLUSTERDOWN no leader elected`).
    Redirect(String),
    /// The writes were logged but this node stopped leading before they were known to
    /// be committed: they may or may not be applied, by a later leader.
    Unknown(String),
    /// The snapshot or the log uses a database beyond `--databases` (it was written with
    /// more): applying it would lose or misplace keys.
    TooFewDatabases {
        configured: u32,
        /// The database met (for a log entry, the one its command named), if known.
        db: Option<u32>,
        /// Where: the snapshot, or the log entry's index.
        place: String,
    },
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Wal(e) => e.fmt(f),
            StoreError::WriteFailed(why) => write!(
                f,
                "log write failed ({why}): write outcome unknown, and this node refuses \
                 writes until it is restarted"
            ),
            StoreError::TooLarge(e) => write!(f, "{e}; nothing was written"),
            StoreError::Redirect(reply) => f.write_str(reply),
            StoreError::Unknown(why) => write!(
                f,
                "write outcome unknown: it may or may not have been applied ({why})"
            ),
            StoreError::TooFewDatabases {
                configured,
                db,
                place,
            } => {
                match db {
                    Some(db) => write!(f, "{place} uses database {db}")?,
                    None => write!(f, "{place} uses a database")?,
                }
                write!(
                    f,
                    ", but this node has only {configured} databases (--databases); the data \
                     was written with more: start with that --databases value"
                )
            }
        }
    }
}

impl std::error::Error for StoreError {}

impl From<WalError> for StoreError {
    fn from(e: WalError) -> Self {
        StoreError::Wal(e)
    }
}

/// The wall clock in Unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Counters for INFO.
#[derive(Debug, Default)]
pub struct Stats {
    pub commits: AtomicU64,
    pub fsyncs: AtomicU64,
    /// How long making the log durable took: under `always` a batch's write and fsync
    /// (one call), otherwise the fsync alone.
    pub fsync_time: crate::metrics::Histogram,
    pub entries_written: AtomicU64,
    pub compactions: AtomicU64,
    pub last_compaction_ok: AtomicBool,
    /// Unix time (seconds) of the last successful compaction; 0 before the first.
    pub last_save_unix: AtomicU64,
}

/// A snapshot of the store's log state, for INFO.
#[derive(Debug, Clone)]
pub struct LogInfo {
    pub fsync: FsyncPolicy,
    pub last_index: u64,
    pub log_bytes: u64,
    pub compacting: bool,
    pub compactions: u64,
    /// Unix time (seconds) of the last successful compaction; 0 before the first.
    pub last_save_unix: u64,
    pub fsyncs: u64,
    pub write_error: Option<String>,
    pub recovery: RecoveryReport,
}

type Outcome = Result<Vec<OpResult>, Failure>;

/// Why a batch of writes failed, for each of its submitters.
#[derive(Debug, Clone)]
enum Failure {
    /// The log failed (`StoreError::WriteFailed`).
    Log(String),
    /// Refused before logging (`StoreError::Redirect`).
    Redirect(String),
    /// Logged, commit not known (`StoreError::Unknown`).
    Unknown(String),
}

impl From<Failure> for StoreError {
    fn from(f: Failure) -> StoreError {
        match f {
            Failure::Log(why) => StoreError::WriteFailed(why),
            Failure::Redirect(reply) => StoreError::Redirect(reply),
            Failure::Unknown(why) => StoreError::Unknown(why),
        }
    }
}

/// What a submitter is told when its entries are committed and applied (or not). Runs on
/// whichever thread committed them (the log writer, the submitter itself, or a cluster's
/// commit driver), so it must be quick and must not block: the server's completion only
/// hands the results to its connection's thread, which renders the replies.
pub type Done = Box<dyn FnOnce(Result<Vec<OpResult>, StoreError>) + Send>;

/// A submitter waiting for its entries (`first..=last`) to be committed and applied.
struct Waiter {
    done: Done,
    first: u64,
    last: u64,
}

/// Submitters about to be answered, each with its outcome. Dropping it tells every one;
/// a submitter whose outcome was never set (a panic on the way) learns that its writes'
/// outcome is unknown rather than waiting forever.
#[derive(Default)]
struct Deliveries(Vec<(Waiter, Option<Outcome>)>);

impl Drop for Deliveries {
    fn drop(&mut self) {
        for (w, outcome) in self.0.drain(..) {
            let outcome = outcome.unwrap_or_else(|| {
                Err(Failure::Log("internal error while committing".to_string()))
            });
            (w.done)(outcome.map_err(StoreError::from));
        }
    }
}

/// Entries queued for the log, in log order (the queue lock fixes it).
#[derive(Default)]
struct Queue {
    next_index: u64,
    buf: BatchBuf,
    /// The queued commands with their log indexes (their bytes are in `buf`).
    entries: Vec<(u64, Command)>,
    waiters: Vec<Waiter>,
}

/// Entries in the log but not applied: not yet known to be committed. On a cluster of
/// one they pass through at once (its own append commits them); a cluster member's wait
/// here for its node's [`Store::commit_to`].
#[derive(Default)]
struct Unapplied {
    /// Commands with their log indexes, in log order.
    entries: VecDeque<(u64, Command)>,
    waiters: VecDeque<Waiter>,
}

struct Inner {
    dir: PathBuf,
    opts: Options,
    db: Mutex<Db>,
    queue: Mutex<Queue>,
    /// Taken before `db` when both are: applying in log order means one applier at a time.
    unapplied: Mutex<Unapplied>,
    /// Signalled (with `db`) whenever committed entries are applied: WATCH on a cluster
    /// member waits on it for the writes queued before it.
    applied: Condvar,
    /// A cluster member's replication (set once, before writes): it decides whether
    /// client writes may be appended and when entries commit.
    replicator: std::sync::OnceLock<Arc<dyn Replicator>>,
    /// The expirer deletes keys only while this is set: always on a cluster of one, only
    /// while leading on a cluster member.
    expiring: AtomicBool,
    /// Holding this lock is being the flusher.
    wal: Mutex<Wal>,
    epoch: AtomicU64,
    /// Why the log stopped taking writes, once a write to it failed. Read on every write,
    /// so a `OnceLock`: no lock to contend on.
    failed: std::sync::OnceLock<String>,
    compacting: AtomicBool,
    /// Numbers compactions, to tag the maps each one tracks.
    snapshot_ids: AtomicU64,
    /// Bytes freed by a background compaction, not yet subtracted from the writer's count.
    pruned: AtomicU64,
    /// Writers in the last group commit, and how long its append and fsync took (for
    /// [`Store::linger`]).
    last_batch_writers: AtomicU64,
    last_fsync_nanos: AtomicU64,
    /// Times the fsync of the log under way, for [`Store::fsync_in_progress`].
    fsync_clock: Arc<wal::FsyncClock>,
    /// The log writer thread (`--fsync always` only), unparked when entries are queued.
    writer: std::sync::OnceLock<Thread>,
    /// Keys a reader found expired (database, key), for the expirer to delete soon (lazy
    /// expiry).
    expiry_hints: crossbeam_channel::Sender<(u32, Vec<u8>)>,
    /// WATCHed keys: told of every write as it is queued (`src/watch.rs`).
    watches: Watches,
    stats: Stats,
    recovery: RecoveryReport,
    /// The meta file's contents as last written (the lock orders writers of the file).
    meta: Mutex<wal::Meta>,
    /// Tests: make the next background fsync fail, or the next flush panic.
    #[cfg(test)]
    fail_next_sync: AtomicBool,
    #[cfg(test)]
    panic_next_flush: AtomicBool,
    /// Tests: hold the compaction thread after each step of its walk.
    #[cfg(test)]
    compaction_gate: tests::Gate,
}

/// A cluster member's replication, as its store sees it (the cluster driver implements
/// it over the pure node, `src/driver.rs`).
pub trait Replicator: Send + Sync {
    /// Called by the flusher, with the log locked, for a batch of client writes (their
    /// payloads, in order): if this node may take them now, append them through `log`
    /// (at its end) and return the index of the first; otherwise refuse them with
    /// [`StoreError::Redirect`] before anything is appended. Their commit comes later,
    /// through [`MemberLog::commit_to`].
    ///
    /// Under `--fsync always` the batch is written but not fsync'd here: the flusher
    /// fsyncs it after letting the log go and then calls [`Replicator::persisted`].
    fn propose(&self, log: &mut MemberLog<'_>, payloads: Vec<Vec<u8>>) -> Result<u64, StoreError>;

    /// The log became more durable outside the node's calls (the flusher's fsync, with
    /// the log locked again): tell the node, and carry out what that brings.
    fn persisted(&self, log: &mut MemberLog<'_>);
}

/// The log of a cluster member's store, locked ([`Store::with_log`]), with what its
/// driver does to it: the node's view ([`MemberLog::log`]), appends of entries from the
/// leader or of the node's own no-op, truncation of a divergent suffix, the meta the
/// node saves, and commits.
pub struct MemberLog<'a> {
    store: &'a Store,
    wal: &'a mut Wal,
}

impl MemberLog<'_> {
    /// The log as the node reads it.
    pub fn log(&self) -> &dyn LogStore {
        &*self.wal
    }

    /// Appends `entries` at the log's end (synced as `--fsync` asks); the commands not
    /// yet waiting to be applied are decoded and wait for their commit. Returns the index
    /// through which the log is now as durable as `--fsync` asks (what the node's
    /// `persisted` wants to hear).
    pub fn append(&mut self, entries: &[LogEntry]) -> Result<u64, StoreError> {
        self.append_with(entries, true)
    }

    /// [`MemberLog::append`] without the fsync `--fsync always` asks for: the returned
    /// index stays where it was until [`MemberLog::sync`]. Lets a follower write several
    /// of its leader's `Append`s and make them durable with one fsync.
    pub fn append_unsynced(&mut self, entries: &[LogEntry]) -> Result<u64, StoreError> {
        self.append_with(entries, false)
    }

    /// Fsyncs what [`MemberLog::append_unsynced`] wrote; returns the index through which
    /// the log is now as durable as `--fsync` asks.
    pub fn sync(&mut self) -> Result<u64, StoreError> {
        let inner = &*self.store.inner;
        if let Some(why) = inner.failed.get() {
            return Err(StoreError::WriteFailed(why.clone()));
        }
        if inner.opts.fsync == FsyncPolicy::Always
            && self.wal.durable_index() < self.wal.last_index()
        {
            let started = std::time::Instant::now();
            if let Err(e) = self.wal.sync() {
                return Err(self.stop_writes(e));
            }
            inner.stats.fsync_time.record(started.elapsed());
            inner.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        }
        Ok(self.persisted_index())
    }

    /// A failed write or fsync of the log: what it held is in doubt, so the store takes
    /// no more writes; logged once, returned to the caller.
    fn stop_writes(&self, e: WalError) -> StoreError {
        let why = e.to_string();
        log::error!("{}", StoreError::WriteFailed(why.clone()));
        let _ = self.store.inner.failed.set(why.clone());
        StoreError::WriteFailed(why)
    }

    fn append_with(&mut self, entries: &[LogEntry], sync: bool) -> Result<u64, StoreError> {
        let inner = &*self.store.inner;
        if let Some(why) = inner.failed.get() {
            return Err(StoreError::WriteFailed(why.clone()));
        }
        // Entries already waiting to be applied (a leader's own proposals, queued by the
        // flusher) or applied are not decoded again.
        let known = {
            let u = inner.unapplied.lock();
            let queued = u.entries.back().map_or(0, |e| e.0);
            queued.max(inner.db.lock().applied_index())
        };
        let mut decoded = Vec::new();
        for e in entries.iter().filter(|e| e.index > known) {
            let c = Command::decode(&e.payload).map_err(|why| {
                StoreError::Wal(WalError::Refused(format!(
                    "entry {} from the leader does not decode: {why}",
                    e.index
                )))
            })?;
            decoded.push((e.index, c));
        }
        let started = std::time::Instant::now();
        if let Err(e) = self.wal.append_entries(entries, sync) {
            return Err(self.stop_writes(e));
        }
        inner.stats.commits.fetch_add(1, Ordering::Relaxed);
        if sync && inner.opts.fsync == FsyncPolicy::Always {
            inner.stats.fsync_time.record(started.elapsed());
            inner.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        }
        inner.unapplied.lock().entries.extend(decoded);
        Ok(self.persisted_index())
    }

    /// How far the log is as durable as `--fsync` asks: its end under `everysec` and
    /// `no` (written), the fsync'd end under `always`.
    pub fn persisted_index(&self) -> u64 {
        if self.store.inner.opts.fsync == FsyncPolicy::Always {
            LogStore::durable_index(&*self.wal)
        } else {
            LogStore::last(&*self.wal).0
        }
    }

    /// Drops every entry after `index` (a divergent suffix); a submitter whose writes
    /// were among them learns that their outcome is unknown.
    pub fn truncate_after(&mut self, index: u64) -> Result<(), StoreError> {
        LogStore::truncate_after(self.wal, index)?;
        let mut u = self.store.inner.unapplied.lock();
        let keep = u.entries.partition_point(|e| e.0 <= index);
        u.entries.truncate(keep);
        let keep = u.waiters.partition_point(|w| w.last <= index);
        let gone: Vec<Waiter> = u.waiters.drain(keep..).collect();
        drop(u);
        drop(Deliveries(
            gone.into_iter()
                .map(|w| {
                    let why = "the entry was replaced by the new leader's log".to_string();
                    (w, Some(Err(Failure::Unknown(why))))
                })
                .collect(),
        ));
        Ok(())
    }

    /// Saves the node's meta (epoch, vote, commit index), durably.
    pub fn save_meta(&mut self, meta: wal::Meta) -> Result<(), StoreError> {
        let inner = &*self.store.inner;
        let mut written = inner.meta.lock();
        LogStore::save_meta(self.wal, meta)?;
        *written = meta;
        inner.epoch.store(meta.epoch, Ordering::Relaxed);
        Ok(())
    }

    /// The node decided that entries through `index` are committed: applies them in log
    /// order and answers their submitters.
    pub fn commit_to(&mut self, index: u64) {
        let (deliveries, live_bytes) = self.store.apply_committed(index);
        // A member compacts by the same rule as a cluster of one (`--compact-min-size`,
        // `--compact-percentage`): its snapshot is what a lagging follower is sent.
        if live_bytes > 0 {
            self.store.maybe_compact(self.wal, live_bytes);
        }
        drop(deliveries);
    }

    /// Installs a snapshot received from another member (`snapshot_transfer.rs`): `data`
    /// is the whole snapshot file at (`index`, `epoch`). Rebuilds the state machine from it
    /// with the loader recovery uses, so that it reflects exactly the entries up to
    /// `index`; installs it into the log ([`LogStore::install_snapshot`], which keeps the
    /// entries after `index` if the log agrees with the snapshot there); and makes the
    /// entries the log still holds after `index` wait for their commit again. A submitter
    /// whose entries are gone learns that their outcome is unknown. Nothing changes if the
    /// snapshot does not load (damaged, or more databases than configured).
    pub fn install_snapshot(
        &mut self,
        index: u64,
        epoch: u64,
        data: &[u8],
    ) -> Result<(), StoreError> {
        let inner = &*self.store.inner;
        if let Some(why) = inner.failed.get() {
            return Err(StoreError::WriteFailed(why.clone()));
        }
        // A compaction of the state being replaced must not finish after the install (its
        // snapshot would describe the old state); its walk notices the new map and gives
        // up, so this wait is short. It needs no lock held here.
        self.store.wait_for_compaction();
        let (snap, _) = LogStore::snapshot(&*self.wal);
        if index <= snap {
            return Err(StoreError::Wal(WalError::Refused(format!(
                "the log already starts after a snapshot at {snap}, not older than {index}"
            ))));
        }
        let databases = inner.opts.databases.max(1);
        let mut db = Db::new(databases);
        let mut header = None;
        let mut beyond = None;
        wal::decode_snapshot_with(
            Path::new("the received snapshot"),
            data,
            |part| match part {
                SnapshotPart::Header { index, epoch, .. } => {
                    header = Some((index, epoch));
                    db.set_applied(index);
                }
                SnapshotPart::Database { db: d, count } => db.reserve(d, count),
                SnapshotPart::Item(it) => {
                    let d = it.db;
                    if !db.load(it) && beyond.is_none() {
                        beyond = Some(d);
                    }
                }
                SnapshotPart::End => db.finish_load(),
            },
        )?;
        if let Some(d) = beyond {
            return Err(StoreError::TooFewDatabases {
                configured: databases,
                db: Some(d),
                place: "the received snapshot".into(),
            });
        }
        if header != Some((index, epoch)) {
            return Err(StoreError::Wal(WalError::Refused(format!(
                "the received snapshot's header says {header:?}, not ({index}, {epoch})"
            ))));
        }
        LogStore::install_snapshot(self.wal, index, epoch, data)?;
        // What the log still holds after the snapshot waits for its commit, decoded afresh
        // (the log may have been cut back to the snapshot).
        let last = LogStore::last(&*self.wal).0;
        let mut waiting = VecDeque::new();
        let mut from = index + 1;
        while from <= last {
            let entries = LogStore::read(&*self.wal, from, 1 << 20)?;
            let Some(end) = entries.last().map(|e| e.index) else {
                break;
            };
            for e in entries {
                let c = Command::decode(&e.payload).map_err(|why| {
                    StoreError::Wal(WalError::Refused(format!(
                        "entry {} does not decode: {why}",
                        e.index
                    )))
                })?;
                waiting.push_back((e.index, c));
            }
            from = end + 1;
        }
        let (gone, old) = {
            let mut u = inner.unapplied.lock();
            let old = std::mem::replace(&mut *inner.db.lock(), db);
            u.entries = waiting;
            let (keep, gone): (VecDeque<Waiter>, VecDeque<Waiter>) = std::mem::take(&mut u.waiters)
                .into_iter()
                .partition(|w| w.first > index && w.last <= last);
            u.waiters = keep;
            (gone, old)
        };
        // Freeing the old data set may take a while: not under the map lock.
        drop(old);
        log::info!(
            "installed a snapshot at index {index} (epoch {epoch}, {} bytes)",
            data.len()
        );
        drop(Deliveries(
            gone.into_iter()
                .map(|w| {
                    let why = "the log was replaced by another member's snapshot".to_string();
                    (w, Some(Err(Failure::Unknown(why))))
                })
                .collect(),
        ));
        Ok(())
    }

    /// Answers every submitter still waiting for its writes to commit: their outcome is
    /// unknown (this node stopped leading; a later leader may or may not commit them).
    pub fn fail_waiting(&mut self, why: &str) {
        let waiters = std::mem::take(&mut self.store.inner.unapplied.lock().waiters);
        drop(Deliveries(
            waiters
                .into_iter()
                .map(|w| (w, Some(Err(Failure::Unknown(why.to_string())))))
                .collect(),
        ));
    }

    /// The index the state machine has applied through.
    pub fn applied_index(&self) -> u64 {
        self.store.inner.db.lock().applied_index()
    }
}

/// A durable, thread-safe key-value store. Cloning is cheap (shared handle).
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.inner.dir)
            .finish()
    }
}

impl Store {
    /// Opens the store in `dir` (created if missing), recovering from its log.
    ///
    /// ```no_run
    /// let store = kvstore::Store::open("data", kvstore::store::Options::default())?;
    /// store.set(b"greeting", b"hello")?;
    /// assert_eq!(store.get(b"greeting").as_deref(), Some(&b"hello"[..]));
    /// # Ok::<(), kvstore::store::StoreError>(())
    /// ```
    pub fn open(dir: impl AsRef<Path>, opts: Options) -> Result<Store, StoreError> {
        let dir = dir.as_ref().to_path_buf();
        let databases = opts.databases.max(1);
        // The first snapshot key or log entry beyond the configured databases.
        let beyond: std::cell::RefCell<Option<StoreError>> = std::cell::RefCell::new(None);
        let too_few = |db: Option<u32>, place: String| {
            let mut b = beyond.borrow_mut();
            if b.is_none() {
                *b = Some(StoreError::TooFewDatabases {
                    configured: databases,
                    db,
                    place,
                });
            }
        };
        // Both replay callbacks need the map; RefCell lets them share it.
        let db = std::cell::RefCell::new(Db::new(databases));
        let wal_opts = WalOptions {
            fsync: opts.fsync,
            segment_size: opts.segment_size,
        };
        // What recovery may apply: all of a cluster of one's log; of a cluster member's,
        // what it knew committed (the rest waits, in `unapplied`, for the leader). Read
        // before the directory is locked: if another process holds it, the open below
        // fails anyway.
        let commit_limit = if opts.cluster_of_one {
            u64::MAX
        } else {
            wal::read_meta(&dir)?.commit_index
        };
        let mut unapplied = Unapplied::default();
        let (wal, recovery) = Wal::open(
            &dir,
            wal_opts,
            |part| {
                let mut db = db.borrow_mut();
                match part {
                    SnapshotPart::Header { index, .. } => db.set_applied(index),
                    SnapshotPart::Database { db: d, count } => db.reserve(d, count),
                    SnapshotPart::Item(it) => {
                        let d = it.db;
                        if !db.load(it) {
                            too_few(Some(d), "the snapshot".into());
                        }
                    }
                    // Each database's expiry index is built in one go (`db/snapshot.rs`).
                    SnapshotPart::End => db.finish_load(),
                }
            },
            |e| {
                // Decoded once, straight from the log's buffer; a payload that does not
                // decode is reported by the log as corruption at its file and offset.
                let command = Command::decode(e.payload)?;
                let index = e.index;
                if index > commit_limit {
                    unapplied.entries.push_back((index, command));
                    return Ok(());
                }
                let entry_db = command.db;
                // Dispatch checks every index against the same count, so only a log
                // written with more databases makes an entry fail this way.
                if db.borrow_mut().apply(index, command) == OpResult::Error(ERR_DB_RANGE) {
                    let d = (entry_db >= databases).then_some(entry_db);
                    too_few(d, format!("log entry {index}"));
                }
                Ok(())
            },
        )?;
        if let Some(e) = beyond.into_inner() {
            return Err(e);
        }
        let db = db.into_inner();
        let queue = Queue {
            next_index: recovery.last_index + 1,
            ..Queue::default()
        };
        let (hints_tx, hints_rx) = crossbeam_channel::bounded(4096);
        let cluster_of_one = opts.cluster_of_one;
        let fsync_clock = wal.fsync_clock();
        let inner = Arc::new(Inner {
            dir,
            epoch: AtomicU64::new(recovery.last_epoch),
            opts,
            db: Mutex::new(db),
            queue: Mutex::new(queue),
            unapplied: Mutex::new(unapplied),
            applied: Condvar::new(),
            replicator: std::sync::OnceLock::new(),
            expiring: AtomicBool::new(cluster_of_one),
            wal: Mutex::new(wal),
            failed: std::sync::OnceLock::new(),
            compacting: AtomicBool::new(false),
            snapshot_ids: AtomicU64::new(1),
            pruned: AtomicU64::new(0),
            last_batch_writers: AtomicU64::new(0),
            last_fsync_nanos: AtomicU64::new(0),
            fsync_clock,
            writer: std::sync::OnceLock::new(),
            expiry_hints: hints_tx,
            watches: Watches::default(),
            stats: Stats::default(),
            meta: Mutex::new(recovery.meta),
            recovery,
            #[cfg(test)]
            fail_next_sync: AtomicBool::new(false),
            #[cfg(test)]
            panic_next_flush: AtomicBool::new(false),
            #[cfg(test)]
            compaction_gate: tests::Gate::default(),
        });
        if inner.opts.fsync == FsyncPolicy::Always {
            let weak = Arc::downgrade(&inner);
            let handle = thread::Builder::new()
                .name("log-writer".into())
                .spawn(move || log_writer(weak))
                .map_err(|e| StoreError::WriteFailed(format!("cannot start log writer: {e}")))?;
            let _ = inner.writer.set(handle.thread().clone());
        }
        if inner.opts.active_expiry {
            let weak = Arc::downgrade(&inner);
            thread::Builder::new()
                .name("expirer".into())
                .spawn(move || expirer(weak, hints_rx))
                .map_err(|e| StoreError::WriteFailed(format!("cannot start expirer: {e}")))?;
        }
        {
            let weak = Arc::downgrade(&inner);
            thread::Builder::new()
                .name("log-upkeep".into())
                .spawn(move || log_upkeep(weak))
                .map_err(|e| StoreError::WriteFailed(format!("cannot start fsync thread: {e}")))?;
        }
        let store = Store { inner };
        // Everything recovered is on disk (recovery fsync'd the last segment): record it,
        // so that this much of the log is known to exist from now on.
        store.persist_meta()?;
        Ok(store)
    }

    /// The store's clock (Unix ms): what "now" means for expiry.
    pub fn now_ms(&self) -> u64 {
        self.inner.opts.clock.now_ms()
    }

    /// Tells the expirer that a reader found `key` of database `db` expired (lazy expiry).
    /// Never blocks: if the expirer is behind, the hint is dropped and its own sweep finds
    /// the key.
    pub fn note_expired(&self, db: u32, key: &[u8]) {
        let _ = self.inner.expiry_hints.try_send((db, key.to_vec()));
    }

    /// One expiry cycle, as the leader runs it: in every database, logs the deletion of
    /// keys whose deadline has passed (at most [`EXPIRE_BATCH`] per entry, for at most
    /// [`EXPIRE_CYCLE`]), and of `hinted` keys (database, key) still expired. Returns how
    /// many keys were deleted. The background expirer calls this ten times a second;
    /// tests call it directly under a fake clock.
    pub fn expire_due(&self, hinted: &[(u32, Vec<u8>)]) -> Result<usize, StoreError> {
        let started = std::time::Instant::now();
        let mut deleted = 0;
        let mut hinted = hinted;
        loop {
            let now = self.now_ms();
            // One EXPIRED entry per database with keys to delete.
            let batches: Vec<(u32, Vec<Vec<u8>>)> = self.read_all(|db| {
                (0u32..)
                    .zip(db.keyspaces())
                    .filter_map(|(d, ks)| {
                        let mut keys = ks.due(now, EXPIRE_BATCH);
                        keys.extend(
                            hinted
                                .iter()
                                .filter(|(hd, k)| *hd == d && ks.is_expired(k, now))
                                .map(|(_, k)| k.clone()),
                        );
                        (!keys.is_empty()).then_some((d, keys))
                    })
                    .collect()
            });
            hinted = &[];
            if batches.is_empty() {
                return Ok(deleted);
            }
            let full = batches.iter().any(|(_, keys)| keys.len() >= EXPIRE_BATCH);
            for (d, keys) in batches {
                let mut args = Vec::with_capacity(keys.len() + 1);
                args.push(b"EXPIRED".to_vec());
                args.extend(keys);
                if let Some(OpResult::Int(n)) = self.write(d, vec![Op::Cmd { args }])?.first() {
                    deleted += *n as usize;
                }
            }
            // Bounded work per cycle: a million keys expiring at once are deleted over
            // many cycles, never in one long pause.
            if !full || started.elapsed() >= EXPIRE_CYCLE {
                return Ok(deleted);
            }
        }
    }

    /// What recovery found when the store was opened.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.inner.recovery
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub fn options(&self) -> &Options {
        &self.inner.opts
    }

    /// Runs `f` on database `db` with the map locked (for reads spanning several keys).
    /// A database that does not exist reads as empty.
    pub fn read<R>(&self, db: u32, f: impl FnOnce(&Keyspace) -> R) -> R {
        f(self.inner.db.lock().keyspace(db))
    }

    /// How long the fsync of the log now under way has been running (`None`: none is).
    /// A health check's question: is the log writer stuck on the disk
    /// (`src/sdnotify.rs`)?
    pub fn fsync_in_progress(&self) -> Option<Duration> {
        self.inner.fsync_clock.in_progress()
    }

    /// Runs `f` on every database with the map locked (INFO, the expirer).
    pub fn read_all<R>(&self, f: impl FnOnce(&Db) -> R) -> R {
        f(&self.inner.db.lock())
    }

    /// Whether the map's lock could be taken within `wait` (and was let go at once):
    /// the watchdog's check that no one holds it for long (`src/sdnotify.rs`).
    pub fn map_lock_free_within(&self, wait: Duration) -> bool {
        self.inner.db.try_lock_for(wait).is_some()
    }

    /// How many databases there are (`--databases`).
    pub fn databases(&self) -> u32 {
        self.inner.opts.databases.max(1)
    }

    /// The value of `key` in database 0, or `None` if missing or expired.
    pub fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let now = self.now_ms();
        self.read(0, |db| db.get(key, now).map(|i| i.value.to_vec()))
    }

    /// Sets `key` to `value` in database 0 (no expiry), durably as the fsync policy says.
    pub fn set(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.write_one(Op::Set {
            key: key.to_vec(),
            value: value.to_vec(),
            expiry: Expiry::Never,
            condition: Condition::Always,
            get: false,
        })
        .map(|_| ())
    }

    /// Deletes keys of database 0; returns how many existed.
    pub fn del(&self, keys: &[&[u8]]) -> Result<i64, StoreError> {
        match self.write_one(Op::Del {
            keys: keys.iter().map(|k| k.to_vec()).collect(),
        })? {
            OpResult::Int(n) => Ok(n),
            _ => Ok(0),
        }
    }

    /// Adds `delta` to the integer at `key` in database 0 (missing = 0).
    pub fn incr_by(&self, key: &[u8], delta: i64) -> Result<Result<i64, &'static str>, StoreError> {
        Ok(
            match self.write_one(Op::IncrBy {
                key: key.to_vec(),
                delta,
            })? {
                OpResult::Int(n) => Ok(n),
                OpResult::Error(e) => Err(e),
                _ => Err(ERR_NOT_INTEGER),
            },
        )
    }

    /// Number of keys, in every database.
    pub fn len(&self) -> usize {
        self.read_all(|db| db.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn write_one(&self, op: Op) -> Result<OpResult, StoreError> {
        let mut r = self.write(0, vec![op])?;
        Ok(r.pop().unwrap_or(OpResult::Ok))
    }

    /// Logs `ops` as consecutive entries in database `db`, waits until they are committed
    /// (written, and fsync'd under `--fsync always`) and applied, and returns one result
    /// per op.
    pub fn write(&self, db: u32, ops: Vec<Op>) -> Result<Vec<OpResult>, StoreError> {
        self.write_guarded(db, ops, None)
    }

    /// [`Store::write`] with [`Store::submit_guarded`]'s WATCH check.
    fn write_guarded(
        &self,
        db: u32,
        ops: Vec<Op>,
        exec_of: Option<u64>,
    ) -> Result<Vec<OpResult>, StoreError> {
        let slot = Arc::new(Mutex::new(None));
        let me = thread::current();
        let filled = slot.clone();
        self.submit_guarded(
            db,
            ops,
            exec_of,
            Box::new(move |r| {
                *filled.lock() = Some(r);
                me.unpark();
            }),
        );
        loop {
            if let Some(r) = slot.lock().take() {
                return r;
            }
            thread::park();
        }
    }

    /// Logs `ops` as consecutive entries in database `db` and calls `done` once they are
    /// committed and applied, with one result per op, in submission order. (A
    /// connection's pipelined writes share a database: a batch is submitted before a
    /// command that is not a write, such as SELECT, runs.)
    ///
    /// Every write takes this one path: queue (which fixes the log order) → append, synced
    /// as `--fsync` asks → commit (a cluster of one: that append; a cluster: what its node
    /// decides) → apply in log order → `done`. Who carries the queue to the log depends
    /// only on whether there is an fsync to share: under `always` the log writer thread
    /// commits whole batches with one fsync, so `done` runs there, later, and the caller
    /// need not wait; under `everysec` and `no` an append is one short `write()`, which
    /// the caller makes itself (cheaper than handing it to another thread and back), so
    /// on a cluster of one `done` has run when this returns.
    pub fn submit(&self, db: u32, ops: Vec<Op>, done: Done) {
        self.submit_guarded(db, ops, None, done)
    }

    /// [`Store::submit`], but when `exec_of` names a client, the ops are logged only if no
    /// key that client WATCHes has changed; otherwise nothing is logged and `done` gets
    /// `[OpResult::Aborted]`. The check is made under the queue lock that fixes log order
    /// (see `src/watch.rs`), so it holds exactly at the ops' place in the log.
    fn submit_guarded(&self, db: u32, ops: Vec<Op>, exec_of: Option<u64>, done: Done) {
        if ops.is_empty() {
            done(Ok(Vec::new()));
            return;
        }
        if let Some(why) = self.inner.failed.get() {
            done(Err(StoreError::WriteFailed(why.clone())));
            return;
        }
        // Taken before queueing, so that the queue this caller flushes holds its own
        // entries only, and its `done` runs here rather than on another writer's thread.
        let wal = (self.inner.opts.fsync != FsyncPolicy::Always).then(|| self.inner.wal.lock());
        let ts_ms = self.now_ms();
        let epoch = self.inner.epoch.load(Ordering::Relaxed);
        let refused = {
            let mut guard = self.inner.queue.lock();
            let q = &mut *guard;
            if !self.inner.watches.on_queue(db, &ops, exec_of, ts_ms) {
                drop(guard);
                drop(wal);
                done(Ok(vec![OpResult::Aborted]));
                return;
            }
            let n = ops.len();
            let mark = q.buf.mark();
            let first = q.next_index;
            let mut refused = None;
            for (i, op) in ops.into_iter().enumerate() {
                let index = first + i as u64;
                let command = Command { ts_ms, db, op };
                if let Err(e) = q.buf.push_with(index, epoch, |out| command.encode(out)) {
                    // Refused before anything of this submission was logged.
                    q.buf.rollback(mark);
                    q.entries.truncate(q.entries.len() - i);
                    refused = Some(e);
                    break;
                }
                q.entries.push((index, command));
            }
            match refused {
                Some(e) => Err((e, done)),
                None => {
                    q.next_index = first + n as u64;
                    q.waiters.push(Waiter {
                        done,
                        first,
                        last: first + n as u64 - 1,
                    });
                    Ok(())
                }
            }
        };
        if let Err((e, done)) = refused {
            drop(wal);
            done(Err(StoreError::TooLarge(e)));
            return;
        }
        match wal {
            Some(mut wal) => {
                let deliveries = self.flush(&mut wal);
                drop(wal);
                drop(deliveries);
            }
            None => {
                if let Some(w) = self.inner.writer.get() {
                    w.unpark();
                }
            }
        }
    }

    /// WATCH: from now on, a write queued to any of `keys` makes `client`'s next
    /// [`Store::exec`] abort. Returns once every write queued before the call is applied,
    /// so that what the client reads next is not older than its WATCH (the state its
    /// EXEC is checked against).
    pub fn watch(&self, client: u64, db: u32, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        // Registered first, then the barrier: a write queued after the registration marks
        // the client dirty; one queued before is applied by the time the barrier returns,
        // so the state read below is the state at the registration.
        self.inner.watches.watch(client, db, keys);
        // Every write whose queueing did not see the registration is in the log once
        // this flush is done, at an index up to `queued`.
        let queued = {
            let mut wal = self.inner.wal.lock();
            let deliveries = self.flush(&mut wal);
            let last = LogStore::last(&*wal).0;
            drop(wal);
            drop(deliveries);
            self.sync_member();
            last
        };
        if let Some(why) = self.inner.failed.get() {
            return Err(StoreError::WriteFailed(why.clone()));
        }
        let mut db = self.inner.db.lock();
        // On a cluster of one the flush applied them. A member's are applied when the
        // cluster commits them: read before that, the state would miss a write that
        // queued ahead of the registration (so marked nobody) and would still land
        // before the EXEC: a lost update, found by tests/nemesis.rs.
        if self.inner.replicator.get().is_some() {
            let deadline = std::time::Instant::now() + WATCH_COMMIT_WAIT;
            while db.applied_index() < queued {
                if self.inner.applied.wait_until(&mut db, deadline).timed_out()
                    && db.applied_index() < queued
                {
                    drop(db);
                    // An EXEC after a failed WATCH must not pass on a state nobody read.
                    self.inner.watches.spoil(client);
                    return Err(StoreError::Redirect(
                        "CLUSTERDOWN the writes before this WATCH did not commit in time \
                         (this node may have lost its majority): retry"
                            .to_string(),
                    ));
                }
            }
        }
        let now = self.now_ms();
        self.inner
            .watches
            .settle(client, |d, k| match db.keyspace(d).get(k, now) {
                Some(item) => KeyState::Present {
                    deadline: item.expire_at,
                },
                // A missing key and one already expired are alike: deleting either changes
                // nothing a client can see (Redis's "stale keys" rule).
                None => KeyState::Absent,
            });
        Ok(())
    }

    /// Number of WATCHed (client, key) pairs.
    pub fn watched_keys(&self) -> usize {
        self.inner.watches.len()
    }

    /// UNWATCH (also after EXEC and DISCARD, and when a connection closes).
    pub fn unwatch(&self, client: u64) {
        self.inner.watches.unwatch(client);
    }

    /// EXEC: logs `op` (a transaction) as one entry, unless a key `client` WATCHes
    /// changed since its WATCH: then logs nothing and returns `None`. Blocks until the
    /// entry is committed and applied. Clears the client's watches either way.
    pub fn exec(&self, client: u64, op: Op) -> Result<Option<OpResult>, StoreError> {
        let r = if matches!(&op, Op::Multi { ops } if ops.is_empty()) {
            // Nothing to log (an empty transaction, or one of commands that read no key):
            // the watch check alone, at the current end of the log order.
            let now = self.now_ms();
            let q = self.inner.queue.lock();
            let ok = self.inner.watches.on_queue(0, &[], Some(client), now);
            drop(q);
            Ok(vec![if ok {
                OpResult::Multi(Vec::new())
            } else {
                OpResult::Aborted
            }])
        } else {
            // The transaction's ops each name their database; the entry's own is unused.
            self.write_guarded(0, vec![op], Some(client))
        };
        self.unwatch(client);
        match r?.pop() {
            Some(OpResult::Aborted) => Ok(None),
            Some(r) => Ok(Some(r)),
            None => Ok(Some(OpResult::Multi(Vec::new()))),
        }
    }

    /// Group commit's batching delay (PostgreSQL's `commit_delay`, made adaptive): when
    /// the last fsync covered several writers, they are likely about to send their next
    /// writes, so the new flusher lets them run and join the batch (for at most half an
    /// fsync's time, or until as many writers as last time are queued) rather than pay a
    /// whole fsync for the one or two that happened to arrive first. A lone writer never
    /// waits.
    fn linger(&self) {
        let inner = &*self.inner;
        let want = inner.last_batch_writers.load(Ordering::Relaxed) as usize;
        if want <= 1 {
            return;
        }
        // A cluster member's writers wait for their commit (a follower's round trip and
        // fsync), not for this node's fsync: they come back later, all at once, as their
        // batch commits.
        let budget = if inner.replicator.get().is_some() {
            Duration::from_millis(2)
        } else {
            Duration::from_nanos(inner.last_fsync_nanos.load(Ordering::Relaxed) / 2)
                .min(Duration::from_millis(2))
        };
        let start = std::time::Instant::now();
        while inner.queue.lock().waiters.len() < want && start.elapsed() < budget {
            // Sleep rather than spin: on a small machine the writers we wait for need
            // this core.
            thread::park_timeout(Duration::from_micros(20));
        }
    }

    /// Appends everything queued (synced as `--fsync` asks), then commits and applies it
    /// if this is a cluster of one. Called with the writer held. Returns the answers for
    /// the caller to deliver once it has let the writer go.
    fn flush(&self, wal: &mut Wal) -> Deliveries {
        let inner = &*self.inner;
        let (mut buf, entries, waiters) = {
            let mut q = inner.queue.lock();
            if q.entries.is_empty() {
                return Deliveries::default();
            }
            (
                std::mem::take(&mut q.buf),
                std::mem::take(&mut q.entries),
                std::mem::take(&mut q.waiters),
            )
        };
        // From here on every waiter gets an answer, even if this thread panics.
        let mut waiting = Deliveries(waiters.into_iter().map(|w| (w, None)).collect());
        #[cfg(test)]
        if inner.panic_next_flush.swap(false, Ordering::Relaxed) {
            panic!("injected panic in the log writer");
        }
        if let Some(rep) = inner.replicator.get() {
            return self.flush_member(wal, rep.as_ref(), entries, waiting);
        }
        let last = entries.last().map_or(0, |e| e.0);
        let started = std::time::Instant::now();
        let res = match inner.failed.get() {
            Some(why) => Err(why.clone()),
            None => wal.append(&mut buf).map_err(|e| e.to_string()),
        };
        let took = started.elapsed();
        inner
            .last_fsync_nanos
            .store(took.as_nanos() as u64, Ordering::Relaxed);
        if inner.opts.fsync == FsyncPolicy::Always {
            inner.stats.fsync_time.record(took);
        }
        inner
            .last_batch_writers
            .store(waiting.0.len() as u64, Ordering::Relaxed);
        let deliveries = match res {
            Ok(()) => {
                inner.stats.commits.fetch_add(1, Ordering::Relaxed);
                inner
                    .stats
                    .entries_written
                    .fetch_add(entries.len() as u64, Ordering::Relaxed);
                if inner.opts.fsync == FsyncPolicy::Always {
                    inner.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
                }
                {
                    let mut u = inner.unapplied.lock();
                    u.entries.extend(entries);
                    u.waiters
                        .extend(std::mem::take(&mut waiting.0).into_iter().map(|(w, _)| w));
                }
                if inner.opts.cluster_of_one {
                    // A cluster of one commits what it has appended: the append was as
                    // durable as `--fsync` asks.
                    let (deliveries, live_bytes) = self.apply_committed(last);
                    self.maybe_compact(wal, live_bytes);
                    deliveries
                } else {
                    Deliveries::default()
                }
            }
            Err(why) => {
                log::error!("{}", StoreError::WriteFailed(why.clone()));
                let _ = inner.failed.set(why.clone());
                for (_, outcome) in &mut waiting.0 {
                    *outcome = Some(Err(Failure::Log(why.clone())));
                }
                waiting
            }
        };
        // Give the buffer's capacity back to the queue, so the next batch does not grow a
        // new one from nothing.
        buf.clear();
        let mut q = inner.queue.lock();
        if q.buf.is_empty() && q.buf.capacity() < buf.capacity() {
            std::mem::swap(&mut q.buf, &mut buf);
        }
        deliveries
    }

    /// A cluster member's flush: the replicator appends the batch if this node may take
    /// writes now (it leads, and its node accepts the proposal), and says otherwise
    /// before anything is logged. The commands wait in `unapplied` for their commit.
    fn flush_member(
        &self,
        wal: &mut Wal,
        rep: &dyn Replicator,
        entries: Vec<(u64, Command)>,
        mut waiting: Deliveries,
    ) -> Deliveries {
        let inner = &*self.inner;
        if let Some(why) = inner.failed.get() {
            for (_, outcome) in &mut waiting.0 {
                *outcome = Some(Err(Failure::Log(why.clone())));
            }
            return waiting;
        }
        // The node appends at the end of the log: the indexes given at queueing were
        // provisional (the log also takes entries from the leader and the node's own
        // no-op), so they are given again here, in queue order.
        inner
            .last_batch_writers
            .store(waiting.0.len() as u64, Ordering::Relaxed);
        let first = LogStore::last(&*wal).0 + 1;
        let payloads: Vec<Vec<u8>> = entries
            .iter()
            .map(|(_, c)| {
                let mut p = Vec::new();
                c.encode(&mut p);
                p
            })
            .collect();
        let count = entries.len() as u64;
        let mut at = first;
        for (w, _) in &mut waiting.0 {
            let n = w.last - w.first;
            w.first = at;
            w.last = at + n;
            at += n + 1;
        }
        {
            // Queued for apply before the proposal, so that a commit decided while it is
            // made finds them.
            let mut u = inner.unapplied.lock();
            u.entries
                .extend((first..).zip(entries.into_iter().map(|(_, c)| c)));
            u.waiters
                .extend(std::mem::take(&mut waiting.0).into_iter().map(|(w, _)| w));
        }
        let mut log = MemberLog { store: self, wal };
        let outcome = rep.propose(&mut log, payloads);
        match outcome {
            Ok(f) if f == first => {
                inner.stats.commits.fetch_add(1, Ordering::Relaxed);
                inner
                    .stats
                    .entries_written
                    .fetch_add(count, Ordering::Relaxed);
                Deliveries::default()
            }
            other => {
                // Nothing was appended (or, on an internal mismatch, the log stops): take
                // the batch back out and tell its submitters.
                let failure = match other {
                    Err(StoreError::Redirect(reply)) => Failure::Redirect(reply),
                    Err(e) => {
                        let why = e.to_string();
                        log::error!("{}", StoreError::WriteFailed(why.clone()));
                        let _ = inner.failed.set(why.clone());
                        // The node sends a proposal to the followers before its own
                        // append: a new leader may still commit it.
                        Failure::Unknown(why)
                    }
                    Ok(f) => {
                        let why = format!(
                            "the node appended the batch at index {f}, not {first} (a bug)"
                        );
                        log::error!("{why}");
                        let _ = inner.failed.set(why.clone());
                        Failure::Log(why)
                    }
                };
                let mut u = inner.unapplied.lock();
                let keep = u.entries.partition_point(|e| e.0 < first);
                u.entries.truncate(keep);
                let keep = u.waiters.partition_point(|w| w.first < first);
                Deliveries(
                    u.waiters
                        .drain(keep..)
                        .map(|w| (w, Some(Err(failure.clone()))))
                        .collect(),
                )
            }
        }
    }

    /// Makes this store a cluster member's: from now on client writes are appended only
    /// through `rep` (see [`Replicator`]). Set once, before any write; later calls are
    /// ignored.
    pub fn set_replicator(&self, rep: Arc<dyn Replicator>) {
        let _ = self.inner.replicator.set(rep);
    }

    /// Runs `f` with the log locked: the cluster driver's access to the log and the
    /// store's member operations ([`MemberLog`]). Writes queued meanwhile wait.
    pub fn with_log<R>(&self, f: impl FnOnce(&mut MemberLog<'_>) -> R) -> R {
        let mut wal = self.inner.wal.lock();
        // A compaction that finished since removed segments: the node must see the log as
        // the directory has it (its new start, its snapshot) before it reads entries to
        // replicate, or it would look for them in files no longer there.
        let pruned = self.inner.pruned.swap(0, Ordering::Relaxed);
        if pruned > 0 {
            wal.note_pruned(pruned);
        }
        let r = f(&mut MemberLog {
            store: self,
            wal: &mut wal,
        });
        drop(wal);
        // Writes queued while the driver held the log are flushed by their own thread
        // (everysec/no) or by the log writer (always), which may have found the log
        // taken: wake it.
        if let Some(w) = self.inner.writer.get() {
            w.unpark();
        }
        r
    }

    /// Switches the expirer on (leading) or off (following: only the leader expires keys,
    /// as log entries).
    pub fn set_expiring(&self, on: bool) {
        self.inner.expiring.store(on, Ordering::Relaxed);
    }

    /// Applies, in log order, every entry in the log up to `commit` not applied yet, and
    /// returns the answers of the submitters whose entries are now all applied (to deliver
    /// outside any lock), with the live data size for the compaction check.
    fn apply_committed(&self, commit: u64) -> (Deliveries, u64) {
        let inner = &*self.inner;
        let mut u = inner.unapplied.lock();
        let n = u.entries.partition_point(|e| e.0 <= commit);
        let Some(base) = u.entries.front().map(|e| e.0).filter(|_| n > 0) else {
            return (Deliveries::default(), 0);
        };
        let answered = u.waiters.partition_point(|w| w.last <= commit);
        let mut deliveries = Deliveries(u.waiters.drain(..answered).map(|w| (w, None)).collect());
        let mut results = Vec::with_capacity(n);
        let live_bytes = {
            let mut db = inner.db.lock();
            let (a, b) = u.entries.as_slices();
            db.touch(&a[..n.min(a.len())]);
            db.touch(&b[..n.saturating_sub(a.len())]);
            for (index, command) in u.entries.drain(..n) {
                results.push(db.apply(index, command));
            }
            db.live_bytes()
        };
        inner.applied.notify_all();
        drop(u);
        // Entries with no submitter here (recovered, or a leader's) have their results
        // dropped.
        let mut results = results.into_iter();
        let mut at = base;
        for (w, outcome) in &mut deliveries.0 {
            if w.first > at {
                results.nth((w.first - at - 1) as usize);
            }
            let k = (w.last + 1 - w.first) as usize;
            *outcome = Some(Ok(results.by_ref().take(k).collect()));
            at = w.last + 1;
        }
        (deliveries, live_bytes)
    }

    /// A cluster member's node has decided that every entry up to `index` is committed:
    /// applies them in log order and answers their submitters. (A cluster of one commits
    /// on its own and never needs this.)
    pub fn commit_to(&self, index: u64) {
        let (deliveries, _) = self.apply_committed(index);
        drop(deliveries);
    }

    /// Under `--fsync always`, a cluster member's flusher leaves its batch unsynced
    /// ([`Replicator::propose`]) and makes it durable here, once it has let the log go:
    /// the node thread takes the followers' acks meanwhile, so a commit waits for the
    /// slower of the leader's fsync and the majority's, not for two fsyncs in a row.
    fn sync_member(&self) {
        let inner = &*self.inner;
        let Some(rep) = inner.replicator.get() else {
            return;
        };
        if inner.opts.fsync != FsyncPolicy::Always || inner.failed.get().is_some() {
            return;
        }
        let Some(handle) = inner.wal.lock().take_sync_handle() else {
            return;
        };
        let started = std::time::Instant::now();
        let res = handle.sync_data();
        let took = started.elapsed();
        inner
            .last_fsync_nanos
            .store(took.as_nanos() as u64, Ordering::Relaxed);
        inner.stats.fsync_time.record(took);
        match res {
            Ok(()) => {
                inner.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
                self.with_log(|log| {
                    log.wal.synced(&handle);
                    rep.persisted(log);
                });
            }
            Err(e) => {
                let why = format!("fsync of the log failed: {e}");
                log::error!("{}", StoreError::WriteFailed(why.clone()));
                // Under the log lock, so no later write sees the log as healthy. The
                // batch went to the followers before it was written here, so whether
                // it commits is not ours to say.
                self.with_log(|log| {
                    log.wal.sync_failed();
                    let _ = inner.failed.set(why.clone());
                    log.fail_waiting(&why);
                });
            }
        }
    }

    /// Answers every submitter still waiting for its entries to commit with `why` (their
    /// outcome is unknown: the log stopped taking writes).
    fn fail_unapplied(&self, why: &str) {
        let waiters = std::mem::take(&mut self.inner.unapplied.lock().waiters);
        drop(Deliveries(
            waiters
                .into_iter()
                .map(|w| (w, Some(Err(Failure::Log(why.to_string())))))
                .collect(),
        ));
    }

    fn maybe_compact(&self, wal: &mut Wal, live_bytes: u64) {
        let o = &self.inner.opts;
        // A compaction that finished since the append freed segments: count them first,
        // or a second compaction would start on a log that is already small.
        let pruned = self.inner.pruned.swap(0, Ordering::Relaxed);
        if pruned > 0 {
            wal.note_pruned(pruned);
        }
        let log_bytes = wal.log_bytes();
        if log_bytes < o.compact_min_bytes
            || log_bytes.saturating_mul(100) < live_bytes.saturating_mul(o.compact_percentage)
            || self.inner.compacting.swap(true, Ordering::AcqRel)
        {
            return;
        }
        if let Err(e) = self.start_compaction(wal) {
            log::error!("compaction failed: {e}");
            self.inner.compacting.store(false, Ordering::Release);
        }
    }

    /// Rolls to a new segment at the applied index, switches on tracking in every
    /// non-empty database (module doc, "Compaction": O(databases) under the map lock, no
    /// copy) and starts a background thread that streams the snapshot and prunes the old
    /// segments.
    fn start_compaction(&self, wal: &mut Wal) -> Result<(), WalError> {
        // The snapshot is of the applied state; entries logged after it (not committed
        // yet, on a cluster member) stay in the segments, which are pruned only where
        // the snapshot covers them whole.
        wal.roll(wal.last_index() + 1)?;
        let id = self.inner.snapshot_ids.fetch_add(1, Ordering::Relaxed);
        // Per non-empty database, its index and its key count at `index` (expired keys not
        // yet removed included: they are in the map, and replay expects them).
        let (index, counts) = {
            let mut db = self.inner.db.lock();
            (
                db.applied_index(),
                db.start_tracking(|d| snapshot_tag(id, d)),
            )
        };
        // The snapshot carries the epoch of the entry at its index, as the log it replaces
        // did (a cluster's log matching compares it with the leader's); the current epoch
        // only if the log cannot say.
        let epoch = match LogStore::epoch_at(&*wal, index) {
            Ok(Some(e)) => e,
            _ => self.inner.epoch.load(Ordering::Relaxed),
        };
        log::info!(
            "compacting: log is {} bytes, snapshotting {} keys at index {index}",
            wal.log_bytes(),
            counts.iter().map(|(_, n)| n).sum::<u64>()
        );
        let inner = self.inner.clone();
        let spawned = thread::Builder::new()
            .name("compaction".into())
            .spawn(move || {
                lower_priority();
                let outcome = write_snapshot(&inner, index, epoch, id, &counts)
                    .and_then(|bytes| Ok((bytes, Wal::prune_covered(&inner.dir, index)?)));
                match outcome {
                    Ok((bytes, freed)) => {
                        inner.pruned.fetch_add(freed, Ordering::Relaxed);
                        inner.stats.compactions.fetch_add(1, Ordering::Relaxed);
                        inner
                            .stats
                            .last_compaction_ok
                            .store(true, Ordering::Relaxed);
                        inner
                            .stats
                            .last_save_unix
                            .store(now_ms() / 1000, Ordering::Relaxed);
                        log::info!(
                            "compaction done: snapshot of {bytes} bytes at index {index}, \
                             {freed} bytes of log removed"
                        );
                    }
                    Err(e) => {
                        end_tracking(&inner, id);
                        inner
                            .stats
                            .last_compaction_ok
                            .store(false, Ordering::Relaxed);
                        log::error!("compaction failed (the log still holds every write): {e}");
                    }
                }
                #[cfg(test)]
                inner.compaction_gate.disarm();
                inner.compacting.store(false, Ordering::Release);
            });
        if let Err(e) = spawned {
            end_tracking(&self.inner, id);
            return Err(WalError::Io {
                path: self.inner.dir.clone(),
                source: e,
            });
        }
        Ok(())
    }

    /// fsyncs the log now, whatever the policy, and records the commit index (shutdown
    /// calls this).
    pub fn sync(&self) -> Result<(), StoreError> {
        let mut wal = self.inner.wal.lock();
        let deliveries = self.flush(&mut wal);
        let r = wal.sync().map_err(StoreError::from);
        if r.is_ok()
            && let Some(rep) = self.inner.replicator.get()
        {
            rep.persisted(&mut MemberLog {
                store: self,
                wal: &mut wal,
            });
        }
        drop(wal);
        drop(deliveries);
        r?;
        self.persist_meta().map_err(StoreError::from)
    }

    /// The `everysec` fsync, outside the writer lock so appends go on meanwhile.
    fn background_sync(&self) {
        let inner = &*self.inner;
        if inner.opts.fsync != FsyncPolicy::EverySec || inner.failed.get().is_some() {
            return;
        }
        let Some(handle) = inner.wal.lock().take_sync_handle() else {
            return;
        };
        #[cfg(test)]
        let injected = inner.fail_next_sync.swap(false, Ordering::Relaxed);
        #[cfg(not(test))]
        let injected = false;
        let started = std::time::Instant::now();
        let res = if injected {
            Err(std::io::Error::other("injected fsync failure"))
        } else {
            handle.sync_data()
        };
        inner.stats.fsync_time.record(started.elapsed());
        match res {
            Ok(()) => {
                inner.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
                inner.wal.lock().synced(&handle);
            }
            Err(e) => {
                let why = format!("background fsync failed: {e}");
                log::error!("{}", StoreError::WriteFailed(why.clone()));
                // Set under the writer lock, so no write that starts after this sees the
                // log as healthy.
                let mut wal = inner.wal.lock();
                wal.sync_failed();
                let _ = inner.failed.set(why);
            }
        }
    }

    /// Writes the meta file if the log's durable end moved since it was last written.
    fn persist_meta(&self) -> Result<(), WalError> {
        let inner = &*self.inner;
        // The log first, then the meta: the order a cluster driver takes them in
        // (`MemberLog::save_meta`), so the two never wait for each other.
        let mut wal = inner.wal.lock();
        // Committed and on disk: a cluster member may have entries on disk that are not
        // committed, and a cluster of one under `everysec` commits before its fsync.
        let durable = wal.durable_index().min(inner.db.lock().applied_index());
        let mut written = inner.meta.lock();
        if durable <= written.commit_index {
            return Ok(());
        }
        let meta = wal::Meta {
            commit_index: durable,
            epoch: inner.epoch.load(Ordering::Relaxed),
            ..*written
        };
        wal::write_meta(&inner.dir, &meta)?;
        *written = meta;
        // The log's own copy, which its truncation checks against.
        wal.note_meta(meta);
        Ok(())
    }

    /// Blocks until no compaction runs (tests and shutdown).
    pub fn wait_for_compaction(&self) {
        while self.inner.compacting.load(Ordering::Acquire) {
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Log state for INFO.
    /// How long making the log durable has taken (`Stats::fsync_time`).
    pub fn fsync_histogram(&self) -> &crate::metrics::Histogram {
        &self.inner.stats.fsync_time
    }

    pub fn log_info(&self) -> LogInfo {
        let (last_index, log_bytes) = {
            let wal = self.inner.wal.lock();
            (
                wal.last_index(),
                wal.log_bytes()
                    .saturating_sub(self.inner.pruned.load(Ordering::Relaxed)),
            )
        };
        LogInfo {
            fsync: self.inner.opts.fsync,
            last_index,
            log_bytes,
            compacting: self.inner.compacting.load(Ordering::Relaxed),
            compactions: self.inner.stats.compactions.load(Ordering::Relaxed),
            last_save_unix: self.inner.stats.last_save_unix.load(Ordering::Relaxed),
            fsyncs: self.inner.stats.fsyncs.load(Ordering::Relaxed),
            write_error: self.inner.failed.get().cloned(),
            recovery: self.inner.recovery.clone(),
        }
    }

    /// The newest snapshot file in the data directory as (index, epoch, path), if any:
    /// what the cluster driver sends a member behind the log's start.
    pub fn newest_snapshot(&self) -> Result<Option<(u64, u64, PathBuf)>, StoreError> {
        Ok(wal::newest_snapshot(&self.inner.dir)?)
    }

    /// Compacts now, whatever the log's size (SAVE, BGSAVE, BGREWRITEAOF, SHUTDOWN SAVE):
    /// the snapshot covers every write applied so far. Returns `Ok(false)`, doing nothing,
    /// when a compaction is already running. With `wait`, returns once the snapshot is
    /// written and the old segments pruned, and fails if that failed; without, returns
    /// once the background thread has started (the snapshot is of this moment either way).
    pub fn compact_now(&self, wait: bool) -> Result<bool, StoreError> {
        if let Some(why) = self.inner.failed.get() {
            return Err(StoreError::WriteFailed(why.clone()));
        }
        if self.inner.compacting.swap(true, Ordering::AcqRel) {
            return Ok(false);
        }
        {
            // Holding the writer: the map is exactly the log up to its last index.
            let mut wal = self.inner.wal.lock();
            let pruned = self.inner.pruned.swap(0, Ordering::Relaxed);
            if pruned > 0 {
                wal.note_pruned(pruned);
            }
            if let Err(e) = self.start_compaction(&mut wal) {
                self.inner.compacting.store(false, Ordering::Release);
                return Err(e.into());
            }
        }
        if wait {
            // Ours is the only compaction until the flag drops, so the outcome is ours.
            self.wait_for_compaction();
            if !self.inner.stats.last_compaction_ok.load(Ordering::Relaxed) {
                return Err(StoreError::Wal(WalError::Io {
                    path: self.inner.dir.clone(),
                    source: std::io::Error::other(
                        "the snapshot could not be written (see the log)",
                    ),
                }));
            }
        }
        Ok(true)
    }
}

/// Buckets a compaction walks per acquisition of the map lock: the longest it holds the
/// lock at a time is this many buckets' keys (about as many keys: the table keeps one
/// key per bucket or fewer), encoded into a chunk; clients wait for that, never for the
/// whole walk. bench/compaction.sh, 1M keys on 2 cores: with 512 a GET waited up to
/// 13 ms (p99.9 6 ms), with 64 up to 6 ms (p99.9 1.8 ms, Redis's fork: 7 ms and
/// 0.25 ms), for a walk about 40% longer (1.2 s).
const SNAPSHOT_STEP_BUCKETS: usize = 64;
/// ... or until the chunk holds this many bytes (large values), then written out.
const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// Gives the calling thread a lower CPU priority (nice 10; on Linux a thread has its own):
/// a compaction is background work, and on a machine with few cores the clients' threads
/// should get the CPU first when it takes a whole core.
fn lower_priority() {
    // SAFETY: plain system calls on the calling thread's id; failure is harmless.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}

/// The tag under which compaction `id` tracks database `d`'s map, so that the walk can
/// tell that its map is still the one it started on (FLUSHALL, FLUSHDB and SWAPDB put
/// another table in its place).
fn snapshot_tag(id: u64, d: u32) -> u64 {
    (id << 32) | u64::from(d)
}

/// Stops compaction `id`'s tracking wherever it still runs (an aborted snapshot), freeing
/// its pre-images.
fn end_tracking(inner: &Inner, id: u64) {
    inner.db.lock().stop_tracking(|t| t >> 32 == id);
}

/// Why a snapshot was given up: nothing is pruned, the log still holds every write.
fn snapshot_error(inner: &Inner, why: String) -> WalError {
    WalError::Io {
        path: inner.dir.clone(),
        source: std::io::Error::other(why),
    }
}

/// The compaction thread's work: streams the snapshot of the map as it was at `index`
/// (tracking began there, for the databases and key counts in `counts`) to its file.
/// Per database, walks the map a step at a time under the lock, encoding the keys that
/// have not changed since into a chunk, and writes each chunk after releasing the lock;
/// then takes the pre-images of the keys that changed and writes those. Each database
/// must yield exactly its count at `index` (anything else is a bug: give up). A database
/// whose table was replaced meanwhile (FLUSHALL, FLUSHDB, SWAPDB) gives the snapshot up
/// too, as Redis's FLUSHALL kills a running BGSAVE: nothing is lost (the log is
/// complete) and the next compaction finds a small log. Returns the file's size.
fn write_snapshot(
    inner: &Inner,
    index: u64,
    epoch: u64,
    id: u64,
    counts: &[(u32, u64)],
) -> Result<u64, WalError> {
    let total = counts.iter().map(|(_, n)| n).sum();
    let mut out = wal::SnapshotWriter::create(&inner.dir, index, epoch, total)?;
    let mut chunk = wal::SnapshotChunk::default();
    for &(d, count) in counts {
        out.database(d, count)?;
        let tag = snapshot_tag(id, d);
        let mut written = 0u64;
        let preimages = loop {
            let (done, preimages) = {
                let mut db = inner.db.lock();
                if db.keyspace(d).tracking() != Some(tag) {
                    return Err(snapshot_error(
                        inner,
                        format!(
                            "database {d} was flushed or swapped while its snapshot was \
                             being written; a later compaction will write one"
                        ),
                    ));
                }
                let done = db.snapshot_step(d, SNAPSHOT_STEP_BUCKETS, |k, i| {
                    chunk.push(k, &i.value, i.expire_at);
                    chunk.bytes() < SNAPSHOT_CHUNK_BYTES
                });
                // Taking the pre-images is O(1); encoding them waits for the lock's release.
                let preimages = if done { db.end_tracking(d) } else { None };
                // Hand the lock to a waiting client rather than let this thread take it
                // back first (an ordinary unlock lets the releasing thread barge in again,
                // and a reader woken meanwhile waits out several steps).
                MutexGuard::unlock_fair(db);
                (done, preimages)
            };
            written += chunk.keys();
            out.write(&mut chunk)?;
            #[cfg(test)]
            inner.compaction_gate.pass();
            if done {
                break preimages;
            }
        };
        for (k, i) in preimages.into_iter().flatten() {
            chunk.push(&k, &i.value, i.expire_at);
            if chunk.bytes() >= SNAPSHOT_CHUNK_BYTES {
                written += chunk.keys();
                out.write(&mut chunk)?;
            }
        }
        written += chunk.keys();
        out.write(&mut chunk)?;
        if written != count {
            return Err(snapshot_error(
                inner,
                format!(
                    "bug: the snapshot of database {d} at index {index} holds {written} keys, \
                     the database had {count}"
                ),
            ));
        }
    }
    out.finish()
}

/// The log writer (`--fsync always`): waits for queued entries, lets a batch gather
/// (`Store::linger`), appends and fsyncs it once, applies it, then tells each submitter.
/// Exits when the store is dropped.
fn log_writer(inner: Weak<Inner>) {
    loop {
        let Some(inner) = inner.upgrade() else { return };
        if inner.queue.lock().entries.is_empty() {
            drop(inner);
            // Submitters unpark us; the timeout only notices the store going away.
            thread::park_timeout(Duration::from_millis(100));
            continue;
        }
        let store = Store { inner };
        let flushed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            store.linger();
            let mut wal = store.inner.wal.lock();
            let deliveries = store.flush(&mut wal);
            drop(wal);
            drop(deliveries);
            store.sync_member();
        }));
        if flushed.is_err() {
            // The batch's submitters were told by `Deliveries`; whether its entries reached
            // the disk is unknown, so no later write may be acknowledged either. Failing
            // them (rather than letting this thread die) keeps every later writer from
            // waiting forever.
            let why = "the log writer failed unexpectedly (a bug: see the log)".to_string();
            log::error!("{}", StoreError::WriteFailed(why.clone()));
            let _ = store.inner.failed.set(why.clone());
            store.fail_unapplied(&why);
        }
    }
}

/// Keys deleted per EXPIRED log entry.
pub const EXPIRE_BATCH: usize = 256;
/// Longest an expiry cycle may run before yielding to the next tick.
pub const EXPIRE_CYCLE: Duration = Duration::from_millis(25);

/// The active expirer: ten times a second (or sooner when readers report expired keys),
/// run [`Store::expire_due`]. Exits when the store is dropped (the hint channel closes).
fn expirer(inner: Weak<Inner>, hints: crossbeam_channel::Receiver<(u32, Vec<u8>)>) {
    let tick = crossbeam_channel::tick(Duration::from_millis(100));
    loop {
        let mut hinted = Vec::new();
        crossbeam_channel::select! {
            recv(hints) -> k => match k {
                Ok(k) => hinted.push(k),
                Err(_) => return,
            },
            recv(tick) -> _ => {}
        }
        hinted.extend(hints.try_iter().take(EXPIRE_BATCH));
        let Some(inner) = inner.upgrade() else { return };
        if !inner.expiring.load(Ordering::Relaxed) {
            // A follower: the leader's expiry entries delete its keys.
            continue;
        }
        let store = Store { inner };
        if let Err(e) = store.expire_due(&hinted) {
            log::warn!("active expiry: {e}");
        }
    }
}

/// The log's once-a-second upkeep: under `everysec`, fsync the current segment if it has
/// new writes (a failure stops writes, exactly as a failed fsync under `always` does:
/// the kernel may have dropped the dirty pages, so what was acknowledged is in doubt and
/// nothing more may be acknowledged); under every policy, record in the meta file how far
/// the log is known to be on disk, so that a log later found to end before that point
/// (a segment cut short or removed) is refused rather than silently replayed short.
fn log_upkeep(inner: Weak<Inner>) {
    loop {
        thread::sleep(Duration::from_secs(1));
        let Some(inner) = inner.upgrade() else { return };
        let store = Store { inner };
        store.background_sync();
        if let Err(e) = store.persist_meta() {
            log::warn!("cannot record the commit index: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Holds the compaction thread after each step of its walk, once armed, so that a test
    /// can run writes between two steps deterministically (and so shows that the map lock
    /// is free between steps). Each step waits for two sends: the first completes when
    /// the thread has arrived, the second lets it go on. The sender fails once the
    /// compaction is over.
    #[derive(Default)]
    pub(super) struct Gate {
        rx: Mutex<Option<crossbeam_channel::Receiver<()>>>,
    }

    impl Gate {
        pub(super) fn arm(&self) -> crossbeam_channel::Sender<()> {
            let (tx, rx) = crossbeam_channel::bounded(0);
            *self.rx.lock() = Some(rx);
            tx
        }

        pub(super) fn pass(&self) {
            let rx = self.rx.lock().clone();
            if let Some(rx) = rx {
                let _ = rx.recv();
                let _ = rx.recv();
            }
        }

        pub(super) fn disarm(&self) {
            *self.rx.lock() = None;
        }
    }

    fn opts() -> Options {
        Options {
            fsync: FsyncPolicy::No,
            ..Options::default()
        }
    }

    fn set_op(k: &str, v: &str, expiry: Expiry, condition: Condition, get: bool) -> Op {
        Op::Set {
            key: k.into(),
            value: v.into(),
            expiry,
            condition,
            get,
        }
    }

    #[test]
    fn store_recovers_what_it_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), opts()).unwrap();
            s.set(b"a", b"1").unwrap();
            s.set(b"b", b"2").unwrap();
            assert_eq!(s.del(&[b"a", b"x"]).unwrap(), 1);
            assert_eq!(s.incr_by(b"n", 3).unwrap(), Ok(3));
        }
        let s = Store::open(dir.path(), opts()).unwrap();
        assert_eq!(s.get(b"a"), None);
        assert_eq!(s.get(b"b").as_deref(), Some(&b"2"[..]));
        assert_eq!(s.get(b"n").as_deref(), Some(&b"3"[..]));
        assert_eq!(s.recovery().last_index, 4);
    }

    /// A cluster member: nothing is applied or answered until its node says committed,
    /// and recovery applies only what `meta` records as committed.
    #[test]
    fn a_cluster_member_applies_only_what_is_committed() {
        let dir = tempfile::tempdir().unwrap();
        let member = || Options {
            fsync: FsyncPolicy::Always,
            cluster_of_one: false,
            ..Options::default()
        };
        {
            let s = Store::open(dir.path(), member()).unwrap();
            let (tx, rx) = crossbeam_channel::unbounded();
            for (k, v) in [("a", "1"), ("b", "2"), ("c", "3")] {
                let tx = tx.clone();
                s.submit(
                    0,
                    vec![set_op(k, v, Expiry::Never, Condition::Always, false)],
                    Box::new(move |r| {
                        let _ = tx.send(r);
                    }),
                );
            }
            // Appended (the log writer syncs them) but not committed: no answer, no data.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while s.log_info().last_index < 3 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "entries never appended"
                );
                thread::yield_now();
            }
            assert!(rx.try_recv().is_err());
            assert_eq!(s.get(b"a"), None);
            s.commit_to(2);
            assert_eq!(rx.recv().unwrap().unwrap(), vec![OpResult::Ok]);
            assert_eq!(rx.recv().unwrap().unwrap(), vec![OpResult::Ok]);
            assert!(rx.try_recv().is_err());
            assert_eq!(s.get(b"b").as_deref(), Some(&b"2"[..]));
            assert_eq!(s.get(b"c"), None);
            s.sync().unwrap();
        }
        // Meta records index 2 as committed; entry 3 is in the log but waits.
        let s = Store::open(dir.path(), member()).unwrap();
        assert_eq!(s.recovery().last_index, 3);
        assert_eq!(s.get(b"b").as_deref(), Some(&b"2"[..]));
        assert_eq!(s.get(b"c"), None);
        s.commit_to(3);
        assert_eq!(s.get(b"c").as_deref(), Some(&b"3"[..]));
        drop(s);
        // The same log opened as a cluster of one is all its own: everything applies.
        let s = Store::open(dir.path(), opts()).unwrap();
        assert_eq!(s.get(b"c").as_deref(), Some(&b"3"[..]));
    }

    /// A member installs another member's snapshot: the state machine becomes the
    /// snapshot's, the log starts after it, entries the log keeps after it wait for their
    /// commit, and an older snapshot is refused without changing anything.
    #[test]
    fn a_member_installs_a_snapshot_from_another() {
        let dir = tempfile::tempdir().unwrap();
        let member = || Options {
            fsync: FsyncPolicy::No,
            cluster_of_one: false,
            ..Options::default()
        };
        let entry = |index: u64, epoch: u64, k: &str, v: &str| {
            let mut payload = Vec::new();
            Command {
                ts_ms: 1,
                db: 0,
                op: set_op(k, v, Expiry::Never, Condition::Always, false),
            }
            .encode(&mut payload);
            LogEntry {
                index,
                epoch,
                payload,
            }
        };
        let snap = |index: u64, epoch: u64, keys: &[(&str, &str)]| {
            let items: Vec<(&[u8], &[u8], Option<u64>)> = keys
                .iter()
                .map(|(k, v)| (k.as_bytes(), v.as_bytes(), None))
                .collect();
            wal::encode_snapshot(index, epoch, vec![(0, items.into_iter())])
        };
        let s = Store::open(dir.path(), member()).unwrap();
        s.with_log(|l| {
            l.append(&[
                entry(1, 1, "a", "1"),
                entry(2, 1, "b", "2"),
                entry(3, 1, "c", "3"),
            ])
            .unwrap();
            l.commit_to(2);
        });
        assert_eq!(s.get(b"a").as_deref(), Some(&b"1"[..]));
        // A snapshot past the log's end: the log restarts after it.
        s.with_log(|l| {
            l.install_snapshot(5, 2, &snap(5, 2, &[("x", "snap")]))
                .unwrap();
            assert_eq!(l.log().snapshot(), (5, 2));
            assert_eq!(l.log().last(), (5, 2));
            assert_eq!(l.applied_index(), 5);
            // Entry 3 was cut with the rest of the old log: committing applies nothing.
            l.commit_to(5);
        });
        assert_eq!(s.get(b"x").as_deref(), Some(&b"snap"[..]));
        assert_eq!(s.get(b"a"), None);
        assert_eq!(s.get(b"c"), None);
        // Entries after it, and a snapshot in the middle of them that agrees with the log:
        // the entry after it stays and waits for its commit.
        s.with_log(|l| {
            l.append(&[
                entry(6, 2, "d", "6"),
                entry(7, 2, "e", "7"),
                entry(8, 2, "f", "8"),
            ])
            .unwrap();
            l.install_snapshot(7, 2, &snap(7, 2, &[("x", "snap"), ("d", "6"), ("e", "7")]))
                .unwrap();
            assert_eq!(l.log().last(), (8, 2));
            assert_eq!(l.applied_index(), 7);
        });
        assert_eq!(s.get(b"e").as_deref(), Some(&b"7"[..]));
        assert_eq!(s.get(b"f"), None);
        s.commit_to(8);
        assert_eq!(s.get(b"f").as_deref(), Some(&b"8"[..]));
        // An older snapshot, and a damaged one, change nothing.
        s.with_log(|l| {
            assert!(
                l.install_snapshot(5, 2, &snap(5, 2, &[("y", "old")]))
                    .is_err()
            );
            let mut bad = snap(9, 2, &[("y", "bad")]);
            let n = bad.len();
            bad[n - 3] ^= 1;
            assert!(l.install_snapshot(9, 2, &bad).is_err());
            assert!(
                l.install_snapshot(9, 3, &snap(9, 2, &[("y", "other")]))
                    .is_err()
            );
            assert_eq!(l.log().snapshot(), (7, 2));
        });
        assert_eq!(s.get(b"y"), None);
        assert_eq!(s.get(b"f").as_deref(), Some(&b"8"[..]));
        s.sync().unwrap();
        drop(s);
        // Recovery starts from the installed snapshot.
        let s = Store::open(dir.path(), member()).unwrap();
        assert_eq!(s.get(b"e").as_deref(), Some(&b"7"[..]));
        assert_eq!(s.get(b"a"), None);
        s.commit_to(8);
        assert_eq!(s.get(b"f").as_deref(), Some(&b"8"[..]));
    }

    /// Under every policy, a write commits through the same queue and the same apply: its
    /// completion runs once, with its results in order, and the map holds the writes.
    #[test]
    fn every_fsync_policy_commits_on_one_path() {
        for fsync in [FsyncPolicy::Always, FsyncPolicy::EverySec, FsyncPolicy::No] {
            let dir = tempfile::tempdir().unwrap();
            let s = Store::open(
                dir.path(),
                Options {
                    fsync,
                    ..Options::default()
                },
            )
            .unwrap();
            let r = s
                .write(
                    0,
                    vec![
                        set_op("k", "1", Expiry::Never, Condition::Always, false),
                        Op::IncrBy {
                            key: b"k".to_vec(),
                            delta: 2,
                        },
                        set_op("k", "x", Expiry::Never, Condition::IfMissing, false),
                    ],
                )
                .unwrap();
            assert_eq!(
                r,
                vec![OpResult::Ok, OpResult::Int(3), OpResult::NotSet],
                "{fsync}"
            );
            assert_eq!(s.get(b"k").as_deref(), Some(&b"3"[..]), "{fsync}");
            assert_eq!(s.read_all(|db| db.applied_index()), 3, "{fsync}");
        }
    }

    #[test]
    fn a_failed_background_fsync_stops_writes() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(
            dir.path(),
            Options {
                fsync: FsyncPolicy::EverySec,
                ..Options::default()
            },
        )
        .unwrap();
        s.set(b"a", b"1").unwrap();
        s.inner.fail_next_sync.store(true, Ordering::Relaxed);
        s.background_sync();
        // The write acknowledged before is in doubt; nothing more is acknowledged.
        let err = s.set(b"b", b"2").unwrap_err();
        assert!(matches!(err, StoreError::WriteFailed(_)), "{err}");
        assert!(err.to_string().contains("write outcome unknown"), "{err}");
        assert!(s.log_info().write_error.is_some());
        let (tx, rx) = std::sync::mpsc::channel();
        s.submit(
            0,
            vec![Op::Del {
                keys: vec![b"a".to_vec()],
            }],
            Box::new(move |r| tx.send(r.is_err()).unwrap()),
        );
        assert!(rx.recv().unwrap());
        assert_eq!(s.get(b"a").as_deref(), Some(&b"1"[..]));
    }

    #[test]
    fn a_panic_in_the_log_writer_fails_writes_instead_of_hanging() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), Options::default()).unwrap();
        s.set(b"a", b"1").unwrap();
        s.inner.panic_next_flush.store(true, Ordering::Relaxed);
        // The write in the panicking batch, and every later one, gets an answer.
        assert!(s.set(b"b", b"2").is_err());
        for _ in 0..3 {
            let err = s.set(b"c", b"3").unwrap_err();
            assert!(err.to_string().contains("log writer failed"), "{err}");
        }
        assert_eq!(s.get(b"a").as_deref(), Some(&b"1"[..]));
    }

    #[test]
    fn a_transaction_too_large_for_the_log_is_refused_before_logging() {
        let dir = tempfile::tempdir().unwrap();
        for fsync in [FsyncPolicy::Always, FsyncPolicy::No] {
            let s = Store::open(
                dir.path(),
                Options {
                    fsync,
                    ..Options::default()
                },
            )
            .unwrap();
            let before = s.log_info().last_index;
            // Three values of 360 MiB in one entry (MSET, or a transaction): over 1 GiB.
            let v = vec![b'x'; 360 << 20];
            let pairs = (0..3).map(|i| (vec![b'k', i], v.clone())).collect();
            let err = s
                .write(
                    0,
                    vec![
                        Op::Set {
                            key: b"small".to_vec(),
                            value: b"1".to_vec(),
                            expiry: Expiry::Never,
                            condition: Condition::Always,
                            get: false,
                        },
                        Op::MSet {
                            pairs,
                            only_if_none_exist: false,
                        },
                    ],
                )
                .unwrap_err();
            assert!(matches!(err, StoreError::TooLarge(_)), "{err}");
            assert!(err.to_string().contains("too large for the log"), "{err}");
            // Nothing of the submission was logged or applied, and the store goes on.
            assert_eq!(s.get(b"small"), None);
            assert_eq!(s.log_info().last_index, before);
            s.set(b"after", b"ok").unwrap();
            drop(s);
            let s = Store::open(dir.path(), opts()).unwrap();
            assert_eq!(s.get(b"after").as_deref(), Some(&b"ok"[..]));
            assert_eq!(s.get(b"small"), None);
        }
    }

    #[test]
    fn a_log_cut_after_shutdown_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), opts()).unwrap();
            s.set(b"a", b"1").unwrap();
            s.set(b"b", b"2").unwrap();
            s.sync().unwrap();
        }
        let seg = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "log"))
            .unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(16)
            .unwrap();
        let err = Store::open(dir.path(), opts()).unwrap_err();
        assert!(err.to_string().contains("was committed"), "{err}");
    }

    /// The log cannot tell a payload it holds from garbage; the store's replay can, and a
    /// command that does not decode is corruption, named with its file and offset.
    #[test]
    fn a_command_that_does_not_decode_is_corruption() {
        use crate::log::{LogEntry, LogStore};
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), opts()).unwrap();
            s.set(b"a", b"1").unwrap();
        }
        {
            let mut bad = Vec::new();
            Command::noop().encode(&mut bad);
            let code = bad.len() - 1;
            bad[code] = 99;
            let (mut w, _) =
                Wal::open(dir.path(), WalOptions::default(), |_| {}, |_| Ok(())).unwrap();
            // A no-op entry (empty payload) is fine; the next one is not.
            let entries = [
                LogEntry {
                    index: 2,
                    epoch: 0,
                    payload: Vec::new(),
                },
                LogEntry {
                    index: 3,
                    epoch: 0,
                    payload: bad,
                },
            ];
            LogStore::append(&mut w, &entries).unwrap();
        }
        let err = Store::open(dir.path(), opts()).unwrap_err().to_string();
        assert!(err.contains("entry 3: unknown operation code 99"), "{err}");
        assert!(err.contains("byte offset"), "{err}");
    }

    #[test]
    fn concurrent_writers_share_commits_and_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(
            dir.path(),
            Options {
                fsync: FsyncPolicy::Always,
                ..Options::default()
            },
        )
        .unwrap();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let s = s.clone();
                thread::spawn(move || {
                    for i in 0..50 {
                        s.set(format!("t{t}-{i}").as_bytes(), b"v").unwrap();
                        assert_eq!(s.incr_by(b"counter", 1).unwrap().map(|_| ()), Ok(()));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(s.len(), 8 * 50 + 1);
        assert_eq!(s.get(b"counter").as_deref(), Some(&b"400"[..]));
        drop(s);
        let s = Store::open(dir.path(), opts()).unwrap();
        assert_eq!(s.len(), 401);
        assert_eq!(s.get(b"counter").as_deref(), Some(&b"400"[..]));
    }

    #[test]
    fn compaction_keeps_the_data_and_shrinks_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let o = Options {
            fsync: FsyncPolicy::No,
            segment_size: 4096,
            compact_min_bytes: 16 * 1024,
            compact_percentage: 100,
            ..Options::default()
        };
        let s = Store::open(dir.path(), o.clone()).unwrap();
        // Overwrite 10 keys many times: the log grows, the data does not.
        for round in 0..400 {
            for k in 0..10 {
                s.set(format!("k{k}").as_bytes(), format!("v{round}").as_bytes())
                    .unwrap();
            }
            s.wait_for_compaction();
        }
        s.set(b"last", b"x").unwrap();
        s.wait_for_compaction();
        assert!(s.log_info().compactions > 0);
        let dir_bytes: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(dir_bytes < 64 * 1024, "data dir holds {dir_bytes} bytes");
        drop(s);
        let s = Store::open(dir.path(), o).unwrap();
        assert!(s.recovery().snapshot_index.is_some());
        for k in 0..10 {
            assert_eq!(
                s.get(format!("k{k}").as_bytes()).as_deref(),
                Some(&b"v399"[..])
            );
        }
        assert_eq!(s.len(), 11);
    }

    /// The snapshot files (and temp files) in `dir`.
    fn snapshot_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("snapshot-"))
            .collect();
        names.sort();
        names
    }

    /// A snapshot taken while writes run (SET, INCR, APPEND, DEL, PEXPIREAT, PERSIST,
    /// RENAME, new keys: ahead of the walk's cursor and behind it, from the test between
    /// two steps of the walk and from a writer thread throughout) holds exactly the map at
    /// its index, and the log replayed on top of it rebuilds the live state. Between two
    /// steps the compaction holds no lock: the writes run while it is parked there.
    #[test]
    fn a_snapshot_is_the_state_at_its_index_while_writes_run() {
        let dir = tempfile::tempdir().unwrap();
        let o = Options {
            active_expiry: false,
            ..opts()
        };
        let s = Store::open(dir.path(), o.clone()).unwrap();
        let far = now_ms() + 3_600_000;
        let expiry = |i: u64| {
            if i.is_multiple_of(5) {
                Expiry::At(far + i)
            } else {
                Expiry::Never
            }
        };
        for i in 0..4000u64 {
            let op = set_op(
                &format!("k{i}"),
                &format!("v{i}"),
                expiry(i),
                Condition::Always,
                false,
            );
            s.write(0, vec![op]).unwrap();
        }
        for i in 0..300 {
            let op = Op::IncrBy {
                key: format!("n{i}").into(),
                delta: i,
            };
            s.write(0, vec![op]).unwrap();
        }
        for i in 0..1500u64 {
            let op = set_op(&format!("d{i}"), "x", expiry(i), Condition::Always, false);
            s.write(3, vec![op]).unwrap();
        }
        let gate = s.inner.compaction_gate.arm();
        let index = s.log_info().last_index;
        assert!(s.compact_now(false).unwrap());
        // Nothing was written since the compaction started: this is the map at `index`.
        let at_index = s.read_all(contents);
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (s, stop) = (s.clone(), stop.clone());
            thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let incr = Op::IncrBy {
                        key: format!("n{}", i % 300).into(),
                        delta: 1,
                    };
                    s.write(0, vec![incr]).unwrap();
                    let append = cmd(&["APPEND", &format!("d{}", i * 7 % 1600), "+"]);
                    s.write(3, vec![append]).unwrap();
                    i += 1;
                }
            })
        };
        let (mut r, mut steps, mut most_preimages) = (7u64, 0, 0);
        // Each completed send means the compaction is parked between two steps.
        while gate.send(()).is_ok() {
            steps += 1;
            let preimages = s.read_all(|db| {
                db.keyspaces()
                    .iter()
                    .map(|ks| ks.preimages())
                    .sum::<usize>()
            });
            most_preimages = most_preimages.max(preimages);
            for _ in 0..40 {
                r = crate::db::keymap::mix(r);
                let i = r % 4400;
                let k = format!("k{i}");
                let op = match (r >> 32) % 8 {
                    0 => set_op(&k, "new", Expiry::Never, Condition::Always, false),
                    1 => set_op(&k, "nx", Expiry::Never, Condition::IfMissing, false),
                    2 => Op::IncrBy {
                        key: format!("n{}", i % 400).into(),
                        delta: 3,
                    },
                    3 => cmd(&["APPEND", &k, "-tail"]),
                    4 => Op::Del {
                        keys: vec![k.into()],
                    },
                    5 => cmd(&["PEXPIREAT", &k, &(far + r % 1000).to_string()]),
                    6 => cmd(&["PERSIST", &k]),
                    _ => cmd(&["RENAME", &k, &format!("k{}", i + 1)]),
                };
                s.write(0, vec![op]).unwrap();
            }
            let _ = gate.send(());
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        s.wait_for_compaction();
        let info = s.log_info();
        assert_eq!(info.compactions, 1);
        assert!(steps > 10, "the walk went in steps ({steps})");
        assert!(most_preimages > 0, "writes landed ahead of the walk");
        assert!(
            s.read_all(|db| db.keyspaces().iter().all(|ks| ks.tracking().is_none())),
            "tracking ends with the snapshot"
        );
        let path = dir.path().join(format!("snapshot-{index:020}.snap"));
        assert_eq!(
            snapshot_files(dir.path()),
            vec![format!("snapshot-{index:020}.snap")]
        );
        let snap = wal::decode_snapshot(&path, &std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(snap.index, index);
        let mut got: Vec<Contents> = vec![Vec::new(); at_index.len()];
        for it in snap.items {
            got[it.db as usize].push((it.key, it.value, it.expire_at_ms.unwrap_or(0)));
        }
        for c in &mut got {
            c.sort();
        }
        assert!(got == at_index, "the snapshot is not the map at its index");
        let live = s.read_all(contents);
        assert!(live != at_index);
        drop(s);
        let s = Store::open(dir.path(), o).unwrap();
        assert_eq!(s.recovery().snapshot_index, Some(index));
        assert!(
            s.read_all(contents) == live,
            "snapshot + log is not the live state"
        );
        s.read_all(check_invariants);
    }

    /// FLUSHALL, FLUSHDB or SWAPDB while a snapshot walks the database they replace gives
    /// the snapshot up (as Redis's FLUSHALL kills a BGSAVE): no snapshot and no temp file
    /// stays, nothing is pruned, no tracking lingers, a restart rebuilds everything from
    /// the log, and the next compaction succeeds.
    #[test]
    fn replacing_a_table_during_a_snapshot_gives_it_up() {
        for what in [&["FLUSHALL"][..], &["FLUSHDB"], &["SWAPDB", "0", "1"]] {
            let dir = tempfile::tempdir().unwrap();
            let s = Store::open(dir.path(), opts()).unwrap();
            for i in 0..3000 {
                s.set(format!("k{i}").as_bytes(), b"v").unwrap();
            }
            let op = set_op("other", "db1", Expiry::Never, Condition::Always, false);
            s.write(1, vec![op]).unwrap();
            let gate = s.inner.compaction_gate.arm();
            assert!(s.compact_now(false).unwrap());
            assert!(
                gate.send(()).is_ok(),
                "{what:?}: parked after the first step"
            );
            s.write(0, vec![cmd(what)]).unwrap();
            s.set(b"after", b"1").unwrap();
            let _ = gate.send(());
            while gate.send(()).is_ok() {
                let _ = gate.send(());
            }
            s.wait_for_compaction();
            let info = s.log_info();
            assert_eq!(info.compactions, 0, "{what:?}");
            assert!(!s.inner.stats.last_compaction_ok.load(Ordering::Relaxed));
            assert_eq!(snapshot_files(dir.path()), Vec::<String>::new(), "{what:?}");
            assert!(
                s.read_all(|db| db.keyspaces().iter().all(|ks| ks.tracking().is_none())),
                "{what:?}: no tracking lingers"
            );
            let live = s.read_all(contents);
            drop(s);
            let s = Store::open(dir.path(), opts()).unwrap();
            assert_eq!(s.recovery().snapshot_index, None);
            assert!(s.read_all(contents) == live, "{what:?}");
            assert!(s.compact_now(true).unwrap());
            assert_eq!(s.log_info().compactions, 1);
            drop(s);
            let s = Store::open(dir.path(), opts()).unwrap();
            assert!(s.recovery().snapshot_index.is_some());
            assert!(s.read_all(contents) == live, "{what:?}");
        }
    }

    fn cmd(parts: &[&str]) -> Op {
        Op::Cmd {
            args: parts.iter().map(|p| p.as_bytes().to_vec()).collect(),
        }
    }

    /// One database's (key, value, deadline), sorted, expired keys included.
    type Contents = Vec<(Vec<u8>, Vec<u8>, u64)>;

    /// Each database's contents.
    fn contents(db: &Db) -> Vec<Contents> {
        db.keyspaces().iter().map(Keyspace::contents).collect()
    }

    /// Every database's expiry index, deadline sum and live bytes agree with its map.
    fn check_invariants(db: &Db) {
        for ks in db.keyspaces() {
            ks.check_invariants();
        }
    }

    /// Compaction writes every database into the snapshot; reopening loads each key into
    /// its own database, with its deadline. Opening with fewer databases than the data
    /// uses is refused (snapshot or log), naming the database.
    #[test]
    fn snapshot_and_log_keep_databases_apart() {
        let dir = tempfile::tempdir().unwrap();
        let o = Options {
            fsync: FsyncPolicy::No,
            segment_size: 4096,
            compact_min_bytes: 16 * 1024,
            compact_percentage: 100,
            active_expiry: false,
            ..Options::default()
        };
        let s = Store::open(dir.path(), o.clone()).unwrap();
        let far = s.now_ms() + 3_600_000;
        for d in [0u32, 3, 15] {
            let ops = vec![
                Op::Set {
                    key: b"same".to_vec(),
                    value: format!("v{d}").into_bytes(),
                    expiry: Expiry::Never,
                    condition: Condition::Always,
                    get: false,
                },
                Op::Set {
                    key: format!("only{d}").into_bytes(),
                    value: b"x".to_vec(),
                    expiry: Expiry::At(far + u64::from(d)),
                    condition: Condition::Always,
                    get: false,
                },
            ];
            s.write(d, ops).unwrap();
        }
        for round in 0..300 {
            s.write(
                7,
                vec![set_op(
                    "churn",
                    &format!("{round}"),
                    Expiry::Never,
                    Condition::Always,
                    false,
                )],
            )
            .unwrap();
            s.wait_for_compaction();
        }
        assert!(s.log_info().compactions > 0);
        let want = s.read_all(contents);
        drop(s);
        let s = Store::open(dir.path(), o.clone()).unwrap();
        assert!(s.recovery().snapshot_index.is_some());
        assert_eq!(s.read_all(contents), want);
        s.read_all(check_invariants);
        assert_eq!(
            s.read(3, |ks| ks.get(b"only3", 0).map(|i| i.expire_at)),
            Some(far + 3)
        );
        // Database 20 only in the log (after the snapshot).
        drop(s);
        let s20 = Store::open(
            dir.path(),
            Options {
                databases: 32,
                ..o.clone()
            },
        )
        .unwrap();
        s20.write(
            20,
            vec![set_op("late", "1", Expiry::Never, Condition::Always, false)],
        )
        .unwrap();
        drop(s20);
        let few = |n: u32| {
            Store::open(
                dir.path(),
                Options {
                    databases: n,
                    ..o.clone()
                },
            )
        };
        match few(4) {
            Err(e @ StoreError::TooFewDatabases { .. }) => {
                let text = e.to_string();
                assert!(text.contains("the snapshot uses database 7"), "{text}");
                assert!(text.contains("--databases"), "{text}");
            }
            other => panic!("{other:?}"),
        }
        match few(16) {
            Err(e @ StoreError::TooFewDatabases { .. }) => {
                assert!(e.to_string().contains("uses database 20"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        let s = few(21).unwrap();
        assert_eq!(s.read(20, |ks| ks.len()), 1);
    }

    /// The expirer deletes due keys in every database, and a reader's hint names the
    /// database: a live key of the same name elsewhere stays.
    #[test]
    fn expiry_covers_every_database() {
        let dir = tempfile::tempdir().unwrap();
        let (now, o) = fake_clock_options(1_000);
        let s = Store::open(dir.path(), o).unwrap();
        let set = |at: u64| Op::Set {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            expiry: Expiry::from_deadline(at),
            condition: Condition::Always,
            get: false,
        };
        s.write(0, vec![set(0)]).unwrap();
        s.write(2, vec![set(1_100)]).unwrap();
        s.write(9, vec![set(1_200)]).unwrap();
        now.store(1_150, Ordering::SeqCst);
        assert_eq!(s.expire_due(&[(0, b"k".to_vec())]).unwrap(), 1);
        assert_eq!(s.read(2, |ks| ks.len()), 0);
        assert_eq!(s.read(9, |ks| ks.len()), 1);
        assert_eq!(s.read(0, |ks| ks.len()), 1);
        now.store(1_300, Ordering::SeqCst);
        assert_eq!(s.expire_due(&[(9, b"k".to_vec())]).unwrap(), 1);
        assert_eq!(s.len(), 1);
        assert_eq!(s.read_all(|db| db.expired_keys()), 2);
    }

    /// Options with a clock the test sets (Unix ms) and no background expirer.
    fn fake_clock_options(start: u64) -> (Arc<AtomicU64>, Options) {
        let now = Arc::new(AtomicU64::new(start));
        let clock = {
            let now = now.clone();
            Clock::new(move || now.load(Ordering::SeqCst))
        };
        let o = Options {
            fsync: FsyncPolicy::No,
            clock,
            active_expiry: false,
            ..Options::default()
        };
        (now, o)
    }

    /// Expiry under a fake clock: keys vanish for readers at their deadline, the expiry
    /// cycle logs their deletion, and a restart neither resurrects them nor expires a key
    /// whose deadline was later removed.
    #[test]
    fn expiry_under_a_fake_clock() {
        let dir = tempfile::tempdir().unwrap();
        let (now, o) = fake_clock_options(1_000_000);
        let s = Store::open(dir.path(), o.clone()).unwrap();
        let set = |k: &str, at: u64| Op::Set {
            key: k.into(),
            value: b"v".to_vec(),
            expiry: Expiry::from_deadline(at),
            condition: Condition::Always,
            get: false,
        };
        s.write(
            0,
            vec![set("a", 1_000_100), set("b", 1_000_200), set("c", 0)],
        )
        .unwrap();
        // b's deadline is removed again: replay must not expire it.
        s.write(
            0,
            vec![Op::Cmd {
                args: vec![b"PERSIST".to_vec(), b"b".to_vec()],
            }],
        )
        .unwrap();
        assert_eq!(s.expire_due(&[]).unwrap(), 0);
        now.store(1_000_100, Ordering::SeqCst);
        assert_eq!(s.get(b"a"), None, "expired at its deadline for readers");
        assert_eq!(s.len(), 3, "but still in memory until the expirer runs");
        now.store(1_000_500, Ordering::SeqCst);
        assert_eq!(s.expire_due(&[]).unwrap(), 1);
        assert_eq!(s.len(), 2);
        assert_eq!(s.read_all(|db| db.expired_keys()), 1);
        drop(s);
        let s = Store::open(dir.path(), o).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s.get(b"a"), None);
        assert!(s.get(b"b").is_some());
        assert!(s.get(b"c").is_some());
    }

    /// Many keys due at once are deleted in bounded batches (one log entry per
    /// EXPIRE_BATCH keys), never by one entry or one pause proportional to their number.
    #[test]
    fn expiry_is_batched() {
        let dir = tempfile::tempdir().unwrap();
        let (now, o) = fake_clock_options(5_000);
        let s = Store::open(dir.path(), o).unwrap();
        let n = EXPIRE_BATCH * 3 + 7;
        let ops: Vec<Op> = (0..n)
            .map(|i| Op::Set {
                key: format!("k{i}").into_bytes(),
                value: b"v".to_vec(),
                expiry: Expiry::At(6_000),
                condition: Condition::Always,
                get: false,
            })
            .collect();
        s.write(0, ops).unwrap();
        let before = s.log_info().last_index;
        now.store(7_000, Ordering::SeqCst);
        let mut deleted = 0;
        while deleted < n {
            let d = s.expire_due(&[]).unwrap();
            assert!(d > 0);
            deleted += d;
        }
        assert_eq!(s.len(), 0);
        assert_eq!(
            s.log_info().last_index - before,
            4,
            "ceil(n / EXPIRE_BATCH) entries"
        );
    }
}
