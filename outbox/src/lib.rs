//! Transactional outbox for diesel and PostgreSQL.
//!
//! Write an event to the outbox table **in the same transaction** as the
//! business change; the `outbox-relay` publishes it to RabbitMQ after commit.
//! The event exists if and only if that transaction commits.
//!
//! ```no_run
//! use diesel::{Connection, PgConnection};
//! use serde::Serialize;
//!
//! #[derive(Serialize)]
//! struct OrderSubmitted {
//!     order_id: uuid::Uuid,
//!     total_cents: i64,
//! }
//!
//! impl outbox::Event for OrderSubmitted {
//!     const EXCHANGE: &'static str = "order";
//!     const ROUTING_KEY: &'static str = "order.v1.submitted";
//!     const EVENT_TYPE: &'static str = "order.submitted";
//!
//!     fn ordering_key(&self) -> Option<String> {
//!         Some(self.order_id.to_string())
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut conn = PgConnection::establish("postgres://postgres@127.0.0.1:5432/test")?;
//! outbox::migrate(&mut conn)?;
//! let enqueued = conn.transaction(|conn| {
//!     // diesel::insert_into(orders::table).values(&order).execute(conn)?;
//!     outbox::enqueue(conn, &OrderSubmitted { order_id: uuid::Uuid::now_v7(), total_cents: 4200 })
//! })?;
//! println!("event {} is number {:?} of its order", enqueued.id, enqueued.key_seq);
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! - [`event`]: the [`Event`] trait, declaring an event type.
//! - [`message`]: [`Message`], a validated message, and its builder.
//! - [`enqueue`](mod@enqueue): [`Outbox`], writing messages in the caller's transaction.
//! - [`migrate`](mod@migrate): the embedded SQL migrations and their ledger.
//! - [`retry`]: [`RetryPolicy`], the backoff the relay and the consumer share.
//! - [`amqp_tls`]: [`AmqpTls`], the certificates of `amqps://` connections.
//! - `config`, `error`: [`Config`] and [`Error`].
//! - [`wire`]: the header names and rules the relay and the consumer share.
//! - `validate`, `trace`: field rules, and the W3C trace context of the current span.
//!
//! # Features
//!
//! - `async`: the `*_async` methods of [`Outbox`] on diesel-async's
//!   `AsyncPgConnection`, and [`pg_async::connect`], which makes one the way
//!   libpq would (`sslmode` and all).
//! - `tls`: TLS for those connections (rustls).
//! - `trace-context` (default): copy the current `tracing` span's W3C trace
//!   context (from `tracing-opentelemetry`) into the message headers.

pub mod amqp_tls;
mod config;
pub mod enqueue;
mod error;
pub mod event;
pub mod message;
pub mod migrate;
#[cfg(feature = "async")]
pub mod pg_async;
mod redact;
pub mod retry;
mod trace;
mod validate;
pub mod wire;

pub use amqp_tls::AmqpTls;
pub use config::{Config, DEFAULT_MAX_PAYLOAD_BYTES, MAX_PAYLOAD_CEILING};
pub use enqueue::{Enqueued, Outbox, enqueue, enqueue_batch, enqueue_message};
pub use error::{Error, Result};
pub use event::Event;
pub use message::{Message, MessageBuilder};
pub use migrate::migrate;
pub use redact::{redact_secrets, redact_url};
pub use retry::RetryPolicy;
pub use validate::MAX_NAME_BYTES;
pub use wire::{
    EVENT_VERSION_HEADER, HASH_KEY_HEADER, KEY_SEQ_HEADER, ORDERING_KEY_HEADER, RESERVED_HEADERS,
};
