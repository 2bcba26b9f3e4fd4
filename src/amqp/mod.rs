//! The AMQP side shared by the relay and the shard commands: opening a connection (with TLS for
//! `amqps://`), declaring or checking the topology, and the quarantine sweep of messages the
//! client library cannot decode. Nothing here knows the relay's protocol.

pub(crate) mod callbacks;
pub(crate) mod quarantine;
mod tls;
pub(crate) mod topology;

use std::time::Duration;

use amqprs::connection::{Connection, OpenConnectionArguments};

use crate::config::AmqpConfig;

/// Connection timeout when the URL gives none.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a connection named `name` (the broker's management UI shows it) to the broker of
/// `config`, within the connection timeout. No callbacks are registered: that is the caller's.
///
/// # Errors
///
/// Why the connection did not open, in one line (a TLS failure explained).
pub(crate) async fn connect(config: &AmqpConfig, name: &str) -> Result<Connection, String> {
    let url = &config.url;
    let mut args = OpenConnectionArguments::new(&url.host, url.port, &url.user, url.password());
    args.virtual_host(&url.vhost).connection_name(name);
    if let Some(heartbeat) = url.heartbeat {
        args.heartbeat(heartbeat);
    }
    // amqps://: the TLS setup is rebuilt per attempt, so renewed certificate files take effect.
    let tls = if url.tls {
        Some(tls::Tls::new(url, &config.tls)?)
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
        Ok(Err(e)) => Err(match &tls {
            Some(tls) => tls.explain(&e.to_string()),
            None => e.to_string(),
        }),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}
