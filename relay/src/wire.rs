//! The wire format: how an outbox row becomes an AMQP message that any
//! client (pika, amqplib, the Java client) reads without our code. The
//! names and rules are [`outbox::wire`]'s; this module writes them.
//!
//! Body: the event's JSON, unwrapped. Properties: `message_id`,
//! `content_type` = `application/json`, `delivery_mode` = 2 (persistent),
//! `timestamp`, `type`, `app_id`. Headers: the row's own (user headers,
//! `traceparent`, `tracestate`), then `x-ordering-key`, `x-key-seq`,
//! `x-key-prev`, `x-key-prev-any`, `x-event-version`, `x-hash-key` and the
//! slot header `outbox-slot-<n>`.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use serde_json::Value;

use crate::store::PendingRow;

// The names are the outbox's: enqueue refuses them as user headers.
pub use outbox::wire::{
    EVENT_VERSION_HEADER, HASH_KEY_HEADER, KEY_PREV_ANY_HEADER, KEY_PREV_HEADER, KEY_SEQ_HEADER,
    ORDERING_KEY_HEADER,
};

/// Why a row cannot be sent as it is: it will fail the same way every time,
/// so the relay parks it with this reason.
pub type Poison = String;

/// The AMQP properties and headers of a row, or why it cannot be sent:
/// a destination or type that breaks the enqueue rules, headers that do
/// not parse or break AMQP's limits (names of 1 to 255 bytes), or
/// properties larger than `max_bytes` (the broker takes them in one frame,
/// and closes the connection on a larger one).
pub fn properties(
    row: &PendingRow,
    app_id: Option<&str>,
    max_bytes: usize,
) -> Result<BasicProperties, Poison> {
    outbox::wire::check_route(&row.exchange, &row.routing_key, &row.event_type)?;
    let app_id = app_id.unwrap_or(&row.exchange);
    if app_id.len() > 255 {
        return Err(format!("app_id is {} bytes, over 255", app_id.len()));
    }
    if row.headers.len() > outbox::wire::MAX_HEADERS_BYTES {
        return Err(format!(
            "headers are {} bytes as JSON, over the maximum of {}",
            row.headers.len(),
            outbox::wire::MAX_HEADERS_BYTES
        ));
    }
    let user: Value = serde_json::from_str(&row.headers)
        .map_err(|e| format!("headers do not parse as JSON a client can read: {e}"))?;
    let mut headers = FieldTable::default();
    match &user {
        Value::Object(map) => {
            for (name, value) in map {
                // Rows written before migration 00005 (or by hand without
                // the enqueue function) may carry names the toolkit sets
                // or interprets; publishing them would let a producer
                // forge a slot, an order or a replay. The relay's own
                // values replace them below.
                if outbox::wire::is_reserved(name) {
                    tracing::warn!(message_id = %row.id, header = %name, "stripped a reserved header name the producer set");
                    continue;
                }
                headers.insert(short(name)?, to_amqp(value)?);
            }
        }
        other => return Err(format!("headers must be a JSON object, got {other}")),
    }
    // The hash key: the ordering key; for an unordered message the
    // producer's own x-hash-key if it chose one, else the id. The slot
    // (which partition queue of a consumer takes it) follows from it.
    let hash_key = match (&row.ordering_key, headers.inner().get(HASH_KEY_HEADER)) {
        (Some(key), _) => key.clone(),
        (None, Some(AMQPValue::LongString(chosen))) => chosen.to_string(),
        (None, _) => row.id.to_string(),
    };
    headers.insert(
        outbox::wire::slot_header(outbox::wire::slot(&hash_key)).into(),
        AMQPValue::Boolean(true),
    );
    headers.insert(
        HASH_KEY_HEADER.into(),
        AMQPValue::LongString(LongString::from(hash_key.as_str())),
    );
    if let (Some(key), Some(key_seq)) = (&row.ordering_key, row.key_seq) {
        headers.insert(
            ORDERING_KEY_HEADER.into(),
            AMQPValue::LongString(LongString::from(key.as_str())),
        );
        headers.insert(KEY_SEQ_HEADER.into(), AMQPValue::LongLongInt(key_seq));
        headers.insert(KEY_PREV_HEADER.into(), key_prev(row.key_prev.as_ref())?);
        if let Some(any) = row.key_prev_any.filter(|n| *n > 0) {
            headers.insert(KEY_PREV_ANY_HEADER.into(), AMQPValue::LongLongInt(any));
        }
    }
    headers.insert(
        EVENT_VERSION_HEADER.into(),
        AMQPValue::LongInt(row.event_version),
    );
    let properties = BasicProperties::default()
        .with_message_id(row.id.to_string().into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_timestamp(u64::try_from(row.created_at.timestamp()).unwrap_or(0))
        .with_type(row.event_type.as_str().into())
        .with_app_id(app_id.into())
        .with_headers(headers);
    // Encoding costs a copy: only when the headers could come near the limit.
    let estimate =
        row.headers.len() + row.key_prev.as_ref().map_or(0, |p| p.to_string().len() * 2) + 2 * 1024;
    if estimate > max_bytes {
        let size = lapin::protocol::basic::gen_properties(&properties)(Vec::new().into())
            .map(|w| w.write.len())
            .map_err(|e| format!("properties do not encode: {e}"))?;
        if size > max_bytes {
            return Err(format!(
                "properties are {size} bytes encoded, over the {max_bytes} the broker takes in one frame"
            ));
        }
    }
    Ok(properties)
}

/// `x-key-prev`: `{exchange: {routing key: key_seq}}` as nested tables of
/// long long integers; entries that are not numbers are left out (the
/// enqueue function writes only numbers).
fn key_prev(value: Option<&Value>) -> Result<AMQPValue, Poison> {
    let mut routes = FieldTable::default();
    if let Some(Value::Object(exchanges)) = value {
        for (exchange, keys) in exchanges {
            let mut seqs = FieldTable::default();
            if let Value::Object(keys) = keys {
                for (key, seq) in keys {
                    if let Some(seq) = seq.as_i64() {
                        seqs.insert(short(key)?, AMQPValue::LongLongInt(seq));
                    }
                }
            }
            routes.insert(short(exchange)?, AMQPValue::FieldTable(seqs));
        }
    }
    Ok(AMQPValue::FieldTable(routes))
}

/// A field name as an AMQP short string: 1 to 255 bytes.
fn short(name: &str) -> Result<ShortString, Poison> {
    if name.is_empty() || name.len() > 255 {
        return Err(format!(
            "header name {:?} is {} bytes: AMQP takes 1 to 255",
            name.chars().take(64).collect::<String>(),
            name.len()
        ));
    }
    Ok(ShortString::from(name))
}

/// A JSON header value as the closest AMQP field value.
fn to_amqp(value: &Value) -> Result<AMQPValue, Poison> {
    Ok(match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => AMQPValue::LongLongInt(i),
            (None, Some(f)) => AMQPValue::Double(f),
            (None, None) => AMQPValue::LongString(n.to_string().into()),
        },
        Value::String(s) => AMQPValue::LongString(s.as_str().into()),
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items.iter().map(to_amqp).collect::<Result<Vec<_>, _>>()?,
        )),
        Value::Object(map) => {
            let mut table = FieldTable::default();
            for (k, v) in map {
                table.insert(short(k)?, to_amqp(v)?);
            }
            AMQPValue::FieldTable(table)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RabbitMQ's default frame size, less the frame's own bytes.
    const MAX: usize = 131_072 - 8;

    fn row() -> PendingRow {
        PendingRow {
            seq: 1,
            id: uuid::Uuid::from_u128(7),
            ordering_key: Some("order-1".into()),
            key_seq: Some(3),
            exchange: "order".into(),
            routing_key: "order.v2.submitted".into(),
            event_type: "order.submitted".into(),
            event_version: 2,
            payload: b"{}".to_vec(),
            headers: r#"{"tenant": "acme", "n": 5, "traceparent": "00-ab-cd-01"}"#.into(),
            created_at: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            attempts: 0,
            key_prev: Some(
                serde_json::json!({"order": {"order.v1.submitted": 1, "order.v1.paid": 2}}),
            ),
            key_prev_any: None,
        }
    }

    #[test]
    fn reserved_names_a_producer_wrote_are_stripped() {
        let mut forged = row();
        forged.ordering_key = None;
        forged.key_seq = None;
        forged.headers = r#"{"tenant": "acme", "X-Dead-Letter-Replay": true,
            "x-original-exchange": "payment", "outbox-slot-9": true, "x-key-seq": 99}"#
            .into();
        let p = properties(&forged, None, MAX).unwrap();
        let h = p.headers().as_ref().unwrap().inner();
        assert_eq!(h.get("tenant"), Some(&AMQPValue::LongString("acme".into())));
        for name in ["X-Dead-Letter-Replay", "x-original-exchange", "x-key-seq"] {
            assert!(!h.contains_key(name), "{name} reached the wire");
        }
        let slot = outbox::wire::slot_header(outbox::wire::slot(&forged.id.to_string()));
        let slots: Vec<_> = h
            .keys()
            .filter(|k| k.as_str().starts_with("outbox-slot-"))
            .collect();
        assert_eq!(slots.len(), 1, "only the relay's own slot: {slots:?}");
        assert_eq!(slots[0].as_str(), slot);
    }

    #[test]
    fn properties_carry_the_wire_format() {
        let p = properties(&row(), None, MAX).unwrap();
        assert_eq!(
            p.message_id().as_ref().unwrap().as_str(),
            "00000000-0000-0000-0000-000000000007"
        );
        assert_eq!(
            p.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(*p.delivery_mode(), Some(2));
        assert_eq!(*p.timestamp(), Some(1_700_000_000));
        assert_eq!(p.kind().as_ref().unwrap().as_str(), "order.submitted");
        assert_eq!(
            p.app_id().as_ref().unwrap().as_str(),
            "order",
            "defaults to the exchange"
        );
        let h = p.headers().as_ref().unwrap().inner();
        assert_eq!(
            h.get("x-ordering-key"),
            Some(&AMQPValue::LongString("order-1".into()))
        );
        assert_eq!(h.get("x-key-seq"), Some(&AMQPValue::LongLongInt(3)));
        assert_eq!(h.get("x-event-version"), Some(&AMQPValue::LongInt(2)));
        let slot = outbox::wire::slot_header(outbox::wire::slot("order-1"));
        assert_eq!(h.get(slot.as_str()), Some(&AMQPValue::Boolean(true)));
        let Some(AMQPValue::FieldTable(prev)) = h.get("x-key-prev") else {
            panic!("x-key-prev is a table: {h:?}");
        };
        let Some(AMQPValue::FieldTable(order)) = prev.inner().get("order") else {
            panic!("routes of exchange order: {prev:?}");
        };
        assert_eq!(
            order.inner().get("order.v1.paid"),
            Some(&AMQPValue::LongLongInt(2))
        );
        assert!(
            !h.contains_key("x-key-prev-any"),
            "only when some are unknown"
        );
        assert_eq!(h.get("tenant"), Some(&AMQPValue::LongString("acme".into())));
        assert_eq!(h.get("n"), Some(&AMQPValue::LongLongInt(5)));
        assert_eq!(
            h.get("traceparent"),
            Some(&AMQPValue::LongString("00-ab-cd-01".into()))
        );
        assert_eq!(
            properties(&row(), Some("billing"), MAX)
                .unwrap()
                .app_id()
                .as_ref()
                .unwrap()
                .as_str(),
            "billing"
        );
    }

    #[test]
    fn unkeyed_rows_have_no_key_headers() {
        let mut r = row();
        r.ordering_key = None;
        r.key_seq = None;
        let p = properties(&r, None, MAX).unwrap();
        let h = p.headers().as_ref().unwrap().inner();
        assert!(!h.contains_key("x-ordering-key") && !h.contains_key("x-key-seq"));
        assert!(!h.contains_key("x-key-prev"));
        let slot = outbox::wire::slot_header(outbox::wire::slot(&r.id.to_string()));
        assert_eq!(h.get(slot.as_str()), Some(&AMQPValue::Boolean(true)));
        assert_eq!(
            h.get("x-hash-key"),
            Some(&AMQPValue::LongString(r.id.to_string().into())),
            "spread by id"
        );
    }

    #[test]
    fn the_hash_key_is_the_ordering_key_whatever_the_producer_set() {
        let mut r = row();
        r.headers = r#"{"x-hash-key": "mine"}"#.into();
        let p = properties(&r, None, MAX).unwrap();
        let h = p.headers().as_ref().unwrap().inner();
        assert_eq!(
            h.get("x-hash-key"),
            Some(&AMQPValue::LongString("order-1".into()))
        );
        r.ordering_key = None;
        let p = properties(&r, None, MAX).unwrap();
        let h = p.headers().as_ref().unwrap().inner();
        assert_eq!(
            h.get("x-hash-key"),
            Some(&AMQPValue::LongString("mine".into()))
        );
    }

    mod properties_never_panic {
        use proptest::prelude::*;
        use serde_json::Value;

        use super::*;

        /// JSON values a few levels deep, with names and strings of any
        /// length (well past AMQP's 255-byte short strings).
        fn json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                ".{0,300}".prop_map(Value::String),
            ];
            leaf.prop_recursive(4, 64, 8, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    prop::collection::btree_map(".{0,300}", inner, 0..6)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// Header text: JSON of any shape, or not JSON at all.
        fn headers() -> impl Strategy<Value = String> {
            prop_oneof![
                json().prop_map(|v| v.to_string()),
                ".{0,200}",
                Just(r#"{"n": 1e400}"#.to_owned()),
                Just(format!(
                    "{{\"d\": {}1{}}}",
                    "[".repeat(200),
                    "]".repeat(200)
                )),
            ]
        }

        proptest! {
            #[test]
            fn any_row_is_encoded_or_refused_with_a_reason(
                exchange in ".{0,300}",
                routing_key in ".{0,300}",
                event_type in ".{0,300}",
                key in proptest::option::of(".{0,300}"),
                key_seq in any::<i64>(),
                headers in headers(),
                key_prev in proptest::option::of(json()),
                key_prev_any in proptest::option::of(any::<i64>()),
                app_id in proptest::option::of(".{0,300}"),
                max_bytes in 0usize..200_000,
            ) {
                let row = PendingRow {
                    exchange,
                    routing_key,
                    event_type,
                    key_seq: key.as_ref().map(|_| key_seq),
                    ordering_key: key,
                    headers,
                    key_prev,
                    key_prev_any,
                    ..row()
                };
                if let Err(reason) = properties(&row, app_id.as_deref(), max_bytes) {
                    prop_assert!(!reason.is_empty());
                }
            }
        }
    }
}
