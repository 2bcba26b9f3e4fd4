//! Verdict-by-verdict tests on a real sled dir, with the clock moved by hand.

use std::sync::Arc;
use std::time::Duration;

use super::*;

const T0: u64 = 1_764_000_000_000;
const TTL: Duration = Duration::from_secs(60);

fn config(dir: &Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.ttl = TTL;
    c.expected_ids = 1_000;
    c.cache_bytes = 8 << 20;
    c.clock = Arc::new(ManualClock::new(T0));
    c
}

fn open(dir: &Path) -> Store {
    Store::open(config(dir)).expect("open store")
}

/// Claims `id` and expects a new claim.
fn claim_new(store: &Store, id: &[u8], now: u64) -> Claim {
    match store.claim(id, now).expect("claim") {
        Verdict::New(c) => c,
        other => panic!("expected New for {id:?}, got {other:?}"),
    }
}

fn commit_one(store: &Store, id: &[u8], now: u64) {
    let c = claim_new(store, id, now);
    store.commit(vec![c], now).expect("commit");
}

fn is_duplicate(store: &Store, id: &[u8], now: u64) -> bool {
    matches!(store.claim(id, now).expect("claim"), Verdict::Duplicate(_))
}

#[test]
fn first_claim_is_new() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    // Never seen: new, and the prefilter answered without sled.
    let _c = claim_new(&store, b"a", T0);
    assert_eq!(store.stats().absent_lookups, 1);
}

#[test]
fn committed_id_is_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    commit_one(&store, b"a", T0);
    // Recorded one second ago, window 60 s: duplicate until the window ends.
    match store.claim(b"a", T0 + 1_000).unwrap() {
        Verdict::Duplicate(live) => assert_eq!(live.expires_ms, T0 + 60_000),
        other => panic!("expected Duplicate, got {other:?}"),
    }
    // `check` also reads when it was recorded, from its segment.
    let seen = store.check(b"a", T0 + 1_000).unwrap().unwrap();
    assert_eq!((seen.first_seen_ms, seen.expires_ms), (T0, T0 + 60_000));
    assert_eq!(store.stats().live_ids, 1);
}

#[test]
fn second_claimer_sees_in_flight_and_learns_commit() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let first = claim_new(&store, b"a", T0);
    // Same id while the first claim is held: in flight.
    let Verdict::InFlight(waiter) = store.claim(b"a", T0).unwrap() else {
        panic!("expected InFlight");
    };
    store.commit(vec![first], T0).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    assert_eq!(rt.block_on(waiter.settled()), Settled::Committed);
    assert!(is_duplicate(&store, b"a", T0));
}

#[test]
fn a_claim_batch_answers_each_id_as_claims_one_by_one_would() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    commit_one(&store, b"live", T0);
    let elsewhere = claim_new(&store, b"held", T0);
    let absent_before = store.stats().absent_lookups;
    let long = vec![b'x'; 257];
    let batch: [&[u8]; 8] = [
        b"new", b"live", b"", b"held", b"new", b"live", &long, b"other",
    ];
    let verdicts = store.claim_all(batch.iter().map(|id| (*id, TTL)), T0 + 1);
    assert_eq!(verdicts.len(), batch.len());
    let mut verdicts = verdicts.into_iter();
    let mut next = || verdicts.next().unwrap();
    let Ok(Verdict::New(new)) = next() else {
        panic!("a first-seen id is new")
    };
    assert_eq!(new.id(), b"new");
    let live = |verdict| match verdict {
        Ok(Verdict::Duplicate(live)) => assert_eq!(live.expires_ms, T0 + 60_000),
        other => panic!("expected the live id's duplicate, got {other:?}"),
    };
    live(next());
    // A refused id is answered in its place and held nowhere; the rest goes on.
    assert!(matches!(next(), Err(Error::EmptyId { .. })));
    let Ok(Verdict::InFlight(_)) = next() else {
        panic!("an id held by another claim is in flight")
    };
    let Ok(Verdict::InFlight(second)) = next() else {
        panic!("an id's second coming waits on its first")
    };
    // A live id's second coming is the same duplicate, as after the first one.
    live(next());
    assert!(matches!(next(), Err(Error::IdTooLong { len: 257, .. })));
    let Ok(Verdict::New(other)) = next() else {
        panic!("ids after a refused one are still claimed")
    };
    // "new" and "other" were absent from the filter; the live id's second coming was not
    // looked up again.
    assert_eq!(store.stats().absent_lookups - absent_before, 2);
    assert_eq!(store.stats().in_flight, 3);
    store.commit(vec![new], T0 + 1).unwrap();
    drop((other, elsewhere));
    assert_eq!(store.stats().in_flight, 0);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    assert_eq!(rt.block_on(second.settled()), Settled::Committed);
    assert!(is_duplicate(&store, b"new", T0 + 2));
    let _other_again = claim_new(&store, b"other", T0 + 2);
}

