//! Where a message stands in its key's sequence: the pure decision behind
//! per-key ordering.
//!
//! The message id decides "duplicate" (the inbox row does that); the key
//! sequence decides "in order". `key_seq` counts every event of a key across
//! all routing keys, so a consumer bound to only some event types sees gaps
//! that are not missing messages: whether a gap is worth waiting for is the
//! caller's policy.

/// Position of an incoming `key_seq` against the last one applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// The very next one (`last + 1`).
    Next,
    /// Later than the next: `missing` sequence numbers between were not
    /// applied here (not yet arrived, or events this consumer does not bind).
    Ahead {
        /// How many numbers lie between the last applied and this one.
        missing: i64,
    },
    /// At or before the last applied, yet its id was never applied: a late
    /// message, not a duplicate. Never dropped silently.
    Behind {
        /// The last applied sequence number of the key.
        last: i64,
    },
}

/// Where `incoming` stands after `last` (0 when the key is new).
pub fn position(last: i64, incoming: i64) -> Position {
    if incoming == last + 1 {
        Position::Next
    } else if incoming > last {
        Position::Ahead {
            missing: incoming - last - 1,
        }
    } else {
        Position::Behind { last }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_ahead_and_behind() {
        assert_eq!(position(0, 1), Position::Next);
        assert_eq!(position(4, 5), Position::Next);
        assert_eq!(position(4, 7), Position::Ahead { missing: 2 });
        assert_eq!(position(0, 3), Position::Ahead { missing: 2 });
        assert_eq!(position(4, 4), Position::Behind { last: 4 });
        assert_eq!(position(4, 1), Position::Behind { last: 4 });
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
                while let Some(i) = held
                    .iter()
                    .position(|s| position(last, *s) == Position::Next)
                {
                    last = held.remove(i);
                    applied.push(last);
                }
            }
            assert_eq!(applied, (1..=6).collect::<Vec<_>>());
        }
    }
}
