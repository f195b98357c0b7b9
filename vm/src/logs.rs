//! Tails of the logs a backend's processes write, for error details.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// How much of a log goes into an error: enough for the last few lines of a
/// QEMU or sshd failure, small enough for a log line and an HTTP answer.
const LOG_TAIL_BYTES: u64 = 2048;

/// The last lines of a log file (at most [`LOG_TAIL_BYTES`]), prefixed with
/// its name; empty if the file is missing or empty.
pub(crate) fn log_tail(path: &Path) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(LOG_TAIL_BYTES);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    if f.take(LOG_TAIL_BYTES).read_to_end(&mut buf).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&buf);
    // Drop a partial first line when we started mid-file.
    let text = if start > 0 {
        text.split_once('\n').map(|(_, rest)| rest).unwrap_or(&text)
    } else {
        &text
    };
    let text = text.trim();
    if text.is_empty() {
        String::new()
    } else {
        format!("[{}] {}", path.display(), text)
    }
}

/// Join non-empty log tails for an error's detail.
pub(crate) fn join_tails(parts: &[String]) -> String {
    parts
        .iter()
        .filter(|p| !p.is_empty())
        .cloned()
        .collect::<Vec<_>>()
        .join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_tail_keeps_the_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("x.log");
        assert_eq!(log_tail(&p), "");
        let body: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        fs::write(&p, body).expect("write");
        let t = log_tail(&p);
        assert!(t.ends_with("line 999"), "{t}");
        assert!(!t.contains("line 1\n") && t.len() < 2200, "{}", t.len());
    }
}