#[test]
fn released_claim_is_new_again_and_waiters_are_told() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let first = claim_new(&store, b"a", T0);
    let Verdict::InFlight(waiter) = store.claim(b"a", T0).unwrap() else {
        panic!("expected InFlight");
    };
    first.release();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    assert_eq!(rt.block_on(waiter.settled()), Settled::Released);
    // Released: the id is new again.
    let _again = claim_new(&store, b"a", T0);
}

#[test]
fn expired_id_is_new_and_sweep_deletes_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    commit_one(&store, b"a", T0);
    let expiry = T0 + TTL.as_millis() as u64;
    // One millisecond before the end of the window: still a duplicate.
    assert!(is_duplicate(&store, b"a", expiry - 1));
    // At the end of the window: new, even before the sweep reached it.
    drop(claim_new(&store, b"a", expiry));
    assert_eq!(store.sweep(expiry - 1, 100).unwrap(), 0);
    assert_eq!(store.sweep(expiry, 100).unwrap(), 1);
    assert_eq!(store.stats().live_ids, 0);
    assert!(store.check(b"a", expiry - 1).unwrap().is_none());
}

#[test]
fn forgotten_id_is_new() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    commit_one(&store, b"a", T0);
    assert!(store.forget(b"a").unwrap());
    assert!(!store.forget(b"a").unwrap());
    let _c = claim_new(&store, b"a", T0);
}

#[test]
fn sweep_keeps_an_id_committed_again_after_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    commit_one(&store, b"a", T0);
    let later = T0 + TTL.as_millis() as u64 + 5;
    // Expired, then recorded again: the old index entry must not delete the new record.
    commit_one(&store, b"a", later);
    assert_eq!(store.sweep(later, 100).unwrap(), 0);
    assert!(is_duplicate(&store, b"a", later + 1));
}

#[test]
fn empty_and_oversized_ids_are_refused_not_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let err = store.claim(b"", T0).unwrap_err();
    assert!(matches!(err, Error::EmptyId { max: 256 }), "{err}");
    let long = vec![b'x'; 257];
    let err = store.claim(&long, T0).unwrap_err();
    assert!(
        matches!(err, Error::IdTooLong { len: 257, max: 256 }),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "id is 257 bytes, over the limit of 256 bytes"
    );
    // Exactly at the limit is fine.
    let _c = claim_new(&store, &long[..256], T0);
}

#[test]
fn configured_id_limit_applies() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.max_id_bytes = 4;
    let store = Store::open(c).unwrap();
    assert!(matches!(
        store.check(b"abcde", T0),
        Err(Error::IdTooLong { len: 5, max: 4 })
    ));
}

#[test]
fn second_opener_is_refused_naming_the_dir() {
    let dir = tempfile::tempdir().unwrap();
    let _store = open(dir.path());
    let err = Store::open(config(dir.path())).unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err}");
    assert!(
        err.to_string().contains(&dir.path().display().to_string()),
        "{err}"
    );
}

/// `Durability::Power` adds a `syncfs` to every group flush: commits (relay ids and Redis keys)
/// still return, and what they wrote is there when the store opens again. (A power cut itself
/// cannot be staged here; the flush's `syncfs` failing would fail the commit.)
#[test]
fn power_durability_commits_and_keeps_what_it_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.durability = Durability::Power;
    let store = Store::open(c.clone()).expect("open store");
    commit_one(&store, b"a", T0);
    assert!(kv_set(
        &store,
        b"k",
        b"v",
        Condition::IfAbsent,
        Expiry::Window
    ));
    drop(store);
    let store = Store::open(c).expect("open store again");
    assert!(is_duplicate(&store, b"a", T0 + 1));
    let got = store.kv().get(b"k", T0).unwrap().expect("the key is there");
    assert_eq!(got.value, b"v");
}

