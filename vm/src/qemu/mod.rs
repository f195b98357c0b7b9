//! The `qemu` backend: one isolated QEMU virtual machine per lease.
//!
//! Per lease, in `{state_dir}/{lease hex}/` (QEMU's working directory, so
//! its arguments name files relative to it):
//!
//! | file | why |
//! |---|---|
//! | `disk.qcow2` | copy-on-write overlay on the provider's base image (never modified), sized to the lease's disk; kept across provider restarts |
//! | `host_key`, `host_key.pub` | generated before the first boot; the accept carries it; kept so a restart serves the same key |
//! | `authorized_keys`, `hostname` | fw_cfg first-boot items ([`seed`]) |
//! | `seed.iso` | NoCloud seed (volume `cidata`) for cloud-init images |
//! | `console.log` (+ `.1`) | QEMU's stderr and the guest's serial console, capped |
//! | `qemu.pid` | our record of the process, to find it after a crash |
//!
//! The guest gets `-smp`/`-m` from the lease, user-mode networking whose
//! only inbound path is `hostfwd=tcp:127.0.0.1:PORT-:22`, and by default
//! `restrict=on`: it reaches nothing outside, the provider's loopback
//! included (QEMU's user-mode stack cannot separate "the internet" from
//! "the host's 127.0.0.1", so outbound access is all or nothing and needs
//! `guest_outbound`). The monitor is QMP on QEMU's stdin/stdout ([`qmp`]).
//! A VM counts as running only once its sshd has completed a key exchange
//! with the generated host key ([`boot`]).
//!
//! QEMU is started through `setpriv --pdeathsig KILL`, so the kernel kills
//! it when the provider dies, even by SIGKILL; on recovery a recorded pid
//! whose working directory is the lease's is killed as well. Stopping:
//! teardown discards the disk, so it `quit`s at once; a provider shutdown
//! keeps it, so it asks the guest to power down first (QMP
//! `system_powerdown`, bounded), then `quit`, then SIGKILL by pid.

mod accel;
mod boot;
mod launch;
mod process;
mod qmp;
mod seed;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;
use tracing::{info, warn};

pub use accel::{Accel, AccelChoice, AccelDecision};
pub use seed::SeedMode;

pub(crate) use process::QemuVm;
use process::{kill_stale, stop};

use crate::local::LocalBackend;
use crate::registry::Registry;
use crate::{ProvisionRequest, VmError, VmInfo, VmStatus, keys, private_dir};

const HOST_KEY: &str = "host_key";
const DISK: &str = "disk.qcow2";

/// `qemu-img` creates an overlay in milliseconds; this bounds a wedged one.
const QEMU_IMG_TIMEOUT: Duration = Duration::from_secs(60);

/// Boot line for direct kernel boot when none is given; matches the images
/// `vm/images/build-debian.sh` writes (ext4 on the whole virtio disk).
pub const DEFAULT_APPEND: &str = "root=/dev/vda rw console=ttyS0 panic=-1";

/// Configuration of the qemu backend.
#[derive(Clone, Debug)]
pub struct QemuConfig {
    /// Where per-lease directories go (created 0700 if missing).
    pub state_dir: PathBuf,
    /// `qemu-system-x86_64` (a bare name is looked up in `$PATH`).
    pub qemu: PathBuf,
    /// `qemu-img`.
    pub qemu_img: PathBuf,
    /// The base image, qcow2 or raw; only ever read.
    pub image: PathBuf,
    /// Direct kernel boot: the kernel (else the image's firmware boot).
    pub kernel: Option<PathBuf>,
    /// Direct kernel boot: the initrd.
    pub initrd: Option<PathBuf>,
    /// Direct kernel boot: the command line ([`DEFAULT_APPEND`] if `None`).
    pub append: Option<String>,
    /// Accelerator.
    pub accel: AccelChoice,
    /// First-boot carriers.
    pub seed: SeedMode,
    /// From QEMU's start until the guest's sshd must answer with its key.
    pub boot_timeout: Duration,
    /// Let guests open outbound connections (the internet, and with it the
    /// provider's loopback: QEMU's user-mode stack cannot tell them apart).
    pub guest_outbound: bool,
    /// Leases asking for less memory get this much (MiB): below it a stock
    /// kernel and systemd do not boot.
    pub min_memory_mb: u32,
    /// TCG only: the translation cache per VM in MiB. QEMU's default (1024)
    /// filled to ~560 MiB per booted VM here, more than a small guest's own
    /// RAM; see BENCHMARKS.md for what a smaller cache costs in speed.
    pub tcg_tb_mib: u32,
}

