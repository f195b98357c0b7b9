//! The `sshd` backend: one real OpenSSH `sshd -D -e -f <config>` per lease,
//! bound to `127.0.0.1:<free port>`, with its own ed25519 host key and an
//! `authorized_keys` holding only the lease's key.
//!
//! The "VM" is the host itself (or the container the provider runs in): a
//! lease gets a login as the node's user — `root` when the node runs as
//! root. Per-lease files live in `{state_dir}/{lease hex}/`:
//!
//! | file | why |
//! |---|---|
//! | `host_key`, `host_key.pub` | kept across restarts so `recover` serves the same key |
//! | `authorized_keys` | exactly the lease key, rewritten on every start |
//! | `sshd_config` | rendered by [`render_config`] on every start |
//! | `sshd.log` | sshd's stderr (`-e`); its tail goes into errors |
//! | `sshd.pid` | our record of the listener, to find it after a crash |

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::time::Instant;
use tracing::{info, warn};
use xe_store::secret_file;

use crate::local::LocalBackend;
use crate::local_user::LocalUser;
use crate::registry::Registry;
use crate::{
    ProvisionRequest, VmError, VmInfo, VmStatus, keys, local_port, logs, private_dir, process,
};

/// How long a fresh sshd may take to log "Server listening". It needs a few
/// milliseconds; the margin covers a loaded CI machine.
const SSHD_READY_TIMEOUT: Duration = Duration::from_secs(15);

/// How often the log is checked while waiting for sshd.
const SSHD_READY_POLL: Duration = Duration::from_millis(20);

/// The free port is chosen before sshd binds it, so another process can
/// take it in between; sshd then exits with "Address already in use" and
/// we try another port this many times in all.
const BIND_ATTEMPTS: usize = 4;

/// How long a killed sshd may take to be reaped.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);

const HOST_KEY: &str = "host_key";
const AUTHORIZED_KEYS: &str = "authorized_keys";
const CONFIG: &str = "sshd_config";
const LOG: &str = "sshd.log";
const PID: &str = "sshd.pid";

/// Configuration of the sshd backend.
#[derive(Clone, Debug)]
pub struct SshdConfig {
    /// Where per-lease directories go (created 0700 if missing).
    pub state_dir: PathBuf,
    /// The sshd binary; `None` looks in `/usr/sbin`, `/usr/local/sbin`,
    /// `/sbin` and `$PATH`.
    pub sshd_path: Option<PathBuf>,
}

/// A running per-lease sshd.
pub(crate) struct SshdProc {
    child: Child,
    dir: PathBuf,
}

/// The sshd backend. See the module docs.
pub struct SshdManager {
    state_dir: PathBuf,
    sshd: PathBuf,
    user: LocalUser,
    registry: Registry<SshdProc>,
}

impl SshdManager {
    /// Find sshd and prepare `state_dir`. [`VmError::ToolMissing`] if sshd
    /// is not installed.
    pub fn new(config: SshdConfig) -> Result<Self, VmError> {
        let sshd = process::find_program(
            config.sshd_path.as_deref(),
            "sshd",
            &["/usr/sbin", "/usr/local/sbin", "/sbin"],
        )
        .ok_or_else(|| VmError::ToolMissing {
            tool: "sshd".into(),
            hint: match &config.sshd_path {
                Some(p) => format!("{} is not an executable file; install OpenSSH server (`apt-get install openssh-server`) or fix the path", p.display()),
                None => "install OpenSSH server (`apt-get install openssh-server` on Debian/Ubuntu), or give its path".into(),
            },
        })?;
        private_dir::create(&config.state_dir)?;
        // sshd re-executes itself and resolves config paths from `/`, so
        // every path we hand it must be absolute.
        let state_dir = fs::canonicalize(&config.state_dir).map_err(VmError::io(format!(
            "resolving {}",
            config.state_dir.display()
        )))?;
        check_config_path(&state_dir)?;
        Ok(SshdManager {
            state_dir,
            sshd,
            user: LocalUser::current(),
            registry: Registry::new("sshd"),
        })
    }
}

/// Why sshd did not come up.
enum Ready {
    /// The port was taken by someone else; try another.
    BindRace,
    Error(VmError),
}

/// Wait until sshd logs that it listens on `port` (then check that the port
/// accepts), or exits, or the deadline passes.
async fn wait_ready(child: &mut Child, log: &Path, port: u16) -> Result<(), Ready> {
    let deadline = Instant::now() + SSHD_READY_TIMEOUT;
    // sshd logs this at INFO right after listen(2) succeeded.
    let listening = format!("Server listening on 127.0.0.1 port {port}.");
    loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|e| Ready::Error(VmError::io("waiting for sshd")(e)))?
        {
            let text = fs::read_to_string(log).unwrap_or_default();
            if text.contains("Address already in use") || text.contains("Cannot bind any address") {
                return Err(Ready::BindRace);
            }
            return Err(Ready::Error(VmError::Failed {
                what: "starting sshd".into(),
                detail: format!("sshd exited with {status}: {}", logs::log_tail(log)),
            }));
        }
        if fs::read_to_string(log)
            .unwrap_or_default()
            .contains(&listening)
        {
            return match local_port::connect_local(port).await {
                Ok(_) => Ok(()),
                Err(e) => Err(Ready::Error(VmError::Failed {
                    what: "connecting to the new sshd".into(),
                    detail: format!("127.0.0.1:{port}: {e}; {}", logs::log_tail(log)),
                })),
            };
        }
        if Instant::now() >= deadline {
            return Err(Ready::Error(VmError::Timeout {
                what: format!(
                    "sshd did not listen on 127.0.0.1:{port} within {SSHD_READY_TIMEOUT:?}"
                ),
                detail: logs::log_tail(log),
            }));
        }
        tokio::time::sleep(SSHD_READY_POLL).await;
    }
}

