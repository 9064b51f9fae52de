//! Inventory: the stock on the shelf and what is set aside for orders. On
//! `order.*.submitted` it reserves every line of the order or none of them
//! and answers `inventory.v1.reserved` or `inventory.v1.rejected`; it puts a
//! reservation back (`inventory.v1.released`) when the payment fails or the
//! order is cancelled. Each answer goes through inventory's own outbox in
//! the handler's inbox transaction: the stock, the reservation, the event
//! and the dedupe row commit together.

use std::collections::BTreeMap;

use consumer::{Consumer, ConsumerConfig, HandlerResult};
use diesel::prelude::*;
use outbox::Outbox;
use uuid::Uuid;

use crate::events::{
    OrderCancelled, OrderSubmitted, PaymentFailed, StockRejected, StockReleased, StockReserved,
};

/// The service's own tables, in its own schema.
pub const SCHEMA_SQL: &str = "
CREATE TABLE IF NOT EXISTS stock (
    sku text PRIMARY KEY,
    received integer NOT NULL CHECK (received >= 0),
    available integer NOT NULL CHECK (available >= 0)
);
CREATE TABLE IF NOT EXISTS reservations (
    id uuid PRIMARY KEY,
    order_id uuid NOT NULL UNIQUE,
    status text NOT NULL CHECK (status IN ('reserved', 'rejected', 'released')),
    reason text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS reservation_lines (
    reservation_id uuid NOT NULL REFERENCES reservations (id),
    sku text NOT NULL,
    qty integer NOT NULL CHECK (qty > 0),
    PRIMARY KEY (reservation_id, sku)
);";

// diesel's table definitions (the schema of the service's tables).
#[allow(missing_docs)]
mod tables {
    diesel::table! {
        stock (sku) {
            sku -> Text,
            received -> Integer,
            available -> Integer,
        }
    }

    diesel::table! {
        reservations (id) {
            id -> Uuid,
            order_id -> Uuid,
            status -> Text,
            reason -> Nullable<Text>,
            updated_at -> Timestamptz,
        }
    }

    diesel::table! {
        reservation_lines (reservation_id, sku) {
            reservation_id -> Uuid,
            sku -> Text,
            qty -> Integer,
        }
    }
}
use tables::{reservation_lines, reservations, stock};

/// Puts `qty` of `sku` on the shelf (a delivery from the supplier).
///
/// # Errors
///
/// A database error.
pub fn receive(conn: &mut PgConnection, sku: &str, qty: i32) -> QueryResult<()> {
    diesel::insert_into(stock::table)
        .values((
            stock::sku.eq(sku),
            stock::received.eq(qty),
            stock::available.eq(qty),
        ))
        .on_conflict(stock::sku)
        .do_update()
        .set((
            stock::received.eq(stock::received + qty),
            stock::available.eq(stock::available + qty),
        ))
        .execute(conn)
        .map(|_| ())
}

/// `order.*.submitted`: reserve every line, or none and say which SKU fell
/// short. An order already answered (the event applied again) is left as it
/// is: one reservation per order, the table's unique key makes sure.
pub fn on_submitted(conn: &mut PgConnection, outbox: &Outbox, e: &OrderSubmitted) -> HandlerResult {
    if reservation_of(conn, e.order_id)?.is_some() {
        return Ok(());
    }
    // One figure per SKU, in SKU order: every transaction that touches
    // stock locks its rows in that order, so two never wait on each other
    // in a circle.
    let mut wanted: BTreeMap<&str, i32> = BTreeMap::new();
    for line in &e.lines {
        *wanted.entry(line.sku.as_str()).or_default() += line.qty;
    }
    let on_shelf: BTreeMap<String, i32> = stock::table
        .filter(stock::sku.eq_any(wanted.keys().copied()))
        .order(stock::sku)
        .select((stock::sku, stock::available))
        .for_update()
        .load::<(String, i32)>(conn)
        .map_err(crate::retry)?
        .into_iter()
        .collect();
    let short = wanted.iter().find_map(|(sku, qty)| {
        let left = on_shelf.get(*sku).copied().unwrap_or(0);
        (left < *qty).then(|| format!("{sku}: {qty} wanted, {left} left"))
    });
    let reservation_id = Uuid::now_v7();
    let status = if short.is_some() {
        "rejected"
    } else {
        "reserved"
    };
    diesel::insert_into(reservations::table)
        .values((
            reservations::id.eq(reservation_id),
            reservations::order_id.eq(e.order_id),
            reservations::status.eq(status),
            reservations::reason.eq(short.as_deref()),
        ))
        .execute(conn)
        .map_err(crate::retry)?;
    if let Some(reason) = short {
        outbox
            .enqueue(
                conn,
                &StockRejected {
                    reservation_id,
                    order_id: e.order_id,
                    reason,
                },
            )
            .map_err(crate::retry)?;
        return Ok(());
    }
    for (sku, qty) in &wanted {
        diesel::update(stock::table.find(*sku))
            .set(stock::available.eq(stock::available - *qty))
            .execute(conn)
            .map_err(crate::retry)?;
    }
    let lines: Vec<_> = wanted
        .iter()
        .map(|(sku, qty)| {
            (
                reservation_lines::reservation_id.eq(reservation_id),
                reservation_lines::sku.eq(*sku),
                reservation_lines::qty.eq(*qty),
            )
        })
        .collect();
    diesel::insert_into(reservation_lines::table)
        .values(&lines)
        .execute(conn)
        .map_err(crate::retry)?;
    outbox
        .enqueue(
            conn,
            &StockReserved {
                reservation_id,
                order_id: e.order_id,
                amount_cents: e.total_cents,
                // Version 1 had no currency: its amounts are in EUR.
                currency: e.currency.clone().unwrap_or_else(|| "EUR".to_owned()),
                payment_method: e.payment_method.clone(),
            },
        )
        .map_err(crate::retry)?;
    Ok(())
}

/// `order.*.cancelled`: put the order's reservation back, if it holds one.
pub fn on_order_cancelled(
    conn: &mut PgConnection,
    outbox: &Outbox,
    e: &OrderCancelled,
) -> HandlerResult {
    release(
        conn,
        outbox,
        e.order_id,
        &format!("order cancelled: {}", e.reason),
    )
}

/// `payment.*.failed`: put the order's reservation back. The order service
/// cancels the order on the same event, and that cancellation finds the
/// stock already released.
pub fn on_payment_failed(
    conn: &mut PgConnection,
    outbox: &Outbox,
    e: &PaymentFailed,
) -> HandlerResult {
    release(
        conn,
        outbox,
        e.order_id,
        &format!("payment failed: {}", e.reason),
    )
}

/// Releases the order's reservation once: only a `reserved` one moves (to
/// `released`), so the second of the two compensations that ask for it,
/// and any repeat, finds nothing to do and sends nothing.
fn release(
    conn: &mut PgConnection,
    outbox: &Outbox,
    order_id: Uuid,
    reason: &str,
) -> HandlerResult {
    // The row lock orders the two compensations, which come from different
    // producers and so may run side by side.
    let held: Option<(Uuid, String)> = reservations::table
        .filter(reservations::order_id.eq(order_id))
        .select((reservations::id, reservations::status))
        .for_update()
        .first(conn)
        .optional()
        .map_err(crate::retry)?;
    let Some((reservation_id, status)) = held else {
        return Ok(());
    };
    if status != "reserved" {
        return Ok(());
    }
    let lines = reservation_lines::table
        .filter(reservation_lines::reservation_id.eq(reservation_id))
        .order(reservation_lines::sku)
        .select((reservation_lines::sku, reservation_lines::qty))
        .load::<(String, i32)>(conn)
        .map_err(crate::retry)?;
    for (sku, qty) in &lines {
        diesel::update(stock::table.find(sku))
            .set(stock::available.eq(stock::available + *qty))
            .execute(conn)
            .map_err(crate::retry)?;
    }
    diesel::update(reservations::table.find(reservation_id))
        .set((
            reservations::status.eq("released"),
            reservations::reason.eq(reason),
            reservations::updated_at.eq(diesel::dsl::now),
        ))
        .execute(conn)
        .map_err(crate::retry)?;
    outbox
        .enqueue(
            conn,
            &StockReleased {
                reservation_id,
                order_id,
                reason: reason.to_owned(),
            },
        )
        .map_err(crate::retry)?;
    Ok(())
}

fn reservation_of(
    conn: &mut PgConnection,
    order_id: Uuid,
) -> Result<Option<Uuid>, consumer::HandlerError> {
    reservations::table
        .filter(reservations::order_id.eq(order_id))
        .select(reservations::id)
        .first(conn)
        .optional()
        .map_err(crate::retry)
}

/// The inventory consumer; its outbox lives in `config.schema` too.
///
/// It takes some of an order's events (not `order.v1.confirmed`); each
/// event says which earlier events of its order came before it on which
/// routing keys (`x-key-prev`), so it waits only for ones it binds.
///
/// # Errors
///
/// A bad configuration (see [`consumer::ConsumerBuilder::build`]).
pub fn consumer(config: ConsumerConfig) -> anyhow::Result<Consumer> {
    let outbox = crate::outbox_in(&config.schema)?;
    let (cancelled, failed) = (outbox.clone(), outbox.clone());
    Ok(Consumer::builder(config)
        .handle("order", "order.*.submitted", move |conn, e| {
            on_submitted(conn, &outbox, &e.event)
        })
        .handle("order", "order.*.cancelled", move |conn, e| {
            on_order_cancelled(conn, &cancelled, &e.event)
        })
        .handle("payment", "payment.*.failed", move |conn, e| {
            on_payment_failed(conn, &failed, &e.event)
        })
        .build()?)
}
