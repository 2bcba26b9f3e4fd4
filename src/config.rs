//! The relay's configuration: one typed [`Config`], parsed once at start-up from `DEDUPD_*`
//! environment variables.
//!
//! Parsing is a pure function over `(name, value)` pairs ([`Config::from_vars`]) so tests never
//! touch the process environment. Every variable is listed once, in [`VARS`]; `dedupd --help`
//! prints that table and a test checks that README's configuration table is the same text, so the
//! two cannot drift.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU16, NonZeroU32, NonZeroU64, NonZeroUsize};
use std::path::PathBuf;
use std::time::Duration;

use crate::store::{StoreConfig, MAX_ID_LIMIT};

/// Prefix every variable of ours carries; unknown names under it are refused.
pub const PREFIX: &str = "DEDUPD_";

/// Longest AMQP short string (queue, exchange and routing key names).
const SHORT_STR_MAX: usize = 255;

/// The default of a variable, as the help and the README show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultValue {
    /// This value when the variable is unset.
    Value(&'static str),
    /// Unset means something other than a value; the text says what.
    Unset(&'static str),
}

/// One configuration variable: its name, default and meaning.
#[derive(Debug, Clone, Copy)]
pub struct Var {
    /// Full name, `DEDUPD_*`.
    pub name: &'static str,
    /// What applies when it is unset.
    pub default: DefaultValue,
    /// One line saying what it does.
    pub doc: &'static str,
}

const fn var(name: &'static str, default: &'static str, doc: &'static str) -> Var {
    Var {
        name,
        default: DefaultValue::Value(default),
        doc,
    }
}

const fn unset(name: &'static str, unset: &'static str, doc: &'static str) -> Var {
    Var {
        name,
        default: DefaultValue::Unset(unset),
        doc,
    }
}

/// Every variable dedupd reads, in the order the help and the README list them.
pub const VARS: &[Var] = &[
    var(
        AMQP_URL,
        DEFAULT_AMQP_URL,
        "broker URL (`amqp://user:password@host:port/vhost`, `amqps://` for TLS); never logged with its password",
    ),
    unset(
        AMQP_URL_FILE,
        "use `DEDUPD_AMQP_URL`",
        "file holding the broker URL instead (systemd credentials); not with `DEDUPD_AMQP_URL`",
    ),
    unset(
        AMQP_CA_FILE,
        "the system's CA store",
        "PEM file of the CA certificates that sign the broker's certificate (`amqps://` only)",
    ),
    unset(
        AMQP_CERT_FILE,
        "no client certificate",
        "PEM client certificate chain for mutual TLS (`amqps://` only; with `DEDUPD_AMQP_KEY_FILE`)",
    ),
    unset(
        AMQP_KEY_FILE,
        "no client certificate",
        "PEM private key of that client certificate (with `DEDUPD_AMQP_CERT_FILE`)",
    ),
    var(SOURCE_QUEUE, "dedupd.in", "queue consumed with manual acks"),
    var(DEST_EXCHANGE, "dedupd.out", "where first-seen messages go"),
    var(
        DEST_EXCHANGE_TYPE,
        "fanout",
        "type used when declaring it: `direct`, `fanout`, `topic`, `headers` or a plugin's `x-…`",
    ),
    unset(
        DEST_ROUTING_KEY,
        "keep the original",
        "routing key for forwarded messages (set but empty: the empty key)",
    ),
    var(
        DECLARE,
        "true",
        "declare the topology; `false`: use what exists, fail naming any missing piece",
    ),
    var(DATA_DIR, "./data", "store directory (one dedupd per directory)"),
    var(TTL, "24h", "dedup window (`90s`, `15m`, `24h`, `7d`)"),
    var(
        TTL_HEADER,
        "x-dedup-ttl",
        "header whose whole number of milliseconds sets that message's window instead of `DEDUPD_TTL`; not a positive integer, or over `DEDUPD_MAX_TTL`: dead-lettered; `off`: ignore it",
    ),
    unset(
        MAX_TTL,
        "`DEDUPD_TTL`",
        "longest window a message's TTL header may ask for (`7d`, ...); at least `DEDUPD_TTL`",
    ),
    var(
        ID_SOURCE,
        "message_id",
        "where the id comes from: `message_id`, `header:<name>`, `json:<RFC 6901 pointer>` into a JSON body, `body-sha256`, or several of them joined by `+` (hashed together)",
    ),
    var(
        ID_SCOPE,
        "none",
        "`routing_key` or `header:<name>`: the same id in two scopes is two ids (hashed with the scope); `none`: one scope",
    ),
    var(
        MISSING_ID,
        "dead-letter",
        "message without an id (or with an empty one): `dead-letter`, `forward` (undeduplicated) or `body-sha256`",
    ),
    var(MAX_ID_BYTES, "256", "longer ids are dead-lettered (at most 65535)"),
    var(
        PREFETCH,
        "1000",
        "consumer prefetch = most messages in flight (1 to 65535)",
    ),
    var(
        QUEUE_TYPE,
        "classic",
        "type of the source queue and `<source>.dead` when dedupd declares them: `classic` or `quorum` (replicated); an existing queue of the other type stops start-up",
    ),
    unset(
        DELIVERY_LIMIT,
        "20 with `quorum` (RabbitMQ 4's default)",
        "deliveries of one message before the broker dead-letters it into `<source>.dead` (`quorum` only)",
    ),
    unset(
        DUPLICATES_EXCHANGE,
        "off",
        "if set, a copy of each duplicate is published there, for audit (declared as a durable fanout)",
    ),
    var(
        CONFIRM_TIMEOUT,
        "30s",
        "a publish not confirmed by then counts as failed (dead-lettered)",
    ),
    var(
        SHUTDOWN_GRACE,
        "10s",
        "time to finish in-flight work on SIGTERM/SIGINT",
    ),
    var(
        METRICS_ADDR,
        "127.0.0.1:9476",
        "HTTP address for `/healthz` and `/metrics`; `off` disables",
    ),
    unset(
        ADMIN_TOKEN,
        "no token: admin on loopback only",
        "bearer token required by `GET`/`DELETE /ids/{id}` (and sent by the admin commands); never logged",
    ),
    unset(
        ADMIN_TOKEN_FILE,
        "use `DEDUPD_ADMIN_TOKEN`",
        "file holding the admin token instead (systemd credentials); not with `DEDUPD_ADMIN_TOKEN`",
    ),
    var(
        LOG,
        "info",
        "tracing filter (`debug`, `dedupd=debug,amqprs=warn`, ...)",
    ),
    var(
        LOG_FORMAT,
        "text",
        "log line format on stderr: `text`, or `json` for machines",
    ),
    var(
        EXPECTED_IDS,
        "1000000",
        "ids expected per window; sizes the Bloom filter",
    ),
    var(
        BLOOM_FP_RATE,
        "0.01",
        "target false-positive rate of the Bloom filter, in (0, 1)",
    ),
    var(
        CACHE_SIZE,
        "64M",
        "sled page cache (`512K`, `64M`, `1G` or bytes)",
    ),
    var(
        RELAY,
        "on",
        "`off`: no broker connection at all, the store serves the Redis endpoint (and `/healthz`, `/metrics`) alone",
    ),
    var(
        REDIS_ADDR,
        "off",
        "address of the Redis-protocol endpoint, e.g. `127.0.0.1:6380`; `off` disables",
    ),
    unset(
        REDIS_PASSWORD,
        "no auth; loopback addresses only",
        "clients must `AUTH` (or `HELLO 3 AUTH default <pw>`); required for a non-loopback `DEDUPD_REDIS_ADDR`; never logged",
    ),
    unset(
        REDIS_PASSWORD_FILE,
        "use `DEDUPD_REDIS_PASSWORD`",
        "file holding the Redis endpoint password instead (systemd credentials); not with `DEDUPD_REDIS_PASSWORD`",
    ),
    var(
        REDIS_MAX_CLIENTS,
        "10000",
        "most Redis connections at once; more are refused with `ERR max number of clients reached`",
    ),
    var(
        REDIS_MAX_VALUE,
        "1M",
        "longest key or value a Redis command may carry; longer gets an error reply",
    ),
    var(
        REDIS_SCRIPT_TIMEOUT,
        "5s",
        "longest a Lua script (`EVAL`) may run; past it the script is killed and none of its writes apply",
    ),
];

const AMQP_URL: &str = "DEDUPD_AMQP_URL";
const AMQP_URL_FILE: &str = "DEDUPD_AMQP_URL_FILE";
const ADMIN_TOKEN: &str = "DEDUPD_ADMIN_TOKEN";
const ADMIN_TOKEN_FILE: &str = "DEDUPD_ADMIN_TOKEN_FILE";
const SOURCE_QUEUE: &str = "DEDUPD_SOURCE_QUEUE";
const DEST_EXCHANGE: &str = "DEDUPD_DEST_EXCHANGE";
const DEST_EXCHANGE_TYPE: &str = "DEDUPD_DEST_EXCHANGE_TYPE";
const DEST_ROUTING_KEY: &str = "DEDUPD_DEST_ROUTING_KEY";
const DECLARE: &str = "DEDUPD_DECLARE";
const DATA_DIR: &str = "DEDUPD_DATA_DIR";
const TTL: &str = "DEDUPD_TTL";
const TTL_HEADER: &str = "DEDUPD_TTL_HEADER";
const MAX_TTL: &str = "DEDUPD_MAX_TTL";
const ID_SOURCE: &str = "DEDUPD_ID_SOURCE";
const ID_SCOPE: &str = "DEDUPD_ID_SCOPE";
const MISSING_ID: &str = "DEDUPD_MISSING_ID";
const MAX_ID_BYTES: &str = "DEDUPD_MAX_ID_BYTES";
const PREFETCH: &str = "DEDUPD_PREFETCH";
const QUEUE_TYPE: &str = "DEDUPD_QUEUE_TYPE";
const DELIVERY_LIMIT: &str = "DEDUPD_DELIVERY_LIMIT";
const DUPLICATES_EXCHANGE: &str = "DEDUPD_DUPLICATES_EXCHANGE";
const CONFIRM_TIMEOUT: &str = "DEDUPD_CONFIRM_TIMEOUT";
const SHUTDOWN_GRACE: &str = "DEDUPD_SHUTDOWN_GRACE";
const METRICS_ADDR: &str = "DEDUPD_METRICS_ADDR";
const LOG: &str = "DEDUPD_LOG";
const LOG_FORMAT: &str = "DEDUPD_LOG_FORMAT";
const EXPECTED_IDS: &str = "DEDUPD_EXPECTED_IDS";
const BLOOM_FP_RATE: &str = "DEDUPD_BLOOM_FP_RATE";
const CACHE_SIZE: &str = "DEDUPD_CACHE_SIZE";
const AMQP_CA_FILE: &str = "DEDUPD_AMQP_CA_FILE";
const AMQP_CERT_FILE: &str = "DEDUPD_AMQP_CERT_FILE";
const AMQP_KEY_FILE: &str = "DEDUPD_AMQP_KEY_FILE";
const RELAY: &str = "DEDUPD_RELAY";
const REDIS_ADDR: &str = "DEDUPD_REDIS_ADDR";
const REDIS_PASSWORD: &str = "DEDUPD_REDIS_PASSWORD";
const REDIS_PASSWORD_FILE: &str = "DEDUPD_REDIS_PASSWORD_FILE";
const REDIS_MAX_CLIENTS: &str = "DEDUPD_REDIS_MAX_CLIENTS";
const REDIS_MAX_VALUE: &str = "DEDUPD_REDIS_MAX_VALUE";
const REDIS_SCRIPT_TIMEOUT: &str = "DEDUPD_REDIS_SCRIPT_TIMEOUT";

const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Where a message's id comes from: one part, or several that together make the id.
///
/// Never empty. One part is the id as it is; several are hashed together into one id of
/// [`HASHED_ID_BYTES`], as is any id with a scope (see [`Config::ids_hashed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdSource {
    parts: Vec<IdPart>,
}

