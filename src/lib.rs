//! dedupd: a message-deduplication relay for RabbitMQ with an embedded, crash-safe dedup store.
//!
//! # Layout
//!
//! - [`store`]: the dedup engine ([`Store`]): Bloom prefilter in memory, sled on disk as the
//!   exact truth, a background compactor expiring ids past their window. No AMQP in it.
//! - [`relay`]: the AMQP side (amqprs): connection and reconnects, topology, the per-message
//!   protocol (claim, publish with confirms, commit, ack), dead-lettering.
//! - [`config`]: the typed [`Config`] parsed once from `DEDUPD_*` variables, and their table.
//! - [`http`]: the operator's endpoint: `/healthz`, `/metrics`, `/stats`, `/ids/{id}`.
//! - [`metrics`]: what dedupd counts, rendered as Prometheus text.
//! - [`cli`]: the admin subcommands (`check`, `forget`, `stats`), over HTTP or the data dir.
//! - [`admin`]: check / forget / stats answers, served over HTTP or from the data dir directly.
//! - [`redis`]: the Redis-protocol endpoint (RESP2/RESP3) on the store's key-value namespace,
//!   and `dedupd import-redis`.
//! - [`service`]: the one place that opens the store, starts the endpoints and the relay, and
//!   stops them in order on one shutdown signal; [`run`] is the entry.
//! - [`shutdown`]: SIGINT/SIGTERM cancelling the token the service stops on.
//! - [`shard`]: past one node, a consistent-hash exchange spreading ids over N dedupd instances,
//!   and the re-sharding cut-over.

#![warn(missing_docs)]

pub mod store;

pub use store::{Claim, Error as StoreError, Seen, Settled, Stats, Store, StoreConfig, Verdict};
pub mod admin;
pub(crate) mod amqp;
pub mod cli;
pub mod config;
pub mod http;
pub mod metrics;
pub mod redis;
pub mod relay;
pub mod service;
pub mod shard;
pub mod shutdown;

pub use config::Config;
pub use service::run;

/// The README's Rust examples, compiled by `cargo test` (doc tests) so that they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
