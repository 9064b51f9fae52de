//! The idempotent consumer: handlers that apply each message once per
//! consumer name, in order per key.
//!
//! Built so far: the per-message transaction ([`Inbox::apply`]) and the
//! sequence decision ([`sequence`]). The RabbitMQ side (topology, lanes,
//! acks, dead letters) is to come (issue 4).
//!
//! # Layout
//!
//! - [`inbox`]: [`Inbox`], dedupe and key position in the handler's transaction.
//! - [`sequence`]: where a `key_seq` stands against the key's position.

pub mod inbox;
pub mod sequence;

pub use inbox::{AheadPolicy, Applied, HandlerError, Inbox, Incoming};

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
}

/// `Result` with the consumer [`Error`] as its default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
