//! The demo's consistency checks: every service's tables against the
//! orders and against each other, read straight from each schema (the
//! checker is the one party allowed to look across services).

use diesel::sql_types::{BigInt, Double};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};

use super::{Check, Outcomes, Schemas};

/// The one figure a check's query returns, as `n`.
#[derive(QueryableByName)]
pub(super) struct Count {
    #[diesel(sql_type = BigInt)]
    pub(super) n: i64,
}

/// Runs a query that returns one `n`.
pub(super) fn count(conn: &mut PgConnection, sql: &str) -> anyhow::Result<i64> {
    Ok(diesel::sql_query(sql).get_result::<Count>(conn)?.n)
}

/// Two percentiles of a latency, in ms.
#[derive(QueryableByName)]
struct Percentiles {
    #[diesel(sql_type = Double)]
    p50: f64,
    #[diesel(sql_type = Double)]
    p99: f64,
}

/// The queries both the wait and the checks use.
mod sql {
    use super::Schemas;

    /// Orders in `status`.
    pub(super) fn orders_with_status(s: &Schemas, status: &str) -> String {
        format!(
            r#"SELECT count(*) AS n FROM "{}".orders WHERE status = '{status}'"#,
            s.order
        )
    }

    /// Orders whose notes of the saga differ from what inventory and
    /// payment hold (a voided payment is one the order never heard of).
    pub(super) fn saga_notes_differ(s: &Schemas) -> String {
        format!(
            r#"SELECT count(*) AS n FROM "{o}".orders ord
               LEFT JOIN "{i}".reservations r ON r.order_id = ord.id
               LEFT JOIN "{p}".payments pay ON pay.order_id = ord.id
               WHERE ord.stock_status IS DISTINCT FROM r.status
                  OR ord.payment_status IS DISTINCT FROM NULLIF(pay.status, 'voided')"#,
            o = s.order,
            i = s.inventory,
            p = s.payment
        )
    }

    /// Reservations still holding stock for a cancelled order.
    pub(super) fn reserved_for_cancelled(s: &Schemas) -> String {
        format!(
            r#"SELECT count(*) AS n FROM "{i}".reservations r JOIN "{o}".orders ord ON ord.id = r.order_id
               WHERE r.status = 'reserved' AND ord.status = 'cancelled'"#,
            o = s.order,
            i = s.inventory
        )
    }

    /// Payments taken and not given back for a cancelled order.
    pub(super) fn captured_for_cancelled(s: &Schemas) -> String {
        format!(
            r#"SELECT count(*) AS n FROM "{p}".payments pay JOIN "{o}".orders ord ON ord.id = pay.order_id
               WHERE pay.status = 'captured' AND ord.status = 'cancelled'"#,
            o = s.order,
            p = s.payment
        )
    }

    /// Users whose replica at the order service is missing or differs.
    pub(super) fn customers_differ(s: &Schemas) -> String {
        format!(
            r#"SELECT count(*) AS n FROM "{u}".users us FULL JOIN "{o}".customers c ON c.id = us.id
               WHERE us.id IS NULL OR c.id IS NULL OR c.name <> us.name OR c.version <> us.version"#,
            o = s.order,
            u = s.users
        )
    }

    /// (user, status) pairs whose order count or total differs between the
    /// orders and the users service's replica of them.
    pub(super) fn user_orders_differ(s: &Schemas) -> String {
        format!(
            r#"SELECT count(*) AS n FROM
                 (SELECT customer_id AS user_id, status, count(*) AS k, sum(total_cents) AS cents
                  FROM "{o}".orders WHERE customer_id IS NOT NULL GROUP BY 1, 2) src
               FULL JOIN
                 (SELECT user_id, status, count(*) AS k, sum(total_cents) AS cents
                  FROM "{u}".user_orders GROUP BY 1, 2) rep
               ON rep.user_id = src.user_id AND rep.status = src.status
               WHERE src.k IS DISTINCT FROM rep.k OR src.cents IS DISTINCT FROM rep.cents"#,
            o = s.order,
            u = s.users
        )
    }

    /// Events not yet published, every outbox.
    pub(super) fn pending(s: &Schemas) -> String {
        let parts: Vec<String> = s
            .producers()
            .iter()
            .map(|(_, schema)| {
                format!(
                    r#"(SELECT count(*) FROM "{schema}".outbox_messages WHERE published_at IS NULL)"#
                )
            })
            .collect();
        format!("SELECT ({})::bigint AS n", parts.join(" + "))
    }
}

