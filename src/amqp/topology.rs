//! The broker objects dedupd uses: declared idempotently, or only checked with passive declares.
//!
//! - source queue: durable, `x-dead-letter-exchange = <source>.dlx`, and no other arguments when
//!   classic; when quorum (`DEDUPD_QUEUE_TYPE`) also `x-queue-type = quorum`, `x-delivery-limit`
//!   and at-least-once dead-lettering (`x-dead-letter-strategy = at-least-once`, which the broker
//!   allows only with `x-overflow = reject-publish`);
//! - `<source>.dlx`: durable fanout exchange, with durable queue `<source>.dead` (of the same type)
//!   bound to it, so every rejected message is kept;
//!
//! A queue is never redeclared: one that exists with other arguments (another type, say) stops
//! start-up with an error naming it, because only deleting it would change it.
//! - destination exchange: durable, of the configured type;
//! - duplicates exchange (if configured): durable fanout.

use amqprs::channel::{
    Channel, ExchangeDeclareArguments, QueueBindArguments, QueueDeclareArguments,
};
use amqprs::connection::Connection;
use amqprs::{FieldTable, FieldValue};
use tokio::sync::mpsc;

use super::callbacks::{Closed, ReportClose};
use crate::config::{Config, QueueType};

/// The source queue's arguments for `config`: the dead-letter exchange, and for a quorum queue its
/// type, delivery limit and at-least-once dead-lettering.
///
/// A classic queue carries no `x-queue-type`: queues declared by earlier versions have none, and
/// the broker compares the arguments of a redeclaration one by one.
pub(crate) fn source_arguments(config: &Config) -> FieldTable {
    let mut args = FieldTable::new();
    insert(
        &mut args,
        "x-dead-letter-exchange",
        config.relay.dead_letter_exchange().as_str().into(),
    );
    if let QueueType::Quorum { delivery_limit } = config.relay.queue_type {
        insert(&mut args, "x-queue-type", "quorum".into());
        // RabbitMQ decodes the limit as a long; the broker counts returns, not first deliveries.
        insert(
            &mut args,
            "x-delivery-limit",
            FieldValue::l(i64::from(delivery_limit.get())),
        );
        // Without it the broker drops a dead letter it cannot route or store (at-most-once);
        // at-least-once keeps the message in the source until `<source>.dead` confirms it.
        insert(&mut args, "x-dead-letter-strategy", "at-least-once".into());
        insert(&mut args, "x-overflow", "reject-publish".into());
    }
    if config.relay.ha {
        // Of the dedupd consuming it, the broker delivers to one; the others are its standbys.
        insert(&mut args, "x-single-active-consumer", FieldValue::t(true));
    }
    args
}

/// Longer than the longest window (`DEDUPD_MAX_TTL`), so that a node that starts empty finds
/// every live id in the stream. RabbitMQ drops whole segment files only once all they hold is
/// older than this.
fn ids_stream_max_age(config: &Config) -> String {
    format!("{}s", config.store.max_ttl.as_secs() + 60)
}

fn insert(args: &mut FieldTable, key: &str, value: FieldValue) {
    args.insert(key.try_into().expect("short key"), value);
}

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
    let mut t = Topology::open(conn, !config.relay.declare).await?;
    t.source(config).await?;
    if config.relay.ha {
        t.ids_stream(config).await?;
    }
    t.exchange(
        &format!("destination exchange '{}'", config.relay.dest_exchange),
        &config.relay.dest_exchange,
        &config.relay.dest_exchange_type,
    )
    .await?;
    if let Some(dup) = &config.relay.duplicates_exchange {
        t.exchange(&format!("duplicates exchange '{dup}'"), dup, "fanout")
            .await?;
    }
    t.close().await;
    Ok(())
}

