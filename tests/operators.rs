//! Black-box tests of what operators of real pipelines asked for: ids made of several parts and
//! scopes, a window per message, forgetting in bulk, online backup and restore. The real
//! `dedupd` binary against the real local RabbitMQ (127.0.0.1:5672, guest/guest), each test on
//! its own random queues and temporary data dir, deleting what it declared.

mod support;

use amqprs::channel::{
    BasicPublishArguments, ExchangeDeclareArguments, ExchangeDeleteArguments, QueueBindArguments,
};
use amqprs::{BasicProperties, FieldTable, FieldValue};

use support::*;

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
    // One record per forwarded tuple, found from its parts with `dedupd id`.
    let (_, stats) = relay.get("/stats").unwrap();
    assert!(stats.contains("\"live_ids\":5"), "{stats}");
    let id = dedupd()
        .args(["id", "--scope", "us", "a", "1"])
        .env("DEDUPD_ID_SOURCE", "header:tenant+json:/order/id")
        .env("DEDUPD_ID_SCOPE", "routing_key")
        .output()
        .unwrap();
    let id = String::from_utf8(id.stdout).unwrap();
    assert_eq!(relay.get(&format!("/ids/{}", id.trim())).unwrap().0, 200);
    let (status, _) = relay
        .get("/ids/0000000000000000000000000000000000000000000000000000000000000000")
        .unwrap();
    assert_eq!(status, 404);

    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    let _ = broker
        .ch
        .exchange_delete(ExchangeDeleteArguments::new(&entry))
        .await;
    broker.cleanup().await;
}

/// The window the relay recorded for `id`: its expiry minus its first sighting, in ms.
fn recorded_window(relay: &Relay, id: &str) -> u64 {
    let (status, body) = relay.get(&format!("/ids/{id}")).expect("endpoint answers");
    assert_eq!(status, 200, "{id} not recorded: {body}");
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    seen["expires_ms"].as_u64().unwrap() - seen["first_seen_ms"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_header_sets_each_window_and_a_bad_one_is_dead_lettered() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    let data = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(
        &broker,
        data.path(),
        &[("DEDUPD_TTL", "1h"), ("DEDUPD_MAX_TTL", "2h")],
    );
    relay.wait_healthy();

    let with_ttl = |id: &str, ttl: FieldValue| {
        let mut table = FieldTable::new();
        table.insert("x-dedup-ttl".try_into().unwrap(), ttl);
        BasicProperties::default()
            .with_message_id(id)
            .with_headers(table)
            .with_persistence(true)
            .finish()
    };
    // Step by step, with the verdict each should get.
    broker
        .publish(with_ttl("w-short", FieldValue::l(1500)), b"1")
        .await; // new, 1.5 s
    broker
        .publish(with_ttl("w-cap", FieldValue::from("7200000")), b"2")
        .await; // new, the cap
    broker.publish(id_props("w-plain"), b"3").await; // new, DEDUPD_TTL
    broker
        .publish(with_ttl("w-short", FieldValue::l(1500)), b"4")
        .await; // duplicate
    broker
        .publish(with_ttl("w-over", FieldValue::l(7_200_001)), b"5")
        .await; // dead: over
    broker
        .publish(with_ttl("w-text", FieldValue::from("soon")), b"6")
        .await; // dead: bad
    broker
        .publish(with_ttl("w-zero", FieldValue::I(0)), b"7")
        .await; // dead: bad
    broker
        .publish(with_ttl("w-float", FieldValue::d(5.0)), b"8")
        .await; // dead: bad
    assert_eq!(relay.wait_settled(8), (3, 1, 4));

    assert_eq!(recorded_window(&relay, "w-short"), 1500);
    assert_eq!(recorded_window(&relay, "w-cap"), 7_200_000);
    assert_eq!(recorded_window(&relay, "w-plain"), 3_600_000);
    assert_eq!(
        bodies_of(&broker.drain(&broker.out).await),
        [b"1".to_vec(), b"2".to_vec(), b"3".to_vec()]
    );
    broker.wait_count(&broker.dead(), 4).await;
    assert_eq!(
        ids_of(&broker.drain(&broker.dead()).await),
        ["w-float", "w-over", "w-text", "w-zero"]
    );
    let m = relay.metrics();
    assert_eq!(
        m["dedupd_dead_lettered_total{reason=\"ttl_over_max\"}"],
        1.0
    );
    assert_eq!(m["dedupd_dead_lettered_total{reason=\"bad_ttl\"}"], 3.0);
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_header_name_is_configurable_and_can_be_off() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    let data = tempfile::tempdir().unwrap();
    // The peer plugin's header name, and the default one ignored.
    let mut relay = Relay::start(
        &broker,
        data.path(),
        &[("DEDUPD_TTL", "1h"), ("DEDUPD_TTL_HEADER", "x-cache-ttl")],
    );
    relay.wait_healthy();
    broker
        .publish(headers_with_id("a", &[("x-cache-ttl", "60000")]), b"a")
        .await;
    broker
        .publish(headers_with_id("b", &[("x-dedup-ttl", "not read")]), b"b")
        .await;
    assert_eq!(relay.wait_settled(2), (2, 0, 0));
    assert_eq!(recorded_window(&relay, "a"), 60_000);
    assert_eq!(recorded_window(&relay, "b"), 3_600_000);
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    assert!(log.contains("ttl_header=\"x-cache-ttl\""), "{log}");

    // Off: no header is read, a malformed one passes with the default window.
    let data = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&broker, data.path(), &[("DEDUPD_TTL_HEADER", "off")]);
    relay.wait_healthy();
    broker
        .publish(headers_with_id("c", &[("x-dedup-ttl", "garbage")]), b"c")
        .await;
    assert_eq!(relay.wait_settled(1), (1, 0, 0));
    assert_eq!(recorded_window(&relay, "c"), 86_400_000);
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}

