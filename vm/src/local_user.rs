//! The local user a host backend (`dev`, `sshd`) logs a lease in as.

use std::fs;
use std::path::PathBuf;

/// The user this process runs as, from `/etc/passwd` (falling back to the
/// environment when the uid has no entry, e.g. in minimal containers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalUser {
    /// Numeric user id.
    pub uid: u32,
    /// Login name.
    pub name: String,
    /// Home directory.
    pub home: PathBuf,
    /// Login shell.
    pub shell: PathBuf,
}

impl LocalUser {
    /// The user running this process.
    pub fn current() -> Self {
        let uid = rustix::process::geteuid().as_raw();
        let from_passwd = fs::read_to_string("/etc/passwd").ok().and_then(|text| {
            text.lines().find_map(|line| {
                let f: Vec<&str> = line.split(':').collect();
                (f.len() >= 7 && f[2].parse::<u32>().ok() == Some(uid)).then(|| LocalUser {
                    uid,
                    name: f[0].to_string(),
                    home: PathBuf::from(f[5]),
                    shell: PathBuf::from(f[6]),
                })
            })
        });
        from_passwd.unwrap_or_else(|| LocalUser {
            uid,
            name: std::env::var("USER").unwrap_or_else(|_| {
                if uid == 0 {
                    "root".into()
                } else {
                    uid.to_string()
                }
            }),
            home: std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/")),
            shell: std::env::var_os("SHELL")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/bin/sh")),
        })
    }

    /// Whether this is root.
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
}
