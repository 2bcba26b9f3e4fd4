//! Black-box tests of what operators of real pipelines asked for: ids made of several parts and
//! scopes, a window per message, forgetting in bulk, online backup and restore. The real
//! `dedupd` binary against the real local RabbitMQ (127.0.0.1:5672, guest/guest), each test on
//! its own random queues and temporary data dir, deleting what it declared.

mod common;

use amqprs::channel::{
    BasicPublishArguments, ExchangeDeclareArguments, ExchangeDeleteArguments, QueueBindArguments,
};
use amqprs::{BasicProperties, FieldTable, FieldValue};

use common::*;

/// Properties with the given string headers, persistent.
fn headers(pairs: &[(&str, &str)]) -> BasicProperties {
    let mut table = FieldTable::new();
    for (name, value) in pairs {
        table.insert((*name).try_into().unwrap(), FieldValue::from(*value));
    }
    BasicProperties::default()
        .with_headers(table)
        .with_persistence(true)
        .finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composite_ids_with_a_json_field_dedupe_per_tuple_and_per_routing_key() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    // Producers publish through a topic exchange, so messages reach the source queue with
    // routing keys of their own: the scope.
    let entry = format!("{}.entry", broker.source);
    broker.declare_source().await;
    broker
        .ch
        .exchange_declare(ExchangeDeclareArguments::new(&entry, "topic").finish())
        .await
        .unwrap();
    broker
        .ch
        .queue_bind(QueueBindArguments::new(&broker.source, &entry, "#"))
        .await
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(
        &broker,
        data.path(),
        &[
            ("DEDUPD_ID_SOURCE", "header:tenant+json:/order/id"),
            ("DEDUPD_ID_SCOPE", "routing_key"),
        ],
    );
    relay.wait_healthy();

    let publish = |rk: &'static str, tenant: Option<&'static str>, body: &'static str| {
        let props = match tenant {
            Some(t) => headers(&[("tenant", t)]),
            None => headers(&[]),
        };
        let ch = broker.ch.clone();
        let entry = entry.clone();
        async move {
            ch.basic_publish(
                props,
                body.as_bytes().to_vec(),
                BasicPublishArguments::new(&entry, rk),
            )
            .await
            .unwrap();
        }
    };
    // Step by step, with the verdict each should get.
    publish("eu", Some("a"), r#"{"order":{"id":1},"n":1}"#).await; // new
    publish("eu", Some("a"), r#"{"order":{"id":1},"n":2}"#).await; // duplicate: same tuple and scope
    publish("eu", Some("b"), r#"{"order":{"id":1},"n":3}"#).await; // new: another tenant
    publish("us", Some("a"), r#"{"order":{"id":1},"n":4}"#).await; // new: another scope
    publish("eu", Some("a"), r#"{"order":{"id":"1"},"n":5}"#).await; // duplicate: "1" is 1's text
    publish("eu", Some("a1"), r#"{"order":{"id":1},"n":6}"#).await; // new: ("a1", "1")
    publish("eu", Some("a"), r#"{"order":{"id":11},"n":7}"#).await; // new: ("a", "11")
    publish("eu", Some("a"), "not json, n 8").await; // dead: no field
    publish("eu", None, r#"{"order":{"id":2},"n":9}"#).await; // dead: no tenant
    assert_eq!(relay.wait_settled(9), (5, 2, 2));

    let mut forwarded: Vec<String> = broker
        .drain(&broker.out)
        .await
        .into_iter()
        .map(|(_, body)| String::from_utf8(body).unwrap())
        .collect();
    forwarded.sort();
    assert_eq!(
        forwarded,
        [
            r#"{"order":{"id":11},"n":7}"#,
            r#"{"order":{"id":1},"n":1}"#,
            r#"{"order":{"id":1},"n":3}"#,
            r#"{"order":{"id":1},"n":4}"#,
            r#"{"order":{"id":1},"n":6}"#,
        ]
    );
    broker.wait_count(&broker.dead(), 2).await;
    let m = relay.metrics();
    assert_eq!(m["dedupd_dead_lettered_total{reason=\"no_id\"}"], 2.0);
    // One record per forwarded tuple.
    let (_, stats) = relay.get("/stats").unwrap();
    assert!(stats.contains("\"live_ids\":5"), "{stats}");

    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    let _ = broker
        .ch
        .exchange_delete(ExchangeDeleteArguments::new(&entry))
        .await;
    broker.cleanup().await;
}
