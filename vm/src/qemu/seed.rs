//! First-boot data: what a lease's guest needs before its sshd starts —
//! the access key as root's only authorized key, the host key the provider
//! generated (and signs into the accept), and a hostname.
//!
//! Two standard carriers, both always built from validated values only
//! (the key line is rebuilt from 32 bytes, the host key is our own
//! OpenSSH encoding, the hostname is `xe-` and hex):
//!
//! - **NoCloud** (cloud-init, every official cloud image): `user-data` and
//!   `meta-data` on an ISO 9660 volume labelled `cidata`, attached as a
//!   read-only drive. `ssh_keys` installs the pre-generated host key.
//! - **fw_cfg** (images without cloud-init, like `vm/images/build-debian.sh`'s):
//!   `opt/xe/authorized_keys`, `opt/xe/ssh_host_ed25519_key`, `opt/xe/hostname`,
//!   read by a unit ordered before `ssh.service`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;
use xe_store::LeaseHash;
use xe_store::secret_file;

use crate::{VmError, VmHostKey, private_dir, process};

/// Files in the lease directory (QEMU runs with it as its working
/// directory, so these names are all it sees).
pub(crate) const AUTHORIZED_KEYS: &str = "authorized_keys";
pub(crate) const HOSTNAME: &str = "hostname";
pub(crate) const SEED_ISO: &str = "seed.iso";
const SEED_DIR: &str = "seed";

/// Making a 2-file ISO takes milliseconds; this bounds a wedged tool.
const ISO_TIMEOUT: Duration = Duration::from_secs(30);

/// Which carriers to attach (`--qemu-seed`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SeedMode {
    /// NoCloud seed and fw_cfg items (works with either kind of image).
    #[default]
    Both,
    /// Only the NoCloud seed (cloud-init images).
    NoCloud,
    /// Only fw_cfg items (no ISO tool needed).
    FwCfg,
}

impl std::str::FromStr for SeedMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "both" => Ok(SeedMode::Both),
            "nocloud" => Ok(SeedMode::NoCloud),
            "fw-cfg" => Ok(SeedMode::FwCfg),
            other => Err(format!(
                "unknown first-boot seed {other:?}: expected both, nocloud or fw-cfg"
            )),
        }
    }
}

impl SeedMode {
    pub(crate) fn nocloud(self) -> bool {
        matches!(self, SeedMode::Both | SeedMode::NoCloud)
    }
    pub(crate) fn fw_cfg(self) -> bool {
        matches!(self, SeedMode::Both | SeedMode::FwCfg)
    }
}

/// What goes into the guest for one lease.
pub(crate) struct FirstBoot<'a> {
    pub lease: &'a LeaseHash,
    /// From [`authorized_key_line`](crate::keys::authorized_key_line).
    pub key_line: &'a str,
    /// The host key generated for the VM.
    pub host_key: &'a VmHostKey,
}

impl FirstBoot<'_> {
    pub(crate) fn hostname(&self) -> String {
        format!("xe-{}", self.lease.short())
    }
}

/// Write the fw_cfg files (the host key file already exists) and return
/// QEMU's `-fw_cfg` arguments, naming files relative to the lease dir.
pub(crate) fn write_fw_cfg(
    dir: &Path,
    boot: &FirstBoot<'_>,
    host_key_file: &str,
) -> Result<Vec<OsString>, VmError> {
    secret_file::replace(
        &dir.join(AUTHORIZED_KEYS),
        format!("{}\n", boot.key_line).as_bytes(),
    )?;
    secret_file::replace(
        &dir.join(HOSTNAME),
        format!("{}\n", boot.hostname()).as_bytes(),
    )?;
    let mut args = Vec::new();
    for (name, file) in [
        ("authorized_keys", AUTHORIZED_KEYS),
        ("ssh_host_ed25519_key", host_key_file),
        ("hostname", HOSTNAME),
    ] {
        args.push("-fw_cfg".into());
        args.push(format!("name=opt/xe/{name},file={file}").into());
    }
    Ok(args)
}

