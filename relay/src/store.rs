//! Every SQL statement the relay runs against the outbox tables.

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::QueryableByName;
use diesel::sql_types::{
    Array, BigInt, Bool, Bytea, Double, Integer, Jsonb, Nullable, SmallInt, Text, Timestamptz,
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use crate::{Error, Result};

/// One pending outbox row, as the relay publishes it.
#[derive(Debug, Clone, QueryableByName)]
pub struct PendingRow {
    /// Scan order.
    #[diesel(sql_type = BigInt)]
    pub seq: i64,
    /// Message id.
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    pub id: Uuid,
    /// Ordering key, if any.
    #[diesel(sql_type = Nullable<Text>)]
    pub ordering_key: Option<String>,
    /// Per-key sequence number, if keyed.
    #[diesel(sql_type = Nullable<BigInt>)]
    pub key_seq: Option<i64>,
    /// Destination exchange.
    #[diesel(sql_type = Text)]
    pub exchange: String,
    /// Routing key.
    #[diesel(sql_type = Text)]
    pub routing_key: String,
    /// Event type.
    #[diesel(sql_type = Text)]
    pub event_type: String,
    /// Payload schema version.
    #[diesel(sql_type = Integer)]
    pub event_version: i32,
    /// JSON body.
    #[diesel(sql_type = Bytea)]
    pub payload: Vec<u8>,
    /// User headers and trace context, as JSON text (parsed per row, so a
    /// value no client can read fails only its own row).
    #[diesel(sql_type = Text)]
    pub headers: String,
    /// Commit time of the enqueueing transaction (approximately).
    #[diesel(sql_type = Timestamptz)]
    pub created_at: DateTime<Utc>,
    /// Failed attempts so far.
    #[diesel(sql_type = Integer)]
    pub attempts: i32,
    /// Keyed events: per exchange and routing key, the key_seq of the
    /// latest earlier event of the key (`{exchange: {routing_key: seq}}`).
    #[diesel(sql_type = Nullable<Jsonb>)]
    pub key_prev: Option<serde_json::Value>,
    /// Earlier events of the key up to this key_seq have unknown routes.
    #[diesel(sql_type = Nullable<BigInt>)]
    pub key_prev_any: Option<i64>,
}

/// A row whose publish failed, with what to do about it.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub(crate) id: Uuid,
    pub(crate) error: String,
    pub(crate) retry_after: Duration,
    pub(crate) park: bool,
}

/// The install-time settings the relay needs.
#[derive(Debug, Clone, QueryableByName)]
pub struct Settings {
    /// Partition count.
    #[diesel(sql_type = SmallInt)]
    pub partitions: i16,
    /// NOTIFY channel.
    #[diesel(sql_type = Text)]
    pub notify_channel: String,
}

/// Backlog of one partition.
#[derive(Debug, Clone, QueryableByName, serde::Serialize)]
pub struct PartitionBacklog {
    /// Partition number.
    #[diesel(sql_type = SmallInt)]
    pub partition: i16,
    /// Pending (not published, not parked) rows.
    #[diesel(sql_type = BigInt)]
    pub pending: i64,
    /// Pending rows waiting for a retry.
    #[diesel(sql_type = BigInt)]
    pub retrying: i64,
    /// Age of the oldest pending row in seconds.
    #[diesel(sql_type = Double)]
    pub oldest_age_seconds: f64,
}

/// Totals over the whole outbox.
#[derive(Debug, Clone, Default, QueryableByName, serde::Serialize)]
pub struct Totals {
    /// Pending rows.
    #[diesel(sql_type = BigInt)]
    pub pending: i64,
    /// Pending rows waiting for a retry.
    #[diesel(sql_type = BigInt)]
    pub retrying: i64,
    /// Parked rows.
    #[diesel(sql_type = BigInt)]
    pub parked: i64,
    /// Age of the oldest pending row in seconds (0 when none).
    #[diesel(sql_type = Double)]
    pub oldest_age_seconds: f64,
}