#[test]
fn close_then_open_loads_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    commit_one(&store, b"a", T0);
    store.close().unwrap();
    let store = open(dir.path());
    assert_eq!(store.stats().bloom_loaded_from, BloomOrigin::Snapshot);
    assert!(store.may_contain(b"a").unwrap());
    assert!(is_duplicate(&store, b"a", T0 + 1));
}

#[test]
fn snapshot_with_a_foreign_marker_is_ignored_and_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    commit_one(&store, b"a", T0);
    store.close().unwrap();
    // Replace the marker: the snapshot no longer belongs to this state.
    {
        let db = sled::open(dir.path()).unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert(SNAPSHOT_TOKEN_KEY, &[0u8; 16])
            .unwrap();
        db.flush().unwrap();
    }
    let store = open(dir.path());
    assert_eq!(store.stats().bloom_loaded_from, BloomOrigin::Rebuilt);
    assert!(store.may_contain(b"a").unwrap());
    assert!(is_duplicate(&store, b"a", T0 + 1));
}

#[test]
fn reopen_without_close_rebuilds() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    commit_one(&store, b"a", T0);
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.stats().bloom_loaded_from, BloomOrigin::Rebuilt);
    assert!(is_duplicate(&store, b"a", T0 + 1));
}

#[test]
fn commit_after_close_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let other = store.clone();
    let c = claim_new(&other, b"a", T0);
    store.close().unwrap();
    assert!(matches!(other.commit(vec![c], T0), Err(Error::Closed)));
    // The key-value writes too: the snapshot is written, nothing may change under it.
    let kv = other.kv();
    assert!(matches!(kv.delete(b"a", T0), Err(Error::Closed)));
    assert!(matches!(
        kv.expire(b"a", Expiry::Window, T0),
        Err(Error::Closed)
    ));
}

#[test]
fn unknown_segment_format_is_an_error_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    commit_one(&store, b"a", T0);
    // A segment of a future layout, as a later release might leave it.
    store
        .shared
        .relay
        .segments
        .insert(segment::key(T0 + 60_000, u64::MAX), &[7u8, 1, 0, 0][..])
        .unwrap();
    store.shared.db.flush().unwrap();
    drop(store);
    let err = Store::open(config(dir.path())).unwrap_err();
    assert!(
        matches!(err, Error::UnknownFormat { version: 7, .. }),
        "{err}"
    );
}

#[test]
fn background_compactor_sweeps_expired_ids() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let mut c = config(dir.path());
    c.clock = clock.clone();
    let store = Store::open(c).unwrap();
    for i in 0u32..10 {
        commit_one(&store, &i.to_be_bytes(), T0);
    }
    clock.advance(TTL);
    store.wake_compactor();
    // Poll the compactor's progress (bounded), not the passage of time.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.stats().live_ids > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "compactor did not sweep"
        );
        std::thread::yield_now();
    }
    assert_eq!(store.stats().swept_ids, 10);
}

#[test]
fn rebuild_drops_expired_ids_from_the_filter() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for i in 0u32..200 {
        commit_one(&store, &i.to_be_bytes(), T0);
    }
    commit_one(&store, b"live", T0 + 30_000);
    let later = T0 + TTL.as_millis() as u64;
    store.rebuild_filter(later).unwrap();
    // The live id is still a "maybe"; most expired ones are now a certain "no".
    assert!(store.may_contain(b"live").unwrap());
    let still = (0u32..200)
        .filter(|i| store.may_contain(&i.to_be_bytes()).unwrap())
        .count();
    assert!(still < 20, "{still} expired ids still in the filter");
}

