//! The per-message transaction: dedupe by message id and keep per-key
//! order, with the handler's writes in the same transaction.
//!
//! A message ahead of its key is not applied: the consumer keeps it in
//! `inbox_held` ([`crate::held`]) and acks it, and whoever moves the key
//! next applies what waits behind it. Every statement that moves a key
//! reports how many messages of the key are held, so that happens at once.

use std::time::Duration;

use diesel::sql_types::{BigInt, Integer, Nullable, Text};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use uuid::Uuid;

use crate::sequence::{Position, position};
use crate::{Error, Result};

/// What a handler tells the inbox when it does not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerError {
    /// Try again later (the transaction is rolled back; nothing is recorded).
    Retry {
        /// How long to wait first; `None` leaves it to the retry policy.
        after: Option<Duration>,
        /// Why, for logs and the dead letter after the last attempt.
        reason: String,
    },
    /// Give up on this message for good: recorded as discarded, and its key
    /// moves past it so later messages of the key are not stuck.
    Discard(String),
}

/// One delivery, as the inbox needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Incoming<'a> {
    /// The AMQP `message_id`.
    pub message_id: Uuid,
    /// `x-ordering-key` and `x-key-seq`, when the message is ordered.
    pub key: Option<(&'a str, i64)>,
    /// The key position this message must follow: the `key_seq` of the
    /// latest earlier event of the key that this consumer receives (see
    /// [`outbox::wire::KeyPrev::predecessor`]). `None`: the one just before
    /// it, `key_seq - 1`, as for a consumer of every event of the key.
    pub after: Option<i64>,
}

impl<'a> Incoming<'a> {
    /// An ordered message that follows `key_seq - 1`.
    pub fn keyed(message_id: Uuid, key: &'a str, key_seq: i64) -> Self {
        Incoming {
            message_id,
            key: Some((key, key_seq)),
            after: None,
        }
    }

    /// An unordered message.
    pub fn unordered(message_id: Uuid) -> Self {
        Incoming {
            message_id,
            key: None,
            after: None,
        }
    }

    /// The position the key must be at for this message to run.
    pub(crate) fn after_seq(&self) -> Option<i64> {
        self.key.map(|(_, seq)| self.after.unwrap_or(seq - 1))
    }
}

/// What to do with a message that is ahead of its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AheadPolicy {
    /// Apply it and move the key past the gap.
    #[default]
    Apply,
    /// Do not apply it: [`Applied::Held`], nothing written. The consumer
    /// then keeps it in the database until its key gets there.
    Hold,
}

/// What became of a delivery. Every variant but [`Applied::Held`] and
/// [`Applied::Retry`] means: ack it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The handler ran and its writes committed with the dedupe row.
    Applied,
    /// Already applied (or discarded, dead-lettered, held) by this
    /// consumer: nothing ran.
    Duplicate,
    /// Ahead of its key under [`AheadPolicy::Hold`]: nothing ran or was
    /// written.
    Held {
        /// The key's last applied sequence number.
        last: i64,
    },
    /// Older than its key's position, yet never applied: a late message.
    /// Nothing ran or was written; the caller applies its late policy
    /// (dead-letter it, with the reason, and count it).
    Late {
        /// The key's last applied sequence number.
        last: i64,
    },
    /// The handler asked to retry; everything was rolled back.
    Retry {
        /// The handler's requested delay.
        after: Option<Duration>,
        /// The handler's reason.
        reason: String,
    },
    /// The handler discarded it; recorded, and the key moved past it.
    Discarded(String),
    /// Its `x-key-seq` is more than `max` beyond the key's position: not a
    /// gap that will fill, but a bad sequence number. Nothing ran; the
    /// caller dead-letters it (the key stays where it is).
    TooFarAhead {
        /// The key's last applied sequence number.
        last: i64,
        /// The limit ([`Inbox::with_max_ahead`]).
        max: i64,
    },
}

/// How a message was settled without its handler running, as recorded in
/// `inbox_messages.outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Sent to the consumer's dead-letter queue; a replay may still apply it.
    DeadLettered,
    /// Acknowledged without a handler (an unknown type under the ignore policy).
    Ignored,
    /// The handler discarded it (its writes were rolled back).
    Discarded,
}

impl Settled {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Settled::DeadLettered => "dead-lettered",
            Settled::Ignored => "ignored",
            Settled::Discarded => "discarded",
        }
    }
}

/// An inbox transaction's result as the consumer uses it: what became of
/// the message, and whether messages of its key are held and may now run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Outcome {
    pub(crate) applied: Applied,
    pub(crate) held_behind: bool,
}

