//! One assignment's worth of consuming on a broker connection: subscribe to
//! the assigned queues, feed deliveries and released held messages through
//! the scheduler to the lanes, sweep the held table, drain and delete
//! queues of an earlier partition count, and wind down cleanly when told to
//! (shutdown, new assignment) or when the broker connection is lost.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::PgConnection;
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection as AmqpConnection};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::consumer::Shared;
use crate::lane::{Done, Item, Lane};
use crate::schedule::{Finish, Scheduler};
use crate::stats::Counters;
use crate::{Error, Result, topology};

/// The queues one instance consumes now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Assignment {
    /// Every queue to subscribe to.
    pub(crate) queues: Vec<String>,
    /// Those of an earlier partition count: deleted once drained.
    pub(crate) retiring: BTreeSet<String>,
}

/// Why a session ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// Shutdown, or a new assignment: subscribe again as told.
    Told,
    /// A drained queue was deleted: the topology changed.
    Retired,
}

/// How often the held table is swept for messages whose turn came.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// How often drained-looking retiring queues are checked.
const RETIRE_INTERVAL: Duration = Duration::from_secs(2);
/// How long an ack or a close may take: the client may never answer on a
/// connection that died, and nothing may wait on it for long.
pub(crate) const BROKER_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Awaits a close or other call whose result does not matter, within
/// [`BROKER_CALL_TIMEOUT`].
pub(crate) async fn quietly<T>(call: impl std::future::Future<Output = T>) {
    let _ = tokio::time::timeout(BROKER_CALL_TIMEOUT, call).await;
}

/// Connects to the broker, naming the connection after the consumer and
/// the instance.
pub(crate) async fn connect(shared: &Shared) -> Result<AmqpConnection> {
    crate::connect::broker(
        &shared.config,
        format!("consumer {} {}", shared.config.name, shared.instance),
    )
    .await
}

fn broker(operation: &'static str) -> impl Fn(lapin::Error) -> Error {
    move |e| Error::Broker {
        operation,
        cause: e.to_string(),
    }
}

