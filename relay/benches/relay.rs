//! Relay benchmark: how fast the relay ships a backlog compared with a plain
//! publisher, how long a committed event takes to reach a consumer, and how
//! much memory the relay needs.
//!
//! Run it with (PostgreSQL and RabbitMQ up, see `scripts/services.sh`;
//! `DATABASE_URL` and `AMQP_URL` point it elsewhere):
//!
//! ```sh
//! cargo bench -p relay --bench relay
//! ```
//!
//! It prints, in one run of about four minutes:
//!
//! 1. **Baseline**: a plain lapin publisher on a confirm-mode channel
//!    (`mandatory`, a sliding window of `batch_size` unconfirmed messages)
//!    sending [`MESSAGES`] messages of [`PAYLOAD_BYTES`] bytes of JSON with
//!    the relay's properties and headers: what the broker and client can do
//!    without a database in the way. Then the same over one connection per
//!    relay worker, the like-for-like ceiling.
//! 2. **Relay**: the same number of events enqueued as a backlog in a fresh
//!    outbox schema, then the time from starting [`relay::Relay`] (default
//!    config: 4 workers, batches of 500, LISTEN on) until all of them are in
//!    the queue; msg/s and the ratio to the baseline.
//! 3. **Latency**: one event per transaction at [`LATENCY_RATE`]/s for
//!    [`LATENCY_SECONDS`] s ([`PRODUCERS`] connections) with a relay running
//!    and a consumer on the queue; commit-to-delivery p50, p99 and max.
//!    It starts after a `VACUUM` of the outbox tables, so it measures the
//!    steady state rather than autovacuum cleaning phase 2's deleted rows.
//! 4. **Memory**: VmRSS and VmHWM of this process around phase 2 (the relay
//!    runs in-process, so the figure includes the bench's own data), and,
//!    when the `outbox-relay` binary is built with its `run` command, the
//!    peak RSS of that sidecar draining the same backlog.
//! 5. **NOTIFY cost**: enqueue commits/s of [`NOTIFY_PRODUCERS`] concurrent
//!    connections with `outbox_settings.notify` on and off (no relay running).
//!
//! `RELAY_BENCH_LATENCY_ONLY=1` runs phase 3 alone.
//!
//! Every phase uses the same exchange and a transient queue, purged in
//! between; the schema and the broker objects are removed at the end.

use std::collections::{HashMap, VecDeque};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection};
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection as AmqpConnection, ConnectionProperties,
    Consumer, ExchangeKind,
};
use outbox::{Message, Outbox};
use relay::{Relay, RelayConfig};
use testkit::TestSchema;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

/// Messages per throughput phase.
const MESSAGES: usize = 100_000;
/// Size of every message body, in bytes of JSON.
const PAYLOAD_BYTES: usize = 512;
/// Distinct ordering keys the events are spread over.
const KEYS: usize = 100;
/// Events per transaction when enqueueing the backlog.
const ENQUEUE_CHUNK: usize = 1_000;
/// Events per second committed in the latency phase.
const LATENCY_RATE: u32 = 1_000;
/// Connections committing the latency events, each on its own keys: one
/// connection commits strictly one after another and, sharing the CPU with
/// the relay and the broker, falls short of the rate on a small machine.
const PRODUCERS: usize = 2;
// Producer p takes events p, p + PRODUCERS, ..; its keys are its own only
// when the keys split evenly.
const _: () = assert!(KEYS.is_multiple_of(PRODUCERS));
/// Length of the latency phase.
const LATENCY_SECONDS: u32 = 10;
/// How long any phase may take to see its messages in the queue.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
/// How often the queue depth is polled; bounds the timing error of phase 2.
const DEPTH_POLL: Duration = Duration::from_millis(10);
/// A transient queue, so both phases measure the relay path rather than the
/// broker's disk (persistent messages on a transient queue stay in memory).
const DURABLE_QUEUE: bool = false;
const ROUTING_KEY: &str = "bench.v1.created";
const EVENT_TYPE: &str = "bench.created";

