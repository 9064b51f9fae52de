//! Several instances of one consumer name on a partitioned topology (they
//! share the queues through `inbox_members` and their session locks, and
//! hand them over when one leaves), diesel-async handlers, the producer's trace continued
//! in the handler's span, and pruning of old message ids.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Harness, Msg, assert_once_and_in_order, spawn, stop, wait_until};
use consumer::{Consumer, Envelope, HandlerError, Stats};
use diesel::sql_types::{BigInt, Text};
use diesel::{PgConnection, QueryableByName, RunQueryDsl};

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Runs a `SELECT count(*) AS n ...` binding the consumer name as `$1`.
fn count(h: &Harness, sql: &str) -> i64 {
    diesel::sql_query(sql)
        .bind::<Text, _>(&h.name)
        .get_result::<Count>(&mut h.schema.connect())
        .unwrap()
        .n
}

/// Instances of the test's consumer that hold their membership lock.
fn live_members(h: &Harness) -> i64 {
    count(
        h,
        &format!(
            r#"SELECT count(*) AS n FROM "{}".inbox_members m
               WHERE consumer = $1 AND EXISTS (
                   SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted
                     AND l.objsubid = 1
                     AND l.classid = ((m.lock_key >> 32) & 4294967295)::oid
                     AND l.objid = (m.lock_key & 4294967295)::oid)"#,
            h.schema.name()
        ),
    )
}

/// Waits until two instances are members and have split the 4 queues
/// between them.
async fn wait_for_two_members(h: &Harness, a: &Consumer, b: &Consumer) {
    wait_until("two live instances", Duration::from_secs(20), || {
        live_members(h) == 2
    })
    .await;
    wait_until(
        "the queues split between them",
        Duration::from_secs(20),
        || {
            let (qa, qb) = (a.queues(), b.queues());
            let mut all: Vec<String> = qa.iter().chain(&qb).cloned().collect();
            all.sort();
            qa.len() == 2
                && qb.len() == 2
                && all
                    == (0..4)
                        .map(|i| format!("{}.{i}", h.name))
                        .collect::<Vec<_>>()
        },
    )
    .await;
}

/// `keys` keys, sequence `seqs` each, interleaved across keys.
fn keyed(keys: usize, seqs: std::ops::RangeInclusive<i64>) -> Vec<Msg> {
    seqs.flat_map(|seq| (0..keys).map(move |k| Msg::keyed(&format!("order-{k}"), seq)))
        .collect()
}

/// The ordering keys one instance ran its handler for.
type Keys = Arc<Mutex<HashSet<String>>>;

/// Two instances of one name on 4 partition queues, built from one config,
/// each noting the keys it handled.
fn two_instances(h: &Harness) -> [(Consumer, Keys); 2] {
    let mut config = h.config();
    config.partitions = 4;
    let build = || {
        let keys = Keys::default();
        let handler = {
            let (keys, record) = (Arc::clone(&keys), h.recorder());
            move |conn: &mut PgConnection, e: Envelope<common::Ev>| {
                if let Some(key) = &e.meta.ordering_key {
                    keys.lock().unwrap().insert(key.clone());
                }
                record(conn, e)
            }
        };
        let consumer = Consumer::builder(config.clone())
            .handle(&h.exchange, "order.*.submitted", handler)
            .build()
            .unwrap();
        (consumer, keys)
    };
    [build(), build()]
}