/// One part of a message's id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdPart {
    /// The AMQP `message_id` property.
    MessageId,
    /// A header of this name (string, byte array or integer value).
    Header(String),
    /// The SHA-256 of the body (32 raw bytes): every message has one.
    BodySha256,
    /// The field of a JSON body at this RFC 6901 pointer (a string, or a number's JSON text).
    Json(String),
}

impl IdSource {
    /// An id of these parts.
    ///
    /// # Panics
    ///
    /// If `parts` is empty.
    pub fn new(parts: Vec<IdPart>) -> IdSource {
        assert!(!parts.is_empty(), "an id has at least one part");
        IdSource { parts }
    }

    /// An id of this one part.
    pub fn single(part: IdPart) -> IdSource {
        IdSource { parts: vec![part] }
    }

    /// The parts, in the order they are hashed.
    pub fn parts(&self) -> &[IdPart] {
        &self.parts
    }
}

impl fmt::Display for IdSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, part) in self.parts.iter().enumerate() {
            if i > 0 {
                f.write_str("+")?;
            }
            match part {
                IdPart::MessageId => f.write_str("message_id")?,
                IdPart::Header(h) => write!(f, "header:{h}")?,
                IdPart::BodySha256 => f.write_str("body-sha256")?,
                IdPart::Json(pointer) => write!(f, "json:{pointer}")?,
            }
        }
        Ok(())
    }
}

/// Which scope an id belongs to: the same id in two scopes is two ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdScope {
    /// One scope for every message.
    None,
    /// The routing key the message was published with.
    RoutingKey,
    /// A header of this name (string, byte array or integer value); a message without it has no
    /// usable id.
    Header(String),
}

impl fmt::Display for IdScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdScope::None => f.write_str("none"),
            IdScope::RoutingKey => f.write_str("routing_key"),
            IdScope::Header(h) => write!(f, "header:{h}"),
        }
    }
}

/// Length of the ids of several parts or of a scope: a SHA-256 as 64 hex digits.
pub const HASHED_ID_BYTES: usize = 64;

/// What to do with a message that has no id (or an empty one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingId {
    /// Reject it without requeue, so the source's dead-letter exchange keeps it.
    DeadLetter,
    /// Forward it without deduplication.
    Forward,
    /// Use the SHA-256 of its body as its id.
    BodySha256,
}

/// The type of the source queue and of `<source>.dead`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    /// A classic queue: on one broker node.
    Classic,
    /// A quorum queue, replicated by the broker's Raft, with at-least-once dead-lettering.
    Quorum {
        /// `x-delivery-limit`: past this many returns the broker dead-letters a message.
        delivery_limit: NonZeroU32,
    },
}

impl QueueType {
    /// The delivery limit RabbitMQ 4 gives quorum queues by default.
    pub const DEFAULT_DELIVERY_LIMIT: NonZeroU32 = NonZeroU32::new(20).expect("non-zero");

    /// The name `DEDUPD_QUEUE_TYPE` and `x-queue-type` use.
    pub fn name(&self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum { .. } => "quorum",
        }
    }

    /// The delivery limit, for a quorum queue.
    pub fn delivery_limit(&self) -> Option<NonZeroU32> {
        match self {
            QueueType::Classic => None,
            QueueType::Quorum { delivery_limit } => Some(*delivery_limit),
        }
    }
}