/// cloud-init `user-data`: root gets exactly the lease key, passwords are
/// off, the host key is the pre-generated one and no other is made.
pub(crate) fn user_data(boot: &FirstBoot<'_>) -> String {
    let mut private = String::new();
    for line in boot.host_key.private.lines() {
        private.push_str("      ");
        private.push_str(line);
        private.push('\n');
    }
    format!(
        "#cloud-config\n\
         # Written by xe for lease {lease}.\n\
         hostname: {hostname}\n\
         # Without this, update-locale fails and cloud-config.service errors.\n\
         locale: C.UTF-8\n\
         disable_root: false\n\
         ssh_pwauth: false\n\
         users:\n\
         \x20 - name: root\n\
         \x20   lock_passwd: true\n\
         \x20   ssh_authorized_keys:\n\
         \x20     - \"{key}\"\n\
         ssh_deletekeys: true\n\
         # An empty list fails schema validation; ed25519 is ours anyway.\n\
         ssh_genkeytypes: [ed25519]\n\
         ssh_keys:\n\
         \x20 ed25519_private: |\n\
         {private}\
         \x20 ed25519_public: \"{public}\"\n",
        lease = boot.lease,
        hostname = boot.hostname(),
        key = boot.key_line,
        public = boot.host_key.public,
    )
}

/// cloud-init `meta-data`: the instance id changes per lease, so an image
/// reused for another lease runs its per-instance modules again.
pub(crate) fn meta_data(boot: &FirstBoot<'_>) -> String {
    format!(
        "instance-id: xe-{}\nlocal-hostname: {}\n",
        boot.lease.to_hex(),
        boot.hostname()
    )
}

