//! A worker: one database connection and one AMQP channel, working its
//! share of the partitions batch by batch.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diesel_async::{AsyncConnection, AsyncPgConnection};
use tokio::sync::Notify;
use tracing::{Instrument, debug, info_span, warn};

use crate::publish::{Outcome, Publisher};
use crate::relay::Shared;
use crate::store::{self, Failure};
use crate::{Result, metrics as m};

/// How a worker is woken: partitions with news, and a permit to stop waiting.
#[derive(Debug, Default)]
pub(crate) struct Wake {
    dirty: Mutex<BTreeSet<i16>>,
    // Set when notifications may have been missed: scan every partition.
    rescan: AtomicBool,
    notify: Notify,
}

impl Wake {
    /// Marks a partition as having new rows and wakes the worker.
    pub(crate) fn partition(&self, partition: i16) {
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(partition);
        self.notify.notify_one();
    }

    /// Asks for a scan of every partition (notifications may be lost).
    pub(crate) fn rescan(&self) {
        self.rescan.store(true, Ordering::Relaxed);
        self.notify.notify_one();
    }

    fn take(&self) -> Vec<i16> {
        std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|p| p.into_inner()))
            .into_iter()
            .collect()
    }
}

/// What one batch did.
struct Batch {
    rows: usize,
}

/// Runs worker `index` over `partitions` until the relay is cancelled.
/// Stops claiming at once on cancel; a batch under way is finished first.
pub(crate) async fn run(index: usize, partitions: Vec<i16>, wake: Arc<Wake>, shared: Arc<Shared>) {
    let config = &shared.config;
    let mut db: Option<AsyncPgConnection> = None;
    let mut publisher: Option<Publisher> = None;
    let mut reconnect = config.retry.reconnect_delays();
    let mut full_scan = true;
    let name = format!(
        "outbox-relay {} {} worker {index}",
        config.schema, shared.instance
    );

    while !shared.cancel.is_cancelled() {
        if db.is_none() {
            match store::connect(&config.database_url).await {
                Ok(conn) => db = Some(conn),
                Err(e) => warn!(worker = index, error = %e, "database unavailable; retrying"),
            }
        }
        shared.health.set_database(index, db.is_some());
        if !publisher.as_ref().is_some_and(Publisher::is_connected) {
            if let Some(old) = publisher.take() {
                old.close().await;
            }
            match Publisher::connect(&config.amqp_url, &name, config.app_id.clone()).await {
                Ok(p) => publisher = Some(p),
                Err(e) => warn!(worker = index, error = %e, "broker unavailable; retrying"),
            }
        }
        shared.health.set_broker(index, publisher.is_some());
        let (Some(conn), Some(channel)) = (db.as_mut(), publisher.as_ref()) else {
            let delay = reconnect.next().unwrap_or(config.retry.max_delay);
            tokio::select! {
                () = shared.cancel.cancelled() => break,
                () = tokio::time::sleep(delay) => continue,
            }
        };
        reconnect = config.retry.reconnect_delays();

        let rescan = wake.rescan.swap(false, Ordering::Relaxed);
        let targets = if std::mem::take(&mut full_scan) || rescan {
            partitions.clone()
        } else {
            wake.take()
        };
        let mut more = false;
        for partition in targets {
            if shared.cancel.is_cancelled() {
                break;
            }
            let span = info_span!("batch", worker = index, partition);
            match process(&shared, conn, channel, partition)
                .instrument(span)
                .await
            {
                Ok(batch) if batch.rows >= config.batch_size as usize => {
                    // A full batch: there is probably more; go again at once.
                    wake.dirty
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(partition);
                    more = true;
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(worker = index, partition, error = %e, "batch failed; reconnecting");
                    // The connection may be broken; a fresh one is cheap.
                    db = None;
                    full_scan = true;
                    break;
                }
            }
            if !channel.is_connected() {
                break;
            }
        }
        if more || db.is_none() {
            continue;
        }
        tokio::select! {
            () = shared.cancel.cancelled() => break,
            () = wake.notify.notified() => {}
            () = tokio::time::sleep(config.poll_interval) => full_scan = true,
        }
    }
    if let Some(p) = publisher {
        p.close().await;
    }
    debug!(worker = index, "worker stopped");
}

/// One batch of one partition, in one transaction that holds the
/// partition's lock from the read until the results are recorded.
async fn process(
    shared: &Shared,
    conn: &mut AsyncPgConnection,
    publisher: &Publisher,
    partition: i16,
) -> Result<Batch> {
    let config = &shared.config;
    let store = &shared.store;
    conn.transaction(async |conn| {
        if !store.try_lock_partition(conn, partition).await? {
            return Ok(Batch { rows: 0 }); // another relay works it now
        }
        let rows = store.due_rows(conn, partition, config.batch_size).await?;
        if rows.is_empty() {
            return Ok(Batch { rows: 0 });
        }
        let (outcomes, channel_ok) = publisher.publish(&rows, config.confirm_timeout).await;
        let now = chrono::Utc::now();
        let mut published = Vec::with_capacity(rows.len());
        let mut failures = Vec::new();
        for (row, outcome) in rows.iter().zip(outcomes) {
            match outcome {
                Outcome::Confirmed { latency } => {
                    published.push(row.id);
                    metrics::histogram!(m::CONFIRM_LATENCY).record(latency.as_secs_f64());
                    let since_commit = (now - row.created_at).to_std().unwrap_or(Duration::ZERO);
                    metrics::histogram!(m::COMMIT_TO_CONFIRM).record(since_commit.as_secs_f64());
                }
                Outcome::Failed(error) => {
                    let attempts = u32::try_from(row.attempts).unwrap_or(0) + 1;
                    let park = config.retry.exhausted(attempts);
                    warn!(
                        id = %row.id, exchange = %row.exchange, routing_key = %row.routing_key,
                        attempts, parked = park, error = %error, "publish failed"
                    );
                    failures.push(Failure {
                        id: row.id,
                        error,
                        retry_after: config.retry.delay(attempts),
                        park,
                    });
                }
            }
        }
        store
            .mark_published(conn, &published, config.retention.is_some())
            .await?;
        store.mark_failed(conn, &failures).await?;
        let parked = failures.iter().filter(|f| f.park).count();
        metrics::counter!(m::PUBLISHED).increment(published.len() as u64);
        metrics::counter!(m::RETRIED).increment((failures.len() - parked) as u64);
        metrics::counter!(m::PARKED).increment(parked as u64);
        debug!(
            published = published.len(),
            failed = failures.len(),
            "batch done"
        );
        if !channel_ok {
            // After a timeout the channel's state is unknown: start afresh.
            publisher.channel_broken();
        }
        Ok(Batch { rows: rows.len() })
    })
    .await
}
