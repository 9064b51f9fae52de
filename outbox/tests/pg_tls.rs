//! TLS to PostgreSQL, against the test server's real TLS (set up by
//! `scripts/services.sh`: a certificate for `localhost` only, signed by the
//! test CA): the async path (`outbox::pg_async::connect`, rustls) honours
//! `sslmode` as libpq does, and the sync path (libpq) agrees with it on
//! every case.

mod common;

use std::time::Duration;

use diesel::sql_types::{Bool, Nullable, Text};
use diesel::{Connection, PgConnection, QueryableByName};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl as _};
use testkit::proxy::{Proxy, holds};
use testkit::tls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(QueryableByName, Debug, PartialEq)]
struct Session {
    #[diesel(sql_type = Bool)]
    ssl: bool,
    #[diesel(sql_type = Nullable<Text>)]
    client_dn: Option<String>,
}

/// What the server says of the current session's TLS.
const SESSION: &str = "SELECT coalesce(ssl, false) AS ssl, client_dn \
                       FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

async fn async_session(url: &str) -> Result<Session, String> {
    let mut conn = outbox::pg_async::connect(url)
        .await
        .map_err(|e| e.to_string())?;
    diesel::sql_query(SESSION)
        .get_result(&mut conn)
        .await
        .map_err(|e| e.to_string())
}

fn sync_session(url: &str) -> Result<Session, String> {
    let mut conn = PgConnection::establish(url).map_err(|e| e.to_string())?;
    diesel::RunQueryDsl::get_result(diesel::sql_query(SESSION), &mut conn)
        .map_err(|e| e.to_string())
}

/// Both paths' view of `url`: the session of each, or why it failed.
async fn both(url: &str) -> (Result<Session, String>, Result<Session, String>) {
    let sync_url = url.to_owned();
    let sync = tokio::task::spawn_blocking(move || sync_session(&sync_url))
        .await
        .unwrap();
    (async_session(url).await, sync)
}

fn encrypted(client_dn: Option<&str>) -> Session {
    Session {
        ssl: true,
        client_dn: client_dn.map(str::to_owned),
    }
}

#[tokio::test]
async fn verify_full_connects_to_the_name_on_the_certificate_over_tls() {
    let url = tls::database_url("localhost", &tls::verified("verify-full"));
    let (async_path, sync_path) = both(&url).await;
    assert_eq!(async_path, Ok(encrypted(None)), "async path");
    assert_eq!(sync_path, Ok(encrypted(None)), "sync path");
}

#[tokio::test]
async fn verify_full_refuses_a_host_the_certificate_does_not_name() {
    // The certificate names localhost only; 127.0.0.1 is the same server.
    let url = tls::database_url("127.0.0.1", &tls::verified("verify-full"));
    let (async_path, sync_path) = both(&url).await;
    let async_error = async_path.expect_err("async path must refuse 127.0.0.1");
    assert!(
        async_error.contains("certificate") && async_error.contains("127.0.0.1"),
        "the error says which name the certificate lacks: {async_error}"
    );
    let sync_error = sync_path.expect_err("sync path must refuse 127.0.0.1");
    assert!(
        sync_error.contains("does not match host name"),
        "{sync_error}"
    );

    // verify-ca checks the chain only: the same host is fine there.
    let url = tls::database_url("127.0.0.1", &tls::verified("verify-ca"));
    let (async_path, sync_path) = both(&url).await;
    assert_eq!(async_path, Ok(encrypted(None)), "async verify-ca");
    assert_eq!(sync_path, Ok(encrypted(None)), "sync verify-ca");
}

#[tokio::test]
async fn verify_ca_refuses_a_certificate_from_a_ca_not_trusted() {
    for mode in ["verify-ca", "verify-full"] {
        let ssl = format!("sslmode={mode}&sslrootcert={}", tls::other_ca().display());
        let url = tls::database_url("localhost", &ssl);
        let (async_path, sync_path) = both(&url).await;
        let async_error = async_path.expect_err(mode);
        assert!(async_error.contains("certificate"), "{mode}: {async_error}");
        assert!(sync_path.is_err(), "sync {mode}: {sync_path:?}");
    }
}

#[tokio::test]
async fn prefer_and_require_use_the_servers_tls_and_disable_does_not() {
    // `prefer` is the default: with a server that offers TLS it must be
    // used (the async path once ran in plain text here).
    for ssl in ["", "sslmode=prefer", "sslmode=require"] {
        let url = tls::database_url("localhost", ssl);
        let (async_path, sync_path) = both(&url).await;
        assert_eq!(async_path, Ok(encrypted(None)), "async {ssl:?}");
        assert_eq!(sync_path, Ok(encrypted(None)), "sync {ssl:?}");
    }
    let url = tls::database_url("localhost", "sslmode=disable");
    let plain = Session {
        ssl: false,
        client_dn: None,
    };
    let (async_path, sync_path) = both(&url).await;
    assert_eq!(async_path, Ok(plain), "async disable");
    assert!(
        matches!(sync_path, Ok(Session { ssl: false, .. })),
        "{sync_path:?}"
    );
}

