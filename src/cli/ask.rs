//! The admin subcommands' road to the store: `dedupd check <id>`, `dedupd forget <id>`,
//! `dedupd forget --all --yes`, `dedupd stats`.
//!
//! `check`, `forget` and `stats` ask the running service over its HTTP endpoint
//! (`DEDUPD_METRICS_ADDR`); when nothing answers there they open the data dir themselves, which
//! only works while no service holds it. Either way the answer comes from [`crate::admin`].

use std::net::SocketAddr;
use std::time::Duration;

use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};

use crate::admin::{self, Answer};
use crate::config::Config;
use crate::store::{system_now_ms, Error as StoreError, Store};

/// How long the CLI waits for the service's endpoint.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// An admin request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Is this id live?
    Check(String),
    /// Forget this id.
    Forget(String),
    /// Forget every id.
    ForgetAll,
    /// The store's figures.
    Stats,
    /// Record this id as seen for this long (`None`: the window), as `dedupd import-redis` does.
    Record(String, Option<Duration>),
}

/// Why an admin request could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The service's endpoint answered something that is not ours.
    #[error("unexpected answer from the dedupd endpoint at {addr}: {why}")]
    Http {
        /// `DEDUPD_METRICS_ADDR`.
        addr: SocketAddr,
        /// What was wrong with it.
        why: String,
    },
    /// Nothing answers on the endpoint and there is no data dir to read: a read-only command
    /// does not create one (the variable is likely wrong).
    #[error("no dedupd answers on {addr} and there is no data dir at {}", dir.display())]
    NoDataDir {
        /// What was tried over HTTP (`off` if disabled).
        addr: String,
        /// `DEDUPD_DATA_DIR`.
        dir: std::path::PathBuf,
    },
    /// Nothing answers on the endpoint and the data dir is held (or cannot be opened).
    #[error("no dedupd answers on {addr} and the data dir cannot be opened directly: {source}")]
    Store {
        /// What was tried over HTTP (`off` if disabled).
        addr: String,
        /// Why opening the data dir failed.
        source: StoreError,
    },
}

/// Answers `request` from the running service, or from the data dir when no service answers.
///
/// # Errors
///
/// See [`Error`].
pub fn answer(config: &Config, request: &Request) -> Result<Answer, Error> {
    if let Some(addr) = config.http.addr {
        match over_http(addr, config.http.admin_token.as_deref(), request) {
            Ok(answer) => return Ok(answer),
            // Nobody listening: fall through to the data dir.
            Err(HttpFailure::NoService) => {}
            Err(HttpFailure::Bad(why)) => return Err(Error::Http { addr, why }),
        }
    }
    let tried = config
        .http
        .addr
        .map_or_else(|| "DEDUPD_METRICS_ADDR=off".into(), |a| a.to_string());
    // Only recording an id may start a store; the others read (or forget) what is there.
    if !matches!(request, Request::Record(..)) && !config.store.data_dir.is_dir() {
        return Err(Error::NoDataDir {
            addr: tried,
            dir: config.store.data_dir.clone(),
        });
    }
    let store = Store::open(config.store_config()).map_err(|source| Error::Store {
        addr: tried,
        source,
    })?;
    let answer = match request {
        Request::Check(id) => admin::check(&store, id.as_bytes(), system_now_ms()),
        Request::Forget(id) => admin::forget(&store, id.as_bytes()),
        Request::ForgetAll => admin::forget_all(&store),
        Request::Stats => admin::stats(&store, None, system_now_ms()),
        Request::Record(id, ttl) => admin::record(&store, id.as_bytes(), *ttl, system_now_ms()),
    };
    // Persist the filter so the service's next start does not rebuild it; a failure here loses
    // nothing (the next open rebuilds).
    if let Err(e) = store.close() {
        tracing::warn!(cause = %e, "closing the store after the admin command failed");
    }
    Ok(answer)
}

/// The process' HTTP client: one pool of keep-alive connections, so `import-redis`' workers
/// reuse theirs instead of opening one per id. Statuses are answers here, not errors.
fn agent() -> &'static ureq::Agent {
    static AGENT: std::sync::OnceLock<ureq::Agent> = std::sync::OnceLock::new();
    AGENT.get_or_init(|| {
        ureq::Agent::config_builder()
            .timeout_global(Some(HTTP_TIMEOUT))
            .http_status_as_error(false)
            .build()
            .into()
    })
}

/// Why [`over_http`] got no answer.
pub(crate) enum HttpFailure {
    /// Nothing listens on the address.
    NoService,
    /// Something answered, but not as a dedupd endpoint does.
    Bad(String),
}

/// Sends `request` to the service's endpoint at `addr`, with the admin token if any.
pub(crate) fn over_http(
    addr: SocketAddr,
    token: Option<&str>,
    request: &Request,
) -> Result<Answer, HttpFailure> {
    let (method, path) = match request {
        Request::Check(id) => (
            "GET",
            format!("/ids/{}", utf8_percent_encode(id, NON_ALPHANUMERIC)),
        ),
        Request::Forget(id) => (
            "DELETE",
            format!("/ids/{}", utf8_percent_encode(id, NON_ALPHANUMERIC)),
        ),
        Request::ForgetAll => ("DELETE", "/ids?all=true".into()),
        Request::Stats => ("GET", "/stats".into()),
        Request::Record(id, ttl) => (
            "PUT",
            format!(
                "/ids/{}{}",
                utf8_percent_encode(id, NON_ALPHANUMERIC),
                ttl.map_or(String::new(), |t| format!(
                    "?ttl_ms={}",
                    t.as_millis().max(1)
                ))
            ),
        ),
    };
    let url = format!("http://{addr}{path}");
    let agent = agent();
    let mut call = match method {
        "GET" => agent.get(&url).force_send_body(),
        "DELETE" => agent.delete(&url).force_send_body(),
        _ => agent.put(&url),
    };
    if let Some(token) = token {
        call = call.header("Authorization", &format!("Bearer {token}"));
    }
    let mut response = call.send_empty().map_err(|e| match e {
        // Nobody listening: the caller falls back to the data dir.
        ureq::Error::ConnectionFailed => HttpFailure::NoService,
        ureq::Error::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            HttpFailure::NoService
        }
        e => HttpFailure::Bad(e.to_string()),
    })?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .read_to_string()
        .map_err(|e| HttpFailure::Bad(e.to_string()))?;
    let body = serde_json::from_str(&body)
        .map_err(|e| HttpFailure::Bad(format!("status {status}, body is not JSON: {e}")))?;
    Ok(Answer { status, body })
}
