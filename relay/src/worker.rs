//! A worker: one database connection and one AMQP channel, working its
//! share of the partitions batch by batch.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diesel_async::SimpleAsyncConnection;
use tokio::time::Instant;
use uuid::Uuid;

use diesel_async::AsyncPgConnection;
use tokio::sync::Notify;
use tracing::{Instrument, debug, info_span, warn};

use crate::publish::{Outcome, Publisher};
use crate::relay::Shared;
use crate::store::PendingRow;
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
        self.mark(partition);
        self.notify.notify_one();
    }

    /// Marks a partition for the worker's next round, without waking it.
    fn mark(&self, partition: i16) {
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(partition);
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
#[derive(Default)]
struct Batch {
    /// The partitions it claimed rows from (in one transaction).
    claimed: Vec<i16>,
    /// Those whose claim came back full: probably more is waiting.
    full: Vec<i16>,
    /// Rows marked published, to be retried, and parked.
    published: u64,
    retried: u64,
    parked: u64,
    /// The broker closed the channel on an error it did not pin on one
    /// message: send the next batch one message at a time.
    needs_care: bool,
}

/// Extra time a batch may take beyond the confirm timeout (its SQL).
const BATCH_SLACK: Duration = Duration::from_secs(30);

/// Runs worker `index` over `partitions` until the relay is cancelled.
/// Stops claiming at once on cancel; a batch under way is finished first.
pub(crate) async fn run(index: usize, partitions: Vec<i16>, wake: Arc<Wake>, shared: Arc<Shared>) {
    let config = &shared.config;
    let mut db: Option<AsyncPgConnection> = None;
    let mut publisher: Option<Publisher> = None;
    // Backoff between failed connects or batches; reset by a good batch.
    let mut backoff = config.retry.reconnect_delays();
    let mut failed = false;
    // Every partition is scanned on this schedule, however busy NOTIFY keeps
    // the worker: retries fall due without any notification.
    let mut next_full_scan = Instant::now();
    // Scans start one partition later each time, so one partition that
    // keeps failing does not starve the ones after it.
    let mut rotation = 0usize;
    // After a channel error no message was blamed for: the next batch goes
    // one message at a time, so the refusal lands on its cause.
    let mut carefully = false;
    let name = format!(
        "outbox-relay {} {} worker {index}",
        config.schema, shared.instance
    );
    // This worker's row in outbox_waiting, kept while it waits for a NOTIFY
    // (only when the relay LISTENs), and when it was last written.
    let waiter = format!("{} {index}", shared.instance);
    let mut waiting_since: Option<Instant> = None;

    while !shared.cancel.is_cancelled() {
        if failed {
            let delay = backoff.next().unwrap_or(config.retry.max_delay);
            tokio::select! {
                () = shared.cancel.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        if db.is_none() {
            match connect_database(&shared).await {
                Ok(conn) => db = Some(conn),
                Err(e) => warn!(worker = index, error = %e, "database unavailable; retrying"),
            }
        }
        shared.health.set_database(index, db.is_some());
        if !publisher.as_ref().is_some_and(Publisher::is_connected) {
            if let Some(old) = publisher.take() {
                old.close().await;
            }
            match Publisher::connect(
                &config.amqp_url,
                &name,
                config.app_id.clone(),
                &config.amqp_tls,
            )
            .await
            {
                Ok(p) => publisher = Some(p),
                Err(e) => warn!(worker = index, error = %e, "broker unavailable; retrying"),
            }
        }
        shared.health.set_broker(index, publisher.is_some());
        let (Some(conn), Some(channel)) = (db.as_mut(), publisher.as_ref()) else {
            failed = true;
            continue;
        };
        if channel.is_blocked() {
            // A resource alarm: claiming now would only mark the same rows
            // unknown again and again. Wait, with backoff.
            if !failed {
                warn!(
                    worker = index,
                    "the broker blocks publishing (resource alarm); waiting"
                );
            }
            shared.health.set_broker(index, false);
            failed = true;
            continue;
        }

        let full = Instant::now() >= next_full_scan || wake.rescan.swap(false, Ordering::Relaxed);
        let mut targets = if full {
            next_full_scan = Instant::now() + config.poll_interval;
            rotation = (rotation + 1) % partitions.len().max(1);
            let mut all = partitions.clone();
            all.rotate_left(rotation);
            match shared.store.due_partitions(conn, &all).await {
                Ok(due) => {
                    // Keep the rotated order; add any notified partitions too.
                    let mut targets: Vec<i16> =
                        all.into_iter().filter(|p| due.contains(p)).collect();
                    for p in wake.take() {
                        if !targets.contains(&p) {
                            targets.push(p);
                        }
                    }
                    targets
                }
                Err(e) => {
                    warn!(worker = index, error = %e, "scan failed; reconnecting");
                    wake.rescan.store(true, Ordering::Relaxed);
                    db = None;
                    failed = true;
                    continue;
                }
            }
        } else {
            wake.take()
        };
        let mut more = false;
        let mut drop_db = false;
        failed = false;
        while !targets.is_empty() {
            if shared.cancel.is_cancelled() {
                break;
            }
            let span = info_span!("batch", worker = index, partitions = ?targets);
            let batch = tokio::time::timeout(
                config.confirm_timeout + BATCH_SLACK,
                process(&shared, conn, channel, &targets, carefully),
            )
            .instrument(span)
            .await;
            match batch {
                Ok(Ok(batch)) => {
                    backoff = config.retry.reconnect_delays();
                    carefully = batch.needs_care;
                    targets.retain(|p| !batch.claimed.contains(p));
                    for partition in batch.full {
                        // A full claim: there is probably more; go again at once.
                        wake.mark(partition);
                        more = true;
                    }
                }
                Ok(Err(e)) => {
                    warn!(worker = index, partitions = ?targets, error = %e, "batch failed; reconnecting");
                    drop_db = true; // the connection may be broken; a fresh one is cheap
                    failed = true;
                }
                Err(_) => {
                    warn!(
                        worker = index,
                        partitions = ?targets, "batch took too long; reconnecting"
                    );
                    drop_db = true; // the cut-off query leaves the connection unusable
                    failed = true;
                }
            }
            if failed || !channel.is_connected() {
                // Not done with these: scan everything once reconnected.
                wake.rescan.store(true, Ordering::Relaxed);
                failed = true;
                break;
            }
        }
        if !drop_db && !failed {
            // Saturated (more to claim at once): it will not sleep for a
            // while, so producers need not wake it. Waiting again (or each
            // poll interval while idle, to show it lives): say so, then look
            // once more, since a row committed before producers could see
            // the flag sent no NOTIFY.
            let flagged = if more {
                match waiting_since.take() {
                    Some(_) => shared.store.clear_waiting(conn, &waiter).await,
                    None => Ok(()),
                }
            } else if config.listen
                && waiting_since.is_none_or(|t| t.elapsed() >= config.poll_interval)
            {
                if waiting_since.is_none() {
                    more = true;
                    wake.rescan.store(true, Ordering::Relaxed);
                }
                waiting_since = Some(Instant::now());
                shared.store.set_waiting(conn, &waiter, &partitions).await
            } else {
                Ok(())
            };
            if let Err(e) = flagged {
                warn!(worker = index, error = %e, "cannot record whether the worker waits; reconnecting");
                // Unknown: write it again once reconnected.
                waiting_since = None;
                drop_db = true;
                failed = true;
            }
        }
        if drop_db {
            db = None;
        }
        if more || failed {
            continue;
        }
        tokio::select! {
            () = shared.cancel.cancelled() => break,
            () = wake.notify.notified() => {}
            () = tokio::time::sleep_until(next_full_scan) => {}
        }
    }
    if let Some(p) = publisher {
        p.close().await;
    }
    if waiting_since.is_some()
        && let Some(conn) = db.as_mut()
        && let Err(e) = shared.store.clear_waiting(conn, &waiter).await
    {
        debug!(worker = index, error = %e, "could not withdraw the waiting flag; it goes stale");
    }
    debug!(worker = index, "worker stopped");
}

/// A database connection with the session settings the relay relies on: a
/// relay that dies mid-batch must not keep its partition locks for long.
///
/// `synchronous_commit = off`: a batch's commit (rows marked published)
/// does not wait for its WAL flush, which keeps a disk flush out of every
/// event's path to the broker. Losing such a commit in a database crash
/// only makes its rows pending again: they are sent again with the same
/// message ids, a duplicate the consumers absorb, never a loss. (The
/// producers' commits, which create the events, stay synchronous.)
async fn connect_database(shared: &Shared) -> Result<AsyncPgConnection> {
    let mut conn = store::connect(&shared.config.database_url).await?;
    let idle_ms = (shared.config.confirm_timeout + BATCH_SLACK).as_millis();
    conn.batch_execute(&format!(
        "SET idle_in_transaction_session_timeout = {idle_ms}; SET statement_timeout = {}; \
         SET synchronous_commit = off",
        BATCH_SLACK.as_millis()
    ))
    .await
    .map_err(crate::Error::db("setting session limits"))?;
    Ok(conn)
}

/// One batch, in one transaction: claims rows from `partitions` in turn
/// until `batch_size` rows are claimed (each claim takes its partition's
/// lock, held until the results are recorded), publishes them together,
/// waits for their confirms once and records the results. Several quiet
/// partitions with news thus cost one confirm wait and one commit, not one
/// each: that keeps an event from waiting behind other partitions' batches.
async fn process(
    shared: &Shared,
    conn: &mut AsyncPgConnection,
    publisher: &Publisher,
    partitions: &[i16],
    carefully: bool,
) -> Result<Batch> {
    let config = &shared.config;
    let store = &shared.store;
    // Read committed: the snapshot must be taken after the lock, per statement.
    let batch = conn
        .build_transaction()
        .read_committed()
        .run::<_, crate::Error, _>(async |conn| {
            let mut batch = Batch::default();
            let mut rows: Vec<PendingRow> = Vec::new();
            let mut bytes = 0u64;
            for &partition in partitions {
                let limit = config.batch_size - u32::try_from(rows.len()).unwrap_or(u32::MAX);
                let budget = config.batch_bytes.saturating_sub(bytes);
                if limit == 0 || budget == 0 {
                    break;
                }
                // Empty also when another relay holds the partition now.
                let claimed = store.claim(conn, partition, limit, budget).await?;
                let claimed_bytes: u64 = claimed.iter().map(|r| r.payload.len() as u64).sum();
                if claimed.len() >= limit as usize || claimed_bytes >= budget {
                    batch.full.push(partition);
                }
                bytes += claimed_bytes;
                batch.claimed.push(partition);
                rows.extend(claimed);
            }
            if rows.is_empty() {
                return Ok(batch);
            }
            let (outcomes, channel_error) = publisher
                .publish(&rows, config.confirm_timeout, carefully)
                .await;
            batch.needs_care = channel_error;
            let results = sort_outcomes(config, &rows, outcomes);
            store
                .mark_published(conn, &results.published, config.retention.is_some())
                .await?;
            store.mark_failed(conn, &results.refused).await?;
            store.note_unknown(conn, &results.unknown).await?;
            let parked = results.refused.iter().filter(|f| f.park).count();
            batch.published = results.published.len() as u64;
            batch.retried = (results.refused.len() - parked + results.unknown.len()) as u64;
            batch.parked = parked as u64;
            debug!(
                rows = rows.len(),
                published = results.published.len(),
                refused = results.refused.len(),
                unknown = results.unknown.len(),
                "batch done"
            );
            Ok(batch)
        })
        .await?;
    // Counted once the marks are committed: a batch whose commit failed is
    // claimed and sent again, and would otherwise be counted twice.
    metrics::counter!(m::PUBLISHED).increment(batch.published);
    metrics::counter!(m::RETRIED).increment(batch.retried);
    metrics::counter!(m::PARKED).increment(batch.parked);
    Ok(batch)
}

/// What to record for each row of a batch.
#[derive(Debug, Default)]
struct Results {
    published: Vec<Uuid>,
    refused: Vec<Failure>,
    unknown: Vec<(Uuid, String)>,
}

/// Sorts a batch's outcomes into what to record. Once a row of a key is not
/// confirmed, the key's later rows in the batch are left pending even if
/// confirmed: they are sent again after it (the same ids; consumers dedupe),
/// so the key's latest copy never precedes its earlier event.
fn sort_outcomes(
    config: &crate::RelayConfig,
    rows: &[PendingRow],
    outcomes: Vec<Outcome>,
) -> Results {
    let now = chrono::Utc::now();
    let mut held: HashSet<&str> = HashSet::new();
    let mut results = Results::default();
    for (row, outcome) in rows.iter().zip(outcomes) {
        let key = row.ordering_key.as_deref();
        let behind_failure = key.is_some_and(|k| held.contains(k));
        match outcome {
            Outcome::Confirmed { latency } if !behind_failure => {
                results.published.push(row.id);
                metrics::histogram!(m::CONFIRM_LATENCY).record(latency.as_secs_f64());
                let since_commit = (now - row.created_at).to_std().unwrap_or(Duration::ZERO);
                metrics::histogram!(m::COMMIT_TO_CONFIRM).record(since_commit.as_secs_f64());
            }
            Outcome::Confirmed { .. } => results.unknown.push((
                row.id,
                "sent again: an earlier event of its key failed in the same batch".to_owned(),
            )),
            Outcome::Refused(error) => {
                let attempts = u32::try_from(row.attempts).unwrap_or(0) + 1;
                let park = config.retry.exhausted(attempts);
                warn!(
                    id = %row.id, exchange = %row.exchange, routing_key = %row.routing_key,
                    attempts, parked = park, error = %error, "publish refused"
                );
                results.refused.push(Failure {
                    id: row.id,
                    error,
                    retry_after: config.retry.delay(attempts),
                    park,
                });
            }
            Outcome::Poison(error) => {
                warn!(
                    id = %row.id, exchange = %row.exchange, routing_key = %row.routing_key,
                    error = %error, "row cannot be sent as it is; parked"
                );
                results.refused.push(Failure {
                    id: row.id,
                    error,
                    retry_after: Duration::ZERO,
                    park: true,
                });
            }
            Outcome::Unknown(error) => results.unknown.push((row.id, error)),
        }
        let failed = !matches!(results.published.last(), Some(id) if *id == row.id);
        if failed && let Some(k) = key {
            held.insert(k);
        }
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(n: u128, key: Option<&str>, attempts: i32) -> PendingRow {
        PendingRow {
            seq: n as i64,
            id: Uuid::from_u128(n),
            ordering_key: key.map(str::to_owned),
            key_seq: key.map(|_| n as i64),
            exchange: "order".into(),
            routing_key: "order.v1.x".into(),
            event_type: "x".into(),
            event_version: 1,
            payload: b"{}".to_vec(),
            headers: "{}".into(),
            created_at: chrono::Utc::now(),
            attempts,
            key_prev: None,
            key_prev_any: None,
        }
    }

    fn ok() -> Outcome {
        Outcome::Confirmed {
            latency: Duration::ZERO,
        }
    }

    #[test]
    fn later_rows_of_a_failed_key_are_sent_again_and_other_keys_are_not_held() {
        let config = crate::RelayConfig::default();
        let rows = [
            row(1, Some("a"), 0),
            row(2, Some("b"), 0),
            row(3, Some("a"), 0),
            row(4, None, 0),
            row(5, Some("b"), 0),
        ];
        let outcomes = vec![
            Outcome::Refused("returned".into()),
            ok(),
            ok(),
            Outcome::Unknown("lost".into()),
            ok(),
        ];
        let results = sort_outcomes(&config, &rows, outcomes);
        assert_eq!(results.published, [Uuid::from_u128(2), Uuid::from_u128(5)]);
        assert_eq!(results.refused.len(), 1);
        assert_eq!(results.refused[0].id, Uuid::from_u128(1));
        assert!(!results.refused[0].park);
        let unknown: Vec<Uuid> = results.unknown.iter().map(|u| u.0).collect();
        assert_eq!(unknown, [Uuid::from_u128(3), Uuid::from_u128(4)]);
    }

    #[test]
    fn the_last_refused_attempt_parks() {
        let config = crate::RelayConfig::default();
        let max = config.retry.max_attempts as i32;
        let results = sort_outcomes(
            &config,
            &[row(1, Some("a"), max - 1)],
            vec![Outcome::Refused("nacked".into())],
        );
        assert!(results.refused[0].park);
    }
}
