//! The first layout's per-id records, read once to migrate a data dir to segments, and
//! [`Seen`], what the store tells about a seen id.
//!
//! Every record starts with a format byte so that a future layout is recognised as such instead
//! of being decoded as garbage. The payload after it is bincode (standard config, varints).

use serde::{Deserialize, Serialize};

use super::Error;

/// Record layout of the relay's ids: first seen, TTL.
pub(crate) const FORMAT_V1: u8 = 1;
/// Record layout of the Redis endpoint's keys: set time, TTL, then the value's raw bytes.
pub(crate) const FORMAT_KV_V1: u8 = 2;

/// What the store knows about a seen id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    /// When the id was recorded, in milliseconds since the Unix epoch.
    pub first_seen_ms: u64,
    /// When the id leaves the dedup window, in milliseconds since the Unix epoch.
    pub expires_ms: u64,
}

impl Seen {
    /// Whether the id is still inside its window at `now_ms`.
    pub fn is_live(&self, now_ms: u64) -> bool {
        now_ms < self.expires_ms
    }
}

/// Version 1 payload. The TTL is stored rather than the expiry because it fits a short varint
/// (a 24 h window is 5 bytes, an absolute timestamp 9): disk per id is a goal.
#[derive(Serialize, Deserialize)]
struct RecordV1 {
    first_seen_ms: u64,
    ttl_ms: u64,
}

fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes a record: format byte, then the bincode payload (the first layout; tests only).
#[cfg(test)]
pub(crate) fn encode(seen: Seen) -> Vec<u8> {
    let payload = RecordV1 {
        first_seen_ms: seen.first_seen_ms,
        ttl_ms: seen.expires_ms.saturating_sub(seen.first_seen_ms),
    };
    let mut out = Vec::with_capacity(16);
    out.push(FORMAT_V1);
    bincode::serde::encode_into_std_write(&payload, &mut out, bincode_config())
        .expect("writing to a Vec cannot fail");
    out
}

/// Encodes a key-value record: format byte, the bincode header, then the value as is.
#[cfg(test)]
pub(crate) fn encode_kv(seen: Seen, value: &[u8]) -> Vec<u8> {
    let mut out = encode(seen);
    out[0] = FORMAT_KV_V1;
    out.extend_from_slice(value);
    out
}

/// Decodes a key-value record written by [`encode_kv`]: its times and its value.
///
/// # Errors
///
/// As [`decode`]; a relay record (format 1) is an unknown format here.
pub(crate) fn decode_kv<'a>(key: &[u8], bytes: &'a [u8]) -> Result<(Seen, &'a [u8]), Error> {
    parse(key, bytes, &[FORMAT_KV_V1])
}

/// Decodes the times of any record (either layout): what the sweep and the rebuild need.
///
/// # Errors
///
/// [`Error::UnknownFormat`] for a format byte this build does not know, [`Error::Corrupt`] for a
/// payload that does not decode.
pub(crate) fn decode(id: &[u8], bytes: &[u8]) -> Result<Seen, Error> {
    parse(id, bytes, &[FORMAT_V1, FORMAT_KV_V1]).map(|(seen, _)| seen)
}

/// Splits a record of one of the `accepted` formats into its times and what follows them.
fn parse<'a>(id: &[u8], bytes: &'a [u8], accepted: &[u8]) -> Result<(Seen, &'a [u8]), Error> {
    let lossy = || String::from_utf8_lossy(id).into_owned();
    let corrupt = |reason: String| Error::Corrupt {
        id: lossy(),
        reason,
    };
    let (&format, payload) = bytes
        .split_first()
        .ok_or_else(|| corrupt("empty record".into()))?;
    if !accepted.contains(&format) {
        return Err(Error::UnknownFormat {
            id: lossy(),
            version: format,
        });
    }
    let (rec, used): (RecordV1, usize) =
        bincode::serde::decode_from_slice(payload, bincode_config())
            .map_err(|e| corrupt(e.to_string()))?;
    let seen = Seen {
        first_seen_ms: rec.first_seen_ms,
        expires_ms: rec.first_seen_ms.saturating_add(rec.ttl_ms),
    };
    Ok((seen, &payload[used..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips() {
        let seen = Seen {
            first_seen_ms: 1_764_000_000_000,
            expires_ms: 1_764_000_000_000 + 86_400_000,
        };
        let bytes = encode(seen);
        assert_eq!(bytes[0], FORMAT_V1);
        // Format byte + 9-byte varint timestamp + 5-byte varint TTL.
        assert_eq!(bytes.len(), 15);
        assert_eq!(decode(b"x", &bytes).unwrap(), seen);
    }

    #[test]
    fn kv_record_round_trips_and_reads_as_seen() {
        let seen = Seen {
            first_seen_ms: 10,
            expires_ms: 1_010,
        };
        let bytes = encode_kv(seen, b"result \x00 bytes");
        assert_eq!(
            decode_kv(b"k", &bytes).unwrap(),
            (seen, &b"result \x00 bytes"[..])
        );
        assert_eq!(decode(b"k", &bytes).unwrap(), seen);
        // A relay record is not a key-value one.
        assert!(decode_kv(b"k", &encode(seen)).is_err());
    }

    #[test]
    fn unknown_format_is_an_error_not_garbage() {
        let mut bytes = encode(Seen {
            first_seen_ms: 1,
            expires_ms: 2,
        });
        bytes[0] = 9;
        let err = decode(b"abc", &bytes).unwrap_err();
        assert!(
            matches!(err, Error::UnknownFormat { version: 9, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("format version 9"), "{err}");
    }
}
