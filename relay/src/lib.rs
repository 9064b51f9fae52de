//! The relay: ships outbox rows to RabbitMQ with publisher confirms, retries
//! with backoff and per-key order (issue 3). Not built yet; this crate holds
//! its place in the workspace.
