//! Footprint and timing of the store at N ids:
//! `cargo run --release --example store_footprint -- N [DIR]`
//!
//! Fills N UUID-shaped ids (durable commits of 1024), then prints resident memory and disk bytes
//! per id, lookup rates, restart time with the Bloom snapshot and rebuild time without it, and the
//! latency of claims while the compactor-style sweep deletes all N ids once they expire.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dedupd::store::{system_now_ms, BloomOrigin, ManualClock};
use dedupd::{Store, StoreConfig};

const BATCH: u64 = 1024;
const TTL: Duration = Duration::from_secs(24 * 3600);

#[path = "../tests/support/ids.rs"]
mod ids;
use ids::{record_uuid_ids, uuid_id};

/// Resident set size of this process in bytes (Linux).
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn config(dir: &std::path::Path, n: u64, clock: Arc<ManualClock>) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.expected_ids = n;
    c.ttl = TTL;
    c.clock = clock;
    c
}

fn rate(count: u64, took: Duration) -> String {
    let per_s = count as f64 / took.as_secs_f64();
    if per_s >= 1e6 {
        format!("{:.2} M/s", per_s / 1e6)
    } else {
        format!("{:.0} k/s", per_s / 1e3)
    }
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("N must be a number of ids"))
        .unwrap_or(1_000_000);
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = std::env::args()
        .nth(2)
        .map_or_else(|| tmp.path().to_path_buf(), Into::into);
    let t0 = system_now_ms();
    let clock = Arc::new(ManualClock::new(t0));
    let cfg = config(&dir, n, clock.clone());
    let cache = cfg.cache_bytes;

    let rss_before = rss_bytes();
    let store = Store::open(cfg).expect("open");
    let started = Instant::now();
    record_uuid_ids(&store, 0, n, BATCH, t0);
    let fill = started.elapsed();
    let stats = store.stats();
    let rss = rss_bytes().saturating_sub(rss_before);

    // Ids made before the timing: what is timed is the store's lookup (digest included).
    let probes = n.min(200_000);
    let present_ids: Vec<String> = (0..probes)
        .map(|i| uuid_id((i * (n / probes)).into()))
        .collect();
    let absent_ids: Vec<String> = (0..probes).map(|i| uuid_id((n + i).into())).collect();
    let started = Instant::now();
    for id in &present_ids {
        assert!(store.lookup(id.as_bytes(), t0).unwrap().is_some());
    }
    let present = started.elapsed();
    let started = Instant::now();
    for id in &absent_ids {
        assert!(store.lookup(id.as_bytes(), t0).unwrap().is_none());
    }
    let absent = started.elapsed();
    let fp = store.stats();

    println!("ids                         {n}");
    println!("fill (claim + durable commit per 1024)  {}", rate(n, fill));
    println!("present lookups             {}", rate(probes, present));
    println!("absent lookups              {}", rate(probes, absent));
    println!(
        "bloom false positives       {:.3} % over {} absent lookups ({} generation(s), {:.1} MiB)",
        fp.false_positive_rate * 100.0,
        fp.absent_lookups,
        fp.bloom_generations,
        fp.bloom_bytes as f64 / (1 << 20) as f64
    );
    println!(
        "disk bytes per id           {:.1}",
        stats.disk_bytes as f64 / n as f64
    );
    println!(
        "resident bytes per id       {:.1} total, {:.1} beyond the {} MiB sled cache (index {:.1}, Bloom {:.1})",
        rss as f64 / n as f64,
        rss.saturating_sub(cache) as f64 / n as f64,
        cache >> 20,
        stats.index_bytes as f64 / n as f64,
        stats.bloom_bytes as f64 / n as f64
    );

    let started = Instant::now();
    store.close().expect("close");
    let close = started.elapsed();
    let started = Instant::now();
    let store = Store::open(config(&dir, n, clock.clone())).expect("reopen");
    let with_snapshot = started.elapsed();
    assert_eq!(store.stats().bloom_loaded_from, BloomOrigin::Snapshot);
    drop(store); // no close, as after kill -9: no snapshot, the next open must replay
    let started = Instant::now();
    let store = Store::open(config(&dir, n, clock.clone())).expect("reopen");
    let rebuild = started.elapsed();
    assert_eq!(store.stats().bloom_loaded_from, BloomOrigin::Rebuilt);
    // The index answers from here; the compactor fills the Bloom filter beside it.
    while store.stats().bloom_rebuilds == 0 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let filled = started.elapsed();
    println!("close (flush + snapshot)    {close:.2?}");
    println!("restart with snapshot       {with_snapshot:.2?}");
    println!("restart replaying segments  {rebuild:.2?} (serving), Bloom filled at {filled:.2?}");

    // Every id expires: the compactor sweeps them all in bounded batches while this thread keeps
    // claiming new ids, timing each claim.
    let later = clock.advance(TTL);
    store.wake_compactor();
    let started = Instant::now();
    let mut latencies = Vec::new();
    let mut i = n * 2;
    while store.stats().live_ids > 0 {
        for _ in 0..1000 {
            let id = uuid_id(i.into());
            i += 1;
            let t = Instant::now();
            let verdict = store.claim(id.as_bytes(), later).unwrap();
            latencies.push(t.elapsed());
            drop(verdict);
        }
    }
    let took = started.elapsed();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "sweep by the compactor      {n} expired ids in {took:.2?} ({})",
        rate(n, took)
    );
    println!(
        "claims during the sweep     {} claims, p50 {:.1?}, p99 {:.1?}, max {:.1?}",
        latencies.len(),
        pct(0.5),
        pct(0.99),
        latencies.last().unwrap()
    );
    println!("disk bytes after the sweep  {}", store.stats().disk_bytes);
}
