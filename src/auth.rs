//! Password checks for `AUTH` and `HELLO … AUTH`, and what a failure leaves behind.
//!
//! The comparison must not tell a client, through how long it takes, how much of its
//! guess was right. A byte-by-byte compare that stops at the first difference does,
//! and so does one that stops when the lengths differ. [`password_matches`] hashes both
//! sides with a keyed hash (SipHash, keys drawn at random once per process; 128 bits
//! from two keys) and compares the digests: the work depends only on the two lengths,
//! never on where they differ, and the digests an attacker would need to aim at are
//! secret. The guess's length is the attacker's own; the password's is the same on
//! every attempt.
//!
//! A failure ([`denied`]) counts in INFO's `acl_access_denied_auth` (Redis 7's name)
//! and is logged with the client's address, at most once a second with a count of
//! those not logged (ratelog.rs), so guessing in a loop cannot flood the log.

use crate::commands::{Context, Session};
use crate::ratelog::{RateLimit, suppressed_note};
use std::hash::{BuildHasher, RandomState};
use std::sync::OnceLock;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The reply to a wrong password or user (Redis 7's wording).
pub const WRONGPASS: &str = "WRONGPASS invalid username-password pair or user is disabled.";

static FAILURE_LOG: RateLimit = RateLimit::new(Duration::from_secs(1));

/// Whether `given` equals `expected`, in time that depends only on their lengths.
pub fn password_matches(given: &[u8], expected: &[u8]) -> bool {
    static KEYS: OnceLock<(RandomState, RandomState)> = OnceLock::new();
    let (k1, k2) = KEYS.get_or_init(|| (RandomState::new(), RandomState::new()));
    let a = (k1.hash_one(given), k2.hash_one(given));
    let b = (k1.hash_one(expected), k2.hash_one(expected));
    // One branch-free fold over both halves: no early exit on the first differing word.
    let diff = std::hint::black_box((a.0 ^ b.0) | (a.1 ^ b.1));
    diff == 0
}

/// Records a failed authentication by client `s`: counts it and logs it (rate-limited).
pub fn denied(ctx: &Context, s: &Session) {
    ctx.stats
        .acl_access_denied_auth
        .fetch_add(1, Ordering::Relaxed);
    if let Some(suppressed) = FAILURE_LOG.check(Instant::now()) {
        let addr = ctx
            .clients
            .lock()
            .get(&s.id)
            .map(|c| c.addr.clone())
            .unwrap_or_default();
        log::warn!(
            "authentication failed for client id={} addr={addr}{}",
            s.id,
            suppressed_note(suppressed)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_match_only_when_equal() {
        assert!(password_matches(b"secret", b"secret"));
        assert!(password_matches(b"", b""));
        let long = vec![b'x'; 100_000];
        assert!(password_matches(&long, &long.clone()));
        for wrong in [
            &b""[..],
            b"s",
            b"secre",
            b"secret ",
            b"secreT",
            b"Secret",
            b"secretsecret",
            b"terces",
            b"secret\0",
        ] {
            assert!(!password_matches(wrong, b"secret"), "{wrong:?}");
            assert!(!password_matches(b"secret", wrong), "{wrong:?}");
        }
        // Every single-bit flip, anywhere, is a mismatch (no byte is skipped).
        let pw = b"correct horse battery staple".to_vec();
        for i in 0..pw.len() {
            for bit in 0..8 {
                let mut guess = pw.clone();
                guess[i] ^= 1 << bit;
                assert!(!password_matches(&guess, &pw), "byte {i} bit {bit}");
            }
        }
    }
}
