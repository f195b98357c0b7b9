//! Small pieces shared by the backends: access-key validation, host keys,
//! log tails, waiting for a port, process trees and the local user.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::RngCore;
use russh::keys::ssh_key::{self, LineEnding, PrivateKey, private::Ed25519Keypair};
use tokio::net::TcpStream;
use tokio::time::Instant;
use xe_store::secret_file::{self, SecretFileError};
use xe_store::{AccessPubKey, LeaseHash};

use crate::VmError;

/// How long one TCP connect to a local VM port may take. Loopback connects
/// either succeed or are refused at once; this only bounds a wedged stack.
pub(crate) const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause between two connect attempts while waiting for a VM's sshd.
const PORT_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// How much of a log goes into an error: enough for the last few lines of a
/// QEMU or sshd failure, small enough for a log line and an HTTP answer.
const LOG_TAIL_BYTES: u64 = 2048;

/// Parse an access key given as text: 64 hex characters (the ledger's form)
/// or one OpenSSH line `ssh-ed25519 AAAA… [comment]` whose comment is a
/// single plain word (`[A-Za-z0-9@._+-]`). Anything else — other key types,
/// several lines, quotes or shell syntax, bytes that are not a point on the
/// curve — is [`VmError::InvalidKey`]. Only the 32 key bytes are kept; the
/// comment never reaches a file.
pub fn parse_access_key(text: &str) -> Result<AccessPubKey, VmError> {
    let key = if let Ok(k) = text.parse::<AccessPubKey>() {
        k
    } else {
        let mut words = text.split(' ');
        let (Some("ssh-ed25519"), Some(_), comment, None) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            return Err(VmError::InvalidKey);
        };
        // Harmless once dropped, but input like this is an attack or a
        // mistake either way: refuse it rather than guess.
        if comment.is_some_and(|c| {
            !c.chars()
                .all(|c| c.is_ascii_alphanumeric() || "@._+-".contains(c))
        }) {
            return Err(VmError::InvalidKey);
        }
        let pk = ssh_key::PublicKey::from_openssh(text).map_err(|_| VmError::InvalidKey)?;
        let raw = pk.key_data().ed25519().ok_or(VmError::InvalidKey)?;
        AccessPubKey(raw.0)
    };
    validate_access_key(&key)?;
    Ok(key)
}

/// Refuse 32 bytes that are not an ed25519 point: sshd would ignore such a
/// line and russh could not verify with it, so the lease could never be used.
pub(crate) fn validate_access_key(key: &AccessPubKey) -> Result<(), VmError> {
    if key.is_valid_point() {
        Ok(())
    } else {
        Err(VmError::InvalidKey)
    }
}

/// The `authorized_keys` line for a lease, built only from the parsed 32
/// bytes and the lease's hex (so it cannot carry anything but base64, hex
/// and fixed text).
pub(crate) fn authorized_key_line(
    lease: &LeaseHash,
    key: &AccessPubKey,
) -> Result<String, VmError> {
    validate_access_key(key)?;
    let line = key.to_openssh(&format!("xe-lease-{}", lease.short()));
    if !line.starts_with("ssh-ed25519 ") || line.contains(['\n', '\r', '\'', '"']) {
        return Err(VmError::InvalidKey);
    }
    Ok(line)
}

