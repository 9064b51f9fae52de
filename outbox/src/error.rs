//! The one error type of the outbox crate.

/// Everything that can go wrong when enqueueing or migrating.
///
/// Input errors ([`Error::Invalid`], [`Error::PayloadTooLarge`],
/// [`Error::Serialize`], [`Error::NotInTransaction`]) are raised before
/// anything is written. Their messages name the field and the offending value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A field of the message is not acceptable.
    #[error("invalid {field} {value:?}: {reason}")]
    Invalid {
        /// Which field: `exchange`, `routing key`, `ordering key`, ...
        field: &'static str,
        /// The value given, cut to 64 characters.
        value: String,
        /// What a valid value looks like.
        reason: &'static str,
    },

    /// The serialized payload is larger than the configured maximum.
    #[error("payload of {event_type} is {size} bytes, over the maximum of {max} bytes")]
    PayloadTooLarge {
        /// Event type of the message.
        event_type: String,
        /// Size of the serialized payload in bytes.
        size: usize,
        /// The configured maximum ([`crate::Config::max_payload_bytes`]).
        max: usize,
    },

    /// The payload could not be serialized to JSON, or raw payload bytes are not JSON.
    #[error("payload of {event_type} is not valid JSON: {cause}")]
    Serialize {
        /// Event type of the message.
        event_type: String,
        /// What serde_json reported.
        cause: serde_json::Error,
    },

    /// Enqueue was called on a connection with no open transaction, which
    /// would commit the event apart from the business change it belongs to.
    #[error(
        "enqueue must run inside the caller's transaction (call it within conn.transaction(..))"
    )]
    NotInTransaction,

    /// A configuration value is not acceptable.
    #[error("invalid config {field} = {value:?}: {reason}")]
    Config {
        /// The config field.
        field: &'static str,
        /// The value given.
        value: String,
        /// What a valid value looks like.
        reason: &'static str,
    },

    /// The database refused or failed a statement.
    #[error("database error while {operation}: {cause}")]
    Database {
        /// What we were doing: `enqueueing`, `applying migration 1`, ...
        operation: String,
        /// The diesel error, kept so callers can inspect it (for example to
        /// retry a serialization failure).
        cause: diesel::result::Error,
    },
}

// Lets `conn.transaction(..)` report a failed BEGIN or COMMIT.
impl From<diesel::result::Error> for Error {
    fn from(cause: diesel::result::Error) -> Self {
        Error::database("running a transaction", cause)
    }
}

/// `Result` with the outbox [`Error`] as its default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn database(operation: impl Into<String>, cause: diesel::result::Error) -> Self {
        Error::Database {
            operation: operation.into(),
            cause,
        }
    }

    pub(crate) fn invalid(field: &'static str, value: &str, reason: &'static str) -> Self {
        Error::Invalid {
            field,
            value: truncate(value, 64),
            reason,
        }
    }
}

/// Cuts a value for an error message so a huge input does not flood the logs.
fn truncate(value: &str, max_chars: usize) -> String {
    match value.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}...", &value[..cut]),
        None => value.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_values_are_cut_in_messages() {
        let err = Error::invalid("ordering key", &"k".repeat(300), "too long");
        let text = err.to_string();
        assert!(text.len() < 120, "{text}");
        assert!(text.contains("kkk..."), "{text}");
    }
}
