//! Channel callbacks for the channels this part opens itself: they only report the broker
//! closing the channel, with its reason, so a refused declare can say why.

use amqprs::callbacks::ChannelCallback;
use amqprs::channel::Channel;
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, Nack, Return};
use tokio::sync::mpsc;

/// Why the broker closed a channel: reply code and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Closed {
    /// The AMQP reply code (404 not found, 406 precondition failed...).
    pub(crate) code: u16,
    /// The broker's words.
    pub(crate) text: String,
}

/// Sends each channel close to a receiver. amqprs runs callbacks inside its dispatcher, where
/// calling channel methods could deadlock, so it only sends.
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
