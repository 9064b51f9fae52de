//! Getting a queue moving again after a delivery the client library cannot
//! parse (see [`crate::raw_amqp`]): the session ends with
//! [`Error::UnreadableDelivery`], and before it reconnects the consumer
//! takes its queues' messages over a bare connection, up to a prefetch
//! window each (the culprit was delivered within one), finds the one whose
//! properties do not parse, moves it to the dead-letter queue byte for byte
//! with the reason added to its headers, and acks it. Closing the bare
//! connection puts every other message it took back where it was.

use crate::consumer::Shared;
use crate::raw_amqp::{RawConnection, RawMessage};
use crate::stats::Counters;
use crate::{Error, Result};

/// Moves the unreadable messages at the front of `queues` to the
/// dead-letter queue; returns how many.
///
/// # Errors
///
/// [`Error::Broker`] when the bare connection fails (the session's backoff
/// then applies, and this runs again at the next failure).
pub(crate) async fn quarantine(shared: &Shared, queues: &[String]) -> Result<usize> {
    let config = &shared.config;
    let failed = |cause: String| Error::Broker {
        operation: "moving an unreadable message aside",
        cause,
    };
    let mut raw = RawConnection::open(&config.amqp_url)
        .await
        .map_err(failed)?;
    let mut moved = 0;
    for queue in queues {
        for _ in 0..=config.prefetch {
            let Some(message) = raw.get(queue).await.map_err(failed)? else {
                break;
            };
            let Err(reason) = crate::held::decode_properties(&message.properties) else {
                // Readable: left unacked, it goes back when we close.
                continue;
            };
            let reason = format!("the client cannot parse its properties: {reason}");
            dead_letter(&mut raw, shared, &message, &reason)
                .await
                .map_err(failed)?;
            Counters::add(&shared.counters.dead_lettered);
            tracing::error!(
                consumer = %config.name, %queue, %reason,
                routing_key = %String::from_utf8_lossy(&message.routing_key),
                "unreadable message moved to the dead-letter queue"
            );
            moved += 1;
            break;
        }
    }
    raw.close().await;
    Ok(moved)
}

/// Publishes `message` to the dead-letter queue with the reason added, then
/// acks it.
async fn dead_letter(
    raw: &mut RawConnection,
    shared: &Shared,
    message: &RawMessage,
    reason: &str,
) -> std::result::Result<(), String> {
    let config = &shared.config;
    let properties = with_headers(
        &message.properties,
        &[
            (crate::dead_letter::REASON_HEADER, reason.as_bytes()),
            (crate::dead_letter::CONSUMER_HEADER, config.name.as_bytes()),
            (
                crate::dead_letter::ORIGINAL_EXCHANGE_HEADER,
                &message.exchange,
            ),
            (
                crate::dead_letter::ORIGINAL_ROUTING_KEY_HEADER,
                &message.routing_key,
            ),
        ],
    )
    // Properties we cannot even walk: sent as they are.
    .unwrap_or_else(|| message.properties.clone());
    raw.publish(
        b"",
        config.dead_letter_queue().as_bytes(),
        &properties,
        &message.body,
    )
    .await?;
    raw.ack(message.delivery_tag).await
}

/// `properties` (flags and list, as on the wire) with long-string headers
/// added, without reading anything but the lengths of the fields before
/// the header table; `None` when they cannot be walked.
pub(crate) fn with_headers(properties: &[u8], headers: &[(&str, &[u8])]) -> Option<Vec<u8>> {
    const CONTENT_TYPE: u16 = 1 << 15;
    const CONTENT_ENCODING: u16 = 1 << 14;
    const HEADERS: u16 = 1 << 13;
    const CONTINUED: u16 = 1;
    let flags = u16::from_be_bytes(properties.get(..2)?.try_into().ok()?);
    if flags & CONTINUED != 0 {
        return None;
    }
    let mut at = 2usize;
    for bit in [CONTENT_TYPE, CONTENT_ENCODING] {
        if flags & bit != 0 {
            at += 1 + usize::from(*properties.get(at)?);
        }
    }
    let mut entries = Vec::new();
    for (name, value) in headers {
        let name = name.as_bytes();
        entries.push(u8::try_from(name.len()).ok()?);
        entries.extend(name);
        entries.push(b'S');
        entries.extend(u32::try_from(value.len()).ok()?.to_be_bytes());
        entries.extend(*value);
    }
    let mut out = Vec::with_capacity(properties.len() + entries.len() + 4);
    if flags & HEADERS != 0 {
        let len = u32::from_be_bytes(properties.get(at..at + 4)?.try_into().ok()?);
        let end = at + 4 + usize::try_from(len).ok()?;
        if end > properties.len() {
            return None;
        }
        let len = len.checked_add(u32::try_from(entries.len()).ok()?)?;
        out.extend(&properties[..at]);
        out.extend(len.to_be_bytes());
        out.extend(&properties[at + 4..end]);
        out.extend(entries);
        out.extend(&properties[end..]);
    } else {
        out.extend((flags | HEADERS).to_be_bytes());
        out.extend(properties.get(2..at)?);
        out.extend(u32::try_from(entries.len()).ok()?.to_be_bytes());
        out.extend(entries);
        out.extend(&properties[at..]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use lapin::BasicProperties;
    use lapin::types::{AMQPValue, FieldTable, LongString};

    use super::*;

    fn encode(p: &BasicProperties) -> Vec<u8> {
        crate::held::encode_properties(p).unwrap()
    }

    #[test]
    fn headers_are_added_to_properties_with_and_without_a_table() {
        let added = [("x-dead-letter-reason", b"why".as_slice())];
        let reason = AMQPValue::LongString(LongString::from("why"));
        let bare = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id("id-1".into());
        let out =
            crate::held::decode_properties(&with_headers(&encode(&bare), &added).unwrap()).unwrap();
        assert_eq!(out.message_id().as_ref().unwrap().as_str(), "id-1");
        assert_eq!(
            out.headers()
                .as_ref()
                .unwrap()
                .inner()
                .get("x-dead-letter-reason"),
            Some(&reason)
        );
        let mut table = FieldTable::default();
        table.insert("tenant".into(), AMQPValue::LongString("acme".into()));
        let with_table = bare.with_headers(table).with_type("t".into());
        let out =
            crate::held::decode_properties(&with_headers(&encode(&with_table), &added).unwrap())
                .unwrap();
        let headers = out.headers().as_ref().unwrap().inner();
        assert_eq!(headers.get("x-dead-letter-reason"), Some(&reason));
        assert_eq!(
            headers.get("tenant"),
            Some(&AMQPValue::LongString("acme".into()))
        );
        assert_eq!(out.kind().as_ref().unwrap().as_str(), "t");
        assert!(with_headers(&[0x00], &added).is_none(), "too short to walk");
    }
}
