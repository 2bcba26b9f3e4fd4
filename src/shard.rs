//! Sharding the id space across dedupd instances with RabbitMQ's consistent-hash exchange.
//!
//! One dedupd owns one data dir, so its store is exact only if every copy of an id reaches the
//! same instance. The broker does the routing: an `x-consistent-hash` exchange (plugin
//! `rabbitmq_consistent_hash_exchange`) hashes each message's id and sends it to one of N source
//! queues, one per dedupd. No dedupd talks to another.
//!
//! # Topology
//!
//! [`declare`] makes, idempotently, for a [`Ring`] (default names in parentheses):
//!
//! - the ring exchange (`dedupd.shard`): `x-consistent-hash`, durable, with `hash-property:
//!   message_id`, or `hash-header: <name>` when `DEDUPD_ID_SOURCE=header:<name>` (the exchange
//!   must hash exactly what dedupd takes as the id);
//! - N source queues (`dedupd.in.0` … `dedupd.in.<N-1>`), each declared exactly as the relay
//!   declares its source (durable, `x-dead-letter-exchange = <queue>.dlx`, with `<queue>.dlx` and
//!   `<queue>.dead`, and with `DEDUPD_HA=on` single-active-consumer and the id stream
//!   `<queue>.ids`), and bound to the ring with weight 1. The plugin gives a binding as many
//!   buckets of a jump consistent hash as its weight, so equal weights are equal shares.
//!
//! The plugin keeps the ring in memory and, when the broker restarts, rebuilds it from the
//! bindings sorted by destination name; the queues are bound in that order, so an id stays on
//! its shard across broker restarts (checked against RabbitMQ 3.10's ring state in the tests).
//! Deleting or unbinding a shard's queue reshapes the ring: change N only as below.
//!
//! Messages without the property or header all hash alike and land on one shard, which applies
//! `DEDUPD_MISSING_ID` to them as a lone dedupd would. `DEDUPD_ID_SOURCE=body-sha256` cannot be
//! sharded by the exchange (it never reads bodies) and is refused ([`Error::BodySha256`]).
//!
//! # Re-sharding: old shards answer for one TTL
//!
//! Changing N moves ids between shards, and a shard that never saw an id forwards its next copy.
//! So the old ring stays in front of the new one for one dedup window:
//!
//! 1. [`declare`] the new ring under new names (say `dedupd.shard.g1`, `dedupd.in.g1.<i>`) and
//!    start its instances with fresh data dirs and the usual destination.
//! 2. Restart each old instance with `DEDUPD_DEST_EXCHANGE=<new ring exchange>` (and
//!    `DEDUPD_DECLARE=false`, so nothing is declared by mistake). Producers keep publishing to
//!    the old entry exchange: every message now passes an old shard, which drops copies of ids it
//!    saw before, then a new shard, which records every id it forwards.
//! 3. One `DEDUPD_TTL` after the last old instance switched, every id the old shards still
//!    remember has expired, so they have nothing left to add: [`cut_over`] binds the new ring
//!    exchange to the entry and unbinds the old ring from it. Messages routed while both are bound
//!    reach the same new shard either way. Once the old queues are empty, stop the old instances
//!    and delete their queues.
//!
//! A copy always meets, on the new ring, the shard that recorded its id since step 2; and a copy
//! of an id recorded only by an old shard (before step 2) is either dropped there (steps 2–3) or
//! arrives more than one TTL after it (after step 3), when it is no duplicate any more.

use std::fmt;

use amqprs::channel::{
    ExchangeBindArguments, ExchangeUnbindArguments, QueueBindArguments, QueueUnbindArguments,
};
use amqprs::connection::Connection;
use amqprs::{FieldTable, FieldValue};

use crate::amqp::topology::{Topology, TopologyError};
use crate::amqp::ConnectError;
use crate::config::{Config, IdPart, IdSource};

/// Default name of the ring exchange producers publish to.
pub const DEFAULT_EXCHANGE: &str = "dedupd.shard";
/// Default prefix of the shards' source queues: shard `i` consumes `<prefix>.<i>`.
pub const DEFAULT_QUEUE_PREFIX: &str = "dedupd.in";
/// Most shards a ring may have: far more than one broker serves, and it keeps typos harmless.
pub const MAX_SHARDS: u32 = 1024;
/// Binding weight of every shard: the plugin gives a binding this many hash buckets, so equal
/// weights give equal shares.
const WEIGHT: u32 = 1;
/// Exchange type of the plugin.
const KIND: &str = "x-consistent-hash";
/// Longest AMQP short string (queue and exchange names).
const NAME_MAX: usize = 255;

