//! What the hot standby costs and how closely a standby follows, on the local broker, in one
//! run (release build):
//!
//! ```sh
//! cargo bench --bench ha
//! ```
//!
//! For each setup: `HA_BENCH_N` (default 30 000) persistent 256-byte messages, 20 % of them
//! repeating an earlier id, queued into a fresh source declared by dedupd itself; then dedupd is
//! started and timed until the source is empty and the destination holds each id once. Beside
//! the time: the active instance's mean receipt-to-ack (`dedupd_relay_seconds`), and the CPU
//! seconds of the active instance, the standby and the broker's `beam.smp` over the drain.
//!
//! - `classic`: `DEDUPD_HA=off`, classic source (the default);
//! - `quorum`: `DEDUPD_HA=off`, `DEDUPD_QUEUE_TYPE=quorum` (what the queue type alone costs);
//! - `ha`: `DEDUPD_HA=on` (quorum, single active consumer, every commit batch appended to the
//!   id stream with a confirm before its acks), with a standby running beside it whose
//!   `dedupd_ha_lag_seconds` is sampled every 10 ms once it has been level with the stream;
//!
//! then a fresh dedupd with an empty data dir joins the `ha` setup and is timed until it has
//! applied every id of the stream (its catch-up rate).
//!
//! One drain takes a few seconds, and the machine's load moves more than that between setups, so
//! the three run `HA_BENCH_ROUNDS` (default 5) times, interleaved (each round starting with the
//! next setup), and the ratios come from the medians and from each round's pair. A round of
//! 30 000 messages takes about half a minute.
//!
//! Then the catch-up rate at scale: `HA_CATCHUP_IDS` (default 1 000 000) ids committed by a store
//! in segments of `HA_SEGMENT_IDS` (default 1 000, a commit batch of a busy relay) are written to
//! a fresh `<source>.ids` stream as the active instance writes them; a dedupd with an empty data
//! dir is started against it and timed until it has applied them all. Baseline in the same run:
//! the same segments applied to an empty store in-process, with no broker (the store's part).
//! `HA_BENCH=catch-up` runs only that part, `HA_BENCH=relay` only the relay setups.
//! `HA_BENCH_DEDUPD=<path>` measures that binary instead of building this tree's;
//! `HA_BENCH_BASELINE=<path>` adds a fourth setup to each round, `ha` with that binary (a build
//! before a change), so that before and after are compared in the same run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use amqprs::callbacks::ChannelCallback;
use amqprs::channel::{
    BasicPublishArguments, Channel, ConfirmSelectArguments, ExchangeDeleteArguments,
    QueueDeleteArguments,
};
use amqprs::error::Error as AmqpError;
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, FieldTable, FieldValue, Nack, Return};

#[path = "../tests/support/mod.rs"]
mod support;
use support::{
    bind_out, broker_pid, connect, cpu_seconds, eventually, fill, free_port, http, ready,
    repeating_ids, Waiting,
};

/// Body size, as in CALIBRATION.md.
const BODY: usize = 256;
/// Longest a fill, a drain or a catch-up may take.
const WAIT: Duration = Duration::from_secs(600);

fn main() {
    let n: usize = std::env::var("HA_BENCH_N")
        .map(|v| v.parse().expect("HA_BENCH_N is a number"))
        .unwrap_or(30_000);
    let bin = dedupd_release();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let rounds = env_number("HA_BENCH_ROUNDS", 5) as usize;
    let only = std::env::var("HA_BENCH").unwrap_or_default();
    rt.block_on(async move {
        if only != "catch-up" {
            relay_setups(&bin, n, rounds).await;
        }
        if only == "relay" {
            return;
        }
        let ids: u64 = env_number("HA_CATCHUP_IDS", 1_000_000);
        let per_segment: u64 = env_number("HA_SEGMENT_IDS", 1_000);
        catch_up(&bin, ids, per_segment)
            .await
            .print(ids, per_segment);
    });
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .map(|v| v.replace('_', "").parse().expect("a whole number"))
        .unwrap_or(default)
}

