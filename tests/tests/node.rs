//! `xe node` as a process: identity and host key persist across restarts,
//! SIGTERM stops it cleanly.

mod common;

use common::*;

#[test]
fn restart_keeps_peer_id_and_gateway_host_key_and_sigterm_exits_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("gw");
    let mut a = NodeProc::start(&data, &["--ssh-listen", "127.0.0.1:0"]);
    let peer = a.field("peer_id");
    let account = a.field("account");
    assert!(a.field("ssh_addr").starts_with("127.0.0.1:"));
    let key1 = std::fs::read(data.join("ssh_host_key")).expect("host key written");
    let st = a.stop();
    assert_eq!(
        st.code(),
        Some(0),
        "SIGTERM exits 0; log:\n{}",
        a.log_text()
    );

    let mut b = NodeProc::start(&data, &["--ssh-listen", "127.0.0.1:0"]);
    assert_eq!(b.field("peer_id"), peer, "PeerId stable across restarts");
    assert_eq!(b.field("account"), account);
    assert_eq!(
        std::fs::read(data.join("ssh_host_key")).expect("key"),
        key1,
        "host key reused"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(data.join("p2p_key"))
            .expect("meta")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(b.stop().code(), Some(0));
}

#[test]
fn bad_bootstrap_address_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(xe_bin())
        .args(["node", "--data"])
        .arg(dir.path())
        .args(["--bootstrap", "/ip4/127.0.0.1/tcp/1"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("must end in /p2p/<peer id>"), "{e}");
}
