//! The xe-owned known_hosts file: a lease's VM host key, pinned under
//! `HostKeyAlias=LEASE` (one file for `xe ssh` and `xe tunnel`).

use std::path::Path;

use anyhow::{Context, bail};
use xe_store::LeaseHash;

/// Pin `host_key` (an OpenSSH public key line) for `lease` in `known_hosts`,
/// replacing any older line for the same alias.
pub fn pin_host_key(known_hosts: &Path, lease: &LeaseHash, host_key: &str) -> anyhow::Result<()> {
    let key = host_key
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    if key.split_whitespace().count() != 2 || key.contains(['\n', '\r']) {
        bail!("the lease's VM host key is malformed: {host_key:?}");
    }
    let alias = lease.to_string();
    let existing = std::fs::read_to_string(known_hosts).unwrap_or_default();
    let mut out: Vec<String> = existing
        .lines()
        .filter(|l| l.split_whitespace().next() != Some(alias.as_str()))
        .map(str::to_string)
        .collect();
    out.push(format!("{alias} {key}"));
    if let Some(dir) = known_hosts.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(known_hosts, out.join("\n") + "\n")
        .with_context(|| format!("writing {}", known_hosts.display()))?;
    Ok(())
}

/// Whether `known_hosts` already pins a key for `lease`.
pub fn has_pin(known_hosts: &Path, lease: &LeaseHash) -> bool {
    let alias = lease.to_string();
    std::fs::read_to_string(known_hosts)
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().next() == Some(alias.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_replaces_only_the_same_alias() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kh = dir.path().join("known_hosts");
        let a = LeaseHash([1; 32]);
        let b = LeaseHash([2; 32]);
        pin_host_key(&kh, &a, "ssh-ed25519 AAAA1 vm").expect("pin");
        pin_host_key(&kh, &b, "ssh-ed25519 AAAA2").expect("pin");
        pin_host_key(&kh, &a, "ssh-ed25519 AAAA3").expect("re-pin");
        let text = std::fs::read_to_string(&kh).expect("read");
        assert_eq!(
            text,
            format!("{b} ssh-ed25519 AAAA2\n{a} ssh-ed25519 AAAA3\n")
        );
        assert!(pin_host_key(&kh, &a, "garbage").is_err());
    }
}
