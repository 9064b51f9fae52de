//! The demo's consistency check, in the test suite with a small load:
//! every service's tables match what was ordered and each other (the saga
//! settled every order, the replicas caught up), with and without faults
//! (relays and consumers killed and restarted, broker connections cut).

use std::time::Duration;

use shop::demo::{DemoConfig, run};

/// One demo at a time: each runs every service of the shop, and two at once
/// on two cores crowd the database's connection limit and the CPU.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn small(prefix: &str) -> DemoConfig {
    DemoConfig {
        database_url: testkit::database_url(),
        orders: 60,
        rate: 30,
        progress: false,
        settle_timeout: Duration::from_secs(90),
        ..DemoConfig::local(&testkit::unique_name(prefix))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shop_is_consistent_after_a_small_load() {
    let _one = ONE_AT_A_TIME.lock().await;
    let report = run(&small("shop_ok")).await.unwrap();
    assert!(report.passed(), "{report}");
    assert_eq!(report.orders_placed, 60);
    assert_eq!(report.cancel_requests, 12);
    assert_eq!(report.users_registered, 40);
    assert_eq!(report.users_renamed, 2, "after orders 25 and 50");
    assert_eq!(report.events_relayed, report.events_enqueued);
    let o = report.outcomes;
    let cancelled = o.cancelled_by_customer + o.out_of_stock + o.payment_declined;
    assert_eq!(o.confirmed + cancelled, 60, "every order ended: {report}");
    // 10% pay with the declining card (orders 7, 17, ..., 57, none of them
    // cancelled by the load or wanting the scarce SKU), and the scarce SKU
    // has 15 units for 21 wanted by orders the load keeps.
    assert_eq!(o.payment_declined, 6, "{report}");
    assert!(o.out_of_stock >= 1, "{report}");
    let billing = report.consumer("billing").unwrap();
    assert_eq!(
        billing.applied,
        60 + cancelled,
        "a charge per order, a reversal per cancellation"
    );
    let order_events = report.events.iter().find(|e| e.0 == "order").unwrap().1;
    let users = report.consumer("users").unwrap();
    assert_eq!(
        users.applied, order_events,
        "every order is a registered customer's, so users applies every order event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shop_stays_consistent_when_relay_consumer_and_connections_fail() {
    let _one = ONE_AT_A_TIME.lock().await;
    let config = DemoConfig {
        orders: 160,
        rate: 20,
        faults: true,
        ..small("shop_faults")
    };
    let report = run(&config).await.unwrap();
    assert!(report.passed(), "{report}");
    let (relay_kills, consumer_kills, cuts) = report.faults;
    assert!(
        relay_kills >= 1 && consumer_kills >= 1 && cuts >= 1,
        "every kind of fault happened: {report}"
    );
}
