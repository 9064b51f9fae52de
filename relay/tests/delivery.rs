//! Committed events reach the broker, as written, in per-key order.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{assert_per_key_order, config, enqueue_rounds, outbox_schema, start};
use diesel::Connection;
use testkit::amqp::TestTopology;

const KEYS: usize = 100;
const PER_KEY: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_arrive_as_written_in_per_key_order() {
    let (schema, outbox) = outbox_schema("relay_10k");
    let topology = TestTopology::new("relay_10k", "order.#").await;
    let written = enqueue_rounds(&schema, &outbox, &topology.exchange, KEYS, PER_KEY);

    let relay = start(config(&schema));
    let received = topology
        .receive(KEYS * PER_KEY, Duration::from_secs(120))
        .await;
    relay.stop().await;

    assert_eq!(received.len(), KEYS * PER_KEY);
    assert_per_key_order(&received, PER_KEY as i64, false);
    let by_id: HashMap<String, &outbox::Message> =
        written.iter().map(|m| (m.id().to_string(), m)).collect();
    for message in &received {
        let sent = by_id[&message.message_id()];
        let p = &message.properties;
        assert_eq!(
            message.body,
            sent.payload(),
            "body is the event's JSON, unwrapped"
        );
        assert_eq!(message.routing_key, "order.v1.submitted");
        assert_eq!(
            p.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(*p.delivery_mode(), Some(2), "persistent");
        assert_eq!(p.kind().as_ref().unwrap().as_str(), "order.submitted");
        assert_eq!(p.app_id().as_ref().unwrap().as_str(), topology.exchange);
        assert!(p.timestamp().is_some());
        assert_eq!(
            message.header_str("x-ordering-key").as_deref(),
            sent.ordering_key()
        );
        assert_eq!(message.header_i64("x-event-version"), Some(1));
        assert_eq!(message.header_str("tenant").as_deref(), Some("acme"));
    }
    assert_eq!(common_count(&schema), 0, "confirmed rows are deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_on_one_database_keep_per_key_order() {
    let (schema, outbox) = outbox_schema("relay_two");
    let topology = TestTopology::new("relay_two", "#").await;
    enqueue_rounds(&schema, &outbox, &topology.exchange, KEYS, PER_KEY);

    let first = start(config(&schema));
    let second = start(config(&schema));
    let received = topology
        .receive(KEYS * PER_KEY, Duration::from_secs(120))
        .await;
    first.stop().await;
    second.stop().await;

    assert_per_key_order(&received, PER_KEY as i64, false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_transaction_never_reaches_the_broker() {
    let (schema, outbox) = outbox_schema("relay_rollback");
    let topology = TestTopology::new("relay_rollback", "#").await;
    let relay = start(config(&schema));

    let message = |what: &str| {
        outbox::Message::builder(&topology.exchange, "order.v1.submitted", "order.submitted")
            .ordering_key("order-1")
            .json(&serde_json::json!({ "what": what }))
            .build()
            .unwrap()
    };
    let mut conn = schema.connect();
    let _ = conn.transaction(|conn| {
        outbox.enqueue_message(conn, &message("rolled back"))?;
        Err::<(), _>(outbox::Error::NotInTransaction)
    });
    conn.transaction(|conn| outbox.enqueue_message(conn, &message("committed")))
        .unwrap();

    // The committed event arrives; nothing else is in the queue after it.
    let received = topology.receive(1, Duration::from_secs(30)).await;
    assert_eq!(received[0].body, br#"{"what":"committed"}"#);
    assert_eq!(received[0].header_i64("x-key-seq"), Some(1));
    relay.stop().await;
    assert_eq!(topology.queue_depth().await, 0);
}

fn common_count(schema: &testkit::TestSchema) -> i64 {
    #[derive(diesel::QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    use diesel::RunQueryDsl;
    diesel::sql_query("SELECT count(*) AS n FROM outbox_messages")
        .get_result::<N>(&mut schema.connect())
        .unwrap()
        .n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_on_commit_wakes_the_relay_without_polling() {
    let (schema, outbox) = outbox_schema("relay_notify");
    let topology = TestTopology::new("relay_notify", "#").await;
    let relay_config = relay::RelayConfig {
        poll_interval: Duration::from_secs(3600), // polling alone would never deliver in time
        ..config(&schema)
    };
    let relay = relay::Relay::new(relay_config).unwrap();
    let health = relay.health();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(relay.run(async {
        let _ = stopped.await;
    }));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !(health.database_up() && health.broker_up()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "relay never became ready"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Let the workers finish their start-up scan and wait on the notify.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let message =
        outbox::Message::builder(&topology.exchange, "order.v1.submitted", "order.submitted")
            .ordering_key("order-1")
            .json(&1)
            .build()
            .unwrap();
    schema
        .connect()
        .transaction(|conn| outbox.enqueue_message(conn, &message))
        .unwrap();
    let received = topology.receive(1, Duration::from_secs(10)).await;
    assert_eq!(received[0].message_id(), message.id().to_string());
    let _ = stop.send(());
    handle.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_rows_are_kept_for_the_retention_then_cleaned_up() {
    let (schema, outbox) = outbox_schema("relay_retention");
    let topology = TestTopology::new("relay_retention", "#").await;
    let relay = start(relay::RelayConfig {
        retention: Some(Duration::from_secs(3)),
        cleanup_interval: Duration::from_millis(100),
        ..config(&schema)
    });
    let messages: Vec<outbox::Message> = (0..5)
        .map(|i| {
            outbox::Message::builder(&topology.exchange, "order.v1.submitted", "order.submitted")
                .ordering_key(format!("order-{i}"))
                .json(&i)
                .build()
                .unwrap()
        })
        .collect();
    schema
        .connect()
        .transaction(|conn| outbox.enqueue_batch(conn, &messages))
        .unwrap();
    topology.receive(5, Duration::from_secs(30)).await;

    #[derive(diesel::QueryableByName)]
    struct Kept {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    use diesel::RunQueryDsl;
    let kept = |conn: &mut diesel::PgConnection| {
        diesel::sql_query(
            "SELECT count(*) AS n FROM outbox_messages WHERE published_at IS NOT NULL",
        )
        .get_result::<Kept>(conn)
        .unwrap()
        .n
    };
    let mut conn = schema.connect();
    assert_eq!(kept(&mut conn), 5, "confirmed rows are stamped and kept");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while common_count(&schema) > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "rows past the retention were not cleaned up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.stop().await;
}

/// `outbox_waiting` as the relay keeps it: (workers waiting, partitions
/// they cover).
fn waiting(schema: &testkit::TestSchema) -> (i64, i64) {
    #[derive(diesel::QueryableByName)]
    struct W {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        workers: i64,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        partitions: i64,
    }
    use diesel::RunQueryDsl;
    let w: W = diesel::sql_query(
        "SELECT count(*) AS workers, coalesce(sum(cardinality(partitions)), 0)::bigint AS partitions
         FROM outbox_waiting",
    )
    .get_result(&mut schema.connect())
    .unwrap();
    (w.workers, w.partitions)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_relay_is_woken_by_the_notify_it_asked_for_and_withdraws_on_stop() {
    let (schema, outbox) = outbox_schema("relay_waiting");
    let topology = TestTopology::new("relay_waiting", "#").await;
    let mut config = config(&schema);
    // Only a NOTIFY can bring an event within seconds now.
    config.poll_interval = Duration::from_secs(60);
    let relay = start(config);
    testkit::wait_for(
        "both workers to say they wait",
        Duration::from_secs(30),
        || (waiting(&schema) == (2, 64)).then_some(()),
    );

    let message = outbox::Message::builder(&topology.exchange, "order.v1.placed", "order.placed")
        .ordering_key("k")
        .json(&serde_json::json!({ "n": 1 }))
        .build()
        .unwrap();
    schema
        .connect()
        .transaction(|conn| outbox.enqueue_message(conn, &message))
        .unwrap();
    let received = topology.receive(1, Duration::from_secs(10)).await;
    assert_eq!(received.len(), 1, "woken by the NOTIFY, not the 60 s poll");

    relay.stop().await;
    assert_eq!(
        waiting(&schema),
        (0, 0),
        "a relay that stops no longer waits"
    );
}
