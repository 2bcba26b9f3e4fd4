//! dedupd against a 3-node RabbitMQ cluster on loopback, started by the harness from the installed
//! `rabbitmq-server` (tests/support/cluster.rs): the node that leads the source queue goes away
//! mid-stream, and nothing is lost; with `DEDUPD_HA=on`, a pair of dedupd on different nodes
//! loses the node that leads the source queue and the id stream (and the active instance's
//! connection with it), then its active instance to `kill -9`, and nothing is lost either.
//! Random names, the clusters stopped and removed at the end.

mod support;

use std::collections::HashMap;
use std::time::Instant;

use support::cluster::Cluster;
use support::*;

/// One cluster at a time: two would share the machine's two cores, and their timings suffer.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// 10 000 persistent messages with 20 % repeats of 8 000 ids: message `i`'s id.
fn id(i: u64) -> String {
    if i < 8000 {
        format!("c-{i}")
    } else {
        format!("c-{}", (i * 7919) % 8000)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_source_loses_its_leaders_node_mid_stream_and_nothing_is_lost() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let cluster = Cluster::start();
    let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
    // The test's side lives on node 2, which stays up.
    let broker = Broker::connect_at(n2.port).await;
    broker.bind_out().await;
    let prefetch = 20u64;
    let prefetch_s = prefetch.to_string();
    let data = tempfile::tempdir().unwrap();

    // Declared through node 1, which therefore leads the source queue.
    let url1 = n1.url();
    let declare = [
        ("DEDUPD_QUEUE_TYPE", "quorum"),
        ("DEDUPD_AMQP_URL", url1.as_str()),
    ];
    let mut declarer = Relay::start(&broker, data.path(), &declare);
    declarer.wait_healthy();
    let (status, log) = declarer.terminate();
    assert!(status.success(), "{log}");
    assert_eq!(
        cluster.leader(1, &broker.source).as_deref(),
        Some(n1.name.as_str())
    );
    for i in 0..10_000 {
        broker
            .publish(id_props(&id(i)), format!("body {i}").as_bytes())
            .await;
    }
    broker.wait_count(&broker.source, 10_000).await;

    // The relay on node 2; node 1 goes mid-stream.
    let url2 = n2.url();
    let env = [
        ("DEDUPD_QUEUE_TYPE", "quorum"),
        ("DEDUPD_PREFETCH", prefetch_s.as_str()),
        ("DEDUPD_AMQP_URL", url2.as_str()),
    ];
    let mut relay = Relay::start(&broker, data.path(), &env);
    // Declared after the relay, so that on a panic it reports before the relay is killed.
    let _dump = cluster.dump_on_panic(1);
    relay.wait_healthy();
    relay.wait_forwarded(1000);
    let stopping = Instant::now();
    cluster.stop_node(0);
    let stopped = stopping.elapsed();
    let resumed = relay.wait_forwarding(relay.forwarded());
    eprintln!(
        "node 1 stopped ({stopped:?} for rabbitmqctl stop): forwarding again {resumed:?} later, \
         the source led by {:?}",
        cluster.leader(1, &broker.source)
    );

    let mut seen: HashMap<String, u32> = HashMap::new();
    broker.collect(&mut seen, 8000, &[&relay]).await;
    broker.wait_count(&broker.source, 0).await;
    let repeats: u32 = seen.values().map(|c| c - 1).sum();
    eprintln!("cluster: 0 of 8000 ids lost, {repeats} passed twice");
    assert!(
        u64::from(repeats) <= prefetch,
        "at most a prefetch's worth can repeat, got {repeats}"
    );
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}

/// Prefetch of the HA pair: the most that may pass twice at each failure.
const HA_PREFETCH: u64 = 100;

/// Copies beyond the first, over all ids seen.
fn repeats(seen: &HashMap<String, u32>) -> u64 {
    seen.values().map(|&c| u64::from(c) - 1).sum()
}

/// A relay of the HA pair, on the node of `url`.
fn ha_env<'a>(prefetch: &'a str, url: &'a str) -> [(&'static str, &'a str); 3] {
    [
        ("DEDUPD_HA", "on"),
        ("DEDUPD_PREFETCH", prefetch),
        ("DEDUPD_AMQP_URL", url),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_pair_loses_the_leaders_node_then_the_active_instance_and_nothing_is_lost() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let cluster = Cluster::start();
    let (n1, n2, n3) = (&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]);
    // The test's side lives on node 2, which stays up.
    let broker = Broker::connect_at(n2.port).await;
    broker.bind_out().await;
    let stream = format!("{}.ids", broker.source);
    let (dir_0, dir_a, dir_b) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let prefetch = HA_PREFETCH.to_string();

    // Declared through node 1, which therefore leads the source queue and the id stream.
    let url1 = n1.url();
    let mut declarer = Relay::start(
        &broker,
        dir_0.path(),
        &[("DEDUPD_HA", "on"), ("DEDUPD_AMQP_URL", url1.as_str())],
    );
    declarer.wait_role("standby");
    let (status, log) = declarer.terminate();
    assert!(status.success(), "{log}");
    for name in [&broker.source, &stream] {
        assert_eq!(
            cluster.leader(1, name).as_deref(),
            Some(n1.name.as_str()),
            "{name}\n{}",
            cluster.dump(1)
        );
    }

    // A on node 1 (node 2 when node 1 is gone) registers first, so the broker makes it the
    // active one; B on node 3 (or node 2).
    let url_a = format!("{},{}", n1.url(), n2.url());
    let url_b = format!("{},{}", n3.url(), n2.url());
    let mut a = Relay::start(&broker, dir_a.path(), &ha_env(&prefetch, &url_a));
    a.wait_role("standby");
    let mut b = Relay::start(&broker, dir_b.path(), &ha_env(&prefetch, &url_b));
    // Declared after the relays, so that on a panic it reports before they are killed.
    let _dump = cluster.dump_on_panic(1);
    b.wait_role("standby");
    // The 10 000 messages come in parts, each published just before the event that needs
    // messages left for the next active instance (it learns it is active from a delivery),
    // since a relay drains what is queued faster than this test looks.
    let publish = |range: std::ops::Range<u64>| {
        let broker = &broker;
        async move {
            for i in range {
                broker
                    .publish(id_props(&id(i)), format!("body {i}").as_bytes())
                    .await;
            }
        }
    };
    publish(0..5000).await;
    a.wait_role("active");
    a.wait_forwarded(1500);

    // 1. Node 1 stops: the leaders of the source queue and of the id stream go, and with them
    // A's connection. B becomes the active one; A reconnects to node 2 as a standby.
    let stopping = Instant::now();
    cluster.stop_node(0);
    let stopped = stopping.elapsed();
    publish(5000..6000).await;
    b.wait_forwarding(0);
    let b_forwarding = stopping.elapsed();
    a.wait_role("standby");
    // Past the redeliveries of A's unacked messages, which come first.
    b.wait_forwarded(b.forwarded() + 300);
    let mut seen: HashMap<String, u32> = HashMap::new();
    for id in ids_of(&broker.drain(&broker.out).await) {
        *seen.entry(id).or_default() += 1;
    }
    let after_stop = repeats(&seen);
    eprintln!(
        "node 1 stopped ({stopped:?} for rabbitmqctl stop): B forwarding {b_forwarding:?} after \
         the stop began; {after_stop} ids passed twice; leaders now {:?} / {:?}",
        cluster.leader(1, &broker.source),
        cluster.leader(1, &stream)
    );
    assert!(
        after_stop <= HA_PREFETCH,
        "at most a prefetch's worth can repeat when a node goes, got {after_stop}"
    );

    // 2. kill -9 of the active one, B, mid-stream: A takes over.
    let forwarded = b.forwarded();
    publish(6000..8500).await;
    b.wait_forwarded(forwarded + 300);
    b.child.kill().unwrap();
    let killed = Instant::now();
    b.child.wait().unwrap();
    publish(8500..10_000).await;
    a.wait_role("active");
    let took_over = killed.elapsed();
    a.wait_forwarding(a.forwarded());
    eprintln!(
        "B killed: A active {took_over:?} after the kill, forwarding {:?} after it (catch-up \
         {:.3} s)",
        killed.elapsed(),
        a.gauge("dedupd_ha_catch_up_seconds").unwrap_or(-1.0)
    );

    broker.collect(&mut seen, 8000, &[&a, &b]).await;
    broker.wait_count(&broker.source, 0).await;
    let after_kill = repeats(&seen) - after_stop;
    eprintln!("ha cluster: 0 of 8000 ids lost, {after_kill} more passed twice after the kill");
    assert!(
        after_kill <= HA_PREFETCH,
        "at most a prefetch's worth can repeat after a kill -9, got {after_kill}"
    );
    assert_eq!(broker.count(&broker.dead()).await, 0);
    let (status, log) = a.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}
