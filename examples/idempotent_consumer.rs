//! An idempotent RabbitMQ consumer with dedupd's store embedded: no relay, no Redis.
//!
//! ```sh
//! cargo run --example idempotent_consumer -- orders    # or QUEUE=orders; default `orders`
//! ```
//!
//! Broker from `AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672`, vhost `/`), store in
//! `DATA_DIR` (default `./consumer-data`, one consumer process per directory). Each delivery goes
//! through claim → handle → commit → ack:
//!
//! - **claim** its `message_id`: new, a duplicate (handled before: just ack it), or in flight
//!   (another delivery of the same id is being handled right now: wait for it, then ask again);
//! - **handle** it (your code);
//! - **commit** the id (durable when it returns), and only then **ack**;
//! - if the handler fails, **release** the claim (drop it) and nack with requeue: the id is new
//!   again, so the redelivery is handled afresh.
//!
//! A crash between commit and ack redelivers a message the store already knows: it is acked as a
//! duplicate, not handled twice. A crash between handling and commit does handle it again, so
//! keep the handler's own effects idempotent or transactional if even that repeat matters.
//!
//! Claims and commits touch sled (reads, an fsync): they run on tokio's blocking pool, never on
//! its workers.

use std::error::Error;

use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicNackArguments, BasicQosArguments,
    BasicRejectArguments, Channel, QueueDeclareArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use dedupd::store::system_now_ms;
use dedupd::{Store, StoreConfig, Verdict};

/// What became of one delivery.
#[derive(Debug)]
enum Outcome {
    /// Handled and its id recorded: ack.
    Handled,
    /// Its id was recorded before: ack without handling.
    Duplicate,
    /// The handler (or the commit) failed; the claim is released: nack and requeue.
    Failed(String),
}

/// The business logic. A body starting with `flaky` fails its first delivery, to show the
/// release-and-retry path.
async fn handle(id: &str, body: &[u8], redelivered: bool) -> Result<(), String> {
    if body.starts_with(b"flaky") && !redelivered {
        return Err("flaky handler failed, will be retried".into());
    }
    println!("handled {id}: {}", String::from_utf8_lossy(body));
    Ok(())
}

/// claim → handle → commit for one message; the caller acks or nacks per the outcome.
async fn process(store: &Store, id: &str, body: &[u8], redelivered: bool) -> Outcome {
    loop {
        let (s, key) = (store.clone(), id.as_bytes().to_vec());
        let verdict = tokio::task::spawn_blocking(move || s.claim(&key, system_now_ms())).await;
        let claim = match verdict {
            Ok(Ok(Verdict::New(claim))) => claim,
            Ok(Ok(Verdict::Duplicate(_))) => return Outcome::Duplicate,
            // The other delivery's outcome decides: committed → a duplicate next time round;
            // released → new, and this delivery claims it.
            Ok(Ok(Verdict::InFlight(waiter))) => {
                waiter.settled().await;
                continue;
            }
            Ok(Err(e)) => return Outcome::Failed(format!("claim failed: {e}")),
            Err(e) => return Outcome::Failed(format!("claim task failed: {e}")),
        };
        if let Err(e) = handle(id, body, redelivered).await {
            drop(claim); // released: the id is new again for the redelivery
            return Outcome::Failed(e);
        }
        let s = store.clone();
        let committed =
            tokio::task::spawn_blocking(move || s.commit(vec![claim], system_now_ms())).await;
        return match committed {
            Ok(Ok(())) => Outcome::Handled,
            // A failed commit releases the claim itself: the id is not recorded.
            Ok(Err(e)) => Outcome::Failed(format!("commit failed: {e}")),
            Err(e) => Outcome::Failed(format!("commit task failed: {e}")),
        };
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let queue = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("QUEUE").ok())
        .unwrap_or_else(|| "orders".into());
    let url =
        std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into());
    let data_dir = std::env::var("DATA_DIR").unwrap_or_else(|_| "./consumer-data".into());

    let store = Store::open(StoreConfig::new(data_dir))?;
    let conn = Connection::open(&OpenConnectionArguments::try_from(url.as_str())?).await?;
    let ch = conn.open_channel(None).await?;
    ch.queue_declare(QueueDeclareArguments::durable_client_named(&queue))
        .await?;
    ch.basic_qos(BasicQosArguments::new(0, 100, false)).await?;
    let consume = BasicConsumeArguments::new(&queue, "")
        .manual_ack(true)
        .finish();
    let (_tag, mut deliveries) = ch.basic_consume_rx(consume).await?;
    // SIGINT or SIGTERM stops the loop between two messages.
    let stop = tokio_util::sync::CancellationToken::new();
    let on_signal = stop.clone();
    ctrlc::set_handler(move || on_signal.cancel())?;
    println!("consuming {queue}; Ctrl-C to stop");

    loop {
        let message = tokio::select! {
            m = deliveries.recv() => m,
            () = stop.cancelled() => None,
        };
        let Some(message) = message else { break };
        let (Some(deliver), Some(props), Some(body)) =
            (message.deliver, message.basic_properties, message.content)
        else {
            continue; // amqprs fills all three for a delivery
        };
        let tag = deliver.delivery_tag();
        let Some(id) = props.message_id() else {
            // Nothing to deduplicate on: reject without requeue (a dead-letter exchange on the
            // queue keeps it for a look).
            ch.basic_reject(BasicRejectArguments::new(tag, false))
                .await?;
            continue;
        };
        let outcome = process(&store, id, &body, deliver.redelivered()).await;
        settle(&ch, tag, id, outcome).await?;
    }

    ch.close().await?;
    conn.close().await?;
    // Persists the Bloom filter, so the next start does not rebuild it.
    store.close()?;
    Ok(())
}

/// Acks or nacks one delivery per its outcome.
async fn settle(ch: &Channel, tag: u64, id: &str, outcome: Outcome) -> Result<(), Box<dyn Error>> {
    match outcome {
        Outcome::Handled => ch.basic_ack(BasicAckArguments::new(tag, false)).await?,
        Outcome::Duplicate => {
            println!("duplicate {id}: acked, not handled");
            ch.basic_ack(BasicAckArguments::new(tag, false)).await?;
        }
        Outcome::Failed(why) => {
            eprintln!("failed {id}: {why}; requeued");
            ch.basic_nack(BasicNackArguments::new(tag, false, true))
                .await?;
        }
    }
    Ok(())
}