/// A parked row, for `parked list`.
#[derive(Debug, Clone, QueryableByName, serde::Serialize)]
pub struct ParkedRow {
    /// Message id.
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    pub id: Uuid,
    /// Ordering key.
    #[diesel(sql_type = Nullable<Text>)]
    pub ordering_key: Option<String>,
    /// Per-key sequence number.
    #[diesel(sql_type = Nullable<BigInt>)]
    pub key_seq: Option<i64>,
    /// Exchange.
    #[diesel(sql_type = Text)]
    pub exchange: String,
    /// Routing key.
    #[diesel(sql_type = Text)]
    pub routing_key: String,
    /// Event type.
    #[diesel(sql_type = Text)]
    pub event_type: String,
    /// Failed attempts.
    #[diesel(sql_type = Integer)]
    pub attempts: i32,
    /// Why the last attempt failed.
    #[diesel(sql_type = Nullable<Text>)]
    pub last_error: Option<String>,
    /// When the row was enqueued.
    #[diesel(sql_type = Timestamptz)]
    pub created_at: DateTime<Utc>,
    /// When it was parked.
    #[diesel(sql_type = Timestamptz)]
    pub parked_at: DateTime<Utc>,
}

/// Which parked rows an admin command acts on.
#[derive(Debug, Clone)]
pub enum Selection {
    /// These message ids.
    Ids(Vec<Uuid>),
    /// Every parked row of this ordering key.
    Key(String),
    /// Every parked row.
    All,
}

