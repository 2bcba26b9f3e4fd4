//! The operator's HTTP endpoint on `DEDUPD_METRICS_ADDR`:
//!
//! - `GET /healthz`: 200 while connected and consuming, 503 otherwise; with `DEDUPD_HA=on` the
//!   body names the role (`ok (active)`, `ok (standby)`);
//! - `GET /metrics`: Prometheus text;
//! - `GET /stats`: the store's and relay's figures as JSON;
//! - `GET /ids/{id}` and `DELETE /ids/{id}`: check or forget one id (percent-encoded);
//! - `DELETE /ids?all=true`: forget every id;
//! - `GET /backup`: a consistent backup of the store, streamed (chunked) as it is taken;
//! - `PUT /ids/{id}?ttl_ms=N`: record one id as seen for N ms (the window without `ttl_ms`),
//!   as `dedupd import-redis` does; an id already live is left alone;
//! - `POST /clock?advance_ms=N`, in debug builds only (for tests): moves the service's clock
//!   forward.
//!
//! `/healthz`, `/metrics` and `/stats` are open (Prometheus scrapes from other hosts). The id
//! routes reveal and change the store: they need `Authorization: Bearer <DEDUPD_ADMIN_TOKEN>`, or,
//! with no token configured, an endpoint bound to a loopback address (see [`AdminAccess`]).
//!
//! Served by axum (HTTP/1.1 with keep-alive, so `dedupd import-redis` reuses its connections);
//! it stops accepting on shutdown and lets requests in progress finish.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State as Shared;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::Router;
use percent_encoding::percent_decode_str;
use tokio::net::TcpListener;

use crate::admin::{self, Answer};
use crate::config::Secret;
use crate::metrics::{Metrics, Role};
use crate::shutdown::Shutdown;
use crate::store::{Clock, Store};

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
    /// The service's clock: what "now" is for the answers about ids and their age.
    pub(crate) clock: Arc<dyn Clock>,
}

/// Serves the endpoint on `listener` until `shutdown` fires, then lets the requests in progress
/// finish.
pub(crate) async fn serve(listener: TcpListener, state: State, mut shutdown: Shutdown) {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/stats", get(stats))
        .route("/ids", delete(forget_all))
        .route("/backup", get(backup))
        .route("/ids/{*id}", get(id_route).delete(id_route).put(id_route));
    // Tests of the binary move its clock (see `cli::service_clock`); never in a release build.
    #[cfg(debug_assertions)]
    let app = app.route("/clock", axum::routing::post(advance_clock));
    let app = app.fallback(unknown).with_state(state);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.fired().await })
        .await;
    if let Err(e) = served {
        tracing::warn!(cause = %e, "HTTP endpoint stopped");
    }
}

async fn healthz(Shared(state): Shared<State>) -> Response {
    // With DEDUPD_HA=on a standby is healthy too: the body says which one it is.
    let role = match state.metrics.role() {
        Role::Alone => String::new(),
        role => format!(" ({})", role.name()),
    };
    if state.metrics.is_healthy() {
        (StatusCode::OK, format!("ok{role}\n")).into_response()
    } else {
        let body = format!("not consuming{role}\n");
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

async fn metrics(Shared(state): Shared<State>) -> Response {
    // `stats` asks sled for its size on disk: blocking, so off the async workers.
    let store = state.store.clone();
    let stats = tokio::task::spawn_blocking(move || store.stats())
        .await
        .ok();
    let text = state
        .metrics
        .render(stats.as_ref(), state.store.ttl(), state.clock.now_ms());
    ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], text).into_response()
}

async fn stats(Shared(state): Shared<State>) -> Response {
    let (store, metrics, uptime) = (state.store, state.metrics, state.started.elapsed());
    let now_ms = state.clock.now_ms();
    json(blocking(move || admin::stats(&store, Some((&metrics, uptime)), now_ms)).await)
}

/// `DELETE /ids?all=true`: forgetting every id takes saying so, as `dedupd forget --all --yes`
/// does.
async fn forget_all(Shared(state): Shared<State>, headers: HeaderMap, uri: Uri) -> Response {
    if let Some(refused) = state.admin.refusal(authorization(&headers)) {
        return json(refused);
    }
    let target = uri.to_string();
    if query_param(&target, "all") != Some("true") {
        let error = "DELETE /ids forgets every id: add ?all=true to mean it";
        return json(Answer {
            status: 400,
            body: serde_json::json!({ "error": error }),
        });
    }
    let store = state.store;
    json(blocking(move || admin::forget_all(&store)).await)
}

