//! The write path: an event exists if and only if its transaction commits.

mod common;

use std::time::Duration;

use common::{NewsletterSent, OrderSubmitted, count, outbox_in_own_schema, rows};
use diesel::connection::SimpleConnection;
use diesel::{Connection, RunQueryDsl};
use outbox::{Error, Message};

#[test]
fn committed_event_is_written_with_every_field_as_given() {
    let (schema, outbox) = outbox_in_own_schema("committed");
    let mut conn = schema.connect();
    let id = uuid::Uuid::now_v7();
    let message = Message::builder("order", "order.v2.submitted", "order.submitted")
        .id(id)
        .version(2)
        .ordering_key("order-1")
        .json(&serde_json::json!({"order_id": "order-1", "lines": [1, 2]}))
        .header("tenant", "acme")
        .header("priority", 5)
        .build()
        .unwrap();

    let enqueued = conn
        .transaction(|conn| outbox.enqueue_message(conn, &message))
        .unwrap();

    let rows = rows(&mut conn);
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row.id, id);
    assert_eq!(enqueued.id, id);
    assert_eq!(row.seq, enqueued.seq);
    assert_eq!(row.ordering_key.as_deref(), Some("order-1"));
    assert_eq!(row.key_seq, Some(1));
    assert_eq!(enqueued.key_seq, Some(1));
    assert_eq!(row.partition, enqueued.partition);
    assert_eq!(row.exchange, "order");
    assert_eq!(row.routing_key, "order.v2.submitted");
    assert_eq!(row.event_type, "order.submitted");
    assert_eq!(row.event_version, 2);
    assert_eq!(
        row.payload,
        message.payload(),
        "payload stored byte for byte"
    );
    assert_eq!(
        row.headers,
        serde_json::json!({"tenant": "acme", "priority": 5})
    );
    assert_eq!(row.attempts, 0);
    assert_eq!(row.last_error, None);
    assert!(row.pending);
}

#[test]
fn rolled_back_transaction_leaves_no_event() {
    let (schema, outbox) = outbox_in_own_schema("rollback");
    let mut conn = schema.connect();
    let result: Result<(), Error> = conn.transaction(|conn| {
        outbox.enqueue(
            conn,
            &OrderSubmitted {
                order_id: "order-9".into(),
                total_cents: 100,
            },
        )?;
        Err(Error::NotInTransaction) // any error rolls the transaction back
    });
    assert!(result.is_err());
    assert_eq!(count(&mut conn, "outbox_messages"), 0);
    assert_eq!(
        count(&mut conn, "outbox_keys"),
        0,
        "the key counter is rolled back too"
    );

    // The next committed event of the key is number 1: no gap left behind.
    let enqueued = conn
        .transaction(|conn| {
            outbox.enqueue(
                conn,
                &OrderSubmitted {
                    order_id: "order-9".into(),
                    total_cents: 100,
                },
            )
        })
        .unwrap();
    assert_eq!(enqueued.key_seq, Some(1));
}

