//! Secret files: the one way xe writes and reads a file that holds a key
//! (the wallet seed and lease key, the p2p identity, the gateway's and the
//! VMs' SSH host keys, a VM's first-boot data).
//!
//! - **Written atomically, private from the first byte.** Contents go to a
//!   temporary file in the same directory, created with mode 0600 (never a
//!   moment with wider bits), fsynced, then linked ([`create_new`]: refuses
//!   an existing file) or renamed ([`replace`]) into place. A reader sees
//!   the whole file or none; a failure leaves no partial file behind.
//! - **Checked on read.** [`read`] refuses a file that group or others may
//!   read (as sshd does), a symbolic link and anything but a regular file.
//! - A missing parent directory is created with mode 0700.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The bits a secret file is created with.
pub const SECRET_MODE: u32 = 0o600;

/// The bits a missing parent directory is created with.
pub const SECRET_DIR_MODE: u32 = 0o700;

/// Why a secret file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// [`create_new`] found a file already there (it was left as it was).
    #[error("{} already exists; refusing to overwrite it", .path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// Nothing at the path.
    #[error("{} does not exist", .path.display())]
    Missing {
        /// The file.
        path: PathBuf,
    },
    /// Group or others may read the file.
    #[error("{}", wrong_mode(.path, *.mode))]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The path is a symbolic link; a secret is read only from the file itself.
    #[error(
        "{} is a symbolic link; a secret file must be a regular file (put the file itself there)",
        .path.display()
    )]
    Symlink {
        /// The link.
        path: PathBuf,
    },
    /// The path is a directory, a device, a socket …
    #[error("{} is not a regular file", .path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// An I/O error while doing `op`.
    #[error("{op} {}: {source}", .path.display())]
    Io {
        /// What was being done (`reading`, `writing`, …).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// The one wording for a secret file with wider bits than 0600: what, why,
/// and the command that fixes it.
pub fn wrong_mode(path: &Path, mode: u32) -> String {
    format!(
        "{p} has mode {mode:04o}, readable by group/others; expected 0600: run `chmod 600 {p}` and retry",
        p = path.display()
    )
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SecretFileError + 'a {
    move |source| SecretFileError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Read the secret at `path`: refused if group/others may read it, if it is
/// a symbolic link or not a regular file.
pub fn read(path: &Path) -> Result<Vec<u8>, SecretFileError> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| match (e.kind(), e.raw_os_error()) {
            (std::io::ErrorKind::NotFound, _) => SecretFileError::Missing {
                path: path.to_path_buf(),
            },
            (_, Some(libc::ELOOP)) => SecretFileError::Symlink {
                path: path.to_path_buf(),
            },
            _ => io("opening", path)(e),
        })?;
    // Checked on the open file, not the name: no swap between check and read.
    let meta = f.metadata().map_err(io("inspecting", path))?;
    if !meta.is_file() {
        return Err(SecretFileError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretFileError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).map_err(io("reading", path))?;
    Ok(bytes)
}

/// [`read`], as UTF-8 text.
pub fn read_to_string(path: &Path) -> Result<String, SecretFileError> {
    String::from_utf8(read(path)?).map_err(|e| SecretFileError::Io {
        op: "reading",
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error()),
    })
}

/// Write a new secret file; [`SecretFileError::Exists`] (and nothing
/// changed) if one is there already, e.g. written by a concurrent creator.
pub fn create_new(path: &Path, contents: &[u8]) -> Result<(), SecretFileError> {
    let mut staged = Staged::begin(path)?;
    staged.write_all(contents)?;
    staged.commit_new()
}

/// Write a secret file, replacing whatever is at `path` in one step.
pub fn replace(path: &Path, contents: &[u8]) -> Result<(), SecretFileError> {
    let mut staged = Staged::begin(path)?;
    staged.write_all(contents)?;
    staged.commit_replace()
}

/// A secret being written: a private temporary file beside its final path.
/// For contents another program writes (hand it [`Staged::file`]); dropping
/// it without a commit removes the temporary file.
#[derive(Debug)]
pub struct Staged {
    file: File,
    tmp: PathBuf,
    dest: PathBuf,
    done: bool,
}

/// Tells apart the temporary files of concurrent writers in one process.
static NEXT_TMP: AtomicU64 = AtomicU64::new(0);

impl Staged {
    /// Create the temporary file (mode 0600, exclusive, not through a link)
    /// next to `path`, and `path`'s directory (0700) if it is missing.
    pub fn begin(path: &Path) -> Result<Self, SecretFileError> {
        let dir = parent(path);
        if !dir.as_os_str().is_empty() && !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(SECRET_DIR_MODE)
                .create(dir)
                .map_err(io("creating directory", dir))?;
        }
        let name = path.file_name().ok_or_else(|| SecretFileError::NotAFile {
            path: path.to_path_buf(),
        })?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(
            ".tmp{}.{}",
            std::process::id(),
            NEXT_TMP.fetch_add(1, Ordering::Relaxed)
        ));
        let tmp = dir.join(tmp_name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(SECRET_MODE)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(io("creating", &tmp))?;
        Ok(Staged {
            file,
            tmp,
            dest: path.to_path_buf(),
            done: false,
        })
    }

    /// The temporary file, to write into or hand to a child process.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Append `bytes`.
    pub fn write_all(&mut self, bytes: &[u8]) -> Result<(), SecretFileError> {
        self.file.write_all(bytes).map_err(io("writing", &self.tmp))
    }

    /// Put the file in place unless one is there ([`SecretFileError::Exists`]).
    pub fn commit_new(mut self) -> Result<(), SecretFileError> {
        self.sync()?;
        // A hard link never replaces an existing name: two creators racing
        // both finish, one with `Exists`, and neither's key is lost.
        match fs::hard_link(&self.tmp, &self.dest) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(SecretFileError::Exists {
                    path: self.dest.clone(),
                });
            }
            Err(e) => return Err(io("linking", &self.dest)(e)),
        }
        self.finish()
    }

    /// Put the file in place, replacing what is there.
    pub fn commit_replace(mut self) -> Result<(), SecretFileError> {
        self.sync()?;
        fs::rename(&self.tmp, &self.dest).map_err(io("renaming into", &self.dest))?;
        self.finish()
    }

    fn sync(&mut self) -> Result<(), SecretFileError> {
        self.file.sync_all().map_err(io("syncing", &self.tmp))
    }

    fn finish(mut self) -> Result<(), SecretFileError> {
        self.done = true;
        let _ = fs::remove_file(&self.tmp);
        // Make the new name durable. Best effort: some file systems refuse
        // to fsync a directory, and the file's own data is already synced.
        if let Ok(d) = File::open(parent(&self.dest)) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests;
