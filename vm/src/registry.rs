//! The in-memory lease → VM table every backend keeps.
//!
//! Provisioning can take minutes (lima), so the table is never locked
//! across an await: `begin` inserts a `Provisioning` slot stamped with a
//! generation, the slow work runs unlocked, and `finish` only installs the
//! result if the slot still carries that generation — if the lease was torn
//! down meanwhile, the caller gets its runtime back to clean up.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use xe_store::LeaseHash;

use crate::{VmError, VmInfo, VmStatus};

struct Slot<R> {
    info: VmInfo,
    generation: u64,
    runtime: Option<R>,
}

/// What `begin` found.
pub(crate) enum Begin {
    /// A fresh `Provisioning` slot with this generation; go ahead.
    Go(u64),
    /// The lease is already running: nothing to do.
    AlreadyRunning(VmInfo),
}

pub(crate) struct Registry<R> {
    backend: &'static str,
    slots: Mutex<HashMap<LeaseHash, Slot<R>>>,
    next_generation: AtomicU64,
}

impl<R> Registry<R> {
    pub(crate) fn new(backend: &'static str) -> Self {
        Registry {
            backend,
            slots: Mutex::new(HashMap::new()),
            next_generation: AtomicU64::new(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<LeaseHash, Slot<R>>> {
        // A panic while holding this lock cannot leave a slot half-written
        // (every update is a single insert/remove), so poison is harmless.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claim `lease` for provisioning. A slot in `Error` or `Stopped` is
    /// replaced (its runtime, if any, is returned for cleanup).
    pub(crate) fn begin(&self, lease: &LeaseHash) -> Result<(Begin, Option<R>), VmError> {
        let mut slots = self.lock();
        if let Some(slot) = slots.get(lease) {
            match slot.info.status {
                VmStatus::Running => return Ok((Begin::AlreadyRunning(slot.info.clone()), None)),
                VmStatus::Provisioning => return Err(VmError::Busy(*lease)),
                VmStatus::Error | VmStatus::Stopped => {}
            }
        }
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let old = slots.insert(
            *lease,
            Slot {
                info: VmInfo::new(*lease, self.backend, VmStatus::Provisioning),
                generation,
                runtime: None,
            },
        );
        Ok((Begin::Go(generation), old.and_then(|s| s.runtime)))
    }

    /// Install the outcome of a provision started with `generation`.
    /// `Err(runtime)` means the lease was torn down meanwhile.
    pub(crate) fn finish(
        &self,
        lease: &LeaseHash,
        generation: u64,
        info: VmInfo,
        runtime: Option<R>,
    ) -> Result<(), Option<R>> {
        let mut slots = self.lock();
        match slots.get_mut(lease) {
            Some(slot) if slot.generation == generation => {
                slot.info = info;
                slot.runtime = runtime;
                Ok(())
            }
            _ => Err(runtime),
        }
    }

    /// Put a slot in place unconditionally (recover).
    pub(crate) fn set(&self, info: VmInfo, runtime: Option<R>) -> Option<R> {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let lease = info.lease;
        self.lock()
            .insert(
                lease,
                Slot {
                    info,
                    generation,
                    runtime,
                },
            )
            .and_then(|s| s.runtime)
    }

    /// Remove a lease, returning its runtime for cleanup.
    pub(crate) fn remove(&self, lease: &LeaseHash) -> Option<(VmInfo, Option<R>)> {
        self.lock().remove(lease).map(|s| (s.info, s.runtime))
    }

    pub(crate) fn get(&self, lease: &LeaseHash) -> Option<VmInfo> {
        self.lock().get(lease).map(|s| s.info.clone())
    }

    pub(crate) fn list(&self) -> Vec<VmInfo> {
        let mut v: Vec<VmInfo> = self.lock().values().map(|s| s.info.clone()).collect();
        v.sort_by_key(|i| i.lease);
        v
    }

    pub(crate) fn leases(&self) -> Vec<LeaseHash> {
        self.lock().keys().copied().collect()
    }

    /// The port of a running VM, or why there is none.
    pub(crate) fn running_port(&self, lease: &LeaseHash) -> Result<u16, VmError> {
        let slots = self.lock();
        let slot = slots.get(lease).ok_or(VmError::NotFound(*lease))?;
        match (slot.info.status, slot.info.ssh_port) {
            (VmStatus::Running, Some(port)) => Ok(port),
            (status, _) => Err(VmError::NotRunning {
                lease: *lease,
                status,
            }),
        }
    }

    /// The VM serving `lease` on `port` went away on its own (its process
    /// exited): mark it `Error` with `why()`. A slot that is not that VM any
    /// more (torn down, re-provisioned on another port) is left alone.
    pub(crate) fn fail_running(
        &self,
        lease: &LeaseHash,
        port: u16,
        why: impl FnOnce() -> String,
    ) -> bool {
        let mut slots = self.lock();
        match slots.get_mut(lease) {
            Some(slot)
                if slot.info.status == VmStatus::Running && slot.info.ssh_port == Some(port) =>
            {
                slot.info.status = VmStatus::Error;
                slot.info.ssh_port = None;
                slot.info.error = Some(why());
                true
            }
            _ => false,
        }
    }

    /// Take every runtime out and mark its VM `Stopped` (shutdown).
    pub(crate) fn stop_all(&self) -> Vec<(LeaseHash, R)> {
        let mut out = Vec::new();
        for (lease, slot) in self.lock().iter_mut() {
            if let Some(rt) = slot.runtime.take() {
                out.push((*lease, rt));
            }
            if slot.info.status == VmStatus::Running || slot.info.status == VmStatus::Provisioning {
                slot.info.status = VmStatus::Stopped;
                slot.info.ssh_port = None;
            }
            // Any provision still in flight must not install itself now.
            slot.generation = 0;
        }
        out
    }
}
