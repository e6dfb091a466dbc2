//! The operation type: what a write becomes before it is logged, and what [`Db::apply`]
//! applies. Its byte codec lives here too, so the log stores an operation's bytes
//! without knowing what they mean.
//!
//! # How data enters and leaves
//!
//! The command layer builds an [`Op`] from a request (`commands.rs`, `strings.rs`,
//! `keyspace.rs`, `multi.rs`: relative times already made absolute, options already
//! checked); [`encode`] appends its bytes to a log record; at recovery, or on a follower,
//! [`decode`] reads them back, refusing damage (an unknown code, a count larger than the
//! record can hold, a nested transaction) with an error that says what is wrong, never
//! with a panic or an allocation sized by the damaged count.
//!
//! # Format
//!
//! ```text
//! op      := 0                                           Noop
//!          | 1 | flags u8 | [at u64] | key | value       Set (flags: expiry 0-1, condition
//!                                                          2-3, GET 4; `at` iff expiry At)
//!          | 2 | n u32 | key * n                          Del
//!          | 3 | nx u8 | n u32 | (key | value) * n        MSet
//!          | 4 | key | delta u64                          IncrBy
//!          | 5 | n u32 | arg * n                          Cmd (n > 0)
//!          | 6 | n u32 | (db u32 | op) * n                Multi (never nested)
//! key, value, arg := len u32 | bytes                      (integers little-endian)
//! ```

#[cfg(doc)]
use super::Db;
use byteorder::{ByteOrder, LittleEndian};

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
    /// (`db/exec.rs`). Like Redis's append-only file, this lets a new command reach the
    /// log without a new record type.
    Cmd {
        args: Vec<Vec<u8>>,
    },
    /// A MULTI/EXEC transaction: every op applied in order, as one entry, so that no other
    /// entry (and, on a cluster, no follower's view) falls between them. Each op carries
    /// the index of the database it addresses. Read-only commands queued in the
    /// transaction are here too, as canonical read commands (`db/reads.rs`), so that
    /// they see the state at their place inside it. Never nested.
    Multi {
        ops: Vec<(u32, Op)>,
    },
}

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

/// Appends the bytes of `op` to `p` (the tail of a log record).
pub fn encode(op: &Op, p: &mut Vec<u8>) {
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
                encode(op, p);
            }
        }
    }
}

/// Decodes the operation that fills `payload[at..]` (the tail of a log record, whose
/// first `at` bytes are the record's header). Positions in errors count from the start
/// of `payload`, so they point into the record; bytes left after the operation are an
/// error too.
pub fn decode(payload: &[u8], at: usize) -> Result<Op, String> {
    if at > payload.len() {
        return Err(format!(
            "record truncated at payload byte {}",
            payload.len()
        ));
    }
    let mut r = Reader {
        buf: payload,
        pos: at,
    };
    let op = decode_op(&mut r, true)?;
    r.done()?;
    Ok(op)
}

/// A cursor over a record that reports truncation instead of panicking.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ops() -> Vec<Op> {
        vec![
            Op::Noop,
            Op::Set {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                expiry: Expiry::At(u64::MAX),
                condition: Condition::IfMissing,
                get: true,
            },
            Op::Set {
                key: Vec::new(),
                value: Vec::new(),
                expiry: Expiry::Keep,
                condition: Condition::IfExists,
                get: false,
            },
            Op::Del {
                keys: vec![b"a".to_vec(), Vec::new()],
            },
            Op::MSet {
                pairs: vec![(b"a".to_vec(), b"1".to_vec())],
                only_if_none_exist: true,
            },
            Op::IncrBy {
                key: b"n".to_vec(),
                delta: i64::MIN,
            },
            Op::Cmd {
                args: vec![b"PERSIST".to_vec(), b"k".to_vec()],
            },
            Op::Multi {
                ops: vec![(3, Op::Noop), (u32::MAX, Op::Del { keys: vec![] })],
            },
        ]
    }

    /// Every operation reads back as written, after a header of any length (the record's
    /// own), and every cut of it is an error naming a place inside the record.
    #[test]
    fn every_op_round_trips_and_every_cut_is_refused() {
        for op in ops() {
            let mut p = b"header".to_vec();
            encode(&op, &mut p);
            assert_eq!(decode(&p, 6), Ok(op.clone()));
            for cut in 6..p.len() {
                assert!(decode(&p[..cut], 6).is_err(), "{op:?} cut at {cut}");
            }
            let mut longer = p.clone();
            longer.push(0);
            assert_eq!(
                decode(&longer, 6),
                Err("1 unexpected bytes after the record".to_string())
            );
        }
        assert_eq!(
            decode(b"\x02\x00", 0),
            Err("record truncated at payload byte 1".to_string())
        );
        assert!(decode(b"", 1).is_err());
    }

    /// Damage that could allocate or recurse is refused: a count larger than the record
    /// holds, an empty command, a nested transaction, unknown codes.
    #[test]
    fn damage_is_refused() {
        let nested = Op::Multi {
            ops: vec![(0, Op::Multi { ops: vec![] })],
        };
        let mut p = Vec::new();
        encode(&nested, &mut p);
        assert_eq!(decode(&p, 0), Err("nested transaction record".to_string()));
        let mut p = vec![2];
        p.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            decode(&p, 0),
            Err(format!("element count {} exceeds the record", u32::MAX))
        );
        let mut p = vec![5];
        p.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(decode(&p, 0), Err("empty command record".to_string()));
        assert_eq!(decode(&[9], 0), Err("unknown operation code 9".to_string()));
        assert_eq!(
            decode(&[1, 3, 0, 0, 0, 0, 0, 0, 0, 0], 0),
            Err("unknown expiry code 3".to_string())
        );
    }
}
