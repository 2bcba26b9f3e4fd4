//! Hot standby (`DEDUPD_HA=on`): the broker picks one active relay, the ids go through a stream.
//!
//! Every dedupd consuming a source queue with `x-single-active-consumer` is registered with the
//! broker, which delivers to one of them. That one forwards, and each commit batch it records
//! (`Store::commit_replicated`'s segment) is appended to the stream `<source>.ids` with a
//! publisher confirm; the batch's source messages are acked only once **both** hold: the batch
//! is durable in the local store and the stream confirmed it. Every instance, the active one
//! included, tails the stream from the offset its store last applied and applies the batches
//! (`Store::apply_logged`), so a standby's store follows the active one's. RabbitMQ replicates
//! the stream (Raft); nothing here replicates by hand.
//!
//! The segment is appended as soon as the batch is written to the local store, while the flush
//! that makes it durable there runs, so an ack waits for the longer of the two rather than their
//! sum. The stream may then hold a batch that is not durable here yet (or never will be, if the
//! flush fails and the session stops): harmless, as its messages were already confirmed by the
//! destination, and a standby that knows those ids drops their redeliveries, which is what they
//! are. What must not happen, an ack of a message whose id is not in both places yet, does not:
//! the acks wait for both (`worker::Gate`).
//!
//! A session learns it became active from its first delivery: before deciding anything it
//! publishes a marker to the stream and waits until its tailer has read it back, so every batch
//! the previous active got confirmed is applied first ([`Ha::take_over`]). An empty data dir
//! tails from the stream's first offset.
//!
//! One connection of its own carries the publisher (confirms) and the tail consumer, so the
//! relay session's code is unchanged but for two hooks. Batches not confirmed when that
//! connection drops are published again on the next one, in order (applying is idempotent).
//!
//! The tailer skips our own batches (already in the local store: written before they were
//! appended) and only notes the offset of the last one, without a flush of its own.
//!
//! What can pass twice: the messages whose batch was confirmed by the destination but whose
//! segment or source ack was not through when the active died (at most a prefetch's worth), as
//! without HA.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amqprs::callbacks::{ChannelCallback, ConnectionCallback};
use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicPublishArguments, BasicQosArguments, Channel,
    ConfirmSelectArguments, ConsumerMessage,
};
use amqprs::connection::Connection;
use amqprs::{Ack, BasicProperties, Cancel, Close, CloseChannel, FieldTable, FieldValue, Nack};
use amqprs::{FieldName, Return};
use tokio::sync::{mpsc, watch};

use super::topology::Topology;
use crate::config::Config;
use crate::metrics::{Metrics, Role};
use crate::shutdown::Shutdown;
use crate::store::{Clock, Store};

/// Stream messages read ahead by the tail consumer (a stream consumer must set a prefetch).
const TAIL_PREFETCH: u16 = 2000;
/// Most stream messages applied in one blocking call.
const APPLY_BATCH: usize = 512;
/// Most segment bytes applied to the store in one durable write (a catching-up standby would
/// otherwise flush once per segment).
const APPLY_BYTES: usize = 4 << 20;
/// Longest a takeover may wait for the stream's end; then the session starts over.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(30);
/// Waits between reconnections of the stream connection.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Header names of the stream messages.
const KIND: &str = "x-dedupd-kind";
const INSTANCE: &str = "x-dedupd-instance";
const IDS: &str = "x-dedupd-ids";
const TOKEN: &str = "x-dedupd-token";
const PUBLISHED_MS: &str = "x-dedupd-published-ms";

/// Called once the stream has confirmed a batch: the batch's source messages may be acked.
pub(crate) type Done = Box<dyn FnOnce() + Send>;

/// What the publisher appends to the stream.
enum Append {
    /// A commit batch of `ids` ids.
    Segment {
        bytes: Vec<u8>,
        ids: u64,
        done: Option<Done>,
    },
    /// A takeover's marker: read back, it means the stream is applied up to it.
    Marker { token: u64 },
}

/// The handle the relay holds: appends batches, takes over, steps down.
#[derive(Clone)]
pub(crate) struct Ha {
    inner: Arc<Inner>,
}

