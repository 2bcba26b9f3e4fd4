//! The unit on disk: one sled value per commit batch (a segment), in one of two trees (relay
//! ids, Redis-endpoint keys).
//!
//! Key: the segment's expiry (big-endian ms: the median of its entries' expiries), then a
//! sequence number (big-endian), so the compactor finds what is due with one range scan and
//! the rebuild replays segments in the order they were written (newest entry wins).
//!
//! Value: a format byte, a kind byte, the commit time (varint ms), the entry count (varint),
//! then the entries:
//! - relay: the 16-byte keyed digest of the id, then a varint of
//!   `(expires_ms - commit_ms) << 1 | tombstone`. In format 3 (relay segments written since it
//!   exists) a varint after the count says whether every entry shares that value: 0 if not
//!   (each entry then carries its own, as in format 2), the value plus one if so, and the entries
//!   are then the digests alone. A commit's ids share their window unless messages set their
//!   own (`x-dedup-ttl`), so a segment takes 16 bytes an id instead of 20 on disk, and as much
//!   less in what sled keeps of it in memory;
//! - Redis keys: a tag byte (0 put, 1 delete), the key (varint length + bytes), then for a put
//!   the value (varint length + bytes), the set time, the expiry and how much longer the entry
//!   must stay on disk (varint ms each), and for a delete how long it must stay (varint ms);
//!   for both the version last (varint). In format 3 (Redis-key segments written since it
//!   exists), the set time and the expiry (a delete's too) are
//!   zigzag varints of their distance from the commit time, 4 bytes for a day's window and 1
//!   for a set time, where format 2's absolute times took 6 bytes each; format 2 segments
//!   still read. Versions order a key's writes however segments are
//!   rewritten; an entry stays on disk as long as an older one it shadows does (an `EXPIRE`
//!   that shortens a key, a `DEL`), so dropping it can never bring the older one back.

use super::log::{put_varint, Reader};
use super::Error;

/// Format byte of this layout.
pub(crate) const FORMAT_V2: u8 = 2;
/// Format byte of Redis-key segments whose times are relative to the commit time, and of relay
/// segments that may say their entries' shared window once.
pub(crate) const FORMAT_V3: u8 = 3;
const KIND_RELAY: u8 = 1;
const KIND_KV: u8 = 2;

/// An entry of a relay segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RelayEntry {
    /// The id's keyed 128-bit digest.
    pub(crate) digest: u128,
    /// When the id leaves the window (for a tombstone: when the entry it kills does).
    pub(crate) expires_ms: u64,
    /// `dedupd forget`: the id is no longer seen.
    pub(crate) tombstone: bool,
}

/// An entry of a Redis-endpoint segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KvEntry {
    /// The key holds `value` from `set_ms` until `expires_ms`; the entry stays on disk until
    /// `retain_ms` (≥ `expires_ms`).
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        set_ms: u64,
        expires_ms: u64,
        retain_ms: u64,
        version: u64,
    },
    /// The key was deleted; the tombstone stays on disk until `expires_ms`.
    Delete {
        key: Vec<u8>,
        expires_ms: u64,
        version: u64,
    },
}

impl KvEntry {
    pub(crate) fn key(&self) -> &[u8] {
        match self {
            KvEntry::Put { key, .. } | KvEntry::Delete { key, .. } => key,
        }
    }

    /// How long the entry must stay on disk.
    pub(crate) fn retain_ms(&self) -> u64 {
        match self {
            KvEntry::Put { retain_ms, .. } => *retain_ms,
            KvEntry::Delete { expires_ms, .. } => *expires_ms,
        }
    }

    pub(crate) fn version(&self) -> u64 {
        match self {
            KvEntry::Put { version, .. } | KvEntry::Delete { version, .. } => *version,
        }
    }
}