#[tokio::main]
async fn main() -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let window = RelayConfig::default().batch_size as usize;
    let payload = payload();
    println!(
        "relay bench: {MESSAGES} messages of {PAYLOAD_BYTES} B, {KEYS} keys, window/batch {window}, \
         {} queue, {cores} cores",
        if DURABLE_QUEUE {
            "durable"
        } else {
            "transient"
        }
    );

    let broker = Broker::declare().await?;
    let (schema, outbox) = outbox_schema()?;

    if std::env::var_os("RELAY_BENCH_LATENCY_ONLY").is_some() {
        // For working on latency: phase 3 alone, in about 15 s.
        let latency = latency(&broker, &schema, &outbox, &payload).await?;
        println!("\n[3] latency only: {}", latency.describe());
        broker.delete().await?;
        return Ok(());
    }

    let baseline = publish_baseline(&broker, &payload, window, 1).await?;
    println!(
        "\n[1] baseline (lapin, 1 channel, confirms, mandatory, window {window}): {}",
        baseline.describe()
    );
    broker.purge().await?;
    // The relay publishes on one channel per worker, so a single channel
    // understates what the broker takes; this is the like-for-like ceiling.
    let workers = RelayConfig::default().workers as usize;
    let parallel = publish_baseline(&broker, &payload, window, workers).await?;
    println!(
        "    baseline ({workers} connections/channels, window {window} each):  {}",
        parallel.describe()
    );
    broker.purge().await?;

    let enqueued = enqueue_backlog(&schema, &outbox, &broker.exchange, &payload).await?;
    println!(
        "\n[2] relay backlog: enqueued {MESSAGES} events in {:.2} s (not timed below)",
        enqueued.as_secs_f64()
    );
    let before = Memory::read();
    let relay = relay_backlog(&broker, &schema).await?;
    let after = Memory::read();
    let ratio = relay.rate() / baseline.rate();
    println!(
        "    relay (4 workers, batch {window}, listen): {}",
        relay.describe()
    );
    println!(
        "    ratio relay/baseline: {ratio:.2} (1 channel), {:.2} ({workers} channels)",
        relay.rate() / parallel.rate()
    );
    broker.purge().await?;
    // Phase 2 left 100,000 dead rows behind. Phase 3 is about a steady
    // 1,000 events/s, so let the cleanup autovacuum would soon do run
    // first rather than in the middle of the measurement.
    tokio::task::block_in_place(|| {
        schema.connect().batch_execute(&format!(
            r#"VACUUM ANALYZE "{s}".outbox_messages, "{s}".outbox_keys"#,
            s = schema.name()
        ))
    })
    .context("vacuuming after phase 2")?;

    let latency = latency(&broker, &schema, &outbox, &payload).await?;
    println!(
        "\n[3] latency, commit -> consumer delivery ({LATENCY_RATE}/s target over {PRODUCERS} connections, one event per transaction):"
    );
    println!("    {}", latency.describe());
    broker.purge().await?;

    println!(
        "\n[4] memory after phase 2, bench process (relay in-process, includes bench's own data):"
    );
    println!(
        "    VmRSS before relay {}",
        Memory::show(before.map(|m| m.rss_kb))
    );
    println!(
        "    VmRSS after relay  {}",
        Memory::show(after.map(|m| m.rss_kb))
    );
    println!(
        "    VmHWM (peak)       {}",
        Memory::show(after.map(|m| m.hwm_kb))
    );

    println!("\n[4b] memory, outbox-relay sidecar draining {MESSAGES} events:");
    match sidecar(&broker, &schema, &outbox, &payload).await? {
        Ok(run) => println!(
            "    peak RSS (VmHWM) {}, drained at {:.0} msg/s (includes process start)",
            Memory::show(Some(run.hwm_kb)),
            run.drain.rate()
        ),
        Err(skipped) => println!("    skipped: {skipped}"),
    }

    // Runs without a relay, so the only difference is the NOTIFY itself.
    let notify =
        tokio::task::block_in_place(|| notify_cost(&schema, &outbox, &broker.exchange, &payload))?;
    println!(
        "\n[5] NOTIFY cost, {NOTIFY_PRODUCERS} connections committing one event per transaction for {} s each way:",
        NOTIFY_RUN.as_secs()
    );
    println!(
        "    notify on {:.0} commits/s, notify off {:.0} commits/s: on/off {:.2}",
        notify.on,
        notify.off,
        notify.on / notify.off
    );

    broker.delete().await?;
    drop(schema);

    println!(
        "\nrelay bench ({cores} cores): baseline {:.0} msg/s ({workers} channels: {:.0}), relay {:.0} msg/s, \
         ratio {ratio:.2}; latency p50 {:.1} ms p99 {:.1} ms; \
         rss {} (bench process peak, relay in-process); notify on/off {:.2}",
        baseline.rate(),
        parallel.rate(),
        relay.rate(),
        latency.p50_ms,
        latency.p99_ms,
        Memory::show(after.map(|m| m.hwm_kb)),
        notify.on / notify.off,
    );
    Ok(())
}

