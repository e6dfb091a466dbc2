//! The numeric core of `INCRBYFLOAT`: parsing, adding and printing floats exactly as
//! Redis 7 does on x86-64.
//!
//! This module owns three things and nothing else (no keyspace, no replies):
//! - which byte strings are valid floats ([`parse_float`]; Redis's `string2ld`),
//! - the `INCRBYFLOAT` arithmetic and its two errors ([`incr_by_float`]; Redis's
//!   `incrbyfloatCommand`),
//! - the text a result is stored and replied as ([`format_float_human`]; Redis's
//!   `ld2string(.., LD_STR_HUMAN)`, which is `%.17Lf` with trailing zeros, then a
//!   trailing dot, removed, and `-0` turned into `0`).
//!
//! # Why not plain `f64`
//!
//! Redis computes `INCRBYFLOAT` in C `long double`, which on x86-64 is the x87 80-bit
//! extended format (64-bit significand, 15-bit exponent), and prints 17 digits after
//! the point. Those 17 digits show the long double's own rounding error whenever the
//! value is 100 or more: Redis answers `INCRBYFLOAT` of `0.9` on `3943` with
//! `3943.89999999999999991`, and roughly half of all sums of two short decimals come
//! out like that. An `f64` holds about 16 significant digits, so no way of printing an
//! `f64` reproduces those digits; measured against redis-server 7.0.15, every `f64`
//! formatting tried (shortest round-trip, `%.17f`, 15 or 16 significant digits, "shortest
//! within n ulps") differed from Redis on about half of such sums or more.
//!
//! So the arithmetic here is done on a small software model of the x87 format
//! (`Ld`): decimal and hexadecimal input are rounded to it exactly as glibc's
//! `strtold` does (round to nearest, ties to even, with subnormals), addition rounds
//! exactly as the FPU does, and `%.17Lf` is produced from the exact binary value with
//! glibc's ties-to-even rounding. The text is therefore byte-for-byte Redis's. The
//! `f64` the public functions hand out is only the extended value rounded to the
//! nearest `f64`, for callers that want a number; the stored text never goes through
//! it.
//!
//! # What still differs from Redis
//!
//! - The `f64` returned by [`parse_float`] and [`incr_by_float`] is lossy: a value that
//!   Redis holds exactly (say `12345678901234567890`) comes back rounded, and values
//!   beyond the `f64` range (`1e400`, which Redis accepts) come back as `±inf`, tiny
//!   ones (`1e-400`) as `0`. The text from [`incr_by_float`] is not affected.
//! - [`format_float_human`] prints an `f64` converted exactly to long double, i.e. what
//!   Redis would print for `(long double)v`: `format_float_human(0.1)` is
//!   `0.10000000000000001`, because `0.1_f64` is not one tenth. It is not used by
//!   [`incr_by_float`], whose text comes from the exact extended result.
//! - Redis built where `long double` is not x87 extended (aarch64 Linux: 128-bit quad;
//!   32-bit ARM: plain double) prints different digits; this module matches x86-64
//!   builds with glibc, the common case (and the one it was compared with).
//! - NaN and infinity never reach the formatter through `INCRBYFLOAT`; for a direct
//!   [`format_float_human`] call they print as `nan`, `inf` and `-inf`.

use std::cmp::Ordering;

/// `ERR value is not a valid float`: the current value or the increment did not parse.
pub const ERR_NOT_FLOAT: &str = "ERR value is not a valid float";
/// `ERR increment would produce NaN or Infinity`.
pub const ERR_NAN_OR_INF: &str = "ERR increment would produce NaN or Infinity";

/// Redis's `MAX_LONG_DOUBLE_CHARS`: `string2ld` refuses inputs of this length or longer.
const MAX_LONG_DOUBLE_CHARS: usize = 5 * 1024;

/// Significand bits of the x87 extended format (the integer bit is explicit).
const LD_PREC: u32 = 64;
/// Exponent of the last significand bit of the smallest subnormal: 2^-16445.
const LD_EMIN: i64 = -16445;
/// Exponent of the last significand bit of the largest finite value,
/// `(2^64 - 1) * 2^16320`, about 1.19e4932.
const LD_EMAX: i64 = 16320;

/// An x87 80-bit extended value. `Finite` is `(-1)^neg * mant * 2^exp`, with
/// `mant == 0` (zero), or its top bit set (normal), or `exp == LD_EMIN` (subnormal).
/// There is no NaN: nothing that produces one survives to a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ld {
    Finite { neg: bool, mant: u64, exp: i64 },
    Inf { neg: bool },
}

/// The outcome of rounding an exact value to a binary format.
#[derive(Debug, PartialEq, Eq)]
enum Rounded {
    /// `mant * 2^exp`; `inexact` if rounding changed the value (a zero that is inexact
    /// is an underflow).
    Finite {
        mant: u64,
        exp: i64,
        inexact: bool,
    },
    Overflow,
}

/// Rounds `(m + s) * 2^e`, where `s` is 0 if `!sticky` and strictly between 0 and 1
/// otherwise, to `prec` significand bits (round to nearest, ties to even), with the
/// last bit's exponent kept within `emin..=emax` (below `emin`: subnormal).
///
/// When `sticky` is set, `m` must have more than `prec` bits, so that the half-way bit
/// is in `m`; every caller guarantees that.
fn round(m: u128, e: i64, sticky: bool, prec: u32, emin: i64, emax: i64) -> Rounded {
    if m == 0 {
        debug_assert!(!sticky);
        return Rounded::Finite {
            mant: 0,
            exp: emin,
            inexact: false,
        };
    }
    let bits = 128 - i64::from(m.leading_zeros());
    let mut lsb = (e + bits - i64::from(prec)).max(emin);
    let shift = lsb - e;
    let (mut q, inexact) = if shift <= 0 {
        debug_assert!(!sticky);
        (m << -shift, false)
    } else {
        let (q, rem, half) = match shift {
            // The whole value is below half a unit of the last place.
            129.. => (0, 0, 1),
            128 => (0, m, 1 << 127),
            _ => (m >> shift, m & ((1 << shift) - 1), 1 << (shift - 1)),
        };
        let up = rem > half || (rem == half && (sticky || q & 1 == 1));
        (q + u128::from(up), rem != 0 || sticky || shift > 128)
    };
    if q >> prec != 0 {
        // Rounding carried into a new top bit.
        q >>= 1;
        lsb += 1;
    }
    if lsb > emax {
        return Rounded::Overflow;
    }
    Rounded::Finite {
        mant: q as u64,
        exp: lsb,
        inexact,
    }
}

