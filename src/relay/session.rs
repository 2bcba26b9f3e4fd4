//! One broker connection's worth of relaying: the per-message protocol, pipelined.
//!
//! A single task owns all the state of a session (no locks): deliveries come in from the consumer,
//! claims go to the store's claim thread in batches, first-seen messages are published with
//! confirms, confirmed claims go to the commit thread, and the source is acked once the commit is
//! durable. Everything that settles a delivery comes back to this task as an [`Event`].
//!
//! When the session ends for any reason, its state is dropped: claims not yet committed are
//! released (dropping a `Claim` does that), and the broker redelivers every unacked message.

use std::sync::Arc;
use std::time::{Duration, Instant};

use amqprs::callbacks::{ChannelCallback, ConnectionCallback};
use amqprs::channel::{
    BasicAckArguments, BasicCancelArguments, BasicConsumeArguments, BasicPublishArguments,
    BasicQosArguments, BasicRejectArguments, Channel, ConfirmSelectArguments, ConsumerMessage,
};
use amqprs::connection::Connection;
use amqprs::{Ack, BasicProperties, Cancel, Close, CloseChannel, Nack, Return};
use tokio::sync::mpsc;

use super::confirms::{Confirms, Fingerprint, Outcome};
use super::id::{IdDecision, IdExtractor};
use super::quarantine;
use super::window::Windows;
use super::worker::{ClaimJob, CommitJob, Workers};
use super::Error;
use crate::config::Config;
use crate::metrics::{DeadLetterReason, Metrics};
use crate::shutdown::Shutdown;
use crate::store::{Claim, Error as StoreError, Settled, Verdict};

/// Most deliveries taken from the consumer before the batch goes to the claim thread.
const CLAIM_BATCH: usize = 256;
/// How often publishes are checked against the confirm timeout.
const TIMEOUT_TICK: Duration = Duration::from_millis(100);
/// How long a failed start waits to learn whether the connection died of an I/O error.
const IO_FAILURE_WAIT: Duration = Duration::from_millis(200);
/// How long closing a channel may take before we stop waiting (a dead connection never answers).
const CHANNEL_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// A delivery from the source queue, carried through the protocol.
#[derive(Debug)]
pub(crate) struct Delivery {
    /// Its tag on the consume channel.
    tag: u64,
    /// The routing key it was published with.
    routing_key: String,
    props: BasicProperties,
    body: Vec<u8>,
    /// How long its id stays a duplicate once recorded: `DEDUPD_TTL` or its TTL header's.
    pub(super) window: Duration,
}

/// Everything that reaches a session's task from elsewhere.
#[derive(Debug)]
pub(crate) enum Event {
    /// Publisher confirm.
    PubAck { tag: u64, multiple: bool },
    /// Publisher nack.
    PubNack { tag: u64, multiple: bool },
    /// An unroutable publish came back.
    PubReturn(Fingerprint),
    /// The broker closed a channel.
    ChannelClosed {
        role: &'static str,
        code: u16,
        text: String,
    },
    /// The broker cancelled our consumer (the source queue was deleted, say).
    ConsumerCancelled,
    /// The broker closed the connection.
    ConnectionClosed { code: u16, text: String },
    /// Verdicts of a claim job.
    Claimed(Vec<(Delivery, Vec<u8>, Result<Verdict, StoreError>)>),
    /// Outcome of a commit job.
    Committed {
        tags: Vec<u64>,
        result: Result<(), Arc<StoreError>>,
    },
    /// The claim a delivery was waiting for settled.
    Settled {
        /// Boxed: a delivery is large and this event is rare next to confirms.
        delivery: Box<Delivery>,
        id: Vec<u8>,
        settled: Settled,
    },
}

/// A publish waiting for its confirm, and what to do with its source delivery then.
#[derive(Debug)]
enum Publish {
    /// A first-seen message (or one without id, `claim: None`) sent to the destination.
    Forward { tag: u64, claim: Option<Claim> },
    /// The audit copy of a duplicate.
    Copy { tag: u64 },
}

/// How a session ended without failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// Shutdown asked for, and everything in flight settled.
    Drained,
    /// Shutdown asked for, and the grace period ran out first.
    GraceExpired,
}

