//! Sharing partition queues among the live instances of one consumer name.
//!
//! Each instance holds a session-level advisory lock on its own membership
//! connection and records the lock's key in `inbox_members`. An instance is
//! alive exactly while its lock is held: a crashed process's database
//! session ends with it (the kernel closes its socket), so the others see
//! it gone at their next check (`membership_interval`, 500 ms), not after a
//! heartbeat timeout. The live instances, sorted by id (UUID v7: oldest
//! first), split the queues: queue `k` of the sorted list belongs to the
//! instance ranked `k mod live`. With one partition every instance
//! subscribes to the one queue and single active consumer picks one; the
//! queues being drained are shared the same way.
//!
//! When the set changes every instance re-subscribes: the old owner of a
//! queue finishes its running handlers and closes its channel (its unacked
//! deliveries go back to the queue), and the new owner, which may have
//! subscribed first, becomes the queue's single active consumer. The
//! inbox's key row lock keeps order even while both still work.

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::sql_types::{BigInt, Bool, Interval, Text};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use uuid::Uuid;

use crate::topology::{self, Topology};

/// The queues instance `rank` of `live` consumes, out of `topology`'s.
pub(crate) fn assigned(name: &str, topology: &Topology, rank: usize, live: usize) -> Vec<String> {
    let live = live.max(1);
    let current = topology.current(name);
    if topology.partitions == 1 {
        // Every instance subscribes; single active consumer picks one, and
        // another takes over the moment it goes.
        let mut queues = current;
        queues.extend(
            topology
                .retiring
                .iter()
                .enumerate()
                .filter(|(k, _)| k % live == rank % live)
                .map(|(_, q)| q.clone()),
        );
        return queues;
    }
    current
        .into_iter()
        .chain(topology.retiring.iter().cloned())
        .enumerate()
        .filter(|(k, _)| k % live == rank % live)
        .map(|(_, q)| q)
        .collect()
}

/// One instance's membership: its connection holding the lock.
pub(crate) struct Member {
    schema: String,
    consumer: String,
    /// The instance's id: its rank among the live ones.
    pub(crate) instance: Uuid,
    lock_key: i64,
    conn: Option<PgConnection>,
}

/// What a membership check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct View {
    /// Live instances, sorted by id.
    pub(crate) live: Vec<Uuid>,
    /// The recorded topology (`None` before any instance declared).
    pub(crate) topology: Option<Topology>,
}

#[derive(QueryableByName)]
struct Flag {
    #[diesel(sql_type = Bool)]
    flag: bool,
}

#[derive(QueryableByName)]
struct Live {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    instance: Uuid,
}

impl Member {
    /// Instance `instance` of `consumer`, not joined yet.
    pub(crate) fn new(schema: &str, consumer: &str, instance: Uuid) -> Self {
        Member {
            schema: schema.to_owned(),
            consumer: consumer.to_owned(),
            instance,
            lock_key: rand_key(),
            conn: None,
        }
    }

    /// Joins (connecting and taking the lock when needed) and returns who
    /// is alive. On an error the connection is dropped, which releases the
    /// lock: the others then count this instance gone until it rejoins.
    pub(crate) fn check(&mut self, database_url: &str) -> Result<View, String> {
        let result = self.check_inner(database_url);
        if result.is_err() {
            self.conn = None;
        }
        result.map_err(|e| e.to_string())
    }

    fn check_inner(&mut self, database_url: &str) -> Result<View, Box<dyn std::error::Error>> {
        if self.conn.is_none() {
            self.conn = Some(self.join(database_url)?);
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err("no membership connection".into());
        };
        let schema = &self.schema;
        let live: Vec<Live> = diesel::sql_query(format!(
            r#"SELECT m.instance FROM "{schema}".inbox_members m
               WHERE m.consumer = $1 AND m.lock_key IS NOT NULL
                 AND EXISTS (
                     SELECT 1 FROM pg_locks l
                     WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                       AND l.classid = ((m.lock_key >> 32) & 4294967295)::oid
                       AND l.objid = (m.lock_key & 4294967295)::oid)
               ORDER BY m.instance"#
        ))
        .bind::<Text, _>(&self.consumer)
        .load(conn)?;
        let live: Vec<Uuid> = live.into_iter().map(|l| l.instance).collect();
        if !live.contains(&self.instance) {
            // Our row was removed as dead (our session was cut and came
            // back): record it again.
            self.conn = None;
            return Err("this instance's membership was lost; rejoining".into());
        }
        // Rows of instances whose lock is gone: they will not come back
        // (a restarted process joins with a new id).
        diesel::sql_query(format!(
            r#"DELETE FROM "{schema}".inbox_members
               WHERE consumer = $1 AND NOT (instance = ANY ($2))
                 AND heartbeat_at < now() - $3"#
        ))
        .bind::<Text, _>(&self.consumer)
        .bind::<diesel::sql_types::Array<diesel::sql_types::Uuid>, _>(&live)
        .bind::<Interval, _>(crate::held::interval(Duration::from_secs(60)))
        .execute(conn)?;
        let topology = topology::read(conn, schema, &self.consumer)?;
        Ok(View { live, topology })
    }

