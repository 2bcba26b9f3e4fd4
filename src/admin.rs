//! Admin answers about the store: check an id, forget it, stats. One implementation for both
//! roads to it: the running service's HTTP endpoint (`/ids/{id}`, `/stats`) and the CLI opening
//! the data dir itself when no service holds it.
//!
//! Every function here calls the store and so blocks: call it off the async workers.

use std::time::{Duration, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::metrics::{oldest_age, Metrics};
use crate::store::{system_now_ms, Error, Store};

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

/// Whether `id` is live: 200 with first-seen and expiry, or 404.
pub fn check(store: &Store, id: &[u8]) -> Answer {
    let shown = String::from_utf8_lossy(id);
    match store.check(id, system_now_ms()) {
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
            }
            Answer {
                status: if removed { 200 } else { 404 },
                body: json!({ "id": shown, "forgotten": removed }),
            }
        }
        Err(e) => error_answer(&e),
    }
}

/// The store's figures, plus the relay's totals and rates when a relay is running.
pub fn stats(store: &Store, relay: Option<(&Metrics, Duration)>) -> Answer {
    let s = store.stats();
    let now = system_now_ms();
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
    use crate::store::{StoreConfig, Verdict};

    #[test]
    fn check_forget_and_stats_answer_like_the_endpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = StoreConfig::new(dir.path());
        c.expected_ids = 100;
        c.cache_bytes = 4 << 20;
        let store = Store::open(c).unwrap();
        let now = system_now_ms();
        let Verdict::New(claim) = store.claim(b"order-1", now).unwrap() else {
            panic!("new id expected");
        };
        store.commit(vec![claim], now).unwrap();

        let seen = check(&store, b"order-1");
        assert_eq!(seen.status, 200);
        assert_eq!(seen.body["seen"], true);
        assert_eq!(seen.body["first_seen_ms"], now);
        assert_eq!(check(&store, b"order-2").status, 404);
        assert_eq!(check(&store, b"").status, 400);

        assert_eq!(stats(&store, None).body["live_ids"], 1);
        assert_eq!(forget(&store, b"order-1").status, 200);
        assert_eq!(forget(&store, b"order-1").status, 404);
        assert_eq!(check(&store, b"order-1").status, 404);
        assert_eq!(stats(&store, None).body["live_ids"], 0);
    }
}
