//! What the fault tests add to the harness: a broker handle that reconnects after the broker was
//! disturbed, a workload of persistent messages with known ids and duplicates, the `dedupd`
//! process, and the id-by-id verdict. (Raw AMQP for bytes amqprs will not send: [`super::raw`].)
//!
//! Every wait is bounded; no broker is a failure, never a skip.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use amqprs::channel::{
    BasicConsumeArguments, BasicPublishArguments, Channel, ConfirmSelectArguments,
    ExchangeDeclareArguments, ExchangeDeleteArguments, QueueBindArguments, QueueDeclareArguments,
    QueueDeleteArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{BasicProperties, FieldTable, FieldValue};

pub use super::raw::*;
use super::{eventually_async, Waiting};

/// Longest any single wait may take.
pub const WAIT: Duration = Duration::from_secs(90);
/// Messages per scenario, as the issue asks: at least 10 000.
pub const MESSAGES: usize = 10_000;
/// Share of those that repeat an earlier id.
pub const DUPLICATE_SHARE: f64 = 0.2;
/// `DEDUPD_PREFETCH` in these tests (dedupd's default), the bound on repeats.
pub const PREFETCH: usize = 1000;

// ---------------------------------------------------------------------------------------------
// The broker.

pub use super::connect;

/// A test's randomly named topology and a connection that comes back after a broker outage.
pub struct Broker {
    link: Option<(Connection, Channel)>,
    /// Set once [`Broker::cleanup`] ran; otherwise dropping deletes the objects (a failed test).
    cleaned: bool,
    /// Source queue dedupd consumes.
    pub source: String,
    /// Destination exchange dedupd publishes to.
    pub dest: String,
    /// The test's queue bound to the destination: what was forwarded.
    pub out: String,
}

impl Broker {
    /// Connects and declares the source queue (as dedupd does), the destination exchange and a
    /// queue bound to it.
    pub async fn new(tag: &str) -> Broker {
        let base = format!("dedupd-fault-{tag}-{:012x}", rand::random::<u64>() >> 16);
        let mut broker = Broker {
            link: None,
            cleaned: false,
            source: format!("{base}.in"),
            dest: format!("{base}.out"),
            out: format!("{base}.out-q"),
        };
        let mut args = FieldTable::new();
        args.insert(
            "x-dead-letter-exchange".try_into().unwrap(),
            FieldValue::from(format!("{}.dlx", broker.source)),
        );
        let source = broker.source.clone();
        broker.declare_queue(&source, args).await;
        broker.bind_out().await;
        broker
    }

    /// `<source>.dead`, where dedupd's rejects end up.
    pub fn dead(&self) -> String {
        format!("{}.dead", self.source)
    }

