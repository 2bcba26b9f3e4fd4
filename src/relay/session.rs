//! One broker connection's worth of relaying: the driver of the [`protocol`](super::protocol).
//!
//! A single task owns a session (no locks). It turns what arrives (deliveries from the consumer,
//! publisher confirms and returns from the channel callbacks, commits from the store's thread,
//! the tick, shutdown) into protocol events, and carries out the actions the protocol answers
//! with (claims, answered at once from the store's memory; commit jobs to the store's thread;
//! publishes, acks, rejects) in their order. Every decision is the protocol's; this file only
//! does the I/O.
//!
//! When the session ends for any reason, its state is dropped: claims not yet committed are
//! released (dropping a `Claim` does that), and the broker redelivers every unacked message.

use std::time::{Duration, Instant};

use amqprs::channel::{
    BasicAckArguments, BasicCancelArguments, BasicConsumeArguments, BasicPublishArguments,
    BasicQosArguments, BasicRejectArguments, Channel, ConfirmSelectArguments, ConsumerMessage,
};
use amqprs::connection::Connection;
use amqprs::BasicProperties;
use tokio::sync::mpsc;

use super::confirms::Fingerprint;
use super::ha::Ha;
use super::id::IdExtractor;
use super::protocol::{self, Action, Protocol, Settings, Stop, Target};
use super::window::Windows;
use super::worker::{Claimed, CommitJob, Reply, Workers};
use super::Error;
use crate::amqp::callbacks::{BrokerEvent, ChannelEvents};
use crate::amqp::quarantine;
use crate::config::Config;
use crate::metrics::{DeadLetterReason, Metrics};
use crate::shutdown::Shutdown;
use crate::store::{self, Claim, Settled, Waiter};

/// Most deliveries taken from the consumer before their ids are claimed as one batch.
const CLAIM_BATCH: usize = 256;
/// How often publishes are checked against the confirm timeout.
const TIMEOUT_TICK: Duration = Duration::from_millis(100);
/// How long a failed start waits to learn whether the connection died of an I/O error.
const IO_FAILURE_WAIT: Duration = Duration::from_millis(200);
/// How long closing a channel may take before we stop waiting (a dead connection never answers).
const CHANNEL_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// A source delivery's message as the protocol carries it: moved from the consumer to the
/// publish, never copied.
#[derive(Debug)]
pub(crate) struct Message {
    /// The routing key it was published with.
    routing_key: String,
    props: BasicProperties,
    body: Vec<u8>,
}

type SessionProtocol = Protocol<Message, Claim, Waiter>;
type ProtocolEvent = protocol::Event<Message, Claim, Waiter>;

/// What reaches a session's task from the connection and channel callbacks and the in-flight
/// waiters.
#[derive(Debug)]
pub(crate) enum Event {
    /// What the broker said (see [`crate::amqp::callbacks`]).
    Broker(BrokerEvent),
    /// The claim a delivery was waiting for settled.
    Settled { tag: u64, settled: Settled },
}

impl From<BrokerEvent> for Event {
    fn from(event: BrokerEvent) -> Event {
        Event::Broker(event)
    }
}

/// A session's event queue: the sender the callbacks and waiters get clones of, and the receiver.
pub(crate) type EventQueue = (mpsc::UnboundedSender<Event>, mpsc::UnboundedReceiver<Event>);

/// An open session and the consumer's deliveries it is to be driven with.
pub(crate) type Opened<'a> = (Session<'a>, mpsc::UnboundedReceiver<ConsumerMessage>);

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

impl From<Stop> for Failure {
    fn from(stop: Stop) -> Failure {
        Failure::Fatal(match stop {
            Stop::Claim(e) => Error::Claim(e),
            Stop::Commit(e) => Error::Commit(e),
        })
    }
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
    /// With `DEDUPD_HA=on`: takeover and the id stream.
    pub(crate) ha: Option<&'a Ha>,
}

/// A session: its channels, the protocol, and the queues its events come in on.
pub(crate) struct Session<'a> {
    cx: Context<'a>,
    consume: Channel,
    publish: Channel,
    consumer_tag: String,
    events_tx: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
    /// Where the commit thread answers this session's jobs.
    replies_tx: mpsc::UnboundedSender<Reply>,
    replies: mpsc::UnboundedReceiver<Reply>,
    protocol: SessionProtocol,
    /// The last value given to the publishes-in-flight gauge, to set it only when it moves.
    publishes_in_flight: usize,
    /// With HA: this session got a delivery, so the broker made it the active consumer, and it
    /// caught up with the id stream.
    active: bool,
}

