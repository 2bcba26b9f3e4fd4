//! The operator's HTTP endpoint: `GET /healthz` and `GET /metrics` (Prometheus text format).
//!
//! A deliberately small HTTP/1.1 server on tokio: one request per connection, answered and
//! closed. Two read-only routes do not justify a web framework.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::shutdown::Shutdown;
use crate::store::Store;

/// Longest request head read; anything longer is answered 431 and closed.
const MAX_HEAD: usize = 8 * 1024;
/// A client gets this long to send its request and read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a message went to the dead-letter queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// No id, and the missing-id policy says dead-letter.
    NoId,
    /// The id was refused by the store (too long).
    BadId,
    /// The destination nacked the publish.
    Nacked,
    /// The destination returned it as unroutable.
    Returned,
    /// No confirm within the confirm timeout.
    Timeout,
}

impl DeadLetterReason {
    const ALL: [DeadLetterReason; 5] = [
        DeadLetterReason::NoId,
        DeadLetterReason::BadId,
        DeadLetterReason::Nacked,
        DeadLetterReason::Returned,
        DeadLetterReason::Timeout,
    ];

    /// The label value in `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            DeadLetterReason::NoId => "no_id",
            DeadLetterReason::BadId => "bad_id",
            DeadLetterReason::Nacked => "nacked",
            DeadLetterReason::Returned => "returned",
            DeadLetterReason::Timeout => "confirm_timeout",
        }
    }
}

/// The relay's counters and health, shared by the relay (writer) and the endpoint (reader).
#[derive(Debug, Default)]
pub struct Metrics {
    /// Connected to the broker and consuming the source queue.
    healthy: AtomicBool,
    /// Messages forwarded to the destination and acked at the source.
    forwarded: AtomicU64,
    /// Of those, forwarded without an id (missing-id policy `forward`).
    forwarded_without_id: AtomicU64,
    /// Duplicates acked at the source without forwarding.
    duplicate: AtomicU64,
    /// Messages rejected to the dead-letter queue, by reason (indexed like `DeadLetterReason::ALL`).
    dead_lettered: [AtomicU64; 5],
    /// Copies of duplicates published to the duplicates exchange.
    duplicate_copies: AtomicU64,
    /// Broker connections opened after the first one.
    reconnects: AtomicU64,
    /// Publishes waiting for their confirm right now.
    publishes_in_flight: AtomicU64,
}

