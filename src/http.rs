//! The operator's HTTP endpoint on `DEDUPD_METRICS_ADDR`:
//!
//! - `GET /healthz`: 200 while connected and consuming, 503 otherwise;
//! - `GET /metrics`: Prometheus text;
//! - `GET /stats`: the store's and relay's figures as JSON;
//! - `GET /ids/{id}` and `DELETE /ids/{id}`: check or forget one id (percent-encoded).
//!
//! A deliberately small HTTP/1.1 server on tokio: one request per connection, answered and
//! closed. A handful of routes do not justify a web framework.

use std::sync::Arc;
use std::time::{Duration, Instant};

use percent_encoding::percent_decode_str;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub use crate::metrics::{DeadLetterReason, Metrics};

use crate::admin::{self, Answer};
use crate::shutdown::Shutdown;
use crate::store::{system_now_ms, Store};

/// Longest request head read; anything longer is answered 431 and closed.
const MAX_HEAD: usize = 8 * 1024;
/// A client gets this long to send its request and read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Content type of the Prometheus text format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the endpoint serves from.
#[derive(Debug, Clone)]
pub(crate) struct State {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) store: Store,
    pub(crate) started: Instant,
}

/// Serves the endpoint on `listener` until `shutdown` fires.
pub(crate) async fn serve(listener: TcpListener, state: State, mut shutdown: Shutdown) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.fired() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: say so, back off, keep serving.
                    tracing::warn!(cause = %e, "HTTP endpoint accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(CLIENT_TIMEOUT, answer(stream, state)).await;
        });
    }
}

/// Reads one request head from `stream` and answers it.
async fn answer(mut stream: TcpStream, state: State) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_HEAD {
            return respond(&mut stream, 431, "text/plain", "").await;
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
            if state.metrics.is_healthy() {
                respond(&mut stream, 200, "text/plain", "ok\n").await
            } else {
                respond(&mut stream, 503, "text/plain", "not consuming\n").await
            }
        }
        ("GET", "/metrics") => {
            // `stats` asks sled for its size on disk: blocking, so off the async workers.
            let store = state.store.clone();
            let stats = tokio::task::spawn_blocking(move || store.stats())
                .await
                .ok();
            let text = state
                .metrics
                .render(stats.as_ref(), state.store.ttl(), system_now_ms());
            respond(&mut stream, 200, PROMETHEUS_TEXT, &text).await
        }
        ("GET", "/stats") => {
            let (store, metrics, uptime) = (state.store, state.metrics, state.started.elapsed());
            let answer = blocking(move || admin::stats(&store, Some((&metrics, uptime)))).await;
            respond_json(&mut stream, answer).await
        }
        (method @ ("GET" | "DELETE"), p) if p.starts_with("/ids/") => {
            let id: Vec<u8> = percent_decode_str(&p["/ids/".len()..]).collect();
            let store = state.store;
            let answer = if method == "GET" {
                blocking(move || admin::check(&store, &id)).await
            } else {
                blocking(move || admin::forget(&store, &id)).await
            };
            respond_json(&mut stream, answer).await
        }
        ("GET", _) => {
            let hint = "try /healthz, /metrics, /stats or /ids/{id}\n";
            respond(&mut stream, 404, "text/plain", hint).await
        }
        _ => respond(&mut stream, 405, "text/plain", "").await,
    }
}

/// Runs an admin call on the blocking pool; a panic there becomes a 500.
async fn blocking(f: impl FnOnce() -> Answer + Send + 'static) -> Answer {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Answer {
            status: 500,
            body: serde_json::json!({ "error": e.to_string() }),
        })
}

async fn respond_json(stream: &mut TcpStream, answer: Answer) -> std::io::Result<()> {
    let body = format!("{}\n", answer.body);
    respond(stream, answer.status, "application/json", &body).await
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} {}\r\n\
         Content-Type: {content_type}\r\n\
         Content-Length: {}\r\n\
         Connection: close\r\n\r\n",
        reason(status),
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