/// Why the sharded topology could not be declared or cut over. Each says what, then why.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `DEDUPD_ID_SOURCE=body-sha256`: the exchange cannot hash what dedupd would dedup on.
    #[error(
        "cannot shard an id taken from the body alone (DEDUPD_ID_SOURCE=body-sha256 or json:): \
         the consistent-hash exchange hashes a property or a header, never the body, so copies \
         of one body would reach different shards; have producers set message_id (or a header) \
         to the body's hash and shard on that, or run a single unsharded dedupd"
    )]
    BodySha256,
    /// A ring that cannot exist: no shards, too many, or names that do not fit AMQP.
    #[error("invalid ring: {0}")]
    Invalid(String),
    /// No connection to the broker.
    #[error("cannot connect to the broker {broker}: {cause}")]
    Connect {
        /// The broker URL, password masked.
        broker: String,
        /// Why.
        cause: ConnectError,
    },
    /// The broker refused a piece, or the connection failed on the way.
    #[error("{0}")]
    Topology(String),
}

impl From<TopologyError> for Error {
    fn from(e: TopologyError) -> Error {
        Error::Topology(e.to_string())
    }
}

/// A ring: one consistent-hash exchange and the source queues bound to it, one per shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ring {
    /// The `x-consistent-hash` exchange, default [`DEFAULT_EXCHANGE`].
    pub exchange: String,
    /// Shard `i` consumes `<queue_prefix>.<i>`; default [`DEFAULT_QUEUE_PREFIX`].
    pub queue_prefix: String,
    /// Number of shards, 1 to [`MAX_SHARDS`].
    pub shards: u32,
}

impl Ring {
    /// A ring of `shards` shards under the default names.
    pub fn new(shards: u32) -> Ring {
        Ring {
            exchange: DEFAULT_EXCHANGE.into(),
            queue_prefix: DEFAULT_QUEUE_PREFIX.into(),
            shards,
        }
    }

    /// The source queue of shard `i`: `<queue_prefix>.<i>`.
    pub fn queue(&self, i: u32) -> String {
        format!("{}.{i}", self.queue_prefix)
    }

    /// Every shard's source queue, in shard order.
    pub fn queues(&self) -> impl Iterator<Item = String> + '_ {
        (0..self.shards).map(|i| self.queue(i))
    }

    /// Checks the shard count and that every name fits an AMQP short string (queues leave room
    /// for `.dead`, as `DEDUPD_SOURCE_QUEUE` must).
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] saying what does not fit.
    pub fn validate(&self) -> Result<(), Error> {
        if self.shards == 0 || self.shards > MAX_SHARDS {
            return Err(Error::Invalid(format!(
                "{} shards: expected 1 to {MAX_SHARDS}",
                self.shards
            )));
        }
        if self.exchange.is_empty() || self.exchange.len() > NAME_MAX {
            return Err(Error::Invalid(format!(
                "exchange {:?}: expected a name of 1 to {NAME_MAX} bytes",
                self.exchange
            )));
        }
        let last = self.queue(self.shards - 1);
        let max = NAME_MAX - ".dead".len();
        if self.queue_prefix.is_empty() || last.len() > max {
            return Err(Error::Invalid(format!(
                "queue prefix {:?}: expected a prefix such that '{last}' has 1 to {max} bytes",
                self.queue_prefix
            )));
        }
        Ok(())
    }
}

/// What the ring exchange hashes: the same thing dedupd takes as the id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    /// `hash-property: message_id`.
    MessageId,
    /// `hash-header: <name>`.
    Header(String),
}

impl HashOn {
    /// What to hash for ids taken from `source`.
    ///
    /// # Errors
    ///
    /// [`Error::BodySha256`]: the exchange cannot hash bodies.
    pub fn for_id_source(source: &IdSource) -> Result<HashOn, Error> {
        // Of an id of several parts, the first the exchange can hash: every copy of an id has
        // the same value there, so every copy still reaches the same shard.
        source
            .parts()
            .iter()
            .find_map(|part| match part {
                IdPart::MessageId => Some(HashOn::MessageId),
                IdPart::Header(name) => Some(HashOn::Header(name.clone())),
                IdPart::BodySha256 | IdPart::Json(_) => None,
            })
            .ok_or(Error::BodySha256)
    }