/// The three relay setups (four with a baseline), `rounds` times interleaved, and their table.
async fn relay_setups(bin: &Path, n: usize, rounds: usize) {
    let baseline = std::env::var("HA_BENCH_BASELINE").ok().map(PathBuf::from);
    let ids = repeating_ids("ha-bench", n);
    let mut distinct = ids.clone();
    distinct.sort();
    distinct.dedup();
    let distinct = distinct.len();
    let mut setups = vec![Setup::Classic, Setup::Quorum, Setup::Ha];
    if baseline.is_some() {
        setups.push(Setup::HaBaseline);
    }
    let mut rows: Vec<(Setup, usize, Figures)> = Vec::new();
    for round in 1..=rounds {
        // Each round starts with another setup, so that a drift of the machine's load over the
        // run does not always fall on the same one.
        for i in 0..setups.len() {
            let setup = setups[(round - 1 + i) % setups.len()];
            let bin = match (setup, &baseline) {
                (Setup::HaBaseline, Some(b)) => b.as_path(),
                _ => bin,
            };
            let f = run(bin, &ids, distinct, setup).await;
            eprintln!(
                "round {round}: {} {:.2} s",
                setup.name(),
                f.elapsed.as_secs_f64()
            );
            rows.push((setup, round, f));
        }
    }
    rows.sort_by_key(|(setup, round, _)| (*setup as u8, *round));
    let drain = |f: &Figures| n as f64 / f.elapsed.as_secs_f64();
    let steady = |f: &Figures| f.steady;
    let of = |setup: Setup| rows.iter().filter(move |(s, _, _)| *s == setup);
    let median_of = |setup: Setup, rate: &dyn Fn(&Figures) -> f64| {
        median(of(setup).map(|(_, _, f)| rate(f)).collect())
    };
    println!();
    println!(
        "{n} persistent {BODY}-byte messages, {distinct} distinct ids, queued before start; {rounds} round(s)"
    );
    println!();
    println!(
        "| setup | round | drain time | msg/s from start | msg/s from 1/5 forwarded | receipt to ack, mean | active CPU s | standby CPU s | broker CPU s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (setup, round, f) in &rows {
        println!(
            "| {} | {round} | {:.2} s | {:.0} | {:.0} | {:.1} ms | {:.2} | {} | {:.2} |",
            setup.name(),
            f.elapsed.as_secs_f64(),
            drain(f),
            steady(f),
            f.ack_latency.as_secs_f64() * 1e3,
            f.active_cpu,
            f.standby_cpu
                .map(|c| format!("{c:.2}"))
                .unwrap_or_else(|| "-".into()),
            f.broker_cpu
        );
    }
    println!();
    println!("| setup | median msg/s from start | vs classic | median msg/s from 1/5 forwarded | vs classic |");
    println!("|---|---|---|---|---|");
    for &setup in &setups {
        let (d, s) = (median_of(setup, &drain), median_of(setup, &steady));
        println!(
            "| {} | {d:.0} | {:.2} | {s:.0} | {:.2} |",
            setup.name(),
            d / median_of(Setup::Classic, &drain),
            s / median_of(Setup::Classic, &steady)
        );
    }
    // Each round's ha and quorum ran back to back: their ratio, round by round.
    let paired = |ha: Setup, rate: &dyn Fn(&Figures) -> f64| {
        (1..=rounds)
            .filter_map(|round| {
                let at = |setup| {
                    of(setup)
                        .find(|(_, r, _)| *r == round)
                        .map(|(_, _, f)| rate(f))
                };
                Some(format!("{:.2}", at(ha)? / at(Setup::Quorum)?))
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!();
    // An HA setup against quorum without HA: by the medians, then round by round.
    let ratios = |ha: Setup| {
        for (what, rate) in [
            ("from start", &drain as &dyn Fn(&Figures) -> f64),
            ("from 1/5 forwarded", &steady),
        ] {
            println!(
                "- {what}: {:.2}; {}",
                median_of(ha, rate) / median_of(Setup::Quorum, rate),
                paired(ha, rate)
            );
        }
    };
    println!("ha / quorum (goal >= 0.90: the replication's own cost), by the medians, then round by round:");
    ratios(Setup::Ha);
    if baseline.is_some() {
        println!("ha (baseline binary) / quorum, the same way:");
        ratios(Setup::HaBaseline);
    }
    let mut lags: Vec<f64> = of(Setup::Ha).flat_map(|(_, _, f)| f.lags.clone()).collect();
    if !lags.is_empty() {
        lags.sort_by(f64::total_cmp);
        let at = |q: f64| lags[((lags.len() - 1) as f64 * q) as usize];
        println!(
            "standby lag while relaying, once level with the stream ({} samples): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (goal p99 <= 100 ms)",
            lags.len(),
            at(0.5) * 1e3,
            at(0.99) * 1e3,
            lags[lags.len() - 1] * 1e3
        );
    }
    let catch_up: Vec<f64> = of(Setup::Ha)
        .filter_map(|(_, _, f)| f.catch_up)
        .map(|took| distinct as f64 / took.as_secs_f64())
        .collect();
    if !catch_up.is_empty() {
        println!(
            "fresh node: {distinct} ids applied from the stream, counted from its start: median {:.0} ids/s",
            median(catch_up)
        );
    }
}

/// The median of `v` (the mean of the middle two for an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[m - 1] + v[m]) / 2.0
    } else {
        v[m]
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Setup {
    Classic,
    Quorum,
    Ha,
    /// As `Ha`, with the binary `HA_BENCH_BASELINE` names (a build before a change).
    HaBaseline,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::Classic => "classic",
            Setup::Quorum => "quorum",
            Setup::Ha => "ha",
            Setup::HaBaseline => "ha (baseline binary)",
        }
    }

    fn ha(self) -> bool {
        matches!(self, Setup::Ha | Setup::HaBaseline)
    }
}

struct Figures {
    /// From the active instance's start until the source is empty and every id forwarded.
    elapsed: Duration,
    /// Source messages per second from a fifth of the ids forwarded to the end: the rate without
    /// the start-up (process, connections, takeover) and a standby starting beside it.
    steady: f64,
    /// The active instance's mean time from receiving a delivery to acking it.
    ack_latency: Duration,
    /// CPU seconds over the drain: the active instance, the standby, the broker.
    active_cpu: f64,
    standby_cpu: Option<f64>,
    broker_cpu: f64,
    /// Standby lag samples (seconds), from its first time level with the stream.
    lags: Vec<f64>,
    /// Fresh node: how long from its start until it applied every id.
    catch_up: Option<Duration>,
}

/// The release `dedupd`: built here (a no-op when `cargo bench` just built it), or the binary
/// `HA_BENCH_DEDUPD` names (to measure another build, a baseline say, the same way).
fn dedupd_release() -> PathBuf {
    if let Ok(bin) = std::env::var("HA_BENCH_DEDUPD") {
        return PathBuf::from(bin);
    }
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
        Dedupd::start_with(bin, source, dest, data, setup, &[])
    }

    /// As [`Dedupd::start`], with `env` on top.
    fn start_with(
        bin: &Path,
        source: &str,
        dest: &str,
        data: &Path,
        setup: Setup,
        env: &[(&str, &str)],
    ) -> Dedupd {
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
            Setup::Ha | Setup::HaBaseline => {
                cmd.env("DEDUPD_HA", "on");
            }
        }
        cmd.envs(env.iter().copied());
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

    let broker = broker_pid();
    let broker_cpu = cpu_seconds(broker);
    let start = Instant::now();
    let active = Dedupd::start(bin, &source, &dest, dir_a.path(), setup);
    let standby = setup
        .ha()
        .then(|| Dedupd::start(bin, &source, &dest, dir_b.path(), setup));
    let mut lags = Vec::new();
    let mut level = false;
    // Polled every 10 ms: the error of the time measured, and the lag's sampling.
    let mut waiting = Waiting::every(WAIT, Duration::from_millis(10));
    // The first poll that saw a fifth of the ids forwarded: when and how many.
    let mut mark: Option<(Instant, usize)> = None;
    loop {
        let forwarded = ready(&ch, &out).await;
        if forwarded >= distinct && ready(&ch, &source).await == 0 {
            break;
        }
        if mark.is_none() && forwarded >= distinct / 5 {
            mark = Some((Instant::now(), forwarded));
        }
        if let Some(s) = &standby {
            if let Some(&lag) = s.metrics().get("dedupd_ha_lag_seconds") {
                // From its first time level with the stream on: before that it is reading what
                // the active one appended while the standby was starting, which is catch-up
                // (timed below), not lag.
                level |= lag == 0.0;
                if level {
                    lags.push(lag);
                }
            }
        }
        waiting.again(|| "drain did not finish".into()).await;
    }
    let elapsed = start.elapsed();
    // Ids per second from the mark on, as source messages per second (each id stands for
    // n / distinct of them): the rate once started, taken over, and warm.
    let steady = mark.map(|(at, forwarded)| {
        (distinct - forwarded) as f64 / at.elapsed().as_secs_f64() * ids.len() as f64
            / distinct as f64
    });
    let broker_cpu = cpu_seconds(broker) - broker_cpu;
    let active_cpu = cpu_seconds(active.child.id());
    let standby_cpu = standby.as_ref().map(|s| cpu_seconds(s.child.id()));
    let ack_latency = {
        let m = active.metrics();
        let sum = m.get("dedupd_relay_seconds_sum").copied().unwrap_or(0.0);
        let count = m.get("dedupd_relay_seconds_count").copied().unwrap_or(0.0);
        Duration::from_secs_f64(if count > 0.0 { sum / count } else { 0.0 })
    };
    assert_eq!(
        ready(&ch, &out).await,
        distinct,
        "{base}: destination count"
    );

    let catch_up = if setup.ha() {
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
        Some(took)
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
        steady: steady.unwrap_or(f64::NAN),
        ack_latency,
        active_cpu,
        standby_cpu,
        broker_cpu,
        lags,
        catch_up,
    }
}