/// Producer connections in the NOTIFY phase: many concurrent committers is
/// where NOTIFY's commit-time lock shows.
const NOTIFY_PRODUCERS: usize = 8;
/// How long each half of the NOTIFY phase runs.
const NOTIFY_RUN: Duration = Duration::from_secs(4);

/// Commit rates with `outbox_settings.notify` on and off.
struct NotifyCost {
    on: f64,
    off: f64,
}

/// Measures enqueue commits/s with NOTIFY on, then off, and empties the
/// outbox afterwards. Each producer uses keys of its own, so key locks do
/// not serialise them: only NOTIFY's commit-time queue lock can.
fn notify_cost(
    schema: &TestSchema,
    outbox: &Outbox,
    exchange: &str,
    payload: &[u8],
) -> Result<NotifyCost> {
    let mut conn = schema.connect();
    let mut rate = |notify: bool| -> Result<f64> {
        conn.batch_execute(&format!("UPDATE outbox_settings SET notify = {notify}"))
            .context("switching NOTIFY")?;
        let commits: Vec<usize> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..NOTIFY_PRODUCERS)
                .map(|producer| {
                    scope.spawn(move || -> Result<usize> {
                        let mut conn = schema.connect();
                        let deadline = Instant::now() + NOTIFY_RUN;
                        let mut done = 0;
                        while Instant::now() < deadline {
                            let message = event(exchange, producer * 1_000 + done % 10, payload)?;
                            conn.transaction(|c| outbox.enqueue_message(c, &message))
                                .context("enqueueing")?;
                            done += 1;
                        }
                        Ok(done)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("producer thread"))
                .collect::<Result<Vec<_>>>()
        })?;
        Ok(commits.iter().sum::<usize>() as f64 / NOTIFY_RUN.as_secs_f64())
    };
    let on = rate(true)?;
    let off = rate(false)?;
    conn.batch_execute("UPDATE outbox_settings SET notify = true; DELETE FROM outbox_messages; DELETE FROM outbox_keys")
        .context("emptying the outbox")?;
    Ok(NotifyCost { on, off })
}

/// A body of exactly [`PAYLOAD_BYTES`] of JSON, padded with a string field.
fn payload() -> Vec<u8> {
    let body = |pad: &str| {
        serde_json::to_vec(&serde_json::json!({
            "order_id": Uuid::nil(),
            "total_cents": 4200,
            "pad": pad,
        }))
        .expect("a JSON value serializes")
    };
    let pad = "x".repeat(PAYLOAD_BYTES - body("").len());
    let bytes = body(&pad);
    assert_eq!(bytes.len(), PAYLOAD_BYTES, "payload size");
    bytes
}

