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
//! Either way a rerun is harmless. The Redis client is a few lines of RESP2 over a std
//! `TcpStream`: the command needs four commands of it, not a client library.

use std::io::{self, BufRead, BufReader, IsTerminal, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use percent_encoding::percent_decode_str;

use crate::admin::{self, Recorded};
use crate::cli::ask::{self, HttpFailure, Request};
use crate::config::Config;
use crate::redis::resp::Reply;
use crate::store::kv::{Condition, Expiry, Kv, Ticket};
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
/// Most bytes of one bulk reply accepted (Redis' own `proto-max-bulk-len`).
const MAX_BULK: usize = 512 * 1024 * 1024;
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
    let url = RedisUrl::parse(&options.url)?;
    let mut source = Client::connect(&url).map_err(|why| Error::Source {
        url: url.shown.clone(),
        why,
    })?;
    let mut target = Target::open(config, options.into)?;
    let started = Instant::now();
    let mut progress = Progress::new(options.into);
    let mut summary = Summary::default();
    let mut cursor = b"0".to_vec();
    let source_err = |why: String| Error::Source {
        url: url.shown.clone(),
        why,
    };
    loop {
        let (next, keys) = source.scan(&cursor, &options.pattern).map_err(source_err)?;
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
        if next == b"0" {
            break;
        }
        cursor = next;
    }
    target.close();
    progress.clear();
    println!(
        "import-redis: {} into {}: {} ({:.1} s)",
        url.shown,
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
// The source: a Redis URL and a small RESP2 client.

/// A parsed `redis://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RedisUrl {
    /// Host name or address (IPv6 without its brackets).
    host: String,
    /// Port, 6379 unless given.
    port: u16,
    /// ACL user for `AUTH`, if any.
    user: Option<String>,
    /// Password for `AUTH`, if any.
    password: Option<String>,
    /// Database to `SELECT` (0 needs none).
    db: u32,
    /// The URL for messages: the password masked.
    shown: String,
}

impl RedisUrl {
    fn parse(url: &str) -> Result<RedisUrl, Error> {
        // Never echo a password, even in the error about the URL itself.
        let masked = match url
            .split_once("://")
            .and_then(|(s, r)| Some((s, r.rsplit_once('@')?)))
        {
            Some((scheme, (userinfo, rest))) => {
                let user = userinfo.split(':').next().unwrap_or("");
                format!("{scheme}://{user}:***@{rest}")
            }
            None => url.to_string(),
        };
        let bad = |why: &str| Error::Url {
            url: masked.clone(),
            why: why.into(),
        };
        let rest = match url.split_once("://") {
            Some(("redis", rest)) => rest,
            Some(("rediss", _)) => return Err(bad("TLS (rediss://) is not supported")),
            _ => return Err(bad("expected redis://[[user]:password@]host[:port][/db]")),
        };
        let rest = rest.split(['?', '#']).next().unwrap_or("");
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let decode = |s: &str| -> Result<Option<String>, Error> {
            if s.is_empty() {
                return Ok(None);
            }
            let text = percent_decode_str(s)
                .decode_utf8()
                .map_err(|_| bad("user or password is not UTF-8 once percent-decoded"))?;
            Ok(Some(text.into_owned()))
        };
        let (user, password) = match userinfo.map(|u| u.split_once(':').unwrap_or((u, ""))) {
            Some((user, password)) => (decode(user)?, decode(password)?),
            None => (None, None),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            // `[::1]:6379`, `host:6379`; a bare IPv6 address needs its brackets.
            Some((h, p)) if !p.contains(']') => (h, p.parse().map_err(|_| bad("bad port"))?),
            _ => (hostport, 6379),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let db = match path {
            "" => 0,
            p => p
                .parse()
                .map_err(|_| bad("the path must be a database number"))?,
        };
        let shown = if password.is_some() {
            masked
        } else {
            url.to_string()
        };
        Ok(RedisUrl {
            host: host.to_string(),
            port,
            user,
            password,
            db,
            shown,
        })
    }
}

/// A RESP2 reply, as much of it as the import needs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    /// `+OK`.
    Simple(String),
    /// `-ERR ...`, code included.
    Error(String),
    /// `:n`.
    Int(i64),
    /// `$n` bytes.
    Bulk(Vec<u8>),
    /// `$-1`, `*-1` (or RESP3's `_`).
    Nil,
    /// `*n` replies.
    Array(Vec<Value>),
}

/// A blocking RESP2 connection: requests pipelined, replies read in order.
struct Client {
    /// Replies come in through here.
    reader: BufReader<TcpStream>,
    /// Requests go out through here (a clone of the reader's socket).
    writer: TcpStream,
}

impl Client {
    /// Connects to `url`'s server, authenticates and selects its database.
    fn connect(url: &RedisUrl) -> Result<Client, String> {
        Client::connect_to(
            (url.host.as_str(), url.port),
            url.user.as_deref(),
            url.password.as_deref(),
        )
        .and_then(|mut c| {
            if url.db != 0 {
                c.ok(&[b"SELECT", url.db.to_string().as_bytes()])?;
            }
            Ok(c)
        })
    }

    fn connect_to(
        addr: impl ToSocketAddrs,
        user: Option<&str>,
        password: Option<&str>,
    ) -> Result<Client, String> {
        let mut last = None;
        let addrs = addr
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve: {e}"))?;
        let stream = addrs
            .into_iter()
            .find_map(|a| match TcpStream::connect_timeout(&a, IO_TIMEOUT) {
                Ok(s) => Some(s),
                Err(e) => {
                    last = Some(e);
                    None
                }
            })
            .ok_or_else(|| {
                format!(
                    "cannot connect: {}",
                    last.map_or("no address".into(), |e| e.to_string())
                )
            })?;
        let setup = |s: &TcpStream| {
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            s.set_nodelay(true)?;
            s.try_clone()
        };
        let writer = setup(&stream).map_err(|e| e.to_string())?;
        let mut client = Client {
            reader: BufReader::new(stream),
            writer,
        };
        match (user, password) {
            (Some(u), Some(p)) => client.ok(&[b"AUTH", u.as_bytes(), p.as_bytes()])?,
            (None, Some(p)) => client.ok(&[b"AUTH", p.as_bytes()])?,
            _ => {}
        }
        Ok(client)
    }

    /// Runs one command that must answer `+OK`.
    fn ok(&mut self, args: &[&[u8]]) -> Result<(), String> {
        let name = String::from_utf8_lossy(args[0]).into_owned();
        match self
            .pipeline(&[args.iter().map(|a| a.to_vec()).collect()])?
            .pop()
        {
            Some(Value::Simple(_)) => Ok(()),
            other => Err(format!("{name} answered {}", shown(other.as_ref()))),
        }
    }

    /// Sends `commands` in one write and reads their replies, in order.
    fn pipeline(&mut self, commands: &[Vec<Vec<u8>>]) -> Result<Vec<Value>, String> {
        let mut out = Vec::new();
        for args in commands {
            Reply::Array(args.iter().cloned().map(Reply::Bulk).collect()).encode(2, &mut out);
        }
        self.writer
            .write_all(&out)
            .map_err(|e| format!("write failed: {e}"))?;
        (0..commands.len())
            .map(|_| read_value(&mut self.reader).map_err(|e| format!("read failed: {e}")))
            .collect()
    }

    /// One `SCAN` step: the next cursor and the keys of this page.
    fn scan(&mut self, cursor: &[u8], pattern: &str) -> Result<(Vec<u8>, Vec<Vec<u8>>), String> {
        let count = SCAN_COUNT.to_string();
        let command = [
            b"SCAN".as_slice(),
            cursor,
            b"MATCH",
            pattern.as_bytes(),
            b"COUNT",
            count.as_bytes(),
        ];
        let reply = self.pipeline(&[command.iter().map(|a| a.to_vec()).collect()])?;
        if let [Value::Array(parts)] = reply.as_slice() {
            if let [Value::Bulk(next), Value::Array(keys)] = parts.as_slice() {
                let keys = keys
                    .iter()
                    .filter_map(|k| match k {
                        Value::Bulk(k) => Some(k.clone()),
                        _ => None,
                    })
                    .collect();
                return Ok((next.clone(), keys));
            }
        }
        Err(format!("SCAN answered {}", shown(reply.first())))
    }

    /// The remaining TTL (and the value, with `values`) of each key, pipelined; keys gone in
    /// the meantime, or not strings, are counted in `summary.gone` and left out.
    fn fetch(
        &mut self,
        keys: Vec<Vec<u8>>,
        values: bool,
        summary: &mut Summary,
    ) -> Result<Vec<Item>, String> {
        let mut commands = Vec::with_capacity(keys.len() * 2);
        for key in &keys {
            commands.push(vec![b"PTTL".to_vec(), key.clone()]);
            if values {
                commands.push(vec![b"GET".to_vec(), key.clone()]);
            }
        }
        let mut replies = self.pipeline(&commands)?.into_iter();
        let mut items = Vec::with_capacity(keys.len());
        for key in keys {
            let ttl = replies.next();
            let value = if values {
                replies.next()
            } else {
                Some(Value::Nil)
            };
            let ttl = match ttl {
                Some(Value::Int(-1)) => None,
                Some(Value::Int(ms)) if ms > 0 => Some(Duration::from_millis(ms as u64)),
                Some(Value::Int(_)) => {
                    summary.gone += 1; // -2: expired or deleted since SCAN
                    continue;
                }
                other => return Err(format!("PTTL answered {}", shown(other.as_ref()))),
            };
            let value = match value {
                Some(Value::Bulk(v)) => v,
                Some(Value::Nil) if !values => Vec::new(),
                // Gone since, or WRONGTYPE: only strings have a value to copy.
                Some(Value::Nil | Value::Error(_)) => {
                    summary.gone += 1;
                    continue;
                }
                other => return Err(format!("GET answered {}", shown(other.as_ref()))),
            };
            items.push(Item { key, value, ttl });
        }
        Ok(items)
    }
}

/// A reply for an error message.
fn shown(v: Option<&Value>) -> String {
    match v {
        Some(Value::Error(e)) => format!("-{e}"),
        Some(v) => format!("{v:?}"),
        None => "nothing".into(),
    }
}

/// Reads one RESP2 reply (and RESP3's null, which some proxies send).
fn read_value(r: &mut impl BufRead) -> io::Result<Value> {
    let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
    let mut line = Vec::new();
    r.read_until(b'\n', &mut line)?;
    if !line.ends_with(b"\r\n") {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let text = String::from_utf8_lossy(&line[1..line.len() - 2]).into_owned();
    let number = || -> io::Result<i64> {
        text.parse()
            .map_err(|_| invalid(format!("bad length or integer {text:?}")))
    };
    Ok(match line[0] {
        b'+' => Value::Simple(text),
        b'-' => Value::Error(text),
        b':' => Value::Int(number()?),
        b'_' => Value::Nil,
        b'$' => match usize::try_from(number()?) {
            Err(_) => Value::Nil,
            Ok(n) if n > MAX_BULK => return Err(invalid(format!("bulk of {n} bytes"))),
            Ok(n) => {
                let mut bytes = vec![0; n + 2];
                r.read_exact(&mut bytes)?;
                bytes.truncate(n);
                Value::Bulk(bytes)
            }
        },
        b'*' => match usize::try_from(number()?) {
            Err(_) => Value::Nil,
            Ok(n) => Value::Array((0..n).map(|_| read_value(r)).collect::<io::Result<_>>()?),
        },
        other => {
            return Err(invalid(format!(
                "unexpected reply type {:?}",
                other as char
            )))
        }
    })
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
        client: Client,
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
                    let client = Client::connect_to(addr, None, config.redis.password.as_deref())
                        .map_err(|why| Error::Target { addr, why })?;
                    return Ok(Target::RedisEndpoint { addr, client });
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
            Target::RedisEndpoint { addr, client } => {
                put_resp(client, items).map_err(|why| Error::Target { addr: *addr, why })
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

/// Writes `items` into the key-value namespace; one flush for all of them.
fn put_kv(kv: &Kv, items: Vec<Item>) -> Result<Recorded, StoreError> {
    let mut done = Recorded::default();
    let mut last: Option<Ticket> = None;
    let now = system_now_ms();
    for item in items {
        let expiry = item.ttl.map_or(Expiry::Window, Expiry::In);
        match kv.set_deferred(&item.key, &item.value, Condition::Always, expiry, now) {
            Ok((_, ticket)) => {
                done.added += 1;
                last = Some(ticket);
            }
            Err(StoreError::EmptyId { .. } | StoreError::IdTooLong { .. }) => done.refused += 1,
            Err(e) => return Err(e),
        }
    }
    if let Some(ticket) = last {
        kv.wait_durable(ticket)?;
    }
    Ok(done)
}

/// `SET key value [PX ttl]` for each item, pipelined in bounded chunks.
fn put_resp(client: &mut Client, items: Vec<Item>) -> Result<Recorded, String> {
    let mut done = Recorded::default();
    let mut chunk = Vec::new();
    let mut bytes = 0;
    let mut items = items.into_iter().peekable();
    while let Some(item) = items.next() {
        bytes += item.key.len() + item.value.len();
        let mut set = vec![b"SET".to_vec(), item.key, item.value];
        if let Some(ttl) = item.ttl {
            set.push(b"PX".to_vec());
            set.push(ttl.as_millis().max(1).to_string().into_bytes());
        }
        // No PX: the endpoint gives the key the window, as a key without TTL deserves.
        chunk.push(set);
        if bytes >= PIPELINE_BYTES || items.peek().is_none() {
            for reply in client.pipeline(&chunk)? {
                match reply {
                    Value::Simple(_) => done.added += 1,
                    Value::Error(e) => {
                        tracing::warn!(reply = %e, "the Redis endpoint refused a key");
                        done.refused += 1;
                    }
                    other => return Err(format!("SET answered {}", shown(Some(&other)))),
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
    fn url_parses_auth_port_db_and_masks_the_password() {
        let u = RedisUrl::parse("redis://127.0.0.1:6379").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.db), ("127.0.0.1", 6379, 0));
        assert_eq!((u.user, u.password), (None, None));
        let u = RedisUrl::parse("redis://app:p%40ss@cache.internal/3").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.db), ("cache.internal", 6379, 3));
        assert_eq!(u.user.as_deref(), Some("app"));
        assert_eq!(u.password.as_deref(), Some("p@ss"));
        assert!(!u.shown.contains("p%40ss"), "{}", u.shown);
        let u = RedisUrl::parse("redis://:secret@[::1]:6380/").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 6380));
        assert_eq!((u.user, u.password.as_deref()), (None, Some("secret")));

        for bad in [
            "http://h",
            "rediss://h",
            "redis://",
            "redis://h:x",
            "redis://h/zero",
        ] {
            assert!(RedisUrl::parse(bad).is_err(), "{bad}");
        }
        let e = RedisUrl::parse("redis://u:hunter2@h:x")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn replies_parse_as_redis_sends_them() {
        let wire = b"+OK\r\n-ERR no\r\n:-2\r\n$3\r\na\r\n\r\n$-1\r\n*2\r\n$1\r\n0\r\n*0\r\n_\r\n";
        let mut r = &wire[..];
        let got: Vec<Value> = (0..7).map(|_| read_value(&mut r).unwrap()).collect();
        assert_eq!(
            got,
            vec![
                Value::Simple("OK".into()),
                Value::Error("ERR no".into()),
                Value::Int(-2),
                Value::Bulk(b"a\r\n".to_vec()),
                Value::Nil,
                Value::Array(vec![Value::Bulk(b"0".to_vec()), Value::Array(vec![])]),
                Value::Nil,
            ]
        );
        assert!(read_value(&mut &b"$5\r\nab"[..]).is_err(), "short bulk");
        assert!(read_value(&mut &b"?x\r\n"[..]).is_err(), "unknown type");
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
