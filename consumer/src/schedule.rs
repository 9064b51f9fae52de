//! Which delivery runs next: one at a time per key, lowest sequence first,
//! keys side by side. Pure bookkeeping (no I/O), so it is tested alone.
//!
//! A key is runnable when nothing of it is running, it is not waiting out a
//! retry delay, and its lowest pending delivery is not one the inbox held
//! back (ahead of the key) and is still waiting for. A held delivery is
//! tried again when anything else of its key settles, and, once the gap
//! wait is over, offered with [`Mode::GapExpired`] so the consumer's
//! after-gap policy applies. Unordered deliveries get a key of their own.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// What the scheduler needs to know about a delivery.
pub(crate) trait Sequenced {
    /// The key deliveries are serialised by (the ordering key, or a key of
    /// the delivery's own when it has none).
    fn schedule_key(&self) -> &str;
    /// Its position within the key (0 when unordered).
    fn seq(&self) -> i64;
}

/// How a delivery is offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Normally: a delivery ahead of its key is held back.
    InOrder,
    /// Its gap wait is over: the after-gap policy applies.
    GapExpired,
}

/// How a delivery's run ended.
#[derive(Debug)]
pub(crate) enum Finish<T> {
    /// Settled (applied, duplicate, discarded, dead-lettered): acked.
    Done,
    /// Ahead of its key: keep it and wait for the missing ones.
    Held(T),
    /// Run it again at the given time; the key waits, others go on.
    RetryAt(T, Instant),
}

#[derive(Debug)]
struct Held {
    seq: i64,
    since: Instant,
    /// Something of the key settled since it was held: worth a new try.
    armed: bool,
}

#[derive(Debug)]
struct KeyState<T> {
    /// Sorted by sequence; equal sequences (duplicates) keep arrival order.
    pending: VecDeque<T>,
    busy: bool,
    queued: bool,
    retry_at: Option<Instant>,
    held: Option<Held>,
}

impl<T> Default for KeyState<T> {
    fn default() -> Self {
        KeyState {
            pending: VecDeque::new(),
            busy: false,
            queued: false,
            retry_at: None,
            held: None,
        }
    }
}

/// The per-key queues of one consumer session.
#[derive(Debug)]
pub(crate) struct Scheduler<T> {
    keys: HashMap<String, KeyState<T>>,
    ready: VecDeque<String>,
    gap_wait: Duration,
    pending: usize,
}