/// Load the ed25519 host key at `path`, or create it (mode 0600) if absent.
/// Keeping it on disk is what lets `recover` restart with the same key. A
/// [`secret_file`]: a key group or others may read is refused, as sshd does.
pub(crate) fn load_or_create_host_key(path: &Path) -> Result<PrivateKey, VmError> {
    match secret_file::read_to_string(path) {
        Ok(text) => PrivateKey::from_openssh(&text).map_err(|e| VmError::Failed {
            what: format!("reading host key {}", path.display()),
            detail: e.to_string(),
        }),
        Err(SecretFileError::Missing { .. }) => {
            let mut seed = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut seed);
            let key = PrivateKey::new(Ed25519Keypair::from_seed(&seed).into(), "xe-vm-host")
                .map_err(|e| VmError::Failed {
                    what: "generating host key".into(),
                    detail: e.to_string(),
                })?;
            let text = key
                .to_openssh(LineEnding::LF)
                .map_err(|e| VmError::Failed {
                    what: "encoding host key".into(),
                    detail: e.to_string(),
                })?;
            match secret_file::create_new(path, text.as_bytes()) {
                Ok(()) => {}
                // Created meanwhile by another caller: use that one.
                Err(SecretFileError::Exists { .. }) => return load_or_create_host_key(path),
                Err(e) => return Err(e.into()),
            }
            let public = host_key_line(&key)?;
            secret_file::replace(
                &path.with_extension("pub"),
                format!("{public}\n").as_bytes(),
            )?;
            Ok(key)
        }
        Err(e) => Err(e.into()),
    }
}

/// A VM's host key as text for first-boot data: generated by the provider
/// before the VM exists, handed to the guest, signed into the accept.
#[derive(Clone, Debug)]
pub struct VmHostKey {
    /// OpenSSH private key encoding (our own: base64 lines between
    /// `-----BEGIN/END OPENSSH PRIVATE KEY-----`).
    pub private: String,
    /// `ssh-ed25519 AAAA…` (no comment).
    pub public: String,
}

/// [`load_or_create_host_key`], as the two texts a guest needs.
pub(crate) fn load_or_create_vm_host_key(path: &Path) -> Result<VmHostKey, VmError> {
    let key = load_or_create_host_key(path)?;
    let private = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| VmError::Failed {
            what: "encoding host key".into(),
            detail: e.to_string(),
        })?;
    Ok(VmHostKey {
        private: private.to_string(),
        public: host_key_line(&key)?,
    })
}

/// `ssh-ed25519 AAAA…` (no comment) of a host key.
pub(crate) fn host_key_line(key: &PrivateKey) -> Result<String, VmError> {
    public_line(key.public_key())
}

/// Normalise a host public key line read from a VM: must be one ed25519
/// key; returned without its comment.
pub(crate) fn normalize_host_key_line(text: &str) -> Result<String, VmError> {
    let bad = |detail: String| VmError::Failed {
        what: "reading the VM's ed25519 host key".into(),
        detail,
    };
    let line = text.trim();
    if line.contains(['\n', '\r']) {
        return Err(bad(format!("expected one line, got {:?}", clip(line, 200))));
    }
    let pk = ssh_key::PublicKey::from_openssh(line)
        .map_err(|e| bad(format!("{e}: {:?}", clip(line, 200))))?;
    if pk.key_data().ed25519().is_none() {
        return Err(bad(format!("not an ed25519 key: {:?}", clip(line, 200))));
    }
    public_line(&pk)
}

fn public_line(pk: &ssh_key::PublicKey) -> Result<String, VmError> {
    ssh_key::PublicKey::new(pk.key_data().clone(), "")
        .to_openssh()
        .map(|s| s.trim_end().to_string())
        .map_err(|e| VmError::Failed {
            what: "encoding host public key".into(),
            detail: e.to_string(),
        })
}

fn clip(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Create `dir` (and parents) with mode 0700 for its last component.
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), VmError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(VmError::io(format!("creating {}", dir.display())))
}

/// The last lines of a log file (at most [`LOG_TAIL_BYTES`]), prefixed with
/// its name; empty if the file is missing or empty.
pub(crate) fn log_tail(path: &Path) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(LOG_TAIL_BYTES);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    if f.take(LOG_TAIL_BYTES).read_to_end(&mut buf).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&buf);
    // Drop a partial first line when we started mid-file.
    let text = if start > 0 {
        text.split_once('\n').map(|(_, rest)| rest).unwrap_or(&text)
    } else {
        &text
    };
    let text = text.trim();
    if text.is_empty() {
        String::new()
    } else {
        format!("[{}] {}", path.display(), text)
    }
}

