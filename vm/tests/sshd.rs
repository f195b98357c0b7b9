//! The sshd backend against the real OpenSSH server and client.

mod common;

use std::path::Path;

use common::*;
use tokio::io::AsyncReadExt;
use xe_vm::sshd::{SshdConfig, SshdManager};
use xe_vm::{VmError, VmManager, VmStatus, default_vm_user};

fn manager(state: &Path) -> SshdManager {
    SshdManager::new(SshdConfig {
        state_dir: state.to_path_buf(),
        sshd_path: None,
    })
    .expect("sshd manager")
}

fn sshd_pid(state: &Path, lease: &xe_store::LeaseHash) -> u32 {
    std::fs::read_to_string(state.join(lease.to_hex()).join("sshd.pid"))
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid")
}

/// Provision → the real ssh client logs in with the lease key (pinning the
/// reported host key) → another key is refused → dial_ssh reaches sshd →
/// teardown kills sshd, frees the port and removes the state.
#[tokio::test]
async fn lease_key_logs_in_and_teardown_frees_everything() {
    if !openssh_available("lease_key_logs_in_and_teardown_frees_everything") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("state");
    let mgr = manager(&state);
    let key = lease_key(tmp.path(), "lease");
    let other = lease_key(tmp.path(), "other");
    let lease = random_lease();
    let req = request(lease, key.access_pub_key());

    let info = mgr.provision(&req).await.expect("provision");
    assert_eq!(info.status, VmStatus::Running);
    assert_eq!(info.backend, "sshd");
    let port = info.ssh_port.expect("port");
    let host_key = info.host_key.clone().expect("host key");
    assert!(host_key.starts_with("ssh-ed25519 AAAA"), "{host_key}");
    assert_eq!(host_key.split(' ').count(), 2, "no comment: {host_key}");
    assert_eq!(mgr.get(&lease).await, Some(info.clone()));
    assert_eq!(mgr.list().await, vec![info.clone()]);
    // Provisioning again is a no-op that reports the same VM.
    assert_eq!(mgr.provision(&req).await.expect("again"), info);

    let user = default_vm_user("sshd");
    let ok = ssh(key.path(), port, &host_key, &user, &[], "echo hello", None).await;
    assert_eq!(
        (ok.code, ok.stdout.as_str()),
        (Some(0), "hello\n"),
        "stderr: {}",
        ok.stderr
    );

    let refused = ssh(
        other.path(),
        port,
        &host_key,
        &user,
        &[],
        "echo hello",
        None,
    )
    .await;
    assert_eq!(refused.code, Some(255), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("Permission denied"),
        "{}",
        refused.stderr
    );
    assert!(refused.stdout.is_empty());

    // StrictHostKeyChecking really checks: a different pinned key fails.
    let wrong = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
    let mitm = ssh(key.path(), port, wrong, &user, &[], "echo hello", None).await;
    assert_eq!(mitm.code, Some(255));
    assert!(
        mitm.stderr.contains("Host key verification failed"),
        "{}",
        mitm.stderr
    );

    let mut stream = mgr.dial_ssh(&lease).await.expect("dial");
    let mut banner = [0u8; 8];
    tokio::time::timeout(SSH_TIMEOUT, stream.read_exact(&mut banner))
        .await
        .expect("banner in time")
        .expect("banner");
    assert_eq!(&banner, b"SSH-2.0-");
    drop(stream);

    let pid = sshd_pid(&state, &lease);
    assert!(!process_gone(pid));
    mgr.teardown(&lease).await.expect("teardown");
    assert!(process_gone(pid), "sshd {pid} still runs");
    assert!(port_is_free(port), "port {port} still bound");
    assert!(!state.join(lease.to_hex()).exists());
    assert_eq!(mgr.get(&lease).await, None);
    assert!(matches!(mgr.dial_ssh(&lease).await, Err(VmError::NotFound(l)) if l == lease));
    mgr.teardown(&lease).await.expect("teardown is idempotent");
}

