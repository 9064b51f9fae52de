//! Bad input is refused before anything is written, with a message that
//! names the field and the value, and the caller's transaction stays usable.

mod common;

use std::collections::HashMap;

use common::{count, outbox_in_own_schema};
use diesel::Connection;
use outbox::{Config, Error, Message, Outbox};
use serde::Serialize;

fn builder() -> outbox::MessageBuilder {
    Message::builder("order", "order.v1.submitted", "order.submitted").json(&1)
}

#[derive(Serialize)]
struct Unserializable {
    // serde_json refuses maps whose keys are not strings.
    by_pair: HashMap<(u8, u8), u8>,
}

impl outbox::Event for Unserializable {
    const EXCHANGE: &'static str = "order";
    const ROUTING_KEY: &'static str = "order.v1.weird";
    const EVENT_TYPE: &'static str = "order.weird";

    fn ordering_key(&self) -> Option<String> {
        None
    }
}

#[derive(Serialize)]
struct BadExchange;

impl outbox::Event for BadExchange {
    const EXCHANGE: &'static str = "order service";
    const ROUTING_KEY: &'static str = "order.v1.x";
    const EVENT_TYPE: &'static str = "order.x";

    fn ordering_key(&self) -> Option<String> {
        None
    }
}

#[test]
fn each_bad_field_is_refused_with_its_name_and_value() {
    let long_key = "k".repeat(256);
    let cases: Vec<(Result<Message, Error>, &str)> = vec![
        (
            builder().ordering_key("").build(),
            r#"invalid ordering key """#,
        ),
        (
            builder().ordering_key(long_key).build(),
            "invalid ordering key \"kkkk",
        ),
        (
            Message::builder("amq.topic", "a.b", "t").json(&1).build(),
            r#"invalid exchange "amq.topic": the amq. prefix is reserved"#,
        ),
        (
            Message::builder("shop/orders", "a.b", "t").json(&1).build(),
            r#"invalid exchange "shop/orders""#,
        ),
        (
            Message::builder("", "a.b", "t").json(&1).build(),
            r#"invalid exchange """#,
        ),
        (
            Message::builder("order", "order.*.submitted", "t")
                .json(&1)
                .build(),
            r#"invalid routing key "order.*.submitted""#,
        ),
        (
            Message::builder("order", "order v1", "t").json(&1).build(),
            r#"invalid routing key "order v1""#,
        ),
        (
            Message::builder("order", "a.b", "").json(&1).build(),
            r#"invalid event type """#,
        ),
        (builder().version(0).build(), r#"invalid event version "0""#),
        (
            builder().header("x-ordering-key", "k").build(),
            r#"invalid header name "x-ordering-key": reserved"#,
        ),
        (
            Message::from_event(&Unserializable {
                by_pair: HashMap::from([((1, 2), 3)]),
            }),
            "payload of order.weird is not valid JSON: key must be a string",
        ),
        (
            Message::from_event(&BadExchange),
            r#"invalid exchange "order service""#,
        ),
        (
            builder().raw_json(b"not json".to_vec()).build(),
            "payload of order.submitted is not valid JSON",
        ),
    ];
    for (result, expected) in cases {
        let err = result.expect_err(expected);
        assert!(
            err.to_string().contains(expected),
            "got {err:?} ({err}), want it to contain {expected}"
        );
    }
}

#[test]
fn oversized_payload_is_refused_and_nothing_is_written() {
    let (schema, outbox) = outbox_in_own_schema("oversized");
    let mut conn = schema.connect();
    let big = "x".repeat(outbox::DEFAULT_MAX_PAYLOAD_BYTES); // plus quotes: 2 bytes over
    let message = builder()
        .ordering_key("order-1")
        .json(&big)
        .build()
        .unwrap();

    conn.transaction(|conn| {
        let err = outbox.enqueue_message(conn, &message).unwrap_err();
        assert_eq!(
            err.to_string(),
            "payload of order.submitted is 262146 bytes, over the maximum of 262144 bytes"
        );
        let err = outbox
            .enqueue_batch(conn, &[builder().build().unwrap(), message.clone()])
            .unwrap_err();
        assert!(matches!(err, Error::PayloadTooLarge { .. }), "{err}");
        // Refused before any statement ran: the transaction is still usable.
        outbox.enqueue_message(conn, &builder().ordering_key("order-1").build().unwrap())
    })
    .unwrap();

    assert_eq!(
        count(&mut conn, "outbox_messages"),
        1,
        "only the good event"
    );
    let row = &common::rows(&mut conn)[0];
    assert_eq!(
        row.key_seq,
        Some(1),
        "the refused event took no sequence number"
    );
}

#[test]
fn payload_limit_is_configurable() {
    let (schema, _) = outbox_in_own_schema("small_limit");
    let outbox = Outbox::new(Config {
        schema: schema.name().to_owned(),
        max_payload_bytes: 8,
    })
    .unwrap();
    let mut conn = schema.connect();
    conn.transaction(|conn| {
        outbox.enqueue_message(conn, &builder().json("1234567").build().unwrap())?; // 9 bytes
        Ok::<_, Error>(())
    })
    .expect_err("9 bytes over a limit of 8");
    conn.transaction(|conn| {
        outbox.enqueue_message(conn, &builder().json("123456").build().unwrap())
    })
    .expect("8 bytes fit");
    assert_eq!(count(&mut conn, "outbox_messages"), 1);
}

#[test]
fn bad_config_is_refused_naming_the_field() {
    for (config, field) in [
        (
            Config {
                max_payload_bytes: 0,
                ..Config::default()
            },
            "max_payload_bytes",
        ),
        (
            Config {
                max_payload_bytes: 200 * 1024 * 1024,
                ..Config::default()
            },
            "max_payload_bytes",
        ),
        (
            Config {
                schema: "Order-Service".into(),
                ..Config::default()
            },
            "schema",
        ),
    ] {
        let err = Outbox::new(config).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("invalid config {field}")),
            "{err}"
        );
    }
}

/// Headers are bounded well under the broker's frame (it closes the
/// connection on a larger one), and the names the consumer reads for its
/// dead letters and replays are not the producer's to set.
#[test]
fn oversized_headers_and_reserved_names_are_refused_before_a_write() {
    let big = builder()
        .header("big", "v".repeat(200 * 1024))
        .build()
        .unwrap_err();
    assert!(
        matches!(
            &big,
            Error::Invalid {
                field: "headers",
                ..
            }
        ),
        "{big}"
    );
    assert!(big.to_string().contains("16384"), "{big}");
    for name in [
        "x-dead-letter-replay",
        "X-Original-Exchange",
        "outbox-slot-1",
        "x-key-prev",
    ] {
        let err = builder().header(name, true).build().unwrap_err();
        assert!(
            matches!(
                &err,
                Error::Invalid {
                    field: "header name",
                    ..
                }
            ),
            "{name}: {err}"
        );
    }
    assert!(
        builder()
            .header("fine", "v".repeat(8 * 1024))
            .build()
            .is_ok()
    );
}
