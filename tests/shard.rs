//! Black-box tests of sharding: real `dedupd` processes, one per shard, each with its own data
//! dir, behind a consistent-hash exchange on the real local RabbitMQ (127.0.0.1:5672,
//! guest/guest). The topology is declared with `dedupd::shard`. Every test uses its own random
//! names and deletes what it declared. The plugin is enabled if it is not; a broker or plugin
//! that cannot be had is a failure, not a skip.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use amqprs::channel::BasicPublishArguments;
use amqprs::connection::{Connection, OpenConnectionArguments};
use dedupd::shard::{self, Ring};
use dedupd::Config;
use rand::seq::SliceRandom;
use support::{
    dedupd, eventually, eventually_async, id_props, ids_of, Broker, Relay, Waiting, WAIT,
};

/// Enables `rabbitmq_consistent_hash_exchange` once per test binary (idempotent: a plugin
/// already enabled stays so). Panics, naming the command, if it cannot.
fn ensure_plugin() {
    static ENABLED: OnceLock<()> = OnceLock::new();
    ENABLED.get_or_init(|| {
        let out = Command::new("rabbitmq-plugins")
            .args(["enable", "rabbitmq_consistent_hash_exchange"])
            .output()
            .expect("run rabbitmq-plugins: the sharding tests need the consistent-hash plugin");
        assert!(
            out.status.success(),
            "rabbitmq-plugins enable rabbitmq_consistent_hash_exchange failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// The configuration `dedupd topology` would run with, plus `vars`.
fn config(vars: &[(&str, &str)]) -> Config {
    Config::from_vars(vars.iter().copied()).unwrap()
}

/// A ring named after the test's random base name.
fn ring(broker: &Broker, generation: &str, shards: u32) -> Ring {
    // `<base>.in` is the harness' source queue name; the ring's names hang off it.
    Ring {
        exchange: format!("{}.shard{generation}", broker.source),
        queue_prefix: format!("{}{generation}", broker.source),
        shards,
    }
}

/// Starts shard `i` of `ring` on `data`, forwarding to the test's destination unless `env`
/// says otherwise.
fn start_shard(broker: &Broker, ring: &Ring, i: u32, data: &Path, env: &[(&str, &str)]) -> Relay {
    let queue = ring.queue(i);
    let mut all = vec![("DEDUPD_SOURCE_QUEUE", queue.as_str())];
    all.extend_from_slice(env);
    let mut relay = Relay::start(broker, data, &all);
    relay.wait_healthy();
    relay
}

/// Messages settled so far by `relay`: (forwarded, duplicate, dead-lettered).
fn settled(relay: &Relay) -> (u64, u64, u64) {
    let m = relay.metrics();
    (
        Relay::outcome(&m, "forwarded"),
        Relay::outcome(&m, "duplicate"),
        Relay::outcome(&m, "dead_lettered"),
    )
}

/// Waits until the relays together settled `n` messages.
fn wait_all_settled(relays: &[Relay], n: u64) {
    let total = || -> u64 {
        relays
            .iter()
            .map(|r| {
                let (f, d, x) = settled(r);
                f + d + x
            })
            .sum()
    };
    eventually(
        WAIT,
        || {
            format!(
                "{} of {n} settled; last log:\n{}",
                total(),
                relays.last().map(Relay::log).unwrap_or_default()
            )
        },
        || total() >= n,
    )
}

/// `distinct` ids named `<tag>-<i>`, plus one more copy of every `every`-th, shuffled.
fn with_copies(tag: &str, distinct: usize, every: usize) -> Vec<String> {
    let mut ids: Vec<String> = (0..distinct).map(|i| format!("{tag}-{i}")).collect();
    let copies: Vec<String> = ids.iter().step_by(every).cloned().collect();
    ids.extend(copies);
    ids.shuffle(&mut rand::rng());
    ids
}

/// Publishes one persistent message per id to `exchange`, from `connections` connections in
/// parallel (id `k` from connection `k % connections`).
async fn publish_parallel(exchange: &str, ids: &[String], connections: usize) {
    let mut tasks = Vec::new();
    for c in 0..connections {
        let exchange = exchange.to_string();
        let mine: Vec<String> = ids.iter().skip(c).step_by(connections).cloned().collect();
        tasks.push(tokio::spawn(async move {
            let args = OpenConnectionArguments::new("127.0.0.1", 5672, "guest", "guest");
            let conn = Connection::open(&args).await.expect("publisher connection");
            let ch = conn.open_channel(None).await.unwrap();
            for id in mine {
                ch.basic_publish(
                    id_props(&id),
                    format!("body of {id}").into_bytes(),
                    BasicPublishArguments::new(&exchange, ""),
                )
                .await
                .unwrap();
            }
            // Closed explicitly, so the publishes are flushed before the test moves on.
            ch.close().await.unwrap();
            conn.close().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Publishes on the test's own channel, one message per id, to `exchange`.
async fn publish(broker: &Broker, exchange: &str, ids: &[String]) {
    for id in ids {
        broker
            .ch
            .basic_publish(
                id_props(id),
                format!("body of {id}").into_bytes(),
                BasicPublishArguments::new(exchange, ""),
            )
            .await
            .unwrap();
    }
}

/// Takes what the output queue holds now into `into` (copies per id).
async fn drain_into(broker: &Broker, into: &mut HashMap<String, u32>) {
    for id in ids_of(&broker.drain(&broker.out).await) {
        *into.entry(id).or_default() += 1;
    }
}

/// Ready messages in all of `queues`.
async fn queued(broker: &Broker, queues: impl Iterator<Item = String>) -> u32 {
    let mut n = 0;
    for q in queues {
        n += broker.count(&q).await;
    }
    n
}

/// Drains the output queue into `into` until every queue of `queues` is empty and every id of
/// `want` arrived.
async fn drain_until_all_arrived(
    broker: &Broker,
    queues: &[String],
    want: &[&String],
    into: &mut HashMap<String, u32>,
    relays: &[&Relay],
) {
    let mut waiting = Waiting::new(WAIT);
    loop {
        drain_into(broker, into).await;
        let left = queued(broker, queues.iter().cloned()).await;
        let arrived = want.iter().filter(|id| into.contains_key(**id)).count();
        if left == 0 && arrived == want.len() {
            return;
        }
        waiting
            .again(|| {
                let logs: Vec<String> = relays.iter().map(|r| r.log()).collect();
                format!(
                    "{left} queued, {arrived} of {} ids arrived:\n{}",
                    want.len(),
                    logs.join("\n----\n")
                )
            })
            .await;
    }
}

/// Asserts nothing was dead-lettered on any shard of `ring`.
async fn assert_no_dead_letters(broker: &Broker, ring: &Ring) {
    for q in ring.queues() {
        assert_eq!(broker.count(&format!("{q}.dead")).await, 0, "{q}.dead");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_shards_forward_every_id_once_and_each_gets_a_share() {
    ensure_plugin();
    let broker = Broker::connect().await;
    broker.bind_out().await;
    let ring = ring(&broker, "", 3);
    let report = shard::declare(&config(&[]), &ring).await.unwrap();
    // Declaring again changes nothing (same report, and no second set of hash buckets: the
    // shares below stay even).
    assert_eq!(shard::declare(&config(&[]), &ring).await.unwrap(), report);
    assert_eq!(report.shards.len(), 3);
    eprintln!("{report}");

    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let relays: Vec<Relay> = (0..3)
        .map(|i| start_shard(&broker, &ring, i, dirs[i as usize].path(), &[]))
        .collect();

    // 8 000 ids, every fourth sent twice: 10 000 messages, 20 % of them duplicates, from four
    // connections at once, so copies of one id often travel on different connections.
    let ids = with_copies("s", 8000, 4);
    assert_eq!(ids.len(), 10_000);
    publish_parallel(&ring.exchange, &ids, 4).await;
    wait_all_settled(&relays, 10_000);

    // Every message settled: each forwarded copy was confirmed, so it is in the queue already.
    let mut seen = HashMap::new();
    drain_into(&broker, &mut seen).await;
    assert_eq!(seen.len(), 8000, "every id arrives");
    let repeated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        repeated.is_empty(),
        "forwarded more than once: {repeated:?}"
    );

    // Every shard got a share: about a third each (jump consistent hash, equal weights).
    let shares: Vec<(u64, u64, u64)> = relays.iter().map(settled).collect();
    eprintln!("per shard (forwarded, duplicate, dead-lettered): {shares:?}");
    for (i, (forwarded, duplicate, dead)) in shares.iter().enumerate() {
        assert_eq!(*dead, 0, "shard {i}");
        let total = forwarded + duplicate;
        assert!(
            (2000..=4700).contains(&total),
            "shard {i} got {total} of 10 000: {shares:?}"
        );
    }
    assert_eq!(shares.iter().map(|s| s.0).sum::<u64>(), 8000);
    assert_eq!(shares.iter().map(|s| s.1).sum::<u64>(), 2000);
    assert_no_dead_letters(&broker, &ring).await;

    for relay in relays {
        let (status, log) = relay.terminate();
        assert!(status.success(), "{log}");
    }
    broker.delete_ring(&ring, &[".dead"]).await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_one_shard_mid_stream_loses_nothing_and_repeats_at_most_a_prefetch() {
    ensure_plugin();
    let broker = Broker::connect().await;
    broker.bind_out().await;
    let ring = ring(&broker, "", 3);
    shard::declare(&config(&[]), &ring).await.unwrap();

    // All 10 000 queued before the relays start, so the kill lands mid-stream for sure.
    let ids = with_copies("k", 8000, 4);
    publish_parallel(&ring.exchange, &ids, 4).await;
    eventually_async(
        WAIT,
        || "the 10 000 were never all queued".into(),
        || async { queued(&broker, ring.queues()).await == 10_000 },
    )
    .await;

    const PREFETCH: &str = "300";
    let env = [("DEDUPD_PREFETCH", PREFETCH)];
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut relays: Vec<Relay> = (0..3)
        .map(|i| start_shard(&broker, &ring, i, dirs[i as usize].path(), &env))
        .collect();
    eventually(
        WAIT,
        || format!("shard 1 never got going:\n{}", relays[1].log()),
        || {
            let (f, d, _) = settled(&relays[1]);
            f + d >= 400
        },
    );
    // SIGKILL: no drain, no ack, no flush beyond what was already durable.
    relays[1].child.kill().unwrap();
    relays[1].child.wait().unwrap();
    let killed_after = 10_000 - queued(&broker, ring.queues()).await;
    relays[1] = start_shard(&broker, &ring, 1, dirs[1].path(), &env);

    // Wait until every shard's queue is empty and every id arrived.
    let mut seen = HashMap::new();
    let distinct: Vec<String> = (0..8000).map(|i| format!("k-{i}")).collect();
    let want: Vec<&String> = distinct.iter().collect();
    let queues: Vec<String> = ring.queues().collect();
    let shards: Vec<&Relay> = relays.iter().collect();
    drain_until_all_arrived(&broker, &queues, &want, &mut seen, &shards).await;
    // A graceful stop acks what is still in flight, each forwarded copy confirmed, so in the
    // queue: after it, one drain takes everything that will ever arrive.
    for relay in relays {
        let (status, log) = relay.terminate();
        assert!(status.success(), "{log}");
    }
    drain_into(&broker, &mut seen).await;
    assert_eq!(seen.len(), 8000, "nothing lost");
    let repeats: u32 = seen.values().map(|n| n - 1).sum();
    eprintln!("kill -9 of shard 1 (about {killed_after} of 10 000 taken): {repeats} repeats");
    assert!(
        repeats <= PREFETCH.parse().unwrap(),
        "at most DEDUPD_PREFETCH={PREFETCH} repeats, got {repeats}"
    );
    for q in ring.queues() {
        assert_eq!(broker.count(&q).await, 0, "{q}");
    }
    assert_no_dead_letters(&broker, &ring).await;
    broker.delete_ring(&ring, &[".dead"]).await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reshard_two_to_three_with_old_shards_answering_for_one_ttl_lets_no_duplicate_through() {
    ensure_plugin();
    let broker = Broker::connect().await;
    broker.bind_out().await;
    // A window no phase comes near in real time: the procedure's "one TTL" passes by moving
    // every relay's clock (debug builds serve `POST /clock`).
    const TTL: Duration = Duration::from_secs(3600);
    let ttl = format!("{}s", TTL.as_secs());
    let env = [("DEDUPD_TTL", ttl.as_str())];
    let old = ring(&broker, "", 2);
    let new = ring(&broker, ".g1", 3);
    let entry = old.exchange.clone();
    shard::declare(&config(&[]), &old).await.unwrap();
    let old_dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut old_relays: Vec<Relay> = (0..2)
        .map(|i| start_shard(&broker, &old, i, old_dirs[i as usize].path(), &env))
        .collect();
    let mut seen = HashMap::new();

    // Phase 0, two shards: 1 000 ids, forwarded once each.
    let first: Vec<String> = (0..1000).map(|i| format!("r1-{i}")).collect();
    publish(&broker, &entry, &first).await;
    wait_all_settled(&old_relays, 1000);

    // Step 1: the new ring with its own instances and data dirs.
    shard::declare(&config(&[]), &new).await.unwrap();
    let new_dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let new_relays: Vec<Relay> = (0..3)
        .map(|i| start_shard(&broker, &new, i, new_dirs[i as usize].path(), &env))
        .collect();

    // Step 2: each old instance restarts forwarding to the new ring, declaring nothing.
    let via_new = [
        ("DEDUPD_TTL", ttl.as_str()),
        ("DEDUPD_DEST_EXCHANGE", new.exchange.as_str()),
        ("DEDUPD_DEST_EXCHANGE_TYPE", "x-consistent-hash"),
        ("DEDUPD_DECLARE", "false"),
    ];
    // Stopped first: the replacement needs the data dir the running one holds.
    for (i, relay) in std::mem::take(&mut old_relays).into_iter().enumerate() {
        let (status, log) = relay.terminate();
        assert!(status.success(), "{log}");
        old_relays.push(start_shard(
            &broker,
            &old,
            i as u32,
            old_dirs[i].path(),
            &via_new,
        ));
    }

    // Copies of the first ids (the new shards never saw them: only the old ones can drop them)
    // and 1 000 new ids, each sent twice.
    publish(&broker, &entry, &first).await;
    let second: Vec<String> = (0..1000).map(|i| format!("r2-{i}")).collect();
    publish(&broker, &entry, &second).await;
    publish(&broker, &entry, &second).await;
    wait_all_settled(&old_relays, 3000);
    wait_all_settled(&new_relays, 1000);
    let old_dups: u64 = old_relays.iter().map(|r| settled(r).1).sum();
    assert_eq!(old_dups, 2000, "the old shards dropped the copies");

    // Step 3, one TTL after the switch, while producers keep publishing: 300 ids of the third
    // batch go before the cut-over, 300 more and copies of the first 300 during it from another
    // connection, and a copy of all 600 after it, straight to the new ring.
    // Until then the old shards answer for the ids only they saw; one window on, they hold none.
    let only_old = &first[0];
    assert!(old_relays.iter().any(|r| r.holds(only_old)));
    for relay in old_relays.iter().chain(&new_relays) {
        relay.advance_clock(TTL);
    }
    assert!(!old_relays.iter().any(|r| r.holds(only_old)));
    let third: Vec<String> = (0..600).map(|i| format!("r3-{i}")).collect();
    publish(&broker, &entry, &third[..300]).await;
    let during: Vec<String> = third[300..].iter().chain(&third[..300]).cloned().collect();
    let cfg = config(&[]);
    let (cut, ()) = tokio::join!(
        shard::cut_over(&cfg, &entry, &old, &new.exchange),
        publish_parallel(&entry, &during, 1)
    );
    let cut = cut.unwrap();
    eprintln!("{cut}");
    assert_eq!(cut.unbound, old.queues().collect::<Vec<_>>());
    publish(&broker, &entry, &third).await;
    // Again, for idempotence: the cut-over changes nothing the second time.
    shard::cut_over(&config(&[]), &entry, &old, &new.exchange)
        .await
        .unwrap();

    // Which copies the old shards dropped depends on the ring of the moment, so wait for the
    // end state: every id arrived, and no queue of either ring holds anything.
    let want: Vec<&String> = first.iter().chain(&second).chain(&third).collect();
    let queues: Vec<String> = old.queues().chain(new.queues()).collect();
    let all: Vec<&Relay> = old_relays.iter().chain(&new_relays).collect();
    drain_until_all_arrived(&broker, &queues, &want, &mut seen, &all).await;

    // The old shards receive nothing any more: stopped (gracefully: what they hold is settled),
    // their queues stay empty while new ids go straight to the new ring. A message routed to
    // them now would wait there, with no consumer, to be seen below.
    for relay in old_relays {
        let (status, log) = relay.terminate();
        assert!(status.success(), "{log}");
    }
    let fourth: Vec<String> = (0..200).map(|i| format!("r4-{i}")).collect();
    publish(&broker, &entry, &fourth).await;
    let fourth_ref: Vec<&String> = fourth.iter().collect();
    let new_queues: Vec<String> = new.queues().collect();
    let new_ones: Vec<&Relay> = new_relays.iter().collect();
    drain_until_all_arrived(&broker, &new_queues, &fourth_ref, &mut seen, &new_ones).await;
    for q in old.queues() {
        assert_eq!(
            broker.count(&q).await,
            0,
            "{q} got messages after the cut-over"
        );
    }
    for relay in new_relays {
        let (status, log) = relay.terminate();
        assert!(status.success(), "{log}");
    }
    // Stopped gracefully, nothing is in flight: what arrived is all that will.
    drain_into(&broker, &mut seen).await;
    let want: Vec<&String> = want.into_iter().chain(&fourth).collect();
    assert_eq!(seen.len(), want.len(), "every id arrives");
    for id in want {
        assert_eq!(seen.get(id), Some(&1), "{id} forwarded once");
    }
    assert_no_dead_letters(&broker, &old).await;
    assert_no_dead_letters(&broker, &new).await;
    broker.delete_ring(&old, &[".dead"]).await;
    broker.delete_ring(&new, &[".dead"]).await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_ids_are_hashed_on_the_header() {
    ensure_plugin();
    let broker = Broker::connect().await;
    broker.bind_out().await;
    let ring = ring(&broker, "", 2);
    let cfg = config(&[("DEDUPD_ID_SOURCE", "header:x-id")]);
    let report = shard::declare(&cfg, &ring).await.unwrap();
    assert!(report.to_string().contains("hash-header: x-id"), "{report}");
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let env = [("DEDUPD_ID_SOURCE", "header:x-id")];
    let relays: Vec<Relay> = (0..2)
        .map(|i| start_shard(&broker, &ring, i, dirs[i as usize].path(), &env))
        .collect();
    // 300 ids, each three times, with no message_id at all: only the header tells them apart.
    for round in 0..3 {
        for i in 0..300 {
            broker
                .ch
                .basic_publish(
                    support::header_props("x-id", Some(&format!("h-{i}"))),
                    format!("round {round}").into_bytes(),
                    BasicPublishArguments::new(&ring.exchange, ""),
                )
                .await
                .unwrap();
        }
    }
    wait_all_settled(&relays, 900);
    let shares: Vec<_> = relays.iter().map(settled).collect();
    assert!(
        shares.iter().all(|s| s.0 > 50),
        "both shards used: {shares:?}"
    );
    assert_eq!(shares.iter().map(|s| s.0).sum::<u64>(), 300, "{shares:?}");
    assert_eq!(broker.drain(&broker.out).await.len(), 300);
    for relay in relays {
        drop(relay.terminate());
    }
    broker.delete_ring(&ring, &[".dead"]).await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_declared_otherwise_is_refused_naming_it() {
    ensure_plugin();
    let broker = Broker::connect().await;
    let ring = ring(&broker, "", 2);
    // Shard 1's queue exists without the dead-letter argument dedupd needs.
    broker
        .declare_queue(&ring.queue(1), amqprs::FieldTable::new())
        .await;
    let err = shard::declare(&config(&[]), &ring).await.unwrap_err();
    let line = err.to_string();
    assert!(line.contains(&ring.queue(1)), "{line}");
    assert!(line.contains("other settings"), "{line}");
    broker.delete_ring(&ring, &[".dead"]).await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_is_bound_in_the_order_a_broker_restart_rebuilds_it() {
    ensure_plugin();
    let broker = Broker::connect().await;
    // Twelve shards: `.10` and `.11` sort before `.2`, as the broker sorts them when it rebuilds
    // the ring on boot; declaring twice must not add buckets.
    let ring = ring(&broker, "", 12);
    shard::declare(&config(&[]), &ring).await.unwrap();
    shard::declare(&config(&[]), &ring).await.unwrap();
    let out = Command::new("rabbitmq-diagnostics")
        .args(["-q", "consistent_hash_exchange_ring_state", &ring.exchange])
        .output()
        .expect("run rabbitmq-diagnostics");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    // Lines like `Ring index: 0, queue: '<name>'`, listed in text order of the index.
    let mut on_ring: Vec<(usize, &str)> = text
        .lines()
        .filter_map(|l| {
            let (index, queue) = l.strip_prefix("Ring index: ")?.split_once(", queue: '")?;
            Some((index.parse().ok()?, queue.strip_suffix('\'')?))
        })
        .collect();
    on_ring.sort();
    let on_ring: Vec<&str> = on_ring.into_iter().map(|(_, q)| q).collect();
    let mut sorted: Vec<String> = ring.queues().collect();
    sorted.sort();
    assert_eq!(on_ring, sorted, "{text}");
    broker.delete_ring(&ring, &[".dead"]).await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_subcommand_declares_the_ring_and_refuses_body_hashes() {
    ensure_plugin();
    let broker = Broker::connect().await;
    let ring = ring(&broker, "", 2);
    let out = dedupd()
        .args(["topology", "--shards", "2", "--exchange", &ring.exchange])
        .args(["--queue-prefix", &ring.queue_prefix])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("hash-property: message_id"), "{text}");
    for i in 0..2 {
        assert!(text.contains(&ring.queue(i)), "{text}");
        // The queues exist now (a passive declare would panic otherwise).
        assert_eq!(broker.count(&ring.queue(i)).await, 0);
    }
    // body-sha256 cannot be sharded by the exchange: a configuration error, exit 2.
    let out = dedupd()
        .args(["topology", "--shards", "2", "--exchange", &ring.exchange])
        .env("DEDUPD_ID_SOURCE", "body-sha256")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("body-sha256"));
    broker.delete_ring(&ring, &[".dead"]).await;
    broker.cleanup().await;
}
