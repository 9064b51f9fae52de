//! A replay cannot be forged with headers. The consumer honours
//! `x-dead-letter-replay` (apply whatever the key's position, route by the
//! original exchange and routing key) only for a message that came through
//! the default exchange straight into its own queue AND that
//! `replay_dead_letters` recorded in `inbox_replays` before putting it back.
//! A producer setting the replay headers on a message it publishes gets an
//! ordinary message of the exchange it published to, or a dead letter;
//! never a message of another exchange's handler, also after it was
//! dead-lettered and replayed by an operator.
//!
//! Every test binds two exchanges, each with a handler of its own that
//! writes what it got (which handler, exchange, routing key, replay mark)
//! to a table.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use common::{Ev, Harness, Msg, logs, spawn, stop, wait_until};
use consumer::dead_letter::{ORIGINAL_EXCHANGE_HEADER, ORIGINAL_ROUTING_KEY_HEADER, REASON_HEADER};
use consumer::envelope::REPLAY_HEADER;
use consumer::{Consumer, ConsumerConfig, Envelope, HandlerError, HandlerResult};
use diesel::connection::SimpleConnection;
use diesel::sql_types::{BigInt, Bool, Nullable, Text};
use diesel::{OptionalExtension, PgConnection, QueryableByName, RunQueryDsl};
use lapin::options::ExchangeDeleteOptions;
use lapin::types::{AMQPValue, LongString};
use lapin::{Connection, ConnectionProperties};
use testkit::amqp::amqp_url;
use uuid::Uuid;

/// Exchange A's pattern and the routing key published to it.
const A_PATTERN: &str = "order.*.submitted";
const A_KEY: &str = "order.v1.submitted";
/// Exchange B's pattern and the routing key published to it.
const B_PATTERN: &str = "billing.*.charged";
const B_KEY: &str = "billing.v1.charged";

/// The harness (whose exchange is A), exchange B, and the `seen` table.
struct Setup {
    h: Harness,
    /// The second exchange the consumer binds.
    b: String,
}

