//! The string family's apply side: APPEND, SETRANGE, GETDEL, GETEX and INCRBYFLOAT as
//! logged (`strings.rs` at the crate root parses the requests into these canonical
//! commands and explains the forms), and the limits and arithmetic that both sides share.
//!
//! Data enters as a canonical command routed here by `exec.rs` with the entry's time as
//! `now`, and leaves as an [`OpResult`]. Every argument is checked again, because a
//! damaged or foreign log must give an error result, never a panic or a huge allocation.
//!
//! A string may not grow past [`MAX_STRING_LEN`] (512 MiB, Redis's default
//! `proto-max-bulk-len`). It is a constant rather than the server's setting because
//! APPEND's check depends on the stored value and so runs when the entry is applied, and
//! applying must give the same answer on every node whatever its configuration.

use super::exec::ERR_BAD_RECORD;
use super::{Item, Keyspace, OpResult};

/// The longest string APPEND and SETRANGE may build (Redis's default
/// `proto-max-bulk-len`).
pub const MAX_STRING_LEN: usize = 512 << 20;

/// APPEND or SETRANGE would pass [`MAX_STRING_LEN`].
pub const ERR_TOO_BIG: &str = "ERR string exceeds maximum allowed size (proto-max-bulk-len)";

/// Whether a string of `prefix + extra` bytes stays within [`MAX_STRING_LEN`].
pub fn fits(prefix: u64, extra: usize) -> bool {
    prefix
        .checked_add(extra as u64)
        .is_some_and(|n| n <= MAX_STRING_LEN as u64)
}

/// GETRANGE's arithmetic as Redis 7 does it: negative offsets count from the end, both
/// ends are clamped into the string, and an empty range gives an empty string. Two
/// negative offsets in the wrong order give nothing, but a range reaching before the start
/// is clamped to the first byte (`-100 -50` on "Hello" is "H"; Redis 8 changed that to "").
pub fn substring(v: &[u8], start: i64, end: i64) -> &[u8] {
    let len = v.len() as i64;
    if start < 0 && end < 0 && start > end {
        return &[];
    }
    // A negative offset plus a length (< 2^63) cannot overflow.
    let start = if start < 0 { len + start } else { start }.max(0);
    let end = if end < 0 { len + end } else { end }.max(0).min(len - 1);
    if len == 0 || start > end {
        return &[];
    }
    &v[start as usize..=end as usize]
}

fn parse_usize(b: &[u8]) -> Option<usize> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

impl Keyspace {
    /// Applies a canonical string command (`args[0]` is its upper-case name) at the
    /// entry's time `now`. Deterministic: depends only on the map, `args` and `now`.
    pub(super) fn exec_string(&mut self, args: &[Vec<u8>], now: u64) -> OpResult {
        let Some((name, rest)) = args.split_first() else {
            return OpResult::Error(ERR_BAD_RECORD);
        };
        match (name.as_slice(), rest) {
            (b"APPEND", [key, value]) => self.exec_append(key, value, now),
            (b"SETRANGE", [key, offset, value]) => match parse_usize(offset) {
                Some(offset) => self.exec_setrange(key, offset, value, now),
                None => OpResult::Error(ERR_BAD_RECORD),
            },
            (b"GETDEL", [key]) => {
                self.purge_expired(key, now);
                OpResult::Old(self.remove(key).map(|i| i.value.into_vec()))
            }
            (b"GETEX", [key, opts @ ..]) => self.exec_getex(key, opts, now),
            (b"INCRBYFLOAT", [key, incr]) => self.exec_incrbyfloat(key, incr, now),
            _ => OpResult::Error(ERR_BAD_RECORD),
        }
    }

    /// `INCRBYFLOAT key increment`: the new value as Redis formats it (a bulk string),
    /// stored as that text; keeps the key's deadline. Computed here, from the logged
    /// increment, with the same arithmetic on every node (see `float.rs`).
    fn exec_incrbyfloat(&mut self, key: &[u8], incr: &[u8], now: u64) -> OpResult {
        self.purge_expired(key, now);
        let (current, expire_at) = match self.map.get(key) {
            Some(i) => (Some(&i.value[..]), i.expire_at),
            None => (None, 0),
        };
        match crate::float::incr_by_float(current, incr) {
            Ok((_, text)) => {
                self.insert(
                    key.into(),
                    Item {
                        value: text.clone().into_boxed_slice(),
                        expire_at,
                    },
                );
                OpResult::Old(Some(text))
            }
            Err(e) => OpResult::Error(e),
        }
    }

