//! The embedded migrations and the ledger that records which are applied.
//!
//! The ledger is our own table, `outbox_migrations`, in the target schema;
//! diesel's `__diesel_schema_migrations` is never touched, so the service's
//! own `diesel migration revert` keeps working (see the README).

use diesel::connection::SimpleConnection;
use diesel::sql_types::{Bool, Integer, Text};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};

use crate::{Error, Result, validate};

/// One numbered migration: the SQL of `migrations/NNNNN_name/{up,down}.sql`.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// The number in the folder name; applied in ascending order.
    pub version: i32,
    /// The rest of the folder name.
    pub name: &'static str,
    /// SQL that installs the objects, run with `search_path` set to the schema.
    pub up: &'static str,
    /// SQL that removes exactly what `up` created.
    pub down: &'static str,
}

/// Every migration, oldest first. Released migrations are never edited;
/// changes come as new ones.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "outbox_tables",
        up: include_str!("../../migrations/00001_outbox_tables/up.sql"),
        down: include_str!("../../migrations/00001_outbox_tables/down.sql"),
    },
    Migration {
        version: 2,
        name: "consumer_members",
        up: include_str!("../../migrations/00002_consumer_members/up.sql"),
        down: include_str!("../../migrations/00002_consumer_members/down.sql"),
    },
    Migration {
        version: 3,
        name: "order_without_the_broker",
        up: include_str!("../../migrations/00003_order_without_the_broker/up.sql"),
        down: include_str!("../../migrations/00003_order_without_the_broker/down.sql"),
    },
    Migration {
        version: 4,
        name: "poison_guards",
        up: include_str!("../../migrations/00004_poison_guards/up.sql"),
        down: include_str!("../../migrations/00004_poison_guards/down.sql"),
    },
    Migration {
        version: 5,
        name: "security",
        up: include_str!("../../migrations/00005_security/up.sql"),
        down: include_str!("../../migrations/00005_security/down.sql"),
    },
    Migration {
        version: 6,
        name: "wake_when_waiting",
        up: include_str!("../../migrations/00006_wake_when_waiting/up.sql"),
        down: include_str!("../../migrations/00006_wake_when_waiting/down.sql"),
    },
];

#[derive(QueryableByName)]
struct Version {
    #[diesel(sql_type = Integer)]
    version: i32,
}

#[derive(QueryableByName)]
struct Exists {
    #[diesel(sql_type = Bool)]
    exists: bool,
}

