//! What a handler receives, and how a delivery's properties and headers are
//! read into it. A delivery that cannot be read is malformed: it is
//! dead-lettered with the reason, never dropped.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use outbox::wire::{
    EVENT_VERSION_HEADER, KEY_PREV_ANY_HEADER, KEY_PREV_HEADER, KEY_SEQ_HEADER, KeyPrev,
    ORDERING_KEY_HEADER,
};
use uuid::Uuid;

/// Header the replay tool sets on a dead letter it puts back. The consumer
/// honours it only for a message that came straight into its queue and that
/// the tool recorded in `inbox_replays` (a producer cannot forge one).
pub const REPLAY_HEADER: &str = "x-dead-letter-replay";

/// Everything about a message but its body.
#[derive(Debug, Clone)]
pub struct Meta {
    /// The AMQP `message_id`: the event's id, the dedupe key.
    pub message_id: Uuid,
    /// `x-ordering-key`, when the event is ordered.
    pub ordering_key: Option<String>,
    /// `x-key-seq`: the event's number within its key, from 1.
    pub key_seq: Option<i64>,
    /// `x-key-prev` and `x-key-prev-any`: what came before this event of
    /// its key, per route. `None` from producers that do not send it; the
    /// event then follows `key_seq - 1`.
    pub key_prev: Option<KeyPrev>,
    /// The AMQP `type` property (the event type), if set.
    pub event_type: Option<String>,
    /// `x-event-version`, if set.
    pub event_version: Option<i64>,
    /// The exchange it was published to.
    pub exchange: String,
    /// The routing key it was published with.
    pub routing_key: String,
    /// Whether the broker has delivered it before (to this or another consumer).
    pub redelivered: bool,
    /// Attempt number of this handling in this process, from 1.
    pub attempt: u32,
    /// Whether it is a replayed dead letter (one the replay tool recorded;
    /// the exchange and routing key are then those it was first published
    /// with).
    pub replayed: bool,
    headers: FieldTable,
}

impl Meta {
    /// A header's value, as sent.
    pub fn header(&self, name: &str) -> Option<&AMQPValue> {
        self.headers.inner().get(name)
    }

    /// A string header (`traceparent`, a user header).
    pub fn header_str(&self, name: &str) -> Option<&str> {
        match self.header(name)? {
            AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
            AMQPValue::ShortString(s) => Some(s.as_str()),
            _ => None,
        }
    }

    /// Whether the message asks to be taken as a replay (the header is
    /// set). Asking is not enough: see [`REPLAY_HEADER`].
    pub(crate) fn asks_replay(&self) -> bool {
        matches!(self.header(REPLAY_HEADER), Some(AMQPValue::Boolean(true)))
    }

    /// The key and its sequence number, as the inbox takes them.
    pub(crate) fn key(&self) -> Option<(&str, i64)> {
        Some((self.ordering_key.as_deref()?, self.key_seq?))
    }
}

/// A typed event and its metadata: what a handler is called with.
#[derive(Debug, Clone)]
pub struct Envelope<E> {
    /// The body, deserialized.
    pub event: E,
    /// Id, key, sequence, type and headers.
    pub meta: Meta,
}