/// Build `seed.iso` (volume `cidata`) with `iso_tool` (genisoimage or
/// mkisofs; same arguments) and return its QEMU `-drive` arguments.
pub(crate) async fn write_nocloud(
    dir: &Path,
    boot: &FirstBoot<'_>,
    iso_tool: &Path,
) -> Result<Vec<OsString>, VmError> {
    let src = dir.join(SEED_DIR);
    private_dir::create(&src)?;
    secret_file::replace(&src.join("user-data"), user_data(boot).as_bytes())?;
    secret_file::replace(&src.join("meta-data"), meta_data(boot).as_bytes())?;
    // The ISO holds the host key: the tool writes it to its stdout, a
    // private temporary file that becomes seed.iso only when complete.
    let iso = secret_file::Staged::begin(&dir.join(SEED_ISO))?;
    let stdout = iso.file().try_clone().map_err(VmError::io(format!(
        "opening {SEED_ISO} for {}",
        iso_tool.display()
    )))?;
    let out = Command::new(iso_tool)
        .current_dir(dir)
        .args(["-quiet", "-volid", "cidata", "-joliet", "-rock"])
        .arg(src.join("user-data"))
        .arg(src.join("meta-data"))
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Not `output()`: tokio's sets stdout to a pipe, over the file.
        .spawn()
        .map_err(VmError::io(format!("running {}", iso_tool.display())))?
        .wait_with_output();
    let out = tokio::time::timeout(ISO_TIMEOUT, out)
        .await
        .map_err(|_| VmError::Timeout {
            what: format!(
                "{} did not finish within {ISO_TIMEOUT:?}",
                iso_tool.display()
            ),
            detail: String::new(),
        })?
        .map_err(VmError::io(format!("running {}", iso_tool.display())))?;
    // Only the ISO keeps a copy of the host key.
    let _ = std::fs::remove_dir_all(&src);
    if !out.status.success() {
        return Err(VmError::Failed {
            what: "building the NoCloud seed".into(),
            detail: format!(
                "{} exited with {}: {}",
                iso_tool.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    iso.commit_replace()?;
    Ok(vec![
        "-drive".into(),
        format!("file={SEED_ISO},if=virtio,format=raw,readonly=on").into(),
    ])
}

/// genisoimage or mkisofs, whichever is installed.
pub(crate) fn find_iso_tool() -> Option<PathBuf> {
    ["genisoimage", "mkisofs"]
        .iter()
        .find_map(|name| process::find_program(None, name, &["/usr/bin", "/usr/local/bin"]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys;
    use xe_store::AccessPubKey;

    struct Parts(LeaseHash, String, VmHostKey);

    impl Parts {
        fn boot(&self) -> FirstBoot<'_> {
            FirstBoot {
                lease: &self.0,
                key_line: &self.1,
                host_key: &self.2,
            }
        }
    }

    fn boot_parts() -> Parts {
        let kp = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&[7; 32]);
        let lease = LeaseHash([0xc3; 32]);
        let key_line = keys::authorized_key_line(&lease, &AccessPubKey(kp.public.0)).expect("line");
        let dir = tempfile::tempdir().expect("tempdir");
        let hk = keys::load_or_create_vm_host_key(&dir.path().join("host_key")).expect("key");
        Parts(lease, key_line, hk)
    }

    #[test]
    fn user_data_carries_exactly_the_lease_items() {
        let parts = boot_parts();
        let boot = parts.boot();
        let (lease, key_line, public) = (parts.0, &parts.1, &parts.2.public);
        let ud = user_data(&boot);
        assert!(ud.starts_with("#cloud-config\n"));
        assert!(ud.contains(&format!("      - \"{key_line}\"\n")), "{ud}");
        assert!(ud.contains(&format!("  ed25519_public: \"{public}\"\n")));
        assert!(ud.contains("    -----BEGIN OPENSSH PRIVATE KEY-----\n"));
        assert!(ud.contains("ssh_pwauth: false\n") && ud.contains("lock_passwd: true\n"));
        assert!(ud.contains("hostname: xe-c3c3c3c3\n"));
        let md = meta_data(&boot);
        assert!(md.contains(&format!("instance-id: xe-{}\n", lease.to_hex())));
    }

    #[test]
    fn fw_cfg_items_name_files_in_the_lease_dir() {
        let parts = boot_parts();
        let boot = parts.boot();
        let key_line = &parts.1;
        let dir = tempfile::tempdir().expect("tempdir");
        let args = write_fw_cfg(dir.path(), &boot, "host_key").expect("fw_cfg");
        let args: Vec<String> = args
            .into_iter()
            .map(|a| a.into_string().expect("utf8"))
            .collect();
        assert_eq!(
            args,
            [
                "-fw_cfg",
                "name=opt/xe/authorized_keys,file=authorized_keys",
                "-fw_cfg",
                "name=opt/xe/ssh_host_ed25519_key,file=host_key",
                "-fw_cfg",
                "name=opt/xe/hostname,file=hostname",
            ]
        );
        let keys = std::fs::read_to_string(dir.path().join(AUTHORIZED_KEYS)).expect("keys");
        assert_eq!(keys, format!("{key_line}\n"));
    }

    /// The ISO cloud-init will look for: volume `cidata`, both files, and
    /// no plain copy of the host key left beside it.
    #[tokio::test]
    async fn nocloud_seed_is_a_cidata_iso_with_both_files() {
        let Some(tool) = find_iso_tool() else {
            if std::env::var("XE_REQUIRE_QEMU").as_deref() == Ok("1") {
                panic!("genisoimage is not installed but XE_REQUIRE_QEMU=1");
            }
            eprintln!(
                "\n!!! SKIPPING nocloud_seed_is_a_cidata_iso_with_both_files: no genisoimage !!!\n"
            );
            return;
        };
        let parts = boot_parts();
        let boot = parts.boot();
        let dir = tempfile::tempdir().expect("tempdir");
        let args = write_nocloud(dir.path(), &boot, &tool).await.expect("seed");
        assert_eq!(args[1], "file=seed.iso,if=virtio,format=raw,readonly=on");
        assert!(
            !dir.path().join(SEED_DIR).exists(),
            "plain seed files left behind"
        );
        let iso = dir.path().join(SEED_ISO);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&iso).expect("iso").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the ISO holds the host key");
        let info = |args: &[&str]| {
            let out = std::process::Command::new("isoinfo")
                .args(args)
                .arg("-i")
                .arg(&iso)
                .output()
                .expect("isoinfo (genisoimage package)");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        assert!(info(&["-d"]).contains("Volume id: cidata"));
        assert_eq!(info(&["-R", "-x", "/user-data"]), user_data(&boot));
        assert_eq!(info(&["-R", "-x", "/meta-data"]), meta_data(&boot));
    }

    #[test]
    fn seed_names_parse() {
        assert_eq!("fw-cfg".parse::<SeedMode>(), Ok(SeedMode::FwCfg));
        assert!("iso".parse::<SeedMode>().is_err());
    }
}
