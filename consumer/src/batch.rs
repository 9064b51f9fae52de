//! The fast path for a batch of deliveries: one transaction with one
//! statement that locks every key and records every message id, the
//! handlers, one statement that moves every key, and one commit. Four round
//! trips for the batch instead of four per message.
//!
//! It is only taken when nothing in the batch needs undoing on its own: no
//! savepoints, so the moment a message is out of turn (held or late) or a
//! handler does not succeed, the whole transaction is rolled back and the
//! caller applies the batch the careful way, each message in its own
//! savepoint (see [`crate::inbox::Inbox::apply`]). Nothing was committed, so
//! that second pass sees exactly what the first one saw.

use std::collections::HashMap;

use diesel::sql_types::{Array, BigInt, Nullable, Text};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use uuid::Uuid;

use crate::handler::HandlerResult;
use crate::inbox::{AheadPolicy, Applied, Check, Inbox, Incoming, Outcome};
use crate::{Error, Result};

/// One message of a batch, with its handler call.
pub(crate) struct BatchCall {
    /// The handler, run on the batch's transaction.
    pub(crate) f: Box<dyn FnOnce(&mut PgConnection) -> HandlerResult + Send>,
    /// The AMQP `message_id`.
    pub(crate) message_id: Uuid,
    /// `x-ordering-key` and `x-key-seq`, when ordered.
    pub(crate) key: Option<(String, i64)>,
    /// The key position it follows (see [`Incoming::after`]).
    pub(crate) after: Option<i64>,
    /// What a message ahead of its key gets.
    pub(crate) ahead: AheadPolicy,
    /// The message's span, entered while its handler runs.
    pub(crate) span: tracing::Span,
}

impl BatchCall {
    /// How the record statement's rows name this message.
    fn fresh_key(&self) -> (Uuid, Option<String>) {
        (self.message_id, self.key.as_ref().map(|(k, _)| k.clone()))
    }

    fn incoming(&self) -> Incoming<'_> {
        Incoming {
            message_id: self.message_id,
            key: self.key.as_ref().map(|(k, s)| (k.as_str(), *s)),
            after: self.after,
        }
    }
}

/// A message id the record statement inserted, with its key and the key's
/// position before the batch (NULL when unordered).
#[derive(QueryableByName)]
struct Fresh {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    message_id: Uuid,
    #[diesel(sql_type = Nullable<Text>)]
    ordering_key: Option<String>,
    #[diesel(sql_type = Nullable<BigInt>)]
    last_seq: Option<i64>,
}

/// Why the fast path gave up.
enum Bail {
    /// Something needs a savepoint: rolled back, take the careful path.
    Careful,
    Database(diesel::result::Error),
}

impl From<diesel::result::Error> for Bail {
    fn from(e: diesel::result::Error) -> Self {
        Bail::Database(e)
    }
}

/// Applies `calls` (distinct keys, as the scheduler hands them out) in one
/// transaction. `Ok(Some(outcomes))`, in the order of `calls`, holds only
/// [`Applied::Applied`] and [`Applied::Duplicate`], each saying whether
/// messages of its key are held. `Ok(None)`: nothing was committed and the
/// handlers' calls are spent; apply the batch again message by message.
///
/// # Errors
///
/// [`Error::Database`] when a statement or the commit fails; nothing of
/// the batch was applied.
pub(crate) fn apply_batch(
    inbox: &Inbox,
    conn: &mut PgConnection,
    calls: Vec<BatchCall>,
) -> Result<Option<Vec<Outcome>>> {
    let result = conn.transaction::<Vec<Outcome>, Bail, _>(|conn| {
        // Keyed by id and key: one id twice in a batch (under two keys) is
        // inserted once, and only the copy that was gets its handler run.
        let mut fresh: HashMap<(Uuid, Option<String>), Option<i64>> = record_query(inbox, &calls)
            .load::<Fresh>(conn)?
            .into_iter()
            .map(|f| ((f.message_id, f.ordering_key), f.last_seq))
            .collect();
        // Decide every message's turn before any handler runs: one out of
        // turn means the careful path, and no handler should run twice
        // for nothing.
        for call in &calls {
            if let Some(last) = fresh.get(&call.fresh_key())
                && inbox
                    .out_of_turn(*last, call.incoming(), Check::Order(call.ahead))
                    .is_some()
            {
                return Err(Bail::Careful);
            }
        }
        let mut outcomes = Vec::with_capacity(calls.len());
        let mut keys = Vec::with_capacity(calls.len());
        let mut moved: (Vec<String>, Vec<i64>) = (Vec::new(), Vec::new());
        for call in calls {
            keys.push(call.key.as_ref().map(|(k, _)| k.clone()));
            if fresh.remove(&call.fresh_key()).is_none() {
                outcomes.push(Applied::Duplicate);
                continue;
            }
            let _entered = call.span.enter();
            crate::inbox::catch_panic(conn, call.f).map_err(|_| Bail::Careful)?;
            if let Some((key, seq)) = call.key {
                moved.0.push(key);
                moved.1.push(seq);
            }
            outcomes.push(Applied::Applied);
        }
        // Run even with no key to move: a handler that swallowed a failed
        // statement left the transaction aborted, and this fails on it,
        // where the COMMIT would only turn into a silent rollback.
        let held: std::collections::HashSet<String> = move_keys_query(inbox, moved.0, moved.1)
            .load::<HeldKey>(conn)?
            .into_iter()
            .filter(|k| k.held > 0)
            .map(|k| k.ordering_key)
            .collect();
        Ok(outcomes
            .into_iter()
            .zip(keys)
            .map(|(applied, key)| Outcome {
                held_behind: applied == Applied::Applied && key.is_some_and(|k| held.contains(&k)),
                applied,
            })
            .collect())
    });
    match result {
        Ok(outcomes) => Ok(Some(outcomes)),
        Err(Bail::Careful) => Ok(None),
        Err(Bail::Database(cause)) => Err(Error::Database {
            operation: "applying a batch of messages",
            cause,
        }),
    }
}

