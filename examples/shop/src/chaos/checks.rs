//! What the run ends with: per consumer, what was committed against what was
//! applied, counted in the database the producers and handlers wrote to.

use std::fmt;
use std::time::Duration;

use diesel::sql_types::{Array, BigInt, Double, Text};
use diesel::{PgConnection, QueryableByName, RunQueryDsl};

/// One consumer's tally.
#[derive(Debug, Clone, Default)]
pub struct ConsumerTally {
    /// The consumer name.
    pub name: String,
    /// Committed events on the routing keys it binds.
    pub expected: i64,
    /// Distinct events it applied.
    pub applied: i64,
    /// Expected events it never applied.
    pub lost: i64,
    /// Events it applied more than once.
    pub applied_twice: i64,
    /// Keys whose events it applied in another order than committed.
    pub keys_out_of_order: i64,
    /// Messages in its dead-letter queue.
    pub dead_letters: u32,
    /// Messages still held in `inbox_held` at the end.
    pub still_held: i64,
    /// Commit to handler, median and 99th percentile, over first applications.
    pub latency_p50: Duration,
    /// See `latency_p50`.
    pub latency_p99: Duration,
}

impl ConsumerTally {
    /// Whether this consumer kept every promise.
    pub fn passed(&self) -> bool {
        self.lost == 0
            && self.applied_twice == 0
            && self.keys_out_of_order == 0
            && self.dead_letters == 0
            && self.still_held == 0
            && self.applied == self.expected
    }
}

/// Everything the run reports.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Events committed by the producers.
    pub committed: i64,
    /// How long producing took, and the rate.
    pub produce_time: Duration,
    /// From the end of producing until every consumer had applied all.
    pub drain_time: Duration,
    /// Outbox rows parked by the relays.
    pub parked: i64,
    /// Outbox rows still pending at the end.
    pub pending: i64,
    /// Per consumer.
    pub consumers: Vec<ConsumerTally>,
    /// Longest stretch a queue had no consumer while the broker was up.
    pub longest_unserved: Duration,
    /// Which queue that was.
    pub unserved_queue: String,
    /// Faults injected, as `name: count`.
    pub faults: Vec<(String, u32)>,
    /// Why the run failed before it could count (a process gave up, the
    /// drain timed out).
    pub error: Option<String>,
}

impl Report {
    /// Nothing lost, nothing applied twice, nothing out of order, no dead
    /// letters, no parked rows, and the run finished.
    pub fn passed(&self) -> bool {
        self.error.is_none()
            && self.parked == 0
            && self.pending == 0
            && !self.consumers.is_empty()
            && self.consumers.iter().all(ConsumerTally::passed)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rate = self.committed as f64 / self.produce_time.as_secs_f64().max(0.001);
        writeln!(f, "chaos run")?;
        writeln!(
            f,
            "  committed {} events in {:.1?} ({rate:.0}/s); drained {:.1?} after",
            self.committed, self.produce_time, self.drain_time
        )?;
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|(name, n)| format!("{name} {n}"))
            .collect();
        writeln!(f, "  faults: {}", faults.join(", "))?;
        writeln!(
            f,
            "  outbox: {} parked, {} pending",
            self.parked, self.pending
        )?;
        for c in &self.consumers {
            writeln!(
                f,
                "  {}: expected {}, applied {}, lost {}, applied twice {}, keys out of order {}, \
                 dead letters {}, still held {}; commit to handler p50 {:.1?}, p99 {:.1?}",
                c.name,
                c.expected,
                c.applied,
                c.lost,
                c.applied_twice,
                c.keys_out_of_order,
                c.dead_letters,
                c.still_held,
                c.latency_p50,
                c.latency_p99
            )?;
        }
        writeln!(
            f,
            "  longest a queue went unserved with the broker up: {:.1?} ({})",
            self.longest_unserved,
            if self.unserved_queue.is_empty() {
                "none"
            } else {
                &self.unserved_queue
            }
        )?;
        if let Some(e) = &self.error {
            writeln!(f, "  error: {e}")?;
        }
        write!(f, "{}", if self.passed() { "PASSED" } else { "FAILED" })
    }
}

#[derive(QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct Latency {
    #[diesel(sql_type = Double)]
    p50: f64,
    #[diesel(sql_type = Double)]
    p99: f64,
}

