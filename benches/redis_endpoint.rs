//! The Redis endpoint beside Redis itself, in one run: `redis-benchmark` of the seed's
//! `SET msg:__rand_int__ 1 NX EX 86400` at `-c1 -P1` and `-c50 -P32` against
//!
//! - dedupd (`DEDUPD_RELAY=off`, durable on reply),
//! - a private in-memory `redis-server` (no persistence),
//! - a private `redis-server` with `appendonly yes`, `appendfsync always` (durable on reply too),
//!
//! and the same claim as a Lua script (`EVAL "return redis.call('set',KEYS[1],ARGV[1],'NX','EX',
//! 86400)" 1 msg:__rand_int__ 1`) on each, so what a script costs comes from the same run.
//!
//! each started here on a free loopback port with its own temporary directory (never the shared
//! Redis on 6379). Then memory per key: `BENCH_KEYS` (default 100 000) distinct keys loaded into a
//! fresh dedupd and a fresh in-memory Redis, dedupd's resident memory and disk against Redis'
//! `used_memory`. Last, that dedupd is killed with `kill -9` and started again on its data dir:
//! the time from the start until a key written before the kill answers `GET`.
//!
//! After the rate tables and before the memory: `-c1 -P1` again in alternating rounds, dedupd
//! then Redis `always`, with each round's ratio and their median (`BENCH_C1_ROUNDS`, default 5;
//! 0 skips them).
//!
//! `cargo bench --bench redis_endpoint` (needs `redis-server` and `redis-benchmark` on PATH).

#[path = "../tests/support/mod.rs"]
mod support;
use support::{eventually, free_port};

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The command benchmarked: the seed consumer's dedup check.
const SET_NX: &[&str] = &["SET", "msg:__rand_int__", "1", "NX", "EX", "86400"];
/// The same claim as a script (lock and claim helpers ship such scripts).
const EVAL_NX: &[&str] = &[
    "EVAL",
    "return redis.call('set',KEYS[1],ARGV[1],'NX','EX',86400)",
    "1",
    "msg:__rand_int__",
    "1",
];
/// Keys `__rand_int__` is drawn from: far more than all runs together send (a few million), so a
/// `SET NX` is nearly always a new key that must be written and made durable, as a dedup check
/// of a new id is. (With 1 M, the first `-c50 -P32` run filled most of the keyspace, and every
/// run after it measured mostly refused `NX`s, which write nothing.)
const KEYSPACE: u64 = 100_000_000;
/// Each measured run lasts about this long (its request count comes from a short probe run).
const RUN_FOR: Duration = Duration::from_secs(4);
/// Each run of the alternating `-c1 -P1` rounds lasts about this long.
const C1_ROUND: Duration = Duration::from_secs(3);

/// A server under test, killed when dropped.
struct Server {
    name: &'static str,
    port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_listening(port: u16, child: &mut Child) {
    eventually(
        Duration::from_secs(30),
        || format!("server on {port} never listened"),
        || {
            assert!(
                child.try_wait().unwrap().is_none(),
                "server on {port} exited"
            );
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        },
    )
}

fn dedupd() -> Server {
    let mut server = dedupd_on(tempfile::tempdir().unwrap(), free_port());
    wait_listening(server.port, &mut server.child);
    server
}

/// Starts dedupd on the data dir `dir` (removed when the server is dropped), serving Redis
/// clients on `port`, without waiting for it to listen.
fn dedupd_on(dir: tempfile::TempDir, port: u16) -> Server {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dedupd"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("DEDUPD_") {
            cmd.env_remove(k);
        }
    }
    let child = cmd
        .env("DEDUPD_RELAY", "off")
        .env("DEDUPD_REDIS_ADDR", format!("127.0.0.1:{port}"))
        .env("DEDUPD_METRICS_ADDR", "off")
        .env("DEDUPD_DATA_DIR", dir.path())
        .env("DEDUPD_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start dedupd");
    Server {
        name: "dedupd",
        port,
        child,
        dir,
    }
}

fn redis_server(name: &'static str, persistence: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--dir", dir.path().to_str().unwrap()])
        .args(persistence)
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server on PATH");
    wait_listening(port, &mut child);
    Server {
        name,
        port,
        child,
        dir,
    }
}

