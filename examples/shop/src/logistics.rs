//! Logistics: a shipment per submitted order, cancelled with the order.
//! Creating the shipment also enqueues `logistics.v1.dispatched` through
//! logistics' own outbox, in the same inbox transaction: the shipment, its
//! event and the dedupe row commit together.

use consumer::{Consumer, ConsumerConfig, Envelope, HandlerResult};
use diesel::prelude::*;
use outbox::Outbox;
use uuid::Uuid;

use crate::events::{OrderCancelled, OrderSubmitted, ShipmentDispatched};

/// The service's own table, in its own schema.
pub const SCHEMA_SQL: &str = "
CREATE TABLE IF NOT EXISTS shipments (
    id uuid PRIMARY KEY,
    order_id uuid NOT NULL UNIQUE,
    status text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);";

// diesel's table definitions (the schema of the service's tables).
#[allow(missing_docs)]
mod tables {
    diesel::table! {
        shipments (id) {
            id -> Uuid,
            order_id -> Uuid,
            status -> Text,
        }
    }
}
use tables::shipments;

/// `order.*.submitted`: create and dispatch the shipment.
pub fn on_submitted(
    conn: &mut PgConnection,
    outbox: &Outbox,
    e: &Envelope<OrderSubmitted>,
) -> HandlerResult {
    let shipment_id = Uuid::now_v7();
    diesel::insert_into(shipments::table)
        .values((
            shipments::id.eq(shipment_id),
            shipments::order_id.eq(e.event.order_id),
            shipments::status.eq("dispatched"),
        ))
        .execute(conn)
        .map_err(crate::retry)?;
    outbox
        .enqueue(
            conn,
            &ShipmentDispatched {
                order_id: e.event.order_id,
                shipment_id,
            },
        )
        .map_err(crate::retry)?;
    Ok(())
}

/// `order.*.cancelled`: cancel the order's shipment.
pub fn on_cancelled(conn: &mut PgConnection, e: &Envelope<OrderCancelled>) -> HandlerResult {
    diesel::update(shipments::table.filter(shipments::order_id.eq(e.event.order_id)))
        .set(shipments::status.eq("cancelled"))
        .execute(conn)
        .map(|_| ())
        .map_err(crate::retry)
}

/// The logistics consumer; its outbox lives in `config.schema` too.
///
/// It takes some of an order's events (not `order.v1.confirmed`); each
/// event says which earlier events of its order came before it on which
/// routing keys (`x-key-prev`), so it waits only for ones it binds.
pub fn consumer(config: ConsumerConfig) -> anyhow::Result<Consumer> {
    let outbox = crate::outbox_in(&config.schema)?;
    Ok(Consumer::builder(config)
        .handle("order", "order.*.submitted", move |conn, e| {
            on_submitted(conn, &outbox, &e)
        })
        .handle("order", "order.*.cancelled", |conn, e| {
            on_cancelled(conn, &e)
        })
        .build()?)
}
