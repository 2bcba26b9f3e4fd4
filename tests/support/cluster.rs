//! A RabbitMQ cluster of three nodes on loopback, beside the machine's own broker, started from
//! the installed `rabbitmq-server` (the recipe of CALIBRATION.md) and stopped on drop.
//!
//! Each node has its own name (`dedupd-<random>-<i>@localhost`), AMQP and distribution ports
//! (free ones), a config file that pins its listener to 127.0.0.1:<port> (the machine's
//! `/etc/rabbitmq/rabbitmq.conf` pins 5672), no plugins, and directories owned by the `rabbitmq`
//! user (`rabbitmq-server` run as root drops to it and must be able to write there). Nodes 2 and
//! 3 join node 1. Anything that fails panics with the command's output and the node's log, so CI
//! fails loudly rather than skipping.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use super::{eventually, free_port};

/// Longest a node may take to answer after `rabbitmq-server -detached`.
const BOOT: Duration = Duration::from_secs(90);

/// One node of the cluster.
pub struct Node {
    pub name: String,
    pub port: u16,
    dir: PathBuf,
}

impl Node {
    /// The broker URL of this node for dedupd.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.join("log")) {
            for e in entries.flatten() {
                let body = std::fs::read_to_string(e.path()).unwrap_or_default();
                let tail: Vec<&str> = body.lines().rev().take(40).collect();
                text.push_str(&format!("--- {}\n", e.path().display()));
                text.extend(tail.into_iter().rev().map(|l| format!("{l}\n")));
            }
        }
        text
    }
}

/// Three running, joined nodes; stopped and their directories removed on drop.
pub struct Cluster {
    pub nodes: Vec<Node>,
    base: PathBuf,
}

