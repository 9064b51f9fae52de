//! `Relay::run`: starts the workers, the LISTEN task, the gauges, the
//! retention clean-up and the HTTP endpoints, and stops them gracefully.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use diesel_async::{AsyncPgConnection, RunQueryDsl};
use futures_util::StreamExt;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::health::{self, Health};
use crate::store::{self, Settings, Store};
use crate::worker::{self, Wake};
use crate::{RelayConfig, Result, metrics as m};

/// How long the LISTEN connection may take to answer a ping.
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// State every task of one relay shares.
pub(crate) struct Shared {
    pub(crate) config: RelayConfig,
    pub(crate) store: Store,
    pub(crate) health: Arc<Health>,
    pub(crate) cancel: CancellationToken,
    /// Shown in the broker's connection names, to tell relays apart.
    pub(crate) instance: String,
}

/// A relay: ships committed outbox rows to RabbitMQ.
///
/// ```no_run
/// # async fn example() -> relay::Result<()> {
/// let relay = relay::Relay::new(relay::RelayConfig {
///     database_url: "postgres://postgres@127.0.0.1/test".into(),
///     amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
///     ..relay::RelayConfig::default()
/// })?;
/// relay.run(async { tokio::signal::ctrl_c().await.ok(); }).await
/// # }
/// ```
pub struct Relay {
    config: RelayConfig,
    metrics: Option<PrometheusHandle>,
    health: Arc<Health>,
}

impl Relay {
    /// A relay with the given config.
    ///
    /// # Errors
    ///
    /// [`crate::Error::Config`] naming the field when the config is invalid.
    pub fn new(config: RelayConfig) -> Result<Self> {
        config.validate()?;
        let health = Arc::new(Health::new(config.workers as usize));
        Ok(Relay {
            config,
            metrics: None,
            health,
        })
    }

    /// Serves this Prometheus handle's metrics at `/metrics`.
    pub fn with_metrics(mut self, handle: PrometheusHandle) -> Self {
        self.metrics = Some(handle);
        self
    }

    /// The relay's view of the database and broker, as `/readyz` reports it.
    pub fn health(&self) -> Arc<Health> {
        Arc::clone(&self.health)
    }

    /// Runs until `shutdown` completes, then stops claiming batches,
    /// finishes those under way and returns.
    ///
    /// A database or broker that is down at start or goes away later is
    /// waited for with backoff (readiness says so); rows wait in the outbox.
    ///
    /// # Errors
    ///
    /// [`crate::Error::NotMigrated`] when the outbox tables are missing, and
    /// [`crate::Error::Config`] when the HTTP address cannot be bound.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let cancel = CancellationToken::new();
        let shared = Arc::new(Shared {
            store: Store::new(&self.config.schema),
            health: Arc::clone(&self.health),
            cancel: cancel.clone(),
            instance: uuid::Uuid::now_v7().simple().to_string()[20..].to_owned(),
            config: self.config,
        });
        let mut tasks = JoinSet::new();
        if let Some(addr) = shared.config.http_addr {
            let listener = health::bind(addr).await?;
            info!(%addr, "serving /healthz, /readyz and /metrics");
            tasks.spawn(health::serve(
                listener,
                Arc::clone(&shared.health),
                self.metrics,
                cancel.clone(),
            ));
        }

