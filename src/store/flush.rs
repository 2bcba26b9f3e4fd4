//! Group commit: every writer of the store (relay commits, Redis-endpoint batches, standbys
//! applying the replication log) shares one sled flush per round.

use std::sync::{Condvar, Mutex};

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
