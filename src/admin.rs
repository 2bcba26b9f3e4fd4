//! Admin answers about the store: check an id, forget it, record it, stats. One implementation for both
//! roads to it: the running service's HTTP endpoint (`/ids/{id}`, `/stats`) and the CLI opening
//! the data dir itself when no service holds it.
//!
//! Every function here calls the store and so blocks: call it off the async workers.

use std::time::{Duration, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::metrics::{oldest_age, Metrics};
use crate::store::{Error, Store, Verdict};

/// An answer: HTTP status (200, 404, 400, 500) and a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// HTTP status code.
    pub status: u16,
    /// JSON body.
    pub body: Value,
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn error_answer(e: &Error) -> Answer {
    let status = match e {
        Error::EmptyId { .. } | Error::IdTooLong { .. } => 400,
        _ => 500,
    };
    Answer {
        status,
        body: json!({ "error": e.to_string() }),
    }
}

/// Whether `id` is live at `now_ms`: 200 with first-seen and expiry, or 404.
pub fn check(store: &Store, id: &[u8], now_ms: u64) -> Answer {
    let shown = String::from_utf8_lossy(id);
    match store.check(id, now_ms) {
        Ok(Some(seen)) => Answer {
            status: 200,
            body: json!({
                "id": shown,
                "seen": true,
                "first_seen": rfc3339(seen.first_seen_ms),
                "expires": rfc3339(seen.expires_ms),
                "first_seen_ms": seen.first_seen_ms,
                "expires_ms": seen.expires_ms,
            }),
        },
        Ok(None) => Answer {
            status: 404,
            body: json!({ "id": shown, "seen": false }),
        },
        Err(e) => error_answer(&e),
    }
}

/// Forgets `id` so its next copy passes: 200 if a record was removed, 404 if there was none.
pub fn forget(store: &Store, id: &[u8]) -> Answer {
    let shown = String::from_utf8_lossy(id);
    match store.forget(id) {
        Ok(removed) => {
            if removed {
                tracing::info!(id = %shown, "id forgotten by an operator");
                Metrics::forgotten(1);
            }
            Answer {
                status: if removed { 200 } else { 404 },
                body: json!({ "id": shown, "forgotten": removed }),
            }
        }
        Err(e) => error_answer(&e),
    }
}

/// Forgets every relay id, so the next copy of each passes: 200 with how many were live. Durable
/// on return. Logged and counted (`dedupd_forget_all_total`, `dedupd_forgotten_ids_total`).
/// The Redis endpoint's keys are left alone.
pub fn forget_all(store: &Store) -> Answer {
    match store.forget_all() {
        Ok(forgotten) => {
            tracing::warn!(forgotten, "every id forgotten by an operator");
            Metrics::forgot_all(forgotten);
            Answer {
                status: 200,
                body: json!({ "all": true, "forgotten": forgotten }),
            }
        }
        Err(e) => error_answer(&e),
    }
}

/// What [`record_ids`] did with a batch of ids.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recorded {
    /// Ids that were new and are now recorded.
    pub added: u64,
    /// Ids already live: left alone, so a rerun changes nothing.
    pub present: u64,
    /// Ids someone (the relay, or an earlier copy in the same batch) holds a claim on right now.
    pub in_flight: u64,
    /// Ids the store refuses (empty, or over `DEDUPD_MAX_ID_BYTES`).
    pub refused: u64,
}

impl std::ops::AddAssign for Recorded {
    fn add_assign(&mut self, other: Recorded) {
        self.added += other.added;
        self.present += other.present;
        self.in_flight += other.in_flight;
        self.refused += other.refused;
    }
}

/// Records each id as seen at `now_ms` for its TTL (`None`: the store's window), without a
/// message, as if the relay had forwarded it: one commit, so one flush, for the whole batch.
/// Ids already live are left alone, which makes a rerun (`dedupd import-redis`) harmless.
///
/// # Errors
///
/// A sled error or [`Error::Closed`]; nothing of the batch counts as recorded then.
pub fn record_ids(
    store: &Store,
    ids: impl IntoIterator<Item = (Vec<u8>, Option<Duration>)>,
    now_ms: u64,
) -> Result<Recorded, Error> {
    let mut done = Recorded::default();
    let mut claims = Vec::new();
    for (id, ttl) in ids {
        let verdict = store.claim_with_ttl(&id, ttl.unwrap_or_else(|| store.ttl()), now_ms);
        match verdict {
            Ok(Verdict::New(claim)) => claims.push(claim),
            Ok(Verdict::Duplicate(_)) => done.present += 1,
            Ok(Verdict::InFlight(_)) => done.in_flight += 1,
            Err(Error::EmptyId { .. } | Error::IdTooLong { .. }) => done.refused += 1,
            // The claims taken so far drop with `claims` and are released.
            Err(e) => return Err(e),
        }
    }
    done.added = claims.len() as u64;
    store.commit(claims, now_ms)?;
    Ok(done)
}

/// Records `id` as seen at `now_ms` for `ttl` (`None`: the window), as `PUT /ids/{id}?ttl_ms=N`
/// does: 200 with `"recorded": true` when added, `false` when it was already live (left alone),
/// 409 while a claim on it is in flight.
pub fn record(store: &Store, id: &[u8], ttl: Option<Duration>, now_ms: u64) -> Answer {
    let shown = String::from_utf8_lossy(id);
    if let Err(e) = store.check(id, now_ms) {
        return error_answer(&e); // a refused id: 400 naming why
    }
    match record_ids(store, [(id.to_vec(), ttl)], now_ms) {
        Ok(r) if r.in_flight > 0 => Answer {
            status: 409,
            body: json!({ "id": shown, "recorded": false, "in_flight": true }),
        },
        Ok(r) => Answer {
            status: 200,
            body: json!({ "id": shown, "recorded": r.added > 0 }),
        },
        Err(e) => error_answer(&e),
    }
}

