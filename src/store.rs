//! The store: the in-memory map and the one write path into it.
//!
//! [`Store`] owns the key space (a `parking_lot` mutex around a `HashMap`) and the
//! write-ahead log. Reads lock the map and look. Writes never touch the map directly: a
//! write becomes log [`Entry`]s, the entries are appended (and fsync'd as `--fsync` asks),
//! and only then are they applied to the map, in log order, by [`Db::apply`]. Recovery is
//! the same `apply` run over the snapshot and the log, so what a client was told is exactly
//! what a restart rebuilds.
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
//! the flusher rolls to a fresh segment, copies the map, and a background thread writes a
//! snapshot of the copy and deletes the segments it covers. The copy is a pause
//! proportional to the key count (Redis forks instead); the write of the snapshot is not.

use crate::keymap::{KeyMap, Slot};
use crate::wal::{
    self, Condition, Entry, Expiry, FsyncPolicy, Op, RecoveryReport, SnapshotItem, SnapshotPart,
    Wal, WalError, WalOptions,
};
use crate::watch::{KeyState, Watches};
use parking_lot::Mutex;
use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::{self, Thread};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
        }
    }
}

/// Errors of the store.
#[derive(Debug)]
pub enum StoreError {
    /// Opening or recovering the log failed (including corruption).
    Wal(WalError),
    /// A write to the log failed. The writes in that batch may or may not be on disk, and
    /// the store refuses further writes until it is restarted and recovers from the log.
    WriteFailed(String),
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
        }
    }
}

impl std::error::Error for StoreError {}

impl From<WalError> for StoreError {
    fn from(e: WalError) -> Self {
        StoreError::Wal(e)
    }
}

/// What applying one operation produced (the command layer turns it into a reply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpResult {
    /// Done (`+OK`).
    Ok,
    /// A condition (NX/XX) was not met; nothing changed (nil).
    NotSet,
    /// The previous value, for SET … GET (nil if there was none).
    Old(Option<Vec<u8>>),
    Int(i64),
    /// The operation was refused without effect; the text is the Redis error reply.
    Error(&'static str),
    /// A read inside a transaction that answers a status (TYPE).
    Status(&'static str),
    /// A read inside a transaction that answers an array (MGET, KEYS).
    Array(Vec<OpResult>),
    /// A transaction's results, one per op in order.
    Multi(Vec<OpResult>),
    /// A transaction not logged because a key its client WATCHed changed (EXEC's nil).
    Aborted,
}

/// A stored value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub value: Box<[u8]>,
    /// Absolute expiry in Unix ms; 0 = none.
    pub expire_at: u64,
}

impl Item {
    /// Whether the item is expired at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expire_at != 0 && self.expire_at <= now_ms
    }
}

/// Approximate bytes a key costs beyond its key and value (hash slot and allocations);
/// only used to decide when the log has outgrown the data.
const ITEM_OVERHEAD: u64 = 48;

/// The key space and the state machine that log entries drive.
#[derive(Debug, Default)]
pub struct Db {
    pub(crate) map: KeyMap,
    /// Every key with an expiry as (deadline, key hash), ordered by deadline, so the
    /// active expirer finds the expired ones without scanning (and without a pause that
    /// grows with the key count); 16 bytes a key, no copy of it ([`KeyMap`]).
    pub(crate) expires: BTreeSet<(u64, u64)>,
    /// Approximate live bytes (keys, values, overhead).
    pub(crate) live_bytes: u64,
    /// Index of the last applied entry.
    applied: u64,
    /// Keys removed because they expired (INFO's `expired_keys`).
    pub(crate) expired_keys: u64,
}

pub const ERR_NOT_INTEGER: &str = "ERR value is not an integer or out of range";
pub const ERR_OVERFLOW: &str = "ERR increment or decrement would overflow";

fn item_cost(k: &[u8], v: &[u8]) -> u64 {
    (k.len() + v.len()) as u64 + ITEM_OVERHEAD
}

impl Db {
    /// The live item under `key` at `now_ms`, if any.
    pub fn get(&self, key: &[u8], now_ms: u64) -> Option<&Item> {
        self.map.get(key).filter(|i| !i.expired(now_ms))
    }