/// How a session failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The connection or a channel is gone: reconnect.
    Lost(String),
    /// Something reconnecting cannot fix.
    Fatal(Error),
}

fn lost(what: &str) -> impl FnOnce(amqprs::error::Error) -> Failure + '_ {
    move |e| Failure::Lost(format!("{what}: {e}"))
}

/// Opens a channel for `role` (publish or consume) whose events go to the session's queue.
async fn open_channel(
    conn: &Connection,
    role: &'static str,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<Channel, Failure> {
    let channel = conn
        .open_channel(None)
        .await
        .map_err(lost(&format!("opening the {role} channel")))?;
    channel
        .register_callback(ChannelEvents::new(role, events.clone()))
        .await
        .map_err(lost(&format!("registering {role} callbacks")))?;
    Ok(channel)
}

/// What a session shares with the rest of the relay.
pub(crate) struct Context<'a> {
    pub(crate) config: &'a Config,
    pub(crate) metrics: &'a Metrics,
    pub(crate) workers: &'a Workers,
    pub(crate) ids: &'a IdExtractor,
    pub(crate) windows: &'a Windows,
}

/// A session's state, owned by its one task.
pub(crate) struct Session<'a> {
    cx: Context<'a>,
    consume: Channel,
    publish: Channel,
    consumer_tag: String,
    events_tx: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
    /// Source deliveries neither acked nor rejected.
    unsettled: super::acks::Unsettled,
    confirms: Confirms<Publish>,
    /// Tags to ack at the end of this turn of the loop (together, so `multiple` can cover them).
    to_ack: Vec<u64>,
    /// Deliveries to send to the claim thread at the end of this turn.
    to_claim: Vec<(Delivery, Vec<u8>)>,
    /// Claim jobs sent and not answered.
    claims_out: usize,
    /// Commit jobs sent and not answered.
    commits_out: usize,
    /// Deliveries waiting for another delivery's claim to settle.
    waiting: usize,
    /// Shutting down: acks are sent at once, not held for a `multiple` one.
    draining: bool,
    /// Deliveries at the last delivery a quorum source allows them: if the session ends before
    /// they are settled, the broker dead-letters them, and they are counted then.
    last_chance: Vec<u64>,
}

impl<'a> Session<'a> {
    /// Opens the consume and publish channels on `conn` and starts consuming.
    pub(crate) async fn open(
        conn: &Connection,
        cx: Context<'a>,
        events_tx: mpsc::UnboundedSender<Event>,
        events: mpsc::UnboundedReceiver<Event>,
    ) -> Result<(Session<'a>, mpsc::UnboundedReceiver<ConsumerMessage>), Failure> {
        let config = cx.config;
        let metrics = cx.metrics;
        let io_failed = conn.listen_network_io_failure();
        tokio::pin!(io_failed);
        let opened = tokio::select! {
            // Polled first so that it listens before anything below can fail.
            biased;
            _ = &mut io_failed => Err((Failure::Lost("connection lost".into()), true)),
            opened = Self::start(conn, cx, events_tx, events) => opened.map_err(|f| (f, false)),
        };
        match opened {
            Ok(opened) => Ok(opened),
            Err((failure, io_error)) => {
                // A connection that died under a consume may have died on an undecodable
                // message: the broker hands it out first on every new connection.
                let io_error = io_error
                    || matches!(
                        tokio::time::timeout(IO_FAILURE_WAIT, &mut io_failed).await,
                        Ok(true)
                    );
                if io_error {
                    sweep_source(config, metrics).await;
                }
                Err(failure)
            }
        }
    }

