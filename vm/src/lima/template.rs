//! The per-lease Lima instance template and its provision script.
//!
//! Only validated values reach the text: numbers, the lease's hex, the
//! `authorized_keys` line rebuilt from the key's 32 bytes, and config
//! strings written as JSON strings (a JSON string is a valid YAML
//! double-quoted scalar, so quotes and newlines cannot break out).

use std::fmt::Write as _;

use xe_store::LeaseHash;

use super::config::LimaConfig;
use crate::{ProvisionRequest, VmError, keys};

/// The Lima instance name of a lease: `xe-` and the first 16 hex digits.
/// The `xe-` prefix marks instances this backend owns (orphan cleanup).
pub fn instance_name(lease: &LeaseHash) -> String {
    let hex = lease.to_hex();
    format!("xe-{}", &hex[..16])
}

/// Lima's name for the host architecture.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "arm" => "armv7l",
        other => other,
    }
}

fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// The VM's host key (the lima backend's name for it).
pub use crate::VmHostKey as HostKey;

/// The instance YAML for `req`. Fails with [`VmError::InvalidKey`] before
/// anything is rendered if the key is not a valid ed25519 point.
pub fn render(
    config: &LimaConfig,
    req: &ProvisionRequest,
    host_key: &HostKey,
) -> Result<String, VmError> {
    // Only a well-formed OpenSSH key reaches the script (base64 lines
    // between fixed markers: nothing that could end the heredoc early).
    let parsed = russh::keys::ssh_key::PrivateKey::from_openssh(&host_key.private);
    if parsed.is_err()
        || keys::normalize_host_key_line(&host_key.public)
            .ok()
            .as_deref()
            != Some(host_key.public.as_str())
    {
        return Err(VmError::Failed {
            what: "rendering the Lima template".into(),
            detail: "the host key is not one OpenSSH ed25519 key".into(),
        });
    }
    let key_line = keys::authorized_key_line(&req.lease, &req.access_pub_key)?;
    let arch = config.arch.as_deref().unwrap_or(host_arch());
    let cpus = req.vcpus.max(config.min_cpus);
    let memory_mb = req.memory_mb.max(config.min_memory_mb);
    let disk_gb = req.disk_gb.max(config.min_disk_gb);
    let mut y = String::new();
    // `write!` into a String cannot fail.
    let _ = write!(
        y,
        "# Written by xe for lease {lease}; recreated on every provision.\n\
         vmType: \"qemu\"\n\
         arch: {arch}\n\
         cpus: {cpus}\n\
         memory: \"{memory_mb}MiB\"\n\
         disk: \"{disk_gb}GiB\"\n\
         images:\n\
         \x20 - location: {image}\n\
         \x20   arch: {arch}\n\
         # Nothing of the provider's filesystem is shared with a consumer's VM.\n\
         mounts: []\n\
         containerd:\n\
         \x20 system: false\n\
         \x20 user: false\n\
         ssh:\n\
         \x20 # 0: Lima picks a free 127.0.0.1 port; we read it from `limactl list --json`.\n\
         \x20 localPort: 0\n\
         \x20 loadDotSSHPubKeys: false\n\
         \x20 forwardAgent: false\n\
         \x20 forwardX11: false\n\
         # Lima forwards guest ports to the provider's loopback by default; a\n\
         # consumer's services must not appear there (SSH's own forward stays).\n\
         portForwards:\n\
         \x20 - guestPortRange: [1, 65535]\n\
         \x20   proto: \"any\"\n\
         \x20   ignore: true\n\
         provision:\n\
         \x20 - mode: system\n\
         \x20   script: |\n",
        lease = req.lease,
        arch = quoted(arch),
        image = quoted(&config.image),
    );
    for line in provision_script(&req.lease, &key_line, host_key).lines() {
        if line.is_empty() {
            y.push('\n');
        } else {
            let _ = writeln!(y, "      {line}");
        }
    }
    Ok(y)
}

