//! Redis' glob patterns, for `SCAN ... MATCH`: `*`, `?`, `[abc]`, `[^a-z]`, and `\` escapes.
//!
//! Matched iteratively: on a mismatch only the last `*` seen takes one more byte, so a pattern of
//! many `*` costs O(pattern × key), not one recursion per `*` (the class of Redis'
//! CVE-2022-36021, where such a pattern pinned a core).

/// Whether `s` matches the glob `pattern` (byte-wise, case-sensitive).
pub(crate) fn matches(pattern: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    // Where to resume after the last `*`: the pattern just past it, and the first key byte it
    // has not yet swallowed. An earlier `*` never needs to take more: the last one can.
    let mut resume: Option<(usize, usize)> = None;
    loop {
        if pattern.get(p) == Some(&b'*') {
            while pattern.get(p) == Some(&b'*') {
                p += 1;
            }
            resume = Some((p, i));
            continue;
        }
        let stepped = match (p < pattern.len(), s.get(i)) {
            (false, None) => return true,
            (true, Some(&c)) => one(pattern, p, c),
            _ => None,
        };
        match (stepped, resume) {
            (Some(next), _) => {
                p = next;
                i += 1;
            }
            (None, Some((after_star, swallowed))) if swallowed < s.len() => {
                resume = Some((after_star, swallowed + 1));
                p = after_star;
                i = swallowed + 1;
            }
            (None, _) => return false,
        }
    }
}

/// Matches the one-byte token at `pattern[p]` (not `*`) against `c`: where the next token
/// starts if it matches.
fn one(pattern: &[u8], mut p: usize, c: u8) -> Option<usize> {
    let hit = match pattern[p] {
        b'?' => true,
        b'[' => {
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
            hit != negate
        }
        b'\\' if p + 1 < pattern.len() => {
            p += 1;
            pattern[p] == c
        }
        x => x == c,
    };
    hit.then_some(p + 1)
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
        yes("a*", "a");
        no("a*b", "a");
        yes("*a*b*c", "xxaxxbxxc");
        no("*a*b*c", "xxaxxcxxb");
        yes("a[b", "ab");
        no("a\\", "a");
        yes("*?", "x");
        no("*?", "");
    }

    /// `SCAN 0 MATCH` with 12 `*` against a 200-byte key: a recursive matcher tries every way
    /// to split the key among the stars (seconds of CPU); this one answers at once.
    #[test]
    fn many_stars_against_a_long_key_answer_at_once() {
        let key = vec![b'a'; 200];
        let miss = [b"*a".repeat(12), b"b".to_vec()].concat();
        let hit = [b"*a".repeat(12), b"*".to_vec()].concat();
        let started = std::time::Instant::now();
        // Expected: no match (the key has no `b`), and a match once the tail is a `*`.
        assert!(!matches(&miss, &key));
        assert!(matches(&hit, &key));
        assert!(!matches(&hit, &key[..11]));
        assert!(
            started.elapsed() < std::time::Duration::from_millis(100),
            "took {:?}",
            started.elapsed()
        );
    }
}
