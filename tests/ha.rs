//! Hot standby (`DEDUPD_HA=on`) on the local broker: two dedupd on one source, `kill -9` of the
//! active one mid-stream, the standby takes over with nothing lost and repeats only from the
//! crash window; then a third one with an empty data dir catches up from the id stream and, once
//! active, drops every id seen before. Real binaries, random names, cleaned up.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

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
