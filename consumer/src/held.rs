//! Messages that arrived ahead of their key, kept in `inbox_held` until the
//! key gets there.
//!
//! Holding in the database rather than in memory (or in the broker's
//! prefetch) is what lets order survive keys moving between queues: after
//! a broker restart, a change of `partitions` or a replay, a key's newer
//! messages may arrive through one queue while its older ones still wait in
//! another, perhaps at another instance. The newer ones are acked and kept
//! here, however long the gap takes to fill, without blocking other keys,
//! costing memory or being lost at a crash; whoever moves the key applies
//! what waits behind it (the key-moving statements report `held`), and a
//! periodic sweep catches the rest.
//!
//! A held message is also recorded in `inbox_messages` with outcome `held`,
//! so a redelivery of it is a duplicate.

use std::time::Duration;

use diesel::sql_types::{BigInt, Bool, Bytea, Interval, Text};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use lapin::BasicProperties;
use lapin::protocol::basic::{gen_properties, parse_properties};
use uuid::Uuid;

#[cfg(doc)]
use crate::AheadPolicy;
use crate::inbox::{
    Abort, Applied, Check, HandlerError, HeldCount, Inbox, Incoming, Outcome, Query, Settled,
    held_behind,
};
use crate::sequence::{Position, position};
use crate::{Error, Result};

/// A message as it is kept while held: enough to run its handler, or to
/// dead-letter it byte for byte.
#[derive(Debug, Clone, QueryableByName)]
pub(crate) struct HeldRow {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    pub(crate) message_id: Uuid,
    #[diesel(sql_type = Text)]
    pub(crate) ordering_key: String,
    #[diesel(sql_type = BigInt)]
    pub(crate) key_seq: i64,
    #[diesel(sql_type = Text)]
    pub(crate) exchange: String,
    #[diesel(sql_type = Text)]
    pub(crate) routing_key: String,
    #[diesel(sql_type = Bytea)]
    pub(crate) properties: Vec<u8>,
    #[diesel(sql_type = Bytea)]
    pub(crate) body: Vec<u8>,
    /// Its key has not moved for the gap wait: the after-gap policy applies.
    #[diesel(sql_type = Bool)]
    pub(crate) gap_expired: bool,
}

/// AMQP basic properties (headers included) as they travel on the wire.
pub(crate) fn encode_properties(properties: &BasicProperties) -> Result<Vec<u8>> {
    let written = gen_properties(properties)(Vec::new().into())
        .map_err(|e| Error::Handler(format!("cannot encode the message's properties: {e}")))?;
    Ok(written.write)
}

/// The inverse of [`encode_properties`].
pub(crate) fn decode_properties(bytes: &[u8]) -> std::result::Result<BasicProperties, String> {
    parse_properties(bytes)
        .map(|(_, properties)| properties)
        .map_err(|e| format!("the properties do not parse: {e}"))
}

/// What a hold came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hold {
    /// Kept: ack the delivery.
    Held,
    /// Already recorded (applied, held, dead-lettered): ack the delivery.
    Duplicate,
    /// No longer ahead of its key (the gap filled meanwhile): apply it now.
    NotAhead,
}

#[derive(QueryableByName)]
pub(crate) struct KeyPosition {
    #[diesel(sql_type = BigInt)]
    pub(crate) last_seq: i64,
}

#[derive(QueryableByName)]
pub(crate) struct Count {
    #[diesel(sql_type = BigInt)]
    pub(crate) n: i64,
}

/// A message to keep: where it came from and its bytes.
pub(crate) struct ToHold<'a> {
    pub(crate) exchange: &'a str,
    pub(crate) routing_key: &'a str,
    pub(crate) properties: &'a [u8],
    pub(crate) body: &'a [u8],
}

impl Inbox {
    /// Locks the key's row (creating it at position 0); its position.
    pub(crate) fn lock_key_query<'a>(&'a self, key: &'a str) -> Query<'a> {
        let (keys, _, _) = self.tables();
        diesel::sql_query(format!(
            "INSERT INTO {keys} AS k (consumer, ordering_key, last_seq) VALUES ($1, $2, 0)
             ON CONFLICT (consumer, ordering_key) DO UPDATE SET last_seq = k.last_seq
             RETURNING k.last_seq"
        ))
        .into_boxed()
        .bind::<Text, _>(self.consumer())
        .bind::<Text, _>(key)
    }

