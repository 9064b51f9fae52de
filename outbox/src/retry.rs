//! The retry policy shared by the relay (failed publishes, reconnects) and
//! the consumer (handler retries, reconnects): our own type, so the crate
//! behind it (`backon`) stays an implementation detail.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// The longest wait between reconnect attempts, before jitter (which adds
/// up to as much again).
pub const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(2);

/// Exponential backoff with optional jitter, for failed publishes or
/// handlers and for reconnecting to the database or broker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Delay before the first retry. Defaults to 1 s.
    pub initial: Duration,
    /// Factor applied to the delay after each attempt. Defaults to 2.
    pub multiplier: f32,
    /// Longest delay between attempts. Defaults to 5 min.
    pub max_delay: Duration,
    /// Attempts before giving up (the first attempt counts): the relay parks
    /// the row, the consumer dead-letters the message. Defaults to 10.
    pub max_attempts: u32,
    /// Whether to add up to one extra delay of random jitter, so many rows
    /// (or relays) failing together do not retry in lock step. Defaults to true.
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_secs(1),
            multiplier: 2.0,
            max_delay: Duration::from_secs(300),
            max_attempts: 10,
            jitter: true,
        }
    }
}

impl RetryPolicy {
    /// The delay before retry number `attempt` (1 for the first retry).
    pub fn delay(&self, attempt: u32) -> Duration {
        let n = attempt.max(1) as usize;
        self.builder()
            .without_max_times()
            .build()
            .nth(n - 1)
            .unwrap_or(self.max_delay)
    }

    /// Whether something that has now failed `attempts` times is given up on.
    pub fn exhausted(&self, attempts: u32) -> bool {
        attempts >= self.max_attempts
    }

    /// Delays for reconnecting: the same curve, never giving up, and never
    /// longer than [`RECONNECT_MAX_DELAY`] (plus jitter): a server that
    /// comes back is found within seconds, and a connection attempt is
    /// cheap.
    pub fn reconnect_delays(&self) -> impl Iterator<Item = Duration> + use<> {
        self.builder()
            .with_max_delay(self.max_delay.min(RECONNECT_MAX_DELAY).max(self.initial))
            .without_max_times()
            .build()
    }

    fn builder(&self) -> ExponentialBuilder {
        let builder = ExponentialBuilder::default()
            .with_min_delay(self.initial)
            .with_factor(self.multiplier)
            .with_max_delay(self.max_delay);
        if self.jitter {
            builder.with_jitter()
        } else {
            builder
        }
    }

    /// Checks every field.
    ///
    /// # Errors
    ///
    /// A message naming the field that is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.initial.is_zero() {
            return Err("retry initial delay must be above 0".into());
        }
        if !(self.multiplier >= 1.0 && self.multiplier.is_finite()) {
            return Err(format!(
                "retry multiplier must be at least 1, got {}",
                self.multiplier
            ));
        }
        if self.max_delay < self.initial {
            return Err("retry max delay must be at least the initial delay".into());
        }
        if self.max_attempts == 0 {
            return Err("retry max attempts must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_jitter() -> RetryPolicy {
        RetryPolicy {
            jitter: false,
            ..RetryPolicy::default()
        }
    }

    #[test]
    fn delays_grow_exponentially_up_to_the_cap() {
        let p = no_jitter();
        assert_eq!(p.delay(1), Duration::from_secs(1));
        assert_eq!(p.delay(2), Duration::from_secs(2));
        assert_eq!(p.delay(3), Duration::from_secs(4));
        assert_eq!(p.delay(20), Duration::from_secs(300));
    }

    #[test]
    fn jitter_stays_within_one_extra_delay() {
        let p = RetryPolicy::default();
        for _ in 0..50 {
            let d = p.delay(3);
            assert!(
                d >= Duration::from_secs(4) && d <= Duration::from_secs(8),
                "{d:?}"
            );
        }
    }

    #[test]
    fn reconnects_are_tried_at_least_every_few_seconds() {
        let p = no_jitter();
        let delays: Vec<Duration> = p.reconnect_delays().take(12).collect();
        assert_eq!(delays[0], Duration::from_secs(1));
        assert!(
            delays.iter().all(|d| *d <= RECONNECT_MAX_DELAY),
            "{delays:?}"
        );
        assert_eq!(delays[11], RECONNECT_MAX_DELAY);
    }

    #[test]
    fn parks_at_the_maximum() {
        let p = no_jitter();
        assert!(!p.exhausted(9));
        assert!(p.exhausted(10));
    }

    #[test]
    fn bad_fields_are_named() {
        let bad = RetryPolicy {
            multiplier: 0.5,
            ..RetryPolicy::default()
        };
        assert!(bad.validate().unwrap_err().contains("multiplier"));
        let bad = RetryPolicy {
            max_attempts: 0,
            ..RetryPolicy::default()
        };
        assert!(bad.validate().unwrap_err().contains("max attempts"));
    }
}
