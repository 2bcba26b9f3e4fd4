//! Redis' glob patterns, for `SCAN ... MATCH`: `*`, `?`, `[abc]`, `[^a-z]`, and `\` escapes.

/// Whether `s` matches the glob `pattern` (byte-wise, case-sensitive).
pub(crate) fn matches(pattern: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    while p < pattern.len() {
        match pattern[p] {
            b'*' => {
                while pattern.get(p + 1) == Some(&b'*') {
                    p += 1;
                }
                if p + 1 == pattern.len() {
                    return true;
                }
                return (i..=s.len()).any(|start| matches(&pattern[p + 1..], &s[start..]));
            }
            b'?' => {
                if i == s.len() {
                    return false;
                }
                i += 1;
            }
            b'[' => {
                let Some(&c) = s.get(i) else { return false };
                p += 1;
                let negate = pattern.get(p) == Some(&b'^');
                if negate {
                    p += 1;
                }
                let mut hit = false;
                loop {
                    match pattern.get(p) {
                        // An unclosed class ends at the pattern's end, as in Redis.
                        None => {
                            p -= 1;
                            break;
                        }
                        Some(b']') => break,
                        Some(b'\\') if p + 1 < pattern.len() => {
                            p += 1;
                            hit |= pattern[p] == c;
                        }
                        Some(&lo) if pattern.get(p + 1) == Some(&b'-') && p + 2 < pattern.len() => {
                            let hi = pattern[p + 2];
                            let (lo, hi) = if lo > hi { (hi, lo) } else { (lo, hi) };
                            hit |= (lo..=hi).contains(&c);
                            p += 2;
                        }
                        Some(&x) => hit |= x == c,
                    }
                    p += 1;
                }
                if hit == negate {
                    return false;
                }
                i += 1;
            }
            b'\\' if p + 1 < pattern.len() => {
                p += 1;
                if s.get(i) != Some(&pattern[p]) {
                    return false;
                }
                i += 1;
            }
            c => {
                if s.get(i) != Some(&c) {
                    return false;
                }
                i += 1;
            }
        }
        p += 1;
    }
    i == s.len()
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn globs_match_like_redis() {
        let yes = |p: &str, s: &str| assert!(matches(p.as_bytes(), s.as_bytes()), "{p} ~ {s}");
        let no = |p: &str, s: &str| assert!(!matches(p.as_bytes(), s.as_bytes()), "{p} !~ {s}");
        yes("msg:*", "msg:42");
        yes("*", "");
        no("msg:*", "req:1");
        yes("h?llo", "hello");
        no("h?llo", "hllo");
        yes("h[ae]llo", "hallo");
        no("h[ae]llo", "hillo");
        yes("h[^e]llo", "hallo");
        no("h[^e]llo", "hello");
        yes("h[a-b]llo", "hbllo");
        yes("a\\*b", "a*b");
        no("a\\*b", "axb");
        yes("*:*:x", "a:b:c:x");
        no("*:*:x", "a:x");
    }
}
