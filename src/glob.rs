//! Redis's glob patterns (KEYS, SCAN MATCH, CONFIG GET): `*`, `?`, `[abc]`, `[^a-z]` and
//! `\x` escapes, matched over bytes. Pure; iterative for `*` so a hostile pattern such as
//! `a*a*a*a*…b` costs O(pattern × subject), not exponential time.

/// Whether `subject` matches `pattern`, optionally ignoring ASCII case.
pub fn glob_match(pattern: &[u8], subject: &[u8], nocase: bool) -> bool {
    let eq = |a: u8, b: u8| {
        if nocase {
            a.eq_ignore_ascii_case(&b)
        } else {
            a == b
        }
    };
    let (mut p, mut s) = (0usize, 0usize);
    // Where to resume after the last `*`: (pattern index after it, subject index).
    let mut star: Option<(usize, usize)> = None;
    while s < subject.len() {
        if p < pattern.len() {
            match pattern[p] {
                b'*' => {
                    while p < pattern.len() && pattern[p] == b'*' {
                        p += 1;
                    }
                    if p == pattern.len() {
                        return true;
                    }
                    star = Some((p, s));
                    continue;
                }
                b'?' => {
                    p += 1;
                    s += 1;
                    continue;
                }
                b'[' => {
                    if let Some((matched, next)) = class(pattern, p, subject[s], nocase)
                        && matched
                    {
                        p = next;
                        s += 1;
                        continue;
                    }
                }
                b'\\' if p + 1 < pattern.len() => {
                    if eq(pattern[p + 1], subject[s]) {
                        p += 2;
                        s += 1;
                        continue;
                    }
                }
                c => {
                    if eq(c, subject[s]) {
                        p += 1;
                        s += 1;
                        continue;
                    }
                }
            }
        }
        // Mismatch: let the last `*` swallow one more byte, or fail.
        match star {
            Some((sp, ss)) => {
                p = sp;
                s = ss + 1;
                star = Some((sp, ss + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Matches `c` against the class starting at `pattern[start] == b'['`. Returns whether it
/// matched and the pattern index after the class. An unterminated class runs to the end
/// of the pattern, as in Redis.
fn class(pattern: &[u8], start: usize, c: u8, nocase: bool) -> Option<(bool, usize)> {
    let fold = |b: u8| if nocase { b.to_ascii_lowercase() } else { b };
    let c = fold(c);
    let mut p = start + 1;
    let not = pattern.get(p) == Some(&b'^');
    if not {
        p += 1;
    }
    let mut matched = false;
    loop {
        match pattern.get(p) {
            None => break,
            Some(b']') => {
                p += 1;
                break;
            }
            Some(b'\\') if p + 1 < pattern.len() => {
                if fold(pattern[p + 1]) == c {
                    matched = true;
                }
                p += 2;
            }
            Some(&lo) if pattern.get(p + 1) == Some(&b'-') && p + 2 < pattern.len() => {
                let hi = pattern[p + 2];
                let (a, b) = if lo <= hi { (lo, hi) } else { (hi, lo) };
                if (fold(a)..=fold(b)).contains(&c) {
                    matched = true;
                }
                p += 3;
            }
            Some(&x) => {
                if fold(x) == c {
                    matched = true;
                }
                p += 1;
            }
        }
    }
    Some((matched != not, p))
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    fn m(p: &str, s: &str) -> bool {
        glob_match(p.as_bytes(), s.as_bytes(), false)
    }

    #[test]
    fn redis_examples() {
        assert!(m("h?llo", "hello") && m("h?llo", "hallo") && !m("h?llo", "hllo"));
        assert!(m("h*llo", "hllo") && m("h*llo", "heeeello"));
        assert!(m("h[ae]llo", "hello") && m("h[ae]llo", "hallo") && !m("h[ae]llo", "hillo"));
        assert!(m("h[^e]llo", "hallo") && !m("h[^e]llo", "hello"));
        assert!(m("h[a-b]llo", "hbllo") && !m("h[a-b]llo", "hcllo"));
        assert!(m("h[b-a]llo", "hallo"));
        assert!(m("*", "") && m("*", "anything") && !m("?", ""));
        assert!(m("a\\*b", "a*b") && !m("a\\*b", "axb"));
        assert!(m("[\\]]", "]"));
        assert!(m("user:*:name", "user:42:name") && !m("user:*:name", "user:42:age"));
        assert!(glob_match(b"HELLO", b"hello", true));
        assert!(!m("abc", "abcd") && !m("abcd", "abc"));
    }

    #[test]
    fn hostile_pattern_is_fast() {
        let p = "a*".repeat(50) + "b";
        let s = "a".repeat(10_000);
        assert!(!m(&p, &s));
    }
}
