//! Per-key order that does not depend on the broker keeping a key in one
//! queue: a key's messages split over two queues, newer ones first; the
//! partition count raised and lowered while traffic flows; a consumer bound
//! to only some of a key's routing keys; a member process killed.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Harness, Msg, assert_once_and_in_order, spawn, stop, wait_until};
use consumer::Consumer;
use diesel::sql_types::{BigInt, Text};
use diesel::{QueryableByName, RunQueryDsl};
use lapin::types::{AMQPValue, FieldTable};

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Runs `SELECT ... AS n` in the test's schema, binding the consumer name.
fn count(h: &Harness, sql: &str) -> i64 {
    diesel::sql_query(sql.replace("{schema}", h.schema.name()))
        .bind::<Text, _>(&h.name)
        .get_result::<Count>(&mut h.schema.connect())
        .unwrap()
        .n
}

/// Messages kept in `inbox_held` for the test's consumer.
fn held_rows(h: &Harness) -> i64 {
    count(
        h,
        r#"SELECT count(*) AS n FROM "{schema}".inbox_held WHERE consumer = $1"#,
    )
}

/// The key order the handlers applied for `key`.
fn applied(h: &Harness, key: &str) -> Vec<i64> {
    h.effects()
        .iter()
        .filter(|e| e.ordering_key.as_deref() == Some(key))
        .filter_map(|e| e.key_seq)
        .collect()
}

/// After a broker restart a consistent-hash ring may send a key to another
/// queue while its older messages still wait in the old one. Here the newer
/// half of a key arrives first, through queue 1; it must be acked and kept
/// in the database (across a restart of the consumer), and applied after
/// the older half, which arrives later through queue 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_split_over_two_queues_newer_half_first_is_applied_in_order() {
    let h = Harness::new("o_split").await;
    let mut config = h.config();
    config.partitions = 2;
    // Long enough that only the older half arriving can release the newer.
    config.gap_wait = Duration::from_secs(120);
    let build = || {
        Consumer::builder(config.clone())
            .handle(&h.exchange, "order.*.submitted", h.recorder())
            .build()
            .unwrap()
    };
    let first = build();
    let (shutdown, task) = spawn(&first);
    let through = |seq: i64, slot: u16| Msg {
        slot: Some(slot),
        ..Msg::keyed("moved", seq)
    };
    // Slot 1 is queue 1 of 2, slot 0 queue 0.
    let newer: Vec<Msg> = (6..=10).map(|seq| through(seq, 1)).collect();
    h.publish(&newer[0]).await;
    h.publish_all(&newer[1..]).await;
    wait_until(
        "the newer half held in the database",
        Duration::from_secs(20),
        || held_rows(&h) == 5,
    )
    .await;
    assert_eq!(first.stats().held, 5);
    assert!(
        applied(&h, "moved").is_empty(),
        "nothing applied out of turn"
    );
    stop(shutdown, task).await;

    // A new instance: the held messages are in the table, not in memory.
    let second = build();
    let (shutdown, task) = spawn(&second);
    let older: Vec<Msg> = (1..=5).map(|seq| through(seq, 0)).collect();
    h.publish(&older[0]).await;
    h.publish_all(&older[1..]).await;
    wait_until("all ten applied", Duration::from_secs(20), || {
        applied(&h, "moved").len() == 10
    })
    .await;
    assert_eq!(applied(&h, "moved"), (1..=10).collect::<Vec<_>>());
    assert_eq!(held_rows(&h), 0);
    assert_eq!(
        count(
            &h,
            r#"SELECT coalesce(sum(held), 0)::bigint AS n FROM "{schema}".inbox_keys WHERE consumer = $1"#
        ),
        0,
        "the key's held count is back to 0"
    );
    assert_eq!(second.stats().dead_lettered, 0);
    stop(shutdown, task).await;
    h.cleanup(2).await;
}

/// The recorded partition count and the queues being drained.
fn topology(h: &Harness) -> (i64, i64) {
    let partitions = count(
        h,
        r#"SELECT coalesce((SELECT partitions::bigint FROM "{schema}".inbox_topology
                            WHERE consumer = $1), 0) AS n"#,
    );
    let retiring = count(
        h,
        r#"SELECT coalesce((SELECT cardinality(retiring)::bigint FROM "{schema}".inbox_topology
                            WHERE consumer = $1), 0) AS n"#,
    );
    (partitions, retiring)
}

/// Whether queue `name` exists on the broker.
async fn queue_exists(name: &str) -> bool {
    testkit::amqp::queue_state(name).await.is_some()
}

