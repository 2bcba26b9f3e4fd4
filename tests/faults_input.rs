//! Bad input in a stream of good messages, and a destination that disappears: the real `dedupd`
//! binary against the real local broker. Each scenario relays 10 000 persistent messages (20 %
//! duplicates) with the bad ones in the middle, checks every good id by count downstream, finds
//! each bad message in the dead-letter queue, and requires dedupd to be running (and to exit 0 on
//! SIGTERM) at the end. Also property tests of the configuration parser.
//!
//! These do not disturb the broker for others, so they run in parallel.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use amqprs::{BasicProperties, FieldTable, FieldValue};
use proptest::prelude::*;
use support::faults::*;

/// 16 MiB: a large message, well inside RabbitMQ's default 128 MiB limit.
const HUGE: usize = 16 << 20;

/// Ids of the workload's first half, the second half, and the distinct set.
fn halves(prefix: &str) -> (Vec<String>, Vec<String>, BTreeSet<String>) {
    let (ids, distinct) = workload(prefix, MESSAGES);
    let second = ids[MESSAGES / 2..].to_vec();
    let mut first = ids;
    first.truncate(MESSAGES / 2);
    (first, second, distinct)
}

fn messages(
    ids: &[String],
    props: impl Fn(&str) -> BasicProperties,
) -> Vec<(BasicProperties, Vec<u8>)> {
    ids.iter()
        .enumerate()
        .map(|(i, id)| (props(id), body(id, i)))
        .collect()
}

