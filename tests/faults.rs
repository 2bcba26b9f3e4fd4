//! Fault tests: the real `dedupd` binary against the real local broker, disturbed mid-stream.
//!
//! Each scenario queues 10 000 persistent messages (20 % of them repeat an earlier id), starts
//! dedupd, hurts it or the broker half-way, lets it finish, and then counts every id that reached
//! the destination: none may be missing, and at most `DEDUPD_PREFETCH` copies may be extra (the
//! window between the destination's confirm and the source ack that the README describes).
//!
//! These tests kill processes, close every broker connection and restart the broker, so they run
//! one at a time (a process-wide lock), and whatever stops the broker restores it when dropped,
//! even when the test fails. Run with `-- --nocapture` to see the figures.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::eventually;
use support::faults::*;

/// One scenario at a time in this binary: they disturb the broker for everyone. (A tokio mutex:
/// each test holds it across its awaits, and it is not poisoned by a failed test.)
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A scenario's broker objects, workload and directories.
struct Scenario {
    name: &'static str,
    broker: Broker,
    distinct: std::collections::BTreeSet<String>,
    data: tempfile::TempDir,
    logs: tempfile::TempDir,
    /// Publishes the rest of the workload while the test runs, if the scenario needs it.
    feeder: Option<Feeder>,
}

/// Messages queued before dedupd starts when the rest is fed during the test.
const BACKLOG: usize = 2000;
/// Rate at which the rest is fed, messages a second: well under what dedupd relays, so that it
/// keeps up and is mid-stream whenever the broker is disturbed.
const FEED_RATE: usize = 1500;

impl Scenario {
    /// Declares the topology and queues the workload before dedupd starts.
    async fn queued(name: &'static str) -> Scenario {
        let mut broker = Broker::new(name).await;
        let (ids, distinct) = workload(name, MESSAGES);
        broker.fill(&ids, MESSAGES as u32).await;
        Scenario {
            name,
            broker,
            distinct,
            data: tempfile::tempdir().unwrap(),
            logs: log_dir(),
            feeder: None,
        }
    }

    /// Queues the first [`BACKLOG`] messages, and feeds the rest at [`FEED_RATE`] from now on.
    async fn fed(name: &'static str) -> Scenario {
        let mut broker = Broker::new(name).await;
        let (ids, distinct) = workload(name, MESSAGES);
        broker.fill(&ids[..BACKLOG], BACKLOG as u32).await;
        let feeder = Feeder::start(&broker.source, ids[BACKLOG..].to_vec(), FEED_RATE);
        Scenario {
            name,
            broker,
            distinct,
            data: tempfile::tempdir().unwrap(),
            logs: log_dir(),
            feeder: Some(feeder),
        }
    }

    fn start(&self, data: &Path, env: &[(&str, &str)]) -> Relay {
        Relay::start(&self.broker, data, self.logs.path(), env)
    }

    /// Waits until `n` messages reached the destination.
    async fn wait_forwarded(&mut self, n: u32) {
        let out = self.broker.out.clone();
        self.broker
            .wait_for(&out, &format!("{n} forwarded"), |ready, _| ready >= n)
            .await;
    }

    /// Time until dedupd is back at work: consuming again, and forwarding (the destination grows
    /// past what it holds now, unless it already holds every id).
    async fn time_to_resume(&mut self) -> Duration {
        let start = Instant::now();
        let (source, out) = (self.broker.source.clone(), self.broker.out.clone());
        self.broker
            .wait_for(&source, "a consumer", |_, consumers| consumers >= 1)
            .await;
        let now = self.broker.ready(&out).await;
        let all = self.distinct.len() as u32;
        self.broker
            .wait_for(&out, "progress", |ready, _| ready > now || ready >= all)
            .await;
        start.elapsed()
    }