impl<'a> Session<'a> {
    /// Opens the consume and publish channels on `conn` and starts consuming.
    pub(crate) async fn open(
        conn: &Connection,
        cx: Context<'a>,
        events: EventQueue,
    ) -> Result<Opened<'a>, Failure> {
        let config = cx.config;
        let metrics = cx.metrics;
        let io_failed = conn.listen_network_io_failure();
        tokio::pin!(io_failed);
        let opened = tokio::select! {
            // Polled first so that it listens before anything below can fail.
            biased;
            _ = &mut io_failed => Err((Failure::Lost("connection lost".into()), true)),
            opened = Self::start(conn, cx, events) => opened.map_err(|f| (f, false)),
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
        events: EventQueue,
    ) -> Result<Opened<'a>, Failure> {
        let (events_tx, events) = events;
        let config = cx.config;
        let publish = open_channel(conn, "publish", &events_tx).await?;
        publish
            .confirm_select(ConfirmSelectArguments::new(false))
            .await
            .map_err(lost("enabling publisher confirms"))?;

        let consume = open_channel(conn, "consume", &events_tx).await?;
        consume
            .basic_qos(BasicQosArguments::new(
                0,
                config.relay.prefetch.get(),
                false,
            ))
            .await
            .map_err(lost("setting the prefetch"))?;
        // An empty tag lets the broker choose a unique one.
        let (consumer_tag, deliveries) = consume
            .basic_consume_rx(
                BasicConsumeArguments::new(&config.relay.source_queue, "")
                    .manual_ack(true)
                    .finish(),
            )
            .await
            .map_err(lost("starting to consume"))?;
        let (replies_tx, replies) = mpsc::unbounded_channel();
        let settings = Settings {
            confirm_timeout: config.relay.confirm_timeout,
            copy_duplicates: config.relay.duplicates_exchange.is_some(),
        };
        let session = Session {
            cx,
            consume,
            publish,
            consumer_tag,
            events_tx,
            events,
            replies_tx,
            replies,
            protocol: Protocol::new(settings),
            publishes_in_flight: 0,
            active: false,
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
        if let Some(ha) = self.cx.ha {
            ha.step_down(self.cx.metrics);
        }
        // What goes back to the queue now and was at its last allowed delivery is dead-lettered
        // by the broker, where dedupd would not see it.
        for tag in self.protocol.unsettled_last_chances() {
            tracing::warn!(
                tag,
                "returned at its last allowed delivery: the broker dead-letters it"
            );
            self.cx
                .metrics
                .dead_lettered(DeadLetterReason::DeliveryLimit);
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
            queue = %self.cx.config.relay.source_queue,
            exchange = %self.cx.config.relay.dest_exchange,
            "consuming"
        );

        loop {
            if grace.is_some() && !consuming && self.protocol.idle() {
                return Ok(End::Drained);
            }
            let event = tokio::select! {
                biased;
                _ = shutdown.fired(), if grace.is_none() => {
                    grace = Some(tokio::time::Instant::now() + self.cx.config.relay.shutdown_grace);
                    self.cx.metrics.set_healthy(false);
                    tracing::info!(
                        in_flight = self.protocol.unsettled(),
                        grace = ?self.cx.config.relay.shutdown_grace,
                        "shutting down: no new deliveries, finishing those in flight"
                    );
                    // Deliveries sent before the cancel-ok still arrive; then the stream ends.
                    self.consume
                        .basic_cancel(BasicCancelArguments::new(&self.consumer_tag))
                        .await
                        .map_err(lost("cancelling the consumer"))?;
                    Some(protocol::Event::Shutdown)
                }
                _ = sleep_until(grace), if grace.is_some() => {
                    tracing::warn!(
                        unsettled = self.protocol.unsettled(),
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
                Some(event) = self.events.recv() => self.on_event(event, grace.is_some())?,
                Some(Reply { tags, result }) = self.replies.recv() => {
                    Some(protocol::Event::Committed { tags, result })
                }
                message = deliveries.recv(), if consuming => match message {
                    Some(message) => {
                        if let (Some(ha), false) = (self.cx.ha, self.active) {
                            // Only the active consumer gets deliveries: before deciding any,
                            // learn every id the previous active one got into the stream.
                            ha.take_over(self.cx.metrics).await.map_err(Failure::Lost)?;
                            self.active = true;
                        }
                        let now = Instant::now();
                        self.on_delivery(message, now)?;
                        // Take what else is already here, so claims go in batches.
                        for _ in 1..CLAIM_BATCH {
                            match deliveries.try_recv() {
                                Ok(message) => self.on_delivery(message, now)?,
                                Err(_) => break,
                            }
                        }
                        None
                    }
                    None if grace.is_some() => {
                        consuming = false;
                        None
                    }
                    None => {
                        // The client library ends the stream when the connection dies; if it
                        // died decoding a delivery, that message is at the head of the queue.
                        sweep_source(self.cx.config, self.cx.metrics).await;
                        return Err(Failure::Lost("the consumer stopped".into()));
                    }
                },
                _ = tick.tick() => Some(protocol::Event::Tick),
            };
            let now = Instant::now();
            if let Some(event) = event {
                self.protocol.step(event, now)?;
            }
            self.protocol.end_turn(now);
            // Claims are answered at once; their verdicts are the next turn's event.
            while let Some(verdicts) = self.carry_out().await? {
                let verdicts = verdicts
                    .into_iter()
                    .map(|(tag, id, verdict)| (tag, id, verdict.map(verdict_of)))
                    .collect();
                self.protocol
                    .step(protocol::Event::Claimed(verdicts), now)?;
                self.protocol.end_turn(now);
            }
        }
    }

    /// Hands a delivery to the protocol, its id decided and its fingerprint taken.
    fn on_delivery(&mut self, mut message: ConsumerMessage, now: Instant) -> Result<(), Failure> {
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
        let config = self.cx.config;
        let tag = deliver.delivery_tag();
        let last_chance = config
            .relay
            .queue_type
            .delivery_limit()
            .is_some_and(|limit| delivery_count(&props) >= u64::from(limit.get()));
        // A window that cannot be read is never guessed at, whatever the id.
        let window = match self.cx.windows.decide(&props) {
            Ok(window) => window,
            Err(reason) => {
                let event = protocol::Event::Refused {
                    tag,
                    reason,
                    last_chance,
                };
                return Ok(self.protocol.step(event, now)?);
            }
        };
        let routing_key = deliver.routing_key();
        let id = self.cx.ids.decide(routing_key, &props, &body);
        // What a return of its forward would carry, to match the two.
        let fingerprint = Fingerprint::of(
            &config.relay.dest_exchange,
            config
                .relay
                .dest_routing_key
                .as_deref()
                .unwrap_or(routing_key),
            props.message_id().map(String::as_str),
            &body,
        );
        let event = protocol::Event::Delivered {
            tag,
            id,
            window,
            fingerprint,
            last_chance,
            message: Message {
                routing_key: routing_key.clone(),
                props,
                body,
            },
        };
        self.protocol.step(event, now)?;
        Ok(())
    }

    /// Turns a callback's event into a protocol event, or ends the session.
    fn on_event(&mut self, event: Event, draining: bool) -> Result<Option<ProtocolEvent>, Failure> {
        let event = match event {
            Event::Settled { tag, settled } => {
                return Ok(Some(protocol::Event::Settled { tag, settled }))
            }
            Event::Broker(event) => event,
        };
        Ok(Some(match event {
            BrokerEvent::PubAck { tag, multiple } => protocol::Event::Acked { seq: tag, multiple },
            BrokerEvent::PubNack { tag, multiple } => {
                protocol::Event::Nacked { seq: tag, multiple }
            }
            BrokerEvent::PubReturn(ret) => protocol::Event::Returned(Fingerprint::of(
                &ret.exchange,
                &ret.routing_key,
                ret.message_id.as_deref(),
                &ret.body,
            )),
            BrokerEvent::ChannelClosed { role, code, text } => {
                return Err(Failure::Lost(format!(
                    "the broker closed the {role} channel: {code} {text}"
                )))
            }
            BrokerEvent::ConsumerCancelled if draining => return Ok(None),
            BrokerEvent::ConsumerCancelled => {
                return Err(Failure::Lost(
                    "the broker cancelled the consumer (source queue deleted?)".into(),
                ))
            }
            BrokerEvent::ConnectionClosed { code, text } => {
                return Err(Failure::Lost(format!(
                    "the broker closed the connection: {code} {text}"
                )))
            }
        }))
    }

    /// Carries out the protocol's actions in order, then reports its totals to the metrics.
    /// Returns the verdicts of the claims among them, for the protocol to step on.
    async fn carry_out(&mut self) -> Result<Option<Vec<Claimed>>, Failure> {
        let Session {
            cx,
            consume,
            publish,
            events_tx,
            replies_tx,
            protocol,
            ..
        } = self;
        let config = cx.config;
        let mut claimed: Option<Vec<Claimed>> = None;
        for action in protocol.actions() {
            match action {
                Action::Claim(items) => {
                    let verdicts = cx.workers.claim(items);
                    match &mut claimed {
                        Some(claimed) => claimed.extend(verdicts),
                        None => claimed = Some(verdicts),
                    }
                }
                Action::Await { tag, waiter } => {
                    let tx = events_tx.clone();
                    tokio::spawn(async move {
                        let settled = waiter.settled().await;
                        let _ = tx.send(Event::Settled { tag, settled });
                    });
                }
                Action::Publish { message, target } => {
                    let Message {
                        routing_key,
                        props,
                        body,
                    } = message;
                    // The arguments built from owned strings: the routing key moves, only the
                    // exchange name is copied.
                    let args = match target {
                        Target::Destination => BasicPublishArguments {
                            exchange: config.relay.dest_exchange.clone(),
                            routing_key: config
                                .relay
                                .dest_routing_key
                                .clone()
                                .unwrap_or(routing_key),
                            mandatory: true,
                            immediate: false,
                        },
                        // Not mandatory: an audit exchange nobody listens to is the operator's
                        // choice.
                        Target::Duplicates => BasicPublishArguments {
                            exchange: config.relay.duplicates_exchange.clone().unwrap_or_default(),
                            routing_key,
                            mandatory: false,
                            immediate: false,
                        },
                    };
                    publish
                        .basic_publish(props, body, args)
                        .await
                        .map_err(lost("publishing"))?;
                }
                Action::Commit { tags, claims } => {
                    let job = CommitJob {
                        tags,
                        claims,
                        reply: replies_tx.clone(),
                    };
                    if !cx.workers.commit(job) {
                        return Err(Failure::Fatal(Error::WorkersGone));
                    }
                }
                Action::Ack { tag, multiple } => consume
                    .basic_ack(BasicAckArguments::new(tag, multiple))
                    .await
                    .map_err(lost("acking"))?,
                Action::Reject { tag, reason } => {
                    tracing::debug!(tag, reason = reason.label(), "dead-lettering");
                    consume
                        .basic_reject(BasicRejectArguments::new(tag, false))
                        .await
                        .map_err(lost("rejecting"))?;
                    cx.metrics.dead_lettered(reason);
                }
            }
        }
        let tally = protocol.take_tally();
        if tally.forwarded > 0 {
            cx.metrics
                .forwarded(tally.forwarded, tally.forwarded_without_id);
        }
        if tally.duplicates > 0 {
            cx.metrics.duplicates(tally.duplicates);
        }
        for _ in 0..tally.copies {
            cx.metrics.duplicate_copied();
        }
        Metrics::acked_after(protocol.latencies());
        let in_flight = protocol.publishes_in_flight();
        if in_flight != self.publishes_in_flight {
            self.publishes_in_flight = in_flight;
            self.cx.metrics.set_publishes_in_flight(in_flight);
        }
        Ok(claimed)
    }
}

/// The store's verdict as the protocol takes it.
fn verdict_of(verdict: store::Verdict) -> protocol::Verdict<Claim, Waiter> {
    match verdict {
        store::Verdict::New(claim) => protocol::Verdict::New(claim),
        store::Verdict::Duplicate(_) => protocol::Verdict::Duplicate,
        store::Verdict::InFlight(waiter) => protocol::Verdict::InFlight(waiter),
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