impl<T: Sequenced> Scheduler<T> {
    /// A scheduler whose held deliveries wait at most `gap_wait`.
    pub(crate) fn new(gap_wait: Duration) -> Self {
        Scheduler {
            keys: HashMap::new(),
            ready: VecDeque::new(),
            gap_wait,
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
    pub(crate) fn next(&mut self, now: Instant) -> Option<(T, Mode)> {
        while let Some(key) = self.ready.pop_front() {
            let Some(state) = self.keys.get_mut(&key) else {
                continue;
            };
            state.queued = false;
            if !Self::runnable(state, self.gap_wait, now) {
                continue;
            }
            let item = state.pending.pop_front()?;
            self.pending -= 1;
            state.busy = true;
            let expired = self.gap_wait.is_zero()
                || state
                    .held
                    .as_ref()
                    .is_some_and(|h| h.seq == item.seq() && now >= h.since + self.gap_wait);
            let mode = if expired {
                Mode::GapExpired
            } else {
                Mode::InOrder
            };
            return Some((item, mode));
        }
        None
    }

    /// Records how the run of a delivery of `key` ended. Returns when the
    /// key wants a [`Scheduler::wake`] (end of a retry delay or gap wait).
    pub(crate) fn finish(&mut self, key: &str, finish: Finish<T>, now: Instant) -> Option<Instant> {
        let state = self.keys.get_mut(key)?;
        state.busy = false;
        let wake = match finish {
            Finish::Done => {
                if let Some(held) = &mut state.held {
                    held.armed = true;
                }
                None
            }
            Finish::Held(item) => {
                let since = match &state.held {
                    Some(h) if h.seq == item.seq() => h.since,
                    _ => now,
                };
                state.held = Some(Held {
                    seq: item.seq(),
                    since,
                    armed: false,
                });
                state.pending.push_front(item);
                self.pending += 1;
                Some(since + self.gap_wait)
            }
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

    fn runnable(state: &KeyState<T>, gap_wait: Duration, now: Instant) -> bool {
        let Some(first) = state.pending.front() else {
            return false;
        };
        if state.busy || state.retry_at.is_some_and(|at| now < at) {
            return false;
        }
        match &state.held {
            Some(h) if h.seq == first.seq() => h.armed || now >= h.since + gap_wait,
            _ => true,
        }
    }

    fn enqueue_if_runnable(&mut self, key: &str, now: Instant) {
        let Some(state) = self.keys.get_mut(key) else {
            return;
        };
        if state.retry_at.is_some_and(|at| now >= at) {
            state.retry_at = None;
        }
        if !state.queued && Self::runnable(state, self.gap_wait, now) {
            state.queued = true;
            self.ready.push_back(key.to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
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

    const GAP: Duration = Duration::from_secs(5);

    #[test]
    fn one_at_a_time_per_key_and_keys_side_by_side() {
        let now = Instant::now();
        let mut s = Scheduler::new(GAP);
        s.push(D("a", 1), now);
        s.push(D("a", 2), now);
        s.push(D("b", 1), now);
        assert_eq!(s.next(now).unwrap().0, D("a", 1));
        assert_eq!(s.next(now).unwrap().0, D("b", 1));
        assert!(s.next(now).is_none(), "a is busy");
        s.finish("a", Finish::Done, now);
        assert_eq!(s.next(now).unwrap().0, D("a", 2));
    }

    #[test]
    fn the_lowest_sequence_goes_first_whatever_the_arrival_order() {
        let now = Instant::now();
        let mut s = Scheduler::new(GAP);
        s.push(D("a", 3), now);
        s.push(D("a", 1), now);
        s.push(D("a", 2), now);
        let mut order = Vec::new();
        while let Some((d, _)) = s.next(now) {
            order.push(d.1);
            s.finish("a", Finish::Done, now);
        }
        assert_eq!(order, [1, 2, 3]);
        assert_eq!(s.pending(), 0);
    }

    #[test]
    fn a_held_delivery_waits_for_the_missing_one_then_runs_after_it() {
        let now = Instant::now();
        let mut s = Scheduler::new(GAP);
        s.push(D("a", 2), now);
        let (d, mode) = s.next(now).unwrap();
        assert_eq!(mode, Mode::InOrder);
        let wake = s.finish("a", Finish::Held(d), now);
        assert_eq!(wake, Some(now + GAP));
        assert!(s.next(now).is_none(), "held: not offered again yet");
        s.push(D("a", 1), now);
        assert_eq!(s.next(now).unwrap().0, D("a", 1));
        s.finish("a", Finish::Done, now);
        let (d, mode) = s.next(now).unwrap();
        assert_eq!((d, mode), (D("a", 2), Mode::InOrder));
    }

    #[test]
    fn a_held_delivery_is_offered_as_expired_after_the_gap_wait() {
        let now = Instant::now();
        let mut s = Scheduler::new(GAP);
        s.push(D("a", 5), now);
        let (d, _) = s.next(now).unwrap();
        s.finish("a", Finish::Held(d), now);
        s.wake("a", now + GAP / 2);
        assert!(s.next(now + GAP / 2).is_none());
        // A second try that is held again keeps the first hold's clock.
        s.wake("a", now + GAP);
        let (d, mode) = s.next(now + GAP).unwrap();
        assert_eq!(mode, Mode::GapExpired);
        assert_eq!(s.finish("a", Finish::Held(d), now + GAP), Some(now + GAP));
    }

    #[test]
    fn a_retry_delays_only_its_key() {
        let now = Instant::now();
        let later = now + Duration::from_millis(200);
        let mut s = Scheduler::new(GAP);
        s.push(D("a", 1), now);
        s.push(D("a", 2), now);
        s.push(D("b", 1), now);
        let (a1, _) = s.next(now).unwrap();
        assert_eq!(s.finish("a", Finish::RetryAt(a1, later), now), Some(later));
        assert_eq!(s.next(now).unwrap().0, D("b", 1));
        assert!(s.next(now).is_none(), "a waits out its delay");
        s.wake("a", later);
        assert_eq!(s.next(later).unwrap().0, D("a", 1), "the same one, again");
    }

    #[test]
    fn zero_gap_wait_never_holds() {
        let now = Instant::now();
        let mut s = Scheduler::new(Duration::ZERO);
        s.push(D("a", 9), now);
        assert_eq!(s.next(now).unwrap().1, Mode::GapExpired);
    }

    #[test]
    fn drain_hands_back_everything_waiting() {
        let now = Instant::now();
        let mut s = Scheduler::new(GAP);
        s.push(D("a", 1), now);
        s.push(D("a", 2), now);
        s.push(D("b", 1), now);
        let running = s.next(now).unwrap().0;
        let mut drained = s.drain();
        drained.sort_by_key(|d| (d.0, d.1));
        assert_eq!(drained, [D("a", 2), D("b", 1)]);
        assert_ne!(running, D("a", 2));
        assert_eq!(s.pending(), 0);
    }
}