impl Setup {
    async fn new(prefix: &str) -> Self {
        let h = Harness::new(prefix).await;
        h.schema
            .connect()
            .batch_execute(
                "CREATE TABLE seen (n bigserial PRIMARY KEY, handler text NOT NULL,
                                    message_id uuid NOT NULL, exchange text NOT NULL,
                                    routing_key text NOT NULL, replayed boolean NOT NULL,
                                    key_seq bigint)",
            )
            .unwrap();
        let b = testkit::unique_name(&format!("{prefix}_b"));
        Setup { h, b }
    }

    fn a(&self) -> &str {
        &self.h.exchange
    }

    /// A handler called `handler` that records what it got in `seen`, or,
    /// while `breaker` is broken, counts the call and asks for a retry.
    fn recorder(
        &self,
        handler: &'static str,
        breaker: Arc<Breaker>,
    ) -> impl Fn(&mut PgConnection, Envelope<Ev>) -> HandlerResult + Send + Sync + 'static {
        let insert = format!(
            r#"INSERT INTO "{}".seen (handler, message_id, exchange, routing_key, replayed, key_seq)
               VALUES ($1, $2::uuid, $3, $4, $5, $6)"#,
            self.h.schema.name()
        );
        move |conn, e| {
            if breaker.broken.load(Ordering::SeqCst) {
                breaker.failures.fetch_add(1, Ordering::SeqCst);
                return Err(HandlerError::Retry {
                    after: None,
                    reason: format!("handler {handler} is broken"),
                });
            }
            diesel::sql_query(insert.as_str())
                .bind::<Text, _>(handler)
                .bind::<Text, _>(e.meta.message_id.to_string())
                .bind::<Text, _>(&e.meta.exchange)
                .bind::<Text, _>(&e.meta.routing_key)
                .bind::<Bool, _>(e.meta.replayed)
                .bind::<Nullable<BigInt>, _>(e.meta.key_seq)
                .execute(conn)
                .map(|_| ())
                .map_err(|err| HandlerError::Retry {
                    after: None,
                    reason: err.to_string(),
                })
        }
    }

    /// A consumer with handler "A" on exchange A and "B" on exchange B,
    /// each failing while its breaker is broken, its topology declared (so
    /// exchange B exists before anything is published to it).
    async fn consumer(
        &self,
        config: ConsumerConfig,
        a: &Arc<Breaker>,
        b: &Arc<Breaker>,
    ) -> Consumer {
        let consumer = Consumer::builder(config)
            .handle(self.a(), A_PATTERN, self.recorder("A", Arc::clone(a)))
            .handle(&self.b, B_PATTERN, self.recorder("B", Arc::clone(b)))
            .build()
            .unwrap();
        consumer.declare().await.unwrap();
        consumer
    }

    /// Everything the handlers got, in commit order.
    fn seen(&self) -> Vec<Seen> {
        diesel::sql_query(format!(
            r#"SELECT handler, message_id::text AS message_id, exchange, routing_key, replayed, key_seq
               FROM "{}".seen ORDER BY n"#,
            self.h.schema.name()
        ))
        .load(&mut self.h.schema.connect())
        .unwrap()
    }

    /// What the handlers got of message `id`.
    fn seen_of(&self, id: Uuid) -> Vec<Seen> {
        let id = id.to_string();
        self.seen()
            .into_iter()
            .filter(|s| s.message_id == id)
            .collect()
    }

    /// What the inbox recorded for message `id`.
    fn outcome_of(&self, id: Uuid) -> Option<String> {
        diesel::sql_query(format!(
            r#"SELECT outcome FROM "{}".inbox_messages WHERE consumer = $1 AND message_id = $2::uuid"#,
            self.h.schema.name()
        ))
        .bind::<Text, _>(&self.h.name)
        .bind::<Text, _>(id.to_string())
        .get_result::<Outcome>(&mut self.h.schema.connect())
        .optional()
        .unwrap()
        .map(|o| o.outcome)
    }

    /// Messages of the consumer kept in `inbox_held` (ahead of their key).
    fn held_rows(&self) -> i64 {
        diesel::sql_query(format!(
            r#"SELECT count(*) AS n FROM "{}".inbox_held WHERE consumer = $1"#,
            self.h.schema.name()
        ))
        .bind::<Text, _>(&self.h.name)
        .get_result::<Count>(&mut self.h.schema.connect())
        .unwrap()
        .n
    }

    /// Takes the dead letters off their queue until `n` came.
    async fn dead_letters(&self, n: usize) -> Vec<lapin::message::Delivery> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut dead = self.h.dead_letters().await;
        while dead.len() < n && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            dead.extend(self.h.dead_letters().await);
        }
        dead
    }

    async fn cleanup(&self) {
        self.h.cleanup(1).await;
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        let _ = channel
            .exchange_delete(self.b.as_str().into(), ExchangeDeleteOptions::default())
            .await;
        let _ = connection.close(200, "cleaned up".into()).await;
    }
}

/// Makes a handler fail (asking for a retry) while broken.
#[derive(Default)]
struct Breaker {
    broken: AtomicBool,
    /// Calls that failed.
    failures: AtomicU32,
}

impl Breaker {
    fn working() -> Arc<Self> {
        Arc::default()
    }

    fn broken() -> Arc<Self> {
        let b = Breaker::default();
        b.broken.store(true, Ordering::SeqCst);
        Arc::new(b)
    }

    fn fix(&self) {
        self.broken.store(false, Ordering::SeqCst);
    }

    fn failures(&self) -> u32 {
        self.failures.load(Ordering::SeqCst)
    }
}

#[derive(Debug, Clone, PartialEq, QueryableByName)]
struct Seen {
    #[diesel(sql_type = Text)]
    handler: String,
    #[diesel(sql_type = Text)]
    message_id: String,
    #[diesel(sql_type = Text)]
    exchange: String,
    #[diesel(sql_type = Text)]
    routing_key: String,
    #[diesel(sql_type = Bool)]
    replayed: bool,
    #[diesel(sql_type = Nullable<BigInt>)]
    key_seq: Option<i64>,
}

