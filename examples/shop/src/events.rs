//! The events the shop's services exchange. Each is an [`outbox::Event`]:
//! its exchange is named after the producing service, and its routing key
//! carries the version, so a consumer binding `order.*.submitted` takes
//! every version.
//!
//! **Ordering keys.** A key's sequence numbers are counted by the outbox of
//! the service that produces it, while a consumer keeps one position per key
//! whoever sent it. So each producer keys its events by what it owns: an
//! order's events by the order id, a reservation's by the reservation id, a
//! payment's by the payment id, a user's by the user id. Were inventory and
//! payment both to key by the order id, each would number its events of an
//! order 1, 2, ..., and a consumer taking both (the order service does)
//! would find the second one's event 1 behind the first one's position:
//! late, and dead-lettered. Logistics keys its one event per order by the
//! order id; no consumer takes it together with another producer's events
//! keyed so.

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
    /// The registered customer (absent for a guest). Added to version 1
    /// without a new version: an optional field old readers ignore breaks
    /// no one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<Uuid>,
    /// How the customer pays; payment takes it once stock is reserved.
    /// Added like `customer_id`; absent means [`DEFAULT_PAYMENT_METHOD`].
    #[serde(default = "default_payment_method")]
    pub payment_method: String,
}

/// The payment method of an order that names none.
pub const DEFAULT_PAYMENT_METHOD: &str = "card";

fn default_payment_method() -> String {
    DEFAULT_PAYMENT_METHOD.to_owned()
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

/// `order.v1.confirmed`: payment was taken for a placed order; the checkout
/// saga ended well.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderConfirmed {
    /// The order.
    pub order_id: Uuid,
    /// The payment that confirmed it.
    pub payment_id: Uuid,
}

impl outbox::Event for OrderConfirmed {
    const EXCHANGE: &'static str = "order";
    const ROUTING_KEY: &'static str = "order.v1.confirmed";
    const EVENT_TYPE: &'static str = "order.confirmed";

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
    /// What was ordered (every version carries the lines).
    pub lines: Vec<Line>,
    /// The registered customer; absent for a guest.
    #[serde(default)]
    pub customer_id: Option<Uuid>,
    /// How the customer pays.
    #[serde(default = "default_payment_method")]
    pub payment_method: String,
}

/// `user.v1.registered`: a user signed up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserRegistered {
    /// The user.
    pub user_id: Uuid,
    /// Their name.
    pub name: String,
    /// The user's version: 1 at registration, one more per rename. A
    /// replica keeps the highest it has seen, so a stale event never
    /// overwrites a newer name.
    pub version: i64,
}

impl outbox::Event for UserRegistered {
    const EXCHANGE: &'static str = "users";
    const ROUTING_KEY: &'static str = "user.v1.registered";
    const EVENT_TYPE: &'static str = "user.registered";

    fn ordering_key(&self) -> Option<String> {
        Some(self.user_id.to_string())
    }
}

/// `user.v1.renamed`: a user changed their name.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserRenamed {
    /// The user.
    pub user_id: Uuid,
    /// The new name.
    pub name: String,
    /// The user's version after the rename (see [`UserRegistered::version`]).
    pub version: i64,
}

impl outbox::Event for UserRenamed {
    const EXCHANGE: &'static str = "users";
    const ROUTING_KEY: &'static str = "user.v1.renamed";
    const EVENT_TYPE: &'static str = "user.renamed";

    fn ordering_key(&self) -> Option<String> {
        Some(self.user_id.to_string())
    }
}

/// `inventory.v1.reserved`: every line of an order is set aside. Carries
/// what payment needs to take the payment, so payment neither calls the
/// order service nor keeps a copy of its orders.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StockReserved {
    /// The reservation.
    pub reservation_id: Uuid,
    /// The order it is for.
    pub order_id: Uuid,
    /// The order's total, in cents.
    pub amount_cents: i64,
    /// ISO 4217 currency of the amount.
    pub currency: String,
    /// How the customer pays.
    pub payment_method: String,
}

impl outbox::Event for StockReserved {
    const EXCHANGE: &'static str = "inventory";
    const ROUTING_KEY: &'static str = "inventory.v1.reserved";
    const EVENT_TYPE: &'static str = "inventory.reserved";

    fn ordering_key(&self) -> Option<String> {
        Some(self.reservation_id.to_string())
    }
}

/// `inventory.v1.rejected`: some line of an order is out of stock; nothing
/// was set aside.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StockRejected {
    /// The (refused) reservation.
    pub reservation_id: Uuid,
    /// The order.
    pub order_id: Uuid,
    /// Which SKU fell short, and by how much.
    pub reason: String,
}

impl outbox::Event for StockRejected {
    const EXCHANGE: &'static str = "inventory";
    const ROUTING_KEY: &'static str = "inventory.v1.rejected";
    const EVENT_TYPE: &'static str = "inventory.rejected";

    fn ordering_key(&self) -> Option<String> {
        Some(self.reservation_id.to_string())
    }
}

/// `inventory.v1.released`: a reservation's stock went back on the shelf
/// (its payment failed or its order was cancelled).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StockReleased {
    /// The reservation.
    pub reservation_id: Uuid,
    /// The order.
    pub order_id: Uuid,
    /// Why.
    pub reason: String,
}

impl outbox::Event for StockReleased {
    const EXCHANGE: &'static str = "inventory";
    const ROUTING_KEY: &'static str = "inventory.v1.released";
    const EVENT_TYPE: &'static str = "inventory.released";

    fn ordering_key(&self) -> Option<String> {
        Some(self.reservation_id.to_string())
    }
}

/// `payment.v1.captured`: the order's total was taken.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PaymentCaptured {
    /// The payment.
    pub payment_id: Uuid,
    /// The order paid for.
    pub order_id: Uuid,
    /// How much, in cents.
    pub amount_cents: i64,
    /// ISO 4217 currency of the amount.
    pub currency: String,
}

impl outbox::Event for PaymentCaptured {
    const EXCHANGE: &'static str = "payment";
    const ROUTING_KEY: &'static str = "payment.v1.captured";
    const EVENT_TYPE: &'static str = "payment.captured";

    fn ordering_key(&self) -> Option<String> {
        Some(self.payment_id.to_string())
    }
}

/// `payment.v1.failed`: the payment was declined; nothing was taken.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PaymentFailed {
    /// The payment.
    pub payment_id: Uuid,
    /// The order.
    pub order_id: Uuid,
    /// Why it was declined.
    pub reason: String,
}

impl outbox::Event for PaymentFailed {
    const EXCHANGE: &'static str = "payment";
    const ROUTING_KEY: &'static str = "payment.v1.failed";
    const EVENT_TYPE: &'static str = "payment.failed";

    fn ordering_key(&self) -> Option<String> {
        Some(self.payment_id.to_string())
    }
}

/// `payment.v1.refunded`: a captured payment was given back, because its
/// order was cancelled after all.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PaymentRefunded {
    /// The payment.
    pub payment_id: Uuid,
    /// The order.
    pub order_id: Uuid,
    /// How much, in cents.
    pub amount_cents: i64,
    /// ISO 4217 currency of the amount.
    pub currency: String,
}

impl outbox::Event for PaymentRefunded {
    const EXCHANGE: &'static str = "payment";
    const ROUTING_KEY: &'static str = "payment.v1.refunded";
    const EVENT_TYPE: &'static str = "payment.refunded";

    fn ordering_key(&self) -> Option<String> {
        Some(self.payment_id.to_string())
    }
}
