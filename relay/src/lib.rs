//! The relay: ships committed outbox rows to RabbitMQ with publisher
//! confirms, retries with backoff, and keeps per-key order, also with
//! several relay instances on one database.
//!
//! Run it as the `outbox-relay` sidecar, or embed it with [`Relay::run`].
//!
//! # How it works
//!
//! The outbox is split into partitions (64 by default, fixed at install;
//! a row's partition is the hash of its ordering key). A worker takes a
//! partition's advisory lock in a transaction, reads up to `batch_size` due
//! rows in `seq` order, publishes them all pipelined on a confirm-mode
//! channel with `mandatory`, waits for every confirm, then deletes the
//! confirmed rows (or stamps them, with a retention) and records failures
//! with a backoff; after the last attempt a row is parked. Only the lock
//! holder works a partition, so rows of a key go out one relay at a time,
//! in order. A key whose row waits for a retry has its later rows held back
//! until that row goes out (other keys go on).
//!
//! # Layout
//!
//! - [`config`](RelayConfig) and [`retry`](RetryPolicy): settings.
//! - `store`: every SQL statement against the outbox tables.
//! - `publish` and [`wire`]: the confirm-mode channel and the wire format.
//! - `worker`: the batch loop of one worker; `relay`: [`Relay::run`], the
//!   LISTEN task, gauges and retention clean-up.
//! - [`health`]: readiness and the `/healthz`, `/readyz`, `/metrics` endpoints.
//! - [`metrics`]: metric names.

mod config;
mod error;
pub mod health;
pub mod metrics;
mod publish;
mod relay;
pub mod store;
pub mod wire;
mod worker;

pub use config::{RelayConfig, redact_url};
pub use error::{Error, Result};
pub use outbox::RetryPolicy;
pub use relay::Relay;
pub use store::{Selection, Store};