impl From<Applied> for Outcome {
    fn from(applied: Applied) -> Self {
        Outcome {
            applied,
            held_behind: false,
        }
    }
}

impl Inbox {
    /// The outcome for a message that must not run now (held, late, or too
    /// far ahead to be real), given its key's position `last`; `None` when
    /// its handler runs.
    pub(crate) fn out_of_turn(
        &self,
        last: Option<i64>,
        message: Incoming<'_>,
        check: Check,
    ) -> Option<Applied> {
        let (Some(last), Some((_, seq)), Some(after), Check::Order(ahead)) =
            (last, message.key, message.after_seq(), check)
        else {
            return None;
        };
        match position(last, seq, after) {
            Position::Next => None,
            // A sequence number far beyond the key's position is not a gap
            // that will fill: applied, it would make every real event of
            // the key late, forever.
            Position::Ahead { .. } if seq.saturating_sub(last) > self.max_ahead => {
                Some(Applied::TooFarAhead {
                    last,
                    max: self.max_ahead,
                })
            }
            Position::Ahead { .. } if ahead == AheadPolicy::Apply => None,
            Position::Ahead { .. } => Some(Applied::Held { last }),
            Position::Behind { last } => Some(Applied::Late { last }),
        }
    }
}

/// Which sequence check a message gets.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Check {
    Order(AheadPolicy),
    None,
}

/// What a message's id row may take over when it is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Takeover {
    /// Nothing: an id already recorded is a duplicate.
    Nothing,
    /// A dead-lettered id (a replay applies it).
    DeadLettered,
}

/// The inbox of one consumer name in one schema.
#[derive(Debug, Clone)]
pub struct Inbox {
    consumer: String,
    keys_table: String,
    messages_table: String,
    held_table: String,
    /// How far beyond its key's position a sequence number may be.
    max_ahead: i64,
}

/// The default of [`Inbox::with_max_ahead`]: a million events of one key
/// between two a consumer receives is beyond any real gap.
pub const DEFAULT_MAX_AHEAD: i64 = 1_000_000;

/// What recording a message found: the key's position before it (NULL
/// when unordered).
#[derive(QueryableByName)]
pub(crate) struct Recorded {
    #[diesel(sql_type = Nullable<BigInt>)]
    pub(crate) last_seq: Option<i64>,
}

/// How many messages of a key are held after it moved (NULL: unordered).
#[derive(QueryableByName)]
pub(crate) struct HeldCount {
    #[diesel(sql_type = Nullable<Integer>)]
    pub(crate) held: Option<i32>,
}

/// Why a transaction ended without committing.
pub(crate) enum Abort {
    Outcome(Applied),
    /// The handler discarded the message: roll back, then record it.
    Discard(String),
    Database(diesel::result::Error),
}

impl From<diesel::result::Error> for Abort {
    fn from(e: diesel::result::Error) -> Self {
        Abort::Database(e)
    }
}

