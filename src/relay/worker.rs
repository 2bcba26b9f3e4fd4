//! The store's two threads: one answers claims, one makes confirmed ids durable.
//!
//! `Store::claim` may read sled and `Store::commit` flushes it, so neither runs on the async
//! workers. One thread each, fed by channels, rather than `spawn_blocking` per message: a claim
//! batch costs one hand-off, and commits that pile up while a flush runs are merged into the next
//! flush (group commit), which is what makes durable acks cheap.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::ha::Ha;
use crate::metrics::Metrics;
use crate::store::{Claim, Clock, Error as StoreError, Store, Verdict};

/// Ids to claim, each with the delivery tag it is for and its window; the verdicts go back on
/// `reply`.
pub(crate) struct ClaimJob {
    pub(crate) items: Vec<(u64, Vec<u8>, Duration)>,
    pub(crate) reply: mpsc::UnboundedSender<Reply>,
}

/// Claims whose publishes were confirmed, to record durably; then `tags` may be acked.
pub(crate) struct CommitJob {
    pub(crate) tags: Vec<u64>,
    pub(crate) claims: Vec<Claim>,
    pub(crate) reply: mpsc::UnboundedSender<Reply>,
}

/// What the threads answer.
#[derive(Debug)]
pub(crate) enum Reply {
    /// The verdicts of a [`ClaimJob`], in its order, each with its tag and id.
    Claimed(Vec<(u64, Vec<u8>, Result<Verdict, StoreError>)>),
    /// A [`CommitJob`] is durable (or failed): its `tags`.
    Committed {
        tags: Vec<u64>,
        result: Result<(), Arc<StoreError>>,
    },
}

/// Handles on the two store threads. They exit when this is stopped or dropped.
pub(crate) struct Workers {
    claims: mpsc::UnboundedSender<ClaimJob>,
    commits: mpsc::UnboundedSender<CommitJob>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Workers {
    /// Starts the claim and commit threads on `store`, which read the time from `clock`. With
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
        let (claims, mut claim_rx) = mpsc::unbounded_channel::<ClaimJob>();
        let (commits, mut commit_rx) = mpsc::unbounded_channel::<CommitJob>();
        let claimer = {
            let store = store.clone();
            let clock = clock.clone();
            thread::Builder::new()
                .name("dedupd-claim".into())
                .spawn(move || {
                    while let Some(job) = claim_rx.blocking_recv() {
                        let now = clock.now_ms();
                        let verdicts = job
                            .items
                            .into_iter()
                            .map(|(tag, id, window)| {
                                let verdict = store.claim_with_ttl(&id, window, now);
                                (tag, id, verdict)
                            })
                            .collect();
                        // A closed reply channel means the session is gone: the claims drop
                        // here and are released, and the broker redelivers the messages.
                        let _ = job.reply.send(Reply::Claimed(verdicts));
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
                                let _ = job.reply.send(Reply::Committed {
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
