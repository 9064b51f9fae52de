//! The header names the toolkit sets or interprets (`outbox::wire::is_reserved`:
//! the relay's ordering headers, the slot, and the consumer's dead-letter
//! and replay headers) are refused on every write path: the Rust API, the
//! `outbox_enqueue` SQL function and a plain `INSERT` into the table. A
//! refused write leaves nothing behind; a header of the producer's own is
//! accepted by all three.

mod common;

use common::{count, outbox_in_own_schema, rows};
use diesel::connection::SimpleConnection;
use diesel::sql_types::Text;
use diesel::{Connection, PgConnection, RunQueryDsl};
use outbox::wire::{
    EVENT_VERSION_HEADER, HASH_KEY_HEADER, KEY_PREV_ANY_HEADER, KEY_PREV_HEADER, KEY_SEQ_HEADER,
    ORDERING_KEY_HEADER, slot_header,
};
use outbox::{Error, Message};

/// Reserved names, as a producer might spell them: the consumer's replay
/// and dead-letter headers (forging them would forge a replay), and the
/// headers the relay sets from the row's columns.
fn reserved_names() -> Vec<String> {
    let names: Vec<String> = [
        "x-dead-letter-replay",
        "x-original-exchange",
        "x-original-routing-key",
        "x-dead-letter-reason",
        ORDERING_KEY_HEADER,
        KEY_SEQ_HEADER,
        KEY_PREV_HEADER,
        KEY_PREV_ANY_HEADER,
        EVENT_VERSION_HEADER,
        // Any case: AMQP header names are compared byte for byte, but the
        // toolkit reads its own case-insensitively.
        "X-Dead-Letter-Replay",
        "X-Original-Exchange",
    ]
    .into_iter()
    .map(str::to_owned)
    .chain([slot_header(5)])
    .collect();
    for name in &names {
        assert!(
            outbox::wire::is_reserved(name),
            "{name} is meant to be one of outbox::wire's reserved names"
        );
    }
    names
}

/// Headers that are the producer's own: a custom one, and `x-hash-key`,
/// which `outbox::wire` leaves to the producer (the relay keeps it on an
/// unordered message).
const ACCEPTED: [&str; 2] = ["x-tenant", HASH_KEY_HEADER];

fn builder() -> outbox::MessageBuilder {
    Message::builder("order", "order.v1.submitted", "order.submitted")
        .ordering_key("order-1")
        .json(&serde_json::json!({ "n": 1 }))
}

/// `outbox_enqueue` with `headers` = `{name: true}` and an ordering key (so
/// a refused call that got as far as the key counter would show in
/// `outbox_keys`).
fn sql_enqueue(conn: &mut PgConnection, name: &str) -> diesel::QueryResult<usize> {
    diesel::sql_query(
        "SELECT * FROM outbox_enqueue('order', 'order.v1.submitted', 'order.submitted',
             convert_to('{\"n\": 1}', 'UTF8'), p_ordering_key => 'order-1',
             p_headers => jsonb_build_object($1::text, true))",
    )
    .bind::<Text, _>(name)
    .execute(conn)
}

/// A plain `INSERT` of a complete row whose headers are `{name: true}`.
fn plain_insert(conn: &mut PgConnection, name: &str) -> diesel::QueryResult<usize> {
    diesel::sql_query(
        "INSERT INTO outbox_messages (id, ordering_key, key_seq, \"partition\", exchange,
                                      routing_key, event_type, event_version, payload, headers)
         VALUES (outbox_uuid_v7(), NULL, NULL, 0, 'order', 'order.v1.submitted',
                 'order.submitted', 1, convert_to('{\"n\": 1}', 'UTF8'),
                 jsonb_build_object($1::text, true))",
    )
    .bind::<Text, _>(name)
    .execute(conn)
}

#[test]
fn the_rust_api_refuses_each_reserved_header_naming_it_and_writes_nothing() {
    let (schema, outbox) = outbox_in_own_schema("rh_rust");
    let mut conn = schema.connect();
    for name in reserved_names() {
        // Both ways of making a message: field by field, and from a typed
        // event with a header added.
        let built = builder().header(name.as_str(), true).build();
        let from_event = outbox::MessageBuilder::from_event(&common::OrderSubmitted {
            order_id: "order-1".into(),
            total_cents: 1,
        })
        .header(name.as_str(), "forged")
        .build();
        for result in [built, from_event] {
            let err = result.expect_err(&name);
            match &err {
                Error::Invalid { field, value, .. } => {
                    assert_eq!(*field, "header name", "{name}: {err}");
                    assert_eq!(value, &name, "{err}");
                }
                other => panic!("{name}: want Error::Invalid, got {other:?}"),
            }
            let text = err.to_string();
            assert!(
                text.contains(&format!("invalid header name {name:?}"))
                    && text.contains("reserved"),
                "the error names the header and why: {text}"
            );
        }
    }
    // No message was made, so none can be enqueued: the outbox is as the
    // refusals left it, and still usable for a good message of the key,
    // which gets the key's first number.
    assert_eq!(count(&mut conn, "outbox_messages"), 0);
    let good = builder().header("x-tenant", "acme").build().unwrap();
    let enqueued = conn
        .transaction(|conn| outbox.enqueue_message(conn, &good))
        .unwrap();
    assert_eq!(enqueued.key_seq, Some(1));
    assert_eq!(count(&mut conn, "outbox_messages"), 1);
}

