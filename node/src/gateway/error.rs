//! Why the gateway could not start: its own file so that the parts that
//! fail with it (the host key) need not import the gateway module itself.

use std::path::PathBuf;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A setting is out of range.
    #[error("invalid gateway configuration: {0}")]
    Config(String),
    /// The host key file exists but cannot be used.
    #[error("SSH host key {path}: {detail}", path = .path.display())]
    HostKey {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// The host key is readable by group or others.
    #[error("SSH host key {}", xe_store::secret_file::wrong_mode(.path, *.mode))]
    HostKeyPermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The host key file could not be read or written (a link, not a
    /// regular file, I/O); the error names the file.
    #[error("SSH host key: {0}")]
    HostKeyFile(#[source] xe_store::secret_file::SecretFileError),
    /// The listener is unusable.
    #[error("SSH gateway listener: {0}")]
    Listener(std::io::Error),
}
