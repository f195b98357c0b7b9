//! xe-testkit: what the test suites of every xe crate share, in one place.
//!
//! # Layout
//! - [`openssh`]: the OpenSSH skip gate (one list of programs; a loud skip,
//!   or a failure when `XE_REQUIRE_SSHD=1`) and the program paths.
//! - [`wait`]: bounded waits on real events (a store's changes, a peer-count
//!   watch), never sleeps; all bounded by [`LIMIT`].
//! - [`lease`]: lease terms and leases applied to a store, with the host key
//!   line of a VM nobody contacts.
//! - [`xe_bin`]: the one way a test outside the `xe` package finds the
//!   built binary.
//! - [`init_tracing`]: logs of a test, filtered by `RUST_LOG` (INFO default).
//!
//! Depends on xe-store and nothing above it, so any crate's tests can use it
//! (as a dev-dependency only). What one crate's tests need alone stays in
//! that crate's `tests/common`.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod lease;
pub mod openssh;
pub mod wait;

pub use lease::{UNUSED_VM_HOST_KEY, apply_lease, terms};
pub use openssh::{SSH, SSHD, openssh_available};
pub use wait::{wait_peers, wait_state};

/// The bound on every wait in a test: long enough for a loaded 2-core CI
/// machine, short enough that a hang fails the run instead of stalling it.
pub const LIMIT: Duration = Duration::from_secs(60);

/// Logs of the test, written through the test harness's capture; `RUST_LOG`
/// filters, INFO by default. Safe to call from every test.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
}

/// The `xe` binary for tests outside the `xe` package (the e2e crate), which
/// cannot use `env!("CARGO_BIN_EXE_xe")` (Cargo sets it only for the
/// package's own tests; `cmd/tests` use that). The one documented way:
///
/// 1. `XE_BIN`, if set (an A/B run against another build);
/// 2. else `xe` in the target directory this test was built into
///    (`target/<profile>/deps/<test>` → `target/<profile>/xe`), which
///    `cargo nextest run --workspace` (or `cargo build -p xe`) builds.
///
/// A missing binary is a failure that says how to build it, never a skip.
pub fn xe_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("XE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("xe");
    assert!(
        bin.exists(),
        "{} not found: build it first (`cargo build -p xe`, or run the suite with `cargo nextest run --workspace`), or set XE_BIN",
        bin.display()
    );
    bin
}
