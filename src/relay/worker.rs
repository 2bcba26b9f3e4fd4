//! The store's side of the relay: claims answered in place, one thread making confirmed ids
//! durable.
//!
//! A claim touches memory only (the Bloom filter, the index and the in-flight map, each behind
//! a lock held for one lookup; never sled), so the session answers it on its own task: a thread
//! hop per batch cost more CPU than the claims themselves (`benches/relay.rs`). `Store::commit`
//! writes sled and flushes, so it runs on a thread of its own, fed by a channel: commits that
//! pile up while a flush runs are merged into the next flush (group commit), which is what makes
//! durable acks cheap.

use std::sync::{Arc, Mutex};
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

/// With HA, what the acks of one commit batch wait for: the batch durable here and its segment
/// confirmed by the stream, in whichever order they come (the segment is appended while the
/// local flush runs). The reply runs once, on the second of the two; a failed commit replies
/// at once with its error (the session stops and acks nothing), whatever the stream does.
struct Gate {
    state: Mutex<GateState>,
}

/// What a [`Gate`] runs: the batch's reply to the session, with the commit's result.
type Answer = Box<dyn FnOnce(Result<(), Arc<StoreError>>) + Send>;

struct GateState {
    /// The batch is durable here.
    durable: bool,
    /// The stream confirmed the batch's segment.
    confirmed: bool,
    /// Taken by the call that answers.
    reply: Option<Answer>,
}

impl Gate {
    fn new(reply: Answer) -> Arc<Gate> {
        Arc::new(Gate {
            state: Mutex::new(GateState {
                durable: false,
                confirmed: false,
                reply: Some(reply),
            }),
        })
    }

    /// The local commit ended.
    fn durable(&self, result: Result<(), Arc<StoreError>>) {
        let reply = {
            let mut state = self.state.lock().expect("gate lock");
            state.durable = result.is_ok();
            if result.is_ok() && !state.confirmed {
                return;
            }
            state.reply.take()
        };
        // Outside the lock: the reply sends on channels.
        if let Some(reply) = reply {
            reply(result);
        }
    }

