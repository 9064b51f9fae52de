//! Sharing partition queues among the live instances of one consumer name.
//!
//! Every instance heartbeats a row in `inbox_members`. The live ones,
//! sorted by id, split the queues: queue `i` belongs to the instance ranked
//! `i % live`. When the set changes every instance re-subscribes: the old
//! owner of a queue finishes its running handlers and closes its channel
//! (its unacked deliveries go back to the queue), and the new owner, which
//! may have subscribed first, becomes the queue's single active consumer.
//! The inbox's key row lock keeps order even while both still work.

use std::time::Duration;

use diesel::sql_types::{Interval, Text};
use diesel::{PgConnection, QueryableByName, RunQueryDsl};
use uuid::Uuid;

/// The queues (by index) that the instance ranked `rank` of `live` owns.
pub(crate) fn assigned(partitions: u16, rank: usize, live: usize) -> Vec<u16> {
    let live = live.max(1);
    (0..partitions)
        .filter(|q| usize::from(*q) % live == rank % live)
        .collect()
}

#[derive(QueryableByName)]
struct Member {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    instance: Uuid,
}

fn interval(d: Duration) -> diesel::pg::data_types::PgInterval {
    diesel::pg::data_types::PgInterval::from_microseconds(
        i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
    )
}

/// Heartbeats `instance` and returns the live instances, sorted.
pub(crate) fn heartbeat(
    conn: &mut PgConnection,
    schema: &str,
    consumer: &str,
    instance: Uuid,
    ttl: Duration,
) -> diesel::QueryResult<Vec<Uuid>> {
    diesel::sql_query(format!(
        r#"INSERT INTO "{schema}".inbox_members (consumer, instance, heartbeat_at)
           VALUES ($1, $2, now())
           ON CONFLICT (consumer, instance) DO UPDATE SET heartbeat_at = now()"#
    ))
    .bind::<Text, _>(consumer)
    .bind::<diesel::sql_types::Uuid, _>(instance)
    .execute(conn)?;
    // Long-gone instances are removed so the table stays small.
    diesel::sql_query(format!(
        r#"DELETE FROM "{schema}".inbox_members
           WHERE consumer = $1 AND heartbeat_at < now() - $2 * 10"#
    ))
    .bind::<Text, _>(consumer)
    .bind::<Interval, _>(interval(ttl))
    .execute(conn)?;
    let live: Vec<Member> = diesel::sql_query(format!(
        r#"SELECT instance FROM "{schema}".inbox_members
           WHERE consumer = $1 AND heartbeat_at > now() - $2 ORDER BY instance"#
    ))
    .bind::<Text, _>(consumer)
    .bind::<Interval, _>(interval(ttl))
    .load(conn)?;
    Ok(live.into_iter().map(|m| m.instance).collect())
}

/// Removes `instance` at shutdown, so the others take its queues at once.
pub(crate) fn leave(
    conn: &mut PgConnection,
    schema: &str,
    consumer: &str,
    instance: Uuid,
) -> diesel::QueryResult<()> {
    diesel::sql_query(format!(
        r#"DELETE FROM "{schema}".inbox_members WHERE consumer = $1 AND instance = $2"#
    ))
    .bind::<Text, _>(consumer)
    .bind::<diesel::sql_types::Uuid, _>(instance)
    .execute(conn)
    .map(|_| ())
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
    diesel::sql_query(format!(
        r#"DELETE FROM "{schema}".inbox_messages WHERE ctid = ANY (ARRAY(
               SELECT ctid FROM "{schema}".inbox_messages
               WHERE consumer = $1 AND processed_at < now() - $2
               LIMIT $3))"#
    ))
    .bind::<Text, _>(consumer)
    .bind::<Interval, _>(interval(retention))
    .bind::<diesel::sql_types::BigInt, _>(batch)
    .execute(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_queue_has_exactly_one_owner() {
        for partitions in 1..20u16 {
            for live in 1..6 {
                let mut owned: Vec<u16> = (0..live)
                    .flat_map(|rank| assigned(partitions, rank, live))
                    .collect();
                owned.sort_unstable();
                assert_eq!(owned, (0..partitions).collect::<Vec<_>>());
            }
        }
        assert_eq!(assigned(4, 1, 2), [1, 3]);
    }
}
