//! Online backup and restore: a consistent point in time of a running store, as a stream.
//!
//! The point is taken under the commit lock: the segments on disk then are listed, the
//! compactor is held off dropping any of them, and they are read and written out while
//! writers go on (their new segments are after the point). Segments are immutable, so the
//! copy is exactly the store at that point.
//!
//! Format, version 1 (integers little-endian):
//! - `dedupd-backup\0`, then the version byte `1`;
//! - the digest secret: length (u32), bytes (ids are digested with it, so it travels along);
//! - one frame per segment: namespace byte (`1` relay ids, `2` Redis keys), the 16-byte
//!   segment key, the value's length (u32), the segment as stored (see `segment.rs`);
//! - the end: namespace byte `0`, the frame count (u64), and the xxh3-64 of every byte before.

use std::io::{self, Read, Write};
use std::sync::atomic::Ordering;

use super::log::Reader;
use super::segment;
use super::{Error, Shared, StoreConfig, LAYOUT_KEY, LAYOUT_SEGMENTS, SECRET_KEY};

const MAGIC: &[u8; 14] = b"dedupd-backup\0";
const VERSION: u8 = 1;
const RELAY: u8 = 1;
const KV: u8 = 2;
const END: u8 = 0;
/// Largest segment a restore accepts: far above what a commit batch writes.
const MAX_SEGMENT: u32 = 1 << 30;

/// What a backup or restore carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct BackupStats {
    /// Segments copied.
    pub segments: u64,
    /// Entries in them (relay ids and Redis keys, expired ones not yet dropped included).
    pub entries: u64,
    /// Bytes of the backup stream.
    pub bytes: u64,
}

/// Holds the compactor off while alive.
struct Pause<'a>(&'a Shared);

impl Drop for Pause<'_> {
    fn drop(&mut self) {
        self.0.backups.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A stream that keeps the xxh3 and the count of what went through it.
struct Summed<S> {
    inner: S,
    sum: xxhash_rust::xxh3::Xxh3Default,
    bytes: u64,
}

impl<S> Summed<S> {
    fn new(inner: S) -> Summed<S> {
        Summed {
            inner,
            sum: xxhash_rust::xxh3::Xxh3Default::new(),
            bytes: 0,
        }
    }
}

impl<W: Write> Write for Summed<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sum.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Summed<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sum.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Entries of a segment, from its header.
fn entry_count(bytes: &[u8]) -> u64 {
    let mut r = Reader(bytes);
    let _ = (r.byte(), r.byte(), r.varint());
    r.varint().unwrap_or(0)
}

/// Writes a backup of `shared` to `out`.
pub(crate) fn write(shared: &Shared, out: &mut dyn Write) -> Result<BackupStats, Error> {
    let io_err = |source| Error::Backup {
        context: "write",
        source,
    };
    shared.backups.fetch_add(1, Ordering::SeqCst);
    let _pause = Pause(shared);
    let (listed, ticket) = {
        let _guard = shared.write_lock()?;
        let mut listed = Vec::new();
        for (ns, tree) in [(RELAY, &shared.relay.segments), (KV, &shared.kv.segments)] {
            for key in tree.iter().keys() {
                listed.push((ns, key.map_err(shared.sled_err("backup"))?));
            }
        }
        (listed, shared.flush.ticket())
    };
    // What was written before the point is durable before it is copied.
    shared
        .flush
        .wait(&shared.db, ticket)
        .map_err(shared.sled_err("backup"))?;
    let secret = shared
        .meta
        .get(SECRET_KEY)
        .map_err(shared.sled_err("backup"))?
        .unwrap_or_default();
    let mut w = Summed::new(io::BufWriter::with_capacity(1 << 20, out));
    let mut stats = BackupStats::default();
    w.write_all(MAGIC).map_err(io_err)?;
    w.write_all(&[VERSION]).map_err(io_err)?;
    w.write_all(&(secret.len() as u32).to_le_bytes())
        .map_err(io_err)?;
    w.write_all(&secret).map_err(io_err)?;
    for (ns, key) in listed {
        let tree = if ns == RELAY {
            &shared.relay.segments
        } else {
            &shared.kv.segments
        };
        // Gone only through `forget --all` meanwhile: then it is forgotten in the copy too.
        let Some(value) = tree.get(&key).map_err(shared.sled_err("backup"))? else {
            continue;
        };
        w.write_all(&[ns]).map_err(io_err)?;
        w.write_all(&key).map_err(io_err)?;
        w.write_all(&(value.len() as u32).to_le_bytes())
            .map_err(io_err)?;
        w.write_all(&value).map_err(io_err)?;
        stats.segments += 1;
        stats.entries += entry_count(&value);
    }
    w.write_all(&[END]).map_err(io_err)?;
    w.write_all(&stats.segments.to_le_bytes()).map_err(io_err)?;
    let sum = w.sum.digest();
    stats.bytes = w.bytes + 8;
    w.inner.write_all(&sum.to_le_bytes()).map_err(io_err)?;
    w.inner.flush().map_err(io_err)?;
    Ok(stats)
}

/// Creates a store in `config.dir` from the backup read from `input`.
pub(crate) fn restore(input: &mut dyn Read, config: &StoreConfig) -> Result<BackupStats, Error> {
    let dir = &config.dir;
    if std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(Error::NotEmpty { path: dir.clone() });
    }
    std::fs::create_dir_all(dir).map_err(|source| Error::Snapshot {
        path: dir.clone(),
        source,
    })?;
    let result = restore_into(input, config);
    if result.is_err() {
        // Nothing half-restored stays behind to be opened as a store.
        let _ = std::fs::remove_dir_all(dir);
    }
    result
}