/// A key the batch moved, with how many of its messages are held.
#[derive(QueryableByName)]
struct HeldKey {
    #[diesel(sql_type = Text)]
    ordering_key: String,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    held: i32,
}

/// Locks the keys of the batch (creating missing ones at position 0), in
/// byte order of the key (collation "C", the order the lane sorts a batch
/// in, so a batch applied message by message locks in the same order) so
/// two writers of overlapping keys cannot deadlock, and only then inserts
/// the dedupe rows: one row back per id that was new, with its key and the
/// key's position before the batch.
fn record_query<'a>(inbox: &'a Inbox, calls: &[BatchCall]) -> crate::inbox::Query<'a> {
    let (keys, messages, _) = inbox.tables();
    // `locked` is an aggregate over every locked key: it has to finish
    // before the first dedupe row is inserted, as in the one-message path.
    let sql = format!(
        r#"WITH input AS (
             SELECT * FROM unnest($2::uuid[], $3::text[], $4::bigint[])
                 AS i(message_id, ordering_key, key_seq)),
         k AS (
             INSERT INTO {keys} AS k (consumer, ordering_key, last_seq)
             SELECT $1, ordering_key, 0::bigint
             FROM (SELECT DISTINCT ordering_key FROM input WHERE ordering_key IS NOT NULL) d
             ORDER BY ordering_key COLLATE "C"
             ON CONFLICT (consumer, ordering_key) DO UPDATE SET last_seq = k.last_seq
             RETURNING k.ordering_key, k.last_seq),
         m AS (
             INSERT INTO {messages} AS m (consumer, message_id, ordering_key, key_seq, outcome)
             SELECT $1, i.message_id, i.ordering_key, i.key_seq, 'applied'
             FROM input i, (SELECT count(*) FROM k) AS locked
             ON CONFLICT DO NOTHING
             RETURNING m.message_id, m.ordering_key)
         SELECT m.message_id, m.ordering_key, k.last_seq
         FROM m LEFT JOIN k ON k.ordering_key = m.ordering_key"#
    );
    let ids: Vec<Uuid> = calls.iter().map(|c| c.message_id).collect();
    let keys: Vec<Option<String>> = calls
        .iter()
        .map(|c| c.key.as_ref().map(|k| k.0.clone()))
        .collect();
    let seqs: Vec<Option<i64>> = calls.iter().map(|c| c.key.as_ref().map(|k| k.1)).collect();
    diesel::sql_query(sql)
        .into_boxed()
        .bind::<Text, _>(inbox.consumer())
        .bind::<Array<diesel::sql_types::Uuid>, _>(ids)
        .bind::<Array<Nullable<Text>>, _>(keys)
        .bind::<Array<Nullable<BigInt>>, _>(seqs)
}

/// Moves each key of the batch to its message's sequence (never back),
/// returning each moved key with its held count.
fn move_keys_query(inbox: &Inbox, keys: Vec<String>, seqs: Vec<i64>) -> crate::inbox::Query<'_> {
    let (table, _, _) = inbox.tables();
    diesel::sql_query(format!(
        "UPDATE {table} AS k SET last_seq = GREATEST(k.last_seq, u.key_seq), updated_at = now()
         FROM unnest($2::text[], $3::bigint[]) AS u(ordering_key, key_seq)
         WHERE k.consumer = $1 AND k.ordering_key = u.ordering_key
         RETURNING k.ordering_key, k.held"
    ))
    .into_boxed()
    .bind::<Text, _>(inbox.consumer())
    .bind::<Array<Text>, _>(keys)
    .bind::<Array<BigInt>, _>(seqs)
}
