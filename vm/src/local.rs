//! What the backends whose VM is a local process share (`dev`: an
//! in-process SSH server; `sshd`: a per-lease OpenSSH sshd; `qemu`: a
//! QEMU virtual machine): the lease's
//! state directory, `{state_dir}/{lease hex}/`, and the provision,
//! teardown, recovery and shutdown around starting and stopping it. Each
//! backend supplies only [`LocalBackend`]; [`VmManager`] follows.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use tracing::{info, warn};
use xe_store::LeaseHash;

use crate::registry::{Begin, Registry};
use crate::{ProvisionRequest, VmError, VmInfo, VmManager, VmStatus, keys, local_port};

/// One local backend: how a lease's process starts and stops.
#[async_trait::async_trait]
pub(crate) trait LocalBackend: Send + Sync {
    /// What runs for one lease while it is up.
    type Runtime: Send;
    /// `"dev"` or `"sshd"`.
    const NAME: &'static str;
    /// What the runtime is called in messages: "server", "sshd".
    const RUNTIME: &'static str;

    fn registry(&self) -> &Registry<Self::Runtime>;
    fn state_dir(&self) -> &Path;

    /// Write the lease's files and start it. With `recovering`, its host
    /// key must already exist: a lease is never given a new one.
    async fn start(
        &self,
        req: &ProvisionRequest,
        recovering: bool,
    ) -> Result<(VmInfo, Self::Runtime), VmError>;

    /// Stop a runtime and wait for it (teardown: its state is discarded).
    async fn stop(&self, runtime: Self::Runtime);

    /// Stop a runtime whose state is kept for [`recover`] (node shutdown);
    /// a VM gets the chance to shut down cleanly.
    async fn stop_keeping_state(&self, runtime: Self::Runtime) {
        self.stop(runtime).await;
    }

    /// Clean up what an earlier run of the node may have left in `dir`
    /// before it is removed.
    async fn clear_leftovers(&self, _dir: &Path) {}

    fn lease_dir(&self, lease: &LeaseHash) -> PathBuf {
        self.state_dir().join(lease.to_hex())
    }
}

#[async_trait::async_trait]
impl<B: LocalBackend + 'static> VmManager for B {
    fn backend(&self) -> &'static str {
        B::NAME
    }

    async fn provision(&self, req: &ProvisionRequest) -> Result<VmInfo, VmError> {
        provision(self, req).await
    }

    async fn teardown(&self, lease: &LeaseHash) -> Result<(), VmError> {
        teardown(self, lease).await
    }

    async fn dial_ssh(&self, lease: &LeaseHash) -> Result<tokio::net::TcpStream, VmError> {
        let port = self.registry().running_port(lease)?;
        local_port::connect_local(port)
            .await
            .map_err(VmError::io(format!(
                "connecting to the {} of lease {}",
                B::RUNTIME,
                lease.short()
            )))
    }

    async fn get(&self, lease: &LeaseHash) -> Option<VmInfo> {
        self.registry().get(lease)
    }

    async fn list(&self) -> Vec<VmInfo> {
        self.registry().list()
    }

    async fn recover(&self, keep: &[ProvisionRequest]) -> Result<Vec<VmInfo>, VmError> {
        recover(self, keep).await
    }

    async fn shutdown(&self) {
        shutdown(self).await;
    }
}

async fn provision<B: LocalBackend>(b: &B, req: &ProvisionRequest) -> Result<VmInfo, VmError> {
    keys::validate_access_key(&req.access_pub_key)?;
    let (begin, old) = b.registry().begin(&req.lease)?;
    if let Some(old) = old {
        b.stop(old).await;
    }
    let generation = match begin {
        Begin::AlreadyRunning(info) => return Ok(info),
        Begin::Go(g) => g,
    };
    match b.start(req, false).await {
        Ok((info, runtime)) => {
            match b
                .registry()
                .finish(&req.lease, generation, info.clone(), Some(runtime))
            {
                Ok(()) => Ok(info),
                Err(runtime) => {
                    if let Some(runtime) = runtime {
                        b.stop(runtime).await;
                    }
                    Err(VmError::Failed {
                        what: "provisioning".into(),
                        detail: format!(
                            "the lease was torn down while its {} was starting",
                            B::RUNTIME
                        ),
                    })
                }
            }
        }
        Err(e) => {
            warn!(lease = %req.lease.short(), error = %e, "{} provisioning failed", B::NAME);
            let _ =
                b.registry()
                    .finish(&req.lease, generation, error_info::<B>(req.lease, &e), None);
            Err(e)
        }
    }
}

async fn teardown<B: LocalBackend>(b: &B, lease: &LeaseHash) -> Result<(), VmError> {
    if let Some((_, Some(runtime))) = b.registry().remove(lease) {
        b.stop(runtime).await;
    }
    let dir = b.lease_dir(lease);
    b.clear_leftovers(&dir).await;
    match fs::remove_dir_all(&dir) {
        Ok(()) => info!(lease = %lease.short(), "{} VM torn down", B::NAME),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(VmError::io(format!("removing {}", dir.display()))(e)),
    }
    Ok(())
}

/// Tear down every lease not in `keep` (in the table or only on disk),
/// then bring each kept one back with its own host key, or mark it `Error`.
async fn recover<B: LocalBackend>(
    b: &B,
    keep: &[ProvisionRequest],
) -> Result<Vec<VmInfo>, VmError> {
    let wanted: HashSet<LeaseHash> = keep.iter().map(|r| r.lease).collect();
    for lease in b.registry().leases() {
        if !wanted.contains(&lease) {
            teardown(b, &lease).await?;
        }
    }
    let dir = b.state_dir();
    match fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries.flatten() {
                // Only directories named like a lease are ours to remove.
                let Some(lease) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<LeaseHash>().ok())
                else {
                    continue;
                };
                if !wanted.contains(&lease) {
                    info!(lease = %lease.short(), "removing orphaned {} VM", B::NAME);
                    teardown(b, &lease).await?;
                }
            }
        }
        // Nothing was ever provisioned here.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(VmError::io(format!("listing {}", dir.display()))(e)),
    }
    // Every kept lease starts at once: a VM's boot takes up to minutes.
    let starts = keep.iter().map(|req| async move {
        if let Some(info) = b
            .registry()
            .get(&req.lease)
            .filter(|i| i.status == VmStatus::Running)
        {
            return info;
        }
        let (info, runtime) = match b.start(req, true).await {
            Ok((info, runtime)) => (info, Some(runtime)),
            Err(e) => {
                warn!(lease = %req.lease.short(), error = %e, "could not recover {} VM", B::NAME);
                (error_info::<B>(req.lease, &e), None)
            }
        };
        if let Some(old) = b.registry().set(info.clone(), runtime) {
            b.stop(old).await;
        }
        info
    });
    Ok(futures::future::join_all(starts).await)
}

/// Stop every runtime, all at once (a VM's clean power-down takes seconds,
/// and a node's stop has a deadline); the state directories stay for
/// [`recover`].
async fn shutdown<B: LocalBackend>(b: &B) {
    let stops = b
        .registry()
        .stop_all()
        .into_iter()
        .map(|(lease, runtime)| async move {
            b.stop_keeping_state(runtime).await;
            info!(lease = %lease.short(), "{} stopped (state kept for recover)", B::RUNTIME);
        });
    futures::future::join_all(stops).await;
}

fn error_info<B: LocalBackend>(lease: LeaseHash, e: &VmError) -> VmInfo {
    let mut info = VmInfo::new(lease, B::NAME, VmStatus::Error);
    info.error = Some(e.to_string());
    info
}
