//! The TLS side of the test servers, as `scripts/services.sh` sets it up:
//! a test CA, a server certificate for the name `localhost` only (so
//! `verify-full` to `127.0.0.1` must be refused), a client certificate from
//! the same CA and one from another CA; PostgreSQL speaks TLS on its usual
//! port, RabbitMQ on `localhost:5671`.
//!
//! The files are under `OUTBOX_TEST_TLS_DIR`, by default
//! `/etc/outbox-test-tls`.

use std::path::PathBuf;

/// Where the test certificates are.
pub fn dir() -> PathBuf {
    std::env::var_os("OUTBOX_TEST_TLS_DIR")
        .map_or_else(|| PathBuf::from("/etc/outbox-test-tls"), PathBuf::from)
}

/// A file of the test certificates, checked to exist.
///
/// # Panics
///
/// When it does not (the setup did not run).
pub fn file(name: &str) -> PathBuf {
    let path = dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run scripts/services.sh, which makes the test certificates",
        path.display()
    );
    path
}

/// The test CA's certificate (PEM), which signed both servers'.
pub fn ca() -> PathBuf {
    file("ca.pem")
}

/// A client certificate and key the test CA signed.
pub fn client() -> (PathBuf, PathBuf) {
    (file("client.pem"), file("client.key"))
}

/// A client certificate and key signed by another CA, which the servers
/// do not trust.
pub fn other_client() -> (PathBuf, PathBuf) {
    (file("other-client.pem"), file("other-client.key"))
}

/// The CA that signed [`other_client`]: trusting it instead of [`ca`]
/// makes the servers' certificates unverifiable.
pub fn other_ca() -> PathBuf {
    file("other-ca.pem")
}

/// The test broker's TLS listener as `guest`.
pub fn amqps_url() -> String {
    "amqps://guest:guest@localhost:5671/%2f".to_owned()
}

/// The test database over TLS: `host` (`localhost` matches the server's
/// certificate, `127.0.0.1` does not) and the `ssl*` parameters given,
/// e.g. `"sslmode=verify-full&sslrootcert=..."`.
pub fn database_url(host: &str, ssl: &str) -> String {
    format!("postgres://postgres@{host}:5432/test?{ssl}")
}

/// `sslmode=<mode>&sslrootcert=<the test CA>`.
pub fn verified(mode: &str) -> String {
    format!("sslmode={mode}&sslrootcert={}", ca().display())
}
