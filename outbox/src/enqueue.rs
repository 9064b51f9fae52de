//! Writing messages into the outbox inside the caller's transaction.
//!
//! Every path goes through the `outbox_enqueue` / `outbox_enqueue_batch` SQL
//! functions, so Rust, plain SQL and other languages write identical rows.
//! The queries are built once here and run by both the sync and the async
//! connection.

use diesel::pg::Pg;
use diesel::query_builder::{BoxedSqlQuery, SqlQuery};
use diesel::sql_types::{Array, BigInt, Bytea, Integer, Jsonb, Nullable, SmallInt, Text};
use diesel::{PgConnection, QueryableByName, RunQueryDsl};
use serde_json::Value;
use uuid::Uuid;

use crate::{Config, Error, Event, Message, Result};

/// What enqueue wrote: the ids a caller may want to log or return.
#[derive(Debug, Clone, Copy, PartialEq, Eq, QueryableByName)]
pub struct Enqueued {
    /// The message id (UUID v7), the AMQP `message_id` consumers dedupe on.
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    pub id: Uuid,
    /// Position in the outbox scan order (not commit order).
    #[diesel(sql_type = BigInt)]
    pub seq: i64,
    /// 1, 2, 3.. per ordering key in commit order; `None` for unkeyed events.
    #[diesel(sql_type = Nullable<BigInt>)]
    pub key_seq: Option<i64>,
    /// The relay partition of the message, computed by the database.
    #[diesel(sql_type = SmallInt)]
    pub partition: i16,
}

/// A batch result row: `Enqueued` plus the 1-based input position.
#[derive(QueryableByName)]
struct BatchRow {
    #[diesel(sql_type = BigInt)]
    ordinal: i64,
    #[diesel(embed)]
    enqueued: Enqueued,
}

/// A handle on one outbox: its schema and limits. Cheap to clone.
///
/// The free functions [`crate::enqueue`] and friends use
/// `Outbox::default()` (schema `public`, 256 KiB payloads).
#[derive(Debug, Clone)]
pub struct Outbox {
    config: Config,
    // The statements, with the schema quoted in, built once.
    enqueue_sql: String,
    batch_sql: String,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox::from_valid(Config::default())
    }
}

impl Outbox {
    /// An outbox with the given config.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the config does not pass [`Config::validate`].
    pub fn new(config: Config) -> Result<Self> {
        config.validate()?;
        Ok(Outbox::from_valid(config))
    }

    fn from_valid(config: Config) -> Self {
        let schema = &config.schema;
        Outbox {
            enqueue_sql: format!(
                r#"SELECT id, seq, key_seq, "partition" FROM "{schema}".outbox_enqueue($1, $2, $3, $4, $5, $6, $7, $8, $9)"#
            ),
            batch_sql: format!(
                r#"SELECT ordinal, id, seq, key_seq, "partition" FROM "{schema}".outbox_enqueue_batch($1, $2, $3, $4, $5, $6, $7, $8, $9)"#
            ),
            config,
        }
    }

    /// The config this outbox was made with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Writes `event` to the outbox in the caller's open transaction: the
    /// event exists if and only if that transaction commits.
    ///
    /// # Errors
    ///
    /// Refused before anything is written: [`Error::NotInTransaction`], the
    /// input errors of [`crate::MessageBuilder::build`], and
    /// [`Error::PayloadTooLarge`]. [`Error::Database`] when the statement
    /// fails; the caller's transaction is then aborted, as with any failed
    /// statement.
    pub fn enqueue<E: Event>(&self, conn: &mut PgConnection, event: &E) -> Result<Enqueued> {
        let message = Message::from_event(event)?;
        self.enqueue_message(conn, &message)
    }

    /// Writes a prepared [`Message`] in the caller's open transaction.
    ///
    /// # Errors
    ///
    /// As [`Outbox::enqueue`].
    pub fn enqueue_message(&self, conn: &mut PgConnection, message: &Message) -> Result<Enqueued> {
        self.precheck(std::slice::from_ref(message), sync_depth(conn))?;
        self.single_query(message)
            .get_result(conn)
            .map_err(|e| Error::database("enqueueing", e))
    }

    /// Writes several messages in one round trip, in the caller's open
    /// transaction. Results come back in input order.
    ///
    /// Counter locks are taken in ordering-key byte order, so two batches
    /// never deadlock on each other; messages of one key keep their order in
    /// `messages`. (Separate `enqueue` calls lock keys in call order: a
    /// transaction that enqueues for several keys should use a batch, or
    /// always enqueue keys in the same order.)
    ///
    /// # Errors
    ///
    /// As [`Outbox::enqueue`]; one bad message refuses the whole batch.
    pub fn enqueue_batch(
        &self,
        conn: &mut PgConnection,
        messages: &[Message],
    ) -> Result<Vec<Enqueued>> {
        self.precheck(messages, sync_depth(conn))?;
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<BatchRow> = self
            .batch_query(messages)
            .load(conn)
            .map_err(|e| Error::database("enqueueing a batch", e))?;
        in_input_order(rows, messages.len())
    }

