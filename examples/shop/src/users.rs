//! The users service: `POST /users` registers a user and
//! `POST /users/{id}/rename` renames one, each writing the user and its
//! event (`user.v1.registered`, `user.v1.renamed`) in **one transaction**;
//! `GET /users/{id}` shows a user with a summary of their orders and
//! `GET /users/{id}/orders` lists them.
//!
//! The users and the order service used to call each other: the order
//! service asked users for the customer's name, users asked the order
//! service for a user's orders, so neither could serve while the other was
//! down. Now each keeps a replica of what it shows of the other's data, fed
//! by events: the order service its [`customers`](crate::customers), the
//! users service its `user_orders`, kept by this module's [`consumer()`] from
//! the order events. A replica lags its source by the events in flight;
//! the demo checks that it catches up.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use consumer::{Consumer, ConsumerConfig, HandlerResult};
use diesel::prelude::*;
use outbox::Outbox;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::events::{OrderCancelled, OrderConfirmed, OrderSubmitted, UserRegistered, UserRenamed};
use crate::json_error;
use crate::pool::Pool;

/// The service's own tables, in its own schema: the users, and the replica
/// of their orders.
pub const SCHEMA_SQL: &str = "
CREATE TABLE IF NOT EXISTS users (
    id uuid PRIMARY KEY,
    name text NOT NULL,
    version bigint NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS user_orders (
    order_id uuid PRIMARY KEY,
    user_id uuid NOT NULL,
    total_cents bigint NOT NULL,
    currency text NOT NULL,
    status text NOT NULL CHECK (status IN ('placed', 'confirmed', 'cancelled')),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS user_orders_user ON user_orders (user_id);";

// diesel's table definitions (the schema of the service's tables).
#[allow(missing_docs)]
mod tables {
    diesel::table! {
        users (id) {
            id -> Uuid,
            name -> Text,
            version -> BigInt,
        }
    }

    diesel::table! {
        user_orders (order_id) {
            order_id -> Uuid,
            user_id -> Uuid,
            total_cents -> BigInt,
            currency -> Text,
            status -> Text,
            updated_at -> Timestamptz,
        }
    }
}
use tables::{user_orders, users};

/// `POST /users` and `POST /users/{id}/rename` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserName {
    /// The user's name: 1 to 100 characters.
    pub name: String,
}

/// A user as the service answers it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserView {
    /// The user.
    pub id: Uuid,
    /// Their current name.
    pub name: String,
    /// 1 at registration, one more per rename.
    pub version: i64,
}

/// `GET /users/{id}` body: the user and what the replica knows of their
/// orders.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserSummary {
    /// The user.
    #[serde(flatten)]
    pub user: UserView,
    /// Their orders, counted by status.
    pub orders: OrderCounts,
}

/// A user's orders by status, from the replica.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct OrderCounts {
    /// Every order.
    pub count: i64,
    /// Placed, the checkout still under way.
    pub placed: i64,
    /// Confirmed (paid).
    pub confirmed: i64,
    /// Cancelled.
    pub cancelled: i64,
    /// Sum of the confirmed orders' totals, in cents.
    pub confirmed_cents: i64,
}

