//! `xe devnet --once`: the whole system in one command, with real OpenSSH.

mod common;

use std::process::Command;

use common::*;

fn devnet_once(backend: &str, cmd: &str) -> std::process::Output {
    let dir = tempfile::tempdir().expect("tempdir");
    Command::new(xe_bin())
        .args(["devnet", "--data"])
        .arg(dir.path())
        .args([
            "--vm-backend",
            backend,
            "--timeout",
            "60",
            "--once",
            "--",
            cmd,
        ])
        .output()
        .expect("run xe devnet")
}

#[test]
fn devnet_once_runs_a_command_in_the_dev_vm() {
    let out = devnet_once("dev", "echo hello from the vm; exit 3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from the vm\n",
        "stderr:\n{stderr}"
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "exit status is the command's; stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("lease accepted"),
        "progress shown:\n{stderr}"
    );
    assert!(stderr.contains("[devnet] stopped"), "clean stop:\n{stderr}");
}

#[test]
fn devnet_once_runs_a_command_in_an_sshd_vm() {
    if !sshd_available("devnet_once_runs_a_command_in_an_sshd_vm") {
        return;
    }
    let out = devnet_once("sshd", "echo via real sshd; test -n \"$SSH_CONNECTION\"");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "via real sshd\n",
        "stderr:\n{stderr}"
    );
    assert_eq!(out.status.code(), Some(0), "stderr:\n{stderr}");
    // No sshd outlives devnet: every per-lease sshd ran with a config under
    // the devnet's data dir, and none is left.
    let ps = Command::new("ps")
        .args(["-eo", "args"])
        .output()
        .expect("ps");
    let ps = String::from_utf8_lossy(&ps.stdout);
    assert!(
        !ps.lines()
            .any(|l| l.contains("sshd") && l.contains("xe-devnet")),
        "orphan sshd:\n{ps}"
    );
}
