//! Wallets: an account's ed25519 seed on disk, and the per-wallet SSH
//! lease key (`wallet.seed` → `wallet.lease_key`).

use std::fs;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signer, SigningKey};
use rand::RngCore;
use russh::keys::ssh_key::{self, LineEnding, private::Ed25519Keypair};

use crate::ids::{AccessPubKey, AccountAddress, AccountPubKey, Sig};
use crate::secret_file::{self, SecretFileError};

/// Why a wallet or lease key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum WalletError {
    /// Creating a wallet where one exists would destroy an account.
    #[error(
        "wallet {0} already exists; refusing to overwrite it (use --wallet to choose another path)"
    )]
    Exists(PathBuf),
    /// No file at the path.
    #[error("no wallet at {0}; create one with `xe wallet create` (or pass --wallet PATH)")]
    Missing(PathBuf),
    /// A secret readable by others is refused.
    #[error("{}", secret_file::wrong_mode(.path, *.mode))]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is not a wallet seed.
    #[error("{path} is not a wallet seed: {detail}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// The seed or key file could not be read or written (a link, not a
    /// regular file, an I/O error).
    #[error(transparent)]
    Secret(SecretFileError),
    /// An I/O error.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WalletError + '_ {
    move |source| WalletError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Write a new secret file (see [`secret_file`]), refusing to overwrite.
fn write_secret(path: &Path, contents: &[u8]) -> Result<(), WalletError> {
    secret_file::create_new(path, contents).map_err(WalletError::from)
}

/// Read a secret file, refusing one that group or others can read.
fn read_secret(path: &Path) -> Result<String, WalletError> {
    secret_file::read_to_string(path).map_err(WalletError::from)
}

impl From<SecretFileError> for WalletError {
    fn from(e: SecretFileError) -> Self {
        match e {
            SecretFileError::Exists { path } => WalletError::Exists(path),
            SecretFileError::Missing { path } => WalletError::Missing(path),
            SecretFileError::Permissions { path, mode } => WalletError::Permissions { path, mode },
            other => WalletError::Secret(other),
        }
    }
}

/// An account: an ed25519 signing key kept as a hex seed file (mode 0600).
pub struct Wallet {
    key: SigningKey,
    path: PathBuf,
}

impl std::fmt::Debug for Wallet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wallet")
            .field("address", &self.address())
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Wallet {
    /// A wallet from seed bytes, not backed by a file (tests, vectors).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Wallet {
            key: SigningKey::from_bytes(&seed),
            path: PathBuf::new(),
        }
    }

    /// Create a new wallet at `path`; refuses to overwrite.
    pub fn create(path: &Path) -> Result<Self, WalletError> {
        let mut seed = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut seed);
        write_secret(path, format!("{}\n", hex::encode(seed)).as_bytes())?;
        Ok(Wallet {
            key: SigningKey::from_bytes(&seed),
            path: path.to_path_buf(),
        })
    }

    /// Load the wallet at `path`.
    pub fn load(path: &Path) -> Result<Self, WalletError> {
        let text = read_secret(path)?;
        let seed = crate::ids::parse_hex_array::<32>("wallet seed", text.trim()).map_err(|e| {
            WalletError::Malformed {
                path: path.to_path_buf(),
                detail: e.to_string(),
            }
        })?;
        Ok(Wallet {
            key: SigningKey::from_bytes(&seed),
            path: path.to_path_buf(),
        })
    }

    /// Load the wallet at `path`, creating it first if there is none.
    pub fn load_or_create(path: &Path) -> Result<Self, WalletError> {
        match Wallet::load(path) {
            Err(WalletError::Missing(_)) => match Wallet::create(path) {
                // Lost a race with another process creating it: load theirs.
                Err(WalletError::Exists(_)) => Wallet::load(path),
                r => r,
            },
            r => r,
        }
    }

    /// The seed file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The account public key.
    pub fn public_key(&self) -> AccountPubKey {
        AccountPubKey(self.key.verifying_key().to_bytes())
    }

    /// The account address.
    pub fn address(&self) -> AccountAddress {
        self.public_key().address()
    }

    /// Sign `msg`.
    pub fn sign(&self, msg: &[u8]) -> Sig {
        Sig(self.key.sign(msg).to_bytes())
    }

    /// This wallet's lease key path (see [`lease_key_path`]).
    pub fn lease_key_path(&self) -> PathBuf {
        lease_key_path(&self.path)
    }
}

/// The seed's rule: `~/.xe/wallet.seed` → `~/.xe/wallet.lease_key`,
/// `/tmp/other.seed` → `/tmp/other.lease_key`; a path without `.seed`
/// gets `.lease_key` appended.
pub fn lease_key_path(wallet: &Path) -> PathBuf {
    if wallet.extension().is_some_and(|e| e == "seed") {
        wallet.with_extension("lease_key")
    } else {
        let mut s = wallet.as_os_str().to_owned();
        s.push(".lease_key");
        PathBuf::from(s)
    }
}

/// The per-wallet SSH key (OpenSSH ed25519, 0600, plus `.pub`), whose raw
/// public half is a lease's `access_pub_key`.
pub struct LeaseKey {
    key: ssh_key::PrivateKey,
    path: PathBuf,
}

