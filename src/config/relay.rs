//! The relay's settings: which queue it consumes, where it publishes, how it finds ids.

use std::fmt;
use std::num::{NonZeroU16, NonZeroU32};
use std::time::Duration;

use super::values::{boolean, duration, exchange_type, header_name, name, on_off, short_str};
use super::vars::Vars;
use super::ConfigError;

/// How the relay runs.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// `DEDUPD_RELAY`, default `on`: `false` runs no relay (no broker), only the store's endpoints.
    pub enabled: bool,
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
    /// `DEDUPD_ID_SOURCE`, default `message_id`: where the id comes from.
    pub id_source: IdSource,
    /// `DEDUPD_ID_SCOPE`, default `none`: what makes the same id two ids.
    pub id_scope: IdScope,
    /// `DEDUPD_MISSING_ID`, default `dead-letter`: what to do without an id.
    pub missing_id: MissingId,
    /// `DEDUPD_PREFETCH`, default 1000: most deliveries in flight.
    pub prefetch: NonZeroU16,
    /// `DEDUPD_QUEUE_TYPE` and `DEDUPD_DELIVERY_LIMIT`, default classic (quorum with HA): the
    /// source queue's type.
    pub queue_type: QueueType,
    /// `DEDUPD_HA`, default off: single active consumer on the source, ids replicated through
    /// the stream `<source>.ids`.
    pub ha: bool,
    /// `DEDUPD_DUPLICATES_EXCHANGE`, default unset: where copies of duplicates go, if anywhere.
    pub duplicates_exchange: Option<String>,
    /// `DEDUPD_CONFIRM_TIMEOUT`, default 30 s: an unconfirmed publish fails after this.
    pub confirm_timeout: Duration,
    /// `DEDUPD_SHUTDOWN_GRACE`, default 10 s: time to finish in-flight work on shutdown.
    pub shutdown_grace: Duration,
}

