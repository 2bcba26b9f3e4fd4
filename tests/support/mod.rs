//! The one harness of the black-box tests and the end-to-end benches (every suite under `tests/`
//! includes it with `mod support;`, every bench with `#[path = "../tests/support/mod.rs"]`): the
//! broker connection, the test's broker side (randomly named scratch objects, publish, drain,
//! cleanup, deleted on drop if a test fails half-way), a running `dedupd` process (metrics,
//! health, signals), [`eventually`] for every wait, and beside them [`cluster`] (extra broker
//! nodes), [`faults`] (what the fault tests add) and [`raw`] (AMQP bytes amqprs will not send).
#![allow(dead_code)] // each test binary uses part of it

pub mod cluster;
pub mod faults;
pub mod ids;
pub mod raw;

use std::collections::HashMap;
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use amqprs::channel::{
    BasicAckArguments, BasicCancelArguments, BasicConsumeArguments, BasicPublishArguments, Channel,
    ConfirmSelectArguments, ExchangeDeclareArguments, ExchangeDeleteArguments, QueueBindArguments,
    QueueDeclareArguments, QueueDeleteArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{BasicProperties, FieldTable, FieldValue};

/// Longest any single wait in these tests may take.
pub const WAIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Waiting for a condition.

/// What a condition polled by [`eventually`] answers: `true` / `Some(value)` once it holds.
pub trait Holds {
    /// What [`eventually`] returns once the condition holds.
    type Value;
    /// `Some` once the condition holds.
    fn holds(self) -> Option<Self::Value>;
}

impl Holds for bool {
    type Value = ();
    fn holds(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Holds for Option<T> {
    type Value = T;
    fn holds(self) -> Option<T> {
        self
    }
}

/// The deadline and pacing of one wait, for the loops whose condition needs `&mut` state (which
/// a closure given to [`eventually_async`] cannot lend to its future): poll, and call
/// [`Waiting::again`] when the condition does not hold yet.
pub struct Waiting {
    within: Duration,
    deadline: Instant,
    pause: Duration,
    /// The longest pause between polls.
    most: Duration,
}

impl Waiting {
    /// A wait of at most `within` from now.
    pub fn new(within: Duration) -> Waiting {
        Waiting {
            within,
            deadline: Instant::now() + within,
            pause: Duration::from_millis(1),
            most: Duration::from_millis(50),
        }
    }

    /// A wait of at most `within` that polls every `pause`: for the benches' timings, where the
    /// pause bounds the error of the time measured.
    pub fn every(within: Duration, pause: Duration) -> Waiting {
        Waiting {
            pause,
            most: pause,
            ..Waiting::new(within)
        }
    }

    /// How long this wait has taken so far.
    pub fn elapsed(&self) -> Duration {
        self.within
            .saturating_sub(self.deadline.saturating_duration_since(Instant::now()))
    }

    /// The pause before the next poll: 1 ms, doubling up to 50 ms (or the fixed pause of
    /// [`Waiting::every`]), so a condition that holds
    /// soon is seen soon and a slow one is not polled in a busy loop. Panics with `what()`
    /// (evaluated only then, so it can show the last state or a log) once the time is up.
    fn next(&mut self, what: impl FnOnce() -> String) -> Duration {
        if Instant::now() >= self.deadline {
            panic!("not within {:?}: {}", self.within, what());
        }
        let pause = self.pause;
        self.pause = (self.pause * 2).min(self.most);
        pause
    }

    /// Pauses before the next poll (see [`Waiting::next`]), or panics once the time is up.
    pub async fn again(&mut self, what: impl FnOnce() -> String) {
        tokio::time::sleep(self.next(what)).await;
    }

    /// [`Waiting::again`], blocking the thread.
    pub fn again_blocking(&mut self, what: impl FnOnce() -> String) {
        std::thread::sleep(self.next(what));
    }
}

/// Polls `condition` until it holds and returns its value; panics with `what()` (evaluated only
/// then, so it can show the last state or a log) once `within` has passed.
pub fn eventually<H: Holds>(
    within: Duration,
    what: impl FnOnce() -> String,
    mut condition: impl FnMut() -> H,
) -> H::Value {
    let mut waiting = Waiting::new(within);
    let mut what = Some(what);
    loop {
        if let Some(value) = condition().holds() {
            return value;
        }
        waiting.again_blocking(|| what.take().map(|w| w()).unwrap_or_default());
    }
}

/// [`eventually`] for a condition that awaits (a broker round trip, say).
pub async fn eventually_async<H: Holds, F: std::future::Future<Output = H>>(
    within: Duration,
    what: impl FnOnce() -> String,
    mut condition: impl FnMut() -> F,
) -> H::Value {
    let mut waiting = Waiting::new(within);
    let mut what = Some(what);
    loop {
        if let Some(value) = condition().await.holds() {
            return value;
        }
        waiting
            .again(|| what.take().map(|w| w()).unwrap_or_default())
            .await;
    }
}

// ---------------------------------------------------------------------------------------------
// The broker.

/// A connection to the local broker, or a panic that says the tests and benches need it.
pub async fn connect() -> Connection {
    let args = OpenConnectionArguments::new("127.0.0.1", 5672, "guest", "guest");
    tokio::time::timeout(Duration::from_secs(10), Connection::open(&args))
        .await
        .expect("RabbitMQ on 127.0.0.1:5672 did not answer within 10 s")
        .expect("cannot connect to RabbitMQ on 127.0.0.1:5672 (guest/guest)")
}

/// Ready messages in `queue`.
pub async fn ready(ch: &Channel, queue: &str) -> usize {
    let (_, n, _) = ch
        .queue_declare(QueueDeclareArguments::new(queue).passive(true).finish())
        .await
        .unwrap_or_else(|e| panic!("passive declare of {queue}: {e}"))
        .expect("declare-ok");
    n as usize
}

/// Publishes one persistent message of `body_len` bytes per id into `queue` with publisher
/// confirms, and waits until the queue holds them all.
pub async fn fill(ch: &Channel, queue: &str, ids: &[String], body_len: usize) {
    ch.confirm_select(ConfirmSelectArguments::new(false))
        .await
        .unwrap();
    let body = vec![b'x'; body_len];
    for id in ids {
        let props = BasicProperties::default()
            .with_message_id(id)
            .with_persistence(true)
            .finish();
        ch.basic_publish(props, body.clone(), BasicPublishArguments::new("", queue))
            .await
            .unwrap();
    }
    eventually_async(
        WAIT * 10,
        || format!("{queue} never held the {} messages", ids.len()),
        || async { ready(ch, queue).await >= ids.len() },
    )
    .await
}

/// Declares the destination exchange as dedupd does (fanout, durable) and binds `out` to it.
pub async fn bind_out(ch: &Channel, dest: &str, out: &str) {
    ch.exchange_declare(
        ExchangeDeclareArguments::new(dest, "fanout")
            .durable(true)
            .finish(),
    )
    .await
    .unwrap();
    ch.queue_declare(QueueDeclareArguments::new(out).durable(true).finish())
        .await
        .unwrap();
    ch.queue_bind(QueueBindArguments::new(out, dest, ""))
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// CPU time, from /proc (the end-to-end benches).

/// The broker's Erlang VM.
pub fn broker_pid() -> u32 {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "beam.smp")
        })
        .expect("no beam.smp process: is RabbitMQ running here?")
}

/// User + system CPU seconds of `pid` so far, from /proc/<pid>/stat.
pub fn cpu_seconds(pid: u32) -> f64 {
    stat_cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// User + system CPU seconds of the calling thread so far.
pub fn thread_cpu_seconds() -> f64 {
    stat_cpu_seconds("/proc/thread-self/stat")
}

/// User + system CPU seconds from a /proc `stat` file.
fn stat_cpu_seconds(path: &str) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap();
    // Fields after the command name (which may hold spaces) start at state, field 3.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / clock_ticks()
}

fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        let out = Command::new("getconf").arg("CLK_TCK").output();
        out.ok()
            .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

// ---------------------------------------------------------------------------------------------
// The broker side of a test.

/// A test's connection to the broker and its randomly named topology.
pub struct Broker {
    pub conn: Connection,
    pub ch: Channel,
    pub source: String,
    pub dest: String,
    /// Queue the test binds to the destination exchange to see what was forwarded.
    pub out: String,
    /// Exchange and queue for copies of duplicates, when a test wants them.
    pub dups: String,
    /// Set once [`Broker::cleanup`] ran; otherwise dropping deletes the objects (a failed test).
    cleaned: bool,
}

impl Broker {
    pub async fn connect() -> Broker {
        Broker::connect_at(5672).await
    }

    /// As [`Broker::connect`], to the broker (a cluster node) on `port`.
    pub async fn connect_at(port: u16) -> Broker {
        let args = OpenConnectionArguments::new("127.0.0.1", port, "guest", "guest");
        let conn = tokio::time::timeout(Duration::from_secs(10), Connection::open(&args))
            .await
            .unwrap_or_else(|_| {
                panic!("RabbitMQ on 127.0.0.1:{port} did not answer within 10 s: the tests need it")
            })
            .unwrap_or_else(|e| {
                panic!("cannot connect to RabbitMQ on 127.0.0.1:{port} (guest/guest): {e}")
            });
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
            cleaned: false,
        }
    }

    pub fn dead(&self) -> String {
        format!("{}.dead", self.source)
    }

    /// Declares the destination exchange as the relay does, with a queue bound to it.
    pub async fn bind_out(&self) {
        self.declare_exchange(&self.dest).await;
        self.declare_queue(&self.out, FieldTable::new()).await;
        self.ch
            .queue_bind(QueueBindArguments::new(&self.out, &self.dest, ""))
            .await
            .unwrap();
    }

    pub async fn declare_exchange(&self, name: &str) {
        self.ch
            .exchange_declare(
                ExchangeDeclareArguments::new(name, "fanout")
                    .durable(true)
                    .finish(),
            )
            .await
            .unwrap();
    }

    pub async fn declare_queue(&self, name: &str, args: FieldTable) {
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
    pub async fn declare_source(&self) {
        let mut args = FieldTable::new();
        args.insert(
            "x-dead-letter-exchange".try_into().unwrap(),
            FieldValue::from(format!("{}.dlx", self.source)),
        );
        self.declare_queue(&self.source, args).await;
    }

    /// Declares the source as dedupd does and queues `n` persistent messages with ids
    /// `<prefix>-<i>` and bodies `body <i>`, so a relay started afterwards finds a stream waiting.
    pub async fn fill_source(&self, prefix: &str, n: u64) {
        self.declare_source().await;
        for i in 0..n {
            self.publish(
                id_props(&format!("{prefix}-{i}")),
                format!("body {i}").as_bytes(),
            )
            .await;
        }
        self.wait_count(&self.source, n as u32).await;
    }

    /// Publishes to the source queue through the default exchange.
    pub async fn publish(&self, props: BasicProperties, body: &[u8]) {
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
    ///
    /// Through a consumer on a channel of its own, not `basic.get`: amqprs 2.1.5 can panic in its
    /// dispatcher ("get responder must be registered") when a `get-ok` overtakes the
    /// registration of its responder, which a tight `basic.get` loop on a busy machine hits.
    /// Deliveries past the count taken at the start are left unacked and requeued on close.
    pub async fn drain(&self, queue: &str) -> Vec<(BasicProperties, Vec<u8>)> {
        let n = self.count(queue).await as usize;
        if n == 0 {
            return Vec::new();
        }
        let ch = self
            .conn
            .open_channel(None)
            .await
            .expect("open a drain channel");
        let (tag, mut rx) = ch
            .basic_consume_rx(
                BasicConsumeArguments::new(queue, "")
                    .manual_ack(true)
                    .finish(),
            )
            .await
            .unwrap_or_else(|e| panic!("consume {queue}: {e}"));
        let mut out = Vec::with_capacity(n);
        let mut last = 0;
        while out.len() < n {
            let msg = tokio::time::timeout(WAIT, rx.recv())
                .await
                .unwrap_or_else(|_| panic!("{queue}: {} of {n} messages in {WAIT:?}", out.len()))
                .unwrap_or_else(|| panic!("{queue}: the consumer was closed"));
            let (Some(deliver), Some(props), Some(body)) =
                (msg.deliver, msg.basic_properties, msg.content)
            else {
                panic!("{queue}: incomplete delivery");
            };
            last = deliver.delivery_tag();
            out.push((props, body));
        }
        ch.basic_ack(BasicAckArguments::new(last, true))
            .await
            .unwrap_or_else(|e| panic!("ack the drain of {queue}: {e}"));
        let _ = ch.basic_cancel(BasicCancelArguments::new(&tag)).await;
        let _ = ch.close().await;
        out
    }

    /// Ready messages in `queue`.
    pub async fn count(&self, queue: &str) -> u32 {
        let (_, n, _) = self
            .ch
            .queue_declare(QueueDeclareArguments::new(queue).passive(true).finish())
            .await
            .unwrap_or_else(|e| panic!("passive declare of {queue}: {e}"))
            .expect("declare-ok");
        n
    }

    /// Waits until `queue` holds `n` ready messages.
    pub async fn wait_count(&self, queue: &str, n: u32) {
        eventually_async(
            WAIT,
            || format!("{queue} never held {n}"),
            || async { self.count(queue).await == n },
        )
        .await
    }

    /// The queues and exchanges this test may have declared, dedupd's for it included
    /// (`<source>.ids`: the id stream of DEDUPD_HA=on).
    fn objects(&self) -> ([String; 5], [String; 3]) {
        (
            [
                self.source.clone(),
                self.dead(),
                self.out.clone(),
                self.dups.clone(),
                format!("{}.ids", self.source),
            ],
            [
                format!("{}.dlx", self.source),
                self.dest.clone(),
                self.dups.clone(),
            ],
        )
    }

    /// Drains the destination queue into `seen` (id -> copies) until it holds `want` distinct
    /// ids; on timeout the panic shows the logs of `relays`.
    pub async fn collect(&self, seen: &mut HashMap<String, u32>, want: usize, relays: &[&Relay]) {
        let mut waiting = Waiting::new(WAIT);
        loop {
            for id in ids_of(&self.drain(&self.out).await) {
                *seen.entry(id).or_default() += 1;
            }
            if seen.len() >= want {
                return;
            }
            let arrived = seen.len();
            waiting
                .again(|| {
                    let logs: Vec<String> = relays.iter().map(|r| r.log()).collect();
                    format!(
                        "{arrived} of {want} ids arrived:\n{}",
                        logs.join("\n----\n")
                    )
                })
                .await;
        }
    }

    /// Deletes a shard ring's exchange and, for every shard, its queue, the queues named by
    /// `suffixes` beside it (`.dead`, and `.ids` with HA) and its dead-letter exchange.
    pub async fn delete_ring(&self, ring: &dedupd::shard::Ring, suffixes: &[&str]) {
        for q in ring.queues() {
            let beside = suffixes.iter().map(|s| format!("{q}{s}"));
            for name in std::iter::once(q.clone()).chain(beside) {
                let _ = self.ch.queue_delete(QueueDeleteArguments::new(&name)).await;
            }
            let _ = self
                .ch
                .exchange_delete(ExchangeDeleteArguments::new(&format!("{q}.dlx")))
                .await;
        }
        let _ = self
            .ch
            .exchange_delete(ExchangeDeleteArguments::new(&ring.exchange))
            .await;
    }

    /// Deletes everything this test may have declared.
    pub async fn cleanup(mut self) {
        self.cleaned = true;
        let (queues, exchanges) = self.objects();
        for q in &queues {
            let _ = self.ch.queue_delete(QueueDeleteArguments::new(q)).await;
        }
        for x in &exchanges {
            let _ = self
                .ch
                .exchange_delete(ExchangeDeleteArguments::new(x))
                .await;
        }
        // Closed explicitly: a channel left to its drop guard is closed from a spawned task that
        // the test's runtime may cancel half-way, which makes amqprs panic in its dispatcher.
        let _ = self.ch.clone().close().await;
        let _ = self.conn.clone().close().await;
    }
}

impl Drop for Broker {
    /// A test that failed half-way leaves its objects behind unless they go here; synchronous,
    /// over a raw connection (the async one may belong to a runtime that is going away).
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let (queues, exchanges) = self.objects();
        let _ = std::panic::catch_unwind(|| raw::raw_delete(&queues, &exchanges));
    }
}

/// Properties with every field set, distinct per `i`, for byte-for-byte comparison.
pub fn full_props(id: &str, i: u64) -> BasicProperties {
    let mut headers = FieldTable::new();
    headers.insert(
        "x-text".try_into().unwrap(),
        FieldValue::from(format!("t{i}")),
    );
    headers.insert("x-num".try_into().unwrap(), FieldValue::l(i as i64));
    headers.insert(
        "x-flag".try_into().unwrap(),
        FieldValue::t(i.is_multiple_of(2)),
    );
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

pub fn id_props(id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_message_id(id)
        .with_persistence(true)
        .finish()
}

pub fn header_props(name: &str, value: Option<&str>) -> BasicProperties {
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
pub fn assert_same_props(got: &BasicProperties, want: &BasicProperties) {
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

pub fn ids_of(messages: &[(BasicProperties, Vec<u8>)]) -> Vec<String> {
    let mut ids: Vec<String> = messages
        .iter()
        .map(|(p, _)| p.message_id().cloned().unwrap_or_default())
        .collect();
    ids.sort();
    ids
}

pub fn bodies_of(messages: &[(BasicProperties, Vec<u8>)]) -> Vec<Vec<u8>> {
    let mut bodies: Vec<Vec<u8>> = messages.iter().map(|(_, b)| b.clone()).collect();
    bodies.sort();
    bodies
}

// ---------------------------------------------------------------------------------------------
// The relay process.

/// A running `dedupd` with its log file and metrics port.
pub struct Relay {
    pub child: Child,
    pub port: Option<u16>,
    pub log: PathBuf,
}

/// A relay's log so far (empty if it has none yet).
pub fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// `method path` on the HTTP endpoint at 127.0.0.1:`port`, with `token` as a bearer token:
/// status and body, `None` if nothing answers. The tests' one HTTP client.
pub fn http(port: u16, method: &str, path: &str, token: Option<&str>) -> Option<(u16, String)> {
    static AGENT: OnceLock<ureq::Agent> = OnceLock::new();
    let agent = AGENT.get_or_init(|| {
        ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(30)))
            // A status is an answer here, not an error.
            .http_status_as_error(false)
            // A fresh connection per request: tests restart dedupd on the same port, and a
            // pooled connection to the process before would answer with an error.
            .max_idle_connections(0)
            .build()
            .into()
    });
    let mut request = ureq::http::Request::builder()
        .method(method)
        .uri(format!("http://127.0.0.1:{port}{path}"));
    if let Some(token) = token {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    let mut response = agent.run(request.body(ureq::SendBody::none()).ok()?).ok()?;
    let body = response.body_mut().read_to_string().ok()?;
    Some((response.status().as_u16(), body))
}

/// `n` ids in publish order, the same every run: every fifth repeats an earlier one (the
/// benches' workload; the fault tests' [`faults::workload`] draws its repeats at random).
pub fn repeating_ids(prefix: &str, n: usize) -> Vec<String> {
    let mut ids: Vec<String> = Vec::with_capacity(n);
    for i in 0..n {
        if i % 5 == 4 {
            let back = 1 + (i * 7919) % i;
            ids.push(ids[i - back].clone());
        } else {
            ids.push(format!("{prefix}-{i}"));
        }
    }
    ids
}

/// A free TCP port on loopback for a server a test starts: picked at random outside the
/// kernel's range for ephemeral ports, then checked by binding it. A port the kernel handed out
/// (`bind` to port 0) could be taken again, before the server binds it, as the local port of
/// any outgoing connection (the tests' own to RabbitMQ and Redis are many): CI saw dedupd fail
/// to listen that way.
pub fn free_port() -> u16 {
    let (lo, hi) = ephemeral_ports();
    // Below the range when there is room (on Linux' default of 32768-60999, 20000-32767),
    // above it otherwise.
    let (from, to) = if lo > 21_024 {
        (20_000, lo - 1)
    } else {
        (hi.saturating_add(1).min(65_000), 65_535)
    };
    (0..1000)
        .map(|_| rand::random_range(from..=to))
        .find(|&port| TcpListener::bind(("127.0.0.1", port)).is_ok())
        .unwrap_or_else(|| panic!("no free port in {from}-{to} after 1000 tries"))
}

/// The kernel's range for ephemeral ports (Linux' default when it cannot be read).
fn ephemeral_ports() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|n| n.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32_768, 60_999))
}