impl Inbox {
    /// The inbox of consumer `name` in the schema the migrations installed.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for an empty or over-long name or a bad schema.
    pub fn new(name: &str, schema: &str) -> Result<Self> {
        if name.is_empty() || name.len() > 255 {
            return Err(Error::Config {
                field: "consumer name",
                reason: format!("must be 1 to 255 bytes, got {} bytes", name.len()),
            });
        }
        outbox::Config {
            schema: schema.to_owned(),
            ..outbox::Config::default()
        }
        .validate()
        .map_err(|e| Error::Config {
            field: "schema",
            reason: e.to_string(),
        })?;
        Ok(Inbox {
            consumer: name.to_owned(),
            keys_table: format!(r#""{schema}".inbox_keys"#),
            messages_table: format!(r#""{schema}".inbox_messages"#),
            held_table: format!(r#""{schema}".inbox_held"#),
            max_ahead: DEFAULT_MAX_AHEAD,
        })
    }

    /// Sets how far beyond its key's position a message's `x-key-seq` may
    /// be before it counts as malformed ([`Applied::TooFarAhead`]). Defaults
    /// to [`DEFAULT_MAX_AHEAD`].
    #[must_use]
    pub fn with_max_ahead(mut self, max_ahead: i64) -> Self {
        self.max_ahead = max_ahead.max(1);
        self
    }

    /// Handles one delivery in one transaction: locks the key's position,
    /// records the message id (a conflict means duplicate), checks the key
    /// sequence, runs `handler` on the same connection, moves the key, and
    /// commits. The handler's writes commit if and only if the dedupe row
    /// does, so a message's effects commit at most once per consumer name.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] when a statement fails; everything is rolled back
    /// and the delivery should be retried.
    pub fn apply<F>(
        &self,
        conn: &mut PgConnection,
        message: Incoming<'_>,
        ahead: AheadPolicy,
        handler: F,
    ) -> Result<Applied>
    where
        F: FnOnce(&mut PgConnection) -> std::result::Result<(), HandlerError>,
    {
        self.run(conn, message, Check::Order(ahead), handler)
            .map(|o| o.applied)
    }

    /// Like [`Inbox::apply`], but without the sequence check: for a message
    /// an operator chose to apply anyway (a replayed dead letter, or a late
    /// message under an apply-late policy). A message id recorded as
    /// dead-lettered may be applied this way; one applied or discarded is
    /// still a [`Applied::Duplicate`]. The key's position never moves back.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] as for [`Inbox::apply`].
    pub fn apply_unordered<F>(
        &self,
        conn: &mut PgConnection,
        message: Incoming<'_>,
        handler: F,
    ) -> Result<Applied>
    where
        F: FnOnce(&mut PgConnection) -> std::result::Result<(), HandlerError>,
    {
        self.run(conn, message, Check::None, handler)
            .map(|o| o.applied)
    }

    /// Records a message this consumer gives up on without running a
    /// handler (dead-lettered, or ignored as an unknown type) and moves its
    /// key past it, so later messages of the key are not held behind it.
    /// Returns false when the id was already recorded (nothing changed).
    ///
    /// # Errors
    ///
    /// [`Error::Database`] when a statement fails; nothing was recorded.
    pub fn settle(
        &self,
        conn: &mut PgConnection,
        message: Incoming<'_>,
        outcome: Settled,
    ) -> Result<bool> {
        self.settle_inner(conn, message, outcome)
            .map(|o| o.is_some())
    }

    /// [`Inbox::settle`], reporting whether messages of the key are held
    /// (`None`: the id was recorded already).
    pub(crate) fn settle_inner(
        &self,
        conn: &mut PgConnection,
        message: Incoming<'_>,
        outcome: Settled,
    ) -> Result<Option<bool>> {
        conn.transaction::<Option<bool>, diesel::result::Error, _>(|conn| {
            if self
                .record_query(message, outcome.as_str(), Takeover::Nothing)
                .load::<Recorded>(conn)?
                .is_empty()
            {
                return Ok(None);
            }
            let held = self.move_key_query(message, 0).load::<HeldCount>(conn)?;
            Ok(Some(held_behind(&held)))
        })
        .map_err(|cause| Error::Database {
            operation: "recording a settled message",
            cause,
        })
    }

    /// The inbox transaction of a live delivery, as [`Inbox::apply`], with
    /// whether messages of its key are held behind it.
    pub(crate) fn run<F>(
        &self,
        conn: &mut PgConnection,
        message: Incoming<'_>,
        check: Check,
        handler: F,
    ) -> Result<Outcome>
    where
        F: FnOnce(&mut PgConnection) -> std::result::Result<(), HandlerError>,
    {
        let result = conn.transaction::<Outcome, Abort, _>(|conn| {
            // The key's row lock orders handlers of one key, across threads
            // and instances: a newcomer waits here, then sees the true position.
            let takeover = match check {
                Check::None => Takeover::DeadLettered,
                Check::Order(_) => Takeover::Nothing,
            };
            let Some(last) = self
                .record_query(message, "applied", takeover)
                .load::<Recorded>(conn)?
                .pop()
            else {
                return Err(Abort::Outcome(Applied::Duplicate));
            };
            if let Some(outcome) = self.out_of_turn(last.last_seq, message, check) {
                return Err(Abort::Outcome(outcome));
            }
            self.handle(conn, message, 0, handler)
        });
        self.finish_discarding(conn, message, result, Inbox::settle_inner)
    }

    /// Runs `handler` inside the message's transaction and, when it
    /// succeeds, moves the key (less `released` held messages).
    pub(crate) fn handle<F>(
        &self,
        conn: &mut PgConnection,
        message: Incoming<'_>,
        released: i32,
        handler: F,
    ) -> std::result::Result<Outcome, Abort>
    where
        F: FnOnce(&mut PgConnection) -> std::result::Result<(), HandlerError>,
    {
        match catch_panic(conn, handler) {
            Ok(()) => {
                let held = self
                    .after_handler_query(message, released)
                    .load::<HeldCount>(conn)?;
                Ok(Outcome {
                    applied: Applied::Applied,
                    held_behind: held_behind(&held),
                })
            }
            Err(HandlerError::Retry { after, reason }) => {
                Err(Abort::Outcome(Applied::Retry { after, reason }))
            }
            // Undo everything, then record the discard on its own.
            Err(HandlerError::Discard(reason)) => Err(Abort::Discard(reason)),
        }
    }

    /// A transaction's result as the caller sees it; a discard (rolled
    /// back) is recorded now with `settle`.
    pub(crate) fn finish_discarding(
        &self,
        conn: &mut PgConnection,
        message: Incoming<'_>,
        result: std::result::Result<Outcome, Abort>,
        settle: fn(&Inbox, &mut PgConnection, Incoming<'_>, Settled) -> Result<Option<bool>>,
    ) -> Result<Outcome> {
        match result {
            Err(Abort::Discard(reason)) => {
                let held = settle(self, conn, message, Settled::Discarded)?;
                Ok(Outcome {
                    applied: Applied::Discarded(reason),
                    held_behind: held == Some(true),
                })
            }
            other => finish(other),
        }
    }
}

/// Runs a handler, turning a panic into a retry that counts as an attempt:
/// the panic is caught before it unwinds through the transaction (which is
/// then rolled back as for any retry), so it neither kills the lane nor
/// escapes the attempt count, and after the last attempt the message is
/// dead-lettered with the panic's message.
pub(crate) fn catch_panic<F>(
    conn: &mut PgConnection,
    handler: F,
) -> std::result::Result<(), HandlerError>
where
    F: FnOnce(&mut PgConnection) -> std::result::Result<(), HandlerError>,
{
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(conn)))
        .unwrap_or_else(|panic| Err(panicked(panic.as_ref())))
}

/// The retry a handler's panic becomes.
pub(crate) fn panicked(panic: &(dyn std::any::Any + Send)) -> HandlerError {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned());
    HandlerError::Retry {
        after: None,
        reason: format!("handler panicked: {message}"),
    }
}

/// Whether a key-moving statement found messages of the key held.
pub(crate) fn held_behind(rows: &[HeldCount]) -> bool {
    rows.iter().any(|r| r.held.unwrap_or(0) > 0)
}

/// A transaction's result as the caller sees it.
pub(crate) fn finish(result: std::result::Result<Outcome, Abort>) -> Result<Outcome> {
    match result {
        Ok(outcome) => Ok(outcome),
        Err(Abort::Outcome(applied)) => Ok(applied.into()),
        Err(Abort::Discard(reason)) => Ok(Applied::Discarded(reason).into()),
        Err(Abort::Database(cause)) => Err(Error::Database {
            operation: "applying a message",
            cause,
        }),
    }
}

impl Inbox {
    /// The consumer name this inbox records for.
    pub(crate) fn consumer(&self) -> &str {
        &self.consumer
    }

