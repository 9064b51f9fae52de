//! The demo's consistency check, in the test suite with a small load:
//! every service's tables match what was ordered, with and without faults
//! (relay and consumer killed and restarted, broker connections cut).

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
    assert_eq!(report.orders_cancelled, 12);
    assert_eq!(report.events_relayed, report.events_enqueued);
    let billing = report
        .consumers
        .iter()
        .find(|(n, _)| *n == "billing")
        .unwrap()
        .1;
    assert_eq!(billing.applied, 72, "60 charges and 12 reversals");
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
