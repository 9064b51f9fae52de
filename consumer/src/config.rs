//! Consumer settings, their defaults, and the names they give the broker
//! objects.

use std::time::Duration;

use outbox::RetryPolicy;

use crate::{Error, Result};

/// What to do with a held message whose key has a gap that did not fill:
/// the key did not move for [`ConsumerConfig::gap_wait`] while the consumer
/// was consuming.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GapPolicy {
    /// Apply it and move the key past the gap (the missing event may be
    /// parked at the producer, or was published before this consumer's
    /// binding existed); counted, logged, and a missing event arriving
    /// later is late.
    #[default]
    Apply,
    /// Dead-letter it (its key moves past it, as for every dead letter).
    DeadLetter,
}

/// What to do with a late message: older than its key's position, yet
/// never applied (it lost a race, or was replayed by hand).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LatePolicy {
    /// Dead-letter it with the reason; a replay applies it.
    #[default]
    DeadLetter,
    /// Apply it anyway, out of order.
    Apply,
}

/// What to do with a message no handler is registered for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnknownPolicy {
    /// Dead-letter it, so nothing is lost if a handler was forgotten.
    #[default]
    DeadLetter,
    /// Acknowledge it and record it as ignored (its key moves on).
    Ignore,
}

/// How a consumer runs. Build with [`ConsumerConfig::new`] and adjust fields.
#[derive(Clone)]
pub struct ConsumerConfig {
    /// The consumer's name: its queues, its inbox rows and its leases are
    /// named after it. One per service (or per use within a service).
    pub name: String,
    /// PostgreSQL URL of the service's database (holding the inbox tables).
    pub database_url: String,
    /// RabbitMQ URL (`amqp://` or, with the `tls` feature, `amqps://`).
    pub amqp_url: String,
    /// Certificates for `amqps://`: a CA to trust besides the system's, a
    /// client certificate. Defaults to none.
    pub amqp_tls: outbox::AmqpTls,
    /// Schema the migrations installed the inbox tables in. Defaults to `public`.
    pub schema: String,
    /// Partition queues, 1 to 64. 1 (default): one queue, several
    /// instances fail over. N > 1: keys are spread over N queues by the
    /// slot the relay stamps on each message, and the live instances share
    /// the queues. Changing it is safe while traffic flows: the queues no
    /// longer used are drained, then deleted (see the README).
    pub partitions: u16,
    /// Unacknowledged deliveries per queue the broker sends ahead. Defaults to 256.
    pub prefetch: u16,
    /// Bytes of message bodies an instance may hold unsettled; above it the
    /// broker is asked to send nothing more (a per-channel prefetch of 1)
    /// until half of it is settled. What was already on its way when the
    /// limit was crossed still arrives, so the bound is this plus at most
    /// one prefetch window of messages in transit. Defaults to 32 MiB.
    pub max_bytes_in_flight: usize,
    /// Handlers running at once, each with its own database connection.
    /// Defaults to 8.
    pub lanes: usize,
    /// Deliveries (of different keys) a lane applies in one transaction
    /// when a backlog waits: one statement records them all, one moves
    /// their keys, one commit. If one is out of turn or its handler does not
    /// succeed, the batch is rolled back and applied again, each message in
    /// its own savepoint (so a handler may run twice; only one run's writes
    /// commit). 1 applies each alone. Defaults to 32.
    pub batch_size: usize,
    /// Backoff for handler retries (the key waits, other keys go on) and
    /// for reconnecting. After `max_attempts` the message is dead-lettered.
    /// Defaults: 200 ms doubling to 30 s, 5 attempts, with jitter.
    pub retry: RetryPolicy,
    /// How long a key with a held message (one that arrived ahead of an
    /// event this consumer binds) may go without moving, while the consumer
    /// consumes, before [`ConsumerConfig::after_gap`] applies. Held messages
    /// wait in the database, so a long wait blocks no other key. Defaults to
    /// 10 s.
    pub gap_wait: Duration,
    /// See [`GapPolicy`]. Defaults to apply.
    pub after_gap: GapPolicy,
    /// How far beyond its key's position a message's `x-key-seq` may be;
    /// beyond that it is dead-lettered as malformed, because applying it
    /// would make every real event of the key late. Defaults to 1,000,000.
    pub max_ahead: i64,
    /// Bounds on the handlers' database sessions, so a frozen instance (a
    /// paused VM, SIGSTOP) cannot block others for long: its transaction is
    /// ended by PostgreSQL after `idle_in_transaction_timeout`, and a lane
    /// waiting for a key it locks gives up after `lock_timeout` and tries
    /// again later. `statement_timeout` bounds each statement, the
    /// handlers' included. Defaults: 10 s, 60 s, 60 s.
    pub lock_timeout: Duration,
    /// See [`ConsumerConfig::lock_timeout`].
    pub idle_in_transaction_timeout: Duration,
    /// See [`ConsumerConfig::lock_timeout`].
    pub statement_timeout: Duration,
    /// See [`LatePolicy`]. Defaults to dead-letter.
    pub late: LatePolicy,
    /// See [`UnknownPolicy`]. Defaults to dead-letter.
    pub unknown: UnknownPolicy,
    /// How long message ids are kept for dedupe. A duplicate arriving later
    /// than this is applied again. Defaults to 7 days.
    pub dedupe_retention: Duration,
    /// How often expired message ids are pruned (in batches of 1,000).
    /// Defaults to 1 min.
    pub prune_interval: Duration,
    /// How often an instance checks which instances of the consumer are
    /// alive (each holds a database session lock while it lives, so a
    /// crashed one is gone at once) and takes its share of the queues.
    /// Defaults to 500 ms.
    pub membership_interval: Duration,
    /// How long shutdown waits for running handlers. Defaults to 30 s.
    pub shutdown_timeout: Duration,
    /// Declare the producers' exchanges (durable topic) if missing, so the
    /// consumer can start before the producer. Defaults to true.
    pub declare_exchanges: bool,
}

