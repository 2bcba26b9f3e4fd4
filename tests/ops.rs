//! Operating dedupd: what `/metrics` counts after a run, the admin subcommands against a running
//! service and against a bare data dir, `dedupd config`, the systemd notifications and JSON logs.
//! Real binary, real broker, random names, temp dirs.

mod support;

use std::os::unix::net::UnixDatagram;
use std::process::Output;
use std::time::Duration;

use amqprs::BasicProperties;
use support::*;

/// Runs `dedupd <args>` against `data` (and the service's port, if any).
fn admin(data: &std::path::Path, port: Option<u16>, args: &[&str]) -> Output {
    let mut cmd = dedupd();
    cmd.args(args).env("DEDUPD_DATA_DIR", data);
    match port {
        Some(p) => cmd.env("DEDUPD_METRICS_ADDR", format!("127.0.0.1:{p}")),
        // Nothing listens on a fresh free port: the command must fall back to the data dir.
        None => cmd.env("DEDUPD_METRICS_ADDR", format!("127.0.0.1:{}", free_port())),
    };
    cmd.output().expect("run dedupd admin command")
}

/// Every `dedupd_*` metric name in `text`.
fn metric_names(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .match_indices("dedupd_")
        .map(|(i, _)| {
            text[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect()
        })
        .filter(|name: &String| name.len() > "dedupd_".len())
        .collect();
    names.sort();
    names.dedup();
    names
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_was_published() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    let data = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&broker, data.path(), &[]);
    relay.wait_healthy();
    // 20 distinct ids, 10 repeats of the first ten, 2 without an id.
    for i in 0..30u32 {
        broker
            .publish(id_props(&format!("m-{}", i % 20)), b"x")
            .await;
    }
    for _ in 0..2 {
        let props = BasicProperties::default().with_persistence(true).finish();
        broker.publish(props, b"no id").await;
    }
    assert_eq!(relay.wait_settled(32), (20, 10, 2));
    // Acks may wait briefly to be folded into one multiple ack; the relay latency is recorded as
    // they leave. Wait (bounded) until all 30 acked deliveries are in the histogram.
    let m = eventually(
        WAIT,
        || format!("fewer than 30 acks in the histogram:\n{}", relay.log()),
        || {
            let m = relay.metrics();
            let acked = m.get("dedupd_relay_seconds_count").copied().unwrap_or(0.0);
            (acked >= 30.0).then_some(m)
        },
    );
    let get = |k: &str| {
        *m.get(k)
            .unwrap_or_else(|| panic!("{k} missing from /metrics"))
    };
    assert_eq!(get("dedupd_dead_lettered_total{reason=\"no_id\"}"), 2.0);
    // Every settled delivery has a relay latency; every forwarded id a commit latency.
    assert_eq!(get("dedupd_relay_seconds_count"), 30.0);
    assert_eq!(get("dedupd_commit_seconds_count"), 20.0);
    assert_eq!(get("dedupd_store_live_ids"), 20.0);
    assert_eq!(get("dedupd_connected"), 1.0);
    assert!(get("dedupd_bloom_false_positive_ratio") >= 0.0);
    assert!(get("dedupd_oldest_live_id_age_seconds") < 60.0);
    assert_eq!(get("dedupd_compaction_swept_ids_total"), 0.0);
    // A new store's filter starts empty and ready: nothing to rebuild yet.
    assert_eq!(get("dedupd_bloom_rebuilds_total"), 0.0);
    assert!(m
        .keys()
        .any(|k| k.starts_with("dedupd_build_info{version=\"")));
    assert_eq!(
        get("dedupd_reconnects_total"),
        0.0,
        "zero counters are exposed"
    );
    let (status, _) = relay.terminate();
    assert!(status.success());
    broker.cleanup().await;
}

