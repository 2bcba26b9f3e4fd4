//! dedupd's configuration: one typed [`Config`], parsed once at start-up from `DEDUPD_*`
//! environment variables, made of one section per part ([`AmqpConfig`], [`RelayConfig`],
//! [`StoreSettings`], [`HttpConfig`], [`RedisConfig`], [`LogConfig`]).
//!
//! Each section reads its own variables, and each variable is declared once, where it is read:
//! `vars.var(name, default, doc, parser)`. Those declarations are what `dedupd --help` and
//! `dedupd config` print and what a test checks README's table against, so none can drift.
//! Adding a variable is a field in its section and one `vars.var(...)` call.
//!
//! Parsing is a pure function over `(name, value)` pairs ([`Config::from_vars`]) so tests never
//! touch the process environment.

mod amqp;
mod relay;
#[cfg(test)]
mod tests;
mod values;
mod vars;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU64, NonZeroUsize};
use std::path::PathBuf;
use std::time::Duration;

use crate::store::{Durability, StoreConfig, MAX_ID_LIMIT};
use values::{addr_or_off, duration, header_name, size};

pub use amqp::{AmqpConfig, AmqpUrl, TlsFiles};
pub use relay::{IdPart, IdScope, IdSource, MissingId, QueueType, RelayConfig, HASHED_ID_BYTES};
pub use vars::{DefaultValue, Shown, Var, Vars};

/// Prefix every variable of ours carries; unknown names under it are refused.
pub const PREFIX: &str = "DEDUPD_";

/// dedupd's configuration. Built by [`Config::from_env`] or [`Config::from_vars`].
#[derive(Debug, Clone)]
pub struct Config {
    /// The broker connection (relay and shard commands).
    pub amqp: AmqpConfig,
    /// The relay.
    pub relay: RelayConfig,
    /// The store.
    pub store: StoreSettings,
    /// The HTTP endpoint and the admin commands that talk to it.
    pub http: HttpConfig,
    /// The Redis-protocol endpoint.
    pub redis: RedisConfig,
    /// Logging.
    pub log: LogConfig,
    /// Every variable's effective value, secrets masked, for `dedupd config`.
    effective: Vec<Shown>,
}

/// The store's settings (the store itself takes a [`StoreConfig`]).
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// `DEDUPD_DATA_DIR`, default `./data`: the store directory.
    pub data_dir: PathBuf,
    /// `DEDUPD_TTL`, default 24 h: the dedup window.
    pub ttl: Duration,
    /// `DEDUPD_TTL_HEADER`, default `x-dedup-ttl`: the header setting a message's own window in
    /// milliseconds; `None` when `off`.
    pub ttl_header: Option<String>,
    /// `DEDUPD_MAX_TTL`, default `DEDUPD_TTL`: the longest window a message may ask for.
    pub max_ttl: Duration,
    /// `DEDUPD_MAX_ID_BYTES`, default 256: longer ids are dead-lettered.
    pub max_id_bytes: NonZeroUsize,
    /// `DEDUPD_EXPECTED_IDS`, default 1 000 000: ids per window, sizes the Bloom filter.
    pub expected_ids: NonZeroU64,
    /// `DEDUPD_BLOOM_FP_RATE`, default 0.01: target Bloom false-positive rate.
    pub bloom_fp_rate: f64,
    /// `DEDUPD_CACHE_SIZE`, default 8 MiB: sled page cache in bytes.
    pub cache_bytes: u64,
    /// `DEDUPD_DURABILITY`, default `process`: what an acked record survives.
    pub durability: Durability,
}

