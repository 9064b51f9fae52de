//! Configuration of a relay: one struct with defaults, checked by `validate`.

use std::net::SocketAddr;
use std::time::Duration;

use crate::{Error, Result, RetryPolicy};
pub use outbox::redact_url;

/// Everything a relay needs to run.
#[derive(Clone)]
pub struct RelayConfig {
    /// PostgreSQL URL of the service's database. Required.
    pub database_url: String,
    /// AMQP URL of RabbitMQ (`amqp://` or, with the `tls` feature,
    /// `amqps://`). Required.
    pub amqp_url: String,
    /// Certificates for `amqps://`: a CA to trust besides the system's, a
    /// client certificate. Defaults to none.
    pub amqp_tls: outbox::AmqpTls,
    /// Schema holding the outbox tables. Defaults to `public`.
    pub schema: String,
    /// Rows read and published per batch (per partition and transaction).
    /// Defaults to 500.
    pub batch_size: u32,
    /// Payload bytes a worker's batch may hold (a row larger than this
    /// goes alone): the relay's memory is about `workers × batch_bytes`
    /// beyond its own. Defaults to 1 MiB.
    pub batch_bytes: u64,
    /// Concurrent workers, each with its own database connection and AMQP
    /// channel; partitions are spread over them. Defaults to 4.
    pub workers: u32,
    /// How often every partition is scanned when no notification arrives
    /// (the fallback for NOTIFY, and when retries fall due). Defaults to 1 s.
    pub poll_interval: Duration,
    /// Whether to LISTEN for the enqueue's NOTIFY to wake at once on commit.
    /// Workers about to sleep then record the partitions they wait on in
    /// `outbox_waiting`, for which producers notify (with the default
    /// `outbox_settings.notify_when = 'waiting'`). Defaults to true.
    pub listen: bool,
    /// How long publishing a batch (sending and confirms) may take. After it,
    /// every row of the batch is sent again (the same ids; consumers dedupe),
    /// without counting an attempt. Defaults to 10 s.
    pub confirm_timeout: Duration,
    /// Backoff for failed rows and for reconnecting. See [`RetryPolicy`].
    pub retry: RetryPolicy,
    /// How long published rows are kept; `None` deletes them as soon as the
    /// broker confirms. Defaults to `None`.
    pub retention: Option<Duration>,
    /// How often kept rows past the retention are deleted, in batches of
    /// 1000. Defaults to 60 s.
    pub cleanup_interval: Duration,
    /// The AMQP `app_id` property; `None` sends the exchange name (the
    /// producing service). Defaults to `None`.
    pub app_id: Option<String>,
    /// Where `/healthz`, `/readyz` and `/metrics` are served; `None` serves
    /// nothing. Defaults to `None` in the library, `127.0.0.1:9187` in the
    /// binary.
    pub http_addr: Option<SocketAddr>,
    /// How often the backlog gauges (backlog, oldest pending age, parked)
    /// are refreshed. Defaults to 5 s.
    pub stats_interval: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            database_url: String::new(),
            amqp_url: String::new(),
            amqp_tls: outbox::AmqpTls::default(),
            schema: "public".into(),
            batch_size: 500,
            batch_bytes: 1024 * 1024,
            workers: 4,
            poll_interval: Duration::from_secs(1),
            listen: true,
            confirm_timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
            retention: None,
            cleanup_interval: Duration::from_secs(60),
            app_id: None,
            http_addr: None,
            stats_interval: Duration::from_secs(5),
        }
    }
}

// URLs carry passwords: Debug shows them redacted.
impl std::fmt::Debug for RelayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayConfig")
            .field("database_url", &redact_url(&self.database_url))
            .field("amqp_url", &redact_url(&self.amqp_url))
            .field("amqp_tls", &self.amqp_tls)
            .field("schema", &self.schema)
            .field("batch_size", &self.batch_size)
            .field("batch_bytes", &self.batch_bytes)
            .field("workers", &self.workers)
            .field("poll_interval", &self.poll_interval)
            .field("listen", &self.listen)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("retry", &self.retry)
            .field("retention", &self.retention)
            .field("cleanup_interval", &self.cleanup_interval)
            .field("app_id", &self.app_id)
            .field("http_addr", &self.http_addr)
            .field("stats_interval", &self.stats_interval)
            .finish()
    }
}

