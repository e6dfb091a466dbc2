//! What the state machine logs: a [`Command`] is an operation with the database it
//! addresses and the leader's clock when it was accepted. The log (`wal.rs`) stores a
//! command's bytes as an opaque payload; only this module knows their layout.
//!
//! # How data enters and leaves
//!
//! The store builds a command for each queued write and [`Command::encode`]s it straight
//! into the log's batch buffer (one copy of each value). Recovery, the apply loop and a
//! follower get payloads back from the log and [`Command::decode`] them; [`Db::apply`]
//! applies the result. An empty payload is the log's no-op entry (what a new leader
//! appends in its own epoch): it decodes as [`Command::noop`], which changes nothing but
//! the applied index.
//!
//! # Format
//!
//! ```text
//! payload := ts_ms u64 | db u32 | op          (op: see `op.rs`; integers little-endian)
//!          | (empty)                          a no-op entry
//! ```
//!
//! With the log's own header (`version 2 | index | epoch`) in front, these are exactly
//! the bytes log format 2 has always written, so existing logs read unchanged. Positions
//! in decoding errors count from the start of the payload.

#[cfg(doc)]
use super::Db;
use super::op::{self, Op};

/// Bytes of a payload's fixed header (`ts_ms`, `db`).
const HEADER: usize = 12;

/// One logged write, as the state machine applies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// The leader's wall clock (Unix ms) when it accepted the write: applying uses it in
    /// place of the local clock, so that replay and followers decide expiry alike.
    pub ts_ms: u64,
    /// The database (`SELECT` index) `op` applies to. Commands that span databases name
    /// the others in their arguments; a transaction's ops name their own.
    pub db: u32,
    pub op: Op,
}

impl Command {
    /// What an empty payload (the log's no-op entry) decodes to.
    pub fn noop() -> Command {
        Command {
            ts_ms: 0,
            db: 0,
            op: Op::Noop,
        }
    }

    /// Appends the command's payload bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.ts_ms.to_le_bytes());
        out.extend_from_slice(&self.db.to_le_bytes());
        op::encode(&self.op, out);
    }

    /// Decodes a payload; damage is an error naming the byte position in the payload
    /// (never a panic, never an allocation sized by a damaged count).
    pub fn decode(payload: &[u8]) -> Result<Command, String> {
        if payload.is_empty() {
            return Ok(Command::noop());
        }
        if payload.len() < HEADER {
            return Err(format!(
                "record truncated at payload byte {}",
                payload.len()
            ));
        }
        let mut ts = [0; 8];
        ts.copy_from_slice(&payload[..8]);
        let mut db = [0; 4];
        db.copy_from_slice(&payload[8..HEADER]);
        Ok(Command {
            ts_ms: u64::from_le_bytes(ts),
            db: u32::from_le_bytes(db),
            op: op::decode(payload, HEADER)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{Condition, Expiry};

    #[test]
    fn commands_round_trip_and_damage_is_refused() {
        let c = Command {
            ts_ms: 0x0102_0304_0506_0708,
            db: 15,
            op: Op::Set {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                expiry: Expiry::At(9),
                condition: Condition::Always,
                get: false,
            },
        };
        let mut p = Vec::new();
        c.encode(&mut p);
        assert_eq!(&p[..8], &c.ts_ms.to_le_bytes());
        assert_eq!(&p[8..12], &15u32.to_le_bytes());
        assert_eq!(Command::decode(&p), Ok(c));
        for cut in 1..p.len() {
            assert!(Command::decode(&p[..cut]).is_err(), "cut at {cut}");
        }
        assert_eq!(
            Command::decode(&p[..5]),
            Err("record truncated at payload byte 5".to_string())
        );
        // The empty payload is the log's no-op entry.
        assert_eq!(Command::decode(&[]), Ok(Command::noop()));
        let mut bad = Vec::new();
        Command::noop().encode(&mut bad);
        bad[HEADER] = 9;
        assert_eq!(
            Command::decode(&bad),
            Err("unknown operation code 9".to_string())
        );
    }
}