#[test]
fn unkeyed_event_skips_the_key_counter() {
    let (schema, outbox) = outbox_in_own_schema("unkeyed");
    let mut conn = schema.connect();
    let enqueued = conn
        .transaction(|conn| outbox.enqueue(conn, &NewsletterSent { issue: 12 }))
        .unwrap();
    assert_eq!(enqueued.key_seq, None);
    assert_eq!(count(&mut conn, "outbox_keys"), 0);
    let row = &rows(&mut conn)[0];
    assert_eq!((row.ordering_key.as_deref(), row.key_seq), (None, None));
    assert_eq!(row.event_version, 3);
    assert_eq!(row.payload, br#"{"issue":12}"#);
}

#[test]
fn batch_returns_input_order_and_numbers_each_key_in_order() {
    let (schema, outbox) = outbox_in_own_schema("batch");
    let mut conn = schema.connect();
    let keys = ["b", "a", "b", "unkeyed", "a", "b"];
    let messages: Vec<Message> = keys
        .iter()
        .enumerate()
        .map(|(i, key)| {
            let builder = Message::builder("order", "order.v1.submitted", "order.submitted")
                .json(&serde_json::json!({ "i": i }));
            match *key {
                "unkeyed" => builder,
                key => builder.ordering_key(key),
            }
            .build()
            .unwrap()
        })
        .collect();

    let enqueued = conn
        .transaction(|conn| outbox.enqueue_batch(conn, &messages))
        .unwrap();

    let key_seqs: Vec<Option<i64>> = enqueued.iter().map(|e| e.key_seq).collect();
    assert_eq!(
        key_seqs,
        [Some(1), Some(1), Some(2), None, Some(2), Some(3)]
    );
    for (message, result) in messages.iter().zip(&enqueued) {
        assert_eq!(message.id(), result.id, "results come back in input order");
    }
    // Within a key, the stored rows keep the input order.
    let stored = rows(&mut conn);
    let b_payloads: Vec<String> = stored
        .iter()
        .filter(|r| r.ordering_key.as_deref() == Some("b"))
        .map(|r| String::from_utf8(r.payload.clone()).unwrap())
        .collect();
    assert_eq!(b_payloads, [r#"{"i":0}"#, r#"{"i":2}"#, r#"{"i":5}"#]);

    assert!(
        conn.transaction(|conn| outbox.enqueue_batch(conn, &[]))
            .unwrap()
            .is_empty()
    );
}

#[test]
fn enqueue_outside_a_transaction_is_refused_and_writes_nothing() {
    let (schema, outbox) = outbox_in_own_schema("notx");
    let mut conn = schema.connect();
    let err = outbox
        .enqueue(&mut conn, &NewsletterSent { issue: 1 })
        .unwrap_err();
    assert!(matches!(err, Error::NotInTransaction), "{err}");
    assert!(err.to_string().contains("transaction"), "{err}");
    assert_eq!(count(&mut conn, "outbox_messages"), 0);
}

#[test]
fn same_key_always_lands_in_the_same_partition() {
    let (schema, outbox) = outbox_in_own_schema("partition");
    let mut conn = schema.connect();
    let event = |k: &str| OrderSubmitted {
        order_id: k.into(),
        total_cents: 1,
    };
    let (a1, a2, b) = conn
        .transaction(|conn| {
            Ok::<_, Error>((
                outbox.enqueue(conn, &event("order-a"))?,
                outbox.enqueue(conn, &event("order-a"))?,
                outbox.enqueue(conn, &event("order-b"))?,
            ))
        })
        .unwrap();
    assert_eq!(a1.partition, a2.partition);
    assert!((0..64).contains(&a1.partition) && (0..64).contains(&b.partition));
    #[derive(diesel::QueryableByName)]
    struct P {
        #[diesel(sql_type = diesel::sql_types::SmallInt)]
        p: i16,
    }
    let p: P = diesel::sql_query("SELECT outbox_partition('order-a', 64) AS p")
        .get_result(&mut conn)
        .unwrap();
    assert_eq!(
        p.p, a1.partition,
        "partition computed by the database function"
    );
}

#[test]
fn notify_is_sent_on_commit_and_not_on_rollback() {
    let (schema, outbox) = outbox_in_own_schema("notify");
    let mut listener = schema.connect();
    let channel = format!("outbox_{}", schema.name());
    listener
        .batch_execute(&format!(r#"LISTEN "{channel}""#))
        .unwrap();

    let mut writer = schema.connect();
    // A relay worker waits on every partition (else nothing is notified).
    writer
        .batch_execute(
            "INSERT INTO outbox_waiting (worker, partitions)
             SELECT 'test', array_agg(p::smallint) FROM generate_series(0, 63) AS p",
        )
        .unwrap();
    let _ = writer.transaction(|conn| {
        outbox.enqueue(conn, &NewsletterSent { issue: 1 })?;
        Err::<(), _>(Error::NotInTransaction)
    });
    let committed = writer
        .transaction(|conn| outbox.enqueue(conn, &NewsletterSent { issue: 2 }))
        .unwrap();

    let payloads = testkit::wait_for("a notification", Duration::from_secs(5), || {
        let got: Vec<String> = listener
            .notifications_iter()
            .map(|n| n.unwrap())
            .inspect(|n| assert_eq!(n.channel, channel))
            .map(|n| n.payload)
            .collect();
        (!got.is_empty()).then_some(got)
    });
    assert_eq!(
        payloads,
        [committed.partition.to_string()],
        "only the commit notifies"
    );
}

#[test]
fn notify_can_be_switched_off() {
    let (schema, outbox) = outbox_in_own_schema("nonotify");
    let mut listener = schema.connect();
    listener
        .batch_execute(&format!(r#"LISTEN "outbox_{}""#, schema.name()))
        .unwrap();
    let mut writer = schema.connect();
    writer
        .batch_execute("UPDATE outbox_settings SET notify = false")
        .unwrap();
    writer
        .transaction(|conn| outbox.enqueue(conn, &NewsletterSent { issue: 1 }))
        .unwrap();
    // A marker notification sent after the commit: once it has arrived, any
    // notification from the enqueue would have arrived before it.
    writer
        .batch_execute(&format!(r#"NOTIFY "outbox_{}", 'marker'"#, schema.name()))
        .unwrap();
    let mut seen = Vec::new();
    testkit::wait_for("the marker notification", Duration::from_secs(5), || {
        seen.extend(listener.notifications_iter().map(|n| n.unwrap().payload));
        seen.contains(&"marker".to_string()).then_some(())
    });
    assert_eq!(seen, ["marker"]);
}

#[test]
fn the_partition_count_cannot_change_while_rows_exist() {
    let (schema, outbox) = outbox_in_own_schema("partition_guard");
    let mut conn = schema.connect();
    conn.batch_execute("UPDATE outbox_settings SET partitions = 32")
        .expect("free to change while the outbox is empty");
    conn.transaction(|conn| outbox.enqueue(conn, &NewsletterSent { issue: 1 }))
        .unwrap();
    let err = conn
        .batch_execute("UPDATE outbox_settings SET partitions = 16")
        .unwrap_err();
    assert!(err.to_string().contains("partitions is fixed"), "{err}");
    conn.batch_execute("UPDATE outbox_settings SET notify = false")
        .expect("other settings stay free");
}
