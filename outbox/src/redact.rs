//! Keeping secrets out of logs and errors.

/// The URL with any password replaced by `***`, for logs and errors: the
/// user-info part (up to the last `@`, so a password with `/` or `@` in it is
/// still hidden) and `password`/`sslpassword` query parameters.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<url without a scheme>".to_owned();
    };
    let rest = match rest.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => rest.to_owned(),
    };
    let Some((base, query)) = rest.split_once('?') else {
        return format!("{scheme}://{rest}");
    };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _))
                if name.eq_ignore_ascii_case("password")
                    || name.eq_ignore_ascii_case("sslpassword") =>
            {
                format!("{name}=***")
            }
            _ => pair.to_owned(),
        })
        .collect();
    format!("{scheme}://{base}?{}", query.join("&"))
}

/// `text` (a driver's error, say) with every trace of `url`'s password
/// replaced by `***`: as written in the URL, percent-decoded, and each run
/// of 4 or more of its characters (a parser that stops at a bad escape
/// echoes the rest of the password). For errors about a URL, which a
/// driver may quote. A malformed URL without `://` (`postgres:/u:pw@h`, a
/// typo libpq echoes whole) is hidden where it is quoted whole, and its
/// password is still found after the first `:`.
pub fn redact_secrets(url: &str, text: &str) -> String {
    let mut secrets: Vec<String> = Vec::new();
    let rest = match url.split_once("://") {
        Some((_, rest)) => rest,
        None => url.split_once(':').map_or(url, |(_, rest)| rest),
    };
    if let Some((userinfo, _)) = rest.rsplit_once('@')
        && let Some((_, password)) = userinfo.split_once(':')
    {
        secrets.push(password.to_owned());
        secrets.push(percent_decoded(password));
    }
    if let Some((_, query)) = url.split_once('?') {
        for pair in query.split('&') {
            if let Some((name, value)) = pair.split_once('=')
                && (name.eq_ignore_ascii_case("password")
                    || name.eq_ignore_ascii_case("sslpassword"))
            {
                secrets.push(value.to_owned());
                secrets.push(percent_decoded(value));
            }
        }
    }
    let mut out = text.to_owned();
    if !url.contains("://") && !url.is_empty() {
        out = out.replace(url, &redact_url(url));
    }
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        out = out.replace(secret.as_str(), "***");
        // Any piece of it long enough to matter (a parser that stopped at a
        // bad escape quotes from there on).
        let chars: Vec<char> = secret.chars().collect();
        for len in (4..chars.len()).rev() {
            for start in 0..=chars.len() - len {
                let piece: String = chars[start..start + len].iter().collect();
                if out.contains(&piece) {
                    out = out.replace(&piece, "***");
                }
            }
        }
    }
    out
}

/// `text` with `%XX` escapes decoded (bad ones kept as they are).
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied(),
            bytes.get(i + 2).copied(),
        ) {
            (b'%', Some(h), Some(l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, ..) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_is_hidden_in_any_form_a_driver_may_quote_it() {
        let url = "postgres://app:s3cr%zzet%20pa'ss@db/x";
        for quoted in [
            "invalid percent-encoded token: \"s3cr%zzet%20pa'ss\"",
            "invalid percent-encoded token: \"%zzet%20pa'ss\"",
            "password authentication failed for s3cr%zzet pa'ss",
        ] {
            let redacted = redact_secrets(url, quoted);
            assert!(
                !redacted.contains("s3cr")
                    && !redacted.contains("zzet")
                    && !redacted.contains("pa'ss"),
                "{redacted}"
            );
        }
        assert_eq!(redact_secrets("postgres://db/x", "nothing"), "nothing");
        // A typo libpq takes for a key=value string and echoes whole.
        for typo in ["postgres:/app:hunter22@db/x", "postgres:app:hunter22@db/x"] {
            let echoed = format!("missing \"=\" after \"{typo}\" in connection info string");
            let redacted = redact_secrets(typo, &echoed);
            assert!(!redacted.contains("hunter"), "{redacted}");
            assert!(!redact_secrets(typo, "bad: hunter22 xx").contains("hunter"));
        }
        let q = "postgres://db/x?password=hunter22";
        assert!(!redact_secrets(q, "bad: hunter22").contains("hunter"));
    }

    proptest::proptest! {
        /// Whatever the password (escapes good or bad, quotes, spaces) and
        /// however a driver quotes it, it is gone from the text.
        #[test]
        fn a_password_never_survives_redaction(
            password in "[A-Za-z0-9%'\" ]{1,24}",
            before in "[^*]{0,30}",
            after in "[^*]{0,30}",
        ) {
            let url = format!("postgres://user:{password}@db:5432/app");
            let text = format!("{before}{password}{after} ({url})");
            let out = redact_secrets(&url, &text);
            proptest::prop_assert!(!out.contains(&password), "{}", out);
            proptest::prop_assert_eq!(redact_url(&url), "postgres://user:***@db:5432/app");
        }
    }
}
