//! The SQL function is the write path for every language: it writes the same
//! rows as the Rust API and refuses the same bad input.

mod common;

use common::{outbox_in_own_schema, rows};
use diesel::connection::SimpleConnection;
use diesel::sql_types::Text;
use diesel::{Connection, RunQueryDsl};
use outbox::Message;

#[test]
fn sql_function_and_rust_api_write_the_same_rows() {
    let (rust_schema, outbox) = outbox_in_own_schema("rust_api");
    let (sql_schema, _) = outbox_in_own_schema("sql_api");
    let id_keyed = uuid::Uuid::now_v7();
    let id_unkeyed = uuid::Uuid::now_v7();

    let keyed = Message::builder("order", "order.v1.submitted", "order.submitted")
        .id(id_keyed)
        .ordering_key("order-7")
        .version(2)
        .raw_json(br#"{"order_id":"order-7","total":12}"#.to_vec())
        .header("tenant", "acme")
        .build()
        .unwrap();
    let unkeyed = Message::builder("marketing", "marketing.v1.sent", "marketing.sent")
        .id(id_unkeyed)
        .raw_json(b"[1,2,3]".to_vec())
        .build()
        .unwrap();
    rust_schema
        .connect()
        .transaction(|conn| {
            outbox.enqueue_message(conn, &keyed)?;
            outbox.enqueue_message(conn, &keyed_again(&keyed))?;
            outbox.enqueue_message(conn, &unkeyed)
        })
        .unwrap();

    // What a service in another language would run inside its transaction.
    let mut conn = sql_schema.connect();
    conn.transaction(|conn| {
        diesel::sql_query(
            "SELECT * FROM outbox_enqueue('order', 'order.v1.submitted', 'order.submitted',
                 convert_to('{\"order_id\":\"order-7\",\"total\":12}', 'UTF8'),
                 p_ordering_key => 'order-7', p_event_version => 2,
                 p_headers => '{\"tenant\": \"acme\"}', p_id => $1::uuid)",
        )
        .bind::<Text, _>(id_keyed.to_string())
        .execute(conn)?;
        diesel::sql_query(
            "SELECT * FROM outbox_enqueue('order', 'order.v1.submitted', 'order.submitted',
                 convert_to('{\"order_id\":\"order-7\",\"total\":12}', 'UTF8'),
                 p_ordering_key => 'order-7', p_event_version => 2,
                 p_headers => '{\"tenant\": \"acme\"}', p_id => $1::uuid)",
        )
        .bind::<Text, _>(keyed_again(&keyed).id().to_string())
        .execute(conn)?;
        diesel::sql_query(
            "SELECT * FROM outbox_enqueue('marketing', 'marketing.v1.sent', 'marketing.sent',
                 convert_to('[1,2,3]', 'UTF8'), p_id => $1::uuid)",
        )
        .bind::<Text, _>(id_unkeyed.to_string())
        .execute(conn)
    })
    .unwrap();

    let from_rust = rows(&mut rust_schema.connect());
    let from_sql = rows(&mut conn);
    assert_eq!(from_rust.len(), 3);
    assert_eq!(from_rust, from_sql);
    assert_eq!(from_rust[1].key_seq, Some(2));
}

/// The same message as `m` under a fixed second id (so both paths can use it).
fn keyed_again(m: &Message) -> Message {
    Message::builder(m.exchange(), m.routing_key(), m.event_type())
        .id(uuid::Uuid::from_u128(m.id().as_u128() + 1))
        .ordering_key(m.ordering_key().unwrap())
        .version(m.event_version())
        .raw_json(m.payload().to_vec())
        .header("tenant", "acme")
        .build()
        .unwrap()
}

