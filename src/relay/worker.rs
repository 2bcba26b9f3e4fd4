//! The store's two threads: one answers claims, one makes confirmed ids durable.
//!
//! `Store::claim` may read sled and `Store::commit` flushes it, so neither runs on the async
//! workers. One thread each, fed by channels, rather than `spawn_blocking` per message: a claim
//! batch costs one hand-off, and commits that pile up while a flush runs are merged into the next
//! flush (group commit), which is what makes durable acks cheap.

use std::sync::Arc;
use std::thread;
use std::time::Instant;

use tokio::sync::mpsc;

use super::session::{Delivery, Event};
use crate::metrics::Metrics;
use crate::store::{system_now_ms, Claim, Store};

/// Ids to claim, each with its delivery; the verdicts go back on `reply`.
pub(crate) struct ClaimJob {
    pub(crate) items: Vec<(Delivery, Vec<u8>)>,
    pub(crate) reply: mpsc::UnboundedSender<Event>,
}

/// Claims whose publishes were confirmed, to record durably; then `tags` may be acked.
pub(crate) struct CommitJob {
    pub(crate) tags: Vec<u64>,
    pub(crate) claims: Vec<Claim>,
    pub(crate) reply: mpsc::UnboundedSender<Event>,
}

/// Handles on the two store threads. They exit when this is stopped or dropped.
pub(crate) struct Workers {
    claims: mpsc::UnboundedSender<ClaimJob>,
    commits: mpsc::UnboundedSender<CommitJob>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Workers {
    /// Starts the claim and commit threads on `store`.
    ///
    /// # Errors
    ///
    /// When the OS refuses a thread.
    pub(crate) fn start(store: &Store) -> std::io::Result<Workers> {
        let (claims, mut claim_rx) = mpsc::unbounded_channel::<ClaimJob>();
        let (commits, mut commit_rx) = mpsc::unbounded_channel::<CommitJob>();
        let claimer = {
            let store = store.clone();
            thread::Builder::new()
                .name("dedupd-claim".into())
                .spawn(move || {
                    while let Some(job) = claim_rx.blocking_recv() {
                        let now = system_now_ms();
                        let verdicts = job
                            .items
                            .into_iter()
                            .map(|(delivery, id)| {
                                let verdict = store.claim_with_ttl(&id, delivery.window, now);
                                (delivery, id, verdict)
                            })
                            .collect();
                        // A closed reply channel means the session is gone: the claims drop
                        // here and are released, and the broker redelivers the messages.
                        let _ = job.reply.send(Event::Claimed(verdicts));
                    }
                })?
        };
        let committer = {
            let store = store.clone();
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
                        let result = store.commit(claims, system_now_ms()).map_err(Arc::new);
                        if result.is_ok() {
                            for at in claimed {
                                Metrics::committed_after(at.elapsed());
                            }
                        }
                        for job in jobs {
                            let _ = job.reply.send(Event::Committed {
                                tags: job.tags,
                                result: result.clone(),
                            });
                        }
                    }
                })?
        };
        Ok(Workers {
            claims,
            commits,
            threads: vec![claimer, committer],
        })
    }

    /// Queues a claim job. Returns `false` if the thread is gone (it only goes when stopped).
    pub(crate) fn claim(&self, job: ClaimJob) -> bool {
        self.claims.send(job).is_ok()
    }

    /// Queues a commit job. Returns `false` if the thread is gone.
    pub(crate) fn commit(&self, job: CommitJob) -> bool {
        self.commits.send(job).is_ok()
    }

    /// Lets the threads finish their queues and waits for them. Blocking.
    pub(crate) fn stop(self) {
        drop(self.claims);
        drop(self.commits);
        for t in self.threads {
            let _ = t.join();
        }
    }
}