    /// Lets `relay` drain the source, stops it gracefully, and counts every id.
    async fn finish(mut self, mut relay: Relay, extra: &str) -> Verdict {
        let extra = match self.feeder.take() {
            Some(feeder) => format!(
                "{extra}; producer batches sent again: {}",
                feeder.finish().await
            ),
            None => extra.to_string(),
        };
        wait_drained(&mut self.broker, &mut relay, self.distinct.len()).await;
        relay.stop();
        let (source, dead, out) = (
            self.broker.source.clone(),
            self.broker.dead(),
            self.broker.out.clone(),
        );
        assert_eq!(self.broker.ready(&source).await, 0, "source left over");
        assert_eq!(self.broker.ready(&dead).await, 0, "nothing dead-lettered");
        let delivered = self.broker.take_all(&out).await;
        let verdict = Verdict::of(&self.distinct, &delivered);
        verdict.check(self.name, &extra);
        self.broker.cleanup().await;
        verdict
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_then_restart_on_the_same_data_dir() {
    let _serial = SERIAL.lock().await;
    let mut sc = Scenario::queued("kill9").await;
    let data = sc.data.path().to_path_buf();
    let mut relay = sc.start(&data, &[]);
    relay.wait_consuming(&mut sc.broker).await;
    sc.wait_forwarded(3000).await;

    // SIGKILL: no drain, no ack, no flush beyond what was durable.
    relay.signal("KILL");
    relay.wait_exit();
    let out = sc.broker.out.clone();
    let at_kill = sc.broker.ready(&out).await;
    let restarted = Instant::now();
    let relay = sc.start(&data, &[]);
    sc.time_to_resume().await;
    let recovery = restarted.elapsed();
    let extra = format!(
        "; killed after {at_kill} forwarded, forwarding again {:.0} ms after the restart",
        recovery.as_secs_f64() * 1000.0
    );
    sc.finish(relay, &extra).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_all_connections_mid_stream_reconnects_by_itself() {
    let _serial = SERIAL.lock().await;
    let mut sc = Scenario::fed("closeall").await;
    let data = sc.data.path().to_path_buf();
    let mut relay = sc.start(&data, &[]);
    relay.wait_consuming(&mut sc.broker).await;
    sc.wait_forwarded(3000).await;

    let (ok, text) = rabbitmqctl(
        &["close_all_connections", "dedupd fault test"],
        Duration::from_secs(30),
    );
    assert!(ok, "rabbitmqctl close_all_connections: {text}");
    // Our own connection went too.
    sc.broker.drop_link();
    let out = sc.broker.out.clone();
    let at_close = sc.broker.ready(&out).await;
    let recovery = sc.time_to_resume().await;
    assert!(
        relay.child.try_wait().unwrap().is_none(),
        "dedupd exited instead of reconnecting:\n{}",
        relay.log()
    );
    assert!(relay.log().contains("reconnecting"), "{}", relay.log());
    let extra = format!(
        "; connections closed after {at_close} forwarded, forwarding again after {:.0} ms",
        recovery.as_secs_f64() * 1000.0
    );
    sc.finish(relay, &extra).await;
}

/// Stops the broker's application; dropping it starts it again and waits until it serves, so a
/// failing test never leaves the broker down for the next one (or for the other engineers).
struct BrokerStopped {
    started: bool,
}

impl BrokerStopped {
    fn stop() -> BrokerStopped {
        let guard = BrokerStopped { started: false };
        let (ok, text) = rabbitmqctl(&["stop_app"], Duration::from_secs(60));
        assert!(ok, "rabbitmqctl stop_app: {text}");
        guard
    }

    /// Starts the broker again and waits until it accepts connections; returns how long it took.
    fn start(mut self) -> Duration {
        let took = Self::start_app();
        self.started = true;
        took
    }

    fn start_app() -> Duration {
        let t = Instant::now();
        let (ok, text) = rabbitmqctl(&["start_app"], Duration::from_secs(120));
        let (up, wait_text) = rabbitmqctl(&["await_startup"], Duration::from_secs(120));
        assert!(ok && up, "the broker did not come back: {text} {wait_text}");
        eventually(
            WAIT,
            || format!("the broker does not accept connections: {text} {wait_text}"),
            port_open,
        );
        t.elapsed()
    }
}

impl Drop for BrokerStopped {
    fn drop(&mut self) {
        if !self.started {
            Self::start_app();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_resumes() {
    let _serial = SERIAL.lock().await;
    let mut sc = Scenario::fed("restart").await;
    let data = sc.data.path().to_path_buf();
    let mut relay = sc.start(&data, &[]);
    relay.wait_consuming(&mut sc.broker).await;
    sc.wait_forwarded(3000).await;

    let down = Instant::now();
    let stopped = BrokerStopped::stop();
    sc.broker.drop_link();
    let stop_took = down.elapsed();
    let start_took = stopped.start();
    let out = sc.broker.out.clone();
    let at_restart = sc.broker.ready(&out).await;
    let recovery = sc.time_to_resume().await;
    assert!(
        relay.child.try_wait().unwrap().is_none(),
        "dedupd exited instead of reconnecting:\n{}",
        relay.log()
    );
    assert!(relay.log().contains("reconnecting"), "{}", relay.log());
    let extra = format!(
        "; stop_app took {:.1} s, start_app {:.1} s, {at_restart} forwarded by then, forwarding \
         again {:.0} ms after the broker was back",
        stop_took.as_secs_f64(),
        start_took.as_secs_f64(),
        recovery.as_secs_f64() * 1000.0
    );
    sc.finish(relay, &extra).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_zero_within_the_grace_and_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let mut sc = Scenario::queued("sigterm").await;
    let data = sc.data.path().to_path_buf();
    let grace = Duration::from_secs(5);
    let mut relay = sc.start(&data, &[("DEDUPD_SHUTDOWN_GRACE", "5s")]);
    relay.wait_consuming(&mut sc.broker).await;
    sc.wait_forwarded(3000).await;

    relay.signal("TERM");
    let (status, took) = relay.wait_exit();
    assert!(status.success(), "exit {status}:\n{}", relay.log());
    assert!(took <= grace, "took {took:?}, grace {grace:?}");
    let out = sc.broker.out.clone();
    let at_stop = sc.broker.ready(&out).await;
    let relay = sc.start(&data, &[]);
    let verdict = sc
        .finish(
            relay,
            &format!(
                "; SIGTERM after {at_stop} forwarded, exit 0 in {:.0} ms",
                took.as_secs_f64() * 1000.0
            ),
        )
        .await;
    // A graceful stop finishes what it started: nothing needs to pass twice.
    assert_eq!(verdict.repeats, 0, "a graceful stop repeated messages");
}

/// A small tmpfs mounted on a temporary directory, unmounted on drop: a disk that fills up.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("mount");
        assert!(
            out.status.success(),
            "this test needs to mount a small tmpfs (root, CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Gives the filesystem room: the operator's fix.
    fn grow(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.dir.path())
            .output()
            .expect("mount");
        assert!(out.status.success(), "remount: {out:?}");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_stops_acking_exits_non_zero_and_loses_nothing_once_fixed() {
    let _serial = SERIAL.lock().await;
    let mut sc = Scenario::queued("diskfull").await;
    let disk = SmallDisk::mount(DISK_SIZE);
    let data = disk.path().join("data");
    let mut relay = sc.start(&data, &[]);

    // The store fills the disk: dedupd must stop by itself, non-zero, with one clear error line.
    let (status, _) = relay.wait_exit();
    let log = relay.log();
    assert!(!status.success(), "exit {status}:\n{log}");
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("dedupd: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "one error line:\n{log}");
    assert!(
        errors[0].contains("store") && errors[0].contains(&data.display().to_string()),
        "the error names the store and its dir: {}",
        errors[0]
    );
    let (source, out) = (sc.broker.source.clone(), sc.broker.out.clone());
    let (forwarded, left) = (sc.broker.ready(&out).await, sc.broker.ready(&source).await);
    eprintln!(
        "diskfull: {status} after {forwarded} forwarded, {left} back in the source; {}",
        errors[0]
    );
    // Nothing acked without a durable record: whatever is not downstream is back in the source.
    assert!(left > 0, "the disk filled only after the whole stream");
    assert!(
        forwarded as usize + left as usize >= sc.distinct.len(),
        "{forwarded} forwarded + {left} in the source < {} ids",
        sc.distinct.len()
    );

    // The operator makes room; the same data dir carries on.
    disk.grow("256m");
    let relay = sc.start(&data, &[]);
    let extra = format!("; stopped at {forwarded} forwarded with {status}");
    sc.finish(relay, &extra).await;
    drop(disk);
}

/// Small enough that the store cannot record the whole workload. Segments take about 20 bytes
/// an id, so the 8 000 distinct ids fit in 1 MiB: measured on a tmpfs, 256 KiB fills after
/// 1 000 ids committed one by one and 4 900 in batches of 100 (sled's own files take the rest).
const DISK_SIZE: &str = "256k";
