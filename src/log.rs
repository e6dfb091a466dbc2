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
    /// with it are kept; the rest of the log is dropped. Durable when it returns.
    fn install_snapshot(&mut self, index: u64, epoch: u64, data: &[u8]) -> Result<(), LogError>;
}