/// 2 partitions, raised to 4 by an instance started with 4 (the running one
/// follows), then lowered to 1 by another, while events flow all along:
/// every event is applied once and in key order, nothing is dead-lettered,
/// and the queues no longer used are drained and deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_raised_and_lowered_while_traffic_flows_lose_nothing_and_keep_order() {
    let h = Harness::new("o_repartition").await;
    let with = |partitions: u16| {
        let mut config = h.config();
        config.partitions = partitions;
        Consumer::builder(config)
            .handle(&h.exchange, "order.*.submitted", h.recorder())
            .build()
            .unwrap()
    };
    let keys = 40;
    let rounds = 60;
    let round = |seq: i64| -> Vec<Msg> {
        (0..keys)
            .map(|k| Msg::keyed(&format!("order-{k}"), seq))
            .collect()
    };

    let a = with(2);
    let (stop_a, task_a) = spawn(&a);
    h.publish(&Msg::keyed("order-0", 1)).await;
    h.publish_all(&round(1)[1..]).await;
    let (b, c) = (with(4), with(1));
    let mut b_run = None;
    let mut c_run = None;
    let mut a_run = Some((stop_a, task_a));
    for seq in 2..=rounds {
        h.publish_all(&round(seq)).await;
        if seq == 20 {
            b_run = Some(spawn(&b));
            wait_until("4 partitions recorded", Duration::from_secs(20), || {
                topology(&h).0 == 4
            })
            .await;
        }
        if seq == 40 {
            let (stop_a, task_a) = a_run.take().unwrap();
            stop(stop_a, task_a).await;
            c_run = Some(spawn(&c));
            wait_until("1 partition recorded", Duration::from_secs(20), || {
                topology(&h).0 == 1
            })
            .await;
        }
    }
    let total = (keys * rounds) as usize;
    wait_until("every event applied", Duration::from_secs(60), || {
        h.effects().len() >= total
    })
    .await;
    wait_until(
        "the queues of 2 and 4 partitions drained and deleted",
        Duration::from_secs(60),
        || topology(&h).1 == 0,
    )
    .await;
    let effects = h.effects();
    assert_eq!(effects.len(), total);
    assert_once_and_in_order(&effects);
    for consumer in [&a, &b, &c] {
        assert_eq!(consumer.stats().dead_lettered, 0, "{:?}", consumer.stats());
    }
    for index in 0..4 {
        let queue = format!("{}.{index}", h.name);
        assert!(!queue_exists(&queue).await, "{queue} deleted");
    }
    assert!(queue_exists(&h.name).await, "the one queue of 1 partition");
    let (stop_b, task_b) = b_run.unwrap();
    stop(stop_b, task_b).await;
    let (stop_c, task_c) = c_run.unwrap();
    stop(stop_c, task_c).await;
    h.cleanup(4).await;
}

/// `x-key-prev` as the relay writes it: `{exchange: {routing key: seq}}`.
fn key_prev(exchange: &str, routes: &[(&str, i64)]) -> (String, AMQPValue) {
    let mut by_key = BTreeMap::new();
    for (key, seq) in routes {
        by_key.insert(*key, *seq);
    }
    let mut keys = FieldTable::default();
    for (key, seq) in by_key {
        keys.insert(key.into(), AMQPValue::LongLongInt(seq));
    }
    let mut table = FieldTable::default();
    table.insert(exchange.into(), AMQPValue::FieldTable(keys));
    ("x-key-prev".to_owned(), AMQPValue::FieldTable(table))
}

/// A key's events 1 to 6 go to routing keys a, b, a, c, b, a. A consumer
/// bound to a and b only never gets 4; each event says (x-key-prev) what
/// came before it on which routing key, so the consumer applies 1, 2, 3, 5
/// and 6 in that order whatever order they arrive in, without waiting for
/// 4 (the gap wait is longer than the test's deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_subscriber_applies_in_order_through_out_of_turn_deliveries() {
    let h = Harness::new("o_partial").await;
    let mut config = h.config();
    config.gap_wait = Duration::from_secs(300);
    let partial = Consumer::builder(config)
        .handle(&h.exchange, "order.v1.a", h.recorder())
        .handle(&h.exchange, "order.v1.b", h.recorder())
        .build()
        .unwrap();
    let (shutdown, task) = spawn(&partial);
    let x = h.exchange.as_str();
    let event = |seq: i64, route: &str, prev: &[(&str, i64)]| Msg {
        routing_key: format!("order.v1.{route}"),
        headers: vec![key_prev(x, prev)],
        ..Msg::keyed("k", seq)
    };
    let e1 = event(1, "a", &[]);
    let e2 = event(2, "b", &[("order.v1.a", 1)]);
    let e3 = event(3, "a", &[("order.v1.a", 1), ("order.v1.b", 2)]);
    // Event 4 (order.v1.c) is not bound: never published to this consumer.
    let e5 = event(
        5,
        "b",
        &[("order.v1.a", 3), ("order.v1.b", 2), ("order.v1.c", 4)],
    );
    let e6 = event(
        6,
        "a",
        &[("order.v1.a", 3), ("order.v1.b", 5), ("order.v1.c", 4)],
    );
    for msg in [&e5, &e6, &e3, &e1] {
        h.publish(msg).await;
    }
    wait_until(
        "5, 6 and 3 held, 1 applied",
        Duration::from_secs(20),
        || held_rows(&h) == 3 && applied(&h, "k") == [1],
    )
    .await;
    h.publish(&e2).await;
    wait_until("all five applied", Duration::from_secs(20), || {
        applied(&h, "k").len() == 5
    })
    .await;
    assert_eq!(applied(&h, "k"), [1, 2, 3, 5, 6]);
    assert_eq!(partial.stats().dead_lettered, 0);
    assert_eq!(partial.stats().late, 0);
    stop(shutdown, task).await;
    h.cleanup(1).await;
}

