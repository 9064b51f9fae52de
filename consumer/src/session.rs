//! One connection's worth of consuming: subscribe to the assigned queues,
//! feed deliveries through the scheduler to the lanes, and wind down
//! cleanly when told to (shutdown, new assignment) or when the broker
//! connection is lost.

use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::consumer::Shared;
use crate::lane::{Done, Item, Lane};
use crate::schedule::{Mode, Scheduler};
use crate::stats::Counters;
use crate::{Error, Result, topology};

/// Connects to the broker, naming the connection after the consumer.
pub(crate) async fn connect(shared: &Shared) -> Result<Connection> {
    let url = &shared.config.amqp_url;
    let properties = ConnectionProperties::default()
        .with_connection_name(format!("consumer {}", shared.config.name).into());
    let connect_error = |cause: String| Error::Connect {
        what: "broker",
        url: outbox::redact_url(url),
        cause,
    };
    tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, properties))
        .await
        .map_err(|_| connect_error(format!("no answer within {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| connect_error(e.to_string()))
}

const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn broker(operation: &'static str) -> impl Fn(lapin::Error) -> Error {
    move |e| Error::Broker {
        operation,
        cause: e.to_string(),
    }
}

/// Consumes `queues` (partition indexes) until `end` is cancelled (`Ok`)
/// or the broker connection fails (`Err`).
pub(crate) async fn run(
    shared: &Arc<Shared>,
    queues: &[u16],
    end: &CancellationToken,
) -> Result<()> {
    let connection = connect(shared).await?;
    let result = consume(shared, &connection, queues, end).await;
    let _ = connection.close(200, "consumer session over".into()).await;
    result
}

async fn consume(
    shared: &Arc<Shared>,
    connection: &Connection,
    queues: &[u16],
    end: &CancellationToken,
) -> Result<()> {
    let config = &shared.config;
    let setup = connection
        .create_channel()
        .await
        .map_err(broker("opening a channel"))?;
    topology::declare(&setup, config, &shared.routes).await?;
    let _ = setup.close(200, "declared".into()).await;

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
    for &index in queues {
        let queue = config.queue(index);
        let channel = connection
            .create_channel()
            .await
            .map_err(broker("opening a channel"))?;
        channel
            .basic_qos(config.prefetch, BasicQosOptions::default())
            .await
            .map_err(broker("setting the prefetch"))?;
        let tag = format!("{}-{}", config.name, uuid::Uuid::now_v7());
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(broker("subscribing to the queue"))?;
        tracing::info!(consumer = %config.name, %queue, "subscribed");
        streams.push(consumer);
        subscriptions.push(channel);
    }
    let mut deliveries = futures_util::stream::select_all(streams);

    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let (wake_tx, mut wake_rx) = mpsc::unbounded_channel::<String>();
    let mut lanes = JoinSet::new();
    let mut senders = Vec::new();
    let mut idle: Vec<usize> = Vec::new();
    let mut pool = shared.take_connections();
    for index in 0..config.lanes {
        let (tx, rx) = mpsc::channel::<Vec<(Item, Mode)>>(1);
        let mut lane = Lane::new(index, Arc::clone(shared), dead_letters.clone());
        lane.conn = pool.pop();
        lanes.spawn(lane.run(rx, done_tx.clone()));
        senders.push(tx);
        idle.push(index);
    }
    drop(done_tx);
    idle.reverse();

    let mut scheduler: Scheduler<Item> = Scheduler::new(config.gap_wait);
    let mut running = 0usize;
    let outcome = loop {
        let now = Instant::now();
        while let Some(&lane) = idle.last() {
            // Share a backlog among the idle lanes, up to batch_size each.
            let size = (scheduler.pending() / idle.len()).clamp(1, config.batch_size);
            let batch: Vec<(Item, Mode)> = std::iter::from_fn(|| scheduler.next(now))
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
            () = end.cancelled() => break Ok(()),
            delivery = deliveries.next(), if !queues.is_empty() => match delivery {
                Some(Ok(delivery)) => {
                    Counters::add(&shared.counters.received);
                    scheduler.push(Item::new(delivery), Instant::now());
                }
                Some(Err(e)) => break Err(broker("receiving")(e)),
                None => break Err(Error::Broker {
                    operation: "receiving",
                    cause: "the broker ended the subscription (queue deleted or connection closed)".into(),
                }),
            },
            Some(done) = done_rx.recv() => {
                running -= 1;
                idle.push(done.lane);
                for (key, finish) in done.finished {
                    if let Some(at) = scheduler.finish(&key, finish, Instant::now()) {
                        let wake = wake_tx.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep_until(at.into()).await;
                            let _ = wake.send(key);
                        });
                    }
                }
            }
            Some(key) = wake_rx.recv() => scheduler.wake(&key, Instant::now()),
        }
    };

    // Wind down: take no more deliveries; let running handlers finish and
    // ack. No basic.cancel: it would make a standby instance the queue's
    // active consumer while this one still holds earlier deliveries of its
    // keys, and new messages would reach the standby ahead of them. Closing
    // the channels below hands everything unacked back in order first.
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
    // Closing the channels hands every unacked delivery (held, retrying,
    // waiting) back to its queue, in order.
    for channel in subscriptions {
        let _ = channel.close(200, "consumer session over".into()).await;
    }
    let _ = dead_letters
        .close(200, "consumer session over".into())
        .await;
    tracing::debug!(consumer = %config.name, waiting, "session ended");
    outcome
}
