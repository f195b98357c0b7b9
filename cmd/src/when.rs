//! Unix times as a person reads them: ISO 8601 in UTC plus how far away
//! the moment is. `--json` output keeps the unix seconds.

use std::time::{Duration, UNIX_EPOCH};

/// `2026-12-01T16:40:27Z (in 1h 59m)`, or `(3m 10s ago)`, or `(now)`.
pub fn at(ts: u64, now: u64) -> String {
    format!("{} ({})", iso(ts), relative(ts, now))
}

/// `2026-12-01T16:40:27Z`.
pub fn iso(ts: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(ts)).to_string()
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
    fn times_read_as_utc_and_relative() {
        assert_eq!(iso(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso(1_796_143_227), "2026-12-01T16:40:27Z");
        assert_eq!(at(1_000, 1_000), "1970-01-01T00:16:40Z (now)");
        assert_eq!(relative(1_120, 1_000), "in 2m");
        assert_eq!(relative(1_000, 1_190), "3m 10s ago");
    }
}