    /// `APPEND key value`: the new length. Creates the key (without a deadline) if
    /// missing; keeps an existing key's deadline.
    fn exec_append(&mut self, key: &[u8], value: &[u8], now: u64) -> OpResult {
        self.purge_expired(key, now);
        let current = self.map.get(key).map_or(0, |i| i.value.len());
        if !fits(current as u64, value.len()) {
            return OpResult::Error(ERR_TOO_BIG);
        }
        if self.map.contains_key(key) {
            let n = self.edit_value(key, |v| v.extend_from_slice(value));
            return OpResult::Int(n as i64);
        }
        self.insert(
            key.into(),
            Item {
                value: value.into(),
                expire_at: 0,
            },
        );
        OpResult::Int(value.len() as i64)
    }

    /// `SETRANGE key offset value`: the new length. An empty value changes nothing (and
    /// creates nothing); otherwise the string is zero-padded up to `offset` as needed.
    /// Keeps an existing key's deadline.
    fn exec_setrange(&mut self, key: &[u8], offset: usize, value: &[u8], now: u64) -> OpResult {
        self.purge_expired(key, now);
        let current = self.map.get(key).map(|i| i.value.len());
        if value.is_empty() {
            return OpResult::Int(current.unwrap_or(0) as i64);
        }
        if !fits(offset as u64, value.len()) {
            return OpResult::Error(ERR_TOO_BIG);
        }
        let end = offset + value.len();
        if current.is_some() {
            let n = self.edit_value(key, |v| {
                if v.len() < end {
                    v.resize(end, 0);
                }
                v[offset..end].copy_from_slice(value);
            });
            return OpResult::Int(n as i64);
        }
        let mut v = vec![0; end];
        v[offset..].copy_from_slice(value);
        self.insert(
            key.into(),
            Item {
                value: v.into_boxed_slice(),
                expire_at: 0,
            },
        );
        OpResult::Int(end as i64)
    }

    /// `GETEX key [PXAT unix-ms | PERSIST]`: the value (nil if missing), then the deadline
    /// change. A deadline at or before the entry's time deletes the key, as Redis does
    /// for EXAT/PXAT in the past.
    fn exec_getex(&mut self, key: &[u8], opts: &[Vec<u8>], now: u64) -> OpResult {
        enum Change {
            None,
            Persist,
            At(u64),
        }
        let change = match opts {
            [] => Change::None,
            [p] if p == b"PERSIST" => Change::Persist,
            [p, at] if p == b"PXAT" => match parse_usize(at) {
                Some(at) => Change::At(at as u64),
                None => return OpResult::Error(ERR_BAD_RECORD),
            },
            _ => return OpResult::Error(ERR_BAD_RECORD),
        };
        self.purge_expired(key, now);
        let Some(value) = self.map.get(key).map(|i| i.value.to_vec()) else {
            return OpResult::Old(None);
        };
        match change {
            Change::None => {}
            Change::Persist => self.set_expiry(key, 0),
            Change::At(at) if at <= now => {
                self.remove(key);
            }
            Change::At(at) => self.set_expiry(key, at),
        }
        OpResult::Old(Some(value))
    }