impl std::fmt::Debug for ConsumerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // URLs may hold passwords.
        f.debug_struct("ConsumerConfig")
            .field("name", &self.name)
            .field("database_url", &outbox::redact_url(&self.database_url))
            .field("amqp_url", &outbox::redact_url(&self.amqp_url))
            .field("amqp_tls", &self.amqp_tls)
            .field("schema", &self.schema)
            .field("partitions", &self.partitions)
            .field("prefetch", &self.prefetch)
            .field("lanes", &self.lanes)
            .field("batch_size", &self.batch_size)
            .field("retry", &self.retry)
            .field("gap_wait", &self.gap_wait)
            .field("after_gap", &self.after_gap)
            .field("late", &self.late)
            .field("unknown", &self.unknown)
            .field("dedupe_retention", &self.dedupe_retention)
            .finish_non_exhaustive()
    }
}

impl ConsumerConfig {
    /// A consumer called `name` on these databases, with every default.
    pub fn new(name: &str, database_url: &str, amqp_url: &str) -> Self {
        ConsumerConfig {
            name: name.to_owned(),
            database_url: database_url.to_owned(),
            amqp_url: amqp_url.to_owned(),
            amqp_tls: outbox::AmqpTls::default(),
            schema: "public".to_owned(),
            partitions: 1,
            prefetch: 256,
            max_bytes_in_flight: 32 * 1024 * 1024,
            lanes: 8,
            batch_size: 32,
            retry: RetryPolicy {
                initial: Duration::from_millis(200),
                multiplier: 2.0,
                max_delay: Duration::from_secs(30),
                max_attempts: 5,
                jitter: true,
            },
            gap_wait: Duration::from_secs(10),
            after_gap: GapPolicy::Apply,
            max_ahead: crate::inbox::DEFAULT_MAX_AHEAD,
            lock_timeout: Duration::from_secs(10),
            idle_in_transaction_timeout: Duration::from_secs(60),
            statement_timeout: Duration::from_secs(60),
            late: LatePolicy::DeadLetter,
            unknown: UnknownPolicy::DeadLetter,
            dedupe_retention: Duration::from_secs(7 * 24 * 3600),
            prune_interval: Duration::from_secs(60),
            membership_interval: Duration::from_millis(500),
            shutdown_timeout: Duration::from_secs(30),
            declare_exchanges: true,
        }
    }