/// Kill an sshd with its sessions and reap it.
async fn stop(mut proc: SshdProc) {
    if let Some(pid) = proc.child.id() {
        process::kill_tree(pid);
    }
    // kill_tree already sent SIGKILL; this covers a pid we could not read.
    let _ = proc.child.start_kill();
    if tokio::time::timeout(REAP_TIMEOUT, proc.child.wait())
        .await
        .is_err()
    {
        warn!(dir = %proc.dir.display(), "sshd was not reaped in time");
    }
    let _ = fs::remove_file(proc.dir.join(PID));
}

/// Kill an sshd left by an earlier run of the node, if that process still
/// runs our config.
async fn kill_stale(dir: &Path) {
    let config = dir.join(CONFIG);
    process::kill_recorded(&dir.join(PID), "an sshd", |pid| {
        process::proc_cmdline(pid).is_some_and(|c| c.contains(&*config.to_string_lossy()))
    })
    .await;
}

/// Debian's sshd refuses to start as root without its privilege separation
/// directory, which only the distribution's service unit creates.
fn ensure_privsep_dir() -> Result<(), VmError> {
    let dir = Path::new("/run/sshd");
    if !dir.exists() {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(VmError::io(
                "creating /run/sshd (sshd's privilege separation directory)",
            ))?;
    }
    Ok(())
}

/// sshd_config words are split on whitespace and `"`; `%` starts a token in
/// AuthorizedKeysFile. Paths are quoted, so refuse only what quoting cannot
/// carry.
fn check_config_path(p: &Path) -> Result<(), VmError> {
    let s = p
        .to_str()
        .ok_or_else(|| VmError::InvalidConfig(format!("{} is not UTF-8", p.display())))?;
    if s.chars()
        .any(|c| c.is_control() || matches!(c, '"' | '\\' | '%'))
    {
        return Err(VmError::InvalidConfig(format!(
            "state dir {s:?} contains a character sshd_config cannot carry (quote, backslash, %, control)"
        )));
    }
    Ok(())
}

/// What the per-lease sshd negotiates, explicitly: ssh-audit flagged
/// OpenSSH's defaults for finite-field and NIST-curve key exchange,
/// encrypt-and-MAC, SHA-1 and UMAC-64 MACs. Post-quantum hybrid and X25519
/// only (OpenSSH 9.2 in Debian 12 has `sntrup761x25519-sha512@openssh.com`;
/// the plain name only arrived in 9.9, so it is left out); AEAD and CTR
/// ciphers; encrypt-then-MAC SHA-2; ed25519 host keys (the only kind the
/// backend creates). The gateway's own client (`join.rs`) and russh-based
/// clients speak all of this.
const ALGORITHMS: &str = "\
KexAlgorithms sntrup761x25519-sha512@openssh.com,curve25519-sha256,curve25519-sha256@libssh.org
Ciphers chacha20-poly1305@openssh.com,aes256-gcm@openssh.com,aes128-gcm@openssh.com,aes256-ctr,aes128-ctr
MACs hmac-sha2-256-etm@openssh.com,hmac-sha2-512-etm@openssh.com
HostKeyAlgorithms ssh-ed25519
";

/// The per-lease sshd_config. Everything is explicit because `-f` replaces
/// the system config entirely.
pub fn render_config(port: u16, dir: &Path, user: &str) -> String {
    let q = |name: &str| format!("\"{}\"", dir.join(name).display());
    // AllowUsers takes patterns; only plain names are passed through.
    let allow = if !user.is_empty()
        && user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        format!("AllowUsers {user}\n")
    } else {
        String::new()
    };
    format!(
        "# Written by xe for one lease; regenerated on every start.\n\
         ListenAddress 127.0.0.1:{port}\n\
         HostKey {host_key}\n\
         AuthorizedKeysFile {authorized_keys}\n\
         {allow}\
         PidFile none\n\
         UsePAM no\n\
         PubkeyAuthentication yes\n\
         AuthenticationMethods publickey\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         PermitRootLogin prohibit-password\n\
         # Our files are written 0600 by us; the state dir may sit below a\n\
         # world-writable directory (/tmp) that StrictModes would reject.\n\
         StrictModes no\n\
         PermitUserEnvironment no\n\
         X11Forwarding no\n\
         PermitTunnel no\n\
         PrintMotd no\n\
         PrintLastLog no\n\
         LogLevel INFO\n\
         Subsystem sftp internal-sftp\n\
         {algorithms}",
        algorithms = ALGORITHMS,
        host_key = q(HOST_KEY),
        authorized_keys = q(AUTHORIZED_KEYS),
    )
}