#[derive(QueryableByName)]
struct Outcome {
    #[diesel(sql_type = Text)]
    outcome: String,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// The replay mark and an original place, as the replay tool would set them.
fn replay_headers(exchange: &str, routing_key: &str) -> Vec<(String, AMQPValue)> {
    vec![
        (REPLAY_HEADER.to_owned(), AMQPValue::Boolean(true)),
        (ORIGINAL_EXCHANGE_HEADER.to_owned(), text(exchange)),
        (ORIGINAL_ROUTING_KEY_HEADER.to_owned(), text(routing_key)),
    ]
}

/// An unordered message `{"n": 1}`.
fn unkeyed(routing_key: &str) -> Msg {
    Msg {
        key: None,
        routing_key: routing_key.to_owned(),
        ..Msg::keyed("unused", 1)
    }
}

fn header_str(delivery: &lapin::message::Delivery, name: &str) -> Option<String> {
    match delivery.properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}

fn message_id_of(delivery: &lapin::message::Delivery) -> Option<String> {
    delivery
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.as_str().to_owned())
}

/// (a) Published to exchange A with replay headers naming exchange B (which
/// the consumer also binds): handled once, by A's handler, as an ordinary
/// message of A (its real exchange and routing key, not marked replayed);
/// B's handler never gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_headers_on_a_published_message_do_not_reroute_it_to_another_exchange() {
    logs();
    let s = Setup::new("rf_reroute").await;
    let consumer = s
        .consumer(s.h.config(), &Breaker::working(), &Breaker::working())
        .await;
    let (shutdown, task) = spawn(&consumer);

    let forged = Msg {
        headers: replay_headers(&s.b, B_KEY),
        ..unkeyed(A_KEY)
    };
    s.h.publish(&forged).await;
    wait_until(
        "the forged message handled",
        Duration::from_secs(20),
        || !s.seen_of(forged.id).is_empty(),
    )
    .await;
    // B is live: an ordinary message of B reaches it.
    let of_b = unkeyed(B_KEY);
    s.h.publish_to(&s.b, B_KEY, &of_b).await;
    wait_until("B's own message applied", Duration::from_secs(20), || {
        !s.seen_of(of_b.id).is_empty()
    })
    .await;

    assert_eq!(
        s.seen_of(forged.id),
        [Seen {
            handler: "A".into(),
            message_id: forged.id.to_string(),
            exchange: s.a().to_owned(),
            routing_key: A_KEY.into(),
            replayed: false,
            key_seq: None,
        }],
        "applied once, by A, as a message of A"
    );
    assert_eq!(
        s.seen()
            .iter()
            .filter(|x| x.handler == "B")
            .map(|x| x.message_id.clone())
            .collect::<Vec<_>>(),
        [of_b.id.to_string()],
        "B's handler got only B's own message"
    );
    assert_eq!(s.outcome_of(forged.id).as_deref(), Some("applied"));
    let stats = consumer.stats();
    assert_eq!((stats.applied, stats.dead_lettered), (2, 0), "{stats:?}");
    assert!(s.h.dead_letters().await.is_empty());
    assert!(!task.is_finished(), "still running");
    stop(shutdown, task).await;
    s.cleanup().await;
}

