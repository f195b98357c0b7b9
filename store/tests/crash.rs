//! SIGKILL a writer mid-stream: every acknowledged lease is there after
//! restart and the store opens cleanly.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use xe_store::{LeaseHash, Store};

#[test]
fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("db");
    for round in 0..3 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_xe-store-writer"))
            .arg(&db)
            .arg((round * 10_000_000).to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn writer");
        let stdout = child.stdout.take().expect("stdout");
        let mut acked = Vec::new();
        for line in BufReader::new(stdout).lines() {
            acked.push(line.expect("line").parse::<LeaseHash>().expect("hash"));
            // Kill at a different point each round, mid-stream.
            if acked.len() == 40 + round * 37 {
                break;
            }
        }
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        let store = Store::open(&db).expect("store opens cleanly after SIGKILL");
        for h in &acked {
            assert!(
                store.lease(h).expect("read").is_some(),
                "acknowledged lease {h} lost (round {round})"
            );
        }
        drop(store);
    }
}

/// A second node on the same data directory is told who holds it, not
/// shown sled's raw lock error — and the first node's store is untouched.
#[test]
fn a_store_in_use_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = xe_store::Store::open(dir.path()).expect("open");
    let second = xe_store::Store::open(dir.path())
        .err()
        .expect("second open must fail");
    assert!(
        matches!(&second, xe_store::StoreError::InUse(p) if p == dir.path()),
        "{second}"
    );
    let text = second.to_string();
    assert!(
        text.contains("in use by another process") && text.contains("--data"),
        "{text}"
    );
    assert_eq!(first.event_count(), 0);
    first.flush().expect("the first store still works");
}
