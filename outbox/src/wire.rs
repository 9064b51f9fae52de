//! The wire format's names and rules that the writer (the relay) and the
//! reader (the consumer) share, so the two cannot drift. The AMQP encoding
//! itself lives beside each side's client: `relay::wire` writes,
//! `consumer::envelope` reads.
//!
//! Headers the toolkit sets on every message (see `docs/DESIGN.md`):
//!
//! | header | value |
//! |--------|-------|
//! | `x-ordering-key` | the ordering key (keyed events) |
//! | `x-key-seq` | 1, 2, 3.. per key in commit order (keyed events) |
//! | `x-key-prev` | table `{exchange: {routing key: key_seq}}`: per route, the latest earlier event of the key (keyed events) |
//! | `x-key-prev-any` | earlier events up to this key_seq have unknown routes (keys older than route recording) |
//! | `x-event-version` | payload schema version |
//! | `outbox-slot-<n>` | `true`; `n` = [`slot`] of the key (of the id when unkeyed): consumers' partition queues bind on it |
//! | `x-hash-key` | the ordering key, else the id (read by consumers of earlier versions) |

use std::collections::BTreeMap;

/// Header carrying the ordering key on the wire.
pub const ORDERING_KEY_HEADER: &str = "x-ordering-key";
/// Header carrying the per-key sequence number on the wire.
pub const KEY_SEQ_HEADER: &str = "x-key-seq";
/// Header carrying the payload's schema version on the wire.
pub const EVENT_VERSION_HEADER: &str = "x-event-version";
/// Header carrying, per exchange and routing key, the `key_seq` of the
/// latest earlier event of the key: what a consumer bound to some routes
/// must have applied before this event.
pub const KEY_PREV_HEADER: &str = "x-key-prev";
/// Header carrying a `key_seq` up to which earlier events of the key have
/// routes nobody recorded; every consumer of the key waits for it.
pub const KEY_PREV_ANY_HEADER: &str = "x-key-prev-any";

/// Header that consumers of earlier versions spread messages by (a
/// consistent-hash exchange). The relay sets it to the ordering key; an
/// unordered message keeps the producer's own `x-hash-key` if it set one,
/// else gets its message id. The slot of an unordered message is taken
/// from the same value.
pub const HASH_KEY_HEADER: &str = "x-hash-key";

/// Prefix of the slot header, `outbox-slot-<n>`. The slot is in the header's
/// *name* because a RabbitMQ headers exchange matches a binding's names:
/// one binding per queue listing its slots (`x-match: any`) routes as fast
/// as a topic binding, where one binding per slot value halves the
/// broker's throughput (measured, docs/DESIGN.md). Header names starting
/// with `x-` are ignored by headers exchanges, hence no `x-`.
pub const SLOT_HEADER_PREFIX: &str = "outbox-slot-";

/// Number of slots keys are hashed into; a consumer has at most this many
/// partition queues.
pub const SLOTS: u16 = 64;

/// Header names the relay sets from the message's columns; producers
/// cannot set them (nor any name starting with one of
/// [`RESERVED_PREFIXES`]).
pub const RESERVED_HEADERS: &[&str] = &[
    ORDERING_KEY_HEADER,
    KEY_SEQ_HEADER,
    EVENT_VERSION_HEADER,
    KEY_PREV_HEADER,
    KEY_PREV_ANY_HEADER,
];

/// Prefixes of header names the toolkit sets: the slot, and the consumer's
/// dead-letter and replay headers (a producer setting those could forge a
/// replay).
pub const RESERVED_PREFIXES: &[&str] = &["outbox-", "x-dead-letter-", "x-original-"];

/// Largest size of a message's headers, measured as PostgreSQL writes the
/// `jsonb` as text (`octet_length(headers::text)`): the broker takes all of
/// a message's properties in one frame (128 KiB by default, and it closes
/// the connection on a larger one), so headers stay well under it.
pub const MAX_HEADERS_BYTES: usize = 16 * 1024;

/// Whether producers are refused this header name (any case).
pub fn is_reserved(name: &str) -> bool {
    RESERVED_HEADERS
        .iter()
        .any(|r| r.eq_ignore_ascii_case(name))
        || RESERVED_PREFIXES.iter().any(|prefix| {
            name.get(..prefix.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
        })
}

/// The size of `headers` as PostgreSQL writes the `jsonb` as text (a space
/// after each `:` and `,`, which serde_json's compact form leaves out);
/// compared with [`MAX_HEADERS_BYTES`].
pub fn headers_size(headers: &serde_json::Value) -> usize {
    fn separators(value: &serde_json::Value) -> usize {
        match value {
            serde_json::Value::Object(map) => {
                2 * map.len() - usize::from(!map.is_empty())
                    + map.values().map(separators).sum::<usize>()
            }
            serde_json::Value::Array(items) => {
                items.len().saturating_sub(1) + items.iter().map(separators).sum::<usize>()
            }
            _ => 0,
        }
    }
    serde_json::to_string(headers).map_or(usize::MAX, |s| s.len()) + separators(headers)
}

/// Checks a row's destination and type by the enqueue function's rules (a
/// row written by other means may break them; the relay parks it). The
/// error says which field and why.
pub fn check_route(exchange: &str, routing_key: &str, event_type: &str) -> Result<(), String> {
    crate::validate::exchange(exchange)
        .and_then(|()| crate::validate::routing_key(routing_key))
        .and_then(|()| crate::validate::event_type(event_type))
        .map_err(|e| e.to_string())
}

/// The slot of a key (or of the id of an unordered message): FNV-1a (64
/// bit) of its UTF-8 bytes, modulo [`SLOTS`]. Stable across processes,
/// versions and broker restarts, unlike a hash ring.
pub fn slot(hash_key: &str) -> u16 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in hash_key.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Fold the high half in: FNV's low bits alone mix poorly.
    ((hash ^ (hash >> 32)) % u64::from(SLOTS)) as u16
}