/// Runs a RabbitMQ command line tool with a time limit.
fn run(tool: &str, args: &[&str]) -> Output {
    // --foreground: without it `timeout` makes a process group of its own and, at the limit,
    // signals all of it.
    Command::new("timeout")
        .args(["--foreground", "120"])
        .arg(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool} (RabbitMQ's tools must be on PATH): {e}"))
}

fn ctl(node: &Node, args: &[&str]) -> Output {
    let mut all = vec!["-n", node.name.as_str()];
    all.extend_from_slice(args);
    run("rabbitmqctl", &all)
}

/// `rabbitmqctl -n <node> args...`, which must succeed.
fn ctl_ok(node: &Node, args: &[&str]) -> String {
    let out = ctl(node, args);
    assert!(
        out.status.success(),
        "cluster: rabbitmqctl -n {} {args:?} failed: {}{}\n{}",
        node.name,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        node.log()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn chown_rabbitmq(path: &Path) {
    let out = Command::new("chown")
        .args(["-R", "rabbitmq:rabbitmq"])
        .arg(path)
        .output()
        .expect("chown");
    assert!(
        out.status.success(),
        "cluster: cannot give {} to the rabbitmq user (the cluster tests run as root): {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Cluster {
    /// Starts three nodes and joins them. Takes about 40 s on a 2-core machine.
    pub fn start() -> Cluster {
        let tag = format!("{:08x}", rand::random::<u32>());
        let base = PathBuf::from(format!("/tmp/dedupd-cluster-{tag}"));
        std::fs::create_dir_all(&base).expect("cluster base dir");
        let mut nodes = Vec::new();
        for i in 1..=3 {
            let dir = base.join(format!("n{i}"));
            for sub in ["mnesia", "log"] {
                std::fs::create_dir_all(dir.join(sub)).unwrap();
            }
            let port = free_port();
            std::fs::write(dir.join("plugins"), "[].\n").unwrap();
            std::fs::write(
                dir.join("rabbitmq.conf"),
                format!("listeners.tcp.local = 127.0.0.1:{port}\n"),
            )
            .unwrap();
            nodes.push(Node {
                name: format!("dedupd-{tag}-{i}@localhost"),
                port,
                dir,
            });
        }
        chown_rabbitmq(&base);
        let cluster = Cluster { nodes, base };
        for node in &cluster.nodes {
            // No `timeout` around it: the node it leaves running would stay in the process group
            // `timeout` makes, and be signalled with it.
            let out = Command::new("rabbitmq-server")
                .arg("-detached")
                .env("RABBITMQ_NODENAME", &node.name)
                .env("RABBITMQ_NODE_PORT", node.port.to_string())
                .env("RABBITMQ_DIST_PORT", free_port().to_string())
                .env("RABBITMQ_MNESIA_BASE", node.dir.join("mnesia"))
                .env("RABBITMQ_LOG_BASE", node.dir.join("log"))
                .env("RABBITMQ_PID_FILE", node.dir.join("pid"))
                .env("RABBITMQ_ENABLED_PLUGINS_FILE", node.dir.join("plugins"))
                .env("RABBITMQ_CONFIG_FILE", node.dir.join("rabbitmq.conf"))
                .output()
                .expect("rabbitmq-server must be installed for the cluster tests");
            assert!(
                out.status.success(),
                "cluster: rabbitmq-server -detached for {} failed: {}",
                node.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // `-detached` returns before the node is reachable.
        for node in &cluster.nodes {
            eventually(
                BOOT,
                || format!("cluster: node {} answers ping\n{}", node.name, node.log()),
                || ctl(node, &["ping"]).status.success(),
            );
            ctl_ok(node, &["await_startup"]);
        }
        let first = cluster.nodes[0].name.clone();
        for node in &cluster.nodes[1..] {
            ctl_ok(node, &["stop_app"]);
            ctl_ok(node, &["join_cluster", &first]);
            ctl_ok(node, &["start_app"]);
        }
        ctl_ok(&cluster.nodes[0], &["await_online_nodes", "3"]);
        cluster
    }

    /// Stops node `i` (0-based): its queue and stream members go, leaders move.
    pub fn stop_node(&self, i: usize) {
        ctl_ok(&self.nodes[i], &["stop"]);
    }

    /// What the broker says about queues and consumers, through node `via`, for a failure message.
    pub fn dump(&self, via: usize) -> String {
        let node = &self.nodes[via];
        let queues = ctl(
            node,
            &[
                "-q",
                "list_queues",
                "name",
                "type",
                "leader",
                "members",
                "messages_ready",
                "messages_unacknowledged",
                "consumers",
            ],
        );
        let consumers = ctl(
            node,
            &[
                "-q",
                "list_consumers",
                "queue_name",
                "channel_pid",
                "consumer_tag",
                "prefetch_count",
                "active",
                "activity_status",
            ],
        );
        format!(
            "queues:\n{}{}\nconsumers:\n{}",
            String::from_utf8_lossy(&queues.stdout),
            String::from_utf8_lossy(&queues.stderr),
            String::from_utf8_lossy(&consumers.stdout)
        )
    }

    /// A guard that, dropped while the test panics, prints [`Cluster::dump`] through node `via`
    /// (one that stays up): what the broker thought when the test gave up.
    pub fn dump_on_panic(&self, via: usize) -> DumpOnPanic<'_> {
        DumpOnPanic { cluster: self, via }
    }

    /// The node leading queue or stream `name`, as `rabbitmqctl list_queues` reports it.
    pub fn leader(&self, via: usize, name: &str) -> Option<String> {
        let out = ctl_ok(
            &self.nodes[via],
            &["-q", "list_queues", "--no-table-headers", "name", "leader"],
        );
        out.lines().find_map(|l| {
            let mut parts = l.split_whitespace();
            (parts.next() == Some(name)).then(|| parts.next().unwrap_or("").to_string())
        })
    }
}

/// See [`Cluster::dump_on_panic`].
pub struct DumpOnPanic<'a> {
    cluster: &'a Cluster,
    via: usize,
}

impl Drop for DumpOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("cluster state:\n{}", self.cluster.dump(self.via));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            let _ = ctl(node, &["stop"]);
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}
