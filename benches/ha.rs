//! What the hot standby costs and how closely a standby follows, on the local broker, in one
//! run (release build):
//!
//! ```sh
//! flock /work/wt/bench.lock cargo bench --bench ha
//! ```
//!
//! For each setup: `HA_BENCH_N` (default 50 000) persistent 256-byte messages, 20 % of them
//! repeating an earlier id, queued into a fresh source declared by dedupd itself; then dedupd is
//! started and timed until the source is empty and the destination holds each id once.
//!
//! - `classic`: `DEDUPD_HA=off`, classic source (the default);
//! - `quorum`: `DEDUPD_HA=off`, `DEDUPD_QUEUE_TYPE=quorum` (what the queue type alone costs);
//! - `ha`: `DEDUPD_HA=on` (quorum, single active consumer, every commit batch appended to the
//!   id stream with a confirm before its acks), with a standby running beside it whose
//!   `dedupd_ha_lag_seconds` is sampled every 10 ms;
//!
//! then a fresh dedupd with an empty data dir joins the `ha` setup and is timed until it has
//! applied every id of the stream (its catch-up rate).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use amqprs::channel::{ExchangeDeleteArguments, QueueDeleteArguments};

#[path = "../tests/support/mod.rs"]
mod support;
use support::{bind_out, connect, eventually, fill, free_port, http, ready, Waiting};

/// Body size, as in CALIBRATION.md.
const BODY: usize = 256;
/// Longest a fill, a drain or a catch-up may take.
const WAIT: Duration = Duration::from_secs(600);

fn main() {
    let n: usize = std::env::var("HA_BENCH_N")
        .map(|v| v.parse().expect("HA_BENCH_N is a number"))
        .unwrap_or(50_000);
    let bin = dedupd_release();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let ids = workload(n);
        let mut distinct = ids.clone();
        distinct.sort();
        distinct.dedup();
        let distinct = distinct.len();
        let classic = run(&bin, &ids, distinct, Setup::Classic).await;
        let quorum = run(&bin, &ids, distinct, Setup::Quorum).await;
        let ha = run(&bin, &ids, distinct, Setup::Ha).await;
        println!();
        println!("{n} persistent {BODY}-byte messages, {distinct} distinct ids, queued before start");
        println!();
        println!("| setup | drain time | msg/s | vs classic |");
        println!("|---|---|---|---|");
        for (name, f) in [("classic", &classic), ("quorum", &quorum), ("ha", &ha)] {
            let rate = n as f64 / f.elapsed.as_secs_f64();
            let base = n as f64 / classic.elapsed.as_secs_f64();
            println!(
                "| {name} | {:.2} s | {rate:.0} | {:.2} |",
                f.elapsed.as_secs_f64(),
                rate / base
            );
        }
        println!();
        println!(
            "ha / quorum = {:.2} (goal >= 0.90: the replication's own cost)",
            quorum.elapsed.as_secs_f64() / ha.elapsed.as_secs_f64()
        );
        if let Some((p50, p99, max)) = ha.lag {
            println!(
                "standby lag while relaying: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (goal p99 <= 100 ms)",
                p50 * 1e3,
                p99 * 1e3,
                max * 1e3
            );
        }
        if let Some((ids, took)) = ha.catch_up {
            println!(
                "fresh node: {ids} ids applied from the stream in {:.2} s from its start = {:.0} ids/s",
                took.as_secs_f64(),
                ids as f64 / took.as_secs_f64()
            );
        }
    });
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Setup {
    Classic,
    Quorum,
    Ha,
}

struct Figures {
    elapsed: Duration,
    /// Standby lag samples: p50, p99, max (seconds).
    lag: Option<(f64, f64, f64)>,
    /// Fresh node: ids applied and how long from its start.
    catch_up: Option<(u64, Duration)>,
}

fn workload(n: usize) -> Vec<String> {
    let mut ids: Vec<String> = Vec::with_capacity(n);
    for i in 0..n {
        if i % 5 == 4 {
            let back = 1 + (i * 7919) % i;
            ids.push(ids[i - back].clone());
        } else {
            ids.push(format!("ha-bench-{i}"));
        }
    }
    ids
}

/// The release `dedupd`: built here (a no-op when `cargo bench` just built it).
fn dedupd_release() -> PathBuf {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--bin", "dedupd"])
        .status()
        .expect("cargo build");
    assert!(status.success(), "cargo build --release");
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    PathBuf::from(target).join("release/dedupd")
}

/// A dedupd process with its metrics port.
struct Dedupd {
    child: Child,
    port: u16,
}