fn restore_into(input: &mut dyn Read, config: &StoreConfig) -> Result<BackupStats, Error> {
    let bad = |what: &str| Error::BadBackup(what.to_string());
    let io_err = |source: io::Error| {
        if source.kind() == io::ErrorKind::UnexpectedEof {
            Error::BadBackup("truncated".into())
        } else {
            Error::Backup {
                context: "read",
                source,
            }
        }
    };
    let mut r = Summed::new(io::BufReader::with_capacity(1 << 20, input));
    let exact = |r: &mut Summed<_>, n: usize| -> Result<Vec<u8>, Error> {
        let mut buf = vec![0u8; n];
        Read::read_exact(r, &mut buf).map_err(io_err)?;
        Ok(buf)
    };
    if exact(&mut r, MAGIC.len())? != MAGIC {
        return Err(bad("no dedupd-backup header"));
    }
    let version = exact(&mut r, 1)?[0];
    if version != VERSION {
        return Err(bad(&format!(
            "format version {version}, this build reads {VERSION}"
        )));
    }
    let u32_of = |b: Vec<u8>| u32::from_le_bytes(b.try_into().expect("4 bytes"));
    let secret_len = u32_of(exact(&mut r, 4)?);
    if secret_len as usize != super::index::SECRET_LEN {
        return Err(bad("digest secret of the wrong length"));
    }
    let secret = exact(&mut r, secret_len as usize)?;
    let db = super::open_sled(config)?;
    let err = |context| {
        move |source| Error::Sled {
            context,
            path: config.dir.clone(),
            source,
        }
    };
    let meta = db.open_tree("meta").map_err(err("restore"))?;
    meta.insert(SECRET_KEY, secret).map_err(err("restore"))?;
    meta.insert(LAYOUT_KEY, &[LAYOUT_SEGMENTS])
        .map_err(err("restore"))?;
    let relay = db.open_tree("relay_segments").map_err(err("restore"))?;
    let kv = db.open_tree("kv_segments").map_err(err("restore"))?;
    let mut stats = BackupStats::default();
    loop {
        let ns = exact(&mut r, 1)?[0];
        if ns == END {
            break;
        }
        let key = exact(&mut r, 16)?;
        let len = u32_of(exact(&mut r, 4)?);
        if len > MAX_SEGMENT {
            return Err(bad("segment larger than any commit batch"));
        }
        let value = exact(&mut r, len as usize)?;
        let tree = match ns {
            RELAY => {
                segment::decode_relay(&value).map_err(|e| bad(&e.to_string()))?;
                &relay
            }
            KV => {
                segment::decode_kv(&value).map_err(|e| bad(&e.to_string()))?;
                &kv
            }
            _ => return Err(bad("unknown namespace byte")),
        };
        stats.segments += 1;
        stats.entries += entry_count(&value);
        tree.insert(key, value).map_err(err("restore"))?;
    }
    let count = u64::from_le_bytes(exact(&mut r, 8)?.try_into().expect("8 bytes"));
    let sum = r.sum.digest();
    let mut tail = [0u8; 8];
    r.inner.read_exact(&mut tail).map_err(io_err)?;
    if count != stats.segments || u64::from_le_bytes(tail) != sum {
        return Err(bad(
            "checksum or segment count does not match (damaged or truncated)",
        ));
    }
    stats.bytes = r.bytes + 8;
    // Sequence numbers of later writes must come after the restored ones.
    let mut top = 0;
    for key in relay.iter().keys().chain(kv.iter().keys()) {
        top = top.max(segment::parse_key(&key.map_err(err("restore"))?).1);
    }
    while db.generate_id().map_err(err("restore"))? <= top {}
    db.flush().map_err(err("restore"))?;
    Ok(stats)
}
