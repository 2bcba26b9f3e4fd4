//! Hot standby (`DEDUPD_HA=on`) on the local broker: two dedupd on one source, `kill -9` of the
//! active one mid-stream, the standby takes over with nothing lost and repeats only from the
//! crash window; then a third one with an empty data dir catches up from the id stream and, once
//! active, drops every id seen before. And sharding with HA: each shard queue its own
//! single-active-consumer group and id stream. Real binaries, random names, cleaned up.

mod support;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::time::{Duration, Instant};

use amqprs::channel::BasicPublishArguments;
use dedupd::shard::{self, Ring};
use dedupd::Config;
use support::*;

/// Prefetch of the relays: the most that can pass twice after a `kill -9`.
const PREFETCH: &str = "200";

fn ha_env() -> Vec<(&'static str, &'static str)> {
    vec![("DEDUPD_HA", "on"), ("DEDUPD_PREFETCH", PREFETCH)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_after_kill_9_and_a_fresh_node_drops_every_id_seen_before() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    let (dir_a, dir_b, dir_c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let env = ha_env();
    // A registers first: the broker makes it the active consumer.
    let mut a = Relay::start(&broker, dir_a.path(), &env);
    a.wait_role("standby");
    let mut b = Relay::start(&broker, dir_b.path(), &env);
    b.wait_role("standby");

    // 10 000 persistent messages: 8 000 ids, then 2 000 repeats of earlier ones (20 %).
    let unique = 8000u64;
    let total = 10_000u64;
    let id = |i: u64| {
        if i < unique {
            format!("h-{i}")
        } else {
            format!("h-{}", (i * 7919) % unique)
        }
    };
    for i in 0..total {
        broker
            .publish(id_props(&id(i)), format!("body {i}").as_bytes())
            .await;
    }
    a.wait_role("active");
    a.wait_forwarded(1500);
    // SIGKILL: no drain, no ack, no flush beyond what was already durable.
    a.child.kill().unwrap();
    let killed = Instant::now();
    a.child.wait().unwrap();

    b.wait_role("active");
    let took_over = killed.elapsed();
    let forwarded_before = Relay::outcome(&b.metrics(), "forwarded");
    let deadline = Instant::now() + WAIT;
    while Relay::outcome(&b.metrics(), "forwarded") == forwarded_before {
        assert!(Instant::now() < deadline, "B never forwarded:\n{}", b.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    let forwarding = killed.elapsed();
    let catch_up = b.gauge("dedupd_ha_catch_up_seconds").unwrap_or(-1.0);

    let mut seen: HashMap<String, u32> = HashMap::new();
    broker.collect(&mut seen, unique as usize, &[&a, &b]).await;
    broker.wait_count(&broker.source, 0).await;
    // Every id arrived; the only repeats are the crash window's (at most a prefetch's worth).
    let repeats: u32 = seen.values().map(|c| c - 1).sum();
    eprintln!(
        "kill -9 of the active: standby active after {took_over:?}, forwarding after \
         {forwarding:?} (catch-up {catch_up:.3} s); {repeats} ids passed twice"
    );
    assert!(
        repeats <= PREFETCH.parse().unwrap(),
        "at most a prefetch's worth can repeat, got {repeats}"
    );
    assert_eq!(broker.count(&broker.dead()).await, 0);

    // A third one, empty, joins as a standby and reads the stream from its start.
    let mut c = Relay::start(&broker, dir_c.path(), &env);
    c.wait_role("standby");
    let (status, log) = b.terminate();
    assert!(status.success(), "{log}");
    // Every id seen before comes again, with 100 new ones: only the new ones pass.
    let again: Vec<u64> = (0..unique).step_by(4).collect();
    for &i in &again {
        broker.publish(id_props(&id(i)), b"again").await;
    }
    for i in 0..100 {
        broker.publish(id_props(&format!("new-{i}")), b"new").await;
    }
    c.wait_role("active");
    let settled = c.wait_settled(again.len() as u64 + 100);
    assert_eq!(settled, (100, again.len() as u64, 0), "{}", c.log());
    broker.wait_count(&broker.out, 100).await;
    let out: HashSet<String> = ids_of(&broker.drain(&broker.out).await)
        .into_iter()
        .collect();
    assert!(out.iter().all(|id| id.starts_with("new-")), "{out:?}");
    eprintln!(
        "fresh node: applied offset {}, catch-up at takeover {:.3} s",
        c.gauge("dedupd_ha_applied_offset").unwrap_or(-1.0),
        c.gauge("dedupd_ha_catch_up_seconds").unwrap_or(-1.0)
    );

    let (status, log) = c.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_shard_is_its_own_single_active_group_with_its_own_id_stream() {
    let out = Command::new("rabbitmq-plugins")
        .args(["enable", "rabbitmq_consistent_hash_exchange"])
        .output()
        .expect("run rabbitmq-plugins: sharding needs the consistent-hash plugin");
    assert!(out.status.success(), "{out:?}");
    let broker = Broker::connect().await;
    broker.bind_out().await;
    // What `dedupd topology --shards 2` declares with DEDUPD_HA=on in its environment.
    let ring = Ring {
        exchange: format!("{}.shard", broker.source),
        queue_prefix: broker.source.clone(),
        shards: 2,
    };
    let config = Config::from_vars([("DEDUPD_HA", "on")]).unwrap();
    shard::declare(&config, &ring).await.unwrap();

    // Two instances per shard; the first of each registers first and is the active one.
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let queues: Vec<String> = ring.queues().collect();
    let mut relays: Vec<Relay> = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let env = [
            ("DEDUPD_HA", "on"),
            ("DEDUPD_PREFETCH", PREFETCH),
            ("DEDUPD_SOURCE_QUEUE", queues[i % 2].as_str()),
        ];
        let mut relay = Relay::start(&broker, dir.path(), &env);
        relay.wait_role("standby");
        relays.push(relay);
    }
    // 2 000 ids through the ring, then 500 of them again.
    let unique = 2000u64;
    let ids: Vec<String> = (0..unique)
        .chain((0..unique).step_by(4))
        .map(|i| format!("s-{i}"))
        .collect();
    for id in &ids {
        broker
            .ch
            .basic_publish(
                id_props(id),
                b"x".to_vec(),
                BasicPublishArguments::new(&ring.exchange, ""),
            )
            .await
            .unwrap();
    }
    let settled = |relays: &[Relay]| -> u64 {
        settled_of(&relays.iter().map(Relay::settled).collect::<Vec<_>>())
    };
    eventually(
        WAIT,
        || format!("not all {} settled: {}", ids.len(), settled(&relays)),
        || settled(&relays) == ids.len() as u64,
    );
    // Shard s: instance s forwarded its share, instance s + 2 is its standby and applied
    // exactly those ids from the shard's own stream, none of the other shard's.
    for s in 0..2 {
        let (active, standby) = (&relays[s], &relays[s + 2]);
        assert!(active.get("/healthz").unwrap().1.contains("active"));
        assert!(standby.get("/healthz").unwrap().1.contains("standby"));
        let forwarded = active.forwarded();
        assert!(forwarded > 0, "shard {s} got no share");
        eventually(
            WAIT,
            || format!("shard {s}'s standby never applied its {forwarded} ids"),
            || standby.gauge("dedupd_ha_applied_ids_total") == Some(forwarded as f64),
        );
        // Its stream exists under the shard's name (a passive declare fails otherwise).
        broker.count(&format!("{}.ids", queues[s])).await;
    }
    let forwarded: u64 = relays.iter().map(Relay::forwarded).sum();
    assert_eq!(forwarded, unique);

    // kill -9 of shard 0's active one: its standby takes over; shard 1 is untouched. Every id
    // comes again and none passes: each shard's active one, new or old, knows its ids.
    let before: Vec<(u64, u64, u64)> = relays.iter().map(Relay::settled).collect();
    relays[0].child.kill().unwrap();
    relays[0].child.wait().unwrap();
    for id in &ids[..unique as usize] {
        broker
            .ch
            .basic_publish(
                id_props(id),
                b"again".to_vec(),
                BasicPublishArguments::new(&ring.exchange, ""),
            )
            .await
            .unwrap();
    }
    relays[2].wait_role("active");
    let settled_since =
        |relays: &[Relay]| -> u64 { settled(&relays[1..]) - settled_of(&before[1..]) };
    eventually(
        WAIT,
        || {
            format!(
                "{} of the {unique} ids sent again settled",
                settled_since(&relays)
            )
        },
        || settled_since(&relays) == unique,
    );
    for (i, relay) in relays.iter().enumerate().skip(1) {
        assert_eq!(
            relay.forwarded(),
            before[i].0,
            "instance {i} forwarded an id again"
        );
    }
    assert!(relays[3].get("/healthz").unwrap().1.contains("standby"));
    let out = ids_of(&broker.drain(&broker.out).await);
    assert_eq!(out.len() as u64, unique);
    assert_eq!(out.iter().collect::<HashSet<_>>().len() as u64, unique);

    for relay in relays.drain(1..) {
        let (status, log) = relay.terminate();
        assert!(status.success(), "{log}");
    }
    broker.delete_ring(&ring, &[".dead", ".ids"]).await;
    broker.cleanup().await;
}

/// Messages settled, whatever the outcome, over all `counts`.
fn settled_of(counts: &[(u64, u64, u64)]) -> u64 {
    counts.iter().map(|(f, d, x)| f + d + x).sum()
}
