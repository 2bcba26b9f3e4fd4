//! Black-box tests of the relay: the real `dedupd` binary against the real local RabbitMQ
//! (127.0.0.1:5672, guest/guest). Each test uses its own random queue and exchange names and a
//! temporary data dir, and deletes what it declared. No broker is a failure, not a skip.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::process::Command;

use amqprs::channel::{QueueBindArguments, QueueDeleteArguments};
use amqprs::{BasicProperties, FieldTable, FieldValue};

use support::*;

// ---------------------------------------------------------------------------------------------
// The tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_removed_everything_else_forwarded_once_unchanged() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    let data = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&broker, data.path(), &[]);
    relay.wait_healthy();

    // 40 distinct ids, and every third sent twice more, interleaved.
    let mut sent = BTreeMap::new();
    let mut total = 0;
    for i in 0..40u64 {
        let id = format!("order-{i}");
        let props = full_props(&id, i);
        let body = format!(
            "{{\"order\":{i},\"pad\":\"{}\"}}",
            "x".repeat(i as usize * 7)
        )
        .into_bytes();
        broker.publish(props.clone(), &body).await;
        total += 1;
        if i % 3 == 0 {
            broker.publish(props.clone(), &body).await;
            broker.publish(props.clone(), &body).await;
            total += 2;
        }
        sent.insert(id, (props, body));
    }
    let (forwarded, duplicate, dead) = relay.wait_settled(total);
    assert_eq!((forwarded, duplicate, dead), (40, total - 40, 0));

    let got = broker.drain(&broker.out).await;
    assert_eq!(got.len(), 40, "each id exactly once");
    for (props, body) in &got {
        let id = props.message_id().expect("message id kept");
        let (want_props, want_body) = &sent[id];
        assert_eq!(body, want_body, "body of {id}");
        assert_same_props(props, want_props);
    }
    assert_eq!(broker.count(&broker.source).await, 0);
    assert_eq!(broker.count(&broker.dead()).await, 0);
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_copies_back_to_back_forward_one() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    let data = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&broker, data.path(), &[]);
    relay.wait_healthy();

    for _ in 0..50 {
        broker.publish(id_props("same"), b"same body").await;
    }
    assert_eq!(relay.wait_settled(50), (1, 49, 0));
    let got = broker.drain(&broker.out).await;
    assert_eq!(ids_of(&got), ["same"]);
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_id_empty_id_and_too_long_id_are_dead_lettered() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    let data = tempfile::tempdir().unwrap();
    // A message_id is at most 255 bytes, so the limit comes down to show the long-id path.
    let mut relay = Relay::start(&broker, data.path(), &[("DEDUPD_MAX_ID_BYTES", "100")]);
    relay.wait_healthy();

    let long = "L".repeat(101);
    broker
        .publish(BasicProperties::default(), b"no id at all")
        .await;
    broker.publish(id_props(""), b"empty id").await;
    broker.publish(id_props(&long), b"id too long").await;
    broker.publish(id_props("fine"), b"a good one").await;
    assert_eq!(relay.wait_settled(4), (1, 0, 3));

    assert_eq!(ids_of(&broker.drain(&broker.out).await), ["fine"]);
    broker.wait_count(&broker.dead(), 3).await;
    let dead = broker.drain(&broker.dead()).await;
    assert_eq!(
        bodies_of(&dead),
        [
            b"empty id".to_vec(),
            b"id too long".to_vec(),
            b"no id at all".to_vec()
        ]
    );
    let m = relay.metrics();
    assert_eq!(m["dedupd_dead_lettered_total{reason=\"no_id\"}"], 2.0);
    assert_eq!(m["dedupd_dead_lettered_total{reason=\"bad_id\"}"], 1.0);
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_id_source_dedupes_and_dead_letters_a_header_over_the_limit() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    let data = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(
        &broker,
        data.path(),
        &[("DEDUPD_ID_SOURCE", "header:x-dedup-id")],
    );
    relay.wait_healthy();

    let long = "H".repeat(300); // over the default 256, possible only in a header
    broker
        .publish(header_props("x-dedup-id", Some("h-1")), b"first h-1")
        .await;
    broker
        .publish(header_props("x-dedup-id", Some("h-1")), b"second h-1")
        .await;
    broker
        .publish(header_props("x-dedup-id", Some("h-2")), b"h-2")
        .await;
    broker
        .publish(header_props("x-dedup-id", Some(&long)), b"long header id")
        .await;
    broker
        .publish(header_props("x-other", Some("h-3")), b"no header")
        .await;
    assert_eq!(relay.wait_settled(5), (2, 1, 2));

    let out = broker.drain(&broker.out).await;
    assert_eq!(bodies_of(&out), [b"first h-1".to_vec(), b"h-2".to_vec()]);
    broker.wait_count(&broker.dead(), 2).await;
    let dead = broker.drain(&broker.dead()).await;
    assert_eq!(
        bodies_of(&dead),
        [b"long header id".to_vec(), b"no header".to_vec()]
    );
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_sha256_id_source_dedupes_by_content() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    let data = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&broker, data.path(), &[("DEDUPD_ID_SOURCE", "body-sha256")]);
    relay.wait_healthy();

    for body in ["alpha", "beta", "alpha", "gamma", "beta"] {
        broker
            .publish(BasicProperties::default(), body.as_bytes())
            .await;
    }
    assert_eq!(relay.wait_settled(5), (3, 2, 0));
    let out = broker.drain(&broker.out).await;
    assert_eq!(
        bodies_of(&out),
        [b"alpha".to_vec(), b"beta".to_vec(), b"gamma".to_vec()]
    );
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_destination_dead_letters_and_the_id_stays_new() {
    let broker = Broker::connect().await;
    let data = tempfile::tempdir().unwrap();
    // The relay declares the destination exchange; nothing is bound to it yet.
    let mut relay = Relay::start(&broker, data.path(), &[]);
    relay.wait_healthy();

    // Three copies back to back: the second and third wait for the first, which fails and
    // releases the id, so each of them is tried in turn, and each is returned.
    for _ in 0..3 {
        broker
            .publish(full_props("lost?", 1), b"nowhere to go")
            .await;
    }
    assert_eq!(relay.wait_settled(3), (0, 0, 3));
    broker.wait_count(&broker.dead(), 3).await;
    let dead = broker.drain(&broker.dead()).await;
    assert_eq!(bodies_of(&dead), vec![b"nowhere to go".to_vec(); 3]);
    assert_eq!(
        relay.metrics()["dedupd_dead_lettered_total{reason=\"returned\"}"],
        3.0
    );

    // The claim was released, not recorded: once routable, the same id goes through.
    broker.bind_out().await;
    broker
        .publish(full_props("lost?", 1), b"now routable")
        .await;
    assert_eq!(relay.wait_settled(4), (1, 0, 3));
    assert_eq!(
        bodies_of(&broker.drain(&broker.out).await),
        [b"now routable".to_vec()]
    );
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nacked_publish_is_dead_lettered() {
    let broker = Broker::connect().await;
    broker.declare_exchange(&broker.dest).await;
    // A destination queue that takes one message and nacks the rest.
    let mut args = FieldTable::new();
    args.insert("x-max-length".try_into().unwrap(), FieldValue::l(1));
    args.insert(
        "x-overflow".try_into().unwrap(),
        FieldValue::from("reject-publish"),
    );
    broker.declare_queue(&broker.out, args).await;
    broker
        .ch
        .queue_bind(QueueBindArguments::new(&broker.out, &broker.dest, ""))
        .await
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&broker, data.path(), &[]);
    relay.wait_healthy();

    broker.publish(id_props("n-1"), b"one").await;
    assert_eq!(relay.wait_settled(1), (1, 0, 0));
    broker.publish(id_props("n-2"), b"two").await;
    broker.publish(id_props("n-3"), b"three").await;
    assert_eq!(relay.wait_settled(3), (1, 0, 2));
    broker.wait_count(&broker.dead(), 2).await;
    assert_eq!(
        bodies_of(&broker.drain(&broker.dead()).await),
        [b"three".to_vec(), b"two".to_vec()]
    );
    assert_eq!(
        relay.metrics()["dedupd_dead_lettered_total{reason=\"nacked\"}"],
        2.0
    );
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_the_same_data_dir_remembers_ids() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    let data = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&broker, data.path(), &[]);
    relay.wait_healthy();
    for i in 0..10 {
        broker
            .publish(id_props(&format!("r-{i}")), b"first run")
            .await;
    }
    assert_eq!(relay.wait_settled(10), (10, 0, 0));
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");

    // Second run, same dir: the same ids are duplicates, a new one is not.
    let mut relay = Relay::start(&broker, data.path(), &[]);
    relay.wait_healthy();
    for i in 0..10 {
        broker
            .publish(id_props(&format!("r-{i}")), b"second run")
            .await;
    }
    broker.publish(id_props("r-new"), b"second run").await;
    assert_eq!(relay.wait_settled(11), (1, 10, 0));
    let out = broker.drain(&broker.out).await;
    assert_eq!(out.len(), 11);
    assert_eq!(
        out.iter().filter(|(_, b)| b == b"second run").count(),
        1,
        "only r-new passes the second time"
    );
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_ttl_lets_an_id_through_again_after_it() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    let data = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&broker, data.path(), &[("DEDUPD_TTL", "1s")]);
    relay.wait_healthy();

    broker.publish(id_props("ttl"), b"1").await;
    broker.publish(id_props("ttl"), b"2").await;
    assert_eq!(relay.wait_settled(2), (1, 1, 0));
    // Past the 1 s window the id is new again: wait until the service says so, not a guess.
    eventually(
        WAIT,
        || format!("the id never expired:\n{}", relay.log()),
        || matches!(relay.get("/ids/ttl"), Some((404, _))),
    );
    broker.publish(id_props("ttl"), b"3").await;
    assert_eq!(relay.wait_settled(3), (2, 1, 0));
    assert_eq!(
        bodies_of(&broker.drain(&broker.out).await),
        [b"1".to_vec(), b"3".to_vec()]
    );
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_exchange_gets_a_copy_and_missing_ids_can_be_forwarded() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    broker.declare_exchange(&broker.dups).await;
    broker.declare_queue(&broker.dups, FieldTable::new()).await;
    broker
        .ch
        .queue_bind(QueueBindArguments::new(&broker.dups, &broker.dups, ""))
        .await
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(
        &broker,
        data.path(),
        &[
            ("DEDUPD_DUPLICATES_EXCHANGE", &broker.dups),
            ("DEDUPD_MISSING_ID", "forward"),
        ],
    );
    relay.wait_healthy();

    broker.publish(id_props("d-1"), b"original").await;
    broker.publish(id_props("d-1"), b"copy").await;
    broker
        .publish(BasicProperties::default(), b"anonymous")
        .await;
    broker
        .publish(BasicProperties::default(), b"anonymous")
        .await;
    assert_eq!(relay.wait_settled(4), (3, 1, 0));
    assert_eq!(
        bodies_of(&broker.drain(&broker.out).await),
        [
            b"anonymous".to_vec(),
            b"anonymous".to_vec(),
            b"original".to_vec()
        ]
    );
    broker.wait_count(&broker.dups, 1).await;
    assert_eq!(
        bodies_of(&broker.drain(&broker.dups).await),
        [b"copy".to_vec()]
    );
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero_and_loses_nothing() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    // Fill the source before the relay starts.
    let n = 5000u64;
    broker.fill_source("s", n).await;

    let data = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&broker, data.path(), &[]);
    relay.wait_healthy();
    // Stop it in the middle of the stream.
    relay.wait_forwarded(300);
    let (status, log) = relay.terminate();
    assert!(status.success(), "exit {status}:\n{log}");
    assert!(log.contains("store closed"), "{log}");

    // What was forwarded is gone from the source; the rest is back in it; nothing twice.
    let first = broker.drain(&broker.out).await;
    let left = broker.count(&broker.source).await as u64;
    assert_eq!(first.len() as u64 + left, n, "forwarded + left in source");
    eprintln!(
        "sigterm: {} forwarded, {left} left in the source",
        first.len()
    );

    // A second run forwards the rest, and nothing of the first run again.
    let mut relay = Relay::start(&broker, data.path(), &[]);
    relay.wait_healthy();
    relay.wait_settled(left);
    let second = broker.drain(&broker.out).await;
    let mut all = ids_of(&first);
    all.extend(ids_of(&second));
    all.sort();
    let mut want: Vec<String> = (0..n).map(|i| format!("s-{i}")).collect();
    want.sort();
    assert_eq!(all, want, "every message exactly once over the two runs");
    assert_eq!(broker.count(&broker.dead()).await, 0);
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_instance_on_the_same_data_dir_exits_naming_it() {
    let broker = Broker::connect().await;
    let data = tempfile::tempdir().unwrap();
    let mut first = Relay::start(&broker, data.path(), &[]);
    first.wait_healthy();

    let mut second = Relay::start(&broker, data.path(), &[]);
    let status = second.wait_exit();
    let log = second.log();
    assert!(!status.success(), "{log}");
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.contains(&data.path().display().to_string()),
        "error line names the dir: {log}"
    );
    let (status, log) = first.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}

