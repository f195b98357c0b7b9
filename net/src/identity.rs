//! The node's persistent libp2p identity at `{dataDir}/p2p_key` (0600), so
//! the PeerId survives restarts and directory entries stay valid.

use std::path::Path;

use libp2p::identity::Keypair;
use xe_store::secret_file::{self, SecretFileError};

use crate::NetError;

/// Load the key at `path`, or create it on first run. Written and read as a
/// [`secret_file`]: a key group or others may read is refused.
pub fn load_or_create_keypair(path: &Path) -> Result<Keypair, NetError> {
    let err = |detail: String| NetError::Identity {
        path: path.to_path_buf(),
        detail,
    };
    match secret_file::read(path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes)
            .map_err(|e| err(format!("not a libp2p key: {e}"))),
        Err(SecretFileError::Missing { .. }) => {
            let kp = Keypair::generate_ed25519();
            let bytes = kp.to_protobuf_encoding().map_err(|e| err(e.to_string()))?;
            match secret_file::create_new(path, &bytes) {
                Ok(()) => Ok(kp),
                // Another process created it first: use theirs.
                Err(SecretFileError::Exists { .. }) => load_or_create_keypair(path),
                Err(e) => Err(NetError::IdentityFile(e)),
            }
        }
        Err(e) => Err(NetError::IdentityFile(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

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