impl QemuConfig {
    /// Defaults: `qemu-system-x86_64` and `qemu-img` from `$PATH`, firmware
    /// boot, accelerator `auto`, both seeds, 300 s boot limit (a TCG boot
    /// takes 30-130 s on a loaded 2-core host), no outbound network,
    /// at least 256 MiB, a 256 MiB TCG translation cache.
    pub fn new(state_dir: impl Into<PathBuf>, image: impl Into<PathBuf>) -> Self {
        QemuConfig {
            state_dir: state_dir.into(),
            qemu: "qemu-system-x86_64".into(),
            qemu_img: "qemu-img".into(),
            image: image.into(),
            kernel: None,
            initrd: None,
            append: None,
            accel: AccelChoice::Auto,
            seed: SeedMode::Both,
            boot_timeout: Duration::from_secs(300),
            guest_outbound: false,
            min_memory_mb: 256,
            tcg_tb_mib: 256,
        }
    }
}

/// The qemu backend. See the module docs.
pub struct QemuManager {
    config: QemuConfig,
    qemu: PathBuf,
    qemu_img: PathBuf,
    iso_tool: Option<PathBuf>,
    setpriv: Option<PathBuf>,
    base_format: String,
    base_size: u64,
    accel: AccelDecision,
    /// Shared with each VM's exit watcher.
    registry: std::sync::Arc<Registry<QemuVm>>,
}

fn tool_missing(tool: &str, given: &Path, hint: &str) -> VmError {
    VmError::ToolMissing {
        tool: tool.into(),
        hint: format!("{} is not an executable; {hint}", given.display()),
    }
}

/// A path that goes into a QEMU argument: absolute, existing, UTF-8, one
/// line, no comma (QEMU's option syntax splits on it).
fn input_file(what: &str, p: &Path, hint: &str) -> Result<PathBuf, VmError> {
    let abs = fs::canonicalize(p)
        .map_err(|e| VmError::InvalidConfig(format!("{what} {}: {e}; {hint}", p.display())))?;
    if !abs.is_file() {
        return Err(VmError::InvalidConfig(format!(
            "{what} {} is not a file; {hint}",
            abs.display()
        )));
    }
    let s = abs
        .to_str()
        .ok_or_else(|| VmError::InvalidConfig(format!("{what} {} is not UTF-8", abs.display())))?;
    if s.chars().any(|c| c.is_control() || c == ',') {
        return Err(VmError::InvalidConfig(format!(
            "{what} {s:?} contains a comma or control character, which QEMU options cannot carry; rename it"
        )));
    }
    fs::File::open(&abs)
        .map_err(|e| VmError::InvalidConfig(format!("{what} {s} cannot be read: {e}")))?;
    Ok(abs)
}

