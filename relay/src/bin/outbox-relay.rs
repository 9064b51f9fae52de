//! The `outbox-relay` sidecar (being built).
fn main() {}
