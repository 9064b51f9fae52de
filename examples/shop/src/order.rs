//! The order service: `POST /orders` writes the order, its lines and the
//! `order.v1.submitted` event (or v2, when a currency is given) in **one
//! transaction**; `POST /orders/{id}/cancel` does the same with
//! `order.v1.cancelled`; `GET /orders/{id}` reads it back.
//!
//! Its consumer ([`consumer()`]) notes each order's shipment
//! (`logistics.*.dispatched`), keeps the [`customers`] replica from the user
//! events (so an order for a registered customer is checked and named
//! without calling the users service), and moves orders through the
//! checkout [`saga`]: `placed` until payment confirms it or a refusal
//! cancels it.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use consumer::{Consumer, ConsumerConfig};
use diesel::prelude::*;
use outbox::Outbox;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::events::{
    DEFAULT_PAYMENT_METHOD, Line, OrderCancelled, OrderSubmittedV1, OrderSubmittedV2,
    ShipmentDispatched,
};
use crate::pool::Pool;
use crate::{customers, json_error, saga};

/// The service's own order tables, in its own schema (its replica of the
/// users is [`customers::SCHEMA_SQL`], in the same schema).
pub const SCHEMA_SQL: &str = "
CREATE TABLE IF NOT EXISTS orders (
    id uuid PRIMARY KEY,
    customer text NOT NULL,
    customer_id uuid,
    total_cents bigint NOT NULL,
    currency text NOT NULL,
    payment_method text NOT NULL DEFAULT 'card',
    status text NOT NULL DEFAULT 'placed' CHECK (status IN ('placed', 'confirmed', 'cancelled')),
    cancel_reason text,
    stock_status text,
    payment_status text,
    shipment_id uuid,
    created_at timestamptz NOT NULL DEFAULT now(),
    confirmed_at timestamptz
);
CREATE INDEX IF NOT EXISTS orders_customer ON orders (customer_id);
CREATE TABLE IF NOT EXISTS order_lines (
    order_id uuid NOT NULL REFERENCES orders (id),
    line_no integer NOT NULL,
    sku text NOT NULL,
    qty integer NOT NULL,
    price_cents bigint NOT NULL,
    PRIMARY KEY (order_id, line_no)
);";

