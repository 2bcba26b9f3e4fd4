//! dedupd against a 3-node RabbitMQ cluster on loopback, started by the harness from the installed
//! `rabbitmq-server` (tests/support/cluster.rs): the node that leads the source queue goes away
//! mid-stream, and nothing is lost. Random names, the cluster stopped and removed at the end.

mod support;

use std::collections::HashMap;
use std::time::Instant;

use support::cluster::Cluster;
use support::*;

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
    drop(cluster);
}
