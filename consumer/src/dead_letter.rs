//! Dead letters: a message the consumer gives up on goes to its
//! `<name>.dead-letters` queue, unchanged but for headers saying why, and
//! can be replayed into the consumer's queue later.

use std::time::{Duration, SystemTime};

use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation};

use crate::config::ConsumerConfig;
use crate::envelope::REPLAY_HEADER;
use crate::{Error, Result};

/// Header: why the message was dead-lettered.
pub const REASON_HEADER: &str = "x-dead-letter-reason";
/// Header: how many times the handler ran before it was dead-lettered.
pub const ATTEMPTS_HEADER: &str = "x-dead-letter-attempts";
/// Header: the consumer that dead-lettered it.
pub const CONSUMER_HEADER: &str = "x-dead-letter-consumer";
/// Header: the exchange the message was first published to.
pub const ORIGINAL_EXCHANGE_HEADER: &str = "x-original-exchange";
/// Header: the routing key the message was first published with.
pub const ORIGINAL_ROUTING_KEY_HEADER: &str = "x-original-routing-key";

/// How long a dead letter or replay waits for the broker's confirm.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// A message on its way to the dead-letter queue.
pub(crate) struct DeadLetter<'a> {
    /// Where it was first published (a replay's recorded place).
    pub(crate) exchange: &'a str,
    pub(crate) routing_key: &'a str,
    pub(crate) properties: &'a BasicProperties,
    pub(crate) body: &'a [u8],
    pub(crate) reason: &'a str,
    pub(crate) attempts: u32,
}

/// Publishes `letter` to the dead-letter queue on a confirm-mode channel
/// and waits for the broker's confirm: only then may the original be acked.
pub(crate) async fn publish(
    channel: &Channel,
    config: &ConsumerConfig,
    letter: DeadLetter<'_>,
) -> Result<()> {
    // Rebuilt without the replay mark: a dead letter is not a replay.
    let mut headers: FieldTable = letter
        .properties
        .headers()
        .as_ref()
        .map(|h| {
            h.inner()
                .iter()
                .filter(|(k, _)| k.as_str() != REPLAY_HEADER)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<std::collections::BTreeMap<_, _>>()
                .into()
        })
        .unwrap_or_default();
    // Always the place the consumer vouches for (the caller passes an
    // honoured replay's recorded place, so it survives replays of replays):
    // headers a producer wrote must not choose where a replay goes.
    headers.insert(ORIGINAL_EXCHANGE_HEADER.into(), text(letter.exchange));
    headers.insert(ORIGINAL_ROUTING_KEY_HEADER.into(), text(letter.routing_key));
    headers.insert(REASON_HEADER.into(), text(letter.reason));
    headers.insert(
        ATTEMPTS_HEADER.into(),
        AMQPValue::LongLongInt(i64::from(letter.attempts)),
    );
    headers.insert(CONSUMER_HEADER.into(), text(&config.name));
    headers.insert(
        "x-dead-lettered-at".into(),
        AMQPValue::Timestamp(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        ),
    );
    let properties = letter.properties.clone().with_headers(headers);
    confirmed_publish(
        channel,
        "",
        &config.dead_letter_queue(),
        letter.body,
        properties,
        "dead-lettering",
    )
    .await
}

async fn confirmed_publish(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
    operation: &'static str,
) -> Result<()> {
    let broker = |cause: String| Error::Broker { operation, cause };
    // Sending is bounded as well as the confirm: on a connection that died
    // the client may never answer.
    let confirm = async {
        channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await?
            .await
    };
    match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
        Err(_) => Err(broker(format!("no confirm within {CONFIRM_TIMEOUT:?}"))),
        Ok(Err(e)) => Err(broker(e.to_string())),
        Ok(Ok(Confirmation::Ack(None))) => Ok(()),
        Ok(Ok(Confirmation::Ack(Some(_)))) => Err(broker(format!(
            "returned as unroutable: queue {routing_key:?} is missing"
        ))),
        Ok(Ok(other)) => Err(broker(format!("not confirmed: {other:?}"))),
    }
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// Moves up to `limit` dead letters of the consumer back into its queue
/// (the partition queue of their slot when partitions > 1), marked so the
/// consumer applies them whatever their key's position. A replayed message
/// already applied is still a duplicate. Returns how many were moved.
///
/// Each is published with a confirm before its dead letter is acked, so a
/// crash in between leaves a copy in both places, never in neither.
///
/// # Errors
///
/// [`Error::Connect`] or [`Error::Broker`]; what was moved before stays moved.
pub async fn replay_dead_letters(config: &ConsumerConfig, limit: usize) -> Result<usize> {
    config.validate()?;
    // The recorded partition count (another instance may have changed it).
    // The recorded partition count (another instance may have changed it),
    // and a connection to record each replay on before it is published.
    let inbox = crate::inbox::Inbox::new(&config.name, &config.schema)?;
    let (mut db, recorded) = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = crate::connect::database(&config)?;
            let recorded = crate::topology::read(&mut conn, &config.schema, &config.name).map_err(
                |cause| Error::Database {
                    operation: "reading the topology",
                    cause,
                },
            )?;
            Ok::<_, Error>((conn, recorded))
        })
        .await
        .map_err(|e| Error::Handler(format!("replay setup panicked: {e}")))??
    };
    let partitions = recorded.map_or(config.partitions, |t| t.partitions);
    let connection =
        crate::connect::broker(config, format!("consumer {} replay", config.name)).await?;
    let broker = |cause: lapin::Error| Error::Broker {
        operation: "replaying dead letters",
        cause: cause.to_string(),
    };
    let channel = connection.create_channel().await.map_err(broker)?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(broker)?;
    let mut moved = 0;
    while moved < limit {
        let Some(message) = channel
            .basic_get(
                config.dead_letter_queue().as_str().into(),
                BasicGetOptions::default(),
            )
            .await
            .map_err(broker)?
        else {
            break;
        };
        let delivery = message.delivery;
        let mut headers: FieldTable = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(REPLAY_HEADER.into(), AMQPValue::Boolean(true));
        // Recorded first: the consumer honours a replay only if it is.
        let original = |name: &str| match headers.inner().get(name) {
            Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
            _ => String::new(),
        };
        let (exchange, routing_key) = (
            original(ORIGINAL_EXCHANGE_HEADER),
            original(ORIGINAL_ROUTING_KEY_HEADER),
        );
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .and_then(|id| uuid::Uuid::parse_str(id.as_str()).ok());
        if let Some(message_id) = message_id {
            let inbox = inbox.clone();
            db = tokio::task::spawn_blocking(move || {
                inbox.record_replay(&mut db, message_id, &exchange, &routing_key)?;
                Ok::<_, Error>(db)
            })
            .await
            .map_err(|e| Error::Handler(format!("recording a replay panicked: {e}")))??;
        }
        // Straight into the queue of its slot (the first one for a message
        // without a slot), through the default exchange.
        let slot = headers
            .inner()
            .keys()
            .find_map(|name| outbox::wire::parse_slot_header(name.as_str()))
            .unwrap_or(0);
        let queue = crate::config::queue_name(&config.name, partitions, slot % partitions);
        let properties = delivery.properties.clone().with_headers(headers);
        confirmed_publish(
            &channel,
            "",
            &queue,
            &delivery.data,
            properties,
            "replaying a dead letter",
        )
        .await?;
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(broker)?;
        moved += 1;
    }
    let _ = channel.close(200, "replayed".into()).await;
    let _ = connection.close(200, "replayed".into()).await;
    Ok(moved)
}
