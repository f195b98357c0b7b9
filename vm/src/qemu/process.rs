//! One QEMU process as a handle ([`QemuVm`]): its stop, and a stale one's
//! removal. Its command line and start are in `launch.rs`.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::process::Child;
use tracing::warn;

use super::qmp;

/// The QEMU's pid file in a lease's directory.
pub(super) const PID: &str = "qemu.pid";

/// A guest asked to power down takes 4-10 s under TCG (systemd stopping
/// its units); past this it is told to quit. Kept below the 30 s a
/// service manager should allow a node's stop (README).
const POWERDOWN_TIMEOUT: Duration = Duration::from_secs(15);

/// `quit` ends QEMU at once; past this it is killed.
pub(super) const QUIT_TIMEOUT: Duration = Duration::from_secs(5);

/// A running QEMU.
pub(crate) struct QemuVm {
    pub(super) child: Child,
    pub(super) qmp: Option<qmp::Qmp>,
    /// Copies the console, then reports an exit nobody asked for.
    pub(super) console: tokio::task::JoinHandle<()>,
    /// Set before we stop it: its exit is then expected.
    pub(super) stopping: Arc<AtomicBool>,
    pub(super) dir: PathBuf,
}

/// Stop a QEMU: with `graceful`, a bounded guest power-down first; then
/// `quit`; then SIGKILL by pid. Always reaps it.
pub(super) async fn stop(mut vm: QemuVm, graceful: bool) {
    vm.stopping.store(true, Ordering::Release);
    let pid = vm.child.id();
    let exited = |child: &mut Child| child.try_wait().map(|s| s.is_some()).unwrap_or(true);
    if let Some(q) = vm.qmp.as_mut() {
        if graceful && !exited(&mut vm.child) {
            match q.execute("system_powerdown").await {
                Ok(_) => {
                    if tokio::time::timeout(POWERDOWN_TIMEOUT, vm.child.wait())
                        .await
                        .is_err()
                    {
                        warn!(dir = %vm.dir.display(), "guest did not power down within {POWERDOWN_TIMEOUT:?}; quitting QEMU");
                    }
                }
                Err(e) => warn!(error = %e, "system_powerdown failed"),
            }
        }
        if !exited(&mut vm.child) {
            let _ = q.execute("quit").await;
        }
    }
    if tokio::time::timeout(QUIT_TIMEOUT, vm.child.wait())
        .await
        .is_err()
    {
        warn!(?pid, "QEMU did not quit; killing it");
        if let Some(pid) = pid {
            crate::process::kill_tree(pid);
        }
        let _ = vm.child.start_kill();
        let _ = tokio::time::timeout(QUIT_TIMEOUT, vm.child.wait()).await;
    }
    // The console copier ends at QEMU's EOF.
    let _ = tokio::time::timeout(QUIT_TIMEOUT, &mut vm.console).await;
    let _ = fs::remove_file(vm.dir.join(PID));
}

/// Kill a QEMU left by an earlier run, if that process still runs in this
/// lease's directory.
pub(super) async fn kill_stale(dir: &Path) {
    crate::process::kill_recorded(&dir.join(PID), "a QEMU", |pid| {
        fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == dir)
            && crate::process::proc_cmdline(pid).is_some_and(|c| c.contains("qemu"))
    })
    .await;
}