/// Key of a segment: expiry, then sequence number, both big-endian.
pub(crate) fn key(expires_ms: u64, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&expires_ms.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// Inclusive upper bound of the keys of segments due at `now_ms`.
pub(crate) fn due_bound(now_ms: u64) -> [u8; 16] {
    key(now_ms, u64::MAX)
}

/// The (expiry, sequence) of a segment key.
pub(crate) fn parse_key(k: &[u8]) -> (u64, u64) {
    let word = |r: std::ops::Range<usize>| {
        k.get(r)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map_or(0, u64::from_be_bytes)
    };
    (word(0..8), word(8..16))
}

/// The expiry a segment is filed under: the median of its entries', so the compactor reaches
/// it once at least half of them are due, and what it rewrites forward is at most half.
pub(crate) fn filing_expiry(mut expiries: Vec<u64>) -> u64 {
    if expiries.is_empty() {
        return 0;
    }
    let mid = expiries.len() / 2;
    *expiries.select_nth_unstable(mid).1
}

fn header(format: u8, kind: u8, commit_ms: u64, count: usize, per_entry: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + count * per_entry);
    out.push(format);
    out.push(kind);
    put_varint(&mut out, commit_ms);
    put_varint(&mut out, count as u64);
    out
}

/// Encodes a relay segment committed at `commit_ms`.
pub(crate) fn encode_relay(commit_ms: u64, entries: &[RelayEntry]) -> Vec<u8> {
    let tagged = |e: &RelayEntry| {
        let life = e.expires_ms.saturating_sub(commit_ms);
        (life << 1) | u64::from(e.tombstone)
    };
    // The value every entry shares, if any (and if one more still fits the header's varint).
    let shared = entries
        .first()
        .map(tagged)
        .filter(|&t| t < u64::MAX && entries.iter().all(|e| tagged(e) == t));
    let per_entry = if shared.is_some() { 16 } else { 21 };
    let mut out = header(FORMAT_V3, KIND_RELAY, commit_ms, entries.len(), per_entry);
    put_varint(&mut out, shared.map_or(0, |t| t + 1));
    for e in entries {
        out.extend_from_slice(&e.digest.to_le_bytes());
        if shared.is_none() {
            put_varint(&mut out, tagged(e));
        }
    }
    out
}

/// Encodes a Redis-endpoint segment committed at `commit_ms` (its entries' times are written
/// relative to it).
pub(crate) fn encode_kv(commit_ms: u64, entries: &[KvEntry]) -> Vec<u8> {
    let mut body = Vec::with_capacity(entries.len() * 32);
    for e in entries {
        match e {
            KvEntry::Put {
                key,
                value,
                set_ms,
                expires_ms,
                retain_ms,
                version,
            } => put_kv_put(
                &mut body,
                key,
                value,
                [*set_ms, *expires_ms, *retain_ms, *version],
                commit_ms,
            ),
            KvEntry::Delete {
                key,
                expires_ms,
                version,
            } => put_kv_delete(&mut body, key, *expires_ms, *version, commit_ms),
        }
    }
    kv_segment(commit_ms, entries.len(), &body)
}