impl Dedupd {
    fn start(bin: &Path, source: &str, dest: &str, data: &Path, setup: Setup) -> Dedupd {
        let port = free_port();
        let mut cmd = Command::new(bin);
        cmd.env("DEDUPD_SOURCE_QUEUE", source)
            .env("DEDUPD_DEST_EXCHANGE", dest)
            .env("DEDUPD_DATA_DIR", data)
            .env("DEDUPD_METRICS_ADDR", format!("127.0.0.1:{port}"))
            .env("DEDUPD_LOG", "warn")
            .stdin(Stdio::null());
        match setup {
            Setup::Classic => {}
            Setup::Quorum => {
                cmd.env("DEDUPD_QUEUE_TYPE", "quorum");
            }
            Setup::Ha => {
                cmd.env("DEDUPD_HA", "on");
            }
        }
        let child = cmd.spawn().expect("start dedupd");
        let d = Dedupd { child, port };
        eventually(
            WAIT,
            || "dedupd never healthy".into(),
            || d.get("/healthz").is_some_and(|b| b.starts_with("ok")),
        );
        d
    }

    fn get(&self, path: &str) -> Option<String> {
        http(self.port, "GET", path, None).map(|(_, body)| body)
    }

    fn metrics(&self) -> HashMap<String, f64> {
        self.get("/metrics")
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        assert!(self.child.wait().unwrap().success(), "dedupd exit");
    }
}

async fn run(bin: &Path, ids: &[String], distinct: usize, setup: Setup) -> Figures {
    let conn = connect().await;
    let ch = conn.open_channel(None).await.unwrap();
    let base = format!("dedupd-hab-{:012x}", rand::random::<u64>() >> 16);
    let (source, dest, out) = (
        format!("{base}.in"),
        format!("{base}.out"),
        format!("{base}.out-q"),
    );
    bind_out(&ch, &dest, &out).await;
    let (dir_a, dir_b, dir_c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    // dedupd declares the source (and the stream) as it wants them; then it is stopped and the
    // queue filled.
    Dedupd::start(bin, &source, &dest, dir_a.path(), setup).stop();
    fill(&ch, &source, ids, BODY).await;

    let start = Instant::now();
    let active = Dedupd::start(bin, &source, &dest, dir_a.path(), setup);
    let standby =
        (setup == Setup::Ha).then(|| Dedupd::start(bin, &source, &dest, dir_b.path(), setup));
    let mut lags = Vec::new();
    // Polled every 10 ms: the error of the time measured, and the lag's sampling.
    let mut waiting = Waiting::every(WAIT, Duration::from_millis(10));
    loop {
        if ready(&ch, &out).await >= distinct && ready(&ch, &source).await == 0 {
            break;
        }
        if let Some(s) = &standby {
            if let Some(lag) = s.metrics().get("dedupd_ha_lag_seconds") {
                lags.push(*lag);
            }
        }
        waiting.again(|| "drain did not finish".into()).await;
    }
    let elapsed = start.elapsed();
    assert_eq!(
        ready(&ch, &out).await,
        distinct,
        "{base}: destination count"
    );

    let lag = (!lags.is_empty()).then(|| {
        lags.sort_by(f64::total_cmp);
        let at = |q: f64| lags[((lags.len() - 1) as f64 * q) as usize];
        (at(0.5), at(0.99), lags[lags.len() - 1])
    });
    let catch_up = if setup == Setup::Ha {
        // Everything the active one applied of the stream, read by a node that starts empty.
        let want = distinct as f64;
        let started = Instant::now();
        let fresh = Dedupd::start(bin, &source, &dest, dir_c.path(), setup);
        // Polled every 5 ms: the error of the time measured.
        let mut waiting = Waiting::every(WAIT, Duration::from_millis(5));
        loop {
            let applied = fresh
                .metrics()
                .get("dedupd_ha_applied_ids_total")
                .copied()
                .unwrap_or(0.0);
            if applied >= want {
                break;
            }
            waiting.again_blocking(|| "fresh node never caught up".into());
        }
        let took = started.elapsed();
        fresh.stop();
        Some((distinct as u64, took))
    } else {
        None
    };
    if let Some(s) = standby {
        s.stop();
    }
    active.stop();

    for q in [
        &source,
        &out,
        &format!("{source}.dead"),
        &format!("{source}.ids"),
    ] {
        let _ = ch.queue_delete(QueueDeleteArguments::new(q)).await;
    }
    for x in [&dest, &format!("{source}.dlx")] {
        let _ = ch.exchange_delete(ExchangeDeleteArguments::new(x)).await;
    }
    let _ = ch.close().await;
    let _ = conn.close().await;
    Figures {
        elapsed,
        lag,
        catch_up,
    }
}
