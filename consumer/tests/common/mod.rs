//! Fixtures for the consumer's integration tests: a migrated schema with a
//! business table, a producer exchange and consumer name of their own, a
//! publisher speaking the relay's wire format, and checks on the effects.

#![allow(dead_code, unreachable_pub)] // each test binary uses a part

use std::collections::HashMap;
use std::time::{Duration, Instant};

use consumer::{Consumer, ConsumerConfig, Envelope, HandlerError, HandlerResult};
use diesel::connection::SimpleConnection;
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel::{PgConnection, QueryableByName, RunQueryDsl};
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use serde::Deserialize;
use testkit::TestSchema;
use testkit::amqp::amqp_url;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The event the tests publish: `{"n": <key_seq>}`.
#[derive(Debug, Clone, Deserialize)]
pub struct Ev {
    pub n: i64,
}

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Msg {
    pub id: Uuid,
    pub key: Option<(String, i64)>,
    pub body: Vec<u8>,
    pub routing_key: String,
    /// Extra or replacing headers (to send malformed ones).
    pub headers: Vec<(String, AMQPValue)>,
    /// Leave out `x-key-seq` even when keyed.
    pub no_seq: bool,
    /// Route by this slot instead of the key's (a key moved to another queue).
    pub slot: Option<u16>,
}

impl Msg {
    /// A well-formed keyed event `order.v1.submitted`.
    pub fn keyed(key: &str, seq: i64) -> Self {
        Msg {
            id: Uuid::now_v7(),
            key: Some((key.to_owned(), seq)),
            body: format!(r#"{{"n":{seq}}}"#).into_bytes(),
            routing_key: "order.v1.submitted".into(),
            headers: Vec::new(),
            no_seq: false,
            slot: None,
        }
    }
}

pub struct Harness {
    pub schema: TestSchema,
    pub name: String,
    pub exchange: String,
    connection: Connection,
    channel: Channel,
}

impl Harness {
    /// A migrated schema with `effects`, and names of its own.
    pub async fn new(prefix: &str) -> Self {
        let schema = TestSchema::new(prefix);
        let outbox = outbox::Outbox::new(outbox::Config {
            schema: schema.name().to_owned(),
            ..outbox::Config::default()
        })
        .unwrap();
        let mut conn = schema.connect();
        outbox.migrate(&mut conn).unwrap();
        conn.batch_execute(
            "CREATE TABLE effects (n bigserial PRIMARY KEY, message_id uuid NOT NULL,
                                   ordering_key text, key_seq bigint)",
        )
        .unwrap();
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("RabbitMQ (run scripts/services.sh)");
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        // The producer's exchange, as the consumer declares it: publishes
        // are then returned (not fatal) until the consumer's queue is bound.
        let exchange = testkit::unique_name(&format!("{prefix}_x"));
        channel
            .exchange_declare(
                exchange.as_str().into(),
                lapin::ExchangeKind::Topic,
                lapin::options::ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        Harness {
            name: testkit::unique_name(prefix),
            exchange,
            schema,
            connection,
            channel,
        }
    }

    /// A consumer config for this test: 4 lanes, fast retries, 5 s gap wait.
    pub fn config(&self) -> ConsumerConfig {
        let mut config = ConsumerConfig::new(&self.name, &testkit::database_url(), &amqp_url());
        config.schema = self.schema.name().to_owned();
        config.lanes = 4;
        config.retry.initial = Duration::from_millis(50);
        config.retry.max_delay = Duration::from_millis(500);
        config.retry.max_attempts = 3;
        config.membership_interval = Duration::from_millis(200);
        config.shutdown_timeout = Duration::from_secs(10);
        config
    }

    /// A handler for `Ev` that records the message in `effects`.
    pub fn recorder(
        &self,
    ) -> impl Fn(&mut PgConnection, Envelope<Ev>) -> HandlerResult + Send + Sync + 'static {
        let table = format!(r#""{}".effects"#, self.schema.name());
        move |conn, e| record(conn, &table, &e)
    }