    /// The schema-qualified keys, messages and held tables.
    pub(crate) fn tables(&self) -> (&str, &str, &str) {
        (&self.keys_table, &self.messages_table, &self.held_table)
    }

    // The statements, built once here for the sync and the async paths.

    /// Locks the key's row (creating it at position 0) and inserts the
    /// dedupe row, in one statement and in that order: one row with the
    /// key's position (NULL when unordered) if the id was new, none if it
    /// was already there. `takeover` lets a dead-lettered
    /// id be applied (a replay).
    pub(crate) fn record_query<'a>(
        &'a self,
        message: Incoming<'a>,
        outcome: &'static str,
        takeover: Takeover,
    ) -> Query<'a> {
        let conflict = match takeover {
            Takeover::DeadLettered => {
                "ON CONFLICT (consumer, message_id) DO UPDATE SET outcome = EXCLUDED.outcome,
                     processed_at = now() WHERE m.outcome = 'dead-lettered'"
            }
            Takeover::Nothing => "ON CONFLICT DO NOTHING",
        };
        let (keys, messages) = (&self.keys_table, &self.messages_table);
        // The inserted row is selected from the key's upsert, so the key is
        // locked first: the same order as every other writer of the key.
        let sql = if message.key.is_some() {
            format!(
                "WITH k AS (
                     INSERT INTO {keys} AS k (consumer, ordering_key, last_seq) VALUES ($1, $3, 0)
                     ON CONFLICT (consumer, ordering_key) DO UPDATE SET last_seq = k.last_seq
                     RETURNING k.last_seq)
                 INSERT INTO {messages} AS m (consumer, message_id, ordering_key, key_seq, outcome)
                 SELECT $1, $2, $3, $4, $5 FROM k {conflict}
                 RETURNING (SELECT last_seq FROM k) AS last_seq"
            )
        } else {
            format!(
                "INSERT INTO {messages} AS m (consumer, message_id, ordering_key, key_seq, outcome)
                 VALUES ($1, $2, $3, $4, $5) {conflict}
                 RETURNING NULL::bigint AS last_seq"
            )
        };
        diesel::sql_query(sql)
            .into_boxed()
            .bind::<Text, _>(self.consumer.as_str())
            .bind::<diesel::sql_types::Uuid, _>(message.message_id)
            .bind::<Nullable<Text>, _>(message.key.map(|k| k.0))
            .bind::<Nullable<BigInt>, _>(message.key.map(|k| k.1))
            .bind::<Text, _>(outcome)
    }

    /// The statement after a handler that succeeded: the key's move, or for
    /// an unordered message a plain `SELECT`. Either way one statement
    /// runs after the handler's: a handler that swallowed the error of a
    /// failed statement left the transaction aborted, and PostgreSQL would
    /// turn its COMMIT into a rollback without an error, so the message
    /// would look applied and be acked with nothing committed. This
    /// statement fails instead, and the message is tried again. Returns one
    /// [`HeldCount`] row.
    pub(crate) fn after_handler_query<'a>(
        &'a self,
        message: Incoming<'a>,
        released: i32,
    ) -> Query<'a> {
        self.move_key_query(message, released)
    }

    /// Moves the key to the message's sequence (never back), less
    /// `released` held messages, returning how many stay held. For an
    /// unordered message, a `SELECT` of NULL.
    pub(crate) fn move_key_query<'a>(&'a self, message: Incoming<'a>, released: i32) -> Query<'a> {
        let Some((key, seq)) = message.key else {
            return diesel::sql_query("SELECT NULL::integer AS held").into_boxed();
        };
        diesel::sql_query(format!(
            "UPDATE {t} SET last_seq = GREATEST(last_seq, $3), updated_at = now(), held = held - $4
             WHERE consumer = $1 AND ordering_key = $2
             RETURNING held",
            t = self.keys_table
        ))
        .into_boxed()
        .bind::<Text, _>(self.consumer.as_str())
        .bind::<Text, _>(key)
        .bind::<BigInt, _>(seq)
        .bind::<Integer, _>(released)
    }
}