    /// Number of keys, including expired ones not yet removed (as Redis's DBSIZE).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn applied_index(&self) -> u64 {
        self.applied
    }

    pub fn live_bytes(&self) -> u64 {
        self.live_bytes
    }

    /// Every live key and item (unordered).
    pub fn iter(&self, now_ms: u64) -> impl Iterator<Item = (&[u8], &Item)> {
        self.map
            .iter()
            .filter(move |(_, i)| !i.expired(now_ms))
            .map(|(k, i)| (&**k, i))
    }

    /// Number of keys with an expiry.
    pub fn expiring(&self) -> usize {
        self.expires.len()
    }

    /// Up to `max` keys whose deadline is at or before `now`, earliest first.
    pub fn due(&self, now: u64, max: usize) -> Vec<Vec<u8>> {
        self.expires
            .iter()
            .take_while(|(at, _)| *at <= now)
            .filter_map(|&(at, h)| self.map.find_by_hash(h, |_, i| i.expire_at == at))
            .take(max)
            .map(|(k, _)| k.to_vec())
            .collect()
    }

    /// The hash `key` is stored under: stable for the life of the process (SCAN's cursor
    /// is a position in this order).
    pub fn key_hash(&self, key: &[u8]) -> u64 {
        self.map.hash(key)
    }

    /// Whether `key` exists but is expired at `now` (a reader's hint for the expirer).
    pub fn is_expired(&self, key: &[u8], now: u64) -> bool {
        self.map.get(key).is_some_and(|i| i.expired(now))
    }

    pub(crate) fn insert(&mut self, key: Box<[u8]>, item: Item) -> Option<Item> {
        let key_len = key.len() as u64;
        let new_at = item.expire_at;
        let old_at = self.map.get(&key[..]).map_or(0, |o| o.expire_at);
        if old_at != new_at {
            let h = self.map.hash(&key);
            if old_at != 0 {
                self.expires.remove(&(old_at, h));
            }
            if new_at != 0 {
                self.expires.insert((new_at, h));
            }
        }
        self.live_bytes += key_len + item.value.len() as u64 + ITEM_OVERHEAD;
        let old = self.map.insert(key, item);
        if let Some(o) = &old {
            self.live_bytes -= key_len + o.value.len() as u64 + ITEM_OVERHEAD;
        }
        old
    }

    /// Adds a key from a snapshot. Its keys are distinct, so this skips the checks an
    /// overwrite needs: loading is one hash insert per key (plus the deadline index).
    /// Its deadline goes to `deadlines`, from which the caller builds the index at once.
    fn load(&mut self, it: SnapshotItem, deadlines: &mut Vec<(u64, u64)>) {
        let key = it.key.into_boxed_slice();
        let expire_at = it.expire_at_ms.unwrap_or(0);
        self.live_bytes += (key.len() + it.value.len()) as u64 + ITEM_OVERHEAD;
        if expire_at != 0 {
            deadlines.push((expire_at, self.map.hash(&key)));
        }
        self.map.insert(
            key,
            Item {
                value: it.value.into_boxed_slice(),
                expire_at,
            },
        );
    }

    pub(crate) fn remove(&mut self, key: &[u8]) -> Option<Item> {
        let old = self.map.remove(key);
        if let Some(o) = &old {
            self.live_bytes = self.live_bytes.saturating_sub(item_cost(key, &o.value));
            self.forget_expiry(o.expire_at, key);
        }
        old
    }

    /// Drops `key`'s entry from the expiry index (after its deadline changed or it went).
    pub(crate) fn forget_expiry(&mut self, at: u64, key: &[u8]) {
        if at != 0 {
            self.expires.remove(&(at, self.map.hash(key)));
        }
    }

    /// Sets `key`'s deadline (0 = none), keeping the index in step. The key must exist.
    pub(crate) fn set_expiry(&mut self, key: &[u8], at: u64) {
        let Some(item) = self.map.get_mut(key) else {
            return;
        };
        let old = std::mem::replace(&mut item.expire_at, at);
        if old == at {
            return;
        }
        self.forget_expiry(old, key);
        if at != 0 {
            self.expires.insert((at, self.map.hash(key)));
        }
    }

    /// Removes `key` if it exists but expired at `now`, so that the operation applied next
    /// sees it as missing.
    pub(crate) fn purge_expired(&mut self, key: &[u8], now: u64) {
        if self.map.get(key).is_some_and(|i| i.expired(now)) {
            self.remove(key);
            self.expired_keys += 1;
        }
    }

    /// SET with one hash lookup: the hot path of every write benchmark.
    fn apply_set(
        &mut self,
        key: Vec<u8>,
        value: Vec<u8>,
        expiry: Expiry,
        condition: Condition,
        get: bool,
        now: u64,
    ) -> OpResult {
        let value = value.into_boxed_slice();
        let new_len = value.len() as u64;
        let key_len = key.len() as u64;
        let h = self.map.hash(&key);
        let slot = self.map.slot(&key);
        let live = match &slot {
            Slot::Occupied(o) if !o.get().1.expired(now) => Some(&o.get().1),
            _ => None,
        };
        let ok = match condition {
            Condition::Always => true,
            Condition::IfMissing => live.is_none(),
            Condition::IfExists => live.is_some(),
        };
        let old = if get {
            live.map(|i| i.value.to_vec())
        } else {
            None
        };
        let expire_at = match expiry {
            Expiry::Never => 0,
            Expiry::At(t) => t,
            Expiry::Keep => live.map_or(0, |i| i.expire_at),
        };
        // A deadline already past deletes the key, as in Redis.
        let delete = ok && expire_at != 0 && expire_at <= now;
        // The deadline index changes only for keys that have or get a deadline; the common
        // SET of a key without one touches nothing but the map.
        let mut index_out = 0;
        let mut index_in = 0;
        match slot {
            Slot::Occupied(mut o) => {
                let dead = o.get().1.expired(now);
                let old_at = o.get().1.expire_at;
                if delete || (dead && !ok) {
                    index_out = old_at;
                    let ((_, gone), _) = o.remove();
                    self.live_bytes -= key_len + gone.value.len() as u64 + ITEM_OVERHEAD;
                    if dead {
                        self.expired_keys += 1;
                    }
                } else if ok {
                    if old_at != expire_at {
                        index_out = old_at;
                        index_in = expire_at;
                    }
                    let prev = std::mem::replace(&mut o.get_mut().1, Item { value, expire_at });
                    // Plus the new value, minus the old (wrapping: a shrink subtracts).
                    self.live_bytes = self
                        .live_bytes
                        .wrapping_add(new_len.wrapping_sub(prev.value.len() as u64));
                }
            }
            Slot::Vacant(v) => {
                if ok && !delete {
                    index_in = expire_at;
                    self.live_bytes += key_len + new_len + ITEM_OVERHEAD;
                    v.insert((key.into_boxed_slice(), Item { value, expire_at }));
                }
            }
        }
        if index_out != 0 {
            self.expires.remove(&(index_out, h));
        }
        if index_in != 0 {
            self.expires.insert((index_in, h));
        }
        match (get, ok) {
            (true, _) => OpResult::Old(old),
            (false, true) => OpResult::Ok,
            (false, false) => OpResult::NotSet,
        }
    }

    /// Applies one committed entry. Deterministic: depends only on the map and the entry.
    pub fn apply(&mut self, entry: Entry) -> OpResult {
        self.applied = entry.index;
        self.apply_op(entry.op, entry.ts_ms)
    }

    /// Applies one operation at the entry's time `now`.
    fn apply_op(&mut self, op: Op, now: u64) -> OpResult {
        match op {
            Op::Noop => OpResult::Ok,
            // Every op in order, under the one map lock the caller holds: no reader sees
            // the transaction half done. The database index is not used yet (one
            // database); the decoder refuses nesting, so this recursion is one level.
            Op::Multi { ops } => OpResult::Multi(
                ops.into_iter()
                    .map(|(_db, op)| match op {
                        Op::Multi { .. } => OpResult::Error(crate::exec::ERR_BAD_RECORD),
                        op => self.apply_op(op, now),
                    })
                    .collect(),
            ),
            Op::Cmd { args } => self.exec(args, now),
            Op::Set {
                key,
                value,
                expiry,
                condition,
                get,
            } => self.apply_set(key, value, expiry, condition, get, now),
            Op::Del { keys } => {
                let mut n = 0;
                for k in keys {
                    self.purge_expired(&k, now);
                    if self.remove(&k).is_some() {
                        n += 1;
                    }
                }
                OpResult::Int(n)
            }
            Op::MSet {
                pairs,
                only_if_none_exist,
            } => {
                if only_if_none_exist {
                    for (k, _) in &pairs {
                        self.purge_expired(k, now);
                    }
                    if pairs.iter().any(|(k, _)| self.map.contains_key(&k[..])) {
                        return OpResult::Int(0);
                    }
                }
                for (k, v) in pairs {
                    self.insert(
                        k.into_boxed_slice(),
                        Item {
                            value: v.into_boxed_slice(),
                            expire_at: 0,
                        },
                    );
                }
                if only_if_none_exist {
                    OpResult::Int(1)
                } else {
                    OpResult::Ok
                }
            }
            Op::IncrBy { key, delta } => {
                // The hot path of counters: one lookup. The deadline is kept, so the
                // expiry index is untouched unless the key had expired.
                if let Some(item) = self.map.get_mut(&key[..])
                    && !item.expired(now)
                {
                    let Some(cur) = parse_i64(&item.value) else {
                        return OpResult::Error(ERR_NOT_INTEGER);
                    };
                    let Some(new) = cur.checked_add(delta) else {
                        return OpResult::Error(ERR_OVERFLOW);
                    };
                    let text = new.to_string().into_bytes().into_boxed_slice();
                    let old_len = std::mem::replace(&mut item.value, text).len();
                    let new_len = item.value.len();
                    self.live_bytes = self.live_bytes + new_len as u64 - old_len as u64;
                    return OpResult::Int(new);
                }
                // A missing (or expired) key counts as 0.
                self.purge_expired(&key, now);
                let new = delta;
                self.insert(
                    key.into_boxed_slice(),
                    Item {
                        value: new.to_string().into_bytes().into_boxed_slice(),
                        expire_at: 0,
                    },
                );
                OpResult::Int(new)
            }
        }
    }
}

