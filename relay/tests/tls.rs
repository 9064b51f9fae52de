//! The relay over TLS on both links, against the test servers' real TLS
//! (`scripts/services.sh`: PostgreSQL's TLS and a RabbitMQ listener on
//! 5671, both with a certificate for `localhost` only, signed by the test
//! CA). What it must refuse is shown with the `outbox-relay` binary, whose
//! log says why it cannot connect.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{config, outbox_schema, start};
use diesel::Connection;
use outbox::{AmqpTls, Message};
use testkit::amqp::TestTopology;
use testkit::proxy::{Proxy, holds};
use testkit::tls;

const WAIT: Duration = Duration::from_secs(60);

fn trust_test_ca() -> AmqpTls {
    AmqpTls {
        ca_file: Some(tls::ca()),
        ..AmqpTls::default()
    }
}

fn enqueue(schema: &testkit::TestSchema, outbox: &outbox::Outbox, exchange: &str, n: usize) {
    let mut conn = schema.connect();
    let messages: Vec<Message> = (0..n)
        .map(|i| {
            Message::builder(exchange, "order.v1.submitted", "order.submitted")
                .ordering_key(format!("key-{}", i % 3))
                .json(&serde_json::json!({ "i": i }))
                .build()
                .unwrap()
        })
        .collect();
    conn.transaction(|conn| outbox.enqueue_batch(conn, &messages))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_ships_over_tls_on_both_links_and_no_credential_crosses_in_clear() {
    let (schema, outbox) = outbox_schema("relay_tls");
    let topology = TestTopology::new("relay_tls", "#").await;
    enqueue(&schema, &outbox, &topology.exchange, 30);

    // Both links go through proxies that keep what the relay sends; the
    // host name stays `localhost`, which the certificates name, so the
    // strictest modes apply.
    let database = Proxy::start("127.0.0.1:5432").await;
    let broker = Proxy::start("127.0.0.1:5671").await;
    let mut config = config(&schema);
    config.database_url = format!(
        "postgres://postgres@localhost:{}/test?{}",
        database.port(),
        tls::verified("verify-full")
    );
    config.amqp_url = format!("amqps://guest:guest@localhost:{}/%2f", broker.port());
    config.amqp_tls = trust_test_ca();
    let relay = start(config);
    let received = topology.receive(30, WAIT).await;
    relay.stop().await;
    assert_eq!(received.len(), 30, "every event went through");

    let to_database = database.client_sent();
    let to_broker = broker.client_sent();
    assert!(database.connections() > 0 && broker.connections() > 0);
    assert!(
        !holds(&to_database, b"user\0postgres\0"),
        "the database login crossed in clear"
    );
    assert!(
        !holds(&to_database, b"outbox_messages"),
        "SQL crossed in clear"
    );
    assert!(
        !holds(&to_broker, b"\0guest\0guest"),
        "the AMQP login crossed in clear"
    );
    assert!(
        !holds(&to_broker, topology.exchange.as_bytes()),
        "AMQP frames crossed in clear"
    );
}

/// RabbitMQ's view of the connections whose name holds `marker`: for each,
/// whether it is TLS and the subject of the client's certificate.
fn broker_connections(marker: &str) -> Vec<(bool, String)> {
    let out = Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_connections",
            "ssl",
            "peer_cert_subject",
            "client_properties",
        ])
        .output()
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| line.contains(marker))
        .map(|line| {
            let mut fields = line.split('\t');
            let ssl = fields.next() == Some("true");
            (ssl, fields.next().unwrap_or("").to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_sees_the_relays_client_certificate() {
    let (schema, outbox) = outbox_schema("relay_tls_cert");
    let topology = TestTopology::new("relay_tls_cert", "#").await;
    enqueue(&schema, &outbox, &topology.exchange, 3);
    let (cert, key) = tls::client();
    let mut config = config(&schema);
    config.amqp_url = tls::amqps_url();
    config.amqp_tls = AmqpTls {
        ca_file: Some(tls::ca()),
        client_cert_file: Some(cert),
        client_key_file: Some(key),
    };
    let relay = start(config);
    assert_eq!(topology.receive(3, WAIT).await.len(), 3);
    let seen = testkit::wait_for("the relay's connections listed", WAIT, || {
        let seen = broker_connections(schema.name());
        (!seen.is_empty()).then_some(seen)
    });
    relay.stop().await;
    for (ssl, subject) in seen {
        assert!(ssl, "a relay connection without TLS");
        assert_eq!(subject, "CN=outbox-test-client");
    }
}

/// `outbox-relay run` with `args`, its log (stderr) gathered as it comes.
struct Sidecar {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Sidecar {
    fn start(schema: &str, database_url: &str, args: &[&str]) -> Sidecar {
        let mut child = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
            .env_remove("AMQP_URL")
            .env("DATABASE_URL", database_url)
            .env("NO_COLOR", "1")
            .args([
                "--schema",
                schema,
                "run",
                "--workers",
                "1",
                "--http-addr",
                "127.0.0.1:0",
            ])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push_str(&line);
                sink.lock().unwrap().push('\n');
            }
        });
        Sidecar { child, log }
    }

    /// Waits until a log line holds every one of `words`; returns it.
    /// Panics with the whole log when none does within [`WAIT`].
    fn wait_for_line(&self, words: &[&str]) -> String {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let log = self.log.lock().unwrap().clone();
            if let Some(line) = log
                .lines()
                .find(|line| words.iter().all(|w| line.contains(w)))
            {
                return line.to_owned();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no log line with {words:?} within {WAIT:?}; the log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_refuses_a_broker_whose_certificate_names_another_host() {
    let (schema, _) = outbox_schema("relay_tls_name");
    let ca = tls::ca();
    let sidecar = Sidecar::start(
        schema.name(),
        &testkit::database_url(),
        &[
            "--amqp-url",
            "amqps://guest:guest@127.0.0.1:5671/%2f",
            "--amqp-ca-file",
            ca.to_str().unwrap(),
        ],
    );
    let line = sidecar.wait_for_line(&["broker unavailable", r#"not valid for name "127.0.0.1""#]);
    assert!(!line.contains("guest:guest"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_refuses_a_database_whose_certificate_names_another_host() {
    let (schema, _) = outbox_schema("relay_tls_dbname");
    let url = tls::database_url("127.0.0.1", &tls::verified("verify-full"));
    let sidecar = Sidecar::start(
        schema.name(),
        &url,
        &["--amqp-url", &testkit::amqp::amqp_url()],
    );
    sidecar.wait_for_line(&[
        "cannot connect to the database",
        r#"certificate not valid for name "127.0.0.1""#,
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_refuses_a_client_certificate_from_another_ca() {
    let (schema, _) = outbox_schema("relay_tls_other");
    let (ca, (cert, key)) = (tls::ca(), tls::other_client());
    let sidecar = Sidecar::start(
        schema.name(),
        &testkit::database_url(),
        &[
            "--amqp-url",
            &tls::amqps_url(),
            "--amqp-ca-file",
            ca.to_str().unwrap(),
            "--amqp-client-cert",
            cert.to_str().unwrap(),
            "--amqp-client-key",
            key.to_str().unwrap(),
        ],
    );
    sidecar.wait_for_line(&["broker unavailable", "UnknownCA"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_to_a_plain_port_fails_and_sends_no_credentials() {
    let (schema, _) = outbox_schema("relay_tls_plain");
    // A plain AMQP port behind a proxy that keeps what it is sent.
    let plain = Proxy::start("127.0.0.1:5672").await;
    let url = format!("amqps://guest:s3cret-pw@localhost:{}/%2f", plain.port());
    let ca = tls::ca();
    let sidecar = Sidecar::start(
        schema.name(),
        &testkit::database_url(),
        &["--amqp-url", &url, "--amqp-ca-file", ca.to_str().unwrap()],
    );
    let line = sidecar.wait_for_line(&["broker unavailable"]);
    assert!(plain.connections() > 0, "the relay tried the port");
    let sent = plain.client_sent();
    assert!(!sent.is_empty(), "a TLS hello went");
    assert!(!holds(&sent, b"s3cret-pw"), "the password crossed in clear");
    assert!(
        !holds(&sent, b"AMQP"),
        "a plain AMQP handshake was attempted"
    );
    assert!(!line.contains("s3cret-pw"), "{line}");
}
