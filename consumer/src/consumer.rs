//! [`Consumer`]: typed handlers on a named consumer, and its run loop:
//! sessions on the broker, reconnects with backoff, queue sharing among
//! instances, and pruning of old message ids.

use std::sync::{Arc, Mutex};

use diesel::{Connection, PgConnection};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::ConsumerConfig;
use crate::envelope::Envelope;
use crate::handler::{HandlerResult, Route, Routes};
use crate::inbox::Inbox;
use crate::stats::{Counters, Stats};
use crate::{Error, Result, members, route, session};

/// What the sessions and lanes of one consumer share.
pub(crate) struct Shared {
    pub(crate) config: ConsumerConfig,
    pub(crate) routes: Routes,
    pub(crate) inbox: Inbox,
    pub(crate) counters: Counters,
    /// Lane connections kept from one session to the next.
    connections: Mutex<Vec<PgConnection>>,
}

impl Shared {
    pub(crate) fn take_connections(&self) -> Vec<PgConnection> {
        std::mem::take(&mut *self.connections.lock().unwrap_or_else(|p| p.into_inner()))
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
        let inbox = Inbox::new(&self.config.name, &self.config.schema)?;
        Ok(Consumer {
            shared: Arc::new(Shared {
                config: self.config,
                routes: Routes(self.routes),
                inbox,
                counters: Counters::default(),
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

    /// Declares the consumer's queues, exchanges and bindings now
    /// (idempotently) and returns. [`Consumer::run`] does it too, but a
    /// message published before its consumer's binding exists never reaches
    /// that consumer (and `mandatory` does not catch it when another
    /// consumer's queue took it). So declare at deploy time, or before the
    /// producers start.
    ///
    /// # Errors
    ///
    /// [`Error::Connect`], [`Error::Broker`] or [`Error::Topology`].
    pub async fn declare(&self) -> Result<()> {
        let connection = session::connect(&self.shared).await?;
        let result = async {
            let channel = connection
                .create_channel()
                .await
                .map_err(|e| Error::Broker {
                    operation: "opening a channel",
                    cause: e.to_string(),
                })?;
            crate::topology::declare(&channel, &self.shared.config, &self.shared.routes).await
        }
        .await;
        let _ = connection.close(200, "declared".into()).await;
        result
    }

    /// Declares the topology and consumes until `shutdown` is cancelled:
    /// then it stops taking deliveries, lets running handlers finish and
    /// ack (up to `shutdown_timeout`), closes its channels (unacked
    /// deliveries go back to their queues) and returns `Ok`. A lost broker
    /// or database connection is retried with backoff, forever.
    ///
    /// # Errors
    ///
    /// [`Error::Topology`] when the broker refuses the consumer's objects
    /// (they exist with other arguments), which a retry would not fix.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<()> {
        let shared = &self.shared;
        let config = &shared.config;
        let instance = Uuid::now_v7();
        let stop_tasks = shutdown.child_token();
        let (assignment_tx, mut assignment) = watch::channel::<Option<Vec<u16>>>(None);
        let mut tasks = Vec::new();
        if config.partitions == 1 {
            let _ = assignment_tx.send(Some(vec![0]));
        } else {
            tasks.push(tokio::spawn(membership(
                Arc::clone(shared),
                instance,
                assignment_tx,
                stop_tasks.clone(),
            )));
        }
        tasks.push(tokio::spawn(prune_loop(
            Arc::clone(shared),
            stop_tasks.clone(),
        )));

        let mut delays = config.retry.reconnect_delays();
        let result = loop {
            if shutdown.is_cancelled() {
                break Ok(());
            }
            // Wait for the first assignment (partitions > 1).
            let queues = loop {
                if let Some(q) = assignment.borrow_and_update().clone() {
                    break Some(q);
                }
                tokio::select! {
                    () = shutdown.cancelled() => break None,
                    changed = assignment.changed() => if changed.is_err() { break None },
                }
            };
            let Some(queues) = queues else {
                break Ok(());
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
            tracing::info!(consumer = %config.name, ?queues, "consumer session starting");
            let outcome = session::run(shared, &queues, &end).await;
            watcher.abort();
            match outcome {
                Ok(()) => delays = config.retry.reconnect_delays(),
                Err(e @ (Error::Topology { .. } | Error::Config { .. })) => break Err(e),
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
        stop_tasks.cancel();
        for task in tasks {
            let _ = task.await;
        }
        if config.partitions > 1 {
            let shared = Arc::clone(shared);
            let _ = tokio::task::spawn_blocking(move || {
                let mut conn = PgConnection::establish(&shared.config.database_url).ok()?;
                members::leave(
                    &mut conn,
                    &shared.config.schema,
                    &shared.config.name,
                    instance,
                )
                .ok()
            })
            .await;
        }
        result
    }
}

/// Heartbeats and publishes this instance's share of the partition queues.
async fn membership(
    shared: Arc<Shared>,
    instance: Uuid,
    assignment: watch::Sender<Option<Vec<u16>>>,
    stop: CancellationToken,
) {
    let config = &shared.config;
    let every = config.member_ttl / 3;
    let mut conn: Option<PgConnection> = None;
    loop {
        let beat = {
            let shared = Arc::clone(&shared);
            let taken = conn.take();
            tokio::task::spawn_blocking(move || {
                let mut c = match taken {
                    Some(c) => c,
                    None => PgConnection::establish(&shared.config.database_url)
                        .map_err(|e| e.to_string())?,
                };
                let config = &shared.config;
                let live = members::heartbeat(
                    &mut c,
                    &config.schema,
                    &config.name,
                    instance,
                    config.member_ttl,
                )
                .map_err(|e| e.to_string())?;
                Ok::<_, String>((c, live))
            })
            .await
        };
        match beat {
            Ok(Ok((c, live))) => {
                conn = Some(c);
                let queues = match live.iter().position(|i| *i == instance) {
                    Some(rank) => members::assigned(config.partitions, rank, live.len()),
                    None => Vec::new(),
                };
                assignment.send_if_modified(|current| {
                    if current.as_ref() == Some(&queues) {
                        false
                    } else {
                        tracing::info!(consumer = %config.name, instances = live.len(), ?queues, "partition queues reassigned");
                        *current = Some(queues);
                        true
                    }
                });
            }
            // Keep the current queues: single active consumer and the key
            // locks keep order if another instance takes them meanwhile.
            Ok(Err(e)) => tracing::warn!(consumer = %config.name, error = %e, "heartbeat failed"),
            Err(e) => tracing::warn!(consumer = %config.name, error = %e, "heartbeat task failed"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
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
            let mut conn =
                PgConnection::establish(&config.database_url).map_err(|e| e.to_string())?;
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