    /// The channel, reconnecting first if the broker dropped the last one.
    pub async fn ch(&mut self) -> &Channel {
        let alive = matches!(&self.link, Some((c, ch)) if c.is_open() && ch.is_open());
        if !alive {
            if let Some((conn, _)) = self.link.take() {
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.close()).await;
            }
            let link = eventually_async(
                WAIT,
                || "the broker did not come back".into(),
                || async {
                    let args = OpenConnectionArguments::new("127.0.0.1", 5672, "guest", "guest");
                    let conn =
                        tokio::time::timeout(Duration::from_secs(5), Connection::open(&args))
                            .await
                            .ok()?
                            .ok()?;
                    let ch = conn.open_channel(None).await.ok()?;
                    Some((conn, ch))
                },
            )
            .await;
            self.link = Some(link);
        }
        &self.link.as_ref().expect("just connected").1
    }

    /// Forgets the connection (after the broker dropped it, say); the next call reconnects.
    pub fn drop_link(&mut self) {
        self.link = None;
    }

    pub async fn declare_queue(&mut self, name: &str, args: FieldTable) {
        let args = QueueDeclareArguments::new(name)
            .durable(true)
            .arguments(args)
            .finish();
        self.ch()
            .await
            .queue_declare(args)
            .await
            .unwrap_or_else(|e| panic!("declare queue {name}: {e}"));
    }

    /// Declares the destination exchange (fanout, durable, as dedupd does) and binds `out` to it.
    pub async fn bind_out(&mut self) {
        let (dest, out) = (self.dest.clone(), self.out.clone());
        let ch = self.ch().await;
        ch.exchange_declare(
            ExchangeDeclareArguments::new(&dest, "fanout")
                .durable(true)
                .finish(),
        )
        .await
        .unwrap();
        ch.queue_declare(QueueDeclareArguments::new(&out).durable(true).finish())
            .await
            .unwrap();
        ch.queue_bind(QueueBindArguments::new(&out, &dest, ""))
            .await
            .unwrap();
    }

    /// Ready messages and consumers of `queue`, or `None` if the broker cannot say right now.
    pub async fn stat(&mut self, queue: &str) -> Option<(u32, u32)> {
        let args = QueueDeclareArguments::new(queue).passive(true).finish();
        let got =
            tokio::time::timeout(Duration::from_secs(5), self.ch().await.queue_declare(args)).await;
        match got {
            Ok(Ok(Some((_, ready, consumers)))) => Some((ready, consumers)),
            _ => {
                self.drop_link();
                None
            }
        }
    }

    /// Ready messages in `queue` (reconnecting as needed).
    pub async fn ready(&mut self, queue: &str) -> u32 {
        let mut waiting = Waiting::new(WAIT);
        loop {
            if let Some((n, _)) = self.stat(queue).await {
                return n;
            }
            waiting.again(|| format!("cannot count {queue}")).await;
        }
    }

    /// Waits until `pred(ready, consumers)` holds for `queue`; returns the time it took.
    pub async fn wait_for(
        &mut self,
        queue: &str,
        what: &str,
        pred: impl Fn(u32, u32) -> bool,
    ) -> Duration {
        let mut waiting = Waiting::new(WAIT);
        let mut last = None;
        loop {
            if let Some((ready, consumers)) = self.stat(queue).await {
                if pred(ready, consumers) {
                    return waiting.elapsed();
                }
                last = Some((ready, consumers));
            }
            waiting
                .again(|| format!("{queue}: {what}; last (ready, consumers) = {last:?}"))
                .await;
        }
    }

    /// Publishes `messages` to the source queue with publisher confirms, and waits until they
    /// are all in it.
    pub async fn publish(&mut self, messages: &[(BasicProperties, Vec<u8>)]) {
        let conn = connect().await;
        let ch = conn.open_channel(None).await.unwrap();
        ch.confirm_select(ConfirmSelectArguments::new(false))
            .await
            .unwrap();
        for (props, body) in messages {
            ch.basic_publish(
                props.clone(),
                body.clone(),
                BasicPublishArguments::new("", &self.source),
            )
            .await
            .unwrap();
        }
        let _ = ch.close().await;
        let _ = conn.close().await;
    }

    /// Publishes messages with these ids and waits until the source holds `at_least` messages.
    pub async fn fill(&mut self, ids: &[String], at_least: u32) {
        let messages: Vec<_> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (persistent(id), body(id, i)))
            .collect();
        self.publish(&messages).await;
        let source = self.source.clone();
        self.wait_for(&source, "filled", |ready, _| ready >= at_least)
            .await;
    }

    /// Takes every message now ready in `queue` (acked by taking), by consuming.
    pub async fn take_all(&mut self, queue: &str) -> Vec<(BasicProperties, Vec<u8>)> {
        let n = self.ready(queue).await as usize;
        let mut out = Vec::with_capacity(n);
        if n == 0 {
            return out;
        }
        let ch = self.ch().await.clone();
        let (tag, mut rx) = ch
            .basic_consume_rx(
                BasicConsumeArguments::new(queue, "")
                    .manual_ack(false)
                    .finish(),
            )
            .await
            .unwrap_or_else(|e| panic!("consume {queue}: {e}"));
        let deadline = tokio::time::Instant::now() + WAIT;
        while out.len() < n {
            let msg = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .unwrap_or_else(|_| panic!("{queue}: only {} of {n} arrived", out.len()))
                .expect("consumer open");
            out.push((msg.basic_properties.unwrap(), msg.content.unwrap()));
        }
        let _ = ch
            .basic_cancel(amqprs::channel::BasicCancelArguments::new(&tag))
            .await;
        out
    }

    fn objects(&self) -> ([String; 3], [String; 2]) {
        (
            [self.source.clone(), self.dead(), self.out.clone()],
            [format!("{}.dlx", self.source), self.dest.clone()],
        )
    }

    /// Deletes what the test declared and what dedupd declared for it.
    pub async fn cleanup(mut self) {
        self.cleaned = true;
        let (queues, exchanges) = self.objects();
        let ch = self.ch().await.clone();
        for q in &queues {
            let _ = ch.queue_delete(QueueDeleteArguments::new(q)).await;
        }
        for x in &exchanges {
            let _ = ch.exchange_delete(ExchangeDeleteArguments::new(x)).await;
        }
        if let Some((conn, ch)) = self.link.take() {
            let _ = ch.close().await;
            let _ = conn.close().await;
        }
    }
}

