//! `xe node` flags that are refused before anything starts.

use std::process::Command;

const XE: &str = env!("CARGO_BIN_EXE_xe");

#[test]
fn a_ledger_retention_below_one_day_is_refused_with_the_range() {
    let dir = tempfile::tempdir().expect("tmp");
    for bad in ["0", "366", "two"] {
        let out = Command::new(XE)
            .args(["node", "--data"])
            .arg(dir.path())
            .args(["--ledger-retention-days", bad])
            .output()
            .expect("run xe");
        assert!(
            !out.status.success(),
            "--ledger-retention-days {bad} accepted"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--ledger-retention-days"), "{bad}: {err}");
        // Nothing was created: the flag is checked before the store opens.
        assert!(!dir.path().join("db").exists(), "{bad}: store created");
    }
}