/// The store's figures at `now_ms`, plus the relay's totals and rates when a relay is running.
pub fn stats(store: &Store, relay: Option<(&Metrics, Duration)>, now_ms: u64) -> Answer {
    let s = store.stats();
    let now = now_ms;
    let mut body = json!({
        "data_dir": store.dir().display().to_string(),
        "ttl_seconds": store.ttl().as_secs(),
        "live_ids": s.live_ids,
        "in_flight": s.in_flight,
        "disk_bytes": s.disk_bytes,
        "oldest_live_id_age_seconds": oldest_age(&s, store.ttl(), now).as_secs(),
        "bloom": {
            "generations": s.bloom_generations,
            "bytes": s.bloom_bytes,
            "false_positive_rate": s.false_positive_rate,
            "false_positives": s.false_positives,
            "absent_lookups": s.absent_lookups,
            "rebuilds": s.bloom_rebuilds,
            "loaded_from": s.bloom_loaded_from,
        },
        "compaction": { "swept_ids": s.swept_ids },
    });
    if let Some((m, uptime)) = relay {
        let secs = uptime.as_secs_f64().max(1e-3);
        body["relay"] = json!({
            "uptime_seconds": uptime.as_secs(),
            "connected": m.is_healthy(),
            "forwarded": m.forwarded_total(),
            "duplicates": m.duplicate_total(),
            "dead_lettered": m.dead_lettered_total(),
            "forwarded_per_second": m.forwarded_total() as f64 / secs,
            "duplicates_per_second": m.duplicate_total() as f64 / secs,
        });
    }
    Answer { status: 200, body }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{system_now_ms, StoreConfig, Verdict};

    fn small_store(dir: &std::path::Path) -> Store {
        let mut c = StoreConfig::new(dir);
        c.expected_ids = 100;
        c.cache_bytes = 4 << 20;
        Store::open(c).unwrap()
    }

    #[test]
    fn check_forget_and_stats_answer_like_the_endpoint() {
        let dir = tempfile::tempdir().unwrap();
        let store = small_store(dir.path());
        let now = system_now_ms();
        let Verdict::New(claim) = store.claim(b"order-1", now).unwrap() else {
            panic!("new id expected");
        };
        store.commit(vec![claim], now).unwrap();

        let seen = check(&store, b"order-1", now);
        assert_eq!(seen.status, 200);
        assert_eq!(seen.body["seen"], true);
        assert_eq!(seen.body["first_seen_ms"], now);
        assert_eq!(check(&store, b"order-2", now).status, 404);
        assert_eq!(check(&store, b"", now).status, 400);

        assert_eq!(stats(&store, None, now).body["live_ids"], 1);
        assert_eq!(forget(&store, b"order-1").status, 200);
        assert_eq!(forget(&store, b"order-1").status, 404);
        assert_eq!(check(&store, b"order-1", now).status, 404);
        assert_eq!(stats(&store, None, now).body["live_ids"], 0);
    }

    #[test]
    fn forget_all_forgets_every_id_and_says_how_many() {
        let dir = tempfile::tempdir().unwrap();
        let store = small_store(dir.path());
        let now = system_now_ms();
        let ids = (0..5).map(|i| (format!("order-{i}").into_bytes(), None));
        assert_eq!(record_ids(&store, ids, now).unwrap().added, 5);

        let answer = forget_all(&store);
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body["forgotten"], 5);
        for i in 0..5 {
            assert_eq!(
                check(&store, format!("order-{i}").as_bytes(), now).status,
                404
            );
        }
        // Every id is new again, and a second bulk forget finds nothing.
        let Verdict::New(_) = store.claim(b"order-3", now).unwrap() else {
            panic!("a forgotten id is new");
        };
        assert_eq!(forget_all(&store).body["forgotten"], 0);
    }

    #[test]
    fn record_adds_new_ids_with_their_ttl_and_leaves_live_ones_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = small_store(dir.path());
        let now = system_now_ms();
        let batch = || {
            vec![
                (b"a".to_vec(), Some(Duration::from_secs(60))),
                (b"b".to_vec(), None),
                (Vec::new(), None),
            ]
        };
        // First run: both ids added, the empty one refused.
        let first = record_ids(&store, batch(), now).unwrap();
        assert_eq!((first.added, first.present, first.refused), (2, 0, 1));
        let a = store.check(b"a", now).unwrap().expect("a recorded");
        assert_eq!(a.expires_ms, now + 60_000);
        let b = store.check(b"b", now).unwrap().expect("b recorded");
        assert_eq!(b.expires_ms, now + store.ttl().as_millis() as u64);
        // A rerun changes nothing: both are already present.
        let again = record_ids(&store, batch(), now + 5).unwrap();
        assert_eq!((again.added, again.present), (0, 2));
        assert_eq!(store.check(b"a", now).unwrap(), Some(a));
        // Past its TTL, an id is new again.
        let later = record_ids(&store, batch(), now + 61_000).unwrap();
        assert_eq!((later.added, later.present), (1, 1));

        let answer = record(&store, b"c", Some(Duration::from_secs(5)), now);
        assert_eq!(
            (answer.status, &answer.body["recorded"]),
            (200, &json!(true))
        );
        let answer = record(&store, b"c", None, now);
        assert_eq!(
            (answer.status, &answer.body["recorded"]),
            (200, &json!(false))
        );
        assert_eq!(record(&store, b"", None, now).status, 400);
    }
}
