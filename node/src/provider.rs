//! The provider role: auto-accept leases that name this node, provision
//! their VMs, serve tunnels to them, and tear them down when a lease ends.
//!
//! "accepted ⇒ a VM is running": the accept is signed and published only
//! after the VM's sshd answers, and it carries that sshd's host key.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, warn};
use xe_net::{NetHandle, PeerId, TunnelRefusal, TunnelValidator, VmConn};
use xe_store::{Inactive, LeaseEvent, LeaseHash, LeaseRecord, LeaseState, Store, Wallet, now_secs};
use xe_vm::{ProvisionRequest, VmManager};

/// What a provider is willing to host at once.
#[derive(Debug, Clone)]
pub struct Capacity {
    /// Concurrent leases.
    pub max_leases: usize,
    /// Total vCPUs.
    pub max_vcpus: u32,
    /// Total memory (MiB).
    pub max_memory_mb: u64,
    /// Total disk (GiB).
    pub max_disk_gb: u64,
}

/// Why [`Provider::reserve`] did not reserve.
#[derive(Debug)]
enum Unreserved {
    /// This node holds the lease already.
    AlreadyHeld,
    /// It does not fit; the public reason.
    OverCapacity(String),
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            max_leases: 16,
            max_vcpus: 64,
            max_memory_mb: 256 * 1024,
            max_disk_gb: 4096,
        }
    }
}

/// Why a lease that names us was not taken (visible at `GET /vms/{lease}`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Declined {
    /// Lease.
    pub lease: LeaseHash,
    /// Reason.
    pub reason: String,
}

/// Provider state shared between the validator and the lease watcher.
pub struct Provider {
    store: Store,
    wallet: Arc<Wallet>,
    vm: Arc<dyn VmManager>,
    capacity: Capacity,
    /// Leases we hold resources for (provisioning or running).
    held: Mutex<HashMap<LeaseHash, ProvisionRequest>>,
    declined: Mutex<HashMap<LeaseHash, String>>,
    /// Becomes true once start-up recovery has run. The network serves
    /// tunnels before that (so a restart is not held up by a slow backend),
    /// and a tunnel that arrives meanwhile must wait rather than be told
    /// "no VM" for a lease whose VM is about to come back.
    recovered: tokio::sync::watch::Sender<bool>,
}

/// How long a tunnel waits for start-up recovery before it is refused.
/// Overlay tunnels are also bounded by their handshake timeout.
const RECOVERY_WAIT: Duration = Duration::from_secs(30);
/// How often the whole ledger is scanned for created leases naming us, in
/// case a change was missed without the feed saying so.
const FULL_SCAN_INTERVAL: Duration = Duration::from_secs(3600);

impl Provider {
    /// A provider for `wallet`'s account.
    pub fn new(
        store: Store,
        wallet: Arc<Wallet>,
        vm: Arc<dyn VmManager>,
        capacity: Capacity,
    ) -> Arc<Self> {
        Arc::new(Provider {
            store,
            wallet,
            vm,
            capacity,
            held: Mutex::new(HashMap::new()),
            declined: Mutex::new(HashMap::new()),
            recovered: tokio::sync::watch::Sender::new(false),
        })
    }

    /// This provider's account address.
    pub fn address(&self) -> xe_store::AccountAddress {
        self.wallet.address()
    }

    /// A tunnel to one of our own leases' VMs without the overlay (a peer
    /// never dials itself): the same checks as an inbound tunnel, then
    /// DialSSH. Used when the gateway or HTTP API runs on the provider.
    pub async fn open_local(
        &self,
        lease: &LeaseHash,
        me: &PeerId,
    ) -> Result<Box<dyn VmConn>, TunnelRefusal> {
        self.validate_tunnel_lease(lease, me).await?;
        self.dial_ssh(lease).await
    }

    /// The VM manager.
    pub fn vm(&self) -> &Arc<dyn VmManager> {
        &self.vm
    }

    /// Start-up recovery of the VMs has not finished yet: a lease without
    /// a VM may still get it back.
    pub fn recovering(&self) -> bool {
        !*self.recovered.borrow()
    }

    /// Returns once start-up recovery has run.
    pub async fn recovered(&self) {
        let mut done = self.recovered.subscribe();
        // The sender lives as long as `self`, so this cannot fail.
        let _ = done.wait_for(|d| *d).await;
    }

