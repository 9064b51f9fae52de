//! The consumer on the real RabbitMQ and PostgreSQL: applied once, in order
//! per key, retries inside the key's lane, dead letters and replay.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use common::{Harness, Msg, assert_once_and_in_order, spawn, stop, wait_until};
use consumer::{Consumer, HandlerError};
use lapin::types::AMQPValue;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_is_applied_once_when_each_is_delivered_twice() {
    let h = Harness::new("c_twice").await;
    let consumer = Consumer::builder(h.config())
        .handle(&h.exchange, "order.*.submitted", h.recorder())
        .build()
        .unwrap();
    let (shutdown, task) = spawn(&consumer);
    let msgs: Vec<Msg> = (1..=25)
        .flat_map(|seq| (0..20).map(move |k| Msg::keyed(&format!("order-{k}"), seq)))
        .collect();
    h.publish(&msgs[0]).await; // waits for the queue to exist
    let mut twice = msgs[1..].to_vec();
    twice.extend(msgs.iter().cloned());
    h.publish_all(&twice).await;

    wait_until("every copy handled", Duration::from_secs(60), || {
        consumer.stats().applied + consumer.stats().duplicates >= 1000
    })
    .await;
    let effects = h.effects();
    assert_eq!(effects.len(), 500, "each of the 500 applied once");
    assert_once_and_in_order(&effects);
    assert_eq!(
        consumer.stats().duplicates,
        500,
        "every second copy absorbed"
    );
    stop(shutdown, task).await;
    h.cleanup(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_order_holds_with_16_lanes_200_keys_and_20000_events() {
    let h = Harness::new("c_order").await;
    let mut config = h.config();
    config.lanes = 16;
    let consumer = Consumer::builder(config)
        .handle(&h.exchange, "order.*.submitted", h.recorder())
        .build()
        .unwrap();
    let (shutdown, task) = spawn(&consumer);
    let msgs: Vec<Msg> = (1..=100)
        .flat_map(|seq| (0..200).map(move |k| Msg::keyed(&format!("order-{k}"), seq)))
        .collect();
    h.publish(&msgs[0]).await;
    h.publish_all(&msgs[1..]).await;

    wait_until("20,000 applied", Duration::from_secs(180), || {
        consumer.stats().applied >= 20_000
    })
    .await;
    let effects = h.effects();
    assert_eq!(effects.len(), 20_000);
    assert_once_and_in_order(&effects);
    stop(shutdown, task).await;
    h.cleanup(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arriving_out_of_key_order_are_applied_in_order() {
    let h = Harness::new("c_early").await;
    let consumer = Consumer::builder(h.config())
        .handle(&h.exchange, "order.*.submitted", h.recorder())
        .build()
        .unwrap();
    let (shutdown, task) = spawn(&consumer);
    let (first, second) = (Msg::keyed("order-1", 1), Msg::keyed("order-1", 2));
    h.publish(&second).await;
    wait_until("seq 2 held back", Duration::from_secs(10), || {
        consumer.stats().held >= 1
    })
    .await;
    h.publish(&first).await;
    wait_until("both applied", Duration::from_secs(10), || {
        consumer.stats().applied == 2
    })
    .await;
    let order: Vec<i64> = h.effects().iter().filter_map(|e| e.key_seq).collect();
    assert_eq!(order, [1, 2]);
    stop(shutdown, task).await;
    h.cleanup(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_failing_twice_is_applied_once_while_other_keys_go_on() {
    let h = Harness::new("c_retry").await;
    let mut config = h.config();
    config.retry.initial = Duration::from_millis(400);
    config.retry.jitter = false;
    let failures = Arc::new(AtomicU32::new(0));
    let record = h.recorder();
    let handler = {
        let failures = Arc::clone(&failures);
        move |conn: &mut diesel::PgConnection, e: consumer::Envelope<common::Ev>| {
            if e.meta.ordering_key.as_deref() == Some("slow")
                && failures.fetch_add(1, Ordering::SeqCst) < 2
            {
                return Err(HandlerError::Retry {
                    after: None,
                    reason: "not yet".into(),
                });
            }
            record(conn, e)
        }
    };
    let consumer = Consumer::builder(config)
        .handle(&h.exchange, "order.*.submitted", handler)
        .build()
        .unwrap();
    let (shutdown, task) = spawn(&consumer);
    h.publish(&Msg::keyed("slow", 1)).await;
    let others: Vec<Msg> = (0..20)
        .map(|k| Msg::keyed(&format!("fast-{k}"), 1))
        .collect();
    h.publish_all(&others).await;
    wait_until("all applied", Duration::from_secs(20), || {
        consumer.stats().applied == 21
    })
    .await;
    let effects = h.effects();
    assert_once_and_in_order(&effects);
    assert_eq!(
        effects.last().unwrap().ordering_key.as_deref(),
        Some("slow"),
        "the other keys were applied while the failing one waited"
    );
    assert_eq!(
        failures.load(Ordering::SeqCst),
        3,
        "two failures, then success"
    );
    assert_eq!(consumer.stats().retried, 2);
    stop(shutdown, task).await;
    h.cleanup(1).await;
}

/// A backlog is applied in batches, one transaction each. A handler that
/// fails inside a batch rolls the whole batch back, and the batch is applied
/// again message by message: the others' first writes are undone, so every
/// effect still appears once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_handler_in_a_batch_leaves_every_other_effect_applied_once() {
    let h = Harness::new("c_batch").await;
    let mut config = h.config();
    // One lane: the backlog waits behind it, so batches fill up.
    config.lanes = 1;
    let calls = Arc::new(AtomicU32::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let record = h.recorder();
    let handler = {
        let (calls, failed) = (Arc::clone(&calls), Arc::clone(&failed));
        move |conn: &mut diesel::PgConnection, e: consumer::Envelope<common::Ev>| {
            calls.fetch_add(1, Ordering::SeqCst);
            // Write first, then fail: the write must not survive.
            record(conn, e.clone())?;
            if e.meta.ordering_key.as_deref() == Some("k-39")
                && e.meta.key_seq == Some(5)
                && !failed.swap(true, Ordering::SeqCst)
            {
                return Err(HandlerError::Retry {
                    after: None,
                    reason: "once".into(),
                });
            }
            Ok(())
        }
    };
    let consumer = Consumer::builder(config)
        .handle(&h.exchange, "order.*.submitted", handler)
        .build()
        .unwrap();
    consumer.declare().await.unwrap();
    let msgs: Vec<Msg> = (1..=5)
        .flat_map(|seq| (0..40).map(move |k| Msg::keyed(&format!("k-{k}"), seq)))
        .collect();
    h.publish_all(&msgs).await;
    let (shutdown, task) = spawn(&consumer);
    wait_until("all applied", Duration::from_secs(30), || {
        consumer.stats().applied == 200
    })
    .await;
    let effects = h.effects();
    assert_eq!(effects.len(), 200);
    assert_once_and_in_order(&effects);
    assert!(failed.load(Ordering::SeqCst), "the failure happened");
    // 200 successful runs and the failed one; anything beyond that is a
    // batch-mate run in the rolled-back pass, whose write is gone.
    assert!(
        calls.load(Ordering::SeqCst) > 201,
        "the failure was inside a batch: {} handler calls",
        calls.load(Ordering::SeqCst)
    );
    stop(shutdown, task).await;
    h.cleanup(1).await;
}

/// A producer bug sends one message id under two keys. However the copies
/// are batched (both in one batch, the worst case with one lane and a
/// backlog), the id is applied once and the other copy counts as a
/// duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_message_id_under_two_keys_in_a_backlog_is_applied_once() {
    let h = Harness::new("c_idtwice").await;
    let mut config = h.config();
    config.lanes = 1;
    let consumer = Consumer::builder(config)
        .handle(&h.exchange, "order.*.submitted", h.recorder())
        .build()
        .unwrap();
    consumer.declare().await.unwrap();
    let mut msgs: Vec<Msg> = (0..40).map(|k| Msg::keyed(&format!("k-{k}"), 1)).collect();
    // Neighbours in the queue, so one batch takes both.
    msgs[21].id = msgs[20].id;
    h.publish_all(&msgs).await;
    let (shutdown, task) = spawn(&consumer);
    wait_until("every copy handled", Duration::from_secs(30), || {
        consumer.stats().applied + consumer.stats().duplicates >= 40
    })
    .await;
    let effects = h.effects();
    assert_eq!(effects.len(), 39, "the shared id applied once");
    assert_once_and_in_order(&effects);
    assert_eq!(consumer.stats().duplicates, 1);
    stop(shutdown, task).await;
    h.cleanup(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_always_failing_message_is_dead_lettered_its_key_moves_on_and_replay_applies_it() {
    let h = Harness::new("c_dead").await;
    let broken = Arc::new(AtomicBool::new(true));
    let record = h.recorder();
    let handler = {
        let broken = Arc::clone(&broken);
        move |conn: &mut diesel::PgConnection, e: consumer::Envelope<common::Ev>| {
            if e.event.n == 1 && broken.load(Ordering::SeqCst) {
                return Err(HandlerError::Retry {
                    after: None,
                    reason: "ledger closed".into(),
                });
            }
            record(conn, e)
        }
    };
    let config = h.config();
    let consumer = Consumer::builder(config.clone())
        .handle(&h.exchange, "order.*.submitted", handler)
        .build()
        .unwrap();
    let (shutdown, task) = spawn(&consumer);
    let poison = Msg::keyed("order-1", 1);
    h.publish(&poison).await;
    h.publish(&Msg::keyed("order-1", 2)).await;
    wait_until(
        "seq 2 applied after seq 1 gave up",
        Duration::from_secs(20),
        || consumer.stats().applied == 1 && consumer.stats().dead_lettered == 1,
    )
    .await;
    assert_eq!(h.effects()[0].key_seq, Some(2));

    // The dead letter says why, and how often it was tried.
    let dead = {
        let channel_check = h.dead_letters().await;
        assert_eq!(channel_check.len(), 1);
        channel_check.into_iter().next().unwrap()
    };
    let headers = dead.properties.headers().clone().unwrap();
    let reason = match headers.inner().get("x-dead-letter-reason") {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("reason header: {other:?}"),
    };
    assert!(
        reason.contains("failed 3 times") && reason.contains("ledger closed"),
        "{reason}"
    );
    assert_eq!(
        headers.inner().get("x-dead-letter-attempts"),
        Some(&AMQPValue::LongLongInt(3))
    );
    assert_eq!(
        dead.properties.message_id().as_ref().unwrap().as_str(),
        poison.id.to_string()
    );

    // Put it back, fix the handler, replay: applied, behind its key's position.
    h.publish_to("", &format!("{}.dead-letters", h.name), &{
        let mut m = poison.clone();
        m.headers = headers
            .inner()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.clone()))
            .collect();
        m
    })
    .await;
    broken.store(false, Ordering::SeqCst);
    assert_eq!(
        consumer::replay_dead_letters(&config, 100).await.unwrap(),
        1
    );
    wait_until("the replay applied", Duration::from_secs(20), || {
        consumer.stats().applied == 2
    })
    .await;
    let effects = h.effects();
    assert_eq!(effects.len(), 2);
    assert_eq!(effects[1].message_id, poison.id.to_string());
    stop(shutdown, task).await;
    h.cleanup(1).await;
}
