//! Black-box tests of the relay: the real `dedupd` binary against the real local RabbitMQ
//! (127.0.0.1:5672, guest/guest). Each test uses its own random queue and exchange names and a
//! temporary data dir, and deletes what it declared. No broker is a failure, not a skip.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use amqprs::channel::{
    BasicGetArguments, BasicPublishArguments, Channel, ExchangeDeclareArguments,
    ExchangeDeleteArguments, QueueBindArguments, QueueDeclareArguments, QueueDeleteArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{BasicProperties, FieldTable, FieldValue};

/// Longest any single wait in these tests may take.
const WAIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// The broker side of a test.

/// A test's connection to the broker and its randomly named topology.
struct Broker {
    conn: Connection,
    ch: Channel,
    source: String,
    dest: String,
    /// Queue the test binds to the destination exchange to see what was forwarded.
    out: String,
    /// Exchange and queue for copies of duplicates, when a test wants them.
    dups: String,
}

impl Broker {
    async fn connect() -> Broker {
        let args = OpenConnectionArguments::new("127.0.0.1", 5672, "guest", "guest");
        let conn = tokio::time::timeout(Duration::from_secs(10), Connection::open(&args))
            .await
            .expect("RabbitMQ on 127.0.0.1:5672 did not answer within 10 s: the relay tests need it")
            .expect("cannot connect to RabbitMQ on 127.0.0.1:5672 (guest/guest): the relay tests need it");
        let ch = conn.open_channel(None).await.expect("open channel");
        let tag: u64 = rand::random();
        let base = format!("dedupd-test-{tag:016x}");
        Broker {
            conn,
            ch,
            source: format!("{base}.in"),
            dest: format!("{base}.out"),
            out: format!("{base}.out-q"),
            dups: format!("{base}.dups"),
        }
    }

    fn dead(&self) -> String {
        format!("{}.dead", self.source)
    }

    /// Declares the destination exchange as the relay does, with a queue bound to it.
    async fn bind_out(&self) {
        self.declare_exchange(&self.dest).await;
        self.declare_queue(&self.out, FieldTable::new()).await;
        self.ch
            .queue_bind(QueueBindArguments::new(&self.out, &self.dest, ""))
            .await
            .unwrap();
    }

    async fn declare_exchange(&self, name: &str) {
        self.ch
            .exchange_declare(
                ExchangeDeclareArguments::new(name, "fanout")
                    .durable(true)
                    .finish(),
            )
            .await
            .unwrap();
    }

    async fn declare_queue(&self, name: &str, args: FieldTable) {
        self.ch
            .queue_declare(
                QueueDeclareArguments::new(name)
                    .durable(true)
                    .arguments(args)
                    .finish(),
            )
            .await
            .unwrap();
    }

    /// Declares the source queue exactly as the relay does, so it can be filled before a start.
    async fn declare_source(&self) {
        let mut args = FieldTable::new();
        args.insert(
            "x-dead-letter-exchange".try_into().unwrap(),
            FieldValue::from(format!("{}.dlx", self.source)),
        );
        self.declare_queue(&self.source, args).await;
    }

    /// Publishes to the source queue through the default exchange.
    async fn publish(&self, props: BasicProperties, body: &[u8]) {
        self.ch
            .basic_publish(
                props,
                body.to_vec(),
                BasicPublishArguments::new("", &self.source),
            )
            .await
            .unwrap();
    }