fn round_ld(m: u128, e: i64, sticky: bool) -> Rounded {
    round(m, e, sticky, LD_PREC, LD_EMIN, LD_EMAX)
}

impl Ld {
    const ZERO: Ld = Ld::Finite {
        neg: false,
        mant: 0,
        exp: LD_EMIN,
    };

    /// Builds a value from a rounding outcome, as `strtold` reports it: overflow, and
    /// underflow all the way to zero, are range errors.
    fn from_parsed(neg: bool, r: Rounded) -> Option<Ld> {
        match r {
            Rounded::Finite {
                mant: 0,
                inexact: true,
                ..
            }
            | Rounded::Overflow => None,
            Rounded::Finite { mant, exp, .. } => Some(Ld::Finite { neg, mant, exp }),
        }
    }

    /// Exact: every `f64` is an extended value.
    fn from_f64(v: f64) -> Ld {
        let neg = v.is_sign_negative();
        if v.is_infinite() {
            return Ld::Inf { neg };
        }
        let bits = v.to_bits();
        let biased = ((bits >> 52) & 0x7ff) as i64;
        let frac = bits & ((1 << 52) - 1);
        let (m, e) = if biased == 0 {
            (frac, -1074)
        } else {
            (frac | 1 << 52, biased - 1075)
        };
        match round_ld(u128::from(m), e, false) {
            Rounded::Finite { mant, exp, .. } => Ld::Finite { neg, mant, exp },
            Rounded::Overflow => unreachable!("f64 fits in long double"),
        }
    }

    /// The nearest `f64` (what C's `(double)` cast gives).
    fn to_f64(self) -> f64 {
        let (neg, mant, exp) = match self {
            Ld::Inf { neg } => {
                return if neg {
                    f64::NEG_INFINITY
                } else {
                    f64::INFINITY
                };
            }
            Ld::Finite { neg, mant, exp } => (neg, mant, exp),
        };
        let magnitude = match round(u128::from(mant), exp, false, 53, -1074, 971) {
            Rounded::Overflow => f64::INFINITY,
            Rounded::Finite { mant, exp, .. } if mant >> 52 != 0 => {
                f64::from_bits(((exp + 1075) as u64) << 52 | (mant & ((1 << 52) - 1)))
            }
            // Zero or subnormal: the last bit is 2^-1074, the biased exponent 0.
            Rounded::Finite { mant, .. } => f64::from_bits(mant),
        };
        if neg { -magnitude } else { magnitude }
    }

    /// `self + other` rounded as the x87 FPU does; `None` when the sum is NaN or
    /// infinite (which is all `INCRBYFLOAT` needs to know about those).
    fn add(self, other: Ld) -> Option<Ld> {
        let (
            Ld::Finite {
                neg: na,
                mant: ma,
                exp: ea,
            },
            Ld::Finite {
                neg: nb,
                mant: mb,
                exp: eb,
            },
        ) = (self, other)
        else {
            return None;
        };
        if ma == 0 {
            // 0 + b is b; +0 + -0 is +0, -0 + -0 is -0.
            return Some(if mb == 0 {
                Ld::Finite {
                    neg: na && nb,
                    mant: 0,
                    exp: LD_EMIN,
                }
            } else {
                other
            });
        }
        if mb == 0 {
            return Some(self);
        }
        // a is the operand with the larger exponent.
        let ((na, ma, ea), (nb, mb, eb)) = if ea >= eb {
            ((na, ma, ea), (nb, mb, eb))
        } else {
            ((nb, mb, eb), (na, ma, ea))
        };
        let d = ea - eb;
        let (neg, m, e, sticky) = if d <= 63 {
            // Exact in 128 bits.
            let a = u128::from(ma) << d;
            let b = u128::from(mb);
            if na == nb {
                (na, a + b, eb, false)
            } else {
                match a.cmp(&b) {
                    Ordering::Greater => (na, a - b, eb, false),
                    Ordering::Less => (nb, b - a, eb, false),
                    // x - x is +0 when rounding to nearest.
                    Ordering::Equal => return Some(Ld::ZERO),
                }
            }
        } else {
            // b is below 2^-63 of a (a is normal: its exponent is above the minimum).
            // Keep a with 63 extra bits; what b loses below them only matters as a
            // sticky bit.
            let a = u128::from(ma) << 63;
            let s = d - 63;
            let (b, sticky) = if s >= 64 {
                (0, true)
            } else {
                (u128::from(mb >> s), mb & ((1 << s) - 1) != 0)
            };
            if na == nb {
                (na, a + b, ea - 63, sticky)
            } else {
                // a - (b + x) with 0 < x < 1 is (a - b - 1) + (1 - x).
                (na, a - b - u128::from(sticky), ea - 63, sticky)
            }
        };
        match round_ld(m, e, sticky) {
            Rounded::Finite { mant, exp, .. } => Some(Ld::Finite { neg, mant, exp }),
            Rounded::Overflow => None,
        }
    }

