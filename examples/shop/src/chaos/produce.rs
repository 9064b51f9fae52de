//! The producers: connections that enqueue with plain SQL
//! (`outbox_enqueue`), as a service in any language would, and record each
//! event they commit in `chaos_produced` in the same transaction, so the
//! checks know exactly what was committed whatever the faults did to the
//! connections.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use diesel::sql_types::{BigInt, Bytea, Nullable, Text};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};

/// The routing keys events go to, at random.
pub(super) const ROUTES: [&str; 3] = ["chaos.v1.a", "chaos.v1.b", "chaos.v1.c"];

/// What one producer needs.
#[derive(Clone)]
pub(super) struct Producer {
    /// Connection URL with `search_path` set to the run's schema.
    pub(super) url: String,
    pub(super) exchange: String,
    pub(super) keys: u32,
    /// Stop once this many events are committed in all.
    pub(super) target: u64,
    /// Events per second for this producer (0: as fast as it goes).
    pub(super) rate: f64,
    pub(super) seed: u64,
    /// Events committed so far by all producers.
    pub(super) committed: Arc<AtomicU64>,
}

#[derive(QueryableByName)]
struct Enqueued {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: uuid::Uuid,
    #[diesel(sql_type = Nullable<BigInt>)]
    key_seq: Option<i64>,
}

impl Producer {
    /// Enqueues until the target is reached. A failed transaction (its
    /// connection killed, the database restarting) is dropped and the
    /// producer reconnects: the event either committed (and is in
    /// `chaos_produced`) or did not exist.
    pub(super) fn run(self) {
        let mut rng = fastrand::Rng::with_seed(self.seed);
        let mut conn: Option<PgConnection> = None;
        let started = Instant::now();
        let mut sent = 0u64;
        while self.committed.load(Ordering::Relaxed) < self.target {
            if self.rate > 0.0 {
                let due = started + Duration::from_secs_f64(sent as f64 / self.rate);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            let c = match conn.as_mut() {
                Some(c) => c,
                None => match PgConnection::establish(&self.url) {
                    Ok(c) => conn.insert(c),
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                },
            };
            let key = format!("key-{}", rng.u32(0..self.keys));
            let route = ROUTES[rng.usize(..ROUTES.len())];
            let body = format!(r#"{{"key":"{key}","route":"{route}"}}"#);
            let done = c.transaction::<_, diesel::result::Error, _>(|c| {
                let e: Enqueued =
                    diesel::sql_query("SELECT id, key_seq FROM outbox_enqueue($1, $2, $3, $4, $5)")
                        .bind::<Text, _>(&self.exchange)
                        .bind::<Text, _>(route)
                        .bind::<Text, _>(route)
                        .bind::<Bytea, _>(body.as_bytes())
                        .bind::<Text, _>(&key)
                        .get_result(c)?;
                diesel::sql_query(
                    "INSERT INTO chaos_produced (id, ordering_key, key_seq, routing_key)
                     VALUES ($1, $2, $3, $4)",
                )
                .bind::<diesel::sql_types::Uuid, _>(e.id)
                .bind::<Text, _>(&key)
                .bind::<Nullable<BigInt>, _>(e.key_seq)
                .bind::<Text, _>(route)
                .execute(c)?;
                Ok(())
            });
            sent += 1;
            match done {
                Ok(()) => {
                    self.committed.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    conn = None;
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}