impl StoreSettings {
    /// Reads the store's variables; `hashed_ids` when the relay hashes its ids, whose fixed
    /// length the id limit must leave room for.
    fn read(vars: &mut Vars, hashed_ids: bool) -> Result<StoreSettings, ConfigError> {
        let data_dir = vars.var(
            "DEDUPD_DATA_DIR",
            "./data",
            "store directory (one dedupd per directory)",
            |v| {
                if v.is_empty() {
                    Err("a directory path".into())
                } else {
                    Ok(PathBuf::from(v))
                }
            },
        )?;
        let ttl = vars.var(
            "DEDUPD_TTL",
            "24h",
            "dedup window (`90s`, `15m`, `24h`, `7d`)",
            |v| duration(v, false),
        )?;
        let ttl_header = vars.var(
            "DEDUPD_TTL_HEADER",
            "x-dedup-ttl",
            "header whose whole number of milliseconds sets that message's window instead of `DEDUPD_TTL`; not a positive integer, or over `DEDUPD_MAX_TTL`: dead-lettered; `off`: ignore it",
            |v| match v {
                "off" => Ok(None),
                _ => header_name(v)
                    .map(Some)
                    .ok_or_else(|| "a header name of 1 to 255 bytes, or off".into()),
            },
        )?;
        let max_ttl = vars
            .opt(
                "DEDUPD_MAX_TTL",
                "`DEDUPD_TTL`",
                "longest window a message's TTL header may ask for (`7d`, ...); at least `DEDUPD_TTL`",
                |v| {
                    duration(v, false).and_then(|max| {
                        if max < ttl {
                            Err(format!(
                                "a duration at least DEDUPD_TTL ({}): the default window must fit \
                                 under the cap",
                                humantime::format_duration(ttl)
                            ))
                        } else {
                            Ok(max)
                        }
                    })
                },
            )?
            .unwrap_or(ttl);
        let min_id_bytes = if hashed_ids { HASHED_ID_BYTES } else { 1 };
        let max_id_bytes = vars.var(
            "DEDUPD_MAX_ID_BYTES",
            "256",
            "longer ids are dead-lettered (at most 65535)",
            |v| {
                v.parse::<NonZeroUsize>()
                    .ok()
                    .filter(|n| n.get() <= MAX_ID_LIMIT && n.get() >= min_id_bytes)
                    .ok_or_else(|| {
                        if hashed_ids {
                            format!(
                                "a byte count from {HASHED_ID_BYTES} to {MAX_ID_LIMIT}: with several \
                                 id parts or a scope, ids are {HASHED_ID_BYTES}-byte hex SHA-256 digests"
                            )
                        } else {
                            format!("a byte count from 1 to {MAX_ID_LIMIT}")
                        }
                    })
            },
        )?;
        let expected_ids = vars.var(
            "DEDUPD_EXPECTED_IDS",
            "1000000",
            "ids expected per window; sizes the Bloom filter",
            |v| {
                v.replace('_', "")
                    .parse::<NonZeroU64>()
                    .map_err(|_| "a positive whole number like 1000000".into())
            },
        )?;
        let bloom_fp_rate = vars.var(
            "DEDUPD_BLOOM_FP_RATE",
            "0.01",
            "target false-positive rate of the Bloom filter, in (0, 1)",
            |v| {
                v.parse::<f64>()
                    .ok()
                    .filter(|r| *r > 0.0 && *r < 1.0)
                    .ok_or_else(|| "a fraction between 0 and 1, like 0.01".into())
            },
        )?;
        let cache_bytes = vars.var(
            "DEDUPD_CACHE_SIZE",
            "8M",
            "sled page cache (`512K`, `8M`, `1G` or bytes): what sled keeps in memory of the segments written and read",
            size,
        )?;
        let durability = vars.var(
            "DEDUPD_DURABILITY",
            "process",
            "what an acked record survives: `process` (a killed dedupd: sled's flush) or `power` (also a kernel crash or power cut: a `syncfs` of the data dir's file system after every flush, slower)",
            |v| match v {
                "process" => Ok(Durability::Process),
                "power" => Ok(Durability::Power),
                _ => Err("`process` or `power`".into()),
            },
        )?;
        Ok(StoreSettings {
            data_dir,
            ttl,
            ttl_header,
            max_ttl,
            max_id_bytes,
            expected_ids,
            bloom_fp_rate,
            cache_bytes,
            durability,
        })
    }

