//! End-to-end relay benchmark on the local broker: dedupd (release build) next to a passthrough
//! relay with no store and RabbitMQ's own shovel, on the same workload, in one run.
//!
//! ```sh
//! cargo bench --bench relay
//! ```
//!
//! For each relay: queue `RELAY_BENCH_N` (default 50 000) persistent 256-byte messages, 20 % of
//! them repeating an earlier id, into a fresh source queue; start the relay; time until the
//! source is empty and the destination holds everything the relay forwards (dedupd: each id
//! once; passthrough and shovel: every message). CPU seconds come from /proc: the relay process
//! (dedupd) or thread (passthrough), and the broker's `beam.smp`. `RELAY_BENCH_ROUNDS` (default 1) repeats the three,
//! interleaved, and the table shows each round. `RELAY_BENCH_ONLY=dedupd` (or any
//! comma-separated subset of `shovel,passthrough,dedupd`) runs only those.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use amqprs::callbacks::ChannelCallback;
use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicPublishArguments, BasicQosArguments, Channel,
    ConfirmSelectArguments, ExchangeDeleteArguments, QueueDeclareArguments, QueueDeleteArguments,
};
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, FieldTable, FieldValue, Nack, Return};
use tokio::sync::mpsc;

#[path = "../tests/support/mod.rs"]
mod support;
use support::{
    bind_out, broker_pid, connect, cpu_seconds, fill, ready, repeating_ids, thread_cpu_seconds,
    Waiting,
};

/// Body size, as in CALIBRATION.md.
const BODY: usize = 256;
/// Prefetch of every relay (dedupd's default).
const PREFETCH: u16 = 1000;
/// Longest a fill or a drain may take.
const WAIT: Duration = Duration::from_secs(600);

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let n: usize = env_or("RELAY_BENCH_N", 50_000);
    let rounds: usize = env_or("RELAY_BENCH_ROUNDS", 1);
    // A comma-separated subset of `shovel,passthrough,dedupd`, to measure one alone; all by default.
    let only = std::env::var("RELAY_BENCH_ONLY").unwrap_or_default();
    let bin = dedupd_release();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        enable_shovel();
        let ids = repeating_ids("bench", n);
        let distinct = {
            let mut d = ids.clone();
            d.sort();
            d.dedup();
            d.len()
        };
        let mut rows = Vec::new();
        for round in 1..=rounds {
            if only.is_empty() || only.contains("shovel") {
                rows.push(("shovel", round, run(Relay::Shovel, &ids, n).await));
            }
            if only.is_empty() || only.contains("passthrough") {
                rows.push(("passthrough", round, run(Relay::Passthrough, &ids, n).await));
            }
            if only.is_empty() || only.contains("dedupd") {
                rows.push((
                    "dedupd",
                    round,
                    run(Relay::Dedupd(&bin), &ids, distinct).await,
                ));
            }
        }
        print_table(n, distinct, &rows);
    });
}

fn env_or(var: &str, default: usize) -> usize {
    std::env::var(var)
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{var} is a number")))
        .unwrap_or(default)
}

/// The release `dedupd`: built here (a no-op when `cargo bench` just built it), or the binary
/// `RELAY_BENCH_DEDUPD` names (to measure another build, a baseline say, in the same run).
fn dedupd_release() -> PathBuf {
    if let Ok(bin) = std::env::var("RELAY_BENCH_DEDUPD") {
        return PathBuf::from(bin);
    }
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--bin", "dedupd"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo build --release");
    assert!(status.success(), "cargo build --release failed");
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let bin = target.join("release/dedupd");
    assert!(bin.exists(), "no {}", bin.display());
    bin
}

enum Relay<'a> {
    Dedupd(&'a PathBuf),
    Passthrough,
    Shovel,
}

/// What one relay did.
struct Figures {
    elapsed: Duration,
    relay_cpu: Option<f64>,
    broker_cpu: f64,
}