/// One of a user's orders, as the replica has it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Queryable)]
pub struct UserOrder {
    /// The order.
    pub order_id: Uuid,
    /// Its total, in cents.
    pub total_cents: i64,
    /// Currency of the total.
    pub currency: String,
    /// `placed`, `confirmed` or `cancelled`.
    pub status: String,
}

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// The request is not acceptable; nothing was written.
    #[error("{0}")]
    Invalid(String),
    /// No such user.
    #[error("user {0} not found")]
    NotFound(Uuid),
    /// The database failed; the transaction rolled back.
    #[error("database error: {0}")]
    Database(#[from] diesel::result::Error),
    /// The database is unreachable.
    #[error("database unreachable: {0}")]
    Connect(#[from] diesel::ConnectionError),
    /// The outbox refused the event; the transaction rolled back.
    #[error("outbox: {0}")]
    Outbox(#[from] outbox::Error),
}

impl UserName {
    /// Checks the name; the message says what is wrong.
    pub fn validate(&self) -> Result<(), UserError> {
        if self.name.trim().is_empty() || self.name.chars().count() > 100 {
            return Err(UserError::Invalid(
                "name must be 1 to 100 characters".into(),
            ));
        }
        Ok(())
    }
}

/// The users service: its outbox and its connections.
pub struct UsersService {
    outbox: Outbox,
    pool: Pool,
}

impl UsersService {
    /// The service on `database_url` (whose `search_path` is the service's
    /// schema), with the outbox installed in `schema`.
    pub fn new(database_url: &str, schema: &str) -> anyhow::Result<Self> {
        Ok(UsersService {
            outbox: crate::outbox_in(schema)?,
            // Registrations and renames are few; a handful of connections.
            pool: Pool::new(database_url, 4),
        })
    }

    /// Registers a user: the user and `user.v1.registered` commit together
    /// or not at all.
    pub fn register(&self, name: &UserName) -> Result<UserView, UserError> {
        name.validate()?;
        let id = Uuid::now_v7();
        self.pool.with(|conn| {
            conn.transaction(|conn| {
                diesel::insert_into(users::table)
                    .values((
                        users::id.eq(id),
                        users::name.eq(&name.name),
                        users::version.eq(1),
                    ))
                    .execute(conn)?;
                self.outbox.enqueue(
                    conn,
                    &UserRegistered {
                        user_id: id,
                        name: name.name.clone(),
                        version: 1,
                    },
                )?;
                Ok(UserView {
                    id,
                    name: name.name.clone(),
                    version: 1,
                })
            })
        })
    }

    /// Renames a user and enqueues `user.v1.renamed` with the next version,
    /// in one transaction. The same name again changes nothing and sends
    /// nothing.
    pub fn rename(&self, id: Uuid, name: &UserName) -> Result<UserView, UserError> {
        name.validate()?;
        self.pool.with(|conn| {
            conn.transaction(|conn| {
                // Locked, so two renames of one user number their versions
                // one after the other.
                let current: Option<(String, i64)> = users::table
                    .find(id)
                    .select((users::name, users::version))
                    .for_update()
                    .first(conn)
                    .optional()?;
                let Some((old, version)) = current else {
                    return Err(UserError::NotFound(id));
                };
                if old == name.name {
                    return Ok(UserView {
                        id,
                        name: old,
                        version,
                    });
                }
                let version = version + 1;
                diesel::update(users::table.find(id))
                    .set((users::name.eq(&name.name), users::version.eq(version)))
                    .execute(conn)?;
                self.outbox.enqueue(
                    conn,
                    &UserRenamed {
                        user_id: id,
                        name: name.name.clone(),
                        version,
                    },
                )?;
                Ok(UserView {
                    id,
                    name: name.name.clone(),
                    version,
                })
            })
        })
    }

    /// A user and their orders by status, without asking the order service.
    pub fn get(&self, id: Uuid) -> Result<UserSummary, UserError> {
        self.pool.with(|conn| {
            let user = find(conn, id)?;
            // A row per order, counted here: see `consumer` for why.
            let rows: Vec<(String, i64)> = user_orders::table
                .filter(user_orders::user_id.eq(id))
                .select((user_orders::status, user_orders::total_cents))
                .load(conn)?;
            let mut orders = OrderCounts::default();
            for (status, cents) in rows {
                orders.count += 1;
                match status.as_str() {
                    "placed" => orders.placed += 1,
                    "confirmed" => {
                        orders.confirmed += 1;
                        orders.confirmed_cents += cents;
                    }
                    _ => orders.cancelled += 1,
                }
            }
            Ok(UserSummary { user, orders })
        })
    }

    /// A user's orders, oldest first, as the replica has them.
    pub fn orders(&self, id: Uuid) -> Result<Vec<UserOrder>, UserError> {
        self.pool.with(|conn| {
            find(conn, id)?;
            Ok(user_orders::table
                .filter(user_orders::user_id.eq(id))
                // Order ids are UUID v7: their order is the orders' age.
                .order(user_orders::order_id)
                .select((
                    user_orders::order_id,
                    user_orders::total_cents,
                    user_orders::currency,
                    user_orders::status,
                ))
                .load(conn)?)
        })
    }
}

fn find(conn: &mut PgConnection, id: Uuid) -> Result<UserView, UserError> {
    users::table
        .find(id)
        .select((users::id, users::name, users::version))
        .first::<(Uuid, String, i64)>(conn)
        .optional()?
        .map(|(id, name, version)| UserView { id, name, version })
        .ok_or(UserError::NotFound(id))
}

/// `order.*.submitted`: a registered customer's new order enters the
/// replica as `placed` (a guest's order is none of this service's
/// business). Once per order, whatever the repeats: the order id is the key.
pub fn on_order_submitted(conn: &mut PgConnection, e: &OrderSubmitted) -> HandlerResult {
    let Some(user_id) = e.customer_id else {
        return Ok(());
    };
    diesel::insert_into(user_orders::table)
        .values((
            user_orders::order_id.eq(e.order_id),
            user_orders::user_id.eq(user_id),
            user_orders::total_cents.eq(e.total_cents),
            // Version 1 had no currency: its amounts are in EUR.
            user_orders::currency.eq(e.currency.as_deref().unwrap_or("EUR")),
            user_orders::status.eq("placed"),
        ))
        .on_conflict(user_orders::order_id)
        .do_nothing()
        .execute(conn)
        .map(|_| ())
        .map_err(crate::retry)
}

/// `order.*.confirmed`: only a placed order becomes confirmed, so a
/// confirmation applied after the order's cancellation changes nothing.
pub fn on_order_confirmed(conn: &mut PgConnection, e: &OrderConfirmed) -> HandlerResult {
    diesel::update(
        user_orders::table
            .filter(user_orders::order_id.eq(e.order_id))
            .filter(user_orders::status.eq("placed")),
    )
    .set((
        user_orders::status.eq("confirmed"),
        user_orders::updated_at.eq(diesel::dsl::now),
    ))
    .execute(conn)
    .map(|_| ())
    .map_err(crate::retry)
}

/// `order.*.cancelled`: cancelled is final, from either other status.
pub fn on_order_cancelled(conn: &mut PgConnection, e: &OrderCancelled) -> HandlerResult {
    diesel::update(user_orders::table.filter(user_orders::order_id.eq(e.order_id)))
        .set((
            user_orders::status.eq("cancelled"),
            user_orders::updated_at.eq(diesel::dsl::now),
        ))
        .execute(conn)
        .map(|_| ())
        .map_err(crate::retry)
}

/// The users service's consumer: the replica of its users' orders. It takes
/// every event type of an order, so gaps are real ones.
///
/// A row per order, counted when read, rather than a counter per user: a
/// counter row would be locked by every event of the user's orders, and
/// events of different orders run side by side.
///
/// # Errors
///
/// A bad configuration (see [`consumer::ConsumerBuilder::build`]).
pub fn consumer(config: ConsumerConfig) -> consumer::Result<Consumer> {
    Consumer::builder(config)
        .handle("order", "order.*.submitted", |conn, e| {
            on_order_submitted(conn, &e.event)
        })
        .handle("order", "order.*.confirmed", |conn, e| {
            on_order_confirmed(conn, &e.event)
        })
        .handle("order", "order.*.cancelled", |conn, e| {
            on_order_cancelled(conn, &e.event)
        })
        .build()
}

/// The HTTP routes of the service.
pub fn router(service: Arc<UsersService>) -> Router {
    Router::new()
        .route("/users", post(register))
        .route("/users/{id}", get(read))
        .route("/users/{id}/orders", get(list_orders))
        .route("/users/{id}/rename", post(rename))
        .with_state(service)
}

async fn register(State(service): State<Arc<UsersService>>, body: Bytes) -> Response {
    // The body is parsed here, not by an extractor, so every refusal is JSON.
    let name: UserName = match serde_json::from_slice(&body) {
        Ok(name) => name,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")),
    };
    match blocking(move || service.register(&name)).await {
        Ok(user) => (StatusCode::CREATED, axum::Json(user)).into_response(),
        Err(e) => refusal(e),
    }
}

async fn rename(
    State(service): State<Arc<UsersService>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let Ok(id) = Uuid::parse_str(&id) else {
        return not_a_user_id(&id);
    };
    let name: UserName = match serde_json::from_slice(&body) {
        Ok(name) => name,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")),
    };
    match blocking(move || service.rename(id, &name)).await {
        Ok(user) => axum::Json(user).into_response(),
        Err(e) => refusal(e),
    }
}

async fn read(State(service): State<Arc<UsersService>>, Path(id): Path<String>) -> Response {
    let Ok(id) = Uuid::parse_str(&id) else {
        return not_a_user_id(&id);
    };
    match blocking(move || service.get(id)).await {
        Ok(summary) => axum::Json(summary).into_response(),
        Err(e) => refusal(e),
    }
}

async fn list_orders(State(service): State<Arc<UsersService>>, Path(id): Path<String>) -> Response {
    let Ok(id) = Uuid::parse_str(&id) else {
        return not_a_user_id(&id);
    };
    match blocking(move || service.orders(id)).await {
        Ok(orders) => axum::Json(serde_json::json!({ "orders": orders })).into_response(),
        Err(e) => refusal(e),
    }
}

fn not_a_user_id(text: &str) -> Response {
    json_error(
        StatusCode::BAD_REQUEST,
        format!("{text:?} is not a user id"),
    )
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, UserError> + Send + 'static,
) -> Result<T, UserError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(UserError::Invalid(format!("internal error: {e}"))))
}

fn refusal(e: UserError) -> Response {
    let status = match &e {
        UserError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
        UserError::NotFound(_) => StatusCode::NOT_FOUND,
        UserError::Database(_) | UserError::Outbox(_) => StatusCode::INTERNAL_SERVER_ERROR,
        UserError::Connect(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    if status.is_server_error() {
        tracing::error!(error = %e, "users request failed");
    }
    json_error(status, e.to_string())
}
