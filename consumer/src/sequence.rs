//! Where a message stands in its key's sequence: the pure decision behind
//! per-key ordering.
//!
//! The message id decides "duplicate" (the inbox row does that); the key
//! sequence decides "in order". `key_seq` counts every event of a key across
//! all routing keys, so a consumer bound to only some of them must not wait
//! for the numbers in between: each message says which earlier event it
//! follows for this consumer (`after`, from its `x-key-prev` header and the
//! consumer's bindings), and that is what the key's position must have
//! reached.

/// Position of an incoming `key_seq` against the last one applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// The very next one (`last + 1`).
    Next,
    /// An event this consumer receives comes between the key's position
    /// and this one, and has not been applied yet.
    Ahead {
        /// The position the key must reach first.
        after: i64,
    },
    /// At or before the last applied, yet its id was never applied: a late
    /// message, not a duplicate. Never dropped silently.
    Behind {
        /// The last applied sequence number of the key.
        last: i64,
    },
}

/// Where message `seq`, which must follow `after` (its predecessor for
/// this consumer; `seq - 1` for a consumer of every event of the key),
/// stands when the key's position is `last` (0 when the key is new).
///
/// `after < last < seq` is next too: the key moved past events this message
/// does not need (a replay, or a gap given up on).
pub fn position(last: i64, seq: i64, after: i64) -> Position {
    if seq <= last {
        Position::Behind { last }
    } else if after <= last {
        Position::Next
    } else {
        Position::Ahead { after }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A consumer of every event of the key: each follows the one before.
    fn full(last: i64, seq: i64) -> Position {
        position(last, seq, seq - 1)
    }

    #[test]
    fn next_ahead_and_behind() {
        assert_eq!(full(0, 1), Position::Next);
        assert_eq!(full(4, 5), Position::Next);
        assert_eq!(full(4, 7), Position::Ahead { after: 6 });
        assert_eq!(full(0, 3), Position::Ahead { after: 2 });
        assert_eq!(full(4, 4), Position::Behind { last: 4 });
        assert_eq!(full(4, 1), Position::Behind { last: 4 });
    }

    #[test]
    fn a_partial_subscriber_skips_what_it_does_not_bind_and_waits_for_what_it_does() {
        // Events 1..=5 of a key; this consumer binds 1, 3 and 5. Event 5
        // follows 3, event 3 follows 1.
        assert_eq!(position(1, 3, 1), Position::Next, "2 is not ours");
        assert_eq!(position(1, 5, 3), Position::Ahead { after: 3 });
        assert_eq!(position(3, 5, 3), Position::Next);
        // The key moved past 4 (a gap given up on): 5 still runs.
        assert_eq!(position(4, 5, 3), Position::Next);
        assert_eq!(position(5, 5, 3), Position::Behind { last: 5 });
    }

    #[test]
    fn applying_every_next_in_any_arrival_order_ends_at_the_maximum() {
        // Deliveries arrive shuffled; a message is applied when it is Next,
        // otherwise held and retried after each application. Every order of
        // 1..=6 ends with all applied, in sequence.
        let mut orders = vec![vec![1, 2, 3, 4, 5, 6]];
        for seed in 1..200u64 {
            let mut order: Vec<i64> = (1..=6).collect();
            let mut x = seed;
            for i in (1..order.len()).rev() {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                order.swap(i, (x >> 33) as usize % (i + 1));
            }
            orders.push(order);
        }
        for order in orders {
            let (mut last, mut held, mut applied) = (0, Vec::new(), Vec::new());
            for seq in order {
                held.push(seq);
                while let Some(i) = held.iter().position(|s| full(last, *s) == Position::Next) {
                    last = held.remove(i);
                    applied.push(last);
                }
            }
            assert_eq!(applied, (1..=6).collect::<Vec<_>>());
        }
    }
}