#[derive(QueryableByName)]
struct Flag {
    #[diesel(sql_type = Bool)]
    flag: bool,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// SQL for one outbox schema.
#[derive(Debug, Clone)]
pub struct Store {
    schema: String,
    // Advisory lock namespace: the partition locks of this schema.
    lock_namespace: String,
    // Schema-qualified names and the per-batch statements, built once: the
    // worker runs them for every batch.
    table: String,
    claim_sql: String,
    published_sql: String,
}

impl Store {
    /// Queries for the outbox in `schema` (already validated).
    pub fn new(schema: &str) -> Self {
        Store {
            schema: schema.to_owned(),
            lock_namespace: format!("outbox_relay.{schema}"),
            table: format!(r#""{schema}".outbox_messages"#),
            claim_sql: format!(r#"SELECT * FROM "{schema}".outbox_relay_claim_v3($1, $2, $3, $4)"#),
            published_sql: format!(r#"SELECT "{schema}".outbox_relay_published($1, $2)"#),
        }
    }

    fn table(&self) -> &str {
        &self.table
    }

    /// The settings row, or [`Error::NotMigrated`] when the tables are missing.
    pub async fn settings(&self, conn: &mut AsyncPgConnection) -> Result<Settings> {
        // The newest migration the relay needs: 00006 adds outbox_waiting
        // (00004 added outbox_relay_claim_v3).
        let installed: Flag = diesel::sql_query(
            "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                            WHERE n.nspname = $1 AND c.relname = 'outbox_waiting') AS flag",
        )
        .bind::<Text, _>(&self.schema)
        .get_result(conn)
        .await
        .map_err(Error::db("looking up the outbox tables"))?;
        if !installed.flag {
            return Err(Error::NotMigrated {
                schema: self.schema.clone(),
            });
        }
        diesel::sql_query(format!(
            r#"SELECT partitions, notify_channel FROM "{}".outbox_settings"#,
            self.schema
        ))
        .get_result(conn)
        .await
        .map_err(Error::db("reading outbox_settings"))
    }

    /// Takes the partition's lock for the rest of the transaction and
    /// returns up to `limit` due rows in seq order, and no more than
    /// `max_bytes` of payload (at least one row, however large); empty when
    /// another relay holds the partition (one owner per partition keeps
    /// per-key order).
    ///
    /// A key with a failed row still pending is held back: until that row
    /// is confirmed or parked, it is the only row of its key that goes out
    /// (alone, once its retry is due), so the key's later rows are never
    /// published before it. The SQL is `outbox_relay_claim_v3` in the
    /// migration, a function so its plan is cached per session.
    pub(crate) async fn claim(
        &self,
        conn: &mut AsyncPgConnection,
        partition: i16,
        limit: u32,
        max_bytes: u64,
    ) -> Result<Vec<PendingRow>> {
        diesel::sql_query(self.claim_sql.as_str())
            .bind::<SmallInt, _>(partition)
            .bind::<Integer, _>(i32::try_from(limit).unwrap_or(i32::MAX))
            .bind::<BigInt, _>(i64::try_from(max_bytes).unwrap_or(i64::MAX))
            .bind::<Text, _>(&self.lock_namespace)
            .load(conn)
            .await
            .map_err(Error::db("claiming due rows"))
    }

    /// Which of `partitions` have due rows: one statement of index probes,
    /// so an idle relay's periodic scan costs one query per worker instead
    /// of a transaction per partition.
    pub(crate) async fn due_partitions(
        &self,
        conn: &mut AsyncPgConnection,
        partitions: &[i16],
    ) -> Result<Vec<i16>> {
        #[derive(QueryableByName)]
        struct Due {
            #[diesel(sql_type = SmallInt)]
            partition: i16,
        }
        let due: Vec<Due> = diesel::sql_query(format!(
            r#"SELECT p AS "partition" FROM unnest($1::smallint[]) AS p
               WHERE EXISTS (SELECT 1 FROM {} m
                             WHERE m."partition" = p AND m.published_at IS NULL AND m.parked_at IS NULL
                               AND m.next_attempt_at <= now())"#,
            self.table()
        ))
        .bind::<Array<SmallInt>, _>(partitions)
        .load(conn)
        .await
        .map_err(Error::db("finding partitions with due rows"))?;
        Ok(due.into_iter().map(|d| d.partition).collect())
    }

    /// Says `worker` is about to wait for a NOTIFY on `partitions`: with
    /// `outbox_settings.notify_when = 'waiting'`, producers notify only for
    /// rows of partitions some worker waits on (migration 00006), so a busy
    /// relay costs their commits no NOTIFY. Refreshes `since`, by which
    /// rows of relays that died are recognised.
    pub(crate) async fn set_waiting(
        &self,
        conn: &mut AsyncPgConnection,
        worker: &str,
        partitions: &[i16],
    ) -> Result<()> {
        diesel::sql_query(format!(
            r#"INSERT INTO "{}".outbox_waiting AS w (worker, partitions) VALUES ($1, $2)
               ON CONFLICT (worker) DO UPDATE SET partitions = EXCLUDED.partitions, since = now()"#,
            self.schema
        ))
        .bind::<Text, _>(worker)
        .bind::<Array<SmallInt>, _>(partitions)
        .execute(conn)
        .await
        .map_err(Error::db("saying the worker waits for NOTIFY"))?;
        Ok(())
    }

    /// Says `worker` no longer waits (it is busy, or stopping): producers
    /// stop notifying for its partitions unless another worker waits.
    pub(crate) async fn clear_waiting(
        &self,
        conn: &mut AsyncPgConnection,
        worker: &str,
    ) -> Result<()> {
        diesel::sql_query(format!(
            r#"DELETE FROM "{}".outbox_waiting WHERE worker = $1"#,
            self.schema
        ))
        .bind::<Text, _>(worker)
        .execute(conn)
        .await
        .map_err(Error::db("saying the worker is busy"))?;
        Ok(())
    }

    /// Forgets waiting workers not heard of for `older_than` (their relay
    /// died without saying so): they would only cost needless NOTIFYs.
    pub(crate) async fn delete_stale_waiting(
        &self,
        conn: &mut AsyncPgConnection,
        older_than: Duration,
    ) -> Result<()> {
        diesel::sql_query(format!(
            r#"DELETE FROM "{}".outbox_waiting WHERE since < now() - $1 * interval '1 millisecond'"#,
            self.schema
        ))
        .bind::<BigInt, _>(i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX))
        .execute(conn)
        .await
        .map_err(Error::db("forgetting relays that died"))?;
        Ok(())
    }

    /// Records confirmed rows: deleted, or stamped when kept for retention.
    pub(crate) async fn mark_published(
        &self,
        conn: &mut AsyncPgConnection,
        ids: &[Uuid],
        keep: bool,
    ) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        diesel::sql_query(self.published_sql.as_str())
            .bind::<Array<diesel::sql_types::Uuid>, _>(ids)
            .bind::<Bool, _>(keep)
            .execute(conn)
            .await
            .map_err(Error::db("marking rows published"))?;
        Ok(())
    }

    /// Records failed rows: one more attempt, the error, the next attempt
    /// time, and `parked_at` for those out of attempts.
    pub(crate) async fn mark_failed(
        &self,
        conn: &mut AsyncPgConnection,
        failures: &[Failure],
    ) -> Result<()> {
        if failures.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = failures.iter().map(|f| f.id).collect();
        let errors: Vec<&str> = failures.iter().map(|f| f.error.as_str()).collect();
        let delays: Vec<i64> = failures
            .iter()
            .map(|f| i64::try_from(f.retry_after.as_millis()).unwrap_or(i64::MAX))
            .collect();
        let parks: Vec<bool> = failures.iter().map(|f| f.park).collect();
        diesel::sql_query(format!(
            "UPDATE {} AS m
             SET attempts = m.attempts + 1,
                 last_error = left(f.error, 2000),
                 next_attempt_at = now() + f.delay_ms * interval '1 millisecond',
                 parked_at = CASE WHEN f.park THEN now() END
             FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::bool[]) AS f(id, error, delay_ms, park)
             WHERE m.id = f.id",
            self.table()
        ))
        .bind::<Array<diesel::sql_types::Uuid>, _>(ids)
        .bind::<Array<Text>, _>(errors)
        .bind::<Array<BigInt>, _>(delays)
        .bind::<Array<Bool>, _>(parks)
        .execute(conn)
        .await
        .map_err(Error::db("recording failed rows"))?;
        Ok(())
    }