/// The dashboard and the alerts only name series that a fresh process's /metrics already has,
/// before any traffic: a new install shows zeros, not "no data".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_process_exposes_every_series_contrib_names() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    let data = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&broker, data.path(), &[]);
    relay.wait_healthy();
    let m = relay.metrics();
    let exposed: Vec<&str> = m.keys().map(|k| k.split('{').next().unwrap()).collect();
    for file in [
        "contrib/grafana/dedupd.json",
        "contrib/prometheus/alerts.yml",
    ] {
        let path = format!("{}/{file}", env!("CARGO_MANIFEST_DIR"));
        let names = metric_names(&std::fs::read_to_string(path).unwrap());
        assert!(names.len() >= 8, "{file} names only {names:?}");
        for name in names {
            assert!(
                exposed.contains(&name.as_str()),
                "{file} names {name}, which a fresh /metrics lacks"
            );
        }
    }
    // The histograms are there at zero count before their first observation.
    for name in ["dedupd_commit_seconds_count", "dedupd_relay_seconds_count"] {
        assert_eq!(m.get(name), Some(&0.0), "{name}");
    }
    let (status, _) = relay.terminate();
    assert!(status.success());
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_talk_to_the_service_then_to_the_data_dir() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    let data = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&broker, data.path(), &[]);
    relay.wait_healthy();
    for id in ["order/1", "order 2", "order-3"] {
        broker.publish(id_props(id), b"x").await;
    }
    relay.wait_settled(3);
    let port = relay.port;

    // Through the running service (ids with a slash and a space survive the URL).
    let out = admin(data.path(), port, &["check", "order/1"]);
    assert!(out.status.success(), "{out:?}");
    let seen = json(&out);
    assert_eq!(seen["seen"], true);
    assert!(seen["expires_ms"].as_u64().unwrap() > seen["first_seen_ms"].as_u64().unwrap());
    let out = admin(data.path(), port, &["check", "never-sent"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json(&out)["seen"], false);
    let out = admin(data.path(), port, &["forget", "order 2"]);
    assert!(out.status.success());
    assert_eq!(json(&out)["forgotten"], true);
    assert_eq!(
        admin(data.path(), port, &["check", "order 2"])
            .status
            .code(),
        Some(1)
    );
    let stats = json(&admin(data.path(), port, &["stats"]));
    assert_eq!(stats["live_ids"], 2);
    assert_eq!(stats["relay"]["forwarded"], 3);
    assert_eq!(stats["bloom"]["generations"], 1);

    // A forgotten id passes again.
    broker.publish(id_props("order 2"), b"again").await;
    assert_eq!(relay.wait_settled(4).0, 4);
    let (status, _) = relay.terminate();
    assert!(status.success());

    // No service now: the commands open the data dir themselves.
    let out = admin(data.path(), None, &["check", "order-3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json(&out)["seen"], true);
    let stats = json(&admin(data.path(), None, &["stats"]));
    assert_eq!(stats["live_ids"], 3);
    assert_eq!(stats["bloom"]["loaded_from"], "snapshot");
    broker.cleanup().await;
}

#[test]
fn read_only_commands_never_create_a_data_dir() {
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    for args in [&["stats"][..], &["check", "x"], &["forget", "x"]] {
        // No service and no data dir: an error naming the dir, and still no dir.
        let out = admin(&data, None, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(&data.display().to_string()), "{stderr}");
        assert!(!data.exists(), "{args:?} created {}", data.display());
    }
}

#[test]
fn help_prints_one_usage() {
    let out = dedupd().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.to_lowercase().matches("usage:").count(), 1, "{text}");
    // Every command is listed, one per line, with what it does.
    for command in [
        "check",
        "forget",
        "id",
        "stats",
        "config",
        "import-redis",
        "topology",
    ] {
        let listed = text
            .lines()
            .any(|l| l.trim_start().starts_with(&format!("{command} ")));
        assert!(listed, "{command}: {text}");
    }
    assert!(text.contains(&dedupd::config::markdown_table()));
}

#[test]
fn config_prints_every_setting_with_the_password_masked() {
    let out = dedupd()
        .arg("config")
        .env(
            "DEDUPD_AMQP_URL",
            "amqp://app:s3cret@broker.example:5672/%2f",
        )
        .env("DEDUPD_TTL", "90s")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains("s3cret"), "password leaked:\n{text}");
    assert!(
        text.contains("DEDUPD_AMQP_URL=amqp://app:***@broker.example:5672/%2f"),
        "{text}"
    );
    assert!(text.contains("DEDUPD_TTL=90s"), "{text}");
    assert!(text.contains("DEDUPD_ADMIN_TOKEN=(unset)"), "{text}");
    // Every variable, each on one line.
    for var in dedupd::config::variables() {
        let line = format!("\n{}=", var.name);
        assert_eq!(
            format!("\n{text}").matches(&line).count(),
            1,
            "{} missing or twice:\n{text}",
            var.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tells_systemd_ready_then_stopping_and_logs_json() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    let data = tempfile::tempdir().unwrap();
    let socket_path = data.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut relay = Relay::start(
        &broker,
        data.path(),
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("DEDUPD_LOG_FORMAT", "json"),
        ],
    );
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("no notification from dedupd");
    let first = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(first.lines().any(|l| l == "READY=1"), "{first}");
    // READY comes when consuming, so the health check agrees.
    relay.wait_healthy();
    let pid = relay.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let mut stopping = false;
    while let Ok(n) = socket.recv(&mut buf) {
        if String::from_utf8_lossy(&buf[..n])
            .lines()
            .any(|l| l == "STOPPING=1")
        {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "no STOPPING=1");
    let status = relay.wait_exit();
    assert!(status.success());
    let log = relay.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines
        .iter()
        .any(|l| l["fields"]["message"] == "dedupd starting"
            && l["fields"]["version"] == env!("CARGO_PKG_VERSION")));
    assert!(lines
        .iter()
        .any(|l| l["fields"]["message"] == "store opened"));
    assert!(!log.contains("guest:guest"), "password in the log");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_need_the_token_when_one_is_set() {
    let broker = Broker::connect().await;
    broker.bind_out().await;
    let data = tempfile::tempdir().unwrap();
    let token = "t0ken-for-tests";
    let mut relay = Relay::start(&broker, data.path(), &[("DEDUPD_ADMIN_TOKEN", token)]);
    relay.wait_healthy();
    broker.publish(id_props("guarded"), b"x").await;
    relay.wait_settled(1);
    // Without the token: refused; metrics and health stay open.
    assert_eq!(relay.get("/ids/guarded").map(|r| r.0), Some(401));
    assert_eq!(relay.get("/metrics").map(|r| r.0), Some(200));
    let port = relay.port;
    let out = admin(data.path(), port, &["forget", "guarded"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "forget without the token must fail"
    );
    // With it (the CLI reads the same variable): allowed.
    let mut cmd = dedupd();
    cmd.args(["check", "guarded"])
        .env("DEDUPD_DATA_DIR", data.path())
        .env(
            "DEDUPD_METRICS_ADDR",
            format!("127.0.0.1:{}", port.unwrap()),
        )
        .env("DEDUPD_ADMIN_TOKEN", token);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json(&out)["seen"], true);
    let (status, log) = relay.terminate();
    assert!(status.success());
    assert!(!log.contains(token), "token in the log");
    broker.cleanup().await;
}