    /// Checks every field; the error names the one that is wrong.
    ///
    /// # Errors
    ///
    /// [`Error::Config`].
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, reason: String| Err(Error::Config { field, reason });
        // Queue names are built from the name: keep them within AMQP's 255 bytes.
        if self.name.is_empty()
            || self.name.len() > 200
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return bad(
                "name",
                format!(
                    "{:?} must be 1 to 200 characters of letters, digits, '-', '_' or '.'",
                    self.name
                ),
            );
        }
        // The toolkit names queues and exchanges `<name>.<suffix>`: a name
        // that ends like one would share another consumer's objects.
        let taken = [".dead-letters", ".slots", ".unslotted", ".partitions"];
        let numbered = self
            .name
            .rsplit_once('.')
            .is_some_and(|(_, tail)| !tail.is_empty() && tail.bytes().all(|b| b.is_ascii_digit()));
        if numbered || taken.iter().any(|suffix| self.name.ends_with(suffix)) {
            return bad(
                "name",
                format!(
                    "{:?} ends like the toolkit's own queue names (.<number>, {}): it would \
                     share another consumer's queues",
                    self.name,
                    taken.join(", ")
                ),
            );
        }
        for (field, url, schemes) in [
            (
                "database_url",
                &self.database_url,
                &["postgres://", "postgresql://"][..],
            ),
            ("amqp_url", &self.amqp_url, &["amqp://", "amqps://"][..]),
        ] {
            if !schemes.iter().any(|s| url.starts_with(s)) {
                return bad(
                    field,
                    format!(
                        "{} must start with {}",
                        outbox::redact_url(url),
                        schemes.join(" or ")
                    ),
                );
            }
        }
        if self.amqp_url.starts_with("amqps://") && !cfg!(feature = "tls") {
            return bad(
                "amqp_url",
                "amqps:// needs the consumer built with the `tls` feature (else the \
                 credentials would go in clear)"
                    .into(),
            );
        }
        self.amqp_tls.validate().or_else(|e| bad("amqp_tls", e))?;
        if self.partitions == 0 || self.partitions > outbox::wire::SLOTS {
            return bad(
                "partitions",
                format!(
                    "must be 1 to {} (the relay's slots), got {}",
                    outbox::wire::SLOTS,
                    self.partitions
                ),
            );
        }
        if self.prefetch == 0 {
            return bad("prefetch", "must be at least 1".into());
        }
        if self.max_bytes_in_flight < 64 * 1024 {
            return bad(
                "max_bytes_in_flight",
                format!("must be at least 64 KiB, got {}", self.max_bytes_in_flight),
            );
        }
        if self.batch_size == 0 || self.batch_size > 1000 {
            return bad(
                "batch_size",
                format!("must be 1 to 1000, got {}", self.batch_size),
            );
        }
        if self.lanes == 0 || self.lanes > 256 {
            return bad("lanes", format!("must be 1 to 256, got {}", self.lanes));
        }
        self.retry
            .validate()
            .or_else(|reason| bad("retry", reason))?;
        if self.membership_interval < Duration::from_millis(50)
            || self.membership_interval > Duration::from_secs(60)
        {
            return bad(
                "membership_interval",
                format!("must be 50 ms to 60 s, got {:?}", self.membership_interval),
            );
        }
        if self.prune_interval.is_zero() {
            return bad("prune_interval", "must be above 0".into());
        }
        if self.max_ahead < 1 {
            return bad(
                "max_ahead",
                format!("must be at least 1, got {}", self.max_ahead),
            );
        }
        for (field, value) in [
            ("lock_timeout", self.lock_timeout),
            (
                "idle_in_transaction_timeout",
                self.idle_in_transaction_timeout,
            ),
            ("statement_timeout", self.statement_timeout),
        ] {
            if value < Duration::from_millis(100) || value > Duration::from_secs(24 * 3600) {
                return bad(field, format!("must be 100 ms to 24 h, got {value:?}"));
            }
        }
        outbox::Config {
            schema: self.schema.clone(),
            ..outbox::Config::default()
        }
        .validate()
        .map_err(|e| Error::Config {
            field: "schema",
            reason: e.to_string(),
        })
    }

    /// The queue of partition `index` (the only queue when partitions = 1).
    pub fn queue(&self, index: u16) -> String {
        queue_name(&self.name, self.partitions, index)
    }

    /// The headers exchange that feeds the partition queues by slot.
    pub fn slots_exchange(&self) -> String {
        format!("{}.slots", self.name)
    }

    /// Where a message without a slot header (not sent by our relay) goes:
    /// a fanout exchange feeding the first queue.
    pub fn unslotted_exchange(&self) -> String {
        format!("{}.unslotted", self.name)
    }

    /// The session settings of a handler's database connection.
    pub(crate) fn session_settings(&self) -> String {
        format!(
            "SET lock_timeout = {}; SET idle_in_transaction_session_timeout = {}; \
             SET statement_timeout = {}",
            self.lock_timeout.as_millis(),
            self.idle_in_transaction_timeout.as_millis(),
            self.statement_timeout.as_millis()
        )
    }

    /// The consistent-hash exchange of earlier versions (removed at start).
    pub(crate) fn legacy_partition_exchange(&self) -> String {
        format!("{}.partitions", self.name)
    }

    /// The dead-letter queue.
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead-letters", self.name)
    }
}

