//! Lengths of time as a person reads them (`1h 59m`, `3m 10s ago`), for
//! every message that says when something happened: the CLI's tables and
//! the errors a node sends to a consumer ("last announced 3m ago").

/// Most characters of client-chosen text said back to a client.
pub const MAX_ECHO: usize = 80;

/// Client-chosen text as it may appear in a message to a person: no
/// control characters (no escape sequences, no line breaks), at most
/// [`MAX_ECHO`] characters, ASCII `...` where it was cut (OpenSSH prints
/// other bytes as octal).
pub fn echo(s: &str) -> String {
    let clean: String = s.chars().filter(|c| !c.is_control()).collect();
    let mut out: String = clean.chars().take(MAX_ECHO).collect();
    if clean.chars().count() > MAX_ECHO {
        out.push_str("...");
    }
    out
}

/// `in 1h 59m`, `3m 10s ago`, `now`.
pub fn relative(ts: u64, now: u64) -> String {
    match ts.cmp(&now) {
        std::cmp::Ordering::Equal => "now".to_string(),
        std::cmp::Ordering::Greater => format!("in {}", span(ts - now)),
        std::cmp::Ordering::Less => format!("{} ago", span(now - ts)),
    }
}

/// A length of time in its two largest units: `2d 3h`, `1h 59m`, `42s`.
/// Two units are as precise as a person reads at a glance; the ISO form
/// beside it is exact.
pub fn span(secs: u64) -> String {
    const UNITS: [(u64, &str); 4] = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
    let mut parts = Vec::new();
    let mut left = secs;
    for (size, name) in UNITS {
        if left >= size || (parts.is_empty() && size == 1) {
            parts.push(format!("{}{name}", left / size));
            left %= size;
        } else if !parts.is_empty() {
            // A zero middle unit still counts as one of the two shown.
            parts.push(String::new());
        }
        if parts.len() == 2 {
            break;
        }
    }
    parts.retain(|p| !p.is_empty());
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_show_the_two_largest_units() {
        assert_eq!(span(0), "0s");
        assert_eq!(span(42), "42s");
        assert_eq!(span(60), "1m");
        assert_eq!(span(190), "3m 10s");
        assert_eq!(span(3_600), "1h");
        assert_eq!(span(3_601), "1h", "seconds are below the two shown units");
        assert_eq!(span(7_140), "1h 59m");
        assert_eq!(span(86_400 + 3 * 3_600 + 59), "1d 3h");
        assert_eq!(span(86_400 + 59), "1d", "a zero hour is not skipped over");
    }

    #[test]
    fn relative_times_say_which_way() {
        assert_eq!(relative(1_000, 1_000), "now");
        assert_eq!(relative(1_120, 1_000), "in 2m");
        assert_eq!(relative(1_000, 1_190), "3m 10s ago");
    }
}