impl RelayConfig {
    /// Checks every field.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming the field and what it must be.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, reason: String| Err(Error::Config { field, reason });
        if self.database_url.is_empty() {
            return bad("database_url", "must be set".into());
        }
        if !(self.database_url.starts_with("postgres://")
            || self.database_url.starts_with("postgresql://"))
        {
            return bad(
                "database_url",
                format!(
                    "must start with postgres:// or postgresql://, got {}",
                    redact_url(&self.database_url)
                ),
            );
        }
        if self.amqp_url.is_empty() {
            return bad("amqp_url", "must be set".into());
        }
        let amqps = self.amqp_url.starts_with("amqps://");
        if !(self.amqp_url.starts_with("amqp://") || amqps) {
            return bad(
                "amqp_url",
                format!(
                    "must start with amqp:// or amqps://, got {}",
                    redact_url(&self.amqp_url)
                ),
            );
        }
        if amqps && !cfg!(feature = "tls") {
            return bad(
                "amqp_url",
                "amqps:// needs the relay built with the `tls` feature".into(),
            );
        }
        self.amqp_tls.validate().or_else(|e| bad("amqp_tls", e))?;
        if let Err(e) = outbox::pg_async::tls_settings(&self.database_url) {
            return bad("database_url", e);
        }
        outbox::Config {
            schema: self.schema.clone(),
            ..outbox::Config::default()
        }
        .validate()
        .map_err(|e| Error::Config {
            field: "schema",
            reason: e.to_string(),
        })?;
        if self.batch_bytes < 64 * 1024 {
            return bad(
                "batch_bytes",
                format!("must be at least 64 KiB, got {}", self.batch_bytes),
            );
        }
        if !(1..=10_000).contains(&self.batch_size) {
            return bad(
                "batch_size",
                format!("must be 1 to 10000, got {}", self.batch_size),
            );
        }
        if !(1..=256).contains(&self.workers) {
            return bad("workers", format!("must be 1 to 256, got {}", self.workers));
        }
        if self.poll_interval < Duration::from_millis(10) {
            return bad(
                "poll_interval",
                format!("must be at least 10ms, got {:?}", self.poll_interval),
            );
        }
        if self.confirm_timeout < Duration::from_millis(100) {
            return bad(
                "confirm_timeout",
                format!("must be at least 100ms, got {:?}", self.confirm_timeout),
            );
        }
        self.retry.validate().map_err(|reason| Error::Config {
            field: "retry",
            reason,
        })?;
        if self.cleanup_interval.is_zero() || self.stats_interval.is_zero() {
            return bad("cleanup_interval", "intervals must be above 0".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> RelayConfig {
        RelayConfig {
            database_url: "postgres://u:secret@db/x".into(),
            amqp_url: "amqp://guest:guest@localhost:5672/%2f".into(),
            ..RelayConfig::default()
        }
    }

    #[test]
    fn an_amqps_url_is_taken_only_by_a_build_that_speaks_tls() {
        let config = RelayConfig {
            amqp_url: "amqps://g:pw@mq/%2f".into(),
            ..valid()
        };
        let result = config.validate();
        if cfg!(feature = "tls") {
            result.unwrap();
        } else {
            // Never a plain connection in its place.
            let e = result.unwrap_err().to_string();
            assert!(e.contains("`tls` feature") && !e.contains("pw"), "{e}");
        }
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@db:5432/x"),
            "postgres://u:***@db:5432/x"
        );
        assert_eq!(redact_url("amqp://guest@h/%2f"), "amqp://guest@h/%2f");
        assert_eq!(redact_url("amqp://h:5672"), "amqp://h:5672");
        assert_eq!(
            redact_url("postgres://u:p/a@ss@db/x"),
            "postgres://u:***@db/x"
        );
        assert_eq!(
            redact_url("postgres://db/x?user=u&password=pw&sslmode=off"),
            "postgres://db/x?user=u&password=***&sslmode=off"
        );
        let shown = format!("{:?}", valid());
        assert!(
            !shown.contains("secret") && !shown.contains("guest:guest"),
            "{shown}"
        );
    }

    #[test]
    fn bad_fields_are_named_without_secrets() {
        valid().validate().unwrap();
        let cases = [
            (
                RelayConfig {
                    amqp_url: String::new(),
                    ..valid()
                },
                "amqp_url",
            ),
            (
                RelayConfig {
                    database_url: "mysql://u:secret@h".into(),
                    ..valid()
                },
                "database_url",
            ),
            (
                RelayConfig {
                    batch_size: 0,
                    ..valid()
                },
                "batch_size",
            ),
            (
                RelayConfig {
                    workers: 0,
                    ..valid()
                },
                "workers",
            ),
            (
                RelayConfig {
                    schema: "No".into(),
                    ..valid()
                },
                "schema",
            ),
        ];
        for (config, field) in cases {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
            assert!(!err.contains("secret"), "{err}");
        }
    }
}
