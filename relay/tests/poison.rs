//! Rows the broker cannot take, written around the enqueue function (a
//! migration script, another language writing the table, rows from before
//! the table's constraints): each is parked with a reason that names it,
//! while every other row flows and no worker dies; and a refusal by the
//! broker lands on the row that caused it.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{config, outbox_schema, start};
use diesel::connection::SimpleConnection;
use diesel::sql_types::{Integer, Nullable, Text};
use diesel::{Connection, QueryableByName, RunQueryDsl};
use testkit::TestSchema;
use testkit::amqp::{Received, TestTopology};

#[derive(QueryableByName, Debug)]
struct Parked {
    #[diesel(sql_type = Text)]
    ordering_key: String,
    #[diesel(sql_type = Nullable<Text>)]
    last_error: Option<String>,
}

/// Parked rows, by ordering key.
fn parked(schema: &TestSchema) -> Vec<Parked> {
    diesel::sql_query(
        "SELECT ordering_key, last_error FROM outbox_messages
         WHERE parked_at IS NOT NULL ORDER BY ordering_key",
    )
    .load(&mut schema.connect())
    .unwrap()
}

/// Writes a row straight into the table, as a script would.
fn insert_raw(
    schema: &TestSchema,
    key: &str,
    exchange: &str,
    routing_key: &str,
    event_type: &str,
    headers: &str,
    partition: Option<i32>,
) {
    diesel::sql_query(
        "WITH k AS (
             INSERT INTO outbox_keys AS k (ordering_key, last_seq) VALUES ($1, 1)
             ON CONFLICT (ordering_key) DO UPDATE SET last_seq = k.last_seq + 1
             RETURNING last_seq)
         INSERT INTO outbox_messages (id, ordering_key, key_seq, \"partition\", exchange, routing_key,
                                      event_type, event_version, payload, headers)
         SELECT outbox_uuid_v7(), $1, k.last_seq,
                coalesce($6, outbox_partition($1, (SELECT partitions FROM outbox_settings))),
                $2, $3, $4, 1, convert_to('{}', 'UTF8'), $5::jsonb
         FROM k",
    )
    .bind::<Text, _>(key)
    .bind::<Text, _>(exchange)
    .bind::<Text, _>(routing_key)
    .bind::<Text, _>(event_type)
    .bind::<Text, _>(headers)
    .bind::<Nullable<Integer>, _>(partition)
    .execute(&mut schema.connect())
    .unwrap();
}

/// A row the relay cannot send, and what its parking reason must name.
struct Bad {
    key: &'static str,
    exchange: String,
    routing_key: String,
    event_type: String,
    headers: String,
    partition: Option<i32>,
    reason: &'static str,
}

