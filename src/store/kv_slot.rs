//! A Redis key's entry in the index, in as few bytes as the key and value allow: one heap block
//! behind an 8-byte pointer. At 1 M keys the index is most of what the endpoint holds per key,
//! and the table stores one pointer a bucket at about half load after its last doubling, so
//! both the pointer and the block count.
//!
//! The block: the expiry (a little-endian `u64`, first, because liveness checks read it most),
//! then as LEB128 varints the key's length, the value's length, the set time and the retain
//! time as (wrapping) distances from the expiry, and the version of the write that made the
//! entry; then the key and the value. The seed's `msg:<12 digits>` with value `1`, a day's
//! window and a version under 2²¹ is 35 bytes (mimalloc's 40-byte class), where five fixed
//! words and a fat pointer made it 53 bytes (the 56-byte class) plus 16 in the table.

use std::fmt;
use std::ptr::NonNull;

/// Longest varint of a `u64`.
const MAX_VARINT: usize = 10;
/// Longest header: the expiry and five varints.
const MAX_HEADER: usize = 8 + 5 * MAX_VARINT;

/// A Redis key's entry: key, value, set time, expiry, retain time (how long the entry must stay
/// on disk: the longest expiry of the writes it shadows) and version (see `segment.rs`).
pub(crate) struct KvSlot {
    /// The block, made from a `Box<[u8]>` whose length the header gives (see [`Header::len`]).
    ptr: NonNull<u8>,
}

// SAFETY: a `KvSlot` owns its block alone and never hands out a mutable view of it, as a
// `Box<[u8]>` does.
unsafe impl Send for KvSlot {}
// SAFETY: as above; shared access only reads.
unsafe impl Sync for KvSlot {}

/// What the header says, decoded.
struct Header {
    /// Where the key starts.
    key_at: usize,
    key_len: usize,
    value_len: usize,
    expires_ms: u64,
    set_ms: u64,
    retain_ms: u64,
    version: u64,
}

impl Header {
    /// Bytes of the whole block.
    fn len(&self) -> usize {
        self.key_at + self.key_len + self.value_len
    }
}

/// Writes `v` as a varint at `out[*at..]`, moving `at` past it.
fn put_varint(out: &mut [u8; MAX_HEADER], at: &mut usize, mut v: u64) {
    while v >= 0x80 {
        out[*at] = v as u8 | 0x80;
        *at += 1;
        v >>= 7;
    }
    out[*at] = v as u8;
    *at += 1;
}

impl KvSlot {
    /// A slot kept on disk as long as it lives (`retain_ms` = `expires_ms`), version 0.
    #[cfg(test)]
    pub(crate) fn new(key: &[u8], value: &[u8], set_ms: u64, expires_ms: u64) -> KvSlot {
        KvSlot::with_times(key, value, [set_ms, expires_ms, expires_ms, 0])
    }

    /// A slot with its set time, expiry, retain time and version.
    pub(crate) fn with_times(key: &[u8], value: &[u8], times: [u64; 4]) -> KvSlot {
        let [set_ms, expires_ms, retain_ms, version] = times;
        let mut header = [0u8; MAX_HEADER];
        header[..8].copy_from_slice(&expires_ms.to_le_bytes());
        let mut at = 8;
        put_varint(&mut header, &mut at, key.len() as u64);
        put_varint(&mut header, &mut at, value.len() as u64);
        put_varint(&mut header, &mut at, expires_ms.wrapping_sub(set_ms));
        put_varint(&mut header, &mut at, retain_ms.wrapping_sub(expires_ms));
        put_varint(&mut header, &mut at, version);
        // Sized exactly, so that the box keeps the block as allocated.
        let mut data = Vec::with_capacity(at + key.len() + value.len());
        data.extend_from_slice(&header[..at]);
        data.extend_from_slice(key);
        data.extend_from_slice(value);
        let block: Box<[u8]> = data.into_boxed_slice();
        let ptr = NonNull::new(Box::into_raw(block).cast::<u8>()).expect("a box is not null");
        KvSlot { ptr }
    }

    /// The byte at `i` of the block.
    ///
    /// The caller reads only within the header it is decoding, which lies inside the block.
    fn byte(&self, i: usize) -> u8 {
        // SAFETY: `i` is within the header the block was written with (see `header`), so
        // within the block.
        unsafe { *self.ptr.as_ptr().add(i) }
    }

