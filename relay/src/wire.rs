//! The wire format: how an outbox row becomes an AMQP message that any
//! client (pika, amqplib, the Java client) reads without our code.
//!
//! Body: the event's JSON, unwrapped. Properties: `message_id`,
//! `content_type` = `application/json`, `delivery_mode` = 2 (persistent),
//! `timestamp`, `type`, `app_id`. Headers: `x-ordering-key`, `x-key-seq`,
//! `x-event-version`, `x-hash-key` (the ordering key, else the message id),
//! plus the row's headers (user headers, `traceparent`, `tracestate`).

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use serde_json::Value;

use crate::store::PendingRow;

// The names are the outbox's: enqueue refuses them as user headers.
pub use outbox::{EVENT_VERSION_HEADER, HASH_KEY_HEADER, KEY_SEQ_HEADER, ORDERING_KEY_HEADER};

/// The AMQP properties and headers of a row.
pub fn properties(row: &PendingRow, app_id: Option<&str>) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Value::Object(map) = &row.headers {
        for (name, value) in map {
            headers.insert(short(name), to_amqp(value));
        }
    }
    if let Some(key) = &row.ordering_key {
        headers.insert(
            ORDERING_KEY_HEADER.into(),
            AMQPValue::LongString(LongString::from(key.as_str())),
        );
        // Consumers with partition queues hash on it: a key's messages
        // must all reach one queue.
        headers.insert(
            HASH_KEY_HEADER.into(),
            AMQPValue::LongString(LongString::from(key.as_str())),
        );
    } else if !headers.inner().contains_key(HASH_KEY_HEADER) {
        // Unordered: spread by id, unless the producer chose a hash key.
        headers.insert(
            HASH_KEY_HEADER.into(),
            AMQPValue::LongString(LongString::from(row.id.to_string())),
        );
    }
    if let Some(key_seq) = row.key_seq {
        headers.insert(KEY_SEQ_HEADER.into(), AMQPValue::LongLongInt(key_seq));
    }
    headers.insert(
        EVENT_VERSION_HEADER.into(),
        AMQPValue::LongInt(row.event_version),
    );
    BasicProperties::default()
        .with_message_id(row.id.to_string().into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_timestamp(u64::try_from(row.created_at.timestamp()).unwrap_or(0))
        .with_type(row.event_type.as_str().into())
        .with_app_id(app_id.unwrap_or(&row.exchange).into())
        .with_headers(headers)
}

/// A field name as an AMQP short string. Enqueue refuses names over 255
/// bytes; rows written by other means are cut rather than sent as a
/// malformed frame that would make the broker drop the connection.
fn short(name: &str) -> ShortString {
    let mut end = name.len().min(255);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    ShortString::from(&name[..end])
}

/// A JSON header value as the closest AMQP field value.
fn to_amqp(value: &Value) -> AMQPValue {
    match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => AMQPValue::LongLongInt(i),
            (None, Some(f)) => AMQPValue::Double(f),
            (None, None) => AMQPValue::LongString(n.to_string().into()),
        },
        Value::String(s) => AMQPValue::LongString(s.as_str().into()),
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items.iter().map(to_amqp).collect::<Vec<_>>(),
        )),
        Value::Object(map) => {
            let mut table = FieldTable::default();
            for (k, v) in map {
                table.insert(short(k), to_amqp(v));
            }
            AMQPValue::FieldTable(table)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            headers: serde_json::json!({"tenant": "acme", "n": 5, "traceparent": "00-ab-cd-01"}),
            created_at: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            attempts: 0,
        }
    }

    #[test]
    fn properties_carry_the_wire_format() {
        let p = properties(&row(), None);
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
        assert_eq!(h.get("tenant"), Some(&AMQPValue::LongString("acme".into())));
        assert_eq!(h.get("n"), Some(&AMQPValue::LongLongInt(5)));
        assert_eq!(
            h.get("traceparent"),
            Some(&AMQPValue::LongString("00-ab-cd-01".into()))
        );
        assert_eq!(
            properties(&row(), Some("billing"))
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
        let p = properties(&r, None);
        let h = p.headers().as_ref().unwrap().inner();
        assert!(!h.contains_key("x-ordering-key") && !h.contains_key("x-key-seq"));
        assert_eq!(
            h.get("x-hash-key"),
            Some(&AMQPValue::LongString(r.id.to_string().into())),
            "spread by id"
        );
    }

    #[test]
    fn the_hash_key_is_the_ordering_key_whatever_the_producer_set() {
        let mut r = row();
        r.headers = serde_json::json!({"x-hash-key": "mine"});
        let p = properties(&r, None);
        let h = p.headers().as_ref().unwrap().inner();
        assert_eq!(
            h.get("x-hash-key"),
            Some(&AMQPValue::LongString("order-1".into()))
        );
        r.ordering_key = None;
        let p = properties(&r, None);
        let h = p.headers().as_ref().unwrap().inner();
        assert_eq!(
            h.get("x-hash-key"),
            Some(&AMQPValue::LongString("mine".into()))
        );
    }
}