    /// Why a lease was declined, if it was: this node's own account of it
    /// (with details the public reason leaves out), else the ledger's.
    pub fn declined(&self, lease: &LeaseHash) -> Option<String> {
        let local = self
            .declined
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(lease)
            .cloned();
        local.or_else(|| {
            self.store
                .lease(lease)
                .ok()
                .flatten()
                .and_then(|r| r.decline.map(|d| d.reason))
        })
    }

    fn names_me(&self, rec: &LeaseRecord) -> bool {
        rec.lease.provider == self.wallet.address()
    }

    /// The leases naming this provider, read one record at a time (memory
    /// grows with this provider's leases, time with the ledger: ≈ 5 s at a
    /// million leases, so only at start-up, after a missed change and
    /// hourly). A failed read is logged and treated as none: the next scan
    /// tries again.
    fn my_leases(&self) -> Vec<LeaseRecord> {
        let mut mine = Vec::new();
        let r = self.store.for_each_lease(|rec| {
            if self.names_me(&rec) {
                mine.push(rec);
            }
            Ok(())
        });
        if let Err(e) = r {
            error!("reading this provider's leases failed: {e}");
        }
        mine
    }

    /// The leases whose VMs we hold.
    fn held_hashes(&self) -> HashSet<LeaseHash> {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect()
    }

    /// Their records.
    fn held_leases(&self) -> Vec<LeaseRecord> {
        self.held_hashes()
            .iter()
            .filter_map(|h| self.store.lease(h).ok().flatten())
            .collect()
    }

    fn request(rec: &LeaseRecord) -> ProvisionRequest {
        ProvisionRequest {
            lease: rec.hash,
            vcpus: rec.lease.vcpus,
            memory_mb: rec.lease.memory_mb,
            disk_gb: rec.lease.disk_gb,
            access_pub_key: rec.lease.access_pub_key,
        }
    }