struct Inner {
    /// Random per process: a tailer skips applying the batches it made itself (already durable
    /// here) and recognises its markers.
    instance: String,
    appends: mpsc::UnboundedSender<Append>,
    /// The newest of our markers the tailer has read back.
    markers: watch::Sender<u64>,
    next_token: AtomicU64,
    /// The service's clock: when a batch was published (for the standbys' lag) and what has
    /// expired when one is applied.
    clock: Arc<dyn Clock>,
}

/// The stream side, run by [`Replicator::run`] until its shutdown.
pub(crate) struct Replicator {
    ha: Ha,
    appends: mpsc::UnboundedReceiver<Append>,
    /// Appended, not confirmed yet: published again, in order, on the next connection.
    pending: VecDeque<Append>,
    /// Where the tail goes on after a reconnect; the store knows it after a restart.
    next_offset: Option<u64>,
}

#[cfg(test)]
impl Replicator {
    /// The next segment appended, as the publisher would take it: its bytes, its ids and what
    /// runs on its confirm. `None` once every handle is gone.
    pub(crate) fn next_segment(&mut self) -> Option<(Vec<u8>, u64, Done)> {
        loop {
            match self.appends.blocking_recv()? {
                Append::Segment { bytes, ids, done } => return Some((bytes, ids, done?)),
                Append::Marker { .. } => continue,
            }
        }
    }
}

impl Ha {
    /// A handle and the task that serves it, on the service's `clock`; starts as a standby.
    pub(crate) fn new(metrics: &Metrics, clock: Arc<dyn Clock>) -> (Ha, Replicator) {
        let (tx, rx) = mpsc::unbounded_channel();
        metrics.set_role(Role::Standby);
        let ha = Ha {
            inner: Arc::new(Inner {
                instance: format!("{:016x}", rand::random::<u64>()),
                appends: tx,
                markers: watch::channel(0).0,
                next_token: AtomicU64::new(1),
                clock,
            }),
        };
        let replicator = Replicator {
            ha: ha.clone(),
            appends: rx,
            pending: VecDeque::new(),
            next_offset: None,
        };
        (ha, replicator)
    }

    /// Appends a commit batch of `ids` ids, written to the local store (its flush may still be
    /// running); `done` runs once the stream confirmed it. Never blocks (the commit thread calls
    /// it, between the write and the flush).
    pub(crate) fn append(&self, bytes: Vec<u8>, ids: u64, done: Done) {
        let _ = self.inner.appends.send(Append::Segment {
            bytes,
            ids,
            done: Some(done),
        });
    }

    /// This instance just got its first delivery: it is the active one. Waits until every batch
    /// in the stream before now is applied, then reports how long that took.
    ///
    /// # Errors
    ///
    /// The stream's end was not reached within [`CATCH_UP_LIMIT`] (the stream is unavailable):
    /// nothing may be forwarded yet.
    pub(crate) async fn take_over(&self, metrics: &Metrics) -> Result<Duration, String> {
        let started = Instant::now();
        let token = self.inner.next_token.fetch_add(1, Ordering::Relaxed);
        let mut seen = self.inner.markers.subscribe();
        self.inner
            .appends
            .send(Append::Marker { token })
            .map_err(|_| "the id stream replicator has stopped".to_string())?;
        tracing::info!("became the active consumer: catching up with the id stream");
        match tokio::time::timeout(CATCH_UP_LIMIT, seen.wait_for(|t| *t >= token)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return Err("the id stream replicator has stopped".into()),
            Err(_) => {
                return Err(format!(
                    "the id stream's end not reached within {CATCH_UP_LIMIT:?}"
                ))
            }
        }
        let took = started.elapsed();
        metrics.took_over(took);
        tracing::info!(catch_up_ms = took.as_millis() as u64, "active: forwarding");
        Ok(took)
    }

    /// The session that was active ended: a standby again until the next first delivery.
    pub(crate) fn step_down(&self, metrics: &Metrics) {
        if metrics.role() == Role::Active {
            tracing::info!("no longer the active consumer: standby");
        }
        metrics.set_role(Role::Standby);
    }
}

