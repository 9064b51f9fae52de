//! The order service: `POST /orders` writes the order, its lines and the
//! `order.v1.submitted` event (or v2, when a currency is given) in **one
//! transaction**; `POST /orders/{id}/cancel` does the same with
//! `order.v1.cancelled`; `GET /orders/{id}` reads it back. It also consumes
//! `logistics.*.dispatched` to note each order's shipment.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use diesel::prelude::*;
use outbox::Outbox;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::events::{Line, OrderCancelled, OrderSubmittedV1, OrderSubmittedV2, ShipmentDispatched};
use crate::pool::Pool;

/// The service's own tables, in its own schema.
pub const SCHEMA_SQL: &str = "
CREATE TABLE IF NOT EXISTS orders (
    id uuid PRIMARY KEY,
    customer text NOT NULL,
    total_cents bigint NOT NULL,
    currency text NOT NULL,
    status text NOT NULL DEFAULT 'placed',
    shipment_id uuid,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS order_lines (
    order_id uuid NOT NULL REFERENCES orders (id),
    line_no integer NOT NULL,
    sku text NOT NULL,
    qty integer NOT NULL,
    price_cents bigint NOT NULL,
    PRIMARY KEY (order_id, line_no)
);";

// diesel's table definitions (the schema of the service's tables).
#[allow(missing_docs)]
mod tables {
    diesel::table! {
        orders (id) {
            id -> Uuid,
            customer -> Text,
            total_cents -> BigInt,
            currency -> Text,
            status -> Text,
            shipment_id -> Nullable<Uuid>,
        }
    }

    diesel::table! {
        order_lines (order_id, line_no) {
            order_id -> Uuid,
            line_no -> Integer,
            sku -> Text,
            qty -> Integer,
            price_cents -> BigInt,
        }
    }

    diesel::allow_tables_to_appear_in_same_query!(orders, order_lines);
}
use tables::{order_lines, orders};

/// `POST /orders` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewOrder {
    /// Who orders.
    pub customer: String,
    /// What: 1 to 50 lines.
    pub lines: Vec<Line>,
    /// ISO 4217 currency; when given the event is `order.v2.submitted`.
    #[serde(default)]
    pub currency: Option<String>,
}

/// `GET /orders/{id}` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OrderView {
    /// The order.
    pub id: Uuid,
    /// Who ordered.
    pub customer: String,
    /// Sum of the lines, in cents.
    pub total_cents: i64,
    /// Currency of the amounts.
    pub currency: String,
    /// `placed` or `cancelled`.
    pub status: String,
    /// Set once logistics dispatched it.
    pub shipment_id: Option<Uuid>,
    /// The lines.
    pub lines: Vec<Line>,
}

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    /// The request is not acceptable; nothing was written.
    #[error("{0}")]
    Invalid(String),
    /// No such order.
    #[error("order {0} not found")]
    NotFound(Uuid),
    /// The order is already cancelled.
    #[error("order {0} is already cancelled")]
    AlreadyCancelled(Uuid),
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

impl NewOrder {
    /// Checks every field; the message names the one that is wrong.
    pub fn validate(&self) -> Result<i64, OrderError> {
        let bad = |m: String| Err(OrderError::Invalid(m));
        if self.customer.trim().is_empty() || self.customer.len() > 100 {
            return bad("customer must be 1 to 100 characters".into());
        }
        if self.lines.is_empty() || self.lines.len() > 50 {
            return bad(format!(
                "an order needs 1 to 50 lines, got {}",
                self.lines.len()
            ));
        }
        let mut total: i64 = 0;
        for (i, line) in self.lines.iter().enumerate() {
            if line.sku.trim().is_empty() || line.sku.len() > 64 {
                return bad(format!("lines[{i}].sku must be 1 to 64 characters"));
            }
            if !(1..=1000).contains(&line.qty) {
                return bad(format!(
                    "lines[{i}].qty must be 1 to 1000, got {}",
                    line.qty
                ));
            }
            if !(0..=100_000_000).contains(&line.price_cents) {
                return bad(format!(
                    "lines[{i}].price_cents must be 0 to 100000000, got {}",
                    line.price_cents
                ));
            }
            total += i64::from(line.qty) * line.price_cents;
        }
        if let Some(c) = &self.currency
            && (c.len() != 3 || !c.chars().all(|ch| ch.is_ascii_uppercase()))
        {
            return bad(format!(
                "currency must be 3 capital letters (ISO 4217), got {c:?}"
            ));
        }
        Ok(total)
    }
}

