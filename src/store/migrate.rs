//! Opening a data dir written by the first layout (one sled key per id, trees `ids`, `expiry`,
//! `kv`, `kv_expiry`): its records become segments on first open.
//!
//! Crash-safe by order: segments are written (after clearing what an interrupted attempt left)
//! and flushed, then the layout marker goes in and is flushed, then the old trees are dropped.
//! A crash before the marker redoes the migration from the untouched old trees; a crash after
//! it only has old trees left to drop.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use super::index::Keyed;
use super::record;
use super::segment::{self, KvEntry, RelayEntry};
use super::{Error, LAYOUT_KEY, LAYOUT_SEGMENTS};

/// Trees of the first layout.
const OLD_TREES: [&str; 4] = ["ids", "expiry", "kv", "kv_expiry"];
/// Entries per migrated segment, as a commit batch of the relay.
const PER_SEGMENT: usize = 1024;

/// Migrates `db` to segments if it holds the first layout; marks a new store as segments.
pub(crate) fn run(
    dir: &Path,
    db: &sled::Db,
    meta: &sled::Tree,
    keyed: &Keyed,
    relay_segments: &sled::Tree,
    kv_segments: &sled::Tree,
) -> Result<(), Error> {
    let err = |context| {
        move |source| Error::Sled {
            context,
            path: dir.to_path_buf(),
            source,
        }
    };
    let names = db.tree_names();
    let old: Vec<&str> = OLD_TREES
        .into_iter()
        .filter(|t| names.iter().any(|n| n.as_ref() == t.as_bytes()))
        .collect();
    let marked =
        meta.get(LAYOUT_KEY).map_err(err("migrate"))?.as_deref() == Some(&[LAYOUT_SEGMENTS][..]);
    if !marked && !old.is_empty() {
        let started = Instant::now();
        tracing::info!(dir = %dir.display(), "migrating the data dir to segments (first open by this release)");
        relay_segments.clear().map_err(err("migrate"))?;
        kv_segments.clear().map_err(err("migrate"))?;
        let ids = migrate_ids(db, keyed, relay_segments).map_err(|e| e.into_error(dir))?;
        let keys = migrate_keys(db, kv_segments).map_err(|e| e.into_error(dir))?;
        db.flush().map_err(err("migrate"))?;
        meta.insert(LAYOUT_KEY, &[LAYOUT_SEGMENTS])
            .map_err(err("migrate"))?;
        // The first layout's Bloom snapshot and its marker mean nothing to this one.
        meta.remove(b"bloom_snapshot_token")
            .map_err(err("migrate"))?;
        db.flush().map_err(err("migrate"))?;
        let _ = std::fs::remove_file(dir.join("bloom.snapshot"));
        tracing::info!(
            dir = %dir.display(),
            ids,
            keys,
            ms = started.elapsed().as_millis() as u64,
            "data dir migrated to segments"
        );
    } else if !marked {
        meta.insert(LAYOUT_KEY, &[LAYOUT_SEGMENTS])
            .map_err(err("open"))?;
    }
    if !old.is_empty() {
        // All four: migrating may have opened (so created) one that was missing.
        for tree in OLD_TREES {
            db.drop_tree(tree).map_err(err("migrate"))?;
        }
        db.flush().map_err(err("migrate"))?;
    }
    Ok(())
}

/// A failure while migrating: sled's, or a record that does not decode.
enum Failure {
    Sled(sled::Error),
    Record(Error),
}

impl Failure {
    fn into_error(self, dir: &Path) -> Error {
        match self {
            Failure::Sled(source) => Error::Sled {
                context: "migrate",
                path: dir.to_path_buf(),
                source,
            },
            Failure::Record(e) => e,
        }
    }
}

impl From<sled::Error> for Failure {
    fn from(e: sled::Error) -> Failure {
        Failure::Sled(e)
    }
}

fn append(
    tree: &sled::Tree,
    db: &sled::Db,
    expiries: Vec<u64>,
    bytes: Vec<u8>,
) -> sled::Result<()> {
    let (_, key) = super::file_segment(db, expiries)?;
    tree.insert(key, bytes).map(drop)
}

/// The relay's records, grouped by the time they were first seen (a segment's commit time).
fn migrate_ids(db: &sled::Db, keyed: &Keyed, out: &sled::Tree) -> Result<u64, Failure> {
    let mut by_commit: BTreeMap<u64, Vec<RelayEntry>> = BTreeMap::new();
    let mut count = 0;
    for item in db.open_tree("ids")?.iter() {
        let (id, bytes) = item?;
        let seen = record::decode(&id, &bytes).map_err(Failure::Record)?;
        by_commit
            .entry(seen.first_seen_ms)
            .or_default()
            .push(RelayEntry {
                digest: keyed.digest(&id),
                expires_ms: seen.expires_ms,
                tombstone: false,
            });
        count += 1;
    }
    for (commit_ms, entries) in by_commit {
        for chunk in entries.chunks(PER_SEGMENT) {
            let expiries = chunk.iter().map(|e| e.expires_ms).collect();
            append(out, db, expiries, segment::encode_relay(commit_ms, chunk))?;
        }
    }
    Ok(count)
}

/// The Redis endpoint's records, in key order.
fn migrate_keys(db: &sled::Db, out: &sled::Tree) -> Result<u64, Failure> {
    let mut chunk = Vec::with_capacity(PER_SEGMENT);
    let mut count = 0;
    let flush = |chunk: &mut Vec<KvEntry>| -> sled::Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        let expiries = chunk.iter().map(KvEntry::retain_ms).collect();
        append(out, db, expiries, segment::encode_kv(0, chunk))?;
        chunk.clear();
        Ok(())
    };
    for item in db.open_tree("kv")?.iter() {
        let (key, bytes) = item?;
        let (seen, value) = record::decode_kv(&key, &bytes).map_err(Failure::Record)?;
        chunk.push(KvEntry::Put {
            key: key.to_vec(),
            value: value.to_vec(),
            set_ms: seen.first_seen_ms,
            expires_ms: seen.expires_ms,
            retain_ms: seen.expires_ms,
            version: db.generate_id()?,
        });
        count += 1;
        if chunk.len() == PER_SEGMENT {
            flush(&mut chunk)?;
        }
    }
    flush(&mut chunk)?;
    Ok(count)
}