    /// The exchange's arguments saying it.
    fn arguments(&self) -> FieldTable {
        let (key, value) = match self {
            HashOn::MessageId => ("hash-property", "message_id"),
            HashOn::Header(name) => ("hash-header", name.as_str()),
        };
        let mut args = FieldTable::new();
        args.insert(key.try_into().expect("short"), FieldValue::from(value));
        args
    }
}

impl fmt::Display for HashOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HashOn::MessageId => f.write_str("hash-property: message_id"),
            HashOn::Header(name) => write!(f, "hash-header: {name}"),
        }
    }
}

/// One shard as declared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// Its source queue (`DEDUPD_SOURCE_QUEUE` of its dedupd).
    pub queue: String,
    /// The queue's dead-letter exchange, `<queue>.dlx`.
    pub dead_letter_exchange: String,
    /// The queue keeping what its dedupd rejects, `<queue>.dead`.
    pub dead_letter_queue: String,
    /// Binding weight (hash buckets) on the ring.
    pub weight: u32,
}

/// What [`declare`] made (or found already in place). Its `Display` is the text for operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardReport {
    /// The ring exchange producers publish to.
    pub exchange: String,
    /// What it hashes.
    pub hash_on: HashOn,
    /// The shards, in order: shard `i` is `shards[i]`.
    pub shards: Vec<Shard>,
}

impl fmt::Display for ShardReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "exchange '{}': {KIND}, durable, {}",
            self.exchange, self.hash_on
        )?;
        for (i, s) in self.shards.iter().enumerate() {
            writeln!(
                f,
                "shard {i}: queue '{}' bound with weight {}, rejects to '{}' -> '{}'",
                s.queue, s.weight, s.dead_letter_exchange, s.dead_letter_queue
            )?;
        }
        writeln!(
            f,
            "publish to '{}'; run one dedupd per shard with DEDUPD_SOURCE_QUEUE set to its queue \
             and a data dir of its own (systemd: dedupd@<i> with /etc/dedupd/<i>.env)",
            self.exchange
        )
    }
}

/// Declares `ring` idempotently on the broker of `config`: the ring exchange hashing on the id
/// of `config.relay.id_source`, and each shard's source queue, declared as the relay declares
/// `DEDUPD_SOURCE_QUEUE`, bound to the ring with weight 1. Running it again changes nothing;
/// bindings of other queues to the same exchange are left alone (AMQP cannot list them).
///
/// Declares even when `DEDUPD_DECLARE=false` (that variable is the relay's).
///
/// # Errors
///
/// [`Error::BodySha256`] for `DEDUPD_ID_SOURCE=body-sha256`, [`Error::Invalid`] for a ring
/// that cannot exist, [`Error::Connect`] without a broker, [`Error::Topology`] naming the piece
/// the broker refused (an existing queue with other arguments, the plugin not enabled...).
pub async fn declare(config: &Config, ring: &Ring) -> Result<ShardReport, Error> {
    let hash_on = HashOn::for_id_source(&config.relay.id_source)?;
    ring.validate()?;
    let conn = connect(config).await?;
    let result = declare_on(&conn, config, ring, &hash_on).await;
    let _ = conn.close().await;
    result?;
    let shards = ring
        .queues()
        .map(|queue| {
            let c = shard_config(config, &queue);
            Shard {
                dead_letter_exchange: c.relay.dead_letter_exchange(),
                dead_letter_queue: c.relay.dead_letter_queue(),
                queue,
                weight: WEIGHT,
            }
        })
        .collect();
    Ok(ShardReport {
        exchange: ring.exchange.clone(),
        hash_on,
        shards,
    })
}

