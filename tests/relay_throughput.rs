//! Relay throughput against the local broker, next to a passthrough baseline on the same queues.
//!
//! Both drain the same number of persistent 256-byte messages, queued before they start: the
//! baseline is a plain amqprs relay (consume with manual acks, publish with confirms, ack with
//! `multiple` on each confirm, no dedup, no store), `dedupd` is the real binary. By default this is
//! a quick check (5 000 messages, the debug binary) that also asserts every message arrives once.
//! For the README's figures:
//!
//! ```sh
//! cargo build --release
//! RELAY_THROUGHPUT_N=50000 RELAY_BIN=target/release/dedupd \
//!     cargo test --release --test relay_throughput -- --nocapture
//! ```

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use amqprs::callbacks::ChannelCallback;
use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicPublishArguments, BasicQosArguments, Channel,
    ConfirmSelectArguments, ExchangeDeclareArguments, ExchangeDeleteArguments, QueueBindArguments,
    QueueDeclareArguments, QueueDeleteArguments, QueuePurgeArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, FieldTable, FieldValue, Nack, Return};
use tokio::sync::mpsc;

/// Longest a drain may take.
const WAIT: Duration = Duration::from_secs(300);
/// Message body size, as in CALIBRATION.md.
const BODY: usize = 256;

async fn connect() -> Connection {
    let args = OpenConnectionArguments::new("127.0.0.1", 5672, "guest", "guest");
    tokio::time::timeout(Duration::from_secs(10), Connection::open(&args))
        .await
        .expect("RabbitMQ on 127.0.0.1:5672 did not answer within 10 s")
        .expect("cannot connect to RabbitMQ on 127.0.0.1:5672 (guest/guest)")
}

async fn ready(ch: &Channel, queue: &str) -> u64 {
    let (_, n, _) = ch
        .queue_declare(QueueDeclareArguments::new(queue).passive(true).finish())
        .await
        .unwrap()
        .unwrap();
    u64::from(n)
}

