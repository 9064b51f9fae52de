//! The consumer under faults, on the real RabbitMQ and PostgreSQL: malformed
//! and unknown messages get their policy without crashing the consumer or
//! being lost, a queue declared with other arguments is refused with a
//! clear error, a broker connection lost between commit and ack is absorbed
//! by the inbox, a broker connection cut at any step of start-up (handshake,
//! declarations, subscriptions) is retried until consuming starts,
//! database connections killed mid-run lose nothing and apply nothing
//! twice, and a graceful shutdown lets a restart finish the work exactly
//! once.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{Ev, Harness, Msg, assert_once_and_in_order, spawn, stop, wait_until};
use consumer::dead_letter::REASON_HEADER;
use consumer::{Consumer, Envelope, GapPolicy, HandlerError, UnknownPolicy};
use diesel::sql_types::Bool;
use diesel::{PgConnection, QueryableByName, RunQueryDsl};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Connection, ConnectionProperties};
use testkit::amqp::{amqp_url, close_broker_connections};
use testkit::proxy::{self, Proxy};
use tokio_util::sync::CancellationToken;

/// The routing pattern every test binds its handler with.
const PATTERN: &str = "order.*.submitted";

/// The dead-letter reason of a message taken off the dead-letter queue.
fn reason_of(delivery: &lapin::message::Delivery) -> String {
    let headers = delivery.properties.headers().as_ref();
    match headers.and_then(|h| h.inner().get(REASON_HEADER)) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("{REASON_HEADER} header: {other:?}"),
    }
}

