//! The events the shop's services exchange. Each is an [`outbox::Event`]:
//! its exchange is named after the producing service, and its routing key
//! carries the version, so a consumer binding `order.*.submitted` takes
//! every version.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    /// Stock-keeping unit.
    pub sku: String,
    /// How many.
    pub qty: i32,
    /// Price of one, in cents.
    pub price_cents: i64,
}

/// `order.v1.submitted`: an order was placed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderSubmittedV1 {
    /// The order.
    pub order_id: Uuid,
    /// Who placed it.
    pub customer: String,
    /// What was ordered.
    pub lines: Vec<Line>,
    /// Sum of the lines, in cents.
    pub total_cents: i64,
    /// When the order service committed it (µs since the UNIX epoch), for
    /// the demo's commit-to-handler latency.
    pub placed_at_us: i64,
}

impl outbox::Event for OrderSubmittedV1 {
    const EXCHANGE: &'static str = "order";
    const ROUTING_KEY: &'static str = "order.v1.submitted";
    const EVENT_TYPE: &'static str = "order.submitted";

    fn ordering_key(&self) -> Option<String> {
        Some(self.order_id.to_string())
    }
}

/// `order.v2.submitted`: version 2 adds the currency. Consumers bound to
/// `order.*.submitted` get both versions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderSubmittedV2 {
    /// The version 1 fields.
    #[serde(flatten)]
    pub v1: OrderSubmittedV1,
    /// ISO 4217 currency of the amounts.
    pub currency: String,
}

impl outbox::Event for OrderSubmittedV2 {
    const EXCHANGE: &'static str = "order";
    const ROUTING_KEY: &'static str = "order.v2.submitted";
    const EVENT_TYPE: &'static str = "order.submitted";
    const VERSION: u32 = 2;

    fn ordering_key(&self) -> Option<String> {
        Some(self.v1.order_id.to_string())
    }
}

/// `order.v1.cancelled`: an order was cancelled.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderCancelled {
    /// The order.
    pub order_id: Uuid,
    /// Why.
    pub reason: String,
}

impl outbox::Event for OrderCancelled {
    const EXCHANGE: &'static str = "order";
    const ROUTING_KEY: &'static str = "order.v1.cancelled";
    const EVENT_TYPE: &'static str = "order.cancelled";

    fn ordering_key(&self) -> Option<String> {
        Some(self.order_id.to_string())
    }
}

/// `logistics.v1.dispatched`: logistics created the order's shipment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShipmentDispatched {
    /// The order.
    pub order_id: Uuid,
    /// The shipment.
    pub shipment_id: Uuid,
}

impl outbox::Event for ShipmentDispatched {
    const EXCHANGE: &'static str = "logistics";
    const ROUTING_KEY: &'static str = "logistics.v1.dispatched";
    const EVENT_TYPE: &'static str = "logistics.dispatched";

    fn ordering_key(&self) -> Option<String> {
        Some(self.order_id.to_string())
    }
}

/// What a consumer of `order.*.submitted` reads: version 1 and 2 alike
/// (`currency` is absent from version 1).
#[derive(Debug, Clone, Deserialize)]
pub struct OrderSubmitted {
    /// The order.
    pub order_id: Uuid,
    /// Sum of the lines, in cents.
    pub total_cents: i64,
    /// Set from version 2 on; version 1 amounts are in EUR.
    #[serde(default)]
    pub currency: Option<String>,
    /// Commit time at the order service (µs since the UNIX epoch).
    pub placed_at_us: i64,
}