impl Metrics {
    /// Whether `/healthz` answers 200.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub(crate) fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    pub(crate) fn forwarded(&self, n: u64, without_id: u64) {
        self.forwarded.fetch_add(n, Ordering::Relaxed);
        self.forwarded_without_id
            .fetch_add(without_id, Ordering::Relaxed);
    }

    pub(crate) fn duplicates(&self, n: u64) {
        self.duplicate.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn dead_lettered(&self, reason: DeadLetterReason) {
        let i = DeadLetterReason::ALL
            .iter()
            .position(|r| *r == reason)
            .expect("listed");
        self.dead_lettered[i].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn duplicate_copied(&self) {
        self.duplicate_copies.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn reconnected(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn set_publishes_in_flight(&self, n: usize) {
        self.publishes_in_flight.store(n as u64, Ordering::Relaxed);
    }

    /// Messages forwarded so far.
    pub fn forwarded_total(&self) -> u64 {
        self.forwarded.load(Ordering::Relaxed)
    }

    /// Duplicates removed so far.
    pub fn duplicate_total(&self) -> u64 {
        self.duplicate.load(Ordering::Relaxed)
    }

    /// Messages dead-lettered so far, all reasons.
    pub fn dead_lettered_total(&self) -> u64 {
        self.dead_lettered
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// The Prometheus text exposition of these counters and of `stats`.
    pub fn render(&self, stats: Option<&crate::store::Stats>) -> String {
        let mut out = String::new();
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP dedupd_messages_total Source messages settled, by outcome.\n\
             # TYPE dedupd_messages_total counter\n\
             dedupd_messages_total{{outcome=\"forwarded\"}} {}\n\
             dedupd_messages_total{{outcome=\"duplicate\"}} {}\n\
             dedupd_messages_total{{outcome=\"dead_lettered\"}} {}",
            load(&self.forwarded),
            load(&self.duplicate),
            self.dead_lettered_total()
        );
        let _ = writeln!(
            out,
            "# HELP dedupd_dead_lettered_total Messages rejected to <source>.dead, by reason.\n\
             # TYPE dedupd_dead_lettered_total counter"
        );
        for (i, reason) in DeadLetterReason::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "dedupd_dead_lettered_total{{reason=\"{}\"}} {}",
                reason.label(),
                load(&self.dead_lettered[i])
            );
        }
        let gauges: [(&str, &str, &str, u64); 5] = [
            (
                "dedupd_forwarded_without_id_total",
                "counter",
                "Messages forwarded undeduplicated because they had no id.",
                load(&self.forwarded_without_id),
            ),
            (
                "dedupd_duplicate_copies_total",
                "counter",
                "Copies of duplicates published to the duplicates exchange.",
                load(&self.duplicate_copies),
            ),
            (
                "dedupd_reconnects_total",
                "counter",
                "Broker connections opened after the first.",
                load(&self.reconnects),
            ),
            (
                "dedupd_publishes_in_flight",
                "gauge",
                "Publishes waiting for their confirm.",
                load(&self.publishes_in_flight),
            ),
            (
                "dedupd_up",
                "gauge",
                "1 when connected and consuming.",
                u64::from(self.is_healthy()),
            ),
        ];
        for (name, kind, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        if let Some(s) = stats {
            let store: [(&str, &str, String); 6] = [
                (
                    "dedupd_store_live_ids",
                    "Ids recorded in the store (expired ones not yet swept included).",
                    s.live_ids.to_string(),
                ),
                (
                    "dedupd_store_in_flight",
                    "Ids claimed and not yet committed or released.",
                    s.in_flight.to_string(),
                ),
                (
                    "dedupd_store_disk_bytes",
                    "Bytes the store occupies on disk.",
                    s.disk_bytes.to_string(),
                ),
                (
                    "dedupd_store_bloom_bytes",
                    "Bytes of Bloom filter in memory.",
                    s.bloom_bytes.to_string(),
                ),
                (
                    "dedupd_store_bloom_generations",
                    "Bloom generations a lookup queries.",
                    s.bloom_generations.to_string(),
                ),
                (
                    "dedupd_store_bloom_false_positive_rate",
                    "Measured Bloom false-positive rate since start.",
                    s.false_positive_rate.to_string(),
                ),
            ];
            for (name, help, value) in store {
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
                );
            }
        }
        out
    }
}

/// Serves `/healthz` and `/metrics` on `listener` until `shutdown` fires.
pub(crate) async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    store: Store,
    mut shutdown: Shutdown,
) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.fired() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: say so, back off, keep serving.
                    tracing::warn!(cause = %e, "metrics endpoint accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        let store = store.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(CLIENT_TIMEOUT, answer(stream, &metrics, store)).await;
        });
    }
}

/// Reads one request head from `stream` and answers it.
async fn answer(mut stream: TcpStream, metrics: &Metrics, store: Store) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_HEAD {
            return respond(&mut stream, "431 Request Header Fields Too Large", "").await;
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/healthz") => {
            if metrics.is_healthy() {
                respond(&mut stream, "200 OK", "ok\n").await
            } else {
                respond(&mut stream, "503 Service Unavailable", "not consuming\n").await
            }
        }
        ("GET", "/metrics") => {
            // `stats` asks sled for its size on disk: blocking, so off the async workers.
            let stats = tokio::task::spawn_blocking(move || store.stats())
                .await
                .ok();
            respond(&mut stream, "200 OK", &metrics.render(stats.as_ref())).await
        }
        ("GET", _) => respond(&mut stream, "404 Not Found", "try /healthz or /metrics\n").await,
        _ => respond(&mut stream, "405 Method Not Allowed", "").await,
    }
}

async fn respond(stream: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\n\
         Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_names_the_outcomes() {
        let m = Metrics::default();
        m.forwarded(3, 1);
        m.duplicates(2);
        m.dead_lettered(DeadLetterReason::Returned);
        let text = m.render(None);
        assert!(text.contains("dedupd_messages_total{outcome=\"forwarded\"} 3\n"));
        assert!(text.contains("dedupd_messages_total{outcome=\"duplicate\"} 2\n"));
        assert!(text.contains("dedupd_messages_total{outcome=\"dead_lettered\"} 1\n"));
        assert!(text.contains("dedupd_dead_lettered_total{reason=\"returned\"} 1\n"));
        assert!(text.contains("dedupd_forwarded_without_id_total 1\n"));
        assert!(text.contains("dedupd_up 0\n"));
    }
}