/// Runs `body` in one transaction that holds the schema's migration lock
/// and has `search_path` set to the schema.
fn locked<T>(
    conn: &mut PgConnection,
    schema: &str,
    create_schema: bool,
    body: impl FnOnce(&mut PgConnection) -> Result<T>,
) -> Result<T> {
    validate::schema(schema)?;
    conn.transaction(|conn| {
        // Two instances starting at once must not both apply a migration.
        diesel::sql_query(
            "SELECT pg_advisory_xact_lock(hashtextextended('outbox.migrate.' || $1, 0))",
        )
        .bind::<Text, _>(schema)
        .execute(conn)
        .map_err(|e| Error::database("taking the migration lock", e))?;
        // Check first: CREATE SCHEMA IF NOT EXISTS needs the CREATE privilege
        // on the database even when the schema exists.
        let exists = diesel::sql_query(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1) AS exists",
        )
        .bind::<Text, _>(schema)
        .get_result::<Exists>(conn)
        .map_err(|e| Error::database("looking up the schema", e))?
        .exists;
        if !exists && create_schema {
            diesel::sql_query(format!(r#"CREATE SCHEMA "{schema}""#))
                .execute(conn)
                .map_err(|e| Error::database(format!("creating schema {schema}"), e))?;
        }
        diesel::sql_query(format!(r#"SET LOCAL search_path TO "{schema}""#))
            .execute(conn)
            .map_err(|e| Error::database("setting search_path", e))?;
        body(conn)
    })
}

fn applied_versions(conn: &mut PgConnection) -> Result<Vec<i32>> {
    let rows: Vec<Version> =
        diesel::sql_query("SELECT version FROM outbox_migrations ORDER BY version")
            .load(conn)
            .map_err(|e| Error::database("reading outbox_migrations", e))?;
    Ok(rows.into_iter().map(|r| r.version).collect())
}

/// Applies the pending migrations to `schema`; returns the versions applied.
pub(crate) fn run(conn: &mut PgConnection, schema: &str) -> Result<Vec<i32>> {
    locked(conn, schema, true, |conn| {
        conn.batch_execute(
            "CREATE TABLE IF NOT EXISTS outbox_migrations (
                 version integer PRIMARY KEY,
                 name text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );
             COMMENT ON TABLE outbox_migrations IS 'Outbox migrations applied by outbox::migrate; apart from diesel''s own table.'",
        )
        .map_err(|e| Error::database("creating outbox_migrations", e))?;
        let applied = applied_versions(conn)?;
        let mut newly = Vec::new();
        for migration in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
            let operation = format!(
                "applying migration {} ({}) to schema {schema}",
                migration.version, migration.name
            );
            conn.batch_execute(migration.up)
                .map_err(|e| Error::database(operation.clone(), e))?;
            diesel::sql_query("INSERT INTO outbox_migrations (version, name) VALUES ($1, $2)")
                .bind::<Integer, _>(migration.version)
                .bind::<Text, _>(migration.name)
                .execute(conn)
                .map_err(|e| Error::database(operation, e))?;
            newly.push(migration.version);
        }
        Ok(newly)
    })
}

/// Reverts every applied migration in `schema`, newest first, then drops
/// the ledger; returns the versions reverted.
pub(crate) fn revert(conn: &mut PgConnection, schema: &str) -> Result<Vec<i32>> {
    locked(conn, schema, false, |conn| {
        let ledger = diesel::sql_query(
            "SELECT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = 'outbox_migrations') AS exists",
        )
        .bind::<Text, _>(schema)
        .get_result::<Exists>(conn)
        .map_err(|e| Error::database("looking up outbox_migrations", e))?
        .exists;
        if !ledger {
            return Ok(Vec::new());
        }
        let applied = applied_versions(conn)?;
        let mut reverted = Vec::new();
        for migration in MIGRATIONS
            .iter()
            .rev()
            .filter(|m| applied.contains(&m.version))
        {
            conn.batch_execute(migration.down).map_err(|e| {
                Error::database(
                    format!(
                        "reverting migration {} ({}) in schema {schema}",
                        migration.version, migration.name
                    ),
                    e,
                )
            })?;
            reverted.push(migration.version);
        }
        conn.batch_execute("DROP TABLE outbox_migrations")
            .map_err(|e| Error::database("dropping outbox_migrations", e))?;
        Ok(reverted)
    })
}

/// Applies the embedded migrations to the `public` schema; returns the
/// versions it applied (empty when all were applied already).
///
/// Safe on an existing database: it creates only objects named `outbox_*`
/// and `inbox_*`, takes an advisory lock so concurrent callers apply each
/// migration once, and runs all in one transaction. For another schema use
/// [`crate::Outbox::migrate`] with [`crate::Config::schema`].
///
/// # Errors
///
/// [`Error::Database`] naming the migration that failed; nothing of the
/// run is left applied.
pub fn migrate(conn: &mut PgConnection) -> Result<Vec<i32>> {
    run(conn, "public")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_ascend_and_every_down_drops_what_its_up_creates() {
        for pair in MIGRATIONS.windows(2) {
            assert!(pair[0].version < pair[1].version);
        }
        for m in MIGRATIONS {
            for line in m.up.lines().map(str::trim) {
                let created = line
                    .strip_prefix("CREATE TABLE IF NOT EXISTS ")
                    .or_else(|| line.strip_prefix("CREATE OR REPLACE FUNCTION "));
                if let Some(rest) = created {
                    let name = rest.split(['(', ' ']).next().unwrap();
                    assert!(
                        m.down.contains(&format!("IF EXISTS {name}")),
                        "migration {} creates {name} but its down does not drop it",
                        m.version
                    );
                }
            }
        }
    }
}