    /// Takes a held message's row out of `inbox_held` and gives its id the
    /// outcome it ends with: one row back if it was still held.
    pub(crate) fn release_query<'a>(
        &'a self,
        message_id: Uuid,
        outcome: &'static str,
    ) -> Query<'a> {
        let (_, messages, held) = self.tables();
        diesel::sql_query(format!(
            "WITH h AS (DELETE FROM {held} WHERE consumer = $1 AND message_id = $2 RETURNING 1)
             UPDATE {messages} SET outcome = $3, processed_at = now()
             WHERE consumer = $1 AND message_id = $2 AND EXISTS (SELECT 1 FROM h)
             RETURNING 1::bigint AS n"
        ))
        .into_boxed()
        .bind::<Text, _>(self.consumer())
        .bind::<diesel::sql_types::Uuid, _>(message_id)
        .bind::<Text, _>(outcome)
    }

    /// Keeps a message that is ahead of its key, in one transaction: checks
    /// it still is (under the key's lock), records its id as held, stores
    /// it and counts it on the key. Then the delivery can be acked.
    pub(crate) fn hold(
        &self,
        conn: &mut PgConnection,
        message: Incoming<'_>,
        stored: &ToHold<'_>,
    ) -> Result<Hold> {
        let (Some((key, seq)), Some(after)) = (message.key, message.after_seq()) else {
            return Ok(Hold::NotAhead);
        };
        let (keys, messages, held) = self.tables();
        conn.transaction::<Hold, diesel::result::Error, _>(|conn| {
            let last = self
                .lock_key_query(key)
                .get_result::<KeyPosition>(conn)?
                .last_seq;
            if !matches!(position(last, seq, after), Position::Ahead { .. }) {
                return Ok(Hold::NotAhead);
            }
            let kept: Count = diesel::sql_query(format!(
                "WITH m AS (
                     INSERT INTO {messages} (consumer, message_id, ordering_key, key_seq, outcome)
                     VALUES ($1, $2, $3, $4, 'held') ON CONFLICT DO NOTHING RETURNING message_id),
                 h AS (
                     INSERT INTO {held} (consumer, message_id, ordering_key, key_seq, after_seq,
                                         exchange, routing_key, properties, body)
                     SELECT $1, message_id, $3, $4, $5, $6, $7, $8, $9 FROM m RETURNING 1),
                 k AS (
                     UPDATE {keys} SET held = held + (SELECT count(*) FROM h)::integer
                     WHERE consumer = $1 AND ordering_key = $3)
                 SELECT count(*) AS n FROM h"
            ))
            .bind::<Text, _>(self.consumer())
            .bind::<diesel::sql_types::Uuid, _>(message.message_id)
            .bind::<Text, _>(key)
            .bind::<BigInt, _>(seq)
            .bind::<BigInt, _>(after)
            .bind::<Text, _>(stored.exchange)
            .bind::<Text, _>(stored.routing_key)
            .bind::<Bytea, _>(stored.properties)
            .bind::<Bytea, _>(stored.body)
            .get_result(conn)?;
            Ok(if kept.n == 0 {
                Hold::Duplicate
            } else {
                Hold::Held
            })
        })
        .map_err(|cause| Error::Database {
            operation: "holding a message ahead of its key",
            cause,
        })
    }

    /// Applies a held message in one transaction, as [`Inbox::apply`] does
    /// a delivery: locks its key, takes it out of `inbox_held` (gone: it is
    /// a [`Applied::Duplicate`]), checks its turn as `check` says (after the
    /// gap wait, [`AheadPolicy::Apply`]), runs `handler`, moves the key. A
    /// message that is not run stays held.
    pub(crate) fn apply_held<F>(
        &self,
        conn: &mut PgConnection,
        message: Incoming<'_>,
        check: Check,
        handler: F,
    ) -> Result<Outcome>
    where
        F: FnOnce(&mut PgConnection) -> std::result::Result<(), HandlerError>,
    {
        let Some((key, _)) = message.key else {
            return Err(Error::Handler("a held message has no key".into()));
        };
        let result = conn.transaction::<Outcome, Abort, _>(|conn| {
            let last = self
                .lock_key_query(key)
                .get_result::<KeyPosition>(conn)?
                .last_seq;
            if self
                .release_query(message.message_id, "applied")
                .load::<Count>(conn)?
                .is_empty()
            {
                return Err(Abort::Outcome(Applied::Duplicate));
            }
            if let Some(outcome) = self.out_of_turn(Some(last), message, check) {
                return Err(Abort::Outcome(outcome));
            }
            self.handle(conn, message, 1, handler)
        });
        self.finish_discarding(conn, message, result, Inbox::settle_held)
    }

    /// Settles a held message without its handler (dead-lettered, ignored,
    /// discarded): out of `inbox_held`, recorded with `outcome`, its key
    /// moved past it. `None` when it was not held any more.
    pub(crate) fn settle_held(
        &self,
        conn: &mut PgConnection,
        message: Incoming<'_>,
        outcome: Settled,
    ) -> Result<Option<bool>> {
        let Some((key, _)) = message.key else {
            return Ok(None);
        };
        conn.transaction::<Option<bool>, diesel::result::Error, _>(|conn| {
            self.lock_key_query(key).execute(conn)?;
            if self
                .release_query(message.message_id, outcome.as_str())
                .load::<Count>(conn)?
                .is_empty()
            {
                return Ok(None);
            }
            let held = self.move_key_query(message, 1).load::<HeldCount>(conn)?;
            Ok(Some(held_behind(&held)))
        })
        .map_err(|cause| Error::Database {
            operation: "settling a held message",
            cause,
        })
    }

    /// Held messages of `key` whose turn has come (the key reached what
    /// they follow) or passed, lowest first, at most `limit`.
    pub(crate) fn runnable_held(
        &self,
        conn: &mut PgConnection,
        key: &str,
        limit: i64,
    ) -> Result<Vec<HeldRow>> {
        let (keys, _, held) = self.tables();
        diesel::sql_query(format!(
            "SELECT h.message_id, h.ordering_key, h.key_seq, h.exchange, h.routing_key, h.properties, h.body, false AS gap_expired
             FROM {held} h JOIN {keys} k ON k.consumer = h.consumer AND k.ordering_key = h.ordering_key
             WHERE h.consumer = $1 AND h.ordering_key = $2
               AND (h.after_seq <= k.last_seq OR h.key_seq <= k.last_seq)
             ORDER BY h.key_seq LIMIT $3"
        ))
        .bind::<Text, _>(self.consumer())
        .bind::<Text, _>(key)
        .bind::<BigInt, _>(limit)
        .load(conn)
        .map_err(|cause| Error::Database {
            operation: "reading held messages",
            cause,
        })
    }

    /// The sweep: held messages whose turn has come (a key moved by a
    /// process that died before applying them), and, when `gap_wait` is
    /// given, the lowest held message of each key that has not moved for
    /// that long (marked `gap_expired`). At most `limit`.
    pub(crate) fn sweep_held(
        &self,
        conn: &mut PgConnection,
        gap_wait: Option<Duration>,
        limit: i64,
    ) -> Result<Vec<HeldRow>> {
        let (keys, _, held) = self.tables();
        let wait = gap_wait.unwrap_or_default();
        diesel::sql_query(format!(
            "SELECT h.message_id, h.ordering_key, h.key_seq, h.exchange, h.routing_key, h.properties, h.body,
                    NOT (h.after_seq <= k.last_seq OR h.key_seq <= k.last_seq) AS gap_expired
             FROM {held} h JOIN {keys} k ON k.consumer = h.consumer AND k.ordering_key = h.ordering_key
             WHERE h.consumer = $1
               AND (h.after_seq <= k.last_seq OR h.key_seq <= k.last_seq
                    OR ($2 AND h.held_at < now() - $3 AND k.updated_at < now() - $3
                        AND NOT EXISTS (SELECT 1 FROM {held} e
                                        WHERE e.consumer = h.consumer AND e.ordering_key = h.ordering_key
                                          AND e.key_seq < h.key_seq)))
             ORDER BY h.ordering_key, h.key_seq LIMIT $4"
        ))
        .bind::<Text, _>(self.consumer())
        .bind::<Bool, _>(gap_wait.is_some())
        .bind::<Interval, _>(interval(wait))
        .bind::<BigInt, _>(limit)
        .load(conn)
        .map_err(|cause| Error::Database {
            operation: "sweeping held messages",
            cause,
        })
    }
}

/// A duration as a PostgreSQL interval.
pub(crate) fn interval(d: Duration) -> diesel::pg::data_types::PgInterval {
    diesel::pg::data_types::PgInterval::from_microseconds(
        i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{AMQPValue, FieldTable, LongString};

    #[test]
    fn properties_survive_the_round_trip_through_the_table() {
        let mut headers = FieldTable::default();
        headers.insert(
            "x-ordering-key".into(),
            AMQPValue::LongString(LongString::from("order-1")),
        );
        headers.insert("x-key-seq".into(), AMQPValue::LongLongInt(7));
        let mut nested = FieldTable::default();
        nested.insert("order.v1.paid".into(), AMQPValue::LongLongInt(6));
        headers.insert("x-key-prev".into(), AMQPValue::FieldTable(nested));
        let properties = BasicProperties::default()
            .with_message_id("0190-id".into())
            .with_type("order.paid".into())
            .with_timestamp(1_700_000_000)
            .with_delivery_mode(2)
            .with_headers(headers);
        let bytes = encode_properties(&properties).unwrap();
        assert_eq!(decode_properties(&bytes).unwrap(), properties);
        assert!(decode_properties(&bytes[..bytes.len() / 2]).is_err());
    }
}
