//! The source queue's type (`DEDUPD_QUEUE_TYPE`): a quorum source relays as a classic one does,
//! its delivery limit dead-letters a message that keeps failing (counted by dedupd), and a queue
//! that exists with the other type stops start-up naming it. Real binary, real local broker,
//! random names, cleaned up.

mod support;

use std::process::Command;

use amqprs::{BasicProperties, FieldTable, FieldValue};

use support::*;

/// A message the relay cannot forward, ever, when it connects as another user than the
/// publisher: the broker refuses a publish whose `user_id` is not the connection's user by
/// closing the channel, so each attempt ends the relay's session and the delivery goes back to
/// the queue, as it would for a message that crashes a consumer.
fn poison(id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_message_id(id)
        .with_user_id("guest")
        .with_persistence(true)
        .finish()
}

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("timeout")
        .arg("60")
        .arg("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl must be on PATH for this test");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A broker user of the test's own, with every permission on `/`; deleted on drop.
struct User(String);

impl User {
    fn create() -> User {
        let name = format!("dedupd-test-{:08x}", rand::random::<u32>());
        rabbitmqctl(&["add_user", &name, "pw"]);
        let user = User(name);
        rabbitmqctl(&["set_permissions", "-p", "/", &user.0, ".*", ".*", ".*"]);
        user
    }

    fn url(&self) -> String {
        format!("amqp://{}:pw@127.0.0.1:5672/%2f", self.0)
    }
}

impl Drop for User {
    fn drop(&mut self) {
        let _ = Command::new("timeout")
            .args(["60", "rabbitmqctl", "delete_user", &self.0])
            .output();
    }
}

fn header_text(props: &BasicProperties, name: &str) -> Option<String> {
    match props.headers()?.get(&name.try_into().unwrap())? {
        FieldValue::S(s) => Some(AsRef::<String>::as_ref(s).clone()),
        other => Some(format!("{other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_delivery_limit_dead_letters_a_message_that_keeps_failing_and_counts_it() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    let data = tempfile::tempdir().unwrap();
    let user = User::create();
    let url = user.url();
    let mut relay = Relay::start(
        &broker,
        data.path(),
        &[
            ("DEDUPD_AMQP_URL", &url),
            ("DEDUPD_QUEUE_TYPE", "quorum"),
            ("DEDUPD_DELIVERY_LIMIT", "2"),
        ],
    );
    relay.wait_healthy();

    // Delivered, returned with the session it broke, three times (the limit counts returns):
    // then the broker dead-letters it, and the relay counts it as it gives it back.
    broker.publish(poison("poison-1"), b"poison").await;
    broker.wait_count(&broker.dead(), 1).await;
    let dead = broker.drain(&broker.dead()).await;
    assert_eq!(ids_of(&dead), ["poison-1"]);
    assert_eq!(
        header_text(&dead[0].0, "x-first-death-reason").as_deref(),
        Some("delivery_limit"),
        "{:?}",
        dead[0].0.headers()
    );
    let counted = || {
        relay
            .metrics()
            .get("dedupd_dead_lettered_total{reason=\"delivery_limit\"}")
            .copied()
            .unwrap_or(0.0)
    };
    eventually(
        WAIT,
        || {
            let got = counted();
            format!(
                "delivery_limit dead letters counted: {got}\n{}",
                relay.log()
            )
        },
        || counted() == 1.0,
    );

    // The relay goes on: a quorum source dedupes as a classic one does.
    relay.wait_healthy();
    for id in ["a", "b", "a"] {
        broker.publish(id_props(id), id.as_bytes()).await;
    }
    relay.wait_settled(3);
    broker.wait_count(&broker.out, 2).await;
    assert_eq!(ids_of(&broker.drain(&broker.out).await), ["a", "b"]);
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}

/// Starts the relay with `queue_type` on a source that already exists as the other type: it must
/// exit 1 naming the queue, and leave the queue as it was.
async fn refused_when_the_source_is_the_other_type(queue_type: &str, existing: Option<&str>) {
    let broker = Broker::connect().await;
    // As an earlier dedupd (or an operator) declared it: with its dead-letter exchange.
    let mut args = FieldTable::new();
    args.insert(
        "x-dead-letter-exchange".try_into().unwrap(),
        FieldValue::from(format!("{}.dlx", broker.source)),
    );
    if let Some(kind) = existing {
        args.insert("x-queue-type".try_into().unwrap(), FieldValue::from(kind));
    }
    broker.declare_queue(&broker.source, args).await;
    broker.publish(id_props("kept"), b"kept").await;
    broker.wait_count(&broker.source, 1).await;
    let data = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&broker, data.path(), &[("DEDUPD_QUEUE_TYPE", queue_type)]);
    let status = relay.wait_exit();
    let log = relay.log();
    assert_eq!(status.code(), Some(1), "{log}");
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.contains(&format!("source queue '{}'", broker.source))
            && last.contains(&format!("not as a {queue_type} queue")),
        "{log}"
    );
    // Never redeclared: the message is still there.
    assert_eq!(broker.count(&broker.source).await, 1);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_asked_on_an_existing_classic_source_is_refused_naming_it() {
    refused_when_the_source_is_the_other_type("quorum", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_asked_on_an_existing_quorum_source_is_refused_naming_it() {
    refused_when_the_source_is_the_other_type("classic", Some("quorum")).await;
}