    /// Applies the embedded migrations to this outbox's schema (creating the
    /// schema when missing); see [`crate::migrate`].
    ///
    /// # Errors
    ///
    /// [`Error::Database`] naming the migration that failed; nothing of it
    /// is left applied.
    pub fn migrate(&self, conn: &mut PgConnection) -> Result<Vec<i32>> {
        crate::migrate::run(conn, &self.config.schema)
    }

    /// Reverts every embedded migration in this outbox's schema, dropping
    /// the outbox and inbox tables with their data. The schema stays.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] naming the migration that failed.
    pub fn revert_migrations(&self, conn: &mut PgConnection) -> Result<Vec<i32>> {
        crate::migrate::revert(conn, &self.config.schema)
    }

    /// The checks every enqueue makes before any statement runs, so a
    /// refusal leaves the caller's transaction usable.
    fn precheck(&self, messages: &[Message], transaction_depth: u32) -> Result<()> {
        let max = self.config.max_payload_bytes;
        if let Some(m) = messages.iter().find(|m| m.payload.len() > max) {
            return Err(Error::PayloadTooLarge {
                event_type: m.event_type.clone(),
                size: m.payload.len(),
                max,
            });
        }
        ensure_transaction(transaction_depth)
    }

    fn max_payload(&self) -> i32 {
        // Config::validate caps it at 128 MiB, well inside i32.
        i32::try_from(self.config.max_payload_bytes).unwrap_or(i32::MAX)
    }

    /// The single-message statement, shared by the sync and async paths.
    fn single_query<'a>(&'a self, m: &'a Message) -> BoxedSqlQuery<'a, Pg, SqlQuery> {
        diesel::sql_query(self.enqueue_sql.as_str())
            .into_boxed()
            .bind::<Text, _>(m.exchange.as_str())
            .bind::<Text, _>(m.routing_key.as_str())
            .bind::<Text, _>(m.event_type.as_str())
            .bind::<Bytea, _>(m.payload.as_slice())
            .bind::<Nullable<Text>, _>(m.ordering_key.as_deref())
            .bind::<Integer, _>(m.event_version)
            .bind::<Jsonb, _>(Value::Object(m.headers.clone()))
            .bind::<diesel::sql_types::Uuid, _>(m.id)
            .bind::<Integer, _>(self.max_payload())
    }

