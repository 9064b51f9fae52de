//! Payment: takes an order's payment once inventory has reserved its stock
//! (`inventory.*.reserved`), and answers `payment.v1.captured` or
//! `payment.v1.failed`; gives a taken payment back (`payment.v1.refunded`)
//! when its order is cancelled after all. Each answer goes through
//! payment's own outbox in the handler's inbox transaction.
//!
//! The card network is simulated, and deterministic so the demo can count
//! on it: [`DECLINING_METHOD`] is always declined, every other method paid.

use consumer::{Consumer, ConsumerConfig, HandlerResult};
use diesel::prelude::*;
use outbox::Outbox;
use uuid::Uuid;

use crate::events::{
    OrderCancelled, PaymentCaptured, PaymentFailed, PaymentRefunded, StockReserved,
};

/// The payment method that is always declined, as card networks publish
/// test cards that are.
pub const DECLINING_METHOD: &str = "card-declined";

/// The service's own table, in its own schema.
pub const SCHEMA_SQL: &str = "
CREATE TABLE IF NOT EXISTS payments (
    id uuid PRIMARY KEY,
    order_id uuid NOT NULL UNIQUE,
    amount_cents bigint NOT NULL,
    currency text,
    method text,
    status text NOT NULL CHECK (status IN ('captured', 'failed', 'refunded', 'voided')),
    reason text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON COLUMN payments.status IS
    'captured, failed, refunded (captured, then the order was cancelled), or voided (the order was cancelled before its stock was reserved: nothing is to be taken)';";

// diesel's table definitions (the schema of the service's tables).
#[allow(missing_docs)]
mod tables {
    diesel::table! {
        payments (id) {
            id -> Uuid,
            order_id -> Uuid,
            amount_cents -> BigInt,
            currency -> Nullable<Text>,
            method -> Nullable<Text>,
            status -> Text,
            reason -> Nullable<Text>,
            updated_at -> Timestamptz,
        }
    }
}
use tables::payments;

/// The simulated card network: `Err` with the decline reason.
fn authorize(method: &str) -> Result<(), String> {
    if method == DECLINING_METHOD {
        Err("card declined".to_owned())
    } else {
        Ok(())
    }
}

/// `inventory.*.reserved`: take the payment, once per order. When a row for
/// the order is already there, the order was cancelled first (a voided row)
/// or the payment was already taken: nothing more happens.
///
/// A real card network is called outside the database; it would get the
/// payment id as its idempotency key, so a handler that runs again after a
/// rollback never charges twice.
pub fn on_reserved(conn: &mut PgConnection, outbox: &Outbox, e: &StockReserved) -> HandlerResult {
    let payment_id = Uuid::now_v7();
    let decision = authorize(&e.payment_method);
    // ON CONFLICT on the order's unique key: the insert that loses a race
    // with the cancellation's voided row waits for it, then does nothing.
    let inserted = diesel::insert_into(payments::table)
        .values((
            payments::id.eq(payment_id),
            payments::order_id.eq(e.order_id),
            payments::amount_cents.eq(e.amount_cents),
            payments::currency.eq(&e.currency),
            payments::method.eq(&e.payment_method),
            payments::status.eq(if decision.is_ok() {
                "captured"
            } else {
                "failed"
            }),
            payments::reason.eq(decision.as_ref().err()),
        ))
        .on_conflict(payments::order_id)
        .do_nothing()
        .execute(conn)
        .map_err(crate::retry)?;
    if inserted == 0 {
        return Ok(());
    }
    match decision {
        Ok(()) => outbox.enqueue(
            conn,
            &PaymentCaptured {
                payment_id,
                order_id: e.order_id,
                amount_cents: e.amount_cents,
                currency: e.currency.clone(),
            },
        ),
        Err(reason) => outbox.enqueue(
            conn,
            &PaymentFailed {
                payment_id,
                order_id: e.order_id,
                reason,
            },
        ),
    }
    .map(|_| ())
    .map_err(crate::retry)
}

/// `order.*.cancelled`: give back a captured payment. When payment has not
/// seen the order's reservation yet (the cancellation overtook it: they come
/// from different producers), a voided row is left instead, so the
/// reservation arriving later takes nothing.
pub fn on_order_cancelled(
    conn: &mut PgConnection,
    outbox: &Outbox,
    e: &OrderCancelled,
) -> HandlerResult {
    let voided = diesel::insert_into(payments::table)
        .values((
            payments::id.eq(Uuid::now_v7()),
            payments::order_id.eq(e.order_id),
            payments::amount_cents.eq(0),
            payments::status.eq("voided"),
            payments::reason.eq(format!("order cancelled first: {}", e.reason)),
        ))
        .on_conflict(payments::order_id)
        .do_nothing()
        .execute(conn)
        .map_err(crate::retry)?;
    if voided == 1 {
        return Ok(());
    }
    let (payment_id, status, amount_cents, currency): (Uuid, String, i64, Option<String>) =
        payments::table
            .filter(payments::order_id.eq(e.order_id))
            .select((
                payments::id,
                payments::status,
                payments::amount_cents,
                payments::currency,
            ))
            .for_update()
            .first(conn)
            .map_err(crate::retry)?;
    // Only a captured payment moves; failed, voided or already refunded
    // ones have nothing to give back.
    if status != "captured" {
        return Ok(());
    }
    diesel::update(payments::table.find(payment_id))
        .set((
            payments::status.eq("refunded"),
            payments::reason.eq(format!("order cancelled: {}", e.reason)),
            payments::updated_at.eq(diesel::dsl::now),
        ))
        .execute(conn)
        .map_err(crate::retry)?;
    outbox
        .enqueue(
            conn,
            &PaymentRefunded {
                payment_id,
                order_id: e.order_id,
                amount_cents,
                currency: currency.unwrap_or_else(|| "EUR".to_owned()),
            },
        )
        .map_err(crate::retry)?;
    Ok(())
}

/// The payment consumer; its outbox lives in `config.schema` too.
///
/// Of an order's events it takes only the cancellation; the cancellation
/// says (`x-key-prev`) that nothing before it is on a routing key this
/// consumer binds, so it runs without waiting for the order's earlier events.
///
/// # Errors
///
/// A bad configuration (see [`consumer::ConsumerBuilder::build`]).
pub fn consumer(config: ConsumerConfig) -> anyhow::Result<Consumer> {
    let outbox = crate::outbox_in(&config.schema)?;
    let cancelled = outbox.clone();
    Ok(Consumer::builder(config)
        .handle("inventory", "inventory.*.reserved", move |conn, e| {
            on_reserved(conn, &outbox, &e.event)
        })
        .handle("order", "order.*.cancelled", move |conn, e| {
            on_order_cancelled(conn, &cancelled, &e.event)
        })
        .build()?)
}