    fn varint(&self, at: &mut usize) -> u64 {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let b = self.byte(*at);
            *at += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return v;
            }
            shift += 7;
        }
    }

    fn header(&self) -> Header {
        let mut expiry = [0u8; 8];
        for (i, b) in expiry.iter_mut().enumerate() {
            *b = self.byte(i);
        }
        let expires_ms = u64::from_le_bytes(expiry);
        let mut at = 8;
        let key_len = self.varint(&mut at) as usize;
        let value_len = self.varint(&mut at) as usize;
        let set_ms = expires_ms.wrapping_sub(self.varint(&mut at));
        let retain_ms = expires_ms.wrapping_add(self.varint(&mut at));
        let version = self.varint(&mut at);
        Header {
            key_at: at,
            key_len,
            value_len,
            expires_ms,
            set_ms,
            retain_ms,
            version,
        }
    }

    /// The whole block.
    fn block(&self, header: &Header) -> &[u8] {
        // SAFETY: the block is `header.len()` bytes long (it was a `Box<[u8]>` of that length)
        // and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), header.len()) }
    }

    /// When the key was last set (ms since the Unix epoch).
    pub(crate) fn set_ms(&self) -> u64 {
        self.header().set_ms
    }

    /// When the key expires.
    pub(crate) fn expires_ms(&self) -> u64 {
        let mut expiry = [0u8; 8];
        for (i, b) in expiry.iter_mut().enumerate() {
            *b = self.byte(i);
        }
        u64::from_le_bytes(expiry)
    }

    /// How long the entry must stay on disk (≥ its expiry).
    pub(crate) fn retain_ms(&self) -> u64 {
        self.header().retain_ms
    }

    /// The version of the write that made the entry.
    pub(crate) fn version(&self) -> u64 {
        self.header().version
    }

    pub(crate) fn key(&self) -> &[u8] {
        let h = self.header();
        &self.block(&h)[h.key_at..h.key_at + h.key_len]
    }

    pub(crate) fn value(&self) -> &[u8] {
        let h = self.header();
        &self.block(&h)[h.key_at + h.key_len..]
    }

    /// Set time, expiry, retain time and version, as [`KvSlot::with_times`] takes them.
    pub(crate) fn times(&self) -> [u64; 4] {
        let h = self.header();
        [h.set_ms, h.expires_ms, h.retain_ms, h.version]
    }
}

impl Drop for KvSlot {
    fn drop(&mut self) {
        let len = self.header().len();
        let raw = std::ptr::slice_from_raw_parts_mut(self.ptr.as_ptr(), len);
        // SAFETY: `ptr` came from `Box::into_raw` of a `Box<[u8]>` of `len` bytes (the header
        // says so), and nothing else frees it.
        drop(unsafe { Box::from_raw(raw) });
    }
}

impl Clone for KvSlot {
    fn clone(&self) -> KvSlot {
        let h = self.header();
        let copy: Box<[u8]> = self.block(&h).into();
        let ptr = NonNull::new(Box::into_raw(copy).cast::<u8>()).expect("a box is not null");
        KvSlot { ptr }
    }
}

impl PartialEq for KvSlot {
    fn eq(&self, other: &KvSlot) -> bool {
        self.block(&self.header()) == other.block(&other.header())
    }
}

impl Eq for KvSlot {}

impl fmt::Debug for KvSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [set_ms, expires_ms, retain_ms, version] = self.times();
        f.debug_struct("KvSlot")
            .field("key", &String::from_utf8_lossy(self.key()))
            .field("value_len", &self.value().len())
            .field("set_ms", &set_ms)
            .field("expires_ms", &expires_ms)
            .field("retain_ms", &retain_ms)
            .field("version", &version)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_round_trip_any_times() {
        let cases: &[(&[u8], &[u8], [u64; 4])] = &[
            (
                b"msg:000000123456",
                b"1",
                [
                    1_764_000_000_000,
                    1_764_086_400_000,
                    1_764_086_400_000,
                    1_234_567,
                ],
            ),
            (b"k", b"", [0, 0, 0, 0]),
            // Set after its expiry, retained for less than it lives: odd, but kept exactly.
            (b"k", b"v", [u64::MAX, 5, 1, u64::MAX]),
            (&[0xff; 300], &[7; 70_000], [3, u64::MAX, u64::MAX, 1 << 40]),
        ];
        for &(key, value, times) in cases {
            let s = KvSlot::with_times(key, value, times);
            assert_eq!((s.key(), s.value(), s.times()), (key, value, times));
            assert_eq!(s.expires_ms(), times[1]);
            assert_eq!(
                (s.set_ms(), s.retain_ms(), s.version()),
                (times[0], times[2], times[3])
            );
            let c = s.clone();
            assert_eq!(c, s);
            drop(s);
            assert_eq!((c.key(), c.value(), c.times()), (key, value, times));
        }
        assert_ne!(KvSlot::new(b"a", b"1", 1, 2), KvSlot::new(b"a", b"2", 1, 2));
    }

    #[test]
    fn the_seed_key_fits_in_forty_bytes() {
        assert_eq!(std::mem::size_of::<KvSlot>(), 8);
        assert_eq!(std::mem::size_of::<Option<KvSlot>>(), 8);
        let s = KvSlot::with_times(
            b"msg:000000123456",
            b"1",
            [
                1_764_000_000_000,
                1_764_086_400_000,
                1_764_086_400_000,
                1_000_000,
            ],
        );
        assert_eq!(s.header().len(), 35);
    }
}