/// Publishes messages into `queue` at a steady rate from a task of its own, so that the stream
/// is still flowing whenever the test disturbs something. Batches go in broker transactions; a
/// batch whose commit did not come back (connection closed, broker down) is published again on a
/// new connection, as a producer would: a copy the broker did keep is one more duplicate.
pub struct Feeder {
    task: tokio::task::JoinHandle<usize>,
}

/// Messages per transaction.
const FEED_BATCH: usize = 100;

impl Feeder {
    /// Starts publishing `ids` (bodies from [`body`]) at `per_sec` messages a second.
    pub fn start(queue: &str, ids: Vec<String>, per_sec: usize) -> Feeder {
        let queue = queue.to_string();
        let task = tokio::spawn(async move {
            let pause = Duration::from_secs_f64(FEED_BATCH as f64 / per_sec as f64);
            let started = tokio::time::Instant::now();
            let mut link: Option<(Connection, Channel)> = None;
            let mut retries = 0;
            for (n, batch) in ids.chunks(FEED_BATCH).enumerate() {
                tokio::time::sleep_until(started + pause * n as u32).await;
                let mut waiting = Waiting::new(WAIT);
                loop {
                    if link.is_none() {
                        link = Self::open().await;
                    }
                    if let Some((_, ch)) = &link {
                        if Self::send(ch, &queue, batch, n * FEED_BATCH).await {
                            break;
                        }
                        retries += 1;
                    }
                    if let Some((conn, _)) = link.take() {
                        let _ = tokio::time::timeout(Duration::from_secs(2), conn.close()).await;
                    }
                    waiting.again(|| "feeder: broker gone".into()).await;
                }
            }
            if let Some((conn, ch)) = link {
                let _ = ch.close().await;
                let _ = conn.close().await;
            }
            retries
        });
        Feeder { task }
    }

    async fn open() -> Option<(Connection, Channel)> {
        let args = OpenConnectionArguments::new("127.0.0.1", 5672, "guest", "guest");
        let conn = tokio::time::timeout(Duration::from_secs(5), Connection::open(&args))
            .await
            .ok()?
            .ok()?;
        let ch = conn.open_channel(None).await.ok()?;
        ch.tx_select().await.ok()?;
        Some((conn, ch))
    }

    /// One batch in one transaction; whether the broker committed it.
    async fn send(ch: &Channel, queue: &str, batch: &[String], first: usize) -> bool {
        let work = async {
            for (i, id) in batch.iter().enumerate() {
                ch.basic_publish(
                    persistent(id),
                    body(id, first + i),
                    BasicPublishArguments::new("", queue),
                )
                .await?;
            }
            ch.tx_commit().await
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(10), work).await,
            Ok(Ok(()))
        )
    }

    /// Waits until everything is published; returns how many batches had to be sent again.
    pub async fn finish(self) -> usize {
        tokio::time::timeout(WAIT * 2, self.task)
            .await
            .expect("feeder finished in time")
            .expect("feeder did not panic")
    }
}

