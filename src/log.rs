//! Log storage as the node sees it: a sequence of entries (index, epoch, opaque payload)
//! plus the little metadata that safety rests on, behind one small trait.
//!
//! The replication node (`replication.rs`, `bully.rs`) and the apply loop read and write
//! the log only through [`LogStore`]. Two implementations: the real segment files
//! (`wal.rs`) and [`MemLog`], an in-memory log for the node's golden-script tests and the
//! simulator, whose crash model keeps what was synced and loses the rest.
//!
//! The log does not know what a payload means: the state machine encodes its operations
//! into payloads and decodes them when it applies them. An empty payload is a no-op entry
//! (what a new leader appends in its own epoch).
//!
//! Entries enter through [`LogStore::append`] (written, durable only after
//! [`LogStore::sync`]) and leave through [`LogStore::read`]. [`LogStore::save_meta`] is
//! durable when it returns: the epoch and the coordinator accepted in it are persisted
//! before any message that depends on them is sent.

pub use crate::wal::Meta;
pub use crate::wal::WalError as LogError;

/// One log entry as stored and replicated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub index: u64,
    /// The epoch of the leader that created the entry.
    pub epoch: u64,
    /// The state machine's encoding of the operation; empty for a no-op.
    pub payload: Vec<u8>,
}

/// What the node needs from a log.
pub trait LogStore: Send {
    /// Index and epoch of the last entry; of the snapshot the log starts after when it
    /// holds no entry; `(0, 0)` for a new log.
    fn last(&self) -> (u64, u64);

    /// Index and epoch of the newest snapshot (`(0, 0)`: none). Entries up to its index
    /// are no longer held one by one.
    fn snapshot(&self) -> (u64, u64);

    /// The epoch of the entry at `index`: the snapshot's own index answers with the
    /// snapshot's epoch, index 0 with 0; `None` if the log does not hold it (compacted
    /// away, or past the end).
    fn epoch_at(&self, index: u64) -> Result<Option<u64>, LogError>;

    /// Entries from `from` on, in order: as many as fit in `max_bytes` of payload, but at
    /// least one if any exists. Empty when `from` is past the end. `from` at or below the
    /// snapshot index is an error (the caller must send the snapshot instead).
    fn read(&self, from: u64, max_bytes: usize) -> Result<Vec<LogEntry>, LogError>;

    /// Appends `entries`; the first must be at `last().0 + 1` and the indexes consecutive.
    /// Written, not yet durable: see [`LogStore::sync`].
    fn append(&mut self, entries: &[LogEntry]) -> Result<(), LogError>;

    /// Drops every entry after `index` (a follower's divergent suffix). Durable when it
    /// returns. Never called below the commit index.
    fn truncate_after(&mut self, index: u64) -> Result<(), LogError>;

    /// Makes everything appended durable.
    fn sync(&mut self) -> Result<(), LogError>;

    /// The last index known durable (what a power cut would keep).
    fn durable_index(&self) -> u64;

    /// The metadata as last saved.
    fn meta(&self) -> Meta;

    /// Replaces the metadata; durable when it returns.
    fn save_meta(&mut self, meta: Meta) -> Result<(), LogError>;

    /// Replaces everything up to `index` with a snapshot taken at (`index`, `epoch`) whose
    /// bytes are `data` (the state machine's encoding). Entries after `index` that agree
    /// with it are kept; the rest of the log is dropped, and if the log disagreed at
    /// `index`, the commit index in meta drops to `index` (what it had committed past the
    /// snapshot is lost: only an async failover gets there). Refused for a snapshot older
    /// than the log's own. Durable when it returns.
    fn install_snapshot(&mut self, index: u64, epoch: u64, data: &[u8]) -> Result<(), LogError>;
}

/// An in-memory [`LogStore`] for the node's tests and the simulator.
///
/// It keeps two views: what was written (every call takes effect at once, as the page
/// cache would) and what is durable: entries up to [`MemLog::durable_index`] (advanced by
/// [`LogStore::sync`]), the last saved meta and the last installed snapshot. [`MemLog::crash`]
/// drops everything that was not durable, which is what a power cut does to the real log.
/// [`LogStore::truncate_after`], [`LogStore::save_meta`] and
/// [`LogStore::install_snapshot`] are durable when they return, as the trait says.
#[derive(Debug, Clone, Default)]
pub struct MemLog {
    /// Entries after the snapshot, in index order (`entries[0].index == snap.0 + 1`).
    entries: Vec<LogEntry>,
    /// Index and epoch of the snapshot the entries follow (`(0, 0)`: none).
    snap: (u64, u64),
    /// The snapshot's bytes, as the state machine gave them.
    snap_data: Vec<u8>,
    /// Entries up to here survive a crash.
    durable: u64,
    meta: Meta,
}

