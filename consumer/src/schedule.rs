//! Which delivery runs next: one at a time per key, lowest sequence first,
//! keys side by side. Pure bookkeeping (no I/O), so it is tested alone.
//!
//! A key is runnable when nothing of it is running and it is not waiting
//! out a retry delay. A delivery ahead of its key is not kept here: the
//! inbox keeps it in the database ([`crate::held`]). Unordered deliveries
//! get a key of their own.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

/// What the scheduler needs to know about a delivery.
pub(crate) trait Sequenced {
    /// The key deliveries are serialised by (the ordering key, or a key of
    /// the delivery's own when it has none).
    fn schedule_key(&self) -> &str;
    /// Its position within the key (0 when unordered).
    fn seq(&self) -> i64;
}

/// How a delivery's run ended.
#[derive(Debug)]
pub(crate) enum Finish<T> {
    /// Settled (applied, duplicate, discarded, dead-lettered, held in the
    /// database): done with here.
    Done,
    /// Run it again at the given time; the key waits, others go on.
    RetryAt(T, Instant),
}

#[derive(Debug)]
struct KeyState<T> {
    /// Sorted by sequence; equal sequences (duplicates) keep arrival order.
    pending: VecDeque<T>,
    busy: bool,
    queued: bool,
    retry_at: Option<Instant>,
}

impl<T> Default for KeyState<T> {
    fn default() -> Self {
        KeyState {
            pending: VecDeque::new(),
            busy: false,
            queued: false,
            retry_at: None,
        }
    }
}

/// The per-key queues of one consumer session.
#[derive(Debug)]
pub(crate) struct Scheduler<T> {
    keys: HashMap<String, KeyState<T>>,
    ready: VecDeque<String>,
    pending: usize,
}

impl<T: Sequenced> Scheduler<T> {
    /// An empty scheduler.
    pub(crate) fn new() -> Self {
        Scheduler {
            keys: HashMap::new(),
            ready: VecDeque::new(),
            pending: 0,
        }
    }

    /// Deliveries waiting (not running).
    pub(crate) fn pending(&self) -> usize {
        self.pending
    }

    /// Takes a new delivery.
    pub(crate) fn push(&mut self, item: T, now: Instant) {
        let key = item.schedule_key().to_owned();
        let state = self.keys.entry(key.clone()).or_default();
        let at = state.pending.partition_point(|p| p.seq() <= item.seq());
        state.pending.insert(at, item);
        self.pending += 1;
        self.enqueue_if_runnable(&key, now);
    }

    /// The next delivery to run, if any key is runnable; its key is busy
    /// until [`Scheduler::finish`].
    pub(crate) fn next(&mut self, now: Instant) -> Option<T> {
        while let Some(key) = self.ready.pop_front() {
            let Some(state) = self.keys.get_mut(&key) else {
                continue;
            };
            state.queued = false;
            if !Self::runnable(state, now) {
                continue;
            }
            let item = state.pending.pop_front()?;
            self.pending -= 1;
            state.busy = true;
            return Some(item);
        }
        None
    }

    /// Records how the run of a delivery of `key` ended. Returns when the
    /// key wants a [`Scheduler::wake`] (end of a retry delay).
    pub(crate) fn finish(&mut self, key: &str, finish: Finish<T>, now: Instant) -> Option<Instant> {
        let state = self.keys.get_mut(key)?;
        state.busy = false;
        let wake = match finish {
            Finish::Done => None,
            Finish::RetryAt(item, at) => {
                state.pending.push_front(item);
                self.pending += 1;
                state.retry_at = Some(at);
                Some(at)
            }
        };
        if state.pending.is_empty() {
            self.keys.remove(key);
        } else {
            self.enqueue_if_runnable(key, now);
        }
        wake
    }

    /// A timer for `key` went off: it may be runnable again.
    pub(crate) fn wake(&mut self, key: &str, now: Instant) {
        self.enqueue_if_runnable(key, now);
    }

    /// Removes every waiting delivery (the session ends; the broker
    /// redelivers them), returning them.
    pub(crate) fn drain(&mut self) -> Vec<T> {
        self.ready.clear();
        self.pending = 0;
        let mut out = Vec::new();
        for state in self.keys.values_mut() {
            out.extend(state.pending.drain(..));
        }
        self.keys.retain(|_, s| s.busy);
        out
    }

    fn runnable(state: &KeyState<T>, now: Instant) -> bool {
        !state.pending.is_empty() && !state.busy && state.retry_at.is_none_or(|at| now >= at)
    }

    fn enqueue_if_runnable(&mut self, key: &str, now: Instant) {
        let Some(state) = self.keys.get_mut(key) else {
            return;
        };
        if state.retry_at.is_some_and(|at| now >= at) {
            state.retry_at = None;
        }
        if !state.queued && Self::runnable(state, now) {
            state.queued = true;
            self.ready.push_back(key.to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    struct D(&'static str, i64);

    impl Sequenced for D {
        fn schedule_key(&self) -> &str {
            self.0
        }
        fn seq(&self) -> i64 {
            self.1
        }
    }

    #[test]
    fn one_at_a_time_per_key_and_keys_side_by_side() {
        let now = Instant::now();
        let mut s = Scheduler::new();
        s.push(D("a", 1), now);
        s.push(D("a", 2), now);
        s.push(D("b", 1), now);
        assert_eq!(s.next(now).unwrap(), D("a", 1));
        assert_eq!(s.next(now).unwrap(), D("b", 1));
        assert!(s.next(now).is_none(), "a is busy");
        s.finish("a", Finish::Done, now);
        assert_eq!(s.next(now).unwrap(), D("a", 2));
    }

    #[test]
    fn the_lowest_sequence_goes_first_whatever_the_arrival_order() {
        let now = Instant::now();
        let mut s = Scheduler::new();
        s.push(D("a", 3), now);
        s.push(D("a", 1), now);
        s.push(D("a", 2), now);
        let mut order = Vec::new();
        while let Some(d) = s.next(now) {
            order.push(d.1);
            s.finish("a", Finish::Done, now);
        }
        assert_eq!(order, [1, 2, 3]);
        assert_eq!(s.pending(), 0);
    }

    #[test]
    fn a_retry_delays_only_its_key() {
        let now = Instant::now();
        let later = now + Duration::from_millis(200);
        let mut s = Scheduler::new();
        s.push(D("a", 1), now);
        s.push(D("a", 2), now);
        s.push(D("b", 1), now);
        let a1 = s.next(now).unwrap();
        assert_eq!(s.finish("a", Finish::RetryAt(a1, later), now), Some(later));
        assert_eq!(s.next(now).unwrap(), D("b", 1));
        assert!(s.next(now).is_none(), "a waits out its delay");
        s.wake("a", later);
        assert_eq!(s.next(later).unwrap(), D("a", 1), "the same one, again");
    }

    #[test]
    fn drain_hands_back_everything_waiting() {
        let now = Instant::now();
        let mut s = Scheduler::new();
        s.push(D("a", 1), now);
        s.push(D("a", 2), now);
        s.push(D("b", 1), now);
        let running = s.next(now).unwrap();
        let mut drained = s.drain();
        drained.sort_by_key(|d| (d.0, d.1));
        assert_eq!(drained, [D("a", 2), D("b", 1)]);
        assert_ne!(running, D("a", 2));
        assert_eq!(s.pending(), 0);
    }
}
