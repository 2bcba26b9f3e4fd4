//! Sharded throughput: 1, 2 and 3 `dedupd` instances behind a consistent-hash exchange on the
//! local RabbitMQ, each with its own data dir, draining the same workload.
//!
//! For each shard count: declare a ring with `dedupd::shard::declare` (random names), queue
//! 50 000 persistent 256-byte messages through the ring exchange (40 000 ids, every fourth sent
//! twice: 20 % duplicates, shuffled), start the release binary once per shard, and time from
//! process start until the destination holds the 40 000 first copies and every shard queue is
//! empty. It prints a table with the throughput (source messages settled per second) and how
//! the messages spread over the shards, then checks that each id arrived once.
//!
//! ```sh
//! cargo bench --bench shards                 # builds target/release/dedupd and runs this
//! SHARDS_N=20000 SHARDS_RUNS=3 cargo bench --bench shards
//! ```
//!
//! `SHARDS_BIN` runs another binary instead. Needs the broker on 127.0.0.1:5672 (guest/guest)
//! and the plugin `rabbitmq_consistent_hash_exchange`, which it enables if it can.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use amqprs::channel::{
    BasicPublishArguments, ExchangeDeleteArguments, QueueDeleteArguments, QueuePurgeArguments,
};
use amqprs::BasicProperties;
use dedupd::shard::{self, Ring};
use dedupd::Config;
use rand::seq::SliceRandom;

#[path = "../tests/support/mod.rs"]
mod support;
use support::{bind_out, connect, eventually_async, ready, Waiting};

/// Message body size, as in the relay throughput test and CALIBRATION.md.
const BODY: usize = 256;
/// Longest a fill or a drain may take before the bench gives up.
const WAIT: Duration = Duration::from_secs(600);
/// Publishing connections used to fill the shard queues.
const PUBLISHERS: usize = 3;
/// Kernel clock ticks per second, for the CPU times in /proc (100 on every Linux we run on).
const TICKS: f64 = 100.0;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v}: not a number"))
        })
        .unwrap_or(default)
}

fn main() {
    let n = env_or("SHARDS_N", 50_000);
    let runs = env_or("SHARDS_RUNS", 1);
    let bin = std::env::var("SHARDS_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_dedupd").into());
    let out = Command::new("rabbitmq-plugins")
        .args(["-q", "enable", "rabbitmq_consistent_hash_exchange"])
        .output()
        .expect("run rabbitmq-plugins: the shard bench needs the consistent-hash plugin");
    assert!(
        out.status.success(),
        "rabbitmq-plugins enable rabbitmq_consistent_hash_exchange failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    println!("binary: {bin}");
    println!(
        "{n} persistent {BODY}-byte messages, {} distinct ids (20 % duplicates), queued before start",
        n - n / 5
    );
    println!();
    println!(
        "| shards | time | throughput | forwarded/s | dedupd CPU | messages per shard | max/mean |"
    );
    println!("|---|---|---|---|---|---|---|");
    for _ in 0..runs {
        for shards in 1..=3 {
            let r = runtime.block_on(run(&bin, shards, n));
            let mean = n as f64 / shards as f64;
            let max = *r.per_shard.iter().max().unwrap() as f64;
            println!(
                "| {shards} | {:.2} s | {:.0} msg/s | {:.0} ids/s | {:.2} s | {} | {:.3} |",
                r.elapsed.as_secs_f64(),
                n as f64 / r.elapsed.as_secs_f64(),
                r.forwarded as f64 / r.elapsed.as_secs_f64(),
                r.cpu_s,
                r.per_shard
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(" / "),
                max / mean,
            );
        }
    }
}

/// What one configuration measured.
struct Measured {
    elapsed: Duration,
    forwarded: usize,
    /// Messages each shard's queue received.
    per_shard: Vec<u32>,
    /// User plus system CPU of all dedupd processes together.
    cpu_s: f64,
}

