//! Criterion benchmarks of the dedup store, with the seed's Redis `SET NX EX` in the same run so
//! the ratios come from one machine state.
//!
//! `cargo bench --bench store` (needs the local Redis on 127.0.0.1:6379; `REDIS_URL` overrides).
//! Benchmark ids are fixed so results compare across changes:
//! `lookup/bloom_negative`, `lookup/present`, `claim_commit/durable_batch_1024`,
//! `redis_set_nx_ex/pipeline_1`, `redis_set_nx_ex/pipeline_32`; `claim_commit/sled_key_per_id_1024`
//! is the layout before segments (one sled key per id, one flush per batch), as the baseline
//! of the commit path. `durable_batch_1024` claims its 1024 fresh ids as one batch
//! (`Store::claim_all`, as the relay claims a read's deliveries) and commits them.
//!
//! First it prints what a load costs on this machine within 2 MiB and within 32 MiB (a chase of
//! dependent loads to random lines). The index of 1 M ids takes about 20 MiB and its filter
//! about 3 MiB: a present lookup waits on loads like the second kind, one after another (the
//! filter's lines, then the index table's control bytes, then its entry), and a claim and
//! commit on several an id, so the store's figures move with this one from machine to machine.

use std::hint::black_box;
use std::sync::OnceLock;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use dedupd::store::system_now_ms;
use dedupd::{Store, StoreConfig};

/// Live ids in the store the lookups run against.
const LIVE_IDS: u64 = 1_000_000;
/// Ids per durable commit in `claim_commit`.
const COMMIT_BATCH: usize = 1024;
/// Ids cycled through by the lookup loops (enough to defeat the CPU cache on the sled side).
const PROBES: usize = 100_000;

#[path = "../tests/support/ids.rs"]
mod ids;
use ids::uuid_id;

/// Next index into the probe list; a compare instead of `%`, whose division would be a visible
/// share of a 100 ns lookup.
fn next_probe(i: usize) -> usize {
    if i + 1 == PROBES {
        0
    } else {
        i + 1
    }
}

fn store_config(dir: &std::path::Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.expected_ids = LIVE_IDS;
    c
}

/// A store holding `LIVE_IDS` live ids numbered `0..LIVE_IDS`, built once per bench process.
fn filled_store() -> &'static Store {
    static STORE: OnceLock<(tempfile::TempDir, Store)> = OnceLock::new();
    &STORE
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("temp dir");
            let store = Store::open(store_config(dir.path())).expect("open store");
            ids::record_uuid_ids(&store, 0, LIVE_IDS, COMMIT_BATCH as u64, system_now_ms());
            (dir, store)
        })
        .1
}

/// Nanoseconds per load of a chain of dependent loads through `bytes` of memory, each to a
/// random cache line: the latency of the cache (or memory) a working set of that size lives in.
fn chase_ns(bytes: usize) -> f64 {
    use rand::seq::SliceRandom;
    const LINE_WORDS: usize = 64 / std::mem::size_of::<usize>();
    let lines = bytes / 64;
    let mut order: Vec<usize> = (0..lines).collect();
    order.shuffle(&mut rand::rng());
    // One word per line, holding the index of the next line's word: one cycle through all.
    let mut next = vec![0usize; lines * LINE_WORDS];
    for (i, &line) in order.iter().enumerate() {
        next[line * LINE_WORDS] = order[(i + 1) % lines] * LINE_WORDS;
    }
    let steps = 1_000_000;
    let mut at = 0;
    for _ in 0..steps {
        at = next[at];
    }
    let started = std::time::Instant::now();
    for _ in 0..steps {
        at = next[at];
    }
    black_box(at);
    started.elapsed().as_nanos() as f64 / steps as f64
}

/// Prints the machine's cache and memory latency, so each run's figures come with it.
fn machine(_: &mut Criterion) {
    println!(
        "machine: a dependent load to a random line of 2 MiB takes {:.1} ns, of 32 MiB {:.1} ns",
        chase_ns(2 << 20),
        chase_ns(32 << 20)
    );
}