/// What the catch-up part measured.
struct CatchUp {
    /// The same segments applied to an empty store in-process, no broker, a flush each.
    store_alone: Duration,
    /// The same, in groups of about 4 MiB made durable together.
    store_grouped: Duration,
    /// From the fresh node's start to every id applied.
    from_start: Duration,
    /// From its first applied id to the last.
    applying: Duration,
}

impl CatchUp {
    fn print(&self, ids: u64, per_segment: u64) {
        let rate = |d: Duration| ids as f64 / d.as_secs_f64();
        println!();
        println!(
            "fresh node catching up from a stream of {ids} ids in {} segments of {per_segment}",
            ids.div_ceil(per_segment)
        );
        println!();
        println!("| what | time | ids/s | vs a flush per segment |");
        println!("|---|---|---|---|");
        let base = rate(self.store_alone);
        for (name, d) in [
            (
                "store alone, a flush per segment (apply_logged)",
                self.store_alone,
            ),
            (
                "store alone, a flush per 4 MiB of segments (apply_logged_many)",
                self.store_grouped,
            ),
            ("fresh dedupd, from its start", self.from_start),
            ("fresh dedupd, first id applied to last", self.applying),
        ] {
            println!(
                "| {name} | {:.2} s | {:.0} | {:.2} |",
                d.as_secs_f64(),
                rate(d),
                rate(d) / base
            );
        }
        println!();
        println!("goal: a fresh node catches up at >= 1 000 000 ids/s");
    }
}