/// The queue of partition `index` of consumer `name` with `partitions`
/// queues: `<name>` when there is one, `<name>.<index>` otherwise.
pub(crate) fn queue_name(name: &str, partitions: u16, index: u16) -> String {
    if partitions == 1 {
        name.to_owned()
    } else {
        format!("{name}.{index}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ConsumerConfig {
        ConsumerConfig::new("billing", "postgres://u:secret@db/x", "amqp://g:pw@mq")
    }

    #[test]
    fn defaults_are_valid_and_names_follow_the_consumer() {
        let mut c = config();
        c.validate().unwrap();
        assert_eq!(c.queue(0), "billing");
        c.partitions = 4;
        assert_eq!(c.queue(3), "billing.3");
        assert_eq!(c.slots_exchange(), "billing.slots");
        assert_eq!(c.dead_letter_queue(), "billing.dead-letters");
    }

    #[test]
    fn an_amqps_url_is_taken_only_by_a_build_that_speaks_tls() {
        let mut c = config();
        c.amqp_url = "amqps://g:pw@mq/%2f".into();
        let result = c.validate();
        if cfg!(feature = "tls") {
            result.unwrap();
        } else {
            // Never a plain connection in its place.
            let e = result.unwrap_err().to_string();
            assert!(e.contains("amqp_url") && e.contains("`tls` feature"), "{e}");
            assert!(!e.contains("pw"), "{e}");
        }
    }

    #[test]
    fn bad_fields_are_named_and_secrets_kept_out() {
        let mut c = config();
        c.name = "bill ing".into();
        assert!(c.validate().unwrap_err().to_string().contains("name"));
        let mut c = config();
        c.amqp_url = "http://g:pw@mq".into();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("amqp_url") && !e.contains("pw"), "{e}");
        let mut c = config();
        c.lanes = 0;
        assert!(c.validate().unwrap_err().to_string().contains("lanes"));
        for taken in [
            "x.dead-letters",
            "billing.slots",
            "billing.3",
            "a.unslotted",
        ] {
            let mut c = config();
            c.name = taken.into();
            assert!(
                c.validate().unwrap_err().to_string().contains("name"),
                "{taken}"
            );
        }
        let mut c = config();
        c.name = "billing.v2".into();
        c.validate().unwrap();
        let debug = format!("{:?}", config());
        assert!(
            !debug.contains("secret") && !debug.contains("pw"),
            "{debug}"
        );
    }
}
