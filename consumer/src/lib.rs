//! The idempotent consumer: handlers that apply each message once per
//! consumer name, in order per key, on RabbitMQ.
//!
//! ```no_run
//! use consumer::{Consumer, ConsumerConfig, Envelope, HandlerError};
//! use diesel::PgConnection;
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! struct OrderSubmitted {
//!     order_id: uuid::Uuid,
//!     total_cents: i64,
//! }
//!
//! fn charge(conn: &mut PgConnection, e: Envelope<OrderSubmitted>) -> Result<(), HandlerError> {
//!     // Write with `conn`: it is the inbox's transaction, so the charge
//!     // commits together with the record that this message was applied.
//!     let _ = (conn, e.event.order_id, e.event.total_cents);
//!     Ok(())
//! }
//!
//! # async fn run() -> Result<(), consumer::Error> {
//! let config = ConsumerConfig::new(
//!     "billing",
//!     "postgres://postgres@127.0.0.1:5432/test",
//!     "amqp://guest:guest@127.0.0.1:5672/%2f",
//! );
//! let consumer = Consumer::builder(config)
//!     .handle("order", "order.*.submitted", charge)
//!     .build()?;
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! consumer.run(shutdown).await?;
//! # Ok(()) }
//! ```
//!
//! Each delivery runs in one database transaction: lock the key's position
//! row, record the message id (a second delivery of it is a duplicate: acked,
//! handler not run), check its `x-key-seq` against the key's position, run
//! the handler on the same connection, commit, and only then ack.
//! Deliveries of one key run one at a time, lowest sequence first; keys run
//! side by side on `lanes` connections. A retry waits inside its key while
//! other keys go on; after the last attempt, or at once for a body that
//! does not deserialize, the message goes to the dead-letter queue with the
//! reason in headers, and its key moves on. When a backlog waits, a lane
//! applies up to `batch_size` deliveries of different keys in one such
//! transaction (see [`ConsumerConfig::batch_size`]).
//!
//! # Layout
//!
//! - [`consumer`](mod@consumer): [`Consumer`], its builder and its run loop.
//! - [`config`]: [`ConsumerConfig`] and its policies.
//! - [`inbox`]: [`Inbox`], dedupe and key position in the handler's transaction.
//! - [`envelope`]: [`Envelope`] and [`Meta`], what a handler receives.
//! - [`dead_letter`]: dead-letter headers and [`replay_dead_letters`].
//! - [`sequence`], [`route`]: pure rules (key position, topic patterns).
//! - `session`, `lane`, `batch`, `schedule`: consuming, running a
//!   delivery or a batch of them, choosing the next.
//! - `held`: messages ahead of their key, kept in the database until their turn.
//! - `topology`, `members`: broker objects and the partition count, queue
//!   sharing among live instances.
//!
//! # Features
//!
//! - `async`: [`ConsumerBuilder::handle_async`] for diesel-async handlers.
//! - `trace-context` (default): the handler span continues the message's
//!   W3C trace context (with `tracing-opentelemetry`).

mod batch;
pub mod config;
mod connect;
pub mod consumer;
pub mod dead_letter;
pub mod envelope;
mod handler;
mod held;
pub mod inbox;
#[cfg(feature = "async")]
mod inbox_async;
mod lane;
mod members;
mod quarantine;
#[doc(hidden)]
pub mod raw_amqp;
pub mod route;
mod schedule;
pub mod sequence;
mod session;
mod stats;
mod strict;
mod topology;
mod trace;

pub use config::{ConsumerConfig, GapPolicy, LatePolicy, UnknownPolicy};
pub use consumer::{Consumer, ConsumerBuilder};
pub use dead_letter::replay_dead_letters;
pub use envelope::{Envelope, Meta};
#[cfg(feature = "async")]
pub use handler::BoxFuture;
pub use handler::HandlerResult;
pub use inbox::{AheadPolicy, Applied, HandlerError, Inbox, Incoming, Settled};
pub use stats::Stats;

/// What can go wrong in the consumer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is not acceptable.
    #[error("invalid config {field}: {reason}")]
    Config {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A database statement failed; the message's transaction rolled back.
    #[error("database error while {operation}: {cause}")]
    Database {
        /// What the consumer was doing.
        operation: &'static str,
        /// The diesel error.
        cause: diesel::result::Error,
    },
    /// The database or broker could not be reached.
    #[error("cannot connect to the {what} at {url}: {cause}")]
    Connect {
        /// `database` or `broker`.
        what: &'static str,
        /// The URL, password removed.
        url: String,
        /// Why.
        cause: String,
    },
    /// The broker failed an operation (channel or connection lost, no confirm).
    #[error("broker error while {operation}: {cause}")]
    Broker {
        /// What the consumer was doing.
        operation: &'static str,
        /// Why.
        cause: String,
    },
    /// The broker refused one of the consumer's queues, exchanges or bindings.
    #[error("the broker refused {object}: {reason}")]
    Topology {
        /// Which object.
        object: String,
        /// Why, and what to do.
        reason: String,
    },
    /// A handler panicked; the transaction rolled back and the message is retried.
    #[error("{0}")]
    Handler(String),
    /// A delivery the client library cannot parse (its properties are not
    /// valid UTF-8 where AMQP has strings) ended the broker connection; the
    /// consumer moves it to the dead-letter queue before reconnecting.
    #[error("a delivery the client cannot parse ended the connection: {cause}")]
    UnreadableDelivery {
        /// The parser's error.
        cause: String,
    },
}

/// `Result` with the consumer [`Error`] as its default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