/// Parses a value as Redis does for INCR: optional `-`, decimal digits, no leading `+`,
/// spaces or leading zeros, within i64.
pub fn parse_i64(b: &[u8]) -> Option<i64> {
    if b.is_empty() || b.len() > 20 {
        return None;
    }
    let s = std::str::from_utf8(b).ok()?;
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.is_empty()
        || !digits.bytes().all(|c| c.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
        || s == "-0"
    {
        return None;
    }
    s.parse().ok()
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
    pub entries_written: AtomicU64,
    pub compactions: AtomicU64,
    pub last_compaction_ok: AtomicBool,
}

/// A snapshot of the store's log state, for INFO.
#[derive(Debug, Clone)]
pub struct LogInfo {
    pub fsync: FsyncPolicy,
    pub last_index: u64,
    pub log_bytes: u64,
    pub compacting: bool,
    pub compactions: u64,
    pub fsyncs: u64,
    pub write_error: Option<String>,
    pub recovery: RecoveryReport,
}

/// One key of the map as copied for a snapshot: key, value, expiry (0 = none).
type SnapshotRow = (Box<[u8]>, Box<[u8]>, u64);

type Outcome = Result<Vec<OpResult>, String>;

/// What a submitter is told when its entries are committed and applied (or not). Runs on
/// the log writer's thread (under `--fsync always`) or on the submitter's own.
pub type Done = Box<dyn FnOnce(Result<Vec<OpResult>, StoreError>) + Send>;

/// The answers of one flush: each submitter, how many entries were its, and its outcome.
/// Dropping it tells every submitter; one whose outcome was never set (the flush
/// panicked) learns that its writes' outcome is unknown rather than waiting forever.
struct Deliveries(Vec<(Done, usize, Option<Outcome>)>);

impl Drop for Deliveries {
    fn drop(&mut self) {
        for (done, _, outcome) in self.0.drain(..) {
            let outcome =
                outcome.unwrap_or_else(|| Err("internal error while committing".to_string()));
            done(outcome.map_err(StoreError::WriteFailed));
        }
    }
}

#[derive(Default)]
struct Queue {
    next_index: u64,
    buf: Vec<u8>,
    entries: Vec<Entry>,
    /// Each submitter and how many of `entries` are its.
    waiters: Vec<(Done, usize)>,
}

struct Inner {
    dir: PathBuf,
    opts: Options,
    db: Mutex<Db>,
    queue: Mutex<Queue>,
    /// Holding this lock is being the flusher.
    wal: Mutex<Wal>,
    epoch: AtomicU64,
    /// Why the log stopped taking writes, once a write to it failed. Read on every write,
    /// so a `OnceLock`: no lock to contend on.
    failed: std::sync::OnceLock<String>,
    compacting: AtomicBool,
    /// Bytes freed by a background compaction, not yet subtracted from the writer's count.
    pruned: AtomicU64,
    /// Writers in the last group commit, and how long its append and fsync took (for
    /// [`Store::linger`]).
    last_batch_writers: AtomicU64,
    last_fsync_nanos: AtomicU64,
    /// The log writer thread (`--fsync always` only), unparked when entries are queued.
    writer: std::sync::OnceLock<Thread>,
    /// Keys a reader found expired, for the expirer to delete soon (lazy expiry).
    expiry_hints: crossbeam_channel::Sender<Vec<u8>>,
    /// WATCHed keys: told of every write as it is queued (`src/watch.rs`).
    watches: Watches,
    stats: Stats,
    recovery: RecoveryReport,
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
        let mut deadlines = Vec::new();
        // Both replay callbacks need the map; RefCell lets them share it.
        let db = std::cell::RefCell::new(Db::default());
        let wal_opts = WalOptions {
            fsync: opts.fsync,
            segment_size: opts.segment_size,
        };
        let (wal, recovery) = Wal::open(
            &dir,
            wal_opts,
            |part| {
                let mut db = db.borrow_mut();
                match part {
                    SnapshotPart::Header { index, count, .. } => {
                        db.applied = index;
                        db.map.reserve(count.min(1 << 28) as usize);
                    }
                    SnapshotPart::Item(it) => db.load(it, &mut deadlines),
                    // Built in one go from sorted entries: a snapshot lists keys in hash
                    // order, and inserting their deadlines one by one in that random
                    // order costs more than loading the keys themselves.
                    SnapshotPart::End => {
                        db.expires = std::mem::take(&mut deadlines).into_iter().collect();
                    }
                }
            },
            |e| {
                db.borrow_mut().apply(e);
            },
        )?;
        let db = db.into_inner();
        let queue = Queue {
            next_index: recovery.last_index + 1,
            ..Queue::default()
        };
        let (hints_tx, hints_rx) = crossbeam_channel::bounded(4096);
        let inner = Arc::new(Inner {
            dir,
            epoch: AtomicU64::new(recovery.last_epoch),
            opts,
            db: Mutex::new(db),
            queue: Mutex::new(queue),
            wal: Mutex::new(wal),
            failed: std::sync::OnceLock::new(),
            compacting: AtomicBool::new(false),
            pruned: AtomicU64::new(0),
            last_batch_writers: AtomicU64::new(0),
            last_fsync_nanos: AtomicU64::new(0),
            writer: std::sync::OnceLock::new(),
            expiry_hints: hints_tx,
            watches: Watches::default(),
            stats: Stats::default(),
            recovery,
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
        if inner.opts.fsync == FsyncPolicy::EverySec {
            let weak = Arc::downgrade(&inner);
            thread::Builder::new()
                .name("fsync-everysec".into())
                .spawn(move || everysec(weak))
                .map_err(|e| StoreError::WriteFailed(format!("cannot start fsync thread: {e}")))?;
        }
        Ok(Store { inner })
    }

    /// The store's clock (Unix ms): what "now" means for expiry.
    pub fn now_ms(&self) -> u64 {
        self.inner.opts.clock.now_ms()
    }

    /// Tells the expirer that a reader found `key` expired (lazy expiry). Never blocks: if
    /// the expirer is behind, the hint is dropped and its own sweep finds the key.
    pub fn note_expired(&self, key: &[u8]) {
        let _ = self.inner.expiry_hints.try_send(key.to_vec());
    }

    /// One expiry cycle, as the leader runs it: logs the deletion of keys whose deadline
    /// has passed (at most [`EXPIRE_BATCH`] per entry, for at most [`EXPIRE_CYCLE`]), and
    /// of `hinted` keys still expired. Returns how many keys were deleted. The background
    /// expirer calls this ten times a second; tests call it directly under a fake clock.
    pub fn expire_due(&self, hinted: &[Vec<u8>]) -> Result<usize, StoreError> {
        let started = std::time::Instant::now();
        let mut deleted = 0;
        let mut hinted = hinted;
        loop {
            let now = self.now_ms();
            let keys = self.read(|db| {
                let mut keys = db.due(now, EXPIRE_BATCH);
                keys.extend(hinted.iter().filter(|k| db.is_expired(k, now)).cloned());
                keys
            });
            hinted = &[];
            if keys.is_empty() {
                return Ok(deleted);
            }
            let full = keys.len() >= EXPIRE_BATCH;
            let mut args = Vec::with_capacity(keys.len() + 1);
            args.push(b"EXPIRED".to_vec());
            args.extend(keys);
            if let Some(OpResult::Int(n)) = self.write(vec![Op::Cmd { args }])?.first() {
                deleted += *n as usize;
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

    /// Runs `f` with the map locked (for reads spanning several keys).
    pub fn read<R>(&self, f: impl FnOnce(&Db) -> R) -> R {
        f(&self.inner.db.lock())
    }

    /// The value of `key`, or `None` if missing or expired.
    pub fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let now = self.now_ms();
        self.read(|db| db.get(key, now).map(|i| i.value.to_vec()))
    }

    /// Sets `key` to `value` (no expiry), durably as the fsync policy says.
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

    /// Deletes keys; returns how many existed.
    pub fn del(&self, keys: &[&[u8]]) -> Result<i64, StoreError> {
        match self.write_one(Op::Del {
            keys: keys.iter().map(|k| k.to_vec()).collect(),
        })? {
            OpResult::Int(n) => Ok(n),
            _ => Ok(0),
        }
    }

    /// Adds `delta` to the integer at `key` (missing = 0).
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

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.read(|db| db.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn write_one(&self, op: Op) -> Result<OpResult, StoreError> {
        let mut r = self.write(vec![op])?;
        Ok(r.pop().unwrap_or(OpResult::Ok))
    }

    /// Logs `ops` as consecutive entries, waits until they are committed (written, and
    /// fsync'd under `--fsync always`) and applied, and returns one result per op.
    pub fn write(&self, ops: Vec<Op>) -> Result<Vec<OpResult>, StoreError> {
        self.write_guarded(ops, None)
    }

    /// [`Store::write`] with [`Store::submit_guarded`]'s WATCH check.
    fn write_guarded(
        &self,
        ops: Vec<Op>,
        exec_of: Option<u64>,
    ) -> Result<Vec<OpResult>, StoreError> {
        if self.inner.opts.fsync != FsyncPolicy::Always {
            return self.write_direct(ops, exec_of);
        }
        let slot = Arc::new(Mutex::new(None));
        let me = thread::current();
        let filled = slot.clone();
        self.submit_guarded(
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

    /// Logs `ops` as consecutive entries and calls `done` once they are committed and
    /// applied, with one result per op, in submission order. Without an fsync to share
    /// (`everysec`, `no`) the commit happens on the caller's thread and `done` runs before
    /// this returns; under `always` the log writer thread commits a whole batch with one
    /// fsync and runs `done` for each submitter, so a caller need not wait (the server's
    /// connections go back to reading while the writer answers their clients).
    pub fn submit(&self, ops: Vec<Op>, done: Done) {
        self.submit_guarded(ops, None, done)
    }

    /// [`Store::submit`], but when `exec_of` names a client, the ops are logged only if no
    /// key that client WATCHes has changed; otherwise nothing is logged and `done` gets
    /// `[OpResult::Aborted]`. The check is made under the queue lock that fixes log order
    /// (see `src/watch.rs`), so it holds exactly at the ops' place in the log.
    fn submit_guarded(&self, ops: Vec<Op>, exec_of: Option<u64>, done: Done) {
        if ops.is_empty() {
            done(Ok(Vec::new()));
            return;
        }
        if let Some(why) = self.inner.failed.get() {
            done(Err(StoreError::WriteFailed(why.clone())));
            return;
        }
        if self.inner.opts.fsync != FsyncPolicy::Always {
            done(self.write_direct(ops, exec_of));
            return;
        }
        let ts_ms = self.now_ms();
        let epoch = self.inner.epoch.load(Ordering::Relaxed);
        {
            let mut q = self.inner.queue.lock();
            if !self.inner.watches.on_queue(&ops, exec_of, ts_ms) {
                drop(q);
                done(Ok(vec![OpResult::Aborted]));
                return;
            }
            let n = ops.len();
            for op in ops {
                let entry = Entry {
                    index: q.next_index,
                    epoch,
                    ts_ms,
                    op,
                };
                q.next_index += 1;
                wal::encode_entry(&entry, &mut q.buf);
                q.entries.push(entry);
            }
            q.waiters.push((done, n));
        }
        if let Some(w) = self.inner.writer.get() {
            w.unpark();
        }
    }

    /// The commit path without an fsync to share: a flush is one short `write()`, so
    /// taking the writer lock (which spins before it sleeps) and writing our own entries
    /// costs less than queueing, parking and being unparked by another thread.
    fn write_direct(
        &self,
        ops: Vec<Op>,
        exec_of: Option<u64>,
    ) -> Result<Vec<OpResult>, StoreError> {
        let inner = &*self.inner;
        let mut wal = inner.wal.lock();
        if let Some(why) = inner.failed.get() {
            return Err(StoreError::WriteFailed(why.clone()));
        }
        let ts_ms = self.now_ms();
        let (first, mut buf) = {
            let mut q = inner.queue.lock();
            if !inner.watches.on_queue(&ops, exec_of, ts_ms) {
                return Ok(vec![OpResult::Aborted]);
            }
            let first = q.next_index;
            q.next_index += ops.len() as u64;
            (first, std::mem::take(&mut q.buf))
        };
        let epoch = inner.epoch.load(Ordering::Relaxed);
        let entries: Vec<Entry> = ops
            .into_iter()
            .enumerate()
            .map(|(i, op)| Entry {
                index: first + i as u64,
                epoch,
                ts_ms,
                op,
            })
            .collect();
        buf.clear();
        for e in &entries {
            wal::encode_entry(e, &mut buf);
        }
        let last = first + entries.len() as u64 - 1;
        let res = wal.append(&buf, last);
        buf.clear();
        inner.queue.lock().buf = buf;
        if let Err(e) = res {
            let why = e.to_string();
            log::error!("{}", StoreError::WriteFailed(why.clone()));
            let _ = inner.failed.set(why.clone());
            return Err(StoreError::WriteFailed(why));
        }
        inner.stats.commits.fetch_add(1, Ordering::Relaxed);
        let (results, live_bytes) = {
            let mut db = inner.db.lock();
            let r: Vec<OpResult> = entries.into_iter().map(|e| db.apply(e)).collect();
            (r, db.live_bytes)
        };
        self.maybe_compact(&mut wal, live_bytes);
        Ok(results)
    }

    /// WATCH: from now on, a write queued to any of `keys` makes `client`'s next
    /// [`Store::exec`] abort. Returns once every write queued before the call is applied,
    /// so that what the client reads next is not older than its WATCH (the state its
    /// EXEC is checked against).
    pub fn watch(&self, client: u64, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        // Registered first, then the barrier: a write queued after the registration marks
        // the client dirty; one queued before is applied by the time the barrier returns,
        // so the state read below is the state at the registration.
        self.inner.watches.watch(client, keys);
        {
            let mut wal = self.inner.wal.lock();
            let deliveries = self.flush(&mut wal);
            drop(wal);
            drop(deliveries);
        }
        if let Some(why) = self.inner.failed.get() {
            return Err(StoreError::WriteFailed(why.clone()));
        }
        let now = self.now_ms();
        let db = self.inner.db.lock();
        self.inner.watches.settle(client, |k| match db.get(k, now) {
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
            let ok = self.inner.watches.on_queue(&[], Some(client), now);
            drop(q);
            Ok(vec![if ok {
                OpResult::Multi(Vec::new())
            } else {
                OpResult::Aborted
            }])
        } else {
            self.write_guarded(vec![op], Some(client))
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
        let budget = Duration::from_nanos(inner.last_fsync_nanos.load(Ordering::Relaxed) / 2)
            .min(Duration::from_millis(2));
        let start = std::time::Instant::now();
        while inner.queue.lock().waiters.len() < want && start.elapsed() < budget {
            // Sleep rather than spin: on a small machine the writers we wait for need
            // this core.
            thread::park_timeout(Duration::from_micros(20));
        }
    }

    /// Writes, syncs and applies everything queued. Called with the writer held.
    fn flush(&self, wal: &mut Wal) -> Deliveries {
        let inner = &*self.inner;
        let (buf, entries, waiters) = {
            let mut q = inner.queue.lock();
            if q.entries.is_empty() {
                return Deliveries(Vec::new());
            }
            let buf = std::mem::take(&mut q.buf);
            (
                buf,
                std::mem::take(&mut q.entries),
                std::mem::take(&mut q.waiters),
            )
        };
        // From here on every waiter gets an answer, even if this thread panics.
        let mut deliveries = Deliveries(waiters.into_iter().map(|(d, n)| (d, n, None)).collect());
        let last = entries.last().map_or(0, |e| e.index);
        let started = std::time::Instant::now();
        let res = match inner.failed.get() {
            Some(why) => Err(why.clone()),
            None => wal.append(&buf, last).map_err(|e| e.to_string()),
        };
        inner
            .last_fsync_nanos
            .store(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        inner
            .last_batch_writers
            .store(deliveries.0.len() as u64, Ordering::Relaxed);
        match res {
            Ok(()) => {
                inner.stats.commits.fetch_add(1, Ordering::Relaxed);
                inner
                    .stats
                    .entries_written
                    .fetch_add(entries.len() as u64, Ordering::Relaxed);
                if inner.opts.fsync == FsyncPolicy::Always {
                    inner.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
                }
                let mut results = Vec::with_capacity(entries.len());
                let live_bytes = {
                    let mut db = inner.db.lock();
                    for e in entries {
                        results.push(db.apply(e));
                    }
                    db.live_bytes
                };
                let mut results = results.into_iter();
                for (_, n, outcome) in &mut deliveries.0 {
                    *outcome = Some(Ok(results.by_ref().take(*n).collect()));
                }
                self.maybe_compact(wal, live_bytes);
            }
            Err(why) => {
                log::error!("{}", StoreError::WriteFailed(why.clone()));
                let _ = inner.failed.set(why.clone());
                for (_, _, outcome) in &mut deliveries.0 {
                    *outcome = Some(Err(why.clone()));
                }
            }
        }
        // Give the buffer's capacity back to the queue, so the next batch does not grow a
        // new one from nothing.
        let mut buf = buf;
        buf.clear();
        let mut q = inner.queue.lock();
        if q.buf.is_empty() && q.buf.capacity() < buf.capacity() {
            std::mem::swap(&mut q.buf, &mut buf);
        }
        deliveries
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

    /// Rolls to a new segment at the applied index, copies the map and hands the copy to
    /// a background thread that writes the snapshot and prunes the old segments.
    fn start_compaction(&self, wal: &mut Wal) -> Result<(), WalError> {
        let index = wal.last_index();
        wal.roll(index + 1)?;
        let epoch = self.inner.epoch.load(Ordering::Relaxed);
        let items: Vec<SnapshotRow> = {
            let db = self.inner.db.lock();
            db.map
                .iter()
                .map(|(k, i)| (k.clone(), i.value.clone(), i.expire_at))
                .collect()
        };
        let inner = self.inner.clone();
        log::info!(
            "compacting: log is {} bytes, snapshotting {} keys at index {index}",
            wal.log_bytes(),
            items.len()
        );
        thread::Builder::new()
            .name("compaction".into())
            .spawn(move || {
                let bytes = wal::encode_snapshot(
                    index,
                    epoch,
                    items
                        .iter()
                        .map(|(k, v, e)| (&**k, &**v, (*e != 0).then_some(*e))),
                );
                drop(items);
                match Wal::write_snapshot_and_prune(&inner.dir, index, &bytes) {
                    Ok(freed) => {
                        inner.pruned.fetch_add(freed, Ordering::Relaxed);
                        inner.stats.compactions.fetch_add(1, Ordering::Relaxed);
                        inner
                            .stats
                            .last_compaction_ok
                            .store(true, Ordering::Relaxed);
                        log::info!(
                            "compaction done: snapshot of {} bytes at index {index}, {freed} \
                             bytes of log removed",
                            bytes.len()
                        );
                    }
                    Err(e) => {
                        inner
                            .stats
                            .last_compaction_ok
                            .store(false, Ordering::Relaxed);
                        log::error!("compaction failed: {e}");
                    }
                }
                inner.compacting.store(false, Ordering::Release);
            })
            .map_err(|e| WalError::Io {
                path: self.inner.dir.clone(),
                source: e,
            })?;
        Ok(())
    }

    /// fsyncs the log now, whatever the policy (shutdown calls this).
    pub fn sync(&self) -> Result<(), StoreError> {
        let mut wal = self.inner.wal.lock();
        let deliveries = self.flush(&mut wal);
        let r = wal.sync().map_err(StoreError::from);
        drop(wal);
        drop(deliveries);
        r
    }

    /// Blocks until no compaction runs (tests and shutdown).
    pub fn wait_for_compaction(&self) {
        while self.inner.compacting.load(Ordering::Acquire) {
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Log state for INFO.
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
            fsyncs: self.inner.stats.fsyncs.load(Ordering::Relaxed),
            write_error: self.inner.failed.get().cloned(),
            recovery: self.inner.recovery.clone(),
        }
    }
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
        store.linger();
        let mut wal = store.inner.wal.lock();
        let deliveries = store.flush(&mut wal);
        drop(wal);
        drop(deliveries);
    }
}

/// Keys deleted per EXPIRED log entry.
pub const EXPIRE_BATCH: usize = 256;
/// Longest an expiry cycle may run before yielding to the next tick.
pub const EXPIRE_CYCLE: Duration = Duration::from_millis(25);

/// The active expirer: ten times a second (or sooner when readers report expired keys),
/// run [`Store::expire_due`]. Exits when the store is dropped (the hint channel closes).
fn expirer(inner: Weak<Inner>, hints: crossbeam_channel::Receiver<Vec<u8>>) {
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
        let store = Store { inner };
        if let Err(e) = store.expire_due(&hinted) {
            log::warn!("active expiry: {e}");
        }
    }
}

/// The `everysec` syncer: once a second, fsync the current segment if it has new writes.
fn everysec(inner: Weak<Inner>) {
    loop {
        thread::sleep(Duration::from_secs(1));
        let Some(inner) = inner.upgrade() else { return };
        let file = inner.wal.lock().take_sync_handle();
        if let Some(f) = file {
            match f.sync_data() {
                Ok(()) => {
                    inner.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => log::error!("background fsync failed: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> Options {
        Options {
            fsync: FsyncPolicy::No,
            ..Options::default()
        }
    }

    fn entry(index: u64, ts_ms: u64, op: Op) -> Entry {
        Entry {
            index,
            epoch: 0,
            ts_ms,
            op,
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
    fn set_conditions_and_get() {
        let mut db = Db::default();
        let a = Condition::Always;
        assert_eq!(
            db.apply(entry(
                1,
                0,
                set_op("k", "1", Expiry::Never, Condition::IfExists, false)
            )),
            OpResult::NotSet
        );
        assert_eq!(
            db.apply(entry(
                2,
                0,
                set_op("k", "1", Expiry::Never, Condition::IfMissing, false)
            )),
            OpResult::Ok
        );
        assert_eq!(
            db.apply(entry(
                3,
                0,
                set_op("k", "2", Expiry::Never, Condition::IfMissing, true)
            )),
            OpResult::Old(Some(b"1".to_vec()))
        );
        assert_eq!(db.get(b"k", 0).unwrap().value[..], b"1"[..]);
        assert_eq!(
            db.apply(entry(4, 0, set_op("k", "3", Expiry::Never, a, true))),
            OpResult::Old(Some(b"1".to_vec()))
        );
        assert_eq!(db.applied_index(), 4);
    }

    #[test]
    fn expiry_is_decided_by_entry_time_not_the_clock() {
        let mut db = Db::default();
        db.apply(entry(
            1,
            100,
            set_op("k", "v", Expiry::At(200), Condition::Always, false),
        ));
        assert!(db.get(b"k", 150).is_some());
        assert!(db.get(b"k", 200).is_none());
        // NX at ts 150: key still live, refused; at ts 250: expired, so missing, accepted.
        let nx = set_op("k", "w", Expiry::Never, Condition::IfMissing, false);
        assert_eq!(db.apply(entry(2, 150, nx.clone())), OpResult::NotSet);
        assert_eq!(db.apply(entry(3, 250, nx)), OpResult::Ok);
        assert_eq!(db.get(b"k", u64::MAX).unwrap().value[..], b"w"[..]);
        // KEEPTTL keeps the deadline.
        db.apply(entry(
            4,
            300,
            set_op("t", "1", Expiry::At(900), Condition::Always, false),
        ));
        db.apply(entry(
            5,
            300,
            set_op("t", "2", Expiry::Keep, Condition::Always, false),
        ));
        assert_eq!(db.get(b"t", 0).unwrap().expire_at, 900);
        // A deadline already past deletes.
        db.apply(entry(
            6,
            1000,
            set_op("t", "3", Expiry::At(999), Condition::Always, false),
        ));
        assert!(db.get(b"t", 0).is_none());
    }

    #[test]
    fn incr_rules() {
        let mut db = Db::default();
        let incr = |k: &str, d| Op::IncrBy {
            key: k.into(),
            delta: d,
        };
        assert_eq!(db.apply(entry(1, 0, incr("n", 5))), OpResult::Int(5));
        assert_eq!(db.apply(entry(2, 0, incr("n", -7))), OpResult::Int(-2));
        db.apply(entry(
            3,
            0,
            set_op("s", "abc", Expiry::Never, Condition::Always, false),
        ));
        assert_eq!(
            db.apply(entry(4, 0, incr("s", 1))),
            OpResult::Error(ERR_NOT_INTEGER)
        );
        db.apply(entry(5, 0, incr("m", i64::MAX)));
        assert_eq!(
            db.apply(entry(6, 0, incr("m", 1))),
            OpResult::Error(ERR_OVERFLOW)
        );
        assert_eq!(
            db.get(b"m", 0).unwrap().value[..],
            i64::MAX.to_string().as_bytes()[..]
        );
        for bad in ["", " 1", "+1", "01", "-0", "1.0", "99999999999999999999"] {
            assert_eq!(parse_i64(bad.as_bytes()), None, "{bad:?}");
        }
        assert_eq!(parse_i64(b"-9223372036854775808"), Some(i64::MIN));
    }

    #[test]
    fn del_and_msetnx() {
        let mut db = Db::default();
        let pairs = |ps: &[(&str, &str)]| {
            ps.iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect::<Vec<_>>()
        };
        let mset = |ps, nx| Op::MSet {
            pairs: ps,
            only_if_none_exist: nx,
        };
        assert_eq!(
            db.apply(entry(1, 0, mset(pairs(&[("a", "1"), ("b", "2")]), true))),
            OpResult::Int(1)
        );
        assert_eq!(
            db.apply(entry(2, 0, mset(pairs(&[("b", "3"), ("c", "4")]), true))),
            OpResult::Int(0)
        );
        assert!(db.get(b"c", 0).is_none());
        let del = Op::Del {
            keys: vec![b"a".to_vec(), b"a".to_vec(), b"zz".to_vec(), b"b".to_vec()],
        };
        assert_eq!(db.apply(entry(3, 0, del)), OpResult::Int(2));
        assert!(db.is_empty());
        assert_eq!(db.live_bytes(), 0);
    }

    #[test]
    fn live_bytes_tracks_overwrites() {
        let mut db = Db::default();
        db.apply(entry(
            1,
            0,
            set_op("k", "aaaa", Expiry::Never, Condition::Always, false),
        ));
        let one = db.live_bytes();
        db.apply(entry(
            2,
            0,
            set_op("k", "bbbb", Expiry::Never, Condition::Always, false),
        ));
        assert_eq!(db.live_bytes(), one);
        db.apply(entry(
            3,
            0,
            Op::Del {
                keys: vec![b"k".to_vec()],
            },
        ));
        assert_eq!(db.live_bytes(), 0);
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
        s.write(vec![set("a", 1_000_100), set("b", 1_000_200), set("c", 0)])
            .unwrap();
        // b's deadline is removed again: replay must not expire it.
        s.write(vec![Op::Cmd {
            args: vec![b"PERSIST".to_vec(), b"b".to_vec()],
        }])
        .unwrap();
        assert_eq!(s.expire_due(&[]).unwrap(), 0);
        now.store(1_000_100, Ordering::SeqCst);
        assert_eq!(s.get(b"a"), None, "expired at its deadline for readers");
        assert_eq!(s.len(), 3, "but still in memory until the expirer runs");
        now.store(1_000_500, Ordering::SeqCst);
        assert_eq!(s.expire_due(&[]).unwrap(), 1);
        assert_eq!(s.len(), 2);
        assert_eq!(s.read(|db| db.expired_keys), 1);
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
        s.write(ops).unwrap();
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
