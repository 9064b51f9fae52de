//! The checkout saga's and the replicas' handlers, each called as the
//! consumer calls it (in a transaction, with the service's outbox) against
//! real PostgreSQL: applied twice, or after a competing event, or out of
//! order, a handler changes nothing more and sends nothing more. The
//! consumer already dedupes by message id and orders each key; these are the
//! cases it cannot rule out: the same step asked for by two producers (a
//! failed payment and a cancellation both release stock), and events of
//! different producers racing (a cancellation overtaking a reservation).

use diesel::connection::SimpleConnection;
use diesel::sql_types::{BigInt, Text};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use outbox::Outbox;
use shop::events::{
    Line, OrderCancelled, OrderSubmitted, PaymentCaptured, PaymentFailed, PaymentRefunded,
    StockRejected, StockReleased, StockReserved, UserRegistered, UserRenamed,
};
use shop::order::{NewOrder, OrderService};
use shop::{customers, inventory, payment, saga};
use testkit::TestSchema;
use uuid::Uuid;

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct Value {
    #[diesel(sql_type = Text)]
    v: String,
}

/// A service's schema: the outbox (and inbox) tables and the service's own.
struct Service {
    schema: TestSchema,
    outbox: Outbox,
    conn: PgConnection,
}

impl Service {
    fn new(prefix: &str, tables: &[&str]) -> Self {
        let schema = TestSchema::new(prefix);
        let mut conn = schema.connect();
        let outbox = Outbox::new(outbox::Config {
            schema: schema.name().to_owned(),
            ..outbox::Config::default()
        })
        .unwrap();
        outbox.migrate(&mut conn).unwrap();
        for sql in tables {
            conn.batch_execute(sql).unwrap();
        }
        Service {
            schema,
            outbox,
            conn,
        }
    }

    /// Runs a handler in a transaction of its own, as the inbox does.
    fn apply(
        &mut self,
        handler: impl FnOnce(&mut PgConnection, &Outbox) -> consumer::HandlerResult,
    ) {
        let outbox = self.outbox.clone();
        self.conn
            .transaction::<_, diesel::result::Error, _>(|conn| {
                handler(conn, &outbox).unwrap_or_else(|e| panic!("handler failed: {e:?}"));
                Ok(())
            })
            .unwrap();
    }

    fn count(&mut self, from_where: &str) -> i64 {
        diesel::sql_query(format!("SELECT count(*) AS n FROM {from_where}"))
            .get_result::<Count>(&mut self.conn)
            .unwrap()
            .n
    }

    fn value(&mut self, select: &str) -> String {
        diesel::sql_query(format!("SELECT ({select})::text AS v"))
            .get_result::<Value>(&mut self.conn)
            .unwrap()
            .v
    }

    fn events(&mut self, routing_key: &str) -> i64 {
        self.count(&format!(
            "outbox_messages WHERE routing_key = '{routing_key}'"
        ))
    }
}

fn line(sku: &str, qty: i32) -> Line {
    Line {
        sku: sku.into(),
        qty,
        price_cents: 100,
    }
}

fn submitted(order_id: Uuid, lines: Vec<Line>, payment_method: &str) -> OrderSubmitted {
    OrderSubmitted {
        order_id,
        total_cents: lines.iter().map(|l| i64::from(l.qty) * l.price_cents).sum(),
        currency: None,
        placed_at_us: 0,
        lines,
        customer_id: None,
        payment_method: payment_method.into(),
    }
}