/// An event for ordering key `key` carrying `payload`.
fn event(exchange: &str, key: usize, payload: &[u8]) -> Result<Message> {
    Message::builder(exchange, ROUTING_KEY, EVENT_TYPE)
        .ordering_key(format!("key-{key}"))
        .raw_json(payload.to_vec())
        .build()
        .context("building a bench event")
}

/// A fresh schema with the outbox installed.
fn outbox_schema() -> Result<(TestSchema, Outbox)> {
    let schema = TestSchema::new("relay_bench");
    let outbox = Outbox::new(outbox::Config {
        schema: schema.name().to_owned(),
        ..outbox::Config::default()
    })
    .context("outbox config")?;
    outbox
        .migrate(&mut schema.connect())
        .context("installing the outbox")?;
    Ok((schema, outbox))
}

/// The relay's default config pointed at `schema`.
fn relay_config(schema: &TestSchema) -> RelayConfig {
    RelayConfig {
        database_url: testkit::database_url(),
        amqp_url: testkit::amqp::amqp_url(),
        schema: schema.name().to_owned(),
        ..RelayConfig::default()
    }
}

/// Messages over time.
#[derive(Clone, Copy)]
struct Throughput {
    messages: usize,
    elapsed: Duration,
}

impl Throughput {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64()
    }

    fn describe(&self) -> String {
        format!(
            "{} msgs in {:.2} s = {:.0} msg/s",
            self.messages,
            self.elapsed.as_secs_f64(),
            self.rate()
        )
    }
}

/// One exchange and queue for the whole bench, and a connection to manage
/// and publish to them.
struct Broker {
    connection: AmqpConnection,
    channel: Channel,
    exchange: String,
    queue: String,
}

impl Broker {
    /// Declares a topic exchange and a queue bound to it with `#`.
    async fn declare() -> Result<Self> {
        let exchange = testkit::unique_name("relay_bench");
        let queue = format!("{exchange}.q");
        let connection =
            AmqpConnection::connect(&testkit::amqp::amqp_url(), ConnectionProperties::default())
                .await
                .context("connecting to RabbitMQ (is it up? scripts/services.sh)")?;
        let channel = connection.create_channel().await?;
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("declaring the bench exchange")?;
        // Should the bench die half-way, the queue goes away on its own.
        let mut args = FieldTable::default();
        args.insert("x-expires".into(), AMQPValue::LongInt(600_000));
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: DURABLE_QUEUE,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await
            .context("declaring the bench queue")?;
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("binding the bench queue")?;
        Ok(Broker {
            connection,
            channel,
            exchange,
            queue,
        })
    }

    /// Messages in the queue now (a passive declare).
    async fn depth(&self) -> Result<usize> {
        let queue = self
            .channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context("reading the queue depth")?;
        Ok(queue.message_count() as usize)
    }