    /// The batch statement, shared by the sync and async paths.
    fn batch_query<'a>(&'a self, ms: &'a [Message]) -> BoxedSqlQuery<'a, Pg, SqlQuery> {
        let column = |f: fn(&'a Message) -> &'a str| ms.iter().map(f).collect::<Vec<_>>();
        diesel::sql_query(self.batch_sql.as_str())
            .into_boxed()
            .bind::<Array<Text>, _>(column(|m| &m.exchange))
            .bind::<Array<Text>, _>(column(|m| &m.routing_key))
            .bind::<Array<Text>, _>(column(|m| &m.event_type))
            .bind::<Array<Bytea>, _>(ms.iter().map(|m| m.payload.as_slice()).collect::<Vec<_>>())
            .bind::<Array<Nullable<Text>>, _>(
                ms.iter()
                    .map(|m| m.ordering_key.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind::<Array<Integer>, _>(ms.iter().map(|m| m.event_version).collect::<Vec<_>>())
            .bind::<Array<Jsonb>, _>(
                ms.iter()
                    .map(|m| Value::Object(m.headers.clone()))
                    .collect::<Vec<_>>(),
            )
            .bind::<Array<diesel::sql_types::Uuid>, _>(ms.iter().map(|m| m.id).collect::<Vec<_>>())
            .bind::<Integer, _>(self.max_payload())
    }
}

#[cfg(feature = "async")]
impl Outbox {
    /// [`Outbox::enqueue`] on diesel-async's `AsyncPgConnection`.
    ///
    /// # Errors
    ///
    /// As [`Outbox::enqueue`].
    pub async fn enqueue_async<E: Event>(
        &self,
        conn: &mut diesel_async::AsyncPgConnection,
        event: &E,
    ) -> Result<Enqueued> {
        // Built before the first await, so the trace context is the caller's span.
        let message = Message::from_event(event)?;
        self.enqueue_message_async(conn, &message).await
    }

    /// [`Outbox::enqueue_message`] on diesel-async's `AsyncPgConnection`.
    ///
    /// # Errors
    ///
    /// As [`Outbox::enqueue`].
    pub async fn enqueue_message_async(
        &self,
        conn: &mut diesel_async::AsyncPgConnection,
        message: &Message,
    ) -> Result<Enqueued> {
        self.precheck(std::slice::from_ref(message), async_depth(conn))?;
        diesel_async::RunQueryDsl::get_result(self.single_query(message), conn)
            .await
            .map_err(|e| Error::database("enqueueing", e))
    }

    /// [`Outbox::enqueue_batch`] on diesel-async's `AsyncPgConnection`.
    ///
    /// # Errors
    ///
    /// As [`Outbox::enqueue_batch`].
    pub async fn enqueue_batch_async(
        &self,
        conn: &mut diesel_async::AsyncPgConnection,
        messages: &[Message],
    ) -> Result<Vec<Enqueued>> {
        self.precheck(messages, async_depth(conn))?;
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<BatchRow> = diesel_async::RunQueryDsl::load(self.batch_query(messages), conn)
            .await
            .map_err(|e| Error::database("enqueueing a batch", e))?;
        in_input_order(rows, messages.len())
    }
}

/// Depth of diesel's transaction on a sync connection (0 when none is open).
fn sync_depth(conn: &mut PgConnection) -> u32 {
    use diesel::connection::{AnsiTransactionManager, TransactionManager};
    depth(AnsiTransactionManager::transaction_manager_status_mut(conn))
}

/// Depth of diesel-async's transaction (0 when none is open).
#[cfg(feature = "async")]
fn async_depth(conn: &mut diesel_async::AsyncPgConnection) -> u32 {
    use diesel_async::{AnsiTransactionManager, TransactionManager};
    depth(AnsiTransactionManager::transaction_manager_status_mut(conn))
}

/// Both connections keep diesel's own transaction status.
fn depth(status: &mut diesel::connection::TransactionManagerStatus) -> u32 {
    status
        .transaction_depth()
        .ok()
        .flatten()
        .map_or(0, |d| d.get())
}

/// Outside a transaction the event would commit on its own, apart from the
/// business change: exactly the dual write the outbox exists to prevent.
fn ensure_transaction(depth: u32) -> Result<()> {
    if depth == 0 {
        return Err(Error::NotInTransaction);
    }
    Ok(())
}

/// Puts batch rows (returned in lock order) back in input order.
fn in_input_order(rows: Vec<BatchRow>, expected: usize) -> Result<Vec<Enqueued>> {
    let mut out: Vec<Option<Enqueued>> = vec![None; expected];
    for row in rows {
        let slot = usize::try_from(row.ordinal - 1)
            .ok()
            .and_then(|i| out.get_mut(i));
        if let Some(slot) = slot {
            *slot = Some(row.enqueued);
        }
    }
    out.into_iter().collect::<Option<Vec<_>>>().ok_or_else(|| {
        Error::database(
            "enqueueing a batch",
            diesel::result::Error::DeserializationError(
                "outbox_enqueue_batch returned fewer rows than messages".into(),
            ),
        )
    })
}

/// [`Outbox::enqueue`] on the default outbox (schema `public`).
///
/// The event exists if and only if the caller's transaction commits.
///
/// ```no_run
/// # use diesel::{Connection, PgConnection};
/// # #[derive(serde::Serialize)] struct OrderSubmitted { order_id: uuid::Uuid }
/// # impl outbox::Event for OrderSubmitted {
/// #     const EXCHANGE: &'static str = "order";
/// #     const ROUTING_KEY: &'static str = "order.v1.submitted";
/// #     const EVENT_TYPE: &'static str = "order.submitted";
/// #     fn ordering_key(&self) -> Option<String> { Some(self.order_id.to_string()) }
/// # }
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut conn = PgConnection::establish("postgres://postgres@127.0.0.1/test")?;
/// conn.transaction(|conn| {
///     // ... insert the order with diesel ...
///     outbox::enqueue(conn, &OrderSubmitted { order_id: uuid::Uuid::now_v7() })?;
///     Ok::<_, outbox::Error>(())
/// })?;
/// # Ok(()) }
/// ```
///
/// # Errors
///
/// As [`Outbox::enqueue`].
pub fn enqueue<E: Event>(conn: &mut PgConnection, event: &E) -> Result<Enqueued> {
    Outbox::default().enqueue(conn, event)
}

/// [`Outbox::enqueue_message`] on the default outbox (schema `public`).
///
/// # Errors
///
/// As [`Outbox::enqueue`].
pub fn enqueue_message(conn: &mut PgConnection, message: &Message) -> Result<Enqueued> {
    Outbox::default().enqueue_message(conn, message)
}

/// [`Outbox::enqueue_batch`] on the default outbox (schema `public`).
///
/// # Errors
///
/// As [`Outbox::enqueue_batch`].
pub fn enqueue_batch(conn: &mut PgConnection, messages: &[Message]) -> Result<Vec<Enqueued>> {
    Outbox::default().enqueue_batch(conn, messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(ordinal: i64, seq: i64) -> BatchRow {
        BatchRow {
            ordinal,
            enqueued: Enqueued {
                id: Uuid::nil(),
                seq,
                key_seq: None,
                partition: 0,
            },
        }
    }

    #[test]
    fn batch_rows_return_to_input_order() {
        let out = in_input_order(vec![row(2, 10), row(3, 11), row(1, 12)], 3).unwrap();
        let seqs: Vec<i64> = out.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [12, 10, 11]);
    }

    #[test]
    fn a_missing_batch_row_is_an_error_not_a_short_result() {
        assert!(in_input_order(vec![row(1, 1)], 2).is_err());
    }

    #[test]
    fn no_transaction_is_refused() {
        assert!(matches!(
            ensure_transaction(0),
            Err(Error::NotInTransaction)
        ));
        assert!(ensure_transaction(1).is_ok());
    }
}