    /// The table [`Harness::recorder`] writes, for [`record_async`].
    pub fn effects_table(&self) -> String {
        format!(r#""{}".effects"#, self.schema.name())
    }

    /// Publishes `msg` to the producer exchange, waiting (up to 10 s) until
    /// the broker routes it: the consumer may still be declaring its queue.
    pub async fn publish(&self, msg: &Msg) {
        self.publish_to(&self.exchange, &msg.routing_key, msg).await;
    }

    /// Publishes `msg` to `exchange` with `routing_key`, as above.
    pub async fn publish_to(&self, exchange: &str, routing_key: &str, msg: &Msg) {
        let mut headers = FieldTable::default();
        headers.insert(msg.slot_header(), AMQPValue::Boolean(true));
        if let Some((key, seq)) = &msg.key {
            headers.insert("x-ordering-key".into(), text(key));
            if !msg.no_seq {
                headers.insert("x-key-seq".into(), AMQPValue::LongLongInt(*seq));
            }
        }
        headers.insert("x-event-version".into(), AMQPValue::LongInt(1));
        for (k, v) in &msg.headers {
            headers.insert(k.as_str().into(), v.clone());
        }
        let properties = BasicProperties::default()
            .with_message_id(msg.id.to_string().into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_type("order.submitted".into())
            .with_headers(headers);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let confirm = self
                .channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &msg.body,
                    properties.clone(),
                )
                .await
                .unwrap()
                .await
                .unwrap();
            match confirm {
                Confirmation::Ack(None) => return,
                _ if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => panic!("publish to {exchange:?} not routed: {other:?}"),
            }
        }
    }

    /// Publishes many without waiting for each confirm (they are pipelined);
    /// the consumer's queue must exist already (publish one first).
    pub async fn publish_all(&self, msgs: &[Msg]) {
        for chunk in msgs.chunks(500) {
            let mut confirms = Vec::new();
            for msg in chunk {
                let mut headers = FieldTable::default();
                headers.insert(msg.slot_header(), AMQPValue::Boolean(true));
                if let Some((key, seq)) = &msg.key {
                    headers.insert("x-ordering-key".into(), text(key));
                    headers.insert("x-key-seq".into(), AMQPValue::LongLongInt(*seq));
                }
                for (k, v) in &msg.headers {
                    headers.insert(k.as_str().into(), v.clone());
                }
                let properties = BasicProperties::default()
                    .with_message_id(msg.id.to_string().into())
                    .with_delivery_mode(2)
                    .with_headers(headers);
                confirms.push(
                    self.channel
                        .basic_publish(
                            self.exchange.as_str().into(),
                            msg.routing_key.as_str().into(),
                            BasicPublishOptions {
                                mandatory: true,
                                ..BasicPublishOptions::default()
                            },
                            &msg.body,
                            properties,
                        )
                        .await
                        .unwrap(),
                );
            }
            for confirm in confirms {
                assert_eq!(confirm.await.unwrap(), Confirmation::Ack(None), "routed");
            }
        }
    }

    /// What the handlers wrote, in commit order.
    pub fn effects(&self) -> Vec<Effect> {
        diesel::sql_query(format!(
            r#"SELECT message_id::text AS message_id, ordering_key, key_seq FROM "{}".effects ORDER BY n"#,
            self.schema.name()
        ))
        .load(&mut self.schema.connect())
        .unwrap()
    }