/// Consumes `assignment` on `connection` until `end` is cancelled, a
/// drained queue is deleted (`Ok`), or the broker connection fails (`Err`).
pub(crate) async fn consume(
    shared: &Arc<Shared>,
    connection: &AmqpConnection,
    assignment: &Assignment,
    end: &CancellationToken,
) -> Result<Ended> {
    let config = &shared.config;
    let dead_letters = connection
        .create_channel()
        .await
        .map_err(broker("opening the dead-letter channel"))?;
    dead_letters
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(broker("opening the dead-letter channel"))?;

    // A channel per queue: its prefetch window is its own, and closing it
    // hands that queue's unacked deliveries back.
    let mut subscriptions: Vec<Channel> = Vec::new();
    let mut streams = Vec::new();
    for (index, queue) in assignment.queues.iter().enumerate() {
        let channel = connection
            .create_channel()
            .await
            .map_err(broker("opening a channel"))?;
        channel
            .basic_qos(config.prefetch, BasicQosOptions::default())
            .await
            .map_err(broker("setting the prefetch"))?;
        let tag = format!("{}-{}", config.name, Uuid::now_v7());
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| topology::classify("queue", queue, &e))?;
        tracing::info!(consumer = %config.name, %queue, "subscribed");
        streams.push(consumer.map(move |d| (index, d)));
        subscriptions.push(channel);
    }
    let mut deliveries = futures_util::stream::select_all(streams);
    shared.set_subscribed(assignment.queues.clone());
    let mut in_flight = vec![0usize; assignment.queues.len()];
    let mut budget = ByteBudget::new(config.max_bytes_in_flight);

    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let (wake_tx, mut wake_rx) = mpsc::unbounded_channel::<String>();
    let (swept_tx, mut swept_rx) = mpsc::channel::<Vec<Item>>(1);
    let sweeping = end.child_token();
    let sweeper = tokio::spawn(sweep(Arc::clone(shared), swept_tx, sweeping.clone()));
    let mut lanes = JoinSet::new();
    let mut senders = Vec::new();
    let mut idle: Vec<usize> = Vec::new();
    let mut pool = shared.take_connections();
    for index in 0..config.lanes {
        let (tx, rx) = mpsc::channel::<Vec<Item>>(1);
        let mut lane = Lane::new(index, Arc::clone(shared), dead_letters.clone());
        lane.conn = pool.pop();
        lanes.spawn(lane.run(rx, done_tx.clone()));
        senders.push(tx);
        idle.push(index);
    }
    drop(done_tx);
    idle.reverse();

    let mut scheduler: Scheduler<Item> = Scheduler::new();
    // Held messages scheduled or running, so the sweep adds each once.
    let mut held_ids: HashSet<Uuid> = HashSet::new();
    let mut running = 0usize;
    let mut retire_check = tokio::time::interval(RETIRE_INTERVAL);
    let outcome = loop {
        let now = Instant::now();
        while let Some(&lane) = idle.last() {
            // Share a backlog among the idle lanes, up to batch_size each.
            let size = (scheduler.pending() / idle.len()).clamp(1, config.batch_size);
            let batch: Vec<Item> = std::iter::from_fn(|| scheduler.next(now))
                .take(size)
                .collect();
            if batch.is_empty() {
                break;
            }
            idle.pop();
            running += 1;
            if senders[lane].send(batch).await.is_err() {
                break;
            }
        }
        tokio::select! {
            () = end.cancelled() => break Ok(Ended::Told),
            delivery = deliveries.next(), if !assignment.queues.is_empty() => match delivery {
                Some((queue, Ok(delivery))) => {
                    Counters::add(&shared.counters.received);
                    in_flight[queue] += 1;
                    let item = Item::delivery(delivery, queue);
                    budget.took(item.size(), &subscriptions).await;
                    scheduler.push(item, Instant::now());
                }
                Some((_, Err(e))) if matches!(e.kind(), lapin::ErrorKind::ParsingError(_)) => {
                    break Err(Error::UnreadableDelivery { cause: e.to_string() });
                }
                Some((_, Err(e))) => break Err(broker("receiving")(e)),
                None => break Err(Error::Broker {
                    operation: "receiving",
                    cause: "the broker ended the subscription (queue deleted or connection closed)".into(),
                }),
            },
            Some(done) = done_rx.recv() => {
                running -= 1;
                idle.push(done.lane);
                for finished in done.finished {
                    if matches!(finished.finish, Finish::Done) {
                        if let Some(queue) = finished.queue {
                            in_flight[queue] -= 1;
                            budget.settled(finished.bytes, &subscriptions).await;
                        }
                        if let Some(id) = finished.held {
                            held_ids.remove(&id);
                        }
                    }
                    if let Some(at) = scheduler.finish(&finished.key, finished.finish, Instant::now()) {
                        let wake = wake_tx.clone();
                        let key = finished.key;
                        tokio::spawn(async move {
                            tokio::time::sleep_until(at.into()).await;
                            let _ = wake.send(key);
                        });
                    }
                }
                push_held(&mut scheduler, &mut held_ids, done.released);
            }
            Some(items) = swept_rx.recv() => push_held(&mut scheduler, &mut held_ids, items),
            Some(key) = wake_rx.recv() => scheduler.wake(&key, Instant::now()),
            _ = retire_check.tick(), if !assignment.retiring.is_empty() => {
                match retire(shared, connection, assignment, &subscriptions, &in_flight).await {
                    Ok(false) => {}
                    Ok(true) => break Ok(Ended::Retired),
                    Err(e) => break Err(e),
                }
            }
        }
    };

    // Wind down: take no more deliveries; let running handlers finish and
    // ack. No basic.cancel: it would make a standby instance the queue's
    // active consumer while this one still holds earlier deliveries of its
    // keys, and new messages would reach the standby ahead of them. Closing
    // the channels below hands everything unacked back in order first.
    shared.set_subscribed(Vec::new());
    sweeping.cancel();
    let _ = sweeper.await;
    let waiting = scheduler.pending();
    scheduler.drain();
    drop(senders);
    let deadline = tokio::time::Instant::now() + config.shutdown_timeout;
    while running > 0 {
        match tokio::time::timeout_at(deadline, done_rx.recv()).await {
            Ok(Some(_)) => running -= 1,
            Ok(None) => break,
            Err(_) => {
                tracing::warn!(consumer = %config.name, running, "handlers still running at the shutdown timeout; their messages will be redelivered");
                break;
            }
        }
    }
    let mut kept = Vec::new();
    if running == 0 {
        while let Some(lane) = lanes.join_next().await {
            if let Ok(lane) = lane {
                kept.extend(lane.conn);
            }
        }
    } else {
        lanes.abort_all();
    }
    shared.return_connections(kept);
    // Closing the channels hands every unacked delivery (waiting, retrying)
    // back to its queue, in order.
    quietly(futures_util::future::join_all(
        subscriptions
            .iter()
            .chain(std::iter::once(&dead_letters))
            .map(|channel| channel.close(200, "consumer session over".into())),
    ))
    .await;
    tracing::debug!(consumer = %config.name, waiting, "session ended");
    outcome
}

/// The bytes of deliveries taken and not yet settled, and the brake on the
/// broker when they pass the limit: a per-channel prefetch of 1, which
/// stops new deliveries on channels that already hold some, lifted once
/// half the limit is settled.
struct ByteBudget {
    limit: usize,
    held: usize,
    braking: bool,
}

impl ByteBudget {
    fn new(limit: usize) -> Self {
        ByteBudget {
            limit,
            held: 0,
            braking: false,
        }
    }

    async fn took(&mut self, bytes: usize, channels: &[Channel]) {
        self.held += bytes;
        if !self.braking && self.held > self.limit {
            self.braking = true;
            tracing::debug!(
                held = self.held,
                limit = self.limit,
                "byte budget reached; braking deliveries"
            );
            Self::channel_prefetch(channels, 1).await;
        }
    }

    async fn settled(&mut self, bytes: usize, channels: &[Channel]) {
        self.held = self.held.saturating_sub(bytes);
        if self.braking && self.held <= self.limit / 2 {
            self.braking = false;
            Self::channel_prefetch(channels, 0).await;
        }
    }