/// `GET /backup`: the store's backup as a chunked body, sent as the store writes it. A backup that
/// fails half-way ends the body with an error, so the connection closes without the last chunk
/// and the client knows it is incomplete; one that fails before its first byte is a 500.
async fn backup(Shared(state): Shared<State>, headers: HeaderMap) -> Response {
    if let Some(refused) = state.admin.refusal(authorization(&headers)) {
        return json(refused);
    }
    let started = Instant::now();
    let mut backup = crate::backup::Streaming::start(state.store);
    let Some(first) = backup.next().await else {
        let why = match backup.finish().await {
            Ok(_) => "the store wrote an empty backup".to_string(),
            Err(why) => why,
        };
        tracing::warn!(%why, "backup failed");
        return json(Answer {
            status: 500,
            body: serde_json::json!({ "error": format!("backup failed: {why}") }),
        });
    };
    tracing::info!("backup requested over HTTP: streaming");
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(1);
    tokio::spawn(async move {
        let mut bytes = first.len() as u64;
        if tx.send(Ok(first)).await.is_err() {
            return; // the client went away; dropping the backup stops its thread
        }
        while let Some(chunk) = backup.next().await {
            bytes += chunk.len() as u64;
            if tx.send(Ok(chunk)).await.is_err() {
                tracing::warn!(bytes, "backup client went away; backup abandoned");
                return;
            }
        }
        match backup.finish().await {
            Ok(stats) => tracing::info!(
                bytes,
                ms = started.elapsed().as_millis() as u64,
                ?stats,
                "backup streamed"
            ),
            Err(why) => {
                // An error ends the body without its last chunk: never a short backup.
                tracing::warn!(%why, bytes, "backup failed half-way; the stream is cut");
                let _ = tx.send(Err(std::io::Error::other(why))).await;
            }
        }
    });
    let body = axum::body::Body::from_stream(Chunks(rx));
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/octet-stream")],
        body,
    )
        .into_response()
}

/// The chunks of a backup as the stream a response body is made of.
struct Chunks(tokio::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>);

impl futures_core::Stream for Chunks {
    type Item = std::io::Result<Vec<u8>>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

/// `GET`, `DELETE` or `PUT /ids/{id}`: the id is the rest of the path, percent-decoded to bytes
/// (an id need not be UTF-8).
async fn id_route(
    Shared(state): Shared<State>,
    method: Method,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    if let Some(refused) = state.admin.refusal(authorization(&headers)) {
        return json(refused);
    }
    let raw = uri.path().strip_prefix("/ids/").unwrap_or_default();
    let id: Vec<u8> = percent_decode_str(raw).collect();
    let store = state.store;
    let now_ms = state.clock.now_ms();
    let answer = match method {
        Method::GET => blocking(move || admin::check(&store, &id, now_ms)).await,
        Method::DELETE => blocking(move || admin::forget(&store, &id)).await,
        _ => match ttl_param(&uri.to_string()) {
            Ok(ttl) => blocking(move || admin::record(&store, &id, ttl, now_ms)).await,
            Err(body) => Answer { status: 400, body },
        },
    };
    json(answer)
}

/// `POST /clock?advance_ms=N` (debug builds only): moves the service's clock N ms forward, when
/// it is a clock that may be moved; answers the new time.
#[cfg(debug_assertions)]
async fn advance_clock(Shared(state): Shared<State>, headers: HeaderMap, uri: Uri) -> Response {
    if let Some(refused) = state.admin.refusal(authorization(&headers)) {
        return json(refused);
    }
    let target = uri.to_string();
    let Some(ms) = query_param(&target, "advance_ms").and_then(|v| v.parse::<u64>().ok()) else {
        return json(Answer {
            status: 400,
            body: serde_json::json!({ "error": "expected ?advance_ms=<milliseconds>" }),
        });
    };
    json(match state.clock.advance(Duration::from_millis(ms)) {
        Some(now_ms) => Answer {
            status: 200,
            body: serde_json::json!({ "now_ms": now_ms }),
        },
        None => Answer {
            status: 409,
            body: serde_json::json!({ "error": "this clock cannot be moved" }),
        },
    })
}

async fn unknown(method: Method) -> Response {
    if method == Method::GET {
        let hint = "try /healthz, /metrics, /stats or /ids/{id}\n";
        (StatusCode::NOT_FOUND, hint).into_response()
    } else {
        StatusCode::METHOD_NOT_ALLOWED.into_response()
    }
}

/// The `Authorization` header's value, if any.
fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// An admin answer as a JSON response.
fn json(answer: Answer) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = format!("{}\n", answer.body);
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
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
