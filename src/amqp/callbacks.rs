//! The amqprs callbacks of every connection and channel dedupd opens. amqprs runs callbacks
//! inside its dispatcher, where calling a channel method could deadlock: each one here only
//! forwards what the broker said to an mpsc receiver, and the receiving task acts on it.

use amqprs::callbacks::{ChannelCallback, ConnectionCallback};
use amqprs::channel::Channel;
use amqprs::connection::Connection;
use amqprs::{Ack, BasicProperties, Cancel, Close, CloseChannel, Nack, Return};
use tokio::sync::mpsc;

/// Why the broker closed a channel: reply code and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Closed {
    /// The AMQP reply code (404 not found, 406 precondition failed...).
    pub(crate) code: u16,
    /// The broker's words.
    pub(crate) text: String,
}

/// Sends each channel close to a receiver; for channels that only declare or inspect, where a
/// refusal must say why.
pub(crate) struct ReportClose(pub(crate) mpsc::UnboundedSender<Closed>);

#[async_trait::async_trait]
impl ChannelCallback for ReportClose {
    async fn close(
        &mut self,
        _: &Channel,
        close: CloseChannel,
    ) -> Result<(), amqprs::error::Error> {
        let _ = self.0.send(Closed {
            code: close.reply_code(),
            text: close.reply_text().clone(),
        });
        Ok(())
    }

    async fn cancel(&mut self, _: &Channel, _: Cancel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }

    async fn flow(&mut self, _: &Channel, active: bool) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }

    async fn publish_ack(&mut self, _: &Channel, _: Ack) {}

    async fn publish_nack(&mut self, _: &Channel, _: Nack) {}

    async fn publish_return(&mut self, _: &Channel, _: Return, _: BasicProperties, _: Vec<u8>) {}
}

/// What the broker said on a relaying connection or one of its channels.
#[derive(Debug)]
pub(crate) enum BrokerEvent {
    /// Publisher confirm of `tag` (and every earlier one with `multiple`).
    PubAck { tag: u64, multiple: bool },
    /// Publisher nack of `tag` (and every earlier one with `multiple`).
    PubNack { tag: u64, multiple: bool },
    /// An unroutable publish came back.
    PubReturn(Returned),
    /// The broker closed the channel of `role`.
    ChannelClosed {
        role: &'static str,
        code: u16,
        text: String,
    },
    /// The broker cancelled our consumer (the source queue was deleted, say).
    ConsumerCancelled,
    /// The broker closed the connection.
    ConnectionClosed { code: u16, text: String },
}

/// A publish the broker returned as unroutable: what identifies it among those in flight.
#[derive(Debug)]
pub(crate) struct Returned {
    /// The exchange it was published to.
    pub(crate) exchange: String,
    /// Its routing key.
    pub(crate) routing_key: String,
    /// Its `message_id`, if it had one.
    pub(crate) message_id: Option<String>,
    /// Its body.
    pub(crate) body: Vec<u8>,
}

/// Channel callbacks of a relaying channel: each broker event goes to the receiver of `tx`, as
/// the receiver's own event type (`E: From<BrokerEvent>`), so one queue carries them beside the
/// receiver's other events.
pub(crate) struct ChannelEvents<E> {
    /// Which channel this is (publish, consume), for messages.
    role: &'static str,
    /// Where the events go.
    tx: mpsc::UnboundedSender<E>,
}

impl<E> ChannelEvents<E> {
    pub(crate) fn new(role: &'static str, tx: mpsc::UnboundedSender<E>) -> ChannelEvents<E> {
        ChannelEvents { role, tx }
    }

    fn send(&self, event: BrokerEvent)
    where
        E: From<BrokerEvent>,
    {
        // The receiver gone means the session ended: nothing left to tell.
        let _ = self.tx.send(event.into());
    }
}

#[async_trait::async_trait]
impl<E: From<BrokerEvent> + Send + 'static> ChannelCallback for ChannelEvents<E> {
    async fn close(
        &mut self,
        _: &Channel,
        close: CloseChannel,
    ) -> Result<(), amqprs::error::Error> {
        self.send(BrokerEvent::ChannelClosed {
            role: self.role,
            code: close.reply_code(),
            text: close.reply_text().clone(),
        });
        Ok(())
    }

    async fn cancel(&mut self, _: &Channel, _: Cancel) -> Result<(), amqprs::error::Error> {
        self.send(BrokerEvent::ConsumerCancelled);
        Ok(())
    }

    async fn flow(&mut self, _: &Channel, active: bool) -> Result<bool, amqprs::error::Error> {
        tracing::info!(channel = self.role, active, "broker flow control");
        Ok(active)
    }

    async fn publish_ack(&mut self, _: &Channel, ack: Ack) {
        self.send(BrokerEvent::PubAck {
            tag: ack.delivery_tag(),
            // Sic: amqprs spells it this way.
            multiple: ack.mutiple(),
        });
    }

    async fn publish_nack(&mut self, _: &Channel, nack: Nack) {
        self.send(BrokerEvent::PubNack {
            tag: nack.delivery_tag(),
            multiple: nack.multiple(),
        });
    }

    async fn publish_return(
        &mut self,
        _: &Channel,
        ret: Return,
        props: BasicProperties,
        body: Vec<u8>,
    ) {
        tracing::debug!(
            exchange = %ret.exchange(),
            routing_key = %ret.routing_key(),
            code = ret.reply_code(),
            "publish returned"
        );
        self.send(BrokerEvent::PubReturn(Returned {
            exchange: ret.exchange().clone(),
            routing_key: ret.routing_key().clone(),
            message_id: props.message_id().cloned(),
            body,
        }));
    }
}

/// Connection callbacks of a relaying connection: the broker closing it goes to the receiver of
/// `tx`; blocking is logged.
pub(crate) struct ConnectionEvents<E> {
    /// Where the close goes.
    pub(crate) tx: mpsc::UnboundedSender<E>,
}

#[async_trait::async_trait]
impl<E: From<BrokerEvent> + Send + 'static> ConnectionCallback for ConnectionEvents<E> {
    async fn close(&mut self, _: &Connection, close: Close) -> Result<(), amqprs::error::Error> {
        let _ = self.tx.send(
            BrokerEvent::ConnectionClosed {
                code: close.reply_code(),
                text: close.reply_text().clone(),
            }
            .into(),
        );
        Ok(())
    }

    async fn blocked(&mut self, _: &Connection, reason: String) {
        tracing::warn!(%reason, "broker blocked the connection (resource alarm)");
    }

    async fn unblocked(&mut self, _: &Connection) {
        tracing::info!("broker unblocked the connection");
    }

    async fn secret_updated(&mut self, _: &Connection) {}
}
