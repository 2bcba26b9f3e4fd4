//! `dedupd import-redis <redis-url> [--match P] [--strip-prefix S] [--into relay|redis]`: copies
//! the live keys of a Redis, with their remaining TTL, into dedupd, so a team moving from
//! `SET msg:<id> 1 NX EX <ttl>` in every consumer to the relay (or to the Redis endpoint) has no
//! window in which old ids pass again.
//!
//! The source is read with `SCAN ... MATCH ... COUNT`, and each page's `PTTL` (and, for
//! `--into redis`, `GET`) are pipelined. Keys without a TTL get the window. Where the keys go:
//!
//! - `--into relay` (the default): each key, minus `--strip-prefix`, is recorded as a seen id
//!   with the key's remaining TTL. Through the running service's `PUT /ids/{id}?ttl_ms=N`
//!   ([`crate::admin::record`]) when it answers on `DEDUPD_METRICS_ADDR`, else straight into
//!   `DEDUPD_DATA_DIR` ([`crate::admin::record_ids`], one commit per page). Ids already live are
//!   left alone.
//! - `--into redis`: key and value as they are, into the Redis endpoint's namespace, with
//!   `SET key value PX ttl` to the service's `DEDUPD_REDIS_ADDR` when it answers there, else
//!   straight into the data dir. A key already there is refreshed (value and TTL).
//!
//! Either way a rerun is harmless. Both the source and the endpoint are spoken to through the
//! `redis` crate's blocking client: a command line has no runtime to share.

use std::io::{self, IsTerminal, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use redis::{IntoConnectionInfo, Value};

use crate::admin::{self, Recorded};
use crate::cli::ask::{self, HttpFailure, Request};
use crate::config::Config;
use crate::store::kv::{Condition, Expiry, Kv};
use crate::store::{system_now_ms, Error as StoreError, Store};

/// Keys asked for per `SCAN` call (a hint to Redis, which may return more or fewer).
const SCAN_COUNT: usize = 1000;
/// A pipeline to the target is sent once its requests reach this size, so that values of any
/// size never have both sides blocked writing to each other.
const PIPELINE_BYTES: usize = 64 * 1024;
/// Parallel `PUT /ids/..` requests to a running service: each waits for a flush, and concurrent
/// ones share the store's group flush.
const HTTP_WORKERS: usize = 8;
/// How long a Redis (source or target) may take to answer before the import gives up.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Progress line refresh on a terminal.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// Where the imported keys go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Namespace {
    /// The relay's ids: the id is the key minus the stripped prefix.
    Relay,
    /// The Redis endpoint's keys: key and value as they are.
    Redis,
}

/// The command line of `dedupd import-redis`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct Options {
    /// The source, `redis://[[user]:password@]host[:port][/db]`.
    #[arg(value_name = "REDIS_URL")]
    pub url: String,
    /// `SCAN ... MATCH` pattern of the keys to copy.
    #[arg(long = "match", value_name = "PATTERN", default_value = "*")]
    pub pattern: String,
    /// Prefix taken off each key to make the relay's id; keys without it are skipped.
    #[arg(long, value_name = "PREFIX")]
    pub strip_prefix: Option<String>,
    /// Where the keys go: the relay's seen ids, or the Redis endpoint's keys as they are.
    #[arg(long, value_enum, default_value = "relay")]
    pub into: Namespace,
}

impl Options {
    /// Refuses options that contradict each other.
    ///
    /// # Errors
    ///
    /// A usage message.
    pub fn check(&self) -> Result<(), String> {
        if self.into == Namespace::Redis && self.strip_prefix.is_some() {
            return Err("import-redis: --strip-prefix is for --into relay; \
                        --into redis keeps keys as they are"
                .into());
        }
        Ok(())
    }
}

