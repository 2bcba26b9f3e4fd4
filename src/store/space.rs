//! A namespace of the store: one sled tree of records, its expiry index and its Bloom
//! generations. The relay's ids and the Redis endpoint's keys each live in one, so a key written
//! through one road is still new to the other; both share the sled database, its flushes and the
//! compactor.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, RwLock};

use super::filter::{digest, Filters};
use super::record;

/// Records, index and filter of one namespace.
#[derive(Debug)]
pub(crate) struct Space {
    /// Key → record.
    pub(crate) tree: sled::Tree,
    /// (expiry, sequence) → the keys written together with that expiry.
    pub(crate) expiry: sled::Tree,
    /// The prefilter over `tree`'s live keys.
    pub(crate) filters: RwLock<Filters>,
    /// Records in `tree` (expired ones not yet swept included).
    pub(crate) live: AtomicU64,
    /// Earliest expiry not yet swept, as a hint for when the compactor should wake.
    pub(crate) next_expiry_ms: AtomicU64,
}

impl Space {
    /// Opens the namespace's trees and builds its filter: `loaded` from a trusted snapshot, or
    /// else `fresh` filled by scanning the records.
    pub(crate) fn open(
        db: &sled::Db,
        records: &str,
        index: &str,
        fresh: Filters,
        loaded: Option<(Filters, u64)>,
        now_ms: u64,
    ) -> Result<Space, super::ScanError> {
        let tree = db.open_tree(records).map_err(super::ScanError::Sled)?;
        let expiry = db.open_tree(index).map_err(super::ScanError::Sled)?;
        let (filters, live) = match loaded {
            Some(loaded) => loaded,
            None => super::scan_live(&tree, fresh, now_ms)?,
        };
        let next = super::first_due(&expiry).map_err(super::ScanError::Sled)?;
        Ok(Space {
            tree,
            expiry,
            filters: RwLock::new(filters),
            live: AtomicU64::new(live),
            next_expiry_ms: AtomicU64::new(next.unwrap_or(u64::MAX)),
        })
    }

    /// Writes one index entry per distinct expiry in `groups` (expiry → packed keys). Returns
    /// whether the earliest of them moves the compactor's next deadline earlier.
    pub(crate) fn write_index(
        &self,
        db: &sled::Db,
        groups: BTreeMap<u64, Vec<u8>>,
    ) -> sled::Result<bool> {
        let mut earliest = u64::MAX;
        for (expires_ms, keys) in groups {
            let seq = db.generate_id()?;
            self.expiry
                .insert(record::index_key(expires_ms, seq), keys)?;
            earliest = earliest.min(expires_ms);
        }
        Ok(earliest < self.next_expiry_ms.fetch_min(earliest, Ordering::SeqCst))
    }

    /// Inserts `key` into the filter (before its record is written: a key may be in the filter
    /// and not on disk, never the other way round).
    pub(crate) fn remember(&self, key: &[u8], expires_ms: u64) -> bool {
        self.filters
            .write()
            .expect("filter lock")
            .insert(digest(key), expires_ms)
    }
}

/// Group commit: every writer flushes, but a flush that starts after a write covers it, so
/// writers that arrive while a flush runs share the next one instead of each paying an fsync.
#[derive(Debug, Default)]
pub(crate) struct FlushGroup {
    state: Mutex<FlushState>,
    done: Condvar,
}

#[derive(Debug, Default)]
struct FlushState {
    /// Tickets handed out: one per write that needs to become durable.
    issued: u64,
    /// Every ticket up to this one is durable.
    durable: u64,
    /// A flush is running.
    flushing: bool,
}

impl FlushGroup {
    /// A ticket for a write already applied to sled.
    pub(crate) fn ticket(&self) -> u64 {
        let mut state = self.state.lock().expect("flush lock");
        state.issued += 1;
        state.issued
    }

    /// The latest ticket handed out.
    pub(crate) fn issued(&self) -> u64 {
        self.state.lock().expect("flush lock").issued
    }

    /// Returns once `ticket`'s write is durable, flushing `db` itself if no flush that covers it
    /// is running.
    pub(crate) fn wait(&self, db: &sled::Db, ticket: u64) -> sled::Result<()> {
        let mut state = self.state.lock().expect("flush lock");
        loop {
            if state.durable >= ticket {
                return Ok(());
            }
            if state.flushing {
                state = self.done.wait(state).expect("flush lock");
                continue;
            }
            // Lead a flush covering every ticket issued so far.
            state.flushing = true;
            let target = state.issued;
            drop(state);
            let flushed = db.flush();
            state = self.state.lock().expect("flush lock");
            state.flushing = false;
            if flushed.is_ok() {
                state.durable = state.durable.max(target);
            }
            self.done.notify_all();
            flushed?;
        }
    }
}
