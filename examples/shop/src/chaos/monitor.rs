//! Watches that every partition queue of every consumer has a consumer
//! while the broker is up: the longest stretch a queue went unserved is in
//! the report (target: under 5 s while an instance of its consumer lives).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diesel::sql_types::Text;
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;

/// What the watch found.
#[derive(Debug, Default, Clone)]
pub(super) struct Served {
    /// The longest time a queue had no consumer, and which.
    pub(super) longest_gap: Duration,
    pub(super) queue: String,
}

/// State shared with the faults: the broker is being restarted (gaps then
/// do not count).
#[derive(Debug, Default)]
pub(super) struct BrokerState {
    pub(super) down: AtomicBool,
}

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = Text)]
    consumer: String,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    partitions: i32,
}

/// Probes the consumers' queues every 250 ms until `stop`.
pub(super) async fn watch(
    database_url: String,
    amqp_url: String,
    schema: String,
    broker: Arc<BrokerState>,
    found: Arc<Mutex<Served>>,
    stop: CancellationToken,
) {
    let mut since: HashMap<String, Instant> = HashMap::new();
    let mut connection: Option<lapin::Connection> = None;
    // One channel for the probes, made anew only when one fails (a missing
    // queue closes it): a channel per probe would load the broker.
    let mut channel: Option<lapin::Channel> = None;
    let mut queues: Vec<String> = Vec::new();
    let mut last_read = Instant::now() - Duration::from_secs(10);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        if last_read.elapsed() >= Duration::from_secs(1) {
            if let Some(q) = current_queues(&database_url, &schema).await {
                queues = q;
            }
            last_read = Instant::now();
        }
        if broker.down.load(Ordering::Relaxed) {
            since.clear();
            (connection, channel) = (None, None);
            continue;
        }
        if !connection.as_ref().is_some_and(|c| c.status().connected()) {
            channel = None;
            connection =
                lapin::Connection::connect(&amqp_url, lapin::ConnectionProperties::default())
                    .await
                    .ok();
        }
        let Some(conn) = connection.as_ref() else {
            continue;
        };
        for queue in &queues {
            if !channel.as_ref().is_some_and(|c| c.status().connected()) {
                channel = conn.create_channel().await.ok();
            }
            let Some(ch) = channel.as_ref() else {
                break;
            };
            let Some(consumers) = consumers(ch, queue).await else {
                channel = None;
                continue;
            };
            let now = Instant::now();
            if consumers > 0 {
                since.remove(queue);
                continue;
            }
            let start = *since.entry(queue.clone()).or_insert(now);
            let mut served = found.lock().unwrap_or_else(|p| p.into_inner());
            if now - start > served.longest_gap {
                served.longest_gap = now - start;
                served.queue = queue.clone();
            }
        }
    }
}

/// Consumers on `queue`; `None` when it cannot be probed (missing: the
/// channel is then closed; or the connection failed).
async fn consumers(channel: &lapin::Channel, queue: &str) -> Option<u32> {
    let q = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .ok()?;
    Some(q.consumer_count())
}

/// The partition queues each consumer's bindings feed now.
async fn current_queues(database_url: &str, schema: &str) -> Option<Vec<String>> {
    let (url, schema) = (database_url.to_owned(), schema.to_owned());
    tokio::task::spawn_blocking(move || {
        let mut conn = PgConnection::establish(&url).ok()?;
        let rows: Vec<Row> = diesel::sql_query(format!(
            r#"SELECT consumer, partitions FROM "{schema}".inbox_topology"#
        ))
        .load(&mut conn)
        .ok()?;
        let mut out = Vec::new();
        for row in rows {
            if row.partitions == 1 {
                out.push(row.consumer);
            } else {
                out.extend((0..row.partitions).map(|i| format!("{}.{i}", row.consumer)));
            }
        }
        Some(out)
    })
    .await
    .ok()
    .flatten()
}
