//! The node's persistent libp2p identity at `{dataDir}/p2p_key` (0600), so
//! the PeerId survives restarts and directory entries stay valid.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use libp2p::identity::Keypair;

use crate::NetError;

/// Load the key at `path`, or create it on first run.
pub fn load_or_create_keypair(path: &Path) -> Result<Keypair, NetError> {
    let err = |detail: String| NetError::Identity {
        path: path.to_path_buf(),
        detail,
    };
    match fs::read(path) {
        Ok(bytes) => {
            let mode = fs::metadata(path)
                .map_err(|e| err(e.to_string()))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(err(format!(
                    "readable by group/others (mode {:o}); run `chmod 600 {}`",
                    mode & 0o777,
                    path.display()
                )));
            }
            Keypair::from_protobuf_encoding(&bytes)
                .map_err(|e| err(format!("not a libp2p key: {e}")))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let kp = Keypair::generate_ed25519();
            let bytes = kp.to_protobuf_encoding().map_err(|e| err(e.to_string()))?;
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
            }
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| err(e.to_string()))?;
            f.write_all(&bytes).map_err(|e| err(e.to_string()))?;
            f.sync_all().map_err(|e| err(e.to_string()))?;
            Ok(kp)
        }
        Err(e) => Err(err(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_id_is_stable_and_file_is_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("p2p_key");
        let a = load_or_create_keypair(&p)
            .expect("create")
            .public()
            .to_peer_id();
        let b = load_or_create_keypair(&p)
            .expect("load")
            .public()
            .to_peer_id();
        assert_eq!(a, b);
        assert_eq!(
            fs::metadata(&p).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(load_or_create_keypair(&p).is_err());
    }
}
