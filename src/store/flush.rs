//! Group commit: every writer of the store (relay commits, Redis-endpoint batches, standbys
//! applying the replication log) shares one sled flush per round.
//!
//! A writer that has more to do in memory after its sled write (a relay commit puts its ids
//! in the index and the Bloom filter) can [`FlushGroup::start`] the flush first: a thread of
//! the group runs it while the writer works, and the writer's [`FlushGroup::wait`] then only
//! waits for what is left of the disk's time. The ids' index entries are not read before the
//! commit returns (their claims are in flight until then), so it does not matter whether the
//! flush or the inserts finish first.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Group commit: every writer flushes, but a flush that starts after a write covers it, so
/// writers that arrive while a flush runs share the next one instead of each paying an fsync.
#[derive(Debug)]
pub(crate) struct FlushGroup {
    inner: Arc<Inner>,
    /// The thread that runs the flushes asked for by [`FlushGroup::start`]; joined on drop.
    flusher: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug, Default)]
struct Inner {
    /// With [`Durability::Power`](super::Durability): the data dir, whose file system is synced
    /// after each sled flush.
    power: Option<std::fs::File>,
    state: Mutex<FlushState>,
    /// A flush ended.
    done: Condvar,
    /// The flusher has a flush to start, or must stop.
    kick: Condvar,
}

#[derive(Debug, Default)]
struct FlushState {
    /// Tickets handed out: one per write that needs to become durable.
    issued: u64,
    /// Every ticket up to this one is durable.
    durable: u64,
    /// A flush is running.
    flushing: bool,
    /// The latest ticket the flusher was asked to make durable.
    wanted: u64,
    /// The group is dropped: the flusher exits.
    stopping: bool,
    /// Why a `syncfs` failed, once one has: nothing written since can be called durable. Kept
    /// for good because the kernel reports a writeback error to a file once only: a second
    /// `syncfs` would succeed over the lost pages.
    power_failed: Option<String>,
}

impl FlushGroup {
    /// A group flushing `db`, with its flusher thread; each flush also syncs the file system
    /// of `power` (the data dir) when given.
    pub(crate) fn new(db: sled::Db, power: Option<std::fs::File>) -> FlushGroup {
        let inner = Arc::new(Inner {
            power,
            ..Inner::default()
        });
        let worker = inner.clone();
        let flusher = std::thread::Builder::new()
            .name("dedupd-flush".into())
            .spawn(move || worker.run(&db))
            .expect("spawning the flush thread");
        FlushGroup {
            inner,
            flusher: Mutex::new(Some(flusher)),
        }
    }

    /// A ticket for a write already applied to sled.
    pub(crate) fn ticket(&self) -> u64 {
        let mut state = self.inner.state.lock().expect("flush lock");
        state.issued += 1;
        state.issued
    }

    /// The latest ticket handed out.
    pub(crate) fn issued(&self) -> u64 {
        self.inner.state.lock().expect("flush lock").issued
    }

    /// Asks the flusher thread to make `ticket` durable now, and returns at once; a
    /// [`FlushGroup::wait`] for it later finds the flush running or done. If a flush is already
    /// running, the flusher starts the next one when it ends, as a waiter would.
    pub(crate) fn start(&self, ticket: u64) {
        let mut state = self.inner.state.lock().expect("flush lock");
        if state.durable >= ticket || state.wanted >= ticket {
            return;
        }
        state.wanted = ticket;
        drop(state);
        self.inner.kick.notify_one();
    }

    /// Returns once `ticket`'s write is durable, flushing `db` itself if no flush that covers it
    /// is running.
    pub(crate) fn wait(&self, db: &sled::Db, ticket: u64) -> sled::Result<()> {
        let inner = &self.inner;
        let mut state = inner.state.lock().expect("flush lock");
        loop {
            if state.durable >= ticket {
                return Ok(());
            }
            if let Some(why) = &state.power_failed {
                return Err(sled::Error::Io(std::io::Error::other(format!(
                    "a syncfs of the data dir failed ({why}): later writes cannot be made durable"
                ))));
            }
            if state.flushing {
                state = inner.done.wait(state).expect("flush lock");
                continue;
            }
            let (next, flushed) = inner.flush(state, db);
            state = next;
            flushed?;
        }
    }
}

