//! Deterministic execution of logged commands ([`Op::Cmd`](super::Op::Cmd)).
//!
//! A write that has no record type of its own reaches the log as a *canonical command*:
//! the dispatcher (`commands.rs`) has already validated it, made every relative time
//! absolute (`EXPIRE k 10` is logged as `PEXPIREAT k <unix ms>`), and normalised its
//! options. Applying it here depends only on the map and on the entry's timestamp `now`
//! (the leader's clock when it accepted the write), never on the local clock, so a
//! restart or a follower replaying the log reaches exactly the same state.
//!
//! Every function here runs under the map lock, inside [`Db::apply`] (on the entry's
//! database; commands that span databases go to `keyspace.rs` instead); arguments come from
//! our own log, but are still checked, because a damaged or foreign log must produce an
//! error result, not a panic. [`Keyspace::exec`] names the file that applies each
//! family; the expiry commands (EXPIRED, PEXPIREAT, PERSIST) are here.

#[cfg(doc)]
use super::Db;
use super::{Keyspace, OpResult};

/// The result of a logged command whose arguments do not parse (a damaged or foreign log).
pub(super) const ERR_BAD_RECORD: &str = "ERR malformed command in the log";

fn parse_u64(b: &[u8]) -> Option<u64> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

impl Keyspace {
    /// Applies one canonical command at time `now`.
    pub(super) fn exec(&mut self, args: Vec<Vec<u8>>, now: u64) -> OpResult {
        let Some(name) = args.first() else {
            return OpResult::Error(ERR_BAD_RECORD);
        };
        match name.as_slice() {
            b"EXPIRED" => self.exec_expired(&args[1..], now),
            b"PEXPIREAT" => self.exec_pexpireat(&args[1..], now),
            b"PERSIST" => self.exec_persist(&args[1..], now),
            b"APPEND" | b"SETRANGE" | b"GETDEL" | b"GETEX" | b"INCRBYFLOAT" => {
                self.exec_string(&args, now)
            }
            b"RENAME" | b"RENAMENX" | b"COPY" | b"FLUSHDB" | b"FLUSHALL" => {
                self.exec_keyspace(&args, now)
            }
            // Reads inside a transaction (`reads.rs`).
            n if super::is_read_record(n) => self.exec_read(&args, now),
            _ => OpResult::Error("ERR unknown command in the log (written by a newer kvstore?)"),
        }
    }

    /// `EXPIRED key…`: the leader's decision that these keys have expired. Each is deleted
    /// only if it is still expired at the entry's time: a key given a new value or a new
    /// deadline after the decision was taken is left alone.
    fn exec_expired(&mut self, keys: &[Vec<u8>], now: u64) -> OpResult {
        let mut n = 0;
        for k in keys {
            if self.map.get(&k[..]).is_some_and(|i| i.expired(now)) {
                self.remove(k);
                self.expired_keys += 1;
                n += 1;
            }
        }
        OpResult::Int(n)
    }

    /// `PEXPIREAT key unix-ms [NX|XX|GT|LT]`: 1 if the deadline was set (or, being past,
    /// deleted the key), 0 if the key is missing or the condition failed.
    fn exec_pexpireat(&mut self, args: &[Vec<u8>], now: u64) -> OpResult {
        let (Some(key), Some(at)) = (args.first(), args.get(1).and_then(|a| parse_u64(a))) else {
            return OpResult::Error(ERR_BAD_RECORD);
        };
        self.purge_expired(key, now);
        let Some(current) = self.map.get(&key[..]).map(|i| i.expire_at) else {
            return OpResult::Int(0);
        };
        // A key without a deadline lives forever: "greater than" never holds for it, and
        // "less than" always does.
        let allowed = match args.get(2).map(|c| c.as_slice()) {
            None => true,
            Some(b"NX") => current == 0,
            Some(b"XX") => current != 0,
            Some(b"GT") => current != 0 && at > current,
            Some(b"LT") => current == 0 || at < current,
            Some(_) => return OpResult::Error(ERR_BAD_RECORD),
        };
        if !allowed {
            return OpResult::Int(0);
        }
        if at <= now {
            self.remove(key);
        } else {
            self.set_expiry(key, at);
        }
        OpResult::Int(1)
    }

