//! The relay: consume the source queue, claim each id, forward first-seen messages with
//! publisher confirms, record them durably, then ack the source.
//!
//! [`run`] is the reconnect loop, started by the service with the store it opened; each broker
//! connection runs one [`session`] with the per-message protocol.

mod acks;
mod confirms;
pub(crate) mod ha;
mod id;
mod protocol;
mod session;
mod window;
mod worker;

use std::sync::Arc;
use std::time::{Duration, Instant};

use amqprs::connection::Connection;
use tokio::sync::mpsc;

use crate::amqp::callbacks::ConnectionEvents;
use crate::amqp::topology::{self, TopologyError};
use crate::amqp::{self, ConnectError};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::store::{Clock, Error as StoreError, Store};
use session::{Context, End, Failure, Session};
use worker::Workers;

/// First wait before reconnecting; doubled after each failure.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between reconnection attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A session that lasted this long resets the backoff: the broker was fine for a while.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(10);
/// How long closing a connection may take before we give up on it.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The id the relay records, under `config`'s `DEDUPD_ID_SOURCE` and `DEDUPD_ID_SCOPE`, for a
/// message with these part values in this scope: what `dedupd id` prints, so that an id hashed
/// from several parts can be checked or forgotten.
///
/// # Errors
///
/// The values do not match the configuration (count of parts, scope given or not), said in one
/// line.
pub fn id_of(config: &Config, scope: Option<&[u8]>, parts: &[&[u8]]) -> Result<Vec<u8>, String> {
    id::IdExtractor::new(
        &config.relay.id_source,
        &config.relay.id_scope,
        config.relay.missing_id,
    )
    .id_of(scope, parts)
}

