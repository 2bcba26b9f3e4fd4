//! What the hot standby costs and how closely a standby follows, on the local broker, in one
//! run (release build):
//!
//! ```sh
//! cargo bench --bench ha
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
//!   `dedupd_ha_lag_seconds` is sampled every 10 ms once it has been level with the stream;
//!
//! then a fresh dedupd with an empty data dir joins the `ha` setup and is timed until it has
//! applied every id of the stream (its catch-up rate).
//!
//! Then the catch-up rate at scale: `HA_CATCHUP_IDS` (default 1 000 000) ids committed by a store
//! in segments of `HA_SEGMENT_IDS` (default 1 000, a commit batch of a busy relay) are written to
//! a fresh `<source>.ids` stream as the active instance writes them; a dedupd with an empty data
//! dir is started against it and timed until it has applied them all. Baseline in the same run:
//! the same segments applied to an empty store in-process, with no broker (the store's part).
//! `HA_BENCH=catch-up` runs only that part.

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
    bind_out, connect, eventually, fill, free_port, http, ready, repeating_ids, Waiting,
};

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
    let only_catch_up = std::env::var("HA_BENCH").as_deref() == Ok("catch-up");
    rt.block_on(async move {
        if !only_catch_up {
            relay_setups(&bin, n).await;
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

/// The three relay setups, and their table.
async fn relay_setups(bin: &Path, n: usize) {
    let ids = repeating_ids("ha-bench", n);
    let mut distinct = ids.clone();
    distinct.sort();
    distinct.dedup();
    let distinct = distinct.len();
    let classic = run(bin, &ids, distinct, Setup::Classic).await;
    let quorum = run(bin, &ids, distinct, Setup::Quorum).await;
    let ha = run(bin, &ids, distinct, Setup::Ha).await;
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
            "standby lag while relaying, once level with the stream: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (goal p99 <= 100 ms)",
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
            Setup::Ha => {
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

    let start = Instant::now();
    let active = Dedupd::start(bin, &source, &dest, dir_a.path(), setup);
    let standby =
        (setup == Setup::Ha).then(|| Dedupd::start(bin, &source, &dest, dir_b.path(), setup));
    let mut lags = Vec::new();
    let mut level = false;
    // Polled every 10 ms: the error of the time measured, and the lag's sampling.
    let mut waiting = Waiting::every(WAIT, Duration::from_millis(10));
    loop {
        if ready(&ch, &out).await >= distinct && ready(&ch, &source).await == 0 {
            break;
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