#[test]
fn inventory_reserves_every_line_once_and_releases_once() {
    let mut s = Service::new("saga_reserve", &[inventory::SCHEMA_SQL]);
    inventory::receive(&mut s.conn, "tea", 10).unwrap();
    inventory::receive(&mut s.conn, "cup", 5).unwrap();
    let order = Uuid::now_v7();
    // Two lines of one SKU count together.
    let e = submitted(
        order,
        vec![line("tea", 3), line("cup", 2), line("tea", 1)],
        "card",
    );
    for _ in 0..2 {
        s.apply(|c, o| inventory::on_submitted(c, o, &e));
    }
    assert_eq!(s.count("reservations"), 1);
    assert_eq!(
        s.value("SELECT available FROM stock WHERE sku = 'tea'"),
        "6"
    );
    assert_eq!(
        s.value("SELECT available FROM stock WHERE sku = 'cup'"),
        "3"
    );
    assert_eq!(s.events("inventory.v1.reserved"), 1);
    assert_eq!(
        s.value(
            "SELECT convert_from(payload, 'UTF8')::jsonb ->> 'amount_cents' FROM outbox_messages"
        ),
        "600"
    );

    // The failed payment and the cancellation it leads to both ask for the
    // stock back; it goes back once.
    let failed = PaymentFailed {
        payment_id: Uuid::now_v7(),
        order_id: order,
        reason: "card declined".into(),
    };
    let cancelled = OrderCancelled {
        order_id: order,
        reason: "payment failed: card declined".into(),
    };
    s.apply(|c, o| inventory::on_payment_failed(c, o, &failed));
    s.apply(|c, o| inventory::on_order_cancelled(c, o, &cancelled));
    s.apply(|c, o| inventory::on_payment_failed(c, o, &failed));
    assert_eq!(
        s.value("SELECT available FROM stock WHERE sku = 'tea'"),
        "10"
    );
    assert_eq!(
        s.value("SELECT available FROM stock WHERE sku = 'cup'"),
        "5"
    );
    assert_eq!(s.value("SELECT status FROM reservations"), "released");
    assert_eq!(s.events("inventory.v1.released"), 1);
}

#[test]
fn inventory_rejects_an_order_beyond_the_stock_and_takes_nothing() {
    let mut s = Service::new("saga_reject", &[inventory::SCHEMA_SQL]);
    inventory::receive(&mut s.conn, "tea", 2).unwrap();
    inventory::receive(&mut s.conn, "cup", 5).unwrap();
    let order = Uuid::now_v7();
    let e = submitted(order, vec![line("cup", 1), line("tea", 3)], "card");
    s.apply(|c, o| inventory::on_submitted(c, o, &e));
    // All or nothing: the cup that was there is not taken either.
    assert_eq!(
        s.value("SELECT available FROM stock WHERE sku = 'cup'"),
        "5"
    );
    assert_eq!(
        s.value("SELECT available FROM stock WHERE sku = 'tea'"),
        "2"
    );
    assert_eq!(s.events("inventory.v1.rejected"), 1);
    assert_eq!(
        s.value("SELECT convert_from(payload, 'UTF8')::jsonb ->> 'reason' FROM outbox_messages"),
        "tea: 3 wanted, 2 left"
    );
    // Its cancellation has nothing to release.
    let cancelled = OrderCancelled {
        order_id: order,
        reason: "out of stock".into(),
    };
    s.apply(|c, o| inventory::on_order_cancelled(c, o, &cancelled));
    assert_eq!(s.events("inventory.v1.released"), 0);
    assert_eq!(
        s.value("SELECT available FROM stock WHERE sku = 'tea'"),
        "2"
    );

    // A SKU inventory never stocked is out of stock too.
    let unknown = submitted(Uuid::now_v7(), vec![line("kettle", 1)], "card");
    s.apply(|c, o| inventory::on_submitted(c, o, &unknown));
    assert_eq!(s.events("inventory.v1.rejected"), 2);
}

fn reserved(order_id: Uuid, payment_method: &str) -> StockReserved {
    StockReserved {
        reservation_id: Uuid::now_v7(),
        order_id,
        amount_cents: 1600,
        currency: "EUR".into(),
        payment_method: payment_method.into(),
    }
}

#[test]
fn payment_is_taken_or_declined_once_and_refunded_once() {
    let mut s = Service::new("saga_pay", &[payment::SCHEMA_SQL]);
    let (paid, declined) = (Uuid::now_v7(), Uuid::now_v7());
    let paid_reservation = reserved(paid, "card");
    for _ in 0..2 {
        s.apply(|c, o| payment::on_reserved(c, o, &paid_reservation));
    }
    let declined_reservation = reserved(declined, payment::DECLINING_METHOD);
    s.apply(|c, o| payment::on_reserved(c, o, &declined_reservation));
    assert_eq!(s.count("payments"), 2);
    assert_eq!(s.events("payment.v1.captured"), 1);
    assert_eq!(s.events("payment.v1.failed"), 1);
    assert_eq!(
        s.value(&format!(
            "SELECT status || ' ' || amount_cents FROM payments WHERE order_id = '{paid}'"
        )),
        "captured 1600"
    );

    // Cancelling the paid order gives the money back, once; cancelling the
    // declined one has nothing to give back.
    for order_id in [paid, paid, declined] {
        let e = OrderCancelled {
            order_id,
            reason: "customer request".into(),
        };
        s.apply(|c, o| payment::on_order_cancelled(c, o, &e));
    }
    assert_eq!(s.events("payment.v1.refunded"), 1);
    assert_eq!(
        s.value(&format!(
            "SELECT status FROM payments WHERE order_id = '{paid}'"
        )),
        "refunded"
    );
    assert_eq!(
        s.value(&format!(
            "SELECT status FROM payments WHERE order_id = '{declined}'"
        )),
        "failed"
    );
}