/// How a stream connection ended.
enum Lost {
    /// Shutdown asked for.
    Stopped,
    /// Reconnect, after saying why.
    Because(String),
}

impl Replicator {
    /// Publishes appends and tails the stream, reconnecting as needed, until `stop` fires.
    pub(crate) async fn run(mut self, config: Config, store: Store, mut stop: Shutdown) {
        self.next_offset = match store.applied_offset() {
            Ok(offset) => offset.map(|o| o + 1),
            Err(e) => {
                // Reading from the start instead is slower, never wrong: applying is idempotent.
                tracing::warn!(cause = %e, "cannot read the applied offset; tailing from the start");
                None
            }
        };
        let mut backoff = BACKOFF_MIN;
        loop {
            let lost = self.connection(&config, &store, &mut stop).await;
            match lost {
                Lost::Stopped => return,
                Lost::Because(why) => {
                    tracing::warn!(cause = %why, wait = ?backoff, "id stream connection lost");
                    tokio::select! {
                        _ = stop.fired() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// One connection: declares the stream, publishes, tails. Returns when it is lost.
    async fn connection(&mut self, config: &Config, store: &Store, stop: &mut Shutdown) -> Lost {
        let (events, _) = mpsc::unbounded_channel();
        let conn = tokio::select! {
            _ = stop.fired() => return Lost::Stopped,
            conn = super::connect(config, events) => match conn {
                Ok(conn) => conn,
                Err(e) => return Lost::Because(format!("cannot connect: {e}")),
            },
        };
        let lost = self.serve(&conn, config, store, stop).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.close()).await;
        lost
    }

    async fn serve(
        &mut self,
        conn: &Connection,
        config: &Config,
        store: &Store,
        stop: &mut Shutdown,
    ) -> Lost {
        let (tx, mut events) = mpsc::unbounded_channel();
        if let Err(e) = conn.register_callback(StreamEvents(tx.clone())).await {
            return Lost::Because(e.to_string());
        }
        let stream = config.relay.ids_stream();
        match Topology::open(conn, !config.relay.declare).await {
            Ok(mut t) => {
                let declared = t.ids_stream(config).await;
                t.close().await;
                if let Err(e) = declared {
                    return Lost::Because(e.to_string());
                }
            }
            Err(e) => return Lost::Because(e.to_string()),
        }
        let publish = match open(conn, &tx).await {
            Ok(ch) => ch,
            Err(e) => return Lost::Because(e),
        };
        if let Err(e) = publish
            .confirm_select(ConfirmSelectArguments::new(false))
            .await
        {
            return Lost::Because(format!("enabling confirms: {e}"));
        }
        let tail = match open(conn, &tx).await {
            Ok(ch) => ch,
            Err(e) => return Lost::Because(e),
        };
        let from = match self.next_offset {
            Some(o) => FieldValue::l(o as i64),
            None => FieldValue::from("first"),
        };
        tracing::info!(%stream, from = ?self.next_offset, "tailing the id stream");
        let deliveries = match consume(&tail, &stream, from).await {
            Ok(rx) => rx,
            Err(e) => return Lost::Because(e),
        };
        let io_failed = conn.listen_network_io_failure();
        tokio::pin!(io_failed);

        let ha = self.ha.clone();
        let publisher = publisher(
            &publish,
            &stream,
            &ha,
            &mut self.pending,
            &mut self.appends,
            &mut events,
        );
        let tailer = tailer(&tail, store, &ha, &mut self.next_offset, deliveries);
        let lost = tokio::select! {
            _ = stop.fired() => Lost::Stopped,
            _ = &mut io_failed => Lost::Because("connection lost".into()),
            why = publisher => Lost::Because(why),
            why = tailer => Lost::Because(why),
        };
        for ch in [publish, tail] {
            let _ = tokio::time::timeout(Duration::from_secs(2), ch.close()).await;
        }
        lost
    }
}

async fn open(conn: &Connection, tx: &mpsc::UnboundedSender<Event>) -> Result<Channel, String> {
    let ch = conn
        .open_channel(None)
        .await
        .map_err(|e| format!("opening a channel: {e}"))?;
    ch.register_callback(StreamEvents(tx.clone()))
        .await
        .map_err(|e| e.to_string())?;
    Ok(ch)
}

/// Starts the tail consumer at `from` (an offset, or `first`).
async fn consume(
    ch: &Channel,
    stream: &str,
    from: FieldValue,
) -> Result<mpsc::UnboundedReceiver<ConsumerMessage>, String> {
    ch.basic_qos(BasicQosArguments::new(0, TAIL_PREFETCH, false))
        .await
        .map_err(|e| format!("setting the tail prefetch: {e}"))?;
    let mut args = FieldTable::new();
    args.insert(name("x-stream-offset"), from);
    let (_, rx) = ch
        .basic_consume_rx(
            BasicConsumeArguments::new(stream, "")
                .manual_ack(true)
                .arguments(args)
                .finish(),
        )
        .await
        .map_err(|e| format!("tailing {stream}: {e}"))?;
    Ok(rx)
}

/// Publishes what is pending (again), then each append as it comes, and settles them in order
/// as the stream confirms them. Returns why it stopped.
async fn publisher(
    ch: &Channel,
    stream: &str,
    ha: &Ha,
    pending: &mut VecDeque<Append>,
    appends: &mut mpsc::UnboundedReceiver<Append>,
    events: &mut mpsc::UnboundedReceiver<Event>,
) -> String {
    // Confirm tag of `pending[0]`: a fresh channel numbers its publishes from 1.
    let mut base = 1u64;
    // Per pending append: confirmed (single acks may come out of order; settled in order).
    let mut acked: VecDeque<bool> = VecDeque::new();
    let again: Vec<_> = pending.iter().map(|a| message(ha, a)).collect();
    for (props, body) in again {
        if let Err(e) = publish(ch, stream, props, body).await {
            return e;
        }
        acked.push_back(false);
    }
    loop {
        tokio::select! {
            append = appends.recv() => {
                let Some(append) = append else {
                    return "the relay stopped".into();
                };
                let (props, body) = message(ha, &append);
                if let Err(e) = publish(ch, stream, props, body).await {
                    pending.push_back(append);
                    return e;
                }
                pending.push_back(append);
                acked.push_back(false);
            }
            event = events.recv() => match event {
                Some(Event::Ack { tag, multiple }) => {
                    let Some(upto) = tag.checked_sub(base) else {
                        continue; // settled already
                    };
                    let upto = upto as usize;
                    if multiple {
                        for a in acked.iter_mut().take(upto + 1) {
                            *a = true;
                        }
                    } else if let Some(a) = acked.get_mut(upto) {
                        *a = true;
                    }
                    while acked.front() == Some(&true) {
                        acked.pop_front();
                        base += 1;
                        if let Some(Append::Segment {
                            done: Some(done), ..
                        }) = pending.pop_front()
                        {
                            done();
                        }
                    }
                }
                Some(Event::Nack) => return "the stream refused a batch".into(),
                Some(Event::Closed(why)) => return why,
                None => return "events stopped".into(),
            },
        }
    }
}

/// The stream message of an append: the segment as the body, what a tailer needs in headers.
fn message(ha: &Ha, append: &Append) -> (BasicProperties, Vec<u8>) {
    let mut headers = FieldTable::new();
    headers.insert(name(INSTANCE), FieldValue::from(ha.inner.instance.as_str()));
    headers.insert(
        name(PUBLISHED_MS),
        FieldValue::l(ha.inner.clock.now_ms() as i64),
    );
    let body = match append {
        Append::Segment { bytes, ids, .. } => {
            headers.insert(name(KIND), FieldValue::from("segment"));
            headers.insert(name(IDS), FieldValue::l(*ids as i64));
            bytes.clone()
        }
        Append::Marker { token } => {
            headers.insert(name(KIND), FieldValue::from("marker"));
            headers.insert(name(TOKEN), FieldValue::l(*token as i64));
            Vec::new()
        }
    };
    let props = BasicProperties::default()
        .with_persistence(true)
        .with_headers(headers)
        .finish();
    (props, body)
}

async fn publish(
    ch: &Channel,
    stream: &str,
    props: BasicProperties,
    body: Vec<u8>,
) -> Result<(), String> {
    ch.basic_publish(props, body, BasicPublishArguments::new("", stream))
        .await
        .map_err(|e| format!("appending to {stream}: {e}"))
}

/// One message read from the stream.
struct Item {
    offset: u64,
    own: bool,
    marker: Option<u64>,
    ids: u64,
    published_ms: u64,
    body: Vec<u8>,
}

/// Applies the stream to the store as it comes, in batches; acks them (for credit) once
/// applied; reports our markers read back. Returns why it stopped.
async fn tailer(
    ch: &Channel,
    store: &Store,
    ha: &Ha,
    next_offset: &mut Option<u64>,
    mut deliveries: mpsc::UnboundedReceiver<ConsumerMessage>,
) -> String {
    loop {
        let Some(first) = deliveries.recv().await else {
            return "the tail consumer stopped".into();
        };
        let mut batch = vec![first];
        while batch.len() < APPLY_BATCH {
            match deliveries.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let mut items = Vec::with_capacity(batch.len());
        let mut last_tag = 0;
        for mut m in batch {
            let (Some(deliver), Some(props), Some(body)) = (
                m.deliver.take(),
                m.basic_properties.take(),
                m.content.take(),
            ) else {
                return "incomplete delivery from the id stream".into();
            };
            last_tag = deliver.delivery_tag();
            let Some(offset) = int_header(&props, "x-stream-offset") else {
                return "a stream delivery without x-stream-offset".into();
            };
            let own = text_header(&props, INSTANCE).as_deref() == Some(&ha.inner.instance);
            let marker = match text_header(&props, KIND).as_deref() {
                Some("marker") => Some(int_header(&props, TOKEN).unwrap_or(0)),
                _ => None,
            };
            items.push(Item {
                offset,
                own,
                marker,
                ids: int_header(&props, IDS).unwrap_or(0),
                published_ms: int_header(&props, PUBLISHED_MS).unwrap_or(0),
                body,
            });
        }
        let lag_ids = items.iter().filter(|i| !i.own).map(|i| i.ids).sum();
        let oldest = items.iter().map(|i| i.published_ms).min().unwrap_or(0);
        let now = ha.inner.clock.now_ms();
        Metrics::ha_lag(lag_ids, Duration::from_millis(now.saturating_sub(oldest)));
        let store = store.clone();
        let applied = tokio::task::spawn_blocking(move || apply(&store, items, now)).await;
        let (last, ids, markers) = match applied {
            Ok(Ok(applied)) => applied,
            Ok(Err(e)) => return format!("applying the id stream: {e}"),
            Err(e) => return format!("applying the id stream: {e}"),
        };
        *next_offset = Some(last + 1);
        Metrics::ha_applied(last, ids);
        if let Some(&token) = markers.iter().max() {
            ha.inner.markers.send_if_modified(|seen| {
                let newer = token > *seen;
                *seen = (*seen).max(token);
                newer
            });
        }
        if let Err(e) = ch.basic_ack(BasicAckArguments::new(last_tag, true)).await {
            return format!("acking the id stream: {e}");
        }
    }
}

/// Applies `items` in order: the others' batches go to the store in groups of up to
/// [`APPLY_BYTES`], each made durable by one flush; ours are in the store already (written
/// before they were appended), so when the run ends with ours only their last offset is noted,
/// with no write of the ids again and no flush of its own. Returns the last offset, the ids
/// applied and our markers read.
fn apply(
    store: &Store,
    items: Vec<Item>,
    now: u64,
) -> Result<(u64, u64, Vec<u64>), crate::store::Error> {
    let mut ids = 0;
    let mut markers = Vec::new();
    let mut offset = 0;
    // The others' segments not applied yet, in stream order, and their size.
    let mut group: Vec<(&[u8], u64)> = Vec::new();
    let mut bytes = 0;
    // The last segment of ours and of the others'.
    let (mut ours, mut others) = (None, None);
    for item in &items {
        offset = item.offset;
        match item.marker {
            Some(token) if item.own => markers.push(token),
            Some(_) => {}
            None if item.own => ours = Some(item.offset),
            None => {
                others = Some(item.offset);
                group.push((&item.body, item.offset));
                bytes += item.body.len();
                if bytes >= APPLY_BYTES {
                    ids += store.apply_logged_many(group.drain(..), now)? as u64;
                    bytes = 0;
                }
            }
        }
    }
    ids += store.apply_logged_many(group, now)? as u64;
    if let Some(ours) = ours.filter(|&o| others.is_none_or(|p| o > p)) {
        store.note_applied_offset(ours)?;
    }
    Ok((offset, ids, markers))
}

fn name(s: &str) -> FieldName {
    s.try_into().expect("short header name")
}

fn header<'a>(props: &'a BasicProperties, key: &str) -> Option<&'a FieldValue> {
    props.headers()?.get(&name(key))
}

fn int_header(props: &BasicProperties, key: &str) -> Option<u64> {
    match header(props, key)? {
        FieldValue::l(n) => u64::try_from(*n).ok(),
        FieldValue::I(n) => u64::try_from(*n).ok(),
        FieldValue::i(n) => Some(u64::from(*n)),
        _ => None,
    }
}

fn text_header(props: &BasicProperties, key: &str) -> Option<String> {
    match header(props, key)? {
        FieldValue::S(s) => Some(AsRef::<String>::as_ref(s).clone()),
        _ => None,
    }
}

/// What the stream connection's callbacks report.
#[derive(Debug)]
enum Event {
    Ack { tag: u64, multiple: bool },
    Nack,
    Closed(String),
}

/// Callbacks of the stream connection and its channels: they only send.
struct StreamEvents(mpsc::UnboundedSender<Event>);

#[async_trait::async_trait]
impl ChannelCallback for StreamEvents {
    async fn close(
        &mut self,
        _: &Channel,
        close: CloseChannel,
    ) -> Result<(), amqprs::error::Error> {
        let _ = self.0.send(Event::Closed(format!(
            "the broker closed a stream channel: {} {}",
            close.reply_code(),
            close.reply_text()
        )));
        Ok(())
    }

    async fn cancel(&mut self, _: &Channel, _: Cancel) -> Result<(), amqprs::error::Error> {
        let _ = self.0.send(Event::Closed(
            "the broker cancelled the tail consumer".into(),
        ));
        Ok(())
    }

    async fn flow(&mut self, _: &Channel, active: bool) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }

    async fn publish_ack(&mut self, _: &Channel, ack: Ack) {
        let _ = self.0.send(Event::Ack {
            tag: ack.delivery_tag(),
            // Sic: amqprs spells it this way.
            multiple: ack.mutiple(),
        });
    }

    async fn publish_nack(&mut self, _: &Channel, _: Nack) {
        let _ = self.0.send(Event::Nack);
    }

    async fn publish_return(&mut self, _: &Channel, _: Return, _: BasicProperties, _: Vec<u8>) {}
}

#[async_trait::async_trait]
impl ConnectionCallback for StreamEvents {
    async fn close(&mut self, _: &Connection, close: Close) -> Result<(), amqprs::error::Error> {
        let _ = self.0.send(Event::Closed(format!(
            "the broker closed the stream connection: {} {}",
            close.reply_code(),
            close.reply_text()
        )));
        Ok(())
    }

    async fn blocked(&mut self, _: &Connection, _: String) {}

    async fn unblocked(&mut self, _: &Connection) {}

    async fn secret_updated(&mut self, _: &Connection) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{system_now_ms, StoreConfig, Verdict};

    /// Segments of `per` ids each, committed by a scratch store as the active instance does.
    fn segments(n: usize, per: usize) -> Vec<Vec<u8>> {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(StoreConfig::new(dir.path())).unwrap();
        let now = system_now_ms();
        (0..n)
            .map(|s| {
                let claims = (0..per)
                    .map(|i| match store.claim(format!("{s}-{i}").as_bytes(), now) {
                        Ok(Verdict::New(claim)) => claim,
                        _ => panic!("a fresh id is new"),
                    })
                    .collect();
                store.commit_logged(claims, now).unwrap()
            })
            .collect()
    }

    fn item(offset: u64, own: bool, marker: Option<u64>, body: Vec<u8>) -> Item {
        Item {
            offset,
            own,
            marker,
            ids: 0,
            published_ms: 0,
            body,
        }
    }

    #[test]
    fn others_segments_are_applied_in_groups_and_the_last_offset_recorded() {
        let segs = segments(6, 100);
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(StoreConfig::new(dir.path())).unwrap();
        // Ours (already durable at home) in the middle and at the end, one of our markers.
        let mut items: Vec<Item> = segs
            .iter()
            .enumerate()
            .map(|(i, s)| item(10 + i as u64, i == 2 || i == 5, None, s.clone()))
            .collect();
        items.insert(3, item(99, true, Some(7), Vec::new()));
        let (last, ids, markers) = apply(&store, items, system_now_ms()).unwrap();
        // The others' four segments count; ours are not applied again but the last one's
        // offset is recorded (it is the stream's last).
        assert_eq!((last, ids, markers), (15, 400, vec![7]));
        assert_eq!(store.applied_offset().unwrap(), Some(15));
        let now = system_now_ms();
        for s in [0, 1, 3, 4] {
            assert!(store
                .check(format!("{s}-0").as_bytes(), now)
                .unwrap()
                .is_some());
        }
        // Ours were skipped, the last one too: in the store at home already (written before they
        // were appended), never in this scratch one.
        for s in [2, 5] {
            assert!(store
                .check(format!("{s}-0").as_bytes(), now)
                .unwrap()
                .is_none());
        }
    }

    #[test]
    fn our_offset_is_noted_only_when_ours_end_the_run() {
        let segs = segments(2, 10);
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(StoreConfig::new(dir.path())).unwrap();
        // Ours, then the others': the others' offset is the one recorded, never ours after it.
        let items = vec![
            item(3, true, None, segs[0].clone()),
            item(4, false, None, segs[1].clone()),
        ];
        assert_eq!(
            apply(&store, items, system_now_ms()).unwrap(),
            (4, 10, vec![])
        );
        assert_eq!(store.applied_offset().unwrap(), Some(4));
        // Ours alone: noted, nothing applied.
        let items = vec![item(5, true, None, segs[0].clone())];
        assert_eq!(
            apply(&store, items, system_now_ms()).unwrap(),
            (5, 0, vec![])
        );
        assert_eq!(store.applied_offset().unwrap(), Some(5));
        assert!(store.check(b"0-0", system_now_ms()).unwrap().is_none());
    }

    #[test]
    fn ids_past_their_window_at_the_services_time_are_not_applied() {
        let segs = segments(1, 10);
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(StoreConfig::new(dir.path())).unwrap();
        // The applier's clock is a year on: every id of the batch expired meanwhile.
        let later = system_now_ms() + 365 * 24 * 3600 * 1000;
        let items = vec![item(0, false, None, segs[0].clone())];
        assert_eq!(apply(&store, items, later).unwrap(), (0, 0, vec![]));
        assert_eq!(store.applied_offset().unwrap(), Some(0));
        assert!(store.check(b"0-0", later).unwrap().is_none());
    }

    #[test]
    fn a_segment_that_does_not_decode_applies_nothing_of_its_group() {
        let segs = segments(2, 10);
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(StoreConfig::new(dir.path())).unwrap();
        let items = vec![
            item(0, false, None, segs[0].clone()),
            item(1, false, None, b"not a segment".to_vec()),
            item(2, false, None, segs[1].clone()),
        ];
        assert!(apply(&store, items, system_now_ms()).is_err());
        assert_eq!(store.applied_offset().unwrap(), None);
        assert!(store.check(b"0-0", system_now_ms()).unwrap().is_none());
    }
}
