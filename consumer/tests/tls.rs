//! The consumer over TLS on both links, against the test servers' real TLS
//! (`scripts/services.sh`: PostgreSQL's TLS and a RabbitMQ listener on
//! 5671, both with a certificate for `localhost` only, signed by the test
//! CA), for sync and diesel-async handlers; and what it must refuse.

mod common;

use std::time::Duration;

use common::{Harness, Msg, assert_once_and_in_order, spawn, stop, wait_until};
use consumer::{Consumer, Error};
use outbox::AmqpTls;
use testkit::proxy::{Proxy, holds};
use testkit::tls;

fn trust_test_ca() -> AmqpTls {
    AmqpTls {
        ca_file: Some(tls::ca()),
        ..AmqpTls::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_and_async_handlers_apply_over_tls_and_no_credential_crosses_in_clear() {
    let h = Harness::new("c_tls").await;
    // Both links through proxies that keep what the consumer sends; the
    // host stays `localhost`, the name on the certificates, so the
    // strictest modes apply.
    let database = Proxy::start("127.0.0.1:5432").await;
    let broker = Proxy::start("127.0.0.1:5671").await;
    let mut config = h.config();
    config.database_url = format!(
        "postgres://postgres@localhost:{}/test?{}",
        database.port(),
        tls::verified("verify-full")
    );
    config.amqp_url = format!("amqps://guest:guest@localhost:{}/%2f", broker.port());
    config.amqp_tls = trust_test_ca();
    let table = h.effects_table();
    let consumer = Consumer::builder(config)
        .handle(&h.exchange, "order.*.submitted", h.recorder())
        .handle_async::<common::Ev, _>(&h.exchange, "order.*.shipped", move |conn, e| {
            let table = table.clone();
            Box::pin(async move { common::record_async(conn, &table, e).await })
        })
        .build()
        .unwrap();
    let (shutdown, task) = spawn(&consumer);
    let submitted: Vec<Msg> = (1..=10)
        .flat_map(|seq| (0..5).map(move |k| Msg::keyed(&format!("order-{k}"), seq)))
        .collect();
    let shipped: Vec<Msg> = (1..=10)
        .map(|seq| {
            let mut m = Msg::keyed("parcel-1", seq);
            m.routing_key = "order.v1.shipped".into();
            m
        })
        .collect();
    h.publish(&submitted[0]).await;
    h.publish_all(&submitted[1..]).await;
    h.publish_all(&shipped).await;
    wait_until("60 applied", Duration::from_secs(60), || {
        consumer.stats().applied >= 60
    })
    .await;
    stop(shutdown, task).await;
    let effects = h.effects();
    assert_eq!(effects.len(), 60, "each applied once");
    assert_once_and_in_order(&effects);

    let to_database = database.client_sent();
    let to_broker = broker.client_sent();
    assert!(database.connections() > 0 && broker.connections() > 0);
    assert!(
        !holds(&to_database, b"user\0postgres\0"),
        "the database login crossed in clear"
    );
    assert!(!holds(&to_database, b"inbox_"), "SQL crossed in clear");
    assert!(
        !holds(&to_broker, b"\0guest\0guest"),
        "the AMQP login crossed in clear"
    );
    assert!(
        !holds(&to_broker, h.name.as_bytes()),
        "AMQP frames crossed in clear"
    );
    h.cleanup(1).await;
}

/// What `declare` (connect and declare the topology) says with `tweak`
/// applied to the config.
async fn declare_with(prefix: &str, tweak: impl FnOnce(&mut consumer::ConsumerConfig)) -> String {
    let h = Harness::new(prefix).await;
    let mut config = h.config();
    tweak(&mut config);
    let consumer = Consumer::builder(config)
        .handle(&h.exchange, "order.*.submitted", h.recorder())
        .build()
        .unwrap();
    let result = consumer.declare().await;
    h.cleanup(1).await;
    match result {
        Ok(()) => "declared".to_owned(),
        Err(e @ Error::Connect { .. }) => e.to_string(),
        Err(other) => panic!("not a connection error: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_whose_certificate_names_another_host_is_refused() {
    let said = declare_with("c_tls_name", |c| {
        c.amqp_url = "amqps://guest:guest@127.0.0.1:5671/%2f".into();
        c.amqp_tls = trust_test_ca();
    })
    .await;
    assert!(said.contains(r#"not valid for name "127.0.0.1""#), "{said}");
    assert!(!said.contains("guest:guest"), "{said}");
    // The same broker under the name on its certificate is fine.
    let said = declare_with("c_tls_ok", |c| {
        c.amqp_url = tls::amqps_url();
        c.amqp_tls = trust_test_ca();
    })
    .await;
    assert_eq!(said, "declared");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_certificate_from_a_ca_not_trusted_is_refused() {
    let said = declare_with("c_tls_ca", |c| {
        c.amqp_url = tls::amqps_url();
        c.amqp_tls = AmqpTls {
            ca_file: Some(tls::other_ca()),
            ..AmqpTls::default()
        };
    })
    .await;
    assert!(said.contains("invalid peer certificate"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_takes_a_client_certificate_from_its_ca_and_refuses_another() {
    let with = |(cert, key): (std::path::PathBuf, std::path::PathBuf)| {
        move |c: &mut consumer::ConsumerConfig| {
            c.amqp_url = tls::amqps_url();
            c.amqp_tls = AmqpTls {
                ca_file: Some(tls::ca()),
                client_cert_file: Some(cert),
                client_key_file: Some(key),
            };
        }
    };
    assert_eq!(
        declare_with("c_tls_cert", with(tls::client())).await,
        "declared"
    );
    let said = declare_with("c_tls_other", with(tls::other_client())).await;
    assert!(said.contains("UnknownCA"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_to_a_plain_port_fails_and_sends_no_credentials() {
    let plain = Proxy::start("127.0.0.1:5672").await;
    let port = plain.port();
    let said = declare_with("c_tls_plain", |c| {
        c.amqp_url = format!("amqps://guest:s3cret-pw@localhost:{port}/%2f");
        c.amqp_tls = trust_test_ca();
    })
    .await;
    assert!(said.contains("broker"), "{said}");
    assert!(!said.contains("s3cret-pw"), "{said}");
    let sent = plain.client_sent();
    assert!(!sent.is_empty(), "a TLS hello went");
    assert!(!holds(&sent, b"s3cret-pw"), "the password crossed in clear");
    assert!(
        !holds(&sent, b"AMQP"),
        "a plain AMQP handshake was attempted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_whose_certificate_names_another_host_is_refused() {
    let said = declare_with("c_tls_db", |c| {
        c.database_url = tls::database_url("127.0.0.1", &tls::verified("verify-full"));
    })
    .await;
    assert!(
        said.contains("database") && said.contains("127.0.0.1"),
        "{said}"
    );
}