/// The order service: its outbox and its connections.
pub struct OrderService {
    outbox: Outbox,
    pool: Pool,
}

impl OrderService {
    /// The service on `database_url` (whose `search_path` is the service's
    /// schema), with the outbox installed in `schema`.
    pub fn new(database_url: &str, schema: &str) -> anyhow::Result<Self> {
        Ok(OrderService {
            outbox: Outbox::new(outbox::Config {
                schema: schema.to_owned(),
                ..outbox::Config::default()
            })?,
            pool: Pool::new(database_url, 16),
        })
    }

    /// Places an order: the order, its lines and its event commit together
    /// or not at all.
    pub fn place(&self, order: &NewOrder) -> Result<Uuid, OrderError> {
        let total = order.validate()?;
        let id = Uuid::now_v7();
        self.pool.with(|conn| {
            conn.transaction(|conn| {
                diesel::insert_into(orders::table)
                    .values((
                        orders::id.eq(id),
                        orders::customer.eq(&order.customer),
                        orders::total_cents.eq(total),
                        orders::currency.eq(order.currency.as_deref().unwrap_or("EUR")),
                    ))
                    .execute(conn)?;
                let lines: Vec<_> = order
                    .lines
                    .iter()
                    .zip(1..)
                    .map(|(l, no)| {
                        (
                            order_lines::order_id.eq(id),
                            order_lines::line_no.eq(no),
                            order_lines::sku.eq(&l.sku),
                            order_lines::qty.eq(l.qty),
                            order_lines::price_cents.eq(l.price_cents),
                        )
                    })
                    .collect();
                diesel::insert_into(order_lines::table)
                    .values(&lines)
                    .execute(conn)?;
                let v1 = OrderSubmittedV1 {
                    order_id: id,
                    customer: order.customer.clone(),
                    lines: order.lines.clone(),
                    total_cents: total,
                    placed_at_us: now_us(),
                };
                match &order.currency {
                    None => self.outbox.enqueue(conn, &v1)?,
                    Some(currency) => self.outbox.enqueue(
                        conn,
                        &OrderSubmittedV2 {
                            v1,
                            currency: currency.clone(),
                        },
                    )?,
                };
                Ok(id)
            })
        })
    }

    /// Cancels an order and enqueues `order.v1.cancelled`, in one transaction.
    pub fn cancel(&self, id: Uuid, reason: &str) -> Result<(), OrderError> {
        self.pool.with(|conn| {
            conn.transaction(|conn| {
                let status: Option<String> = orders::table
                    .find(id)
                    .select(orders::status)
                    .for_update()
                    .first(conn)
                    .optional()?;
                match status.as_deref() {
                    None => return Err(OrderError::NotFound(id)),
                    Some("cancelled") => return Err(OrderError::AlreadyCancelled(id)),
                    Some(_) => {}
                }
                diesel::update(orders::table.find(id))
                    .set(orders::status.eq("cancelled"))
                    .execute(conn)?;
                self.outbox.enqueue(
                    conn,
                    &OrderCancelled {
                        order_id: id,
                        reason: reason.to_owned(),
                    },
                )?;
                Ok(())
            })
        })
    }

