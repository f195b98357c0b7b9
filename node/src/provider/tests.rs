//! Start-up recovery against tunnels that arrive while it runs. Time is
//! paused, so "still waiting" is decided by tokio's clock, not by speed.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

use super::*;

const LEASE: LeaseHash = LeaseHash([7; 32]);

/// A backend whose recovery runs until the test lets it finish, and which
/// knows its VM (a loopback listener) only once recovery has run.
struct SlowRecovery {
    started: Notify,
    release: Notify,
    recovered: AtomicBool,
    vm: std::net::SocketAddr,
}

#[async_trait::async_trait]
impl VmManager for SlowRecovery {
    fn backend(&self) -> &'static str {
        "slow-recovery"
    }
    async fn provision(&self, req: &ProvisionRequest) -> Result<xe_vm::VmInfo, xe_vm::VmError> {
        Err(xe_vm::VmError::NotFound(req.lease))
    }
    async fn teardown(&self, _: &LeaseHash) -> Result<(), xe_vm::VmError> {
        Ok(())
    }
    async fn dial_ssh(&self, lease: &LeaseHash) -> Result<tokio::net::TcpStream, xe_vm::VmError> {
        if !self.recovered.load(Ordering::SeqCst) {
            return Err(xe_vm::VmError::NotFound(*lease));
        }
        tokio::net::TcpStream::connect(self.vm)
            .await
            .map_err(|source| xe_vm::VmError::Io {
                what: "dialling the test VM".into(),
                source,
            })
    }
    async fn get(&self, _: &LeaseHash) -> Option<xe_vm::VmInfo> {
        None
    }
    async fn list(&self) -> Vec<xe_vm::VmInfo> {
        Vec::new()
    }
    async fn recover(&self, _: &[ProvisionRequest]) -> Result<Vec<xe_vm::VmInfo>, xe_vm::VmError> {
        self.started.notify_one();
        self.release.notified().await;
        self.recovered.store(true, Ordering::SeqCst);
        Ok(Vec::new())
    }
    async fn shutdown(&self) {}
}

struct World {
    _dir: tempfile::TempDir,
    _vm: tokio::net::TcpListener,
    backend: Arc<SlowRecovery>,
    provider: Arc<Provider>,
}

async fn world() -> World {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("db")).expect("store");
    let wallet = Arc::new(Wallet::load_or_create(&dir.path().join("wallet")).expect("wallet"));
    let vm = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind test VM");
    let backend = Arc::new(SlowRecovery {
        started: Notify::new(),
        release: Notify::new(),
        recovered: AtomicBool::new(false),
        vm: vm.local_addr().expect("addr"),
    });
    let provider = Provider::new(store, wallet, backend.clone(), Capacity::default());
    World {
        _dir: dir,
        _vm: vm,
        backend,
        provider,
    }
}

impl World {
    /// Start recovery in a task; returns once the backend is inside it.
    async fn recovery_started(&self) -> tokio::task::JoinHandle<()> {
        let p = self.provider.clone();
        let recovery = tokio::spawn(async move { p.recover_vms(&[]).await });
        self.backend.started.notified().await;
        recovery
    }
}

#[tokio::test(start_paused = true)]
async fn a_tunnel_that_arrives_during_recovery_waits_for_it() {
    let w = world().await;
    let recovery = w.recovery_started().await;

    let p = w.provider.clone();
    let mut dial = tokio::spawn(async move { p.dial_ssh(&LEASE).await.map(drop) });
    assert!(
        tokio::time::timeout(Duration::from_secs(5), &mut dial)
            .await
            .is_err(),
        "the tunnel must wait for recovery, not be told there is no VM"
    );
    w.backend.release.notify_one();
    dial.await
        .expect("dial task")
        .expect("after recovery the VM is dialled");
    recovery.await.expect("recovery task");
}

#[tokio::test(start_paused = true)]
async fn a_recovery_that_never_ends_refuses_tunnels_with_advice() {
    let w = world().await;
    let _recovery = w.recovery_started().await;
    let Err(refusal) = w.provider.dial_ssh(&LEASE).await.map(drop) else {
        panic!("a tunnel got through before recovery ended");
    };
    let msg = refusal.to_string();
    assert!(
        msg.contains("still recovering") && msg.contains("try again"),
        "{msg}"
    );
}