// diesel's table definitions (the schema of the service's tables); the
// saga's handlers write `orders` too.
#[allow(missing_docs)]
pub(crate) mod tables {
    diesel::table! {
        orders (id) {
            id -> Uuid,
            customer -> Text,
            customer_id -> Nullable<Uuid>,
            total_cents -> BigInt,
            currency -> Text,
            payment_method -> Text,
            status -> Text,
            cancel_reason -> Nullable<Text>,
            stock_status -> Nullable<Text>,
            payment_status -> Nullable<Text>,
            shipment_id -> Nullable<Uuid>,
            confirmed_at -> Nullable<Timestamptz>,
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
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NewOrder {
    /// A guest's name; empty when `customer_id` names a registered customer.
    #[serde(default)]
    pub customer: String,
    /// A registered customer. The name is taken from the service's replica
    /// of the users, so a user registered a moment ago may not be known yet
    /// (refused like an unknown one; try again shortly).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<Uuid>,
    /// What: 1 to 50 lines.
    pub lines: Vec<Line>,
    /// ISO 4217 currency; when given the event is `order.v2.submitted`.
    #[serde(default)]
    pub currency: Option<String>,
    /// How the customer pays; `card` when not given. Payment declines
    /// [`crate::payment::DECLINING_METHOD`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_method: Option<String>,
}

/// `GET /orders/{id}` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OrderView {
    /// The order.
    pub id: Uuid,
    /// Who ordered: the customer's name when the order was placed.
    pub customer: String,
    /// The registered customer; `None` for a guest.
    pub customer_id: Option<Uuid>,
    /// Sum of the lines, in cents.
    pub total_cents: i64,
    /// Currency of the amounts.
    pub currency: String,
    /// How the customer pays.
    pub payment_method: String,
    /// `placed` (the checkout saga is under way), `confirmed` (paid) or
    /// `cancelled`.
    pub status: String,
    /// Why it was cancelled: the customer's reason, out of stock, or the
    /// payment declined.
    pub cancel_reason: Option<String>,
    /// The stock as inventory last told: `reserved`, `rejected` or `released`.
    pub stock_status: Option<String>,
    /// The payment as payment last told: `captured`, `failed` or `refunded`.
    pub payment_status: Option<String>,
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
    /// The customer is not in the service's replica of the users: not
    /// registered, or registered so recently the event has not arrived.
    #[error(
        "unknown customer_id {0} (not registered, or its registration has not reached the order service yet)"
    )]
    UnknownCustomer(Uuid),
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
        match self.customer_id {
            Some(_) if !self.customer.is_empty() => {
                return bad("give customer_id or customer (a guest's name), not both".into());
            }
            None if self.customer.trim().is_empty() || self.customer.len() > 100 => {
                return bad("customer must be 1 to 100 characters".into());
            }
            _ => {}
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
        if let Some(m) = &self.payment_method
            && (m.is_empty()
                || m.len() > 32
                || !m
                    .chars()
                    .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-'))
        {
            return bad(format!(
                "payment_method must be 1 to 32 of a-z 0-9 -, got {m:?}"
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
            outbox: crate::outbox_in(schema)?,
            pool: Pool::new(database_url, 16),
        })
    }

    /// Places an order: the order, its lines and its event commit together
    /// or not at all. A registered customer's name comes from the replica.
    pub fn place(&self, order: &NewOrder) -> Result<Uuid, OrderError> {
        let total = order.validate()?;
        let id = Uuid::now_v7();
        let payment_method = order
            .payment_method
            .clone()
            .unwrap_or_else(|| DEFAULT_PAYMENT_METHOD.to_owned());
        self.pool.with(|conn| {
            conn.transaction(|conn| {
                let customer = match order.customer_id {
                    None => order.customer.clone(),
                    Some(customer_id) => customers::name_of(conn, customer_id)?
                        .ok_or(OrderError::UnknownCustomer(customer_id))?,
                };
                diesel::insert_into(orders::table)
                    .values((
                        orders::id.eq(id),
                        orders::customer.eq(&customer),
                        orders::customer_id.eq(order.customer_id),
                        orders::total_cents.eq(total),
                        orders::currency.eq(order.currency.as_deref().unwrap_or("EUR")),
                        orders::payment_method.eq(&payment_method),
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
                    customer,
                    lines: order.lines.clone(),
                    total_cents: total,
                    placed_at_us: now_us(),
                    customer_id: order.customer_id,
                    payment_method,
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

    /// Cancels an order and enqueues `order.v1.cancelled`, in one
    /// transaction. A placed or a confirmed order may be cancelled; the
    /// saga's compensations follow from the event (stock released, a taken
    /// payment refunded).
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
                    .set((
                        orders::status.eq("cancelled"),
                        orders::cancel_reason.eq(reason),
                    ))
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
            let row: Option<OrderRow> = orders::table
                .find(id)
                .select(OrderRow::as_select())
                .first(conn)
                .optional()?;
            let Some(row) = row else {
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
                id: row.id,
                customer: row.customer,
                customer_id: row.customer_id,
                total_cents: row.total_cents,
                currency: row.currency,
                payment_method: row.payment_method,
                status: row.status,
                cancel_reason: row.cancel_reason,
                stock_status: row.stock_status,
                payment_status: row.payment_status,
                shipment_id: row.shipment_id,
                lines,
            })
        })
    }
}

/// An order's row as `GET /orders/{id}` reads it.
#[derive(Queryable, Selectable)]
#[diesel(table_name = orders)]
struct OrderRow {
    id: Uuid,
    customer: String,
    customer_id: Option<Uuid>,
    total_cents: i64,
    currency: String,
    payment_method: String,
    status: String,
    cancel_reason: Option<String>,
    stock_status: Option<String>,
    payment_status: Option<String>,
    shipment_id: Option<Uuid>,
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

/// The order service's consumer: shipments, the customers replica, and
/// the saga's answers from inventory and payment. It takes every event
/// type of each key it sees, so a gap in a key is a real one, worth the
/// default wait. The saga's outbox lives in `config.schema`, with the orders.
///
/// # Errors
///
/// A bad configuration (see [`consumer::ConsumerBuilder::build`]).
pub fn consumer(config: ConsumerConfig) -> anyhow::Result<Consumer> {
    let outbox = crate::outbox_in(&config.schema)?;
    let (rejected, captured, failed) = (outbox.clone(), outbox.clone(), outbox);
    Ok(Consumer::builder(config)
        .handle("logistics", "logistics.*.dispatched", on_dispatched)
        .handle("users", "user.*.registered", |conn, e| {
            customers::on_registered(conn, &e.event)
        })
        .handle("users", "user.*.renamed", |conn, e| {
            customers::on_renamed(conn, &e.event)
        })
        .handle("inventory", "inventory.*.reserved", |conn, e| {
            saga::on_reserved(conn, &e.event)
        })
        .handle("inventory", "inventory.*.rejected", move |conn, e| {
            saga::on_rejected(conn, &rejected, &e.event)
        })
        .handle("inventory", "inventory.*.released", |conn, e| {
            saga::on_released(conn, &e.event)
        })
        .handle("payment", "payment.*.captured", move |conn, e| {
            saga::on_captured(conn, &captured, &e.event)
        })
        .handle("payment", "payment.*.failed", move |conn, e| {
            saga::on_failed(conn, &failed, &e.event)
        })
        .handle("payment", "payment.*.refunded", |conn, e| {
            saga::on_refunded(conn, &e.event)
        })
        .build()?)
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
        Err(e) => return json_error(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")),
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
        return json_error(
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
        return json_error(
            StatusCode::BAD_REQUEST,
            format!("{id:?} is not an order id"),
        );
    };
    let reason = if body.is_empty() {
        None
    } else {
        match serde_json::from_slice::<CancelBody>(&body) {
            Ok(b) => b.reason,
            Err(e) => {
                return json_error(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}"));
            }
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
        OrderError::Invalid(_) | OrderError::UnknownCustomer(_) => StatusCode::UNPROCESSABLE_ENTITY,
        OrderError::NotFound(_) => StatusCode::NOT_FOUND,
        OrderError::AlreadyCancelled(_) => StatusCode::CONFLICT,
        OrderError::Database(_) | OrderError::Outbox(_) => StatusCode::INTERNAL_SERVER_ERROR,
        OrderError::Connect(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    if status.is_server_error() {
        tracing::error!(error = %e, "order request failed");
    }
    json_error(status, e.to_string())
}

/// Microseconds since the UNIX epoch.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}