        let run = async {
            let Some(settings) = settings_with_retry(&shared).await? else {
                return Ok(()); // stopped before the database came up
            };
            let workers = (shared.config.workers as usize).min(settings.partitions as usize);
            info!(
                partitions = settings.partitions,
                workers,
                schema = %shared.config.schema,
                "relay started"
            );
            let wakes: Vec<Arc<Wake>> = (0..workers).map(|_| Arc::new(Wake::default())).collect();
            for (index, wake) in wakes.iter().enumerate() {
                let partitions: Vec<i16> = (0..settings.partitions)
                    .filter(|p| *p as usize % workers == index)
                    .collect();
                tasks.spawn(supervise(
                    index,
                    partitions,
                    Arc::clone(wake),
                    Arc::clone(&shared),
                ));
            }
            // Workers beyond the partition count have nothing to do; count
            // them as healthy so readiness reflects the working ones.
            for idle in workers..shared.config.workers as usize {
                shared.health.set_database(idle, true);
                shared.health.set_broker(idle, true);
            }
            shared.health.set_started();
            if shared.config.listen {
                tasks.spawn(listen(
                    Arc::clone(&shared),
                    settings.notify_channel.clone(),
                    wakes,
                ));
            }
            tasks.spawn(gauges(Arc::clone(&shared), settings.partitions));
            if let Some(retention) = shared.config.retention {
                tasks.spawn(cleanup(Arc::clone(&shared), retention));
            }
            Ok(())
        };
        tokio::pin!(shutdown);
        // A shutdown future must not be polled again once it has completed.
        let (started, shutdown_done) = tokio::select! {
            result = run => (result, false),
            () = &mut shutdown => (Ok(()), true),
        };
        if started.is_err() || shutdown_done {
            cancel.cancel();
            while tasks.join_next().await.is_some() {}
            return started;
        }
        shutdown.await;
        info!("stopping: finishing batches under way");
        cancel.cancel();
        while tasks.join_next().await.is_some() {}
        info!("relay stopped");
        Ok(())
    }
}