/// Why an import stopped. Keys already copied stay copied; rerunning resumes harmlessly.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The source URL does not parse.
    #[error("invalid redis url {url:?}: {why}")]
    Url {
        /// The URL, its password masked.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// The source Redis failed or refused.
    #[error("source redis {url}: {why}")]
    Source {
        /// The URL, its password masked.
        url: String,
        /// What failed.
        why: String,
    },
    /// The running dedupd failed or refused.
    #[error("dedupd at {addr}: {why}")]
    Target {
        /// The address spoken to.
        addr: SocketAddr,
        /// What failed.
        why: String,
    },
    /// No service answers and the data dir cannot be opened either.
    #[error("no dedupd answers on {tried} and the data dir cannot be opened directly: {source}")]
    Open {
        /// What was tried over the network.
        tried: String,
        /// Why opening the data dir failed.
        source: StoreError,
    },
    /// Writing to the data dir failed.
    #[error("import into the data dir failed: {0}")]
    Store(#[from] StoreError),
    /// The relay's ids are hashed from several parts or a scope: no Redis key maps to one.
    #[error(
        "cannot import into the relay with DEDUPD_ID_SOURCE={id_source} and DEDUPD_ID_SCOPE={scope}: \
         the relay records a hash of the parts and the scope, which a Redis key does not give; \
         import with the single-part id source the keys hold, or --into redis"
    )]
    HashedIds {
        /// `DEDUPD_ID_SOURCE`.
        id_source: String,
        /// `DEDUPD_ID_SCOPE`.
        scope: String,
    },
}

/// What an import did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Keys `SCAN` returned.
    pub read: u64,
    /// Keys gone (expired or deleted) between `SCAN` and `PTTL`/`GET`, or not strings.
    pub gone: u64,
    /// Keys without `--strip-prefix`, skipped.
    pub unprefixed: u64,
    /// Into the relay: what recording did. Into redis: `added` counts keys written (new or
    /// refreshed) and `refused` the ones the endpoint refused (too long).
    pub recorded: Recorded,
}

impl Summary {
    /// Whether every key read is now in dedupd (or was gone from the source anyway).
    pub fn complete(&self) -> bool {
        self.recorded.refused == 0
    }

    fn line(&self, into: Namespace) -> String {
        let r = &self.recorded;
        let mut parts = vec![format!("{} keys read", self.read)];
        match into {
            Namespace::Relay => {
                parts.push(format!("{} ids added", r.added));
                parts.push(format!("{} already present", r.present));
                if r.in_flight > 0 {
                    parts.push(format!("{} being recorded by the relay", r.in_flight));
                }
            }
            Namespace::Redis => parts.push(format!("{} keys written", r.added)),
        }
        if self.gone > 0 {
            parts.push(format!("{} gone or not strings", self.gone));
        }
        if self.unprefixed > 0 {
            parts.push(format!("{} without the prefix", self.unprefixed));
        }
        if r.refused > 0 {
            parts.push(format!("{} refused (empty or too long)", r.refused));
        }
        parts.join(", ")
    }
}

