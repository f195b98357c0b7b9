//! `xe wallet` as a new user would try it.

mod common;

use std::process::Command;

use common::*;

fn xe(args: &[&str], wallet: &std::path::Path) -> std::process::Output {
    Command::new(xe_bin())
        .args(args)
        .env("XE_WALLET", wallet)
        .output()
        .expect("run xe")
}

#[test]
fn create_show_address_and_refuse_overwrite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = dir.path().join("me.seed");
    let out = xe(&["wallet", "create"], &w);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = String::from_utf8_lossy(&out.stdout).to_string();
    let addr_out = xe(&["wallet", "address"], &w);
    let addr = String::from_utf8_lossy(&addr_out.stdout).trim().to_string();
    assert_eq!(addr.len(), 64);
    assert!(
        addr.chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    );
    assert!(shown.contains(&addr));
    // The lease key sits next to the seed, as the seed's table says, and
    // ssh-keygen reads it.
    let key = dir.path().join("me.lease_key");
    assert!(key.exists() && dir.path().join("me.lease_key.pub").exists());
    let kg = Command::new("ssh-keygen")
        .arg("-y")
        .arg("-f")
        .arg(&key)
        .output()
        .expect("ssh-keygen");
    let publine = String::from_utf8_lossy(&kg.stdout);
    assert!(publine.starts_with("ssh-ed25519 "), "{publine}");
    let show = String::from_utf8_lossy(&xe(&["wallet", "show"], &w).stdout).to_string();
    assert!(
        show.contains(publine.split_whitespace().nth(1).expect("b64")),
        "{show}"
    );

    let before = std::fs::read(&w).expect("seed");
    let again = xe(&["wallet", "create"], &w);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already exists; refusing to overwrite")
    );
    assert_eq!(std::fs::read(&w).expect("seed"), before);
}

#[test]
fn missing_and_world_readable_wallets_say_what_to_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = dir.path().join("none.seed");
    let out = xe(&["wallet", "show"], &w);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("xe wallet create"));
    assert!(xe(&["wallet", "create"], &w).status.success());
    std::fs::set_permissions(&w, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("chmod");
    let out = xe(&["wallet", "address"], &w);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
}
