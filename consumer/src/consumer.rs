//! [`Consumer`]: typed handlers on a named consumer, and its run loop:
//! the topology declared and recorded, sessions on the broker, reconnects
//! with backoff, queue sharing among instances, and pruning of old message
//! ids.

use std::sync::{Arc, Mutex};

use diesel::{Connection, PgConnection};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::config::ConsumerConfig;
use crate::envelope::Envelope;
use crate::handler::{HandlerResult, Route, Routes};
use crate::inbox::Inbox;
use crate::session::Assignment;
use crate::stats::{Counters, Stats};
use crate::topology::{self, Topology};
use crate::{Error, Result, members, route, session};

/// What the sessions and lanes of one consumer share.
pub(crate) struct Shared {
    pub(crate) config: ConsumerConfig,
    pub(crate) routes: Routes,
    pub(crate) inbox: Inbox,
    pub(crate) counters: Counters,
    /// This instance's id (its rank among the live ones; in its broker
    /// connection's name and its logs, to tell instances apart).
    pub(crate) instance: uuid::Uuid,
    /// Poked when the recorded topology changed, so membership looks now.
    pub(crate) membership_changed: Notify,
    /// The queues the current session consumes (for [`Consumer::queues`]).
    pub(crate) subscribed: Mutex<Vec<String>>,
    /// Lane connections kept from one session to the next.
    connections: Mutex<Vec<PgConnection>>,
}

impl Shared {
    pub(crate) fn take_connections(&self) -> Vec<PgConnection> {
        std::mem::take(&mut *self.connections.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub(crate) fn set_subscribed(&self, queues: Vec<String>) {
        *self.subscribed.lock().unwrap_or_else(|p| p.into_inner()) = queues;
    }

    pub(crate) fn return_connections(&self, conns: Vec<PgConnection>) {
        self.connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(conns);
    }
}

/// Collects a consumer's handlers; [`ConsumerBuilder::build`] checks them.
pub struct ConsumerBuilder {
    config: ConsumerConfig,
    routes: Vec<Route>,
}

impl ConsumerBuilder {
    /// Handles messages published to `exchange` whose routing key matches
    /// the topic `pattern` (`order.*.submitted` takes every version) with
    /// `handler`, which gets the inbox transaction's connection and the
    /// deserialized event. Its writes commit with the dedupe row; `Err`
    /// retries or discards (see [`HandlerError`](crate::HandlerError)). A
    /// body that does not deserialize as `E` is dead-lettered at once.
    /// The first handler whose pattern matches gets the message.
    #[must_use]
    pub fn handle<E, F>(mut self, exchange: &str, pattern: &str, handler: F) -> Self
    where
        E: DeserializeOwned + Send + 'static,
        F: Fn(&mut PgConnection, Envelope<E>) -> HandlerResult + Send + Sync + 'static,
    {
        self.routes.push(Route::sync(exchange, pattern, handler));
        self
    }

    /// Like [`ConsumerBuilder::handle`], for a handler on diesel-async's
    /// `AsyncPgConnection` (feature `async`). Return the future boxed:
    /// `|conn, envelope| Box::pin(async move { ... })`.
    #[cfg(feature = "async")]
    #[must_use]
    pub fn handle_async<E, F>(mut self, exchange: &str, pattern: &str, handler: F) -> Self
    where
        E: DeserializeOwned + Send + 'static,
        F: for<'c> Fn(
                &'c mut diesel_async::AsyncPgConnection,
                Envelope<E>,
            ) -> crate::handler::BoxFuture<'c, HandlerResult>
            + Send
            + Sync
            + 'static,
    {
        self.routes
            .push(Route::asynchronous(exchange, pattern, handler));
        self
    }

    /// Checks the configuration and the bindings.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming the field or binding that is wrong.
    pub fn build(self) -> Result<Consumer> {
        self.config.validate()?;
        if self.routes.is_empty() {
            return Err(Error::Config {
                field: "handlers",
                reason: "a consumer needs at least one handler".into(),
            });
        }
        for r in &self.routes {
            if r.exchange.is_empty() || r.exchange.len() > 255 {
                return Err(Error::Config {
                    field: "handler exchange",
                    reason: format!("{:?} must be 1 to 255 bytes", r.exchange),
                });
            }
            route::validate_pattern(&r.pattern).map_err(|reason| Error::Config {
                field: "handler pattern",
                reason,
            })?;
        }
        let inbox = Inbox::new(&self.config.name, &self.config.schema)?
            .with_max_ahead(self.config.max_ahead);
        Ok(Consumer {
            shared: Arc::new(Shared {
                config: self.config,
                routes: Routes(self.routes),
                inbox,
                counters: Counters::default(),
                instance: uuid::Uuid::now_v7(),
                membership_changed: Notify::new(),
                subscribed: Mutex::new(Vec::new()),
                connections: Mutex::new(Vec::new()),
            }),
        })
    }
}

/// A named consumer with its handlers. Cheap to clone; clones share counters.
#[derive(Clone)]
pub struct Consumer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("config", &self.shared.config)
            .field("handlers", &self.shared.routes.0.len())
            .finish()
    }
}