    async fn start(
        conn: &Connection,
        cx: Context<'a>,
        events_tx: mpsc::UnboundedSender<Event>,
        events: mpsc::UnboundedReceiver<Event>,
    ) -> Result<(Session<'a>, mpsc::UnboundedReceiver<ConsumerMessage>), Failure> {
        let config = cx.config;
        let publish = open_channel(conn, "publish", &events_tx).await?;
        publish
            .confirm_select(ConfirmSelectArguments::new(false))
            .await
            .map_err(lost("enabling publisher confirms"))?;

        let consume = open_channel(conn, "consume", &events_tx).await?;
        consume
            .basic_qos(BasicQosArguments::new(0, config.prefetch.get(), false))
            .await
            .map_err(lost("setting the prefetch"))?;
        // An empty tag lets the broker choose a unique one.
        let (consumer_tag, deliveries) = consume
            .basic_consume_rx(
                BasicConsumeArguments::new(&config.source_queue, "")
                    .manual_ack(true)
                    .finish(),
            )
            .await
            .map_err(lost("starting to consume"))?;
        let session = Session {
            cx,
            consume,
            publish,
            consumer_tag,
            events_tx,
            events,
            unsettled: Default::default(),
            confirms: Confirms::default(),
            to_ack: Vec::new(),
            to_claim: Vec::new(),
            claims_out: 0,
            commits_out: 0,
            waiting: 0,
            draining: false,
            last_chance: Vec::new(),
        };
        Ok((session, deliveries))
    }

    /// Relays until shutdown (then drains within the grace period) or until the connection fails.
    pub(crate) async fn run(
        mut self,
        conn: &Connection,
        deliveries: mpsc::UnboundedReceiver<ConsumerMessage>,
        shutdown: Shutdown,
    ) -> Result<End, Failure> {
        let result = self.relay(conn, deliveries, shutdown).await;
        // What goes back to the queue now and was at its last allowed delivery is dead-lettered
        // by the broker, where dedupd would not see it.
        for &tag in &self.last_chance {
            if self.unsettled.holds(tag) {
                tracing::warn!(
                    tag,
                    "returned at its last allowed delivery: the broker dead-letters it"
                );
                self.cx
                    .metrics
                    .dead_lettered(DeadLetterReason::DeliveryLimit);
            }
        }
        // Close the channels ourselves: left to their drop guards, amqprs closes them from
        // spawned tasks that may still be running when the runtime stops.
        for channel in [self.consume.clone(), self.publish.clone()] {
            let _ = tokio::time::timeout(CHANNEL_CLOSE_TIMEOUT, channel.close()).await;
        }
        result
    }