/// Where a recorded replay was first published.
#[derive(QueryableByName)]
pub(crate) struct ReplayRecord {
    #[diesel(sql_type = Text)]
    pub(crate) original_exchange: String,
    #[diesel(sql_type = Text)]
    pub(crate) original_routing_key: String,
}

impl Inbox {
    fn replays_table(&self) -> String {
        self.keys_table.replace("inbox_keys", "inbox_replays")
    }

    /// The replay tool's record of `message_id`, if it put it back.
    pub(crate) fn find_replay(
        &self,
        conn: &mut PgConnection,
        message_id: Uuid,
    ) -> Result<Option<ReplayRecord>> {
        let rows: Vec<ReplayRecord> = diesel::sql_query(format!(
            "SELECT original_exchange, original_routing_key FROM {}
             WHERE consumer = $1 AND message_id = $2",
            self.replays_table()
        ))
        .bind::<Text, _>(self.consumer.as_str())
        .bind::<diesel::sql_types::Uuid, _>(message_id)
        .load(conn)
        .map_err(|cause| Error::Database {
            operation: "looking up a replay",
            cause,
        })?;
        Ok(rows.into_iter().next())
    }

    /// Records that the replay tool puts `message_id` back, first published
    /// to `exchange` with `routing_key`.
    pub(crate) fn record_replay(
        &self,
        conn: &mut PgConnection,
        message_id: Uuid,
        exchange: &str,
        routing_key: &str,
    ) -> Result<()> {
        diesel::sql_query(format!(
            "INSERT INTO {} (consumer, message_id, original_exchange, original_routing_key)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (consumer, message_id) DO UPDATE
             SET original_exchange = EXCLUDED.original_exchange,
                 original_routing_key = EXCLUDED.original_routing_key, recorded_at = now()",
            self.replays_table()
        ))
        .bind::<Text, _>(self.consumer.as_str())
        .bind::<diesel::sql_types::Uuid, _>(message_id)
        .bind::<Text, _>(exchange)
        .bind::<Text, _>(routing_key)
        .execute(conn)
        .map(|_| ())
        .map_err(|cause| Error::Database {
            operation: "recording a replay",
            cause,
        })
    }
}

/// A statement with its parameters, runnable by diesel and diesel-async.
pub(crate) type Query<'a> =
    diesel::query_builder::BoxedSqlQuery<'a, diesel::pg::Pg, diesel::query_builder::SqlQuery>;
