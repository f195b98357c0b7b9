//! Watching a booting guest: its console goes into a size-capped log, and
//! it counts as up only once its sshd completes an SSH key exchange with
//! the host key the provider generated for it.
//!
//! An open port proves nothing here: QEMU's user-mode network accepts on
//! the forwarded host port from the moment QEMU starts and only then tries
//! the guest, so every connect succeeds long before sshd runs.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client;
use russh::keys::{PublicKey, PublicKeyOrCertificate};
use tokio::io::AsyncReadExt;
use tokio::process::{Child, ChildStderr};
use tokio::time::Instant;

use crate::{VmError, local_port, logs};

/// The console log (QEMU's stderr and the guest's serial port).
pub(crate) const CONSOLE_LOG: &str = "console.log";

/// A guest writes to its console as fast as it likes; the provider keeps
/// at most twice this per lease (the log and one rotated copy).
pub(crate) const CONSOLE_LOG_MAX: u64 = 1024 * 1024;

/// Pause between two SSH probes while the guest boots.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// One SSH key exchange with a TCG guest takes ~0.1-1 s; this bounds a
/// guest that accepted and then went silent.
const PROBE_TIMEOUT: Duration = Duration::from_secs(15);

/// Copy QEMU's stderr (which carries the serial console: `-serial
/// file:/dev/fd/2`) into `dir/console.log`, rotating to `console.log.1` at
/// [`CONSOLE_LOG_MAX`]. Ends when QEMU closes stderr (it exited).
pub(crate) async fn copy_console(mut stderr: ChildStderr, dir: PathBuf) {
    let path = dir.join(CONSOLE_LOG);
    let rotated = dir.join(format!("{CONSOLE_LOG}.1"));
    let open = |p: &Path| {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(
                |e| tracing::warn!(path = %p.display(), error = %e, "cannot write the console log"),
            )
            .ok()
    };
    let mut file: Option<File> = open(&path);
    let mut written = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match stderr.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if written + n as u64 > CONSOLE_LOG_MAX {
            let _ = fs::rename(&path, &rotated);
            file = open(&path);
            written = 0;
        }
        if let Some(f) = file.as_mut()
            && f.write_all(&buf[..n]).is_ok()
        {
            written += n as u64;
        }
    }
}

/// The last lines of the console log (the rotated copy if the live one is
/// still empty).
pub(crate) fn console_tail(dir: &Path) -> String {
    let live = logs::log_tail(&dir.join(CONSOLE_LOG));
    if live.is_empty() {
        logs::log_tail(&dir.join(format!("{CONSOLE_LOG}.1")))
    } else {
        live
    }
}

/// Records the key the server presents; accepts any, the caller compares.
struct RecordKey(Arc<Mutex<Option<PublicKey>>>);

impl client::Handler for RecordKey {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        if let PublicKeyOrCertificate::PublicKey { key, .. } = key {
            *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(key.clone());
        }
        Ok(true)
    }
}

/// One SSH key exchange with `127.0.0.1:port`, offering only ed25519 host
/// keys; the key the server proved it holds.
async fn probe_host_key(port: u16) -> Result<PublicKey, String> {
    let stream = local_port::connect_local(port)
        .await
        .map_err(|e| e.to_string())?;
    let seen = Arc::new(Mutex::new(None));
    let config = client::Config {
        preferred: russh::Preferred {
            key: std::borrow::Cow::Owned(vec![russh::keys::Algorithm::Ed25519]),
            ..Default::default()
        },
        ..Default::default()
    };
    let handshake = client::connect_stream(Arc::new(config), stream, RecordKey(seen.clone()));
    let handle = tokio::time::timeout(PROBE_TIMEOUT, handshake)
        .await
        .map_err(|_| format!("no SSH key exchange within {PROBE_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    let _ = handle
        .disconnect(russh::Disconnect::ByApplication, "xe boot probe", "")
        .await;
    let key = seen.lock().unwrap_or_else(|p| p.into_inner()).take();
    key.ok_or_else(|| "the server presented no plain public key".to_string())
}

/// Wait until the guest's sshd on `port` proves it holds `expected`, QEMU
/// exits, or `deadline` passes. A different host key fails at once: the
/// image did not take its first-boot data, and waiting will not fix that.
pub(crate) async fn wait_for_sshd(
    child: &mut Child,
    port: u16,
    expected: &str,
    deadline: Instant,
    limit: Duration,
    dir: &Path,
) -> Result<(), VmError> {
    let expected_key = PublicKey::from_openssh(expected).map_err(|e| VmError::Failed {
        what: "parsing the generated host key".into(),
        detail: e.to_string(),
    })?;
    loop {
        if let Some(status) = child.try_wait().map_err(VmError::io("waiting for QEMU"))? {
            return Err(VmError::Failed {
                what: "booting the VM".into(),
                detail: format!(
                    "QEMU exited with {status} before the guest's sshd answered: {}",
                    console_tail(dir)
                ),
            });
        }
        match probe_host_key(port).await {
            Ok(key) if key.key_data() == expected_key.key_data() => return Ok(()),
            Ok(key) => {
                let got = key.to_openssh().unwrap_or_default();
                return Err(VmError::Failed {
                    what: "checking the VM's host key".into(),
                    detail: format!(
                        "the guest's sshd presents {got}, not the key generated for it ({expected}): \
                         the image did not take its first-boot data (does it run cloud-init, or \
                         xe-firstboot from vm/images/build-debian.sh?) | {}",
                        console_tail(dir)
                    ),
                });
            }
            Err(last) if Instant::now() + PROBE_INTERVAL > deadline => {
                return Err(VmError::Timeout {
                    what: format!(
                        "the VM's sshd did not answer with its host key within {limit:?} \
                         (raise --qemu-boot-timeout if the guest is just slow)"
                    ),
                    detail: logs::join_tails(&[format!("last attempt: {last}"), console_tail(dir)]),
                });
            }
            Err(_) => {}
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}