/// Requests per second of `redis-benchmark` with `clients` and `pipeline` for `n` requests.
fn rate(command: &[&str], port: u16, clients: u32, pipeline: u32, n: u64, keyspace: u64) -> f64 {
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-c", &clients.to_string(), "-P", &pipeline.to_string()])
        .args(["-n", &n.to_string(), "-r", &keyspace.to_string(), "--csv"])
        .args(command)
        .stderr(Stdio::null())
        .output()
        .expect("redis-benchmark on PATH");
    let text = String::from_utf8_lossy(&out.stdout);
    // `"test","rps",...` then one line per test: the second field is requests per second (split
    // on `","`: a script's text, the test's name, has commas of its own).
    text.lines()
        .rev()
        .filter_map(|l| l.split("\",\"").nth(1))
        .find_map(|f| f.trim_matches('"').parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no rate in redis-benchmark output: {text}"))
}

/// Requests for a run of `command` lasting about `run_for`, from a short probe run.
fn sized(command: &[&str], port: u16, clients: u32, pipeline: u32, run_for: Duration) -> u64 {
    let probe_n = u64::from(clients * pipeline).max(500) * 4;
    let probe = rate(command, port, clients, pipeline, probe_n, KEYSPACE);
    ((probe * run_for.as_secs_f64()) as u64).max(probe_n)
}

/// A run of `command` lasting about [`RUN_FOR`]; its rate.
fn measure(command: &[&str], port: u16, clients: u32, pipeline: u32) -> f64 {
    let n = sized(command, port, clients, pipeline, RUN_FOR);
    rate(command, port, clients, pipeline, n, KEYSPACE)
}

fn redis_used_memory(port: u16) -> u64 {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "INFO", "memory"])
        .output()
        .expect("redis-cli on PATH");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn dbsize(port: u16) -> u64 {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "DBSIZE"])
        .output()
        .expect("redis-cli on PATH");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Resident memory of a process, from `/proc/<pid>/status`.
fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// `-c1 -P1` is one client waiting for one fsync per request on either server: a second of
/// disk or scheduler noise moves one server's run by more than the two differ. So after the
/// table: `BENCH_C1_ROUNDS` (default 5) rounds of `-c1 -P1 SET`, dedupd then Redis `always`,
/// each run about [`C1_ROUND`] long, with each round's ratio and their median.
fn alternate_c1(ours: &Server, theirs: &Server) {
    let rounds: usize = std::env::var("BENCH_C1_ROUNDS")
        .ok()
        .map(|v| v.parse().expect("BENCH_C1_ROUNDS: a number of rounds"))
        .unwrap_or(5);
    if rounds == 0 {
        return;
    }
    let n = sized(SET_NX, ours.port, 1, 1, C1_ROUND);
    println!(
        "\n`-c1 -P1` alternating, {rounds} rounds of {n} requests each: {} / {}\n",
        ours.name, theirs.name
    );
    println!("| round | {} | {} | ratio |", ours.name, theirs.name);
    println!("|---|---|---|---|");
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        let a = rate(SET_NX, ours.port, 1, 1, n, KEYSPACE);
        let b = rate(SET_NX, theirs.port, 1, 1, n, KEYSPACE);
        let ratio = a / b;
        println!("| {round} | {a:.0} | {b:.0} | {ratio:.2}x |");
        ratios.push(ratio);
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "median dedupd / {} at -c1 -P1: {:.2}x (rounds {:.2}x to {:.2}x)",
        theirs.name,
        ratios[ratios.len() / 2],
        ratios[0],
        ratios[ratios.len() - 1]
    );
}