#[test]
fn sweep_in_bounded_batches_deletes_every_expired_id() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for batch in 0u32..5 {
        let claims = (0u32..300)
            .map(|i| claim_new(&store, format!("{batch}-{i}").as_bytes(), T0))
            .collect();
        store.commit(claims, T0).unwrap();
    }
    let later = T0 + TTL.as_millis() as u64;
    // Bounded: each call stops after about 500 ids (whole index entries), until nothing is due.
    let mut calls = Vec::new();
    loop {
        let deleted = store.sweep(later, 500).unwrap();
        if deleted == 0 {
            break;
        }
        calls.push(deleted);
    }
    assert_eq!(calls, vec![600, 600, 300]);
    assert_eq!(store.stats().live_ids, 0);
}

// --- The key-value namespace (Redis endpoint) -------------------------------------------------

use super::kv::{Condition, Entry, Expiry, Write};

fn kv_set(store: &Store, key: &[u8], value: &[u8], cond: Condition, expiry: Expiry) -> bool {
    store
        .kv()
        .set(key, value, cond, expiry, T0)
        .unwrap()
        .written
}

#[test]
fn kv_set_get_with_nx_and_xx() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let kv = store.kv();
    // XX on a missing key: nothing written.
    assert!(!kv_set(
        &store,
        b"k",
        b"v0",
        Condition::IfPresent,
        Expiry::Window
    ));
    assert_eq!(kv.get(b"k", T0).unwrap(), None);
    // NX on a missing key writes, with the window as expiry when none is given.
    assert!(kv_set(
        &store,
        b"k",
        b"v1",
        Condition::IfAbsent,
        Expiry::Window
    ));
    let want = Entry {
        value: b"v1".to_vec(),
        set_ms: T0,
        expires_ms: T0 + TTL.as_millis() as u64,
    };
    assert_eq!(kv.get(b"k", T0).unwrap(), Some(want.clone()));
    // NX again: refused, and the caller learns what is there.
    let out = kv
        .set(b"k", b"v2", Condition::IfAbsent, Expiry::Window, T0)
        .unwrap();
    assert!(!out.written);
    assert_eq!(out.previous, Some(want));
    // XX on a live key overwrites; an explicit TTL applies.
    assert!(kv_set(
        &store,
        b"k",
        b"v3",
        Condition::IfPresent,
        Expiry::In(Duration::from_secs(5))
    ));
    let got = kv.get(b"k", T0).unwrap().unwrap();
    assert_eq!(
        (got.value.as_slice(), got.expires_ms),
        (&b"v3"[..], T0 + 5_000)
    );
    assert_eq!(kv.len(), 1);
}

#[test]
fn kv_expiry_keep_expire_and_past_times() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let kv = store.kv();
    kv_set(
        &store,
        b"k",
        b"v",
        Condition::Always,
        Expiry::In(Duration::from_secs(10)),
    );
    // KEEPTTL keeps the expiry while the value changes.
    kv_set(&store, b"k", b"w", Condition::Always, Expiry::Keep);
    assert_eq!(kv.get(b"k", T0).unwrap().unwrap().expires_ms, T0 + 10_000);
    // EXPIRE moves it; the key is gone at its expiry.
    assert!(kv
        .expire(b"k", Expiry::In(Duration::from_secs(2)), T0)
        .unwrap());
    assert!(kv.get(b"k", T0 + 1_999).unwrap().is_some());
    assert!(kv.get(b"k", T0 + 2_000).unwrap().is_none());
    assert!(!kv
        .expire(b"missing", Expiry::In(Duration::from_secs(2)), T0)
        .unwrap());
    // An expiry in the past deletes, for EXPIRE and for SET ... PXAT alike.
    assert!(kv.expire(b"k", Expiry::At(T0 - 1), T0).unwrap());
    assert!(kv.get(b"k", T0).unwrap().is_none());
    assert!(kv_set(
        &store,
        b"p",
        b"v",
        Condition::Always,
        Expiry::At(T0)
    ));
    assert!(kv.get(b"p", T0).unwrap().is_none());
    assert_eq!(kv.len(), 0);
}