    /// `ld2string(.., LD_STR_HUMAN)`: `%.17Lf`, trailing zeros and then a trailing dot
    /// removed, `-0` printed as `0`.
    fn format_human(self) -> Vec<u8> {
        let (neg, mant, exp) = match self {
            Ld::Inf { neg: false } => return b"inf".to_vec(),
            Ld::Inf { neg: true } => return b"-inf".to_vec(),
            Ld::Finite { neg, mant, exp } => (neg, mant, exp),
        };
        let mut out = Vec::with_capacity(32);
        if neg {
            out.push(b'-');
        }
        if exp >= 0 {
            // An integer; all 17 decimals are zeros and get trimmed.
            Big::from_u64(mant).shl(exp as u64).write_decimal(&mut out);
        } else {
            const SCALE: u128 = 100_000_000_000_000_000; // 10^17
            let f = -exp;
            let (int, frac) = if f >= 64 {
                (0, u128::from(mant))
            } else {
                (u128::from(mant >> f), u128::from(mant & ((1 << f) - 1)))
            };
            // frac / 2^f in units of 10^-17, rounded to nearest, ties to even (glibc).
            let prod = frac * SCALE; // < 2^64 * 2^57
            let (q, rem, half) = match f {
                129.. => (0, 0, 1),
                128 => (0, prod, 1 << 127),
                _ => (prod >> f, prod & ((1 << f) - 1), 1 << (f - 1)),
            };
            let mut q = q + u128::from(rem > half || (rem == half && q & 1 == 1));
            let mut int = int;
            if q == SCALE {
                int += 1;
                q = 0;
            }
            out.extend_from_slice(int.to_string().as_bytes());
            if q != 0 {
                let digits = format!("{q:017}");
                out.push(b'.');
                out.extend_from_slice(digits.trim_end_matches('0').as_bytes());
            }
        }
        if out == b"-0" {
            out.remove(0);
        }
        out
    }
}

/// Redis's `string2ld`: the whole of `b` must be what glibc's `strtold` accepts, with
/// no leading or trailing space, shorter than 5120 bytes, not NaN, and not out of the
/// long double range (overflow, or underflow to zero; a literal zero is fine).
fn parse_ld(b: &[u8]) -> Option<Ld> {
    if b.is_empty() || b.len() >= MAX_LONG_DOUBLE_CHARS {
        return None;
    }
    let (neg, rest) = match b[0] {
        b'-' => (true, &b[1..]),
        b'+' => (false, &b[1..]),
        _ => (false, b),
    };
    if rest.eq_ignore_ascii_case(b"inf") || rest.eq_ignore_ascii_case(b"infinity") {
        return Some(Ld::Inf { neg });
    }
    let rounded = if rest.len() > 2 && rest[0] == b'0' && rest[1] | 0x20 == b'x' {
        parse_hex(&rest[2..])?
    } else {
        parse_decimal(rest)?
    };
    Ld::from_parsed(neg, rounded)
}

/// Splits `digits[.digits][<marker>[+-]digits]`, requiring at least one mantissa digit
/// and, after the marker, at least one exponent digit; everything must be consumed.
/// Returns (integer digits, fraction digits, exponent), the exponent saturated far
/// beyond any range that matters.
fn split_number(s: &[u8], is_digit: fn(&u8) -> bool, marker: u8) -> Option<(&[u8], &[u8], i64)> {
    let int_len = s.iter().take_while(|c| is_digit(c)).count();
    let (int, mut rest) = s.split_at(int_len);
    let mut frac: &[u8] = &[];
    if let Some((b'.', after)) = rest.split_first() {
        let frac_len = after.iter().take_while(|c| is_digit(c)).count();
        (frac, rest) = after.split_at(frac_len);
    }
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    let mut exp = 0i64;
    if let Some((&c, after)) = rest.split_first() {
        if c | 0x20 != marker {
            return None;
        }
        let (exp_neg, digits) = match after.split_first() {
            Some((b'-', d)) => (true, d),
            Some((b'+', d)) => (false, d),
            _ => (false, after),
        };
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        for &d in digits {
            exp = (exp * 10 + i64::from(d - b'0')).min(1 << 40);
        }
        if exp_neg {
            exp = -exp;
        }
    }
    Some((int, frac, exp))
}

/// A decimal mantissa with optional `e` exponent, rounded to long double.
fn parse_decimal(s: &[u8]) -> Option<Rounded> {
    let (int, frac, exp) = split_number(s, u8::is_ascii_digit, b'e')?;
    // Value = D * 10^e10, D the digits without leading or trailing zeros.
    let digit = |i: usize| {
        if i < int.len() {
            int[i]
        } else {
            frac[i - int.len()]
        }
    };
    let total = int.len() + frac.len();
    let Some(first) = (0..total).find(|&i| digit(i) != b'0') else {
        return Some(Rounded::Finite {
            mant: 0,
            exp: LD_EMIN,
            inexact: false,
        });
    };
    let last = (0..total)
        .rev()
        .find(|&i| digit(i) != b'0')
        .unwrap_or(first);
    let n = (last - first + 1) as i64;
    let e10 = exp - frac.len() as i64 + (total - 1 - last) as i64;
    // D * 10^e10 lies in [10^(n-1+e10), 10^(n+e10)). The largest long double is about
    // 1.19e4932 and anything at or below 2^-16446 (about 1.82e-4951) rounds to zero.
    if n - 1 + e10 >= 4933 {
        return Some(Rounded::Overflow);
    }
    if n + e10 <= -4951 {
        return Some(Rounded::Finite {
            mant: 0,
            exp: LD_EMIN,
            inexact: true,
        });
    }
    if n <= 19 {
        let d = (first..=last).fold(0u64, |acc, i| acc * 10 + u64::from(digit(i) - b'0'));
        if (0..=19).contains(&e10) {
            // d < 10^19 and 10^e10 <= 10^19, so the product is exact in 128 bits.
            return Some(round_ld(u128::from(d) * 10u128.pow(e10 as u32), 0, false));
        }
        if (-27..0).contains(&e10) {
            // d / 10^k = d / 5^k * 2^-k, with 5^27 < 2^63: a quotient of more than 64
            // bits plus a sticky remainder is enough to round correctly.
            let k = -e10;
            let p = 5u128.pow(k as u32);
            let sh = 65 + (128 - p.leading_zeros()) - (64 - d.leading_zeros());
            let num = u128::from(d) << sh;
            return Some(round_ld(
                num / p,
                -i64::from(sh) - k,
                !num.is_multiple_of(p),
            ));
        }
    }
    let digits: Vec<u8> = (first..=last).map(digit).collect();
    let d = Big::from_decimal(&digits);
    if e10 >= 0 {
        let (m, e, sticky) = d.mul(&Big::pow10(e10 as u64)).top128();
        return Some(round_ld(m, e, sticky));
    }
    // d / 10^k: scale so that the quotient has 66 bits, divide, keep the remainder as
    // a sticky bit.
    let p = Big::pow10((-e10) as u64);
    let sh = 66 + p.bits() as i64 - d.bits() as i64;
    let (num, den) = if sh >= 0 {
        (d.shl(sh as u64), p)
    } else {
        (d, p.shl((-sh) as u64))
    };
    let (q, rem_nonzero) = num.div_small_quotient(&den);
    Some(round_ld(q, -sh, rem_nonzero))
}

