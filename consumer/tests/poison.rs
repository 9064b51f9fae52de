//! Poison inputs on the real RabbitMQ and PostgreSQL: a handler that
//! panics (sync or async), ordering keys PostgreSQL or the producer would
//! refuse, a sequence number far beyond its key, a body of the wrong shape,
//! a burst of large messages ahead of their key, and an instance frozen
//! inside a key's transaction. Each is dead-lettered with a reason naming
//! the problem (or, for the last two, waits and then applies) without
//! stopping the consumer, and the keys around it keep flowing.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Ev, Harness, Msg, assert_once_and_in_order, logs, record, spawn, stop, wait_until};
use consumer::dead_letter::{ATTEMPTS_HEADER, REASON_HEADER};
use consumer::{Consumer, Envelope};
use diesel::sql_types::{BigInt, Text};
use diesel::{OptionalExtension, PgConnection, QueryableByName, RunQueryDsl};
use lapin::types::AMQPValue;
use testkit::amqp::amqp_url;
use testkit::proxy::{self, Proxy};
use uuid::Uuid;

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

/// The handler runs a dead letter records.
fn attempts_of(delivery: &lapin::message::Delivery) -> Option<i64> {
    let headers = delivery.properties.headers().as_ref()?;
    match headers.inner().get(ATTEMPTS_HEADER)? {
        AMQPValue::LongLongInt(n) => Some(*n),
        _ => None,
    }
}

/// The dead letter of message `id`.
fn letter_of(dead: &[lapin::message::Delivery], id: Uuid) -> &lapin::message::Delivery {
    let id = id.to_string();
    dead.iter()
        .find(|d| d.properties.message_id().as_ref().map(|s| s.as_str()) == Some(id.as_str()))
        .unwrap_or_else(|| panic!("no dead letter for message {id}"))
}

/// Takes the dead letters off their queue until `n` came (the confirm of a
/// dead letter precedes its ack, so they are there once counted; the
/// deadline only guards against a slow broker).
async fn dead_letters(h: &Harness, n: usize) -> Vec<lapin::message::Delivery> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut dead = h.dead_letters().await;
    while dead.len() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        dead.extend(h.dead_letters().await);
    }
    dead
}

/// Whether message `msg` has its effect.
fn applied(h: &Harness, msg: &Msg) -> bool {
    let id = msg.id.to_string();
    h.effects().iter().any(|e| e.message_id == id)
}

/// The sequence numbers of `key` in the order they were applied.
fn applied_seqs(h: &Harness, key: &str) -> Vec<i64> {
    h.effects()
        .iter()
        .filter(|e| e.ordering_key.as_deref() == Some(key))
        .filter_map(|e| e.key_seq)
        .collect()
}

/// One event on each of `keys` keys named `prefix-<i>`, at sequence 1.
fn other_keys(prefix: &str, keys: usize) -> Vec<Msg> {
    (0..keys)
        .map(|k| Msg::keyed(&format!("{prefix}-{k}"), 1))
        .collect()
}

/// A message like `Msg::keyed(key, seq)` with another body.
fn with_body(key: &str, seq: i64, body: &[u8]) -> Msg {
    Msg {
        body: body.to_vec(),
        ..Msg::keyed(key, seq)
    }
}

/// Consumers subscribed to `queue` (the active one and those standing by).
async fn subscribers(queue: &str) -> u32 {
    testkit::amqp::queue_state(queue)
        .await
        .expect("the queue exists")
        .consumers
}

/// Messages of `queue` ready and unacknowledged, as the broker counts them.
async fn queue_counts(queue: &str) -> (u64, u64) {
    let queue = queue.to_owned();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new("rabbitmqctl")
            .args([
                "list_queues",
                "-q",
                "--no-table-headers",
                "name",
                "messages_ready",
                "messages_unacknowledged",
            ])
            .output()
            .expect("rabbitmqctl (the tests run beside the broker)");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|line| {
                let mut fields = line.split_whitespace();
                (fields.next() == Some(queue.as_str())).then(|| {
                    let mut n = || fields.next().and_then(|f| f.parse().ok()).unwrap();
                    (n(), n())
                })
            })
            .unwrap_or_else(|| panic!("queue {queue} not listed"))
    })
    .await
    .unwrap()
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct Outcome {
    #[diesel(sql_type = Text)]
    outcome: String,
}