    /// Waits until the queue holds `count` messages.
    async fn wait_for_depth(&self, count: usize) -> Result<()> {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            let depth = self.depth().await?;
            if depth >= count {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "only {depth} of {count} messages reached the queue within {DRAIN_TIMEOUT:?}"
            );
            tokio::time::sleep(DEPTH_POLL).await;
        }
    }

    async fn purge(&self) -> Result<()> {
        self.channel
            .queue_purge(self.queue.as_str().into(), QueuePurgeOptions::default())
            .await
            .context("purging the bench queue")?;
        Ok(())
    }

    /// A consumer on the queue that needs no acks, to keep the consumer's
    /// own cost out of the latency.
    async fn consume(&self) -> Result<Consumer> {
        let channel = self.connection.create_channel().await?;
        channel
            .basic_consume(
                self.queue.as_str().into(),
                testkit::unique_name("relay_bench_consumer").into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context("consuming the bench queue")
    }

    async fn delete(self) -> Result<()> {
        self.channel
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .context("deleting the bench queue")?;
        self.channel
            .exchange_delete(
                self.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await
            .context("deleting the bench exchange")?;
        let _ = self.connection.close(200, "bench done".into()).await;
        Ok(())
    }
}

/// Phase 1: [`MESSAGES`] split over `publishers`, each on a connection and
/// confirm-mode channel of its own as a relay worker has, with at most
/// `window` unconfirmed. The properties match the relay's wire format so
/// the broker does the same work per message.
async fn publish_baseline(
    broker: &Broker,
    payload: &[u8],
    window: usize,
    publishers: usize,
) -> Result<Throughput> {
    ensure!(
        MESSAGES.is_multiple_of(publishers),
        "{MESSAGES} messages do not split over {publishers} publishers"
    );
    let share = MESSAGES / publishers;
    let mut connections = Vec::with_capacity(publishers);
    for _ in 0..publishers {
        connections.push(confirm_channel().await?);
    }
    let started = Instant::now();
    let tasks: Vec<_> = connections
        .iter()
        .enumerate()
        .map(|(p, (_, channel))| {
            let (channel, exchange, payload) =
                (channel.clone(), broker.exchange.clone(), payload.to_vec());
            let first = p * share;
            tokio::spawn(async move {
                publish_windowed(&channel, &exchange, &payload, window, first..first + share).await
            })
        })
        .collect();
    for task in tasks {
        task.await.context("a baseline publisher panicked")??;
    }
    let elapsed = started.elapsed();
    for (connection, _) in connections {
        let _ = connection.close(200, "baseline done".into()).await;
    }
    let depth = broker.depth().await?;
    ensure!(
        depth == MESSAGES,
        "baseline: {depth} of {MESSAGES} in the queue"
    );
    Ok(Throughput {
        messages: MESSAGES,
        elapsed,
    })
}

/// A connection of its own with a channel in confirm mode.
async fn confirm_channel() -> Result<(AmqpConnection, Channel)> {
    let connection =
        AmqpConnection::connect(&testkit::amqp::amqp_url(), ConnectionProperties::default())
            .await
            .context("connecting a baseline publisher")?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .context("enabling publisher confirms")?;
    Ok((connection, channel))
}

/// Publishes messages `range`, waiting for the oldest confirm whenever
/// `window` are unconfirmed, then for the rest.
async fn publish_windowed(
    channel: &Channel,
    exchange: &str,
    payload: &[u8],
    window: usize,
    range: std::ops::Range<usize>,
) -> Result<()> {
    let mut in_flight = VecDeque::with_capacity(window);
    for i in range {
        if in_flight.len() == window {
            let oldest = in_flight.pop_front().expect("the window is full");
            expect_ack(oldest).await?;
        }
        let confirm = channel
            .basic_publish(
                exchange.into(),
                ROUTING_KEY.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                payload,
                wire_properties(exchange, i),
            )
            .await
            .context("baseline publish")?;
        in_flight.push_back(confirm);
    }
    for confirm in in_flight {
        expect_ack(confirm).await?;
    }
    Ok(())
}

/// Properties and headers as the relay sends them (see `relay::wire`).
fn wire_properties(exchange: &str, i: usize) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        relay::wire::ORDERING_KEY_HEADER.into(),
        AMQPValue::LongString(LongString::from(format!("key-{}", i % KEYS))),
    );
    headers.insert(
        relay::wire::KEY_SEQ_HEADER.into(),
        AMQPValue::LongLongInt((i / KEYS + 1) as i64),
    );
    headers.insert(
        relay::wire::EVENT_VERSION_HEADER.into(),
        AMQPValue::LongInt(1),
    );
    BasicProperties::default()
        .with_message_id(Uuid::now_v7().to_string().into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_timestamp(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        )
        .with_type(EVENT_TYPE.into())
        .with_app_id(exchange.into())
        .with_headers(headers)
}

