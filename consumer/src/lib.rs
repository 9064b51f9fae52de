//! The idempotent consumer: handlers that dedupe by message id in their own
//! transaction and keep per-key order (issue 4). Not built yet; this crate
//! holds its place in the workspace.
