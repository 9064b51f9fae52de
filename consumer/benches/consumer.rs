//! Consumer benchmark: how fast the consumer drains a backlog compared with
//! a plain lapin consumer, how that scales with lanes, and how long a
//! message waits before its handler starts at a steady rate.
//!
//! Run it with (PostgreSQL and RabbitMQ up, see `scripts/services.sh`;
//! `DATABASE_URL` and `AMQP_URL` point it elsewhere):
//!
//! ```sh
//! cargo bench -p consumer --bench consumer
//! ```
//!
//! It prints, in one run of about a minute:
//!
//! 1. **Baseline**: a plain lapin consumer (prefetch [`PREFETCH`], one ack
//!    per delivery, no database) draining [`MESSAGES`] pre-published
//!    messages of [`PAYLOAD_BYTES`] bytes of JSON over [`KEYS`] ordering keys
//!    from a queue of its own: what the broker and client can do.
//! 2. **Consumer**: [`consumer::Consumer`] with a no-op handler, dedupe and
//!    ordering on (inbox transactions, batched when a backlog waits), default config (8
//!    lanes, prefetch 256), draining the same backlog: the time from
//!    starting it until `stats().applied` reaches [`MESSAGES`]; events/s
//!    and the ratio to the baseline. Then [`LANE_MESSAGES`] with each of
//!    [`LANE_COUNTS`] lanes, for how throughput scales with lanes.
//! 3. **Latency**: [`LATENCY_RATE`] messages/s published at a steady pace
//!    for [`LATENCY_SECONDS`] s to a running consumer (default config); each
//!    carries its publish time (`sent_at_us`) and the handler records how
//!    long ago that was: p50, p99 and max of publish-to-handler-start.
//!
//! Every message is published in the relay's wire format (`message_id`,
//! `x-ordering-key`, `x-key-seq`, `x-hash-key`, persistent) with publisher
//! confirms. Each run has a consumer name, and so queues, of its own on one
//! producer exchange (durable topic); the queues, the exchange and the
//! schema holding the inbox are removed at the end.

use std::collections::VecDeque;
use std::fmt::Display;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use consumer::{Consumer, ConsumerConfig, Envelope};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
    PublisherConfirm,
};
use serde::Deserialize;
use testkit::TestSchema;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Messages of the baseline and of the default-config consumer run.
const MESSAGES: usize = 20_000;
/// Messages of each run in the lane scan.
const LANE_MESSAGES: usize = 10_000;
/// Lane counts of the scan (the default, 8, is the run of phase 2).
const LANE_COUNTS: [usize; 3] = [1, 4, 16];
/// Distinct ordering keys the messages are spread over.
const KEYS: usize = 200;
/// Size of every message body, in bytes of JSON.
const PAYLOAD_BYTES: usize = 512;
/// The baseline's prefetch: the consumer's default.
const PREFETCH: u16 = 256;
/// Unconfirmed messages in flight while pre-publishing.
const PUBLISH_WINDOW: usize = 1_000;
/// Messages per second published in the latency phase.
const LATENCY_RATE: usize = 1_000;
/// Length of the latency phase.
const LATENCY_SECONDS: usize = 10;
/// What the consumer should reach with the default config.
const TARGET_RATE: f64 = 5_000.0;
/// What the consumer should reach against the baseline.
const TARGET_RATIO: f64 = 0.5;
/// How long any drain may take.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
/// How often the consumer's stats are polled; bounds the timing error.
const STATS_POLL: Duration = Duration::from_millis(5);
const ROUTING_KEY: &str = "bench.v1.created";
const PATTERN: &str = "bench.*.created";
const EVENT_TYPE: &str = "bench.created";

type Error = Box<dyn std::error::Error + Send + Sync>;
type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds what the bench was doing to an error.
trait Context<T> {
    fn context(self, what: &str) -> Result<T>;
}

impl<T, E: Display> Context<T> for Result<T, E> {
    fn context(self, what: &str) -> Result<T> {
        self.map_err(|e| format!("{what}: {e}").into())
    }
}

/// The part of the body the handlers read (the rest is padding).
#[derive(Deserialize)]
struct BenchEvent {
    sent_at_us: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "consumer bench: {MESSAGES} messages of {PAYLOAD_BYTES} B, {KEYS} keys, \
         default lanes {}, prefetch {}, {cores} cores",
        defaults().lanes,
        defaults().prefetch
    );
    let bench = Bench::new().await?;
    let outcome = run(&bench, cores).await;
    bench.cleanup().await;
    outcome
}