    /// Takes every message off the dead-letter queue.
    pub async fn dead_letters(&self) -> Vec<lapin::message::Delivery> {
        let channel = self.connection.create_channel().await.unwrap();
        let mut out = Vec::new();
        while let Some(m) = channel
            .basic_get(
                format!("{}.dead-letters", self.name).as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
        {
            out.push(m.delivery);
        }
        out
    }

    /// Deletes the test's queues and exchanges from the broker.
    pub async fn cleanup(&self, partitions: u16) {
        let channel = self.connection.create_channel().await.unwrap();
        let mut queues = vec![self.name.clone(), format!("{}.dead-letters", self.name)];
        queues.extend((0..partitions).map(|i| format!("{}.{i}", self.name)));
        for queue in queues {
            let _ = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for exchange in [
            format!("{}.slots", self.name),
            format!("{}.unslotted", self.name),
            self.exchange.clone(),
        ] {
            let _ = channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
    }
}

impl Msg {
    /// The slot header the relay would stamp (or the one `slot` forces).
    fn slot_header(&self) -> lapin::types::ShortString {
        let slot = self.slot.unwrap_or_else(|| match &self.key {
            Some((key, _)) => outbox::wire::slot(key),
            None => outbox::wire::slot(&self.id.to_string()),
        });
        outbox::wire::slot_header(slot).as_str().into()
    }
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// Records an applied message in `table`.
pub fn record(conn: &mut PgConnection, table: &str, e: &Envelope<Ev>) -> HandlerResult {
    diesel::sql_query(format!(
        "INSERT INTO {table} (message_id, ordering_key, key_seq) VALUES ($1::uuid, $2, $3)"
    ))
    .bind::<Text, _>(e.meta.message_id.to_string())
    .bind::<Nullable<Text>, _>(e.meta.ordering_key.as_deref())
    .bind::<Nullable<BigInt>, _>(e.meta.key_seq)
    .execute(conn)
    .map(|_| ())
    .map_err(|err| HandlerError::Retry {
        after: None,
        reason: err.to_string(),
    })
}

/// [`record`] on a diesel-async connection, for async handlers.
#[cfg(feature = "async")]
pub async fn record_async(
    conn: &mut diesel_async::AsyncPgConnection,
    table: &str,
    e: Envelope<Ev>,
) -> HandlerResult {
    diesel_async::RunQueryDsl::execute(
        diesel::sql_query(format!(
            "INSERT INTO {table} (message_id, ordering_key, key_seq) VALUES ($1::uuid, $2, $3)"
        ))
        .bind::<Text, _>(e.meta.message_id.to_string())
        .bind::<Nullable<Text>, _>(e.meta.ordering_key)
        .bind::<Nullable<BigInt>, _>(e.meta.key_seq),
        conn,
    )
    .await
    .map(|_| ())
    .map_err(|err| HandlerError::Retry {
        after: None,
        reason: err.to_string(),
    })
}

#[derive(Debug, Clone, QueryableByName)]
pub struct Effect {
    #[diesel(sql_type = Text)]
    pub message_id: String,
    #[diesel(sql_type = Nullable<Text>)]
    pub ordering_key: Option<String>,
    #[diesel(sql_type = Nullable<BigInt>)]
    pub key_seq: Option<i64>,
}

/// Every message id at most once, and each key's sequence strictly rising
/// in commit order.
pub fn assert_once_and_in_order(effects: &[Effect]) {
    let mut seen = HashMap::new();
    for e in effects {
        *seen.entry(e.message_id.as_str()).or_insert(0) += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "applied more than once: {twice:?}");
    let mut last: HashMap<&str, i64> = HashMap::new();
    for e in effects {
        if let (Some(k), Some(s)) = (e.ordering_key.as_deref(), e.key_seq) {
            let prev = last.insert(k, s).unwrap_or(0);
            assert!(s > prev, "key {k}: {s} applied after {prev}");
        }
    }
}

/// Runs `consumer` on its own task until the returned token is cancelled.
pub fn spawn(consumer: &Consumer) -> (CancellationToken, JoinHandle<consumer::Result<()>>) {
    let shutdown = CancellationToken::new();
    let task = {
        let consumer = consumer.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { consumer.run(shutdown).await })
    };
    (shutdown, task)
}

/// Stops a consumer started with [`spawn`] and checks it ended cleanly.
pub async fn stop(shutdown: CancellationToken, task: JoinHandle<consumer::Result<()>>) {
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("consumer stops within 30 s")
        .unwrap()
        .expect("consumer ended without error");
}

/// Polls `condition` until it holds, panicking with `what` after `timeout`.
pub async fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The consumer's log, in the output of the test that made it (shown when
/// it fails, or with `--nocapture`).
pub fn logs() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // The broker returning the first publishes (the queue not yet bound)
    // is lapin's warning, not the consumer's.
    let _ = tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_test_writer())
        .with(
            tracing_subscriber::filter::Targets::new()
                .with_target("consumer", tracing::Level::INFO)
                .with_target("lapin", tracing::Level::ERROR),
        )
        .try_init();
}