impl RelayConfig {
    /// Reads the relay's variables.
    pub(crate) fn read(vars: &mut Vars) -> Result<RelayConfig, ConfigError> {
        let enabled = vars.var(
            "DEDUPD_RELAY",
            "on",
            "`off`: no broker connection at all, the store serves the Redis endpoint (and `/healthz`, `/metrics`) alone",
            on_off,
        )?;
        let source_queue = vars.var(
            "DEDUPD_SOURCE_QUEUE",
            "dedupd.in",
            "queue consumed with manual acks",
            // The dead-letter queue's name adds `.dead`, and must fit a short string too.
            |v| name(v, ".dead".len()),
        )?;
        let dest_exchange = vars.var(
            "DEDUPD_DEST_EXCHANGE",
            "dedupd.out",
            "where first-seen messages go",
            |v| name(v, 0),
        )?;
        let dest_exchange_type = vars.var(
            "DEDUPD_DEST_EXCHANGE_TYPE",
            "fanout",
            "type used when declaring it: `direct`, `fanout`, `topic`, `headers` or a plugin's `x-…`",
            exchange_type,
        )?;
        let dest_routing_key = vars.opt(
            "DEDUPD_DEST_ROUTING_KEY",
            "keep the original",
            "routing key for forwarded messages (set but empty: the empty key)",
            short_str,
        )?;
        let declare = vars.var(
            "DEDUPD_DECLARE",
            "true",
            "declare the topology; `false`: use what exists, fail naming any missing piece",
            boolean,
        )?;
        let id_source = vars.var(
            "DEDUPD_ID_SOURCE",
            "message_id",
            "where the id comes from: `message_id`, `header:<name>`, `json:<RFC 6901 pointer>` into a JSON body, `body-sha256`, or several of them joined by `+` (hashed together)",
            id_source,
        )?;
        let id_scope = vars.var(
            "DEDUPD_ID_SCOPE",
            "none",
            "`routing_key` or `header:<name>`: the same id in two scopes is two ids (hashed with the scope); `none`: one scope",
            id_scope,
        )?;
        let missing_id = vars.var(
            "DEDUPD_MISSING_ID",
            "dead-letter",
            "message without an id (or with an empty one): `dead-letter`, `forward` (undeduplicated) or `body-sha256`",
            missing_id,
        )?;
        let prefetch = vars.var(
            "DEDUPD_PREFETCH",
            "1000",
            "consumer prefetch = most messages in flight (1 to 65535)",
            |v| {
                v.parse::<NonZeroU16>()
                    .map_err(|_| "a message count from 1 to 65535".into())
            },
        )?;
        let ha = vars.var(
            "DEDUPD_HA",
            "off",
            "`on`: hot standby; the source queue has a single active consumer among the dedupd consuming it, which replicates its ids through the stream `<source>.ids` to the others",
            on_off,
        )?;
        let quorum = vars
            .opt(
                "DEDUPD_QUEUE_TYPE",
                "`classic`; `quorum` with `DEDUPD_HA=on`",
                "type of the source queue and `<source>.dead` when dedupd declares them: `classic` or `quorum` (replicated); an existing queue of the other type stops start-up",
                |v| match v {
                    "classic" | "quorum" => Ok(v == "quorum"),
                    _ => Err("classic or quorum".into()),
                },
            )?
            // Quorum by default with HA: a standby is worth little if the queue dies with its
            // node.
            .unwrap_or(ha);
        let delivery_limit = vars.opt(
            "DEDUPD_DELIVERY_LIMIT",
            "20 with `quorum` (RabbitMQ 4's default)",
            "deliveries of one message before the broker dead-letters it into `<source>.dead` (`quorum` only)",
            |v| {
                if !quorum {
                    return Err(
                        "no value: only a quorum queue has a delivery limit (DEDUPD_QUEUE_TYPE=quorum)"
                            .into(),
                    );
                }
                v.parse::<NonZeroU32>()
                    .map_err(|_| "a number of deliveries from 1 to 4294967295".into())
            },
        )?;
        let queue_type = if quorum {
            QueueType::Quorum {
                delivery_limit: delivery_limit.unwrap_or(QueueType::DEFAULT_DELIVERY_LIMIT),
            }
        } else {
            QueueType::Classic
        };
        let duplicates_exchange = vars
            .opt(
                "DEDUPD_DUPLICATES_EXCHANGE",
                "off",
                "if set, a copy of each duplicate is published there, for audit (declared as a durable fanout)",
                |v| {
                    if v.is_empty() {
                        Ok(None)
                    } else {
                        name(v, 0).map(Some)
                    }
                },
            )?
            .flatten();
        let confirm_timeout = vars.var(
            "DEDUPD_CONFIRM_TIMEOUT",
            "30s",
            "a publish not confirmed by then counts as failed (dead-lettered)",
            |v| duration(v, false),
        )?;
        let shutdown_grace = vars.var(
            "DEDUPD_SHUTDOWN_GRACE",
            "10s",
            "time to finish in-flight work on SIGTERM/SIGINT",
            |v| duration(v, true),
        )?;
        Ok(RelayConfig {
            enabled,
            source_queue,
            dest_exchange,
            dest_exchange_type,
            dest_routing_key,
            declare,
            id_source,
            id_scope,
            missing_id,
            prefetch,
            queue_type,
            ha,
            duplicates_exchange,
            confirm_timeout,
            shutdown_grace,
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

    /// The stream the active instance appends its commit batches to: `<source>.ids`.
    pub fn ids_stream(&self) -> String {
        format!("{}.ids", self.source_queue)
    }

    /// The queue bound to the dead-letter exchange: `<source>.dead`.
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead", self.source_queue)
    }
}

/// Where a message's id comes from: one part, or several that together make the id.
///
/// Never empty. One part is the id as it is; several are hashed together into one id of
/// [`HASHED_ID_BYTES`], as is any id with a scope (see [`RelayConfig::ids_hashed`]).
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