/// A hexadecimal mantissa (after `0x`) with optional `p` binary exponent.
fn parse_hex(s: &[u8]) -> Option<Rounded> {
    let (int, frac, exp) = split_number(s, u8::is_ascii_hexdigit, b'p')?;
    let nibble = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u128;
    let digits = int.iter().chain(frac).copied().skip_while(|&c| c == b'0');
    // 31 nibbles (124 bits) are plenty for a 64-bit significand; the rest only matter
    // as a sticky bit and through the exponent.
    let (mut m, mut dropped, mut sticky) = (0u128, 0i64, false);
    for (i, c) in digits.enumerate() {
        if i < 31 {
            m = m << 4 | nibble(c);
        } else {
            dropped += 1;
            sticky |= c != b'0';
        }
    }
    let e = exp - 4 * frac.len() as i64 + 4 * dropped;
    // glibc quirk, reproduced because Redis inherits it: when the value is below the
    // normal range, strtold's hex path forgets the first bit after the 64 it read (its
    // "round bit"), keeping only the bits after that one. So 0x1.0000000000000001p-16446,
    // a hair above half the smallest subnormal, becomes 0 (refused) instead of the
    // smallest subnormal. Decimal input cannot hit this: no decimal of fewer than 5120
    // bytes in that range has that bit as its last nonzero one.
    let bits = 128 - i64::from(m.leading_zeros());
    if bits > 64 && e + bits - 1 < -16382 {
        m &= !(1 << (bits - 65));
    }
    Some(round_ld(m, e, sticky))
}

/// Just enough of an unsigned big integer for exact decimal conversion: little-endian
/// 32-bit limbs, no zero limbs at the top.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Big(Vec<u32>);

impl Big {
    fn from_u64(v: u64) -> Big {
        let mut b = Big(vec![v as u32, (v >> 32) as u32]);
        b.trim();
        b
    }

    fn from_decimal(digits: &[u8]) -> Big {
        let mut b = Big(Vec::with_capacity(digits.len() / 9 + 1));
        for chunk in digits.chunks(9) {
            let v = chunk
                .iter()
                .fold(0u32, |acc, &c| acc * 10 + u32::from(c - b'0'));
            b.mul_add(10u32.pow(chunk.len() as u32), v);
        }
        b
    }

    fn pow10(k: u64) -> Big {
        let mut b = Big(vec![1]);
        for _ in 0..k / 9 {
            b.mul_add(1_000_000_000, 0);
        }
        b.mul_add(10u32.pow((k % 9) as u32), 0);
        b
    }

    fn trim(&mut self) {
        while self.0.last() == Some(&0) {
            self.0.pop();
        }
    }

    /// `self = self * k + add`.
    fn mul_add(&mut self, k: u32, add: u32) {
        let mut carry = u64::from(add);
        for limb in &mut self.0 {
            let t = u64::from(*limb) * u64::from(k) + carry;
            *limb = t as u32;
            carry = t >> 32;
        }
        if carry != 0 {
            self.0.push(carry as u32);
        }
        self.trim();
    }

    fn mul(&self, other: &Big) -> Big {
        let mut r = vec![0u32; self.0.len() + other.0.len()];
        for (i, &a) in self.0.iter().enumerate() {
            let mut carry = 0u64;
            for (j, &b) in other.0.iter().enumerate() {
                let t = u64::from(a) * u64::from(b) + u64::from(r[i + j]) + carry;
                r[i + j] = t as u32;
                carry = t >> 32;
            }
            r[i + other.0.len()] = carry as u32;
        }
        let mut b = Big(r);
        b.trim();
        b
    }

    fn bits(&self) -> u64 {
        self.0.last().map_or(0, |&top| {
            (self.0.len() as u64 - 1) * 32 + u64::from(32 - top.leading_zeros())
        })
    }

    fn shl(&self, n: u64) -> Big {
        let (limbs, s) = ((n / 32) as usize, (n % 32) as u32);
        let mut v = vec![0u32; limbs];
        v.reserve(self.0.len() + 1);
        if s == 0 {
            v.extend_from_slice(&self.0);
        } else {
            let mut carry = 0u32;
            for &l in &self.0 {
                v.push(l << s | carry);
                carry = l >> (32 - s);
            }
            v.push(carry);
        }
        let mut b = Big(v);
        b.trim();
        b
    }

    fn cmp(&self, other: &Big) -> Ordering {
        self.0
            .len()
            .cmp(&other.0.len())
            .then_with(|| self.0.iter().rev().cmp(other.0.iter().rev()))
    }

    /// `self -= other`; `other` must not be larger.
    fn sub_assign(&mut self, other: &Big) {
        let mut borrow = 0i64;
        for (i, limb) in self.0.iter_mut().enumerate() {
            let t = i64::from(*limb) - i64::from(other.0.get(i).copied().unwrap_or(0)) - borrow;
            *limb = t.rem_euclid(1 << 32) as u32;
            borrow = i64::from(t < 0);
        }
        debug_assert_eq!(borrow, 0);
        self.trim();
    }