/// Rows that break AMQP's limits or the enqueue rules, from before the
/// table refused them: the constraints are dropped in this test's schema
/// to write them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_the_broker_cannot_take_are_parked_with_their_reason_and_the_rest_flows() {
    let (schema, outbox) = outbox_schema("relay_poison");
    let topology = TestTopology::new("relay_poison", "#").await;
    schema
        .connect()
        .batch_execute(
            "ALTER TABLE outbox_messages DROP CONSTRAINT outbox_messages_exchange_valid;
             ALTER TABLE outbox_messages DROP CONSTRAINT outbox_messages_routing_key_valid;
             ALTER TABLE outbox_messages DROP CONSTRAINT outbox_messages_event_type_valid;",
        )
        .unwrap();
    let x = topology.exchange.as_str();
    let long = "a".repeat(300);
    let deep = format!("{}1{}", "[".repeat(140), "]".repeat(140));
    let bad = |key: &'static str, reason: &'static str| Bad {
        key,
        exchange: x.to_owned(),
        routing_key: "a.b".into(),
        event_type: "t".into(),
        headers: "{}".into(),
        partition: None,
        reason,
    };
    let cases = vec![
        Bad {
            routing_key: long.clone(),
            ..bad("bad-routing-key", "routing key")
        },
        Bad {
            event_type: long.clone(),
            ..bad("bad-event-type", "event type")
        },
        Bad {
            exchange: String::new(),
            ..bad("bad-exchange", "exchange")
        },
        Bad {
            headers: r#"{"n": 1e400}"#.into(),
            ..bad("huge-number", "headers")
        },
        Bad {
            headers: format!(r#"{{"d": {deep}}}"#),
            ..bad("deep-nesting", "headers")
        },
        Bad {
            headers: format!(r#"{{"{long}": 1}}"#),
            ..bad("long-name", "header name")
        },
        Bad {
            partition: Some(500),
            ..bad("far-partition", "partition 500")
        },
    ];
    for case in &cases {
        insert_raw(
            &schema,
            case.key,
            &case.exchange,
            &case.routing_key,
            &case.event_type,
            &case.headers,
            case.partition,
        );
    }
    // Good rows of their own keys, and a later good row of a poisoned key.
    let good: Vec<outbox::Message> = (0..20)
        .map(|i| {
            outbox::Message::builder(x, "order.v1.submitted", "order.submitted")
                .ordering_key(format!("good-{i}"))
                .json(&serde_json::json!({ "i": i }))
                .build()
                .unwrap()
        })
        .chain(std::iter::once(
            outbox::Message::builder(x, "order.v1.submitted", "order.submitted")
                .ordering_key("bad-routing-key")
                .json(&serde_json::json!({ "after": "the poison" }))
                .build()
                .unwrap(),
        ))
        .collect();
    schema
        .connect()
        .transaction(|conn| outbox.enqueue_batch(conn, &good))
        .unwrap();

    let relay = start(config(&schema));
    let received = topology
        .receive_until(Duration::from_secs(60), |got| {
            got.iter()
                .map(Received::message_id)
                .collect::<HashSet<_>>()
                .len()
                >= good.len()
        })
        .await;
    let ids: HashSet<String> = received.iter().map(Received::message_id).collect();
    for m in &good {
        assert!(ids.contains(&m.id().to_string()), "{} arrived", m.id());
    }
    testkit::wait_for("every bad row parked", Duration::from_secs(30), || {
        (parked(&schema).len() == cases.len()).then_some(())
    });
    let parked = parked(&schema);
    for case in &cases {
        let row = parked.iter().find(|p| p.ordering_key == case.key).unwrap();
        let error = row.last_error.as_deref().unwrap_or_default();
        assert!(
            error.contains(case.reason),
            "{}: {error:?} names {:?}",
            case.key,
            case.reason
        );
    }
    assert!(!relay.handle.is_finished(), "the relay runs on");

    // Every worker still works: a row for every partition goes out.
    let more: Vec<outbox::Message> = (0..64)
        .map(|i| {
            outbox::Message::builder(x, "order.v1.submitted", "order.submitted")
                .ordering_key(format!("after-{i}"))
                .json(&serde_json::json!({ "i": i }))
                .build()
                .unwrap()
        })
        .collect();
    schema
        .connect()
        .transaction(|conn| outbox.enqueue_batch(conn, &more))
        .unwrap();
    let received = topology
        .receive_until(Duration::from_secs(60), |got| {
            let ids: HashSet<String> = got.iter().map(Received::message_id).collect();
            more.iter().all(|m| ids.contains(&m.id().to_string()))
        })
        .await;
    assert!(received.len() >= more.len());
    relay.stop().await;
}

#[derive(QueryableByName)]
struct Attempts {
    #[diesel(sql_type = Integer)]
    attempts: i32,
}

/// When the broker closes the channel for one message (a missing
/// exchange), every pending confirm fails alike; the relay must not blame
/// the first row in order: the rows around it are sent again without
/// losing an attempt, and only the culprit counts attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_closed_by_one_message_is_blamed_on_that_message_only() {
    let (schema, outbox) = outbox_schema("relay_blame");
    let topology = TestTopology::new("relay_blame", "#").await;
    let missing = testkit::unique_name("missing_exchange");
    let message = |exchange: &str, key: &str| {
        outbox::Message::builder(exchange, "order.v1.submitted", "order.submitted")
            .ordering_key(key)
            .json(&serde_json::json!({ "key": key }))
            .build()
            .unwrap()
    };
    // Good rows before and after the doomed one, in one partition's batch.
    let mut all: Vec<outbox::Message> = (0..10)
        .map(|i| message(&topology.exchange, &format!("before-{i}")))
        .collect();
    let doomed = message(&missing, "doomed");
    all.push(doomed.clone());
    all.extend((0..10).map(|i| message(&topology.exchange, &format!("after-{i}"))));
    schema
        .connect()
        .transaction(|conn| outbox.enqueue_batch(conn, &all))
        .unwrap();
    let mut config = config(&schema);
    // Kept after publishing, so their attempts can be read.
    config.retention = Some(Duration::from_secs(3600));
    config.workers = 1;
    let relay = start(config);
    topology
        .receive_until(Duration::from_secs(60), |got| {
            got.iter()
                .map(Received::message_id)
                .collect::<HashSet<_>>()
                .len()
                >= all.len() - 1
        })
        .await;
    testkit::wait_for("the doomed row parked", Duration::from_secs(30), || {
        (!parked(&schema).is_empty()).then_some(())
    });
    relay.stop().await;
    let attempts = |id: uuid::Uuid| {
        diesel::sql_query("SELECT attempts FROM outbox_messages WHERE id = $1")
            .bind::<diesel::sql_types::Uuid, _>(id)
            .get_result::<Attempts>(&mut schema.connect())
            .unwrap()
            .attempts
    };
    assert_eq!(attempts(doomed.id()), 3, "the culprit used its attempts");
    for m in all.iter().filter(|m| m.id() != doomed.id()) {
        assert_eq!(attempts(m.id()), 0, "{:?} was blamed", m.ordering_key());
    }
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// A claim holds at most its byte budget (and at least one row, however
/// large), so the relay's memory follows the budget, not the row count.
#[test]
fn a_claim_stops_at_its_byte_budget_but_takes_at_least_one_row() {
    let (schema, outbox) = outbox_schema("relay_bytes");
    let big = "x".repeat(200 * 1024);
    let messages: Vec<outbox::Message> = (0..20)
        .map(|i| {
            outbox::Message::builder("order", "order.v1.submitted", "order.submitted")
                .ordering_key("one-key")
                .json(&serde_json::json!({ "i": i, "pad": big }))
                .build()
                .unwrap()
        })
        .collect();
    let mut conn = schema.connect();
    conn.transaction(|conn| outbox.enqueue_batch(conn, &messages))
        .unwrap();
    let mut claimed = |budget: i64| -> i64 {
        conn.transaction(|conn| {
            diesel::sql_query(
                "SELECT count(*) AS n FROM outbox_relay_claim_v3(
                     outbox_partition('one-key', 64), 500, $1, 'test')",
            )
            .bind::<diesel::sql_types::BigInt, _>(budget)
            .get_result::<Count>(conn)
        })
        .unwrap()
        .n
    };
    // Each payload is a little over 200 KiB; a row is taken while the bytes
    // before it are under the budget: six rows start below 1 MiB.
    assert_eq!(claimed(1024 * 1024), 6);
    assert_eq!(claimed(64 * 1024), 1, "one row, however large");
    assert_eq!(claimed(i64::MAX), 20);
}
