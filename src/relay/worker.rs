//! The store's side of the relay: claims answered in place, one thread making confirmed ids
//! durable.
//!
//! A claim touches memory only (the Bloom filter, the index and the in-flight map, each behind
//! a lock held for one lookup; never sled), so the session answers it on its own task: a thread
//! hop per batch cost more CPU than the claims themselves (`benches/relay.rs`). `Store::commit`
//! writes sled and flushes, so it runs on a thread of its own, fed by a channel: commits that
//! pile up while a flush runs are merged into the next flush (group commit), which is what makes
//! durable acks cheap.

use std::sync::Arc;
use std::thread;
use std::time::Instant;

use tokio::sync::mpsc;

use super::ha::Ha;
use super::protocol::ClaimItem;
use crate::metrics::Metrics;
use crate::store::{Claim, Clock, Error as StoreError, Store, Verdict};

/// The store's answer to a [`ClaimItem`], with its tag and id.
pub(crate) type Claimed = (u64, Vec<u8>, Result<Verdict, StoreError>);

/// Claims whose publishes were confirmed, to record durably; then `tags` may be acked.
pub(crate) struct CommitJob {
    pub(crate) tags: Vec<u64>,
    pub(crate) claims: Vec<Claim>,
    pub(crate) reply: mpsc::UnboundedSender<Reply>,
}

/// What the commit thread answers: a [`CommitJob`] is durable (or failed), with its `tags`.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) tags: Vec<u64>,
    pub(crate) result: Result<(), Arc<StoreError>>,
}

/// The store and the time the relay claims by, and the commit thread. The thread exits when
/// this is stopped or dropped.
pub(crate) struct Workers {
    store: Store,
    clock: Arc<dyn Clock>,
    commits: mpsc::UnboundedSender<CommitJob>,
    committer: thread::JoinHandle<()>,
}

impl Workers {
    /// Starts the commit thread on `store`; claims and commits read the time from `clock`. With
    /// `ha`, each commit batch is appended to the id stream, and its messages are acked only once
    /// the stream confirmed it.
    ///
    /// # Errors
    ///
    /// When the OS refuses a thread.
    pub(crate) fn start(
        store: &Store,
        ha: Option<Ha>,
        clock: Arc<dyn Clock>,
    ) -> std::io::Result<Workers> {
        let (commits, mut commit_rx) = mpsc::unbounded_channel::<CommitJob>();
        let committer = {
            let store = store.clone();
            let clock = clock.clone();
            thread::Builder::new()
                .name("dedupd-commit".into())
                .spawn(move || {
                    while let Some(first) = commit_rx.blocking_recv() {
                        // Everything that queued up during the previous flush goes in this one.
                        let mut jobs = vec![first];
                        while let Ok(job) = commit_rx.try_recv() {
                            jobs.push(job);
                        }
                        let claims: Vec<Claim> = jobs
                            .iter_mut()
                            .flat_map(|j| std::mem::take(&mut j.claims))
                            .collect();
                        let claimed: Vec<Instant> = claims.iter().map(Claim::claimed_at).collect();
                        let ids = claims.len() as u64;
                        let now = clock.now_ms();
                        let (result, segment) = match &ha {
                            None => (store.commit(claims, now).map_err(Arc::new), None),
                            Some(_) => match store.commit_logged(claims, now) {
                                Ok(segment) => (Ok(()), Some(segment)),
                                Err(e) => (Err(Arc::new(e)), None),
                            },
                        };
                        if result.is_ok() {
                            // One clock read for the batch: they all became durable together.
                            let now = Instant::now();
                            Metrics::committed_after(
                                claimed.iter().map(|at| now.saturating_duration_since(*at)),
                            );
                        }
                        let reply = move || {
                            for job in jobs {
                                let _ = job.reply.send(Reply {
                                    tags: job.tags,
                                    result: result.clone(),
                                });
                            }
                        };
                        match (&ha, segment) {
                            // Durable here; acked once the stream holds it too, so a standby
                            // that takes over knows every id whose message was acked.
                            (Some(ha), Some(segment)) => ha.append(segment, ids, Box::new(reply)),
                            _ => reply(),
                        }
                    }
                })?
        };
        Ok(Workers {
            store: store.clone(),
            clock,
            commits,
            committer,
        })
    }

    /// Claims each id for its window, in order, now. Memory only (see the module doc), so it
    /// runs on the caller's task.
    pub(crate) fn claim(&self, items: Vec<ClaimItem>) -> Vec<Claimed> {
        let now = self.clock.now_ms();
        items
            .into_iter()
            .map(|(tag, id, window)| {
                let verdict = self.store.claim_with_ttl(&id, window, now);
                (tag, id, verdict)
            })
            .collect()
    }

    /// Queues a commit job. Returns `false` if the thread is gone.
    pub(crate) fn commit(&self, job: CommitJob) -> bool {
        self.commits.send(job).is_ok()
    }

    /// Lets the commit thread finish its queue and waits for it. Blocking.
    pub(crate) fn stop(self) {
        drop(self.commits);
        let _ = self.committer.join();
    }
}