/// shutdown stops every sshd but keeps state; a new manager's recover brings
/// the kept lease back with the same host key, removes the other lease, and
/// reports a kept lease without state as Error instead of inventing a key.
#[tokio::test]
async fn recover_after_shutdown_keeps_the_host_key() {
    if !openssh_available("recover_after_shutdown_keeps_the_host_key") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("state");
    let key = lease_key(tmp.path(), "lease");
    let (kept, dropped, lost) = (random_lease(), random_lease(), random_lease());
    let kept_req = request(kept, key.access_pub_key());

    let first = manager(&state);
    let before = first.provision(&kept_req).await.expect("provision kept");
    first
        .provision(&request(dropped, key.access_pub_key()))
        .await
        .expect("provision dropped");
    let pids = [sshd_pid(&state, &kept), sshd_pid(&state, &dropped)];
    first.shutdown().await;
    for pid in pids {
        assert!(process_gone(pid), "sshd {pid} survived shutdown");
    }
    assert!(port_is_free(before.ssh_port.expect("port")));
    assert_eq!(
        first.get(&kept).await.map(|i| i.status),
        Some(VmStatus::Stopped)
    );
    assert!(
        state.join(kept.to_hex()).join("host_key").exists(),
        "state kept"
    );
    drop(first);

    let second = manager(&state);
    let infos = second
        .recover(&[kept_req.clone(), request(lost, key.access_pub_key())])
        .await
        .expect("recover");
    assert_eq!(infos.len(), 2);
    let back = &infos[0];
    assert_eq!(back.status, VmStatus::Running);
    assert_eq!(
        back.host_key, before.host_key,
        "same host key after recover"
    );
    assert_eq!(infos[1].status, VmStatus::Error);
    assert!(
        infos[1]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("new host key"),
        "{:?}",
        infos[1]
    );
    assert!(!state.join(dropped.to_hex()).exists(), "orphan removed");
    assert_eq!(second.get(&dropped).await, None);

    // The old pinned host key still verifies the recovered sshd.
    let host_key = before.host_key.expect("host key");
    let port = back.ssh_port.expect("port");
    let ok = ssh(
        key.path(),
        port,
        &host_key,
        &default_vm_user("sshd"),
        &[],
        "echo back",
        None,
    )
    .await;
    assert_eq!(
        (ok.code, ok.stdout.as_str()),
        (Some(0), "back\n"),
        "{}",
        ok.stderr
    );
    second.teardown(&kept).await.expect("teardown");
    assert!(port_is_free(port));
}

/// A node that died without shutdown leaves its sshd running; the next
/// start-up's recover finds it by its pid file and kills it.
#[tokio::test]
async fn recover_kills_an_sshd_left_by_a_crashed_node() {
    if !openssh_available("recover_kills_an_sshd_left_by_a_crashed_node") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("state");
    let key = lease_key(tmp.path(), "lease");
    let lease = random_lease();
    let crashed = manager(&state);
    let info = crashed
        .provision(&request(lease, key.access_pub_key()))
        .await
        .expect("provision");
    let pid = sshd_pid(&state, &lease);
    // No destructor runs when a process crashes: leak the manager.
    std::mem::forget(crashed);
    assert!(!process_gone(pid));

    let next = manager(&state);
    assert!(next.recover(&[]).await.expect("recover").is_empty());
    assert!(process_gone(pid), "stale sshd {pid} still runs");
    assert!(port_is_free(info.ssh_port.expect("port")));
    assert!(!state.join(lease.to_hex()).exists());
}

#[tokio::test]
async fn invalid_key_changes_nothing() {
    if !openssh_available("invalid_key_changes_nothing") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("state");
    let mgr = manager(&state);
    let lease = random_lease();
    let e = mgr
        .provision(&request(lease, invalid_point_key()))
        .await
        .expect_err("invalid key");
    assert!(matches!(e, VmError::InvalidKey), "{e}");
    assert!(!state.join(lease.to_hex()).exists());
    assert_eq!(mgr.get(&lease).await, None);
}

#[test]
fn missing_sshd_names_the_package() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let e = SshdManager::new(SshdConfig {
        state_dir: tmp.path().to_path_buf(),
        sshd_path: Some("/nonexistent/sbin/sshd".into()),
    })
    .err()
    .expect("must fail");
    assert!(
        matches!(&e, VmError::ToolMissing { tool, .. } if tool == "sshd"),
        "{e}"
    );
    assert!(
        e.to_string().contains("apt-get install openssh-server"),
        "{e}"
    );
}
