//! Real crash test (own harness): a child process commits ids in batches, printing how far each
//! commit got once it returned, and aborts itself mid-stream. The parent reopens the data dir and
//! checks that every id whose commit had returned is a duplicate and a Bloom "maybe".
//!
//! `cargo test --test store_crash` runs the parent; the parent runs itself as the child.

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use dedupd::store::{system_now_ms, BloomOrigin};
use dedupd::{Store, StoreConfig, Verdict};

const CHILD_FLAG: &str = "--crash-child";
const BATCH: u64 = 64;
/// Signal number of `abort()` on Linux.
const SIGABRT: i32 = 6;

fn config(dir: &Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.ttl = Duration::from_secs(3600);
    c.expected_ids = 10_000;
    c.cache_bytes = 8 << 20;
    c
}

/// Id `n` of crash round `round`. Rounds use separate id spaces: a child may be aborted after a
/// commit returned and before it printed, so the next round cannot start where the last printed.
fn id(round: u64, n: u64) -> Vec<u8> {
    format!("crash-{round}-{n:08}").into_bytes()
}

/// Child: commit ids `0..` of `round` in batches until a timer aborts the process.
fn child(dir: &Path, round: u64, abort_after: Duration) -> ! {
    let store = Store::open(config(dir)).expect("child: open store");
    std::thread::spawn(move || {
        std::thread::sleep(abort_after);
        std::process::abort();
    });
    let mut next = 0;
    loop {
        let now = system_now_ms();
        let claims = (next..next + BATCH)
            .map(
                |n| match store.claim(&id(round, n), now).expect("child: claim") {
                    Verdict::New(c) => c,
                    other => panic!("child: id {n} not new: {other:?}"),
                },
            )
            .collect();
        store.commit(claims, now).expect("child: commit");
        next += BATCH;
        // Only now is everything below `next` durable.
        println!("{next}");
    }
}

/// Runs one child and returns the highest `next` it reported.
fn crash_round(dir: &Path, round: u64, abort_after: Duration) -> u64 {
    let mut proc = Command::new(std::env::current_exe().unwrap())
        .arg(CHILD_FLAG)
        .arg(dir)
        .arg(round.to_string())
        .arg(abort_after.as_millis().to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let mut reached = 0;
    for line in BufReader::new(proc.stdout.take().unwrap()).lines() {
        reached = line.unwrap().trim().parse().expect("child prints numbers");
    }
    let status = proc.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(SIGABRT),
        "child should die by abort, got {status:?}"
    );
    assert!(reached > 0, "child committed nothing before the crash");
    reached
}

/// Every id each round reported committed (`rounds[r]` ids of round `r`) must be on disk and in
/// the rebuilt filter.
fn verify(dir: &Path, rounds: &[u64]) {
    let store = Store::open(config(dir)).expect("reopen after crash");
    let stats = store.stats();
    // No clean close happened: the filter must have been rebuilt from sled, not trusted.
    assert_eq!(stats.bloom_loaded_from, BloomOrigin::Rebuilt);
    let total: u64 = rounds.iter().sum();
    assert!(
        stats.live_ids >= total,
        "{} live < {total} committed",
        stats.live_ids
    );
    let now = system_now_ms();
    for (round, &upto) in rounds.iter().enumerate() {
        for n in 0..upto {
            let id = id(round as u64, n);
            assert!(
                store.may_contain(&id).unwrap(),
                "filter misses id {n} of round {round}"
            );
            assert!(
                store.check(&id, now).unwrap().is_some(),
                "lost id {n} of round {round}"
            );
        }
    }
    println!(
        "verified {total} committed ids after crash ({} records on disk)",
        stats.live_ids
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(CHILD_FLAG) {
        let dir = Path::new(&args[2]);
        let round = args[3].parse().unwrap();
        let after = Duration::from_millis(args[4].parse().unwrap());
        child(dir, round, after);
    }
    // `cargo test -- --list` and friends: this binary has one test, and lists it.
    if args.iter().any(|a| a == "--list") {
        println!("store_crash: test");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Round 1: crash a fresh store. Round 2: reopen the crashed store, write on, crash again
    // (the rebuilt filter must carry the first round's ids into the second crash).
    let first = crash_round(dir.path(), 0, Duration::from_millis(400));
    verify(dir.path(), &[first]);
    let second = crash_round(dir.path(), 1, Duration::from_millis(400));
    verify(dir.path(), &[first, second]);
    println!("test store_crash ... ok");
}
