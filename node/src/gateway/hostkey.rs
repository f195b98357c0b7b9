//! The gateway's persistent host key: `{dataDir}/ssh_host_key`, ed25519,
//! OpenSSH format, mode 0600, created on first run and reused so the
//! fingerprint clients pin stays the same across restarts.

use std::fs;
use std::path::{Path, PathBuf};

use rand::RngCore;
use russh::keys::ssh_key::{HashAlg, LineEnding, PrivateKey, private::Ed25519Keypair};
use xe_store::secret_file::{self, SecretFileError};

use super::error::GatewayError;

/// File name of the host key inside the data directory.
pub const HOST_KEY_FILE: &str = "ssh_host_key";

impl From<SecretFileError> for GatewayError {
    fn from(e: SecretFileError) -> Self {
        match e {
            SecretFileError::Permissions { path, mode } => {
                GatewayError::HostKeyPermissions { path, mode }
            }
            other => GatewayError::HostKeyFile(other),
        }
    }
}

/// Load the host key at `path`, or create it (ed25519, 0600, plus a `.pub`
/// next to it) if there is none. A key that group or others can read is
/// refused, as sshd does; so is an encrypted one (the gateway starts
/// unattended).
pub fn load_or_create_host_key(path: &Path) -> Result<PrivateKey, GatewayError> {
    match secret_file::read_to_string(path) {
        Ok(text) => parse(path, &text),
        Err(SecretFileError::Missing { .. }) => create(path),
        Err(e) => Err(e.into()),
    }
}

/// The `SHA256:…` fingerprint OpenSSH shows for this key.
pub fn host_key_fingerprint(key: &PrivateKey) -> String {
    key.public_key().fingerprint(HashAlg::Sha256).to_string()
}

fn parse(path: &Path, text: &str) -> Result<PrivateKey, GatewayError> {
    let key = PrivateKey::from_openssh(text.as_bytes()).map_err(|e| GatewayError::HostKey {
        path: path.to_path_buf(),
        detail: format!("not an OpenSSH private key: {e}"),
    })?;
    if key.is_encrypted() {
        return Err(GatewayError::HostKey {
            path: path.to_path_buf(),
            detail: "the key is passphrase-protected; the gateway needs an unencrypted host key"
                .into(),
        });
    }
    Ok(key)
}

fn create(path: &Path) -> Result<PrivateKey, GatewayError> {
    let bad = |detail: String| GatewayError::HostKey {
        path: path.to_path_buf(),
        detail,
    };
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    let key = PrivateKey::new(Ed25519Keypair::from_seed(&seed).into(), "xe-gateway")
        .map_err(|e| bad(e.to_string()))?;
    seed.fill(0);
    let text = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| bad(e.to_string()))?;
    // The key appears complete or not at all, and a concurrent creator's
    // key is never overwritten: we load theirs.
    match secret_file::create_new(path, text.as_bytes()) {
        Ok(()) => {}
        Err(SecretFileError::Exists { .. }) => return load_or_create_host_key(path),
        Err(e) => return Err(e.into()),
    }
    // The .pub is a convenience for operators (`ssh-keygen -lf`); failing to
    // write it does not stop the gateway.
    if let Ok(line) = key.public_key().to_openssh() {
        let pub_path = pub_path(path);
        if let Err(e) = fs::write(&pub_path, format!("{line}\n")) {
            tracing::warn!(path = %pub_path.display(), error = %e, "could not write the host public key file");
        }
    }
    tracing::info!(
        path = %path.display(),
        fingerprint = %host_key_fingerprint(&key),
        "created a new SSH gateway host key"
    );
    Ok(key)
}

fn pub_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_once_then_reused_with_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("sub").join(HOST_KEY_FILE);
        let a = load_or_create_host_key(&p).expect("create");
        let b = load_or_create_host_key(&p).expect("load");
        assert_eq!(host_key_fingerprint(&a), host_key_fingerprint(&b));
        assert!(host_key_fingerprint(&a).starts_with("SHA256:"));
        let mode = fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(a.public_key().key_data().ed25519().is_some());
        let pubtext = fs::read_to_string(pub_path(&p)).expect("pub");
        assert!(pubtext.starts_with("ssh-ed25519 "));
    }

    #[test]
    fn readable_by_others_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join(HOST_KEY_FILE);
        load_or_create_host_key(&p).expect("create");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = load_or_create_host_key(&p).unwrap_err();
        assert!(
            matches!(e, GatewayError::HostKeyPermissions { mode: 0o644, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }

    #[test]
    fn garbage_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join(HOST_KEY_FILE);
        secret_file::create_new(&p, b"nope").expect("write");
        let e = load_or_create_host_key(&p).unwrap_err();
        assert!(e.to_string().contains("not an OpenSSH private key"), "{e}");
    }
}
