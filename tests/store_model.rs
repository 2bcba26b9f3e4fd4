//! Property test: random sequences of store operations against a `HashMap` model. The store may
//! never report a live id as new, and (being exact) never a dead id as a duplicate; the Redis
//! endpoint's keys (SET NX, EXPIRE, DEL) answer as the model does, across sweeps (segments
//! rewritten forward), clean closes and crashes (replay of the segments).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use dedupd::store::kv::{Condition, Expiry};
use dedupd::store::ManualClock;
use dedupd::{Claim, Store, StoreConfig, Verdict};
use proptest::prelude::*;

const T0: u64 = 1_764_000_000_000;
const TTL_MS: u64 = 10_000;

#[derive(Debug, Clone)]
enum Op {
    Claim(u8),
    /// One `claim_all` of these ids (repeats allowed), answered as claims one by one.
    ClaimAll(Vec<u8>),
    CommitAll,
    ReleaseFirst,
    Forget(u8),
    Advance(u64),
    Sweep,
    Rebuild,
    CloseAndReopen,
    CrashAndReopen,
    /// `SET key-n n NX PX ms`.
    KvSetNx(u8, u64),
    /// `PEXPIRE key-n ms`.
    KvExpire(u8, u64),
    /// `DEL key-n`.
    KvDel(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..12).prop_map(Op::Claim),
        2 => proptest::collection::vec(0u8..12, 1..6).prop_map(Op::ClaimAll),
        3 => Just(Op::CommitAll),
        1 => Just(Op::ReleaseFirst),
        1 => (0u8..12).prop_map(Op::Forget),
        2 => (0u64..TTL_MS).prop_map(Op::Advance),
        1 => Just(Op::Sweep),
        1 => Just(Op::Rebuild),
        1 => Just(Op::CloseAndReopen),
        1 => Just(Op::CrashAndReopen),
        3 => (0u8..8, 1u64..3 * TTL_MS).prop_map(|(n, ms)| Op::KvSetNx(n, ms)),
        1 => (0u8..8, 1u64..3 * TTL_MS).prop_map(|(n, ms)| Op::KvExpire(n, ms)),
        1 => (0u8..8).prop_map(Op::KvDel),
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

/// The window the batch claims ask for: the store's own, as `claim` uses.
const TTL: Duration = Duration::from_millis(TTL_MS);

/// Checks a claim's verdict for `id(n)` against the model, and keeps a new claim in `held`.
fn check_claim(
    n: u8,
    verdict: Verdict,
    model: &HashMap<Vec<u8>, u64>,
    held: &mut Vec<Claim>,
    now: u64,
) -> Result<(), TestCaseError> {
    let key = id(n);
    let live = model.get(&key).is_some_and(|&exp| now < exp);
    let is_held = held.iter().any(|c| c.id() == key.as_slice());
    match verdict {
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
    Ok(())
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    // Model: id -> expiry of its record.
    let mut model: HashMap<Vec<u8>, u64> = HashMap::new();
    let mut held: Vec<Claim> = Vec::new();
    // Model of the Redis keys: key -> (value, expiry).
    let mut keys: HashMap<Vec<u8>, (Vec<u8>, u64)> = HashMap::new();
    let mut now = T0;
    for op in ops {
        let op_name = format!("{op:?}");
        match op {
            Op::Claim(n) => {
                let verdict = store.claim(&id(n), now).unwrap();
                check_claim(n, verdict, &model, &mut held, now)?;
            }
            Op::ClaimAll(ns) => {
                let verdicts = store.claim_all(ns.iter().map(|&n| (id(n), TTL)), now);
                prop_assert_eq!(verdicts.len(), ns.len());
                for (&n, verdict) in ns.iter().zip(verdicts) {
                    check_claim(n, verdict.unwrap(), &model, &mut held, now)?;
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
            Op::KvSetNx(n, ms) => {
                let key = format!("key-{n}").into_bytes();
                let live = keys.get(&key).is_some_and(|&(_, exp)| now < exp);
                let value = vec![n; (ms % 7) as usize + 1];
                let out = store
                    .kv()
                    .set(
                        &key,
                        &value,
                        Condition::IfAbsent,
                        Expiry::In(Duration::from_millis(ms)),
                        now,
                    )
                    .unwrap();
                prop_assert_eq!(out.written, !live, "SET NX on key-{}", n);
                if !live {
                    keys.insert(key, (value, now + ms));
                }
            }
            Op::KvExpire(n, ms) => {
                let key = format!("key-{n}").into_bytes();
                let found = store
                    .kv()
                    .expire(&key, Expiry::In(Duration::from_millis(ms)), now)
                    .unwrap();
                match keys.get_mut(&key) {
                    Some((_, exp)) if now < *exp => {
                        prop_assert!(found, "EXPIRE missed live key-{}", n);
                        *exp = now + ms;
                    }
                    _ => prop_assert!(!found, "EXPIRE found dead key-{}", n),
                }
            }
            Op::KvDel(n) => {
                let key = format!("key-{n}").into_bytes();
                let removed = store.kv().delete(&key, now).unwrap();
                let live = keys.remove(&key).is_some_and(|(_, exp)| now < exp);
                prop_assert_eq!(removed, live, "DEL key-{}", n);
            }
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
        // Every Redis key reads as the model says, value and expiry.
        for n in 0u8..8 {
            let key = format!("key-{n}").into_bytes();
            let want = keys.get(&key).filter(|&&(_, exp)| now < exp);
            let got = store.kv().get(&key, now).unwrap();
            prop_assert_eq!(
                got.map(|e| (e.value, e.expires_ms)),
                want.cloned(),
                "key-{} after {:?}",
                n,
                op_name
            );
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