/// `ids` UUID-shaped ids committed by a scratch store in segments of `per_segment`: the
/// segments an active instance appends to the stream.
fn segments(ids: u64, per_segment: u64) -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    let mut config = dedupd::StoreConfig::new(dir.path());
    config.expected_ids = ids;
    let store = dedupd::Store::open(config).expect("open a scratch store");
    let salt: u32 = rand::random();
    let now = dedupd::store::system_now_ms();
    let mut out = Vec::new();
    let mut i = 0;
    while i < ids {
        let end = (i + per_segment).min(ids);
        let claims = (i..end)
            .map(|i| {
                let id = format!("{salt:08x}-0000-4000-8000-{i:012x}");
                match store.claim(id.as_bytes(), now).expect("claim") {
                    dedupd::Verdict::New(claim) => claim,
                    _ => panic!("a fresh id was not new"),
                }
            })
            .collect();
        out.push(store.commit_logged(claims, now).expect("commit"));
        i = end;
    }
    store.close().expect("close the scratch store");
    out
}

/// Applies `segments` to an empty store in order, as a standby's tailer does: one at a time
/// (a flush each), or `grouped` in runs of about 4 MiB made durable together (as the tailer
/// does since); how long it took.
fn apply_alone(segments: &[Vec<u8>], ids: u64, grouped: bool) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let mut config = dedupd::StoreConfig::new(dir.path());
    config.expected_ids = ids;
    let store = dedupd::Store::open(config).expect("open an empty store");
    let now = dedupd::store::system_now_ms();
    let started = Instant::now();
    let mut applied = 0;
    if grouped {
        let mut group = Vec::new();
        let mut bytes = 0;
        for (offset, segment) in segments.iter().enumerate() {
            group.push((segment.as_slice(), offset as u64));
            bytes += segment.len();
            if bytes >= 4 << 20 {
                applied += store
                    .apply_logged_many(group.drain(..), now)
                    .expect("apply");
                bytes = 0;
            }
        }
        applied += store.apply_logged_many(group, now).expect("apply");
    } else {
        for (offset, segment) in segments.iter().enumerate() {
            applied += store
                .apply_logged(segment, offset as u64, now)
                .expect("apply");
        }
    }
    let took = started.elapsed();
    assert_eq!(applied as u64, ids, "ids applied in-process");
    store.close().expect("close");
    took
}

