//! Making the consumer's connections: to PostgreSQL (sync for the inbox and
//! sync handlers, async for diesel-async handlers; TLS as the URL's
//! `sslmode` says) and to RabbitMQ (TLS for `amqps://` with the config's
//! certificates). Every error says what failed without the password.

use diesel::{Connection, PgConnection};

use crate::config::ConsumerConfig;
use crate::{Error, Result};

/// A plain database connection (libpq: `sslmode` is its own).
pub(crate) fn database(config: &ConsumerConfig) -> Result<PgConnection> {
    PgConnection::establish(&config.database_url)
        .map_err(|e| database_error(config, &e.to_string()))
}

/// A handler's database connection, with the session bounds of the config.
pub(crate) fn handler_database(config: &ConsumerConfig) -> Result<PgConnection> {
    use diesel::connection::SimpleConnection;
    let mut conn = database(config)?;
    conn.batch_execute(&config.session_settings())
        .map_err(|e| database_error(config, &format!("setting the session bounds: {e}")))?;
    Ok(conn)
}

/// A diesel-async handler's connection, with the session bounds.
#[cfg(feature = "async")]
pub(crate) async fn async_handler_database(
    config: &ConsumerConfig,
) -> Result<diesel_async::AsyncPgConnection> {
    use diesel_async::SimpleAsyncConnection;
    let mut conn = outbox::pg_async::connect(&config.database_url)
        .await
        .map_err(|e| database_error(config, &e.to_string()))?;
    conn.batch_execute(&config.session_settings())
        .await
        .map_err(|e| database_error(config, &format!("setting the session bounds: {e}")))?;
    Ok(conn)
}

/// [`Error::Connect`] for the database, the cause redacted.
pub(crate) fn database_error(config: &ConsumerConfig, cause: &str) -> Error {
    Error::Connect {
        what: "database",
        url: outbox::redact_url(&config.database_url),
        cause: outbox::redact_secrets(&config.database_url, cause),
    }
}

/// Connects to the broker with the config's TLS material (for
/// `amqps://`), naming the connection `name`.
pub(crate) async fn broker(config: &ConsumerConfig, name: String) -> Result<lapin::Connection> {
    let failed = |cause: String| Error::Connect {
        what: "broker",
        url: outbox::redact_url(&config.amqp_url),
        cause: outbox::redact_secrets(&config.amqp_url, &cause),
    };
    let pem = config.amqp_tls.load().map_err(&failed)?;
    let tls = lapin::tcp::OwnedTLSConfig {
        cert_chain: pem.ca,
        identity: pem
            .client
            .map(|(pem, key)| lapin::tcp::OwnedIdentity::PKCS8 { pem, key }),
    };
    let properties = lapin::ConnectionProperties::default().with_connection_name(name.into());
    let connect = async {
        lapin::DefaultConnectionBuilder::new()?
            .with_uri_str(config.amqp_url.clone())
            .with_properties(properties)
            .with_tls_config(tls)
            .connect()
            .await
    };
    tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| failed(format!("no answer within {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| failed(e.to_string()))
}

/// How long connecting to the broker may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
