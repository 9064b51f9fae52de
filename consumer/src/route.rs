//! Which handler a delivery goes to: topic patterns, as RabbitMQ matches
//! them, over the exchange and routing key it was published with.

/// Whether AMQP topic `pattern` matches `routing_key`: words are separated
/// by `.`, `*` stands for exactly one word and `#` for zero or more.
pub fn topic_matches(pattern: &str, routing_key: &str) -> bool {
    let pattern: Vec<&str> = pattern.split('.').collect();
    let key: Vec<&str> = routing_key.split('.').collect();
    matches_words(&pattern, &key)
}

fn matches_words(pattern: &[&str], key: &[&str]) -> bool {
    match pattern.split_first() {
        None => key.is_empty(),
        Some((&"#", rest)) => (0..=key.len()).any(|skip| matches_words(rest, &key[skip..])),
        Some((word, rest)) => match key.split_first() {
            Some((k, key_rest)) => (*word == "*" || word == k) && matches_words(rest, key_rest),
            None => false,
        },
    }
}

/// Checks a binding pattern: 1-255 bytes, no empty words.
pub(crate) fn validate_pattern(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() || pattern.len() > 255 {
        return Err(format!(
            "routing pattern {pattern:?} must be 1 to 255 bytes"
        ));
    }
    if pattern.split('.').any(str::is_empty) {
        return Err(format!(
            "routing pattern {pattern:?} has an empty word (two dots, or a dot at an end)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn star_is_one_word_and_hash_is_any_number() {
        assert!(topic_matches("order.*.submitted", "order.v1.submitted"));
        assert!(topic_matches("order.*.submitted", "order.v2.submitted"));
        assert!(!topic_matches("order.*.submitted", "order.submitted"));
        assert!(!topic_matches("order.*.submitted", "order.v1.cancelled"));
        assert!(topic_matches("order.#", "order"));
        assert!(topic_matches("order.#", "order.v1.submitted"));
        assert!(topic_matches("#", "anything.at.all"));
        assert!(topic_matches("#.submitted", "order.v1.submitted"));
        assert!(!topic_matches("#.submitted", "order.v1.cancelled"));
        assert!(topic_matches("order.v1.submitted", "order.v1.submitted"));
        assert!(!topic_matches("order.v1", "order.v1.submitted"));
    }

    #[test]
    fn bad_patterns_are_named() {
        assert!(
            validate_pattern("order..x")
                .unwrap_err()
                .contains("empty word")
        );
        assert!(validate_pattern("").is_err());
        assert!(validate_pattern("order.*.submitted").is_ok());
    }
}
