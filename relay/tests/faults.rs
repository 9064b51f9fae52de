//! Nothing committed is lost when the relay dies mid-batch, when the broker
//! drops its connections, or when a message cannot be routed.

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use common::{assert_per_key_order, config, enqueue_rounds, outbox_schema, start};
use diesel::sql_types::{BigInt, Bool, Integer, Nullable, Text};
use diesel::{Connection, QueryableByName, RunQueryDsl};
use testkit::TestSchema;
use testkit::amqp::{Received, TestTopology, close_broker_connections};

const KEYS: usize = 100;
const PER_KEY: usize = 100;

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn pending(schema: &TestSchema) -> i64 {
    diesel::sql_query(
        "SELECT count(*) AS n FROM outbox_messages WHERE published_at IS NULL AND parked_at IS NULL",
    )
    .get_result::<Count>(&mut schema.connect())
    .unwrap()
    .n
}

/// Waits, without blocking the runtime, until fewer than `below` rows are pending.
async fn wait_pending_below(schema: &TestSchema, below: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while pending(schema) >= below {
        assert!(
            tokio::time::Instant::now() < deadline,
            "relay made no progress"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Every distinct message id arrived, and per-key order holds over first
/// arrivals (duplicates allowed, with the same id).
fn assert_everything_arrived(received: &[Received]) {
    let distinct: HashSet<String> = received.iter().map(Received::message_id).collect();
    assert_eq!(distinct.len(), KEYS * PER_KEY, "distinct messages");
    assert_per_key_order(received, PER_KEY as i64, true);
}

fn distinct_reached(target: usize) -> impl FnMut(&[Received]) -> bool {
    let mut seen = HashSet::new();
    let mut counted = 0;
    move |got| {
        for m in &got[counted..] {
            seen.insert(m.message_id());
        }
        counted = got.len();
        seen.len() >= target
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_aborted_mid_batch_then_restarted_delivers_everything() {
    let (schema, outbox) = outbox_schema("relay_abort");
    let topology = TestTopology::new("relay_abort", "#").await;
    enqueue_rounds(&schema, &outbox, &topology.exchange, KEYS, PER_KEY);

    let first = start(relay::RelayConfig {
        batch_size: 50,
        ..config(&schema)
    });
    wait_pending_below(&schema, (KEYS * PER_KEY - 1000) as i64).await;
    first.handle.abort(); // no shutdown: batches under way are cut off
    let _ = first.handle.await;
    assert!(pending(&schema) > 0, "aborted with work left");

    let second = start(config(&schema));
    let received = topology
        .receive_until(Duration::from_secs(120), distinct_reached(KEYS * PER_KEY))
        .await;
    second.stop().await;
    assert_everything_arrived(&received);
    assert_eq!(pending(&schema), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_closing_the_relays_connections_loses_nothing() {
    let (schema, outbox) = outbox_schema("relay_cut");
    let topology = TestTopology::new("relay_cut", "#").await;
    enqueue_rounds(&schema, &outbox, &topology.exchange, KEYS, PER_KEY);

    let relay = start(relay::RelayConfig {
        batch_size: 50,
        ..config(&schema)
    });
    wait_pending_below(&schema, (KEYS * PER_KEY - 500) as i64).await;
    let marker = format!("outbox-relay {}", schema.name());
    let closed = tokio::task::spawn_blocking(move || close_broker_connections(&marker))
        .await
        .unwrap();
    assert!(closed >= 1, "found the relay's connections on the broker");

    let received = topology
        .receive_until(Duration::from_secs(120), distinct_reached(KEYS * PER_KEY))
        .await;
    relay.stop().await;
    assert_everything_arrived(&received);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_connections_killed_mid_drain_lose_nothing() {
    let (schema, outbox) = outbox_schema("relay_pgkill");
    let topology = TestTopology::new("relay_pgkill", "#").await;
    enqueue_rounds(&schema, &outbox, &topology.exchange, KEYS, PER_KEY);
    // Tag the relay's connections so only they are terminated.
    let app = format!("relay_{}", schema.name());
    let url = format!("{}?application_name={app}", testkit::database_url());

    let relay = start(relay::RelayConfig {
        database_url: url,
        batch_size: 50,
        ..config(&schema)
    });
    wait_pending_below(&schema, (KEYS * PER_KEY - 500) as i64).await;
    let killed = diesel::sql_query(
        "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind::<Text, _>(&app)
    .get_result::<Count>(&mut schema.connect())
    .unwrap()
    .n;
    assert!(killed >= 2, "terminated the relay's connections ({killed})");

    let received = topology
        .receive_until(Duration::from_secs(120), distinct_reached(KEYS * PER_KEY))
        .await;
    relay.stop().await;
    assert_everything_arrived(&received);
    assert_eq!(pending(&schema), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_exchange_is_parked_and_other_events_still_flow() {
    let (schema, outbox) = outbox_schema("relay_noexchange");
    let topology = TestTopology::new("relay_noexchange", "#").await;
    let missing = testkit::unique_name("missing_exchange");
    let message = |exchange: &str, key: &str| {
        outbox::Message::builder(exchange, "order.v1.submitted", "order.submitted")
            .ordering_key(key)
            .json(&serde_json::json!({ "key": key }))
            .build()
            .unwrap()
    };
    // The broker closes the channel at a publish to a missing exchange;
    // the rows around it must not be parked with it.
    let doomed = message(&missing, "order-x");
    let good: Vec<outbox::Message> = (0..20)
        .map(|i| message(&topology.exchange, &format!("order-{i}")))
        .collect();
    let mut all = vec![doomed.clone()];
    all.extend(good.iter().cloned());
    schema
        .connect()
        .transaction(|conn| outbox.enqueue_batch(conn, &all))
        .unwrap();

    let relay = start(config(&schema));
    let received = topology
        .receive_until(Duration::from_secs(60), distinct_reached(good.len()))
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let parked = loop {
        let state: Vec<RowState> = diesel::sql_query(
            "SELECT attempts, last_error, parked_at IS NOT NULL AS parked, false AS parked_before_next_published
             FROM outbox_messages WHERE id = $1 AND parked_at IS NOT NULL",
        )
        .bind::<diesel::sql_types::Uuid, _>(doomed.id())
        .load(&mut schema.connect())
        .unwrap();
        if let Some(state) = state.into_iter().next() {
            break state;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the doomed row was never parked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    relay.stop().await;
    assert_eq!(parked.attempts, 3);
    assert!(parked.last_error.unwrap().contains("NOT_FOUND"));
    let ids: HashSet<String> = received.iter().map(Received::message_id).collect();
    for m in &good {
        assert!(ids.contains(&m.id().to_string()));
    }
    assert_eq!(
        pending(&schema),
        0,
        "nothing but the doomed row was held or parked"
    );
}

#[derive(QueryableByName)]
struct Count32 {
    #[diesel(sql_type = Integer)]
    n: i32,
}

#[derive(QueryableByName, Debug)]
struct RowState {
    #[diesel(sql_type = Integer)]
    attempts: i32,
    #[diesel(sql_type = Nullable<Text>)]
    last_error: Option<String>,
    #[diesel(sql_type = Bool)]
    parked: bool,
    #[diesel(sql_type = Bool)]
    parked_before_next_published: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_event_is_retried_then_parked_and_parked_retry_sends_it() {
    let (schema, outbox) = outbox_schema("relay_parked");
    let topology = TestTopology::new("relay_parked", "order.#").await;
    let message = |routing_key: &str| {
        outbox::Message::builder(&topology.exchange, routing_key, "audit.recorded")
            .ordering_key("order-1")
            .json(&serde_json::json!({ "rk": routing_key }))
            .build()
            .unwrap()
    };
    // The first event of the key goes where nothing is bound. The second is
    // committed once the first has failed: it must wait until the first is
    // parked before it is published.
    let stuck = message("audit.v1.recorded");
    let next = message("order.v1.submitted");
    let mut conn = schema.connect();
    conn.transaction(|conn| outbox.enqueue_message(conn, &stuck))
        .unwrap();

    let relay = start(relay::RelayConfig {
        retention: Some(Duration::from_secs(3600)), // keep published_at to compare
        retry: relay::RetryPolicy {
            initial: Duration::from_millis(300),
            max_delay: Duration::from_millis(300),
            max_attempts: 3,
            jitter: false,
            ..relay::RetryPolicy::default()
        },
        ..config(&schema)
    });
    let attempts = || {
        diesel::sql_query("SELECT attempts AS n FROM outbox_messages WHERE id = $1")
            .bind::<diesel::sql_types::Uuid, _>(stuck.id())
            .get_result::<Count32>(&mut schema.connect())
            .unwrap()
            .n
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while attempts() < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "first attempt never failed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    conn.transaction(|conn| outbox.enqueue_message(conn, &next))
        .unwrap();
    let received = topology.receive(1, Duration::from_secs(30)).await;
    assert_eq!(received[0].message_id(), next.id().to_string());

    let state: RowState = diesel::sql_query(
        "SELECT s.attempts, s.last_error, s.parked_at IS NOT NULL AS parked,
                coalesce(s.parked_at <= n.published_at, false) AS parked_before_next_published
         FROM outbox_messages s, outbox_messages n WHERE s.id = $1 AND n.id = $2",
    )
    .bind::<diesel::sql_types::Uuid, _>(stuck.id())
    .bind::<diesel::sql_types::Uuid, _>(next.id())
    .get_result(&mut schema.connect())
    .unwrap();
    assert!(state.parked, "{state:?}");
    assert_eq!(state.attempts, 3, "parked after max_attempts");
    let error = state.last_error.unwrap();
    assert!(
        error.contains("NO_ROUTE") && error.contains("audit.v1.recorded"),
        "{error}"
    );
    assert!(
        state.parked_before_next_published,
        "the key's next event waited until the failing one was parked"
    );

    // Once something is bound, `parked retry` sends it.
    topology.bind_queue("audit.#").await;
    let out = outbox_relay(&schema, &["parked", "list"]);
    assert!(
        out.contains(&stuck.id().to_string()) && out.contains("NO_ROUTE"),
        "{out}"
    );
    let out = outbox_relay(
        &schema,
        &["parked", "retry", "--id", &stuck.id().to_string()],
    );
    assert!(out.contains("1 parked row(s) made pending again"), "{out}");
    let received = topology.receive(1, Duration::from_secs(30)).await;
    assert_eq!(received[0].message_id(), stuck.id().to_string());
    relay.stop().await;
    let out = outbox_relay(&schema, &["status"]);
    assert!(out.contains("pending 0  retrying 0  parked 0"), "{out}");
}

/// Runs the `outbox-relay` binary against the test schema; returns stdout.
fn outbox_relay(schema: &TestSchema, args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args([
            "--database-url",
            &testkit::database_url(),
            "--schema",
            schema.name(),
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "outbox-relay {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}