    /// Records why rows whose fate is unknown (confirm timeout, lost
    /// channel) were not confirmed. They stay due at once and their attempts
    /// do not grow: a broker outage must not park healthy rows.
    pub(crate) async fn note_unknown(
        &self,
        conn: &mut AsyncPgConnection,
        rows: &[(Uuid, String)],
    ) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = rows.iter().map(|r| r.0).collect();
        let errors: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
        diesel::sql_query(format!(
            "UPDATE {} AS m SET last_error = left(f.error, 2000)
             FROM unnest($1::uuid[], $2::text[]) AS f(id, error) WHERE m.id = f.id",
            self.table()
        ))
        .bind::<Array<diesel::sql_types::Uuid>, _>(ids)
        .bind::<Array<Text>, _>(errors)
        .execute(conn)
        .await
        .map_err(Error::db("recording unconfirmed rows"))?;
        Ok(())
    }

    /// Parks pending rows whose partition is outside `0..partitions`: no
    /// worker claims them, so they would wait forever. Returns how many.
    pub(crate) async fn park_strays(
        &self,
        conn: &mut AsyncPgConnection,
        partitions: i16,
    ) -> Result<i64> {
        let n: Count = diesel::sql_query(format!(
            r#"WITH parked AS (
                   UPDATE {} SET parked_at = now(), attempts = attempts + 1,
                       last_error = format('partition %s is outside 0..%s: no relay works it', "partition", $1 - 1)
                   WHERE published_at IS NULL AND parked_at IS NULL AND ("partition" < 0 OR "partition" >= $1)
                   RETURNING 1)
               SELECT count(*) AS n FROM parked"#,
            self.table()
        ))
        .bind::<SmallInt, _>(partitions)
        .get_result(conn)
        .await
        .map_err(Error::db("parking rows outside the partitions"))?;
        Ok(n.n)
    }

    /// Backlog per partition (only partitions with pending rows).
    pub async fn backlog(&self, conn: &mut AsyncPgConnection) -> Result<Vec<PartitionBacklog>> {
        diesel::sql_query(format!(
            r#"SELECT "partition", count(*) AS pending, count(*) FILTER (WHERE attempts > 0) AS retrying,
                      coalesce(extract(epoch FROM now() - min(created_at))::float8, 0) AS oldest_age_seconds
               FROM {} WHERE published_at IS NULL AND parked_at IS NULL
               GROUP BY "partition" ORDER BY "partition""#,
            self.table()
        ))
        .load(conn)
        .await
        .map_err(Error::db("reading the backlog"))
    }

    /// Totals for the whole outbox. Two statements, each matching a partial
    /// index, so the retained published rows are never scanned.
    pub async fn totals(&self, conn: &mut AsyncPgConnection) -> Result<Totals> {
        let table = self.table();
        let mut totals: Totals = diesel::sql_query(format!(
            r#"SELECT count(*) AS pending, count(*) FILTER (WHERE attempts > 0) AS retrying,
                      0::bigint AS parked,
                      coalesce(extract(epoch FROM now() - min(created_at))::float8, 0) AS oldest_age_seconds
               FROM {table} WHERE published_at IS NULL AND parked_at IS NULL"#
        ))
        .get_result(conn)
        .await
        .map_err(Error::db("reading the totals"))?;
        totals.parked = diesel::sql_query(format!(
            "SELECT count(*) AS n FROM {table} WHERE parked_at IS NOT NULL"
        ))
        .get_result::<Count>(conn)
        .await
        .map_err(Error::db("counting parked rows"))?
        .n;
        Ok(totals)
    }

    /// Parked rows, oldest first.
    pub async fn parked(&self, conn: &mut AsyncPgConnection, limit: i64) -> Result<Vec<ParkedRow>> {
        diesel::sql_query(format!(
            "SELECT id, ordering_key, key_seq, exchange, routing_key, event_type, attempts, last_error,
                    created_at, parked_at
             FROM {} WHERE parked_at IS NOT NULL ORDER BY seq LIMIT $1",
            self.table()
        ))
        .bind::<BigInt, _>(limit)
        .load(conn)
        .await
        .map_err(Error::db("listing parked rows"))
    }

    fn selection_sql(selection: &Selection) -> &'static str {
        match selection {
            Selection::Ids(_) => "parked_at IS NOT NULL AND id = ANY($1::uuid[])",
            Selection::Key(_) => "parked_at IS NOT NULL AND ordering_key = $1",
            Selection::All => "parked_at IS NOT NULL AND $1::text IS NULL",
        }
    }

    async fn run_selection(
        &self,
        conn: &mut AsyncPgConnection,
        sql: String,
        selection: &Selection,
    ) -> Result<i64> {
        let query = diesel::sql_query(sql).into_boxed();
        let query = match selection {
            Selection::Ids(ids) => query.bind::<Array<diesel::sql_types::Uuid>, _>(ids.clone()),
            Selection::Key(key) => query.bind::<Text, _>(key.clone()),
            Selection::All => query.bind::<Nullable<Text>, _>(None::<String>),
        };
        let n: Count = query
            .get_result(conn)
            .await
            .map_err(Error::db("changing parked rows"))?;
        Ok(n.n)
    }

    /// Makes parked rows pending again with fresh attempts; returns how many.
    pub async fn retry_parked(
        &self,
        conn: &mut AsyncPgConnection,
        selection: &Selection,
    ) -> Result<i64> {
        let sql = format!(
            "WITH changed AS (
                 UPDATE {} SET parked_at = NULL, attempts = 0, next_attempt_at = now()
                 WHERE {} RETURNING 1)
             SELECT count(*) AS n FROM changed",
            self.table(),
            Self::selection_sql(selection)
        );
        self.run_selection(conn, sql, selection).await
    }

    /// Deletes parked rows for good; returns how many.
    pub async fn purge_parked(
        &self,
        conn: &mut AsyncPgConnection,
        selection: &Selection,
    ) -> Result<i64> {
        let sql = format!(
            "WITH gone AS (DELETE FROM {} WHERE {} RETURNING 1) SELECT count(*) AS n FROM gone",
            self.table(),
            Self::selection_sql(selection)
        );
        self.run_selection(conn, sql, selection).await
    }

    /// Deletes up to `limit` published rows older than `retention`; returns
    /// how many. Called in a loop, so no statement holds locks for long.
    pub(crate) async fn delete_expired(
        &self,
        conn: &mut AsyncPgConnection,
        retention: Duration,
        limit: i64,
    ) -> Result<i64> {
        let table = self.table();
        let n: Count = diesel::sql_query(format!(
            "WITH gone AS (
                 DELETE FROM {table} WHERE seq IN (
                     SELECT seq FROM {table}
                     WHERE published_at < now() - $1 * interval '1 millisecond'
                     ORDER BY published_at LIMIT $2
                     FOR UPDATE SKIP LOCKED)
                 RETURNING 1)
             SELECT count(*) AS n FROM gone"
        ))
        .bind::<BigInt, _>(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX))
        .bind::<BigInt, _>(limit)
        .get_result(conn)
        .await
        .map_err(Error::db("deleting expired rows"))?;
        Ok(n.n)
    }

    /// Whether the database answers.
    pub async fn ping(conn: &mut AsyncPgConnection) -> Result<()> {
        diesel::sql_query("SELECT 1")
            .execute(conn)
            .await
            .map_err(Error::db("pinging the database"))?;
        Ok(())
    }
}

/// Connects to the database; the error shows the URL without its password.
///
/// TLS follows the URL's `sslmode` as libpq would ([`outbox::pg_async`]).
/// The cause never quotes the password.
pub async fn connect(url: &str) -> Result<AsyncPgConnection> {
    let timeout = crate::publish::CONNECT_TIMEOUT;
    let error = |cause: String| Error::Connect {
        what: "database",
        url: crate::redact_url(url),
        cause: outbox::redact_secrets(url, &cause),
    };
    tokio::time::timeout(timeout, outbox::pg_async::connect(url))
        .await
        .map_err(|_| error(format!("no answer within {timeout:?}")))?
        .map_err(|e| error(e.to_string()))
}