#[test]
fn outbox_enqueue_refuses_each_reserved_header_naming_it_and_writes_nothing() {
    let (schema, _) = outbox_in_own_schema("rh_sql");
    let mut conn = schema.connect();
    for name in reserved_names() {
        let err = conn
            .transaction(|conn| sql_enqueue(conn, &name))
            .expect_err(&name);
        let text = err.to_string();
        assert!(
            text.contains(&format!("invalid header name '{name}'")) && text.contains("reserved"),
            "{name}: the error names the header and why: {text}"
        );

        // In a batch, one reserved name refuses the whole batch, the good
        // message before it included.
        let err = conn
            .transaction(|conn| {
                diesel::sql_query(
                    "SELECT * FROM outbox_enqueue_batch(
                         ARRAY['order', 'order'], ARRAY['order.v1.submitted', 'order.v1.submitted'],
                         ARRAY['order.submitted', 'order.submitted'],
                         ARRAY[convert_to('{}', 'UTF8'), convert_to('{}', 'UTF8')],
                         ARRAY['order-1', 'order-2'], ARRAY[1, 1],
                         ARRAY['{\"x-tenant\": \"acme\"}'::jsonb, jsonb_build_object($1::text, true)],
                         ARRAY[outbox_uuid_v7(), outbox_uuid_v7()])",
                )
                .bind::<Text, _>(&name)
                .execute(conn)
            })
            .expect_err(&name);
        assert!(
            err.to_string()
                .contains(&format!("invalid header name '{name}'")),
            "{name}: {err}"
        );
    }
    assert_eq!(count(&mut conn, "outbox_messages"), 0, "nothing enqueued");
    assert_eq!(count(&mut conn, "outbox_keys"), 0, "no key numbered");
    // The refusals left the connection usable.
    conn.batch_execute("SELECT 1").unwrap();
}

#[test]
fn a_plain_insert_with_a_reserved_header_is_refused_by_the_table_constraint() {
    let (schema, _) = outbox_in_own_schema("rh_table");
    let mut conn = schema.connect();
    for name in reserved_names() {
        let err = conn
            .transaction(|conn| plain_insert(conn, &name))
            .expect_err(&name);
        assert!(
            err.to_string()
                .contains("outbox_messages_headers_unreserved"),
            "{name}: refused by the constraint: {err}"
        );
    }
    assert_eq!(count(&mut conn, "outbox_messages"), 0, "nothing inserted");

    // Nor can a row already there be given one afterwards.
    conn.transaction(|conn| plain_insert(conn, "x-tenant"))
        .unwrap();
    for name in reserved_names() {
        let err = conn
            .transaction(|conn| {
                diesel::sql_query(
                    "UPDATE outbox_messages SET headers = headers || jsonb_build_object($1::text, true)",
                )
                .bind::<Text, _>(&name)
                .execute(conn)
            })
            .expect_err(&name);
        assert!(
            err.to_string()
                .contains("outbox_messages_headers_unreserved"),
            "{name}: {err}"
        );
    }
    let rows = rows(&mut conn);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].headers, serde_json::json!({ "x-tenant": true }));
}

#[test]
fn a_producers_own_headers_are_accepted_by_the_rust_api_the_function_and_a_plain_insert() {
    let (schema, outbox) = outbox_in_own_schema("rh_accept");
    let mut conn = schema.connect();
    for name in ACCEPTED {
        assert!(!outbox::wire::is_reserved(name), "{name}");
        let message = builder().header(name, true).build().unwrap();
        conn.transaction(|conn| outbox.enqueue_message(conn, &message))
            .unwrap_or_else(|e| panic!("Rust API, {name}: {e}"));
        conn.transaction(|conn| sql_enqueue(conn, name))
            .unwrap_or_else(|e| panic!("outbox_enqueue, {name}: {e}"));
        conn.transaction(|conn| plain_insert(conn, name))
            .unwrap_or_else(|e| panic!("INSERT, {name}: {e}"));
    }
    let rows = rows(&mut conn);
    assert_eq!(rows.len(), 3 * ACCEPTED.len());
    for (row, name) in rows.iter().zip(ACCEPTED.iter().flat_map(|n| [n, n, n])) {
        assert_eq!(
            row.headers.get(*name),
            Some(&serde_json::Value::Bool(true)),
            "the header is kept as written: {:?}",
            row.headers
        );
    }
}