async fn declare_on(
    conn: &Connection,
    config: &Config,
    ring: &Ring,
    hash_on: &HashOn,
) -> Result<(), Error> {
    let mut t = Topology::open(conn, false).await?;
    t.exchange_with(
        &format!("ring exchange '{}' ({KIND}, {hash_on})", ring.exchange),
        &ring.exchange,
        KIND,
        hash_on.arguments(),
    )
    .await
    .map_err(plugin_hint)?;
    for queue in ring.queues() {
        let shard = shard_config(config, &queue);
        t.source(&shard).await?;
        // With DEDUPD_HA=on each shard is its own single-active-consumer group with its own
        // id stream, so the instances of one shard replicate among themselves only.
        if shard.relay.ha {
            t.ids_stream(&shard).await?;
        }
    }
    // The ring gives buckets to bindings in the order they are made, and a broker restart
    // rebuilds it from the bindings sorted by destination name (RabbitMQ 3.10: `lists:usort`).
    // Binding in that order keeps every id on its shard across restarts: `<prefix>.10` goes
    // before `<prefix>.2`.
    let mut sorted: Vec<String> = ring.queues().collect();
    sorted.sort();
    for queue in sorted {
        let result = t
            .channel()
            .queue_bind(QueueBindArguments::new(
                &queue,
                &ring.exchange,
                &WEIGHT.to_string(),
            ))
            .await;
        t.check(
            &format!("binding of '{queue}' to '{}'", ring.exchange),
            result,
        )?;
    }
    t.close().await;
    Ok(())
}

/// What [`cut_over`] changed. Its `Display` is the text for operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutOverReport {
    /// The exchange producers publish to.
    pub entry: String,
    /// The ring exchange now bound to it.
    pub bound: String,
    /// What was unbound from it: the old ring's queues, or the old ring's exchange.
    pub unbound: Vec<String>,
}

impl fmt::Display for CutOverReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "bound '{}' to '{}'", self.bound, self.entry)?;
        for u in &self.unbound {
            writeln!(f, "unbound '{u}' from '{}'", self.entry)?;
        }
        writeln!(
            f,
            "the old shards receive nothing more: stop them once their queues are empty"
        )
    }
}

/// Step 3 of re-sharding (see the module docs): routes the `entry` exchange, which producers
/// publish to, to the new ring's exchange `new_exchange` instead of the `old` ring. Call it no sooner than one
/// `DEDUPD_TTL` after every old instance forwards to the new ring.
///
/// Binds first, then unbinds, so no message is unroutable on the way; one routed in between
/// reaches the same new shard either way. `old` is bound to `entry` by its queues when its
/// exchange is the entry (the first ring), by its exchange otherwise (a later one). Idempotent.
///
/// # Errors
///
/// [`Error::Invalid`] when `new_exchange` is the entry or `old` is invalid, [`Error::Connect`],
/// [`Error::Topology`] when the new ring exchange does not exist or the broker refuses a change.
pub async fn cut_over(
    config: &Config,
    entry: &str,
    old: &Ring,
    new_exchange: &str,
) -> Result<CutOverReport, Error> {
    old.validate()?;
    if new_exchange.is_empty() || new_exchange == entry || new_exchange == old.exchange {
        return Err(Error::Invalid(format!(
            "the new ring exchange '{new_exchange}' must differ from the entry '{entry}' and \
             the old ring's"
        )));
    }
    let conn = connect(config).await?;
    let result = cut_over_on(&conn, entry, old, new_exchange).await;
    let _ = conn.close().await;
    result
}

async fn cut_over_on(
    conn: &Connection,
    entry: &str,
    old: &Ring,
    new_exchange: &str,
) -> Result<CutOverReport, Error> {
    // Passive: the new ring must exist as `declare` made it; the cut-over makes nothing up.
    let mut check = Topology::open(conn, true).await?;
    check
        .exchange_with(
            &format!("new ring exchange '{new_exchange}'"),
            new_exchange,
            KIND,
            FieldTable::new(),
        )
        .await?;
    check.close().await;

    let weight = WEIGHT.to_string();
    let mut t = Topology::open(conn, false).await?;
    let result = t
        .channel()
        .exchange_bind(ExchangeBindArguments::new(new_exchange, entry, &weight))
        .await;
    t.check(&format!("binding of '{new_exchange}' to '{entry}'"), result)?;
    let mut unbound = Vec::new();
    if old.exchange == entry {
        for queue in old.queues() {
            let result = t
                .channel()
                .queue_unbind(QueueUnbindArguments::new(&queue, entry, &weight))
                .await;
            t.check(&format!("unbinding of '{queue}' from '{entry}'"), result)?;
            unbound.push(queue);
        }
    } else {
        let result = t
            .channel()
            .exchange_unbind(ExchangeUnbindArguments::new(&old.exchange, entry, &weight))
            .await;
        t.check(
            &format!("unbinding of '{}' from '{entry}'", old.exchange),
            result,
        )?;
        unbound.push(old.exchange.clone());
    }
    t.close().await;
    Ok(CutOverReport {
        entry: entry.to_string(),
        bound: new_exchange.to_string(),
        unbound,
    })
}