/// Queues `n` persistent messages with distinct ids in `source`.
async fn fill(ch: &Channel, source: &str, n: u64) {
    let body = vec![b'x'; BODY];
    for i in 0..n {
        let props = BasicProperties::default()
            .with_message_id(&format!("t-{i}"))
            .with_persistence(true)
            .finish();
        ch.basic_publish(props, body.clone(), BasicPublishArguments::new("", source))
            .await
            .unwrap();
    }
    let deadline = Instant::now() + WAIT;
    while ready(ch, source).await < n {
        assert!(Instant::now() < deadline, "{source} never filled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `out` holds `n` messages and `source` none; returns the time taken from `start`.
async fn drained(ch: &Channel, source: &str, out: &str, n: u64, start: Instant) -> Duration {
    let deadline = Instant::now() + WAIT;
    loop {
        if ready(ch, out).await >= n && ready(ch, source).await == 0 {
            return start.elapsed();
        }
        assert!(Instant::now() < deadline, "drain did not finish");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

struct Confirms(mpsc::UnboundedSender<(u64, bool)>);

#[async_trait::async_trait]
impl ChannelCallback for Confirms {
    async fn close(&mut self, _: &Channel, _: CloseChannel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn cancel(&mut self, _: &Channel, _: Cancel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn flow(&mut self, _: &Channel, active: bool) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }
    async fn publish_ack(&mut self, _: &Channel, ack: Ack) {
        let _ = self.0.send((ack.delivery_tag(), ack.mutiple()));
    }
    async fn publish_nack(&mut self, _: &Channel, _: Nack) {
        panic!("baseline publish nacked");
    }
    async fn publish_return(&mut self, _: &Channel, _: Return, _: BasicProperties, _: Vec<u8>) {
        panic!("baseline publish returned");
    }
}

/// The baseline: forwards `n` messages from `source` to `dest` on a current-thread runtime of
/// its own, acking each confirmed range with `multiple`.
fn passthrough(source: String, dest: String, n: u64) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let conn = connect().await;
            let publish = conn.open_channel(None).await.unwrap();
            let (tx, mut confirms) = mpsc::unbounded_channel();
            publish.register_callback(Confirms(tx)).await.unwrap();
            publish
                .confirm_select(ConfirmSelectArguments::new(false))
                .await
                .unwrap();
            let consume = conn.open_channel(None).await.unwrap();
            consume
                .basic_qos(BasicQosArguments::new(0, 1000, false))
                .await
                .unwrap();
            let (_, mut deliveries) = consume
                .basic_consume_rx(
                    BasicConsumeArguments::new(&source, "")
                        .manual_ack(true)
                        .finish(),
                )
                .await
                .unwrap();
            // Publish number -> delivery tag; both grow together, so ranges map to ranges.
            let mut tags = BTreeMap::new();
            let (mut seq, mut acked) = (0u64, 0u64);
            while acked < n {
                tokio::select! {
                    Some(m) = deliveries.recv() => {
                        seq += 1;
                        tags.insert(seq, m.deliver.unwrap().delivery_tag());
                        publish
                            .basic_publish(
                                m.basic_properties.unwrap(),
                                m.content.unwrap(),
                                BasicPublishArguments::new(&dest, ""),
                            )
                            .await
                            .unwrap();
                    }
                    Some((confirmed, multiple)) = confirms.recv() => {
                        let tag = tags[&confirmed];
                        if multiple {
                            let rest = tags.split_off(&(confirmed + 1));
                            acked += tags.len() as u64;
                            tags = rest;
                        } else {
                            tags.remove(&confirmed);
                            acked += 1;
                        }
                        consume.basic_ack(BasicAckArguments::new(tag, multiple)).await.unwrap();
                    }
                }
            }
            let _ = consume.close().await;
            let _ = publish.close().await;
            let _ = conn.close().await;
        });
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedupd_throughput_next_to_a_passthrough_baseline() {
    let n: u64 = std::env::var("RELAY_THROUGHPUT_N")
        .map(|v| v.parse().expect("RELAY_THROUGHPUT_N is a number"))
        .unwrap_or(5000);
    let bin = std::env::var("RELAY_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_dedupd").into());

    let conn = connect().await;
    let ch = conn.open_channel(None).await.unwrap();
    let base = format!("dedupd-throughput-{:016x}", rand::random::<u64>());
    let (source, dest, out) = (
        format!("{base}.in"),
        format!("{base}.out"),
        format!("{base}.out-q"),
    );
    let mut args = FieldTable::new();
    args.insert(
        "x-dead-letter-exchange".try_into().unwrap(),
        FieldValue::from(format!("{source}.dlx")),
    );
    ch.queue_declare(
        QueueDeclareArguments::new(&source)
            .durable(true)
            .arguments(args)
            .finish(),
    )
    .await
    .unwrap();
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

    // Baseline.
    fill(&ch, &source, n).await;
    let start = Instant::now();
    let baseline = passthrough(source.clone(), dest.clone(), n);
    let base_time = drained(&ch, &source, &out, n, start).await;
    baseline.join().expect("baseline relay");
    ch.queue_purge(QueuePurgeArguments::new(&out))
        .await
        .unwrap();

    // dedupd, from process start (store open and broker connection included).
    fill(&ch, &source, n).await;
    let data = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let mut child = Command::new(&bin)
        .env("DEDUPD_SOURCE_QUEUE", &source)
        .env("DEDUPD_DEST_EXCHANGE", &dest)
        .env("DEDUPD_DATA_DIR", data.path())
        .env("DEDUPD_METRICS_ADDR", "off")
        .env("DEDUPD_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {bin}: {e}"));
    let relay_time = drained(&ch, &source, &out, n, start).await;
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(child.wait().unwrap().success());

    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    eprintln!(
        "{n} persistent {BODY}-byte messages: passthrough {:.0} msg/s, dedupd {:.0} msg/s ({:.0}% of passthrough)",
        rate(base_time),
        rate(relay_time),
        100.0 * base_time.as_secs_f64() / relay_time.as_secs_f64()
    );
    // Every message once: nothing more arrived after the drain.
    assert_eq!(ready(&ch, &out).await, n);

    for q in [&source, &out, &format!("{source}.dead")] {
        let _ = ch.queue_delete(QueueDeleteArguments::new(q)).await;
    }
    for x in [&dest, &format!("{source}.dlx")] {
        let _ = ch.exchange_delete(ExchangeDeleteArguments::new(x)).await;
    }
    let _ = ch.close().await;
    let _ = conn.close().await;
}
