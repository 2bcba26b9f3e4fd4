//! dedupd: a message-deduplication relay for RabbitMQ with an embedded, crash-safe dedup store.
//!
//! # Layout
//!
//! Dependencies point one way, down this list: a part uses only parts above it, never its
//! caller.
//!
//! - [`store`]: the dedup engine ([`Store`]): Bloom prefilter and exact index in memory, sled
//!   segments on disk as the truth, a background compactor expiring ids past their window. No
//!   AMQP or RESP in it.
//! - [`config`]: the typed [`Config`], one section per part, parsed once from `DEDUPD_*`
//!   variables, each declared once where its section reads it.
//! - [`shutdown`]: SIGINT/SIGTERM cancelling the token every task watches.
//! - [`metrics`]: what dedupd counts, rendered as Prometheus text.
//! - `amqp` (crate-private): connection (TLS for `amqps://`; [`ConnectError`] says why it did
//!   not open), topology, the connection and channel callbacks (which only forward to an mpsc),
//!   and the quarantine sweep of undecodable messages; serves the relay and the shard commands.
//! - [`relay`]: the relay protocol as a pure state machine, driven by one session per broker
//!   connection; reconnects, per-message windows, the HA standby.
//! - [`redis`]: the Redis-protocol endpoint (RESP2/RESP3, Lua scripts) on the store's key-value
//!   namespace.
//! - [`admin`]: check / forget / record / stats answers about the store.
//! - [`backup`]: `dedupd backup` (online, streamed from the service) and `dedupd restore`.
//! - [`http`]: the operator's endpoint (axum): `/healthz`, `/metrics`, `/stats`, `/ids/{id}`.
//! - [`shard`]: past one node, a consistent-hash exchange spreading ids over N dedupd instances,
//!   and the re-sharding cut-over.
//! - [`service`]: the one place that opens the store, starts the endpoints and the relay, and
//!   stops them in a written order on one shutdown signal; [`run`] is the entry, and
//!   [`service::run_with_clock`] the same on a clock of the caller's (every part reads it).
//! - [`cli`]: the command line (clap): runs the service, or an admin command over the HTTP
//!   endpoint or the data dir (`cli::ask`), `import-redis` (`cli::import_redis`), `topology`.
//!   `main.rs` only parses, calls [`cli::run`] and maps the error to an exit code.

#![warn(missing_docs)]

pub mod store;

pub use store::{
    Claim, Durability, Error as StoreError, Seen, Settled, Stats, Store, StoreConfig, Verdict,
};
pub mod admin;
pub(crate) mod amqp;
pub mod backup;
pub mod cli;
pub mod config;
pub mod http;
pub mod metrics;
pub mod redis;
pub mod relay;
pub mod service;
pub mod shard;
pub mod shutdown;

pub use amqp::ConnectError;
pub use config::Config;
pub use service::run;

/// The README's Rust examples, compiled by `cargo test` (doc tests) so that they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