/// The relay's configuration. Built by [`Config::from_env`] or [`Config::from_vars`].
#[derive(Debug, Clone)]
pub struct Config {
    /// `DEDUPD_AMQP_URL` (or the file of `DEDUPD_AMQP_URL_FILE`): the broker.
    pub amqp_url: AmqpUrl,
    /// `DEDUPD_AMQP_CA_FILE`, `DEDUPD_AMQP_CERT_FILE`, `DEDUPD_AMQP_KEY_FILE`, default unset: the
    /// TLS files of an `amqps://` broker URL.
    pub amqp_tls: TlsFiles,
    /// `DEDUPD_SOURCE_QUEUE`, default `dedupd.in`: the queue consumed.
    pub source_queue: String,
    /// `DEDUPD_DEST_EXCHANGE`, default `dedupd.out`: where first-seen messages go.
    pub dest_exchange: String,
    /// `DEDUPD_DEST_EXCHANGE_TYPE`, default `fanout`: type used when declaring it.
    pub dest_exchange_type: String,
    /// `DEDUPD_DEST_ROUTING_KEY`, default unset: routing key override (`None` keeps the original).
    pub dest_routing_key: Option<String>,
    /// `DEDUPD_DECLARE`, default `true`: declare the topology, or only check it exists.
    pub declare: bool,
    /// `DEDUPD_DATA_DIR`, default `./data`: the store directory.
    pub data_dir: PathBuf,
    /// `DEDUPD_TTL`, default 24 h: the dedup window.
    pub ttl: Duration,
    /// `DEDUPD_TTL_HEADER`, default `x-dedup-ttl`: the header setting a message's own window in
    /// milliseconds; `None` when `off`.
    pub ttl_header: Option<String>,
    /// `DEDUPD_MAX_TTL`, default `DEDUPD_TTL`: the longest window a message may ask for.
    pub max_ttl: Duration,
    /// `DEDUPD_ID_SOURCE`, default `message_id`: where the id comes from.
    pub id_source: IdSource,
    /// `DEDUPD_ID_SCOPE`, default `none`: what makes the same id two ids.
    pub id_scope: IdScope,
    /// `DEDUPD_MISSING_ID`, default `dead-letter`: what to do without an id.
    pub missing_id: MissingId,
    /// `DEDUPD_MAX_ID_BYTES`, default 256: longer ids are dead-lettered.
    pub max_id_bytes: NonZeroUsize,
    /// `DEDUPD_PREFETCH`, default 1000: most deliveries in flight.
    pub prefetch: NonZeroU16,
    /// `DEDUPD_QUEUE_TYPE` and `DEDUPD_DELIVERY_LIMIT`, default classic: the source queue's type.
    pub queue_type: QueueType,
    /// `DEDUPD_DUPLICATES_EXCHANGE`, default unset: where copies of duplicates go, if anywhere.
    pub duplicates_exchange: Option<String>,
    /// `DEDUPD_CONFIRM_TIMEOUT`, default 30 s: an unconfirmed publish fails after this.
    pub confirm_timeout: Duration,
    /// `DEDUPD_SHUTDOWN_GRACE`, default 10 s: time to finish in-flight work on shutdown.
    pub shutdown_grace: Duration,
    /// `DEDUPD_METRICS_ADDR`, default `127.0.0.1:9476`: HTTP address, `None` when `off`.
    pub metrics_addr: Option<SocketAddr>,
    /// `DEDUPD_ADMIN_TOKEN` (or the file of `DEDUPD_ADMIN_TOKEN_FILE`), default unset: the
    /// bearer token the admin endpoints require.
    pub admin_token: Option<Secret>,
    /// `DEDUPD_LOG`, default `info`: tracing filter.
    pub log: String,
    /// `DEDUPD_LOG_FORMAT`, default `text`: log lines for people or (`json`) for machines.
    pub log_format: LogFormat,
    /// `DEDUPD_EXPECTED_IDS`, default 1 000 000: ids per window, sizes the Bloom filter.
    pub expected_ids: NonZeroU64,
    /// `DEDUPD_BLOOM_FP_RATE`, default 0.01: target Bloom false-positive rate.
    pub bloom_fp_rate: f64,
    /// `DEDUPD_CACHE_SIZE`, default 64 MiB: sled page cache in bytes.
    pub cache_bytes: u64,
    /// `DEDUPD_RELAY`, default `on`: `false` runs no relay (no broker), only the store's endpoints.
    pub relay: bool,
    /// `DEDUPD_REDIS_ADDR`, default `off`: the Redis-protocol endpoint's address, `None` when off.
    pub redis_addr: Option<SocketAddr>,
    /// `DEDUPD_REDIS_PASSWORD` (or the file of `DEDUPD_REDIS_PASSWORD_FILE`), default unset: the
    /// password Redis clients must give. Never logged.
    pub redis_password: Option<Secret>,
    /// `DEDUPD_REDIS_MAX_CLIENTS`, default 10 000: most Redis connections at once.
    pub redis_max_clients: NonZeroUsize,
    /// `DEDUPD_REDIS_MAX_VALUE`, default 1 MiB: longest key or value in a Redis command.
    pub redis_max_value: u64,
    /// `DEDUPD_REDIS_SCRIPT_TIMEOUT`, default 5 s (Redis' `busy-reply-threshold`): longest a
    /// Lua script may run before it is killed and its writes undone.
    pub redis_script_timeout: Duration,
}

/// A password or token: usable as a `&str`, but its `Debug` never shows it, so a `{:?}` of the
/// configuration cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl std::ops::Deref for Secret {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl Secret {
    /// Whether `given` is this secret. Both are hashed (SHA-256) and the digests compared in
    /// constant time, so neither the first differing byte nor the length shows in the timing.
    pub fn matches(&self, given: &[u8]) -> bool {
        use sha2::{Digest, Sha256};
        let (want, got) = (Sha256::digest(self.0.as_bytes()), Sha256::digest(given));
        subtle::ConstantTimeEq::ct_eq(want.as_slice(), got.as_slice()).into()
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Secret {
        Secret(s)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A configuration variable that stops start-up. Displays as one line naming the variable, the
/// value and the expected form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A value that does not parse or is out of range.
    #[error("invalid {var}={value:?}: expected {expected}")]
    Invalid {
        /// The variable.
        var: String,
        /// Its value (a broker URL with its password masked).
        value: String,
        /// What would have been accepted.
        expected: String,
    },
    /// A `DEDUPD_*` name dedupd does not know (a typo, most likely).
    #[error(
        "unknown variable {var}={value:?}: expected one of the variables `dedupd --help` lists"
    )]
    Unknown {
        /// The variable.
        var: String,
        /// Its value.
        value: String,
    },
    /// Two variables that exclude each other are both set.
    #[error("{var} is set together with {other}: expected only one of them")]
    Conflict {
        /// The variable.
        var: String,
        /// The one it conflicts with.
        other: String,
    },
}

impl Config {
    /// The configuration from the process environment.
    ///
    /// # Errors
    ///
    /// As [`Config::from_vars`]; a `DEDUPD_*` value that is not UTF-8 is invalid too.
    pub fn from_env() -> Result<Config, ConfigError> {
        let mut vars = Vec::new();
        for (key, value) in std::env::vars_os() {
            let Some(key) = key.to_str().filter(|k| k.starts_with(PREFIX)) else {
                continue;
            };
            let value = value.into_string().map_err(|v| ConfigError::Invalid {
                var: key.to_string(),
                value: v.to_string_lossy().into_owned(),
                expected: "UTF-8 text".into(),
            })?;
            vars.push((key.to_string(), value));
        }
        Config::from_vars(vars)
    }