/// Waits until `instances` applied `target` messages, with `before`
/// applied by instances already stopped. Fails with their stats at once
/// when one dead-letters a message (it would never be applied), or when
/// nothing is applied for 20 s (stuck) or it takes over 90 s (too slow).
async fn wait_applied(target: u64, before: u64, instances: &[&Consumer]) {
    let started = Instant::now();
    let mut progress = (before, started);
    loop {
        let stats: Vec<Stats> = instances.iter().map(|c| c.stats()).collect();
        let applied = before + stats.iter().map(|s| s.applied).sum::<u64>();
        if applied >= target {
            return;
        }
        assert!(
            stats.iter().all(|s| s.dead_lettered == 0),
            "dead-lettered (late ones would mean a broken hand-over); stats: {stats:?}"
        );
        let now = Instant::now();
        if applied > progress.0 {
            progress = (applied, now);
        }
        assert!(
            now - progress.1 < Duration::from_secs(20) && now - started < Duration::from_secs(90),
            "{applied} of {target} applied after {:?}, none for {:?}; stats: {stats:?}",
            now - started,
            now - progress.1,
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_partitions_share_the_load_and_keep_per_key_order() {
    let h = Harness::new("i_share").await;
    let [(a, _), (b, _)] = two_instances(&h);
    let (stop_a, task_a) = spawn(&a);
    let (stop_b, task_b) = spawn(&b);
    wait_for_two_members(&h, &a, &b).await;

    let msgs = keyed(50, 1..=80);
    h.publish(&msgs[0]).await;
    h.publish_all(&msgs[1..]).await;
    wait_applied(4000, 0, &[&a, &b]).await;

    let effects = h.effects();
    assert_eq!(effects.len(), 4000);
    assert_once_and_in_order(&effects);
    let (sa, sb) = (a.stats(), b.stats());
    assert!(
        sa.applied > 0 && sb.applied > 0,
        "both instances applied some: {sa:?} {sb:?}"
    );
    assert_eq!(sa.applied + sb.applied, 4000, "{sa:?} {sb:?}");
    stop(stop_a, task_a).await;
    stop(stop_b, task_b).await;
    h.cleanup(4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_leaving_hands_its_queues_to_the_other() {
    let h = Harness::new("i_leave").await;
    let [(a, a_keys), (b, b_keys)] = two_instances(&h);
    let (stop_a, task_a) = spawn(&a);
    let (stop_b, task_b) = spawn(&b);
    wait_for_two_members(&h, &a, &b).await;

    let first = keyed(50, 1..=30);
    h.publish(&first[0]).await;
    h.publish_all(&first[1..]).await;
    wait_until("both instances applying", Duration::from_secs(30), || {
        let (sa, sb) = (a.stats(), b.stats());
        sa.applied > 0 && sb.applied > 0 && sa.applied + sb.applied >= 400
    })
    .await;

    // B leaves while events are published and its queues hold deliveries
    // (some unacked, in its prefetch window): they go back to the queues.
    let second = keyed(50, 31..=60);
    let ((), left_with) = tokio::join!(h.publish_all(&second), async {
        stop(stop_b, task_b).await;
        b.stats()
    });
    assert_eq!(
        live_members(&h),
        1,
        "a graceful leave deletes its member row"
    );

    // From now on A notes the keys it handles. Events published after B
    // left, on every key, so on B's queues too: A must take them.
    a_keys.lock().unwrap().clear();
    h.publish_all(&keyed(50, 61..=80)).await;
    let b_keys = b_keys.lock().unwrap().clone();
    wait_until(
        "A handles every key B handled",
        Duration::from_secs(20),
        || a_keys.lock().unwrap().is_superset(&b_keys),
    )
    .await;
    wait_applied(4000, left_with.applied, &[&a]).await;

    let effects = h.effects();
    assert_eq!(effects.len(), 4000);
    assert_once_and_in_order(&effects);
    assert_eq!(
        b.stats().applied,
        left_with.applied,
        "B did nothing after it left"
    );
    assert_eq!(a.stats().applied + left_with.applied, 4000);
    assert_eq!(a.stats().dead_lettered, 0);
    stop(stop_a, task_a).await;
    h.cleanup(4).await;
}

/// Consumers subscribed to `queue`, the active one and those standing by.
async fn subscribers(channel: &lapin::Channel, queue: &str) -> u32 {
    channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap()
        .consumer_count()
}

/// Gives `condition` up to `timeout` to hold, without failing when it does
/// not: for steps that make a race likely, not for assertions.
async fn give_time(timeout: Duration, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition().await && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The old owner of a queue must not let the broker promote the standby
/// while it still holds the key's earlier deliveries unacked: the standby
/// would take later ones, hold them (filling its prefetch window, so the
/// earlier ones could not reach it when requeued), apply them when the gap
/// wait ran out, and dead-letter the earlier ones as late. The session
/// therefore closes its channels (requeueing in order) without cancelling
/// first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_handed_over_while_its_old_owner_winds_down_keeps_key_order() {
    let h = Harness::new("i_window").await;
    let mut config = h.config();
    config.prefetch = 16;
    // A's handler blocks on keys `slow-*` until released, so its 4 lanes
    // are busy while key `k` waits in its prefetch window.
    let released = Arc::new(AtomicBool::new(false));
    let entered = Arc::new(AtomicU32::new(0));
    let handler = {
        let (released, entered, record) =
            (Arc::clone(&released), Arc::clone(&entered), h.recorder());
        move |conn: &mut PgConnection, e: Envelope<common::Ev>| {
            if e.meta
                .ordering_key
                .as_deref()
                .is_some_and(|k| k.starts_with("slow"))
            {
                entered.fetch_add(1, Ordering::SeqCst);
                let give_up = Instant::now() + Duration::from_secs(30);
                while !released.load(Ordering::SeqCst) && Instant::now() < give_up {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            record(conn, e)
        }
    };
    let a = Consumer::builder(config.clone())
        .handle(&h.exchange, "order.*.submitted", handler)
        .build()
        .unwrap();
    let b = Consumer::builder(config)
        .handle(&h.exchange, "order.*.submitted", h.recorder())
        .build()
        .unwrap();
    let broker = lapin::Connection::connect(&testkit::amqp::amqp_url(), Default::default())
        .await
        .unwrap();
    let channel = broker.create_channel().await.unwrap();

    let (stop_a, task_a) = spawn(&a);
    let slow: Vec<Msg> = (0..4)
        .map(|i| Msg::keyed(&format!("slow-{i}"), 1))
        .collect();
    h.publish(&slow[0]).await;
    h.publish_all(&slow[1..]).await;
    wait_until("A's lanes all busy", Duration::from_secs(20), || {
        entered.load(Ordering::SeqCst) == 4
    })
    .await;
    let (stop_b, task_b) = spawn(&b);
    give_time(Duration::from_secs(20), async || {
        subscribers(&channel, &h.name).await == 2
    })
    .await;
    assert_eq!(subscribers(&channel, &h.name).await, 2, "B stands by");
    let k: Vec<Msg> = (1..=40).map(|seq| Msg::keyed("k", seq)).collect();
    h.publish_all(&k[..12]).await;
    wait_until("A's prefetch window full", Duration::from_secs(20), || {
        a.stats().received == 16
    })
    .await;

    // A leaves; while it waits for its handlers, more of key k arrives.
    let leaving = tokio::spawn(stop(stop_a, task_a));
    give_time(Duration::from_secs(3), async || {
        subscribers(&channel, &h.name).await == 1
    })
    .await;
    h.publish_all(&k[12..]).await;
    give_time(Duration::from_secs(3), async || b.stats().received >= 16).await;
    released.store(true, Ordering::SeqCst);
    leaving.await.unwrap();

    wait_until("all of key k settled", Duration::from_secs(30), || {
        let (sa, sb) = (a.stats(), b.stats());
        sa.applied + sb.applied + sb.dead_lettered >= 44
    })
    .await;
    let order: Vec<i64> = h
        .effects()
        .iter()
        .filter(|e| e.ordering_key.as_deref() == Some("k"))
        .filter_map(|e| e.key_seq)
        .collect();
    assert_eq!(
        order,
        (1..=40).collect::<Vec<_>>(),
        "key k applied once each, in order; B: {:?}",
        b.stats()
    );
    assert_eq!(b.stats().dead_lettered, 0);
    stop(stop_b, task_b).await;
    h.cleanup(1).await;
}

#[cfg(feature = "async")]
mod diesel_async_handlers {
    use std::time::Duration;

    use consumer::Consumer;

    use crate::common::{self, Harness, Msg, assert_once_and_in_order, spawn, stop, wait_until};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_async_handler_applies_each_message_once_and_in_order_when_delivered_twice() {
        let h = Harness::new("i_async").await;
        let table = h.effects_table();
        let consumer = Consumer::builder(h.config())
            .handle_async::<common::Ev, _>(&h.exchange, "order.*.submitted", move |conn, e| {
                let table = table.clone();
                Box::pin(async move { common::record_async(conn, &table, e).await })
            })
            .build()
            .unwrap();
        let (shutdown, task) = spawn(&consumer);
        let msgs: Vec<Msg> = (1..=10)
            .flat_map(|seq| (0..20).map(move |k| Msg::keyed(&format!("order-{k}"), seq)))
            .collect();
        h.publish(&msgs[0]).await;
        let mut twice = msgs[1..].to_vec();
        twice.extend(msgs.iter().cloned());
        h.publish_all(&twice).await;

        wait_until("every copy handled", Duration::from_secs(60), || {
            let s = consumer.stats();
            s.applied + s.duplicates >= 400
        })
        .await;
        let effects = h.effects();
        assert_eq!(effects.len(), 200, "each of the 200 applied once");
        assert_once_and_in_order(&effects);
        let s = consumer.stats();
        assert_eq!((s.applied, s.duplicates), (200, 200), "{s:?}");
        stop(shutdown, task).await;
        h.cleanup(1).await;
    }
}

#[cfg(feature = "trace-context")]
mod trace_context {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};
    use std::time::Duration;

    use consumer::Consumer;
    use lapin::types::{AMQPValue, LongString};
    use opentelemetry::trace::{TraceContextExt, TraceId, TracerProvider as _};
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::layer::SubscriberExt;

    use crate::common::{Harness, Msg, spawn, stop, wait_until};

    /// The consumer's spans are made on its tokio tasks and blocking
    /// threads, which a thread-local default does not reach: install a
    /// global subscriber with the OpenTelemetry layer, once per binary.
    fn install_tracing() {
        static PROVIDER: OnceLock<opentelemetry_sdk::trace::SdkTracerProvider> = OnceLock::new();
        PROVIDER.get_or_init(|| {
            let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
            let subscriber = tracing_subscriber::registry()
                .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
            tracing::subscriber::set_global_default(subscriber)
                .expect("the only global subscriber in this binary");
            provider
        });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_handler_span_continues_the_producers_trace() {
        install_tracing();
        let h = Harness::new("i_trace").await;
        let seen: Arc<Mutex<HashMap<uuid::Uuid, TraceId>>> = Arc::default();
        let record = h.recorder();
        let handler = {
            let seen = Arc::clone(&seen);
            move |conn: &mut diesel::PgConnection, e: consumer::Envelope<crate::common::Ev>| {
                let context = tracing::Span::current().context();
                let trace_id = context.span().span_context().trace_id();
                seen.lock().unwrap().insert(e.meta.message_id, trace_id);
                record(conn, e)
            }
        };
        let consumer = Consumer::builder(h.config())
            .handle(&h.exchange, "order.*.submitted", handler)
            .build()
            .unwrap();
        let (shutdown, task) = spawn(&consumer);

        let sent = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
        let mut traced = Msg::keyed("order-1", 1);
        traced.headers.push((
            "traceparent".into(),
            AMQPValue::LongString(LongString::from(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )),
        ));
        let untraced = Msg::keyed("order-2", 1);
        h.publish(&traced).await;
        h.publish(&untraced).await;
        wait_until("both handled", Duration::from_secs(20), || {
            consumer.stats().applied == 2
        })
        .await;

        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.get(&traced.id), Some(&sent), "{seen:?}");
        let own = seen
            .get(&untraced.id)
            .expect("a message without traceparent is handled");
        assert_ne!(*own, sent, "it starts a trace of its own");
        assert_eq!(h.effects().len(), 2);
        stop(shutdown, task).await;
        h.cleanup(1).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_ids_older_than_the_retention_are_pruned_and_the_effects_stay() {
    let h = Harness::new("i_prune").await;
    let mut config = h.config();
    config.dedupe_retention = Duration::from_secs(1);
    config.prune_interval = Duration::from_millis(200);
    // The handler checks that its message's dedupe row is there, in its
    // own transaction, so the pruning below removes rows that existed.
    let recorded_ids = Arc::new(AtomicU32::new(0));
    let handler = {
        let record = h.recorder();
        let recorded_ids = Arc::clone(&recorded_ids);
        let own_row = format!(
            r#"SELECT count(*) AS n FROM "{}".inbox_messages
               WHERE consumer = $1 AND message_id = $2::uuid"#,
            h.schema.name()
        );
        let name = h.name.clone();
        move |conn: &mut PgConnection, e: Envelope<common::Ev>| {
            let mine = diesel::sql_query(&own_row)
                .bind::<Text, _>(&name)
                .bind::<Text, _>(e.meta.message_id.to_string())
                .get_result::<Count>(conn)
                .map_err(|err| HandlerError::Retry {
                    after: None,
                    reason: err.to_string(),
                })?;
            if mine.n == 1 {
                recorded_ids.fetch_add(1, Ordering::SeqCst);
            }
            record(conn, e)
        }
    };
    let consumer = Consumer::builder(config)
        .handle(&h.exchange, "order.*.submitted", handler)
        .build()
        .unwrap();
    let (shutdown, task) = spawn(&consumer);
    let msgs: Vec<Msg> = (1..=5).map(|seq| Msg::keyed("order-1", seq)).collect();
    h.publish(&msgs[0]).await;
    h.publish_all(&msgs[1..]).await;
    wait_until("5 applied", Duration::from_secs(20), || {
        consumer.stats().applied == 5
    })
    .await;
    assert_eq!(
        recorded_ids.load(Ordering::SeqCst),
        5,
        "each message's id was recorded with its effects"
    );

    let ids = format!(
        r#"SELECT count(*) AS n FROM "{}".inbox_messages WHERE consumer = $1"#,
        h.schema.name()
    );
    wait_until("the message ids pruned", Duration::from_secs(20), || {
        count(&h, &ids) == 0
    })
    .await;
    let effects = h.effects();
    assert_eq!(effects.len(), 5, "the effects stay");
    assert_once_and_in_order(&effects);
    let position = count(
        &h,
        &format!(
            r#"SELECT last_seq AS n FROM "{}".inbox_keys
               WHERE consumer = $1 AND ordering_key = 'order-1'"#,
            h.schema.name()
        ),
    );
    assert_eq!(position, 5, "the key's position stays");
    stop(shutdown, task).await;
    h.cleanup(1).await;
}