    /// Connects, takes the lock and records this instance.
    fn join(&mut self, database_url: &str) -> Result<PgConnection, Box<dyn std::error::Error>> {
        let mut conn = PgConnection::establish(database_url).map_err(|e| {
            format!(
                "connecting for membership: {}",
                outbox::redact_secrets(database_url, &e.to_string())
            )
        })?;
        // A dead peer must not hold its lock for long: TCP keepalives find
        // a vanished host; a crashed process's socket closes at once.
        conn.batch_execute(
            "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; SET tcp_keepalives_count = 3",
        )?;
        loop {
            let taken: Flag = diesel::sql_query("SELECT pg_try_advisory_lock($1) AS flag")
                .bind::<BigInt, _>(self.lock_key)
                .get_result(&mut conn)?;
            if taken.flag {
                break;
            }
            // Someone holds this key (vanishingly rare): pick another.
            self.lock_key = rand_key();
        }
        let schema = &self.schema;
        diesel::sql_query(format!(
            r#"INSERT INTO "{schema}".inbox_members (consumer, instance, heartbeat_at, lock_key)
               VALUES ($1, $2, now(), $3)
               ON CONFLICT (consumer, instance) DO UPDATE SET heartbeat_at = now(), lock_key = EXCLUDED.lock_key"#
        ))
        .bind::<Text, _>(&self.consumer)
        .bind::<diesel::sql_types::Uuid, _>(self.instance)
        .bind::<BigInt, _>(self.lock_key)
        .execute(&mut conn)?;
        Ok(conn)
    }

    /// Leaves at shutdown: the row goes, and closing the connection frees
    /// the lock, so the others take this instance's queues at once.
    pub(crate) fn leave(mut self) {
        if let Some(conn) = self.conn.as_mut() {
            let _ = diesel::sql_query(format!(
                r#"DELETE FROM "{}".inbox_members WHERE consumer = $1 AND instance = $2"#,
                self.schema
            ))
            .bind::<Text, _>(&self.consumer)
            .bind::<diesel::sql_types::Uuid, _>(self.instance)
            .execute(conn);
        }
    }
}

/// A random lock key (the advisory lock space is shared with other users
/// of the database: 64 random bits do not collide in practice, and a
/// collision is detected at join).
fn rand_key() -> i64 {
    // The last 8 bytes of a UUID v7 are random but for 2 variant bits.
    let bytes = Uuid::now_v7().into_bytes();
    i64::from_le_bytes(bytes[8..].try_into().unwrap_or([7; 8]))
}

/// Deletes up to `batch` message ids of `consumer` older than `retention`;
/// returns how many went. Called in a loop until it returns less than `batch`.
pub(crate) fn prune(
    conn: &mut PgConnection,
    schema: &str,
    consumer: &str,
    retention: Duration,
    batch: i64,
) -> diesel::QueryResult<usize> {
    // Replay records as old as the ids go too (a replay not applied by
    // then is not coming).
    diesel::sql_query(format!(
        r#"DELETE FROM "{schema}".inbox_replays WHERE consumer = $1 AND recorded_at < now() - $2"#
    ))
    .bind::<Text, _>(consumer)
    .bind::<Interval, _>(crate::held::interval(retention))
    .execute(conn)?;
    // Held ids stay: the held message needs its row to stay a duplicate.
    diesel::sql_query(format!(
        r#"DELETE FROM "{schema}".inbox_messages WHERE ctid = ANY (ARRAY(
               SELECT ctid FROM "{schema}".inbox_messages
               WHERE consumer = $1 AND processed_at < now() - $2 AND outcome <> 'held'
               LIMIT $3))"#
    ))
    .bind::<Text, _>(consumer)
    .bind::<Interval, _>(crate::held::interval(retention))
    .bind::<BigInt, _>(batch)
    .execute(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology(partitions: u16, retiring: &[&str]) -> Topology {
        Topology {
            partitions,
            retiring: retiring.iter().map(|q| (*q).to_owned()).collect(),
        }
    }

    #[test]
    fn every_queue_has_exactly_one_owner() {
        for partitions in 2..20u16 {
            let t = topology(partitions, &["old.0", "old.1"]);
            for live in 1..6 {
                let mut owned: Vec<String> = (0..live)
                    .flat_map(|rank| assigned("c", &t, rank, live))
                    .collect();
                owned.sort_unstable();
                let mut all = t.current("c");
                all.extend(t.retiring.clone());
                all.sort_unstable();
                assert_eq!(owned, all);
            }
        }
        assert_eq!(assigned("c", &topology(4, &[]), 1, 2), ["c.1", "c.3"]);
    }

    #[test]
    fn with_one_partition_every_instance_subscribes_and_retiring_queues_are_shared() {
        let t = topology(1, &["c.0", "c.1", "c.2"]);
        assert_eq!(assigned("c", &t, 0, 2), ["c", "c.0", "c.2"]);
        assert_eq!(assigned("c", &t, 1, 2), ["c", "c.1"]);
    }
}
