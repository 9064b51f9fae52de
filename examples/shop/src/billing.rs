//! Billing: a general ledger kept from the order events. A submitted order
//! is charged, a cancelled one reversed. Each handler runs in the inbox's
//! transaction: applied once per event, in order per order id (so the
//! reversal always finds its charge).

use std::sync::{Arc, Mutex};

use consumer::{Consumer, ConsumerConfig, Envelope, HandlerResult};
use diesel::prelude::*;

use crate::events::{OrderCancelled, OrderSubmitted};

/// The service's own table, in its own schema.
pub const SCHEMA_SQL: &str = "
CREATE TABLE IF NOT EXISTS ledger (
    id bigserial PRIMARY KEY,
    order_id uuid NOT NULL,
    entry text NOT NULL CHECK (entry IN ('charge', 'reversal')),
    amount_cents bigint NOT NULL,
    currency text NOT NULL,
    message_id uuid NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS ledger_order ON ledger (order_id);";

// diesel's table definitions (the schema of the service's tables).
#[allow(missing_docs)]
mod tables {
    diesel::table! {
        ledger (id) {
            id -> BigInt,
            order_id -> Uuid,
            entry -> Text,
            amount_cents -> BigInt,
            currency -> Text,
            message_id -> Uuid,
        }
    }
}
use tables::ledger;

/// Commit-to-handler latencies in µs, collected for the demo's report.
pub type Latencies = Arc<Mutex<Vec<u64>>>;

/// `order.*.submitted` (every version): charge the order's total.
pub fn on_submitted(conn: &mut PgConnection, e: &Envelope<OrderSubmitted>) -> HandlerResult {
    diesel::insert_into(ledger::table)
        .values((
            ledger::order_id.eq(e.event.order_id),
            ledger::entry.eq("charge"),
            ledger::amount_cents.eq(e.event.total_cents),
            // Version 1 had no currency: its amounts are in EUR.
            ledger::currency.eq(e.event.currency.as_deref().unwrap_or("EUR")),
            ledger::message_id.eq(e.meta.message_id),
        ))
        .execute(conn)
        .map(|_| ())
        .map_err(crate::retry)
}

/// `order.*.cancelled`: reverse what was charged. Per-key order means the
/// charge is already in the ledger.
pub fn on_cancelled(conn: &mut PgConnection, e: &Envelope<OrderCancelled>) -> HandlerResult {
    let charged: Option<(i64, String)> = ledger::table
        .filter(ledger::order_id.eq(e.event.order_id))
        .filter(ledger::entry.eq("charge"))
        .select((ledger::amount_cents, ledger::currency))
        .first(conn)
        .optional()
        .map_err(crate::retry)?;
    let Some((amount, currency)) = charged else {
        return Err(consumer::HandlerError::Discard(format!(
            "order {} was never charged; nothing to reverse",
            e.event.order_id
        )));
    };
    diesel::insert_into(ledger::table)
        .values((
            ledger::order_id.eq(e.event.order_id),
            ledger::entry.eq("reversal"),
            ledger::amount_cents.eq(-amount),
            ledger::currency.eq(currency),
            ledger::message_id.eq(e.meta.message_id),
        ))
        .execute(conn)
        .map(|_| ())
        .map_err(crate::retry)
}

/// The billing consumer. With `latencies`, each charge records how long
/// after the order's commit it ran.
///
/// It takes some of an order's events (not `order.v1.confirmed`); each
/// event says which earlier events of its order came before it on which
/// routing keys (`x-key-prev`), so a cancellation after the confirmation
/// does not wait for the confirmation it never gets.
pub fn consumer(
    config: ConsumerConfig,
    latencies: Option<Latencies>,
) -> consumer::Result<Consumer> {
    Consumer::builder(config)
        .handle(
            "order",
            "order.*.submitted",
            move |conn, e: Envelope<OrderSubmitted>| {
                if let Some(l) = &latencies {
                    let waited = crate::order::now_us() - e.event.placed_at_us;
                    l.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(u64::try_from(waited).unwrap_or(0));
                }
                on_submitted(conn, &e)
            },
        )
        .handle("order", "order.*.cancelled", |conn, e| {
            on_cancelled(conn, &e)
        })
        .build()
}