/// A Redis-endpoint segment of `count` entries already encoded into `body` (by
/// [`put_kv_put`] and [`put_kv_delete`], with `commit_ms` as their base).
pub(crate) fn kv_segment(commit_ms: u64, count: usize, body: &[u8]) -> Vec<u8> {
    let mut out = header(FORMAT_V3, KIND_KV, commit_ms, count, 0);
    out.reserve_exact(body.len());
    out.extend_from_slice(body);
    out
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// `t` as a zigzag varint of its distance from `base` (any two times round-trip).
fn put_time(out: &mut Vec<u8>, t: u64, base: u64) {
    let d = t.wrapping_sub(base) as i64;
    put_varint(out, ((d << 1) ^ (d >> 63)) as u64);
}

/// The time [`put_time`] wrote as `z` against `base`.
fn time_at(z: u64, base: u64) -> u64 {
    let d = (z >> 1) as i64 ^ -((z & 1) as i64);
    base.wrapping_add(d as u64)
}

/// Appends a put entry to a segment's body; `times` are the set time, the expiry, how long
/// the entry must stay on disk and the version; `base_ms` is the commit time the segment's
/// header will carry.
pub(crate) fn put_kv_put(
    out: &mut Vec<u8>,
    key: &[u8],
    value: &[u8],
    times: [u64; 4],
    base_ms: u64,
) {
    let [set_ms, expires_ms, retain_ms, version] = times;
    out.push(0);
    put_bytes(out, key);
    put_bytes(out, value);
    put_time(out, set_ms, base_ms);
    put_time(out, expires_ms, base_ms);
    put_varint(out, retain_ms.saturating_sub(expires_ms));
    put_varint(out, version);
}

/// Appends a delete entry to a segment's body (`base_ms` as for [`put_kv_put`]).
pub(crate) fn put_kv_delete(
    out: &mut Vec<u8>,
    key: &[u8],
    expires_ms: u64,
    version: u64,
    base_ms: u64,
) {
    out.push(1);
    put_bytes(out, key);
    put_time(out, expires_ms, base_ms);
    put_varint(out, version);
}

fn corrupt(reason: &str) -> Error {
    Error::Corrupt {
        id: "<segment>".into(),
        reason: reason.into(),
    }
}

/// Reads the header of a segment of `kind` in one of `formats`: its format, commit time and
/// entry count.
fn open_format<'a>(
    bytes: &'a [u8],
    kind: u8,
    formats: &[u8],
) -> Result<(Reader<'a>, u8, u64, u64), Error> {
    let mut r = Reader(bytes);
    let format = r.byte().ok_or_else(|| corrupt("empty segment"))?;
    if !formats.contains(&format) {
        return Err(Error::UnknownFormat {
            id: "<segment>".into(),
            version: format,
        });
    }
    if r.byte() != Some(kind) {
        return Err(corrupt("segment of another namespace"));
    }
    let commit_ms = r.varint().ok_or_else(|| corrupt("truncated header"))?;
    let count = r.varint().ok_or_else(|| corrupt("truncated header"))?;
    if count > bytes.len() as u64 {
        return Err(corrupt("entry count exceeds the segment's size"));
    }
    Ok((r, format, commit_ms, count))
}

/// Decodes a relay segment: its commit time and entries.
///
/// # Errors
///
/// [`Error::UnknownFormat`] or [`Error::Corrupt`].
pub(crate) fn decode_relay(bytes: &[u8]) -> Result<(u64, Vec<RelayEntry>), Error> {
    let (mut r, format, commit_ms, count) =
        open_format(bytes, KIND_RELAY, &[FORMAT_V2, FORMAT_V3])?;
    // Format 3 says once the value every entry shares, if they do.
    let shared = match format {
        FORMAT_V2 => None,
        _ => match r.varint().ok_or_else(|| corrupt("truncated header"))? {
            0 => None,
            plus_one => Some(plus_one - 1),
        },
    };
    let mut entries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let digest = r
            .take(16)
            .and_then(|b| <[u8; 16]>::try_from(b).ok())
            .map(u128::from_le_bytes)
            .ok_or_else(|| corrupt("truncated digest"))?;
        let tagged = match shared {
            Some(tagged) => tagged,
            None => r.varint().ok_or_else(|| corrupt("truncated expiry"))?,
        };
        entries.push(RelayEntry {
            digest,
            expires_ms: commit_ms.saturating_add(tagged >> 1),
            tombstone: tagged & 1 == 1,
        });
    }
    if !r.0.is_empty() {
        return Err(corrupt("trailing bytes"));
    }
    Ok((commit_ms, entries))
}

/// An entry of a Redis-endpoint segment, borrowed from the segment's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KvRef<'a> {
    /// As [`KvEntry::Put`]; `times` are the set time, the expiry, the retain time and the
    /// version.
    Put {
        key: &'a [u8],
        value: &'a [u8],
        times: [u64; 4],
    },
    /// As [`KvEntry::Delete`].
    Delete {
        key: &'a [u8],
        expires_ms: u64,
        version: u64,
    },
}