/// Reads the settings, waiting for the database with backoff. `None` when
/// cancelled first; an error when the tables are missing.
async fn settings_with_retry(shared: &Shared) -> Result<Option<Settings>> {
    let mut delays = shared.config.retry.reconnect_delays();
    loop {
        let attempt = async {
            let mut conn = store::connect(&shared.config.database_url).await?;
            shared.store.settings(&mut conn).await
        };
        match attempt.await {
            Ok(settings) => return Ok(Some(settings)),
            Err(e @ crate::Error::NotMigrated { .. }) => return Err(e),
            Err(e) => warn!(error = %e, "cannot read the outbox settings; retrying"),
        }
        let delay = delays.next().unwrap_or(shared.config.retry.max_delay);
        tokio::select! {
            () = shared.cancel.cancelled() => return Ok(None),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// LISTENs for the enqueue's NOTIFY and wakes the worker of the partition.
/// The connection is pinged every poll interval, since a dead one yields no
/// error on its own; on failure it reconnects, and the poll fallback covers
/// the gap.
async fn listen(shared: Arc<Shared>, channel: String, wakes: Vec<Arc<Wake>>) {
    let mut delays = shared.config.retry.reconnect_delays();
    while !shared.cancel.is_cancelled() {
        let mut conn = match listen_connection(&shared, &channel).await {
            Ok(conn) => conn,
            Err(e) => {
                warn!(error = %e, "LISTEN connection failed; relying on polling until it is back");
                let delay = delays.next().unwrap_or(shared.config.retry.max_delay);
                tokio::select! {
                    () = shared.cancel.cancelled() => return,
                    () = tokio::time::sleep(delay) => continue,
                }
            }
        };
        delays = shared.config.retry.reconnect_delays();
        // Whatever was missed while disconnected is picked up by a scan.
        for wake in &wakes {
            wake.rescan();
        }
        let mut ping =
            tokio::time::interval(shared.config.poll_interval.max(Duration::from_secs(1)));
        loop {
            let next = {
                let mut stream = std::pin::pin!(conn.notifications_stream());
                tokio::select! {
                    () = shared.cancel.cancelled() => return,
                    n = stream.next() => Some(n),
                    _ = ping.tick() => None,
                }
            };
            match next {
                Some(Some(Ok(notification))) => {
                    if let Ok(partition) = notification.payload.parse::<i16>() {
                        let worker = partition.unsigned_abs() as usize % wakes.len();
                        wakes[worker].partition(partition);
                    }
                }
                Some(Some(Err(e))) => {
                    warn!(error = %e, "LISTEN connection lost");
                    break;
                }
                Some(None) => break,
                None => {
                    // A silently dead connection yields nothing: ping it,
                    // with a bound, since a dead peer never answers.
                    let ping = tokio::time::timeout(PING_TIMEOUT, store::Store::ping(&mut conn));
                    match ping.await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            warn!(error = %e, "LISTEN connection lost");
                            break;
                        }
                        Err(_) => {
                            warn!("LISTEN connection did not answer a ping; reconnecting");
                            break;
                        }
                    }
                }
            }
        }
    }
}

async fn listen_connection(shared: &Shared, channel: &str) -> Result<AsyncPgConnection> {
    let mut conn = store::connect(&shared.config.database_url).await?;
    diesel::sql_query(format!(r#"LISTEN "{}""#, channel.replace('"', "\"\"")))
        .execute(&mut conn)
        .await
        .map_err(crate::Error::db("starting LISTEN"))?;
    Ok(conn)
}

/// Runs worker `index` and starts it again if it ends unexpectedly (a
/// panic: a bug, since bad rows are parked, not panicked on), counting the
/// restarts; readiness says the worker is down meanwhile.
async fn supervise(index: usize, partitions: Vec<i16>, wake: Arc<Wake>, shared: Arc<Shared>) {
    loop {
        let run = tokio::spawn(worker::run(
            index,
            partitions.clone(),
            Arc::clone(&wake),
            Arc::clone(&shared),
        ));
        match run.await {
            Err(e) if e.is_panic() => {
                metrics::counter!(m::WORKER_RESTARTS).increment(1);
                shared.health.set_database(index, false);
                shared.health.set_broker(index, false);
                error!(worker = index, error = %e, "worker panicked; starting it again");
                // What it was doing is done again: scan everything.
                wake.rescan();
                tokio::select! {
                    () = shared.cancel.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            // Stopped (cancelled), or aborted with the relay.
            _ => return,
        }
    }
}

/// Refreshes the backlog gauges every stats interval, and parks rows no
/// worker will ever claim (a partition outside the install's count, written
/// by other means than the enqueue function).
async fn gauges(shared: Arc<Shared>, partitions: i16) {
    let mut conn: Option<AsyncPgConnection> = None;
    loop {
        if conn.is_none() {
            conn = store::connect(&shared.config.database_url).await.ok();
        }
        if let Some(c) = conn.as_mut()
            && let Err(e) = park_strays(&shared, c, partitions).await
        {
            warn!(error = %e, "cannot check for rows outside the partitions");
            conn = None;
        }
        // Waiting flags of relays that died without withdrawing them (live
        // idle workers refresh theirs each poll interval).
        let stale = shared.config.poll_interval * 10 + Duration::from_secs(30);
        if let Some(c) = conn.as_mut()
            && let Err(e) = shared.store.delete_stale_waiting(c, stale).await
        {
            warn!(error = %e, "cannot forget the waiting flags of dead relays");
            conn = None;
        }
        if let Some(c) = conn.as_mut() {
            match shared.store.totals(c).await {
                Ok(t) => {
                    metrics::gauge!(m::BACKLOG).set(t.pending as f64);
                    metrics::gauge!(m::RETRYING).set(t.retrying as f64);
                    metrics::gauge!(m::PARKED_ROWS).set(t.parked as f64);
                    metrics::gauge!(m::OLDEST_PENDING_AGE).set(t.oldest_age_seconds);
                }
                Err(e) => {
                    warn!(error = %e, "cannot read the backlog");
                    conn = None;
                }
            }
        }
        tokio::select! {
            () = shared.cancel.cancelled() => return,
            () = tokio::time::sleep(shared.config.stats_interval) => {}
        }
    }
}

async fn park_strays(shared: &Shared, conn: &mut AsyncPgConnection, partitions: i16) -> Result<()> {
    let parked = shared.store.park_strays(conn, partitions).await?;
    if parked > 0 {
        warn!(
            rows = parked,
            partitions, "parked rows whose partition no relay works"
        );
        metrics::counter!(m::PARKED).increment(parked as u64);
    }
    Ok(())
}

/// Deletes published rows past the retention, 1000 per statement, so no
/// statement holds locks for long.
async fn cleanup(shared: Arc<Shared>, retention: Duration) {
    let mut conn: Option<AsyncPgConnection> = None;
    loop {
        if conn.is_none() {
            conn = store::connect(&shared.config.database_url).await.ok();
        }
        if let Some(c) = conn.as_mut() {
            loop {
                match shared.store.delete_expired(c, retention, 1000).await {
                    Ok(n) if n == 1000 && !shared.cancel.is_cancelled() => continue,
                    Ok(_) => break,
                    Err(e) => {
                        warn!(error = %e, "retention clean-up failed");
                        conn = None;
                        break;
                    }
                }
            }
        }
        tokio::select! {
            () = shared.cancel.cancelled() => return,
            () = tokio::time::sleep(shared.config.cleanup_interval) => {}
        }
    }
}