impl QemuManager {
    /// Find QEMU and its tools, check the image and the boot options, and
    /// choose the accelerator (logged; TCG loudly). Starts no VM.
    pub fn new(mut config: QemuConfig) -> Result<Self, VmError> {
        let qemu = crate::process::find_program(Some(&config.qemu), "qemu-system-x86_64", &[])
            .ok_or_else(|| {
                tool_missing(
                    "qemu-system-x86_64",
                    &config.qemu,
                    "install QEMU (`apt-get install qemu-system-x86`) or pass --qemu-binary PATH",
                )
            })?;
        let qemu_img = crate::process::find_program(Some(&config.qemu_img), "qemu-img", &[])
            .ok_or_else(|| {
                tool_missing(
                    "qemu-img",
                    &config.qemu_img,
                    "install it (`apt-get install qemu-utils`) or pass --qemu-img PATH",
                )
            })?;
        let iso_tool = if config.seed.nocloud() {
            Some(seed::find_iso_tool().ok_or_else(|| {
                VmError::ToolMissing {
                    tool: "genisoimage".into(),
                    hint: "the NoCloud seed that cloud-init images read needs genisoimage \
                       (`apt-get install genisoimage`); or pass --qemu-seed fw-cfg for images \
                       that read fw_cfg (vm/images/build-debian.sh)"
                        .into(),
                }
            })?)
        } else {
            None
        };
        let image_hint = "build one with `sudo vm/images/build-debian.sh DIR`, or use an official cloud image (qcow2 or raw)";
        config.image = input_file("image", &config.image, image_hint)?;
        if let Some(k) = &config.kernel {
            config.kernel = Some(input_file(
                "kernel",
                k,
                "pass the vmlinuz beside the image",
            )?);
        } else if config.initrd.is_some() || config.append.is_some() {
            return Err(VmError::InvalidConfig(
                "--qemu-initrd and --qemu-append need --qemu-kernel (direct kernel boot)".into(),
            ));
        }
        if let Some(i) = &config.initrd {
            config.initrd = Some(input_file(
                "initrd",
                i,
                "pass the initrd.img beside the image",
            )?);
        }
        if let Some(a) = &config.append
            && a.chars().any(char::is_control)
        {
            return Err(VmError::InvalidConfig(format!(
                "kernel command line {a:?} must be one line"
            )));
        }
        if config.boot_timeout.is_zero() {
            return Err(VmError::InvalidConfig(
                "the boot timeout must be above zero seconds".into(),
            ));
        }
        let (base_format, base_size) = image_info(&qemu_img, &config.image)?;
        let accel = accel::decide(config.accel).map_err(VmError::InvalidConfig)?;
        match accel.accel {
            Accel::Kvm => info!(accel = %accel.summary(), "qemu backend: KVM"),
            Accel::Tcg => warn!(
                accel = %accel.summary(),
                "qemu backend: NO HARDWARE ACCELERATION — guests run under TCG software \
                 emulation, 20-50x slower than KVM (boot 30-130 s, SSH throughput a few MiB/s)"
            ),
        }
        let setpriv = crate::process::find_program(None, "setpriv", &["/usr/bin", "/bin"]);
        if setpriv.is_none() {
            warn!(
                "setpriv (util-linux) not found: a QEMU process will outlive a provider killed by SIGKILL until the next start"
            );
        }
        private_dir::create(&config.state_dir)?;
        config.state_dir = fs::canonicalize(&config.state_dir).map_err(VmError::io(format!(
            "resolving {}",
            config.state_dir.display()
        )))?;
        info!(image = %config.image.display(), format = %base_format, size = base_size, "qemu backend ready");
        Ok(QemuManager {
            config,
            qemu,
            qemu_img,
            iso_tool,
            setpriv,
            base_format,
            base_size,
            accel,
            registry: std::sync::Arc::new(Registry::new("qemu")),
        })
    }

    /// The accelerator guests run with, and why.
    pub fn accelerator(&self) -> &AccelDecision {
        &self.accel
    }

