//! Background TTL compaction, tied to the store's lifetime.
//!
//! One thread sleeps until the earliest segment comes due (or until a write brings an earlier
//! one, or a burst rolls a Bloom generation), then drops what is due segment by segment and
//! rebuilds the Bloom filters from the index once a window (and at once after an open that had
//! to replay, filling the filter the index answered without). It is a plain thread, not a
//! tokio task: every step is a blocking sled call.
//!
//! Also here: the replay of the segments into the index at open.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::index::{held_expiry, short, Ids, Keys, KvSlot};
use super::segment::{self, KvEntry, KvRef, RelayEntry};
use super::{Error, Namespace, Shared};

/// Entries looked at per sweep step: bounds how long one step holds the commit lock, so
/// commits and claims interleave with a large sweep.
pub(crate) const SWEEP_BATCH: usize = 4096;

/// Longest sleep: a wall-clock jump or a missed wake-up costs at most this much lateness.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// Pause after a failed round, so a persistent disk error is not retried in a tight loop.
const ERROR_BACKOFF: Duration = Duration::from_secs(1);

/// Owns the compactor thread; stops and joins it when dropped (or on [`Guard::stop`]).
#[derive(Debug)]
pub(crate) struct Guard {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Guard {
    pub(crate) fn start(shared: Arc<Shared>) -> Guard {
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("dedupd-compactor".into())
            .spawn(move || run(&worker))
            .expect("spawning the compactor thread");
        Guard {
            shared,
            thread: Mutex::new(Some(thread)),
        }
    }