    /// The configuration from `(name, value)` pairs; names without the `DEDUPD_` prefix are
    /// ignored, unset variables take their defaults.
    ///
    /// # Errors
    ///
    /// The first bad variable (in [`VARS`] order): an unknown `DEDUPD_*` name, a value that does
    /// not parse, or both `DEDUPD_AMQP_URL` and `DEDUPD_AMQP_URL_FILE`.
    pub fn from_vars<I, K, V>(vars: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let mut set = BTreeMap::new();
        for (key, value) in vars {
            let key = key.into();
            if !key.starts_with(PREFIX) {
                continue;
            }
            let value = value.into();
            if !VARS.iter().any(|v| v.name == key) {
                return Err(ConfigError::Unknown { var: key, value });
            }
            set.insert(key, value);
        }
        let vars = Vars(set);

        let amqp_url = match vars.secret(AMQP_URL, AMQP_URL_FILE, "the broker URL")? {
            Some(text) if vars.get(AMQP_URL_FILE).is_some() => {
                AmqpUrl::parse(&text).map_err(|expected| ConfigError::Invalid {
                    var: AMQP_URL_FILE.into(),
                    value: vars.get(AMQP_URL_FILE).unwrap_or_default().into(),
                    expected: format!("a file holding an amqp:// URL ({expected})"),
                })?
            }
            url => {
                let url = url.as_deref().unwrap_or(DEFAULT_AMQP_URL);
                AmqpUrl::parse(url).map_err(|expected| ConfigError::Invalid {
                    var: AMQP_URL.into(),
                    value: redact_url(url),
                    expected,
                })?
            }
        };
        let admin_token = vars.secret(ADMIN_TOKEN, ADMIN_TOKEN_FILE, "the admin token")?;

        let source_queue = vars.parse(SOURCE_QUEUE, "dedupd.in", |v| {
            // The dead-letter queue's name adds `.dead`, and must fit a short string too.
            name(v, ".dead".len())
        })?;
        let dest_exchange = vars.parse(DEST_EXCHANGE, "dedupd.out", |v| name(v, 0))?;
        let dest_exchange_type = vars.parse(DEST_EXCHANGE_TYPE, "fanout", exchange_type)?;
        let dest_routing_key = vars.parse_opt(DEST_ROUTING_KEY, short_str)?;
        let declare = vars.parse(DECLARE, "true", boolean)?;
        let data_dir = vars.parse(DATA_DIR, "./data", |v| {
            if v.is_empty() {
                Err("a directory path".into())
            } else {
                Ok(PathBuf::from(v))
            }
        })?;
        let ttl = vars.parse(TTL, "24h", |v| duration(v, false))?;
        let ttl_header = vars.parse(TTL_HEADER, "x-dedup-ttl", |v| match v {
            "off" => Ok(None),
            _ => header_name(v)
                .map(Some)
                .ok_or_else(|| "a header name of 1 to 255 bytes, or off".into()),
        })?;
        let max_ttl = vars
            .parse_opt(MAX_TTL, |v| {
                duration(v, false).and_then(|max| {
                    if max < ttl {
                        Err(format!(
                            "a duration at least {TTL} ({}): the default window must fit under \
                             the cap",
                            humantime::format_duration(ttl)
                        ))
                    } else {
                        Ok(max)
                    }
                })
            })?
            .unwrap_or(ttl);
        let id_source = vars.parse(ID_SOURCE, "message_id", id_source)?;
        let id_scope = vars.parse(ID_SCOPE, "none", id_scope)?;
        let missing_id = vars.parse(MISSING_ID, "dead-letter", missing_id)?;
        // Hashed ids have a fixed length, which the limit must leave room for.
        let hashed = id_source.parts().len() > 1 || id_scope != IdScope::None;
        let min_id_bytes = if hashed { HASHED_ID_BYTES } else { 1 };
        let max_id_bytes = vars.parse(MAX_ID_BYTES, "256", |v| {
            v.parse::<NonZeroUsize>()
                .ok()
                .filter(|n| n.get() <= MAX_ID_LIMIT && n.get() >= min_id_bytes)
                .ok_or_else(|| {
                    if hashed {
                        format!(
                            "a byte count from {HASHED_ID_BYTES} to {MAX_ID_LIMIT}: with several \
                             id parts or a scope, ids are {HASHED_ID_BYTES}-byte hex SHA-256 digests"
                        )
                    } else {
                        format!("a byte count from 1 to {MAX_ID_LIMIT}")
                    }
                })
        })?;
        let prefetch = vars.parse(PREFETCH, "1000", |v| {
            v.parse::<NonZeroU16>()
                .map_err(|_| "a message count from 1 to 65535".into())
        })?;
        let queue_type = vars.parse(QUEUE_TYPE, "classic", |v| match v {
            "classic" | "quorum" => Ok(v == "quorum"),
            _ => Err("classic or quorum".into()),
        })?;
        let delivery_limit = vars.parse_opt(DELIVERY_LIMIT, |v| {
            if !queue_type {
                return Err(format!(
                    "no value: only a quorum queue has a delivery limit ({QUEUE_TYPE}=quorum)"
                ));
            }
            v.parse::<NonZeroU32>()
                .map_err(|_| "a number of deliveries from 1 to 4294967295".into())
        })?;
        let queue_type = if queue_type {
            QueueType::Quorum {
                delivery_limit: delivery_limit.unwrap_or(QueueType::DEFAULT_DELIVERY_LIMIT),
            }
        } else {
            QueueType::Classic
        };
        let duplicates_exchange = vars
            .parse_opt(DUPLICATES_EXCHANGE, |v| {
                if v.is_empty() {
                    Ok(None)
                } else {
                    name(v, 0).map(Some)
                }
            })?
            .flatten();
        let confirm_timeout = vars.parse(CONFIRM_TIMEOUT, "30s", |v| duration(v, false))?;
        let shutdown_grace = vars.parse(SHUTDOWN_GRACE, "10s", |v| duration(v, true))?;
        let metrics_addr = vars.parse(METRICS_ADDR, "127.0.0.1:9476", |v| {
            if v == "off" {
                Ok(None)
            } else {
                v.parse::<SocketAddr>()
                    .map(Some)
                    .map_err(|_| "an address like 127.0.0.1:9476, or off".into())
            }
        })?;
        let log = vars.parse(LOG, "info", |v| {
            tracing_subscriber::EnvFilter::try_new(v)
                .map(|_| v.to_string())
                .map_err(|e| format!("a tracing filter like info or dedupd=debug,warn ({e})"))
        })?;
        let log_format = vars.parse(LOG_FORMAT, "text", |v| match v {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err("text or json".into()),
        })?;
        let expected_ids = vars.parse(EXPECTED_IDS, "1000000", |v| {
            v.replace('_', "")
                .parse::<NonZeroU64>()
                .map_err(|_| "a positive whole number like 1000000".into())
        })?;
        let bloom_fp_rate = vars.parse(BLOOM_FP_RATE, "0.01", |v| {
            v.parse::<f64>()
                .ok()
                .filter(|r| *r > 0.0 && *r < 1.0)
                .ok_or_else(|| "a fraction between 0 and 1, like 0.01".into())
        })?;
        let cache_bytes = vars.parse(CACHE_SIZE, "64M", size)?;
        let amqp_tls = tls_files(&vars, amqp_url.tls)?;
        let relay = vars.parse(RELAY, "on", |v| match v {
            "on" => Ok(true),
            "off" => Ok(false),
            _ => Err("on or off".into()),
        })?;
        let redis_addr = vars.parse(REDIS_ADDR, "off", |v| {
            if v == "off" {
                Ok(None)
            } else {
                v.parse::<SocketAddr>()
                    .map(Some)
                    .map_err(|_| "an address like 127.0.0.1:6380, or off".into())
            }
        })?;
        let redis_password = vars.secret(
            REDIS_PASSWORD,
            REDIS_PASSWORD_FILE,
            "the Redis endpoint password",
        )?;
        // Like Redis' protected mode: other hosts may reach only an endpoint with a password.
        if let Some(addr) = redis_addr.filter(|a| !a.ip().is_loopback()) {
            if redis_password.is_none() {
                return Err(ConfigError::Invalid {
                    var: REDIS_ADDR.into(),
                    value: addr.to_string(),
                    expected: format!(
                        "a loopback address, or {REDIS_PASSWORD} (or {REDIS_PASSWORD_FILE}) set: \
                         a non-loopback Redis endpoint needs a password"
                    ),
                });
            }
        }
        let redis_max_clients = vars.parse(REDIS_MAX_CLIENTS, "10000", |v| {
            v.parse::<NonZeroUsize>()
                .map_err(|_| "a positive number of connections like 10000".into())
        })?;
        let redis_max_value = vars.parse(REDIS_MAX_VALUE, "1M", size)?;
        let redis_script_timeout =
            vars.parse(REDIS_SCRIPT_TIMEOUT, "5s", |v| duration(v, false))?;

        Ok(Config {
            amqp_url,
            amqp_tls,
            source_queue,
            dest_exchange,
            dest_exchange_type,
            dest_routing_key,
            declare,
            data_dir,
            ttl,
            ttl_header,
            max_ttl,
            id_source,
            id_scope,
            missing_id,
            max_id_bytes,
            prefetch,
            queue_type,
            duplicates_exchange,
            confirm_timeout,
            shutdown_grace,
            metrics_addr,
            admin_token,
            log,
            log_format,
            expected_ids,
            bloom_fp_rate,
            cache_bytes,
            relay,
            redis_addr,
            redis_password,
            redis_max_clients,
            redis_max_value,
            redis_script_timeout,
        })
    }

    /// Whether ids are hashed: several parts, or a scope. Each is then the SHA-256 of its
    /// length-prefixed parts, as [`HASHED_ID_BYTES`] hex digits.
    pub fn ids_hashed(&self) -> bool {
        self.id_source.parts().len() > 1 || self.id_scope != IdScope::None
    }

    /// The dead-letter exchange of the source queue: `<source>.dlx`.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.source_queue)
    }

    /// The queue bound to the dead-letter exchange: `<source>.dead`.
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead", self.source_queue)
    }

    /// The effective value of every variable, secrets masked, for `dedupd config`.
    pub fn effective(&self) -> Vec<(&'static str, String)> {
        let dur = |d: Duration| humantime::format_duration(d).to_string();
        let or_unset = |v: &Option<String>| v.clone().unwrap_or_else(|| "(unset)".into());
        let or_off = |v: &Option<String>| v.clone().unwrap_or_else(|| "off".into());
        vec![
            (AMQP_URL, self.amqp_url.to_string()),
            (AMQP_CA_FILE, path_or_unset(&self.amqp_tls.ca_file)),
            (
                AMQP_CERT_FILE,
                path_or_unset(&self.amqp_tls.client.as_ref().map(|c| c.0.clone())),
            ),
            (
                AMQP_KEY_FILE,
                path_or_unset(&self.amqp_tls.client.as_ref().map(|c| c.1.clone())),
            ),
            (SOURCE_QUEUE, self.source_queue.clone()),
            (DEST_EXCHANGE, self.dest_exchange.clone()),
            (DEST_EXCHANGE_TYPE, self.dest_exchange_type.clone()),
            (DEST_ROUTING_KEY, or_unset(&self.dest_routing_key)),
            (DECLARE, self.declare.to_string()),
            (DATA_DIR, self.data_dir.display().to_string()),
            (TTL, dur(self.ttl)),
            (TTL_HEADER, or_off(&self.ttl_header)),
            (MAX_TTL, dur(self.max_ttl)),
            (ID_SOURCE, self.id_source.to_string()),
            (ID_SCOPE, self.id_scope.to_string()),
            (
                MISSING_ID,
                match self.missing_id {
                    MissingId::DeadLetter => "dead-letter",
                    MissingId::Forward => "forward",
                    MissingId::BodySha256 => "body-sha256",
                }
                .into(),
            ),
            (MAX_ID_BYTES, self.max_id_bytes.to_string()),
            (PREFETCH, self.prefetch.to_string()),
            (QUEUE_TYPE, self.queue_type.name().into()),
            (
                DELIVERY_LIMIT,
                self.queue_type
                    .delivery_limit()
                    .map_or("(unset)".into(), |n| n.to_string()),
            ),
            (DUPLICATES_EXCHANGE, or_unset(&self.duplicates_exchange)),
            (CONFIRM_TIMEOUT, dur(self.confirm_timeout)),
            (SHUTDOWN_GRACE, dur(self.shutdown_grace)),
            (
                METRICS_ADDR,
                self.metrics_addr.map_or("off".into(), |a| a.to_string()),
            ),
            (
                ADMIN_TOKEN,
                self.admin_token
                    .as_ref()
                    .map_or("(unset)", |_| "***")
                    .into(),
            ),
            (LOG, self.log.clone()),
            (
                LOG_FORMAT,
                match self.log_format {
                    LogFormat::Text => "text",
                    LogFormat::Json => "json",
                }
                .into(),
            ),
            (EXPECTED_IDS, self.expected_ids.to_string()),
            (BLOOM_FP_RATE, self.bloom_fp_rate.to_string()),
            (CACHE_SIZE, self.cache_bytes.to_string()),
            (RELAY, if self.relay { "on" } else { "off" }.into()),
            (
                REDIS_ADDR,
                self.redis_addr.map_or("off".into(), |a| a.to_string()),
            ),
            (
                REDIS_PASSWORD,
                self.redis_password
                    .as_ref()
                    .map_or("(unset)", |_| "***")
                    .into(),
            ),
            (REDIS_MAX_CLIENTS, self.redis_max_clients.to_string()),
            (REDIS_MAX_VALUE, self.redis_max_value.to_string()),
            (REDIS_SCRIPT_TIMEOUT, dur(self.redis_script_timeout)),
        ]
    }

    /// The store settings this configuration asks for.
    pub fn store_config(&self) -> StoreConfig {
        let mut store = StoreConfig::new(&self.data_dir);
        store.ttl = self.ttl;
        store.expected_ids = self.expected_ids.get();
        store.fp_rate = self.bloom_fp_rate;
        store.cache_bytes = self.cache_bytes;
        store.max_id_bytes = self.max_id_bytes.get();
        store
    }
}

