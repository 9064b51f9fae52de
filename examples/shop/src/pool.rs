//! A handful of reusable database connections for the HTTP handlers. Small
//! on purpose: the order service needs a few connections, not a pool crate.

use std::sync::Mutex;

use diesel::{Connection, ConnectionResult, PgConnection};

/// Connections to one database URL, made on demand and kept for reuse.
pub struct Pool {
    url: String,
    idle: Mutex<Vec<PgConnection>>,
    keep: usize,
}

impl Pool {
    /// A pool for `url` keeping up to `keep` idle connections.
    pub fn new(url: &str, keep: usize) -> Self {
        Pool {
            url: url.to_owned(),
            idle: Mutex::new(Vec::new()),
            keep,
        }
    }

    /// Runs `f` with a connection. A connection whose work failed is not
    /// kept: it may be broken, and a fresh one is cheap.
    pub fn with<T, E: From<diesel::ConnectionError>>(
        &self,
        f: impl FnOnce(&mut PgConnection) -> Result<T, E>,
    ) -> Result<T, E> {
        let taken = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut conn = match taken {
            Some(conn) => conn,
            None => connect(&self.url)?,
        };
        let result = f(&mut conn);
        if result.is_ok() {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < self.keep {
                idle.push(conn);
            }
        }
        result
    }
}

fn connect(url: &str) -> ConnectionResult<PgConnection> {
    PgConnection::establish(url)
}