/// Calls `f` with each entry of a Redis-endpoint segment, in order, without copying any;
/// returns the segment's commit time. On an error, `f` may have seen the entries before it.
///
/// # Errors
///
/// [`Error::UnknownFormat`] or [`Error::Corrupt`].
pub(crate) fn visit_kv<'a>(bytes: &'a [u8], mut f: impl FnMut(KvRef<'a>)) -> Result<u64, Error> {
    let (mut r, format, commit_ms, count) = open_format(bytes, KIND_KV, &[FORMAT_V2, FORMAT_V3])?;
    let truncated = || corrupt("truncated entry");
    // Format 2 wrote times as they are, format 3 against the commit time.
    let time = |r: &mut Reader<'a>| {
        let v = r.varint().ok_or_else(truncated)?;
        Ok::<u64, Error>(match format {
            FORMAT_V2 => v,
            _ => time_at(v, commit_ms),
        })
    };
    for _ in 0..count {
        let tag = r.byte().ok_or_else(truncated)?;
        let len = r.varint().ok_or_else(truncated)?;
        let key = r.take(len).ok_or_else(truncated)?;
        let entry = match tag {
            0 => {
                let len = r.varint().ok_or_else(truncated)?;
                let value = r.take(len).ok_or_else(truncated)?;
                let set_ms = time(&mut r)?;
                let expires_ms = time(&mut r)?;
                let retain_ms = expires_ms.saturating_add(r.varint().ok_or_else(truncated)?);
                let version = r.varint().ok_or_else(truncated)?;
                KvRef::Put {
                    key,
                    value,
                    times: [set_ms, expires_ms, retain_ms, version],
                }
            }
            1 => KvRef::Delete {
                key,
                expires_ms: time(&mut r)?,
                version: r.varint().ok_or_else(truncated)?,
            },
            _ => return Err(corrupt("unknown entry tag")),
        };
        f(entry);
    }
    if !r.0.is_empty() {
        return Err(corrupt("trailing bytes"));
    }
    Ok(commit_ms)
}

/// Entries in a Redis-endpoint segment, from its header.
///
/// # Errors
///
/// [`Error::UnknownFormat`] or [`Error::Corrupt`].
pub(crate) fn kv_count(bytes: &[u8]) -> Result<u64, Error> {
    Ok(open_format(bytes, KIND_KV, &[FORMAT_V2, FORMAT_V3])?.3)
}