    /// Takes every message now in `queue`.
    async fn drain(&self, queue: &str) -> Vec<(BasicProperties, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let got = self
                .ch
                .basic_get(BasicGetArguments::new(queue).no_ack(true).finish())
                .await
                .unwrap_or_else(|e| panic!("basic.get on {queue}: {e}"));
            match got {
                Some((_, props, body)) => out.push((props, body)),
                None => return out,
            }
        }
    }

    /// Ready messages in `queue`.
    async fn count(&self, queue: &str) -> u32 {
        let (_, n, _) = self
            .ch
            .queue_declare(QueueDeclareArguments::new(queue).passive(true).finish())
            .await
            .unwrap_or_else(|e| panic!("passive declare of {queue}: {e}"))
            .expect("declare-ok");
        n
    }

    /// Waits until `queue` holds `n` ready messages.
    async fn wait_count(&self, queue: &str, n: u32) {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = self.count(queue).await;
            if got == n {
                return;
            }
            assert!(Instant::now() < deadline, "{queue} holds {got}, want {n}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Deletes everything this test may have declared.
    async fn cleanup(self) {
        for q in [&self.source, &self.dead(), &self.out, &self.dups] {
            let _ = self.ch.queue_delete(QueueDeleteArguments::new(q)).await;
        }
        for x in [
            format!("{}.dlx", self.source),
            self.dest.clone(),
            self.dups.clone(),
        ] {
            let _ = self
                .ch
                .exchange_delete(ExchangeDeleteArguments::new(&x))
                .await;
        }
        // Closed explicitly: a channel left to its drop guard is closed from a spawned task that
        // the test's runtime may cancel half-way, which makes amqprs panic in its dispatcher.
        let _ = self.ch.clone().close().await;
        let _ = self.conn.close().await;
    }
}

/// Properties with every field set, distinct per `i`, for byte-for-byte comparison.
fn full_props(id: &str, i: u64) -> BasicProperties {
    let mut headers = FieldTable::new();
    headers.insert(
        "x-text".try_into().unwrap(),
        FieldValue::from(format!("t{i}")),
    );
    headers.insert("x-num".try_into().unwrap(), FieldValue::l(i as i64));
    headers.insert("x-flag".try_into().unwrap(), FieldValue::t(i % 2 == 0));
    headers.insert(
        "x-bytes".try_into().unwrap(),
        FieldValue::x(vec![0u8, 1, 255, i as u8].try_into().unwrap()),
    );
    BasicProperties::default()
        .with_content_type("application/json")
        .with_content_encoding("identity")
        .with_headers(headers)
        .with_delivery_mode(2)
        .with_priority((i % 10) as u8)
        .with_correlation_id(&format!("corr-{i}"))
        .with_reply_to("replies")
        .with_expiration("3600000")
        .with_message_id(id)
        .with_timestamp(1_700_000_000 + i)
        .with_message_type("order.created")
        .with_user_id("guest")
        .with_app_id("dedupd-tests")
        .finish()
}

fn id_props(id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_message_id(id)
        .with_persistence(true)
        .finish()
}

fn header_props(name: &str, value: Option<&str>) -> BasicProperties {
    let mut headers = FieldTable::new();
    if let Some(v) = value {
        headers.insert(name.try_into().unwrap(), FieldValue::from(v));
    }
    BasicProperties::default()
        .with_headers(headers)
        .with_persistence(true)
        .finish()
}

/// Every property of `got` equals `want`'s.
fn assert_same_props(got: &BasicProperties, want: &BasicProperties) {
    assert_eq!(got.content_type(), want.content_type());
    assert_eq!(got.content_encoding(), want.content_encoding());
    assert_eq!(got.headers(), want.headers());
    assert_eq!(got.delivery_mode(), want.delivery_mode());
    assert_eq!(got.priority(), want.priority());
    assert_eq!(got.correlation_id(), want.correlation_id());
    assert_eq!(got.reply_to(), want.reply_to());
    assert_eq!(got.expiration(), want.expiration());
    assert_eq!(got.message_id(), want.message_id());
    assert_eq!(got.timestamp(), want.timestamp());
    assert_eq!(got.message_type(), want.message_type());
    assert_eq!(got.user_id(), want.user_id());
    assert_eq!(got.app_id(), want.app_id());
}

fn ids_of(messages: &[(BasicProperties, Vec<u8>)]) -> Vec<String> {
    let mut ids: Vec<String> = messages
        .iter()
        .map(|(p, _)| p.message_id().cloned().unwrap_or_default())
        .collect();
    ids.sort();
    ids
}

fn bodies_of(messages: &[(BasicProperties, Vec<u8>)]) -> Vec<Vec<u8>> {
    let mut bodies: Vec<Vec<u8>> = messages.iter().map(|(_, b)| b.clone()).collect();
    bodies.sort();
    bodies
}

// ---------------------------------------------------------------------------------------------
// The relay process.

/// A running `dedupd` with its log file and metrics port.
struct Relay {
    child: Child,
    port: Option<u16>,
    log: PathBuf,
}

/// A free TCP port on loopback (free when asked; good enough between tests).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `dedupd` command with no `DEDUPD_*` inherited from the test's environment.
fn dedupd() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dedupd"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("DEDUPD_") {
            cmd.env_remove(k);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

impl Relay {
    /// Starts `dedupd` on the broker's names with `data`, plus `env`; metrics on a free port.
    fn start(broker: &Broker, data: &Path, env: &[(&str, &str)]) -> Relay {
        let port = free_port();
        let log = data.join(format!("relay-{:08x}.log", rand::random::<u32>()));
        let mut cmd = dedupd();
        cmd.env("DEDUPD_SOURCE_QUEUE", &broker.source)
            .env("DEDUPD_DEST_EXCHANGE", &broker.dest)
            .env("DEDUPD_DATA_DIR", data)
            .env("DEDUPD_METRICS_ADDR", format!("127.0.0.1:{port}"))
            .env("DEDUPD_LOG", "info,dedupd=debug")
            // Small Bloom filters: many relays run at once in these tests.
            .env("DEDUPD_EXPECTED_IDS", "10000")
            .env("DEDUPD_CACHE_SIZE", "4M");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let file = File::create(&log).unwrap();
        cmd.stdout(Stdio::null()).stderr(file);
        let child = cmd.spawn().expect("start dedupd");
        Relay {
            child,
            port: Some(port),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET path` on the metrics port: status code and body, `None` if nothing listens.
    fn get(&self, path: &str) -> Option<(u16, String)> {
        let port = self.port?;
        let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).ok()?;
        let code = text.split(' ').nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n")?.1.to_string();
        Some((code, body))
    }

    /// Waits for `/healthz` to answer 200 (connected and consuming).
    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some((200, _)) = self.get("/healthz") {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "dedupd exited with {status} before being healthy:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "dedupd never healthy:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The `dedupd_*` samples of `/metrics`, by full name with labels.
    fn metrics(&self) -> HashMap<String, f64> {
        let Some((200, body)) = self.get("/metrics") else {
            return HashMap::new();
        };
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }

    fn outcome(m: &HashMap<String, f64>, outcome: &str) -> u64 {
        m.get(&format!("dedupd_messages_total{{outcome=\"{outcome}\"}}"))
            .copied()
            .unwrap_or(0.0) as u64
    }

    /// Waits until `n` source messages are settled; returns (forwarded, duplicate, dead).
    fn wait_settled(&self, n: u64) -> (u64, u64, u64) {
        let deadline = Instant::now() + WAIT;
        loop {
            let m = self.metrics();
            let counts = (
                Self::outcome(&m, "forwarded"),
                Self::outcome(&m, "duplicate"),
                Self::outcome(&m, "dead_lettered"),
            );
            if counts.0 + counts.1 + counts.2 >= n {
                return counts;
            }
            assert!(
                Instant::now() < deadline,
                "only {counts:?} of {n} settled:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and waits for the exit.
    fn terminate(mut self) -> (ExitStatus, String) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success());
        let status = self.wait_exit();
        (status, self.log())
    }

    /// Waits for the process to exit on its own.
    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "dedupd did not exit:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_removed_everything_else_forwarded_once_unchanged() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    let data = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&broker, data.path(), &[]);
    relay.wait_healthy();

    // 40 distinct ids, and every third sent twice more, interleaved.
    let mut sent = BTreeMap::new();
    let mut total = 0;
    for i in 0..40u64 {
        let id = format!("order-{i}");
        let props = full_props(&id, i);
        let body = format!(
            "{{\"order\":{i},\"pad\":\"{}\"}}",
            "x".repeat(i as usize * 7)
        )
        .into_bytes();
        broker.publish(props.clone(), &body).await;
        total += 1;
        if i % 3 == 0 {
            broker.publish(props.clone(), &body).await;
            broker.publish(props.clone(), &body).await;
            total += 2;
        }
        sent.insert(id, (props, body));
    }
    let (forwarded, duplicate, dead) = relay.wait_settled(total);
    assert_eq!((forwarded, duplicate, dead), (40, total - 40, 0));

    let got = broker.drain(&broker.out).await;
    assert_eq!(got.len(), 40, "each id exactly once");
    for (props, body) in &got {
        let id = props.message_id().expect("message id kept");
        let (want_props, want_body) = &sent[id];
        assert_eq!(body, want_body, "body of {id}");
        assert_same_props(props, want_props);
    }
    assert_eq!(broker.count(&broker.source).await, 0);
    assert_eq!(broker.count(&broker.dead()).await, 0);
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_copies_back_to_back_forward_one() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    let data = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&broker, data.path(), &[]);
    relay.wait_healthy();

    for _ in 0..50 {
        broker.publish(id_props("same"), b"same body").await;
    }
    assert_eq!(relay.wait_settled(50), (1, 49, 0));
    let got = broker.drain(&broker.out).await;
    assert_eq!(ids_of(&got), ["same"]);
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_id_empty_id_and_too_long_id_are_dead_lettered() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    let data = tempfile::tempdir().unwrap();
    // A message_id is at most 255 bytes, so the limit comes down to show the long-id path.
    let mut relay = Relay::start(&broker, data.path(), &[("DEDUPD_MAX_ID_BYTES", "100")]);
    relay.wait_healthy();

    let long = "L".repeat(101);
    broker
        .publish(BasicProperties::default(), b"no id at all")
        .await;
    broker.publish(id_props(""), b"empty id").await;
    broker.publish(id_props(&long), b"id too long").await;
    broker.publish(id_props("fine"), b"a good one").await;
    assert_eq!(relay.wait_settled(4), (1, 0, 3));

    assert_eq!(ids_of(&broker.drain(&broker.out).await), ["fine"]);
    broker.wait_count(&broker.dead(), 3).await;
    let dead = broker.drain(&broker.dead()).await;
    assert_eq!(
        bodies_of(&dead),
        [
            b"empty id".to_vec(),
            b"id too long".to_vec(),
            b"no id at all".to_vec()
        ]
    );
    let m = relay.metrics();
    assert_eq!(m["dedupd_dead_lettered_total{reason=\"no_id\"}"], 2.0);
    assert_eq!(m["dedupd_dead_lettered_total{reason=\"bad_id\"}"], 1.0);
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_id_source_dedupes_and_dead_letters_a_header_over_the_limit() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    let data = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(
        &broker,
        data.path(),
        &[("DEDUPD_ID_SOURCE", "header:x-dedup-id")],
    );
    relay.wait_healthy();

    let long = "H".repeat(300); // over the default 256, possible only in a header
    broker
        .publish(header_props("x-dedup-id", Some("h-1")), b"first h-1")
        .await;
    broker
        .publish(header_props("x-dedup-id", Some("h-1")), b"second h-1")
        .await;
    broker
        .publish(header_props("x-dedup-id", Some("h-2")), b"h-2")
        .await;
    broker
        .publish(header_props("x-dedup-id", Some(&long)), b"long header id")
        .await;
    broker
        .publish(header_props("x-other", Some("h-3")), b"no header")
        .await;
    assert_eq!(relay.wait_settled(5), (2, 1, 2));

    let out = broker.drain(&broker.out).await;
    assert_eq!(bodies_of(&out), [b"first h-1".to_vec(), b"h-2".to_vec()]);
    broker.wait_count(&broker.dead(), 2).await;
    let dead = broker.drain(&broker.dead()).await;
    assert_eq!(
        bodies_of(&dead),
        [b"long header id".to_vec(), b"no header".to_vec()]
    );
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_sha256_id_source_dedupes_by_content() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    let data = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&broker, data.path(), &[("DEDUPD_ID_SOURCE", "body-sha256")]);
    relay.wait_healthy();

    for body in ["alpha", "beta", "alpha", "gamma", "beta"] {
        broker
            .publish(BasicProperties::default(), body.as_bytes())
            .await;
    }
    assert_eq!(relay.wait_settled(5), (3, 2, 0));
    let out = broker.drain(&broker.out).await;
    assert_eq!(
        bodies_of(&out),
        [b"alpha".to_vec(), b"beta".to_vec(), b"gamma".to_vec()]
    );
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_destination_dead_letters_and_the_id_stays_new() {
    let broker = Broker::connect().await;
    let data = tempfile::tempdir().unwrap();
    // The relay declares the destination exchange; nothing is bound to it yet.
    let mut relay = Relay::start(&broker, data.path(), &[]);
    relay.wait_healthy();

    // Three copies back to back: the second and third wait for the first, which fails and
    // releases the id, so each of them is tried in turn, and each is returned.
    for _ in 0..3 {
        broker
            .publish(full_props("lost?", 1), b"nowhere to go")
            .await;
    }
    assert_eq!(relay.wait_settled(3), (0, 0, 3));
    broker.wait_count(&broker.dead(), 3).await;
    let dead = broker.drain(&broker.dead()).await;
    assert_eq!(bodies_of(&dead), vec![b"nowhere to go".to_vec(); 3]);
    assert_eq!(
        relay.metrics()["dedupd_dead_lettered_total{reason=\"returned\"}"],
        3.0
    );

    // The claim was released, not recorded: once routable, the same id goes through.
    broker.bind_out().await;
    broker
        .publish(full_props("lost?", 1), b"now routable")
        .await;
    assert_eq!(relay.wait_settled(4), (1, 0, 3));
    assert_eq!(
        bodies_of(&broker.drain(&broker.out).await),
        [b"now routable".to_vec()]
    );
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nacked_publish_is_dead_lettered() {
    let broker = Broker::connect().await;
    broker.declare_exchange(&broker.dest).await;
    // A destination queue that takes one message and nacks the rest.
    let mut args = FieldTable::new();
    args.insert("x-max-length".try_into().unwrap(), FieldValue::l(1));
    args.insert(
        "x-overflow".try_into().unwrap(),
        FieldValue::from("reject-publish"),
    );
    broker.declare_queue(&broker.out, args).await;
    broker
        .ch
        .queue_bind(QueueBindArguments::new(&broker.out, &broker.dest, ""))
        .await
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&broker, data.path(), &[]);
    relay.wait_healthy();

    broker.publish(id_props("n-1"), b"one").await;
    assert_eq!(relay.wait_settled(1), (1, 0, 0));
    broker.publish(id_props("n-2"), b"two").await;
    broker.publish(id_props("n-3"), b"three").await;
    assert_eq!(relay.wait_settled(3), (1, 0, 2));
    broker.wait_count(&broker.dead(), 2).await;
    assert_eq!(
        bodies_of(&broker.drain(&broker.dead()).await),
        [b"three".to_vec(), b"two".to_vec()]
    );
    assert_eq!(
        relay.metrics()["dedupd_dead_lettered_total{reason=\"nacked\"}"],
        2.0
    );
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_the_same_data_dir_remembers_ids() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    let data = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&broker, data.path(), &[]);
    relay.wait_healthy();
    for i in 0..10 {
        broker
            .publish(id_props(&format!("r-{i}")), b"first run")
            .await;
    }
    assert_eq!(relay.wait_settled(10), (10, 0, 0));
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");

    // Second run, same dir: the same ids are duplicates, a new one is not.
    let mut relay = Relay::start(&broker, data.path(), &[]);
    relay.wait_healthy();
    for i in 0..10 {
        broker
            .publish(id_props(&format!("r-{i}")), b"second run")
            .await;
    }
    broker.publish(id_props("r-new"), b"second run").await;
    assert_eq!(relay.wait_settled(11), (1, 10, 0));
    let out = broker.drain(&broker.out).await;
    assert_eq!(out.len(), 11);
    assert_eq!(
        out.iter().filter(|(_, b)| b == b"second run").count(),
        1,
        "only r-new passes the second time"
    );
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_ttl_lets_an_id_through_again_after_it() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    let data = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&broker, data.path(), &[("DEDUPD_TTL", "1s")]);
    relay.wait_healthy();

    broker.publish(id_props("ttl"), b"1").await;
    broker.publish(id_props("ttl"), b"2").await;
    assert_eq!(relay.wait_settled(2), (1, 1, 0));
    // The one sleep these tests allow: past the 1 s window, the id is new again.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    broker.publish(id_props("ttl"), b"3").await;
    assert_eq!(relay.wait_settled(3), (2, 1, 0));
    assert_eq!(
        bodies_of(&broker.drain(&broker.out).await),
        [b"1".to_vec(), b"3".to_vec()]
    );
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_exchange_gets_a_copy_and_missing_ids_can_be_forwarded() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    broker.declare_exchange(&broker.dups).await;
    broker.declare_queue(&broker.dups, FieldTable::new()).await;
    broker
        .ch
        .queue_bind(QueueBindArguments::new(&broker.dups, &broker.dups, ""))
        .await
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(
        &broker,
        data.path(),
        &[
            ("DEDUPD_DUPLICATES_EXCHANGE", &broker.dups),
            ("DEDUPD_MISSING_ID", "forward"),
        ],
    );
    relay.wait_healthy();

    broker.publish(id_props("d-1"), b"original").await;
    broker.publish(id_props("d-1"), b"copy").await;
    broker
        .publish(BasicProperties::default(), b"anonymous")
        .await;
    broker
        .publish(BasicProperties::default(), b"anonymous")
        .await;
    assert_eq!(relay.wait_settled(4), (3, 1, 0));
    assert_eq!(
        bodies_of(&broker.drain(&broker.out).await),
        [
            b"anonymous".to_vec(),
            b"anonymous".to_vec(),
            b"original".to_vec()
        ]
    );
    broker.wait_count(&broker.dups, 1).await;
    assert_eq!(
        bodies_of(&broker.drain(&broker.dups).await),
        [b"copy".to_vec()]
    );
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero_and_loses_nothing() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    // Fill the source before the relay starts.
    broker.declare_source().await;
    let n = 5000u64;
    for i in 0..n {
        broker
            .publish(id_props(&format!("s-{i}")), format!("body {i}").as_bytes())
            .await;
    }
    broker.wait_count(&broker.source, n as u32).await;

    let data = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&broker, data.path(), &[]);
    relay.wait_healthy();
    // Stop it in the middle of the stream.
    let deadline = Instant::now() + WAIT;
    while relay.wait_settled(1).0 < 300 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    let (status, log) = relay.terminate();
    assert!(status.success(), "exit {status}:\n{log}");
    assert!(log.contains("store closed"), "{log}");

    // What was forwarded is gone from the source; the rest is back in it; nothing twice.
    let first = broker.drain(&broker.out).await;
    let left = broker.count(&broker.source).await as u64;
    assert_eq!(first.len() as u64 + left, n, "forwarded + left in source");
    eprintln!(
        "sigterm: {} forwarded, {left} left in the source",
        first.len()
    );

    // A second run forwards the rest, and nothing of the first run again.
    let mut relay = Relay::start(&broker, data.path(), &[]);
    relay.wait_healthy();
    relay.wait_settled(left);
    let second = broker.drain(&broker.out).await;
    let mut all = ids_of(&first);
    all.extend(ids_of(&second));
    all.sort();
    let mut want: Vec<String> = (0..n).map(|i| format!("s-{i}")).collect();
    want.sort();
    assert_eq!(all, want, "every message exactly once over the two runs");
    assert_eq!(broker.count(&broker.dead()).await, 0);
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_instance_on_the_same_data_dir_exits_naming_it() {
    let broker = Broker::connect().await;
    let data = tempfile::tempdir().unwrap();
    let mut first = Relay::start(&broker, data.path(), &[]);
    first.wait_healthy();

    let mut second = Relay::start(&broker, data.path(), &[]);
    let status = second.wait_exit();
    let log = second.log();
    assert!(!status.success(), "{log}");
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.contains(&data.path().display().to_string()),
        "error line names the dir: {log}"
    );
    let (status, log) = first.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}

#[test]
fn bad_config_exits_2_naming_the_variable() {
    for (var, value) in [
        ("DEDUPD_TTL", "a while"),
        ("DEDUPD_PREFETCH", "0"),
        ("DEDUPD_ID_SOURCE", "uuid"),
        ("DEDUPD_TTLL", "24h"),
    ] {
        let out = dedupd().env(var, value).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}={value}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(var) && stderr.contains(value), "{stderr}");
    }
}

#[test]
fn help_prints_the_variable_table() {
    let out = dedupd().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&dedupd::config::markdown_table()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_topology_with_declare_off_fails_naming_it() {
    let broker = Broker::connect().await;
    let data = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&broker, data.path(), &[("DEDUPD_DECLARE", "false")]);
    let status = relay.wait_exit();
    let log = relay.log();
    assert_eq!(status.code(), Some(1), "{log}");
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.contains(&format!("{}.dlx", broker.source)) && last.contains("does not exist"),
        "{log}"
    );
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_without_broker_and_still_stops_cleanly() {
    let broker = Broker::connect().await;
    let data = tempfile::tempdir().unwrap();
    // Nothing listens on port 1: the relay keeps retrying and reports itself unhealthy.
    let relay = Relay::start(
        &broker,
        data.path(),
        &[("DEDUPD_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")],
    );
    let deadline = Instant::now() + WAIT;
    let code = loop {
        if let Some((code, _)) = relay.get("/healthz") {
            break code;
        }
        assert!(Instant::now() < deadline, "{}", relay.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(code, 503);
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    assert!(!log.contains("guest:guest"), "password logged: {log}");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_losing_its_consumer_and_resumes() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    let data = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&broker, data.path(), &[]);
    relay.wait_healthy();
    broker.publish(id_props("before"), b"before").await;
    assert_eq!(relay.wait_settled(1), (1, 0, 0));

    // Deleting the source queue cancels the consumer: the relay must reconnect and redeclare.
    broker
        .ch
        .queue_delete(QueueDeleteArguments::new(&broker.source))
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while relay
        .metrics()
        .get("dedupd_reconnects_total")
        .copied()
        .unwrap_or(0.0)
        < 1.0
    {
        assert!(Instant::now() < deadline, "{}", relay.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    relay.wait_healthy();
    broker.publish(id_props("before"), b"dup").await;
    broker.publish(id_props("after"), b"after").await;
    assert_eq!(relay.wait_settled(3), (2, 1, 0));
    assert_eq!(
        bodies_of(&broker.drain(&broker.out).await),
        [b"after".to_vec(), b"before".to_vec()]
    );
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_the_broker_drops_the_connection_and_loses_nothing() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    broker.declare_source().await;
    let n = 3000u64;
    for i in 0..n {
        broker
            .publish(id_props(&format!("c-{i}")), format!("body {i}").as_bytes())
            .await;
    }
    broker.wait_count(&broker.source, n as u32).await;
    let data = tempfile::tempdir().unwrap();
    // A small prefetch slows the relay down, so the connection drops mid-stream.
    let mut relay = Relay::start(&broker, data.path(), &[("DEDUPD_PREFETCH", "4")]);
    relay.wait_healthy();

    // Find the relay's connection on the broker, then close it once the stream is under way.
    let marker = format!("dedupd {} ->", broker.source);
    let listed = Command::new("rabbitmqctl")
        .args(["list_connections", "pid", "client_properties", "-q"])
        .output()
        .expect("rabbitmqctl must be on PATH for this test");
    let listed = String::from_utf8_lossy(&listed.stdout);
    let pid = listed
        .lines()
        .find(|l| l.contains(&marker))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no connection named {marker:?} in:\n{listed}"));
    let deadline = Instant::now() + WAIT;
    while relay.wait_settled(1).0 < 300 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    let closed = Command::new("rabbitmqctl")
        .args(["close_connection", pid, "dedupd test: connection loss"])
        .output()
        .unwrap();
    assert!(closed.status.success(), "{closed:?}");
    let at_close = relay.wait_settled(1).0;

    // It reconnects, and every message reaches the destination. A message whose publish was
    // under way when the connection dropped may pass twice (the documented window); none is lost.
    let deadline = Instant::now() + WAIT;
    let mut seen: HashMap<String, u32> = HashMap::new();
    while seen.len() < n as usize {
        for id in ids_of(&broker.drain(&broker.out).await) {
            *seen.entry(id).or_default() += 1;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} ids arrived:\n{}",
            seen.len(),
            relay.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = relay.metrics();
    assert!(m["dedupd_reconnects_total"] >= 1.0, "{}", relay.log());
    let repeats: u32 = seen.values().map(|c| c - 1).sum();
    assert!(
        repeats <= 1000,
        "at most a prefetch's worth can repeat, got {repeats}"
    );
    eprintln!("connection loss after {at_close} of {n} forwarded: {repeats} passed twice");
    assert_eq!(broker.count(&broker.dead()).await, 0);
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_run_relays_until_its_shutdown_future_resolves() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    broker.declare_source().await;
    let data = tempfile::tempdir().unwrap();
    let config = dedupd::Config::from_vars([
        ("DEDUPD_SOURCE_QUEUE", broker.source.as_str()),
        ("DEDUPD_DEST_EXCHANGE", broker.dest.as_str()),
        ("DEDUPD_DATA_DIR", data.path().to_str().unwrap()),
        ("DEDUPD_METRICS_ADDR", "off"),
        ("DEDUPD_EXPECTED_IDS", "10000"),
    ])
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(dedupd::run(config, async move {
        let _ = stopped.await;
    }));

    broker.publish(id_props("lib-a"), b"a").await;
    broker.publish(id_props("lib-a"), b"a again").await;
    broker.publish(id_props("lib-b"), b"b").await;
    broker.wait_count(&broker.out, 2).await;
    broker.wait_count(&broker.source, 0).await;
    stop.send(()).unwrap();
    tokio::time::timeout(WAIT, relay)
        .await
        .expect("run returns after its shutdown future")
        .unwrap()
        .expect("run ends Ok");
    assert_eq!(
        bodies_of(&broker.drain(&broker.out).await),
        [b"a".to_vec(), b"b".to_vec()]
    );

    // The store was closed: the data dir opens again and knows both ids.
    let dir = data.path().to_path_buf();
    let live = tokio::task::spawn_blocking(move || {
        let store = dedupd::Store::open(dedupd::StoreConfig::new(dir)).unwrap();
        let live = store.stats().live_ids;
        store.close().unwrap();
        live
    })
    .await
    .unwrap();
    assert_eq!(live, 2);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_nothing_and_measures_the_repeat_window() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    broker.declare_source().await;
    let n = 5000u64;
    for i in 0..n {
        broker
            .publish(id_props(&format!("k-{i}")), format!("body {i}").as_bytes())
            .await;
    }
    broker.wait_count(&broker.source, n as u32).await;
    let data = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&broker, data.path(), &[]);
    relay.wait_healthy();
    let deadline = Instant::now() + WAIT;
    while relay.wait_settled(1).0 < 500 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(2));
    }
    // SIGKILL: no drain, no ack, no flush beyond what was already durable.
    relay.child.kill().unwrap();
    relay.child.wait().unwrap();
    let before: Vec<String> = ids_of(&broker.drain(&broker.out).await);

    // The restarted relay sees the same data dir; the broker redelivers what was unacked.
    let mut relay = Relay::start(&broker, data.path(), &[]);
    relay.wait_healthy();
    let deadline = Instant::now() + WAIT;
    let mut seen: HashMap<String, u32> = HashMap::new();
    for id in &before {
        *seen.entry(id.clone()).or_default() += 1;
    }
    while seen.len() < n as usize {
        for id in ids_of(&broker.drain(&broker.out).await) {
            *seen.entry(id).or_default() += 1;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} ids arrived:\n{}",
            seen.len(),
            relay.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing lost; repeats only from the window between confirm and source ack.
    let repeats: u32 = seen.values().map(|c| c - 1).sum();
    assert!(
        repeats <= 1000,
        "at most a prefetch's worth can repeat, got {repeats}"
    );
    eprintln!(
        "kill -9 after {} of {n} forwarded: {repeats} passed twice",
        before.len()
    );
    assert_eq!(broker.count(&broker.dead()).await, 0);
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}
