//! `INFO`: the server, clients, memory, persistence, stats and keyspace sections, with real
//! figures from the store.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use super::Server;

/// Sections in `INFO` / `INFO default` / `INFO all` order.
const SECTIONS: &[&str] = &[
    "server",
    "clients",
    "memory",
    "persistence",
    "stats",
    "keyspace",
];

/// The text of `INFO [section ...]`: `# Section` headers and `field:value` lines, CRLF-ended.
pub(crate) fn render(server: &Server, args: &[Vec<u8>]) -> String {
    let asked: Vec<String> = args[1..]
        .iter()
        .map(|a| String::from_utf8_lossy(a).to_ascii_lowercase())
        .collect();
    let all = asked.is_empty()
        || asked
            .iter()
            .any(|a| matches!(a.as_str(), "all" | "default" | "everything"));
    let mut out = String::new();
    for section in SECTIONS {
        if !all && !asked.iter().any(|a| a == section) {
            continue;
        }
        if !out.is_empty() {
            out.push_str("\r\n");
        }
        section_text(server, section, &mut out);
    }
    out
}

fn section_text(server: &Server, section: &str, out: &mut String) {
    let mut line = |k: &str, v: &dyn std::fmt::Display| {
        let _ = if k.starts_with('#') {
            write!(out, "{k}\r\n")
        } else {
            write!(out, "{k}:{v}\r\n")
        };
    };
    let window_s = server.store.ttl().as_secs();
    match section {
        "server" => {
            line("# Server", &"");
            line("redis_version", &super::REDIS_VERSION);
            line("dedupd_version", &env!("CARGO_PKG_VERSION"));
            line("redis_mode", &"standalone");
            line("os", &std::env::consts::OS);
            line("arch_bits", &(usize::BITS));
            line("process_id", &std::process::id());
            line("tcp_port", &server.port);
            let up = server.started.elapsed().as_secs();
            line("uptime_in_seconds", &up);
            line("uptime_in_days", &(up / 86400));
            // dedupd is a window store: a key set without EX/PX/EXAT/PXAT still expires.
            line("dedup_window_seconds", &window_s);
            line(
                "keys_without_expiry",
                &format!("expire_after_{window_s}s_window"),
            );
        }
        "clients" => {
            line("# Clients", &"");
            line("connected_clients", &server.clients.load(Ordering::Relaxed));
            line("maxclients", &server.max_clients);
        }
        "memory" => {
            line("# Memory", &"");
            let rss = resident_bytes().unwrap_or(0);
            line("used_memory_rss", &rss);
            line("used_memory_rss_human", &human(rss));
        }
        "persistence" => {
            let stats = server.store.stats();
            line("# Persistence", &"");
            line("loading", &0);
            // Every write is on disk before its reply: nothing is ever pending.
            line("durability", &"fsync_before_reply");
            line("rdb_changes_since_last_save", &0);
            line("aof_enabled", &0);
            line("store_dir", &server.store.dir().display());
            line("store_disk_bytes", &stats.disk_bytes);
            line(
                "store_bloom_loaded_from",
                &format!("{:?}", stats.bloom_loaded_from).to_lowercase(),
            );
            line(
                "store_bloom_false_positive_rate",
                &format!("{:.4}", stats.false_positive_rate),
            );
            line("store_swept_ids", &stats.swept_ids);
        }
        "stats" => {
            line("# Stats", &"");
            let c = &server.counters;
            line(
                "total_connections_received",
                &c.connections.load(Ordering::Relaxed),
            );
            line(
                "total_commands_processed",
                &c.commands.load(Ordering::Relaxed),
            );
            line("rejected_connections", &c.rejected.load(Ordering::Relaxed));
        }
        "keyspace" => {
            line("# Keyspace", &"");
            let keys = server.kv.len();
            if keys > 0 {
                // Every key expires (the window when none was given), so expires = keys.
                line("db0", &format!("keys={keys},expires={keys},avg_ttl=0"));
            }
        }
        _ => {}
    }
}

/// The process' resident memory from `/proc/self/statm` (Linux), in bytes.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn human(bytes: u64) -> String {
    format!("{:.2}M", bytes as f64 / (1 << 20) as f64)
}