/// Fails unless the broker acked the message and did not return it.
async fn expect_ack(confirm: impl Future<Output = lapin::Result<Confirmation>>) -> Result<()> {
    match confirm.await.context("waiting for a confirm")? {
        Confirmation::Ack(None) => Ok(()),
        other => bail!("baseline message not confirmed: {other:?}"),
    }
}

/// Phase 2, untimed part: [`MESSAGES`] events, [`ENQUEUE_CHUNK`] per
/// transaction, keys interleaved as real traffic does.
async fn enqueue_backlog(
    schema: &TestSchema,
    outbox: &Outbox,
    exchange: &str,
    payload: &[u8],
) -> Result<Duration> {
    let conn = schema.connect();
    let (outbox, exchange, payload) = (outbox.clone(), exchange.to_owned(), payload.to_vec());
    tokio::task::spawn_blocking(move || write_backlog(conn, &outbox, &exchange, &payload))
        .await
        .context("the enqueue thread panicked")?
}

fn write_backlog(
    mut conn: PgConnection,
    outbox: &Outbox,
    exchange: &str,
    payload: &[u8],
) -> Result<Duration> {
    let started = Instant::now();
    for chunk in 0..MESSAGES.div_ceil(ENQUEUE_CHUNK) {
        let first = chunk * ENQUEUE_CHUNK;
        let messages = (first..MESSAGES.min(first + ENQUEUE_CHUNK))
            .map(|i| event(exchange, i % KEYS, payload))
            .collect::<Result<Vec<_>>>()?;
        conn.transaction(|conn| outbox.enqueue_batch(conn, &messages))
            .context("enqueueing the backlog")?;
    }
    Ok(started.elapsed())
}

/// Phase 2, timed part: from starting a relay until the whole backlog is
/// in the queue.
async fn relay_backlog(broker: &Broker, schema: &TestSchema) -> Result<Throughput> {
    let started = Instant::now();
    let relay = Running::start(relay_config(schema))?;
    broker.wait_for_depth(MESSAGES).await?;
    let elapsed = started.elapsed();
    relay.stop().await?;
    Ok(Throughput {
        messages: MESSAGES,
        elapsed,
    })
}

/// A relay running in this process.
struct Running {
    stop: oneshot::Sender<()>,
    handle: JoinHandle<relay::Result<()>>,
    health: Arc<relay::health::Health>,
}

impl Running {
    fn start(config: RelayConfig) -> Result<Self> {
        let relay = Relay::new(config).context("relay config")?;
        let health = relay.health();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(relay.run(async {
            let _ = stopped.await;
        }));
        Ok(Running {
            stop,
            handle,
            health,
        })
    }

    /// Waits until every worker has its database connection and channel.
    async fn ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(self.health.database_up() && self.health.broker_up()) {
            ensure!(Instant::now() < deadline, "relay not ready within 10 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .context("relay did not stop within 30 s")?
            .context("relay task panicked")?
            .context("relay failed")
    }
}

/// Commit-to-delivery latencies of phase 3.
struct Latency {
    committed: usize,
    measured: usize,
    achieved_rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl Latency {
    fn describe(&self) -> String {
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; measured {} of {} committed ({:.0}/s achieved)",
            self.p50_ms,
            self.p99_ms,
            self.max_ms,
            self.measured,
            self.committed,
            self.achieved_rate
        )
    }
}

/// Phase 3: paced producers against a running relay and a consumer.
async fn latency(
    broker: &Broker,
    schema: &TestSchema,
    outbox: &Outbox,
    payload: &[u8],
) -> Result<Latency> {
    let consumer = broker.consume().await?;
    let relay = Running::start(relay_config(schema))?;
    relay.ready().await?;
    // The LISTEN connection has no readiness signal of its own; give it a
    // moment so the first events are not left to the 1 s poll.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (expected_tx, expected_rx) = watch::channel(None);
    let collector = tokio::spawn(collect_deliveries(consumer, expected_rx));
    let started = Instant::now();
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|producer| {
            let conn = schema.connect();
            let (outbox, exchange, payload) =
                (outbox.clone(), broker.exchange.clone(), payload.to_vec());
            tokio::task::spawn_blocking(move || {
                produce_paced(conn, &outbox, &exchange, &payload, producer, started)
            })
        })
        .collect();
    let mut commits = HashMap::new();
    for producer in producers {
        commits.extend(producer.await.context("a producer thread panicked")??);
    }
    let achieved_rate = commits.len() as f64 / started.elapsed().as_secs_f64();
    let _ = expected_tx.send(Some(commits.len()));
    let deliveries = collector.await.context("the consumer task panicked")??;
    relay.stop().await?;
    Ok(latencies(&commits, &deliveries, achieved_rate))
}

