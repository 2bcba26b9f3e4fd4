//! A data dir written by the first layout (one sled key per id; `tests/fixtures/store_v1`, see
//! the README there) opens in this release: migrated to segments on first open, every fact
//! kept, and the migration is safe to interrupt.

use std::path::Path;
use std::sync::Arc;

use dedupd::store::kv::{Condition, Expiry};
use dedupd::store::{BloomOrigin, ManualClock};
use dedupd::{Store, StoreConfig, Verdict};

/// When the fixture was written.
const T: u64 = 1_700_000_000_000;

fn copy_fixture(to: &Path) {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store_v1");
    let mut stack = vec![(from, to.to_path_buf())];
    while let Some((src, dst)) = stack.pop() {
        std::fs::create_dir_all(&dst).unwrap();
        for entry in std::fs::read_dir(&src).unwrap() {
            let entry = entry.unwrap();
            let target = dst.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                stack.push((entry.path(), target));
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }
}

fn open(dir: &Path, now: u64) -> Store {
    let mut c = StoreConfig::new(dir);
    c.cache_bytes = 4 << 20;
    c.expected_ids = 1_000;
    c.clock = Arc::new(ManualClock::new(now));
    Store::open(c).expect("open the v1 fixture")
}

/// What the fixture holds, checked at `now` (between 1 h and 24 h after it was written).
fn assert_fixture_facts(store: &Store, now: u64) {
    for i in 0..100 {
        let id = format!("fixture-id-{i}");
        let verdict = store.claim(id.as_bytes(), now).unwrap();
        // 0 was forgotten; those ending in 9 had a 1 h window, passed by now.
        let want_duplicate = i != 0 && i % 10 != 9;
        assert_eq!(
            matches!(verdict, Verdict::Duplicate(_)),
            want_duplicate,
            "{id}: {verdict:?}"
        );
    }
    let seen = store.check(b"fixture-id-5", now).unwrap().unwrap();
    assert_eq!(
        (seen.first_seen_ms, seen.expires_ms),
        (T, T + 86_400_000),
        "first seen and window kept"
    );
    let kv = store.kv();
    assert_eq!(
        kv.get(b"key-0", now).unwrap(),
        None,
        "deleted key stays deleted"
    );
    assert_eq!(kv.get(b"key-9", now).unwrap(), None, "1 h key expired");
    let k1 = kv.get(b"key-1", now).unwrap().unwrap();
    assert_eq!(
        (k1.value.as_slice(), k1.set_ms),
        (&b"value-1b"[..], T + 1_000)
    );
    for i in 2..9 {
        let e = kv.get(format!("key-{i}").as_bytes(), now).unwrap().unwrap();
        assert_eq!(e.value, format!("value-{i}").into_bytes());
        assert_eq!(e.expires_ms, T + 86_400_000);
    }
}

#[test]
fn a_first_layout_data_dir_is_migrated_and_keeps_every_fact() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(dir.path());
    let now = T + 2 * 3_600_000;
    let store = open(dir.path(), now);
    assert_eq!(store.stats().bloom_loaded_from, BloomOrigin::Rebuilt);
    assert_fixture_facts(&store, now);
    // New writes go to the new layout beside the migrated ones...
    let Verdict::New(c) = store.claim(b"after-migration", now).unwrap() else {
        panic!("new id");
    };
    store.commit(vec![c], now).unwrap();
    store
        .kv()
        .set(b"key-new", b"v", Condition::Always, Expiry::Window, now)
        .unwrap();
    // ...and it all survives a clean close (snapshot) and a crash (replay), migrated once.
    store.close().unwrap();
    let store = open(dir.path(), now);
    assert_eq!(store.stats().bloom_loaded_from, BloomOrigin::Snapshot);
    assert_fixture_facts(&store, now);
    drop(store);
    let store = open(dir.path(), now);
    assert_eq!(store.stats().bloom_loaded_from, BloomOrigin::Rebuilt);
    assert_fixture_facts(&store, now);
    assert!(matches!(
        store.claim(b"after-migration", now).unwrap(),
        Verdict::Duplicate(_)
    ));
    assert!(store.kv().get(b"key-new", now).unwrap().is_some());
    // Nothing migrated twice: 99 ids migrated, the ten with a 1 h window expired, one new.
    assert_eq!(store.stats().live_ids, 90);
}

#[test]
fn a_migration_cut_short_is_redone_from_the_untouched_old_trees() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(dir.path());
    // Stand-in for a crash after some segments were written and before the layout marker:
    // segments of garbage in the new trees, the old trees whole.
    {
        let db = sled::open(dir.path()).unwrap();
        db.open_tree("relay_segments")
            .unwrap()
            .insert([0u8; 16], &b"half-written"[..])
            .unwrap();
        db.flush().unwrap();
    }
    let now = T + 2 * 3_600_000;
    let store = open(dir.path(), now);
    assert_fixture_facts(&store, now);
}