/// Join non-empty log tails for an error's detail.
pub(crate) fn join_tails(parts: &[String]) -> String {
    parts
        .iter()
        .filter(|p| !p.is_empty())
        .cloned()
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Connect to `127.0.0.1:port`.
pub(crate) async fn connect_local(port: u16) -> std::io::Result<TcpStream> {
    match tokio::time::timeout(
        LOCAL_CONNECT_TIMEOUT,
        TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("connect to 127.0.0.1:{port} timed out"),
        )),
    }
}

/// Wait until `127.0.0.1:port` accepts a TCP connection, or `deadline`.
pub(crate) async fn wait_for_port(port: u16, deadline: Instant, what: &str) -> Result<(), VmError> {
    loop {
        let last_err = match connect_local(port).await {
            Ok(_) => return Ok(()),
            Err(e) => e.to_string(),
        };
        if Instant::now() + PORT_POLL_INTERVAL > deadline {
            return Err(VmError::Timeout {
                what: format!("{what}: 127.0.0.1:{port} never accepted a connection"),
                detail: format!("last error: {last_err}"),
            });
        }
        tokio::time::sleep(PORT_POLL_INTERVAL).await;
    }
}

/// A port that was free on 127.0.0.1 a moment ago. For programs that must
/// bind themselves (sshd); callers retry if they lose the race.
pub(crate) fn free_local_port() -> Result<u16, VmError> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0))
        .map_err(VmError::io("binding 127.0.0.1:0"))?;
    Ok(l.local_addr()
        .map_err(VmError::io("reading a bound port"))?
        .port())
}

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

/// Resolve a program: an explicit path must exist; a bare name is looked up
/// in `extra` directories first, then `$PATH`.
pub(crate) fn find_program(given: Option<&Path>, name: &str, extra: &[&str]) -> Option<PathBuf> {
    let is_exec = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    match given {
        Some(p) if p.components().count() > 1 || p.is_absolute() => {
            let p = std::path::absolute(p).ok()?;
            is_exec(&p).then_some(p)
        }
        other => {
            let name = other
                .map(|p| p.as_os_str().to_owned())
                .unwrap_or_else(|| name.into());
            let path_dirs = std::env::var_os("PATH").unwrap_or_default();
            extra
                .iter()
                .map(PathBuf::from)
                .chain(std::env::split_paths(&path_dirs))
                .map(|d| d.join(&name))
                .find(|p| p.is_absolute() && is_exec(p))
        }
    }
}

/// `/proc/<pid>/cmdline` with NULs as spaces, if the process exists.
pub(crate) fn proc_cmdline(pid: u32) -> Option<String> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(String::from_utf8_lossy(&raw).replace('\0', " "))
}

/// Every process whose parent chain leads to `root` (not `root` itself),
/// read from `/proc`. Used to end an sshd's sessions with it: the
/// per-connection sshd processes are its children, the users' shells theirs.
fn descendants(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // "pid (comm) state ppid …": comm may contain spaces and ')'.
            let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                continue;
            };
            if let Some(ppid) = after
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse::<u32>().ok())
            {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
            // A pid cannot be its own ancestor, but guard the walk anyway.
            if c != root && !out.contains(&c) {
                out.push(c);
                stack.push(c);
            }
        }
    }
    out
}

/// Send `sig` to one pid, ignoring "no such process".
fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(p) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(p, sig);
    }
}

