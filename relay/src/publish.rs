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
    /// It cannot be sent as it is (see [`wire::properties`]): not sent,
    /// parked at once with the reason.
    Poison(String),
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
    /// broker's connection list; `tls` applies to `amqps://` URLs.
    pub(crate) async fn connect(
        url: &str,
        name: &str,
        app_id: Option<String>,
        tls: &outbox::AmqpTls,
    ) -> Result<Self> {
        let connect_error = |e: lapin::Error| Error::Connect {
            what: "broker",
            url: crate::redact_url(url),
            cause: outbox::redact_secrets(url, &e.to_string()),
        };
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, amqp_connect(url, properties, tls))
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

    /// Whether the broker has blocked publishers (a resource alarm).
    pub(crate) fn is_blocked(&self) -> bool {
        self.connection.status().blocked()
    }

    /// Publishes every row and waits for every confirm, all within
    /// `timeout` (sending can block too, while the broker has an alarm).
    /// Returns one outcome per row, in order, and whether the channel was
    /// closed by an error (then the rows it took with it get no blame, and
    /// the worker sends them `carefully`: one at a time, each confirm
    /// awaited, so a refusal lands on the one message that caused it).
    /// Afterwards, check [`Publisher::is_connected`]: after a timeout the
    /// channel is marked broken, since its state is unknown.
    pub(crate) async fn publish(
        &self,
        rows: &[PendingRow],
        timeout: Duration,
        carefully: bool,
    ) -> (Vec<Outcome>, bool) {
        if self.is_blocked() {
            return (
                unknown_all(
                    rows.len(),
                    "the broker has blocked publishing (resource alarm)",
                ),
                false,
            );
        }
        let started = Instant::now();
        let publish = async {
            if carefully {
                self.publish_one_by_one(rows, started).await
            } else {
                self.publish_all(rows, started).await
            }
        };
        match tokio::time::timeout(timeout, publish).await {
            Ok(outcomes) => outcomes,
            Err(_) => {
                // Blocked mid-batch (a resource alarm): the channel is fine
                // and the worker waits for the broker on it; otherwise its
                // state is unknown and it is replaced.
                if !self.is_blocked() {
                    self.channel_broken();
                }
                (
                    unknown_all(
                        rows.len(),
                        &format!("no confirm from the broker within {timeout:?}"),
                    ),
                    false,
                )
            }
        }
    }

    /// The largest properties the broker takes: one frame, less its own
    /// eight bytes.
    fn max_properties(&self) -> usize {
        usize::try_from(self.connection.configuration().frame_max())
            .unwrap_or(131_072)
            .saturating_sub(8)
    }

    /// Sends `row`, unless it cannot be sent as it is.
    async fn send(
        &self,
        row: &PendingRow,
    ) -> std::result::Result<std::result::Result<lapin::PublisherConfirm, String>, String> {
        let properties = wire::properties(row, self.app_id.as_deref(), self.max_properties())?;
        Ok(self
            .channel
            .basic_publish(
                row.exchange.as_str().into(),
                row.routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &row.payload,
                properties,
            )
            .await
            .map_err(|e| e.to_string()))
    }

    /// One row at a time, each confirm awaited before the next is sent: a
    /// channel error is the fault of the row just sent; the rest are unsent.
    async fn publish_one_by_one(
        &self,
        rows: &[PendingRow],
        started: Instant,
    ) -> (Vec<Outcome>, bool) {
        let mut outcomes = Vec::with_capacity(rows.len());
        for row in rows {
            let outcome = match self.send(row).await {
                Err(poison) => Outcome::Poison(poison),
                Ok(Err(e)) => Outcome::Refused(format!("publish failed: {e}")),
                Ok(Ok(confirm)) => match confirm.await {
                    Ok(Confirmation::Ack(None)) => Outcome::Confirmed {
                        latency: started.elapsed(),
                    },
                    Ok(Confirmation::Ack(Some(r)) | Confirmation::Nack(Some(r))) => {
                        Outcome::Refused(returned_reason(&r))
                    }
                    Ok(Confirmation::Nack(None)) => {
                        Outcome::Refused("nacked by the broker".to_owned())
                    }
                    Ok(Confirmation::NotRequested) => {
                        Outcome::Unknown("channel is not in confirm mode".to_owned())
                    }
                    Err(e) => Outcome::Refused(format!("publish failed: {e}")),
                },
            };
            let channel_gone =
                matches!(outcome, Outcome::Refused(_)) && !self.channel.status().connected();
            outcomes.push(outcome);
            if channel_gone {
                break;
            }
        }
        while outcomes.len() < rows.len() {
            outcomes.push(Outcome::Unknown(
                "not sent: an earlier row closed the channel".to_owned(),
            ));
        }
        (outcomes, false)
    }

    async fn publish_all(&self, rows: &[PendingRow], started: Instant) -> (Vec<Outcome>, bool) {
        // Send everything first (pipelined), then await the confirms.
        let mut sent = Vec::with_capacity(rows.len());
        for row in rows {
            match self.send(row).await {
                Err(poison) => sent.push(Err(Err(poison))),
                Ok(Ok(confirm)) => sent.push(Ok(confirm)),
                Ok(Err(e)) => {
                    // The channel is gone: this and every later row are unsent.
                    sent.push(Err(Ok(e)));
                    break;
                }
            }
        }
        // A poison row was never sent: `Err(Err(reason))` all the way.
        let confirms = join_all(sent.into_iter().map(|s| async move {
            match s {
                Ok(confirm) => confirm.await.map_err(|e| Ok(e.to_string())),
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
                returned.insert(id, returned_reason(r));
            }
        }

        let mut channel_error = false;
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
                Some(Err(Err(poison))) => Outcome::Poison(poison),
                // The broker closed the channel (a missing exchange, say):
                // every pending confirm fails alike, and which row caused it
                // is unknown. No blame now; sent again one by one.
                Some(Err(Ok(e))) => {
                    channel_error = true;
                    Outcome::Unknown(format!("channel closed: {e}"))
                }
                None => Outcome::Unknown("not sent: the channel was lost".to_owned()),
            };
            outcomes.push(outcome);
        }
        (outcomes, channel_error)
    }

    /// Closes the connection politely.
    pub(crate) async fn close(self) {
        let close = self.connection.close(200, "relay stopping".into());
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, close).await;
    }
}

/// Why the broker returned a message.
fn returned_reason(r: &lapin::message::BasicReturnMessage) -> String {
    format!(
        "returned by the broker: {} {} (no queue bound to exchange {:?} for routing key {:?})",
        r.reply_code,
        r.reply_text,
        r.exchange.as_str(),
        r.routing_key.as_str()
    )
}

/// Connects to the broker with the TLS material of `tls` (for `amqps://`).
pub(crate) async fn amqp_connect(
    url: &str,
    properties: ConnectionProperties,
    tls: &outbox::AmqpTls,
) -> lapin::Result<Connection> {
    let pem = tls
        .load()
        .map_err(|e| lapin::Error::from(std::io::Error::other(e)))?;
    let config = lapin::tcp::OwnedTLSConfig {
        cert_chain: pem.ca,
        identity: pem
            .client
            .map(|(pem, key)| lapin::tcp::OwnedIdentity::PKCS8 { pem, key }),
    };
    lapin::DefaultConnectionBuilder::new()?
        .with_uri_str(url.to_owned())
        .with_properties(properties)
        .with_tls_config(config)
        .connect()
        .await
}

fn unknown_all(count: usize, reason: &str) -> Vec<Outcome> {
    (0..count)
        .map(|_| Outcome::Unknown(reason.to_owned()))
        .collect()
}