/// Decodes a Redis-endpoint segment.
///
/// # Errors
///
/// [`Error::UnknownFormat`] or [`Error::Corrupt`].
pub(crate) fn decode_kv(bytes: &[u8]) -> Result<(u64, Vec<KvEntry>), Error> {
    let mut entries = Vec::with_capacity(kv_count(bytes)? as usize);
    let commit_ms = visit_kv(bytes, |e| {
        entries.push(match e {
            KvRef::Put { key, value, times } => KvEntry::Put {
                key: key.to_vec(),
                value: value.to_vec(),
                set_ms: times[0],
                expires_ms: times[1],
                retain_ms: times[2],
                version: times[3],
            },
            KvRef::Delete {
                key,
                expires_ms,
                version,
            } => KvEntry::Delete {
                key: key.to_vec(),
                expires_ms,
                version,
            },
        });
    })?;
    Ok((commit_ms, entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1024 entries committed at `t` for a day, the `i`-th a tombstone if `tombstone(i)`.
    fn day_of_entries(t: u64, tombstone: impl Fn(u128) -> bool) -> Vec<RelayEntry> {
        (0..1024u128)
            .map(|i| RelayEntry {
                digest: i * 0x9e37_79b9_7f4a_7c15,
                expires_ms: t + 86_400_000,
                tombstone: tombstone(i),
            })
            .collect()
    }

    #[test]
    fn relay_segment_round_trips_in_about_twenty_bytes_an_id() {
        let t = 1_764_000_000_000;
        let entries = day_of_entries(t, |i| i == 7);
        let bytes = encode_relay(t, &entries);
        // One tombstone among them: each entry says its own window, 16-byte digest + 4-byte
        // varint of a day in ms (shifted by one bit).
        assert!(bytes.len() <= 16 + 1024 * 20, "{}", bytes.len());
        assert_eq!(decode_relay(&bytes).unwrap(), (t, entries));
    }

    #[test]
    fn a_shared_window_is_written_once_and_every_entry_reads_it() {
        let t = 1_764_000_000_000;
        let entries = day_of_entries(t, |_| false);
        let bytes = encode_relay(t, &entries);
        let header = encode_relay(t, &[]).len();
        // The digests alone, and the shared value once in the header (4 bytes for a day).
        assert_eq!(bytes.len(), header + 4 + 1024 * 16);
        assert_eq!(decode_relay(&bytes).unwrap(), (t, entries));
        // Windows that differ (a message's own `x-dedup-ttl`) are written per entry again.
        let mixed = [
            RelayEntry {
                digest: 1,
                expires_ms: t + 5_000,
                tombstone: false,
            },
            RelayEntry {
                digest: 2,
                expires_ms: t + 86_400_000,
                tombstone: false,
            },
        ];
        assert_eq!(
            decode_relay(&encode_relay(t, &mixed)).unwrap(),
            (t, mixed.to_vec())
        );
    }

    #[test]
    fn format_2_relay_segments_still_read() {
        // Commit time 5, two entries: digest 3 until 9 (life 4), digest 7 a tombstone until 6.
        let mut v2 = vec![FORMAT_V2, KIND_RELAY, 5, 2];
        v2.extend_from_slice(&3u128.to_le_bytes());
        v2.push(4 << 1);
        v2.extend_from_slice(&7u128.to_le_bytes());
        v2.push((1 << 1) | 1);
        let entries = vec![
            RelayEntry {
                digest: 3,
                expires_ms: 9,
                tombstone: false,
            },
            RelayEntry {
                digest: 7,
                expires_ms: 6,
                tombstone: true,
            },
        ];
        assert_eq!(decode_relay(&v2).unwrap(), (5, entries));
    }

    #[test]
    fn kv_segment_round_trips() {
        let entries = vec![
            KvEntry::Put {
                key: b"msg:1".to_vec(),
                value: b"1".to_vec(),
                set_ms: 5,
                expires_ms: 90,
                retain_ms: 120,
                version: 7,
            },
            KvEntry::Delete {
                key: b"msg:2".to_vec(),
                expires_ms: 70,
                version: 8,
            },
        ];
        let bytes = encode_kv(5, &entries);
        assert_eq!(decode_kv(&bytes).unwrap(), (5, entries.clone()));
        // Either namespace refuses the other's segments.
        assert!(decode_relay(&bytes).is_err());
        // Times on either side of the commit time, and far from it, round-trip.
        let far = vec![KvEntry::Put {
            key: b"k".to_vec(),
            value: Vec::new(),
            set_ms: u64::MAX,
            expires_ms: 0,
            retain_ms: 3,
            version: u64::MAX,
        }];
        for base in [0, 1_764_000_000_000, u64::MAX] {
            let bytes = encode_kv(base, &far);
            assert_eq!(decode_kv(&bytes).unwrap(), (base, far.clone()));
        }
        // A format 2 segment (absolute times) still reads.
        let mut v2 = vec![FORMAT_V2, KIND_KV, 5, 2];
        v2.extend_from_slice(&[0, 5, b'm', b's', b'g', b':', b'1', 1, b'1', 5, 90, 30, 7]);
        v2.extend_from_slice(&[1, 5, b'm', b's', b'g', b':', b'2', 70, 8]);
        assert_eq!(decode_kv(&v2).unwrap(), (5, entries));
    }

    #[test]
    fn the_seed_entry_takes_twenty_nine_bytes() {
        let t = 1_764_000_000_000;
        let seed = KvEntry::Put {
            key: b"msg:000000123456".to_vec(),
            value: b"1".to_vec(),
            set_ms: t - 3,
            expires_ms: t - 3 + 86_400_000,
            retain_ms: t - 3 + 86_400_000,
            version: 1_000_000,
        };
        let header = encode_kv(t, &[]).len();
        // Tag 1, key 17, value 2, set time 1, expiry 4, retain 1, version 3 (format 2: 36).
        assert_eq!(encode_kv(t, &[seed]).len() - header, 29);
    }

    #[test]
    fn damaged_segments_are_errors_never_garbage() {
        let bytes = encode_relay(
            1,
            &[RelayEntry {
                digest: 3,
                expires_ms: 9,
                tombstone: false,
            }],
        );
        for cut in 0..bytes.len() {
            assert!(decode_relay(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut future = bytes.clone();
        future[0] = 9;
        assert!(matches!(
            decode_relay(&future),
            Err(Error::UnknownFormat { version: 9, .. })
        ));
    }

    #[test]
    fn keys_sort_by_expiry_and_the_median_files_a_segment() {
        assert!(key(5, u64::MAX) < key(6, 0));
        assert_eq!(parse_key(&key(77, 3)), (77, 3));
        assert_eq!(filing_expiry(vec![9, 1, 5, 7, 3]), 5);
        assert_eq!(filing_expiry(vec![4; 10]), 4);
    }
}
