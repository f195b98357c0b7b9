//! Unix times as a person reads them: ISO 8601 in UTC plus how far away
//! the moment is. `--json` output keeps the unix seconds.

use std::time::{Duration, UNIX_EPOCH};

pub use xe_store::human::{relative, span};

/// `2026-12-01T16:40:27Z (in 1h 59m)`, or `(3m 10s ago)`, or `(now)`.
pub fn at(ts: u64, now: u64) -> String {
    format!("{} ({})", iso(ts), relative(ts, now))
}

/// `2026-12-01T16:40:27Z`.
pub fn iso(ts: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(ts)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_utc_and_relative() {
        assert_eq!(iso(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso(1_796_143_227), "2026-12-01T16:40:27Z");
        assert_eq!(at(1_000, 1_000), "1970-01-01T00:16:40Z (now)");
        assert_eq!(relative(1_120, 1_000), "in 2m");
        assert_eq!(relative(1_000, 1_190), "3m 10s ago");
    }
}
