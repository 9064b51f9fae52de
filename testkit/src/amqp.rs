//! RabbitMQ fixtures: an exchange and queue of their own for every test,
//! and a consumer that collects what arrives, waiting with a deadline.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

/// Broker used when `AMQP_URL` is not set.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The test broker's URL: `AMQP_URL`, or [`DEFAULT_AMQP_URL`].
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.to_owned())
}

/// One delivered message, as a consumer in any language would see it.
#[derive(Debug, Clone)]
pub struct Received {
    /// Routing key it was published with.
    pub routing_key: String,
    /// The body.
    pub body: Vec<u8>,
    /// AMQP properties and headers.
    pub properties: BasicProperties,
}

impl Received {
    /// The `message_id` property.
    pub fn message_id(&self) -> String {
        self.properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default()
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&AMQPValue> {
        self.properties.headers().as_ref()?.inner().get(name)
    }

    /// A string header.
    pub fn header_str(&self, name: &str) -> Option<String> {
        match self.header(name)? {
            AMQPValue::LongString(s) => Some(s.to_string()),
            AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
            _ => None,
        }
    }

    /// An integer header.
    pub fn header_i64(&self, name: &str) -> Option<i64> {
        match self.header(name)? {
            AMQPValue::LongLongInt(n) => Some(*n),
            AMQPValue::LongInt(n) => Some(i64::from(*n)),
            _ => None,
        }
    }
}

/// A topic exchange with a queue bound to it, named for one test. The queue
/// expires a minute after its last consumer leaves, and the exchange goes
/// with its last binding, so nothing is left on the broker.
pub struct TestTopology {
    /// The exchange name.
    pub exchange: String,
    /// The queue name.
    pub queue: String,
    connection: Connection,
    channel: Channel,
}

impl TestTopology {
    /// Declares `exchange` (topic, auto-delete) and a queue bound to it with
    /// `binding` (e.g. `#`).
    pub async fn new(prefix: &str, binding: &str) -> Self {
        let exchange = crate::unique_name(prefix);
        let topology = Self::exchange_only(&exchange).await;
        topology.bind_queue(binding).await;
        topology
    }

    /// Declares only the exchange (so publishes to it are unroutable until
    /// [`TestTopology::bind_queue`]).
    pub async fn exchange_only(exchange: &str) -> Self {
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| {
                panic!("cannot connect to RabbitMQ: {e} (run scripts/services.sh)")
            });
        let channel = connection.create_channel().await.unwrap();
        channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    auto_delete: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        TestTopology {
            queue: format!("{exchange}.q"),
            exchange: exchange.to_owned(),
            connection,
            channel,
        }
    }

    /// Declares the queue and binds it to the exchange with `binding`.
    pub async fn bind_queue(&self, binding: &str) {
        let mut args = FieldTable::default();
        args.insert("x-expires".into(), AMQPValue::LongInt(60_000));
        self.channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions::default(),
                args,
            )
            .await
            .unwrap();
        self.channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                binding.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }

    /// Consumes until `count` messages arrived, panicking after `timeout`.
    pub async fn receive(&self, count: usize, timeout: Duration) -> Vec<Received> {
        self.receive_until(timeout, |got| got.len() >= count).await
    }

    /// Consumes until `done` says so of everything received so far,
    /// panicking after `timeout`.
    pub async fn receive_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[Received]) -> bool,
    ) -> Vec<Received> {
        let channel = self.connection.create_channel().await.unwrap();
        let mut consumer = channel
            .basic_consume(
                self.queue.as_str().into(),
                crate::unique_name("test-consumer").into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let deadline = Instant::now() + timeout;
        let mut received: Vec<Received> = Vec::new();
        while !done(&received) {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, consumer.next()).await {
                Ok(Some(Ok(delivery))) => received.push(Received {
                    routing_key: delivery.routing_key.as_str().to_owned(),
                    body: delivery.data,
                    properties: delivery.properties,
                }),
                Ok(other) => panic!("consumer ended: {other:?}"),
                Err(_) => panic!(
                    "timed out after {timeout:?} with {} messages received",
                    received.len()
                ),
            }
        }
        let _ = channel.close(200, "done".into()).await;
        received
    }

    /// Messages waiting in the queue now.
    pub async fn queue_depth(&self) -> u32 {
        self.channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
            .message_count()
    }
}

/// What the broker says of a queue: messages ready, consumers subscribed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueState {
    /// Messages ready (not delivered, not unacked).
    pub ready: u32,
    /// Consumers subscribed (the active one and those standing by).
    pub consumers: u32,
}

/// The state of `queue`, on a connection of the caller's own; `None` when
/// it does not exist.
pub async fn queue_state(queue: &str) -> Option<QueueState> {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("cannot connect to RabbitMQ: {e} (run scripts/services.sh)"));
    let channel = connection.create_channel().await.unwrap();
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
    let _ = connection.close(200, "probed".into()).await;
    declared.ok().map(|q| QueueState {
        ready: q.message_count(),
        consumers: q.consumer_count(),
    })
}

/// Closes, from the broker's side, every connection whose client
/// properties mention `marker`; returns how many.
pub fn close_broker_connections(marker: &str) -> usize {
    let listing = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "pid", "client_properties", "-s"])
        .output()
        .expect("rabbitmqctl (the tests run beside the broker)");
    let mut closed = 0;
    for line in String::from_utf8_lossy(&listing.stdout).lines() {
        if !line.contains(marker) {
            continue;
        }
        let pid = line.split_whitespace().next().unwrap();
        let status = std::process::Command::new("rabbitmqctl")
            .args(["close_connection", pid, "closed by the test"])
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "close_connection {pid}: {status:?}"
        );
        closed += 1;
    }
    closed
}