#[async_trait::async_trait]
impl LocalBackend for SshdManager {
    type Runtime = SshdProc;
    const NAME: &'static str = "sshd";
    const RUNTIME: &'static str = "sshd";

    fn registry(&self) -> &Registry<SshdProc> {
        &self.registry
    }

    fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    async fn start(
        &self,
        req: &ProvisionRequest,
        recovering: bool,
    ) -> Result<(VmInfo, SshdProc), VmError> {
        let dir = self.lease_dir(&req.lease);
        let key_path = dir.join(HOST_KEY);
        if recovering && !key_path.exists() {
            return Err(VmError::Failed {
                what: "recovering the lease's sshd".into(),
                detail: format!(
                    "{} is gone; not starting with a new host key",
                    key_path.display()
                ),
            });
        }
        let key_line = keys::authorized_key_line(&req.lease, &req.access_pub_key)?;
        private_dir::create(&dir)?;
        kill_stale(&dir).await;
        let host_key = keys::host_key_line(&keys::load_or_create_host_key(&key_path)?)?;
        secret_file::replace(
            &dir.join(AUTHORIZED_KEYS),
            format!("{key_line}\n").as_bytes(),
        )?;
        if self.user.is_root() {
            ensure_privsep_dir()?;
        }

        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = local_port::free_local_port()?;
            let config = render_config(port, &dir, &self.user.name);
            secret_file::replace(&dir.join(CONFIG), config.as_bytes())?;
            let log_path = dir.join(LOG);
            let log = fs::File::create(&log_path)
                .map_err(VmError::io(format!("creating {}", log_path.display())))?;
            let child = Command::new(&self.sshd)
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(dir.join(CONFIG))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                // If the manager is dropped without shutdown, don't leave
                // the listener behind.
                .kill_on_drop(true)
                .spawn()
                .map_err(VmError::io(format!("running {}", self.sshd.display())))?;
            let mut proc = SshdProc {
                child,
                dir: dir.clone(),
            };
            if let Some(pid) = proc.child.id() {
                secret_file::replace(&dir.join(PID), format!("{pid}\n").as_bytes())?;
            }
            match wait_ready(&mut proc.child, &log_path, port).await {
                Ok(()) => {
                    info!(lease = %req.lease.short(), port, "sshd running");
                    let mut info = VmInfo::new(req.lease, "sshd", VmStatus::Running);
                    info.ssh_port = Some(port);
                    info.host_key = Some(host_key);
                    return Ok((info, proc));
                }
                Err(Ready::BindRace) if attempt < BIND_ATTEMPTS => {
                    warn!(lease = %req.lease.short(), port, "port taken before sshd bound it; trying another");
                    stop(proc).await;
                }
                Err(Ready::BindRace) => {
                    let detail = logs::log_tail(&log_path);
                    stop(proc).await;
                    return Err(VmError::Failed {
                        what: format!("starting sshd ({BIND_ATTEMPTS} ports tried)"),
                        detail,
                    });
                }
                Err(Ready::Error(e)) => {
                    stop(proc).await;
                    return Err(e);
                }
            }
        }
    }

    async fn stop(&self, runtime: SshdProc) {
        stop(runtime).await;
    }

    async fn clear_leftovers(&self, dir: &Path) {
        kill_stale(dir).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_locked_down() {
        let c = render_config(2222, Path::new("/var/lib/xe/sshd/ab"), "root");
        for line in [
            "ListenAddress 127.0.0.1:2222",
            "HostKey \"/var/lib/xe/sshd/ab/host_key\"",
            "AuthorizedKeysFile \"/var/lib/xe/sshd/ab/authorized_keys\"",
            "AllowUsers root",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "PidFile none",
            "PermitRootLogin prohibit-password",
            "KexAlgorithms sntrup761x25519-sha512@openssh.com,curve25519-sha256,curve25519-sha256@libssh.org",
            "MACs hmac-sha2-256-etm@openssh.com,hmac-sha2-512-etm@openssh.com",
            "HostKeyAlgorithms ssh-ed25519",
        ] {
            assert!(c.lines().any(|l| l == line), "missing {line:?} in\n{c}");
        }
    }

    #[test]
    fn odd_user_names_get_no_allow_users_pattern() {
        let c = render_config(1, Path::new("/x"), "a*b");
        assert!(!c.contains("AllowUsers"), "{c}");
    }

    #[test]
    fn config_paths_that_sshd_cannot_carry_are_refused() {
        assert!(check_config_path(Path::new("/tmp/a b")).is_ok());
        for bad in ["/tmp/a\"b", "/tmp/a%h", "/tmp/a\nb"] {
            assert!(
                matches!(
                    check_config_path(Path::new(bad)),
                    Err(VmError::InvalidConfig(_))
                ),
                "{bad:?}"
            );
        }
    }
}