/// Environment variable that makes [`member_child_process`] run: the test
/// schema, consumer name and exchange, separated by `|`.
const CHILD: &str = "CONSUMER_TEST_CHILD";

/// The consumer of the test below in a process of its own, so it can die
/// by SIGKILL. Runs only when started by that test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "started as a child process by a_killed_member_process_has_its_queues_taken_over_at_once"]
async fn member_child_process() {
    let Ok(spec) = std::env::var(CHILD) else {
        return;
    };
    let [schema, name, exchange]: [&str; 3] = spec
        .split('|')
        .collect::<Vec<_>>()
        .try_into()
        .expect("schema|name|exchange");
    let consumer = Consumer::builder(member_config(schema, name))
        .handle(exchange, "order.*.submitted", {
            let table = format!(r#""{schema}".effects"#);
            move |conn: &mut diesel::PgConnection, e| common::record(conn, &table, &e)
        })
        .build()
        .unwrap();
    consumer
        .run(tokio_util::sync::CancellationToken::new())
        .await
        .unwrap();
}

/// Both instances' configuration: 4 partitions, default membership checks.
fn member_config(schema: &str, name: &str) -> consumer::ConsumerConfig {
    let mut config =
        consumer::ConsumerConfig::new(name, &testkit::database_url(), &testkit::amqp::amqp_url());
    config.schema = schema.to_owned();
    config.partitions = 4;
    config.lanes = 4;
    config
}

/// Instances of the test's consumer holding their membership lock.
fn live_members(h: &Harness) -> i64 {
    count(
        h,
        r#"SELECT count(*) AS n FROM "{schema}".inbox_members m
           WHERE consumer = $1 AND EXISTS (
               SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted
                 AND l.objsubid = 1
                 AND l.classid = ((m.lock_key >> 32) & 4294967295)::oid
                 AND l.objid = (m.lock_key & 4294967295)::oid)"#,
    )
}

/// A crashed instance's database session ends with its process, and with
/// it the lock that says it lives: the other instance takes its queues at
/// its next membership check (500 ms), not after a heartbeat timeout. The
/// killed one's unacked deliveries come back and are applied once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_member_process_has_its_queues_taken_over_at_once() {
    let h = Harness::new("o_kill").await;
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "member_child_process",
            "--exact",
            "--ignored",
            "--test-threads=1",
        ])
        .env(
            CHILD,
            format!("{}|{}|{}", h.schema.name(), h.name, h.exchange),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Killed however this test ends.
    let mut child = KillOnDrop(child);
    wait_until("the child instance lives", Duration::from_secs(30), || {
        live_members(&h) == 1 && topology(&h).0 == 4
    })
    .await;
    let survivor = Consumer::builder(member_config(h.schema.name(), &h.name))
        .handle(&h.exchange, "order.*.submitted", h.recorder())
        .build()
        .unwrap();
    let (shutdown, task) = spawn(&survivor);
    wait_until("the queues split", Duration::from_secs(20), || {
        live_members(&h) == 2 && survivor.queues().len() == 2
    })
    .await;
    let round = |seq: i64| -> Vec<Msg> {
        (0..40)
            .map(|k| Msg::keyed(&format!("order-{k}"), seq))
            .collect()
    };
    h.publish(&Msg::keyed("order-0", 1)).await;
    h.publish_all(&round(1)[1..]).await;
    for seq in 2..=20 {
        h.publish_all(&round(seq)).await;
    }
    wait_until("the child applies some", Duration::from_secs(20), || {
        h.effects().len() > survivor.stats().applied as usize
    })
    .await;

    child.0.kill().unwrap(); // SIGKILL
    let killed = std::time::Instant::now();
    child.0.wait().unwrap();
    wait_until("every queue taken over", Duration::from_secs(10), || {
        survivor.queues().len() == 4
    })
    .await;
    let took = killed.elapsed();
    println!("queues taken over {took:?} after the kill");
    for seq in 21..=30 {
        h.publish_all(&round(seq)).await;
    }
    wait_until("every event applied", Duration::from_secs(30), || {
        h.effects().len() >= 40 * 30
    })
    .await;
    let effects = h.effects();
    assert_eq!(effects.len(), 40 * 30);
    assert_once_and_in_order(&effects);
    assert_eq!(survivor.stats().dead_lettered, 0);
    stop(shutdown, task).await;
    h.cleanup(4).await;
}

/// A child process that is killed when the test ends, passed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