/// The consumer's default config (its URLs are placeholders).
fn defaults() -> ConsumerConfig {
    ConsumerConfig::new("defaults", "postgres://", "amqp://")
}

async fn run(bench: &Bench, cores: usize) -> Result<()> {
    let baseline = baseline(bench).await?;
    println!(
        "\n[1] baseline (lapin basic_consume, prefetch {PREFETCH}, one ack per delivery, no database):"
    );
    println!("    {}", baseline.describe());

    let default_lanes = defaults().lanes;
    let library = backlog(bench, default_lanes, MESSAGES).await?;
    let ratio = library.rate() / baseline.rate();
    println!(
        "\n[2] consumer, no-op handler, dedupe + ordering (batched inbox transactions), {default_lanes} lanes:"
    );
    println!("    {}", library.describe());
    println!(
        "    events/s {:.0} (target >= {TARGET_RATE:.0}: {}), ratio consumer/baseline {ratio:.2} \
         (target >= {TARGET_RATIO}: {})",
        library.rate(),
        verdict(library.rate() >= TARGET_RATE),
        verdict(ratio >= TARGET_RATIO),
    );
    println!("    by lanes ({LANE_MESSAGES} messages each; {default_lanes} from the run above):");
    let mut scan = vec![(default_lanes, library)];
    for lanes in LANE_COUNTS {
        let run = backlog(bench, lanes, LANE_MESSAGES).await?;
        println!("      lanes {lanes:>2}: {}", run.describe());
        scan.push((lanes, run));
    }
    scan.sort_by_key(|(lanes, _)| *lanes);
    let one = scan.first().map_or(f64::NAN, |(_, run)| run.rate());
    let table: Vec<String> = scan
        .iter()
        .map(|(lanes, run)| format!("{lanes}: {:.0} ({:.2}x)", run.rate(), run.rate() / one))
        .collect();
    println!("    events/s by lanes (x lanes=1): {}", table.join(", "));

    let latency = latency(bench).await?;
    println!(
        "\n[3] handler-start latency at {LATENCY_RATE}/s for {LATENCY_SECONDS} s ({default_lanes} lanes, \
         publish -> handler start):"
    );
    println!("    {}", latency.describe());

    println!(
        "\nconsumer bench ({cores} cores): baseline {:.0} events/s, consumer {:.0} events/s \
         (target {TARGET_RATE:.0}: {}), ratio {ratio:.2} (target {TARGET_RATIO}: {}); \
         lanes {}; latency at {:.0}/s p50 {:.2} ms p99 {:.2} ms",
        baseline.rate(),
        library.rate(),
        verdict(library.rate() >= TARGET_RATE),
        verdict(ratio >= TARGET_RATIO),
        table.join(", "),
        latency.published_rate,
        latency.p50_ms,
        latency.p99_ms,
    );
    Ok(())
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
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
            "{} events in {:.2} s = {:.0} events/s",
            self.messages,
            self.elapsed.as_secs_f64(),
            self.rate()
        )
    }
}

/// The bench's schema (with the inbox tables), its producer exchange, a
/// broker connection with a confirm-mode channel to publish on, and the
/// queues made so far (deleted at the end).
struct Bench {
    schema: TestSchema,
    exchange: String,
    connection: Connection,
    channel: Channel,
    queues: Mutex<Vec<String>>,
    payload_pad: String,
}

impl Bench {
    async fn new() -> Result<Self> {
        let schema = TestSchema::new("consumer_bench");
        let outbox = outbox::Outbox::new(outbox::Config {
            schema: schema.name().to_owned(),
            ..outbox::Config::default()
        })
        .context("outbox config")?;
        outbox
            .migrate(&mut schema.connect())
            .context("installing the outbox and inbox tables")?;
        let connection =
            Connection::connect(&testkit::amqp::amqp_url(), ConnectionProperties::default())
                .await
                .context("connecting to RabbitMQ (run scripts/services.sh)")?;
        let channel = connection.create_channel().await.context("a channel")?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("enabling publisher confirms")?;
        // The producer's exchange, as the relay and the consumer declare it.
        let exchange = testkit::unique_name("consumer_bench_x");
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context("declaring the bench exchange")?;
        Ok(Bench {
            schema,
            exchange,
            connection,
            channel,
            queues: Mutex::new(Vec::new()),
            payload_pad: "x".repeat(PAYLOAD_BYTES),
        })
    }