    /// `PERSIST key`: 1 if a deadline was removed.
    fn exec_persist(&mut self, args: &[Vec<u8>], now: u64) -> OpResult {
        let Some(key) = args.first() else {
            return OpResult::Error(ERR_BAD_RECORD);
        };
        self.purge_expired(key, now);
        match self.map.get(&key[..]) {
            Some(i) if i.expire_at != 0 => {
                self.set_expiry(key, 0);
                OpResult::Int(1)
            }
            _ => OpResult::Int(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::db::{Condition, Expiry, Keyspace, Op, OpResult};

    fn run(db: &mut Keyspace, _index: u64, now: u64, op: Op) -> OpResult {
        db.apply_op(op, now)
    }

    fn cmd(parts: &[&str]) -> Op {
        Op::Cmd {
            args: parts.iter().map(|p| p.as_bytes().to_vec()).collect(),
        }
    }

    fn set(k: &str, expiry: Expiry) -> Op {
        Op::Set {
            key: k.into(),
            value: b"v".to_vec(),
            expiry,
            condition: Condition::Always,
            get: false,
        }
    }

    #[test]
    fn pexpireat_conditions() {
        let mut db = Keyspace::default();
        run(&mut db, 1, 100, set("p", Expiry::Never));
        run(&mut db, 2, 100, set("v", Expiry::At(1000)));
        let mut i = 3;
        let mut e = |db: &mut Keyspace, parts: &[&str]| {
            i += 1;
            run(db, i, 100, cmd(parts))
        };
        assert_eq!(
            e(&mut db, &["PEXPIREAT", "missing", "500"]),
            OpResult::Int(0)
        );
        // NX: only without a deadline.
        assert_eq!(
            e(&mut db, &["PEXPIREAT", "v", "500", "NX"]),
            OpResult::Int(0)
        );
        // XX: only with one.
        assert_eq!(
            e(&mut db, &["PEXPIREAT", "p", "500", "XX"]),
            OpResult::Int(0)
        );
        // GT never holds for a key without a deadline; LT always does.
        assert_eq!(
            e(&mut db, &["PEXPIREAT", "p", "500", "GT"]),
            OpResult::Int(0)
        );
        assert_eq!(
            e(&mut db, &["PEXPIREAT", "v", "900", "GT"]),
            OpResult::Int(0)
        );
        assert_eq!(
            e(&mut db, &["PEXPIREAT", "v", "2000", "GT"]),
            OpResult::Int(1)
        );
        assert_eq!(db.get(b"v", 0).map(|i| i.expire_at), Some(2000));
        assert_eq!(
            e(&mut db, &["PEXPIREAT", "v", "3000", "LT"]),
            OpResult::Int(0)
        );
        assert_eq!(
            e(&mut db, &["PEXPIREAT", "p", "3000", "LT"]),
            OpResult::Int(1)
        );
        assert_eq!(db.expiring(), 2);
        // A deadline in the past deletes.
        assert_eq!(e(&mut db, &["PEXPIREAT", "p", "50"]), OpResult::Int(1));
        assert!(db.get(b"p", 0).is_none());
        assert_eq!(db.expiring(), 1);
    }

    #[test]
    fn persist_and_index() {
        let mut db = Keyspace::default();
        run(&mut db, 1, 0, set("k", Expiry::At(1000)));
        assert_eq!(db.expiring(), 1);
        assert_eq!(run(&mut db, 2, 0, cmd(&["PERSIST", "k"])), OpResult::Int(1));
        assert_eq!(run(&mut db, 3, 0, cmd(&["PERSIST", "k"])), OpResult::Int(0));
        assert_eq!(db.expiring(), 0);
        assert!(db.get(b"k", 5000).is_some());
    }

    #[test]
    fn expired_deletes_only_what_is_still_expired() {
        let mut db = Keyspace::default();
        run(&mut db, 1, 0, set("a", Expiry::At(100)));
        run(&mut db, 2, 0, set("b", Expiry::At(100)));
        // b was given a new value without a deadline after the decision was taken.
        run(&mut db, 3, 50, set("b", Expiry::Never));
        assert_eq!(
            run(&mut db, 4, 150, cmd(&["EXPIRED", "a", "b", "zzz"])),
            OpResult::Int(1)
        );
        assert!(db.get(b"b", u64::MAX).is_some());
        assert_eq!(db.len(), 1);
        assert_eq!(db.expiring(), 0);
        assert_eq!(db.expired_keys, 1);
        assert_eq!(db.due(u64::MAX, 10), Vec::<Vec<u8>>::new());
    }

    #[test]
    fn index_follows_every_path() {
        let mut db = Keyspace::default();
        run(&mut db, 1, 0, set("k", Expiry::At(100)));
        run(&mut db, 2, 0, set("k", Expiry::At(200)));
        assert_eq!(db.due(u64::MAX, 10), vec![b"k".to_vec()]);
        run(&mut db, 3, 0, set("k", Expiry::Keep));
        assert_eq!(db.expiring(), 1);
        run(
            &mut db,
            4,
            0,
            Op::MSet {
                pairs: vec![(b"k".to_vec(), b"x".to_vec())],
                only_if_none_exist: false,
            },
        );
        assert_eq!(db.expiring(), 0, "MSET clears the deadline");
        run(&mut db, 5, 0, set("k", Expiry::At(300)));
        run(
            &mut db,
            6,
            0,
            Op::Del {
                keys: vec![b"k".to_vec()],
            },
        );
        assert_eq!(db.expiring(), 0);
    }
}