    async fn relay(
        &mut self,
        conn: &Connection,
        mut deliveries: mpsc::UnboundedReceiver<ConsumerMessage>,
        mut shutdown: Shutdown,
    ) -> Result<End, Failure> {
        let conn_lost = conn.listen_network_io_failure();
        tokio::pin!(conn_lost);
        let mut tick = tokio::time::interval(TIMEOUT_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut consuming = true;
        // Set once shutdown is asked for: the end of the grace period.
        let mut grace: Option<tokio::time::Instant> = None;
        self.cx.metrics.set_healthy(true);
        tracing::info!(
            queue = %self.cx.config.source_queue,
            exchange = %self.cx.config.dest_exchange,
            "consuming"
        );

        loop {
            if grace.is_some() && !consuming && self.idle() {
                return Ok(End::Drained);
            }
            tokio::select! {
                biased;
                _ = shutdown.fired(), if grace.is_none() => {
                    grace = Some(tokio::time::Instant::now() + self.cx.config.shutdown_grace);
                    self.draining = true;
                    self.cx.metrics.set_healthy(false);
                    tracing::info!(
                        in_flight = self.unsettled.len(),
                        grace = ?self.cx.config.shutdown_grace,
                        "shutting down: no new deliveries, finishing those in flight"
                    );
                    // Deliveries sent before the cancel-ok still arrive; then the stream ends.
                    self.consume
                        .basic_cancel(BasicCancelArguments::new(&self.consumer_tag))
                        .await
                        .map_err(lost("cancelling the consumer"))?;
                }
                _ = sleep_until(grace), if grace.is_some() => {
                    tracing::warn!(
                        unsettled = self.unsettled.len(),
                        "grace period over; unsettled messages go back to the source queue"
                    );
                    return Ok(End::GraceExpired);
                }
                io_error = &mut conn_lost => {
                    if io_error {
                        sweep_source(self.cx.config, self.cx.metrics).await;
                    }
                    return Err(Failure::Lost("connection lost".into()));
                }
                Some(event) = self.events.recv() => self.on_event(event, grace.is_some()).await?,
                message = deliveries.recv(), if consuming => match message {
                    Some(message) => {
                        self.on_delivery(message).await?;
                        // Take what else is already here, so claims go in batches.
                        while self.to_claim.len() < CLAIM_BATCH {
                            match deliveries.try_recv() {
                                Ok(message) => self.on_delivery(message).await?,
                                Err(_) => break,
                            }
                        }
                    }
                    None if grace.is_some() => consuming = false,
                    None => {
                        // The client library ends the stream when the connection dies; if it
                        // died decoding a delivery, that message is at the head of the queue.
                        sweep_source(self.cx.config, self.cx.metrics).await;
                        return Err(Failure::Lost("the consumer stopped".into()));
                    }
                },
                _ = tick.tick() => self.expire().await?,
            }
            self.flush().await?;
        }
    }

    /// Nothing in flight: every delivery received is settled or about to be acked.
    fn idle(&self) -> bool {
        self.to_claim.is_empty()
            && self.claims_out == 0
            && self.waiting == 0
            && self.confirms.is_empty()
            && self.commits_out == 0
            && !self.unsettled.has_deferred()
    }

    async fn on_delivery(&mut self, mut message: ConsumerMessage) -> Result<(), Failure> {
        let (Some(deliver), Some(props), Some(body)) = (
            message.deliver.take(),
            message.basic_properties.take(),
            message.content.take(),
        ) else {
            // amqprs promises all three; a delivery without them cannot even be rejected.
            return Err(Failure::Lost(
                "incomplete delivery from the client library".into(),
            ));
        };
        let tag = deliver.delivery_tag();
        self.unsettled.received(tag);
        if let Some(limit) = self.cx.config.queue_type.delivery_limit() {
            if delivery_count(&props) >= u64::from(limit.get()) {
                self.last_chance.push(tag);
            }
        }
        // A window that cannot be read is never guessed at, whatever the id.
        let window = match self.cx.windows.decide(&props) {
            Ok(window) => window,
            Err(reason) => return self.reject(tag, reason).await,
        };
        let delivery = Delivery {
            tag,
            routing_key: deliver.routing_key().clone(),
            props,
            body,
            window,
        };
        match self
            .cx
            .ids
            .decide(&delivery.routing_key, &delivery.props, &delivery.body)
        {
            IdDecision::Claim(id) => self.to_claim.push((delivery, id)),
            IdDecision::ForwardUnchecked => self.forward(delivery, None).await?,
            IdDecision::DeadLetter => {
                self.reject(delivery.tag, DeadLetterReason::NoId).await?;
            }
        }
        Ok(())
    }

    async fn on_event(&mut self, event: Event, draining: bool) -> Result<(), Failure> {
        match event {
            Event::Claimed(verdicts) => {
                self.claims_out -= 1;
                for (delivery, id, verdict) in verdicts {
                    self.on_verdict(delivery, id, verdict).await?;
                }
            }
            Event::PubAck { tag, multiple } => {
                let settled = self.confirms.acked(tag, multiple);
                self.on_confirms(settled).await?;
            }
            Event::PubNack { tag, multiple } => {
                let settled = self.confirms.nacked(tag, multiple);
                self.on_confirms(settled).await?;
            }
            Event::PubReturn(fingerprint) => self.confirms.returned(fingerprint),
            Event::Committed { tags, result } => {
                self.commits_out -= 1;
                if let Err(e) = result {
                    // The ids are not recorded, so the messages must not be acked; they were
                    // forwarded already. Stop: the broker redelivers them to the next run, which
                    // is the crash window the README describes.
                    return Err(Failure::Fatal(Error::Commit(e)));
                }
                self.cx.metrics.forwarded(tags.len() as u64, 0);
                self.to_ack.extend(tags);
            }
            Event::Settled {
                delivery,
                id,
                settled,
            } => {
                self.waiting -= 1;
                match settled {
                    Settled::Committed => self.duplicate(*delivery).await?,
                    // The first copy failed: this one is new again.
                    Settled::Released => self.to_claim.push((*delivery, id)),
                }
            }
            Event::ChannelClosed { role, code, text } => {
                return Err(Failure::Lost(format!(
                    "the broker closed the {role} channel: {code} {text}"
                )))
            }
            Event::ConsumerCancelled if draining => {}
            Event::ConsumerCancelled => {
                return Err(Failure::Lost(
                    "the broker cancelled the consumer (source queue deleted?)".into(),
                ))
            }
            Event::ConnectionClosed { code, text } => {
                return Err(Failure::Lost(format!(
                    "the broker closed the connection: {code} {text}"
                )))
            }
        }
        Ok(())
    }

    async fn on_verdict(
        &mut self,
        delivery: Delivery,
        id: Vec<u8>,
        verdict: Result<Verdict, StoreError>,
    ) -> Result<(), Failure> {
        match verdict {
            Ok(Verdict::New(claim)) => self.forward(delivery, Some(claim)).await,
            Ok(Verdict::Duplicate(_)) => self.duplicate(delivery).await,
            Ok(Verdict::InFlight(waiter)) => {
                // Another delivery of this id is being forwarded: wait for its outcome without
                // holding up the others.
                self.waiting += 1;
                let tx = self.events_tx.clone();
                tokio::spawn(async move {
                    let settled = waiter.settled().await;
                    let _ = tx.send(Event::Settled {
                        delivery: Box::new(delivery),
                        id,
                        settled,
                    });
                });
                Ok(())
            }
            Err(e @ (StoreError::IdTooLong { .. } | StoreError::EmptyId { .. })) => {
                tracing::warn!(tag = delivery.tag, cause = %e, "id refused, dead-lettering");
                self.reject(delivery.tag, DeadLetterReason::BadId).await
            }
            Err(e) => Err(Failure::Fatal(Error::Claim(e))),
        }
    }

    /// Publishes a delivery to the destination, unchanged, with `mandatory` so an unroutable one
    /// comes back instead of vanishing.
    async fn forward(&mut self, delivery: Delivery, claim: Option<Claim>) -> Result<(), Failure> {
        let config = self.cx.config;
        let routing_key = config
            .dest_routing_key
            .as_deref()
            .unwrap_or(&delivery.routing_key);
        let fingerprint = Fingerprint::of(
            &config.dest_exchange,
            routing_key,
            delivery.props.message_id().map(String::as_str),
            &delivery.body,
        );
        let args = BasicPublishArguments::new(&config.dest_exchange, routing_key)
            .mandatory(true)
            .finish();
        self.publish
            .basic_publish(delivery.props, delivery.body, args)
            .await
            .map_err(lost("publishing"))?;
        let item = Publish::Forward {
            tag: delivery.tag,
            claim,
        };
        self.confirms
            .published(fingerprint, Instant::now() + config.confirm_timeout, item);
        self.cx.metrics.set_publishes_in_flight(self.confirms.len());
        Ok(())
    }

    /// A duplicate: acked, after its audit copy is confirmed if there is a duplicates exchange.
    async fn duplicate(&mut self, delivery: Delivery) -> Result<(), Failure> {
        let Some(exchange) = &self.cx.config.duplicates_exchange else {
            self.cx.metrics.duplicates(1);
            self.to_ack.push(delivery.tag);
            return Ok(());
        };
        let fingerprint = Fingerprint::of(
            exchange,
            &delivery.routing_key,
            delivery.props.message_id().map(String::as_str),
            &delivery.body,
        );
        // Not mandatory: an audit exchange nobody listens to is the operator's choice.
        let args = BasicPublishArguments::new(exchange, &delivery.routing_key);
        self.publish
            .basic_publish(delivery.props, delivery.body, args)
            .await
            .map_err(lost("publishing a duplicate's copy"))?;
        let deadline = Instant::now() + self.cx.config.confirm_timeout;
        self.confirms
            .published(fingerprint, deadline, Publish::Copy { tag: delivery.tag });
        Ok(())
    }

    async fn on_confirms(&mut self, settled: Vec<(Publish, Outcome)>) -> Result<(), Failure> {
        let mut tags = Vec::new();
        let mut claims = Vec::new();
        for (publish, outcome) in settled {
            match (publish, outcome) {
                (Publish::Forward { tag, claim }, Outcome::Confirmed) => match claim {
                    Some(claim) => {
                        tags.push(tag);
                        claims.push(claim);
                    }
                    None => {
                        self.cx.metrics.forwarded(1, 1);
                        self.to_ack.push(tag);
                    }
                },
                (Publish::Forward { tag, claim }, failed) => {
                    // Release first, so a copy waiting on this id is processed anew.
                    drop(claim);
                    let reason = if failed == Outcome::Returned {
                        DeadLetterReason::Returned
                    } else {
                        DeadLetterReason::Nacked
                    };
                    self.reject(tag, reason).await?;
                }
                (Publish::Copy { tag }, outcome) => {
                    if outcome == Outcome::Confirmed {
                        self.cx.metrics.duplicate_copied();
                    } else {
                        tracing::warn!(tag, ?outcome, "copy of a duplicate not accepted");
                    }
                    self.cx.metrics.duplicates(1);
                    self.to_ack.push(tag);
                }
            }
        }
        self.cx.metrics.set_publishes_in_flight(self.confirms.len());
        if !claims.is_empty() {
            let job = CommitJob {
                tags,
                claims,
                reply: self.events_tx.clone(),
            };
            if !self.cx.workers.commit(job) {
                return Err(Failure::Fatal(Error::WorkersGone));
            }
            self.commits_out += 1;
        }
        Ok(())
    }

    /// Fails the publishes that waited past the confirm timeout.
    async fn expire(&mut self) -> Result<(), Failure> {
        for publish in self.confirms.expired(Instant::now()) {
            match publish {
                Publish::Forward { tag, claim } => {
                    drop(claim);
                    self.reject(tag, DeadLetterReason::Timeout).await?;
                }
                Publish::Copy { tag } => {
                    tracing::warn!(tag, "copy of a duplicate not confirmed in time");
                    self.cx.metrics.duplicates(1);
                    self.to_ack.push(tag);
                }
            }
        }
        Ok(())
    }

    /// Rejects a delivery without requeue: the source queue's dead-letter exchange keeps it.
    async fn reject(&mut self, tag: u64, reason: DeadLetterReason) -> Result<(), Failure> {
        if !self.unsettled.rejected(tag) {
            return Ok(());
        }
        tracing::debug!(tag, reason = reason.label(), "dead-lettering");
        self.consume
            .basic_reject(BasicRejectArguments::new(tag, false))
            .await
            .map_err(lost("rejecting"))?;
        self.cx.metrics.dead_lettered(reason);
        Ok(())
    }

    /// Sends what this turn of the loop collected: one claim job, and the acks.
    async fn flush(&mut self) -> Result<(), Failure> {
        if !self.to_claim.is_empty() {
            let job = ClaimJob {
                items: std::mem::take(&mut self.to_claim),
                reply: self.events_tx.clone(),
            };
            if !self.cx.workers.claim(job) {
                return Err(Failure::Fatal(Error::WorkersGone));
            }
            self.claims_out += 1;
        }
        if !self.to_ack.is_empty() || self.unsettled.has_deferred() {
            // Draining, nothing is worth waiting for: every ack goes now.
            let acks = self
                .unsettled
                .ack(&mut self.to_ack, Instant::now(), self.draining);
            for (tag, multiple) in acks {
                self.consume
                    .basic_ack(BasicAckArguments::new(tag, multiple))
                    .await
                    .map_err(lost("acking"))?;
            }
        }
        Ok(())
    }
}

/// After the connection died under the relay: dead-letters the messages at the head of the
/// source queue that amqprs cannot decode (see [`quarantine`]), so that one such message cannot
/// stop the relay for good.
async fn sweep_source(config: &Config, metrics: &Metrics) {
    match quarantine::sweep(config).await {
        Ok(swept) if swept.rejected > 0 => {
            for _ in 0..swept.rejected {
                metrics.dead_lettered(DeadLetterReason::Undecodable);
            }
            tracing::warn!(
                rejected = swept.rejected,
                inspected = swept.inspected,
                "dead-lettered messages the AMQP client cannot decode"
            )
        }
        Ok(swept) => tracing::debug!(
            inspected = swept.inspected,
            "no undecodable message at the head of the source queue"
        ),
        Err(cause) => tracing::warn!(
            %cause,
            "cannot look for undecodable messages at the head of the source queue"
        ),
    }
}

/// How many times a quorum queue delivered this message before and had it returned: its
/// `x-delivery-count` header, 0 when absent (a first delivery).
fn delivery_count(props: &BasicProperties) -> u64 {
    use amqprs::FieldValue;
    let Some(value) = props
        .headers()
        .and_then(|h| h.get(&"x-delivery-count".try_into().expect("short")))
    else {
        return 0;
    };
    match value {
        FieldValue::l(n) => u64::try_from(*n).unwrap_or(0),
        FieldValue::I(n) => u64::try_from(*n).unwrap_or(0),
        FieldValue::i(n) => u64::from(*n),
        FieldValue::s(n) => u64::try_from(*n).unwrap_or(0),
        FieldValue::u(n) => u64::from(*n),
        FieldValue::b(n) => u64::try_from(*n).unwrap_or(0),
        FieldValue::B(n) => u64::from(*n),
        _ => 0,
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Channel callbacks: forward what the broker says to the session's task. amqprs runs these
/// inside its dispatcher, where calling channel methods could deadlock, so they only send.
pub(crate) struct ChannelEvents {
    role: &'static str,
    tx: mpsc::UnboundedSender<Event>,
}

impl ChannelEvents {
    pub(crate) fn new(role: &'static str, tx: mpsc::UnboundedSender<Event>) -> ChannelEvents {
        ChannelEvents { role, tx }
    }
}

#[async_trait::async_trait]
impl ChannelCallback for ChannelEvents {
    async fn close(
        &mut self,
        _: &Channel,
        close: CloseChannel,
    ) -> Result<(), amqprs::error::Error> {
        let _ = self.tx.send(Event::ChannelClosed {
            role: self.role,
            code: close.reply_code(),
            text: close.reply_text().clone(),
        });
        Ok(())
    }

    async fn cancel(&mut self, _: &Channel, _: Cancel) -> Result<(), amqprs::error::Error> {
        let _ = self.tx.send(Event::ConsumerCancelled);
        Ok(())
    }

    async fn flow(&mut self, _: &Channel, active: bool) -> Result<bool, amqprs::error::Error> {
        tracing::info!(channel = self.role, active, "broker flow control");
        Ok(active)
    }

    async fn publish_ack(&mut self, _: &Channel, ack: Ack) {
        let _ = self.tx.send(Event::PubAck {
            tag: ack.delivery_tag(),
            // Sic: amqprs spells it this way.
            multiple: ack.mutiple(),
        });
    }

    async fn publish_nack(&mut self, _: &Channel, nack: Nack) {
        let _ = self.tx.send(Event::PubNack {
            tag: nack.delivery_tag(),
            multiple: nack.multiple(),
        });
    }

    async fn publish_return(
        &mut self,
        _: &Channel,
        ret: Return,
        props: BasicProperties,
        content: Vec<u8>,
    ) {
        tracing::debug!(
            exchange = %ret.exchange(),
            routing_key = %ret.routing_key(),
            code = ret.reply_code(),
            "publish returned"
        );
        let fingerprint = Fingerprint::of(
            ret.exchange(),
            ret.routing_key(),
            props.message_id().map(String::as_str),
            &content,
        );
        let _ = self.tx.send(Event::PubReturn(fingerprint));
    }
}

/// Connection callbacks: report the broker closing the connection; log blocking.
pub(crate) struct ConnectionEvents {
    pub(crate) tx: mpsc::UnboundedSender<Event>,
}

#[async_trait::async_trait]
impl ConnectionCallback for ConnectionEvents {
    async fn close(&mut self, _: &Connection, close: Close) -> Result<(), amqprs::error::Error> {
        let _ = self.tx.send(Event::ConnectionClosed {
            code: close.reply_code(),
            text: close.reply_text().clone(),
        });
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