/// The catch-up part: see the module's doc.
async fn catch_up(bin: &Path, ids: u64, per_segment: u64) -> CatchUp {
    let segments = tokio::task::spawn_blocking(move || segments(ids, per_segment))
        .await
        .unwrap();
    let segments = std::sync::Arc::new(segments);
    let mut alone = Vec::new();
    for grouped in [false, true] {
        let segments = segments.clone();
        let took = tokio::task::spawn_blocking(move || apply_alone(&segments, ids, grouped))
            .await
            .unwrap();
        alone.push(took);
    }

    let conn = connect().await;
    let ch = conn.open_channel(None).await.unwrap();
    let base = format!("dedupd-hac-{:012x}", rand::random::<u64>() >> 16);
    let (source, dest) = (format!("{base}.in"), format!("{base}.out"));
    let stream = format!("{source}.ids");
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // dedupd declares the source and the stream as it wants them.
    Dedupd::start(bin, &source, &dest, dir_a.path(), Setup::Ha).stop();
    append(&ch, &stream, &segments, per_segment).await;

    let expected = ids.to_string();
    let started = Instant::now();
    let fresh = Dedupd::start_with(
        bin,
        &source,
        &dest,
        dir_b.path(),
        Setup::Ha,
        &[("DEDUPD_EXPECTED_IDS", expected.as_str())],
    );
    let mut first = None;
    loop {
        let applied = fresh
            .metrics()
            .get("dedupd_ha_applied_ids_total")
            .copied()
            .unwrap_or(0.0) as u64;
        if applied > 0 && first.is_none() {
            first = Some(started.elapsed());
        }
        if applied >= ids {
            break;
        }
        assert!(started.elapsed() < WAIT, "fresh node never caught up");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let from_start = started.elapsed();
    fresh.stop();

    for q in [&source, &format!("{source}.dead"), &stream] {
        let _ = ch.queue_delete(QueueDeleteArguments::new(q)).await;
    }
    for x in [&dest, &format!("{source}.dlx")] {
        let _ = ch.exchange_delete(ExchangeDeleteArguments::new(x)).await;
    }
    let _ = ch.close().await;
    let _ = conn.close().await;
    CatchUp {
        store_alone: alone[0],
        store_grouped: alone[1],
        from_start,
        applying: from_start - first.unwrap_or_default(),
    }
}

/// Appends `segments` to `stream` as the active instance does (a segment per message, the kind
/// and id count in headers), and waits for the broker's confirms of them all.
async fn append(ch: &Channel, stream: &str, segments: &[Vec<u8>], per_segment: u64) {
    let (tx, mut acked) = tokio::sync::mpsc::unbounded_channel();
    ch.register_callback(Confirms(tx)).await.unwrap();
    ch.confirm_select(ConfirmSelectArguments::new(false))
        .await
        .unwrap();
    for segment in segments {
        let mut headers = FieldTable::new();
        headers.insert(
            "x-dedupd-kind".try_into().unwrap(),
            FieldValue::from("segment"),
        );
        headers.insert(
            "x-dedupd-ids".try_into().unwrap(),
            FieldValue::l(per_segment as i64),
        );
        let props = BasicProperties::default()
            .with_persistence(true)
            .with_headers(headers)
            .finish();
        ch.basic_publish(
            props,
            segment.clone(),
            BasicPublishArguments::new("", stream),
        )
        .await
        .unwrap();
    }
    let last = segments.len() as u64;
    let deadline = Instant::now() + WAIT;
    loop {
        match tokio::time::timeout(Duration::from_secs(1), acked.recv()).await {
            Ok(Some(tag)) if tag >= last => return,
            Ok(Some(_)) | Err(_) => {}
            Ok(None) => panic!("{stream}: the channel closed before every confirm"),
        }
        assert!(Instant::now() < deadline, "{stream}: not confirmed in time");
    }
}

/// Reports the highest delivery tag the broker confirmed; a nack fails the bench.
struct Confirms(tokio::sync::mpsc::UnboundedSender<u64>);

#[async_trait::async_trait]
impl ChannelCallback for Confirms {
    async fn close(&mut self, _: &Channel, close: CloseChannel) -> Result<(), AmqpError> {
        panic!("the broker closed the append channel: {close}");
    }

    async fn cancel(&mut self, _: &Channel, _: Cancel) -> Result<(), AmqpError> {
        Ok(())
    }

    async fn flow(&mut self, _: &Channel, active: bool) -> Result<bool, AmqpError> {
        Ok(active)
    }

    async fn publish_ack(&mut self, _: &Channel, ack: Ack) {
        let _ = self.0.send(ack.delivery_tag());
    }

    async fn publish_nack(&mut self, _: &Channel, _: Nack) {
        panic!("the broker refused a segment");
    }

    async fn publish_return(&mut self, _: &Channel, _: Return, _: BasicProperties, _: Vec<u8>) {}
}
