//! The order service's replica of the users: each registered customer's
//! current name, kept from `user.*.registered` and `user.*.renamed`. Placing
//! an order for a registered customer checks and copies the name from here,
//! so the order service takes orders while the users service is down.
//!
//! The price is lag: the replica is as old as the last event that reached
//! the order service, so a user registered a moment ago may not be known
//! yet, and an order placed just after a rename carries the old name.

use consumer::HandlerResult;
use diesel::prelude::*;
// `filter` on an upsert is its `ON CONFLICT .. DO UPDATE .. WHERE`.
use diesel::query_dsl::methods::FilterDsl;
use diesel::upsert::excluded;
use uuid::Uuid;

use crate::events::{UserRegistered, UserRenamed};

/// The replica's table, in the order service's schema.
pub const SCHEMA_SQL: &str = "
CREATE TABLE IF NOT EXISTS customers (
    id uuid PRIMARY KEY,
    name text NOT NULL,
    version bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);";

// diesel's table definitions (the schema of the service's tables).
#[allow(missing_docs)]
mod tables {
    diesel::table! {
        customers (id) {
            id -> Uuid,
            name -> Text,
            version -> BigInt,
            updated_at -> Timestamptz,
        }
    }
}
use tables::customers;

/// `user.*.registered`: the customer is known from now on.
pub fn on_registered(conn: &mut PgConnection, e: &UserRegistered) -> HandlerResult {
    keep_newest(conn, e.user_id, &e.name, e.version)
}

/// `user.*.renamed`: the customer's new name.
pub fn on_renamed(conn: &mut PgConnection, e: &UserRenamed) -> HandlerResult {
    keep_newest(conn, e.user_id, &e.name, e.version)
}

/// One upsert for both events, kept only when its version is newer than
/// the replica's. The consumer already applies each event once and a
/// user's events in order; the version makes the replica right even so
/// when they are not (a dead letter replayed late, a rename that arrives
/// before a lost registration), since the newest name wins whatever came
/// first.
fn keep_newest(conn: &mut PgConnection, id: Uuid, name: &str, version: i64) -> HandlerResult {
    diesel::insert_into(customers::table)
        .values((
            customers::id.eq(id),
            customers::name.eq(name),
            customers::version.eq(version),
        ))
        .on_conflict(customers::id)
        .do_update()
        .set((
            customers::name.eq(excluded(customers::name)),
            customers::version.eq(excluded(customers::version)),
            customers::updated_at.eq(diesel::dsl::now),
        ))
        .filter(customers::version.lt(excluded(customers::version)))
        .execute(conn)
        .map(|_| ())
        .map_err(crate::retry)
}

/// The customer's name as the replica has it; `None` when not (yet) known.
///
/// # Errors
///
/// A database error.
pub fn name_of(conn: &mut PgConnection, id: Uuid) -> QueryResult<Option<String>> {
    customers::table
        .find(id)
        .select(customers::name)
        .first(conn)
        .optional()
}