#[test]
fn kv_delete_and_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let kv = store.kv();
    kv_set(
        &store,
        b"a",
        b"1",
        Condition::Always,
        Expiry::In(Duration::from_secs(1)),
    );
    kv_set(&store, b"b", b"2", Condition::Always, Expiry::Window);
    assert!(kv.delete(b"b", T0).unwrap());
    assert!(!kv.delete(b"b", T0).unwrap());
    // The expired key is deleted by the sweep, through the namespace's own index.
    assert_eq!(store.sweep(T0 + 1_000, 100).unwrap(), 1);
    assert!(kv.is_empty());
}

#[test]
fn kv_keys_and_relay_ids_are_separate_namespaces() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    commit_one(&store, b"order-1", T0);
    assert_eq!(store.kv().get(b"order-1", T0).unwrap(), None);
    kv_set(
        &store,
        b"order-2",
        b"done",
        Condition::IfAbsent,
        Expiry::Window,
    );
    let _still_new = claim_new(&store, b"order-2", T0);
    assert_eq!(store.stats().redis_keys, 1);
    assert_eq!(store.stats().live_ids, 1);
}

#[test]
fn kv_scan_pages_through_live_keys() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let kv = store.kv();
    for i in 0..7u8 {
        kv_set(
            &store,
            &[b'k', b'0' + i],
            b"v",
            Condition::Always,
            Expiry::Window,
        );
    }
    kv_set(
        &store,
        b"k9",
        b"v",
        Condition::Always,
        Expiry::In(Duration::from_millis(1)),
    );
    let mut seen = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = kv.scan(after.as_deref(), 3, T0 + 1).unwrap();
        seen.extend(page.keys);
        match page.next {
            Some(k) => after = Some(k),
            None => break,
        }
    }
    // Seven live keys, each once (pages follow the index's shards, not key order); the
    // expired one is skipped.
    seen.sort();
    let want: Vec<Vec<u8>> = (0..7u8).map(|i| vec![b'k', b'0' + i]).collect();
    assert_eq!(seen, want);
}

#[test]
fn kv_keys_survive_close_and_crash() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    kv_set(&store, b"closed", b"1", Condition::Always, Expiry::Window);
    store.close().unwrap();
    let store = open(dir.path());
    assert_eq!(store.stats().bloom_loaded_from, BloomOrigin::Snapshot);
    assert!(store.kv().get(b"closed", T0).unwrap().is_some());
    kv_set(&store, b"crashed", b"2", Condition::Always, Expiry::Window);
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.stats().bloom_loaded_from, BloomOrigin::Rebuilt);
    for key in [&b"closed"[..], b"crashed"] {
        assert!(store.kv().get(key, T0).unwrap().is_some(), "{key:?} lost");
    }
    assert_eq!(store.kv().len(), 2);
}

#[test]
fn kv_deferred_writes_are_durable_after_one_wait() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let kv = store.kv();
    let mut last = None;
    for i in 0..50u32 {
        let key = format!("p-{i}");
        let (out, ticket) = kv
            .batch(|tx| {
                tx.set(
                    Write::new(key.as_bytes(), b"1", Condition::IfAbsent, Expiry::Window),
                    T0,
                )
            })
            .unwrap();
        let out = out.unwrap();
        assert!(out.written);
        // Visible at once to readers, before it is durable.
        assert!(kv.get(key.as_bytes(), T0).unwrap().is_some());
        assert!(last.is_none_or(|l| l < ticket), "tickets grow");
        last = Some(ticket);
    }
    let (_, ticket) = kv.batch(|tx| tx.delete(b"p-0", T0)).unwrap();
    kv.wait_durable(ticket.max(last.unwrap())).unwrap();
    // One wait, then a crash (no close): all of it is there.
    drop(kv);
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.kv().len(), 49);
    assert!(store.kv().get(b"p-49", T0).unwrap().is_some());
    assert!(store.kv().get(b"p-0", T0).unwrap().is_none());
}

