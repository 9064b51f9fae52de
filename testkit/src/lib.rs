//! Fixtures shared by the integration tests: a PostgreSQL schema, or a whole
//! database, of its own for every test, so tests run in parallel and leave
//! nothing behind.
//!
//! The server is `DATABASE_URL`, by default
//! `postgres://postgres@127.0.0.1:5432/test` (what `scripts/services.sh`
//! brings up).

pub mod amqp;
pub mod proxy;
pub mod tls;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection};

/// Server used when `DATABASE_URL` is not set.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The test server's URL: `DATABASE_URL`, or [`DEFAULT_DATABASE_URL`].
pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned())
}

/// A name no other test (or test process) will pick: prefix, process id, counter.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!(
        "{prefix}_{}_{n}_{}",
        std::process::id(),
        &uuid::Uuid::now_v7().simple().to_string()[26..]
    )
}

/// Connects to `url`, panicking with the URL (tests want a clear failure).
pub fn connect(url: &str) -> PgConnection {
    PgConnection::establish(url).unwrap_or_else(|e| {
        panic!("cannot connect to {url}: {e} (is PostgreSQL up? run scripts/services.sh)")
    })
}

/// A schema of its own for one test, dropped with everything in it at the end.
pub struct TestSchema {
    name: String,
    url: String,
}

impl TestSchema {
    /// Creates an empty schema named after `prefix` in the test database.
    pub fn new(prefix: &str) -> Self {
        let name = unique_name(prefix);
        let url = database_url();
        connect(&url)
            .batch_execute(&format!(r#"CREATE SCHEMA "{name}""#))
            .expect("create test schema");
        TestSchema { name, url }
    }

    /// The schema name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A new connection whose `search_path` is this schema.
    pub fn connect(&self) -> PgConnection {
        let mut conn = connect(&self.url);
        conn.batch_execute(&format!(r#"SET search_path TO "{}""#, self.name))
            .expect("set search_path");
        conn
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        if let Ok(mut conn) = PgConnection::establish(&self.url) {
            let _ =
                conn.batch_execute(&format!(r#"DROP SCHEMA IF EXISTS "{}" CASCADE"#, self.name));
        }
    }
}

/// A database of its own for one test (for tests about `public` or the
/// whole catalog), dropped at the end.
pub struct TestDatabase {
    name: String,
    admin_url: String,
}

impl TestDatabase {
    /// Creates an empty database named after `prefix`.
    pub fn new(prefix: &str) -> Self {
        let name = unique_name(prefix);
        let admin_url = database_url();
        connect(&admin_url)
            .batch_execute(&format!(r#"CREATE DATABASE "{name}""#))
            .expect("create test database");
        TestDatabase { name, admin_url }
    }

    /// The URL of this database on the test server.
    pub fn url(&self) -> String {
        match self.admin_url.rsplit_once('/') {
            Some((server, db)) => {
                let query = db
                    .split_once('?')
                    .map(|(_, q)| format!("?{q}"))
                    .unwrap_or_default();
                format!("{server}/{}{query}", self.name)
            }
            None => panic!("DATABASE_URL {} has no database part", self.admin_url),
        }
    }

    /// A new connection to this database.
    pub fn connect(&self) -> PgConnection {
        connect(&self.url())
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Ok(mut conn) = PgConnection::establish(&self.admin_url) {
            let _ = conn.batch_execute(&format!(
                r#"DROP DATABASE IF EXISTS "{}" WITH (FORCE)"#,
                self.name
            ));
        }
    }
}

/// Polls `condition` until it returns `Some`, or panics with `what` after
/// `timeout`. Tests wait on conditions with a deadline, never on bare sleeps.
pub fn wait_for<T>(what: &str, timeout: Duration, mut condition: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = condition() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
