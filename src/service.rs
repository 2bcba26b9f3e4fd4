//! The service: the one place that opens the store, starts the parts that serve it and stops
//! them in order on one shutdown signal.
//!
//! Start, in this order:
//! 1. open the store (a second process on the same data dir is refused here);
//! 2. bind the HTTP endpoint (`DEDUPD_METRICS_ADDR`) and the Redis endpoint
//!    (`DEDUPD_REDIS_ADDR`), so a taken address fails start-up before any message moves;
//! 3. start the background tasks: systemd's watchdog and the summary log line;
//! 4. run the relay on this task (with `DEDUPD_RELAY=off`, wait for shutdown instead).
//!
//! Stop, when the shutdown future resolves or the relay ends on its own (a fatal error):
//! 1. cancel the token: the relay stops consuming and drains within `DEDUPD_SHUTDOWN_GRACE`,
//!    the endpoints stop accepting;
//! 2. once the relay has returned, report unhealthy, then wait for every tracked task (the
//!    endpoints finish their open connections);
//! 3. close the store last, which persists the Bloom filter: nothing may write after it.
//!
//! Time comes from one [`Clock`], given to every part: the store's compactor, the relay's claims
//! and commits, the Redis endpoint's expiries and the HTTP endpoint's answers. [`run`] uses the
//! wall clock; a test gives [`run_with_clock`] a [`ManualClock`](crate::store::ManualClock) and
//! moves time instead of sleeping.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::http;
use crate::metrics::Metrics;
use crate::relay;
use crate::shutdown::Shutdown;
use crate::store::{Clock, Error as StoreError, Store, SystemClock};

/// Period of the summary log line while messages flow.
const SUMMARY_EVERY: Duration = Duration::from_secs(30);

