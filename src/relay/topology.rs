//! The broker objects dedupd uses: declared idempotently, or only checked with passive declares.
//!
//! - source queue: durable, `x-dead-letter-exchange = <source>.dlx`, no other arguments;
//! - `<source>.dlx`: durable fanout exchange, with durable queue `<source>.dead` bound to it, so
//!   every rejected message is kept;
//! - destination exchange: durable, of the configured type;
//! - duplicates exchange (if configured): durable fanout.

use amqprs::channel::{
    Channel, ExchangeDeclareArguments, QueueBindArguments, QueueDeclareArguments,
};
use amqprs::connection::Connection;
use amqprs::{FieldTable, FieldValue};
use tokio::sync::mpsc;

use super::session::{ChannelEvents, Event};
use crate::config::Config;

/// Why the topology is not in place.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TopologyError {
    /// The broker said no: a missing object (passive mode) or one declared with other settings.
    #[error("{0}")]
    Refused(String),
    /// The connection failed on the way; worth retrying.
    #[error("declaring {what} failed: {source}")]
    Amqp {
        what: String,
        source: amqprs::error::Error,
    },
}

/// Declares (or, with `DEDUPD_DECLARE=false`, checks) everything dedupd uses.
///
/// # Errors
///
/// [`TopologyError::Refused`] naming the piece the broker refused and why.
pub(crate) async fn ensure(conn: &Connection, config: &Config) -> Result<(), TopologyError> {
    let mut t = Topology::open(conn, !config.declare).await?;
    t.source(config).await?;
    t.exchange(
        &format!("destination exchange '{}'", config.dest_exchange),
        &config.dest_exchange,
        &config.dest_exchange_type,
    )
    .await?;
    if let Some(dup) = &config.duplicates_exchange {
        t.exchange(&format!("duplicates exchange '{dup}'"), dup, "fanout")
            .await?;
    }
    t.close().await;
    Ok(())
}

/// A channel for declaring, which turns the broker's refusals into errors naming the piece.
/// Also used by [`crate::shard`], so a shard's source queue is declared exactly as the relay's.
pub(crate) struct Topology {
    channel: Channel,
    passive: bool,
    /// Where the channel's callback reports the broker closing it, with the reason.
    closed: mpsc::UnboundedReceiver<Event>,
}

impl Topology {
    /// Opens a channel on `conn`; `passive` only checks that each piece exists.
    pub(crate) async fn open(conn: &Connection, passive: bool) -> Result<Topology, TopologyError> {
        let (tx, closed) = mpsc::unbounded_channel();
        let channel = conn
            .open_channel(None)
            .await
            .map_err(|source| TopologyError::Amqp {
                what: "a channel".into(),
                source,
            })?;
        channel
            .register_callback(ChannelEvents::new("topology", tx))
            .await
            .map_err(|source| TopologyError::Amqp {
                what: "a channel".into(),
                source,
            })?;
        Ok(Topology {
            channel,
            passive,
            closed,
        })
    }

    /// The channel, for operations this type has no method for; pass their result to
    /// [`Topology::check`].
    pub(crate) fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Closes the channel, best effort: it has done its job, and a failure to close it is no
    /// failure of ours.
    pub(crate) async fn close(self) {
        let _ = self.channel.close().await;
    }

    /// The source queue of `config` with its dead-lettering: the exchange `<source>.dlx`, the
    /// queue `<source>.dead` bound to it, and the source queue itself, durable, with the single
    /// argument `x-dead-letter-exchange = <source>.dlx`.
    pub(crate) async fn source(&mut self, config: &Config) -> Result<(), TopologyError> {
        let dlx = config.dead_letter_exchange();
        let dead = config.dead_letter_queue();
        self.exchange(&format!("dead-letter exchange '{dlx}'"), &dlx, "fanout")
            .await?;
        self.queue(
            &format!("dead-letter queue '{dead}'"),
            &dead,
            FieldTable::new(),
        )
        .await?;
        if !self.passive {
            self.bind(&dead, &dlx).await?;
        }
        let mut args = FieldTable::new();
        args.insert(
            "x-dead-letter-exchange".try_into().expect("short"),
            FieldValue::from(dlx.as_str()),
        );
        self.queue(
            &format!("source queue '{}'", config.source_queue),
            &config.source_queue,
            args,
        )
        .await
    }

    async fn exchange(&mut self, what: &str, name: &str, kind: &str) -> Result<(), TopologyError> {
        self.exchange_with(what, name, kind, FieldTable::new())
            .await
    }

    /// A durable exchange of `kind` with `args`.
    pub(crate) async fn exchange_with(
        &mut self,
        what: &str,
        name: &str,
        kind: &str,
        args: FieldTable,
    ) -> Result<(), TopologyError> {
        let args = ExchangeDeclareArguments::new(name, kind)
            .durable(true)
            .passive(self.passive)
            .arguments(args)
            .finish();
        let result = self.channel.exchange_declare(args).await;
        self.check(what, result)
    }

    async fn queue(
        &mut self,
        what: &str,
        name: &str,
        args: FieldTable,
    ) -> Result<(), TopologyError> {
        let args = QueueDeclareArguments::new(name)
            .durable(true)
            .passive(self.passive)
            .arguments(args)
            .finish();
        let result = self.channel.queue_declare(args).await.map(|_| ());
        self.check(what, result)
    }

    async fn bind(&mut self, queue: &str, exchange: &str) -> Result<(), TopologyError> {
        let result = self
            .channel
            .queue_bind(QueueBindArguments::new(queue, exchange, ""))
            .await;
        self.check(&format!("binding of '{queue}' to '{exchange}'"), result)
    }

    /// Turns a failed declare into an error naming `what`: the broker's reason when it closed the
    /// channel over it, the transport error otherwise.
    pub(crate) fn check(
        &mut self,
        what: &str,
        result: Result<(), amqprs::error::Error>,
    ) -> Result<(), TopologyError> {
        let Err(source) = result else {
            return Ok(());
        };
        // The channel's close callback runs before the pending request fails, so the reason is
        // already queued when the broker is the one that refused.
        while let Ok(event) = self.closed.try_recv() {
            if let Event::ChannelClosed { code, text, .. } = event {
                let why = match (code, self.passive) {
                    (404, true) => format!(
                        "{what} does not exist (DEDUPD_DECLARE=false uses existing topology \
                         only; create it or let dedupd declare it): {text}"
                    ),
                    (406, _) => format!(
                        "{what} exists with other settings than dedupd declares \
                         (delete it, or create it as dedupd expects and set \
                         DEDUPD_DECLARE=false): {text}"
                    ),
                    _ => format!("{what}: the broker refused it: {code} {text}"),
                };
                return Err(TopologyError::Refused(why));
            }
        }
        Err(TopologyError::Amqp {
            what: what.to_string(),
            source,
        })
    }
}
