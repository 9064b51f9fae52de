//! Declaring an event type: where it goes and how it is ordered.

use serde::Serialize;

/// A typed event that can be written to the outbox.
///
/// The payload is the type itself, serialized to JSON with serde. The
/// constants say where the relay publishes it; [`Event::ordering_key`] says
/// which events must reach consumers in commit order.
///
/// ```
/// use serde::Serialize;
///
/// #[derive(Serialize)]
/// struct OrderSubmitted {
///     order_id: uuid::Uuid,
///     total_cents: i64,
/// }
///
/// impl outbox::Event for OrderSubmitted {
///     const EXCHANGE: &'static str = "order";
///     const ROUTING_KEY: &'static str = "order.v1.submitted";
///     const EVENT_TYPE: &'static str = "order.submitted";
///
///     fn ordering_key(&self) -> Option<String> {
///         Some(self.order_id.to_string())
///     }
/// }
/// ```
pub trait Event: Serialize {
    /// The topic exchange, named after the producing service (`"order"`).
    const EXCHANGE: &'static str;

    /// The routing key, with the version in it (`"order.v1.submitted"`), so
    /// consumers can bind `order.*.submitted` to take every version.
    const ROUTING_KEY: &'static str;

    /// The event type, sent as the AMQP `type` property (`"order.submitted"`).
    const EVENT_TYPE: &'static str;

    /// The payload's schema version, sent as the `x-event-version` header.
    /// Defaults to 1.
    const VERSION: u32 = 1;

    /// The ordering key: events that share it are handled by every consumer
    /// in the order their transactions committed. `None` for events with no
    /// order to keep.
    fn ordering_key(&self) -> Option<String>;
}