fn huge_body(seed: u8) -> Vec<u8> {
    (0..HUGE)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn header(name: &str, value: FieldValue) -> FieldTable {
    let mut t = FieldTable::new();
    t.insert(name.try_into().unwrap(), value);
    t
}

/// Bodies of the messages in `queue`, sorted, read raw (some are not decodable by amqprs).
fn dead_bodies(queue: &str) -> Vec<String> {
    let mut bodies: Vec<String> = raw_take_all(queue)
        .into_iter()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .collect();
    bodies.sort();
    bodies
}

/// Waits until the source is empty, `out` holds `at_least` and `dead` exactly `dead_n`, with
/// dedupd still running; then stops it (exit 0).
async fn settle(broker: &mut Broker, mut relay: Relay, at_least: usize, dead_n: u32) {
    wait_drained(broker, &mut relay, at_least).await;
    let dead = broker.dead();
    broker
        .wait_for(&dead, &format!("{dead_n} dead-lettered"), |n, _| {
            n == dead_n
        })
        .await;
    assert!(
        relay.child.try_wait().unwrap().is_none(),
        "dedupd stopped:\n{}",
        relay.log()
    );
    relay.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_message_ids_and_huge_bodies_in_a_stream() {
    let mut broker = Broker::new("badid").await;
    let (first, second, mut distinct) = halves("badid");
    let data = tempfile::tempdir().unwrap();
    let logs = log_dir();
    // A message_id is at most 255 bytes: the limit comes down so that one can be too long.
    let relay = Relay::start(
        &broker,
        data.path(),
        logs.path(),
        &[("DEDUPD_MAX_ID_BYTES", "64")],
    );

    broker.publish(&messages(&first, persistent)).await;
    let bad = [
        (
            BasicProperties::default().with_persistence(true).finish(),
            "bad: no id",
        ),
        (persistent(""), "bad: empty id"),
        (persistent(&"L".repeat(65)), "bad: id over the limit"),
    ];
    let bad: Vec<_> = bad
        .into_iter()
        .map(|(p, b)| (p, b.as_bytes().to_vec()))
        .collect();
    broker.publish(&bad).await;
    // A producer in another language can send bytes amqprs refuses to decode.
    raw_publish(
        &broker.source,
        &[
            (
                RawProp::MessageId(&[0xff, 0xfe, b'x']),
                b"bad: non-UTF-8 message_id",
            ),
            (
                RawProp::LongStrHeader("x-note", &[0xc3, 0x28]),
                b"bad: non-UTF-8 header",
            ),
        ],
    );
    // Two 16 MiB messages, and a copy of the first.
    let huge = [huge_body(1), huge_body(2)];
    let big = vec![
        (persistent("huge-0"), huge[0].clone()),
        (persistent("huge-1"), huge[1].clone()),
        (persistent("huge-0"), huge[0].clone()),
    ];
    broker.publish(&big).await;
    distinct.extend(["huge-0".to_string(), "huge-1".to_string()]);
    broker.publish(&messages(&second, persistent)).await;

    let dead_n = 5;
    let mut relay = relay;
    relay.wait_consuming(&mut broker).await;
    settle(&mut broker, relay, distinct.len(), dead_n).await;

    let out = broker.out.clone();
    let delivered = broker.take_all(&out).await;
    for (props, body) in &delivered {
        match props.message_id().map(String::as_str) {
            Some("huge-0") => assert!(body == &huge[0], "huge-0 changed on the way"),
            Some("huge-1") => assert!(body == &huge[1], "huge-1 changed on the way"),
            _ => {}
        }
    }
    Verdict::of(&distinct, &delivered).check("bad message ids", "");
    let dead = broker.dead();
    assert_eq!(
        dead_bodies(&dead),
        [
            "bad: empty id",
            "bad: id over the limit",
            "bad: no id",
            "bad: non-UTF-8 header",
            "bad: non-UTF-8 message_id",
        ]
    );
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_ids_of_every_type_in_a_stream() {
    let mut broker = Broker::new("hdrid").await;
    let (first, second, mut distinct) = halves("hdrid");
    let data = tempfile::tempdir().unwrap();
    let logs = log_dir();
    let relay = Relay::start(
        &broker,
        data.path(),
        logs.path(),
        &[("DEDUPD_ID_SOURCE", "header:x-id")],
    );
    // The id in the header; message_id only tells the test which message arrived.
    let with_header = |id: &str, value: FieldValue| {
        BasicProperties::default()
            .with_message_id(id)
            .with_headers(header("x-id", value))
            .with_persistence(true)
            .finish()
    };
    let string_id = |id: &str| with_header(id, FieldValue::from(id));
    broker.publish(&messages(&first, string_id)).await;

    let mut table = FieldTable::new();
    table.insert("k".try_into().unwrap(), FieldValue::from("v"));
    let typed = vec![
        // Usable: integers in decimal, byte arrays as they are (UTF-8 or not).
        (with_header("num-4242", FieldValue::l(4242)), "num"),
        (with_header("num-4242", FieldValue::l(4242)), "num again"),
        (with_header("int--7", FieldValue::I(-7)), "int"),
        (
            with_header(
                "bytes",
                FieldValue::x(vec![0xff, 0xfe, 0].try_into().unwrap()),
            ),
            "bytes",
        ),
        (
            with_header(
                "bytes",
                FieldValue::x(vec![0xff, 0xfe, 0].try_into().unwrap()),
            ),
            "bytes again",
        ),
        // No id: dead-lettered.
        (with_header("t", FieldValue::F(table)), "bad: table id"),
        (with_header("b", FieldValue::t(true)), "bad: boolean id"),
        (with_header("f", FieldValue::d(1.5)), "bad: float id"),
        (
            with_header("long", FieldValue::from("H".repeat(300))),
            "bad: id over the limit",
        ),
        (persistent("none"), "bad: no header"),
    ];
    let typed: Vec<_> = typed
        .into_iter()
        .map(|(p, b)| (p, b.as_bytes().to_vec()))
        .collect();
    broker.publish(&typed).await;
    raw_publish(
        &broker.source,
        &[(
            RawProp::LongStrHeader("x-id", &[0xe2, 0x82]),
            b"bad: non-UTF-8 header id",
        )],
    );
    distinct.extend(["num-4242", "int--7", "bytes"].map(String::from));
    broker.publish(&messages(&second, string_id)).await;

    let mut relay = relay;
    relay.wait_consuming(&mut broker).await;
    settle(&mut broker, relay, distinct.len(), 6).await;
    let out = broker.out.clone();
    let delivered = broker.take_all(&out).await;
    Verdict::of(&distinct, &delivered).check("header ids", "");
    let dead = broker.dead();
    assert_eq!(
        dead_bodies(&dead),
        [
            "bad: boolean id",
            "bad: float id",
            "bad: id over the limit",
            "bad: no header",
            "bad: non-UTF-8 header id",
            "bad: table id",
        ]
    );
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_exchange_deleted_while_running() {
    let mut broker = Broker::new("destgone").await;
    let (ids, distinct) = workload("destgone", MESSAGES);
    broker.fill(&ids[..2000], 2000).await;
    let feeder = Feeder::start(&broker.source, ids[2000..].to_vec(), 2500);
    let data = tempfile::tempdir().unwrap();
    let logs = log_dir();
    let mut relay = Relay::start(&broker, data.path(), logs.path(), &[]);
    relay.wait_consuming(&mut broker).await;
    let (out, dead, dest) = (broker.out.clone(), broker.dead(), broker.dest.clone());
    broker
        .wait_for(&out, "3000 forwarded", |n, _| n >= 3000)
        .await;

    // An operator deletes the destination; its binding to our queue goes with it.
    broker
        .ch()
        .await
        .exchange_delete(amqprs::channel::ExchangeDeleteArguments::new(&dest))
        .await
        .unwrap();
    // dedupd redeclares it; with nothing bound, what it forwards comes back unroutable and is
    // dead-lettered. Then the operator binds the queue again.
    broker
        .wait_for(&dead, "some dead-lettered", |n, _| n > 0)
        .await;
    broker.bind_out().await;
    let retries = feeder.finish().await;
    wait_drained(&mut broker, &mut relay, 0).await;
    let stranded = broker.ready(&dead).await;

    // The operator moves the dead letters back to the source: nothing was lost, their ids are
    // still new, and they go through now.
    let back = broker.take_all(&dead).await;
    broker.publish(&back).await;
    wait_drained(&mut broker, &mut relay, distinct.len()).await;
    assert!(
        relay.child.try_wait().unwrap().is_none(),
        "dedupd stopped:\n{}",
        relay.log()
    );
    relay.stop();
    assert_eq!(broker.ready(&dead).await, 0);
    let delivered = broker.take_all(&out).await;
    Verdict::of(&distinct, &delivered).check(
        "destination deleted",
        &format!("; {stranded} dead-lettered while unbound, replayed; producer batches sent again: {retries}"),
    );
    broker.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// The configuration parser, by property.

/// Every variable dedupd knows, with the README's table as the source.
fn known_vars() -> Vec<String> {
    dedupd::config::markdown_table()
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(String::from)
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 500,
        // Nothing to persist: a failing case is printed, and these run in a second.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Any value of any variable either parses or is refused naming the variable: no panic.
    #[test]
    fn any_value_parses_or_is_refused_naming_its_variable(
        index in 0usize..64,
        value in ".{0,40}",
    ) {
        let vars = known_vars();
        prop_assume!(!vars.is_empty());
        let var = &vars[index % vars.len()];
        // A file variable would read a file: only give it paths that cannot exist.
        let value = if var.ends_with("_FILE") { format!("/nonexistent/{value}") } else { value };
        if let Err(e) = dedupd::Config::from_vars([(var.as_str(), value.as_str())]) {
            let line = e.to_string();
            prop_assert!(line.contains(var.as_str()), "{line}");
            prop_assert!(!line.contains('\n'), "one line: {line}");
        }
    }

    /// A name dedupd does not know is refused, naming it.
    #[test]
    fn unknown_variables_are_refused(suffix in "[A-Z_]{1,12}") {
        let var = format!("DEDUPD_{suffix}");
        prop_assume!(!known_vars().contains(&var));
        let e = dedupd::Config::from_vars([(var.as_str(), "1")]).unwrap_err();
        prop_assert!(e.to_string().contains(&var));
    }

    /// Durations in each unit mean what they say; zero is no window.
    #[test]
    fn ttl_in_any_unit(n in 0u64..100_000, unit in prop::sample::select(vec![("s", 1u64), ("m", 60), ("h", 3600), ("d", 86_400)])) {
        let value = format!("{n}{}", unit.0);
        let got = dedupd::Config::from_vars([("DEDUPD_TTL", value.as_str())]);
        if n == 0 {
            prop_assert!(got.is_err());
        } else {
            prop_assert_eq!(got.unwrap().store.ttl, Duration::from_secs(n * unit.1));
        }
    }

    /// The prefetch is 1..=65535 and nothing else.
    #[test]
    fn prefetch_range(n in 0u64..200_000) {
        let value = n.to_string();
        let got = dedupd::Config::from_vars([("DEDUPD_PREFETCH", value.as_str())]);
        prop_assert_eq!(got.is_ok(), (1..=65_535).contains(&n));
    }

    /// Any header name dedupd accepts fits an AMQP short string (the relay relies on it).
    #[test]
    fn header_names_fit_a_short_string(name in ".{0,300}") {
        let value = format!("header:{name}");
        if let Ok(config) = dedupd::Config::from_vars([("DEDUPD_ID_SOURCE", value.as_str())]) {
            for part in config.relay.id_source.parts() {
                match part {
                    dedupd::config::IdPart::Header(h) => prop_assert!((1..=255).contains(&h.len())),
                    other => prop_assert!(false, "{other:?}"),
                }
            }
        }
    }

    /// Any broker URL either parses or is refused; a password never shows in the refusal.
    #[test]
    fn broker_urls_never_panic_nor_leak(user in "[a-z]{1,8}", password in "[a-zA-Z0-9]{12,20}", rest in ".{0,30}") {
        let url = format!("amqp://{user}:{password}@{rest}");
        if let Err(e) = dedupd::Config::from_vars([("DEDUPD_AMQP_URL", url.as_str())]) {
            prop_assert!(!e.to_string().contains(&password), "{e}");
        }
    }
}
