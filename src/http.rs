//! The operator's HTTP endpoint on `DEDUPD_METRICS_ADDR`:
//!
//! - `GET /healthz`: 200 while connected and consuming, 503 otherwise; with `DEDUPD_HA=on` the
//!   body names the role (`ok (active)`, `ok (standby)`);
//! - `GET /metrics`: Prometheus text;
//! - `GET /stats`: the store's and relay's figures as JSON;
//! - `GET /ids/{id}` and `DELETE /ids/{id}`: check or forget one id (percent-encoded);
//! - `DELETE /ids?all=true`: forget every id;
//! - `PUT /ids/{id}?ttl_ms=N`: record one id as seen for N ms (the window without `ttl_ms`),
//!   as `dedupd import-redis` does; an id already live is left alone.
//!
//! `/healthz`, `/metrics` and `/stats` are open (Prometheus scrapes from other hosts). The id
//! routes reveal and change the store: they need `Authorization: Bearer <DEDUPD_ADMIN_TOKEN>`, or,
//! with no token configured, an endpoint bound to a loopback address (see [`AdminAccess`]).
//!
//! A deliberately small HTTP/1.1 server on tokio: one request per connection, answered and
//! closed. A handful of routes do not justify a web framework.

use std::sync::Arc;
use std::time::{Duration, Instant};

use percent_encoding::percent_decode_str;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::admin::{self, Answer};
use crate::config::Secret;
use crate::metrics::{Metrics, Role};
use crate::shutdown::Shutdown;
use crate::store::{system_now_ms, Store};

/// Longest request head read; anything longer is answered 431 and closed.
const MAX_HEAD: usize = 8 * 1024;
/// A client gets this long to send its request and read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Content type of the Prometheus text format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Who may use the admin routes.
#[derive(Clone)]
pub enum AdminAccess {
    /// Requests bearing this token.
    Token(Secret),
    /// Anyone who can connect: the endpoint listens on a loopback address only.
    Loopback,
    /// Nobody: no token, and the endpoint is reachable from other hosts.
    Off,
}

impl std::fmt::Debug for AdminAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        f.write_str(match self {
            AdminAccess::Token(_) => "Token(***)",
            AdminAccess::Loopback => "Loopback",
            AdminAccess::Off => "Off",
        })
    }
}

impl AdminAccess {
    /// The policy for an endpoint on `addr` with `token` configured; says once when admin is off.
    pub fn new(token: Option<&Secret>, addr: std::net::SocketAddr) -> AdminAccess {
        match token {
            Some(t) => AdminAccess::Token(t.clone()),
            None if addr.ip().is_loopback() => AdminAccess::Loopback,
            None => {
                tracing::warn!(
                    %addr,
                    "admin routes (/ids/{{id}}) are off: the endpoint is not on a loopback address \
                     and DEDUPD_ADMIN_TOKEN is not set"
                );
                AdminAccess::Off
            }
        }
    }

    /// The answer refusing an admin request with `authorization`, if refused.
    fn refusal(&self, authorization: Option<&str>) -> Option<Answer> {
        let status = self.refuse(authorization)?;
        let body = serde_json::json!({ "error": match status {
            401 => "a valid Authorization: Bearer token is required",
            _ => "admin routes are off: set DEDUPD_ADMIN_TOKEN",
        }});
        Some(Answer { status, body })
    }

    /// The status refusing a request with `authorization` (the header's value), if refused.
    fn refuse(&self, authorization: Option<&str>) -> Option<u16> {
        match self {
            AdminAccess::Loopback => None,
            AdminAccess::Off => Some(403),
            AdminAccess::Token(token) => {
                let given = authorization
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .unwrap_or("");
                (!token.matches(given.as_bytes())).then_some(401)
            }
        }
    }
}

