//! Settings of an [`crate::Outbox`] handle.

use crate::{Error, Result, validate};

/// Default for [`Config::max_payload_bytes`]: 256 KiB.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 256 * 1024;

/// The largest [`Config::max_payload_bytes`] allowed: RabbitMQ's default
/// `max_message_size` (128 MiB); a larger message could never be published.
pub const MAX_PAYLOAD_CEILING: usize = 128 * 1024 * 1024;

/// Where the outbox lives and what it accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The PostgreSQL schema that holds the outbox tables and functions, as
    /// given to the migrations. A plain lower-case identifier.
    /// Defaults to `public`.
    pub schema: String,

    /// Largest serialized payload accepted by enqueue, in bytes; larger ones
    /// are refused before anything is written. Defaults to 262144 (256 KiB).
    pub max_payload_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            schema: "public".to_owned(),
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
        }
    }
}

impl Config {
    /// Checks every field.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming the field: a schema that is not a plain
    /// lower-case identifier, or a payload limit of 0 or over 128 MiB.
    pub fn validate(&self) -> Result<()> {
        validate::schema(&self.schema)?;
        if self.max_payload_bytes == 0 || self.max_payload_bytes > MAX_PAYLOAD_CEILING {
            return Err(Error::Config {
                field: "max_payload_bytes",
                value: self.max_payload_bytes.to_string(),
                reason: "must be 1 to 134217728 (RabbitMQ's default max_message_size)",
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_bad_fields_are_named() {
        Config::default().validate().unwrap();
        let err = Config {
            max_payload_bytes: 0,
            ..Config::default()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("max_payload_bytes"), "{err}");
        let err = Config {
            schema: "Bad Name".into(),
            ..Config::default()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("schema"), "{err}");
    }
}