/// Reads a delivery's properties. `Err` names what is wrong; the message is
/// then dead-lettered at once (its id, when readable, still dedupes it).
pub(crate) fn read(
    exchange: &str,
    routing_key: &str,
    redelivered: bool,
    properties: &BasicProperties,
) -> Result<Meta, Malformed> {
    let id_text = properties.message_id().as_ref().map(|s| s.as_str());
    let message_id = match id_text {
        None => return Err(Malformed::new(None, "no message_id property")),
        Some(text) => Uuid::parse_str(text).map_err(|_| {
            Malformed::new(
                None,
                format!("message_id {:?} is not a UUID", truncate(text)),
            )
        })?,
    };
    let headers = properties.headers().clone().unwrap_or_default();
    let bad = |reason: String| Malformed::new(Some(message_id), reason);
    let ordering_key = match headers.inner().get(ORDERING_KEY_HEADER) {
        None => None,
        Some(AMQPValue::LongString(s)) => Some(
            String::from_utf8(s.as_bytes().to_vec())
                .map_err(|_| bad(format!("{ORDERING_KEY_HEADER} is not UTF-8")))?,
        ),
        Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_owned()),
        Some(other) => {
            return Err(bad(format!(
                "{ORDERING_KEY_HEADER} is not a string: {other:?}"
            )));
        }
    };
    // The producer's rule (1 to 255 bytes), and no NUL, which PostgreSQL
    // text cannot hold: anything else would fail the inbox's statements the
    // same way on every delivery.
    if let Some(key) = &ordering_key
        && (key.is_empty() || key.len() > outbox::MAX_NAME_BYTES || key.contains('\0'))
    {
        return Err(bad(format!(
            "{ORDERING_KEY_HEADER} must be 1 to {} bytes without NUL, got {} bytes {:?}",
            outbox::MAX_NAME_BYTES,
            key.len(),
            truncate(key)
        )));
    }
    let key_seq = match (&ordering_key, headers.inner().get(KEY_SEQ_HEADER)) {
        (None, _) => None,
        (Some(_), None) => {
            return Err(bad(format!(
                "{ORDERING_KEY_HEADER} is set but {KEY_SEQ_HEADER} is missing"
            )));
        }
        (Some(_), Some(value)) => match integer(value) {
            Some(n) if n >= 1 => Some(n),
            _ => {
                return Err(bad(format!(
                    "{KEY_SEQ_HEADER} must be an integer of at least 1, got {value:?}"
                )));
            }
        },
    };
    let key_prev = match (&key_seq, headers.inner().get(KEY_PREV_HEADER)) {
        (Some(_), Some(value)) => {
            Some(read_key_prev(value, headers.inner().get(KEY_PREV_ANY_HEADER)).map_err(bad)?)
        }
        _ => None,
    };
    let event_version = headers.inner().get(EVENT_VERSION_HEADER).and_then(integer);
    // A replay is decided by the lane against `inbox_replays`, never by
    // the headers alone.
    let (exchange, routing_key, replayed) = (exchange.to_owned(), routing_key.to_owned(), false);
    Ok(Meta {
        message_id,
        ordering_key,
        key_seq,
        key_prev,
        event_type: properties.kind().as_ref().map(|s| s.as_str().to_owned()),
        event_version,
        exchange,
        routing_key,
        redelivered,
        attempt: 1,
        replayed,
        headers,
    })
}

/// `x-key-prev` (`{exchange: {routing key: key_seq}}`) and
/// `x-key-prev-any`; `Err` says what does not fit.
fn read_key_prev(routes: &AMQPValue, any: Option<&AMQPValue>) -> Result<KeyPrev, String> {
    let shape = || format!("{KEY_PREV_HEADER} must be a table of tables of integers");
    let AMQPValue::FieldTable(exchanges) = routes else {
        return Err(shape());
    };
    let mut prev = KeyPrev::default();
    for (exchange, keys) in exchanges.inner() {
        let AMQPValue::FieldTable(keys) = keys else {
            return Err(shape());
        };
        let entry = prev.routes.entry(exchange.to_string()).or_default();
        for (key, seq) in keys.inner() {
            entry.insert(key.to_string(), integer(seq).ok_or_else(shape)?);
        }
    }
    if let Some(any) = any {
        prev.any = integer(any)
            .ok_or_else(|| format!("{KEY_PREV_ANY_HEADER} must be an integer, got {any:?}"))?;
    }
    Ok(prev)
}

/// Any AMQP integer, or a string of digits (some clients send numbers as text).
fn integer(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.parse().ok(),
        _ => None,
    }
}