/// A channel for declaring, which turns the broker's refusals into errors naming the piece.
/// Also used by [`crate::shard`], so a shard's source queue is declared exactly as the relay's.
pub(crate) struct Topology {
    /// The connection, for a second channel when a refusal needs a closer look.
    conn: Connection,
    channel: Channel,
    passive: bool,
    /// Where the channel's callback reports the broker closing it, with the reason.
    closed: mpsc::UnboundedReceiver<Closed>,
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
            .register_callback(ReportClose(tx))
            .await
            .map_err(|source| TopologyError::Amqp {
                what: "a channel".into(),
                source,
            })?;
        Ok(Topology {
            conn: conn.clone(),
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
    /// queue `<source>.dead` bound to it, and the source queue itself, durable, with the
    /// arguments of [`source_arguments`].
    pub(crate) async fn source(&mut self, config: &Config) -> Result<(), TopologyError> {
        let dlx = config.relay.dead_letter_exchange();
        let dead = config.relay.dead_letter_queue();
        self.exchange(&format!("dead-letter exchange '{dlx}'"), &dlx, "fanout")
            .await?;
        let mut dead_args = FieldTable::new();
        if let QueueType::Quorum { .. } = config.relay.queue_type {
            insert(&mut dead_args, "x-queue-type", "quorum".into());
        }
        self.queue(
            &format!("dead-letter queue '{dead}'"),
            &dead,
            dead_args,
            config.relay.queue_type,
        )
        .await?;
        if !self.passive {
            self.bind(&dead, &dlx).await?;
        }
        let what = format!("source queue '{}'", config.relay.source_queue);
        match self
            .queue(
                &what,
                &config.relay.source_queue,
                source_arguments(config),
                config.relay.queue_type,
            )
            .await
        {
            Err(TopologyError::Refused(why)) if !self.passive => {
                Err(self.type_conflict(&what, config).await.unwrap_or(
                    // Not the type: the broker's own reason names the argument that differs.
                    TopologyError::Refused(why),
                ))
            }
            result => result,
        }
    }

    /// The stream `<source>.ids` the active instance appends its commit batches to (`DEDUPD_HA`):
    /// `x-max-age` a minute past the window.
    pub(crate) async fn ids_stream(&mut self, config: &Config) -> Result<(), TopologyError> {
        let name = config.relay.ids_stream();
        let mut args = FieldTable::new();
        insert(&mut args, "x-queue-type", "stream".into());
        insert(
            &mut args,
            "x-max-age",
            ids_stream_max_age(config).as_str().into(),
        );
        let args = QueueDeclareArguments::new(&name)
            .durable(true)
            .passive(self.passive)
            .arguments(args)
            .finish();
        let result = self.channel.queue_declare(args).await.map(|_| ());
        self.check(&format!("id stream '{name}'"), result)
    }

    /// After the source queue was refused: whether it is of the other type. The broker reports
    /// the first argument that differs in an order of its own (`x-overflow` before
    /// `x-queue-type`), so a second declare on a fresh channel carries only the dead-letter
    /// exchange and the type: if the queue is of the other type, that is what differs.
    async fn type_conflict(&mut self, what: &str, config: &Config) -> Option<TopologyError> {
        let mut probe = Topology::open(&self.conn, false).await.ok()?;
        let mut args = FieldTable::new();
        insert(
            &mut args,
            "x-dead-letter-exchange",
            config.relay.dead_letter_exchange().as_str().into(),
        );
        if let QueueType::Quorum { .. } = config.relay.queue_type {
            insert(&mut args, "x-queue-type", "quorum".into());
        }
        let result = probe
            .queue(
                what,
                &config.relay.source_queue,
                args,
                config.relay.queue_type,
            )
            .await;
        probe.close().await;
        match result {
            Err(e @ TopologyError::Refused(_)) if e.to_string().contains("DEDUPD_QUEUE_TYPE") => {
                Some(e)
            }
            _ => None,
        }
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

    /// A durable queue with `args`, meant to be of type `kind`: an existing queue of another type
    /// is refused with an error saying so.
    async fn queue(
        &mut self,
        what: &str,
        name: &str,
        args: FieldTable,
        kind: QueueType,
    ) -> Result<(), TopologyError> {
        let args = QueueDeclareArguments::new(name)
            .durable(true)
            .passive(self.passive)
            .arguments(args)
            .finish();
        let result = self.channel.queue_declare(args).await.map(|_| ());
        self.check(what, result).map_err(|e| match e {
            // RabbitMQ names the argument: "inequivalent arg 'x-queue-type' for queue ...".
            TopologyError::Refused(why) if why.contains("'x-queue-type'") => {
                TopologyError::Refused(format!(
                    "{what} exists, but not as a {} queue (DEDUPD_QUEUE_TYPE={}); dedupd never \
                     redeclares a queue: set DEDUPD_QUEUE_TYPE to the queue's type, or move its \
                     messages to a new queue (README, \"Queue type\"): {why}",
                    kind.name(),
                    kind.name(),
                ))
            }
            e => e,
        })
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
        if let Ok(Closed { code, text }) = self.closed.try_recv() {
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
        Err(TopologyError::Amqp {
            what: what.to_string(),
            source,
        })
    }
}