    /// `(self / den, self % den != 0)`, for a quotient below 2^127.
    fn div_small_quotient(mut self, den: &Big) -> (u128, bool) {
        let top = self.bits().saturating_sub(den.bits());
        debug_assert!(top < 127);
        let mut q = 0u128;
        for i in (0..=top).rev() {
            let d = den.shl(i);
            if self.cmp(&d) != Ordering::Less {
                self.sub_assign(&d);
                q |= 1 << i;
            }
        }
        (q, !self.0.is_empty())
    }

    /// The top 128 bits as `(m, e, sticky)`: `self` is `(m + s) * 2^e` with `s` in
    /// `[0, 1)`, nonzero exactly when `sticky`.
    fn top128(&self) -> (u128, i64, bool) {
        let sh = self.bits().saturating_sub(128) as i64;
        let (mut m, mut sticky) = (0u128, false);
        for (j, &l) in self.0.iter().enumerate() {
            let pos = 32 * j as i64 - sh; // where the limb's bit 0 lands in m
            if pos >= 0 {
                m |= u128::from(l) << pos;
            } else if pos > -32 {
                m |= u128::from(l >> -pos);
                sticky |= l & ((1 << -pos) - 1) != 0;
            } else {
                sticky |= l != 0;
            }
        }
        (m, sh, sticky)
    }

    fn write_decimal(mut self, out: &mut Vec<u8>) {
        let mut chunks = Vec::new(); // base 10^9, least significant first
        while !self.0.is_empty() {
            let mut rem = 0u64;
            for limb in self.0.iter_mut().rev() {
                let cur = rem << 32 | u64::from(*limb);
                *limb = (cur / 1_000_000_000) as u32;
                rem = cur % 1_000_000_000;
            }
            chunks.push(rem as u32);
            self.trim();
        }
        match chunks.split_last() {
            None => out.push(b'0'),
            Some((top, rest)) => {
                out.extend_from_slice(top.to_string().as_bytes());
                for c in rest.iter().rev() {
                    out.extend_from_slice(format!("{c:09}").as_bytes());
                }
            }
        }
    }
}

/// Parses a float as Redis's `string2ld` does (`INCRBYFLOAT`, `HINCRBYFLOAT`).
///
/// Accepted: what glibc's `strtold` parses in the C locale, filling the whole input —
/// an optional `+`/`-`, then decimal (`1`, `-1.5`, `.5`, `5.`, `1e5`, `1E-5`, `00012`),
/// hexadecimal (`0x1p3`, `0X.8`, `0x1.8p1`), or `inf`/`infinity` in any case.
/// Refused: empty input, any leading or trailing whitespace or other byte, NaN in any
/// spelling, inputs of 5120 bytes or more, and values outside the long double range
/// (above about 1.19e4932, or so small they round to zero — a literal zero such as
/// `0e-9999` is fine).
///
/// Returns the value rounded to the nearest `f64`; that is `±inf` for `inf` and also
/// for finite values beyond the `f64` range (`1e400`), and `0` for ones below it
/// (`1e-400`), all of which Redis accepts.
pub fn parse_float(b: &[u8]) -> Option<f64> {
    parse_ld(b).map(Ld::to_f64)
}

/// `INCRBYFLOAT`: adds `incr` to `current` (`None`: a missing key, counted as 0), in
/// long double as Redis does.
///
/// Returns the sum rounded to `f64` (see [`parse_float`] for what that loses) and the
/// exact text Redis stores and replies for it. Errors, checked in Redis's order:
/// [`ERR_NOT_FLOAT`] if `current`, then if `incr`, is not a valid float; then
/// [`ERR_NAN_OR_INF`] if the sum is NaN or infinite (either operand `inf`, or overflow).
pub fn incr_by_float(current: Option<&[u8]>, incr: &[u8]) -> Result<(f64, Vec<u8>), &'static str> {
    let current = match current {
        None => Ld::ZERO,
        Some(c) => parse_ld(c).ok_or(ERR_NOT_FLOAT)?,
    };
    let incr = parse_ld(incr).ok_or(ERR_NOT_FLOAT)?;
    let sum = current.add(incr).ok_or(ERR_NAN_OR_INF)?;
    Ok((sum.to_f64(), sum.format_human()))
}