#[tokio::test]
async fn client_certificates_from_the_trusted_ca_are_accepted_and_others_refused() {
    let with = |(cert, key): (std::path::PathBuf, std::path::PathBuf)| {
        let ssl = format!(
            "{}&sslcert={}&sslkey={}",
            tls::verified("verify-full"),
            cert.display(),
            key.display()
        );
        tls::database_url("localhost", &ssl)
    };
    let (async_path, sync_path) = both(&with(tls::client())).await;
    let dn = Some("/CN=outbox-test-client");
    assert_eq!(async_path, Ok(encrypted(dn)), "async, trusted client");
    assert_eq!(sync_path, Ok(encrypted(dn)), "sync, trusted client");

    let (async_path, sync_path) = both(&with(tls::other_client())).await;
    let async_error = async_path.expect_err("another CA's client certificate");
    assert!(
        async_error.contains("unknown ca") || async_error.contains("UnknownCA"),
        "{async_error}"
    );
    assert!(sync_path.is_err(), "{sync_path:?}");
}

/// A server that answers PostgreSQL's TLS request with "no" and keeps
/// whatever the client sends next; returns its port and, once the client
/// is gone, what it sent after the refusal.
async fn server_without_tls() -> (u16, tokio::task::JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        // SSLRequest: length 8, code 80877103.
        let mut request = [0u8; 8];
        socket.read_exact(&mut request).await.unwrap();
        assert_eq!(request, [0, 0, 0, 8, 4, 210, 22, 47], "an SSLRequest first");
        socket.write_all(b"N").await.unwrap();
        let mut after = Vec::new();
        let read = socket.read_to_end(&mut after);
        let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
        after
    });
    (port, task)
}

#[tokio::test]
async fn require_refuses_a_server_without_tls_and_sends_it_nothing() {
    for mode in ["require", "verify-ca", "verify-full"] {
        let (port, server) = server_without_tls().await;
        let url = format!(
            "postgres://postgres:not-for-you@localhost:{port}/test?{}",
            tls::verified(mode)
        );
        let error = outbox::pg_async::connect(&url)
            .await
            .map(|_| ())
            .expect_err(mode)
            .to_string();
        assert!(
            error.to_lowercase().contains("tls") || error.contains("SSL"),
            "{mode}: {error}"
        );
        assert!(!error.contains("not-for-you"), "{mode}: {error}");
        let after = server.await.unwrap();
        assert!(
            after.is_empty(),
            "{mode}: sent after the refusal: {after:?}"
        );
    }
    // The sync path (libpq) agrees.
    let (port, server) = server_without_tls().await;
    let url = format!("postgres://postgres@localhost:{port}/test?sslmode=require");
    let sync = tokio::task::spawn_blocking(move || sync_session(&url))
        .await
        .unwrap();
    assert!(sync.is_err(), "{sync:?}");
    assert!(server.await.unwrap().is_empty());
}

/// Connects through a proxy with `ssl`, runs a query holding a marker, and
/// returns what the client sent over the wire.
async fn wire_bytes(ssl: &str) -> Vec<u8> {
    let proxy = Proxy::start("127.0.0.1:5432").await;
    let url = format!("postgres://postgres@127.0.0.1:{}/test?{ssl}", proxy.port());
    let mut conn: AsyncPgConnection = outbox::pg_async::connect(&url).await.unwrap();
    let marker: Vec<Marker> = diesel::sql_query("SELECT 'marker-6f1c' AS m")
        .load(&mut conn)
        .await
        .unwrap();
    assert_eq!(marker.len(), 1);
    drop(conn);
    proxy.client_sent()
}

#[derive(QueryableByName)]
struct Marker {
    #[diesel(sql_type = Text)]
    #[allow(dead_code)]
    m: String,
}

#[tokio::test]
async fn under_tls_neither_the_login_nor_the_queries_cross_the_wire_in_clear() {
    let login = b"user\0postgres\0";
    let query = b"marker-6f1c";
    // The control: in plain text both are there to read.
    let plain = wire_bytes("sslmode=disable").await;
    assert!(
        holds(&plain, login) && holds(&plain, query),
        "the control sees them"
    );

    let sealed = wire_bytes("sslmode=require").await;
    assert!(
        sealed.len() > 100,
        "something was sent: {} bytes",
        sealed.len()
    );
    assert!(!holds(&sealed, login), "the login crossed in clear");
    assert!(!holds(&sealed, query), "the query crossed in clear");
}

#[tokio::test]
async fn events_enqueue_over_a_verified_tls_connection() {
    let (schema, outbox) = common::outbox_in_own_schema("tls_enqueue");
    let url = tls::database_url("localhost", &tls::verified("verify-full"));
    let mut conn = outbox::pg_async::connect(&url).await.unwrap();
    let event = common::OrderSubmitted {
        order_id: "order-tls".into(),
        total_cents: 1,
    };
    conn.transaction(async |conn| outbox.enqueue_async(conn, &event).await.map(|_| ()))
        .await
        .unwrap();
    let mut check = schema.connect();
    let table = format!("{}.outbox_messages", schema.name());
    assert_eq!(common::count(&mut check, &table), 1);
}