impl MemLog {
    /// An empty log with default meta.
    pub fn new() -> MemLog {
        MemLog::default()
    }

    /// Loses whatever was not synced: entries past [`LogStore::durable_index`] are gone.
    /// The meta and the snapshot are kept (both are durable when saved).
    pub fn crash(&mut self) {
        let keep = self.durable.saturating_sub(self.snap.0);
        let keep = usize::try_from(keep).unwrap_or(usize::MAX);
        self.entries.truncate(keep);
    }

    /// The snapshot's bytes (empty when there is none).
    pub fn snapshot_data(&self) -> &[u8] {
        &self.snap_data
    }

    /// Every entry held one by one (after the snapshot).
    pub fn entries(&self) -> &[LogEntry] {
        &self.entries
    }

    /// A request the log refuses with nothing changed (as the real log does).
    fn misuse(what: String) -> LogError {
        LogError::Refused(what)
    }

    /// Position of `index` in `entries`, if held.
    fn pos(&self, index: u64) -> Option<usize> {
        if index <= self.snap.0 {
            return None;
        }
        let at = usize::try_from(index - self.snap.0 - 1).ok()?;
        (at < self.entries.len()).then_some(at)
    }
}

impl LogStore for MemLog {
    fn last(&self) -> (u64, u64) {
        match self.entries.last() {
            Some(e) => (e.index, e.epoch),
            None => self.snap,
        }
    }

    fn snapshot(&self) -> (u64, u64) {
        self.snap
    }

    fn epoch_at(&self, index: u64) -> Result<Option<u64>, LogError> {
        if index == 0 {
            return Ok(Some(0));
        }
        if index == self.snap.0 {
            return Ok(Some(self.snap.1));
        }
        Ok(self.pos(index).map(|at| self.entries[at].epoch))
    }

    fn read(&self, from: u64, max_bytes: usize) -> Result<Vec<LogEntry>, LogError> {
        if from <= self.snap.0 {
            return Err(Self::misuse(format!(
                "read from {from}: compacted into the snapshot at {}",
                self.snap.0
            )));
        }
        let Some(start) = self.pos(from) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for e in &self.entries[start..] {
            bytes = bytes.saturating_add(e.payload.len());
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push(e.clone());
        }
        Ok(out)
    }

    fn append(&mut self, entries: &[LogEntry]) -> Result<(), LogError> {
        for (next, e) in (self.last().0 + 1..).zip(entries) {
            if e.index != next {
                return Err(Self::misuse(format!(
                    "append at {} but the next index is {next}",
                    e.index
                )));
            }
        }
        self.entries.extend_from_slice(entries);
        Ok(())
    }

    fn truncate_after(&mut self, index: u64) -> Result<(), LogError> {
        if index < self.snap.0 {
            return Err(Self::misuse(format!(
                "truncate after {index}: below the snapshot at {}",
                self.snap.0
            )));
        }
        if index < self.meta.commit_index {
            return Err(Self::misuse(format!(
                "truncate after {index}: below the commit index {}",
                self.meta.commit_index
            )));
        }
        let keep = usize::try_from(index - self.snap.0).unwrap_or(usize::MAX);
        self.entries.truncate(keep);
        self.durable = self.durable.min(index);
        Ok(())
    }

    fn sync(&mut self) -> Result<(), LogError> {
        self.durable = self.last().0;
        Ok(())
    }

    fn durable_index(&self) -> u64 {
        self.durable
    }

    fn meta(&self) -> Meta {
        self.meta
    }

    fn save_meta(&mut self, meta: Meta) -> Result<(), LogError> {
        self.meta = meta;
        Ok(())
    }

