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
    let port = relay.port.expect("metrics port");
    support::http(port, method, path, token).expect("the endpoint answers")
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

/// Opens a data dir in this process (no service may hold it), small.
fn open_store(dir: &std::path::Path) -> dedupd::Store {
    let mut config = dedupd::StoreConfig::new(dir);
    config.expected_ids = 10_000;
    config.cache_bytes = 4 << 20;
    dedupd::Store::open(config).unwrap_or_else(|e| panic!("open {}: {e}", dir.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_under_load_restores_every_id_recorded_before_it() {
    const BEFORE: u64 = 500;
    const DURING: u64 = 3000;
    let broker = Broker::connect().await;
    broker.bind_out().await;
    let data = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let token = "t0ken-for-backups";
    let mut relay = Relay::start(&broker, data.path(), &[("DEDUPD_ADMIN_TOKEN", token)]);
    relay.wait_healthy();
    assert_eq!(request(&relay, "GET", "/backup", None).0, 401);

    // Ids recorded before the backup: all of them must be in it.
    for i in 0..BEFORE {
        broker.publish(id_props(&format!("a-{i}")), b"before").await;
    }
    assert_eq!(relay.wait_settled(BEFORE), (BEFORE, 0, 0));
    // Then a stream under which the backup is taken.
    let publisher = {
        let ch = broker.conn.open_channel(None).await.unwrap();
        let source = broker.source.clone();
        tokio::spawn(async move {
            for i in 0..DURING {
                let args = BasicPublishArguments::new("", &source);
                let props = id_props(&format!("b-{i}"));
                ch.basic_publish(props, b"during".to_vec(), args)
                    .await
                    .unwrap();
            }
            let _ = ch.close().await;
        })
    };
    relay.wait_forwarded(BEFORE + 100);
    let file = scratch.path().join("dedupd.backup");
    let port = relay.port.unwrap().to_string();
    let before = relay.wait_settled(1).0;
    let backup = dedupd()
        .args(["backup", file.to_str().unwrap()])
        .env("DEDUPD_METRICS_ADDR", format!("127.0.0.1:{port}"))
        .env("DEDUPD_ADMIN_TOKEN", token)
        .output()
        .unwrap();
    let after = relay.wait_settled(1).0;
    let out = String::from_utf8_lossy(&backup.stdout);
    assert!(
        backup.status.success(),
        "{out} {}",
        String::from_utf8_lossy(&backup.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["bytes"], std::fs::metadata(&file).unwrap().len());
    assert!(!scratch.path().join("dedupd.backup.partial").exists());
    println!("backup under load: {out}; forwarded {before} -> {after} meanwhile");
    // The relay kept forwarding: the whole stream passes, once.
    publisher.await.unwrap();
    assert_eq!(relay.wait_settled(BEFORE + DURING), (BEFORE + DURING, 0, 0));
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");

    // Restore into a new dir; into a dir that holds something: refused, one line.
    let restored = scratch.path().join("restored");
    let restore = |from: &std::path::Path, dir: &std::path::Path| {
        dedupd()
            .args(["restore", from.to_str().unwrap(), "--data-dir"])
            .arg(dir)
            .env("DEDUPD_METRICS_ADDR", "off")
            .output()
            .unwrap()
    };
    let done = restore(&file, &restored);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let refused = restore(&file, data.path());
    assert_eq!(refused.status.code(), Some(1));
    let line = String::from_utf8_lossy(&refused.stderr);
    assert!(
        line.contains("not empty") && line.lines().count() == 1,
        "{line}"
    );

    // Every id recorded before the backup is there, with what the original says of it; nothing
    // is there that the original does not hold.
    let now = dedupd::store::system_now_ms();
    let original = open_store(data.path());
    let copy = open_store(&restored);
    let mut during_kept = Vec::new();
    for id in (0..BEFORE).map(|i| format!("a-{i}")) {
        let want = original.check(id.as_bytes(), now).unwrap();
        assert!(want.is_some(), "{id} recorded by the relay");
        assert_eq!(copy.check(id.as_bytes(), now).unwrap(), want, "{id}");
    }
    for id in (0..DURING).map(|i| format!("b-{i}")) {
        if let Some(seen) = copy.check(id.as_bytes(), now).unwrap() {
            assert_eq!(original.check(id.as_bytes(), now).unwrap(), Some(seen));
            during_kept.push(id);
        }
    }
    assert_eq!(copy.stats().live_ids, BEFORE + during_kept.len() as u64);
    println!(
        "{} of the {DURING} ids recorded during the backup are in it",
        during_kept.len()
    );
    original.close().unwrap();
    copy.close().unwrap();

    // And through the relay: on the restored dir, every id of the backup is a duplicate.
    let mut relay = Relay::start(&broker, &restored, &[]);
    relay.wait_healthy();
    for i in 0..BEFORE {
        broker.publish(id_props(&format!("a-{i}")), b"again").await;
    }
    for id in &during_kept {
        broker.publish(id_props(id), b"again").await;
    }
    let n = BEFORE + during_kept.len() as u64;
    assert_eq!(relay.wait_settled(n), (0, n, 0));
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}

#[test]
fn offline_backup_to_stdout_restores_from_stdin() {
    use std::io::Write;
    let data = tempfile::tempdir().unwrap();
    let now = dedupd::store::system_now_ms();
    let store = open_store(data.path());
    let ids = (0..1000).map(|i| (format!("x-{i}").into_bytes(), None));
    dedupd::admin::record_ids(&store, ids, now).unwrap();
    store.close().unwrap();

    // No service: the command opens the data dir, the backup goes to stdout.
    let backup = dedupd()
        .args(["backup", "-"])
        .env("DEDUPD_METRICS_ADDR", "off")
        .env("DEDUPD_DATA_DIR", data.path())
        .output()
        .unwrap();
    assert!(
        backup.status.success(),
        "{}",
        String::from_utf8_lossy(&backup.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&backup.stderr)
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(summary["bytes"], backup.stdout.len());

    let restored = tempfile::tempdir().unwrap();
    let dir = restored.path().join("data");
    let mut restore = dedupd()
        .args(["restore", "-", "--data-dir"])
        .arg(&dir)
        .env("DEDUPD_METRICS_ADDR", "off")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    restore
        .stdin
        .take()
        .unwrap()
        .write_all(&backup.stdout)
        .unwrap();
    let done = restore.wait_with_output().unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let copy = open_store(&dir);
    let original = open_store(data.path());
    for i in 0..1000 {
        let id = format!("x-{i}");
        let seen = copy.check(id.as_bytes(), now).unwrap();
        assert!(seen.is_some(), "{id}");
        assert_eq!(seen, original.check(id.as_bytes(), now).unwrap());
    }
    assert_eq!(copy.stats().live_ids, 1000);
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
