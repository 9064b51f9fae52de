//! Pure checks of message fields, shared by every way of building a message.
//!
//! The same rules are enforced again by the `outbox_enqueue` SQL function, so
//! writers in other languages get them too; these run first so Rust callers
//! get a typed error without a round trip.

use crate::{Error, Result};

/// Longest exchange, routing key, event type, ordering key or header name, in
/// bytes: the AMQP short-string limit.
pub const MAX_NAME_BYTES: usize = 255;

fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':')
}

/// An exchange: 1 to 255 of `A-Z a-z 0-9 _ . : -`, not starting with `amq.`.
pub(crate) fn exchange(value: &str) -> Result<()> {
    if value.is_empty()
        || value.len() > MAX_NAME_BYTES
        || !value.chars().all(|c| name_char(c) || c == '.')
    {
        return Err(Error::invalid(
            "exchange",
            value,
            "use 1 to 255 of A-Z a-z 0-9 _ . : -",
        ));
    }
    if value.starts_with("amq.") {
        return Err(Error::invalid(
            "exchange",
            value,
            "the amq. prefix is reserved by the broker",
        ));
    }
    Ok(())
}

/// A routing key: dot-separated non-empty words of `A-Z a-z 0-9 _ : -`, at
/// most 255 bytes. `*` and `#` are refused: they are wildcards in bindings.
pub(crate) fn routing_key(value: &str) -> Result<()> {
    if value.is_empty()
        || value.len() > MAX_NAME_BYTES
        || !value
            .split('.')
            .all(|word| !word.is_empty() && word.chars().all(name_char))
    {
        return Err(Error::invalid(
            "routing key",
            value,
            "use dot-separated words of A-Z a-z 0-9 _ : -, at most 255 bytes",
        ));
    }
    Ok(())
}

/// An event type: 1 to 255 bytes without control characters.
pub(crate) fn event_type(value: &str) -> Result<()> {
    if value.is_empty() || value.len() > MAX_NAME_BYTES || value.chars().any(char::is_control) {
        return Err(Error::invalid(
            "event type",
            value,
            "must be 1 to 255 bytes without control characters",
        ));
    }
    Ok(())
}

/// An event version: 1 or more, and fits the database's `integer`.
pub(crate) fn event_version(value: u32) -> Result<i32> {
    match i32::try_from(value) {
        Ok(v) if v >= 1 => Ok(v),
        _ => Err(Error::invalid(
            "event version",
            &value.to_string(),
            "must be 1 to 2147483647",
        )),
    }
}

/// An ordering key: 1 to 255 bytes. Unordered events have none at all.
pub(crate) fn ordering_key(value: &str) -> Result<()> {
    if value.is_empty() || value.len() > MAX_NAME_BYTES {
        return Err(Error::invalid(
            "ordering key",
            value,
            "must be 1 to 255 bytes (use no key for unordered events)",
        ));
    }
    Ok(())
}

/// A header name: 1 to 255 bytes, not one the relay sets.
pub(crate) fn header_name(value: &str) -> Result<()> {
    if value.is_empty() || value.len() > MAX_NAME_BYTES {
        return Err(Error::invalid(
            "header name",
            value,
            "must be 1 to 255 bytes",
        ));
    }
    if crate::wire::is_reserved(value) {
        return Err(Error::invalid(
            "header name",
            value,
            "reserved: the toolkit sets and interprets it (see outbox::wire::is_reserved)",
        ));
    }
    Ok(())
}

/// A header value: names inside nested objects are AMQP short strings too,
/// so each must be 1 to 255 bytes.
pub(crate) fn header_value(value: &serde_json::Value) -> Result<()> {
    match value {
        serde_json::Value::Object(map) => {
            for (inner, v) in map {
                if inner.is_empty() || inner.len() > MAX_NAME_BYTES {
                    return Err(Error::invalid(
                        "header name",
                        inner,
                        "names inside a header's nested object must be 1 to 255 bytes",
                    ));
                }
                header_value(v)?;
            }
            Ok(())
        }
        serde_json::Value::Array(items) => items.iter().try_for_each(header_value),
        _ => Ok(()),
    }
}

/// A schema name: a plain lower-case SQL identifier, so it can be quoted
/// into statements safely.
pub(crate) fn schema(value: &str) -> Result<()> {
    let mut chars = value.chars();
    let starts_well = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    if !starts_well
        || value.len() > 63
        || !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        || value.starts_with("pg_")
    {
        return Err(Error::Config {
            field: "schema",
            value: value.to_owned(),
            reason: "must be 1 to 63 of a-z 0-9 _, start with a letter or _, and not start with pg_",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchange_accepts_service_names_and_refuses_others() {
        for good in ["order", "billing-service", "shop.order", "a:b_c"] {
            assert!(exchange(good).is_ok(), "{good}");
        }
        for bad in ["", "amq.topic", "has space", "ünï", "a/b", &"x".repeat(256)] {
            assert!(exchange(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn routing_key_wants_dotted_words_without_wildcards() {
        for good in ["order.v1.submitted", "a", "a-b.c_d.e:f"] {
            assert!(routing_key(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".a",
            "a.",
            "a..b",
            "order.*.submitted",
            "order.#",
            "a b",
        ] {
            assert!(routing_key(bad).is_err(), "{bad}");
        }
        assert!(routing_key(&"a".repeat(256)).is_err());
        assert!(routing_key(&"a".repeat(255)).is_ok());
    }

    #[test]
    fn ordering_key_is_one_to_255_bytes_of_anything() {
        assert!(ordering_key("order-42 / tenant é").is_ok());
        assert!(ordering_key("").is_err());
        assert!(ordering_key(&"é".repeat(128)).is_err(), "256 bytes");
    }

    #[test]
    fn event_type_and_version_limits() {
        assert!(event_type("order.submitted").is_ok());
        assert!(event_type("").is_err());
        assert!(event_type("a\nb").is_err());
        assert_eq!(event_version(2).unwrap(), 2);
        assert!(event_version(0).is_err());
        assert!(event_version(u32::MAX).is_err());
    }

    #[test]
    fn reserved_header_names_are_refused_in_any_case() {
        assert!(header_name("tenant").is_ok());
        assert!(header_name("X-Key-Seq").is_err());
        assert!(header_name("").is_err());
        let long = "n".repeat(256);
        assert!(header_value(&serde_json::json!({ "ok": [{ "fine": 1 }] })).is_ok());
        assert!(header_value(&serde_json::json!({ "a": { long.clone(): 1 } })).is_err());
        assert!(header_value(&serde_json::json!([{ long: 1 }])).is_err());
    }

    #[test]
    fn schema_names_are_plain_identifiers() {
        for good in ["public", "orders", "_x1"] {
            assert!(schema(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Orders",
            "1abc",
            "a-b",
            "a\"b",
            "pg_catalog",
            &"a".repeat(64),
        ] {
            assert!(schema(bad).is_err(), "{bad}");
        }
    }
}
