//! The broker side the end-to-end benches share (included with `#[path]`): connect, count a
//! queue, and the destination exchange with the queue that collects what a relay forwards.

use std::time::Duration;

use amqprs::channel::{
    Channel, ExchangeDeclareArguments, QueueBindArguments, QueueDeclareArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};

/// A connection to the local broker, or a panic that says the bench needs it.
pub async fn connect() -> Connection {
    let args = OpenConnectionArguments::new("127.0.0.1", 5672, "guest", "guest");
    tokio::time::timeout(Duration::from_secs(10), Connection::open(&args))
        .await
        .expect("RabbitMQ on 127.0.0.1:5672 did not answer within 10 s")
        .expect("cannot connect to RabbitMQ on 127.0.0.1:5672 (guest/guest)")
}

/// Ready messages in `queue`.
pub async fn ready(ch: &Channel, queue: &str) -> usize {
    let (_, n, _) = ch
        .queue_declare(QueueDeclareArguments::new(queue).passive(true).finish())
        .await
        .unwrap()
        .unwrap();
    n as usize
}

/// Declares the destination exchange as dedupd does (fanout, durable) and binds `out` to it.
pub async fn bind_out(ch: &Channel, dest: &str, out: &str) {
    ch.exchange_declare(
        ExchangeDeclareArguments::new(dest, "fanout")
            .durable(true)
            .finish(),
    )
    .await
    .unwrap();
    ch.queue_declare(QueueDeclareArguments::new(out).durable(true).finish())
        .await
        .unwrap();
    ch.queue_bind(QueueBindArguments::new(out, dest, ""))
        .await
        .unwrap();
}
