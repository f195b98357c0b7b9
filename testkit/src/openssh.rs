//! The OpenSSH skip gate: tests that drive real OpenSSH programs skip
//! loudly where they are missing, and fail instead when `XE_REQUIRE_SSHD=1`
//! (CI sets it, so a missing OpenSSH cannot pass silently).

use std::io::Write;
use std::path::Path;

/// The OpenSSH server the tests start (Debian's path).
pub const SSHD: &str = "/usr/sbin/sshd";

/// The OpenSSH client the tests run.
pub const SSH: &str = "/usr/bin/ssh";

/// Every OpenSSH program some test drives: one list, so a machine either
/// runs all OpenSSH tests or skips them all. An absolute path must exist;
/// a bare name must be on `PATH`.
pub const PROGRAMS: [&str; 5] = [SSHD, SSH, "ssh-keygen", "ssh-agent", "ssh-add"];

/// The one installation hint.
pub const INSTALL: &str = "apt-get install openssh-server openssh-client";

fn installed(program: &str) -> bool {
    if program.starts_with('/') {
        return Path::new(program).is_file();
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

/// Whether the OpenSSH programs ([`PROGRAMS`]) are installed. If not, the
/// calling test `test` should return: a loud skip line is written, or, with
/// `XE_REQUIRE_SSHD=1`, this panics.
pub fn openssh_available(test: &str) -> bool {
    let missing: Vec<&str> = PROGRAMS.into_iter().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("XE_REQUIRE_SSHD").as_deref() == Ok("1") {
        panic!(
            "{test}: XE_REQUIRE_SSHD=1 but OpenSSH programs are missing: {missing:?} ({INSTALL})"
        );
    }
    // Straight to the process's stderr: the test harness captures
    // `eprintln!` of passing tests, and a skip must be seen.
    let _ = writeln!(
        std::io::stderr(),
        "\n!!! SKIPPED {test}: OpenSSH programs missing ({missing:?}; {INSTALL}); set XE_REQUIRE_SSHD=1 to make this a failure !!!\n"
    );
    false
}

/// Return from the calling test when OpenSSH is missing (see
/// [`openssh_available`]).
#[macro_export]
macro_rules! require_openssh {
    ($name:expr) => {
        if !$crate::openssh_available($name) {
            return;
        }
    };
}
