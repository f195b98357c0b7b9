//! Helpers shared by the integration tests: keys, leases, and running the
//! real OpenSSH client with a pinned host key.
#![allow(dead_code)]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use rand::RngCore;
use tokio::io::AsyncWriteExt;
use xe_store::{AccessPubKey, LeaseHash, LeaseKey};
use xe_vm::ProvisionRequest;

/// Upper bound for one `ssh` run; a hang is a failure, not a wait.
pub const SSH_TIMEOUT: Duration = Duration::from_secs(60);

#[allow(unused_imports)] // each test binary uses a different subset
pub use xe_testkit::{SSH, SSHD, openssh_available};

pub fn random_lease() -> LeaseHash {
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    LeaseHash(b)
}

/// A lease key on disk (OpenSSH private key, 0600) usable with `ssh -i`.
pub fn lease_key(dir: &Path, name: &str) -> LeaseKey {
    LeaseKey::load_or_create(&dir.join(format!("{name}.lease_key"))).expect("lease key")
}

pub fn request(lease: LeaseHash, key: AccessPubKey) -> ProvisionRequest {
    ProvisionRequest {
        lease,
        vcpus: 2,
        memory_mb: 1024,
        disk_gb: 20,
        access_pub_key: key,
    }
}

/// 32 bytes that are not an ed25519 point (about half of all y values are
/// not; the first few candidates are checked).
pub fn invalid_point_key() -> AccessPubKey {
    for i in 0..=255u8 {
        let mut b = [0u8; 32];
        b[0] = i;
        b[1] = 0x55;
        let k = AccessPubKey(b);
        if !k.is_valid_point() {
            return k;
        }
    }
    panic!("no invalid point among 256 candidates");
}

pub struct SshOut {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Run the real OpenSSH client against `127.0.0.1:port`, trusting only
/// `host_key` for it (StrictHostKeyChecking=yes) and offering only `key`.
pub async fn ssh(
    key: &Path,
    port: u16,
    host_key: &str,
    user: &str,
    extra: &[&str],
    command: &str,
    stdin: Option<&[u8]>,
) -> SshOut {
    let dir = tempfile::tempdir().expect("tempdir");
    let known = dir.path().join("known_hosts");
    std::fs::write(&known, format!("[127.0.0.1]:{port} {host_key}\n")).expect("known_hosts");
    let mut cmd = tokio::process::Command::new("ssh");
    cmd.arg("-F")
        .arg("/dev/null")
        .arg("-i")
        .arg(key)
        .arg("-p")
        .arg(port.to_string())
        .args([
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "IdentityAgent=none",
            "-o",
            "BatchMode=yes",
        ])
        .args([
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
        ])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known.display()))
        .args(["-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR"])
        .args(extra)
        .arg(format!("{user}@127.0.0.1"))
        .arg(command)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn ssh");
    if let Some(input) = stdin {
        let mut w = child.stdin.take().expect("stdin");
        w.write_all(input).await.expect("write stdin");
        drop(w);
    }
    let out = tokio::time::timeout(SSH_TIMEOUT, child.wait_with_output())
        .await
        .expect("ssh did not finish in time")
        .expect("ssh output");
    SshOut {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Whether a port on 127.0.0.1 can be bound again (its listener is gone).
pub fn port_is_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Whether a pid is gone (or only a zombie waiting for a parent).
pub fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next().map(|s| s == "Z"))
            .unwrap_or(false),
    }
}