impl LeaseKey {
    /// Load the key at `path`, or generate and write it (and `.pub`).
    pub fn load_or_create(path: &Path) -> Result<Self, WalletError> {
        match LeaseKey::load(path) {
            Err(WalletError::Missing(_)) => {}
            r => return r,
        }
        let mut seed = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut seed);
        let comment = format!(
            "xe-lease-key@{}",
            path.file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("wallet")
        );
        let key = ssh_key::PrivateKey::new(Ed25519Keypair::from_seed(&seed).into(), comment)
            .map_err(|e| WalletError::Malformed {
                path: path.to_path_buf(),
                detail: e.to_string(),
            })?;
        let text = key
            .to_openssh(LineEnding::LF)
            .map_err(|e| WalletError::Malformed {
                path: path.to_path_buf(),
                detail: e.to_string(),
            })?;
        match write_secret(path, text.as_bytes()) {
            Err(WalletError::Exists(_)) => return LeaseKey::load(path),
            r => r?,
        }
        let me = LeaseKey {
            key,
            path: path.to_path_buf(),
        };
        let pub_path = me.pub_path();
        let _ = fs::remove_file(&pub_path);
        fs::write(&pub_path, format!("{}\n", me.openssh_public())).map_err(io(&pub_path))?;
        Ok(me)
    }

    /// Load an existing key.
    pub fn load(path: &Path) -> Result<Self, WalletError> {
        let text = read_secret(path)?;
        let key = ssh_key::PrivateKey::from_openssh(&text).map_err(|e| WalletError::Malformed {
            path: path.to_path_buf(),
            detail: format!("not an OpenSSH private key: {e}"),
        })?;
        if key.public_key().key_data().ed25519().is_none() {
            return Err(WalletError::Malformed {
                path: path.to_path_buf(),
                detail: "lease keys must be ed25519".into(),
            });
        }
        Ok(LeaseKey {
            key,
            path: path.to_path_buf(),
        })
    }

    /// Private key file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Public key file (`<path>.pub`).
    pub fn pub_path(&self) -> PathBuf {
        let mut s = self.path.as_os_str().to_owned();
        s.push(".pub");
        PathBuf::from(s)
    }

    /// The raw public key a lease carries.
    pub fn access_pub_key(&self) -> AccessPubKey {
        let raw = self
            .key
            .public_key()
            .key_data()
            .ed25519()
            .map(|k| k.0)
            .expect("load() checked that the key is ed25519");
        AccessPubKey(raw)
    }

    /// `ssh-ed25519 AAAA… comment`.
    pub fn openssh_public(&self) -> String {
        self.key.public_key().to_openssh().unwrap_or_default()
    }

    /// The key itself (for russh clients and signing X-Signature).
    pub fn private_key(&self) -> &ssh_key::PrivateKey {
        &self.key
    }

    /// Sign with the lease key (X-Signature for the HTTP tunnel).
    pub fn sign(&self, msg: &[u8]) -> Sig {
        let kp = self
            .key
            .key_data()
            .ed25519()
            .expect("load() checked that the key is ed25519");
        let sk = SigningKey::from_bytes(&kp.private.to_bytes());
        Sig(sk.sign(msg).to_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn lease_key_path_follows_the_seed_table() {
        assert_eq!(
            lease_key_path(Path::new("/root/.xe/wallet.seed")),
            PathBuf::from("/root/.xe/wallet.lease_key")
        );
        assert_eq!(
            lease_key_path(Path::new("/tmp/other.seed")),
            PathBuf::from("/tmp/other.lease_key")
        );
        assert_eq!(
            lease_key_path(Path::new("/tmp/w")),
            PathBuf::from("/tmp/w.lease_key")
        );
    }

    #[test]
    fn create_is_0600_and_refuses_overwrite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("sub/w.seed");
        let w = Wallet::create(&p).expect("create");
        let mode = fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = fs::metadata(p.parent().expect("parent"))
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dmode, 0o700);
        let before = fs::read(&p).expect("read");
        assert!(matches!(Wallet::create(&p), Err(WalletError::Exists(_))));
        assert_eq!(
            fs::read(&p).expect("read"),
            before,
            "refused create changed nothing"
        );
        assert_eq!(Wallet::load(&p).expect("load").address(), w.address());
    }

    #[test]
    fn group_readable_seed_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("w.seed");
        Wallet::create(&p).expect("create");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).expect("chmod");
        let e = Wallet::load(&p).unwrap_err();
        assert!(
            matches!(e, WalletError::Permissions { mode: 0o640, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("chmod 600"));
    }

    #[test]
    fn malformed_seed_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("w.seed");
        write_secret(&p, b"not hex\n").expect("write");
        let e = Wallet::load(&p).unwrap_err();
        assert!(e.to_string().contains("is not a wallet seed"), "{e}");
    }

    #[test]
    fn lease_key_is_generated_once_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("w.lease_key");
        let a = LeaseKey::load_or_create(&p).expect("create");
        let b = LeaseKey::load_or_create(&p).expect("load");
        assert_eq!(a.access_pub_key(), b.access_pub_key());
        let mode = fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let pubtext = fs::read_to_string(a.pub_path()).expect("pub");
        assert!(pubtext.starts_with("ssh-ed25519 "), "{pubtext}");
        assert_eq!(pubtext.trim(), a.openssh_public());
        // The signature made with the SSH key verifies against the raw key.
        let sig = a.sign(b"msg");
        assert!(a.access_pub_key().verify(b"msg", &sig));
    }
}