/// Properties with `message_id` and string headers, persistent.
fn headers_with_id(id: &str, pairs: &[(&str, &str)]) -> BasicProperties {
    let mut props = headers(pairs);
    props.with_message_id(id);
    props
}

/// `method path` on the relay's endpoint with `token` as bearer: status and body.
fn request(relay: &Relay, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let port = relay.port.expect("metrics port");
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let code = text.split(' ').nth(1).unwrap().parse().unwrap();
    (code, text.split_once("\r\n\r\n").unwrap().1.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_all_lets_every_id_through_again_behind_the_token() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    let data = tempfile::tempdir().unwrap();
    let token = "t0ken-for-forget-all";
    let mut relay = Relay::start(&broker, data.path(), &[("DEDUPD_ADMIN_TOKEN", token)]);
    relay.wait_healthy();
    for i in 0..20 {
        broker.publish(id_props(&format!("f-{i}")), b"first").await;
    }
    assert_eq!(relay.wait_settled(20), (20, 0, 0));

    // The route: refused without the token, and without saying `all`.
    assert_eq!(request(&relay, "DELETE", "/ids?all=true", None).0, 401);
    assert_eq!(
        request(&relay, "DELETE", "/ids?all=true", Some("wrong")).0,
        401
    );
    assert_eq!(request(&relay, "DELETE", "/ids", Some(token)).0, 400);

    // The command: refused without --yes (exit 2, one line), done with it, through the service.
    let port = relay.port.unwrap().to_string();
    let cli = |args: &[&str]| {
        dedupd()
            .args(args)
            .env("DEDUPD_METRICS_ADDR", format!("127.0.0.1:{port}"))
            .env("DEDUPD_ADMIN_TOKEN", token)
            .env("DEDUPD_DATA_DIR", data.path())
            .output()
            .unwrap()
    };
    let refused = cli(&["forget", "--all"]);
    assert_eq!(refused.status.code(), Some(2));
    let line = String::from_utf8_lossy(&refused.stderr);
    assert!(
        line.contains("--yes") && line.lines().count() == 1,
        "{line}"
    );
    let done = cli(&["forget", "--all", "--yes"]);
    let out = String::from_utf8_lossy(&done.stdout);
    assert!(
        done.status.success(),
        "{out} {}",
        String::from_utf8_lossy(&done.stderr)
    );
    let answer: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["forgotten"], 20);

    // Every id passes once more; a copy after that is a duplicate again.
    for i in 0..20 {
        broker.publish(id_props(&format!("f-{i}")), b"second").await;
    }
    broker.publish(id_props("f-0"), b"third").await;
    assert_eq!(relay.wait_settled(41), (40, 1, 0));
    let m = relay.metrics();
    assert_eq!(m["dedupd_forget_all_total"], 1.0);
    assert_eq!(m["dedupd_forgotten_ids_total"], 20.0);
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    assert!(log.contains("every id forgotten by an operator"), "{log}");
    assert!(log.contains("forgotten=20"), "{log}");

    // With no service, the command opens the data dir itself.
    let done = dedupd()
        .args(["forget", "--yes", "--all"])
        .env("DEDUPD_METRICS_ADDR", "off")
        .env("DEDUPD_DATA_DIR", data.path())
        .output()
        .unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&done.stdout).unwrap();
    assert_eq!(answer["forgotten"], 20, "the second copies' ids");
    broker.cleanup().await;
}

#[test]
fn id_command_gives_the_hashed_id_of_parts() {
    let id = |env: &[(&str, &str)], args: &[&str]| {
        let mut cmd = dedupd();
        cmd.arg("id").args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let composite = [
        ("DEDUPD_ID_SOURCE", "header:tenant+json:/order/id"),
        ("DEDUPD_ID_SCOPE", "routing_key"),
    ];
    let out = id(&composite, &["--scope", "eu", "a", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hashed = String::from_utf8(out.stdout).unwrap();
    assert_eq!(hashed.trim().len(), 64, "{hashed}");
    // Another scope, another id; a wrong count of parts is a usage error (exit 2, one line).
    let other = id(&composite, &["--scope", "us", "a", "1"]);
    assert_ne!(String::from_utf8(other.stdout).unwrap(), hashed);
    let bad = id(&composite, &["--scope", "eu", "a"]);
    assert_eq!(bad.status.code(), Some(2));
    assert_eq!(String::from_utf8_lossy(&bad.stderr).lines().count(), 1);
    // One part, no scope: the id as it is.
    let plain = id(&[], &["order-42"]);
    assert_eq!(String::from_utf8(plain.stdout).unwrap(), "order-42\n");
}