    /// Sets the channel-wide prefetch (0: none beyond each consumer's own).
    async fn channel_prefetch(channels: &[Channel], count: u16) {
        for channel in channels {
            quietly(channel.basic_qos(count, BasicQosOptions { global: true })).await;
        }
    }
}

/// Schedules held messages not scheduled yet.
fn push_held(scheduler: &mut Scheduler<Item>, held_ids: &mut HashSet<Uuid>, items: Vec<Item>) {
    for item in items {
        match item.held_id() {
            Some(id) if !held_ids.insert(id) => {}
            _ => scheduler.push(item, Instant::now()),
        }
    }
}

/// Deletes one drained retiring queue of this session, if there is one:
/// nothing of it in flight here and none ready on the broker. Its channel
/// is closed first (anything unacked goes back), then the broker deletes it
/// only if it is still empty *and* has no consumer: another instance that
/// has not yet seen the new assignment may still hold deliveries of it,
/// which would be lost with the queue. `true` when the session must end (a
/// queue was retired, or its channel was closed in the attempt).
async fn retire(
    shared: &Arc<Shared>,
    connection: &AmqpConnection,
    assignment: &Assignment,
    subscriptions: &[Channel],
    in_flight: &[usize],
) -> Result<bool> {
    let config = &shared.config;
    for (index, queue) in assignment.queues.iter().enumerate() {
        if !assignment.retiring.contains(queue) || in_flight[index] > 0 {
            continue;
        }
        match topology::depth(connection, queue).await? {
            Some(0) => {}
            Some(_) => continue,
            None => {
                forget_retired(shared, queue).await;
                return Ok(true);
            }
        }
        quietly(subscriptions[index].close(200, "draining a retired queue".into())).await;
        let channel = connection
            .create_channel()
            .await
            .map_err(broker("opening a channel"))?;
        let deleted = channel
            .queue_delete(
                queue.as_str().into(),
                QueueDeleteOptions {
                    if_empty: true,
                    if_unused: true,
                    ..QueueDeleteOptions::default()
                },
            )
            .await;
        match deleted {
            Ok(_) => {
                tracing::info!(consumer = %config.name, %queue, "retired queue drained and deleted");
                quietly(channel.close(200, "retired".into())).await;
                forget_retired(shared, queue).await;
            }
            // Not empty after all (its unacked came back), or another
            // instance still consumes it: later.
            Err(e) => {
                tracing::debug!(consumer = %config.name, %queue, error = %e, "retired queue not empty yet");
            }
        }
        return Ok(true);
    }
    Ok(false)
}

/// Removes a deleted queue from the recorded topology.
async fn forget_retired(shared: &Arc<Shared>, queue: &str) {
    let task_shared = Arc::clone(shared);
    let queue = queue.to_owned();
    let done = tokio::task::spawn_blocking(move || {
        let config = &task_shared.config;
        let mut conn = crate::connect::database(config).map_err(|e| e.to_string())?;
        topology::retired(&mut conn, &config.schema, &config.name, &queue)
            .map_err(|e| e.to_string())
    })
    .await;
    match done {
        Ok(Ok(())) => shared.membership_changed.notify_one(),
        Ok(Err(e)) => {
            tracing::warn!(consumer = %shared.config.name, error = %e, "cannot record a retired queue; it is retried")
        }
        Err(e) => {
            tracing::warn!(consumer = %shared.config.name, error = %e, "recording a retired queue failed")
        }
    }
}

/// Sweeps the held table every [`SWEEP_INTERVAL`] while the session runs,
/// sending what is due to the session. Gaps are given up on only once this
/// session has consumed for the gap wait itself: after a broker outage every
/// key stood still, and that is no reason to skip anything.
async fn sweep(shared: Arc<Shared>, out: mpsc::Sender<Vec<Item>>, stop: CancellationToken) {
    let started = Instant::now();
    let mut conn: Option<PgConnection> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(SWEEP_INTERVAL) => {}
        }
        let gap_wait = shared.config.gap_wait;
        let expire = (started.elapsed() >= gap_wait).then_some(gap_wait);
        let task_shared = Arc::clone(&shared);
        let taken = conn.take();
        let swept = tokio::task::spawn_blocking(move || {
            let config = &task_shared.config;
            let mut c = match taken {
                Some(c) => c,
                None => crate::connect::database(config).map_err(|e| e.to_string())?,
            };
            let rows = task_shared
                .inbox
                .sweep_held(&mut c, expire, 256)
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((c, rows))
        })
        .await;
        match swept {
            Ok(Ok((c, rows))) => {
                conn = Some(c);
                if !rows.is_empty() {
                    let items = rows.into_iter().map(Item::held).collect();
                    if out.send(items).await.is_err() {
                        return;
                    }
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(consumer = %shared.config.name, error = %e, "sweeping held messages failed")
            }
            Err(e) => {
                tracing::warn!(consumer = %shared.config.name, error = %e, "sweeping task failed")
            }
        }
    }
}