/// Commits producer `producer`'s share of the schedule (every
/// [`PRODUCERS`]th event from `started`), one event per transaction,
/// catching up when behind, and records when each commit returned.
fn produce_paced(
    mut conn: PgConnection,
    outbox: &Outbox,
    exchange: &str,
    payload: &[u8],
    producer: usize,
    started: Instant,
) -> Result<HashMap<Uuid, Instant>> {
    let total = (LATENCY_RATE * LATENCY_SECONDS) as usize;
    let period = Duration::from_secs(1) / LATENCY_RATE;
    let mut commits = HashMap::with_capacity(total / PRODUCERS);
    for i in (producer..total).step_by(PRODUCERS) {
        let due = started + period * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let message = event(exchange, i % KEYS, payload)?;
        let enqueued = conn
            .transaction(|conn| outbox.enqueue_message(conn, &message))
            .context("enqueueing a latency event")?;
        commits.insert(enqueued.id, Instant::now());
    }
    Ok(commits)
}

/// Records when each message arrives, until `expected` says how many were
/// sent and that many arrived, or nothing more comes for a while.
async fn collect_deliveries(
    mut consumer: Consumer,
    mut expected: watch::Receiver<Option<usize>>,
) -> Result<Vec<(Uuid, Instant)>> {
    let quiet = Duration::from_secs(10);
    let mut received = Vec::new();
    loop {
        let wanted = *expected.borrow_and_update();
        let next = match wanted {
            Some(n) if received.len() >= n => break,
            // Everything is sent: stop once the stream stays quiet.
            Some(_) => match tokio::time::timeout(quiet, consumer.next()).await {
                Ok(next) => next,
                Err(_) => break,
            },
            None => tokio::select! {
                next = consumer.next() => next,
                changed = expected.changed() => {
                    changed.context("the producer side went away")?;
                    continue;
                }
            },
        };
        let at = Instant::now();
        let delivery = next
            .context("the consumer stream ended")?
            .context("consuming")?;
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .and_then(|id| Uuid::parse_str(id.as_str()).ok());
        if let Some(id) = id {
            received.push((id, at));
        }
    }
    Ok(received)
}

/// Pairs commits with first deliveries (duplicates are ignored).
fn latencies(
    commits: &HashMap<Uuid, Instant>,
    deliveries: &[(Uuid, Instant)],
    achieved_rate: f64,
) -> Latency {
    let mut seen = std::collections::HashSet::new();
    let mut millis: Vec<f64> = deliveries
        .iter()
        .filter(|(id, _)| seen.insert(*id))
        .filter_map(|(id, at)| {
            let committed = commits.get(id)?;
            Some(at.saturating_duration_since(*committed).as_secs_f64() * 1e3)
        })
        .collect();
    millis.sort_by(f64::total_cmp);
    let percentile = |q: f64| {
        let rank = ((q * millis.len() as f64).ceil() as usize).max(1);
        millis.get(rank - 1).copied().unwrap_or(f64::NAN)
    };
    Latency {
        committed: commits.len(),
        measured: millis.len(),
        achieved_rate,
        p50_ms: percentile(0.50),
        p99_ms: percentile(0.99),
        max_ms: millis.last().copied().unwrap_or(f64::NAN),
    }
}