/// The guest script (Lima `mode: system`, run as root on every boot, so
/// idempotent): make sure sshd is there and enabled, authorise exactly the
/// lease's key for root, turn password logins off. `key_line` comes from
/// [`keys::authorized_key_line`], so it holds no quote.
fn provision_script(lease: &LeaseHash, key_line: &str, host_key: &HostKey) -> String {
    format!(
        r#"#!/bin/sh
# Written by xe for lease {short}: exactly the lease's access key may log
# in as root, passwords are off.
set -eu
if ! command -v sshd >/dev/null 2>&1 && [ ! -x /usr/sbin/sshd ]; then
  if command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y openssh-server
  elif command -v apk >/dev/null 2>&1; then
    apk add --no-cache openssh-server
  elif command -v dnf >/dev/null 2>&1; then
    dnf install -y openssh-server
  else
    echo "xe: no sshd and no known package manager" >&2
    exit 1
  fi
fi
install -d -m 700 /root/.ssh
printf '%s\n' '{key_line}' > /root/.ssh/authorized_keys.xe-new
chmod 600 /root/.ssh/authorized_keys.xe-new
mv -f /root/.ssh/authorized_keys.xe-new /root/.ssh/authorized_keys
# The host key the provider generated and signs into the lease's accept.
# xe-host-key: {host_public}
umask 077
cat > /etc/ssh/ssh_host_ed25519_key.xe-new <<'XE_HOST_KEY'
{host_private}
XE_HOST_KEY
mv -f /etc/ssh/ssh_host_ed25519_key.xe-new /etc/ssh/ssh_host_ed25519_key
printf '%s\n' '{host_public}' > /etc/ssh/ssh_host_ed25519_key.pub
chmod 644 /etc/ssh/ssh_host_ed25519_key.pub
umask 022
# sshd takes the first value it reads: a drop-in that sorts first where
# sshd_config.d is included, and the main file rewritten for the rest.
if [ -d /etc/ssh/sshd_config.d ]; then
  printf '%s\n' 'PasswordAuthentication no' 'KbdInteractiveAuthentication no' 'PermitRootLogin prohibit-password' 'HostKey /etc/ssh/ssh_host_ed25519_key' > /etc/ssh/sshd_config.d/00-xe.conf
fi
sed -i -E 's/^[#[:space:]]*(PasswordAuthentication|KbdInteractiveAuthentication|ChallengeResponseAuthentication)[[:space:]].*/\1 no/; s/^[#[:space:]]*PermitRootLogin[[:space:]].*/PermitRootLogin prohibit-password/' /etc/ssh/sshd_config
if command -v systemctl >/dev/null 2>&1; then
  systemctl enable ssh >/dev/null 2>&1 || systemctl enable sshd
  systemctl restart ssh >/dev/null 2>&1 || systemctl restart sshd
elif command -v rc-service >/dev/null 2>&1; then
  rc-update add sshd default >/dev/null 2>&1 || true
  rc-service sshd restart
fi
"#,
        short = lease.short(),
        host_public = host_key.public,
        host_private = host_key.private.trim_end(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use xe_store::AccessPubKey;

    fn host_key() -> HostKey {
        let dir = tempfile::tempdir().expect("tempdir");
        keys::load_or_create_vm_host_key(&dir.path().join("host_key")).expect("key")
    }

    #[test]
    fn the_generated_host_key_is_installed_and_text_cannot_break_out() {
        let hk = host_key();
        let y = render(&LimaConfig::new("/bin/limactl", "/l", "img"), &req(), &hk).expect("render");
        assert!(
            y.contains(&format!("      # xe-host-key: {}\n", hk.public)),
            "{y}"
        );
        assert!(
            y.contains("      -----BEGIN OPENSSH PRIVATE KEY-----\n      "),
            "{y}"
        );
        assert!(
            y.contains("-----END OPENSSH PRIVATE KEY-----\n      XE_HOST_KEY\n"),
            "{y}"
        );
        let evil = HostKey {
            private: "x\nXE_HOST_KEY\nrm -rf /\n".into(),
            public: hk.public.clone(),
        };
        assert!(render(&LimaConfig::new("/bin/limactl", "/l", "img"), &req(), &evil).is_err());
    }

    fn req() -> ProvisionRequest {
        let kp = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&[9; 32]);
        ProvisionRequest {
            lease: LeaseHash([0x5a; 32]),
            vcpus: 0,
            memory_mb: 0,
            disk_gb: 0,
            access_pub_key: AccessPubKey(kp.public.0),
        }
    }

    #[test]
    fn minimums_apply_and_strings_are_escaped() {
        let mut cfg = LimaConfig::new("/bin/limactl", "/l", "img \"x\" \\ y");
        cfg.arch = Some("aarch64".into());
        let y = render(&cfg, &req(), &host_key()).expect("render");
        assert!(
            y.contains("cpus: 1\n")
                && y.contains("memory: \"512MiB\"\n")
                && y.contains("disk: \"10GiB\"\n"),
            "{y}"
        );
        assert!(
            y.contains("  - location: \"img \\\"x\\\" \\\\ y\"\n"),
            "{y}"
        );
        assert!(y.contains("arch: \"aarch64\"\n"), "{y}");
        assert_eq!(instance_name(&req().lease), "xe-5a5a5a5a5a5a5a5a");
    }

    #[test]
    fn script_is_indented_under_the_block_scalar() {
        let y = render(
            &LimaConfig::new("/bin/limactl", "/l", "img"),
            &req(),
            &host_key(),
        )
        .expect("render");
        let after = y.split("    script: |\n").nth(1).expect("script");
        assert!(
            after
                .lines()
                .filter(|l| !l.is_empty())
                .all(|l| l.starts_with("      ")),
            "{after}"
        );
        assert!(after.starts_with("      #!/bin/sh\n"));
        assert!(!y.contains("{{"), "Lima would expand Go templates");
    }

    #[test]
    fn invalid_key_renders_nothing() {
        let mut r = req();
        r.access_pub_key = crate::keys::tests::not_a_point();
        assert!(matches!(
            render(&LimaConfig::new("/l", "/l", "i"), &r, &host_key()),
            Err(VmError::InvalidKey)
        ));
    }
}