/// Redis's human-friendly float text (`ld2string(.., LD_STR_HUMAN)`) for `v` converted
/// exactly to long double: `%.17Lf`, trailing zeros then a trailing dot removed, `-0`
/// as `0`; no exponent, ever. `inf`, `-inf` and `nan` for those.
///
/// Note `0.1_f64` prints as `0.10000000000000001`: it is what Redis prints for that
/// binary value, not for the text `0.1`, which [`incr_by_float`] parses straight to long
/// double (and prints back as `0.1`).
pub fn format_float_human(v: f64) -> Vec<u8> {
    if v.is_nan() {
        return b"nan".to_vec();
    }
    Ld::from_f64(v).format_human()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every expectation marked "redis" below was checked against redis-server 7.0.15
    /// (x86-64, glibc, jemalloc build) with `INCRBYFLOAT` and `SET` + `INCRBYFLOAT k 0`.
    fn incr(current: Option<&str>, by: &str) -> Result<String, &'static str> {
        incr_by_float(current.map(str::as_bytes), by.as_bytes())
            .map(|(_, text)| String::from_utf8(text).unwrap())
    }

    fn human(v: f64) -> String {
        String::from_utf8(format_float_human(v)).unwrap()
    }

    #[test]
    fn accepted_as_redis_does() {
        // redis: each is accepted, and INCRBYFLOAT of it on a missing key replies this.
        for (input, reply) in [
            ("0x1p3", "8"),
            ("0X1P3", "8"),
            ("0x1P+3", "8"),
            ("0x1", "1"),
            ("0x.8", "0.5"),
            ("0x1.8", "1.5"),
            ("0x1.8p1", "3"),
            ("0x1p-2", "0.25"),
            ("-0x10", "-16"),
            ("0x1.", "1"),
            ("0x1.p1", "2"),
            ("1e5", "100000"),
            ("1E5", "100000"),
            ("1e+5", "100000"),
            ("1e-5", "0.00001"),
            ("1.e5", "100000"),
            ("1e-0", "1"),
            (".5", "0.5"),
            ("5.", "5"),
            ("-.5", "-0.5"),
            ("+.5", "0.5"),
            ("+1", "1"),
            ("-1", "-1"),
            ("00012", "12"),
            ("-0", "0"),
            ("+0", "0"),
            ("0e0", "0"),
            ("0e-5000", "0"),
            ("0e5000", "0"),
            ("1e-400", "0"),
            ("1e-4950", "0"),
            ("3.6e-4951", "0"),
            ("3.7e-4951", "0"),
            ("1.83e-4951", "0"),
            ("0x1p-16445", "0"),
            ("-1e-18", "0"),
        ] {
            assert!(parse_float(input.as_bytes()).is_some(), "{input}");
            assert_eq!(incr(None, input).as_deref(), Ok(reply), "{input}");
        }
    }

    #[test]
    fn refused_as_redis_does() {
        // redis: "ERR value is not a valid float" for each, as increment and as value.
        let long_ones = "1".repeat(5119);
        let long_zeros = "0".repeat(5120);
        let tiny = format!("0.{}1", "0".repeat(5000));
        for input in [
            "",
            " 1",
            "1 ",
            "\t1",
            "1\t",
            "1\n",
            "\n1",
            "\u{a0}1",
            "  inf",
            "infinity ",
            "1\0",
            "1\x002",
            "++1",
            "+-1",
            "-",
            "+",
            ".",
            "e5",
            "1e",
            "1e+",
            "1e5.5",
            "1.5e3e3",
            "1_000",
            "1,5",
            "0.1.2",
            "1d5",
            "1f",
            "1.0f",
            "\u{661}",
            "0x",
            "0x1p",
            "0xp1",
            "0x.p1",
            "nan",
            "NaN",
            "-nan",
            "nan(1)",
            "infinit",
            "infx",
            "1e4933",
            "1e-4951",
            "1e-4952",
            "1.8e-4951",
            "1e-5000",
            "0x1p16384",
            "0x1.ffffffffffffffffp16383",
            "0x1p-16446",
            "0x1.0000000000000001p-16446",
            "0x1p-16447",
            &long_ones,
            &long_zeros,
            &tiny,
        ] {
            assert_eq!(parse_float(input.as_bytes()), None, "{input:?}");
            assert_eq!(incr(None, input), Err(ERR_NOT_FLOAT), "{input:?}");
            assert_eq!(incr(Some(input), "1"), Err(ERR_NOT_FLOAT), "{input:?}");
        }
        // redis: 5119 zeros is still short enough; 5120 bytes is not.
        assert_eq!(parse_float("0".repeat(5119).as_bytes()), Some(0.0));
    }

    #[test]
    fn infinity_parses_but_never_adds() {
        // redis: accepted by string2ld, then "increment would produce NaN or Infinity".
        for input in [
            "inf",
            "-inf",
            "+inf",
            "INF",
            "Infinity",
            "-infinity",
            "iNfInItY",
        ] {
            let v = parse_float(input.as_bytes()).unwrap();
            assert!(v.is_infinite(), "{input}");
            assert_eq!(incr(None, input), Err(ERR_NAN_OR_INF), "{input}");
            assert_eq!(incr(Some(input), "1"), Err(ERR_NAN_OR_INF), "{input}");
            assert_eq!(incr(Some("1"), input), Err(ERR_NAN_OR_INF), "{input}");
        }
        assert_eq!(incr(Some("inf"), "-inf"), Err(ERR_NAN_OR_INF));
        // Overflow of a finite sum. redis: same error.
        let max = "0x1.fffffffffffffffep16383";
        assert_eq!(incr(Some(max), max), Err(ERR_NAN_OR_INF));
        assert_eq!(incr(Some("-1e4932"), "-1e4932"), Err(ERR_NAN_OR_INF));
        // The current value is checked before the increment.
        assert_eq!(incr(Some("x"), "inf"), Err(ERR_NOT_FLOAT));
        assert_eq!(incr(Some("inf"), "x"), Err(ERR_NOT_FLOAT));
    }

    #[test]
    fn documented_and_common_sums() {
        // redis: (current, increment, reply).
        for (current, by, reply) in [
            (None, "0.1", "0.1"),
            (Some("10.50"), "0.1", "10.6"),
            (Some("10.6"), "-5", "5.6"),
            (Some("5.0e3"), "2.0e2", "5200"),
            (None, "3.0e-2", "0.03"),
            (Some("0.1"), "0.2", "0.3"),
            (Some("1.1"), "2.2", "3.3"),
            (Some("1e20"), "1", "100000000000000000000"),
            (Some("0x1p64"), "1", "18446744073709551616"),
            (Some("1e23"), "0", "100000000000000000000000"),
            (Some("1"), "-1", "0"),
            (Some("-0"), "0", "0"),
            (Some("0"), "-0.0", "0"),
            (Some("2"), "0x1p-1", "2.5"),
            (Some("0"), "0.1e1", "1"),
            (Some("1700000000000000"), "0.5", "1700000000000000.5"),
            (Some("9007199254740992"), "1", "9007199254740993"),
            (Some("4611686018427387904"), "0", "4611686018427387904"),
            (Some("9223372036854775807"), "0", "9223372036854775807"),
            (Some("18446744073709551615"), "0", "18446744073709551615"),
            (Some("18446744073709551616"), "0", "18446744073709551616"),
            (Some("123456789012345678"), "0", "123456789012345678"),
            (Some("1.2345678901234567"), "0", "1.2345678901234567"),
            (Some("3.141592653589793"), "0", "3.141592653589793"),
            (None, "0.333333333333333333", "0.33333333333333333"),
            (None, "123456789.123456789", "123456789.12345678899873747"),
            (None, "1e-7", "0.0000001"),
            (None, "1e-17", "0.00000000000000001"),
            (None, "1.5e-17", "0.00000000000000002"),
            (None, "2.5e-17", "0.00000000000000002"),
            (None, "5e-18", "0"),
            (None, "6e-18", "0.00000000000000001"),
            // Long double noise past the 19th significant digit, which no f64 shows.
            (Some("3943"), "0.9", "3943.89999999999999991"),
            (Some("415949"), "0.62", "415949.62000000000000455"),
            (Some("4.3"), "2725", "2729.30000000000000004"),
            (Some("55.6"), "-2472", "-2416.39999999999999991"),
            (Some("-391524801"), "3.37", "-391524797.63000000000465661"),
            (Some("9.37"), "3.8", "13.17"),
            (Some("7.7"), "-93.3", "-85.60000000000000001"),
            (Some("89.268034243283"), "64", "153.26803424328299999"),
            (Some("39e-10"), "87e5", "8700000.00000000389991328"),
            (Some("89e25"), "69e8", "890000000000000006878658560"),
            (Some("65e25"), "70e-24", "649999999999999999966445568"),
            (Some("1e-4950"), "1", "1"),
        ] {
            assert_eq!(
                incr(current, by).as_deref(),
                Ok(reply),
                "{current:?} + {by}"
            );
        }
    }

    #[test]
    fn huge_values_beyond_f64() {
        // redis: accepted and printed in full (401 and 4933 digits).
        let text = incr(None, "1e400").unwrap();
        assert_eq!(text.len(), 401);
        assert!(text.starts_with("1000000000000000000028188068394758651458"));
        let text = incr(None, "-1e400").unwrap();
        assert!(text.starts_with("-100000000000000000002818806839475865145"));
        assert_eq!(text.len(), 402);
        let max = incr(None, "1.18973149535723176503e4932").unwrap();
        assert_eq!(max.len(), 4933);
        assert!(max.starts_with("1189731495357231765021263853030970205169"));
        assert_eq!(incr(None, "0x1.fffffffffffffffep16383").unwrap(), max);
        assert_eq!(incr(None, "0x1p16383").unwrap().len(), 4932);
        assert!(
            incr(None, "1e4932")
                .unwrap()
                .starts_with("1000000000000000000006018949387963891323")
        );
        // The f64 side saturates.
        let (v, _) = incr_by_float(None, b"1e400").unwrap();
        assert_eq!(v, f64::INFINITY);
        assert_eq!(parse_float(b"-1e400"), Some(f64::NEG_INFINITY));
        assert_eq!(parse_float(b"1e-400"), Some(0.0));
        // Back in range: 1e400 - 1e400 is 0. redis: "0".
        assert_eq!(incr(Some("1e400"), "-1e400").as_deref(), Ok("0"));
    }

    #[test]
    fn repeated_increments() {
        // redis: INCRBYFLOAT k 0.1 from a missing key; the reply after n increments.
        let mut text: Option<String> = None;
        let mut replies = Vec::new();
        for _ in 0..1000 {
            text = Some(incr(text.as_deref(), "0.1").unwrap());
            replies.push(text.clone().unwrap());
        }
        assert_eq!(replies[0], "0.1");
        assert_eq!(replies[2], "0.3");
        assert_eq!(replies[9], "1");
        assert_eq!(replies[104], "10.5");
        assert_eq!(replies[999], "100");
        // redis: INCRBYFLOAT k 0.2, 1000 times; the value shows noise from 64.4 on.
        let mut text: Option<String> = None;
        let mut replies = Vec::new();
        for _ in 0..1000 {
            text = Some(incr(text.as_deref(), "0.2").unwrap());
            replies.push(text.clone().unwrap());
        }
        assert_eq!(replies[320], "64.2");
        assert_eq!(replies[321], "64.39999999999999999");
        assert_eq!(replies[322], "64.59999999999999998");
    }

    #[test]
    fn returned_f64() {
        assert_eq!(parse_float(b"0.1"), Some(0.1));
        assert_eq!(parse_float(b"-2.5e-3"), Some(-0.0025));
        assert_eq!(parse_float(b"0x1p-1074"), Some(f64::from_bits(1)));
        assert_eq!(parse_float(b"1.7976931348623157e308"), Some(f64::MAX));
        assert_eq!(
            parse_float(b"2.2250738585072014e-308"),
            Some(f64::MIN_POSITIVE)
        );
        assert!(parse_float(b"-0").unwrap().is_sign_negative());
        let (v, text) = incr_by_float(Some(b"10.5"), b"0.1").unwrap();
        assert_eq!((v, &text[..]), (10.6, &b"10.6"[..]));
        assert_eq!(incr_by_float(None, b"1e308").unwrap().0, 1e308);
    }

    #[test]
    fn format_of_f64() {
        assert_eq!(human(0.0), "0");
        assert_eq!(human(-0.0), "0");
        assert_eq!(human(1.0), "1");
        assert_eq!(human(-1.5), "-1.5");
        assert_eq!(human(0.5), "0.5");
        assert_eq!(human(0.1), "0.10000000000000001");
        assert_eq!(human(1e20), "100000000000000000000");
        assert_eq!(human(1e23), "99999999999999991611392");
        assert_eq!(human(1e-18), "0");
        assert_eq!(human(-1e-18), "0");
        assert_eq!(human(f64::INFINITY), "inf");
        assert_eq!(human(f64::NEG_INFINITY), "-inf");
        assert_eq!(human(f64::NAN), "nan");
        assert_eq!(human(f64::MAX).len(), 309);
        // 2^-18 = 0.000003814697265625 is a tie at the 17th decimal: glibc rounds to even.
        // redis: INCRBYFLOAT k 0x1p-18 replies 0.00000381469726562.
        assert_eq!(human(2f64.powi(-18)), "0.00000381469726562");
        assert_eq!(incr(None, "0x1p-18").as_deref(), Ok("0.00000381469726562"));
        assert_eq!(incr(None, "0x3p-18").as_deref(), Ok("0.00001144409179688"));
    }

    #[test]
    fn subnormal_long_doubles() {
        // The smallest subnormal survives a round trip and adds exactly.
        let min = parse_ld(b"0x1p-16445").unwrap();
        assert_eq!(
            min,
            Ld::Finite {
                neg: false,
                mant: 1,
                exp: LD_EMIN
            }
        );
        assert_eq!(
            min.add(min),
            Some(Ld::Finite {
                neg: false,
                mant: 2,
                exp: LD_EMIN
            })
        );
        assert_eq!(min.add(parse_ld(b"-0x1p-16445").unwrap()), Some(Ld::ZERO));
        // Halfway between zero and it rounds up if anything lies beyond.
        assert_eq!(parse_ld(b"0x1.8p-16446"), Some(min));
        assert_eq!(parse_ld(b"1.83e-4951"), Some(min));
        // glibc's hex parser drops the 65th significant bit of a subnormal (see
        // parse_hex). Checked with strtold of glibc 2.36, the one redis-server 7.0.15
        // used here; the first also with Redis (refused).
        let sub = |mant| {
            Some(Ld::Finite {
                neg: false,
                mant,
                exp: LD_EMIN,
            })
        };
        assert_eq!(parse_ld(b"0x1.0000000000000001p-16446"), None);
        assert_eq!(parse_ld(b"0x2.0000000000000002p-16447"), None);
        assert_eq!(parse_ld(b"0x1.00000000000000011p-16446"), sub(1));
        assert_eq!(parse_ld(b"0x1.00000000000000000001p-16446"), sub(1));
        assert_eq!(parse_ld(b"0x0.8000000000000001p-16445"), sub(1));
        assert_eq!(parse_ld(b"0x1.2000000000000001p-16443"), sub(4));
        assert_eq!(parse_ld(b"0x1.20000000000000008p-16443"), sub(5));
        assert_eq!(parse_ld(b"0x1.8000000000000001p-16445"), sub(2));
        // Not in normal range, where the same bit is the ordinary rounding bit.
        assert_eq!(
            parse_ld(b"0x1.00000000000000018p0"),
            parse_ld(b"0x1.0000000000000002p0")
        );
        assert_eq!(parse_ld(b"0x1.00000000000000008p0"), parse_ld(b"1"));
        // The largest subnormal plus its last bit becomes the smallest normal.
        let big_sub = parse_ld(b"0x0.fffffffffffffffep-16382").unwrap();
        assert_eq!(
            big_sub,
            Ld::Finite {
                neg: false,
                mant: u64::MAX >> 1,
                exp: LD_EMIN
            }
        );
        assert_eq!(
            big_sub.add(min),
            Some(Ld::Finite {
                neg: false,
                mant: 1 << 63,
                exp: LD_EMIN
            })
        );
    }

    #[test]
    fn addition_rounds_like_the_fpu() {
        let ld = |s: &str| parse_ld(s.as_bytes()).unwrap();
        // 2^64 + 1 is a tie between 2^64 and 2^64 + 2: even wins.
        assert_eq!(ld("0x1p64").add(ld("1")), Some(ld("0x1p64")));
        // 2^64 + 3 is a tie between 2^64 + 2 and 2^64 + 4: even (in the last kept bit).
        assert_eq!(ld("0x1p64").add(ld("3")), Some(ld("0x10000000000000004")));
        // Anything past the tie rounds up, even far below it (sticky).
        assert_eq!(
            ld("0x1p64").add(ld("0x1.0000001p0")),
            Some(ld("0x10000000000000002"))
        );
        assert_eq!(ld("0x1p64").add(ld("-0x1p-100")), Some(ld("0x1p64")));
        assert_eq!(
            ld("0x1p64").add(ld("-0x1.0000001p-1")),
            Some(ld("0xffffffffffffffff"))
        );
        assert_eq!(
            ld("0x1p64").add(ld("-0x1.8")),
            Some(ld("0xfffffffffffffffe"))
        );
        assert_eq!(ld("0x1p100").add(ld("0x1p-100")), Some(ld("0x1p100")));
        assert_eq!(ld("0x1p100").add(ld("-0x1p-100")), Some(ld("0x1p100")));
        // Operands 65 bits apart: b only counts through the sticky bit. Below 2^100 the
        // spacing is 2^36, so 2^100 - 2^35 is a tie (even: 2^100) and a hair more is not.
        assert_eq!(ld("0x1p100").add(ld("-0x1p35")), Some(ld("0x1p100")));
        let hair_more = ld("-0x1.0000000000000002p35");
        assert_eq!(
            ld("0x1p100").add(hair_more),
            Some(ld("0x1.fffffffffffffffep99"))
        );
        assert_eq!(ld("0x1p100").add(ld("0x1p36")), Some(ld("0x1p100")));
        assert_eq!(
            ld("0x1p100").add(ld("0x1.0000000000000002p36")),
            Some(ld("0x1.0000000000000002p100"))
        );
        // Cancellation is exact.
        assert_eq!(
            ld("0x1.0000000000000002p0").add(ld("-1")),
            Some(ld("0x1p-63"))
        );
    }

    #[test]
    fn long_inputs_use_every_digit() {
        // A tie, broken only by the 61st digit.
        let half_ulp = "18446744073709551617"; // 2^64 + 1: a tie, rounds to 2^64
        assert_eq!(incr(None, half_ulp).as_deref(), Ok("18446744073709551616"));
        let above = format!("{half_ulp}.{}1", "0".repeat(40));
        assert_eq!(incr(None, &above).as_deref(), Ok("18446744073709551618"));
        // Leading and trailing zeros do not count towards anything.
        let padded = format!("{}0.5{}", "0".repeat(3000), "0".repeat(2000));
        assert_eq!(incr(None, &padded).as_deref(), Ok("0.5"));
        let long_hex = format!("0x{}p-4", "1".repeat(40));
        assert!(parse_float(long_hex.as_bytes()).is_some());
    }
}