    /// Reserve capacity for `req`, or say why not.
    fn reserve(&self, req: &ProvisionRequest) -> Result<(), Unreserved> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.contains_key(&req.lease) {
            return Err(Unreserved::AlreadyHeld);
        }
        self.fits(&held, req).map_err(Unreserved::OverCapacity)?;
        held.insert(req.lease, req.clone());
        Ok(())
    }

    /// Whether `req` fits beside `held`; the reason is public (it goes
    /// into the decline).
    fn fits(
        &self,
        held: &HashMap<LeaseHash, ProvisionRequest>,
        req: &ProvisionRequest,
    ) -> Result<(), String> {
        let c = &self.capacity;
        let vcpus: u32 = held.values().map(|r| r.vcpus).sum::<u32>() + req.vcpus;
        let mem: u64 =
            held.values().map(|r| u64::from(r.memory_mb)).sum::<u64>() + u64::from(req.memory_mb);
        let disk: u64 =
            held.values().map(|r| u64::from(r.disk_gb)).sum::<u64>() + u64::from(req.disk_gb);
        if held.len() + 1 > c.max_leases {
            return Err(format!(
                "over capacity: already running {} of {} leases",
                held.len(),
                c.max_leases
            ));
        }
        if vcpus > c.max_vcpus {
            return Err(format!(
                "over capacity: {vcpus} vCPUs needed, {} allowed",
                c.max_vcpus
            ));
        }
        if mem > c.max_memory_mb {
            return Err(format!(
                "over capacity: {mem} MiB memory needed, {} allowed",
                c.max_memory_mb
            ));
        }
        if disk > c.max_disk_gb {
            return Err(format!(
                "over capacity: {disk} GiB disk needed, {} allowed",
                c.max_disk_gb
            ));
        }
        Ok(())
    }

    fn release(&self, lease: &LeaseHash) -> bool {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(lease)
            .is_some()
    }

    /// Provision the VM for a created lease and publish the accept.
    async fn take(self: &Arc<Self>, net: &NetHandle, rec: LeaseRecord) {
        let req = Self::request(&rec);
        match self.reserve(&req) {
            Ok(()) => {}
            // Taken already (a repeated change): nothing to do.
            Err(Unreserved::AlreadyHeld) => return,
            Err(Unreserved::OverCapacity(reason)) => {
                self.decline(net, &rec.hash, &reason, reason.clone()).await;
                return;
            }
        }
        self.declined
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&rec.hash);
        info!(
            vcpus = req.vcpus,
            memory_mb = req.memory_mb,
            disk_gb = req.disk_gb,
            "provisioning VM"
        );
        let info = match self.vm.provision(&req).await {
            Ok(i) => i,
            Err(e) => {
                error!("provisioning failed: {e}");
                self.release(&rec.hash);
                // The ledger is public: the consumer learns that it failed,
                // the operator (GET /vms/{lease}) learns how.
                self.decline(
                    net,
                    &rec.hash,
                    "the VM could not be started on this provider (the provider's operator sees why in its GET /vms/{lease})",
                    format!("provisioning failed: {e}"),
                )
                .await;
                return;
            }
        };
        // The lease may have been cancelled while we provisioned.
        let still_created =
            matches!(self.store.lease(&rec.hash), Ok(Some(r)) if r.state() == LeaseState::Created);
        let Some(host_key) = info.host_key.filter(|_| still_created) else {
            info!("lease ended (or no host key) while provisioning; tearing down");
            let _ = self.vm.teardown(&rec.hash).await;
            self.release(&rec.hash);
            return;
        };
        let accept = LeaseEvent::accept(&self.wallet, rec.hash, now_secs(), host_key);
        match net.publish_event(accept).await {
            Ok(_) => info!("lease accepted"),
            Err(e) => {
                error!("could not publish accept: {e}");
                let _ = self.vm.teardown(&rec.hash).await;
                self.release(&rec.hash);
            }
        }
    }

    /// Refuse a lease for good: a signed decline on the ledger tells the
    /// consumer (through any node) at once, and every node's record ends.
    /// `local` is what this node's `GET /vms/{lease}` shows.
    async fn decline(&self, net: &NetHandle, lease: &LeaseHash, public: &str, local: String) {
        warn!(reason = %local, "lease declined");
        self.declined
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(*lease, local);
        let ev = LeaseEvent::decline(&self.wallet, *lease, now_secs(), public);
        if let Err(e) = net.publish_event(ev).await {
            // Still declined here (never retried while this node runs); the
            // consumer only waits out the offer.
            error!("could not publish the decline: {e}");
        }
    }

    /// Tear the VM down for a lease that ended. Its tunnels close on
    /// their own (each waits on `Store::until_inactive`).
    async fn end(&self, lease: &LeaseHash, state: LeaseState) {
        if self.release(lease) {
            info!(%state, "lease ended; tearing VM down");
        }
        if let Err(e) = self.vm.teardown(lease).await {
            warn!("teardown failed: {e}");
        }
    }

    /// Run the provider until `cancel`: recover VMs, take pending leases,
    /// react to every lease change, and expire leases on time.
    pub async fn run(self: Arc<Self>, net: NetHandle, cancel: CancellationToken) {
        // Subscribe before scanning so nothing is missed in between.
        let mut changes = self.store.subscribe();
        let mine = self.my_leases();
        let keep: Vec<ProvisionRequest> = mine
            .iter()
            .filter(|r| r.state() == LeaseState::Accepted)
            .map(Self::request)
            .collect();
        // A stop during recovery (VM boots take minutes) must not wait for
        // it: what is booting is dropped (and killed), what is up is stopped.
        tokio::select! {
            () = self.recover_vms(&keep) => {}
            () = cancel.cancelled() => {
                self.vm.shutdown().await;
                return;
            }
        }
        let mut tasks = tokio::task::JoinSet::new();
        for r in mine
            .into_iter()
            .filter(|r| r.state() == LeaseState::Created)
        {
            self.spawn_take(&mut tasks, &net, r, &cancel);
        }
        let mut full_scan = tokio::time::interval(FULL_SCAN_INTERVAL);
        full_scan.tick().await;
        loop {
            let next_expiry = self.next_expiry();
            let sleep = next_expiry.map_or(Duration::from_secs(3600), |t| {
                Duration::from_secs(t.saturating_sub(now_secs())).max(Duration::from_millis(50))
            });
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                change = changes.recv() => match change {
                    Ok(c) => self.on_change(&mut tasks, &net, c.lease, c.new, &cancel).await,
                    Err(RecvError::Lagged(_)) => self.rescan(&mut tasks, &net, &cancel, true).await,
                    Err(RecvError::Closed) => break,
                },
                _ = full_scan.tick() => self.rescan(&mut tasks, &net, &cancel, true).await,
                () = tokio::time::sleep(sleep) => self.rescan(&mut tasks, &net, &cancel, false).await,
            }
        }
        tasks.shutdown().await;
        self.vm.shutdown().await;
    }

    /// Bring back the VMs of our accepted leases, then let waiting tunnels
    /// through, whether or not recovery worked (a failed VM then answers
    /// with its own error).
    async fn recover_vms(&self, keep: &[ProvisionRequest]) {
        for r in keep {
            let _ = self.reserve(r);
        }
        match self.vm.recover(keep).await {
            Ok(vms) => info!(recovered = vms.len(), "VMs recovered"),
            Err(e) => error!("recovering VMs failed: {e}"),
        }
        self.recovered.send_replace(true);
    }

    async fn await_recovery(&self) -> Result<(), TunnelRefusal> {
        // Every tunnel passes here; after start-up this is one load.
        if !self.recovering() {
            return Ok(());
        }
        match tokio::time::timeout(RECOVERY_WAIT, self.recovered()).await {
            Ok(_) => Ok(()),
            Err(_) => Err(TunnelRefusal::Recovering(RECOVERY_WAIT)),
        }
    }

    fn spawn_take(
        self: &Arc<Self>,
        tasks: &mut tokio::task::JoinSet<()>,
        net: &NetHandle,
        rec: LeaseRecord,
        cancel: &CancellationToken,
    ) {
        let me = self.clone();
        let net = net.clone();
        let cancel = cancel.clone();
        let span = tracing::info_span!("provide", lease = %rec.hash.short());
        tasks.spawn(
            async move {
                cancel.run_until_cancelled(me.take(&net, rec)).await;
            }
            .instrument(span),
        );
    }

    async fn on_change(
        self: &Arc<Self>,
        tasks: &mut tokio::task::JoinSet<()>,
        net: &NetHandle,
        lease: LeaseHash,
        state: LeaseState,
        cancel: &CancellationToken,
    ) {
        let Ok(Some(rec)) = self.store.lease(&lease) else {
            return;
        };
        if !self.names_me(&rec) {
            return;
        }
        match state {
            LeaseState::Created => self.spawn_take(tasks, net, rec, cancel),
            s if s.is_final() => {
                self.end(&lease, s)
                    .instrument(tracing::info_span!("provide", lease = %lease.short()))
                    .await
            }
            _ => {}
        }
    }

    /// Earliest expiry among leases we hold.
    fn next_expiry(&self) -> Option<u64> {
        self.held_leases()
            .iter()
            .filter_map(LeaseRecord::expires_at)
            .min()
    }

    /// Re-check everything we hold (expiry, missed changes) and, on a
    /// `full` scan, take any created lease we have not seen.
    async fn rescan(
        self: &Arc<Self>,
        tasks: &mut tokio::task::JoinSet<()>,
        net: &NetHandle,
        cancel: &CancellationToken,
        full: bool,
    ) {
        let held = self.held_hashes();
        let recs = if full {
            self.my_leases()
        } else {
            self.held_leases()
        };
        for rec in recs {
            let st = rec.state();
            if held.contains(&rec.hash) && st.is_final() {
                self.end(&rec.hash, st).await;
            } else if !held.contains(&rec.hash)
                && st == LeaseState::Created
                && self.declined(&rec.hash).is_none()
            {
                self.spawn_take(tasks, net, rec, cancel);
            }
        }
    }
}

#[async_trait::async_trait]
impl TunnelValidator for Provider {
    async fn validate_tunnel_lease(
        &self,
        lease: &LeaseHash,
        _peer: &PeerId,
    ) -> Result<(), TunnelRefusal> {
        xe_net::tunnel::lease_for_tunnel(&self.store, lease, &self.wallet.address())
    }

    async fn until_inactive(&self, lease: &LeaseHash) -> Inactive {
        self.store.until_inactive(lease).await
    }

    async fn dial_ssh(&self, lease: &LeaseHash) -> Result<Box<dyn VmConn>, TunnelRefusal> {
        self.await_recovery().await?;
        let s = self
            .vm
            .dial_ssh(lease)
            .await
            .map_err(|e| TunnelRefusal::VmUnreachable(e.to_string()))?;
        let _ = s.set_nodelay(true);
        Ok(Box::new(s))
    }
}

#[cfg(test)]
mod tests;
