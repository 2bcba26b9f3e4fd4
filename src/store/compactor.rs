//! Background TTL compaction, tied to the store's lifetime.
//!
//! One thread sleeps until the earliest expiry (or until a commit brings an earlier one, or a
//! burst rolls a Bloom generation), then deletes what is due in bounded batches and rebuilds the
//! Bloom filter once a window. It is a plain thread, not a tokio task: every step is a blocking
//! sled call.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::record;
use super::space::Space;
use super::{first_due, scan_live, Error, ScanError, Shared};

/// Ids deleted per sled flush: bounds how long one sweep step keeps the disk busy, so commits
/// and claims interleave with a large sweep.
pub(crate) const SWEEP_BATCH: usize = 1024;

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
            .map(|space| {
                let rebuild_at = space
                    .filters
                    .read()
                    .expect("filter lock")
                    .rebuild_at(shared.ttl_ms);
                space.next_expiry_ms.load(Ordering::SeqCst).min(rebuild_at)
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

/// One round, for each namespace: sweep everything due (batch by batch), then drop or rebuild
/// Bloom generations.
fn step(shared: &Shared, now_ms: u64) -> Result<(), Error> {
    for space in [&shared.relay, &shared.kv] {
        while !shared.stopping.load(Ordering::SeqCst) {
            if sweep(shared, space, now_ms, SWEEP_BATCH)? == 0
                && space.next_expiry_ms.load(Ordering::SeqCst) > now_ms
            {
                break;
            }
        }
        let rebuild_due = {
            let mut filters = space.filters.write().expect("filter lock");
            filters.drop_expired(now_ms);
            filters.rebuild_due(now_ms, shared.ttl_ms)
        };
        if rebuild_due {
            rebuild(shared, space, now_ms)?;
        }
    }
    Ok(())
}

/// Deletes the ids of due index entries, about `max_ids` at a time; returns how many records
/// it deleted.
pub(crate) fn sweep(
    shared: &Shared,
    space: &Space,
    now_ms: u64,
    max_ids: usize,
) -> Result<u64, Error> {
    let err = |context| {
        move |source| Error::Sled {
            context,
            path: shared.dir.clone(),
            source,
        }
    };
    let mut seen_ids = 0usize;
    let mut deleted = 0u64;
    let mut entries = 0usize;
    for entry in space.expiry.range(..=record::index_key_due(now_ms)) {
        let (key, ids) = entry.map_err(err("sweep"))?;
        for id in record::index_ids(&ids) {
            seen_ids += 1;
            let Some(current) = space.tree.get(id).map_err(err("sweep"))? else {
                continue; // forgotten, or swept through an older entry
            };
            if record::decode(id, &current)?.is_live(now_ms) {
                continue; // committed again since: its newer index entry will come due later
            }
            // Compare-and-swap: if a commit re-recorded the id since our read, keep the new
            // record. A plain remove here could delete a live id.
            if space
                .tree
                .compare_and_swap(id, Some(current), None::<&[u8]>)
                .map_err(err("sweep"))?
                .is_ok()
            {
                deleted += 1;
            }
        }
        // Only after its ids: a crash before this leaves the entry to be swept again.
        space.expiry.remove(key).map_err(err("sweep"))?;
        entries += 1;
        if seen_ids >= max_ids {
            break;
        }
    }
    if entries > 0 {
        shared.db.flush().map_err(err("sweep flush"))?;
    }
    space.live.fetch_sub(deleted, Ordering::Relaxed);
    shared.swept_ids.fetch_add(deleted, Ordering::Relaxed);
    let next = first_due(&space.expiry).map_err(err("sweep"))?;
    space
        .next_expiry_ms
        .store(next.unwrap_or(u64::MAX), Ordering::SeqCst);
    Ok(deleted)
}

/// Replaces the Bloom generations with one built from sled's live ids.
pub(crate) fn rebuild(shared: &Shared, space: &Space, now_ms: u64) -> Result<(), Error> {
    let started = Instant::now();
    let fresh = {
        // Under the commit lock: every commit that inserted into the filter before this point
        // has also finished writing sled, so the scan below sees it; later ones go to `pending`.
        let _commits = shared.commit_lock.lock().expect("commit lock");
        let mut filters = space.filters.write().expect("filter lock");
        filters.begin_rebuild();
        filters.for_rebuild(space.live.load(Ordering::Relaxed), now_ms)
    };
    match scan_live(&space.tree, fresh, now_ms) {
        Ok((fresh, records)) => {
            let mut filters = space.filters.write().expect("filter lock");
            filters.finish_rebuild(fresh);
            shared.bloom_rebuilds.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                records,
                generations = filters.generations(),
                ms = started.elapsed().as_millis() as u64,
                "bloom filter rebuilt"
            );
            Ok(())
        }
        Err(e) => {
            space.filters.write().expect("filter lock").abort_rebuild();
            Err(match e {
                ScanError::Sled(source) => Error::Sled {
                    context: "rebuild",
                    path: shared.dir.clone(),
                    source,
                },
                ScanError::Record(e) => e,
            })
        }
    }
}