    /// Reads an order and its lines.
    pub fn get(&self, id: Uuid) -> Result<OrderView, OrderError> {
        self.pool.with(|conn| {
            let row: Option<(Uuid, String, i64, String, String, Option<Uuid>)> = orders::table
                .find(id)
                .select((
                    orders::id,
                    orders::customer,
                    orders::total_cents,
                    orders::currency,
                    orders::status,
                    orders::shipment_id,
                ))
                .first(conn)
                .optional()?;
            let Some((id, customer, total_cents, currency, status, shipment_id)) = row else {
                return Err(OrderError::NotFound(id));
            };
            let lines = order_lines::table
                .filter(order_lines::order_id.eq(id))
                .order(order_lines::line_no)
                .select((order_lines::sku, order_lines::qty, order_lines::price_cents))
                .load::<(String, i32, i64)>(conn)?
                .into_iter()
                .map(|(sku, qty, price_cents)| Line {
                    sku,
                    qty,
                    price_cents,
                })
                .collect();
            Ok(OrderView {
                id,
                customer,
                total_cents,
                currency,
                status,
                shipment_id,
                lines,
            })
        })
    }
}

/// Handler for `logistics.*.dispatched`: notes the shipment on the order.
/// Runs in the inbox's transaction, so it happens once per event.
pub fn on_dispatched(
    conn: &mut PgConnection,
    e: consumer::Envelope<ShipmentDispatched>,
) -> consumer::HandlerResult {
    diesel::update(orders::table.find(e.event.order_id))
        .set(orders::shipment_id.eq(e.event.shipment_id))
        .execute(conn)
        .map(|_| ())
        .map_err(crate::retry)
}

/// The HTTP routes of the service.
pub fn router(service: Arc<OrderService>) -> Router {
    Router::new()
        .route("/orders", post(create))
        .route("/orders/{id}", get(read))
        .route("/orders/{id}/cancel", post(cancel))
        .with_state(service)
}

async fn create(State(service): State<Arc<OrderService>>, body: Bytes) -> Response {
    // The body is parsed here, not by an extractor, so every refusal is JSON.
    let order: NewOrder = match serde_json::from_slice(&body) {
        Ok(order) => order,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")),
    };
    match blocking(move || service.place(&order)).await {
        Ok(id) => (
            StatusCode::CREATED,
            axum::Json(serde_json::json!({ "id": id })),
        )
            .into_response(),
        Err(e) => refusal(e),
    }
}

async fn read(State(service): State<Arc<OrderService>>, Path(id): Path<String>) -> Response {
    let Ok(id) = Uuid::parse_str(&id) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{id:?} is not an order id"),
        );
    };
    match blocking(move || service.get(id)).await {
        Ok(view) => axum::Json(view).into_response(),
        Err(e) => refusal(e),
    }
}

#[derive(Deserialize)]
struct CancelBody {
    #[serde(default)]
    reason: Option<String>,
}

async fn cancel(
    State(service): State<Arc<OrderService>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let Ok(id) = Uuid::parse_str(&id) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{id:?} is not an order id"),
        );
    };
    let reason = if body.is_empty() {
        None
    } else {
        match serde_json::from_slice::<CancelBody>(&body) {
            Ok(b) => b.reason,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")),
        }
    };
    let reason = reason.unwrap_or_else(|| "customer request".into());
    match blocking(move || service.cancel(id, &reason)).await {
        Ok(()) => {
            axum::Json(serde_json::json!({ "id": id, "status": "cancelled" })).into_response()
        }
        Err(e) => refusal(e),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, OrderError> + Send + 'static,
) -> Result<T, OrderError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(OrderError::Invalid(format!("internal error: {e}"))))
}

fn refusal(e: OrderError) -> Response {
    let status = match &e {
        OrderError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
        OrderError::NotFound(_) => StatusCode::NOT_FOUND,
        OrderError::AlreadyCancelled(_) => StatusCode::CONFLICT,
        OrderError::Database(_) | OrderError::Outbox(_) => StatusCode::INTERNAL_SERVER_ERROR,
        OrderError::Connect(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    if status.is_server_error() {
        tracing::error!(error = %e, "order request failed");
    }
    error(status, e.to_string())
}

fn error(status: StatusCode, message: String) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

/// Microseconds since the UNIX epoch.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}
