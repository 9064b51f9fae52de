//! Fixtures for the relay tests: a schema with the outbox, a topology on
//! the broker, and relays run in the test's runtime.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::time::Duration;

use diesel::Connection;
use outbox::{Message, Outbox};
use relay::{Relay, RelayConfig, RetryPolicy};
use testkit::TestSchema;
use testkit::amqp::Received;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A migrated outbox in a schema of its own.
pub fn outbox_schema(prefix: &str) -> (TestSchema, Outbox) {
    let schema = TestSchema::new(prefix);
    let outbox = Outbox::new(outbox::Config {
        schema: schema.name().to_owned(),
        ..outbox::Config::default()
    })
    .unwrap();
    outbox.migrate(&mut schema.connect()).unwrap();
    (schema, outbox)
}

/// A relay config for the test schema with quick polling and retries.
pub fn config(schema: &TestSchema) -> RelayConfig {
    RelayConfig {
        database_url: testkit::database_url(),
        amqp_url: testkit::amqp::amqp_url(),
        schema: schema.name().to_owned(),
        workers: 2,
        poll_interval: Duration::from_millis(100),
        confirm_timeout: Duration::from_secs(5),
        retry: RetryPolicy {
            initial: Duration::from_millis(50),
            max_delay: Duration::from_millis(200),
            max_attempts: 3,
            ..RetryPolicy::default()
        },
        ..RelayConfig::default()
    }
}

/// A relay running in the background.
pub struct Running {
    stop: Option<oneshot::Sender<()>>,
    /// The relay's task.
    pub handle: JoinHandle<relay::Result<()>>,
}

impl Running {
    /// Asks the relay to stop and waits for it (10 s at most).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.handle)
            .await
            .expect("relay stops within 10 s")
            .expect("relay task")
            .expect("relay returns Ok");
    }
}

/// Starts a relay with `config`.
pub fn start(config: RelayConfig) -> Running {
    let relay = Relay::new(config).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(relay.run(async {
        let _ = stopped.await;
    }));
    Running {
        stop: Some(stop),
        handle,
    }
}

/// Writes `keys` x `per_key` events to `exchange`, one transaction per round
/// over all keys (batch enqueue), interleaving keys as real traffic does.
/// Returns every message written, in commit order.
pub fn enqueue_rounds(
    schema: &TestSchema,
    outbox: &Outbox,
    exchange: &str,
    keys: usize,
    per_key: usize,
) -> Vec<Message> {
    let mut conn = schema.connect();
    let mut written = Vec::with_capacity(keys * per_key);
    for round in 0..per_key {
        let messages: Vec<Message> = (0..keys)
            .map(|k| {
                Message::builder(exchange, "order.v1.submitted", "order.submitted")
                    .ordering_key(format!("key-{k}"))
                    .json(&serde_json::json!({ "key": k, "round": round, "pad": "x".repeat(64) }))
                    .header("tenant", "acme")
                    .build()
                    .unwrap()
            })
            .collect();
        conn.transaction(|conn| outbox.enqueue_batch(conn, &messages))
            .unwrap();
        written.extend(messages);
    }
    written
}

/// Asserts that every key's messages arrived in key_seq order 1, 2, 3..
/// (duplicates allowed only when `allow_duplicates`, and then only of the
/// same message id), and that each key has `per_key` distinct messages.
pub fn assert_per_key_order(received: &[Received], per_key: i64, allow_duplicates: bool) {
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut ids: HashMap<(String, i64), String> = HashMap::new();
    for message in received {
        let key = message
            .header_str("x-ordering-key")
            .expect("x-ordering-key");
        let seq = message.header_i64("x-key-seq").expect("x-key-seq");
        let previous = last.get(&key).copied().unwrap_or(0);
        let id = message.message_id();
        if let Some(seen) = ids.get(&(key.clone(), seq)) {
            assert!(allow_duplicates, "key {key}: seq {seq} delivered twice");
            assert_eq!(
                seen, &id,
                "key {key}: a duplicate of seq {seq} has another id"
            );
            continue;
        }
        assert_eq!(
            seq,
            previous + 1,
            "key {key}: seq {seq} arrived after {previous}"
        );
        ids.insert((key.clone(), seq), id);
        last.insert(key, seq);
    }
    for (key, seq) in &last {
        assert_eq!(*seq, per_key, "key {key} ended at {seq}");
    }
}

/// A free local port (for a relay's `--http-addr`).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET `path`; returns the status code and body, or `None` while nothing listens.
pub fn get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    Some((status, body))
}

/// Polls `path` until `want` holds of the response, or panics after 30 s.
pub fn wait_for_response(port: u16, path: &str, want: impl Fn(u16, &str) -> bool) -> (u16, String) {
    testkit::wait_for(
        &format!("{path} to answer as expected"),
        Duration::from_secs(30),
        || get(port, path).filter(|(status, body)| want(*status, body)),
    )
}