/// Why the service stopped, or could not start. Each says what failed, then why.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The store did not open (another process holds the data dir, say).
    #[error("cannot open the store: {0}")]
    StoreOpen(#[source] StoreError),
    /// The HTTP endpoint could not listen.
    #[error("cannot listen for /healthz and /metrics on {addr}: {source}")]
    Http {
        /// `DEDUPD_METRICS_ADDR`.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The Redis endpoint could not listen.
    #[error("cannot listen for Redis clients on {addr}: {source}")]
    Redis {
        /// `DEDUPD_REDIS_ADDR`.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The relay stopped on an error.
    #[error(transparent)]
    Relay(#[from] relay::Error),
    /// Closing the store failed (the next start rebuilds the filter; nothing is lost).
    #[error("closing the store failed: {0}")]
    StoreClose(#[source] StoreError),
}

/// Runs dedupd with `config` until `shutdown` resolves, then stops every part in order (see the
/// module's doc).
///
/// # Errors
///
/// The store does not open ([`Error::StoreOpen`] names the data dir), an endpoint's address is
/// taken, the relay fails (the broker refuses the topology on the first connection, the store
/// fails), or the store does not close cleanly.
pub async fn run<F>(config: Config, shutdown: F) -> Result<(), Error>
where
    F: Future<Output = ()> + Send + 'static,
{
    run_with_clock(config, Arc::new(SystemClock), shutdown).await
}

/// [`run`], with the time read from `clock` by every part.
///
/// # Errors
///
/// As [`run`].
pub async fn run_with_clock<F>(
    config: Config,
    clock: Arc<dyn Clock>,
    shutdown: F,
) -> Result<(), Error>
where
    F: Future<Output = ()> + Send + 'static,
{
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "dedupd starting");
    let mut store_config = config.store_config();
    store_config.clock = clock.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(store_config))
        .await
        .expect("store open does not panic")
        .map_err(Error::StoreOpen)?;
    let token = CancellationToken::new();
    let tasks = TaskTracker::new();
    let started = start(&config, &store, &clock, &token, &tasks, shutdown).await;
    let result = match started {
        Ok(metrics) => serve(&config, &store, &metrics, clock, &token).await,
        Err(e) => Err(e),
    };

    // Whatever ended the service, stop the rest in the written order.
    token.cancel();
    tasks.close();
    tasks.wait().await;
    let closed = tokio::task::spawn_blocking(move || store.close())
        .await
        .expect("store close does not panic");
    result?;
    closed.map_err(Error::StoreClose)?;
    tracing::info!("stopped");
    Ok(())
}

/// Binds the endpoints and starts the background tasks on `tasks`; the metrics they share.
async fn start<F>(
    config: &Config,
    store: &Store,
    clock: &Arc<dyn Clock>,
    token: &CancellationToken,
    tasks: &TaskTracker,
    shutdown: F,
) -> Result<Arc<Metrics>, Error>
where
    F: Future<Output = ()> + Send + 'static,
{
    let metrics = Arc::new(Metrics::new());
    metrics.settings(config.store.bloom_fp_rate, config.store.ttl, clock.now_ms());
    {
        let token = token.clone();
        tasks.spawn(async move {
            tokio::select! {
                () = shutdown => {
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
                    token.cancel();
                }
                () = token.cancelled() => {}
            }
        });
    }
    if let Some(addr) = config.http.addr {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Http { addr, source })?;
        tracing::info!(%addr, "serving /healthz and /metrics");
        let state = http::State {
            metrics: metrics.clone(),
            store: store.clone(),
            started: Instant::now(),
            admin: http::AdminAccess::new(config.http.admin_token.as_ref(), addr),
            clock: clock.clone(),
        };
        tasks.spawn(http::serve(listener, state, Shutdown::new(token)));
    }
    if let Some(addr) = config.redis.addr {
        let serve = crate::redis::bind(addr, config, store, clock.clone(), Shutdown::new(token))
            .await
            .map_err(|source| Error::Redis { addr, source })?;
        tasks.spawn(serve);
    }
    tasks.spawn(watchdog(token.clone()));
    tasks.spawn(summary(metrics.clone(), store.clone(), token.clone()));
    Ok(metrics)
}

/// Runs the relay (or, with `DEDUPD_RELAY=off`, waits for shutdown) and reports unhealthy once
/// it has stopped.
async fn serve(
    config: &Config,
    store: &Store,
    metrics: &Metrics,
    clock: Arc<dyn Clock>,
    token: &CancellationToken,
) -> Result<(), Error> {
    let result = if config.relay.enabled {
        relay::run(config, store, metrics, clock, Shutdown::new(token)).await
    } else {
        // No broker: the store serves its endpoints alone, healthy while they listen.
        tracing::info!("DEDUPD_RELAY=off: no broker connection, serving the store's endpoints");
        metrics.set_healthy(true);
        token.cancelled().await;
        Ok(())
    };
    metrics.set_healthy(false);
    Ok(result?)
}

/// Pings systemd's watchdog at half its period until shutdown (`WatchdogSec=`); returns at once
/// when no watchdog is set.
async fn watchdog(token: CancellationToken) {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_micros(usec) / 2);
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            _ = tick.tick() => {}
        }
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
    }
}

/// Every [`SUMMARY_EVERY`] while messages flow, one log line with the rates and the store size.
async fn summary(metrics: Arc<Metrics>, store: Store, token: CancellationToken) {
    let mut tick = tokio::time::interval(SUMMARY_EVERY);
    tick.tick().await;
    let totals = |m: &Metrics| {
        (
            m.forwarded_total(),
            m.duplicate_total(),
            m.dead_lettered_total(),
        )
    };
    let mut last = totals(&metrics);
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = totals(&metrics);
        if now == last {
            continue; // idle: nothing worth a line
        }
        let secs = SUMMARY_EVERY.as_secs_f64();
        let store = store.clone();
        let live_ids = tokio::task::spawn_blocking(move || store.stats().live_ids)
            .await
            .unwrap_or_default();
        tracing::info!(
            role = metrics.role().name(),
            forwarded_per_s = format!("{:.1}", (now.0 - last.0) as f64 / secs),
            duplicates = now.1 - last.1,
            dead_lettered = now.2 - last.2,
            live_ids,
            "relay summary"
        );
        last = now;
    }
}