/// Why the relay stopped. Each says what failed, then why.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Claiming an id failed in the store.
    #[error("store claim failed: {0}")]
    Claim(#[source] StoreError),
    /// Recording confirmed ids failed: their messages are left unacked.
    #[error("store commit failed, forwarded messages left unacked: {0}")]
    Commit(#[source] Arc<StoreError>),
    /// The commit thread could not start.
    #[error("cannot start the commit thread: {0}")]
    Threads(#[source] std::io::Error),
    /// The commit thread stopped while the relay still needed it.
    #[error("the commit thread stopped unexpectedly")]
    WorkersGone,
    /// The broker refused the topology (missing with declaring off, or conflicting settings).
    #[error("topology: {0}")]
    Topology(String),
}

/// Relays with `config` until `stop` fires, reconnecting to the broker with capped exponential
/// backoff whenever the connection drops. On `stop` it stops consuming, finishes what is in
/// flight within `DEDUPD_SHUTDOWN_GRACE`, closes the connection and stops its commit thread; the
/// store stays open (its owner, the service, closes it).
///
/// # Errors
///
/// The commit thread does not start, the broker refuses the topology on the first connection, or
/// the store fails.
pub(crate) async fn run(
    config: &Config,
    store: &Store,
    metrics: &Metrics,
    clock: Arc<dyn Clock>,
    stop: Shutdown,
) -> Result<(), Error> {
    // With HA, the stream side runs until the relay has drained (its commits wait for the
    // stream's confirms), so it has a stop of its own, fired after the relay's end.
    let ha_token = tokio_util::sync::CancellationToken::new();
    let (ha, replicator) = if config.relay.ha {
        let (ha, replicator) = ha::Ha::new(metrics, clock.clone());
        let run = replicator.run(config.clone(), store.clone(), Shutdown::new(&ha_token));
        (Some(ha), Some(tokio::spawn(run)))
    } else {
        (None, None)
    };
    let workers = Workers::start(store, ha.clone(), clock).map_err(Error::Threads)?;
    let result = relay(config, metrics, &workers, ha.as_ref(), stop).await;
    ha_token.cancel();
    if let Some(replicator) = replicator {
        let _ = replicator.await;
    }
    tokio::task::spawn_blocking(move || workers.stop())
        .await
        .expect("stopping the commit thread does not panic");
    result
}

/// The reconnect loop: one session per connection until shutdown or a fatal error.
async fn relay(
    config: &Config,
    metrics: &Metrics,
    workers: &Workers,
    ha: Option<&ha::Ha>,
    mut stop: Shutdown,
) -> Result<(), Error> {
    let ids = id::IdExtractor::new(
        &config.relay.id_source,
        &config.relay.id_scope,
        config.relay.missing_id,
    );
    let windows = window::Windows::new(
        config.store.ttl_header.as_deref(),
        config.store.ttl,
        config.store.max_ttl,
    );
    let mut backoff = Backoff::default();
    let mut sessions = 0u64;
    tracing::info!(
        broker = %config.amqp.url,
        source = %config.relay.source_queue,
        destination = %config.relay.dest_exchange,
        data_dir = %config.store.data_dir.display(),
        ttl = ?config.store.ttl,
        ttl_header = config.store.ttl_header.as_deref().unwrap_or("off"),
        max_ttl = ?config.store.max_ttl,
        "relay starting"
    );
    loop {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let conn = tokio::select! {
            _ = stop.fired() => return Ok(()),
            conn = connect(config, events_tx.clone()) => conn,
        };
        let conn = match conn {
            Ok(conn) => conn,
            Err(cause) => {
                let wait = backoff.next();
                tracing::warn!(broker = %config.amqp.url, %cause, ?wait, "cannot connect to the broker");
                if !pause(wait, &mut stop).await {
                    return Ok(());
                }
                continue;
            }
        };
        match topology::ensure(&conn, config).await {
            Ok(()) => {}
            // The first time round, a refusal is a configuration problem: say so and stop.
            Err(TopologyError::Refused(why)) if sessions == 0 => {
                close(conn).await;
                return Err(Error::Topology(why));
            }
            Err(cause) => {
                close(conn).await;
                let wait = backoff.next();
                tracing::warn!(%cause, ?wait, "cannot set up the topology");
                if !pause(wait, &mut stop).await {
                    return Ok(());
                }
                continue;
            }
        }
        if sessions > 0 {
            metrics.reconnected();
        }
        sessions += 1;
        let started = Instant::now();
        let cx = Context {
            config,
            metrics,
            workers,
            ids: &ids,
            windows: &windows,
            ha,
        };
        let result = match Session::open(&conn, cx, (events_tx, events_rx)).await {
            Ok((session, deliveries)) => session.run(&conn, deliveries, stop.clone()).await,
            Err(failure) => Err(failure),
        };
        metrics.set_healthy(false);
        match result {
            Ok(end) => {
                close(conn).await;
                if end == End::GraceExpired {
                    tracing::warn!("stopped before everything in flight settled");
                }
                return Ok(());
            }
            Err(Failure::Fatal(e)) => {
                close(conn).await;
                return Err(e);
            }
            Err(Failure::Lost(cause)) => {
                close(conn).await;
                if started.elapsed() >= BACKOFF_RESET_AFTER {
                    backoff = Backoff::default();
                }
                let wait = backoff.next();
                tracing::warn!(%cause, ?wait, "broker connection lost, reconnecting");
                if !pause(wait, &mut stop).await {
                    return Ok(());
                }
            }
        }
    }
}

/// Opens a connection for the relay whose close goes to `events`.
async fn connect(
    config: &Config,
    events: mpsc::UnboundedSender<session::Event>,
) -> Result<Connection, ConnectError> {
    let name = format!(
        "dedupd {} -> {}",
        config.relay.source_queue, config.relay.dest_exchange
    );
    let conn = amqp::connect(&config.amqp, &name).await?;
    conn.register_callback(ConnectionEvents { tx: events })
        .await
        .map_err(ConnectError::Callbacks)?;
    Ok(conn)
}

/// Closes a connection, giving up after a while (a dead one may never answer).
async fn close(conn: Connection) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.close()).await;
}

/// Waits `wait`, or until shutdown; returns `false` on shutdown.
async fn pause(wait: Duration, stop: &mut Shutdown) -> bool {
    tokio::select! {
        _ = stop.fired() => false,
        _ = tokio::time::sleep(wait) => true,
    }
}

/// Capped exponential backoff with jitter, so a fleet does not reconnect in lockstep.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: BACKOFF_MIN }
    }
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        // Up to a quarter more, at random.
        let jitter = rand::random::<f64>() * 0.25;
        base.mul_f64(1.0 + jitter).min(BACKOFF_MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let mut b = Backoff::default();
        let first = b.next();
        assert!(first >= BACKOFF_MIN && first <= BACKOFF_MIN.mul_f64(1.25));
        let second = b.next();
        assert!(second >= BACKOFF_MIN * 2);
        for _ in 0..20 {
            assert!(b.next() <= BACKOFF_MAX);
        }
        assert!(b.next() >= BACKOFF_MAX.mul_f64(0.99));
    }
}
