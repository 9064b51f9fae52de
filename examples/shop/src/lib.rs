//! The example shop, end to end: the order service writes orders and their
//! events in one transaction; relays ship the outboxes to RabbitMQ; billing
//! and logistics apply each event once and in order per order id; logistics
//! answers through its own outbox; the order service notes the shipment.
//! Inventory and payment carry each order through a checkout saga of events
//! (reserve stock, take payment, confirm; or release and cancel), and the
//! users and order services keep each other's data they show in replicas
//! fed by events, so neither calls the other.
//!
//! Each service owns a schema of its own in the one PostgreSQL (as it would
//! own a database): its connections set `search_path` to it, so its code
//! names its tables plainly.
//!
//! - [`events`]: the events and their versions.
//! - [`order`], [`billing`], [`logistics`], [`users`], [`inventory`],
//!   [`payment`]: the services.
//! - [`saga`]: the order service's side of the checkout saga (how
//!   inventory's and payment's answers move an order); [`customers`]: its
//!   replica of the users.
//! - [`demo`]: runs them all under load (with faults on request) and checks
//!   every service's tables against what was ordered and each other.
//! - [`http`], [`pool`]: a tiny HTTP client for the load, a tiny connection pool.
//! - [`chaos`]: the fault suite (`shop-chaos`): relays, consumers and the
//!   broker killed and restarted under load, then every event counted.

pub mod billing;
pub mod chaos;
pub mod customers;
pub mod demo;
pub mod events;
pub mod http;
pub mod inventory;
pub mod logistics;
pub mod order;
pub mod payment;
pub mod pool;
pub mod saga;
pub mod users;

/// `database_url` with the connection's `search_path` set to `schema`, so
/// a service sees its own tables first (libpq's `options` parameter).
pub fn service_url(database_url: &str, schema: &str) -> String {
    let separator = if database_url.contains('?') { '&' } else { '?' };
    format!("{database_url}{separator}options=-csearch_path%3D{schema}")
}

/// The outbox of a service whose tables live in `schema`.
pub fn outbox_in(schema: &str) -> Result<outbox::Outbox, outbox::Error> {
    outbox::Outbox::new(outbox::Config {
        schema: schema.to_owned(),
        ..outbox::Config::default()
    })
}

/// A database error in a handler: retry it (the transaction rolled back).
pub(crate) fn retry(e: impl std::fmt::Display) -> consumer::HandlerError {
    consumer::HandlerError::Retry {
        after: None,
        reason: e.to_string(),
    }
}

/// A refusal as the services answer it: the status and `{"error": ..}`.
pub(crate) fn json_error(
    status: axum::http::StatusCode,
    message: String,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

// The README's Rust examples are compiled as doctests here (this crate
// depends on every library), so the front door never shows code that does
// not build.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