/// `config` with `queue` as its source queue, so the relay's names and declarations apply.
fn shard_config(config: &Config, queue: &str) -> Config {
    let mut c = config.clone();
    c.relay.source_queue = queue.to_string();
    c
}

async fn connect(config: &Config) -> Result<Connection, Error> {
    crate::amqp::connect(&config.amqp, "dedupd topology")
        .await
        .map_err(|cause| Error::Connect {
            broker: config.amqp.url.to_string(),
            cause,
        })
}

/// An unknown exchange type closes the whole connection (503 command invalid), so the error
/// names no reason of the broker's: add the likely one.
fn plugin_hint(e: TopologyError) -> TopologyError {
    match e {
        TopologyError::Amqp { what, source } => TopologyError::Refused(format!(
            "declaring {what} failed: {source} (is the plugin enabled? \
             rabbitmq-plugins enable rabbitmq_consistent_hash_exchange)"
        )),
        refused => refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Config {
        Config::from_vars(vars.iter().copied()).unwrap()
    }

    #[test]
    fn ring_names_queues_by_index() {
        let ring = Ring::new(3);
        let queues: Vec<String> = ring.queues().collect();
        assert_eq!(queues, ["dedupd.in.0", "dedupd.in.1", "dedupd.in.2"]);
        assert_eq!(ring.exchange, "dedupd.shard");
        ring.validate().unwrap();
    }

    #[test]
    fn ring_without_shards_or_with_long_names_is_invalid() {
        assert!(matches!(Ring::new(0).validate(), Err(Error::Invalid(_))));
        assert!(Ring::new(MAX_SHARDS + 1).validate().is_err());
        let mut long = Ring::new(10);
        // `<prefix>.9` plus `.dead` must fit 255 bytes.
        long.queue_prefix = "q".repeat(NAME_MAX - ".dead".len() - 1);
        let err = long.validate().unwrap_err().to_string();
        assert!(err.contains("queue prefix"), "{err}");
        long.queue_prefix = "q".repeat(NAME_MAX - ".dead".len() - 2);
        long.validate().unwrap();
    }

    #[test]
    fn hash_follows_the_id_source() {
        let c = config(&[]);
        assert_eq!(
            HashOn::for_id_source(&c.relay.id_source)
                .unwrap()
                .to_string(),
            "hash-property: message_id"
        );
        let c = config(&[("DEDUPD_ID_SOURCE", "header:x-id")]);
        let on = HashOn::for_id_source(&c.relay.id_source).unwrap();
        assert_eq!(on.to_string(), "hash-header: x-id");
        assert_eq!(
            on.arguments().get(&"hash-header".try_into().unwrap()),
            Some(&FieldValue::from("x-id"))
        );
        // Several parts: the first the exchange can hash, which every copy of an id shares.
        let c = config(&[("DEDUPD_ID_SOURCE", "json:/id+header:tenant+message_id")]);
        let on = HashOn::for_id_source(&c.relay.id_source).unwrap();
        assert_eq!(on.to_string(), "hash-header: tenant");
        let c = config(&[("DEDUPD_ID_SOURCE", "json:/id+body-sha256")]);
        assert!(matches!(
            HashOn::for_id_source(&c.relay.id_source),
            Err(Error::BodySha256)
        ));
    }

    #[tokio::test]
    async fn body_sha256_is_refused_before_any_broker_is_asked() {
        // An unroutable broker address: the refusal must come first, from the id source alone.
        let c = config(&[
            ("DEDUPD_ID_SOURCE", "body-sha256"),
            ("DEDUPD_AMQP_URL", "amqp://g:g@127.0.0.1:1/%2f"),
        ]);
        let err = declare(&c, &Ring::new(3)).await.unwrap_err();
        assert!(matches!(err, Error::BodySha256));
        let line = err.to_string();
        assert!(
            line.contains("body-sha256") && line.contains("message_id"),
            "{line}"
        );
    }

    #[test]
    fn report_lists_the_exchange_and_every_shard() {
        let report = ShardReport {
            exchange: "dedupd.shard".into(),
            hash_on: HashOn::MessageId,
            shards: vec![Shard {
                queue: "dedupd.in.0".into(),
                dead_letter_exchange: "dedupd.in.0.dlx".into(),
                dead_letter_queue: "dedupd.in.0.dead".into(),
                weight: 1,
            }],
        };
        let text = report.to_string();
        assert!(text.starts_with(
            "exchange 'dedupd.shard': x-consistent-hash, durable, hash-property: message_id\n\
             shard 0: queue 'dedupd.in.0' bound with weight 1, rejects to 'dedupd.in.0.dlx' -> \
             'dedupd.in.0.dead'\n"
        ));
    }
}

/// A `dedupd topology ...` command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `topology --shards N [--exchange X] [--queue-prefix P]`: declare a ring.
    Declare(Ring),
    /// `topology cut-over --entry E --old-shards N [--old-exchange X] [--old-queue-prefix P]
    /// --new-exchange X`: move the entry exchange to a new ring.
    CutOver {
        /// The exchange producers publish to.
        entry: String,
        /// The ring being retired.
        old: Ring,
        /// The new ring's exchange.
        new_exchange: String,
    },
}