#[test]
fn kv_batch_rolls_back_to_a_savepoint() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let kv = store.kv();
    kv_set(&store, b"kept", b"1", Condition::Always, Expiry::Window);
    kv_set(
        &store,
        b"changed",
        b"old",
        Condition::Always,
        Expiry::Window,
    );
    let (seen, ticket) = kv
        .batch(|tx| {
            tx.set(
                Write::new(b"a", b"1", Condition::Always, Expiry::Window),
                T0,
            )
            .unwrap();
            let sp = tx.savepoint();
            tx.set(
                Write::new(b"b", b"2", Condition::Always, Expiry::Window),
                T0,
            )
            .unwrap();
            tx.set(
                Write::new(b"changed", b"new", Condition::Always, Expiry::Window),
                T0,
            )
            .unwrap();
            assert!(tx.delete(b"kept", T0).unwrap());
            // Inside the batch its own writes are visible.
            let seen = tx.get(b"changed", T0).unwrap().map(|e| e.value);
            tx.rollback_to(sp).unwrap();
            seen
        })
        .unwrap();
    kv.wait_durable(ticket).unwrap();
    assert_eq!(seen.as_deref(), Some(&b"new"[..]));
    // Before the savepoint: kept. After it: all undone, earlier values back.
    assert_eq!(kv.get(b"a", T0).unwrap().unwrap().value, b"1");
    assert_eq!(kv.get(b"b", T0).unwrap(), None);
    assert_eq!(kv.get(b"changed", T0).unwrap().unwrap().value, b"old");
    assert_eq!(kv.get(b"kept", T0).unwrap().unwrap().value, b"1");
    // And so it stays after a crash.
    drop(kv);
    drop(store);
    let store = open(dir.path());
    let kv = store.kv();
    assert_eq!(kv.get(b"b", T0).unwrap(), None);
    assert_eq!(kv.get(b"changed", T0).unwrap().unwrap().value, b"old");
    assert_eq!(kv.get(b"kept", T0).unwrap().unwrap().value, b"1");
}

#[test]
fn forget_all_makes_every_id_new_and_stays_so() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for id in [&b"a"[..], b"b", b"c"] {
        commit_one(&store, id, T0);
    }
    store
        .kv()
        .set(b"k", b"v", Condition::Always, Expiry::Window, T0)
        .unwrap();
    assert_eq!(store.forget_all().unwrap(), 3);
    assert!(!is_duplicate(&store, b"a", T0));
    assert_eq!(store.stats().live_ids, 0);
    // The Redis endpoint's keys are another namespace: untouched.
    assert!(store.kv().get(b"k", T0).unwrap().is_some());
    drop(store);
    let store = open(dir.path());
    assert!(!is_duplicate(&store, b"c", T0));
}

#[test]
fn logged_commit_applies_on_another_store_with_its_offset() {
    let active_dir = tempfile::tempdir().unwrap();
    let standby_dir = tempfile::tempdir().unwrap();
    let active = open(active_dir.path());
    let standby = open(standby_dir.path());
    assert_eq!(standby.applied_offset().unwrap(), None);
    let claims = vec![claim_new(&active, b"a", T0), claim_new(&active, b"b", T0)];
    let segment = active.commit_logged(claims, T0).unwrap();
    assert!(is_duplicate(&active, b"a", T0));
    // Applied twice (a redelivered stream message): the same state.
    assert_eq!(standby.apply_logged(&segment, 7, T0 + 1).unwrap(), 2);
    assert_eq!(standby.apply_logged(&segment, 7, T0 + 1).unwrap(), 2);
    assert_eq!(standby.applied_offset().unwrap(), Some(7));
    // The window runs from the active's commit, not from when the standby applied it.
    match standby.claim(b"a", T0 + 2).unwrap() {
        Verdict::Duplicate(seen) => assert_eq!(seen.expires_ms, T0 + TTL.as_millis() as u64),
        other => panic!("expected Duplicate, got {other:?}"),
    }
    assert!(!is_duplicate(&standby, b"c", T0));
    // Past the window nothing is applied.
    let late = T0 + TTL.as_millis() as u64;
    assert_eq!(standby.apply_logged(&segment, 8, late).unwrap(), 0);
    // Offset and ids survive a crash.
    drop(standby);
    let standby = open(standby_dir.path());
    assert_eq!(standby.applied_offset().unwrap(), Some(8));
    assert!(is_duplicate(&standby, b"b", T0 + 3));
    // Garbage is refused, nothing applied.
    assert!(standby.apply_logged(b"\x01\x10junk", 9, T0).is_err());
    assert_eq!(standby.applied_offset().unwrap(), Some(8));
}

