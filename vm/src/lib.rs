//! xe-vm: the machines behind leases.
//!
//! A provider hands each accepted lease a "VM": something that runs an SSH
//! server on `127.0.0.1:{port}` that accepts exactly the lease's access key.
//! The provider role (in `xe-node`) only talks to the [`VmManager`] trait;
//! the backend is chosen with `xe node --provide --vm-backend qemu|lima|sshd|dev`.
//!
//! | backend | what a lease gets | for |
//! |---|---|---|
//! | [`qemu::QemuManager`] | an isolated QEMU VM of the lease's size, root login with the lease key | Linux providers |
//! | [`lima::LimaManager`] | a QEMU VM driven by `limactl`, root login with the lease key | providers with Lima (the seed's) |
//! | [`sshd::SshdManager`] | a real OpenSSH `sshd` per lease on the host | providers handing out the host or a container; end-to-end tests |
//! | [`dev::DevManager`] | an embedded russh server giving a shell on the host | development only (`xe devnet` without OpenSSH server) |
//!
//! Every backend validates the access key before it reaches a file, a
//! template or a command, keeps per-lease state on disk so that
//! [`VmManager::recover`] can bring a lease back with the *same* SSH host key
//! after a provider restart, and never invents a new host key for a lease
//! whose state is gone (consumers pinned the old one in the accept event).
//!
//! # Layout
//! - this file: the request/record types, [`VmError`], the [`VmManager`] trait.
//! - [`qemu`]: one QEMU process per lease; `qemu/process.rs` its command
//!   line, start and stop, `qemu/seed.rs` the first-boot data (NoCloud and
//!   fw_cfg), `qemu/boot.rs` the console log and the host-key check,
//!   `qemu/qmp.rs` the monitor, `qemu/accel.rs` KVM or TCG.
//! - [`sshd`]: one OpenSSH `sshd -D` process per lease.
//! - [`lima`]: `limactl` create/start/list/stop/delete; [`lima::template`]
//!   renders the per-lease instance YAML and provision script.
//! - [`dev`]: the embedded SSH server; `dev/session.rs` bridges SSH channels
//!   to local processes (PTY or pipes).
//! - `registry.rs`: the in-memory lease → VM table shared by the backends.
//! - shared by the backends: `keys.rs` (access-key checks, host keys),
//!   `process.rs` (programs, process trees and the pid records of a crashed
//!   node's processes), `local_port.rs` (port waits), `logs.rs` (log
//!   tails), `private_dir.rs` (0700 state directories), `local_user.rs`.
#![forbid(unsafe_code)]

use std::fmt;

use serde::{Deserialize, Serialize};
use xe_store::{AccessPubKey, LeaseHash};

pub mod dev;
mod keys;
pub mod lima;
mod local;
mod local_port;
mod local_user;
mod logs;
mod private_dir;
mod process;
pub mod qemu;
mod registry;
pub mod sshd;

pub use keys::{VmHostKey, parse_access_key};
pub use local_user::LocalUser;

/// What a provider asks of a backend for one lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProvisionRequest {
    /// The lease; names the VM and its state directory.
    pub lease: LeaseHash,
    /// Virtual CPUs (backends apply their own minimum).
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mb: u32,
    /// Disk in GiB.
    pub disk_gb: u32,
    /// The only key that may log in (as root, or the backend's VM user).
    pub access_pub_key: AccessPubKey,
}

/// Where a lease's VM is in its life.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum VmStatus {
    /// Being created or started; not reachable yet.
    Provisioning,
    /// Its sshd accepts TCP on `127.0.0.1:{ssh_port}`.
    Running,
    /// Stopped (provider shut down); `recover` can bring it back.
    Stopped,
    /// Provisioning or recovery failed; `error` says why.
    Error,
}

impl fmt::Display for VmStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmStatus::Provisioning => "provisioning",
            VmStatus::Running => "running",
            VmStatus::Stopped => "stopped",
            VmStatus::Error => "error",
        })
    }
}

/// What the provider (and `GET /vms/{lease}`) can see of one VM.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct VmInfo {
    /// The lease this VM serves.
    pub lease: LeaseHash,
    /// `"lima"`, `"sshd"` or `"dev"`.
    pub backend: String,
    /// Current status.
    pub status: VmStatus,
    /// Local port of the VM's sshd (on 127.0.0.1) while running.
    pub ssh_port: Option<u16>,
    /// The VM's sshd host key as `ssh-ed25519 AAAA…` (no comment); goes into
    /// the accept event so consumers can pin it.
    pub host_key: Option<String>,
    /// Why the VM is in `Error` (with log tails where there are any).
    pub error: Option<String>,
    /// For real VMs: the accelerator and why it was chosen
    /// (`"tcg (/sys/module/kvm_pvm is present: …)"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accelerator: Option<String>,
}