    fn install_snapshot(&mut self, index: u64, epoch: u64, data: &[u8]) -> Result<(), LogError> {
        if index < self.snap.0 || (index == self.snap.0 && epoch != self.snap.1) {
            return Err(Self::misuse(format!(
                "a snapshot at index {index} would replace the newer one at {}",
                self.snap.0
            )));
        }
        if index == self.snap.0 {
            return Ok(());
        }
        let agrees = self.epoch_at(index)? == Some(epoch);
        if agrees {
            let drop = usize::try_from(index - self.snap.0).unwrap_or(usize::MAX);
            self.entries.drain(..drop.min(self.entries.len()));
        } else {
            self.entries.clear();
            // The snapshot replaces a log that disagrees with it: whatever this log had
            // committed past it is lost (an async failover), so the commit index restarts
            // from the snapshot.
            self.meta.commit_index = self.meta.commit_index.min(index);
        }
        self.snap = (index, epoch);
        self.snap_data = data.to_vec();
        self.durable = self.durable.min(self.last().0).max(index);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The in-memory log keeps the contract the real one keeps (`wal.rs`'s suite): the
    /// simulator and the node's scripts then test what the product runs. A reopen is a
    /// crash that keeps what was synced.
    #[test]
    fn the_mem_log_keeps_the_log_store_contract() {
        crate::wal::log_store_contract(|log: Option<MemLog>| match log {
            None => MemLog::new(),
            Some(mut log) => {
                log.crash();
                log
            }
        });
    }

    fn entry(index: u64, epoch: u64, payload: &str) -> LogEntry {
        LogEntry {
            index,
            epoch,
            payload: payload.as_bytes().to_vec(),
        }
    }

    fn log_with(n: u64) -> MemLog {
        let mut log = MemLog::new();
        let entries: Vec<_> = (1..=n).map(|i| entry(i, 1, "x")).collect();
        log.append(&entries).expect("append");
        log
    }

    #[test]
    fn empty_log() {
        let log = MemLog::new();
        assert_eq!(log.last(), (0, 0));
        assert_eq!(log.snapshot(), (0, 0));
        assert_eq!(log.epoch_at(0).expect("epoch"), Some(0));
        assert_eq!(log.epoch_at(1).expect("epoch"), None);
        assert!(log.read(1, 100).expect("read").is_empty());
        assert_eq!(log.durable_index(), 0);
        assert_eq!(log.meta(), Meta::default());
    }

    #[test]
    fn append_read_and_gaps() {
        let mut log = log_with(3);
        assert_eq!(log.last(), (3, 1));
        assert!(log.append(&[entry(5, 1, "gap")]).is_err());
        assert!(log.append(&[entry(3, 1, "dup")]).is_err());
        log.append(&[entry(4, 2, "y")]).expect("append");
        assert_eq!(log.epoch_at(4).expect("epoch"), Some(2));
        let all = log.read(2, usize::MAX).expect("read");
        assert_eq!(all.iter().map(|e| e.index).collect::<Vec<_>>(), [2, 3, 4]);
        // max_bytes bounds the batch, but one entry is always returned.
        assert_eq!(log.read(1, 0).expect("read").len(), 1);
        assert_eq!(log.read(1, 2).expect("read").len(), 2);
        assert!(log.read(9, 10).expect("read").is_empty());
        assert!(log.read(0, 10).is_err(), "index 0 is below every entry");
    }

    #[test]
    fn crash_keeps_only_synced_entries_and_meta() {
        let mut log = log_with(2);
        log.sync().expect("sync");
        log.append(&[entry(3, 1, "lost")]).expect("append");
        let meta = Meta {
            epoch: 4,
            voted_for: 2,
            commit_index: 1,
        };
        log.save_meta(meta).expect("meta");
        assert_eq!(log.durable_index(), 2);
        log.crash();
        assert_eq!(log.last(), (2, 1));
        assert_eq!(log.meta(), meta);
        // Appending after a crash continues from the durable end.
        log.append(&[entry(3, 2, "new")]).expect("append");
        assert_eq!(log.last(), (3, 2));
    }

    #[test]
    fn truncate_is_durable_and_lowers_durable_index() {
        let mut log = log_with(4);
        log.sync().expect("sync");
        log.truncate_after(2).expect("truncate");
        assert_eq!(log.last(), (2, 1));
        assert_eq!(log.durable_index(), 2);
        log.crash();
        assert_eq!(log.last(), (2, 1));
    }

    #[test]
    fn snapshot_keeps_an_agreeing_tail() {
        let mut log = log_with(5);
        log.sync().expect("sync");
        log.install_snapshot(3, 1, b"state").expect("snapshot");
        assert_eq!(log.snapshot(), (3, 1));
        assert_eq!(log.last(), (5, 1));
        assert_eq!(log.epoch_at(3).expect("epoch"), Some(1));
        assert_eq!(log.epoch_at(2).expect("epoch"), None, "compacted");
        assert!(
            log.read(3, 10).is_err(),
            "compacted entries are not readable"
        );
        assert_eq!(log.read(4, 10).expect("read").len(), 2);
        assert_eq!(log.snapshot_data(), b"state");
        assert!(log.truncate_after(2).is_err(), "below the snapshot");
        log.crash();
        assert_eq!(log.last(), (5, 1));
    }

    #[test]
    fn snapshot_that_disagrees_replaces_the_log() {
        let mut log = log_with(2);
        log.install_snapshot(6, 3, b"leader's").expect("snapshot");
        assert_eq!(log.last(), (6, 3));
        assert!(log.entries().is_empty());
        assert_eq!(log.durable_index(), 6);
        log.append(&[entry(7, 3, "next")])
            .expect("append after snapshot");
        assert_eq!(log.read(7, 10).expect("read").len(), 1);
    }
}