/// Runs the import: progress on stderr when it is a terminal, then one summary line on stdout.
///
/// # Errors
///
/// See [`Error`].
pub fn run(config: &Config, options: &Options) -> Result<Summary, Error> {
    refuse_hashed_ids(config, options.into)?;
    let mut source = Source::connect(&options.url)?;
    let mut target = Target::open(config, options.into)?;
    let started = Instant::now();
    let mut progress = Progress::new(options.into);
    let mut summary = Summary::default();
    let mut cursor = 0;
    let shown = source.shown.clone();
    let source_err = |why: String| Error::Source {
        url: shown.clone(),
        why,
    };
    loop {
        let (next, keys) = source
            .scan(cursor, &options.pattern)
            .map_err(|e| source_err(e.to_string()))?;
        summary.read += keys.len() as u64;
        let items = source
            .fetch(keys, options.into == Namespace::Redis, &mut summary)
            .map_err(source_err)?;
        let items = match &options.strip_prefix {
            Some(prefix) => strip(items, prefix.as_bytes(), &mut summary),
            None => items,
        };
        summary.recorded += target.put(items)?;
        progress.show(&summary, started);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    target.close();
    progress.clear();
    println!(
        "import-redis: {} into {}: {} ({:.1} s)",
        shown,
        target.describe(),
        summary.line(options.into),
        started.elapsed().as_secs_f64()
    );
    Ok(summary)
}

/// One live key of the source.
struct Item {
    /// The key (the id, once its prefix is stripped).
    key: Vec<u8>,
    /// Its value (`--into redis` only).
    value: Vec<u8>,
    /// Its remaining TTL; `None`: it has none, so it gets the window.
    ttl: Option<Duration>,
}

/// Keeps the items whose key starts with `prefix`, without it.
fn strip(items: Vec<Item>, prefix: &[u8], summary: &mut Summary) -> Vec<Item> {
    let before = items.len();
    let kept: Vec<Item> = items
        .into_iter()
        .filter_map(|mut item| {
            item.key.starts_with(prefix).then(|| {
                item.key.drain(..prefix.len());
                item
            })
        })
        .collect();
    summary.unprefixed += (before - kept.len()) as u64;
    kept
}

// ---------------------------------------------------------------------------------------------
// The source, read through the `redis` crate.

/// The form of URL asked for, in error messages.
const URL_FORM: &str = "redis://[[user]:password@]host[:port][/db]";

/// The source Redis: connected, authenticated, its database selected.
struct Source {
    /// The URL for messages: the password masked.
    shown: String,
    /// The connection, with [`IO_TIMEOUT`] on reads and writes.
    con: redis::Connection,
}

impl Source {
    /// Parses `url` and connects to its server.
    fn connect(url: &str) -> Result<Source, Error> {
        let shown = masked(url);
        let client = redis::Client::open(url).map_err(|e| Error::Url {
            url: shown.clone(),
            why: format!("{e}; expected {URL_FORM}"),
        })?;
        let source_err = |e: redis::RedisError| Error::Source {
            url: shown.clone(),
            why: e.to_string(),
        };
        let con = client
            .get_connection_with_timeout(IO_TIMEOUT)
            .and_then(with_timeouts)
            .map_err(source_err)?;
        Ok(Source { shown, con })
    }

    /// One `SCAN` step: the next cursor (0 when done) and the keys of this page.
    fn scan(&mut self, cursor: u64, pattern: &str) -> redis::RedisResult<(u64, Vec<Vec<u8>>)> {
        redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .query(&mut self.con)
    }

    /// The remaining TTL (and the value, with `values`) of each key, pipelined; keys gone in
    /// the meantime, or not strings, are counted in `summary.gone` and left out.
    fn fetch(
        &mut self,
        keys: Vec<Vec<u8>>,
        values: bool,
        summary: &mut Summary,
    ) -> Result<Vec<Item>, String> {
        let mut pipe = redis::pipe();
        // A GET answering WRONGTYPE is a key to skip, not a failed import.
        pipe.ignore_errors();
        for key in &keys {
            pipe.cmd("PTTL").arg(key);
            if values {
                pipe.cmd("GET").arg(key);
            }
        }
        let replies: Vec<Value> = pipe.query(&mut self.con).map_err(|e| e.to_string())?;
        let mut replies = replies.into_iter();
        let mut items = Vec::with_capacity(keys.len());
        for key in keys {
            let ttl = match replies.next() {
                Some(Value::Int(-1)) => None,
                Some(Value::Int(ms)) if ms > 0 => Some(Duration::from_millis(ms as u64)),
                Some(Value::Int(_)) => {
                    summary.gone += 1; // -2: expired or deleted since SCAN
                    if values {
                        replies.next();
                    }
                    continue;
                }
                other => return Err(format!("PTTL answered {other:?}")),
            };
            let value = match values.then(|| replies.next()) {
                None => Vec::new(),
                Some(Some(Value::BulkString(v))) => v,
                // Gone since, or WRONGTYPE: only strings have a value to copy.
                Some(Some(Value::Nil | Value::ServerError(_))) => {
                    summary.gone += 1;
                    continue;
                }
                Some(other) => return Err(format!("GET answered {other:?}")),
            };
            items.push(Item { key, value, ttl });
        }
        Ok(items)
    }
}

/// Sets [`IO_TIMEOUT`] on both directions of `con`, so a Redis that stops answering stops the
/// import instead of hanging it.
fn with_timeouts(con: redis::Connection) -> redis::RedisResult<redis::Connection> {
    con.set_read_timeout(Some(IO_TIMEOUT))?;
    con.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(con)
}

/// `url` with its password replaced by `***`, for messages; works on URLs that do not parse too,
/// so not even the error about a bad URL echoes a password.
fn masked(url: &str) -> String {
    match url
        .split_once("://")
        .and_then(|(scheme, rest)| Some((scheme, rest.rsplit_once('@')?)))
    {
        Some((scheme, (userinfo, rest))) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{rest}")
        }
        None => url.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// The target: the running service, or the data dir.

/// Where the items go.
enum Target {
    /// The running service's `PUT /ids/{id}`.
    RelayHttp {
        /// `DEDUPD_METRICS_ADDR`.
        addr: SocketAddr,
        /// `DEDUPD_ADMIN_TOKEN`, sent as a bearer token.
        token: Option<String>,
    },
    /// The running service's Redis endpoint.
    RedisEndpoint {
        /// `DEDUPD_REDIS_ADDR`.
        addr: SocketAddr,
        /// Connected (and authenticated with `DEDUPD_REDIS_PASSWORD`, if set).
        con: redis::Connection,
    },
    /// The data dir, opened here: the relay's ids or the Redis endpoint's keys.
    Dir {
        /// The store of `DEDUPD_DATA_DIR`.
        store: Store,
        /// Which of its namespaces.
        into: Namespace,
    },
}

impl Target {
    /// The running service if it answers, else the data dir, as the admin commands do.
    fn open(config: &Config, into: Namespace) -> Result<Target, Error> {
        let answers =
            |addr: &SocketAddr| TcpStream::connect_timeout(addr, Duration::from_secs(2)).is_ok();
        let metrics = config.http.addr.filter(answers);
        match into {
            Namespace::Relay => {
                if let Some(addr) = metrics {
                    let token = config.http.admin_token.as_deref().map(str::to_string);
                    return Ok(Target::RelayHttp { addr, token });
                }
            }
            Namespace::Redis => {
                if let Some(addr) = config.redis.addr.filter(answers) {
                    let con =
                        connect_endpoint(addr, config.redis.password.as_deref()).map_err(|e| {
                            Error::Target {
                                addr,
                                why: e.to_string(),
                            }
                        })?;
                    return Ok(Target::RedisEndpoint { addr, con });
                }
                if let Some(addr) = metrics {
                    return Err(Error::Target {
                        addr,
                        why: "the service runs, but its Redis endpoint does not answer: set \
                              DEDUPD_REDIS_ADDR to its address, or stop it to import into the \
                              data dir"
                            .into(),
                    });
                }
            }
        }
        let tried = match (into, config.http.addr, config.redis.addr) {
            (Namespace::Redis, _, Some(a)) => a.to_string(),
            (_, Some(a), _) => a.to_string(),
            _ => "DEDUPD_METRICS_ADDR=off".into(),
        };
        let store =
            Store::open(config.store_config()).map_err(|source| Error::Open { tried, source })?;
        Ok(Target::Dir { store, into })
    }

    fn describe(&self) -> String {
        match self {
            Target::RelayHttp { addr, .. } => format!("the relay ids of the dedupd at {addr}"),
            Target::RedisEndpoint { addr, .. } => format!("the Redis endpoint at {addr}"),
            Target::Dir { store, into } => format!(
                "the {} of {}",
                if *into == Namespace::Relay {
                    "relay ids"
                } else {
                    "Redis keys"
                },
                store.dir().display()
            ),
        }
    }

    /// Copies `items`; durable when it returns.
    fn put(&mut self, items: Vec<Item>) -> Result<Recorded, Error> {
        match self {
            Target::Dir {
                store,
                into: Namespace::Relay,
            } => {
                let ids = items.into_iter().map(|i| (i.key, i.ttl));
                Ok(admin::record_ids(store, ids, system_now_ms())?)
            }
            Target::Dir {
                store,
                into: Namespace::Redis,
            } => Ok(put_kv(&store.kv(), items)?),
            Target::RelayHttp { addr, token } => put_http(*addr, token.as_deref(), items),
            Target::RedisEndpoint { addr, con } => {
                put_resp(con, items).map_err(|why| Error::Target { addr: *addr, why })
            }
        }
    }

    /// Closes the data dir, if opened, persisting the Bloom filter for the service's next start.
    fn close(&mut self) {
        if let Target::Dir { store, .. } = self {
            if let Err(e) = store.clone().close() {
                tracing::warn!(cause = %e, "closing the store after the import failed");
            }
        }
    }
}

/// Writes `items` into the key-value namespace as one batch: one segment, one flush.
fn put_kv(kv: &Kv, items: Vec<Item>) -> Result<Recorded, StoreError> {
    let now = system_now_ms();
    let (done, ticket) = kv.batch(|tx| {
        let mut done = Recorded::default();
        for item in &items {
            let expiry = item.ttl.map_or(Expiry::Window, Expiry::In);
            match tx.set(
                crate::store::kv::Write::new(&item.key, &item.value, Condition::Always, expiry),
                now,
            ) {
                Ok(_) => done.added += 1,
                Err(StoreError::EmptyId { .. } | StoreError::IdTooLong { .. }) => done.refused += 1,
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    })?;
    let done = done?;
    kv.wait_durable(ticket)?;
    Ok(done)
}

/// Connects to the service's Redis endpoint at `addr`, with `AUTH password` if given.
fn connect_endpoint(
    addr: SocketAddr,
    password: Option<&str>,
) -> redis::RedisResult<redis::Connection> {
    let mut redis = redis::RedisConnectionInfo::default();
    if let Some(password) = password {
        redis = redis.set_password(password);
    }
    // The address as given, unspecified (0.0.0.0) included, which reaches the local listener.
    let info = (addr.ip().to_string(), addr.port())
        .into_connection_info()?
        .set_redis_settings(redis);
    redis::Client::open(info)?
        .get_connection_with_timeout(IO_TIMEOUT)
        .and_then(with_timeouts)
}

/// `SET key value [PX ttl]` for each item, pipelined in bounded chunks.
fn put_resp(con: &mut redis::Connection, items: Vec<Item>) -> Result<Recorded, String> {
    let mut done = Recorded::default();
    let mut chunk = redis::pipe();
    // A key the endpoint refuses (too long) is counted, not a failed import.
    chunk.ignore_errors();
    let mut bytes = 0;
    let mut items = items.into_iter().peekable();
    while let Some(item) = items.next() {
        bytes += item.key.len() + item.value.len();
        chunk.cmd("SET").arg(item.key).arg(item.value);
        // No PX: the endpoint gives the key the window, as a key without TTL deserves.
        if let Some(ttl) = item.ttl {
            chunk.arg("PX").arg(ttl.as_millis().max(1) as u64);
        }
        if bytes >= PIPELINE_BYTES || items.peek().is_none() {
            let replies: Vec<Value> = chunk.query(con).map_err(|e| e.to_string())?;
            for reply in replies {
                match reply {
                    Value::Okay => done.added += 1,
                    Value::ServerError(e) => {
                        tracing::warn!(reply = %e, "the Redis endpoint refused a key");
                        done.refused += 1;
                    }
                    other => return Err(format!("SET answered {other:?}")),
                }
            }
            chunk.clear();
            bytes = 0;
        }
    }
    Ok(done)
}

/// `PUT /ids/{id}?ttl_ms=N` for each item, from a few threads at once.
fn put_http(addr: SocketAddr, token: Option<&str>, items: Vec<Item>) -> Result<Recorded, Error> {
    let per_worker = items.len().div_ceil(HTTP_WORKERS).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = items
            .chunks(per_worker)
            .map(|chunk| scope.spawn(move || put_http_chunk(addr, token, chunk)))
            .collect();
        let mut done = Recorded::default();
        for worker in workers {
            done += worker.join().expect("import worker panicked")?;
        }
        Ok(done)
    })
}

fn put_http_chunk(
    addr: SocketAddr,
    token: Option<&str>,
    items: &[Item],
) -> Result<Recorded, Error> {
    let mut done = Recorded::default();
    for item in items {
        // The route takes the id in the path as UTF-8; an id that is not cannot come from an
        // AMQP message_id either.
        let Ok(id) = String::from_utf8(item.key.clone()) else {
            done.refused += 1;
            continue;
        };
        let answer = match ask::over_http(addr, token, &Request::Record(id, item.ttl)) {
            Ok(answer) => answer,
            Err(HttpFailure::NoService) => {
                return Err(Error::Target {
                    addr,
                    why: "the service stopped answering".into(),
                })
            }
            Err(HttpFailure::Bad(why)) => return Err(Error::Target { addr, why }),
        };
        match answer.status {
            200 if answer.body["recorded"] == true => done.added += 1,
            200 => done.present += 1,
            409 => done.in_flight += 1,
            400 => done.refused += 1,
            status => {
                return Err(Error::Target {
                    addr,
                    why: format!("PUT /ids answered {status}: {}", answer.body),
                })
            }
        }
    }
    Ok(done)
}

// ---------------------------------------------------------------------------------------------
// Progress.

/// A progress line on stderr, only when it is a terminal.
struct Progress {
    /// What the line counts.
    into: Namespace,
    /// Whether stderr is a terminal; if not, nothing is shown.
    tty: bool,
    /// When the line was last drawn.
    last: Option<Instant>,
}

impl Progress {
    fn new(into: Namespace) -> Progress {
        Progress {
            into,
            tty: io::stderr().is_terminal(),
            last: None,
        }
    }

    fn show(&mut self, summary: &Summary, started: Instant) {
        if !self.tty || self.last.is_some_and(|t| t.elapsed() < PROGRESS_EVERY) {
            return;
        }
        self.last = Some(Instant::now());
        let rate = summary.read as f64 / started.elapsed().as_secs_f64().max(1e-3);
        // \r and "erase line": the next update overwrites this one.
        eprint!(
            "\r\x1b[Kimport-redis: {} ({rate:.0} keys/s)",
            summary.line(self.into)
        );
        let _ = io::stderr().flush();
    }

    fn clear(&self) {
        if self.tty && self.last.is_some() {
            eprint!("\r\x1b[K");
        }
    }
}

/// Keys imported as relay ids would be recorded as they are, and the relay, hashing several parts
/// or a scope, would never look them up: refused rather than an import that silently does
/// nothing.
fn refuse_hashed_ids(config: &Config, into: Namespace) -> Result<(), Error> {
    if into == Namespace::Relay && config.relay.ids_hashed() {
        return Err(Error::HashedIds {
            id_source: config.relay.id_source.to_string(),
            scope: config.relay.id_scope.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashed_relay_ids_cannot_be_imported() {
        let config = Config::from_vars([("DEDUPD_ID_SOURCE", "header:tenant+message_id")]).unwrap();
        let err = refuse_hashed_ids(&config, Namespace::Relay)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("header:tenant+message_id") && err.contains("--into redis"),
            "{err}"
        );
        refuse_hashed_ids(&config, Namespace::Redis).unwrap();
        let scoped = Config::from_vars([("DEDUPD_ID_SCOPE", "routing_key")]).unwrap();
        assert!(refuse_hashed_ids(&scoped, Namespace::Relay).is_err());
        let plain = Config::from_vars(Vec::<(String, String)>::new()).unwrap();
        refuse_hashed_ids(&plain, Namespace::Relay).unwrap();
    }

    #[test]
    fn bad_urls_are_refused_before_connecting_and_never_echo_the_password() {
        for bad in [
            "http://h",
            "rediss://h",
            "redis://",
            "redis://h:x",
            "redis://h/zero",
            "redis://u:hunter2@h:x",
        ] {
            let Err(e) = Source::connect(bad) else {
                panic!("{bad} was accepted");
            };
            assert!(matches!(e, Error::Url { .. }), "{bad}: {e}");
            let e = e.to_string();
            assert!(e.contains("redis://[[user]:password@]host"), "{e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn messages_mask_the_password() {
        assert_eq!(
            masked("redis://127.0.0.1:6379/2"),
            "redis://127.0.0.1:6379/2"
        );
        assert_eq!(
            masked("redis://app:p%40ss@cache.internal/3"),
            "redis://app:***@cache.internal/3"
        );
        assert_eq!(
            masked("redis://:s@cr@t@[::1]:6380"),
            "redis://:***@[::1]:6380"
        );
    }

    #[test]
    fn strip_keeps_prefixed_keys_without_the_prefix() {
        let item = |k: &[u8]| Item {
            key: k.to_vec(),
            value: Vec::new(),
            ttl: None,
        };
        let mut summary = Summary::default();
        let kept = strip(
            vec![item(b"msg:a"), item(b"other"), item(b"msg:")],
            b"msg:",
            &mut summary,
        );
        let keys: Vec<&[u8]> = kept.iter().map(|i| i.key.as_slice()).collect();
        assert_eq!(keys, vec![b"a".as_slice(), b""]);
        assert_eq!(summary.unprefixed, 1);
    }
}