/// Loads about `keys` distinct keys (a keyspace far larger than the count, so few collide).
fn load(port: u16, keys: u64) -> u64 {
    rate(SET_NX, port, 50, 32, keys, KEYSPACE);
    dbsize(port)
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument other than ours skips this bench.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.iter().any(|a| !"redis_endpoint".contains(a.as_str())) {
        return;
    }
    let servers = [
        dedupd(),
        redis_server("redis in-memory", &["--appendonly", "no"]),
        redis_server(
            "redis appendfsync always",
            &["--appendonly", "yes", "--appendfsync", "always"],
        ),
    ];
    let settings = [(1, 1), (50, 32)];
    let mut table = Vec::new();
    let mut scripts = Vec::new();
    for server in &servers {
        let rates: Vec<f64> = settings
            .iter()
            .map(|&(c, p)| measure(SET_NX, server.port, c, p))
            .collect();
        table.push((server.name, rates));
        let rates: Vec<f64> = settings
            .iter()
            .map(|&(c, p)| measure(EVAL_NX, server.port, c, p))
            .collect();
        scripts.push((server.name, rates));
    }
    println!(
        "\nredis-benchmark {} -r {KEYSPACE} (requests/s)\n",
        SET_NX.join(" ")
    );
    println!("| server | `-c1 -P1` | `-c50 -P32` |");
    println!("|---|---|---|");
    for (name, rates) in &table {
        println!("| {name} | {:.0} | {:.0} |", rates[0], rates[1]);
    }
    let ours = &table[0].1;
    for (name, rates) in &table[1..] {
        println!(
            "dedupd / {name}: {:.2}x at -c1 -P1, {:.2}x at -c50 -P32",
            ours[0] / rates[0],
            ours[1] / rates[1]
        );
    }
    println!(
        "\nthe same as a script: redis-benchmark {} -r {KEYSPACE} (requests/s)\n",
        EVAL_NX.join(" ")
    );
    println!("| server | `-c1 -P1` | `-c50 -P32` | EVAL / SET at `-c1 -P1` | at `-c50 -P32` |");
    println!("|---|---|---|---|---|");
    for ((name, rates), (_, plain)) in scripts.iter().zip(&table) {
        println!(
            "| {name} | {:.0} | {:.0} | {:.2} | {:.2} |",
            rates[0],
            rates[1],
            rates[0] / plain[0],
            rates[1] / plain[1]
        );
    }
    alternate_c1(&servers[0], &servers[2]);
    drop(servers);

    let keys: u64 = std::env::var("BENCH_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let ours = dedupd();
    let base_rss = rss_bytes(ours.child.id());
    let loaded = load(ours.port, keys);
    let rss = rss_bytes(ours.child.id()).saturating_sub(base_rss);
    let disk = dir_bytes(ours.dir.path());
    let redis = redis_server("redis in-memory", &["--appendonly", "no"]);
    let base_used = redis_used_memory(redis.port);
    let redis_keys = load(redis.port, keys);
    let used = redis_used_memory(redis.port).saturating_sub(base_used);
    println!("\nmemory per key after loading ~{keys} keys with SET NX EX");
    println!("| server | keys | bytes/key |");
    println!("|---|---|---|");
    let per = |b: u64, n: u64| b as f64 / n.max(1) as f64;
    println!(
        "| dedupd, resident memory growth | {loaded} | {:.0} |",
        per(rss, loaded)
    );
    println!("| dedupd, on disk | {loaded} | {:.0} |", per(disk, loaded));
    println!(
        "| redis used_memory growth | {redis_keys} | {:.0} |",
        per(used, redis_keys)
    );
    drop(redis);

    let (secs, answer) = restart_after_kill(ours);
    println!(
        "\nrestart after kill -9 with {loaded} keys: GET of a key written before the kill \
         answered {answer:?} {secs:.2} s after the start"
    );
}

/// Writes a known key into `server` (the `+OK` means durable), kills it with SIGKILL, starts
/// dedupd again on its data dir, and returns how long after that start a `GET` of the key
/// first answered, and the answer.
fn restart_after_kill(mut server: Server) -> (f64, String) {
    const KNOWN: &str = "bench:known-before-kill";
    let out = Command::new("redis-cli")
        .args([
            "-p",
            &server.port.to_string(),
            "SET",
            KNOWN,
            "1",
            "EX",
            "86400",
        ])
        .output()
        .expect("redis-cli on PATH");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");
    server.child.kill().unwrap(); // SIGKILL: no clean close, no snapshot
    server.child.wait().unwrap();
    let dir = std::mem::replace(&mut server.dir, tempfile::tempdir().unwrap());
    drop(server);
    let started = std::time::Instant::now();
    let port = free_port();
    let mut restarted = dedupd_on(dir, port);
    let request = format!("*2\r\n$3\r\nGET\r\n${}\r\n{KNOWN}\r\n", KNOWN.len());
    let answer = eventually(
        Duration::from_secs(120),
        || "no answer after the restart".into(),
        || {
            assert!(
                restarted.child.try_wait().unwrap().is_none(),
                "dedupd exited after the restart"
            );
            ask(port, request.as_bytes())
        },
    );
    (started.elapsed().as_secs_f64(), answer)
}

/// One request on a fresh connection and its reply; `None` while nothing listens.
fn ask(port: u16, request: &[u8]) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.write_all(request).ok()?;
    let mut reply = [0u8; 64];
    let n = stream.read(&mut reply).ok()?;
    Some(String::from_utf8_lossy(&reply[..n]).trim().to_owned())
}