/// Messages ready (not taken, not unacked) in `queue`, on a connection of
/// the test's own.
async fn ready_in(queue: &str) -> u32 {
    testkit::amqp::queue_state(queue)
        .await
        .expect("the queue exists")
        .ready
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_dead_lettered_with_their_reason_and_none_stops_the_consumer() {
    let h = Harness::new("f_malformed").await;
    let mut config = h.config();
    // A key stuck behind a bad message would show up as a held (then
    // dead-lettered) good one.
    config.after_gap = GapPolicy::DeadLetter;
    let consumer = Consumer::builder(config)
        .handle(&h.exchange, PATTERN, h.recorder())
        .build()
        .unwrap();
    let (shutdown, task) = spawn(&consumer);

    let not_json = Msg {
        body: b"not json {".to_vec(),
        ..Msg::keyed("bad-body", 1)
    };
    let wrong_shape = Msg {
        body: br#"{"x":1}"#.to_vec(),
        ..Msg::keyed("bad-shape", 1)
    };
    let no_seq = Msg {
        no_seq: true,
        ..Msg::keyed("no-seq", 1)
    };
    let bad_seq = Msg {
        headers: vec![(
            "x-key-seq".into(),
            AMQPValue::LongString(LongString::from("abc")),
        )],
        ..Msg::keyed("bad-seq", 1)
    };
    let no_handler = Msg::keyed("no-handler", 1);
    // Same key as the non-JSON one: its key must have moved past it.
    let good = Msg::keyed("bad-body", 2);

    h.publish(&not_json).await;
    h.publish(&wrong_shape).await;
    h.publish(&no_seq).await;
    h.publish(&bad_seq).await;
    // Straight into the consumer's queue: exchange "" matches no handler.
    h.publish_to("", &h.name, &no_handler).await;
    h.publish(&good).await;

    wait_until(
        "five dead-lettered and the good one applied",
        Duration::from_secs(20),
        || {
            let s = consumer.stats();
            s.dead_lettered >= 5 && s.applied >= 1
        },
    )
    .await;
    assert!(
        !task.is_finished(),
        "the consumer is still running after the malformed messages"
    );
    let stats = consumer.stats();
    assert_eq!(stats.dead_lettered, 5, "{stats:?}");
    assert_eq!(stats.applied, 1, "{stats:?}");
    assert_eq!(stats.held, 0, "no key was stuck behind a bad message");
    let effects = h.effects();
    assert_eq!(effects.len(), 1);
    assert_eq!(effects[0].message_id, good.id.to_string());

    // Each problem is named in its dead letter, and the message is unchanged.
    let dead = h.dead_letters().await;
    assert_eq!(dead.len(), 5, "every bad message is kept");
    let expected: [(&Msg, &[&str]); 5] = [
        (&not_json, &["does not deserialize"]),
        (&wrong_shape, &["does not deserialize", "missing field `n`"]),
        (&no_seq, &["x-key-seq", "missing"]),
        (&bad_seq, &["x-key-seq", "must be an integer"]),
        (&no_handler, &["no handler", "\"\""]),
    ];
    for (msg, words) in expected {
        let id = msg.id.to_string();
        let letter = dead
            .iter()
            .find(|d| d.properties.message_id().as_ref().map(|s| s.as_str()) == Some(id.as_str()))
            .unwrap_or_else(|| panic!("no dead letter for message {id}"));
        let reason = reason_of(letter);
        for word in words {
            assert!(reason.contains(word), "{word:?} not in {reason:?}");
        }
        assert_eq!(letter.data, msg.body, "the body is kept as it was");
    }
    assert!(!task.is_finished(), "still running");
    stop(shutdown, task).await;
    h.cleanup(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_message_under_the_ignore_policy_is_acked_counted_and_its_key_moves_on() {
    let h = Harness::new("f_ignore").await;
    let mut config = h.config();
    config.unknown = UnknownPolicy::Ignore;
    // Were the key not moved past the ignored message, the next one would
    // be held and then dead-lettered instead of applied.
    config.after_gap = GapPolicy::DeadLetter;
    config.gap_wait = Duration::from_secs(2);
    let consumer = Consumer::builder(config)
        .handle(&h.exchange, PATTERN, h.recorder())
        .build()
        .unwrap();
    let (shutdown, task) = spawn(&consumer);

    let unknown = Msg::keyed("order-1", 1);
    h.publish_to("", &h.name, &unknown).await;
    wait_until(
        "the unknown message ignored",
        Duration::from_secs(20),
        || consumer.stats().ignored >= 1,
    )
    .await;
    let next = Msg::keyed("order-1", 2);
    h.publish(&next).await;
    wait_until(
        "the next one of its key applied",
        Duration::from_secs(10),
        || consumer.stats().applied >= 1,
    )
    .await;

    let stats = consumer.stats();
    assert_eq!(stats.ignored, 1, "{stats:?}");
    assert_eq!(stats.dead_lettered, 0, "{stats:?}");
    assert_eq!(stats.held, 0, "the key had moved past the ignored one");
    let effects = h.effects();
    assert_eq!(effects.len(), 1);
    assert_eq!(effects[0].message_id, next.id.to_string());
    assert!(h.dead_letters().await.is_empty(), "nothing dead-lettered");
    stop(shutdown, task).await;
    // Stopped, unacked deliveries would be back in the queue.
    assert_eq!(ready_in(&h.name).await, 0, "the ignored message was acked");
    h.cleanup(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_existing_with_other_arguments_is_refused_with_a_clear_error() {
    let h = Harness::new("f_args").await;
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    // A plain durable queue, without x-single-active-consumer.
    channel
        .queue_declare(
            h.name.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let consumer = Consumer::builder(h.config())
        .handle(&h.exchange, PATTERN, h.recorder())
        .build()
        .unwrap();

    let result = tokio::time::timeout(
        Duration::from_secs(20),
        consumer.run(CancellationToken::new()),
    )
    .await
    .expect("run gives up on the queue instead of retrying");
    match result {
        Err(e @ consumer::Error::Topology { .. }) => {
            let message = e.to_string();
            let consumer::Error::Topology { object, reason } = e else {
                unreachable!()
            };
            assert_eq!(object, format!("queue {:?}", h.name));
            assert!(
                reason.contains("exists on the broker with other arguments"),
                "{reason}"
            );
            assert!(
                message.contains(&h.name) && message.contains("other arguments"),
                "{message}"
            );
        }
        other => panic!("expected a topology error, got {other:?}"),
    }

    // The queue was left as it was: still there, still declarable as before.
    channel
        .queue_declare(
            h.name.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the existing queue is unchanged");
    channel
        .queue_delete(h.name.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;
    h.cleanup(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_connection_lost_between_commit_and_ack_is_absorbed_by_the_inbox() {
    let h = Harness::new("f_crash").await;
    let msgs: Vec<Msg> = (1..=10)
        .flat_map(|seq| (0..5).map(move |k| Msg::keyed(&format!("order-{k}"), seq)))
        .collect();
    let victim = msgs
        .iter()
        .find(|m| m.key == Some(("order-2".to_owned(), 5)))
        .unwrap()
        .id;
    let entered = Arc::new(AtomicBool::new(false));
    let released = Arc::new(AtomicBool::new(false));
    let victim_runs = Arc::new(AtomicU32::new(0));
    let handler = {
        let record = h.recorder();
        let (entered, released, victim_runs) = (
            Arc::clone(&entered),
            Arc::clone(&released),
            Arc::clone(&victim_runs),
        );
        move |conn: &mut PgConnection, e: Envelope<Ev>| {
            if e.meta.message_id == victim && victim_runs.fetch_add(1, Ordering::SeqCst) == 0 {
                // Hold the transaction open until the test has cut the
                // broker connection: the commit comes after, the ack fails.
                entered.store(true, Ordering::SeqCst);
                let until = Instant::now() + Duration::from_secs(15);
                while !released.load(Ordering::SeqCst) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            record(conn, e)
        }
    };
    let consumer = Consumer::builder(h.config())
        .handle(&h.exchange, PATTERN, handler)
        .build()
        .unwrap();
    let (shutdown, task) = spawn(&consumer);
    h.publish(&msgs[0]).await;
    h.publish_all(&msgs[1..]).await;

    wait_until(
        "the victim's handler running",
        Duration::from_secs(20),
        || entered.load(Ordering::SeqCst),
    )
    .await;
    let marker = format!("consumer {}", h.name);
    let closed = tokio::task::spawn_blocking(move || close_broker_connections(&marker))
        .await
        .unwrap();
    assert_eq!(closed, 1, "the consumer's broker connection was closed");
    released.store(true, Ordering::SeqCst);

    wait_until(
        "all 50 applied and the redelivery absorbed",
        Duration::from_secs(30),
        || h.effects().len() >= 50 && consumer.stats().duplicates >= 1,
    )
    .await;
    stop(shutdown, task).await;

    let effects = h.effects();
    assert_eq!(effects.len(), 50);
    assert_once_and_in_order(&effects);
    assert_eq!(
        effects
            .iter()
            .filter(|e| e.message_id == victim.to_string())
            .count(),
        1,
        "the victim's effect appears once"
    );
    assert_eq!(
        victim_runs.load(Ordering::SeqCst),
        1,
        "its redelivery did not run the handler again"
    );
    assert!(consumer.stats().duplicates >= 1, "{:?}", consumer.stats());
    assert_eq!(
        ready_in(&h.name).await,
        0,
        "every delivery, the redelivered one too, was acked"
    );
    h.cleanup(1).await;
}

#[derive(QueryableByName)]
struct Killed {
    #[diesel(sql_type = Bool)]
    killed: bool,
}

/// Terminates the consumer's database connections: those its handler
/// tagged with the schema as application name, or whose last statement
/// names the schema. Returns how many.
async fn kill_consumer_connections(schema: &str) -> usize {
    let sql = format!(
        "SELECT pg_terminate_backend(pid) AS killed FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()
           AND (application_name = '{schema}' OR query LIKE '%{schema}%')"
    );
    tokio::task::spawn_blocking(move || {
        let rows: Vec<Killed> = diesel::sql_query(sql)
            .load(&mut testkit::connect(&testkit::database_url()))
            .unwrap();
        rows.iter().filter(|r| r.killed).count()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_connections_killed_mid_run_lose_nothing_and_apply_nothing_twice() {
    let h = Harness::new("f_pgkill").await;
    let schema = h.schema.name().to_owned();
    let handler = {
        let record = h.recorder();
        // Tags the lane's connection (for the kills below) in the handler's
        // own transaction: it sticks once committed.
        let tag = format!("SELECT set_config('application_name', '{schema}', false)");
        move |conn: &mut PgConnection, e: Envelope<Ev>| {
            diesel::sql_query(&tag)
                .execute(conn)
                .map_err(|err| HandlerError::Retry {
                    after: None,
                    reason: err.to_string(),
                })?;
            record(conn, e)
        }
    };
    let consumer = Consumer::builder(h.config())
        .handle(&h.exchange, PATTERN, handler)
        .build()
        .unwrap();
    let (shutdown, task) = spawn(&consumer);
    let msgs: Vec<Msg> = (1..=100)
        .flat_map(|seq| (0..20).map(move |k| Msg::keyed(&format!("order-{k}"), seq)))
        .collect();
    h.publish(&msgs[0]).await;
    h.publish_all(&msgs[1..]).await;

    let mut kills = Vec::new();
    let mut at = 300;
    while kills.len() < 4 {
        wait_until(&format!("{at} applied"), Duration::from_secs(30), || {
            consumer.stats().applied >= at
        })
        .await;
        kills.push(kill_consumer_connections(&schema).await);
        // The next round comes after more were applied on connections made
        // since this one.
        at = consumer.stats().applied + 200;
    }
    assert!(
        kills.iter().all(|k| *k >= 1),
        "every round killed a connection: {kills:?}"
    );
    wait_until("all 2000 applied", Duration::from_secs(60), || {
        h.effects().len() >= 2000
    })
    .await;
    stop(shutdown, task).await;

    let effects = h.effects();
    assert_eq!(effects.len(), 2000);
    assert_once_and_in_order(&effects);
    let stats = consumer.stats();
    assert!(stats.retried >= 1, "the kills were noticed: {stats:?}");
    assert_eq!(stats.dead_lettered, 0, "{stats:?}");
    h.cleanup(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_finishes_running_handlers_and_a_restart_applies_the_rest_once() {
    let h = Harness::new("f_stop").await;
    let config = h.config();
    let slow = || {
        let record = h.recorder();
        move |conn: &mut PgConnection, e: Envelope<Ev>| {
            std::thread::sleep(Duration::from_millis(200));
            record(conn, e)
        }
    };
    let first = Consumer::builder(config.clone())
        .handle(&h.exchange, PATTERN, slow())
        .build()
        .unwrap();
    let (shutdown, task) = spawn(&first);
    let msgs: Vec<Msg> = (1..=5)
        .flat_map(|seq| (0..4).map(move |k| Msg::keyed(&format!("order-{k}"), seq)))
        .collect();
    h.publish(&msgs[0]).await;
    h.publish_all(&msgs[1..]).await;

    wait_until("the first one applied", Duration::from_secs(20), || {
        first.stats().applied >= 1
    })
    .await;
    shutdown.cancel();
    let result = tokio::time::timeout(config.shutdown_timeout, task)
        .await
        .expect("run returns within the shutdown timeout")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    let before = first.stats().applied;
    assert!(before < 20, "stopped part way, after {before}");
    assert_eq!(
        h.effects().len() as u64,
        before,
        "the handlers running at shutdown committed"
    );

    let second = Consumer::builder(config)
        .handle(&h.exchange, PATTERN, slow())
        .build()
        .unwrap();
    let (shutdown, task) = spawn(&second);
    wait_until("all 20 applied", Duration::from_secs(20), || {
        h.effects().len() >= 20
    })
    .await;
    stop(shutdown, task).await;

    let effects = h.effects();
    assert_eq!(effects.len(), 20, "nothing lost");
    assert_once_and_in_order(&effects);
    assert_eq!(before + second.stats().applied, 20);
    assert_eq!(
        second.stats().duplicates,
        0,
        "what finished at shutdown was acked, not redelivered"
    );
    assert_eq!(ready_in(&h.name).await, 0);
    h.cleanup(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_at_any_step_of_declaration_is_retried_and_consuming_starts() {
    const PARTITIONS: u16 = 2;
    let h = Harness::new("f_cut").await;
    let proxy = Proxy::start(&proxy::address_of(&amqp_url())).await;
    let mut config = h.config();
    config.partitions = PARTITIONS;
    // Only the broker goes through the proxy; the database stays direct.
    config.amqp_url = proxy.url(&config.amqp_url);
    let consumer = Consumer::builder(config)
        .handle(&h.exchange, PATTERN, h.recorder())
        .build()
        .unwrap();
    // Two keys, each with rising sequence numbers: order is checked too.
    let mut published: Vec<Msg> = Vec::new();
    let mut next_msg = || {
        let n = published.len() as i64;
        let msg = Msg::keyed(&format!("order-{}", n % 2), n / 2 + 1);
        published.push(msg.clone());
        msg
    };
    let applied = |msg: &Msg| {
        let id = msg.id.to_string();
        h.effects().iter().any(|e| e.message_id == id)
    };

    // Uncut starts, to learn what connecting, declaring and subscribing
    // take on the wire: what the client sent until it had subscribed. The
    // first start also clears what earlier versions may have left (no
    // topology is recorded yet), so it is longer; every later start, and
    // every reconnect, declares against the recorded topology like the
    // second one. That one's size is where the cut points end.
    let mut starts = Vec::new();
    for _ in 0..2 {
        let before = proxy.client_bytes();
        let (shutdown, task) = spawn(&consumer);
        wait_until("subscribed to both queues", Duration::from_secs(30), || {
            consumer.queues().len() == usize::from(PARTITIONS)
        })
        .await;
        starts.push(proxy.client_bytes() - before);
        let msg = next_msg();
        h.publish(&msg).await;
        wait_until("the message applied", Duration::from_secs(30), || {
            applied(&msg)
        })
        .await;
        stop(shutdown, task).await;
    }
    let full = starts[1];
    println!(
        "a first start took {} client bytes, a restart {full}",
        starts[0]
    );
    assert_eq!(proxy.cuts(), 0);

    // Cut points from inside the AMQP handshake to the end of the start.
    const POINTS: u64 = 12;
    const FIRST: u64 = 150;
    assert!(
        full > FIRST * 2,
        "a start of {full} bytes is implausibly short"
    );
    for i in 0..POINTS {
        let n = FIRST + (full - FIRST) * i / (POINTS - 1);
        let (cuts, connections) = (proxy.cuts(), proxy.connections());
        let started = Instant::now();
        proxy.cut_next_after(n);
        let (shutdown, task) = spawn(&consumer);
        let msg = next_msg();
        h.publish(&msg).await;
        wait_until(
            &format!("the message applied after a cut at {n} bytes"),
            Duration::from_secs(30),
            || task.is_finished() || applied(&msg),
        )
        .await;
        if task.is_finished() {
            panic!(
                "run gave up after a cut at {n} bytes: {:?}",
                task.await.unwrap()
            );
        }
        println!(
            "cut at {n} bytes: applied in {:?} over {} connections",
            started.elapsed(),
            proxy.connections() - connections,
        );
        // Else the start ended before the cut point and proved nothing.
        assert_eq!(
            proxy.cuts(),
            cuts + 1,
            "the connection was cut at {n} bytes"
        );
        stop(shutdown, task).await;
    }

    let effects = h.effects();
    assert_once_and_in_order(&effects);
    assert_eq!(effects.len(), published.len(), "each applied exactly once");
    h.cleanup(PARTITIONS).await;
}
