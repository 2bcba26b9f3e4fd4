//! dedupd: a message-deduplication relay for RabbitMQ with an embedded, crash-safe dedup store.
//!
//! # Layout
//!
//! - [`store`]: the dedup engine ([`Store`]): Bloom prefilter in memory, sled on disk as the
//!   exact truth, a background compactor expiring ids past their window. No AMQP in it.

#![warn(missing_docs)]

pub mod store;

pub use store::{Claim, Error as StoreError, Seen, Settled, Stats, Store, StoreConfig, Verdict};