/// The `dedupd` command with no `DEDUPD_*` inherited from the test's environment.
pub fn dedupd() -> Command {
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
    pub fn start(broker: &Broker, data: &Path, env: &[(&str, &str)]) -> Relay {
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

    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    /// `GET path` on the metrics port: status code and body, `None` if nothing listens.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http(self.port?, "GET", path, None)
    }

    /// Moves the relay's clock `by` forward (`POST /clock`, which debug builds serve): a dedup
    /// window passes without waiting it out.
    pub fn advance_clock(&self, by: Duration) {
        let path = format!("/clock?advance_ms={}", by.as_millis());
        let answer = http(self.port.expect("an HTTP port"), "POST", &path, None);
        assert!(
            matches!(answer, Some((200, _))),
            "POST {path}: {answer:?}; log:\n{}",
            self.log()
        );
    }

    /// Whether the relay's store holds `id` as seen now (`GET /ids/{id}`; ids of plain
    /// characters only, as the tests use).
    pub fn holds(&self, id: &str) -> bool {
        match self.get(&format!("/ids/{id}")) {
            Some((200, _)) => true,
            Some((404, _)) => false,
            other => panic!("GET /ids/{id}: {other:?}"),
        }
    }

    /// Waits for `/healthz` to answer 200 (connected and consuming).
    pub fn wait_healthy(&mut self) {
        let log = self.log.clone();
        eventually(
            WAIT,
            || format!("dedupd never healthy:\n{}", read_log(&log)),
            || {
                if let Ok(Some(status)) = self.child.try_wait() {
                    panic!(
                        "dedupd exited with {status} before being healthy:\n{}",
                        self.log()
                    );
                }
                matches!(self.get("/healthz"), Some((200, _)))
            },
        )
    }

    /// The `dedupd_*` samples of `/metrics`, by full name with labels.
    pub fn metrics(&self) -> HashMap<String, f64> {
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

    pub fn outcome(m: &HashMap<String, f64>, outcome: &str) -> u64 {
        m.get(&format!("dedupd_messages_total{{outcome=\"{outcome}\"}}"))
            .copied()
            .unwrap_or(0.0) as u64
    }

    /// (forwarded, duplicate, dead-lettered) so far.
    pub fn settled(&self) -> (u64, u64, u64) {
        let m = self.metrics();
        (
            Self::outcome(&m, "forwarded"),
            Self::outcome(&m, "duplicate"),
            Self::outcome(&m, "dead_lettered"),
        )
    }

    /// Waits until `n` source messages are settled; returns (forwarded, duplicate, dead).
    pub fn wait_settled(&self, n: u64) -> (u64, u64, u64) {
        eventually(
            WAIT,
            || format!("{:?} of {n} settled:\n{}", self.settled(), self.log()),
            || {
                let counts = self.settled();
                (counts.0 + counts.1 + counts.2 >= n).then_some(counts)
            },
        )
    }

    /// Waits until at least `n` messages were forwarded: a point in the middle of a stream.
    pub fn wait_forwarded(&self, n: u64) {
        eventually(
            WAIT,
            || format!("fewer than {n} forwarded:\n{}", self.log()),
            || self.settled().0 >= n,
        )
    }

    /// Messages forwarded so far.
    pub fn forwarded(&self) -> u64 {
        Self::outcome(&self.metrics(), "forwarded")
    }

    /// Waits until more than `than` messages were forwarded; returns how long that took.
    pub fn wait_forwarding(&self, than: u64) -> Duration {
        let started = Instant::now();
        eventually(
            WAIT,
            || format!("never forwarded more than {than}:\n{}", self.log()),
            || self.forwarded() > than,
        );
        started.elapsed()
    }

    /// The sample `name` (with labels) of `/metrics`, if there is one.
    pub fn gauge(&self, name: &str) -> Option<f64> {
        self.metrics().get(name).copied()
    }

    /// Waits until `/healthz` answers 200 naming `role` (`DEDUPD_HA=on`: active or standby).
    pub fn wait_role(&mut self, role: &str) {
        let log = self.log.clone();
        let last = std::cell::RefCell::new(None);
        eventually(
            WAIT,
            || format!("never {role}: {:?}\n{}", last.borrow(), read_log(&log)),
            || {
                if let Ok(Some(status)) = self.child.try_wait() {
                    panic!("dedupd exited with {status}:\n{}", self.log());
                }
                let got = self.get("/healthz");
                let holds = matches!(&got, Some((200, body)) if body.contains(role));
                *last.borrow_mut() = got;
                holds
            },
        )
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(mut self) -> (ExitStatus, String) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success());
        let status = self.wait_exit();
        (status, self.log())
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let log = self.log.clone();
        eventually(
            WAIT,
            || format!("dedupd did not exit:\n{}", read_log(&log)),
            || self.child.try_wait().unwrap(),
        )
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