/// How long a killed process that is not our child may take to die.
const DEATH_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether `pid` has exited (gone, or a zombie nobody reaped yet).
pub(crate) fn is_dead(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

/// Kill what an earlier run of the node left running (crash, kill -9): the
/// pid recorded in `pid_file`, if `is_ours(pid)` says that process is still
/// the one we started (pids are reused). The record is removed either way.
pub(crate) async fn kill_recorded(pid_file: &Path, what: &str, is_ours: impl Fn(u32) -> bool) {
    let Some(pid) = fs::read_to_string(pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    else {
        return;
    };
    if is_ours(pid) {
        tracing::warn!(pid, file = %pid_file.display(), "killing {what} left by an earlier run");
        kill_tree_and_wait(pid).await;
    }
    let _ = fs::remove_file(pid_file);
}

/// [`kill_tree`], then wait (bounded) until `pid` is dead: SIGKILL is
/// delivered asynchronously, and a port is only free once the process is.
pub(crate) async fn kill_tree_and_wait(pid: u32) {
    kill_tree(pid);
    let deadline = Instant::now() + DEATH_TIMEOUT;
    while !is_dead(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Kill `pid` and everything below it. The root is stopped first so that it
/// cannot fork new children while the tree is read (a fork racing with the
/// stop is restarted by the kernel, so no child escapes the walk).
pub(crate) fn kill_tree(pid: u32) {
    signal(pid, rustix::process::Signal::STOP);
    for child in descendants(pid) {
        signal(child, rustix::process::Signal::KILL);
    }
    signal(pid, rustix::process::Signal::KILL);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// 32 bytes that fail point decompression (about half of all do).
    pub(crate) fn not_a_point() -> AccessPubKey {
        (0..=255u8)
            .map(|i| AccessPubKey([i; 32]))
            .find(|k| !k.is_valid_point())
            .expect("an invalid point among 256 candidates")
    }

    fn key() -> (AccessPubKey, String) {
        let kp = Ed25519Keypair::from_seed(&[3; 32]);
        let raw = AccessPubKey(kp.public.0);
        let line = raw.to_openssh("me@laptop");
        (raw, line)
    }

    #[test]
    fn access_key_text_forms_parse_to_the_same_bytes() {
        let (raw, line) = key();
        assert_eq!(parse_access_key(&line).expect("line"), raw);
        assert_eq!(parse_access_key(&raw.to_hex()).expect("hex"), raw);
        let bare = line.rsplit_once(' ').expect("comment").0;
        assert_eq!(parse_access_key(bare).expect("no comment"), raw);
    }

    #[test]
    fn authorized_key_line_is_built_from_bytes_only() {
        let (raw, _) = key();
        let lease = LeaseHash([0xab; 32]);
        let line = authorized_key_line(&lease, &raw).expect("line");
        assert_eq!(line, raw.to_openssh("xe-lease-abababab"));
        assert!(matches!(
            authorized_key_line(&lease, &not_a_point()),
            Err(VmError::InvalidKey)
        ));
    }

    #[test]
    fn host_key_lines_are_normalised() {
        let (raw, line) = key();
        let bare = normalize_host_key_line(&format!("{line}\n")).expect("one key");
        assert_eq!(bare, raw.to_openssh("").trim_end());
        assert!(normalize_host_key_line(&format!("{line}\n{line}")).is_err());
        assert!(normalize_host_key_line("ssh-rsa AAAAB3NzaC1yc2E").is_err());
        assert!(normalize_host_key_line("").is_err());
    }

    #[test]
    fn host_key_is_created_once_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("host_key");
        let a = load_or_create_host_key(&p).expect("create");
        let b = load_or_create_host_key(&p).expect("load");
        assert_eq!(host_key_line(&a).expect("a"), host_key_line(&b).expect("b"));
        assert_eq!(
            fs::metadata(&p).expect("meta").permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn host_key_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("host_key");
        load_or_create_host_key(&p).expect("create");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = load_or_create_host_key(&p).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }

    #[test]
    fn log_tail_keeps_the_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("x.log");
        assert_eq!(log_tail(&p), "");
        let body: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        fs::write(&p, body).expect("write");
        let t = log_tail(&p);
        assert!(t.ends_with("line 999"), "{t}");
        assert!(!t.contains("line 1\n") && t.len() < 2200, "{}", t.len());
    }
}
