//! Counters of what a consumer did, for reports, tests and dashboards.

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters, shared by a consumer's lanes.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) received: AtomicU64,
    pub(crate) applied: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) held: AtomicU64,
    pub(crate) late: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) discarded: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) ignored: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Stats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            received: get(&self.received),
            applied: get(&self.applied),
            duplicates: get(&self.duplicates),
            held: get(&self.held),
            late: get(&self.late),
            retried: get(&self.retried),
            discarded: get(&self.discarded),
            dead_lettered: get(&self.dead_lettered),
            ignored: get(&self.ignored),
        }
    }
}

/// What a consumer has done since it was built (this process only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Deliveries taken from the broker (redeliveries included).
    pub received: u64,
    /// Handlers that ran and committed.
    pub applied: u64,
    /// Deliveries of messages already applied: acked without a handler.
    pub duplicates: u64,
    /// Times a delivery ahead of its key was held back for the missing ones.
    pub held: u64,
    /// Late messages (behind their key's position, never applied).
    pub late: u64,
    /// Handler runs that asked to retry (or hit a database error).
    pub retried: u64,
    /// Messages the handler discarded.
    pub discarded: u64,
    /// Messages sent to the dead-letter queue.
    pub dead_lettered: u64,
    /// Unknown messages acked under the ignore policy.
    pub ignored: u64,
}