/// Resident memory of a process, from `/proc/<pid>/status`.
#[derive(Clone, Copy)]
struct Memory {
    rss_kb: u64,
    hwm_kb: u64,
}

impl Memory {
    /// This process's figures; `None` where `/proc` is missing.
    fn read() -> Option<Self> {
        Self::of("self")
    }

    fn of(pid: &str) -> Option<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        };
        Some(Memory {
            rss_kb: field("VmRSS:")?,
            hwm_kb: field("VmHWM:")?,
        })
    }

    fn show(kb: Option<u64>) -> String {
        kb.map_or_else(
            || "n/a".to_owned(),
            |kb| format!("{:.1} MB", kb as f64 / 1024.0),
        )
    }
}

/// What the sidecar run gave.
struct SidecarRun {
    hwm_kb: u64,
    drain: Throughput,
}

/// Phase 4b: the `outbox-relay` binary draining a backlog, for an RSS
/// figure free of the bench's own data. `Ok(Err(reason))` when the binary
/// is not usable yet (it is built beside this bench).
async fn sidecar(
    broker: &Broker,
    schema: &TestSchema,
    outbox: &Outbox,
    payload: &[u8],
) -> Result<std::result::Result<SidecarRun, String>> {
    let binary = env!("CARGO_BIN_EXE_outbox-relay");
    let help = Command::new(binary)
        .arg("--help")
        .output()
        .with_context(|| format!("running {binary} --help"))?;
    let lists_run = String::from_utf8_lossy(&help.stdout)
        .lines()
        .any(|line| line.trim_start().starts_with("run "));
    if !lists_run {
        return Ok(Err(format!("{binary} --help lists no `run` command")));
    }
    enqueue_backlog(schema, outbox, &broker.exchange, payload).await?;
    let database_url = testkit::database_url();
    let amqp_url = testkit::amqp::amqp_url();
    // Given explicitly, so `OUTBOX_RELAY_*` variables in the environment do
    // not change what is measured.
    let defaults = RelayConfig::default();
    let (batch_size, workers) = (
        defaults.batch_size.to_string(),
        defaults.workers.to_string(),
    );
    let started = Instant::now();
    let mut child = Command::new(binary)
        .args(["--database-url", &database_url, "--schema", schema.name()])
        .args(["run", "--amqp-url", &amqp_url, "--http-addr", "127.0.0.1:0"])
        .args(["--batch-size", &batch_size, "--workers", &workers])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {binary}"))?;
    let pid = child.id().to_string();
    let outcome = watch_sidecar(broker, &mut child, &pid, started).await;
    // The rows are confirmed by now (or the run failed): a hard stop loses
    // nothing the bench needs, and the schema is dropped after.
    let _ = child.kill();
    let _ = child.wait();
    broker.purge().await?;
    outcome
}

/// Waits for the sidecar to fill the queue, noting its peak RSS.
async fn watch_sidecar(
    broker: &Broker,
    child: &mut std::process::Child,
    pid: &str,
    started: Instant,
) -> Result<std::result::Result<SidecarRun, String>> {
    let deadline = started + DRAIN_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().context("polling the sidecar")? {
            return Ok(Err(format!("outbox-relay exited early with {status}")));
        }
        if broker.depth().await? >= MESSAGES {
            let elapsed = started.elapsed();
            return Ok(Memory::of(pid)
                .map(|m| SidecarRun {
                    hwm_kb: m.hwm_kb,
                    drain: Throughput {
                        messages: MESSAGES,
                        elapsed,
                    },
                })
                .ok_or_else(|| "cannot read the sidecar's /proc status".to_owned()));
        }
        if Instant::now() > deadline {
            return Ok(Err(format!(
                "outbox-relay did not drain {MESSAGES} events within {DRAIN_TIMEOUT:?}"
            )));
        }
        tokio::time::sleep(DEPTH_POLL).await;
    }
}