/// The set `DEDUPD_*` variables, with parsing that names the variable on failure.
struct Vars(BTreeMap<String, String>);

impl Vars {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// Parses `name`'s value, or `default` when unset; `parse` says the expected form on error.
    fn parse<T>(
        &self,
        name: &str,
        default: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        let value = self.get(name).unwrap_or(default);
        parse(value).map_err(|expected| ConfigError::Invalid {
            var: name.into(),
            value: value.into(),
            expected,
        })
    }

    /// A secret given in `var` or, for systemd credentials, in the file `file_var` names (its
    /// content trimmed); never both. The value never appears in an error.
    fn secret(&self, var: &str, file_var: &str, what: &str) -> Result<Option<Secret>, ConfigError> {
        match (self.get(var), self.get(file_var)) {
            (Some(_), Some(_)) => Err(ConfigError::Conflict {
                var: file_var.into(),
                other: var.into(),
            }),
            (_, Some(path)) => match std::fs::read_to_string(path) {
                Ok(text) if !text.trim().is_empty() => Ok(Some(Secret(text.trim().to_string()))),
                Ok(_) => Err(ConfigError::Invalid {
                    var: file_var.into(),
                    value: path.into(),
                    expected: format!("a file holding {what} (it is empty)"),
                }),
                Err(e) => Err(ConfigError::Invalid {
                    var: file_var.into(),
                    value: path.into(),
                    expected: format!("a readable file holding {what} ({e})"),
                }),
            },
            (Some(""), None) => Err(ConfigError::Invalid {
                var: var.into(),
                value: String::new(),
                expected: format!("{what}, not empty"),
            }),
            (value, None) => Ok(value.map(|v| Secret(v.to_string()))),
        }
    }

    /// Parses `name`'s value if set.
    fn parse_opt<T>(
        &self,
        name: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        match self.get(name) {
            None => Ok(None),
            Some(value) => parse(value)
                .map(Some)
                .map_err(|expected| ConfigError::Invalid {
                    var: name.into(),
                    value: value.into(),
                    expected,
                }),
        }
    }
}

fn short_str(v: &str) -> Result<String, String> {
    if v.len() > SHORT_STR_MAX {
        Err(format!("at most {SHORT_STR_MAX} bytes"))
    } else {
        Ok(v.to_string())
    }
}

/// A queue or exchange name: non-empty, and short enough that `reserve` more bytes still fit.
fn name(v: &str, reserve: usize) -> Result<String, String> {
    let max = SHORT_STR_MAX - reserve;
    if v.is_empty() || v.len() > max {
        Err(format!("a name of 1 to {max} bytes"))
    } else {
        Ok(v.to_string())
    }
}

fn exchange_type(v: &str) -> Result<String, String> {
    match v {
        "direct" | "fanout" | "topic" | "headers" => Ok(v.to_string()),
        _ if v.starts_with("x-") && v.len() > 2 && v.len() <= SHORT_STR_MAX => Ok(v.to_string()),
        _ => Err("direct, fanout, topic, headers or a plugin type x-…".into()),
    }
}

fn boolean(v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err("true or false".into()),
    }
}

fn duration(v: &str, zero_ok: bool) -> Result<Duration, String> {
    let expected = || {
        format!(
            "a {}duration like 90s, 15m, 24h or 7d",
            if zero_ok { "" } else { "non-zero " }
        )
    };
    match humantime::parse_duration(v) {
        Ok(d) if zero_ok || d.as_millis() > 0 => Ok(d),
        _ => Err(expected()),
    }
}

