//! Starting one QEMU: its command line, and its start until the guest's
//! sshd proves its host key (methods of the manager, which holds the
//! programs and settings a start needs).

use std::ffi::OsString;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::process::{Child, Command};
use tokio::time::Instant;
use tracing::{info, warn};
use xe_store::secret_file;

use super::process::{PID, QUIT_TIMEOUT, QemuVm, stop};
use super::{DEFAULT_APPEND, DISK, QemuManager, boot, qmp};
use crate::{ProvisionRequest, VmError, local_port, logs};

/// The free port is chosen before QEMU binds it; if another process takes
/// it in between, QEMU exits at once and we try another, this many times.
const BIND_ATTEMPTS: usize = 4;

impl QemuManager {
    /// Every QEMU argument for one boot, the first-boot ones included.
    pub(super) fn qemu_args(
        &self,
        req: &ProvisionRequest,
        port: u16,
        boot: &[OsString],
    ) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: &str| a.push(s.into());
        push("-name");
        push(&format!("xe-{}", req.lease.short()));
        // No default devices, no system config file: only what is below.
        push("-nodefaults");
        push("-no-user-config");
        push("-machine");
        push("q35");
        for s in self.accel.qemu_args(self.config.tcg_tb_mib) {
            push(&s);
        }
        push("-smp");
        push(&req.vcpus.max(1).to_string());
        push("-m");
        push(&req.memory_mb.max(self.config.min_memory_mb).to_string());
        push("-display");
        push("none");
        // The console goes to stderr, which we read into a capped log.
        push("-serial");
        push("file:/dev/fd/2");
        push("-qmp");
        push("stdio");
        push("-drive");
        push(&format!("file={DISK},if=virtio,format=qcow2"));
        push("-netdev");
        push(&format!(
            "user,id=n0,restrict={},hostfwd=tcp:127.0.0.1:{port}-:22",
            if self.config.guest_outbound {
                "off"
            } else {
                "on"
            }
        ));
        push("-device");
        push("virtio-net-pci,netdev=n0");
        push("-device");
        push("virtio-rng-pci");
        // QEMU itself may not exec, gain privileges or change limits.
        // No -no-reboot: a consumer's `reboot` must reboot their VM. A guest
        // that panics at boot (panic=-1) then reboots until its boot limit.
        push("-sandbox");
        push("on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny");
        if let Some(k) = &self.config.kernel {
            a.push("-kernel".into());
            a.push(k.into());
            if let Some(i) = &self.config.initrd {
                a.push("-initrd".into());
                a.push(i.into());
            }
            a.push("-append".into());
            a.push(
                self.config
                    .append
                    .as_deref()
                    .unwrap_or(DEFAULT_APPEND)
                    .into(),
            );
        }
        a.extend(boot.iter().cloned());
        a
    }

    pub(super) fn spawn(&self, dir: &Path, args: &[OsString]) -> Result<Child, VmError> {
        let mut cmd = match &self.setpriv {
            Some(setpriv) => {
                let mut c = Command::new(setpriv);
                c.args(["--pdeathsig", "KILL", "--"]).arg(&self.qemu);
                c
            }
            None => Command::new(&self.qemu),
        };
        cmd.args(args)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd.spawn()
            .map_err(VmError::io(format!("running {}", self.qemu.display())))
    }

    /// Start QEMU on a free port until it binds one, then wait for the
    /// guest's sshd to show `host_key`.
    pub(super) async fn boot(
        &self,
        req: &ProvisionRequest,
        dir: &Path,
        boot_args: &[OsString],
        host_key: &str,
    ) -> Result<(QemuVm, u16), VmError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = local_port::free_local_port()?;
            let args = self.qemu_args(req, port, boot_args);
            let mut child = self.spawn(dir, &args)?;
            if let Some(pid) = child.id() {
                secret_file::replace(&dir.join(PID), format!("{pid}\n").as_bytes())?;
            }
            let (Some(stdin), Some(stdout), Some(stderr)) =
                (child.stdin.take(), child.stdout.take(), child.stderr.take())
            else {
                return Err(VmError::Failed {
                    what: "starting QEMU".into(),
                    detail: "its standard streams were not piped".into(),
                });
            };
            let stopping = Arc::new(AtomicBool::new(false));
            // A guest that powers itself off, or a QEMU that crashes, takes
            // the VM away without us: say so in GET /vms instead of
            // "running". (During boot the slot is not `Running` on this
            // port yet, so this does nothing then.)
            let console = tokio::spawn({
                let (dir, stopping, registry, lease) = (
                    dir.to_path_buf(),
                    stopping.clone(),
                    self.registry.clone(),
                    req.lease,
                );
                async move {
                    boot::copy_console(stderr, dir.clone()).await;
                    if !stopping.load(Ordering::Acquire)
                        && registry.fail_running(&lease, port, || {
                            format!(
                                "QEMU exited on its own (the guest powered off, or QEMU failed); the VM is down: {}",
                                boot::console_tail(&dir)
                            )
                        })
                    {
                        warn!(lease = %lease.short(), "QEMU exited on its own; VM marked error");
                    }
                }
            });
            let qmp = qmp::Qmp::connect(stdin, stdout).await;
            let mut vm = QemuVm {
                child,
                qmp: None,
                console,
                stopping,
                dir: dir.to_path_buf(),
            };
            let qmp = match qmp {
                Ok(q) => q,
                Err(e) => {
                    // Usually QEMU refused its arguments and exited.
                    let status = tokio::time::timeout(QUIT_TIMEOUT, vm.child.wait())
                        .await
                        .ok()
                        .and_then(Result::ok);
                    stop(vm, false).await;
                    let tail = boot::console_tail(dir);
                    if tail.contains("Could not set up host forwarding rule")
                        && attempt < BIND_ATTEMPTS
                    {
                        warn!(lease = %req.lease.short(), port, "port taken before QEMU bound it; trying another");
                        continue;
                    }
                    let why = match status {
                        Some(s) => format!("QEMU exited with {s} at start"),
                        None => e,
                    };
                    return Err(VmError::Failed {
                        what: "starting QEMU".into(),
                        detail: logs::join_tails(&[why, tail]),
                    });
                }
            };
            vm.qmp = Some(qmp);
            let limit = self.config.boot_timeout;
            info!(lease = %req.lease.short(), port, accel = %self.accel.accel, "QEMU started; waiting for the guest's sshd");
            let started = Instant::now();
            match boot::wait_for_sshd(&mut vm.child, port, host_key, started + limit, limit, dir)
                .await
            {
                Ok(()) => {
                    info!(lease = %req.lease.short(), port, secs = started.elapsed().as_secs_f32(), "VM up: sshd answered with its host key");
                    return Ok((vm, port));
                }
                Err(e) => {
                    stop(vm, false).await;
                    return Err(e);
                }
            }
        }
    }
}