    async fn create_overlay(&self, dir: &Path, disk_gb: u32) -> Result<(), VmError> {
        let _ = fs::remove_file(dir.join(DISK));
        let size = (u64::from(disk_gb) << 30).max(self.base_size);
        let out = Command::new(&self.qemu_img)
            .current_dir(dir)
            .args(["create", "-q", "-f", "qcow2", "-F", &self.base_format, "-b"])
            .arg(&self.config.image)
            .arg(DISK)
            .arg(size.to_string())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(QEMU_IMG_TIMEOUT, out)
            .await
            .map_err(|_| VmError::Timeout {
                what: format!("qemu-img create did not finish within {QEMU_IMG_TIMEOUT:?}"),
                detail: String::new(),
            })?
            .map_err(VmError::io(format!("running {}", self.qemu_img.display())))?;
        if !out.status.success() {
            return Err(VmError::Failed {
                what: "creating the VM's disk overlay".into(),
                detail: format!(
                    "qemu-img exited with {}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        Ok(())
    }
}

/// `(format, virtual size)` of the base image, refusing anything but qcow2
/// and raw.
fn image_info(qemu_img: &Path, image: &Path) -> Result<(String, u64), VmError> {
    let out = std::process::Command::new(qemu_img)
        .args(["info", "-U", "--output=json"])
        .arg(image)
        .stdin(Stdio::null())
        .output()
        .map_err(VmError::io(format!("running {}", qemu_img.display())))?;
    let bad =
        |detail: String| VmError::InvalidConfig(format!("image {}: {detail}", image.display()));
    if !out.status.success() {
        return Err(bad(format!(
            "qemu-img info failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| bad(format!("qemu-img info printed no JSON: {e}")))?;
    let format = v["format"].as_str().unwrap_or_default().to_string();
    let size = v["virtual-size"].as_u64().unwrap_or(0);
    if format != "qcow2" && format != "raw" {
        return Err(bad(format!("format is {format:?}; expected qcow2 or raw")));
    }
    if size == 0 {
        return Err(bad("virtual size is 0".into()));
    }
    Ok((format, size))
}

#[async_trait::async_trait]
impl LocalBackend for QemuManager {
    type Runtime = QemuVm;
    const NAME: &'static str = "qemu";
    const RUNTIME: &'static str = "VM";

    fn registry(&self) -> &Registry<QemuVm> {
        self.registry.as_ref()
    }

    fn state_dir(&self) -> &Path {
        &self.config.state_dir
    }

    async fn start(
        &self,
        req: &ProvisionRequest,
        recovering: bool,
    ) -> Result<(VmInfo, QemuVm), VmError> {
        let dir = self.lease_dir(&req.lease);
        let key_path = dir.join(HOST_KEY);
        if recovering {
            for (file, what) in [(HOST_KEY, "host key"), (DISK, "disk")] {
                if !dir.join(file).exists() {
                    return Err(VmError::Failed {
                        what: "recovering the lease's VM".into(),
                        detail: format!(
                            "its {what} {} is gone; not starting a different machine under the same lease",
                            dir.join(file).display()
                        ),
                    });
                }
            }
        }
        let key_line = keys::authorized_key_line(&req.lease, &req.access_pub_key)?;
        private_dir::create(&dir)?;
        kill_stale(&dir).await;
        let key = keys::load_or_create_vm_host_key(&key_path)?;
        if !recovering {
            self.create_overlay(&dir, req.disk_gb).await?;
        }
        let first = seed::FirstBoot {
            lease: &req.lease,
            key_line: &key_line,
            host_key: &key,
        };
        let mut boot_args = Vec::new();
        if self.config.seed.fw_cfg() {
            boot_args.extend(seed::write_fw_cfg(&dir, &first, HOST_KEY)?);
        }
        if let Some(tool) = &self.iso_tool {
            boot_args.extend(seed::write_nocloud(&dir, &first, tool).await?);
        }
        let (vm, port) = match self.boot(req, &dir, &boot_args, &key.public).await {
            Ok(up) => up,
            Err(e) => {
                // A fresh lease's disk holds nothing yet; don't keep it
                // (a recovering lease's disk is the consumer's data).
                if !recovering {
                    let _ = fs::remove_file(dir.join(DISK));
                }
                let _ = fs::remove_file(dir.join(seed::SEED_ISO));
                return Err(e);
            }
        };
        let mut info = VmInfo::new(req.lease, "qemu", VmStatus::Running);
        info.ssh_port = Some(port);
        info.host_key = Some(key.public);
        info.accelerator = Some(self.accel.summary());
        Ok((info, vm))
    }

    async fn stop(&self, runtime: QemuVm) {
        stop(runtime, false).await;
    }

    async fn stop_keeping_state(&self, runtime: QemuVm) {
        stop(runtime, true).await;
    }

    async fn clear_leftovers(&self, dir: &Path) {
        kill_stale(dir).await;
    }
}
