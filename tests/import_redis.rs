//! `dedupd import-redis`, black-box: keys under a random prefix in the real local Redis
//! (127.0.0.1:6379, deleted afterwards), imported by the real binary into a data dir and into a
//! running dedupd, then checked through the relay on the real local RabbitMQ and through the
//! Redis endpoint.

mod support;

use std::path::Path;
use std::process::{Child, Stdio};

use support::*;

/// The shared local Redis the keys are imported from.
const SOURCE: &str = "redis://127.0.0.1:6379/";

/// Keys seeded under a random prefix in the shared Redis; deleted on drop.
struct Seeded {
    prefix: String,
    con: redis::Connection,
    /// (key without the prefix, value, TTL in ms; `None`: no TTL).
    keys: Vec<(String, String, Option<u64>)>,
}

impl Seeded {
    /// Five keys with TTLs from 1 to 5 minutes and one without a TTL.
    fn new() -> Seeded {
        let con = redis::Client::open(SOURCE)
            .unwrap()
            .get_connection()
            .expect("Redis on 127.0.0.1:6379: the import tests need it");
        let prefix = format!("dedupd-import-{:016x}:", rand::random::<u64>());
        let mut seeded = Seeded {
            prefix,
            con,
            keys: Vec::new(),
        };
        for i in 0..5u64 {
            seeded.add(&format!("order-{i}"), Some(60_000 * (i + 1)));
        }
        seeded.add("no-ttl", None);
        seeded
    }

    fn add(&mut self, id: &str, ttl_ms: Option<u64>) {
        let key = format!("{}{id}", self.prefix);
        let value = format!("result of {id}");
        let mut set = redis::cmd("SET");
        set.arg(&key).arg(&value);
        if let Some(ms) = ttl_ms {
            set.arg("PX").arg(ms);
        }
        set.query::<()>(&mut self.con).unwrap();
        self.keys.push((id.to_string(), value, ttl_ms));
    }

    fn pattern(&self) -> String {
        format!("{}*", self.prefix)
    }
}

impl Drop for Seeded {
    fn drop(&mut self) {
        for (id, _, _) in &self.keys {
            let key = format!("{}{id}", self.prefix);
            let _ = redis::cmd("DEL").arg(key).query::<i64>(&mut self.con);
        }
    }
}

/// Runs `dedupd import-redis SOURCE <args>` on `data` with `env`; asserts it succeeded and
/// returns its summary line. With no `DEDUPD_METRICS_ADDR` in `env` no service is asked.
fn import(data: &Path, env: &[(&str, &str)], args: &[&str]) -> String {
    let mut cmd = dedupd();
    cmd.arg("import-redis")
        .arg(SOURCE)
        .args(args)
        .env("DEDUPD_DATA_DIR", data)
        .env("DEDUPD_METRICS_ADDR", "off")
        .env("DEDUPD_EXPECTED_IDS", "10000")
        .env("DEDUPD_CACHE_SIZE", "4M");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run dedupd import-redis");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "import-redis failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.lines().count(), 1, "one summary line: {stdout}");
    stdout
}