#[test]
fn sql_function_refuses_what_the_rust_api_refuses_and_names_the_field() {
    let (schema, _) = outbox_in_own_schema("sql_refuses");
    let mut conn = schema.connect();
    let cases = [
        (
            "'amq.topic', 'a.b', 't', '\\x7b7d'",
            "invalid exchange 'amq.topic'",
        ),
        (
            "'bad exchange', 'a.b', 't', '\\x7b7d'",
            "invalid exchange 'bad exchange'",
        ),
        (
            "'ex', 'a.*.b', 't', '\\x7b7d'",
            "invalid routing key 'a.*.b'",
        ),
        ("'ex', 'a.b', '', '\\x7b7d'", "invalid event type ''"),
        (
            "'ex', 'a.b', 't', '\\x7b7d', p_ordering_key => ''",
            "invalid ordering key ''",
        ),
        (
            "'ex', 'a.b', 't', '\\x7b7d', p_event_version => 0",
            "invalid event version 0",
        ),
        (
            "'ex', 'a.b', 't', '\\x7b7d', p_headers => '{\"x-key-seq\": 1}'",
            "invalid header name 'x-key-seq'",
        ),
        (
            "'ex', 'a.b', 't', '\\x7b7d', p_headers => '[]'",
            "invalid headers []",
        ),
        (
            "'ex', 'a.b', 't', '\\x7b7d7d', p_max_payload_bytes => 2",
            "payload of t is 3 bytes, over the maximum of 2 bytes",
        ),
        (
            "'ex', 'a.b', 't', '\\x7b'",
            "invalid input syntax for type json",
        ),
        (
            "'ex', 'a.b', 't', '\\x7b7d', p_headers => '{\"x-dead-letter-replay\": true}'",
            "invalid header name 'x-dead-letter-replay'",
        ),
        (
            "'ex', 'a.b', 't', '\\x7b7d', p_headers => '{\"Outbox-Slot-3\": true}'",
            "invalid header name 'Outbox-Slot-3'",
        ),
        (
            "'ex', 'a.b', 't', '\\x7b7d', p_headers => jsonb_build_object('big', repeat('v', 200000))",
            "headers are 200011 bytes as JSON, over the maximum of 16384",
        ),
        (
            "'ex', 'a.b', 't', '\\x7b7d', p_max_payload_bytes => 200000000",
            "invalid p_max_payload_bytes 200000000",
        ),
    ];
    for (args, expected) in cases {
        let err = conn
            .transaction(|conn| {
                diesel::sql_query(format!("SELECT * FROM outbox_enqueue({args})")).execute(conn)
            })
            .unwrap_err();
        assert!(
            err.to_string().contains(expected),
            "{args}: got {err}, want {expected}"
        );
    }
    assert_eq!(common::count(&mut conn, "outbox_messages"), 0);
    assert_eq!(common::count(&mut conn, "outbox_keys"), 0);
    conn.batch_execute("SELECT 1").unwrap();
}

/// A row written straight into the table (a script, another language)
/// meets the same rules as one written through the function: the table's
/// constraints refuse what the relay could never send.
#[test]
fn the_table_refuses_what_the_function_refuses() {
    let (schema, _) = outbox_in_own_schema("table_refuses");
    let mut conn = schema.connect();
    let insert = |column_values: &str| {
        format!(
            "INSERT INTO outbox_messages (id, ordering_key, key_seq, \"partition\", exchange, routing_key,
                                          event_type, event_version, payload, headers)
             SELECT outbox_uuid_v7(), k, s, p, x, r, t, 1, '\\x7b7d', h
             FROM (VALUES {column_values}) AS v(k, s, p, x, r, t, h)"
        )
    };
    let good = "('k', 1, 3, 'ex', 'a.b', 't', '{}'::jsonb)";
    conn.batch_execute(&insert(good)).unwrap();
    let cases = [
        (
            "('k', 2, 3, '', 'a.b', 't', '{}'::jsonb)",
            "outbox_messages_exchange_valid",
        ),
        (
            "('k', 2, 3, 'amq.direct', 'a.b', 't', '{}'::jsonb)",
            "outbox_messages_exchange_valid",
        ),
        (
            "('k', 2, 3, 'ex', repeat('a', 300), 't', '{}'::jsonb)",
            "outbox_messages_routing_key_valid",
        ),
        (
            "('k', 2, 3, 'ex', 'a.#', 't', '{}'::jsonb)",
            "outbox_messages_routing_key_valid",
        ),
        (
            "('k', 2, 3, 'ex', 'a.b', repeat('t', 300), '{}'::jsonb)",
            "outbox_messages_event_type_valid",
        ),
        (
            "('k', 2, 5000, 'ex', 'a.b', 't', '{}'::jsonb)",
            "outbox_messages_partition_valid",
        ),
        (
            "('', 2, 3, 'ex', 'a.b', 't', '{}'::jsonb)",
            "outbox_messages_ordering_key_valid",
        ),
        (
            "('k', 2, 3, 'ex', 'a.b', 't', '[]'::jsonb)",
            "outbox_messages_headers_valid",
        ),
        (
            "('k', 2, 3, 'ex', 'a.b', 't', jsonb_build_object('big', repeat('v', 20000)))",
            "outbox_messages_headers_valid",
        ),
    ];
    for (values, constraint) in cases {
        let err = conn
            .transaction(|conn| conn.batch_execute(&insert(values)))
            .unwrap_err();
        assert!(
            err.to_string().contains(constraint),
            "{values}: got {err}, want {constraint}"
        );
    }
    assert_eq!(common::count(&mut conn, "outbox_messages"), 1);
}
