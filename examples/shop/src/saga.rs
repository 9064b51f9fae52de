//! The checkout saga, from the order service's side. No service calls
//! another and none coordinates the rest: each step is a handler that reacts
//! to the previous step's event and writes its own change and the next event
//! in its inbox transaction, so a step happens once or not at all.
//!
//! ```text
//! order.submitted    -> inventory reserves every line, or none: inventory.reserved | inventory.rejected
//! inventory.reserved -> payment takes it:                        payment.captured   | payment.failed
//! payment.captured   -> order confirms a placed order:           order.confirmed
//! payment.failed     -> order cancels; inventory releases:       order.cancelled, inventory.released
//! inventory.rejected -> order cancels:                           order.cancelled
//! order.cancelled    -> inventory releases a reservation, payment refunds a captured payment
//!                       (and billing reverses its charge, logistics cancels the shipment)
//! ```
//!
//! Every order ends `confirmed` (stock reserved, payment captured) or
//! `cancelled` (stock released or never reserved, payment failed, refunded
//! or never taken). A customer may cancel at any point, even while the saga
//! is under way, so every handler checks the state it finds instead of
//! assuming the happy order of events: events of different producers (the
//! order's cancellation, inventory's reservation) reach a service in either
//! order. The order service notes what inventory and payment last said on
//! the order (`stock_status`, `payment_status`), so `GET /orders/{id}`
//! shows the whole saga.
//!
//! Handlers are idempotent beyond the inbox's dedupe: a state change is made
//! only from the state it expects (`placed` to `confirmed`), so an event
//! applied again, or after a competing one, changes nothing.

use consumer::HandlerResult;
use diesel::prelude::*;
use outbox::Outbox;
use uuid::Uuid;

use crate::events::{
    OrderCancelled, OrderConfirmed, PaymentCaptured, PaymentFailed, PaymentRefunded, StockRejected,
    StockReleased, StockReserved,
};
use crate::order::tables::orders;

/// `inventory.*.reserved`: note it (payment takes it from here).
pub fn on_reserved(conn: &mut PgConnection, e: &StockReserved) -> HandlerResult {
    note_stock(conn, e.order_id, "reserved")
}

/// `inventory.*.rejected`: out of stock, so the order is cancelled (billing
/// reverses its charge, logistics its shipment).
pub fn on_rejected(conn: &mut PgConnection, outbox: &Outbox, e: &StockRejected) -> HandlerResult {
    note_stock(conn, e.order_id, "rejected")?;
    cancel_if_placed(
        conn,
        outbox,
        e.order_id,
        &format!("out of stock: {}", e.reason),
    )
}

/// `inventory.*.released`: note it.
pub fn on_released(conn: &mut PgConnection, e: &StockReleased) -> HandlerResult {
    note_stock(conn, e.order_id, "released")
}

/// `payment.*.captured`: confirm the order if it is still placed. A
/// customer may have cancelled it meanwhile: it stays cancelled, and
/// payment refunds on that cancellation.
pub fn on_captured(conn: &mut PgConnection, outbox: &Outbox, e: &PaymentCaptured) -> HandlerResult {
    note_payment(conn, e.order_id, "captured")?;
    if status_for_update(conn, e.order_id)?.as_deref() != Some("placed") {
        return Ok(());
    }
    diesel::update(orders::table.find(e.order_id))
        .set((
            orders::status.eq("confirmed"),
            orders::confirmed_at.eq(diesel::dsl::now),
        ))
        .execute(conn)
        .map_err(crate::retry)?;
    outbox
        .enqueue(
            conn,
            &OrderConfirmed {
                order_id: e.order_id,
                payment_id: e.payment_id,
            },
        )
        .map_err(crate::retry)?;
    Ok(())
}

/// `payment.*.failed`: cancel the order (inventory releases its stock on
/// the failure itself).
pub fn on_failed(conn: &mut PgConnection, outbox: &Outbox, e: &PaymentFailed) -> HandlerResult {
    note_payment(conn, e.order_id, "failed")?;
    cancel_if_placed(
        conn,
        outbox,
        e.order_id,
        &format!("payment failed: {}", e.reason),
    )
}

/// `payment.*.refunded`: note it.
pub fn on_refunded(conn: &mut PgConnection, e: &PaymentRefunded) -> HandlerResult {
    note_payment(conn, e.order_id, "refunded")
}

/// Cancels a placed order with `order.v1.cancelled`; an order already
/// cancelled (by its customer, or by the other refusal) stays as it is.
fn cancel_if_placed(
    conn: &mut PgConnection,
    outbox: &Outbox,
    order_id: Uuid,
    reason: &str,
) -> HandlerResult {
    if status_for_update(conn, order_id)?.as_deref() != Some("placed") {
        return Ok(());
    }
    diesel::update(orders::table.find(order_id))
        .set((
            orders::status.eq("cancelled"),
            orders::cancel_reason.eq(reason),
        ))
        .execute(conn)
        .map_err(crate::retry)?;
    outbox
        .enqueue(
            conn,
            &OrderCancelled {
                order_id,
                reason: reason.to_owned(),
            },
        )
        .map_err(crate::retry)?;
    Ok(())
}

/// The order's status, its row locked until the transaction ends: the
/// customer's `POST /orders/{id}/cancel` locks it too, so the two never
/// both act on a `placed` order.
fn status_for_update(
    conn: &mut PgConnection,
    order_id: Uuid,
) -> Result<Option<String>, consumer::HandlerError> {
    orders::table
        .find(order_id)
        .select(orders::status)
        .for_update()
        .first(conn)
        .optional()
        .map_err(crate::retry)
}

// What inventory and payment said, noted on the order. A reservation's
// events arrive in order (one key), and so do a payment's; still, a first
// answer (reserved, rejected; captured, failed) is noted only over nothing,
// and the last one (released; refunded) over anything, so an answer
// applied late never hides a later one.

fn note_stock(conn: &mut PgConnection, order_id: Uuid, status: &str) -> HandlerResult {
    let order = orders::table.filter(orders::id.eq(order_id));
    let first = status != "released";
    if first {
        diesel::update(order.filter(orders::stock_status.is_null()))
            .set(orders::stock_status.eq(status))
            .execute(conn)
    } else {
        diesel::update(order)
            .set(orders::stock_status.eq(status))
            .execute(conn)
    }
    .map(|_| ())
    .map_err(crate::retry)
}

fn note_payment(conn: &mut PgConnection, order_id: Uuid, status: &str) -> HandlerResult {
    let order = orders::table.filter(orders::id.eq(order_id));
    let first = status != "refunded";
    if first {
        diesel::update(order.filter(orders::payment_status.is_null()))
            .set(orders::payment_status.eq(status))
            .execute(conn)
    } else {
        diesel::update(order)
            .set(orders::payment_status.eq(status))
            .execute(conn)
    }
    .map(|_| ())
    .map_err(crate::retry)
}