fn truncate(text: &str) -> &str {
    let mut end = text.len().min(64);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A delivery that cannot be handled as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Malformed {
    /// Its id, when that much could be read.
    pub(crate) message_id: Option<Uuid>,
    /// What is wrong.
    pub(crate) reason: String,
}

impl Malformed {
    pub(crate) fn new(message_id: Option<Uuid>, reason: impl Into<String>) -> Self {
        Malformed {
            message_id,
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::LongString;

    fn props(headers: &[(&str, AMQPValue)]) -> BasicProperties {
        let mut table = FieldTable::default();
        for (k, v) in headers {
            table.insert((*k).into(), v.clone());
        }
        BasicProperties::default()
            .with_message_id("0192e4a0-0000-7000-8000-000000000001".into())
            .with_type("order.submitted".into())
            .with_headers(table)
    }

    fn key(k: &str) -> (&'static str, AMQPValue) {
        (
            ORDERING_KEY_HEADER,
            AMQPValue::LongString(LongString::from(k)),
        )
    }

    #[test]
    fn reads_id_key_sequence_and_version() {
        let meta = read(
            "order",
            "order.v1.submitted",
            false,
            &props(&[
                key("order-1"),
                (KEY_SEQ_HEADER, AMQPValue::LongLongInt(3)),
                (EVENT_VERSION_HEADER, AMQPValue::LongInt(1)),
            ]),
        )
        .unwrap();
        assert_eq!(meta.key(), Some(("order-1", 3)));
        assert_eq!(meta.event_version, Some(1));
        assert_eq!(meta.event_type.as_deref(), Some("order.submitted"));
        assert!(!meta.replayed);
    }

    #[test]
    fn a_missing_or_bad_sequence_is_malformed_with_the_id_kept() {
        let missing = read("x", "y", false, &props(&[key("k")])).unwrap_err();
        assert!(
            missing.reason.contains("x-key-seq is missing"),
            "{}",
            missing.reason
        );
        assert!(missing.message_id.is_some());
        let text = read(
            "x",
            "y",
            false,
            &props(&[
                key("k"),
                (KEY_SEQ_HEADER, AMQPValue::LongString("two".into())),
            ]),
        )
        .unwrap_err();
        assert!(
            text.reason.contains("must be an integer"),
            "{}",
            text.reason
        );
        let zero = read(
            "x",
            "y",
            false,
            &props(&[key("k"), (KEY_SEQ_HEADER, AMQPValue::LongLongInt(0))]),
        );
        assert!(zero.is_err());
        let digits = read(
            "x",
            "y",
            false,
            &props(&[
                key("k"),
                (KEY_SEQ_HEADER, AMQPValue::LongString("7".into())),
            ]),
        )
        .unwrap();
        assert_eq!(digits.key_seq, Some(7));
    }

    #[test]
    fn a_missing_or_bad_message_id_is_malformed() {
        let none = read("x", "y", false, &BasicProperties::default()).unwrap_err();
        assert_eq!(none.message_id, None);
        assert!(none.reason.contains("no message_id"));
        let bad = read(
            "x",
            "y",
            false,
            &BasicProperties::default().with_message_id("order-17".into()),
        )
        .unwrap_err();
        assert!(bad.reason.contains("not a UUID"), "{}", bad.reason);
    }
}

/// Arbitrary properties never make [`read`] panic: a delivery is either
/// read or malformed (and dead-lettered). Here, not in `tests/`, because
/// [`read`] is `pub(crate)`.
#[cfg(test)]
mod never_panics {
    use lapin::BasicProperties;
    use lapin::types::{AMQPValue, DecimalValue, FieldTable, LongString, ShortString};
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::sample::select;

    use super::read;

    /// The header names the consumer reads, and neighbours of them.
    const NAMES: &[&str] = &[
        "x-ordering-key",
        "x-key-seq",
        "x-key-prev",
        "x-key-prev-any",
        "x-event-version",
        "x-dead-letter-replay",
        "x-original-exchange",
        "x-original-routing-key",
        "X-Key-Seq",
        "traceparent",
        "",
    ];

    /// A `String` of at most `max` bytes (a `ShortString` holds 255).
    fn text(max: usize) -> impl Strategy<Value = String> {
        prop_oneof![
            vec(any::<char>(), 0..=max),
            // Runs of one character, around the 255-byte limits.
            (select(vec!['a', '\u{0}', 'é', '\u{10ffff}']), 0..=max).prop_map(|(c, n)| vec![c; n]),
        ]
        .prop_map(move |chars| {
            let mut s = String::new();
            for c in chars {
                if s.len() + c.len_utf8() > max {
                    break;
                }
                s.push(c);
            }
            s
        })
    }

    /// Arbitrary bytes up to ~400, or text (integers, UUIDs) the consumer
    /// may parse.
    fn bytes() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            vec(any::<u8>(), 0..400),
            text(400).prop_map(String::into_bytes),
            any::<i64>().prop_map(|n| n.to_string().into_bytes()),
            any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).to_string().into_bytes()),
            Just(b"9223372036854775808".to_vec()),
            Just(b"-0".to_vec()),
        ]
    }

    fn name() -> impl Strategy<Value = ShortString> {
        prop_oneof![select(NAMES).prop_map(str::to_owned), text(255)].prop_map(ShortString::from)
    }

    /// Any integer, in every width.
    fn integer() -> impl Strategy<Value = AMQPValue> {
        prop_oneof![
            any::<i8>().prop_map(AMQPValue::ShortShortInt),
            any::<u8>().prop_map(AMQPValue::ShortShortUInt),
            any::<i16>().prop_map(AMQPValue::ShortInt),
            any::<u16>().prop_map(AMQPValue::ShortUInt),
            any::<i32>().prop_map(AMQPValue::LongInt),
            any::<u32>().prop_map(AMQPValue::LongUInt),
            any::<i64>().prop_map(AMQPValue::LongLongInt),
            select(vec![i64::MIN, -1, 0, 1, 2, i64::MAX]).prop_map(AMQPValue::LongLongInt),
            any::<u64>().prop_map(AMQPValue::Timestamp),
        ]
    }

    /// Any value but a table or an array.
    fn scalar() -> BoxedStrategy<AMQPValue> {
        prop_oneof![
            3 => integer(),
            1 => any::<bool>().prop_map(AMQPValue::Boolean),
            1 => any::<f32>().prop_map(AMQPValue::Float),
            1 => any::<f64>().prop_map(AMQPValue::Double),
            1 => (any::<u8>(), any::<u32>())
                .prop_map(|(scale, value)| AMQPValue::DecimalValue(DecimalValue { scale, value })),
            1 => text(255).prop_map(|s| AMQPValue::ShortString(s.into())),
            3 => bytes().prop_map(|b| AMQPValue::LongString(LongString::from(b))),
            1 => vec(any::<u8>(), 0..64).prop_map(|b| AMQPValue::ByteArray(b.into())),
            1 => Just(AMQPValue::Void),
        ]
        .boxed()
    }

    fn table_of(values: impl Strategy<Value = AMQPValue>) -> impl Strategy<Value = FieldTable> {
        vec((name(), values), 0..8).prop_map(|entries| {
            let mut table = FieldTable::default();
            for (k, v) in entries {
                table.insert(k, v);
            }
            table
        })
    }

    /// `x-key-prev`'s shape: `{exchange: {routing key: integer}}`.
    fn key_prev() -> BoxedStrategy<AMQPValue> {
        vec((text(255), table_of(integer())), 0..4)
            .prop_map(|routes| {
                let mut table = FieldTable::default();
                for (exchange, keys) in routes {
                    table.insert(exchange.into(), AMQPValue::FieldTable(keys));
                }
                AMQPValue::FieldTable(table)
            })
            .boxed()
    }

    /// Any value, tables and arrays nested up to 4 levels.
    fn value() -> BoxedStrategy<AMQPValue> {
        scalar()
            .prop_recursive(4, 64, 8, |inner| {
                prop_oneof![
                    vec(inner.clone(), 0..8).prop_map(|v| AMQPValue::FieldArray(v.into())),
                    table_of(inner).prop_map(AMQPValue::FieldTable),
                    key_prev(),
                ]
            })
            .boxed()
    }

    /// Headers: mostly plausible ordering headers (so the checks after the
    /// first ones run too), then arbitrary entries over them.
    fn headers() -> BoxedStrategy<Option<FieldTable>> {
        let key = prop_oneof![
            // A key as producers write them, or any text up to 255 bytes
            // or around the limits, or anything.
            4 => vec(select(&b"abcz09-_.:"[..]), 1..=255)
                .prop_map(|b| AMQPValue::LongString(b.into())),
            2 => text(255).prop_map(|s| AMQPValue::LongString(s.into())),
            1 => text(255).prop_map(|s| AMQPValue::ShortString(s.into())),
            1 => text(300).prop_map(|s| AMQPValue::LongString(s.into())),
            1 => value(),
        ];
        let seq = prop_oneof![3 => integer(), 1 => value()];
        // Where a replay was first published.
        let place = || {
            prop_oneof![
                3 => bytes().prop_map(|b| AMQPValue::LongString(b.into())),
                1 => value(),
            ]
        };
        let ordered = (
            proptest::option::weighted(0.9, key),
            proptest::option::weighted(0.9, seq),
            proptest::option::weighted(0.6, prop_oneof![3 => key_prev(), 1 => value()]),
            proptest::option::weighted(0.5, prop_oneof![3 => integer(), 1 => value()]),
            proptest::option::of(prop_oneof![
                3 => any::<bool>().prop_map(AMQPValue::Boolean),
                1 => value(),
            ]),
            proptest::option::of(prop_oneof![integer(), value()]),
            proptest::option::of(place()),
            proptest::option::of(place()),
        );
        proptest::option::weighted(0.95, (ordered, table_of(value())))
            .prop_map(|h| {
                let ((key, seq, prev, prev_any, replay, version, exchange, routing_key), extra) =
                    h?;
                let mut table = FieldTable::default();
                for (name, v) in [
                    ("x-ordering-key", key),
                    ("x-key-seq", seq),
                    ("x-key-prev", prev),
                    ("x-key-prev-any", prev_any),
                    ("x-dead-letter-replay", replay),
                    ("x-event-version", version),
                    ("x-original-exchange", exchange),
                    ("x-original-routing-key", routing_key),
                ] {
                    if let Some(v) = v {
                        table.insert(name.into(), v);
                    }
                }
                for (k, v) in extra.inner() {
                    table.insert(k.clone(), v.clone());
                }
                Some(table)
            })
            .boxed()
    }

    fn any_properties() -> impl Strategy<Value = BasicProperties> {
        // Mostly readable, so that the headers are read too.
        let message_id = prop_oneof![
            6 => any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).to_string()),
            1 => any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).simple().to_string()),
            1 => text(255),
        ];
        (
            proptest::option::weighted(0.95, message_id),
            proptest::option::of(text(255)),
            headers(),
        )
            .prop_map(|(id, kind, headers)| {
                let mut p = BasicProperties::default();
                if let Some(id) = id {
                    p = p.with_message_id(id.into());
                }
                if let Some(kind) = kind {
                    p = p.with_type(kind.into());
                }
                if let Some(headers) = headers {
                    p = p.with_headers(headers);
                }
                p
            })
    }

    /// Whether lapin can parse `value` off the wire.
    fn parsable(value: &AMQPValue) -> bool {
        match value {
            AMQPValue::ShortString(_) => false,
            AMQPValue::FieldArray(values) => values.as_slice().iter().all(parsable),
            AMQPValue::FieldTable(table) => table.inner().values().all(parsable),
            _ => true,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn reading_arbitrary_properties_never_panics(
            properties in any_properties(),
            exchange in text(255),
            routing_key in text(255),
            redelivered in any::<bool>(),
        ) {
            let result = read(&exchange, &routing_key, redelivered, &properties);
            // And what the lane does next with a message read.
            match &result {
                Ok(meta) => {
                    let _ = meta.key();
                    for name in NAMES {
                        let _ = meta.header_str(name);
                    }
                    if let (Some(prev), Some(seq)) = (&meta.key_prev, meta.key_seq) {
                        let after = prev.predecessor(|_, _| true);
                        let _ = crate::sequence::position(0, seq, after);
                    }
                    prop_assert!(meta.key_seq.is_none_or(|s| s >= 1));
                    if let Some(key) = &meta.ordering_key {
                        prop_assert!(!key.is_empty() && key.len() <= 255 && !key.contains('\0'));
                    }
                }
                Err(bad) => prop_assert!(!bad.reason.is_empty()),
            }
            // A message held ahead of its key is stored with its properties
            // and read again from them: the same way. Only for values a
            // delivery can hold: lapin parses no type into a `ShortString`
            // value (it writes one as `_`, which it cannot read back).
            let from_the_wire = properties
                .headers()
                .as_ref()
                .is_none_or(|h| h.inner().values().all(parsable));
            if from_the_wire {
                let stored = crate::held::encode_properties(&properties)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let loaded = crate::held::decode_properties(&stored)
                    .map_err(TestCaseError::fail)?;
                let again = read(&exchange, &routing_key, redelivered, &loaded);
                prop_assert_eq!(format!("{again:?}"), format!("{result:?}"));
            }
        }
    }
}