#[test]
fn bad_config_exits_2_naming_the_variable() {
    for (var, value) in [
        ("DEDUPD_TTL", "a while"),
        ("DEDUPD_PREFETCH", "0"),
        ("DEDUPD_ID_SOURCE", "uuid"),
        ("DEDUPD_TTLL", "24h"),
    ] {
        let out = dedupd().env(var, value).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}={value}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(var) && stderr.contains(value), "{stderr}");
    }
}

#[test]
fn help_prints_the_variable_table() {
    let out = dedupd().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&dedupd::config::markdown_table()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_topology_with_declare_off_fails_naming_it() {
    let broker = Broker::connect().await;
    let data = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&broker, data.path(), &[("DEDUPD_DECLARE", "false")]);
    let status = relay.wait_exit();
    let log = relay.log();
    assert_eq!(status.code(), Some(1), "{log}");
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.contains(&format!("{}.dlx", broker.source)) && last.contains("does not exist"),
        "{log}"
    );
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_without_broker_and_still_stops_cleanly() {
    let broker = Broker::connect().await;
    let data = tempfile::tempdir().unwrap();
    // Nothing listens on port 1: the relay keeps retrying and reports itself unhealthy.
    let relay = Relay::start(
        &broker,
        data.path(),
        &[("DEDUPD_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")],
    );
    let code = eventually(WAIT, || relay.log(), || relay.get("/healthz")).0;
    assert_eq!(code, 503);
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    assert!(!log.contains("guest:guest"), "password logged: {log}");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_losing_its_consumer_and_resumes() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    let data = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&broker, data.path(), &[]);
    relay.wait_healthy();
    broker.publish(id_props("before"), b"before").await;
    assert_eq!(relay.wait_settled(1), (1, 0, 0));

    // Deleting the source queue cancels the consumer: the relay must reconnect and redeclare.
    broker
        .ch
        .queue_delete(QueueDeleteArguments::new(&broker.source))
        .await
        .unwrap();
    eventually(
        WAIT,
        || format!("never reconnected:\n{}", relay.log()),
        || {
            let m = relay.metrics();
            m.get("dedupd_reconnects_total").copied().unwrap_or(0.0) >= 1.0
        },
    );
    relay.wait_healthy();
    broker.publish(id_props("before"), b"dup").await;
    broker.publish(id_props("after"), b"after").await;
    assert_eq!(relay.wait_settled(3), (2, 1, 0));
    assert_eq!(
        bodies_of(&broker.drain(&broker.out).await),
        [b"after".to_vec(), b"before".to_vec()]
    );
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_the_broker_drops_the_connection_and_loses_nothing() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    let n = 3000u64;
    broker.fill_source("c", n).await;
    let data = tempfile::tempdir().unwrap();
    // A small prefetch slows the relay down, so the connection drops mid-stream.
    let mut relay = Relay::start(&broker, data.path(), &[("DEDUPD_PREFETCH", "4")]);
    relay.wait_healthy();

    // Find the relay's connection on the broker, then close it once the stream is under way.
    let marker = format!("dedupd {} ->", broker.source);
    let listed = Command::new("rabbitmqctl")
        .args(["list_connections", "pid", "client_properties", "-q"])
        .output()
        .expect("rabbitmqctl must be on PATH for this test");
    let listed = String::from_utf8_lossy(&listed.stdout);
    let pid = listed
        .lines()
        .find(|l| l.contains(&marker))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no connection named {marker:?} in:\n{listed}"));
    relay.wait_forwarded(300);
    let closed = Command::new("rabbitmqctl")
        .args(["close_connection", pid, "dedupd test: connection loss"])
        .output()
        .unwrap();
    assert!(closed.status.success(), "{closed:?}");
    let at_close = relay.wait_settled(1).0;

    // It reconnects, and every message reaches the destination. A message whose publish was
    // under way when the connection dropped may pass twice (the documented window); none is lost.
    let mut waiting = Waiting::new(WAIT);
    let mut seen: HashMap<String, u32> = HashMap::new();
    while seen.len() < n as usize {
        for id in ids_of(&broker.drain(&broker.out).await) {
            *seen.entry(id).or_default() += 1;
        }
        let arrived = seen.len();
        waiting
            .again(|| format!("{arrived} of {n} ids arrived:\n{}", relay.log()))
            .await;
    }
    let m = relay.metrics();
    assert!(m["dedupd_reconnects_total"] >= 1.0, "{}", relay.log());
    let repeats: u32 = seen.values().map(|c| c - 1).sum();
    assert!(
        repeats <= 1000,
        "at most a prefetch's worth can repeat, got {repeats}"
    );
    eprintln!("connection loss after {at_close} of {n} forwarded: {repeats} passed twice");
    assert_eq!(broker.count(&broker.dead()).await, 0);
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_run_relays_until_its_shutdown_future_resolves() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    broker.declare_source().await;
    let data = tempfile::tempdir().unwrap();
    let config = dedupd::Config::from_vars([
        ("DEDUPD_SOURCE_QUEUE", broker.source.as_str()),
        ("DEDUPD_DEST_EXCHANGE", broker.dest.as_str()),
        ("DEDUPD_DATA_DIR", data.path().to_str().unwrap()),
        ("DEDUPD_METRICS_ADDR", "off"),
        ("DEDUPD_EXPECTED_IDS", "10000"),
    ])
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(dedupd::run(config, async move {
        let _ = stopped.await;
    }));

    broker.publish(id_props("lib-a"), b"a").await;
    broker.publish(id_props("lib-a"), b"a again").await;
    broker.publish(id_props("lib-b"), b"b").await;
    broker.wait_count(&broker.out, 2).await;
    broker.wait_count(&broker.source, 0).await;
    stop.send(()).unwrap();
    tokio::time::timeout(WAIT, relay)
        .await
        .expect("run returns after its shutdown future")
        .unwrap()
        .expect("run ends Ok");
    assert_eq!(
        bodies_of(&broker.drain(&broker.out).await),
        [b"a".to_vec(), b"b".to_vec()]
    );

    // The store was closed: the data dir opens again and knows both ids.
    let dir = data.path().to_path_buf();
    let live = tokio::task::spawn_blocking(move || {
        let store = dedupd::Store::open(dedupd::StoreConfig::new(dir)).unwrap();
        let live = store.stats().live_ids;
        store.close().unwrap();
        live
    })
    .await
    .unwrap();
    assert_eq!(live, 2);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_nothing_and_measures_the_repeat_window() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    let n = 5000u64;
    broker.fill_source("k", n).await;
    let data = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&broker, data.path(), &[]);
    relay.wait_healthy();
    relay.wait_forwarded(500);
    // SIGKILL: no drain, no ack, no flush beyond what was already durable.
    relay.child.kill().unwrap();
    relay.child.wait().unwrap();
    let before: Vec<String> = ids_of(&broker.drain(&broker.out).await);

    // The restarted relay sees the same data dir; the broker redelivers what was unacked.
    let mut relay = Relay::start(&broker, data.path(), &[]);
    relay.wait_healthy();
    let mut waiting = Waiting::new(WAIT);
    let mut seen: HashMap<String, u32> = HashMap::new();
    for id in &before {
        *seen.entry(id.clone()).or_default() += 1;
    }
    while seen.len() < n as usize {
        for id in ids_of(&broker.drain(&broker.out).await) {
            *seen.entry(id).or_default() += 1;
        }
        let arrived = seen.len();
        waiting
            .again(|| format!("{arrived} of {n} ids arrived:\n{}", relay.log()))
            .await;
    }
    // Nothing lost; repeats only from the window between confirm and source ack.
    let repeats: u32 = seen.values().map(|c| c - 1).sum();
    assert!(
        repeats <= 1000,
        "at most a prefetch's worth can repeat, got {repeats}"
    );
    eprintln!(
        "kill -9 after {} of {n} forwarded: {repeats} passed twice",
        before.len()
    );
    assert_eq!(broker.count(&broker.dead()).await, 0);
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}
