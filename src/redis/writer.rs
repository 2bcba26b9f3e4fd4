//! The endpoint's writer: every batch that touches the store, from every connection, goes to
//! one thread that runs what has queued up as one store transaction (one lock, one segment),
//! and hands the round to a second thread that waits for the group flush covering it and sends
//! the replies back. So the fsync of one round overlaps the work of the next, connections share
//! both, and no batch costs a blocking-thread hop or a wait on the store's lock of its own. A
//! round of one batch while the flush thread is idle (a lone client) waits for its flush on the
//! first thread: there is nothing to overlap, and the hop would only add to its latency.
//!
//! Whichever thread learns that a round is durable writes its replies to the clients' sockets
//! itself (a non-blocking write, which a reply of a few bytes into an idle socket never fills),
//! so a reply leaves without waiting for the connection's task to be scheduled; the task then
//! only goes on reading, and writes what a full socket buffer left over.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::command::Flow;
use super::resp::{Reply, Request};
use super::{run_all, Client, Server};
use crate::store::kv::Ticket;

/// Most batches in one round: bounds the round's segment and the time a round holds the lock.
const MAX_ROUND: usize = 256;

/// A connection's batch, and where its replies go.
pub(crate) struct Job {
    pub(crate) server: Arc<Server>,
    pub(crate) client: Client,
    /// The client's socket, for the replies.
    pub(crate) stream: Arc<TcpStream>,
    pub(crate) batch: Vec<Request>,
    pub(crate) out: Vec<u8>,
    pub(crate) done: oneshot::Sender<Done>,
}

/// A batch's outcome: the connection's state, what to do next, the replies not yet sent.
pub(crate) type Done = (Client, Flow, Vec<u8>);

/// Batches run, waiting for their writes to be durable.
struct Round {
    jobs: Vec<(Job, Flow)>,
    ticket: Ticket,
}

/// Starts the writer's two threads; they end once every sender of the returned one is gone.
pub(crate) fn start() -> Sender<Job> {
    let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
    let (rounds_tx, rounds_rx) = mpsc::channel::<Round>();
    let pending = Arc::new(AtomicUsize::new(0));
    let flushing = pending.clone();
    std::thread::Builder::new()
        .name("dedupd-redis-apply".into())
        .spawn(move || apply(&jobs_rx, &rounds_tx, &pending))
        .expect("start the redis writer thread");
    std::thread::Builder::new()
        .name("dedupd-redis-flush".into())
        .spawn(move || flush(&rounds_rx, &flushing))
        .expect("start the redis flush thread");
    jobs_tx
}

/// Runs each round of queued batches as one store transaction. `pending` counts the rounds
/// handed to the flush thread and not yet answered.
fn apply(jobs: &Receiver<Job>, rounds: &Sender<Round>, pending: &AtomicUsize) {
    while let Ok(first) = jobs.recv() {
        let mut round = vec![first];
        while round.len() < MAX_ROUND {
            match jobs.try_recv() {
                Ok(job) => round.push(job),
                Err(_) => break,
            }
        }
        let server = round[0].server.clone();
        let ran = server.kv.batch(|tx| {
            round
                .iter_mut()
                .map(|j| run_all(&j.server, &mut j.client, &j.batch, &mut j.out, tx))
                .collect::<Vec<Flow>>()
        });
        match ran {
            Ok((flows, ticket)) if round.len() == 1 && pending.load(Ordering::SeqCst) == 0 => {
                // One batch and an idle flush thread (a lone client, `-c1`): nothing to
                // overlap, so wait here and spare the reply a hop through that thread.
                let jobs = round.into_iter().zip(flows);
                answer(jobs, server.kv.wait_durable(ticket));
            }
            Ok((flows, ticket)) => {
                let jobs = round.into_iter().zip(flows).collect();
                pending.fetch_add(1, Ordering::SeqCst);
                if let Err(mpsc::SendError(round)) = rounds.send(Round { jobs, ticket }) {
                    // The flush thread is gone (it never ends first): say so rather than hang.
                    fail(
                        round.jobs.into_iter().map(|(j, _)| j),
                        "the flush thread ended",
                    );
                }
            }
            Err(e) => fail(round.into_iter(), &e.to_string()),
        }
    }
}

/// Waits for each round's writes to be durable (one flush for every round queued), then
/// replies.
fn flush(rounds: &Receiver<Round>, pending: &AtomicUsize) {
    while let Ok(first) = rounds.recv() {
        let mut queued = vec![first];
        while let Ok(round) = rounds.try_recv() {
            queued.push(round);
        }
        let ticket = queued.iter().map(|r| r.ticket).max().expect("one round");
        let durable = queued[0].jobs[0].0.server.kv.wait_durable(ticket);
        let answered = queued.len();
        answer(queued.into_iter().flat_map(|r| r.jobs), durable);
        pending.fetch_sub(answered, Ordering::SeqCst);
    }
}

/// Sends each batch its replies once its writes are durable, or the failure that kept them
/// from becoming so.
fn answer(jobs: impl Iterator<Item = (Job, Flow)>, durable: Result<(), crate::store::Error>) {
    match durable {
        Ok(()) => {
            for (mut job, flow) in jobs {
                send_replies(&job.stream, &mut job.out);
                let _ = job.done.send((job.client, flow, job.out));
            }
        }
        Err(e) => fail(jobs.map(|(j, _)| j), &e.to_string()),
    }
}

/// Writes as much of `out` to the client as its socket takes now, without waiting, and keeps
/// the rest (all of it on an error, which the connection's task then meets itself).
fn send_replies(stream: &TcpStream, out: &mut Vec<u8>) {
    let mut sent = 0;
    while sent < out.len() {
        match stream.try_write(&out[sent..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => sent += n,
        }
    }
    out.drain(..sent);
}

/// Answers each batch with the store's failure instead of its replies, and closes it.
fn fail(jobs: impl Iterator<Item = Job>, cause: &str) {
    tracing::error!(%cause, "redis endpoint: the store could not take the batch, closing the connection");
    for mut job in jobs {
        job.out.clear();
        Reply::err(format!(
            "the store could not make the writes durable: {cause}"
        ))
        .encode(job.client.proto, &mut job.out);
        let _ = job.done.send((job.client, Flow::Close, job.out));
    }
}
