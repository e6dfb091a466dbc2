//! The reads a transaction logs: the canonical *read records* (`GET k`, `MGET k…`,
//! `TTL k`, …) that `multi.rs` queues for the read-only commands between MULTI and EXEC,
//! so that each answers with the state at its place inside the transaction.
//!
//! Data enters as a read record routed here by `exec.rs` (inside [`Db::apply`] of the
//! transaction's entry, with the entry's time as `now`) and leaves as an [`OpResult`];
//! nothing changes. A record's answer is computed as the command computes it outside a
//! transaction (`commands.rs`), so EXEC's reply matches what the command alone would
//! have said at that point of the log.

#[cfg(doc)]
use super::Db;
use super::exec::ERR_BAD_RECORD;
use super::{Keyspace, OpResult, parse_i64, substring};

/// Names of the canonical read records a transaction logs.
const READ_RECORDS: &[&str] = &[
    "DBSIZE",
    "EXISTS",
    "EXPIRETIME",
    "GET",
    "GETRANGE",
    "KEYS",
    "MGET",
    "PEXPIRETIME",
    "PTTL",
    "STRLEN",
    "TTL",
    "TYPE",
];

/// Whether `name` is a read record's (they change nothing: the watch registry skips them).
pub fn is_read_record(name: &[u8]) -> bool {
    READ_RECORDS.iter().any(|r| r.as_bytes() == name)
}

impl Keyspace {
    /// Applies a read record at the transaction's time `now`: the answer the command
    /// would give at that point of the log. Changes nothing. (Also how a cluster
    /// follower answers a READONLY connection's read-only transaction from its local
    /// copy, without logging it: `src/multi.rs`.)
    pub fn exec_read(&self, args: &[Vec<u8>], now: u64) -> OpResult {
        let bad = OpResult::Error(ERR_BAD_RECORD);
        let Some((name, rest)) = args.split_first() else {
            return bad;
        };
        let value = |k: &[u8]| self.get(k, now).map(|i| i.value.to_vec());
        match (name.as_slice(), rest) {
            (b"GET", [k]) => OpResult::Old(value(k)),
            (b"MGET", keys) => {
                OpResult::Array(keys.iter().map(|k| OpResult::Old(value(k))).collect())
            }
            (b"EXISTS", keys) => {
                OpResult::Int(keys.iter().filter(|k| self.get(k, now).is_some()).count() as i64)
            }
            (b"STRLEN", [k]) => OpResult::Int(self.get(k, now).map_or(0, |i| i.value.len()) as i64),
            (b"TYPE", [k]) => OpResult::Status(if self.get(k, now).is_some() {
                "string"
            } else {
                "none"
            }),
            (b"TTL" | b"PTTL" | b"EXPIRETIME" | b"PEXPIRETIME", [k]) => {
                OpResult::Int(match self.get(k, now).map(|i| i.expire_at) {
                    None => -2,
                    Some(0) => -1,
                    // As the commands compute it outside a transaction (commands.rs).
                    Some(at) => match name.as_slice() {
                        b"TTL" => ((at - now + 500) / 1000) as i64,
                        b"PTTL" => (at - now) as i64,
                        b"EXPIRETIME" => ((at + 500) / 1000) as i64,
                        _ => at as i64,
                    },
                })
            }
            (b"GETRANGE", [k, start, end]) => match (parse_i64(start), parse_i64(end)) {
                (Some(start), Some(end)) => OpResult::Old(Some(
                    self.get(k, now)
                        .map_or(&[][..], |i| substring(&i.value, start, end))
                        .to_vec(),
                )),
                _ => bad,
            },
            (b"DBSIZE", []) => OpResult::Int(self.len() as i64),
            (b"KEYS", [pattern]) => OpResult::Array(
                self.iter(now)
                    .filter(|(k, _)| crate::glob::glob_match(pattern, k, false))
                    .map(|(k, _)| OpResult::Old(Some(k.to_vec())))
                    .collect(),
            ),
            _ => bad,
        }
    }
}
