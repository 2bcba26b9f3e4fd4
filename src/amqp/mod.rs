//! The AMQP side shared by the relay and the shard commands: opening a connection (with TLS for
//! `amqps://`), declaring or checking the topology, the callbacks that forward what the broker
//! says to the task acting on it, and the quarantine sweep of messages the client library cannot
//! decode. Nothing here knows the relay's protocol.

pub(crate) mod callbacks;
pub(crate) mod quarantine;
mod tls;
pub(crate) mod topology;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use amqprs::connection::{Connection, OpenConnectionArguments};

use crate::config::{AmqpConfig, AmqpUrl};

/// Why a connection to the broker did not open.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The TLS setup of `amqps://` failed before connecting (certificate files, roots).
    #[error("{0}")]
    Tls(String),
    /// The broker refused, or the connection failed on the way (a TLS failure explained).
    #[error("{0}")]
    Open(String),
    /// Nothing answered within the connection timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The connection opened, but its callbacks could not be registered.
    #[error("registering the connection callbacks: {0}")]
    Callbacks(amqprs::error::Error),
    /// Several nodes were given and none answered: each one's cause.
    #[error("no node answered: {0}")]
    Nodes(String),
}

/// Connection timeout when the URL gives none.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Which of the configured URLs answered last: the next connection tries it first. One process
/// has one broker configuration, so one index serves all its connections.
static LAST_GOOD: AtomicUsize = AtomicUsize::new(0);

/// The broker URL in use: the one that answered last (the first before any answered).
pub(crate) fn current_url(config: &AmqpConfig) -> &AmqpUrl {
    let urls: Vec<&AmqpUrl> = config.urls().collect();
    urls[LAST_GOOD.load(Ordering::Relaxed) % urls.len()]
}

/// Opens a connection named `name` (the broker's management UI shows it) to the broker of
/// `config`, within the connection timeout. With several URLs (nodes of one cluster) it tries
/// the one that answered last, then the others in turn, and keeps the first that opens. No
/// callbacks are registered: that is the caller's.
///
/// # Errors
///
/// See [`ConnectError`]; its message is one line (each node's cause when there are several).
pub(crate) async fn connect(config: &AmqpConfig, name: &str) -> Result<Connection, ConnectError> {
    let urls: Vec<&AmqpUrl> = config.urls().collect();
    let first = LAST_GOOD.load(Ordering::Relaxed) % urls.len();
    let mut causes = Vec::new();
    for i in (first..urls.len()).chain(0..first) {
        match connect_to(urls[i], config, name).await {
            Ok(conn) => {
                if i != first {
                    tracing::info!(broker = %urls[i], "connected to another node of the cluster");
                }
                LAST_GOOD.store(i, Ordering::Relaxed);
                return Ok(conn);
            }
            Err(cause) if urls.len() == 1 => return Err(cause),
            Err(cause) => causes.push(format!("{}: {cause}", urls[i])),
        }
    }
    Err(ConnectError::Nodes(causes.join("; ")))
}

async fn connect_to(
    url: &AmqpUrl,
    config: &AmqpConfig,
    name: &str,
) -> Result<Connection, ConnectError> {
    let mut args = OpenConnectionArguments::new(&url.host, url.port, &url.user, url.password());
    args.virtual_host(&url.vhost).connection_name(name);
    if let Some(heartbeat) = url.heartbeat {
        args.heartbeat(heartbeat);
    }
    // amqps://: the TLS setup is rebuilt per attempt, so renewed certificate files take effect.
    let tls = if url.tls {
        Some(tls::Tls::new(url, &config.tls).map_err(ConnectError::Tls)?)
    } else {
        None
    };
    if let Some(tls) = &tls {
        args.tls_adaptor(tls.adaptor());
    }
    let timeout = url.connection_timeout.unwrap_or(CONNECT_TIMEOUT);
    // amqprs has no timeout of its own: a broker that accepts TCP and then says nothing would
    // hold us here forever.
    match tokio::time::timeout(timeout, Connection::open(&args)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(ConnectError::Open(match &tls {
            Some(tls) => tls.explain(&e.to_string()),
            None => e.to_string(),
        })),
        Err(_) => Err(ConnectError::Timeout(timeout)),
    }
}
