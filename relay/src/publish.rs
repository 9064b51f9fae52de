//! Publishing a batch on a confirm-mode channel: pipelined, `mandatory`, and
//! a row counts as sent only when the broker acked it and did not return it.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Channel, Connection, ConnectionProperties};

use crate::store::PendingRow;
use crate::{Error, Result, wire};

/// A broker connection with one confirm-mode channel.
pub(crate) struct Publisher {
    connection: Connection,
    channel: Channel,
    app_id: Option<String>,
    // Set after a confirm timeout: the channel's state is unknown, so the
    // worker replaces it.
    broken: std::sync::atomic::AtomicBool,
}

/// What became of one row of a batch.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Acked and routed: the broker has it.
    Confirmed {
        /// From publish to confirm.
        latency: Duration,
    },
    /// Not confirmed; the reason is recorded on the row.
    Failed(String),
}

impl Publisher {
    /// Connects and opens a confirm-mode channel. `name` shows in the
    /// broker's connection list.
    pub(crate) async fn connect(url: &str, name: &str, app_id: Option<String>) -> Result<Self> {
        let connect_error = |e: lapin::Error| Error::Connect {
            what: "broker",
            url: crate::redact_url(url),
            cause: e.to_string(),
        };
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        let connection = Connection::connect(url, properties)
            .await
            .map_err(connect_error)?;
        let channel = connection.create_channel().await.map_err(connect_error)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(Error::broker("enabling publisher confirms"))?;
        Ok(Publisher {
            connection,
            channel,
            app_id,
            broken: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Whether the connection and channel are still usable.
    pub(crate) fn is_connected(&self) -> bool {
        !self.broken.load(std::sync::atomic::Ordering::Relaxed)
            && self.connection.status().connected()
            && self.channel.status().connected()
    }

    /// Marks the channel unfit, so the worker connects afresh.
    pub(crate) fn channel_broken(&self) {
        self.broken
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Publishes every row, then waits (up to `timeout`) for all confirms.
    /// Returns one outcome per row, in order, and whether the channel is
    /// still fit for use (not after a confirm timeout: its state is unknown).
    pub(crate) async fn publish(
        &self,
        rows: &[PendingRow],
        timeout: Duration,
    ) -> (Vec<Outcome>, bool) {
        let started = Instant::now();
        let mut pending = Vec::with_capacity(rows.len());
        let mut broken: Option<String> = None;
        for row in rows {
            if let Some(reason) = &broken {
                pending.push(Err(reason.clone()));
                continue;
            }
            let published = self
                .channel
                .basic_publish(
                    row.exchange.as_str().into(),
                    row.routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &row.payload,
                    wire::properties(row, self.app_id.as_deref()),
                )
                .await;
            match published {
                Ok(confirm) => pending.push(Ok(confirm)),
                Err(e) => {
                    // The channel is gone: this and every later row fail.
                    let reason = format!("publish failed: {e}");
                    broken = Some(reason.clone());
                    pending.push(Err(reason));
                }
            }
        }
        let waits = pending.into_iter().map(|p| async move {
            match p {
                Err(reason) => Outcome::Failed(reason),
                Ok(confirm) => match confirm.await {
                    Ok(Confirmation::Ack(None)) => Outcome::Confirmed {
                        latency: started.elapsed(),
                    },
                    Ok(Confirmation::Ack(Some(returned))) | Ok(Confirmation::Nack(Some(returned))) => {
                        Outcome::Failed(format!(
                            "returned by the broker: {} {} (no queue bound to exchange {:?} for routing key {:?})",
                            returned.reply_code,
                            returned.reply_text,
                            returned.exchange.as_str(),
                            returned.routing_key.as_str()
                        ))
                    }
                    Ok(Confirmation::Nack(None)) => {
                        Outcome::Failed("nacked by the broker".to_owned())
                    }
                    Ok(Confirmation::NotRequested) => {
                        Outcome::Failed("channel is not in confirm mode".to_owned())
                    }
                    Err(e) => Outcome::Failed(format!("confirm failed: {e}")),
                },
            }
        });
        let count = rows.len();
        match tokio::time::timeout(timeout, join_all(waits)).await {
            Ok(outcomes) => (outcomes, broken.is_none()),
            Err(_) => (
                (0..count)
                    .map(|_| {
                        Outcome::Failed(format!("no confirm from the broker within {timeout:?}"))
                    })
                    .collect(),
                false,
            ),
        }
    }

    /// Closes the connection politely.
    pub(crate) async fn close(self) {
        let _ = self.connection.close(200, "relay stopping".into()).await;
    }
}
