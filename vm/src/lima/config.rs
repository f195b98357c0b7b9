//! The lima backend's settings: their own file so that the template can
//! read them without importing the backend.

use std::path::PathBuf;
use std::time::Duration;

/// Configuration of the lima backend.
#[derive(Clone, Debug)]
pub struct LimaConfig {
    /// The `limactl` binary (a bare name is looked up in `$PATH`).
    pub limactl: PathBuf,
    /// `LIMA_HOME` for every `limactl` call, e.g. `{dataDir}/lima`.
    pub lima_home: PathBuf,
    /// Location of the guest cloud image (a local path or URL that Lima
    /// accepts; Alpine or Ubuntu). Downloaded, if at all, by Lima itself.
    pub image: String,
    /// Guest architecture in Lima's naming; `None` for the host's.
    pub arch: Option<String>,
    /// Limit for `limactl create` (copies/converts the image).
    pub create_timeout: Duration,
    /// Limit for `limactl start` (boot, provision script, readiness).
    pub start_timeout: Duration,
    /// Leases asking for less get this many vCPUs.
    pub min_cpus: u32,
    /// Leases asking for less get this much memory (MiB).
    pub min_memory_mb: u32,
    /// Leases asking for less get this much disk (GiB).
    pub min_disk_gb: u32,
}