    /// The stream confirmed the segment.
    fn confirmed(&self) {
        let reply = {
            let mut state = self.state.lock().expect("gate lock");
            state.confirmed = true;
            if !state.durable {
                return;
            }
            state.reply.take()
        };
        if let Some(reply) = reply {
            reply(Ok(()));
        }
    }
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
    /// `ha`, each commit batch is appended to the id stream while it is flushed here, and its
    /// messages are acked only once it is both durable here and confirmed by the stream.
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
                        let reply = move |result: Result<(), Arc<StoreError>>| {
                            for job in jobs {
                                let _ = job.reply.send(Reply {
                                    tags: job.tags,
                                    result: result.clone(),
                                });
                            }
                        };
                        let durable = |result: &Result<(), StoreError>| {
                            if result.is_ok() {
                                // One clock read for the batch: they all became durable together.
                                let now = Instant::now();
                                Metrics::committed_after(
                                    claimed.iter().map(|at| now.saturating_duration_since(*at)),
                                );
                            }
                        };
                        match &ha {
                            None => {
                                let result = store.commit(claims, now);
                                durable(&result);
                                reply(result.map_err(Arc::new));
                            }
                            Some(ha) => {
                                // The segment goes to the stream while the flush runs here;
                                // the acks wait for both (see `Gate`).
                                let gate = Gate::new(Box::new(reply));
                                let confirmed = gate.clone();
                                let result = store.commit_replicated(claims, now, |segment| {
                                    ha.append(segment, ids, Box::new(move || confirmed.confirmed()))
                                });
                                durable(&result);
                                gate.durable(result.map_err(Arc::new));
                            }
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

    /// Claims each id for its window, in order, now, as one batch of the store. Memory only
    /// (see the module doc), so it runs on the caller's task.
    pub(crate) fn claim(&self, items: Vec<ClaimItem>) -> Vec<Claimed> {
        let now = self.clock.now_ms();
        let verdicts = self.store.claim_all(
            items.iter().map(|(_, id, window)| (id.as_slice(), *window)),
            now,
        );
        items
            .into_iter()
            .zip(verdicts)
            .map(|((tag, id, _), verdict)| (tag, id, verdict))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{system_now_ms, StoreConfig, SystemClock};

    /// A gate whose reply records what it answered.
    fn gate() -> (Arc<Gate>, Arc<Mutex<Vec<bool>>>) {
        let answers = Arc::new(Mutex::new(Vec::new()));
        let seen = answers.clone();
        let gate = Gate::new(Box::new(move |result: Result<(), Arc<StoreError>>| {
            seen.lock().unwrap().push(result.is_ok())
        }));
        (gate, answers)
    }

    #[test]
    fn gate_answers_on_the_second_of_flush_and_confirm() {
        // Durable here first: no answer until the stream confirms.
        let (g, answers) = gate();
        g.durable(Ok(()));
        assert!(answers.lock().unwrap().is_empty());
        g.confirmed();
        assert_eq!(*answers.lock().unwrap(), vec![true]);
        // The stream first (the segment left before the flush ended): no answer until durable.
        let (g, answers) = gate();
        g.confirmed();
        assert!(answers.lock().unwrap().is_empty());
        g.durable(Ok(()));
        assert_eq!(*answers.lock().unwrap(), vec![true]);
    }

    #[test]
    fn gate_answers_a_failed_commit_at_once_and_only_once() {
        let (g, answers) = gate();
        g.durable(Err(Arc::new(StoreError::Closed)));
        assert_eq!(*answers.lock().unwrap(), vec![false]);
        // The stream's confirm that comes later acks nothing.
        g.confirmed();
        assert_eq!(*answers.lock().unwrap(), vec![false]);
    }

    fn claims(store: &Store, ids: &[&str]) -> Vec<Claim> {
        let now = system_now_ms();
        ids.iter()
            .map(|id| match store.claim(id.as_bytes(), now).unwrap() {
                Verdict::New(claim) => claim,
                _ => panic!("a fresh id is new"),
            })
            .collect()
    }

    #[test]
    fn with_ha_a_durable_batch_is_not_acked_before_the_stream_confirms_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(StoreConfig::new(dir.path())).unwrap();
        let metrics = Metrics::new();
        let (ha, mut replicator) = Ha::new(&metrics, Arc::new(SystemClock));
        let workers = Workers::start(&store, Some(ha), Arc::new(SystemClock)).unwrap();
        let (tx, mut replies) = mpsc::unbounded_channel();
        let job = |tags: Vec<u64>, ids: &[&str]| CommitJob {
            tags,
            claims: claims(&store, ids),
            reply: tx.clone(),
        };
        assert!(workers.commit(job(vec![1, 2], &["a", "b"])));
        // The batch's segment reaches the stream side.
        let (segment, ids, confirm) = replicator.next_segment().unwrap();
        assert_eq!(ids, 2);
        // A second batch: the commit thread takes it only once the first is durable here.
        assert!(workers.commit(job(vec![3], &["c"])));
        let (_, _, _second) = replicator.next_segment().unwrap();
        // Durable here, not confirmed by the stream: not acked.
        assert!(replies.try_recv().is_err());
        confirm();
        match replies.blocking_recv() {
            Some(Reply { tags, result }) => {
                assert_eq!(tags, vec![1, 2]);
                assert!(result.is_ok());
            }
            other => panic!("expected the first batch committed, got {other:?}"),
        }
        // The second one, durable too, still waits for its confirm.
        assert!(replies.try_recv().is_err());
        // The segment is the batch: a standby applying it knows both ids.
        let standby_dir = tempfile::tempdir().unwrap();
        let standby = Store::open(StoreConfig::new(standby_dir.path())).unwrap();
        assert_eq!(
            standby.apply_logged(&segment, 0, system_now_ms()).unwrap(),
            2
        );
        drop(replicator);
        workers.stop();
    }
}