/// A count over `chaos_produced` with the routes a consumer binds as `$1`.
fn committed(conn: &mut PgConnection, sql: &str, routes: &[String], consumer: &str) -> i64 {
    diesel::sql_query(sql)
        .bind::<Array<Text>, _>(routes)
        .bind::<Text, _>(consumer)
        .get_result::<N>(conn)
        .map(|n| n.n)
        .unwrap_or(-1)
}

/// A count with the consumer name as `$1`.
fn of_consumer(conn: &mut PgConnection, sql: &str, consumer: &str) -> i64 {
    diesel::sql_query(sql)
        .bind::<Text, _>(consumer)
        .get_result::<N>(conn)
        .map(|n| n.n)
        .unwrap_or(-1)
}

/// Events committed on `routes` and distinct ones `consumer` applied.
pub(super) fn progress(conn: &mut PgConnection, consumer: &str, routes: &[String]) -> (i64, i64) {
    let expected =
        diesel::sql_query("SELECT count(*) AS n FROM chaos_produced WHERE routing_key = ANY ($1)")
            .bind::<Array<Text>, _>(routes)
            .get_result::<N>(conn)
            .map_or(-1, |n| n.n);
    let applied = of_consumer(
        conn,
        "SELECT count(DISTINCT message_id) AS n FROM chaos_applied WHERE consumer = $1",
        consumer,
    );
    (expected, applied)
}

/// The tally of `consumer` (bound to `routes`), from a connection whose
/// `search_path` is the run's schema.
pub(super) fn tally(
    conn: &mut PgConnection,
    consumer: &str,
    routes: &[String],
    dead_letters: u32,
) -> ConsumerTally {
    let (expected, applied) = progress(conn, consumer, routes);
    let lost = committed(
        conn,
        "SELECT count(*) AS n FROM chaos_produced p
         WHERE p.routing_key = ANY ($1)
           AND NOT EXISTS (SELECT 1 FROM chaos_applied a WHERE a.consumer = $2 AND a.message_id = p.id)",
        routes,
        consumer,
    );
    let applied_twice = of_consumer(
        conn,
        "SELECT count(*) AS n FROM (
             SELECT message_id FROM chaos_applied WHERE consumer = $1
             GROUP BY message_id HAVING count(*) > 1) t",
        consumer,
    );
    // Rows of one key are inserted one transaction at a time (the inbox
    // locks the key), so `n` order is the order they were applied in.
    let keys_out_of_order = of_consumer(
        conn,
        "SELECT count(DISTINCT ordering_key) AS n FROM (
             SELECT ordering_key, key_seq,
                    lag(key_seq) OVER (PARTITION BY ordering_key ORDER BY n) AS before
             FROM chaos_applied WHERE consumer = $1) t
         WHERE before >= key_seq",
        consumer,
    );
    let still_held = of_consumer(
        conn,
        "SELECT count(*) AS n FROM inbox_held WHERE consumer = $1",
        consumer,
    );
    let latency = diesel::sql_query(
        "SELECT coalesce(percentile_cont(0.5) WITHIN GROUP (ORDER BY d), 0) AS p50,
                coalesce(percentile_cont(0.99) WITHIN GROUP (ORDER BY d), 0) AS p99
         FROM (SELECT extract(epoch FROM min(a.applied_at) - p.committed_at)::float8 AS d
               FROM chaos_applied a JOIN chaos_produced p ON p.id = a.message_id
               WHERE a.consumer = $1 GROUP BY p.id, p.committed_at) t",
    )
    .bind::<Text, _>(consumer)
    .get_result::<Latency>(conn)
    .unwrap_or(Latency { p50: 0.0, p99: 0.0 });
    let secs = |s: f64| Duration::from_secs_f64(s.max(0.0));
    ConsumerTally {
        name: consumer.to_owned(),
        expected,
        applied,
        lost,
        applied_twice,
        keys_out_of_order,
        dead_letters,
        still_held,
        latency_p50: secs(latency.p50),
        latency_p99: secs(latency.p99),
    }
}

/// Parked and pending outbox rows.
pub(super) fn outbox_rows(conn: &mut PgConnection) -> (i64, i64) {
    let one = |conn: &mut PgConnection, sql: &str| {
        diesel::sql_query(sql)
            .get_result::<N>(conn)
            .map(|n| n.n)
            .unwrap_or(-1)
    };
    (
        one(
            conn,
            "SELECT count(*) AS n FROM outbox_messages WHERE parked_at IS NOT NULL",
        ),
        one(
            conn,
            "SELECT count(*) AS n FROM outbox_messages WHERE published_at IS NULL AND parked_at IS NULL",
        ),
    )
}
