//! Time moved by the test, not waited for: the service runs in process
//! (`dedupd::service::run_with_clock`) on a `ManualClock`, and ids and keys expire when the
//! clock says so. The Redis endpoint, the HTTP admin routes and the relay (against the real local
//! broker, own random queues) all read that one clock; no test here sleeps.

mod support;

use std::sync::Arc;
use std::time::Duration;

use dedupd::service::run_with_clock;
use dedupd::store::{system_now_ms, ManualClock};
use support::{free_port, http, id_props, Broker, WAIT};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The service running in process on a manual clock, stopped by dropping `stop` or by
/// [`InProcess::stop`].
struct InProcess {
    clock: Arc<ManualClock>,
    stop: oneshot::Sender<()>,
    run: JoinHandle<Result<(), dedupd::service::Error>>,
    _data: tempfile::TempDir,
}

impl InProcess {
    /// Starts the service with `vars` (plus a fresh data dir) on a clock reading the wall
    /// clock's time now.
    fn start(vars: &[(&str, &str)]) -> InProcess {
        let data = tempfile::tempdir().unwrap();
        let mut all = vec![
            ("DEDUPD_DATA_DIR", data.path().to_str().unwrap()),
            ("DEDUPD_EXPECTED_IDS", "10000"),
            ("DEDUPD_CACHE_SIZE", "4M"),
        ];
        all.extend_from_slice(vars);
        let config = dedupd::Config::from_vars(all).unwrap();
        let clock = Arc::new(ManualClock::new(system_now_ms()));
        let (stop, stopped) = oneshot::channel::<()>();
        let run = tokio::spawn(run_with_clock(config, clock.clone(), async move {
            let _ = stopped.await;
        }));
        InProcess {
            clock,
            stop,
            run,
            _data: data,
        }
    }

    /// Stops the service and checks it ended cleanly.
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(WAIT, self.run)
            .await
            .expect("run returns after its shutdown future")
            .unwrap()
            .expect("run ends Ok");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_keys_and_admin_ids_expire_when_the_clock_passes_their_ttl() {
    let (redis_port, http_port) = (free_port(), free_port());
    let redis_addr = format!("127.0.0.1:{redis_port}");
    let http_addr = format!("127.0.0.1:{http_port}");
    let service = InProcess::start(&[
        ("DEDUPD_RELAY", "off"),
        ("DEDUPD_TTL", "1h"),
        ("DEDUPD_REDIS_ADDR", &redis_addr),
        ("DEDUPD_METRICS_ADDR", &http_addr),
    ]);
    let url = format!("redis://{redis_addr}/");
    let clock = service.clock.clone();
    // The blocking client and HTTP calls run off the runtime's workers, which serve them.
    let checked = tokio::task::spawn_blocking(move || {
        let mut con = support::eventually(
            WAIT,
            || "the Redis endpoint never listened".into(),
            || {
                redis::Client::open(url.as_str())
                    .unwrap()
                    .get_connection()
                    .ok()
            },
        );
        let set = |con: &mut redis::Connection, args: &[&str]| -> Option<String> {
            redis::cmd("SET").arg(args).query(con).unwrap()
        };
        let get = |con: &mut redis::Connection, key: &str| -> Option<String> {
            redis::cmd("GET").arg(key).query(con).unwrap()
        };
        let id = |method| http(http_port, method, "/ids/order-1?ttl_ms=60000", None);

        // A key for 60 s, a key for the window (1 h), and a relay id recorded for 60 s.
        assert_eq!(
            set(&mut con, &["short", "v", "PX", "60000"]).as_deref(),
            Some("OK")
        );
        assert_eq!(set(&mut con, &["window", "w"]).as_deref(), Some("OK"));
        assert_eq!(id("PUT").map(|(status, _)| status), Some(200));

        // 59.999 s later: all there.
        clock.advance(Duration::from_millis(59_999));
        assert_eq!(get(&mut con, "short").as_deref(), Some("v"));
        let pttl: i64 = redis::cmd("PTTL").arg("short").query(&mut con).unwrap();
        assert_eq!(pttl, 1, "the endpoint counts down on the manual clock");
        assert_eq!(id("GET").map(|(status, _)| status), Some(200));

        // 1 ms more: the 60 s key and id are gone; the window's key is not.
        clock.advance(Duration::from_millis(1));
        assert_eq!(get(&mut con, "short"), None);
        assert_eq!(id("GET").map(|(status, _)| status), Some(404));
        assert_eq!(get(&mut con, "window").as_deref(), Some("w"));
        // A new SET NX of the expired key is new again.
        assert_eq!(set(&mut con, &["short", "v2", "NX"]).as_deref(), Some("OK"));

        // One window after it was set, the window's key is gone too.
        clock.advance(Duration::from_secs(3600) - Duration::from_millis(60_000));
        assert_eq!(get(&mut con, "window"), None);
    });
    tokio::time::timeout(WAIT, checked)
        .await
        .expect("the checks ran")
        .unwrap();
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_lets_a_copy_through_once_the_clock_passes_its_window() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    broker.declare_source().await;
    let http_port = free_port();
    let http_addr = format!("127.0.0.1:{http_port}");
    let service = InProcess::start(&[
        ("DEDUPD_SOURCE_QUEUE", broker.source.as_str()),
        ("DEDUPD_DEST_EXCHANGE", broker.dest.as_str()),
        ("DEDUPD_METRICS_ADDR", &http_addr),
        ("DEDUPD_TTL", "10m"),
    ]);

    // The first copy passes, the second within the window is dropped: settled as a duplicate
    // before the clock moves, or it would be judged after.
    broker.publish(id_props("clock-a"), b"first").await;
    broker.wait_count(&broker.out, 1).await;
    broker.publish(id_props("clock-a"), b"within").await;
    support::eventually_async(
        WAIT,
        || "the second copy was never found a duplicate".into(),
        || async move { duplicates(http_port).await == 1 },
    )
    .await;

    // One window later by the service's clock, the id is new again: this copy passes.
    service.clock.advance(Duration::from_secs(600));
    broker.publish(id_props("clock-a"), b"after").await;
    broker.wait_count(&broker.out, 2).await;
    broker.wait_count(&broker.source, 0).await;

    service.stop().await;
    // Sorted: "after" and "first", and not "within".
    let bodies = support::bodies_of(&broker.drain(&broker.out).await);
    assert_eq!(bodies, [b"after".to_vec(), b"first".to_vec()]);
    broker.cleanup().await;
}

/// The relay's `dedupd_messages_total{outcome="duplicate"}` on the HTTP endpoint at `port`.
async fn duplicates(port: u16) -> u64 {
    let text = tokio::task::spawn_blocking(move || http(port, "GET", "/metrics", None))
        .await
        .unwrap();
    let Some((200, body)) = text else {
        return 0;
    };
    body.lines()
        .filter(|l| l.starts_with("dedupd_messages_total{") && l.contains("outcome=\"duplicate\""))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64
}