/// (a, ordering) A forged replay does not get the replay's privilege of
/// being applied whatever its key's position: a message ahead of its key
/// waits (held) for the event before it, then both apply in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_headers_on_a_published_message_do_not_let_it_jump_its_key() {
    logs();
    let s = Setup::new("rf_jump").await;
    let mut config = s.h.config();
    // Longer than the test: only the missing event may release it.
    config.gap_wait = Duration::from_secs(120);
    let consumer = s
        .consumer(config, &Breaker::working(), &Breaker::working())
        .await;
    let (shutdown, task) = spawn(&consumer);

    let second = Msg {
        headers: replay_headers(s.a(), A_KEY),
        ..Msg::keyed("k", 2)
    };
    s.h.publish(&second).await;
    wait_until(
        "the forged event 2 held for event 1",
        Duration::from_secs(20),
        || s.held_rows() == 1 && consumer.stats().held >= 1,
    )
    .await;
    assert!(s.seen().is_empty(), "not applied ahead of its key");

    let first = Msg::keyed("k", 1);
    s.h.publish(&first).await;
    wait_until("both applied", Duration::from_secs(20), || {
        s.seen().len() >= 2
    })
    .await;
    let seen = s.seen();
    assert_eq!(
        seen.iter()
            .map(|x| (x.message_id.clone(), x.key_seq))
            .collect::<Vec<_>>(),
        [
            (first.id.to_string(), Some(1)),
            (second.id.to_string(), Some(2))
        ],
        "in key order"
    );
    assert!(
        seen.iter().all(|x| x.handler == "A" && !x.replayed),
        "{seen:?}"
    );
    assert_eq!(s.held_rows(), 0);
    assert!(s.h.dead_letters().await.is_empty());
    assert!(!task.is_finished(), "still running");
    stop(shutdown, task).await;
    s.cleanup().await;
}

/// (b) Published through the default exchange straight into the
/// consumer's queue, with replay headers naming exchange B, but never
/// recorded by the replay tool: not a replay, so not routed to B. It came
/// from exchange "" with the queue's name as routing key, which no handler
/// binds: dead-lettered as unknown (the default policy), no handler run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrecorded_replay_into_the_queue_is_not_honoured() {
    logs();
    let s = Setup::new("rf_unrec").await;
    let consumer = s
        .consumer(s.h.config(), &Breaker::working(), &Breaker::working())
        .await;
    let (shutdown, task) = spawn(&consumer);

    let forged = Msg {
        headers: replay_headers(&s.b, B_KEY),
        ..unkeyed(B_KEY)
    };
    s.h.publish_to("", &s.h.name, &forged).await;
    wait_until(
        "the forged message dead-lettered",
        Duration::from_secs(20),
        || consumer.stats().dead_lettered >= 1,
    )
    .await;
    // B is live: an ordinary message of B reaches it.
    let of_b = unkeyed(B_KEY);
    s.h.publish_to(&s.b, B_KEY, &of_b).await;
    wait_until("B's own message applied", Duration::from_secs(20), || {
        !s.seen_of(of_b.id).is_empty()
    })
    .await;

    assert!(
        s.seen_of(forged.id).is_empty(),
        "no handler ran it: {:?}",
        s.seen_of(forged.id)
    );
    assert_eq!(s.seen().len(), 1, "only B's own message: {:?}", s.seen());
    assert_eq!(s.outcome_of(forged.id).as_deref(), Some("dead-lettered"));
    let dead = s.dead_letters(1).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(message_id_of(&dead[0]), Some(forged.id.to_string()));
    let reason = header_str(&dead[0], REASON_HEADER).unwrap();
    assert!(
        reason.contains(&format!(
            "no handler for exchange \"\" routing key {:?}",
            s.h.name
        )),
        "handled as what it is, a message of the default exchange: {reason}"
    );
    let stats = consumer.stats();
    assert_eq!((stats.applied, stats.dead_lettered), (1, 1), "{stats:?}");
    assert!(!task.is_finished(), "still running");
    stop(shutdown, task).await;
    s.cleanup().await;
}

