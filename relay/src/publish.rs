//! Publishing a batch on a confirm-mode channel: pipelined, `mandatory`, and
//! a row counts as sent only when the broker acked it and did not return it.

use std::collections::HashMap;
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
    /// Acked and not returned: the broker has it.
    Confirmed {
        /// From the start of the batch to its confirm.
        latency: Duration,
    },
    /// The broker refused this message itself (returned as unroutable,
    /// nacked, or its exchange does not exist). Counts towards parking.
    Refused(String),
    /// Whether the broker took it is unknown (confirm timeout, channel or
    /// connection lost, or published after a refused message closed the
    /// channel). Sent again; does not count towards parking.
    Unknown(String),
}

/// How long closing a connection may take (a blocked broker never answers).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long connecting may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
        let connection =
            tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, properties))
                .await
                .map_err(|_| Error::Connect {
                    what: "broker",
                    url: crate::redact_url(url),
                    cause: format!("no answer within {CONNECT_TIMEOUT:?}"),
                })?
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

    /// Publishes every row and waits for every confirm, all within
    /// `timeout` (sending can block too, while the broker has an alarm).
    /// Returns one outcome per row, in order. Afterwards, check
    /// [`Publisher::is_connected`]: after a timeout the channel is marked
    /// broken, since its state is unknown.
    pub(crate) async fn publish(&self, rows: &[PendingRow], timeout: Duration) -> Vec<Outcome> {
        if self.connection.status().blocked() {
            return unknown_all(
                rows.len(),
                "the broker has blocked publishing (resource alarm)",
            );
        }
        let started = Instant::now();
        match tokio::time::timeout(timeout, self.publish_all(rows, started)).await {
            Ok(outcomes) => outcomes,
            Err(_) => {
                self.channel_broken();
                unknown_all(
                    rows.len(),
                    &format!("no confirm from the broker within {timeout:?}"),
                )
            }
        }
    }

    async fn publish_all(&self, rows: &[PendingRow], started: Instant) -> Vec<Outcome> {
        // Send everything first (pipelined), then await the confirms.
        let mut sent = Vec::with_capacity(rows.len());
        for row in rows {
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
                Ok(confirm) => sent.push(Ok(confirm)),
                Err(e) => {
                    // The channel is gone: this and every later row are unsent.
                    sent.push(Err(e.to_string()));
                    break;
                }
            }
        }
        let confirms = join_all(sent.into_iter().map(|s| async move {
            match s {
                Ok(confirm) => confirm.await.map_err(|e| e.to_string()),
                Err(e) => Err(e),
            }
        }))
        .await;
        let latency = started.elapsed();

        // lapin hands a basic.return to whichever confirm completes next, not
        // to its own message; RabbitMQ sends the return before the ack, so
        // every return of this batch has arrived by now. Match them by id.
        let mut returned: HashMap<String, String> = HashMap::new();
        for confirm in &confirms {
            if let Ok(Confirmation::Ack(Some(r)) | Confirmation::Nack(Some(r))) = confirm {
                let id = r
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|id| id.as_str().to_owned())
                    .unwrap_or_default();
                returned.insert(
                    id,
                    format!(
                        "returned by the broker: {} {} (no queue bound to exchange {:?} for routing key {:?})",
                        r.reply_code,
                        r.reply_text,
                        r.exchange.as_str(),
                        r.routing_key.as_str()
                    ),
                );
            }
        }

        let mut first_error_seen = false;
        let mut outcomes = Vec::with_capacity(rows.len());
        let mut confirms = confirms.into_iter();
        for row in rows {
            // Nearly every batch has no returns: format the id only when needed.
            let was_returned = if returned.is_empty() {
                None
            } else {
                returned.remove(&row.id.to_string())
            };
            let outcome = match confirms.next() {
                _ if was_returned.is_some() => Outcome::Refused(was_returned.unwrap_or_default()),
                Some(Ok(Confirmation::Ack(_))) => Outcome::Confirmed { latency },
                Some(Ok(Confirmation::Nack(_))) => {
                    Outcome::Refused("nacked by the broker".to_owned())
                }
                Some(Ok(Confirmation::NotRequested)) => {
                    Outcome::Unknown("channel is not in confirm mode".to_owned())
                }
                Some(Err(e)) => {
                    // The broker closes the channel at the first publish to
                    // a missing exchange; everything after it is collateral.
                    let own_fault = !first_error_seen && e.contains("NOT_FOUND");
                    first_error_seen = true;
                    if own_fault {
                        Outcome::Refused(format!("publish failed: {e}"))
                    } else {
                        Outcome::Unknown(format!("channel lost: {e}"))
                    }
                }
                None => Outcome::Unknown("not sent: the channel was lost".to_owned()),
            };
            outcomes.push(outcome);
        }
        outcomes
    }

    /// Closes the connection politely.
    pub(crate) async fn close(self) {
        let close = self.connection.close(200, "relay stopping".into());
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, close).await;
    }
}

fn unknown_all(count: usize, reason: &str) -> Vec<Outcome> {
    (0..count)
        .map(|_| Outcome::Unknown(reason.to_owned()))
        .collect()
}