    /// Stops the thread and waits for it (idempotent).
    pub(crate) fn stop(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.wake_compactor();
        if let Some(t) = self.thread.lock().expect("compactor handle").take() {
            let _ = t.join();
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(shared: &Shared) {
    loop {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let now = shared.clock.now_ms();
        let mut floor = Duration::ZERO;
        if let Err(e) = step(shared, now) {
            tracing::error!(cause = %e, "compaction failed; retrying later");
            floor = ERROR_BACKOFF;
        }
        let next = [&shared.relay, &shared.kv]
            .iter()
            .map(|ns| {
                let rebuild_at = ns
                    .filters
                    .read()
                    .expect("filter lock")
                    .rebuild_at(shared.ttl_ms);
                ns.next_due_ms.load(Ordering::SeqCst).min(rebuild_at)
            })
            .min()
            .unwrap_or(u64::MAX);
        let wait = Duration::from_millis(next.saturating_sub(shared.clock.now_ms()))
            .clamp(floor, MAX_SLEEP);
        let (flag, cv) = &shared.wake;
        let woken = flag.lock().expect("wake lock");
        let (mut woken, _) = cv
            .wait_timeout_while(woken, wait, |w| !*w)
            .expect("wake lock");
        *woken = false;
    }
}

/// The two namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Which {
    Relay,
    Kv,
}

impl Which {
    fn of(self, shared: &Shared) -> &Namespace {
        match self {
            Which::Relay => &shared.relay,
            Which::Kv => &shared.kv,
        }
    }
}

/// One round, for each namespace: drop what is due (step by step), then drop or rebuild Bloom
/// generations.
fn step(shared: &Shared, now_ms: u64) -> Result<(), Error> {
    for which in [Which::Relay, Which::Kv] {
        let ns = which.of(shared);
        // The filter first: after an open that replayed, it is what the lookups lack.
        let rebuild_due = {
            let mut filters = ns.filters.write().expect("filter lock");
            filters.drop_expired(now_ms);
            filters.rebuild_due(now_ms, shared.ttl_ms)
        };
        if rebuild_due {
            rebuild(shared, which, now_ms);
        }
        while !shared.stopping.load(Ordering::SeqCst)
            && ns.next_due_ms.load(Ordering::SeqCst) <= now_ms
        {
            if sweep(shared, which, now_ms, SWEEP_BATCH)? == 0
                && ns.next_due_ms.load(Ordering::SeqCst) <= now_ms
            {
                // Nothing dropped although something is due: a backup holds the segments.
                break;
            }
        }
    }
    Ok(())
}

/// What became of a due segment's entries.
#[derive(Default)]
struct Verdicts {
    /// Entries dropped from the index.
    dropped: u64,
    /// Live entries to rewrite forward, encoded, with their expiries.
    keep: Option<(Vec<u8>, Vec<u64>)>,
}

/// Drops segments due at `now_ms`, looking at about `max_entries` entries; returns how many
/// index entries it dropped.
pub(crate) fn sweep(
    shared: &Shared,
    which: Which,
    now_ms: u64,
    max_entries: usize,
) -> Result<u64, Error> {
    let ns = which.of(shared);
    let err = |context| {
        move |source| Error::Sled {
            context,
            path: shared.dir.clone(),
            source,
        }
    };
    let mut looked_at = 0usize;
    let mut dropped = 0u64;
    let mut changed = false;
    while looked_at < max_entries {
        let guard = shared.write_lock()?;
        // A backup reads the segments it listed: none may go while it runs. Checked under the
        // lock the backup takes its list under, so no sweep slips in between.
        if shared.backups.load(Ordering::SeqCst) > 0 {
            break;
        }
        let Some((key, bytes)) = ns
            .segments
            .range(..=segment::due_bound(now_ms))
            .next()
            .transpose()
            .map_err(err("sweep"))?
        else {
            break;
        };
        let (verdicts, entries) = match which {
            Which::Relay => {
                let (commit_ms, entries) = segment::decode_relay(&bytes)?;
                let n = entries.len();
                (relay_verdicts(shared, commit_ms, &entries, now_ms), n)
            }
            Which::Kv => {
                let (commit_ms, entries) = segment::decode_kv(&bytes)?;
                let n = entries.len();
                (kv_verdicts(shared, commit_ms, entries, now_ms), n)
            }
        };
        if let Some((bytes, expiries)) = verdicts.keep {
            // The rewrite goes in before the old segment goes: a crash in between leaves both,
            // which replay reads as the same facts twice.
            shared.append(&guard, ns, expiries, bytes)?;
        }
        ns.segments.remove(&key).map_err(err("sweep"))?;
        drop(guard);
        changed = true;
        looked_at += entries.max(1);
        dropped += verdicts.dropped;
        shared
            .swept_ids
            .fetch_add(verdicts.dropped, Ordering::Relaxed);
    }
    if changed {
        shared.db.flush().map_err(err("sweep flush"))?;
    }
    let next = ns
        .segments
        .first()
        .map_err(err("sweep"))?
        .map_or(u64::MAX, |(k, _)| segment::parse_key(&k).0);
    ns.next_due_ms.store(next, Ordering::SeqCst);
    Ok(dropped)
}

/// For a due relay segment: drops its expired ids from the index, keeps the entries that are
/// still the live truth (a later-expiring id of a mixed batch, a tombstone still needed).
fn relay_verdicts(
    shared: &Shared,
    commit_ms: u64,
    entries: &[RelayEntry],
    now_ms: u64,
) -> Verdicts {
    let mut v = Verdicts::default();
    let mut keep = Vec::new();
    for e in entries {
        let key = short(e.digest);
        if e.expires_ms <= now_ms {
            if !e.tombstone && shared.ids.remove_if(key, |exp| exp <= now_ms) {
                v.dropped += 1;
            }
            continue;
        }
        let current = shared.ids.get(key);
        let still_true = if e.tombstone {
            current.is_none()
        } else {
            current == Some(held_expiry(e.expires_ms))
        };
        if still_true {
            keep.push(*e);
        }
    }
    if !keep.is_empty() {
        let expiries = keep.iter().map(|e| e.expires_ms).collect();
        v.keep = Some((segment::encode_relay(commit_ms, &keep), expiries));
    }
    v
}

/// As [`relay_verdicts`], for the Redis endpoint's keys. An entry stays on disk while it is
/// its key's newest write and unexpired, or while an older write it shadows could still come
/// back (its `retain_ms`); an expired put kept for that reason becomes a delete.
fn kv_verdicts(shared: &Shared, commit_ms: u64, entries: Vec<KvEntry>, now_ms: u64) -> Verdicts {
    let mut v = Verdicts::default();
    let mut keep = Vec::new();
    for e in entries {
        let newest = shared.keys.version(e.key()) == Some(e.version());
        match e {
            KvEntry::Put {
                key,
                expires_ms,
                retain_ms,
                version,
                ..
            } if expires_ms <= now_ms => {
                if newest
                    && shared
                        .keys
                        .remove_if(&key, |s| s.version() == version)
                        .is_some()
                {
                    v.dropped += 1;
                }
                if now_ms < retain_ms {
                    keep.push(KvEntry::Delete {
                        key,
                        expires_ms: retain_ms,
                        version,
                    });
                }
            }
            // A newer write of the key shadows at least as long as this one did.
            put @ KvEntry::Put { .. } if newest => keep.push(put),
            KvEntry::Put { .. } => {}
            // Kept for as long as it must, newer writes or not: they may expire before it.
            KvEntry::Delete { expires_ms, .. } if now_ms < expires_ms => keep.push(e),
            KvEntry::Delete { .. } => {}
        }
    }
    if !keep.is_empty() {
        let expiries = keep.iter().map(KvEntry::retain_ms).collect();
        v.keep = Some((segment::encode_kv(commit_ms, &keep), expiries));
    }
    v
}

/// Most inserts made during a rebuild's scan that go in with the swap, under the filter's lock
/// (a commit batch's worth: a fraction of a millisecond).
const SWAP_PENDING: usize = 1024;

/// Replaces a namespace's Bloom generations with one built from the index's live entries.
pub(crate) fn rebuild(shared: &Shared, which: Which, now_ms: u64) {
    let started = Instant::now();
    let ns = which.of(shared);
    let live = match which {
        Which::Relay => shared.ids.len(),
        Which::Kv => shared.keys.len(),
    } as u64;
    let mut fresh = {
        // Every index insert made before this point is visible to the copy below (writers put
        // the index entry before the filter's); later filter inserts are also kept in
        // `pending` and land in the fresh filter when it is swapped in.
        let mut filters = ns.filters.write().expect("filter lock");
        filters.begin_rebuild();
        filters.for_rebuild(live, now_ms)
    };
    // Copied out shard by shard, so no shard's lock is held while the filter is filled.
    let mut copied: Vec<(u128, u64)> = Vec::new();
    let shards = match which {
        Which::Relay => shared.ids.shards(),
        Which::Kv => shared.keys.tables().shards(),
    };
    for shard in 0..shards {
        copied.clear();
        match which {
            Which::Relay => shared.ids.with_shard(shard, |t| {
                copied.extend(
                    t.iter()
                        .filter(|s| now_ms < s.expires_ms())
                        .map(|s| (s.short(), s.expires_ms())),
                );
            }),
            Which::Kv => shared.keys.tables().with_shard(shard, |t| {
                copied.extend(
                    t.iter()
                        .filter(|s| now_ms < s.expires_ms())
                        .map(|s| (short(shared.keyed.digest(s.key())), s.expires_ms())),
                );
            }),
        }
        for &(key, expires_ms) in &copied {
            fresh.insert(key, expires_ms);
        }
    }
    // The inserts made during the scan go in a share at a time outside the filter's lock, the
    // last few with the swap under it. Replayed all at once under the lock, they held every
    // claim and commit back while they went in: the store bench's rebuilds (2 M and 3.9 M live
    // ids, 0.6 s and 1.1 s) met 300 000 and 470 000 inserts, and a batch of 1024 claims took
    // 23 ms instead of a quarter of one.
    let mut filters = loop {
        let mut filters = ns.filters.write().expect("filter lock");
        if filters.pending_len() <= SWAP_PENDING {
            break filters;
        }
        let meanwhile = filters.take_pending();
        drop(filters);
        for (key, expires_ms) in meanwhile {
            fresh.insert(key, expires_ms);
        }
    };
    let replaced = filters.finish_rebuild(fresh);
    let generations = filters.generations();
    drop(filters);
    drop(replaced);
    shared.bloom_rebuilds.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(
        ?which,
        live,
        generations,
        ms = started.elapsed().as_millis() as u64,
        "bloom filter rebuilt"
    );
}

/// Fills the index by replaying every segment in the order it was written (its sequence
/// number): the newest entry of a key wins; entries expired at `now_ms` are skipped.
pub(crate) fn replay(
    dir: &Path,
    relay: &sled::Tree,
    kv: &sled::Tree,
    ids: &Ids,
    keys: &Keys,
    now_ms: u64,
) -> Result<(), Error> {
    let in_order = |tree: &sled::Tree| -> Result<Vec<sled::IVec>, Error> {
        let mut all = Vec::with_capacity(tree.len());
        for item in tree.iter() {
            let (k, v) = item.map_err(|source| Error::Sled {
                context: "replay",
                path: dir.to_path_buf(),
                source,
            })?;
            all.push((segment::parse_key(&k).1, v));
        }
        all.sort_unstable_by_key(|(seq, _)| *seq);
        Ok(all.into_iter().map(|(_, v)| v).collect())
    };
    for bytes in in_order(relay)? {
        for e in segment::decode_relay(&bytes)?.1 {
            let key = short(e.digest);
            if e.tombstone || e.expires_ms <= now_ms {
                ids.remove_if(key, |_| true);
            } else {
                ids.insert(key, e.expires_ms);
            }
        }
    }
    // The newest version of each key wins, whatever order rewrites left the segments in;
    // deletes are remembered while replaying so an older put cannot come back after them.
    let segments = in_order(kv)?;
    let mut entries = 0;
    for bytes in &segments {
        entries += segment::kv_count(bytes)?;
    }
    keys.reserve(usize::try_from(entries).unwrap_or(0));
    let mut deleted: std::collections::HashMap<Vec<u8>, u64> = std::collections::HashMap::new();
    for bytes in &segments {
        segment::visit_kv(bytes, |e| {
            let not_deleted = |key: &[u8], v: u64| deleted.get(key).is_none_or(|&have| have < v);
            match e {
                KvRef::Put { key, value, times } if now_ms < times[1] => {
                    if not_deleted(key, times[3]) {
                        keys.put_newer(key, times[3], || KvSlot::with_times(key, value, times));
                    }
                }
                KvRef::Put { key, times, .. } => forget(keys, &mut deleted, key, times[3]),
                KvRef::Delete { key, version, .. } => forget(keys, &mut deleted, key, version),
            }
        })?;
    }
    Ok(())
}

/// Replays an expired put or a delete of `key` at `version`: unless a newer write of the key
/// was replayed already, the key goes, and no older put may bring it back.
fn forget(
    keys: &Keys,
    deleted: &mut std::collections::HashMap<Vec<u8>, u64>,
    key: &[u8],
    version: u64,
) {
    let newer = keys.version(key).is_none_or(|have| have < version)
        && deleted.get(key).is_none_or(|&have| have < version);
    if newer {
        keys.remove_if(key, |_| true);
        deleted.insert(key.to_vec(), version);
    }
}

/// When a live relay id was committed: the commit time of the segment that holds its entry.
/// Segments of a uniform window are filed under that expiry, so that range is looked at
/// first; then every segment (an operator's lookup, not a hot path).
pub(crate) fn commit_time_of(
    shared: &Shared,
    digest: u128,
    expires_ms: u64,
) -> Result<Option<u64>, Error> {
    let tree = &shared.relay.segments;
    let filed = tree.range(segment::key(expires_ms, 0)..=segment::key(expires_ms, u64::MAX));
    for item in filed.chain(tree.iter()) {
        let (_, bytes) = item.map_err(shared.sled_err("check"))?;
        let (commit_ms, entries) = segment::decode_relay(&bytes)?;
        if entries
            .iter()
            .any(|e| e.digest == digest && held_expiry(e.expires_ms) == expires_ms && !e.tombstone)
        {
            return Ok(Some(commit_ms));
        }
    }
    Ok(None)
}