#[test]
fn a_cancellation_that_overtakes_the_reservation_voids_the_payment() {
    let mut s = Service::new("saga_void", &[payment::SCHEMA_SQL]);
    let order = Uuid::now_v7();
    // The two come from different producers: the cancellation may arrive
    // first. The reservation that follows must take nothing.
    let cancelled = OrderCancelled {
        order_id: order,
        reason: "customer request".into(),
    };
    s.apply(|c, o| payment::on_order_cancelled(c, o, &cancelled));
    let late = reserved(order, "card");
    s.apply(|c, o| payment::on_reserved(c, o, &late));
    assert_eq!(s.value("SELECT status FROM payments"), "voided");
    assert_eq!(
        s.count("outbox_messages"),
        0,
        "nothing captured, nothing refunded"
    );
}

#[test]
fn a_cancellation_racing_the_payment_waits_for_it_then_refunds() {
    let mut s = Service::new("saga_race_pay", &[payment::SCHEMA_SQL]);
    let order = Uuid::now_v7();
    let (outbox, schema) = (s.outbox.clone(), s.schema.name().to_owned());
    let mut paying = s.schema.connect();
    paying
        .transaction::<_, diesel::result::Error, _>(|paying| {
            // The payment is taken but not committed when the cancellation
            // (another producer's event, so another lane) runs.
            payment::on_reserved(paying, &outbox, &reserved(order, "card")).unwrap();
            let (pid_tx, pid_rx) = std::sync::mpsc::channel();
            let cancelling = std::thread::spawn(move || {
                let mut conn =
                    testkit::connect(&shop::service_url(&testkit::database_url(), &schema));
                let pid = diesel::sql_query("SELECT pg_backend_pid()::bigint AS n")
                    .get_result::<Count>(&mut conn)
                    .unwrap()
                    .n;
                pid_tx.send(pid).unwrap();
                let outbox = Outbox::new(outbox::Config {
                    schema,
                    ..outbox::Config::default()
                })
                .unwrap();
                conn.transaction::<_, diesel::result::Error, _>(|conn| {
                    let e = OrderCancelled {
                        order_id: order,
                        reason: "customer request".into(),
                    };
                    payment::on_order_cancelled(conn, &outbox, &e).unwrap();
                    Ok(())
                })
                .unwrap();
            });
            // It waits on the payment's row (the order's unique key) ...
            let pid = pid_rx.recv().unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while s.count(&format!(
                "pg_stat_activity WHERE pid = {pid} AND wait_event_type = 'Lock'"
            )) == 0
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the cancellation never waited"
                );
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Ok(cancelling)
        })
        .unwrap()
        // ... and once the payment commits, finds it and refunds it.
        .join()
        .unwrap();
    assert_eq!(s.value("SELECT status FROM payments"), "refunded");
    assert_eq!(s.events("payment.v1.captured"), 1);
    assert_eq!(s.events("payment.v1.refunded"), 1);
}

/// The order service in its schema, and a guest order placed through it.
fn order_service(prefix: &str) -> (Service, OrderService) {
    let s = Service::new(prefix, &[shop::order::SCHEMA_SQL, customers::SCHEMA_SQL]);
    let url = shop::service_url(&testkit::database_url(), s.schema.name());
    let service = OrderService::new(&url, s.schema.name()).unwrap();
    (s, service)
}

fn place(service: &OrderService) -> Uuid {
    service
        .place(&NewOrder {
            customer: "ada".into(),
            lines: vec![line("tea", 2)],
            ..NewOrder::default()
        })
        .unwrap()
}