/// Whether every consumer has applied everything the orders imply: every
/// order through its saga, every compensation made, every replica and
/// note in step, every outbox empty.
pub(super) fn caught_up(url: &str, s: &Schemas, orders: u64) -> anyhow::Result<bool> {
    let mut conn = PgConnection::establish(url)?;
    let (o, b, l) = (&s.order, &s.billing, &s.logistics);
    let orders = i64::try_from(orders)?;
    let cancelled = count(&mut conn, &sql::orders_with_status(s, "cancelled"))?;
    let ledger = count(
        &mut conn,
        &format!(r#"SELECT count(*) AS n FROM "{b}".ledger"#),
    )?;
    let cancelled_shipments = count(
        &mut conn,
        &format!(r#"SELECT count(*) AS n FROM "{l}".shipments WHERE status = 'cancelled'"#),
    )?;
    let noted = count(
        &mut conn,
        &format!(r#"SELECT count(*) AS n FROM "{o}".orders WHERE shipment_id IS NOT NULL"#),
    )?;
    if ledger < orders + cancelled || cancelled_shipments < cancelled || noted < orders {
        return Ok(false);
    }
    for query in [
        sql::orders_with_status(s, "placed"),
        sql::reserved_for_cancelled(s),
        sql::captured_for_cancelled(s),
        sql::saga_notes_differ(s),
        sql::customers_differ(s),
        sql::user_orders_differ(s),
        sql::pending(s),
    ] {
        if count(&mut conn, &query)? != 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Figures for the report, read with the checks.
pub(super) struct Figures {
    /// How the orders ended.
    pub(super) outcomes: Outcomes,
    /// Per producing service: events written, and of those published.
    pub(super) events: Vec<(&'static str, u64, u64)>,
    /// Order placed to confirmed: p50 and p99, in ms.
    pub(super) saga_ms: (f64, f64),
}

/// Checks every service's tables against the orders and each other; also
/// returns the report's figures.
pub(super) fn consistency(
    url: &str,
    s: &Schemas,
    orders: u64,
) -> anyhow::Result<(Vec<Check>, Figures)> {
    let mut conn = PgConnection::establish(url)?;
    let (o, b, l, i, p) = (&s.order, &s.billing, &s.logistics, &s.inventory, &s.payment);
    let orders_i = i64::try_from(orders)?;
    let cancelled = count(&mut conn, &sql::orders_with_status(s, "cancelled"))?;
    let confirmed = count(&mut conn, &sql::orders_with_status(s, "confirmed"))?;
    let mut checks = Vec::new();
    let mut check =
        |name: &'static str, sql: String, want: i64, what: &str| -> anyhow::Result<()> {
            let got = count(&mut conn, &sql)?;
            checks.push(Check {
                name,
                ok: got == want,
                detail: format!("{got} {what} (expected {want})"),
            });
            Ok(())
        };
    check(
        "orders stored",
        format!(r#"SELECT count(*) AS n FROM "{o}".orders"#),
        orders_i,
        "orders",
    )?;
    check(
        "one charge per order, for its total",
        format!(
            r#"SELECT count(*) AS n FROM "{o}".orders ord
               JOIN "{b}".ledger c ON c.order_id = ord.id AND c.entry = 'charge' AND c.amount_cents = ord.total_cents"#
        ),
        orders_i,
        "matching charges",
    )?;
    check(
        "no order charged twice",
        format!(
            r#"SELECT count(*) AS n FROM (SELECT order_id FROM "{b}".ledger WHERE entry = 'charge' GROUP BY order_id HAVING count(*) > 1) t"#
        ),
        0,
        "orders charged more than once",
    )?;
    check(
        "one reversal per cancelled order",
        format!(
            r#"SELECT count(*) AS n FROM "{o}".orders ord
               JOIN "{b}".ledger r ON r.order_id = ord.id AND r.entry = 'reversal' AND r.amount_cents = -ord.total_cents
               WHERE ord.status = 'cancelled'"#
        ),
        cancelled,
        "matching reversals",
    )?;
    check(
        "ledger balance equals the open orders",
        format!(
            r#"SELECT ((SELECT coalesce(sum(amount_cents), 0) FROM "{b}".ledger)
                     - (SELECT coalesce(sum(total_cents), 0) FROM "{o}".orders WHERE status <> 'cancelled'))::bigint AS n"#
        ),
        0,
        "cents of difference",
    )?;
    check(
        "one shipment per order",
        format!(
            r#"SELECT count(DISTINCT order_id) AS n FROM "{l}".shipments s JOIN "{o}".orders ord ON ord.id = s.order_id"#
        ),
        orders_i,
        "orders with a shipment",
    )?;
    check(
        "shipments cancelled exactly with their orders",
        format!(
            r#"SELECT count(*) AS n FROM "{l}".shipments s JOIN "{o}".orders ord ON ord.id = s.order_id
               WHERE (s.status = 'cancelled') <> (ord.status = 'cancelled')"#
        ),
        0,
        "mismatches",
    )?;
    check(
        "each order knows its shipment",
        format!(
            r#"SELECT count(*) AS n FROM "{o}".orders ord JOIN "{l}".shipments s ON s.id = ord.shipment_id AND s.order_id = ord.id"#
        ),
        orders_i,
        "orders noting their shipment",
    )?;
    check(
        "every order confirmed or cancelled by the saga",
        sql::orders_with_status(s, "placed"),
        0,
        "orders still placed",
    )?;
    check(
        "stock = received - the confirmed orders' lines",
        format!(
            r#"SELECT count(*) AS n FROM "{i}".stock st
               LEFT JOIN (SELECT ln.sku, sum(ln.qty) AS q FROM "{o}".order_lines ln
                          JOIN "{o}".orders ord ON ord.id = ln.order_id
                          WHERE ord.status = 'confirmed' GROUP BY ln.sku) c ON c.sku = st.sku
               WHERE st.received - st.available <> coalesce(c.q, 0)"#
        ),
        0,
        "SKUs whose stock is off",
    )?;
    check(
        "each confirmed order holds its reservation",
        format!(
            r#"SELECT count(*) AS n FROM "{o}".orders ord
               JOIN "{i}".reservations r ON r.order_id = ord.id AND r.status = 'reserved'
               WHERE ord.status = 'confirmed'"#
        ),
        confirmed,
        "confirmed orders with their stock reserved",
    )?;
    check(
        "no reservation left on a cancelled order",
        sql::reserved_for_cancelled(s),
        0,
        "cancelled orders still holding stock",
    )?;
    check(
        "exactly one captured payment per confirmed order, for its total",
        format!(
            r#"SELECT count(*) AS n FROM "{o}".orders ord
               WHERE ord.status = 'confirmed'
                 AND (SELECT count(*) FROM "{p}".payments pay
                      WHERE pay.order_id = ord.id AND pay.status = 'captured'
                        AND pay.amount_cents = ord.total_cents) = 1"#
        ),
        confirmed,
        "confirmed orders paid once",
    )?;
    check(
        "every failed payment: order cancelled, stock released",
        format!(
            r#"SELECT count(*) AS n FROM "{p}".payments pay
               LEFT JOIN "{o}".orders ord ON ord.id = pay.order_id
               LEFT JOIN "{i}".reservations r ON r.order_id = pay.order_id
               WHERE pay.status = 'failed'
                 AND (ord.status IS DISTINCT FROM 'cancelled' OR r.status IS DISTINCT FROM 'released')"#
        ),
        0,
        "failed payments whose order or stock is not undone",
    )?;
    check(
        "no payment kept for a cancelled order",
        sql::captured_for_cancelled(s),
        0,
        "captured payments of cancelled orders",
    )?;
    check(
        "each order's notes of the saga match inventory and payment",
        sql::saga_notes_differ(s),
        0,
        "orders noting otherwise",
    )?;
    check(
        "the order service's customers match the users",
        sql::customers_differ(s),
        0,
        "users missing or named otherwise",
    )?;
    check(
        "the users service's orders match the orders",
        sql::user_orders_differ(s),
        0,
        "(user, status) order counts or totals that differ",
    )?;
    let pending = count(&mut conn, &sql::pending(s))?;
    checks.push(Check {
        name: "outboxes drained",
        ok: pending == 0,
        detail: format!("{pending} events still pending"),
    });

    let mut ended = |reason: &str| -> anyhow::Result<u64> {
        Ok(u64::try_from(count(
            &mut conn,
            &format!(
                r#"SELECT count(*) AS n FROM "{o}".orders WHERE status = 'cancelled' AND cancel_reason LIKE '{reason}%'"#
            ),
        )?)?)
    };
    let outcomes = Outcomes {
        confirmed: u64::try_from(confirmed)?,
        cancelled_by_customer: ended("customer")?,
        out_of_stock: ended("out of stock")?,
        payment_declined: ended("payment failed")?,
        refunds: u64::try_from(count(
            &mut conn,
            &format!(r#"SELECT count(*) AS n FROM "{p}".payments WHERE status = 'refunded'"#),
        )?)?,
    };
    let mut events = Vec::new();
    for (name, schema) in s.producers() {
        let written = count(
            &mut conn,
            &format!(r#"SELECT count(*) AS n FROM "{schema}".outbox_messages"#),
        )?;
        let relayed = count(
            &mut conn,
            &format!(
                r#"SELECT count(*) AS n FROM "{schema}".outbox_messages WHERE published_at IS NOT NULL"#
            ),
        )?;
        events.push((name, u64::try_from(written)?, u64::try_from(relayed)?));
    }
    let saga = diesel::sql_query(format!(
        r#"SELECT coalesce(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), 0) AS p50,
                  coalesce(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), 0) AS p99
           FROM (SELECT extract(epoch FROM confirmed_at - created_at)::float8 * 1000 AS ms
                 FROM "{o}".orders WHERE confirmed_at IS NOT NULL) t"#
    ))
    .get_result::<Percentiles>(&mut conn)?;
    Ok((
        checks,
        Figures {
            outcomes,
            events,
            saga_ms: (saga.p50, saga.p99),
        },
    ))
}
