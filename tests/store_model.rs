//! Property test: random sequences of store operations against a `HashMap` model. The store may
//! never report a live id as new, and (being exact) never a dead id as a duplicate.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use dedupd::store::ManualClock;
use dedupd::{Claim, Store, StoreConfig, Verdict};
use proptest::prelude::*;

const T0: u64 = 1_764_000_000_000;
const TTL_MS: u64 = 10_000;

#[derive(Debug, Clone)]
enum Op {
    Claim(u8),
    CommitAll,
    ReleaseFirst,
    Forget(u8),
    Advance(u64),
    Sweep,
    Rebuild,
    CloseAndReopen,
    CrashAndReopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..12).prop_map(Op::Claim),
        3 => Just(Op::CommitAll),
        1 => Just(Op::ReleaseFirst),
        1 => (0u8..12).prop_map(Op::Forget),
        2 => (0u64..TTL_MS).prop_map(Op::Advance),
        1 => Just(Op::Sweep),
        1 => Just(Op::Rebuild),
        1 => Just(Op::CloseAndReopen),
        1 => Just(Op::CrashAndReopen),
    ]
}

fn open(dir: &std::path::Path) -> Store {
    let mut c = StoreConfig::new(dir);
    c.ttl = Duration::from_millis(TTL_MS);
    // Tiny filters so generations roll and false positives happen: sled must correct them.
    c.expected_ids = 4;
    c.cache_bytes = 4 << 20;
    c.clock = Arc::new(ManualClock::new(T0));
    Store::open(c).expect("open")
}

fn id(n: u8) -> Vec<u8> {
    format!("id-{n}").into_bytes()
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    // Model: id -> expiry of its record.
    let mut model: HashMap<Vec<u8>, u64> = HashMap::new();
    let mut held: Vec<Claim> = Vec::new();
    let mut now = T0;
    for op in ops {
        match op {
            Op::Claim(n) => {
                let key = id(n);
                let live = model.get(&key).is_some_and(|&exp| now < exp);
                let is_held = held.iter().any(|c| c.id() == key.as_slice());
                match store.claim(&key, now).unwrap() {
                    Verdict::New(c) => {
                        prop_assert!(!live, "live id {n} reported new");
                        prop_assert!(!is_held, "held id {n} reported new");
                        held.push(c);
                    }
                    Verdict::Duplicate(seen) => {
                        prop_assert!(live, "dead id {n} reported duplicate");
                        prop_assert_eq!(Some(&seen.expires_ms), model.get(&key));
                    }
                    Verdict::InFlight(_) => prop_assert!(is_held, "unheld id {n} in flight"),
                }
            }
            Op::CommitAll => {
                for c in &held {
                    model.insert(c.id().to_vec(), now + TTL_MS);
                }
                store.commit(std::mem::take(&mut held), now).unwrap();
            }
            Op::ReleaseFirst => {
                if !held.is_empty() {
                    held.remove(0).release();
                }
            }
            Op::Forget(n) => {
                let key = id(n);
                let removed = store.forget(&key).unwrap();
                match model.remove(&key) {
                    // A live record must be there to remove.
                    Some(exp) if now < exp => prop_assert!(removed, "live id {n} not forgotten"),
                    // An expired one may have been swept already.
                    Some(_) => {}
                    None => prop_assert!(!removed, "unknown id {n} had a record"),
                }
            }
            Op::Advance(ms) => now += ms,
            // Bounded: a sweep that stops part-way must leave nothing inconsistent.
            Op::Sweep => drop(store.sweep(now, 3).unwrap()),
            Op::Rebuild => store.rebuild_filter(now).unwrap(),
            Op::CloseAndReopen | Op::CrashAndReopen => {
                // Claims die with the process; the ids they held are simply not recorded.
                held.clear();
                if matches!(op, Op::CloseAndReopen) {
                    store.close().unwrap();
                } else {
                    drop(store);
                }
                store = open(dir.path());
            }
        }
        // Every id the model says is live is a "maybe" in the filter: no false negatives.
        for (key, &exp) in &model {
            if now < exp {
                prop_assert!(
                    store.may_contain(key).unwrap(),
                    "filter misses live {key:?}"
                );
            }
        }
    }
    drop(held);
    store.close().unwrap();
    Ok(())
}

proptest! {
    // Each case opens sled on a real temp dir a few times: 128 cases keep the suite quick.
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn store_agrees_with_a_hashmap(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops)?;
    }
}