impl Inner {
    /// Leads one flush covering every ticket issued so far; `state` is unlocked meanwhile.
    fn flush<'a>(
        &'a self,
        mut state: std::sync::MutexGuard<'a, FlushState>,
        db: &sled::Db,
    ) -> (std::sync::MutexGuard<'a, FlushState>, sled::Result<()>) {
        state.flushing = true;
        let target = state.issued;
        drop(state);
        // `Ok(Err(e))`: sled's flush went through, the `syncfs` after it did not.
        let flushed = db.flush().map(|_| self.sync_power());
        let mut state = self.state.lock().expect("flush lock");
        state.flushing = false;
        if let Ok(Err(e)) = &flushed {
            state.power_failed = Some(e.to_string());
        }
        let flushed = flushed.and_then(|synced| synced);
        if flushed.is_ok() {
            state.durable = state.durable.max(target);
        }
        self.done.notify_all();
        if state.wanted > state.durable {
            // Asked for while this one ran, which may not cover it: the flusher starts it.
            self.kick.notify_one();
        }
        (state, flushed)
    }

    /// With [`Durability::Power`](super::Durability): `syncfs` of the data dir's file system,
    /// which flushes what sled's flush leaves (file sizes, its unsynced blob files, the disk's
    /// write cache).
    fn sync_power(&self) -> sled::Result<()> {
        let Some(dir) = &self.power else {
            return Ok(());
        };
        // SAFETY: `dir` is an open file for as long as this call; syncfs only reads the fd.
        if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(dir)) } == 0 {
            Ok(())
        } else {
            let e = std::io::Error::last_os_error();
            Err(sled::Error::Io(std::io::Error::new(
                e.kind(),
                format!("syncfs of the data dir: {e}"),
            )))
        }
    }

    /// The flusher thread: runs the flushes [`FlushGroup::start`] asks for. A failed flush is
    /// left to the waiters, which flush again themselves and see the error.
    fn run(&self, db: &sled::Db) {
        let mut state = self.state.lock().expect("flush lock");
        loop {
            if state.stopping {
                return;
            }
            if state.wanted > state.durable && !state.flushing && state.power_failed.is_none() {
                let (next, flushed) = self.flush(state, db);
                state = next;
                if flushed.is_err() {
                    // Not retried here: the waiters lead the next flush and report its error.
                    state.wanted = state.durable;
                }
                continue;
            }
            state = self.kick.wait(state).expect("flush lock");
        }
    }
}

impl Drop for FlushGroup {
    fn drop(&mut self) {
        self.inner.state.lock().expect("flush lock").stopping = true;
        self.inner.kick.notify_all();
        if let Some(t) = self.flusher.lock().expect("flusher handle").take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn started_flush_makes_the_ticket_durable_without_a_waiter() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .path(dir.path())
            .flush_every_ms(None)
            .open()
            .unwrap();
        let group = FlushGroup::new(db.clone(), None);
        db.insert(b"a", b"1").unwrap();
        let first = group.ticket();
        group.start(first);
        // The flusher alone brings it to durable (bounded wait on the group's own signal).
        let state = group.inner.state.lock().unwrap();
        let (state, timeout) = group
            .inner
            .done
            .wait_timeout_while(state, Duration::from_secs(10), |s| s.durable < first)
            .unwrap();
        assert!(!timeout.timed_out(), "durable {}", state.durable);
        drop(state);
        // A write after it: its waiter leads its own flush, with or without a start.
        db.insert(b"b", b"2").unwrap();
        let second = group.ticket();
        group.wait(&db, second).unwrap();
        group.start(second);
        assert_eq!(group.issued(), second);
        // Dropping the group stops and joins the flusher.
        drop(group);
    }
}
