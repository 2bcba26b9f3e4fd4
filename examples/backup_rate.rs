//! Backup and restore rates of the store at N ids:
//! `cargo run --release --example backup_rate -- [N] [DIR]` (N defaults to 1 000 000).
//!
//! Fills N UUID-shaped ids (durable commits of 1024), then times, in one run: a backup to a file
//! (synced), the same backup to nowhere (the store's own cost), a backup taken while a writer
//! keeps committing (what the relay does during an online backup, with the writer's rate beside
//! its rate alone), and a restore of the file into an empty dir. Checks that every id is in the
//! restored store. Run it with no other benchmark beside it: `cargo run --release --example backup_rate`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dedupd::store::system_now_ms;
use dedupd::{Store, StoreConfig};

const BATCH: u64 = 1024;

#[path = "../tests/support/ids.rs"]
#[allow(dead_code)]
mod ids;
use ids::{record_uuid_ids, uuid_id};

fn config(dir: &Path, n: u64) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.ttl = Duration::from_secs(24 * 3600);
    c.expected_ids = n.max(1000);
    c
}

fn rate(count: u64, took: Duration) -> String {
    let per_s = count as f64 / took.as_secs_f64();
    if per_s >= 1e6 {
        format!("{:.2} M ids/s", per_s / 1e6)
    } else {
        format!("{:.0} k ids/s", per_s / 1e3)
    }
}

fn mib_s(bytes: u64, took: Duration) -> String {
    format!(
        "{:.0} MiB/s",
        bytes as f64 / (1 << 20) as f64 / took.as_secs_f64()
    )
}

/// A writer committing fresh ids from `from` until `stop`: how many it committed.
fn writer(
    store: Store,
    from: u64,
    stop: Arc<AtomicBool>,
    now: u64,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut next = from;
        while !stop.load(Ordering::Relaxed) {
            record_uuid_ids(&store, next, next + BATCH, BATCH, now);
            next += BATCH;
        }
        next - from
    })
}

/// Counts bytes and throws them away.
struct Sink(u64);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("N must be a number of ids"))
        .unwrap_or(1_000_000);
    let tmp = tempfile::tempdir().expect("temp dir");
    let root = std::env::args()
        .nth(2)
        .map_or_else(|| tmp.path().to_path_buf(), Into::into);
    let (data, restored, file) = (
        root.join("data"),
        root.join("restored"),
        root.join("backup"),
    );
    let now = system_now_ms();

    let store = Store::open(config(&data, n)).expect("open");
    let started = Instant::now();
    record_uuid_ids(&store, 0, n, BATCH, now);
    let filled = started.elapsed();

    // To a file, synced: what `dedupd backup <file>` costs on this disk.
    let started = Instant::now();
    let mut out = BufWriter::with_capacity(1 << 20, File::create(&file).expect("backup file"));
    let stats = store.backup(&mut out).expect("backup");
    let out = out.into_inner().expect("flush");
    out.sync_all().expect("sync");
    let to_file = started.elapsed();
    let bytes = std::fs::metadata(&file).expect("backup size").len();

    // To nowhere: the store's own part.
    let started = Instant::now();
    let mut sink = Sink(0);
    store.backup(&mut sink).expect("backup");
    let to_sink = started.elapsed();

    // A writer alone for a while, then the same writer during a backup.
    let stop = Arc::new(AtomicBool::new(false));
    let alone = writer(store.clone(), n, stop.clone(), now);
    std::thread::sleep(to_sink.max(Duration::from_millis(500)));
    stop.store(true, Ordering::Relaxed);
    let alone_started = Instant::now();
    let alone_ids = alone.join().unwrap();
    let alone_took = to_sink.max(Duration::from_millis(500)) + alone_started.elapsed();
    let stop = Arc::new(AtomicBool::new(false));
    let during = writer(store.clone(), n + alone_ids + BATCH, stop.clone(), now);
    let started = Instant::now();
    let mut sink = Sink(0);
    store.backup(&mut sink).expect("backup under writes");
    let under_writes = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let during_ids = during.join().unwrap();
    let during_took = started.elapsed();
    store.close().expect("close");

    let started = Instant::now();
    let mut input = std::io::BufReader::with_capacity(1 << 20, File::open(&file).expect("open"));
    let restore_stats = Store::restore(&mut input, config(&restored, n)).expect("restore");
    let restore_took = started.elapsed();

    let copy = Store::open(config(&restored, n)).expect("open restored");
    for i in (0..n).step_by((n / 10_000).max(1) as usize) {
        assert!(
            copy.check(uuid_id(i.into()).as_bytes(), now)
                .unwrap()
                .is_some(),
            "id {i} missing after restore"
        );
    }
    let live = copy.stats().live_ids;
    copy.close().expect("close restored");

    println!("ids                          {n}");
    println!(
        "fill (claim + durable commit per 1024)   {}",
        rate(n, filled)
    );
    println!(
        "backup file                  {:.1} MiB, {:.1} bytes/id",
        bytes as f64 / (1 << 20) as f64,
        bytes as f64 / n as f64
    );
    println!(
        "backup to a file, synced     {:.3} s: {}, {}",
        to_file.as_secs_f64(),
        rate(n, to_file),
        mib_s(bytes, to_file)
    );
    println!(
        "backup to nowhere            {:.3} s: {}",
        to_sink.as_secs_f64(),
        rate(n, to_sink)
    );
    println!(
        "backup while a writer commits {:.3} s: {}; the writer meanwhile {} (alone {})",
        under_writes.as_secs_f64(),
        rate(n, under_writes),
        rate(during_ids, during_took),
        rate(alone_ids, alone_took)
    );
    println!(
        "restore into an empty dir    {:.3} s: {}, {}",
        restore_took.as_secs_f64(),
        rate(n, restore_took),
        mib_s(bytes, restore_took)
    );
    println!("restored live ids            {live}");
    println!("backup stats                 {stats:?}");
    println!("restore stats                {restore_stats:?}");
}