async fn run(bin: &str, shards: u32, n: usize) -> Measured {
    let conn = connect().await;
    let ch = conn.open_channel(None).await.unwrap();
    let base = format!("dedupd-bench-{:016x}", rand::random::<u64>());
    let ring = Ring {
        exchange: format!("{base}.shard"),
        queue_prefix: format!("{base}.in"),
        shards,
    };
    let dest = format!("{base}.out");
    let out = format!("{base}.out-q");
    let config = Config::from_vars([("DEDUPD_DEST_EXCHANGE", dest.as_str())]).unwrap();
    shard::declare(&config, &ring)
        .await
        .expect("declare the ring");
    bind_out(&ch, &dest, &out).await;

    // Fill: every fourth id twice, shuffled, from several connections.
    let distinct = n - n / 5;
    let mut ids: Vec<String> = (0..distinct).map(|i| format!("b-{i}")).collect();
    let copies: Vec<String> = ids.iter().step_by(4).take(n / 5).cloned().collect();
    ids.extend(copies);
    ids.shuffle(&mut rand::rng());
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let mine: Vec<String> = ids.iter().skip(p).step_by(PUBLISHERS).cloned().collect();
        let exchange = ring.exchange.clone();
        tasks.push(tokio::spawn(async move {
            let conn = connect().await;
            let ch = conn.open_channel(None).await.unwrap();
            let body = vec![b'x'; BODY];
            for id in mine {
                let props = BasicProperties::default()
                    .with_message_id(&id)
                    .with_persistence(true)
                    .finish();
                ch.basic_publish(
                    props,
                    body.clone(),
                    BasicPublishArguments::new(&exchange, ""),
                )
                .await
                .unwrap();
            }
            ch.close().await.unwrap();
            conn.close().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let per_shard = eventually_async(
        WAIT,
        || "shard queues never filled".into(),
        || async {
            let mut counts = Vec::new();
            for q in ring.queues() {
                counts.push(ready(&ch, &q).await as u32);
            }
            (counts.iter().sum::<u32>() as usize >= n).then_some(counts)
        },
    )
    .await;

    // Drain, timed from the first process start.
    let dirs: Vec<_> = (0..shards).map(|_| tempfile::tempdir().unwrap()).collect();
    let start = Instant::now();
    let mut children = Children(
        ring.queues()
            .zip(&dirs)
            .map(|(queue, dir)| spawn(bin, &queue, &dest, dir.path()))
            .collect(),
    );
    // Polled every 10 ms: the error of the time measured.
    let mut waiting = Waiting::every(WAIT, Duration::from_millis(10));
    let elapsed = loop {
        let forwarded = ready(&ch, &out).await;
        let mut left = 0;
        for q in ring.queues() {
            left += ready(&ch, &q).await as u32;
        }
        if forwarded >= distinct && left == 0 {
            break start.elapsed();
        }
        for c in &mut children.0 {
            if let Some(status) = c.try_wait().unwrap() {
                panic!("dedupd exited with {status}; see its log in {dirs:?}");
            }
        }
        waiting
            .again(|| format!("drain did not finish: {forwarded} forwarded"))
            .await;
    };
    let cpu_s = children.0.iter().map(|c| cpu_seconds(c.id())).sum();
    for c in &mut children.0 {
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
    }
    for c in &mut children.0 {
        let status = c.wait().unwrap();
        assert!(status.success(), "dedupd stopped with {status}");
    }
    let forwarded = ready(&ch, &out).await;
    assert_eq!(forwarded, distinct, "every id once, no more");

    ch.queue_purge(QueuePurgeArguments::new(&out))
        .await
        .unwrap();
    for q in [out.clone()]
        .into_iter()
        .chain(ring.queues())
        .chain(ring.queues().map(|q| format!("{q}.dead")))
    {
        let _ = ch.queue_delete(QueueDeleteArguments::new(&q)).await;
    }
    for x in [ring.exchange.clone(), dest]
        .into_iter()
        .chain(ring.queues().map(|q| format!("{q}.dlx")))
    {
        let _ = ch.exchange_delete(ExchangeDeleteArguments::new(&x)).await;
    }
    let _ = ch.close().await;
    let _ = conn.close().await;
    Measured {
        elapsed,
        forwarded,
        per_shard,
        cpu_s,
    }
}

/// The shards' processes, killed if the bench fails half-way (a stray dedupd would keep
/// consuming the next run's queues).
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts one shard's dedupd with default settings except names, data dir and quiet logs.
fn spawn(bin: &str, queue: &str, dest: &str, data: &Path) -> Child {
    let mut cmd = Command::new(bin);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("DEDUPD_") {
            cmd.env_remove(k);
        }
    }
    let log = std::fs::File::create(data.join("dedupd.log")).unwrap();
    cmd.env("DEDUPD_SOURCE_QUEUE", queue)
        .env("DEDUPD_DEST_EXCHANGE", dest)
        .env("DEDUPD_DATA_DIR", data)
        .env("DEDUPD_METRICS_ADDR", "off")
        .env("DEDUPD_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start {bin}: {e}"))
}

/// User plus system CPU time of a running process, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces, so split after its ')').
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    let ticks: f64 = fields
        .iter()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse::<f64>().ok())
        .sum();
    ticks / TICKS
}