    /// Notes queues to delete at the end.
    fn track(&self, queues: &[String]) {
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(queues.iter().cloned());
    }

    /// Deletes `queues` now (so later publishes do not fill them).
    async fn delete_queues(&self, queues: &[String]) -> Result<()> {
        for queue in queues {
            self.channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await
                .context("deleting a bench queue")?;
        }
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|q| !queues.contains(q));
        Ok(())
    }

    /// Removes what is left on the broker; the schema goes on drop.
    async fn cleanup(self) {
        let queues = std::mem::take(&mut *self.queues.lock().unwrap_or_else(|p| p.into_inner()));
        if let Ok(channel) = self.connection.create_channel().await {
            for queue in queues {
                let _ = channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            let _ = channel
                .exchange_delete(
                    self.exchange.as_str().into(),
                    ExchangeDeleteOptions::default(),
                )
                .await;
        }
        let _ = self.connection.close(200, "bench done".into()).await;
        drop(self.schema);
    }

    /// A config for a consumer of its own on the bench schema: defaults
    /// but for `lanes`.
    fn config(&self, lanes: usize) -> ConsumerConfig {
        let name = testkit::unique_name(&format!("consumer_bench_l{lanes}"));
        let mut config =
            ConsumerConfig::new(&name, &testkit::database_url(), &testkit::amqp::amqp_url());
        config.schema = self.schema.name().to_owned();
        config.lanes = lanes;
        config
    }

    /// Message `i` of a run: key `i % KEYS`, its sequence within the key,
    /// the publish time in the body, padded to [`PAYLOAD_BYTES`].
    fn message(&self, i: usize) -> (Vec<u8>, BasicProperties) {
        let sent_at_us = now_us();
        let body = |pad: &str| format!(r#"{{"n":{i},"sent_at_us":{sent_at_us},"pad":"{pad}"}}"#);
        let bare = body("").len();
        let body = body(&self.payload_pad[..PAYLOAD_BYTES.saturating_sub(bare)]).into_bytes();
        let key = LongString::from(format!("key-{}", i % KEYS));
        let mut headers = FieldTable::default();
        headers.insert(
            outbox::ORDERING_KEY_HEADER.into(),
            AMQPValue::LongString(key.clone()),
        );
        headers.insert(
            outbox::wire::slot_header(outbox::wire::slot(&key.to_string()))
                .as_str()
                .into(),
            AMQPValue::Boolean(true),
        );
        headers.insert(
            outbox::KEY_SEQ_HEADER.into(),
            AMQPValue::LongLongInt((i / KEYS + 1) as i64),
        );
        headers.insert(outbox::EVENT_VERSION_HEADER.into(), AMQPValue::LongInt(1));
        let properties = BasicProperties::default()
            .with_message_id(Uuid::now_v7().to_string().into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_type(EVENT_TYPE.into())
            .with_headers(headers);
        (body, properties)
    }

    /// Publishes message `i` (mandatory, so an unrouted one is noticed).
    async fn publish(&self, i: usize) -> Result<PublisherConfirm> {
        let (body, properties) = self.message(i);
        self.channel
            .basic_publish(
                self.exchange.as_str().into(),
                ROUTING_KEY.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &body,
                properties,
            )
            .await
            .context("publishing")
    }

    /// Publishes messages `0..count`, at most [`PUBLISH_WINDOW`] unconfirmed,
    /// and waits for every confirm. Every bound queue gets them.
    async fn publish_backlog(&self, count: usize) -> Result<Duration> {
        let started = Instant::now();
        let mut in_flight = VecDeque::with_capacity(PUBLISH_WINDOW);
        for i in 0..count {
            if in_flight.len() == PUBLISH_WINDOW {
                let oldest = in_flight.pop_front().expect("the window is full");
                expect_ack(oldest).await?;
            }
            in_flight.push_back(self.publish(i).await?);
        }
        for confirm in in_flight {
            expect_ack(confirm).await?;
        }
        Ok(started.elapsed())
    }

    /// Waits until `queue` exists and has a consumer: the consumer has
    /// declared and bound its queues and subscribed.
    async fn wait_subscribed(&self, queue: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // A passive declare of a missing queue closes its channel.
            let channel = self
                .connection
                .create_channel()
                .await
                .context("a channel")?;
            let declared = channel
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await;
            if let Ok(q) = declared {
                let _ = channel.close(200, "checked".into()).await;
                if q.consumer_count() > 0 {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!("consumer did not subscribe to {queue} within 30 s").into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Fails unless the broker acked the message and routed it.
async fn expect_ack(confirm: PublisherConfirm) -> Result<()> {
    match confirm.await.context("waiting for a confirm")? {
        Confirmation::Ack(None) => Ok(()),
        other => Err(format!("message not confirmed or not routed: {other:?}").into()),
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Phase 1: a plain lapin consumer draining [`MESSAGES`] from a queue of
/// its own, declared as the consumer declares its queue (durable, single
/// active consumer) and bound to the bench exchange.
async fn baseline(bench: &Bench) -> Result<Throughput> {
    let queue = testkit::unique_name("consumer_bench_baseline");
    bench.track(std::slice::from_ref(&queue));
    let channel = bench
        .connection
        .create_channel()
        .await
        .context("a channel")?;
    let mut args = FieldTable::default();
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .context("declaring the baseline queue")?;
    channel
        .queue_bind(
            queue.as_str().into(),
            bench.exchange.as_str().into(),
            PATTERN.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .context("binding the baseline queue")?;
    bench.publish_backlog(MESSAGES).await?;
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .context("setting the prefetch")?;

    let started = Instant::now();
    let mut deliveries = channel
        .basic_consume(
            queue.as_str().into(),
            testkit::unique_name("consumer_bench_baseline").into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .context("consuming the baseline queue")?;
    for _ in 0..MESSAGES {
        let left = DRAIN_TIMEOUT.saturating_sub(started.elapsed());
        let delivery = tokio::time::timeout(left, deliveries.next())
            .await
            .map_err(|_| format!("baseline did not drain within {DRAIN_TIMEOUT:?}"))?
            .ok_or("the baseline subscription ended")?
            .context("receiving")?;
        delivery
            .ack(BasicAckOptions::default())
            .await
            .context("acking")?;
    }
    let elapsed = started.elapsed();
    let _ = channel.close(200, "baseline done".into()).await;
    bench.delete_queues(&[queue]).await?;
    Ok(Throughput {
        messages: MESSAGES,
        elapsed,
    })
}

/// A consumer running on its own task.
struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<consumer::Result<()>>,
}

impl Running {
    fn start(consumer: &Consumer) -> Self {
        let shutdown = CancellationToken::new();
        let task = {
            let (consumer, shutdown) = (consumer.clone(), shutdown.clone());
            tokio::spawn(async move { consumer.run(shutdown).await })
        };
        Running { shutdown, task }
    }

    async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .context("the consumer did not stop within 30 s")?
            .context("the consumer task panicked")?
            .context("the consumer failed")
    }
}

/// Names of a consumer's queues, tracked for deletion.
fn queues_of(bench: &Bench, config: &ConsumerConfig) -> Vec<String> {
    let queues = vec![config.queue(0), config.dead_letter_queue()];
    bench.track(&queues);
    queues
}

/// Waits until `consumer` has applied `count` messages (or something went
/// wrong with them).
async fn wait_applied(consumer: &Consumer, count: usize, started: Instant) -> Result<()> {
    loop {
        let stats = consumer.stats();
        if stats.applied >= count as u64 {
            return Ok(());
        }
        if stats.dead_lettered > 0 || stats.late > 0 {
            return Err(format!("messages dead-lettered or late: {stats:?}").into());
        }
        if started.elapsed() > DRAIN_TIMEOUT {
            return Err(format!(
                "applied {} of {count} within {DRAIN_TIMEOUT:?}: {stats:?}",
                stats.applied
            )
            .into());
        }
        tokio::time::sleep(STATS_POLL).await;
    }
}

/// Phase 2: a consumer with `lanes` lanes and a no-op handler draining
/// `count` pre-published messages. It runs once first to declare and bind
/// its queue, is stopped, the messages are published, and the time is
/// taken from its second start until all are applied.
async fn backlog(bench: &Bench, lanes: usize, count: usize) -> Result<Throughput> {
    let config = bench.config(lanes);
    let queues = queues_of(bench, &config);
    let consumer = Consumer::builder(config)
        .handle(
            &bench.exchange,
            PATTERN,
            |_conn, _e: Envelope<BenchEvent>| Ok(()),
        )
        .build()
        .context("building the consumer")?;
    let running = Running::start(&consumer);
    bench.wait_subscribed(&queues[0]).await?;
    running.stop().await?;
    bench.publish_backlog(count).await?;

    let started = Instant::now();
    let running = Running::start(&consumer);
    wait_applied(&consumer, count, started).await?;
    let elapsed = started.elapsed();
    running.stop().await?;
    let stats = consumer.stats();
    if stats.duplicates > 0 || stats.held > 0 || stats.retried > 0 {
        println!(
            "      (lanes {lanes}: {} duplicates, {} held, {} retried)",
            stats.duplicates, stats.held, stats.retried
        );
    }
    bench.delete_queues(&queues).await?;
    Ok(Throughput {
        messages: count,
        elapsed,
    })
}

/// Publish-to-handler-start latencies of phase 3.
struct Latency {
    published: usize,
    published_rate: f64,
    applied_rate: f64,
    measured: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl Latency {
    fn describe(&self) -> String {
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {} published at {:.0}/s, \
             applied at {:.0}/s, {} measured",
            self.p50_ms,
            self.p99_ms,
            self.max_ms,
            self.published,
            self.published_rate,
            self.applied_rate,
            self.measured
        )
    }
}

/// Phase 3: a running consumer (default config) whose handler records how
/// long ago each message was published, fed at [`LATENCY_RATE`]/s.
async fn latency(bench: &Bench) -> Result<Latency> {
    let total = LATENCY_RATE * LATENCY_SECONDS;
    let config = bench.config(defaults().lanes);
    let queues = queues_of(bench, &config);
    let samples = Arc::new(Mutex::new(Vec::<u64>::with_capacity(total)));
    let consumer = {
        let samples = Arc::clone(&samples);
        Consumer::builder(config)
            .handle(
                &bench.exchange,
                PATTERN,
                move |_conn, e: Envelope<BenchEvent>| {
                    let waited = now_us().saturating_sub(e.event.sent_at_us);
                    samples
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(waited);
                    Ok(())
                },
            )
            .build()
            .context("building the consumer")?
    };
    let running = Running::start(&consumer);
    bench.wait_subscribed(&queues[0]).await?;

    // Confirms are checked on the side, so waiting for them does not hold
    // up the pace.
    let (confirms, mut pending) = mpsc::unbounded_channel::<PublisherConfirm>();
    let checker = tokio::spawn(async move {
        while let Some(confirm) = pending.recv().await {
            expect_ack(confirm).await?;
        }
        Ok::<_, Error>(())
    });
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut sent = 0;
    while sent < total {
        tick.tick().await;
        // Everything due by now: a late tick publishes a small burst.
        let due =
            (started.elapsed().as_micros() as usize * LATENCY_RATE / 1_000_000 + 1).min(total);
        while sent < due {
            let confirm = bench.publish(sent).await?;
            confirms
                .send(confirm)
                .map_err(|_| "the confirm checker stopped")?;
            sent += 1;
        }
    }
    let published_in = started.elapsed();
    drop(confirms);
    checker.await.context("the confirm checker panicked")??;
    wait_applied(&consumer, total, started).await?;
    let applied_in = started.elapsed();
    running.stop().await?;
    bench.delete_queues(&queues).await?;

    let mut micros = std::mem::take(&mut *samples.lock().unwrap_or_else(|p| p.into_inner()));
    micros.sort_unstable();
    let percentile = |q: f64| {
        let rank = ((q * micros.len() as f64).ceil() as usize).max(1);
        micros.get(rank - 1).map_or(f64::NAN, |us| *us as f64 / 1e3)
    };
    Ok(Latency {
        published: total,
        published_rate: total as f64 / published_in.as_secs_f64(),
        applied_rate: total as f64 / applied_in.as_secs_f64(),
        measured: micros.len(),
        p50_ms: percentile(0.50),
        p99_ms: percentile(0.99),
        max_ms: micros.last().map_or(f64::NAN, |us| *us as f64 / 1e3),
    })
}