impl Consumer {
    /// Starts describing a consumer.
    pub fn builder(config: ConsumerConfig) -> ConsumerBuilder {
        ConsumerBuilder {
            config,
            routes: Vec::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ConsumerConfig {
        &self.shared.config
    }

    /// What this consumer has done so far.
    pub fn stats(&self) -> Stats {
        self.shared.counters.snapshot()
    }

    /// The queues this instance consumes now (empty between sessions): its
    /// share of the partition queues, and of the queues being drained.
    pub fn queues(&self) -> Vec<String> {
        self.shared
            .subscribed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Declares the consumer's queues, exchanges and bindings now
    /// (idempotently), records its partition count, and returns.
    /// [`Consumer::run`] does it too, but a message published before its
    /// consumer's binding exists never reaches that consumer (and
    /// `mandatory` does not catch it when another consumer's queue took
    /// it). So declare at deploy time, or before the producers start.
    ///
    /// # Errors
    ///
    /// [`Error::Connect`], [`Error::Broker`], [`Error::Database`] or
    /// [`Error::Topology`].
    pub async fn declare(&self) -> Result<()> {
        let connection = session::connect(&self.shared).await?;
        let result = reconcile(&self.shared, &connection, self.shared.config.partitions).await;
        session::quietly(connection.close(200, "declared".into())).await;
        result.map(|_| ())
    }

    /// Declares the topology and consumes until `shutdown` is cancelled:
    /// then it stops taking deliveries, lets running handlers finish and
    /// ack (up to `shutdown_timeout`), closes its channels (unacked
    /// deliveries go back to their queues) and returns `Ok`. A broker or
    /// database that is down or goes away, at start or later, is retried
    /// with backoff, forever.
    ///
    /// # Errors
    ///
    /// [`Error::Topology`] when the broker refuses the consumer's objects
    /// in a way a retry would not fix (they exist with other arguments, or
    /// the user lacks the permission); the error names the object.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<()> {
        let shared = &self.shared;
        let config = &shared.config;
        let stop_tasks = shutdown.child_token();
        let (assignment_tx, mut assignment) = watch::channel::<Option<Assignment>>(None);
        let member = members::Member::new(&config.schema, &config.name, shared.instance);
        let membership = tokio::spawn(membership(
            Arc::clone(shared),
            member,
            assignment_tx,
            stop_tasks.clone(),
        ));
        let prune = tokio::spawn(prune_loop(Arc::clone(shared), stop_tasks.clone()));

        let mut delays = config.retry.reconnect_delays();
        let mut connection: Option<lapin::Connection> = None;
        // The configured count applies at this instance's first declaration;
        // later ones (after a reconnect) follow the recorded count, which
        // another instance may have changed.
        let mut first = true;
        let result = loop {
            if shutdown.is_cancelled() {
                break Ok(());
            }
            let failure = async {
                let conn = match connection.take() {
                    Some(conn) if conn.status().connected() => conn,
                    _ => {
                        let conn = session::connect(shared).await?;
                        let partitions = if first { Some(config.partitions) } else { None };
                        reconcile_following(shared, &conn, partitions).await?;
                        first = false;
                        shared.membership_changed.notify_one();
                        conn
                    }
                };
                let Some(queues) = wait_assignment(&mut assignment, &shutdown).await else {
                    connection = Some(conn);
                    return Ok(());
                };
                let end = shutdown.child_token();
                let watcher = {
                    let end = end.clone();
                    let mut assignment = assignment.clone();
                    tokio::spawn(async move {
                        if assignment.changed().await.is_ok() {
                            end.cancel();
                        }
                    })
                };
                tracing::info!(consumer = %config.name, instance = %shared.instance, queues = ?queues.queues, "consumer session starting");
                let ended = session::consume(shared, &conn, &queues, &end).await;
                watcher.abort();
                if ended.is_ok() && conn.status().connected() {
                    connection = Some(conn);
                } else {
                    session::quietly(conn.close(200, "consumer session over".into())).await;
                }
                ended.map(|_| ())
            }
            .await;
            match failure {
                Ok(()) => delays = config.retry.reconnect_delays(),
                Err(e @ (Error::Topology { .. } | Error::Config { .. })) => break Err(e),
                Err(Error::UnreadableDelivery { cause }) => {
                    // The same message would end every session: move it
                    // aside first (it is at the front of one of our queues).
                    let queues = assignment
                        .borrow()
                        .as_ref()
                        .map(|a| a.queues.clone())
                        .unwrap_or_default();
                    tracing::warn!(consumer = %config.name, %cause, "a delivery the client cannot parse ended the session; moving it to the dead-letter queue");
                    if let Err(e) = crate::quarantine::quarantine(shared, &queues).await {
                        let delay = delays.next().unwrap_or(config.retry.max_delay);
                        tracing::error!(consumer = %config.name, error = %e, ?delay, "could not move the unreadable delivery aside; retrying");
                        tokio::select! {
                            () = shutdown.cancelled() => {}
                            () = tokio::time::sleep(delay) => {}
                        }
                    }
                }
                Err(e) => {
                    let delay = delays.next().unwrap_or(config.retry.max_delay);
                    tracing::warn!(consumer = %config.name, error = %e, ?delay, "consumer session ended; reconnecting");
                    tokio::select! {
                        () = shutdown.cancelled() => {}
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        };
        if let Some(conn) = connection {
            session::quietly(conn.close(200, "consumer stopping".into())).await;
        }
        stop_tasks.cancel();
        let _ = prune.await;
        if let Ok(member) = membership.await {
            let _ = tokio::task::spawn_blocking(move || member.leave()).await;
        }
        result
    }
}

/// The next assignment, once there is one; `None` at shutdown.
async fn wait_assignment(
    assignment: &mut watch::Receiver<Option<Assignment>>,
    shutdown: &CancellationToken,
) -> Option<Assignment> {
    loop {
        if let Some(a) = assignment.borrow_and_update().clone() {
            return Some(a);
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            changed = assignment.changed() => if changed.is_err() { return None },
        }
    }
}

/// Declares the topology for `partitions` (or, when `None`, the recorded
/// count) on `connection`, and records it.
async fn reconcile_following(
    shared: &Arc<Shared>,
    connection: &lapin::Connection,
    partitions: Option<u16>,
) -> Result<Topology> {
    let recorded = read_topology(shared).await?;
    let partitions = partitions
        .or(recorded.as_ref().map(|t| t.partitions))
        .unwrap_or(shared.config.partitions);
    declare_and_record(shared, connection, partitions, recorded).await
}

/// Declares the topology for `partitions` on `connection`, and records it.
async fn reconcile(
    shared: &Arc<Shared>,
    connection: &lapin::Connection,
    partitions: u16,
) -> Result<Topology> {
    let recorded = read_topology(shared).await?;
    declare_and_record(shared, connection, partitions, recorded).await
}

async fn declare_and_record(
    shared: &Arc<Shared>,
    connection: &lapin::Connection,
    partitions: u16,
    recorded: Option<Topology>,
) -> Result<Topology> {
    let config = &shared.config;
    let before = match &recorded {
        Some(t) => topology::Before::Recorded(t),
        None => {
            let ran = with_database(shared, "looking for inbox rows", |conn, config| {
                topology::has_history(conn, &config.schema, &config.name)
            })
            .await?;
            if ran {
                topology::Before::EarlierVersion
            } else {
                topology::Before::Nothing
            }
        }
    };
    let topology =
        topology::declare(connection, config, &shared.routes, partitions, before).await?;
    if recorded.as_ref() != Some(&topology) {
        if let Some(before) = &recorded
            && before.partitions != topology.partitions
        {
            tracing::info!(consumer = %config.name, from = before.partitions, to = topology.partitions, retiring = ?topology.retiring, "partition count changed");
        }
        let record = topology.clone();
        with_database(shared, "recording the topology", move |conn, config| {
            topology::write(conn, &config.schema, &config.name, &record)
        })
        .await?;
    }
    Ok(topology)
}

async fn read_topology(shared: &Arc<Shared>) -> Result<Option<Topology>> {
    with_database(shared, "reading the topology", |conn, config| {
        topology::read(conn, &config.schema, &config.name)
    })
    .await
}

/// Runs `f` on a fresh database connection on a blocking thread.
async fn with_database<T: Send + 'static>(
    shared: &Arc<Shared>,
    operation: &'static str,
    f: impl FnOnce(&mut PgConnection, &ConsumerConfig) -> diesel::QueryResult<T> + Send + 'static,
) -> Result<T> {
    let shared = Arc::clone(shared);
    tokio::task::spawn_blocking(move || {
        let config = &shared.config;
        let mut conn =
            PgConnection::establish(&config.database_url).map_err(|e| Error::Connect {
                what: "database",
                url: outbox::redact_url(&config.database_url),
                cause: e.to_string(),
            })?;
        f(&mut conn, config).map_err(|cause| Error::Database { operation, cause })
    })
    .await
    .map_err(|e| Error::Handler(format!("{operation} panicked: {e}")))?
}

/// Checks who is alive every `membership_interval` (and when poked), and
/// publishes this instance's share of the queues. Returns the member, to
/// leave with.
async fn membership(
    shared: Arc<Shared>,
    mut member: members::Member,
    assignment: watch::Sender<Option<Assignment>>,
    stop: CancellationToken,
) -> members::Member {
    let config = &shared.config;
    loop {
        let url = config.database_url.clone();
        let checked = tokio::task::spawn_blocking(move || {
            let view = member.check(&url);
            (member, view)
        })
        .await;
        let view = match checked {
            Ok((m, view)) => {
                member = m;
                view
            }
            Err(e) => {
                tracing::error!(consumer = %config.name, error = %e, "membership task failed");
                return members::Member::new(&config.schema, &config.name, shared.instance);
            }
        };
        match view {
            Ok(view) => {
                let next = view.topology.as_ref().map(|topology| {
                    let rank = view
                        .live
                        .iter()
                        .position(|i| *i == member.instance)
                        .unwrap_or(0);
                    Assignment {
                        queues: members::assigned(&config.name, topology, rank, view.live.len()),
                        retiring: topology.retiring.iter().cloned().collect(),
                    }
                });
                assignment.send_if_modified(|current| {
                    if *current == next || next.is_none() {
                        false
                    } else {
                        tracing::info!(consumer = %config.name, instance = %member.instance, instances = view.live.len(), queues = ?next.as_ref().map(|a| &a.queues), "queues assigned");
                        *current = next;
                        true
                    }
                });
            }
            // Keep the current queues: single active consumer and the key
            // locks keep order if another instance takes them meanwhile.
            Err(e) => {
                tracing::warn!(consumer = %config.name, error = %e, "membership check failed")
            }
        }
        tokio::select! {
            () = stop.cancelled() => return member,
            () = shared.membership_changed.notified() => {}
            () = tokio::time::sleep(config.membership_interval) => {}
        }
    }
}

/// Deletes message ids older than the retention, in batches, now and then.
async fn prune_loop(shared: Arc<Shared>, stop: CancellationToken) {
    const BATCH: i64 = 1000;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(shared.config.prune_interval) => {}
        }
        let task_shared = Arc::clone(&shared);
        let pruned = tokio::task::spawn_blocking(move || {
            let config = &task_shared.config;
            let mut conn = crate::connect::database(config).map_err(|e| e.to_string())?;
            let mut total = 0;
            loop {
                let n = members::prune(
                    &mut conn,
                    &config.schema,
                    &config.name,
                    config.dedupe_retention,
                    BATCH,
                )
                .map_err(|e| e.to_string())?;
                total += n;
                if (n as i64) < BATCH {
                    return Ok::<_, String>(total);
                }
            }
        })
        .await;
        match pruned {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => {
                tracing::info!(consumer = %shared.config.name, pruned = n, "old message ids pruned")
            }
            Ok(Err(e)) => {
                tracing::warn!(consumer = %shared.config.name, error = %e, "pruning failed")
            }
            Err(e) => {
                tracing::warn!(consumer = %shared.config.name, error = %e, "pruning task failed")
            }
        }
    }
}
