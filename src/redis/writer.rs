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
//!
//! A lone client that sends its next request as soon as it has the reply (`-c1`) is served by
//! the first thread alone for a while: having replied, it reads the client's socket for the
//! next batch itself ([`keep_reading`]), as Redis' one thread does, instead of handing the
//! client back to its task (a wake) only for the task to read the next request and hand it
//! over again (another wake): on a 2-core VM each wake costs tens of microseconds of a request
//! that takes a few hundred.

use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::command::Flow;
use super::resp::{Reply, Request};
use super::{run_all, Client, Inbox, Server, Taken};
use crate::store::kv::Ticket;

/// Most batches in one round: bounds the round's segment and the time a round holds the lock.
const MAX_ROUND: usize = 256;

/// How long the writer waits on a lone client's socket for its next request after replying: a
/// client on loopback answers a reply within 25-45 us (measured at `-c1`); past this, the client
/// goes back to its task, which waits for it without a spinning thread.
const KEEP_READING: Duration = Duration::from_micros(100);

/// Most batches of one client the writer runs in a row before handing it back to its task
/// (which runs the next batch through the queue like any other, and may see a shutdown).
const KEEP_BATCHES: u32 = 64;

/// Most batches a client's wait is skipped for after waits that found nothing: one that pauses
/// between requests costs the writer at most a [`KEEP_READING`] spin per this many, not one a
/// request.
const MAX_SKIPPED_WAITS: u32 = 63;

/// A connection's batch, and where its replies go.
pub(crate) struct Job {
    pub(crate) server: Arc<Server>,
    pub(crate) client: Client,
    /// The client's socket, for the replies.
    pub(crate) stream: Arc<TcpStream>,
    /// What the connection read after the batch; the writer may read more into it.
    pub(crate) inbox: Inbox,
    /// Batches of this client the writer ran in a row by reading them itself.
    pub(crate) kept: u32,
    pub(crate) batch: Vec<Request>,
    pub(crate) out: Vec<u8>,
    pub(crate) done: oneshot::Sender<Done>,
}

/// A batch's outcome: the connection's state, what to do next, the replies not yet sent, and
/// what was read and not yet run.
pub(crate) type Done = (Client, Flow, Vec<u8>, Inbox);

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
    // A lone client's next batch, read here, or another client's that came in meanwhile.
    let mut next = None;
    loop {
        let first = match next.take() {
            Some(job) => job,
            None => match jobs.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
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
                let (mut job, flow) = round.into_iter().zip(flows).next().expect("one batch");
                match server.kv.wait_durable(ticket) {
                    Ok(()) => {
                        send_replies(&job.stream, &mut job.out);
                        next = keep_reading(job, flow, jobs);
                    }
                    Err(e) => fail(std::iter::once(job), &e.to_string()),
                }
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
                give_back(job, flow);
            }
        }
        Err(e) => fail(jobs.map(|(j, _)| j), &e.to_string()),
    }
}

/// Hands a client back to its task, with what is left of its replies.
fn give_back(job: Job, flow: Flow) {
    let _ = job.done.send((job.client, flow, job.out, job.inbox));
}

/// After a lone client's batch is answered: reads the client's socket for its next batch for up
/// to [`KEEP_READING`], and returns it as the next job to run, keeping the client. Returns
/// another client's job instead if one is queued first (having given this one back), and `None`
/// once the client is given back with nothing else to run: when it has sent nothing new in
/// time, sent something its task runs itself (a command off the store, a malformed request),
/// closed, or has had [`KEEP_BATCHES`] batches in a row here; or when its replies did not all
/// fit in its socket. After a wait that found nothing, the client's next waits are skipped
/// (1, 3, 7, ... up to [`MAX_SKIPPED_WAITS`] batches, until a wait finds a batch again).
fn keep_reading(mut job: Job, flow: Flow, jobs: &Receiver<Job>) -> Option<Job> {
    if flow != Flow::Continue || !job.out.is_empty() || job.kept >= KEEP_BATCHES {
        give_back(job, flow);
        return None;
    }
    // A batch already read (past a full one, or several requests in one read) needs no wait.
    let mut parse = true;
    if job.inbox.skip_waits > 0 {
        if let Taken::Batch(batch) = job.inbox.take_for_writer() {
            return Some(next_of(job, batch));
        }
        job.inbox.skip_waits -= 1;
        give_back(job, flow);
        return None;
    }
    let until = Instant::now() + KEEP_READING;
    loop {
        if parse {
            match job.inbox.take_for_writer() {
                Taken::Batch(batch) => {
                    job.inbox.backoff = 0;
                    return Some(next_of(job, batch));
                }
                Taken::Other => break,
                Taken::Partial => parse = false,
            }
        }
        match jobs.try_recv() {
            Ok(other) => {
                give_back(job, flow);
                return Some(other);
            }
            Err(TryRecvError::Disconnected) => break,
            Err(TryRecvError::Empty) => {}
        }
        // Past the deadline even while bytes come in (a large value): the task reads the rest.
        let late = Instant::now() >= until;
        match read_now(&job.stream, &mut job.inbox) {
            Ok(n) if n > 0 && !late => parse = true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && !late => {
                std::hint::spin_loop();
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Waited in vain: skip this client's next waits, more of them each time.
                let inbox = &mut job.inbox;
                inbox.backoff = (inbox.backoff * 2 + 1).min(MAX_SKIPPED_WAITS);
                inbox.skip_waits = inbox.backoff;
                break;
            }
            // Closed or failed: the task meets it on its next read. Or late with bytes read:
            // the task parses them first.
            _ => break,
        }
    }
    give_back(job, flow);
    None
}

/// The kept client's next batch, as the next job to run.
fn next_of(mut job: Job, batch: Vec<Request>) -> Job {
    job.batch = batch;
    job.kept += 1;
    job
}

/// Reads what the client has sent into `inbox` without waiting; `WouldBlock` when nothing.
///
/// Straight from the socket: tokio's own `try_read` answers `WouldBlock` until its reactor has
/// seen the socket become readable, which takes a wake of the thread that runs the reactor, the
/// very wake this saves. Reading past tokio is sound: its readiness for the socket may then be
/// stale, so the task's next read may find nothing and wait for the next readiness event, as
/// `read_buf` does.
fn read_now(stream: &TcpStream, inbox: &mut Inbox) -> std::io::Result<usize> {
    let mut chunk = [0u8; 4096];
    let n = (&*socket2::SockRef::from(stream)).read(&mut chunk)?;
    inbox.buf.extend_from_slice(&chunk[..n]);
    Ok(n)
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
        give_back(job, Flow::Close);
    }
}