/// What the inbox recorded for message `id` of the test's consumer.
fn outcome_of(h: &Harness, id: Uuid) -> Option<String> {
    diesel::sql_query(format!(
        r#"SELECT outcome FROM "{}".inbox_messages WHERE consumer = $1 AND message_id = $2::uuid"#,
        h.schema.name()
    ))
    .bind::<Text, _>(&h.name)
    .bind::<Text, _>(id.to_string())
    .get_result::<Outcome>(&mut h.schema.connect())
    .optional()
    .unwrap()
    .map(|o| o.outcome)
}

#[derive(QueryableByName)]
struct Position {
    #[diesel(sql_type = BigInt)]
    last_seq: i64,
}

/// The position of `key` for the test's consumer (`None`: never moved).
fn key_position(h: &Harness, key: &str) -> Option<i64> {
    diesel::sql_query(format!(
        r#"SELECT last_seq FROM "{}".inbox_keys WHERE consumer = $1 AND ordering_key = $2"#,
        h.schema.name()
    ))
    .bind::<Text, _>(&h.name)
    .bind::<Text, _>(key)
    .get_result::<Position>(&mut h.schema.connect())
    .optional()
    .unwrap()
    .map(|p| p.last_seq)
}

/// Messages of the test's consumer kept in `inbox_held`.
fn held_rows(h: &Harness) -> i64 {
    diesel::sql_query(format!(
        r#"SELECT count(*) AS n FROM "{}".inbox_held WHERE consumer = $1"#,
        h.schema.name()
    ))
    .bind::<Text, _>(&h.name)
    .get_result::<Count>(&mut h.schema.connect())
    .unwrap()
    .n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_sync_handler_is_retried_then_dead_lettered_and_its_key_moves_on() {
    logs();
    let h = Harness::new("p_panic").await;
    let mut config = h.config();
    // One lane: were it lost to the panic, nothing after it would apply.
    config.lanes = 1;
    // The attempt numbers the panicking handler ran with.
    let attempts: Arc<Mutex<Vec<u32>>> = Arc::default();
    let handler = {
        let (attempts, record) = (Arc::clone(&attempts), h.recorder());
        move |conn: &mut PgConnection, e: Envelope<Ev>| {
            if e.event.n == -1 {
                attempts.lock().unwrap().push(e.meta.attempt);
                panic!("poison event n = -1");
            }
            record(conn, e)
        }
    };
    let consumer = Consumer::builder(config)
        .handle(&h.exchange, PATTERN, handler)
        .build()
        .unwrap();
    let (shutdown, task) = spawn(&consumer);

    let poison = with_body("p", 1, br#"{"n":-1}"#);
    let next = Msg::keyed("p", 2);
    let others = other_keys("other", 5);
    h.publish(&poison).await;
    h.publish(&next).await;
    h.publish_all(&others).await;

    wait_until(
        "the poison dead-lettered and the 6 others applied",
        Duration::from_secs(20),
        || {
            let s = consumer.stats();
            s.dead_lettered >= 1 && s.applied >= 6
        },
    )
    .await;
    assert!(!task.is_finished(), "the consumer survived the panics");
    let stats = consumer.stats();
    assert_eq!(stats.dead_lettered, 1, "{stats:?}");
    assert_eq!(stats.applied, 6, "{stats:?}");
    assert!(
        stats.retried >= 3,
        "each panic counted as a retry: {stats:?}"
    );
    let seen: BTreeSet<u32> = attempts.lock().unwrap().iter().copied().collect();
    assert_eq!(
        seen,
        BTreeSet::from([1, 2, 3]),
        "the handler panicked on attempts 1 to max_attempts, then no more"
    );

    let dead = dead_letters(&h, 1).await;
    assert_eq!(dead.len(), 1, "only the poison is dead-lettered");
    let letter = letter_of(&dead, poison.id);
    let reason = reason_of(letter);
    assert!(reason.contains("panicked"), "{reason:?}");
    assert!(reason.contains("poison event n = -1"), "{reason:?}");
    assert_eq!(attempts_of(letter), Some(3), "{reason:?}");
    assert_eq!(letter.data, poison.body, "the body is kept as it was");

    let effects = h.effects();
    assert_once_and_in_order(&effects);
    assert!(!applied(&h, &poison), "the poison's writes rolled back");
    assert_eq!(applied_seqs(&h, "p"), [2], "its key moved on past it");
    assert!(others.iter().all(|m| applied(&h, m)), "other keys applied");
    assert!(!task.is_finished(), "still running");
    stop(shutdown, task).await;
    h.cleanup(1).await;
}

#[cfg(feature = "async")]
mod async_handlers {
    use std::collections::BTreeSet;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use consumer::Consumer;

    use super::{
        PATTERN, applied, applied_seqs, attempts_of, dead_letters, letter_of, logs, other_keys,
        reason_of, with_body,
    };
    use crate::common::{self, Harness, Msg, assert_once_and_in_order, spawn, stop, wait_until};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_async_handler_is_dead_lettered_and_its_lane_goes_on() {
        logs();
        let h = Harness::new("p_apanic").await;
        let mut config = h.config();
        // One lane: were it lost to the panic, nothing after it would apply.
        config.lanes = 1;
        let table = h.effects_table();
        let attempts: Arc<Mutex<Vec<u32>>> = Arc::default();
        let consumer = Consumer::builder(config)
            .handle_async::<common::Ev, _>(&h.exchange, PATTERN, {
                let attempts = Arc::clone(&attempts);
                move |conn, e| {
                    let table = table.clone();
                    let attempts = Arc::clone(&attempts);
                    Box::pin(async move {
                        if e.event.n == -1 {
                            attempts.lock().unwrap().push(e.meta.attempt);
                            // Inside the future, after a yield: the panic
                            // comes out of a poll, not out of the call.
                            tokio::task::yield_now().await;
                            panic!("async poison event n = -1");
                        }
                        common::record_async(conn, &table, e).await
                    })
                }
            })
            .build()
            .unwrap();
        let (shutdown, task) = spawn(&consumer);

        let poison = with_body("p", 1, br#"{"n":-1}"#);
        let next = Msg::keyed("p", 2);
        h.publish(&poison).await;
        h.publish(&next).await;
        wait_until(
            "the poison dead-lettered and its key's next applied",
            Duration::from_secs(20),
            || {
                let s = consumer.stats();
                s.dead_lettered >= 1 && s.applied >= 1
            },
        )
        .await;
        assert!(!task.is_finished(), "the consumer survived the panics");

        // After the dead letter, the one lane still applies everything.
        let later = other_keys("later", 20);
        h.publish_all(&later).await;
        wait_until("the 20 later ones applied", Duration::from_secs(20), || {
            consumer.stats().applied >= 21
        })
        .await;
        let stats = consumer.stats();
        assert_eq!((stats.applied, stats.dead_lettered), (21, 1), "{stats:?}");
        assert!(
            stats.retried >= 3,
            "each panic counted as a retry: {stats:?}"
        );
        let seen: BTreeSet<u32> = attempts.lock().unwrap().iter().copied().collect();
        assert_eq!(seen, BTreeSet::from([1, 2, 3]));

        let dead = dead_letters(&h, 1).await;
        assert_eq!(dead.len(), 1);
        let letter = letter_of(&dead, poison.id);
        let reason = reason_of(letter);
        assert!(reason.contains("panicked"), "{reason:?}");
        assert!(reason.contains("async poison event n = -1"), "{reason:?}");
        assert_eq!(attempts_of(letter), Some(3), "{reason:?}");

        assert_once_and_in_order(&h.effects());
        assert!(!applied(&h, &poison));
        assert_eq!(applied_seqs(&h, "p"), [2]);
        assert!(later.iter().all(|m| applied(&h, m)));
        assert!(!task.is_finished(), "still running");
        stop(shutdown, task).await;
        h.cleanup(1).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordering_keys_too_long_or_with_nul_are_dead_lettered_at_once_as_malformed() {
    logs();
    let h = Harness::new("p_badkey").await;
    let consumer = Consumer::builder(h.config())
        .handle(&h.exchange, PATTERN, h.recorder())
        .build()
        .unwrap();
    let (shutdown, task) = spawn(&consumer);

    let long = Msg::keyed(&"k".repeat(10_000), 1);
    let nul = Msg::keyed("a\u{0}b", 1);
    let others = other_keys("other", 5);
    h.publish(&long).await;
    h.publish(&nul).await;
    h.publish_all(&others).await;
    // And the same keys' next ones: as malformed as the first.
    let long_2 = Msg::keyed(&"k".repeat(10_000), 2);
    h.publish(&long_2).await;

    wait_until(
        "three dead-lettered and 5 applied",
        Duration::from_secs(20),
        || {
            let s = consumer.stats();
            s.dead_lettered >= 3 && s.applied >= 5
        },
    )
    .await;
    assert!(!task.is_finished(), "the consumer is still running");
    let stats = consumer.stats();
    assert_eq!((stats.dead_lettered, stats.applied), (3, 5), "{stats:?}");
    // At once: no handler ran, no retry.
    assert_eq!((stats.retried, stats.held), (0, 0), "{stats:?}");

    let dead = dead_letters(&h, 3).await;
    assert_eq!(dead.len(), 3);
    for (msg, size) in [
        (&long, "10000 bytes"),
        (&nul, "3 bytes"),
        (&long_2, "10000 bytes"),
    ] {
        let letter = letter_of(&dead, msg.id);
        let reason = reason_of(letter);
        assert!(reason.contains("malformed"), "{reason:?}");
        assert!(reason.contains("x-ordering-key"), "{reason:?}");
        assert!(reason.contains(size), "{reason:?}");
        assert!(reason.len() < 400, "the reason quotes the key cut short");
        assert_eq!(attempts_of(letter), Some(0), "{reason:?}");
        // Its id was readable: recorded, so a redelivery is a duplicate.
        assert_eq!(outcome_of(&h, msg.id).as_deref(), Some("dead-lettered"));
    }
    let effects = h.effects();
    assert_eq!(effects.len(), 5);
    assert!(others.iter().all(|m| applied(&h, m)));
    assert!(!task.is_finished(), "still running");
    stop(shutdown, task).await;
    h.cleanup(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_seq_far_beyond_its_key_is_dead_lettered_and_the_key_stays_where_it_was() {
    logs();
    let h = Harness::new("p_far").await;
    let mut config = h.config();
    // Longer than the test: were the message held, no gap policy would
    // settle it within the waits below.
    config.gap_wait = Duration::from_secs(120);
    let consumer = Consumer::builder(config)
        .handle(&h.exchange, PATTERN, h.recorder())
        .build()
        .unwrap();
    let (shutdown, task) = spawn(&consumer);

    let far = Msg::keyed("far", i64::MAX);
    h.publish(&far).await;
    wait_until("the far one dead-lettered", Duration::from_secs(10), || {
        consumer.stats().dead_lettered >= 1
    })
    .await;
    // The key did not move: its real events are next, not late.
    assert!(
        key_position(&h, "far").is_none_or(|p| p == 0),
        "position {:?}",
        key_position(&h, "far")
    );
    assert_eq!(outcome_of(&h, far.id).as_deref(), Some("dead-lettered"));
    let real = [Msg::keyed("far", 1), Msg::keyed("far", 2)];
    let others = other_keys("other", 3);
    h.publish_all(&real).await;
    h.publish_all(&others).await;
    wait_until("the real ones applied", Duration::from_secs(20), || {
        consumer.stats().applied >= 5
    })
    .await;
    assert!(!task.is_finished(), "the consumer is still running");
    let stats = consumer.stats();
    assert_eq!((stats.applied, stats.dead_lettered), (5, 1), "{stats:?}");
    assert_eq!((stats.late, stats.held), (0, 0), "{stats:?}");

    let dead = dead_letters(&h, 1).await;
    assert_eq!(dead.len(), 1, "only the far one");
    let reason = reason_of(letter_of(&dead, far.id));
    assert!(reason.contains("malformed"), "{reason:?}");
    assert!(reason.contains("beyond"), "{reason:?}");
    assert!(reason.contains(&i64::MAX.to_string()), "{reason:?}");
    assert_eq!(applied_seqs(&h, "far"), [1, 2]);
    assert_eq!(key_position(&h, "far"), Some(2));
    assert!(others.iter().all(|m| applied(&h, m)));
    assert!(!applied(&h, &far));
    assert!(!task.is_finished(), "still running");
    stop(shutdown, task).await;
    h.cleanup(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_struct_sent_as_an_array_is_dead_lettered_not_applied() {
    logs();
    let h = Harness::new("p_array").await;
    let consumer = Consumer::builder(h.config())
        .handle(&h.exchange, PATTERN, h.recorder())
        .build()
        .unwrap();
    let (shutdown, task) = spawn(&consumer);

    // `[5]` is what serde would take for `Ev { n: 5 }`.
    let array = with_body("arr", 1, b"[5]");
    let next = Msg::keyed("arr", 2);
    let others = other_keys("other", 3);
    h.publish(&array).await;
    h.publish(&next).await;
    h.publish_all(&others).await;
    wait_until(
        "the array dead-lettered and 4 applied",
        Duration::from_secs(20),
        || {
            let s = consumer.stats();
            s.dead_lettered >= 1 && s.applied >= 4
        },
    )
    .await;
    assert!(!task.is_finished(), "the consumer is still running");
    let stats = consumer.stats();
    assert_eq!((stats.applied, stats.dead_lettered), (4, 1), "{stats:?}");
    assert_eq!(stats.retried, 0, "dead-lettered at once: {stats:?}");

    let dead = dead_letters(&h, 1).await;
    assert_eq!(dead.len(), 1);
    let letter = letter_of(&dead, array.id);
    let reason = reason_of(letter);
    assert!(reason.contains("does not deserialize"), "{reason:?}");
    assert!(
        reason.contains("common::Ev"),
        "the type is named: {reason:?}"
    );
    assert!(reason.contains("expected struct Ev"), "{reason:?}");
    assert_eq!(letter.data, b"[5]");
    assert!(!applied(&h, &array), "never applied");
    assert_eq!(applied_seqs(&h, "arr"), [2], "its key moved on past it");
    assert!(others.iter().all(|m| applied(&h, m)));
    assert!(!task.is_finished(), "still running");
    stop(shutdown, task).await;
    h.cleanup(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_ahead_of_their_key_are_held_in_the_database_then_applied_in_order() {
    const MIB: usize = 1024 * 1024;
    logs();
    let h = Harness::new("p_large").await;
    let mut config = h.config();
    config.max_bytes_in_flight = 4 * MIB;
    // The held ones must wait for event 1, not be applied past the gap.
    config.gap_wait = Duration::from_secs(300);
    let consumer = Consumer::builder(config)
        .handle(&h.exchange, PATTERN, h.recorder())
        .build()
        .unwrap();
    let (shutdown, task) = spawn(&consumer);

    // `common::Ev` has no `deny_unknown_fields`: the pad is ignored.
    let large = |seq: i64| {
        let head = format!(r#"{{"n":{seq},"pad":""#);
        let mut body = head.into_bytes();
        body.resize(MIB - 2, b'x');
        body.extend_from_slice(br#""}"#);
        assert_eq!(body.len(), MIB);
        with_body("big", seq, &body)
    };
    let msgs: Vec<Msg> = (1..=31).map(large).collect();
    h.publish(&msgs[1]).await;
    h.publish_all(&msgs[2..]).await;

    wait_until(
        "30 held in inbox_held and the queue empty",
        Duration::from_secs(60),
        || held_rows(&h) == 30 && consumer.stats().held >= 30,
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut counts = queue_counts(&h.name).await;
    while counts != (0, 0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        counts = queue_counts(&h.name).await;
    }
    assert_eq!(counts, (0, 0), "(ready, unacked): every delivery acked");
    let stats = consumer.stats();
    assert_eq!((stats.applied, stats.held), (0, 30), "{stats:?}");
    assert!(!task.is_finished(), "the consumer is still running");

    h.publish(&msgs[0]).await;
    wait_until("all 31 applied", Duration::from_secs(60), || {
        h.effects().len() >= 31
    })
    .await;
    let effects = h.effects();
    assert_eq!(effects.len(), 31);
    assert_once_and_in_order(&effects);
    assert_eq!(applied_seqs(&h, "big"), (1..=31).collect::<Vec<_>>());
    assert_eq!(held_rows(&h), 0, "inbox_held emptied");
    let stats = consumer.stats();
    assert_eq!((stats.dead_lettered, stats.late), (0, 0), "{stats:?}");
    assert!(h.dead_letters().await.is_empty());
    assert!(!task.is_finished(), "still running");
    stop(shutdown, task).await;
    h.cleanup(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_instance_holding_a_key_cannot_block_another_for_long() {
    logs();
    let h = Harness::new("p_frozen").await;
    let mut config = h.config();
    config.partitions = 1;
    config.lock_timeout = Duration::from_millis(500);
    config.idle_in_transaction_timeout = Duration::from_secs(2);
    // Both instances report the connection name "consumer <name>" to the
    // broker: A reaches it through a proxy of its own, so that only its
    // connection can be cut.
    let proxy = Proxy::start(&proxy::address_of(&amqp_url())).await;
    let mut config_a = config.clone();
    config_a.amqp_url = proxy.url(&config.amqp_url);

    // A's handler, on key k's event 1 (once), writes its effect and then
    // freezes inside the transaction, holding the key's row lock.
    let frozen = Arc::new(AtomicBool::new(false));
    let released = Arc::new(AtomicBool::new(false));
    let thawed = Arc::new(AtomicBool::new(false));
    let handler_a = {
        let table = format!(r#""{}".effects"#, h.schema.name());
        let (frozen, released, thawed) = (
            Arc::clone(&frozen),
            Arc::clone(&released),
            Arc::clone(&thawed),
        );
        move |conn: &mut PgConnection, e: Envelope<Ev>| {
            let freeze = e.event.n == 1
                && e.meta.ordering_key.as_deref() == Some("k")
                && !frozen.load(Ordering::SeqCst);
            let result = record(conn, &table, &e);
            if freeze {
                frozen.store(true, Ordering::SeqCst);
                let until = Instant::now() + Duration::from_secs(20);
                while !released.load(Ordering::SeqCst) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(10));
                }
                thawed.store(true, Ordering::SeqCst);
            }
            result
        }
    };
    let a = Consumer::builder(config_a)
        .handle(&h.exchange, PATTERN, handler_a)
        .build()
        .unwrap();
    let b = Consumer::builder(config)
        .handle(&h.exchange, PATTERN, h.recorder())
        .build()
        .unwrap();

    // A first, so it is the queue's active consumer; B stands by.
    let (stop_a, task_a) = spawn(&a);
    wait_until("A subscribed", Duration::from_secs(20), || {
        a.queues().len() == 1
    })
    .await;
    let (stop_b, task_b) = spawn(&b);
    let deadline = Instant::now() + Duration::from_secs(20);
    while subscribers(&h.name).await < 2 {
        assert!(Instant::now() < deadline, "B did not subscribe");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let first = Msg::keyed("k", 1);
    h.publish(&first).await;
    wait_until(
        "A frozen in k's transaction",
        Duration::from_secs(20),
        || frozen.load(Ordering::SeqCst),
    )
    .await;
    assert_eq!(b.stats().received, 0, "B was standing by");

    // A's broker connection goes; the message goes back to the queue and
    // to B, whose lane waits for k's lock until PostgreSQL ends A's
    // transaction.
    let cut = Instant::now();
    proxy.cut_all();
    wait_until("B applied k's event 1", Duration::from_secs(10), || {
        b.stats().applied >= 1
    })
    .await;
    println!(
        "B applied it {:?} after A's connection was cut",
        cut.elapsed()
    );
    let sb = b.stats();
    assert!(
        sb.retried >= 1,
        "B's lock waits gave up and were retried: {sb:?}"
    );
    assert_eq!(sb.dead_lettered, 0, "{sb:?}");

    // A thaws: its transaction is gone, so its late commit fails.
    released.store(true, Ordering::SeqCst);
    wait_until("A's handler returned", Duration::from_secs(5), || {
        thawed.load(Ordering::SeqCst)
    })
    .await;
    wait_until(
        "A's commit failed and counted as a retry",
        Duration::from_secs(10),
        || a.stats().retried >= 1,
    )
    .await;
    let sa = a.stats();
    assert_eq!(sa.applied, 0, "A applied nothing: {sa:?}");

    // The key goes on.
    let second = Msg::keyed("k", 2);
    h.publish(&second).await;
    wait_until("k's event 2 applied", Duration::from_secs(20), || {
        applied(&h, &second)
    })
    .await;
    let effects = h.effects();
    assert_once_and_in_order(&effects);
    assert_eq!(
        effects
            .iter()
            .filter(|e| e.message_id == first.id.to_string())
            .count(),
        1,
        "k's event 1 applied exactly once"
    );
    assert_eq!(applied_seqs(&h, "k"), [1, 2]);
    assert!(!task_a.is_finished(), "A is still running");
    assert!(!task_b.is_finished(), "B is still running");
    stop(stop_a, task_a).await;
    stop(stop_b, task_b).await;
    assert_eq!(a.stats().applied + b.stats().applied, 2);
    assert!(h.dead_letters().await.is_empty());
    h.cleanup(1).await;
}

/// A message whose properties the client library cannot parse (a
/// `message_id` that is not UTF-8, as another client may write) ends the
/// consumer's connection every time it is delivered. The consumer must move
/// it to the dead-letter queue, byte for byte with the reason added, and
/// the queue must move on: the message behind it is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_the_client_cannot_parse_is_dead_lettered_and_the_queue_moves_on() {
    logs();
    let h = Harness::new("p_raw").await;
    let consumer = Consumer::builder(h.config())
        .handle(&h.exchange, "order.*.submitted", h.recorder())
        .build()
        .unwrap();
    consumer.declare().await.unwrap();
    let url = testkit::amqp::amqp_url();
    let mut raw = consumer::raw_amqp::RawConnection::open(&url).await.unwrap();
    // Only a message-id (property flag bit 7), of bytes that are not UTF-8.
    let mut properties = 0x0080u16.to_be_bytes().to_vec();
    properties.push(4);
    properties.extend([0xff, 0xfe, b'A', b'B']);
    raw.publish(
        h.exchange.as_bytes(),
        b"order.v1.submitted",
        &properties,
        br#"{"n":1}"#,
    )
    .await
    .unwrap();
    raw.close().await;
    let behind = Msg::keyed("behind", 1);
    h.publish(&behind).await;

    let (shutdown, task) = spawn(&consumer);
    wait_until(
        "the message behind it applied",
        Duration::from_secs(30),
        || {
            h.effects()
                .iter()
                .any(|e| e.message_id == behind.id.to_string())
        },
    )
    .await;
    assert!(!task.is_finished(), "the consumer runs on");
    assert_eq!(consumer.stats().dead_lettered, 1);
    stop(shutdown, task).await;

    // The dead letter is the message as it was, plus the reason; read it
    // with the bare connection (the client library cannot).
    let mut raw = consumer::raw_amqp::RawConnection::open(&url).await.unwrap();
    let letter = raw
        .get(&format!("{}.dead-letters", h.name))
        .await
        .unwrap()
        .expect("a dead letter");
    raw.ack(letter.delivery_tag).await.unwrap();
    raw.close().await;
    assert_eq!(letter.body, br#"{"n":1}"#);
    let contains = |needle: &[u8]| letter.properties.windows(needle.len()).any(|w| w == needle);
    assert!(
        contains(&[0xff, 0xfe, b'A', b'B']),
        "the original message_id"
    );
    assert!(contains(b"x-dead-letter-reason"));
    assert!(contains(b"cannot parse its properties"));
    h.cleanup(1).await;
}
