//! The `--qemu-*` flags, shared by `xe node` and `xe devnet`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use xe_vm::qemu::{AccelChoice, QemuConfig, SeedMode};

/// Flags of the qemu VM backend.
#[derive(Args, Debug, Clone)]
pub struct QemuArgs {
    /// Base image for QEMU VMs (qcow2 or raw; never modified: each lease
    /// gets a copy-on-write overlay). Build one with
    /// `sudo vm/images/build-debian.sh DIR`, or use an official cloud image.
    #[arg(long, value_name = "PATH")]
    pub qemu_image: Option<PathBuf>,
    /// Direct kernel boot: the kernel (default: the image's own firmware boot).
    #[arg(long, value_name = "PATH")]
    pub qemu_kernel: Option<PathBuf>,
    /// Direct kernel boot: the initrd.
    #[arg(long, value_name = "PATH", requires = "qemu_kernel")]
    pub qemu_initrd: Option<PathBuf>,
    /// Direct kernel boot: the kernel command line
    /// [default: root=/dev/vda rw console=ttyS0 panic=-1].
    #[arg(long, value_name = "CMDLINE", requires = "qemu_kernel")]
    pub qemu_append: Option<String>,
    /// Accelerator: auto (KVM when it really works, else TCG), kvm, tcg.
    #[arg(long, value_name = "ACCEL", default_value = "auto")]
    pub qemu_accel: AccelChoice,
    /// First-boot data carrier: both (NoCloud seed and fw_cfg), nocloud
    /// (cloud-init images), fw-cfg (images that read opt/xe/*; no
    /// genisoimage needed).
    #[arg(long, value_name = "SEED", default_value = "both")]
    pub qemu_seed: SeedMode,
    /// Seconds from QEMU's start until the guest's sshd must answer with
    /// its host key (1-3600).
    #[arg(long, value_name = "SECS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub qemu_boot_timeout: u64,
    /// Let guests open outbound connections. QEMU's user-mode network then
    /// also lets them reach this host's 127.0.0.1 services; off, a guest
    /// reaches nothing and is reachable only through its SSH forward.
    #[arg(long)]
    pub qemu_guest_outbound: bool,
    /// TCG only: each VM's translation cache in MiB (16-4096). QEMU's own
    /// default, 1024, costs ~560 MiB per VM on top of its RAM.
    #[arg(long, value_name = "MIB", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(16..=4096))]
    pub qemu_tcg_tb_mib: u32,
    /// qemu-system-x86_64 binary.
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
    pub qemu_binary: PathBuf,
    /// qemu-img binary.
    #[arg(long, value_name = "PATH", default_value = "qemu-img")]
    pub qemu_img: PathBuf,
}

impl QemuArgs {
    /// The backend's configuration (its state dir is the node's to set).
    pub fn config(&self) -> anyhow::Result<QemuConfig> {
        let image = self.qemu_image.clone().ok_or_else(|| {
            anyhow::anyhow!(
                "--vm-backend qemu needs --qemu-image PATH: build one with \
                 `sudo vm/images/build-debian.sh DIR` (then also pass --qemu-kernel DIR/vmlinuz \
                 --qemu-initrd DIR/initrd.img), or use an official qcow2 cloud image"
            )
        })?;
        let mut c = QemuConfig::new(PathBuf::new(), image);
        c.qemu = self.qemu_binary.clone();
        c.qemu_img = self.qemu_img.clone();
        c.kernel = self.qemu_kernel.clone();
        c.initrd = self.qemu_initrd.clone();
        c.append = self.qemu_append.clone();
        c.accel = self.qemu_accel;
        c.seed = self.qemu_seed;
        c.boot_timeout = Duration::from_secs(self.qemu_boot_timeout);
        c.guest_outbound = self.qemu_guest_outbound;
        c.tcg_tb_mib = self.qemu_tcg_tb_mib;
        Ok(c)
    }
}