fn id_source(v: &str) -> Result<IdSource, String> {
    let expected = || {
        "message_id, header:<name>, json:/<pointer> or body-sha256, or several of them joined \
         by + (a header name or pointer cannot hold a +)"
            .to_string()
    };
    let parts = v
        .split('+')
        .map(|part| match part {
            "message_id" => Ok(IdPart::MessageId),
            "body-sha256" => Ok(IdPart::BodySha256),
            _ => {
                if let Some(h) = part.strip_prefix("header:") {
                    header_name(h).map(IdPart::Header).ok_or_else(expected)
                } else if let Some(pointer) = part.strip_prefix("json:") {
                    json_pointer(pointer).map(IdPart::Json)
                } else {
                    Err(expected())
                }
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    if parts
        .iter()
        .enumerate()
        .any(|(i, p)| parts[..i].contains(p))
    {
        return Err(format!("{} (each part once)", expected()));
    }
    Ok(IdSource::new(parts))
}

/// A header name: 1 to 255 bytes (an AMQP short string).
fn header_name(h: &str) -> Option<String> {
    (!h.is_empty() && h.len() <= SHORT_STR_MAX).then(|| h.to_string())
}

/// An RFC 6901 JSON pointer to a field: `/` then reference tokens separated by `/`, in which `~`
/// is only ever `~0` (a `~`) or `~1` (a `/`).
fn json_pointer(p: &str) -> Result<String, String> {
    let bad_escape = p
        .split('~')
        .skip(1)
        .any(|after| !after.starts_with('0') && !after.starts_with('1'));
    if !p.starts_with('/') || bad_escape {
        return Err(format!(
            "json: followed by an RFC 6901 pointer like /order/id (starting with /, ~ only as \
             ~0 or ~1), not {p:?}"
        ));
    }
    Ok(p.to_string())
}

fn id_scope(v: &str) -> Result<IdScope, String> {
    match v {
        "none" => Ok(IdScope::None),
        "routing_key" => Ok(IdScope::RoutingKey),
        _ => v
            .strip_prefix("header:")
            .and_then(header_name)
            .map(IdScope::Header)
            .ok_or_else(|| "none, routing_key or header:<name>".into()),
    }
}

fn missing_id(v: &str) -> Result<MissingId, String> {
    match v {
        "dead-letter" => Ok(MissingId::DeadLetter),
        "forward" => Ok(MissingId::Forward),
        "body-sha256" => Ok(MissingId::BodySha256),
        _ => Err("dead-letter, forward or body-sha256".into()),
    }
}

/// A size: bytes, or a number with a binary suffix `K`, `M`, `G`, `T` (`KiB`, `MB`... accepted).
fn size(v: &str) -> Result<u64, String> {
    let expected = || "a size like 512K, 64M, 1G or a byte count".to_string();
    let digits = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (number, unit) = v.split_at(digits);
    let number: u64 = number.parse().map_err(|_| expected())?;
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(expected()),
    };
    number
        .checked_mul(1 << shift)
        .filter(|n| *n > 0)
        .ok_or_else(expected)
}

/// The files for TLS to the broker. Read at each connection, so renewed certificates are used
/// from the next reconnect on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// `DEDUPD_AMQP_CA_FILE`: CA certificates (PEM) trusted instead of the system's store.
    pub ca_file: Option<PathBuf>,
    /// `DEDUPD_AMQP_CERT_FILE` and `DEDUPD_AMQP_KEY_FILE`: the client certificate chain and its
    /// private key (PEM), for a broker that requires mutual TLS.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// The TLS files from their variables. Each must be a readable PEM file of the right kind, the
/// certificate and the key go together, and none is accepted with a plain `amqp://` URL: a
/// setting that says "TLS" must never leave the connection in plaintext without a word.
fn tls_files(vars: &Vars, url_is_tls: bool) -> Result<TlsFiles, ConfigError> {
    let pem = |var: &str, marker: &'static str, what: &'static str| {
        vars.parse_opt(var, |path| {
            if !url_is_tls {
                return Err(format!(
                    "{what} for an amqps:// broker URL, but {AMQP_URL} is amqp:// (plaintext)"
                ));
            }
            let text = std::fs::read(path)
                .map_err(|e| format!("a readable PEM file holding {what} ({e})"))?;
            if !String::from_utf8_lossy(&text).contains(marker) {
                return Err(format!("a PEM file holding {what} (no `{marker}` in it)"));
            }
            Ok(PathBuf::from(path))
        })
    };
    const CERT: &str = "-----BEGIN CERTIFICATE-----";
    let ca_file = pem(AMQP_CA_FILE, CERT, "CA certificates")?;
    let cert = pem(AMQP_CERT_FILE, CERT, "a client certificate")?;
    let key = pem(AMQP_KEY_FILE, "PRIVATE KEY-----", "a private key")?;
    let client = match (cert, key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        (Some(_), None) => return Err(missing_pair(vars, AMQP_CERT_FILE, AMQP_KEY_FILE)),
        (None, Some(_)) => return Err(missing_pair(vars, AMQP_KEY_FILE, AMQP_CERT_FILE)),
    };
    Ok(TlsFiles { ca_file, client })
}

/// The error for one half of the client certificate set without the other.
fn missing_pair(vars: &Vars, set: &str, unset: &str) -> ConfigError {
    ConfigError::Invalid {
        var: set.into(),
        value: vars.get(set).unwrap_or_default().into(),
        expected: format!("{unset} set too (mutual TLS needs the certificate and its key)"),
    }
}

fn path_or_unset(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map_or_else(|| "(unset)".into(), |p| p.display().to_string())
}

/// The broker's address and credentials. Its `Debug` and `Display` mask the password.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpUrl {
    /// `amqps://`: TLS, with the broker's certificate verified for `host`.
    pub tls: bool,
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// User name.
    pub user: String,
    password: String,
    /// Virtual host.
    pub vhost: String,
    /// Heartbeat in seconds from `?heartbeat=`, if given.
    pub heartbeat: Option<u16>,
    /// Connection timeout from `?connection_timeout=` (milliseconds, as the URI spec says).
    pub connection_timeout: Option<Duration>,
}

impl AmqpUrl {
    /// Parses `amqp://user:password@host:port/vhost?heartbeat=N&connection_timeout=MS`, with
    /// percent-decoding of user, password and vhost (`%2f` is the default vhost `/`). A missing
    /// user or password is `guest`, a missing port 5672 (5671 for `amqps://`), a missing vhost
    /// `/`.
    ///
    /// # Errors
    ///
    /// The expected form, for the config error.
    pub fn parse(url: &str) -> Result<AmqpUrl, String> {
        const FORM: &str = "amqp://user:password@host:port/vhost";
        let bad = |why: &str| format!("a URL like {FORM} ({why})");
        let (tls, rest) = match url.split_once("://") {
            Some(("amqp", rest)) => (false, rest),
            Some(("amqps", rest)) => (true, rest),
            _ => return Err(bad("scheme must be amqp or amqps")),
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            None => ("guest".to_string(), "guest".to_string()),
            Some(u) => {
                let (user, pass) = u.split_once(':').unwrap_or((u, "guest"));
                (
                    percent_decode(user).ok_or_else(|| bad("bad percent-encoding in user"))?,
                    percent_decode(pass).ok_or_else(|| bad("bad percent-encoding in password"))?,
                )
            }
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
            (host, after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = match port {
            None | Some("") if tls => 5671,
            None | Some("") => 5672,
            Some(p) => p.parse().map_err(|_| bad("port is not a number"))?,
        };
        let vhost = match path {
            None | Some("") => "/".to_string(),
            Some(p) => percent_decode(p).ok_or_else(|| bad("bad percent-encoding in vhost"))?,
        };
        let mut heartbeat = None;
        let mut connection_timeout = None;
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            if pair.is_empty() {
                continue;
            }
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| bad("query parameters must be key=value"))?;
            match k {
                "heartbeat" => {
                    heartbeat = Some(v.parse().map_err(|_| bad("heartbeat is not a number"))?)
                }
                "connection_timeout" => {
                    let ms: u64 = v
                        .parse()
                        .map_err(|_| bad("connection_timeout is not a number"))?;
                    connection_timeout = Some(Duration::from_millis(ms));
                }
                // Other URI-spec parameters (channel_max, auth_mechanism...) keep their defaults.
                _ => {}
            }
        }
        Ok(AmqpUrl {
            tls,
            host: host.to_string(),
            port,
            user,
            password,
            vhost,
            heartbeat,
            connection_timeout,
        })
    }

    /// The password, for opening the connection (and nothing else).
    pub fn password(&self) -> &str {
        &self.password
    }
}

impl fmt::Display for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        write!(
            f,
            "{}://{}:***@{}:{}/{}",
            if self.tls { "amqps" } else { "amqp" },
            self.user,
            host,
            self.port,
            self.vhost.replace('%', "%25").replace('/', "%2f")
        )
    }
}

impl fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AmqpUrl({self})")
    }
}

/// `s` with `%XX` escapes decoded; `None` for a bad escape or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A URL as given, with the password (if any) masked, for error messages.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{scheme}://{user}:***@{host}{tail}")
        }
        None => url.to_string(),
    }
}

/// The variables as a Markdown table: the text of README's configuration table, and of `--help`.
pub fn markdown_table() -> String {
    let mut out = String::from("| variable | default | meaning |\n|---|---|---|\n");
    for v in VARS {
        let default = match v.default {
            DefaultValue::Value(d) => format!("`{d}`"),
            DefaultValue::Unset(meaning) => format!("(unset: {meaning})"),
        };
        out.push_str(&format!("| `{}` | {} | {} |\n", v.name, default, v.doc));
    }
    out
}

