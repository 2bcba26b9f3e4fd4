//! The replication log's unit: one commit batch of relay ids, self-contained and versioned, as
//! the active instance appends it to the `<source>.ids` stream and standbys apply it.
//!
//! It carries the ids themselves rather than the store's digests: each data dir keys its
//! digests with a seed of its own, so only the ids mean the same thing on every instance.
//!
//! Layout: format byte, kind byte, varint commit time (ms since the Unix epoch), varint count,
//! then per id: varint length, the id's bytes, varint TTL in ms.

use super::Error;

/// Format byte of a log segment; an unknown one is refused, never guessed at.
const LOG_FORMAT_V1: u8 = 1;
/// Kind byte: relay ids.
const KIND_RELAY_IDS: u8 = 0x10;

/// One id of a log segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LogEntry<'a> {
    pub(crate) id: &'a [u8],
    pub(crate) ttl_ms: u64,
}

/// Encodes a batch committed at `commit_ms`.
pub(crate) fn encode<'a>(
    commit_ms: u64,
    entries: impl ExactSizeIterator<Item = LogEntry<'a>>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + entries.len() * 48);
    out.push(LOG_FORMAT_V1);
    out.push(KIND_RELAY_IDS);
    put_varint(&mut out, commit_ms);
    put_varint(&mut out, entries.len() as u64);
    for e in entries {
        put_varint(&mut out, e.id.len() as u64);
        out.extend_from_slice(e.id);
        put_varint(&mut out, e.ttl_ms);
    }
    out
}

/// Decodes a log segment into its commit time and entries.
///
/// # Errors
///
/// [`Error::Corrupt`] for a truncated or malformed segment, [`Error::UnknownFormat`] for a
/// format this build does not know.
pub(crate) fn decode(bytes: &[u8]) -> Result<(u64, Vec<LogEntry<'_>>), Error> {
    let corrupt = |reason: &str| Error::Corrupt {
        id: "<log segment>".into(),
        reason: reason.into(),
    };
    let mut r = Reader(bytes);
    let format = r.byte().ok_or_else(|| corrupt("empty"))?;
    if format != LOG_FORMAT_V1 {
        return Err(Error::UnknownFormat {
            id: "<log segment>".into(),
            version: format,
        });
    }
    if r.byte() != Some(KIND_RELAY_IDS) {
        return Err(corrupt("not a segment of relay ids"));
    }
    let commit_ms = r.varint().ok_or_else(|| corrupt("truncated header"))?;
    let count = r.varint().ok_or_else(|| corrupt("truncated header"))?;
    // Each entry takes at least 3 bytes: a count beyond that is corruption, not an allocation.
    if count > bytes.len() as u64 / 3 {
        return Err(corrupt("count exceeds the segment's size"));
    }
    let mut entries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let len = r.varint().ok_or_else(|| corrupt("truncated entry"))?;
        let id = r.take(len).ok_or_else(|| corrupt("truncated id"))?;
        let ttl_ms = r.varint().ok_or_else(|| corrupt("truncated entry"))?;
        entries.push(LogEntry { id, ttl_ms });
    }
    if !r.0.is_empty() {
        return Err(corrupt("trailing bytes"));
    }
    Ok((commit_ms, entries))
}

/// LEB128 varint.
pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A cursor over bytes, every read checked.
pub(crate) struct Reader<'a>(pub(crate) &'a [u8]);

impl<'a> Reader<'a> {
    pub(crate) fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    pub(crate) fn take(&mut self, n: u64) -> Option<&'a [u8]> {
        let n = usize::try_from(n).ok()?;
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    pub(crate) fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_segment_round_trips() {
        let ids: [&[u8]; 3] = [b"a", b"order-42", &[0xff; 300]];
        let bytes = encode(
            1_764_000_000_000,
            ids.iter().map(|id| LogEntry {
                id,
                ttl_ms: 86_400_000,
            }),
        );
        let (at, entries) = decode(&bytes).unwrap();
        assert_eq!(at, 1_764_000_000_000);
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[2].id, &[0xff; 300][..]);
        assert!(entries.iter().all(|e| e.ttl_ms == 86_400_000));
    }

    #[test]
    fn truncated_or_foreign_segments_are_errors() {
        let bytes = encode(
            5,
            [LogEntry {
                id: b"abc",
                ttl_ms: 9,
            }]
            .into_iter(),
        );
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut other = bytes.clone();
        other[0] = 7;
        assert!(matches!(
            decode(&other),
            Err(Error::UnknownFormat { version: 7, .. })
        ));
    }
}