impl VmInfo {
    pub(crate) fn new(lease: LeaseHash, backend: &str, status: VmStatus) -> Self {
        VmInfo {
            lease,
            backend: backend.to_string(),
            status,
            ssh_port: None,
            host_key: None,
            error: None,
            accelerator: None,
        }
    }
}

/// Why a VM operation failed. Callers branch on the variant; the text is
/// meant for logs and `GET /vms/{lease}`.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// No VM is known for this lease.
    #[error("no VM for lease {0}")]
    NotFound(LeaseHash),
    /// The VM exists but is not running (so it cannot be dialled).
    #[error("VM for lease {lease} is {status}, not running")]
    NotRunning {
        /// The lease.
        lease: LeaseHash,
        /// Its current status.
        status: VmStatus,
    },
    /// Another provision of the same lease is still in progress.
    #[error("VM for lease {0} is already being provisioned")]
    Busy(LeaseHash),
    /// The access key is not a valid ed25519 public key; nothing was run.
    #[error(
        "access key is not a valid ed25519 public key (expected 32 bytes on the curve, \
         as 64 hex characters or an `ssh-ed25519 AAAA…` line); nothing was provisioned"
    )]
    InvalidKey,
    /// A required external program is not installed.
    #[error("{tool} not found: {hint}")]
    ToolMissing {
        /// The program (e.g. `sshd`, `limactl`).
        tool: String,
        /// How to install it or point xe at it.
        hint: String,
    },
    /// The backend's configuration cannot be used.
    #[error("invalid VM backend configuration: {0}")]
    InvalidConfig(String),
    /// A step did not finish within its time limit.
    #[error("timed out: {what}{}", tail_suffix(.detail))]
    Timeout {
        /// The step, with its limit.
        what: String,
        /// Log tails that may say why (may be empty).
        detail: String,
    },
    /// A step failed.
    #[error("{what} failed: {detail}")]
    Failed {
        /// The step.
        what: String,
        /// Why, with the tail of the relevant log.
        detail: String,
    },
    /// A key or first-boot file could not be written or read as a secret
    /// (wider bits than 0600, a link, I/O); the error names the file.
    #[error(transparent)]
    SecretFile(#[from] xe_store::secret_file::SecretFileError),
    /// A local I/O error.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn tail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

impl VmError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
        let what = what.into();
        move |source| VmError::Io { what, source }
    }
}

/// One backend. All methods are safe to call concurrently for different
/// leases; the provider serialises calls for one lease.
#[async_trait::async_trait]
pub trait VmManager: Send + Sync + 'static {
    /// `"lima"`, `"sshd"` or `"dev"`.
    fn backend(&self) -> &'static str;

    /// Create and start the lease's VM. Returns once the VM's sshd accepts
    /// TCP on 127.0.0.1, with status `Running` and `host_key` set. On failure
    /// the VM is left in `Error` (visible through [`VmManager::get`]) with
    /// its processes stopped. Provisioning a lease that is already running
    /// returns its current info.
    async fn provision(&self, req: &ProvisionRequest) -> Result<VmInfo, VmError>;

    /// Stop the VM and free its port, processes and files. Idempotent: a
    /// lease with no VM is `Ok`.
    async fn teardown(&self, lease: &LeaseHash) -> Result<(), VmError>;

    /// A TCP connection to the VM's sshd on 127.0.0.1.
    async fn dial_ssh(&self, lease: &LeaseHash) -> Result<tokio::net::TcpStream, VmError>;

    /// The VM of one lease, if any.
    async fn get(&self, lease: &LeaseHash) -> Option<VmInfo>;

    /// Every VM this manager knows of.
    async fn list(&self) -> Vec<VmInfo>;

    /// Provider start-up: bring back the VMs of the leases in `keep` (same
    /// host key) and remove every other xe-managed VM (orphans). A kept
    /// lease whose state did not survive comes back as `Error` rather than
    /// with a new host key. Returns the info of each kept lease.
    async fn recover(&self, keep: &[ProvisionRequest]) -> Result<Vec<VmInfo>, VmError>;

    /// The node is stopping: stop this manager's processes (no orphan sshd)
    /// but keep on-disk state so that `recover` can bring the VMs back.
    async fn shutdown(&self);
}

/// The user name a consumer logs into a lease's VM as, per backend:
/// `root` for lima and qemu; for sshd the node's own user (`root` when the node runs
/// as root) because an unprivileged sshd can only log in its own user; for
/// dev any name is accepted, the node's user is suggested.
pub fn default_vm_user(backend: &str) -> String {
    match backend {
        "lima" | "qemu" => "root".to_string(),
        _ => LocalUser::current().name,
    }
}