/// The header that routes a message of this slot.
pub fn slot_header(slot: u16) -> String {
    format!("{SLOT_HEADER_PREFIX}{slot}")
}

/// The slot a header name routes by, if it is a slot header.
pub fn parse_slot_header(name: &str) -> Option<u16> {
    let n: u16 = name.strip_prefix(SLOT_HEADER_PREFIX)?.parse().ok()?;
    (n < SLOTS).then_some(n)
}

/// What came before an event of a key: per exchange and routing key, the
/// `key_seq` of the latest earlier event (`x-key-prev`), and a `key_seq` up
/// to which routes are unknown (`x-key-prev-any`, 0 when none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPrev {
    /// `{exchange: {routing key: key_seq}}`.
    pub routes: BTreeMap<String, BTreeMap<String, i64>>,
    /// Every earlier event up to this `key_seq` may be one the consumer
    /// binds.
    pub any: i64,
}

impl KeyPrev {
    /// The key position a consumer must have reached before it applies this
    /// event: the latest earlier event on a route it `binds`, or `any`,
    /// whichever is later (0: nothing before it concerns the consumer).
    pub fn predecessor(&self, binds: impl Fn(&str, &str) -> bool) -> i64 {
        self.routes
            .iter()
            .flat_map(|(exchange, keys)| keys.iter().map(move |(key, seq)| (exchange, key, *seq)))
            .filter(|(exchange, key, _)| binds(exchange, key))
            .map(|(_, _, seq)| seq)
            .fold(self.any.max(0), i64::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_stable_and_spread_keys_over_every_slot() {
        // Pinned: a change here would move every key to another queue.
        assert_eq!(slot("order-1"), slot("order-1"));
        let pinned: Vec<u16> = ["a", "order-1", "key-17"].iter().map(|k| slot(k)).collect();
        assert_eq!(pinned, [0, 50, 23]); // "a": FNV-1a 0xaf63dc4c8601ec8c
        let mut counts = [0u32; SLOTS as usize];
        for i in 0..6400 {
            counts[slot(&format!("key-{i}")) as usize] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(*min > 50 && *max < 160, "uneven: {min}..{max}");
    }

    #[test]
    fn slot_headers_round_trip_and_others_are_not_slots() {
        for s in [0, 7, SLOTS - 1] {
            assert_eq!(parse_slot_header(&slot_header(s)), Some(s));
        }
        assert_eq!(parse_slot_header("outbox-slot-64"), None);
        assert_eq!(parse_slot_header("outbox-slot-x"), None);
        assert_eq!(parse_slot_header("x-key-seq"), None);
    }

    #[test]
    fn reserved_names_in_any_case() {
        assert!(is_reserved("X-Key-Seq"));
        assert!(is_reserved("x-key-prev"));
        assert!(is_reserved("Outbox-Slot-3"));
        assert!(is_reserved("outbox-anything"));
        assert!(is_reserved("X-Dead-Letter-Replay"));
        assert!(is_reserved("x-original-exchange"));
        assert!(!is_reserved("tenant"));
        assert!(!is_reserved("outbo"));
        assert!(!is_reserved("x-hash-key"), "producers may choose it");
    }

    #[test]
    fn headers_are_measured_as_postgres_writes_them() {
        // SELECT octet_length('{"a": [1, 2], "b": {"c": "d"}}'::jsonb::text) = 30
        let h = serde_json::json!({"a": [1, 2], "b": {"c": "d"}});
        assert_eq!(headers_size(&h), 30);
        assert_eq!(headers_size(&serde_json::json!({})), 2);
    }

    #[test]
    fn the_predecessor_is_the_latest_earlier_event_on_a_bound_route() {
        let mut prev = KeyPrev::default();
        prev.routes.entry("order".into()).or_default().extend([
            ("order.v1.submitted".to_owned(), 1),
            ("order.v1.paid".to_owned(), 4),
            ("order.v1.shipped".to_owned(), 3),
        ]);
        prev.routes
            .entry("billing".into())
            .or_default()
            .insert("order.v1.paid".into(), 5);
        let everything = |_: &str, _: &str| true;
        assert_eq!(prev.predecessor(everything), 5);
        let shipped_only = |x: &str, k: &str| x == "order" && k.ends_with("shipped");
        assert_eq!(prev.predecessor(shipped_only), 3);
        assert_eq!(prev.predecessor(|_, _| false), 0);
        prev.any = 4;
        assert_eq!(prev.predecessor(shipped_only), 4, "unknown routes count");
    }
}