/// The command line of `dedupd topology`: declare a ring, or `cut-over` to a new one.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct TopologyArgs {
    /// Move the entry exchange to a new ring (see Scaling out).
    #[command(subcommand)]
    cut_over: Option<CutOverArgs>,
    /// How many source queues the ring spreads ids over.
    #[arg(long, value_name = "N", required = true)]
    shards: Option<u32>,
    /// The ring's consistent-hash exchange, which producers publish to.
    #[arg(long, default_value = DEFAULT_EXCHANGE)]
    exchange: String,
    /// The queues are named `<prefix>.<i>`.
    #[arg(long, default_value = DEFAULT_QUEUE_PREFIX)]
    queue_prefix: String,
}

/// `dedupd topology cut-over`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
enum CutOverArgs {
    /// Move the entry exchange to a new ring (see Scaling out).
    CutOver {
        /// The exchange producers publish to.
        #[arg(long, default_value = DEFAULT_EXCHANGE)]
        entry: String,
        /// Shards of the ring being retired.
        #[arg(long, value_name = "N")]
        old_shards: u32,
        /// The retired ring's exchange (default: the entry exchange).
        #[arg(long)]
        old_exchange: Option<String>,
        /// The retired ring's queue prefix.
        #[arg(long, default_value = DEFAULT_QUEUE_PREFIX)]
        old_queue_prefix: String,
        /// The new ring's exchange.
        #[arg(long)]
        new_exchange: String,
    },
}

impl From<TopologyArgs> for Command {
    fn from(args: TopologyArgs) -> Command {
        match args.cut_over {
            None => Command::Declare(Ring {
                exchange: args.exchange,
                queue_prefix: args.queue_prefix,
                // clap requires --shards without a subcommand.
                shards: args.shards.unwrap_or_default(),
            }),
            Some(CutOverArgs::CutOver {
                entry,
                old_shards,
                old_exchange,
                old_queue_prefix,
                new_exchange,
            }) => Command::CutOver {
                old: Ring {
                    exchange: old_exchange.unwrap_or_else(|| entry.clone()),
                    queue_prefix: old_queue_prefix,
                    shards: old_shards,
                },
                new_exchange,
                entry,
            },
        }
    }
}

impl Command {
    /// Runs the command against the broker of `config`; returns the report to print.
    ///
    /// # Errors
    ///
    /// As [`declare`] and [`cut_over`].
    pub async fn run(&self, config: &Config) -> Result<String, Error> {
        Ok(match self {
            Command::Declare(ring) => declare(config, ring).await?.to_string(),
            Command::CutOver {
                entry,
                old,
                new_exchange,
            } => cut_over(config, entry, old, new_exchange)
                .await?
                .to_string(),
        })
    }
}