    /// The store settings these variables ask for.
    pub fn store_config(&self) -> StoreConfig {
        let mut store = StoreConfig::new(&self.data_dir);
        store.ttl = self.ttl;
        store.expected_ids = self.expected_ids.get();
        store.fp_rate = self.bloom_fp_rate;
        store.cache_bytes = self.cache_bytes;
        store.max_id_bytes = self.max_id_bytes.get();
        store.durability = self.durability;
        store
    }
}

/// The operator's HTTP endpoint.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// `DEDUPD_METRICS_ADDR`, default `127.0.0.1:9476`: HTTP address, `None` when `off`.
    pub addr: Option<SocketAddr>,
    /// `DEDUPD_ADMIN_TOKEN` (or the file of `DEDUPD_ADMIN_TOKEN_FILE`), default unset: the
    /// bearer token the admin endpoints require.
    pub admin_token: Option<Secret>,
}

impl HttpConfig {
    fn read(vars: &mut Vars) -> Result<HttpConfig, ConfigError> {
        let addr = vars.var(
            "DEDUPD_METRICS_ADDR",
            "127.0.0.1:9476",
            "HTTP address for `/healthz` and `/metrics`; `off` disables",
            |v| addr_or_off(v, "127.0.0.1:9476"),
        )?;
        let admin_token = vars.secret(
            "DEDUPD_ADMIN_TOKEN",
            "DEDUPD_ADMIN_TOKEN_FILE",
            DefaultValue::Unset("no token: admin on loopback only".into()),
            "bearer token required by the admin routes (`/ids`, `/backup`; sent by the admin commands); never logged",
            "the admin token",
        )?;
        Ok(HttpConfig { addr, admin_token })
    }
}

/// The Redis-protocol endpoint.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `DEDUPD_REDIS_ADDR`, default `off`: the endpoint's address, `None` when off.
    pub addr: Option<SocketAddr>,
    /// `DEDUPD_REDIS_PASSWORD` (or the file of `DEDUPD_REDIS_PASSWORD_FILE`), default unset: the
    /// password Redis clients must give. Never logged.
    pub password: Option<Secret>,
    /// `DEDUPD_REDIS_MAX_CLIENTS`, default 10 000: most Redis connections at once.
    pub max_clients: NonZeroUsize,
    /// `DEDUPD_REDIS_MAX_VALUE`, default 1 MiB: longest key or value in a Redis command.
    pub max_value: u64,
    /// `DEDUPD_REDIS_SCRIPT_TIMEOUT`, default 5 s (Redis' `busy-reply-threshold`): longest a
    /// Lua script may run before it is killed and its writes undone.
    pub script_timeout: Duration,
}

impl RedisConfig {
    fn read(vars: &mut Vars) -> Result<RedisConfig, ConfigError> {
        let addr = vars.var(
            "DEDUPD_REDIS_ADDR",
            "off",
            "address of the Redis-protocol endpoint, e.g. `127.0.0.1:6380`; `off` disables",
            |v| addr_or_off(v, "127.0.0.1:6380"),
        )?;
        let password = vars.secret(
            "DEDUPD_REDIS_PASSWORD",
            "DEDUPD_REDIS_PASSWORD_FILE",
            DefaultValue::Unset("no auth; loopback addresses only".into()),
            "clients must `AUTH` (or `HELLO 3 AUTH default <pw>`); required for a non-loopback `DEDUPD_REDIS_ADDR`; never logged",
            "the Redis endpoint password",
        )?;
        // Like Redis' protected mode: other hosts may reach only an endpoint with a password.
        if let Some(addr) = addr.filter(|a| !a.ip().is_loopback()) {
            if password.is_none() {
                return Err(vars::invalid(
                    "DEDUPD_REDIS_ADDR",
                    &addr.to_string(),
                    "a loopback address, or DEDUPD_REDIS_PASSWORD (or DEDUPD_REDIS_PASSWORD_FILE) \
                     set: a non-loopback Redis endpoint needs a password"
                        .into(),
                ));
            }
        }
        let max_clients = vars.var(
            "DEDUPD_REDIS_MAX_CLIENTS",
            "10000",
            "most Redis connections at once; more are refused with `ERR max number of clients reached`",
            |v| {
                v.parse::<NonZeroUsize>()
                    .map_err(|_| "a positive number of connections like 10000".into())
            },
        )?;
        let max_value = vars.var(
            "DEDUPD_REDIS_MAX_VALUE",
            "1M",
            "longest key or value a Redis command may carry; longer gets an error reply",
            size,
        )?;
        let script_timeout = vars.var(
            "DEDUPD_REDIS_SCRIPT_TIMEOUT",
            "5s",
            "longest a Lua script (`EVAL`) may run; past it the script is killed and none of its writes apply",
            |v| duration(v, false),
        )?;
        Ok(RedisConfig {
            addr,
            password,
            max_clients,
            max_value,
            script_timeout,
        })
    }
}

