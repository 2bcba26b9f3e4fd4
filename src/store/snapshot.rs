//! The index and the Bloom filters written on a clean close, so the next open loads them
//! instead of replaying every segment. Trusted only when the marker in the `meta` tree matches
//! the token inside (the open removes the marker first, so a crash never leaves a snapshot that
//! misses later writes) and the checksum at the end holds.
//!
//! Layout (little-endian): magic, 16-byte token; the number of relay shards (u64), then for
//! each the count of its entries then their 16-byte slots, in the order the shard held them
//! (so loading walks the new table nearly in order); the count of Redis keys then each as key length (u32), value
//! length (u32), key, value, set time, expiry, retention, version (u64 each); the length of the filters (u64) and
//! the filters (bincode); the xxh3-64 of everything before.

use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use super::filter::{Filters, FiltersSnapshot};
use super::index::{Ids, Keyed, Keys, KvSlot, Slot};
use super::Shared;

/// The snapshot's file name in the data dir.
pub(crate) const FILE: &str = "index.snapshot";
/// Magic and layout version.
const MAGIC: &[u8; 8] = b"DDPIDX06";

/// What a trusted snapshot holds.
pub(crate) struct Loaded {
    pub(crate) ids: Ids,
    pub(crate) keys: Keys,
    pub(crate) relay: Filters,
    pub(crate) kv: Filters,
}

/// A writer that keeps the xxh3 of what went through it.
struct Summed<W> {
    inner: W,
    sum: xxhash_rust::xxh3::Xxh3Default,
}

impl<W: Write> Write for Summed<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sum.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the snapshot of `shared` durably to `path` (through a temp file and a rename).
pub(crate) fn write(path: &Path, token: &[u8; 16], shared: &Shared) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let file = fs::File::create(&tmp)?;
    let mut w = Summed {
        inner: BufWriter::with_capacity(1 << 20, file),
        sum: xxhash_rust::xxh3::Xxh3Default::new(),
    };
    w.write_all(MAGIC)?;
    w.write_all(token)?;
    w.write_all(&(shared.ids.shards() as u64).to_le_bytes())?;
    for shard in 0..shared.ids.shards() {
        shared.ids.with_shard(shard, |t| {
            w.write_all(&(t.len() as u64).to_le_bytes())?;
            for slot in t.iter() {
                w.write_all(&slot.to_bytes())?;
            }
            io::Result::Ok(())
        })?;
    }
    w.write_all(&(shared.keys.len() as u64).to_le_bytes())?;
    for shard in 0..shared.keys.tables().shards() {
        shared.keys.tables().with_shard(shard, |t| {
            for s in t.iter() {
                w.write_all(&(s.key().len() as u32).to_le_bytes())?;
                w.write_all(&(s.value().len() as u32).to_le_bytes())?;
                w.write_all(s.key())?;
                w.write_all(s.value())?;
                for t in [s.set_ms(), s.expires_ms(), s.retain_ms(), s.version()] {
                    w.write_all(&t.to_le_bytes())?;
                }
            }
            io::Result::Ok(())
        })?;
    }
    let filters = (
        shared
            .relay
            .filters
            .read()
            .expect("filter lock")
            .to_snapshot(),
        shared.kv.filters.read().expect("filter lock").to_snapshot(),
    );
    let bytes = bincode::serde::encode_to_vec(&filters, bincode::config::standard())
        .map_err(io::Error::other)?;
    w.write_all(&(bytes.len() as u64).to_le_bytes())?;
    w.write_all(&bytes)?;
    let sum = w.sum.digest();
    let mut file = w.inner.into_inner().map_err(|e| e.into_error())?;
    file.write_all(&sum.to_le_bytes())?;
    file.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// A cursor over the snapshot's bytes, every read checked.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
}

/// The snapshot at `path` if it exists, carries `token` and checks out; `None` (logged) when
/// the store must replay instead.
pub(crate) fn load(path: &Path, token: &[u8], keyed: Keyed, expected: usize) -> Option<Loaded> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(path = %path.display(), cause = %e, "index snapshot unreadable, replaying segments");
            return None;
        }
    };
    let loaded = parse(&bytes, token, keyed, expected);
    if loaded.is_none() {
        tracing::warn!(path = %path.display(), "index snapshot does not match the store, replaying segments");
    }
    loaded
}

fn parse(bytes: &[u8], token: &[u8], keyed: Keyed, expected: usize) -> Option<Loaded> {
    let (body, sum) = bytes.split_at(bytes.len().checked_sub(8)?);
    if xxhash_rust::xxh3::xxh3_64(body) != u64::from_le_bytes(sum.try_into().ok()?) {
        return None;
    }
    let mut c = Cursor(body);
    if c.take(8)? != MAGIC || c.take(16)? != token {
        return None;
    }
    let written = usize::try_from(c.u64()?).ok()?;
    let mut shards = Vec::new();
    for _ in 0..written {
        let n = usize::try_from(c.u64()?).ok()?;
        shards.push(c.take(n.checked_mul(Slot::BYTES)?)?);
    }
    // Sized as an open with the same setting would. The shards of a snapshot of a store sized
    // differently (DEDUPD_EXPECTED_IDS changed) are not this index's: their slots go one by one
    // to wherever this index wants them.
    let ids = Ids::ids(expected);
    fn slots(raw: &[u8]) -> impl ExactSizeIterator<Item = Slot> + '_ {
        raw.chunks_exact(Slot::BYTES)
            .map(|b| Slot::from_bytes(b.try_into().expect("chunk of a slot's size")))
    }
    if written != ids.shards() {
        for raw in &shards {
            slots(raw).for_each(|s| {
                ids.put(s);
            });
        }
    } else {
        // Two loaders: the inserts are cache misses, and this machine has cores to spare.
        std::thread::scope(|scope| {
            let (even, odd): (Vec<_>, Vec<_>) =
                shards.iter().enumerate().partition(|(i, _)| i % 2 == 0);
            for half in [even, odd] {
                let ids = &ids;
                scope.spawn(move || {
                    for (shard, raw) in half {
                        ids.load_shard(shard, slots(raw));
                    }
                });
            }
        });
    }
    let keys = Keys::new(keyed);
    for _ in 0..c.u64()? {
        let (klen, vlen) = (c.u32()? as usize, c.u32()? as usize);
        let (key, value) = (c.take(klen)?, c.take(vlen)?);
        let (set_ms, expires_ms) = (c.u64()?, c.u64()?);
        let (retain_ms, version) = (c.u64()?, c.u64()?);
        keys.put(KvSlot::with_times(
            key,
            value,
            [set_ms, expires_ms, retain_ms, version],
        ));
    }
    let len = usize::try_from(c.u64()?).ok()?;
    let (filters, _): ((FiltersSnapshot, FiltersSnapshot), usize) =
        bincode::serde::decode_from_slice(c.take(len)?, bincode::config::standard()).ok()?;
    Some(Loaded {
        ids,
        keys,
        relay: Filters::from_snapshot(filters.0)?,
        kv: Filters::from_snapshot(filters.1)?,
    })
}
