//! Names of the relay's metrics (recorded through the `metrics` facade; the
//! binary exports them for Prometheus at `/metrics`).

/// Counter: rows confirmed by the broker.
pub const PUBLISHED: &str = "outbox_relay_published_total";
/// Counter: failed publish attempts that will be retried.
pub const RETRIED: &str = "outbox_relay_retried_total";
/// Counter: rows parked after their last attempt.
pub const PARKED: &str = "outbox_relay_parked_total";
/// Counter: workers that ended unexpectedly (a panic) and were restarted.
pub const WORKER_RESTARTS: &str = "outbox_relay_worker_restarts_total";
/// Histogram: seconds from publish to broker confirm, per row.
pub const CONFIRM_LATENCY: &str = "outbox_relay_confirm_latency_seconds";
/// Histogram: seconds from the enqueueing transaction to broker confirm.
pub const COMMIT_TO_CONFIRM: &str = "outbox_relay_commit_to_confirm_seconds";
/// Gauge: pending rows (not published, not parked).
pub const BACKLOG: &str = "outbox_relay_backlog";
/// Gauge: pending rows waiting for a retry.
pub const RETRYING: &str = "outbox_relay_retrying";
/// Gauge: parked rows.
pub const PARKED_ROWS: &str = "outbox_relay_parked";
/// Gauge: age in seconds of the oldest pending row.
pub const OLDEST_PENDING_AGE: &str = "outbox_relay_oldest_pending_age_seconds";

/// Buckets for the latency histograms, in seconds: 0.5 ms to 60 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