/// `expires_ms` of `id` on the running relay's admin route, minus now.
fn remaining_ms(relay: &Relay, id: &str) -> i64 {
    let (status, body) = relay
        .get(&format!("/ids/{id}"))
        .expect("admin route answers");
    assert_eq!(status, 200, "{id} is seen: {body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    body["expires_ms"].as_i64().unwrap() - now
}

/// `got` is `want` less the time the test took so far (and never more than `want`).
fn assert_ttl_close(what: &str, got_ms: i64, want_ms: u64) {
    let want = want_ms as i64;
    assert!(
        got_ms <= want && got_ms > want - 20_000,
        "{what}: remaining {got_ms} ms, imported with {want} ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_ids_are_duplicates_to_the_relay_and_a_rerun_changes_nothing() {
    let mut seeded = Seeded::new();
    let data = tempfile::tempdir().unwrap();
    let (pattern, prefix) = (seeded.pattern(), seeded.prefix.clone());
    let args = ["--match", &pattern, "--strip-prefix", &prefix];

    // Into the data dir, no service running: all six ids are new.
    let summary = import(data.path(), &[], &args);
    assert!(
        summary.contains("6 keys read, 6 ids added, 0 already present"),
        "{summary}"
    );

    // The relay on that data dir: every imported id is a duplicate, a new one passes.
    let broker = Broker::connect().await;
    broker.bind_out().await;
    let mut relay = Relay::start(&broker, data.path(), &[]);
    relay.wait_healthy();
    for (id, _, _) in &seeded.keys {
        broker.publish(id_props(id), b"again").await;
    }
    broker.publish(id_props("order-new"), b"new").await;
    assert_eq!(relay.wait_settled(7), (1, 6, 0));
    let out = broker.drain(&broker.out).await;
    assert_eq!(ids_of(&out), vec!["order-new".to_string()]);

    // The remaining TTLs came along; the key without one got the window (24 h by default).
    for (id, _, ttl) in &seeded.keys {
        let want = ttl.unwrap_or(24 * 3600 * 1000);
        assert_ttl_close(id, remaining_ms(&relay, id), want);
    }

    // A rerun through the running service: nothing new, nothing changed; a key added to Redis
    // since is added, and the relay then treats it as a duplicate too.
    seeded.add("order-late", Some(120_000));
    let port = relay.port.unwrap().to_string();
    let metrics = format!("127.0.0.1:{port}");
    let summary = import(data.path(), &[("DEDUPD_METRICS_ADDR", &metrics)], &args);
    assert!(
        summary.contains(&format!("the relay ids of the dedupd at {metrics}")),
        "{summary}"
    );
    assert!(
        summary.contains("7 keys read, 1 ids added, 6 already present"),
        "{summary}"
    );
    assert_ttl_close("order-late", remaining_ms(&relay, "order-late"), 120_000);
    assert_ttl_close("order-0", remaining_ms(&relay, "order-0"), 60_000);
    broker.publish(id_props("order-late"), b"again").await;
    broker.publish(id_props("order-0"), b"again").await;
    assert_eq!(relay.wait_settled(9), (1, 8, 0));
    assert!(broker.drain(&broker.out).await.is_empty());

    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    broker.cleanup().await;
}

/// A dedupd serving only its Redis endpoint, killed on drop.
struct Endpoint {
    child: Child,
    port: u16,
    http: u16,
}

impl Endpoint {
    fn start(data: &Path, ttl: &str) -> Endpoint {
        let (port, http) = (free_port(), free_port());
        let child = dedupd()
            .env("DEDUPD_RELAY", "off")
            .env("DEDUPD_REDIS_ADDR", format!("127.0.0.1:{port}"))
            .env("DEDUPD_METRICS_ADDR", format!("127.0.0.1:{http}"))
            .env("DEDUPD_DATA_DIR", data)
            .env("DEDUPD_TTL", ttl)
            .env("DEDUPD_EXPECTED_IDS", "10000")
            .env("DEDUPD_CACHE_SIZE", "4M")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dedupd");
        let mut endpoint = Endpoint { child, port, http };
        eventually(
            WAIT,
            || "endpoint never listened".into(),
            || {
                assert!(
                    endpoint.child.try_wait().unwrap().is_none(),
                    "dedupd exited"
                );
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            },
        );
        endpoint
    }

    fn connect(&self) -> redis::Connection {
        redis::Client::open(format!("redis://127.0.0.1:{}/", self.port))
            .unwrap()
            .get_connection()
            .unwrap()
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every seeded key is on `con` with its value and about its TTL (`window_ms` without one).
fn assert_copied(con: &mut redis::Connection, seeded: &Seeded, window_ms: u64) {
    for (id, value, ttl) in &seeded.keys {
        let key = format!("{}{id}", seeded.prefix);
        let got: Option<String> = redis::cmd("GET").arg(&key).query(con).unwrap();
        assert_eq!(got.as_deref(), Some(value.as_str()), "value of {key}");
        let pttl: i64 = redis::cmd("PTTL").arg(&key).query(con).unwrap();
        assert_ttl_close(&key, pttl, ttl.unwrap_or(window_ms));
    }
}

#[test]
fn into_redis_keeps_keys_values_and_ttls() {
    let seeded = Seeded::new();
    let data = tempfile::tempdir().unwrap();
    let pattern = seeded.pattern();
    let args = ["--match", pattern.as_str(), "--into", "redis"];
    let ttl = [("DEDUPD_TTL", "1h")];

    // Into the data dir, no service running.
    let summary = import(data.path(), &ttl, &args);
    assert!(summary.contains("6 keys read, 6 keys written"), "{summary}");

    // Served by the Redis endpoint: same keys, same values, the TTLs less the time since.
    let endpoint = Endpoint::start(data.path(), "1h");
    let mut con = endpoint.connect();
    assert_copied(&mut con, &seeded, 3_600_000);

    // A rerun through the running endpoint refreshes the same keys: still six of them.
    let redis_addr = format!("127.0.0.1:{}", endpoint.port);
    let metrics = format!("127.0.0.1:{}", endpoint.http);
    let env = [
        ("DEDUPD_TTL", "1h"),
        ("DEDUPD_REDIS_ADDR", redis_addr.as_str()),
        ("DEDUPD_METRICS_ADDR", metrics.as_str()),
    ];
    let summary = import(data.path(), &env, &args);
    assert!(
        summary.contains(&format!("the Redis endpoint at {redis_addr}")),
        "{summary}"
    );
    assert!(summary.contains("6 keys read, 6 keys written"), "{summary}");
    assert_copied(&mut con, &seeded, 3_600_000);
    let size: i64 = redis::cmd("DBSIZE").query(&mut con).unwrap();
    assert_eq!(size, 6);
}