/// The configuration part of `dedupd --help` (the usage above it is the binary's).
pub fn help() -> String {
    format!(
        "Configured by DEDUPD_* environment variables only:\n\n{}",
        markdown_table()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_vars(vars.iter().copied())
    }

    /// The error for one bad variable; its one-line message names variable, value and form.
    fn refused(name: &str, value: &str) -> String {
        let err = parse(&[(name, value)]).expect_err("should be refused");
        let line = err.to_string();
        assert!(!line.contains('\n'), "one line: {line}");
        assert!(line.contains(name), "names the variable: {line}");
        assert!(line.contains("expected"), "says the expected form: {line}");
        line
    }

    #[test]
    fn defaults_run_against_the_local_broker() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.amqp_url.host, "127.0.0.1");
        assert_eq!(c.amqp_url.port, 5672);
        assert_eq!(c.amqp_url.user, "guest");
        assert_eq!(c.amqp_url.password(), "guest");
        assert_eq!(c.amqp_url.vhost, "/");
        assert_eq!(c.source_queue, "dedupd.in");
        assert_eq!(c.dest_exchange, "dedupd.out");
        assert_eq!(c.dest_exchange_type, "fanout");
        assert_eq!(c.dest_routing_key, None);
        assert!(c.declare);
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert_eq!(c.ttl, Duration::from_secs(86400));
        assert_eq!(c.id_source, IdSource::single(IdPart::MessageId));
        assert_eq!(c.id_scope, IdScope::None);
        assert!(!c.ids_hashed());
        assert_eq!(c.missing_id, MissingId::DeadLetter);
        assert_eq!(c.max_id_bytes.get(), 256);
        assert_eq!(c.prefetch.get(), 1000);
        assert_eq!(c.queue_type, QueueType::Classic);
        assert_eq!(c.duplicates_exchange, None);
        assert_eq!(c.confirm_timeout, Duration::from_secs(30));
        assert_eq!(c.shutdown_grace, Duration::from_secs(10));
        assert_eq!(c.metrics_addr, Some("127.0.0.1:9476".parse().unwrap()));
        assert_eq!(c.log, "info");
        assert_eq!(c.expected_ids.get(), 1_000_000);
        assert_eq!(c.bloom_fp_rate, 0.01);
        assert_eq!(c.cache_bytes, 64 << 20);
        assert_eq!(c.dead_letter_exchange(), "dedupd.in.dlx");
        assert_eq!(c.dead_letter_queue(), "dedupd.in.dead");
    }

    #[test]
    fn quorum_takes_a_delivery_limit_of_20_unless_told() {
        let c = parse(&[("DEDUPD_QUEUE_TYPE", "quorum")]).unwrap();
        assert_eq!(c.queue_type.name(), "quorum");
        assert_eq!(c.queue_type.delivery_limit().map(|n| n.get()), Some(20));
        let c = parse(&[
            ("DEDUPD_QUEUE_TYPE", "quorum"),
            ("DEDUPD_DELIVERY_LIMIT", "2"),
        ])
        .unwrap();
        assert_eq!(c.queue_type.delivery_limit().map(|n| n.get()), Some(2));
        refused("DEDUPD_QUEUE_TYPE", "stream");
        // A limit the broker would not apply is refused rather than ignored.
        let line = refused("DEDUPD_DELIVERY_LIMIT", "5");
        assert!(line.contains("DEDUPD_QUEUE_TYPE=quorum"), "{line}");
        let err = parse(&[
            ("DEDUPD_QUEUE_TYPE", "quorum"),
            ("DEDUPD_DELIVERY_LIMIT", "0"),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("DEDUPD_DELIVERY_LIMIT"), "{err}");
    }

    #[test]
    fn every_default_in_the_table_parses_to_the_default_config() {
        // Setting each variable to its documented default changes nothing.
        let explicit: Vec<(&str, &str)> = VARS
            .iter()
            .filter_map(|v| match v.default {
                DefaultValue::Value(d) => Some((v.name, d)),
                DefaultValue::Unset(_) => None,
            })
            .collect();
        let a = parse(&explicit).unwrap();
        let b = parse(&[]).unwrap();
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
    }

    #[test]
    fn values_are_parsed_into_types() {
        let c = parse(&[
            (
                "DEDUPD_AMQP_URL",
                "amqp://u%40x:p%3Ass@rabbit:5673/prod?heartbeat=10",
            ),
            ("DEDUPD_DEST_ROUTING_KEY", ""),
            ("DEDUPD_DECLARE", "false"),
            ("DEDUPD_TTL", "7d"),
            ("DEDUPD_ID_SOURCE", "header:x-id"),
            ("DEDUPD_MISSING_ID", "body-sha256"),
            ("DEDUPD_DUPLICATES_EXCHANGE", "audit"),
            ("DEDUPD_METRICS_ADDR", "off"),
            ("DEDUPD_CACHE_SIZE", "1G"),
            ("DEDUPD_SHUTDOWN_GRACE", "0s"),
            ("PATH", "/bin"),
        ])
        .unwrap();
        assert_eq!(c.amqp_url.user, "u@x");
        assert_eq!(c.amqp_url.password(), "p:ss");
        assert_eq!(c.amqp_url.host, "rabbit");
        assert_eq!(c.amqp_url.port, 5673);
        assert_eq!(c.amqp_url.vhost, "prod");
        assert_eq!(c.amqp_url.heartbeat, Some(10));
        assert_eq!(c.dest_routing_key.as_deref(), Some(""));
        assert!(!c.declare);
        assert_eq!(c.ttl, Duration::from_secs(7 * 86400));
        assert_eq!(c.id_source, IdSource::single(IdPart::Header("x-id".into())));
        assert_eq!(c.missing_id, MissingId::BodySha256);
        assert_eq!(c.duplicates_exchange.as_deref(), Some("audit"));
        assert_eq!(c.metrics_addr, None);
        assert_eq!(c.cache_bytes, 1 << 30);
        assert_eq!(c.shutdown_grace, Duration::ZERO);
    }

    #[test]
    fn redis_endpoint_settings_parse() {
        let c = parse(&[]).unwrap();
        assert!(c.relay);
        assert_eq!(c.redis_addr, None);
        assert_eq!(c.redis_password, None);
        assert_eq!(c.redis_max_clients.get(), 10_000);
        assert_eq!(c.redis_max_value, 1 << 20);
        assert_eq!(c.redis_script_timeout, Duration::from_secs(5));
        let c = parse(&[
            ("DEDUPD_RELAY", "off"),
            ("DEDUPD_REDIS_ADDR", "0.0.0.0:6380"),
            ("DEDUPD_REDIS_PASSWORD", "s3cret"),
            ("DEDUPD_REDIS_MAX_VALUE", "4K"),
        ])
        .unwrap();
        assert!(!c.relay);
        assert_eq!(c.redis_addr, Some("0.0.0.0:6380".parse().unwrap()));
        assert_eq!(c.redis_password.as_deref(), Some("s3cret"));
        // Debug output (a stray `{:?}` in a log line) never shows a secret.
        assert!(!format!("{c:?}").contains("s3cret"), "{c:?}");
        assert_eq!(c.redis_max_value, 4096);
        let shown = format!("{:?}", c.effective());
        assert!(!shown.contains("s3cret"), "{shown}");
        refused("DEDUPD_RELAY", "maybe");
        refused("DEDUPD_REDIS_ADDR", "localhost");
        refused("DEDUPD_REDIS_MAX_CLIENTS", "0");
        refused("DEDUPD_REDIS_SCRIPT_TIMEOUT", "0s");
    }

    #[test]
    fn non_loopback_redis_endpoint_needs_a_password() {
        let line = refused("DEDUPD_REDIS_ADDR", "0.0.0.0:6380");
        assert!(line.contains("DEDUPD_REDIS_PASSWORD"), "{line}");
        assert!(parse(&[("DEDUPD_REDIS_ADDR", "127.0.0.1:6380")]).is_ok());
        assert!(parse(&[("DEDUPD_REDIS_ADDR", "[::1]:6380")]).is_ok());
    }

    #[test]
    fn bad_duration_is_refused() {
        let line = refused("DEDUPD_TTL", "banana");
        assert!(line.contains("banana") && line.contains("90s"), "{line}");
    }

    #[test]
    fn zero_ttl_is_refused() {
        refused("DEDUPD_TTL", "0s");
    }

    #[test]
    fn ttl_header_and_its_cap_parse() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.ttl_header.as_deref(), Some("x-dedup-ttl"));
        assert_eq!(
            c.max_ttl, c.ttl,
            "without a cap a header may only shorten the window"
        );
        let c = parse(&[
            ("DEDUPD_TTL", "1h"),
            ("DEDUPD_TTL_HEADER", "x-cache-ttl"),
            ("DEDUPD_MAX_TTL", "7d"),
        ])
        .unwrap();
        assert_eq!(c.ttl_header.as_deref(), Some("x-cache-ttl"));
        assert_eq!(c.max_ttl, Duration::from_secs(7 * 86400));
        let shown: BTreeMap<_, _> = c.effective().into_iter().collect();
        assert_eq!(shown["DEDUPD_MAX_TTL"], "7days");
        let c = parse(&[("DEDUPD_TTL_HEADER", "off")]).unwrap();
        assert_eq!(c.ttl_header, None);
        assert_eq!(
            c.effective()
                .iter()
                .find(|(k, _)| *k == "DEDUPD_TTL_HEADER")
                .unwrap()
                .1,
            "off"
        );
        refused("DEDUPD_TTL_HEADER", "");
        refused("DEDUPD_TTL_HEADER", &"h".repeat(256));
        refused("DEDUPD_MAX_TTL", "0s");
        // A cap under the default window would make the default itself over the cap.
        let line = refused("DEDUPD_MAX_TTL", "1h");
        assert!(line.contains("DEDUPD_TTL"), "{line}");
    }

    #[test]
    fn bad_numbers_are_refused() {
        refused("DEDUPD_PREFETCH", "0");
        refused("DEDUPD_PREFETCH", "70000");
        refused("DEDUPD_MAX_ID_BYTES", "0");
        refused("DEDUPD_MAX_ID_BYTES", "65536");
        refused("DEDUPD_EXPECTED_IDS", "lots");
        refused("DEDUPD_BLOOM_FP_RATE", "1.5");
        refused("DEDUPD_CACHE_SIZE", "64Q");
    }

    #[test]
    fn bad_enums_are_refused() {
        refused("DEDUPD_ID_SOURCE", "header:");
        refused("DEDUPD_ID_SOURCE", "uuid");
        refused("DEDUPD_MISSING_ID", "drop");
        refused("DEDUPD_DEST_EXCHANGE_TYPE", "fan");
        refused("DEDUPD_DECLARE", "maybe");
        refused("DEDUPD_METRICS_ADDR", "localhost");
        refused("DEDUPD_LOG", "dedupd=loud");
    }

    #[test]
    fn composite_sources_and_scopes_parse() {
        let c = parse(&[
            (
                "DEDUPD_ID_SOURCE",
                "header:tenant+message_id+json:/order/id",
            ),
            ("DEDUPD_ID_SCOPE", "routing_key"),
        ])
        .unwrap();
        assert_eq!(
            c.id_source.parts(),
            [
                IdPart::Header("tenant".into()),
                IdPart::MessageId,
                IdPart::Json("/order/id".into())
            ]
        );
        assert_eq!(c.id_scope, IdScope::RoutingKey);
        assert!(c.ids_hashed());
        let shown: BTreeMap<_, _> = c.effective().into_iter().collect();
        assert_eq!(
            shown["DEDUPD_ID_SOURCE"],
            "header:tenant+message_id+json:/order/id"
        );
        assert_eq!(shown["DEDUPD_ID_SCOPE"], "routing_key");

        let c = parse(&[("DEDUPD_ID_SOURCE", "json:/a~1b/~0c/0")]).unwrap();
        assert_eq!(c.id_source.parts(), [IdPart::Json("/a~1b/~0c/0".into())]);
        assert!(!c.ids_hashed(), "one part, no scope: the id as it is");
        let c = parse(&[("DEDUPD_ID_SCOPE", "header:x-tenant")]).unwrap();
        assert_eq!(c.id_scope, IdScope::Header("x-tenant".into()));
        assert!(c.ids_hashed(), "a scope makes a hashed id");
    }

    #[test]
    fn bad_composite_sources_and_scopes_are_refused() {
        refused("DEDUPD_ID_SOURCE", "message_id+");
        refused("DEDUPD_ID_SOURCE", "+message_id");
        refused("DEDUPD_ID_SOURCE", "message_id+message_id");
        refused("DEDUPD_ID_SOURCE", "header:a+uuid");
        refused("DEDUPD_ID_SOURCE", "json:order/id");
        refused("DEDUPD_ID_SOURCE", "json:");
        refused("DEDUPD_ID_SOURCE", "json:/a~2");
        refused("DEDUPD_ID_SOURCE", "json:/a~");
        refused("DEDUPD_ID_SCOPE", "queue");
        refused("DEDUPD_ID_SCOPE", "header:");
        // Hashed ids are 64 bytes: a lower limit would refuse every one of them.
        let err = parse(&[
            ("DEDUPD_ID_SOURCE", "header:t+message_id"),
            ("DEDUPD_MAX_ID_BYTES", "32"),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("DEDUPD_MAX_ID_BYTES"), "{err}");
        assert!(parse(&[("DEDUPD_MAX_ID_BYTES", "32")]).is_ok());
    }

    #[test]
    fn names_must_fit_amqp_short_strings() {
        refused("DEDUPD_SOURCE_QUEUE", "");
        refused("DEDUPD_SOURCE_QUEUE", &"q".repeat(251));
        refused("DEDUPD_DEST_EXCHANGE", &"x".repeat(256));
    }

    #[test]
    fn unknown_variable_is_refused() {
        let err = parse(&[("DEDUPD_TLL", "24h")]).unwrap_err();
        assert!(matches!(err, ConfigError::Unknown { .. }));
        assert!(err.to_string().contains("DEDUPD_TLL"));
    }

    #[test]
    fn bad_url_error_masks_the_password() {
        let line = refused("DEDUPD_AMQP_URL", "http://me:s3cret@host/");
        assert!(!line.contains("s3cret"), "{line}");
        assert!(line.contains("me:***@host"), "{line}");
    }

    #[test]
    fn url_display_masks_the_password() {
        let url = AmqpUrl::parse("amqp://me:s3cret@[::1]:5672/%2f").unwrap();
        assert_eq!(url.host, "::1");
        assert_eq!(url.to_string(), "amqp://me:***@[::1]:5672/%2f");
        assert!(!format!("{url:?}").contains("s3cret"));
    }

    #[test]
    fn url_query_without_value_is_refused_not_a_panic() {
        refused("DEDUPD_AMQP_URL", "amqp://h/?heartbeat");
    }

    #[test]
    fn amqps_url_means_tls_on_port_5671() {
        let url = AmqpUrl::parse("amqps://me:s3cret@broker.example/prod").unwrap();
        assert!(url.tls);
        assert_eq!((url.host.as_str(), url.port), ("broker.example", 5671));
        assert_eq!(url.to_string(), "amqps://me:***@broker.example:5671/prod");
        let plain = AmqpUrl::parse("amqp://h").unwrap();
        assert!(!plain.tls);
        assert_eq!(plain.port, 5672);
        assert_eq!(AmqpUrl::parse("amqps://h:5999").unwrap().port, 5999);
    }

    /// A tempdir with a CA file, a certificate file and a key file (PEM-shaped, enough for the
    /// config's checks; the TLS tests use real ones).
    fn pem_files() -> (tempfile::TempDir, String, String, String) {
        let dir = tempfile::tempdir().unwrap();
        let cert = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n";
        let key = "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n";
        let path = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p.to_str().unwrap().to_string()
        };
        let ca = path("ca.pem", cert);
        let crt = path("c.pem", cert);
        let k = path("k.pem", key);
        (dir, ca, crt, k)
    }

    #[test]
    fn tls_files_are_taken_with_an_amqps_url() {
        let (_dir, ca, cert, key) = pem_files();
        let c = parse(&[
            ("DEDUPD_AMQP_URL", "amqps://u:p@localhost/"),
            ("DEDUPD_AMQP_CA_FILE", &ca),
            ("DEDUPD_AMQP_CERT_FILE", &cert),
            ("DEDUPD_AMQP_KEY_FILE", &key),
        ])
        .unwrap();
        assert_eq!(c.amqp_tls.ca_file, Some(PathBuf::from(&ca)));
        assert_eq!(c.amqp_tls.client, Some((cert.into(), key.into())));
        // Without any: the system's store, no client certificate.
        let c = parse(&[("DEDUPD_AMQP_URL", "amqps://u:p@localhost/")]).unwrap();
        assert_eq!(c.amqp_tls, TlsFiles::default());
    }

    #[test]
    fn tls_files_with_a_plain_url_are_refused() {
        // Asking for TLS and getting plaintext without a word is what this refuses.
        let (_dir, ca, _, _) = pem_files();
        let line = refused("DEDUPD_AMQP_CA_FILE", &ca);
        assert!(line.contains("amqps://"), "{line}");
    }

    #[test]
    fn client_cert_without_key_is_refused() {
        let (_dir, _, cert, key) = pem_files();
        let url = ("DEDUPD_AMQP_URL", "amqps://localhost");
        let err = parse(&[url, ("DEDUPD_AMQP_CERT_FILE", &cert)]).unwrap_err();
        assert!(err.to_string().contains("DEDUPD_AMQP_KEY_FILE"), "{err}");
        let err = parse(&[url, ("DEDUPD_AMQP_KEY_FILE", &key)]).unwrap_err();
        assert!(err.to_string().contains("DEDUPD_AMQP_CERT_FILE"), "{err}");
    }

    #[test]
    fn tls_file_missing_or_of_the_wrong_kind_is_refused() {
        let (_dir, _, cert, key) = pem_files();
        let url = ("DEDUPD_AMQP_URL", "amqps://localhost");
        let err = parse(&[url, ("DEDUPD_AMQP_CA_FILE", "/nonexistent/ca.pem")]).unwrap_err();
        assert!(err.to_string().contains("readable"), "{err}");
        // The key where the certificate should be, and the other way round.
        let err = parse(&[
            url,
            ("DEDUPD_AMQP_CERT_FILE", &key),
            ("DEDUPD_AMQP_KEY_FILE", &cert),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("DEDUPD_AMQP_CERT_FILE"), "{err}");
    }

    #[test]
    fn url_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("url");
        std::fs::write(&path, "amqp://a:b@h:1/v\n").unwrap();
        let c = parse(&[("DEDUPD_AMQP_URL_FILE", path.to_str().unwrap())]).unwrap();
        assert_eq!((c.amqp_url.host.as_str(), c.amqp_url.port), ("h", 1));
        assert_eq!(c.amqp_url.password(), "b");
    }

    #[test]
    fn url_file_missing_is_refused() {
        refused("DEDUPD_AMQP_URL_FILE", "/nonexistent/dedupd-url");
    }

    #[test]
    fn url_and_url_file_conflict() {
        let err = parse(&[
            ("DEDUPD_AMQP_URL", DEFAULT_AMQP_URL),
            ("DEDUPD_AMQP_URL_FILE", "/x"),
        ])
        .unwrap_err();
        assert!(matches!(err, ConfigError::Conflict { .. }), "{err}");
    }

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(size("512K"), Ok(512 << 10));
        assert_eq!(size("64MiB"), Ok(64 << 20));
        assert_eq!(size("4096"), Ok(4096));
        assert!(size("").is_err());
        assert!(size("0").is_err());
        assert!(size("M").is_err());
    }

    #[test]
    fn table_lists_every_variable_once() {
        let table = markdown_table();
        for v in VARS {
            let row = format!("| `{}` |", v.name);
            let rows = table.lines().filter(|l| l.starts_with(&row)).count();
            assert_eq!(rows, 1, "{}", v.name);
        }
        assert!(!VARS.iter().any(|v| v.doc.contains('|')));
    }

    #[test]
    fn readme_configuration_table_is_the_one_in_code() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
            .expect("README.md");
        assert!(
            readme.contains(&markdown_table()),
            "README.md's configuration table differs from config::VARS; paste this:\n{}",
            markdown_table()
        );
    }
}