/// Declares fresh queues, fills the source, runs `relay` until drained, cleans up.
async fn run(relay: Relay<'_>, ids: &[String], expect_out: usize) -> Figures {
    let conn = connect().await;
    let ch = conn.open_channel(None).await.unwrap();
    let base = format!("dedupd-bench-{:012x}", rand::random::<u64>() >> 16);
    let (source, dest, out) = (
        format!("{base}.in"),
        format!("{base}.out"),
        format!("{base}.out-q"),
    );
    // The source exactly as dedupd declares it, so that all three use the same queue.
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
    bind_out(&ch, &dest, &out).await;
    fill(&ch, &source, ids, BODY).await;

    let broker = broker_pid();
    let broker_cpu = cpu_seconds(broker);
    let data = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let (elapsed, relay_cpu) = match relay {
        Relay::Dedupd(bin) => {
            let mut child = Command::new(bin)
                .env("DEDUPD_SOURCE_QUEUE", &source)
                .env("DEDUPD_DEST_EXCHANGE", &dest)
                .env("DEDUPD_DATA_DIR", data.path())
                .env("DEDUPD_METRICS_ADDR", "off")
                .env("DEDUPD_LOG", "warn")
                .stdin(Stdio::null())
                .spawn()
                .expect("start dedupd");
            let elapsed = drained(&ch, &source, &out, expect_out, start).await;
            let cpu = cpu_seconds(child.id());
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            assert!(child.wait().unwrap().success(), "dedupd exit");
            (elapsed, Some(cpu))
        }
        Relay::Passthrough => {
            let relay = passthrough(source.clone(), dest.clone(), ids.len() as u64);
            let elapsed = drained(&ch, &source, &out, expect_out, start).await;
            let cpu = relay.join().expect("passthrough relay");
            (elapsed, Some(cpu))
        }
        Relay::Shovel => {
            let name = format!("{base}-shovel");
            let definition = format!(
                r#"{{"src-protocol":"amqp091","src-uri":"amqp://guest:guest@127.0.0.1","src-queue":"{source}","src-prefetch-count":{PREFETCH},"dest-protocol":"amqp091","dest-uri":"amqp://guest:guest@127.0.0.1","dest-exchange":"{dest}","ack-mode":"on-confirm"}}"#
            );
            rabbitmqctl(&["set_parameter", "shovel", &name, &definition]);
            let elapsed = drained(&ch, &source, &out, expect_out, start).await;
            rabbitmqctl(&["clear_parameter", "shovel", &name]);
            (elapsed, None)
        }
    };
    let broker_cpu = cpu_seconds(broker) - broker_cpu;
    // Nothing more arrives once drained: the relay forwarded exactly what it should.
    assert_eq!(
        ready(&ch, &out).await,
        expect_out,
        "{base}: destination count"
    );

    for q in [&source, &out, &format!("{source}.dead")] {
        let _ = ch.queue_delete(QueueDeleteArguments::new(q)).await;
    }
    for x in [&dest, &format!("{source}.dlx")] {
        let _ = ch.exchange_delete(ExchangeDeleteArguments::new(x)).await;
    }
    let _ = ch.close().await;
    let _ = conn.close().await;
    Figures {
        elapsed,
        relay_cpu,
        broker_cpu,
    }
}

/// Waits until `out` holds `n` messages and `source` none; the time since `start`.
async fn drained(ch: &Channel, source: &str, out: &str, n: usize, start: Instant) -> Duration {
    // Polled every 5 ms: the error of the time measured.
    let mut waiting = Waiting::every(WAIT, Duration::from_millis(5));
    loop {
        if ready(ch, out).await >= n && ready(ch, source).await == 0 {
            return start.elapsed();
        }
        waiting.again(|| "drain did not finish".into()).await;
    }
}

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl on PATH");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {out:?}");
}