fn lookup(c: &mut Criterion) {
    let store = filled_store();
    let now = system_now_ms();
    let mut group = c.benchmark_group("lookup");
    // One id per iteration; criterion batches iterations itself, so the loop overhead is amortised.
    group.throughput(Throughput::Elements(1));
    // Lookups take tens of nanoseconds: 3 s of samples give tight intervals without a long run.
    group.measurement_time(Duration::from_secs(3));

    // Absent ids, numbered above everything in the store.
    let absent: Vec<String> = (0..PROBES as u128)
        .map(|n| uuid_id(n + u128::from(LIVE_IDS) * 2))
        .collect();
    let mut i = 0;
    group.bench_function("bloom_negative", |b| {
        b.iter(|| {
            i = next_probe(i);
            black_box(store.lookup(absent[i].as_bytes(), now).unwrap())
        })
    });

    let present: Vec<String> = (0..PROBES as u128)
        .map(|n| uuid_id(n * (u128::from(LIVE_IDS) / PROBES as u128)))
        .collect();
    let mut i = 0;
    group.bench_function("present", |b| {
        b.iter(|| {
            i = next_probe(i);
            let seen = store.lookup(present[i].as_bytes(), now).unwrap();
            assert!(seen.is_some());
            black_box(seen)
        })
    });
    group.finish();
}

fn claim_commit(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(store_config(dir.path())).expect("open store");
    let mut group = c.benchmark_group("claim_commit");
    group.throughput(Throughput::Elements(COMMIT_BATCH as u64));
    // Each sample is dominated by an fsync: fewer, longer samples are enough.
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(5));
    let mut next: u128 = 1 << 64;
    group.bench_function("durable_batch_1024", |b| {
        b.iter_batched(
            // Fresh ids, built outside the timing.
            || {
                let ids: Vec<String> = (next..next + COMMIT_BATCH as u128).map(uuid_id).collect();
                next += COMMIT_BATCH as u128;
                ids
            },
            |ids| {
                let now = system_now_ms();
                store
                    .commit(ids::claim_fresh(&store, &ids, now), now)
                    .unwrap();
                // Returned, so criterion frees the ids after the timing as it built them before.
                ids
            },
            BatchSize::PerIteration,
        )
    });
    // The baseline: what one sled key per id costs for the same batch, the same durability.
    let db = sled::Config::new()
        .path(dir.path().join("baseline"))
        .cache_capacity(64 << 20)
        .flush_every_ms(None)
        .open()
        .expect("open the baseline sled");
    let tree = db.open_tree("ids").expect("baseline tree");
    group.bench_function("sled_key_per_id_1024", |b| {
        b.iter_batched(
            || {
                let ids: Vec<String> = (next..next + COMMIT_BATCH as u128).map(uuid_id).collect();
                next += COMMIT_BATCH as u128;
                ids
            },
            |ids| {
                let record = system_now_ms().to_be_bytes();
                for id in &ids {
                    tree.insert(id.as_bytes(), &record).unwrap();
                }
                db.flush().unwrap();
                ids
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

fn redis_set_nx_ex(c: &mut Criterion) {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    let mut con = redis::Client::open(url.as_str())
        .and_then(|client| client.get_connection())
        .unwrap_or_else(|e| panic!("the Redis baseline needs a Redis at {url}: {e}"));
    let mut group = c.benchmark_group("redis_set_nx_ex");
    group.measurement_time(Duration::from_secs(3));
    let mut n: u128 = 0;

    group.throughput(Throughput::Elements(1));
    group.bench_function("pipeline_1", |b| {
        b.iter(|| {
            n += 1;
            let key = format!("msg:{}", uuid_id(n));
            let set: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(1)
                .arg("NX")
                .arg("EX")
                .arg(86_400)
                .query(&mut con)
                .unwrap();
            black_box(set)
        })
    });

    group.throughput(Throughput::Elements(32));
    group.bench_function("pipeline_32", |b| {
        b.iter(|| {
            let mut pipe = redis::pipe();
            for _ in 0..32 {
                n += 1;
                pipe.cmd("SET")
                    .arg(format!("msg:{}", uuid_id(n)))
                    .arg(1)
                    .arg("NX")
                    .arg("EX")
                    .arg(86_400);
            }
            let replies: Vec<Option<String>> = pipe.query(&mut con).unwrap();
            black_box(replies)
        })
    });
    group.finish();
    // The keys would expire on their own (EX 86400); delete exactly ours rather than leave a day
    // of clutter in a Redis others may use.
    let keys: Vec<String> = (1..=n).map(|k| format!("msg:{}", uuid_id(k))).collect();
    for chunk in keys.chunks(1000) {
        let _: i64 = redis::cmd("DEL").arg(chunk).query(&mut con).unwrap();
    }
}

criterion_group!(benches, machine, lookup, claim_commit, redis_set_nx_ex);
criterion_main!(benches);