/// What the endpoint serves from.
#[derive(Debug, Clone)]
pub(crate) struct State {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) store: Store,
    pub(crate) started: Instant,
    pub(crate) admin: AdminAccess,
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
    let head = String::from_utf8_lossy(&head);
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or_default();
    let authorization = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("authorization")
            .then(|| value.trim())
    });
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/healthz") => {
            // With DEDUPD_HA=on a standby is healthy too: the body says which one it is.
            let role = match state.metrics.role() {
                Role::Alone => String::new(),
                role => format!(" ({})", role.name()),
            };
            if state.metrics.is_healthy() {
                respond(&mut stream, 200, "text/plain", &format!("ok{role}\n")).await
            } else {
                let body = format!("not consuming{role}\n");
                respond(&mut stream, 503, "text/plain", &body).await
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
        ("DELETE", "/ids") => {
            if let Some(refused) = state.admin.refusal(authorization) {
                return respond_json(&mut stream, refused).await;
            }
            // Forgetting every id takes saying so, as `dedupd forget --all --yes` does.
            let answer = if query_param(target, "all") == Some("true") {
                let store = state.store;
                blocking(move || admin::forget_all(&store)).await
            } else {
                let error = "DELETE /ids forgets every id: add ?all=true to mean it";
                Answer {
                    status: 400,
                    body: serde_json::json!({ "error": error }),
                }
            };
            respond_json(&mut stream, answer).await
        }
        (method @ ("GET" | "DELETE" | "PUT"), p) if p.starts_with("/ids/") => {
            if let Some(refused) = state.admin.refusal(authorization) {
                return respond_json(&mut stream, refused).await;
            }
            let id: Vec<u8> = percent_decode_str(&p["/ids/".len()..]).collect();
            let store = state.store;
            let answer = match method {
                "GET" => blocking(move || admin::check(&store, &id)).await,
                "DELETE" => blocking(move || admin::forget(&store, &id)).await,
                _ => match ttl_param(target) {
                    Ok(ttl) => blocking(move || admin::record(&store, &id, ttl)).await,
                    Err(body) => Answer { status: 400, body },
                },
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

/// The value of query parameter `name` in `target`, if given.
fn query_param<'t>(target: &'t str, name: &str) -> Option<&'t str> {
    let query = target.split_once('?').map_or("", |(_, q)| q);
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

/// The `ttl_ms` query parameter of `target`: `None` when absent (the window), an error body when
/// it is not a positive number of milliseconds.
fn ttl_param(target: &str) -> Result<Option<Duration>, serde_json::Value> {
    let Some(value) = query_param(target, "ttl_ms") else {
        return Ok(None);
    };
    match value.parse::<u64>() {
        Ok(ms) if ms > 0 => Ok(Some(Duration::from_millis(ms))),
        _ => Err(serde_json::json!({
            "error": format!("ttl_ms={value:?}: expected a positive number of milliseconds")
        })),
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
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_access_follows_token_and_address() {
        let loopback = "127.0.0.1:9476".parse().unwrap();
        let public = "192.0.2.10:9476".parse().unwrap();
        // No token: open on loopback, off elsewhere.
        assert_eq!(AdminAccess::new(None, loopback).refuse(None), None);
        assert_eq!(AdminAccess::new(None, public).refuse(None), Some(403));
        // A token: required everywhere, compared whole.
        let token = Secret::from("s3cret".to_string());
        let access = AdminAccess::new(Some(&token), public);
        assert_eq!(access.refuse(None), Some(401));
        assert_eq!(access.refuse(Some("Bearer s3cre")), Some(401));
        assert_eq!(access.refuse(Some("Bearer s3cret!")), Some(401));
        assert_eq!(access.refuse(Some("s3cret")), Some(401));
        assert_eq!(access.refuse(Some("Bearer s3cret")), None);
        assert_eq!(format!("{access:?}"), "Token(***)");
    }

    #[test]
    fn ttl_param_is_optional_and_positive() {
        assert_eq!(ttl_param("/ids/a"), Ok(None));
        assert_eq!(
            ttl_param("/ids/a?ttl_ms=1500"),
            Ok(Some(Duration::from_millis(1500)))
        );
        assert_eq!(
            ttl_param("/ids/a?x=1&ttl_ms=7"),
            Ok(Some(Duration::from_millis(7)))
        );
        assert!(ttl_param("/ids/a?ttl_ms=0").is_err());
        assert!(ttl_param("/ids/a?ttl_ms=-5").is_err());
        assert_eq!(query_param("/ids?all=true", "all"), Some("true"));
        assert_eq!(query_param("/ids?x=1&all", "all"), Some(""));
        assert_eq!(query_param("/ids?tall=true", "all"), None);
        assert_eq!(query_param("/ids", "all"), None);
    }
}