impl Drop for Broker {
    /// A test that failed half-way leaves its queues behind unless they go here; synchronous, so
    /// over a raw connection (the async one may belong to a runtime that is going away).
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let (queues, exchanges) = self.objects();
        let _ = std::panic::catch_unwind(|| raw_delete(&queues, &exchanges));
    }
}

/// Persistent properties with this message id.
pub fn persistent(id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_message_id(id)
        .with_persistence(true)
        .finish()
}

/// A 256-byte body naming the id and the copy.
pub fn body(id: &str, i: usize) -> Vec<u8> {
    let mut b = format!("{id} copy {i} ").into_bytes();
    b.resize(256, b'.');
    b
}

/// Ids in publish order: `n` messages, a share of which repeat an earlier id (some right after
/// it, so they meet it in flight, most further back). Returns the ids and the distinct set.
pub fn workload(prefix: &str, n: usize) -> (Vec<String>, BTreeSet<String>) {
    let mut ids: Vec<String> = Vec::with_capacity(n);
    let mut distinct = BTreeSet::new();
    let every = (1.0 / DUPLICATE_SHARE).round() as usize; // every 5th is a duplicate
    for i in 0..n {
        if i % every == every - 1 {
            let back = if i % (every * 4) == every - 1 {
                1
            } else {
                1 + rand::random::<u64>() as usize % i
            };
            ids.push(ids[i - back].clone());
        } else {
            let id = format!("{prefix}-{i}");
            distinct.insert(id.clone());
            ids.push(id);
        }
    }
    (ids, distinct)
}

/// What reached the destination, id by id.
#[derive(Debug)]
pub struct Verdict {
    /// Distinct ids expected.
    pub expected: usize,
    /// Expected ids that never arrived.
    pub lost: Vec<String>,
    /// Messages that arrived beyond the first of their id.
    pub repeats: usize,
    /// Ids that arrived more than once.
    pub repeated_ids: usize,
    /// Ids that arrived and were not expected.
    pub strangers: Vec<String>,
}

impl Verdict {
    /// Counts every id of `delivered` against `expected`.
    pub fn of(expected: &BTreeSet<String>, delivered: &[(BasicProperties, Vec<u8>)]) -> Verdict {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for (props, _) in delivered {
            let id = props.message_id().cloned().unwrap_or_default();
            *counts.entry(id).or_default() += 1;
        }
        let lost = expected
            .iter()
            .filter(|id| !counts.contains_key(*id))
            .cloned()
            .collect();
        let strangers = counts
            .keys()
            .filter(|id| !expected.contains(*id))
            .cloned()
            .collect();
        Verdict {
            expected: expected.len(),
            lost,
            repeats: counts.values().map(|c| c - 1).sum(),
            repeated_ids: counts.values().filter(|c| **c > 1).count(),
            strangers,
        }
    }