/// (c) The genuine path: an event of B fails `max_attempts` times and is
/// dead-lettered (its key moves on); `replay_dead_letters` records it and
/// puts it back; once B's handler works, the replay is applied exactly
/// once, by B's handler, with B's exchange and routing key, although it is
/// behind its key's position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_replay_is_applied_once_by_its_original_exchanges_handler() {
    logs();
    let s = Setup::new("rf_genuine").await;
    let config = s.h.config();
    let (a, b) = (Breaker::working(), Breaker::broken());
    let consumer = s.consumer(config.clone(), &a, &b).await;
    let (shutdown, task) = spawn(&consumer);

    let first = Msg {
        routing_key: B_KEY.into(),
        ..Msg::keyed("k", 1)
    };
    s.h.publish_to(&s.b, B_KEY, &first).await;
    wait_until("event 1 dead-lettered", Duration::from_secs(20), || {
        consumer.stats().dead_lettered >= 1
    })
    .await;
    assert_eq!(
        b.failures(),
        config.retry.max_attempts,
        "B's handler failed max_attempts times"
    );
    b.fix();
    let second = Msg {
        routing_key: B_KEY.into(),
        ..Msg::keyed("k", 2)
    };
    s.h.publish_to(&s.b, B_KEY, &second).await;
    wait_until("event 2 applied past it", Duration::from_secs(20), || {
        !s.seen_of(second.id).is_empty()
    })
    .await;
    assert!(s.seen_of(first.id).is_empty());
    assert_eq!(a.failures(), 0);

    assert_eq!(
        consumer::replay_dead_letters(&config, 10).await.unwrap(),
        1,
        "the one dead letter put back"
    );
    wait_until("the replay applied", Duration::from_secs(20), || {
        !s.seen_of(first.id).is_empty()
    })
    .await;
    assert_eq!(
        s.seen_of(first.id),
        [Seen {
            handler: "B".into(),
            message_id: first.id.to_string(),
            exchange: s.b.clone(),
            routing_key: B_KEY.into(),
            replayed: true,
            key_seq: Some(1),
        }],
        "applied once, by B's handler, as a replay of B"
    );
    assert!(
        s.seen().iter().all(|x| x.handler == "B"),
        "A's handler got nothing: {:?}",
        s.seen()
    );
    let stats = consumer.stats();
    assert_eq!((stats.applied, stats.dead_lettered), (2, 1), "{stats:?}");
    assert_eq!(s.outcome_of(first.id).as_deref(), Some("applied"));
    assert!(
        s.h.dead_letters().await.is_empty(),
        "nothing dead-lettered again"
    );
    // Nothing left to replay, so nothing is applied twice.
    assert_eq!(consumer::replay_dead_letters(&config, 10).await.unwrap(), 0);
    assert_eq!(s.seen_of(first.id).len(), 1);
    assert!(!task.is_finished(), "still running");
    stop(shutdown, task).await;
    s.cleanup().await;
}

/// (a, through the dead-letter queue) A message published to exchange A
/// with replay headers naming exchange B, which A's handler fails on until
/// it is dead-lettered, then is replayed by the operator: the replay must
/// still be a message of A, where it was published, and never reach B's
/// handler. The forged `x-original-*` headers must not become the recorded
/// original place (once they did: the dead letter kept them, and the
/// replay went to B).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_forgery_is_replayed_to_the_exchange_it_was_published_to() {
    logs();
    let s = Setup::new("rf_launder").await;
    let config = s.h.config();
    let (a, b) = (Breaker::broken(), Breaker::working());
    let consumer = s.consumer(config.clone(), &a, &b).await;
    let (shutdown, task) = spawn(&consumer);

    let forged = Msg {
        headers: replay_headers(&s.b, B_KEY),
        ..unkeyed(A_KEY)
    };
    s.h.publish(&forged).await;
    wait_until(
        "the forged message dead-lettered",
        Duration::from_secs(20),
        || consumer.stats().dead_lettered >= 1,
    )
    .await;
    assert_eq!(a.failures(), config.retry.max_attempts);
    a.fix();
    assert_eq!(consumer::replay_dead_letters(&config, 10).await.unwrap(), 1);
    wait_until("the replay handled", Duration::from_secs(20), || {
        !s.seen_of(forged.id).is_empty()
    })
    .await;
    let seen = s.seen_of(forged.id);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        (
            seen[0].handler.as_str(),
            seen[0].exchange.as_str(),
            seen[0].routing_key.as_str()
        ),
        ("A", s.a(), A_KEY),
        "replayed as a message of A, where it was published: {seen:?}"
    );
    assert_eq!(b.failures(), 0);
    stop(shutdown, task).await;
    s.cleanup().await;
}
