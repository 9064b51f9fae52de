//! Relay benchmark (being written).
fn main() {}