    /// Prints the figures and asserts: nothing lost, nothing foreign, repeats ≤ the prefetch.
    pub fn check(&self, scenario: &str, extra: &str) {
        eprintln!(
            "{scenario}: {} distinct ids expected, {} lost, {} delivered twice or more ({} extra \
             copies; bound {PREFETCH}){extra}",
            self.expected,
            self.lost.len(),
            self.repeated_ids,
            self.repeats
        );
        assert!(
            self.lost.is_empty(),
            "{scenario}: {} ids lost, e.g. {:?}",
            self.lost.len(),
            &self.lost[..self.lost.len().min(5)]
        );
        assert!(
            self.strangers.is_empty(),
            "{scenario}: unexpected ids {:?}",
            self.strangers
        );
        assert!(
            self.repeats <= PREFETCH,
            "{scenario}: {} extra copies, more than DEDUPD_PREFETCH = {PREFETCH}",
            self.repeats
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The relay process.

/// A running `dedupd`, killed on drop.
pub struct Relay {
    pub child: Child,
    pub log: PathBuf,
    pub started: Instant,
}

/// Where relay logs go: beside the data dir, never inside it (a full data dir must not eat them).
pub fn log_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("dedupd-fault-logs")
        .tempdir()
        .unwrap()
}

impl Relay {
    /// Starts the real binary on `broker`'s names and `data`, logging to a file in `logs`.
    pub fn start(broker: &Broker, data: &Path, logs: &Path, env: &[(&str, &str)]) -> Relay {
        let log = logs.join(format!("relay-{:08x}.log", rand::random::<u32>()));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dedupd"));
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("DEDUPD_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("DEDUPD_SOURCE_QUEUE", &broker.source)
            .env("DEDUPD_DEST_EXCHANGE", &broker.dest)
            .env("DEDUPD_DATA_DIR", data)
            .env("DEDUPD_METRICS_ADDR", "off")
            .env("DEDUPD_PREFETCH", PREFETCH.to_string())
            .env("DEDUPD_LOG", "info")
            .env("DEDUPD_EXPECTED_IDS", "100000")
            .env("DEDUPD_CACHE_SIZE", "8M");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap());
        let child = cmd.spawn().expect("start dedupd");
        Relay {
            child,
            log,
            started: Instant::now(),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until it consumes the source queue (one consumer on it).
    pub async fn wait_consuming(&mut self, broker: &mut Broker) -> Duration {
        let source = broker.source.clone();
        let mut waiting = Waiting::new(WAIT);
        loop {
            if let Some((_, consumers)) = broker.stat(&source).await {
                if consumers >= 1 {
                    return waiting.elapsed();
                }
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "dedupd exited with {status} before consuming:\n{}",
                    self.log()
                );
            }
            waiting
                .again(|| format!("dedupd not consuming:\n{}", self.log()))
                .await;
        }
    }

    /// Sends `signal` (`TERM`, `KILL`).
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{signal}");
    }

    /// Waits for the process to exit; returns its status and how long it took.
    pub fn wait_exit(&mut self) -> (ExitStatus, Duration) {
        let mut waiting = Waiting::new(WAIT);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, waiting.elapsed());
            }
            waiting.again_blocking(|| format!("dedupd did not exit:\n{}", self.log()));
        }
    }

    /// SIGTERM, then the exit: must be 0.
    pub fn stop(mut self) -> Duration {
        self.signal("TERM");
        let (status, took) = self.wait_exit();
        assert!(status.success(), "exit {status}:\n{}", self.log());
        took
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the relay has forwarded everything it can: the source is empty and `out` holds at
/// least `distinct` messages. Returns the time it took.
pub async fn wait_drained(broker: &mut Broker, relay: &mut Relay, distinct: usize) -> Duration {
    let mut waiting = Waiting::new(WAIT);
    let (source, out) = (broker.source.clone(), broker.out.clone());
    loop {
        let empty = broker.stat(&source).await.is_some_and(|(n, _)| n == 0);
        if empty
            && broker
                .stat(&out)
                .await
                .is_some_and(|(n, _)| n as usize >= distinct)
        {
            return waiting.elapsed();
        }
        if let Some(status) = relay.child.try_wait().unwrap() {
            panic!(
                "dedupd exited with {status} while draining:\n{}",
                relay.log()
            );
        }
        let state = (broker.stat(&source).await, broker.stat(&out).await);
        waiting
            .again(|| {
                let (source, out) = state;
                format!(
                    "not drained: source {source:?}, out {out:?}:\n{}",
                    relay.log()
                )
            })
            .await;
    }
}

// ---------------------------------------------------------------------------------------------
// rabbitmqctl.

/// Runs `rabbitmqctl args...` with a time limit; returns whether it succeeded, and its output.
pub fn rabbitmqctl(args: &[&str], limit: Duration) -> (bool, String) {
    let out = Command::new("timeout")
        .arg(limit.as_secs().to_string())
        .arg("rabbitmqctl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("rabbitmqctl must be on PATH for the fault tests");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Whether something accepts connections on 127.0.0.1:5672.
pub fn port_open() -> bool {
    TcpStream::connect_timeout(&"127.0.0.1:5672".parse().unwrap(), Duration::from_secs(1)).is_ok()
}