    /// Changes an existing key's value in place with `f` and returns the new length. The
    /// deadline is untouched, so the expiry index stays as it is; `live_bytes` follows the
    /// change of length. Editing in place (rather than copying into a new value for
    /// [`Keyspace::insert`]) keeps a run of APPENDs from copying the whole string each time.
    fn edit_value(&mut self, key: &[u8], f: impl FnOnce(&mut Vec<u8>)) -> usize {
        let Some(item) = self.map.get_mut(key) else {
            return 0;
        };
        let mut v = std::mem::take(&mut item.value).into_vec();
        let old_len = v.len() as u64;
        f(&mut v);
        let new_len = v.len();
        item.value = v.into_boxed_slice();
        self.live_bytes = self
            .live_bytes
            .wrapping_add((new_len as u64).wrapping_sub(old_len));
        new_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{Condition, Expiry, Op};

    fn run(db: &mut Keyspace, now: u64, op: Op) -> OpResult {
        let r = db.apply_op(op, now);
        db.check_invariants();
        r
    }

    fn c(parts: &[&str]) -> Op {
        Op::Cmd {
            args: parts.iter().map(|p| p.as_bytes().to_vec()).collect(),
        }
    }

    fn set(k: &str, v: &str, at: u64) -> Op {
        Op::Set {
            key: k.into(),
            value: v.into(),
            expiry: Expiry::from_deadline(at),
            condition: Condition::Always,
            get: false,
        }
    }

    fn old(v: &str) -> OpResult {
        OpResult::Old(Some(v.as_bytes().to_vec()))
    }

    fn item(db: &Keyspace, k: &str) -> Option<(Vec<u8>, u64)> {
        db.map
            .get(k.as_bytes())
            .map(|i| (i.value.to_vec(), i.expire_at))
    }

    #[test]
    fn append_creates_extends_and_keeps_the_deadline() {
        let mut db = Keyspace::default();
        assert_eq!(
            run(&mut db, 0, c(&["APPEND", "a", "foo"])),
            OpResult::Int(3)
        );
        assert_eq!(
            run(&mut db, 0, c(&["APPEND", "a", "bar"])),
            OpResult::Int(6)
        );
        assert_eq!(run(&mut db, 0, c(&["APPEND", "a", ""])), OpResult::Int(6));
        assert_eq!(item(&db, "a"), Some((b"foobar".to_vec(), 0)));
        // An empty APPEND on a missing key creates an empty string, as in Redis.
        assert_eq!(run(&mut db, 0, c(&["APPEND", "e", ""])), OpResult::Int(0));
        assert_eq!(item(&db, "e"), Some((vec![], 0)));
        // The deadline survives.
        run(&mut db, 0, set("t", "x", 1000));
        assert_eq!(
            run(&mut db, 10, c(&["APPEND", "t", "yz"])),
            OpResult::Int(3)
        );
        assert_eq!(item(&db, "t"), Some((b"xyz".to_vec(), 1000)));
        // An expired key counts as missing: a fresh key without a deadline.
        assert_eq!(
            run(&mut db, 1000, c(&["APPEND", "t", "n"])),
            OpResult::Int(1)
        );
        assert_eq!(item(&db, "t"), Some((b"n".to_vec(), 0)));
        assert_eq!(db.expired_keys, 1);
    }

    #[test]
    fn append_refuses_past_the_size_limit() {
        let mut db = Keyspace::default();
        // Pretend-big value without allocating 512 MiB: the limit is on the sum.
        assert!(fits(MAX_STRING_LEN as u64 - 3, 3));
        assert!(!fits(MAX_STRING_LEN as u64 - 3, 4));
        assert!(!fits(u64::MAX, 1));
        run(&mut db, 0, set("a", "abc", 0));
        let before = db.live_bytes;
        // A record claiming a value that would overflow is refused without effect.
        let huge = OpResult::Error(ERR_TOO_BIG);
        let far = (MAX_STRING_LEN - 2).to_string();
        assert_eq!(run(&mut db, 0, c(&["SETRANGE", "a", &far, "xyz"])), huge);
        assert_eq!(item(&db, "a"), Some((b"abc".to_vec(), 0)));
        assert_eq!(db.live_bytes, before);
    }

    #[test]
    fn setrange_pads_overwrites_and_keeps_the_deadline() {
        let mut db = Keyspace::default();
        // Nothing to write on a missing key: 0, and no key.
        assert_eq!(
            run(&mut db, 0, c(&["SETRANGE", "s", "0", ""])),
            OpResult::Int(0)
        );
        assert_eq!(
            run(&mut db, 0, c(&["SETRANGE", "s", "536870912", ""])),
            OpResult::Int(0)
        );
        assert!(db.is_empty());
        assert_eq!(
            run(&mut db, 0, c(&["SETRANGE", "s", "5", "x"])),
            OpResult::Int(6)
        );
        assert_eq!(item(&db, "s"), Some((b"\0\0\0\0\0x".to_vec(), 0)));
        // Nothing to write on an existing key: its length, whatever the offset.
        assert_eq!(
            run(&mut db, 0, c(&["SETRANGE", "s", "536870912", ""])),
            OpResult::Int(6)
        );
        run(&mut db, 0, set("h", "Hello World", 5000));
        assert_eq!(
            run(&mut db, 0, c(&["SETRANGE", "h", "6", "Redis"])),
            OpResult::Int(11)
        );
        assert_eq!(item(&db, "h"), Some((b"Hello Redis".to_vec(), 5000)));
        assert_eq!(
            run(&mut db, 0, c(&["SETRANGE", "h", "13", "!"])),
            OpResult::Int(14)
        );
        assert_eq!(item(&db, "h"), Some((b"Hello Redis\0\0!".to_vec(), 5000)));
        assert_eq!(
            run(&mut db, 0, c(&["SETRANGE", "h", "0", "J"])),
            OpResult::Int(14)
        );
        assert_eq!(item(&db, "h").unwrap().0[..5], b"Jello"[..]);
        // Expired: a new key without the old deadline.
        assert_eq!(
            run(&mut db, 5000, c(&["SETRANGE", "h", "1", "a"])),
            OpResult::Int(2)
        );
        assert_eq!(item(&db, "h"), Some((b"\0a".to_vec(), 0)));
        assert_eq!(db.expiring(), 0);
    }

    #[test]
    fn getdel_returns_and_deletes() {
        let mut db = Keyspace::default();
        run(&mut db, 0, set("k", "v", 100));
        assert_eq!(run(&mut db, 0, c(&["GETDEL", "k"])), old("v"));
        assert_eq!(run(&mut db, 0, c(&["GETDEL", "k"])), OpResult::Old(None));
        assert!(db.is_empty());
        run(&mut db, 0, set("x", "v", 100));
        assert_eq!(run(&mut db, 100, c(&["GETDEL", "x"])), OpResult::Old(None));
        assert!(db.is_empty());
        assert_eq!(db.expiring(), 0);
    }

    #[test]
    fn getex_changes_the_deadline_after_reading() {
        let mut db = Keyspace::default();
        run(&mut db, 0, set("k", "v", 0));
        assert_eq!(run(&mut db, 10, c(&["GETEX", "k"])), old("v"));
        assert_eq!(item(&db, "k"), Some((b"v".to_vec(), 0)));
        assert_eq!(
            run(&mut db, 10, c(&["GETEX", "k", "PXAT", "500"])),
            old("v")
        );
        assert_eq!(item(&db, "k").unwrap().1, 500);
        assert_eq!(
            run(&mut db, 10, c(&["GETEX", "k", "PXAT", "700"])),
            old("v")
        );
        assert_eq!(db.due(u64::MAX, 10), vec![b"k".to_vec()]);
        assert_eq!(run(&mut db, 10, c(&["GETEX", "k", "PERSIST"])), old("v"));
        assert_eq!(item(&db, "k").unwrap().1, 0);
        assert_eq!(db.expiring(), 0);
        assert_eq!(run(&mut db, 10, c(&["GETEX", "k", "PERSIST"])), old("v"));
        // A deadline at or before the entry's time: the value, then the key is gone.
        assert_eq!(run(&mut db, 10, c(&["GETEX", "k", "PXAT", "10"])), old("v"));
        assert!(db.is_empty());
        assert_eq!(
            run(&mut db, 10, c(&["GETEX", "k", "PXAT", "99"])),
            OpResult::Old(None)
        );
        assert!(db.is_empty(), "a missing key is not created");
        // An expired key is missing.
        run(&mut db, 10, set("e", "v", 50));
        assert_eq!(
            run(&mut db, 50, c(&["GETEX", "e", "PERSIST"])),
            OpResult::Old(None)
        );
        assert!(db.is_empty());
    }

    #[test]
    fn malformed_records_are_refused_without_effect() {
        let mut db = Keyspace::default();
        run(&mut db, 0, set("k", "v", 0));
        let bad = OpResult::Error(ERR_BAD_RECORD);
        for rec in [
            &["APPEND", "k"][..],
            &["APPEND", "k", "a", "b"],
            &["SETRANGE", "k", "-1", "x"],
            &["SETRANGE", "k", "x", "x"],
            &["SETRANGE", "k", "99999999999999999999999", "x"],
            &["GETDEL"],
            &["GETDEL", "k", "k"],
            &["GETEX"],
            &["GETEX", "k", "EX", "10"],
            &["GETEX", "k", "PXAT"],
            &["GETEX", "k", "PXAT", "-5"],
            &["GETEX", "k", "persist"],
            &["GETEX", "k", "PERSIST", "PXAT", "5"],
        ] {
            assert_eq!(run(&mut db, 0, c(rec)), bad, "{rec:?}");
        }
        assert_eq!(
            run(&mut db, 0, c(&["INCRBYFLOAT", "k"])),
            OpResult::Error(ERR_BAD_RECORD)
        );
        assert_eq!(
            run(&mut db, 0, c(&["INCRBYFLOAT", "k", "1"])),
            OpResult::Error(crate::float::ERR_NOT_FLOAT),
            "the stored value 'v' is not a float"
        );
        assert_eq!(item(&db, "k"), Some((b"v".to_vec(), 0)));
    }

    #[test]
    fn substring_matches_redis_7() {
        let hw = b"Hello World";
        // (start, end, expected): every one checked against redis-server 7.0.15.
        let cases: &[(i64, i64, &str)] = &[
            (0, 3, "Hell"),
            (-3, -1, "rld"),
            (0, -1, "Hello World"),
            (10, 100, "d"),
            (-100, -50, "H"),
            (5, 3, ""),
            (11, 20, ""),
            (-1, -5, ""),
            (0, -100, "H"),
            (-5, -100, ""),
            (-100, 100, "Hello World"),
            (3, 3, "l"),
            (-1, -1, "d"),
            (0, 0, "H"),
            (i64::MAX, i64::MAX, ""),
            (i64::MIN, i64::MIN, "H"),
            (i64::MIN, i64::MAX, "Hello World"),
            (11, 11, ""),
            (10, 10, "d"),
            (-11, -11, "H"),
            (-12, -12, "H"),
            (-12, 0, "H"),
        ];
        for &(s, e, want) in cases {
            assert_eq!(substring(hw, s, e), want.as_bytes(), "GETRANGE {s} {e}");
        }
        assert_eq!(substring(b"", 0, -1), b"");
        assert_eq!(substring(b"", -1, 0), b"");
        assert_eq!(substring(b"", i64::MIN, i64::MAX), b"");
    }
}