/// Logging.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// `DEDUPD_LOG`, default `info`: tracing filter.
    pub filter: String,
    /// `DEDUPD_LOG_FORMAT`, default `text`: log lines for people or (`json`) for machines.
    pub format: LogFormat,
}

impl LogConfig {
    fn read(vars: &mut Vars) -> Result<LogConfig, ConfigError> {
        let filter = vars.var(
            "DEDUPD_LOG",
            "info",
            "tracing filter (`debug`, `dedupd=debug,amqprs=warn`, ...)",
            |v| {
                tracing_subscriber::EnvFilter::try_new(v)
                    .map(|_| v.to_string())
                    .map_err(|e| format!("a tracing filter like info or dedupd=debug,warn ({e})"))
            },
        )?;
        let format = vars.var(
            "DEDUPD_LOG_FORMAT",
            "text",
            "log line format on stderr: `text`, or `json` for machines",
            |v| match v {
                "text" => Ok(LogFormat::Text),
                "json" => Ok(LogFormat::Json),
                _ => Err("text or json".into()),
            },
        )?;
        Ok(LogConfig { filter, format })
    }
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
    /// The first bad variable in reading order: a value that does not parse, two variables that
    /// exclude each other, then an unknown `DEDUPD_*` name.
    pub fn from_vars<I, K, V>(vars: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let set: BTreeMap<String, String> = vars
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .filter(|(k, _)| k.starts_with(PREFIX))
            .collect();
        let mut vars = Vars::new(set);
        let mut config = Config::read(&mut vars)?;
        config.effective = vars.finish()?.1;
        Ok(config)
    }

    /// Every section, each reading its variables; the order here is the order of `--help`.
    fn read(vars: &mut Vars) -> Result<Config, ConfigError> {
        let amqp = AmqpConfig::read(vars)?;
        let relay = RelayConfig::read(vars)?;
        let store = StoreSettings::read(vars, relay.ids_hashed())?;
        let http = HttpConfig::read(vars)?;
        let log = LogConfig::read(vars)?;
        let redis = RedisConfig::read(vars)?;
        Ok(Config {
            amqp,
            relay,
            store,
            http,
            redis,
            log,
            effective: Vec::new(),
        })
    }

    /// The effective value of every variable, secrets masked, for `dedupd config`.
    pub fn effective(&self) -> &[Shown] {
        &self.effective
    }

    /// The store settings this configuration asks for.
    pub fn store_config(&self) -> StoreConfig {
        self.store.store_config()
    }
}

/// Every variable dedupd reads, in the order the help and the README list them.
pub fn variables() -> Vec<Var> {
    let mut vars = Vars::new(BTreeMap::new());
    Config::read(&mut vars).expect("every default parses");
    vars.finish().expect("nothing is set").0
}

/// The variables as a Markdown table: the text of README's configuration table, and of `--help`.
pub fn markdown_table() -> String {
    let mut out = String::from("| variable | default | meaning |\n|---|---|---|\n");
    for v in variables() {
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