#[test]
fn the_order_is_confirmed_on_payment_and_cancelled_on_a_refusal_once() {
    let (mut s, service) = order_service("saga_order");
    let (paid, declined, short) = (place(&service), place(&service), place(&service));

    let captured = PaymentCaptured {
        payment_id: Uuid::now_v7(),
        order_id: paid,
        amount_cents: 200,
        currency: "EUR".into(),
    };
    for _ in 0..2 {
        s.apply(|c, o| saga::on_captured(c, o, &captured));
    }
    let view = service.get(paid).unwrap();
    assert_eq!(
        (view.status.as_str(), view.payment_status.as_deref()),
        ("confirmed", Some("captured"))
    );
    assert_eq!(s.events("order.v1.confirmed"), 1);

    let failed = PaymentFailed {
        payment_id: Uuid::now_v7(),
        order_id: declined,
        reason: "card declined".into(),
    };
    let rejected = StockRejected {
        reservation_id: Uuid::now_v7(),
        order_id: short,
        reason: "tea: 2 wanted, 0 left".into(),
    };
    for _ in 0..2 {
        s.apply(|c, o| saga::on_failed(c, o, &failed));
        s.apply(|c, o| saga::on_rejected(c, o, &rejected));
    }
    let view = service.get(declined).unwrap();
    assert_eq!(view.status, "cancelled");
    assert_eq!(
        view.cancel_reason.as_deref(),
        Some("payment failed: card declined")
    );
    let view = service.get(short).unwrap();
    assert_eq!(view.status, "cancelled");
    assert_eq!(view.stock_status.as_deref(), Some("rejected"));
    assert_eq!(
        view.cancel_reason.as_deref(),
        Some("out of stock: tea: 2 wanted, 0 left")
    );
    assert_eq!(s.events("order.v1.cancelled"), 2);
}

#[test]
fn a_payment_for_an_order_the_customer_cancelled_does_not_confirm_it() {
    let (mut s, service) = order_service("saga_race");
    let order = place(&service);
    service.cancel(order, "changed mind").unwrap();
    let captured = PaymentCaptured {
        payment_id: Uuid::now_v7(),
        order_id: order,
        amount_cents: 200,
        currency: "EUR".into(),
    };
    s.apply(|c, o| saga::on_captured(c, o, &captured));
    let refunded = PaymentRefunded {
        payment_id: captured.payment_id,
        order_id: order,
        amount_cents: 200,
        currency: "EUR".into(),
    };
    s.apply(|c, _| saga::on_refunded(c, &refunded));
    let view = service.get(order).unwrap();
    assert_eq!(view.status, "cancelled");
    assert_eq!(view.cancel_reason.as_deref(), Some("changed mind"));
    assert_eq!(view.payment_status.as_deref(), Some("refunded"));
    assert_eq!(s.events("order.v1.confirmed"), 0);
    assert_eq!(s.events("order.v1.cancelled"), 1, "the customer's only");

    // A note applied late never hides a later one.
    let reservation_id = Uuid::now_v7();
    let released = StockReleased {
        reservation_id,
        order_id: order,
        reason: "order cancelled".into(),
    };
    s.apply(|c, _| saga::on_released(c, &released));
    let stale = reserved(order, "card");
    s.apply(|c, _| saga::on_reserved(c, &stale));
    assert_eq!(
        service.get(order).unwrap().stock_status.as_deref(),
        Some("released")
    );
}

#[test]
fn the_customers_replica_keeps_the_newest_name() {
    let (mut s, _service) = order_service("replica_customers");
    let user_id = Uuid::now_v7();
    let registered = UserRegistered {
        user_id,
        name: "Ada".into(),
        version: 1,
    };
    let renamed = |name: &str, version| UserRenamed {
        user_id,
        name: name.into(),
        version,
    };
    s.apply(|c, _| customers::on_registered(c, &registered));
    s.apply(|c, _| customers::on_renamed(c, &renamed("Ada L.", 3)));
    // Late and repeated events: a replayed dead letter, a duplicate past
    // the dedupe window. The newest name stays.
    s.apply(|c, _| customers::on_renamed(c, &renamed("Ada Lovelace", 2)));
    s.apply(|c, _| customers::on_registered(c, &registered));
    assert_eq!(
        customers::name_of(&mut s.conn, user_id).unwrap().as_deref(),
        Some("Ada L.")
    );
    assert_eq!(s.count("customers"), 1);
    assert_eq!(
        customers::name_of(&mut s.conn, Uuid::now_v7()).unwrap(),
        None
    );
}