/// The shovel plugin ships with RabbitMQ; enabling it is idempotent and needs no network.
fn enable_shovel() {
    let out = Command::new("rabbitmq-plugins")
        .args(["enable", "rabbitmq_shovel"])
        .output()
        .expect("rabbitmq-plugins on PATH");
    assert!(out.status.success(), "enable rabbitmq_shovel: {out:?}");
}

fn print_table(n: usize, distinct: usize, rows: &[(&str, usize, Figures)]) {
    println!();
    println!(
        "{n} persistent {BODY}-byte messages, {distinct} distinct ids, queued before start; prefetch {PREFETCH}"
    );
    println!();
    println!(
        "| relay | round | drain time | msg/s | relay CPU s | relay CPU s per 50 000 | relay CPU µs/msg | broker CPU s |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let rate = |f: &Figures| n as f64 / f.elapsed.as_secs_f64();
    // dedupd's process and the passthrough's thread; the shovel runs inside the broker.
    let or_dash = |c: Option<f64>, fmt: fn(f64) -> String| c.map(fmt).unwrap_or_else(|| "-".into());
    for (name, round, f) in rows {
        let per_msg = f.relay_cpu.map(|c| c / n as f64);
        println!(
            "| {name} | {round} | {:.2} s | {:.0} | {} | {} | {} | {:.2} |",
            f.elapsed.as_secs_f64(),
            rate(f),
            or_dash(f.relay_cpu, |c| format!("{c:.2}")),
            or_dash(per_msg, |c| format!("{:.2}", c * 50_000.0)),
            or_dash(per_msg, |c| format!("{:.1}", c * 1e6)),
            f.broker_cpu
        );
    }
    let mean = |which: &str| {
        let r: Vec<f64> = rows
            .iter()
            .filter(|(name, _, _)| *name == which)
            .map(|(_, _, f)| rate(f))
            .collect();
        (!r.is_empty()).then(|| r.iter().sum::<f64>() / r.len() as f64)
    };
    println!();
    if let (Some(d), Some(p), Some(s)) = (mean("dedupd"), mean("passthrough"), mean("shovel")) {
        println!(
            "dedupd / shovel = {:.2} (goal >= 0.90), dedupd / passthrough = {:.2} (goal >= 0.95)",
            d / s,
            d / p
        );
    }
    let cpu_per_msg = |which: &str| {
        let c: Vec<f64> = rows
            .iter()
            .filter(|(name, _, _)| *name == which)
            .filter_map(|(_, _, f)| f.relay_cpu)
            .map(|c| c / n as f64 * 1e6)
            .collect();
        (!c.is_empty()).then(|| c.iter().sum::<f64>() / c.len() as f64)
    };
    if let Some(d) = cpu_per_msg("dedupd") {
        let floor = cpu_per_msg("passthrough")
            .map(|p| format!(", passthrough {p:.1} µs"))
            .unwrap_or_default();
        println!("CPU per message: dedupd {d:.1} µs (goal <= 15){floor}");
    }
}

// ---------------------------------------------------------------------------------------------
// The passthrough: dedupd's pipelining (manual acks, prefetch, confirms, `multiple` acks on
// each confirm) with no store and no dedup.

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
        panic!("passthrough publish nacked");
    }
    async fn publish_return(&mut self, _: &Channel, _: Return, _: BasicProperties, _: Vec<u8>) {
        panic!("passthrough publish returned");
    }
}

/// Forwards `n` messages from `source` to `dest` on a current-thread runtime of its own (as
/// dedupd runs), acking each confirmed range with `multiple`; returns the CPU seconds its thread
/// used (every task of its runtime, amqprs' included, runs on it).
fn passthrough(source: String, dest: String, n: u64) -> std::thread::JoinHandle<f64> {
    std::thread::spawn(move || {
        let cpu_before = thread_cpu_seconds();
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
                .basic_qos(BasicQosArguments::new(0, PREFETCH, false))
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
                                BasicPublishArguments::new(&dest, "").mandatory(true).finish(),
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
        thread_cpu_seconds() - cpu_before
    })
}