#[test]
fn replicated_commit_hands_out_its_segment_before_it_returns() {
    let active_dir = tempfile::tempdir().unwrap();
    let standby_dir = tempfile::tempdir().unwrap();
    let active = open(active_dir.path());
    let standby = open(standby_dir.path());
    let claims = vec![claim_new(&active, b"a", T0), claim_new(&active, b"b", T0)];
    let mut handed = None;
    active
        .commit_replicated(claims, T0, |segment| handed = Some(segment))
        .unwrap();
    // Returned: durable here, and the segment was handed out on the way.
    assert!(is_duplicate(&active, b"a", T0));
    let segment = handed.expect("the segment was handed out");
    assert_eq!(standby.apply_logged(&segment, 3, T0 + 1).unwrap(), 2);
    assert!(is_duplicate(&standby, b"b", T0 + 2));
    // An empty batch has nothing to hand out.
    let mut called = false;
    active
        .commit_replicated(Vec::new(), T0, |_| called = true)
        .unwrap();
    assert!(!called);
}

#[test]
fn a_noted_offset_is_recorded_and_kept_with_the_next_commit() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    commit_one(&store, b"a", T0);
    let live = store.stats().live_ids;
    store.note_applied_offset(9).unwrap();
    assert_eq!(store.applied_offset().unwrap(), Some(9));
    assert_eq!(store.stats().live_ids, live, "nothing applied");
    // The next commit's flush makes it durable with everything written before it.
    commit_one(&store, b"b", T0);
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.applied_offset().unwrap(), Some(9));
    assert!(is_duplicate(&store, b"a", T0));
}

#[test]
fn backup_while_writing_restores_everything_recorded_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for i in 0u32..2_000 {
        commit_one(&store, format!("before-{i}").as_bytes(), T0);
    }
    kv_set(&store, b"k", b"v", Condition::Always, Expiry::Window);
    // A writer goes on while the backup runs.
    let writer = {
        let store = store.clone();
        std::thread::spawn(move || {
            for i in 0u32..2_000 {
                commit_one(&store, format!("during-{i}").as_bytes(), T0);
            }
        })
    };
    let mut copy = Vec::new();
    let stats = store.backup(&mut copy).unwrap();
    writer.join().unwrap();
    assert!(stats.entries >= 2_001, "{stats:?}");
    assert_eq!(stats.bytes, copy.len() as u64);

    let restored_dir = tempfile::tempdir().unwrap();
    let target = restored_dir.path().join("restored");
    let restored_stats = Store::restore(&mut copy.as_slice(), config(&target)).unwrap();
    assert_eq!(restored_stats, stats);
    let restored = open(&target);
    for i in 0u32..2_000 {
        assert!(is_duplicate(
            &restored,
            format!("before-{i}").as_bytes(),
            T0
        ));
    }
    assert_eq!(restored.kv().get(b"k", T0).unwrap().unwrap().value, b"v");
    // The same ids digest the same there: the secret travelled with the backup.
    assert!(!is_duplicate(&restored, b"never-seen", T0));
}

#[test]
fn restore_refuses_a_used_dir_and_a_damaged_backup() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    commit_one(&store, b"a", T0);
    let mut copy = Vec::new();
    store.backup(&mut copy).unwrap();
    // Into a dir holding a store: refused, nothing touched.
    let err = Store::restore(&mut copy.as_slice(), config(dir.path())).unwrap_err();
    assert!(matches!(err, Error::NotEmpty { .. }), "{err}");
    // One byte flipped or the tail cut: refused, and no half-restored dir left behind.
    let target = tempfile::tempdir().unwrap().path().join("r");
    let mut damaged = copy.clone();
    let mid = damaged.len() / 2;
    damaged[mid] ^= 0x40;
    for bad in [
        damaged,
        copy[..copy.len() - 3].to_vec(),
        b"not a backup".to_vec(),
    ] {
        let err = Store::restore(&mut bad.as_slice(), config(&target)).unwrap_err();
        assert!(matches!(err, Error::BadBackup(_)), "{err}");
        assert!(!target.exists());
    }
}
