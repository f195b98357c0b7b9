//! `GET /vms/{lease}` while a restarted provider is still recovering its
//! VMs: 503 with Retry-After (the VM may come back), then 404 once recovery
//! has run and the lease still has none.

mod common;

use std::sync::Arc;

use axum::http::StatusCode;
use common::*;
use tokio::sync::Notify;
use xe_node::{Capacity, Node, NodeConfig, ProvideConfig, VmBackend};
use xe_store::LeaseHash;
use xe_vm::{ProvisionRequest, VmError, VmInfo, VmManager};

/// A backend whose start-up recovery runs until the test releases it.
#[derive(Default)]
struct HeldRecovery {
    started: Notify,
    release: Notify,
}

#[async_trait::async_trait]
impl VmManager for HeldRecovery {
    fn backend(&self) -> &'static str {
        "held-recovery"
    }
    async fn provision(&self, req: &ProvisionRequest) -> Result<VmInfo, VmError> {
        Err(VmError::NotFound(req.lease))
    }
    async fn teardown(&self, _: &LeaseHash) -> Result<(), VmError> {
        Ok(())
    }
    async fn dial_ssh(&self, lease: &LeaseHash) -> Result<tokio::net::TcpStream, VmError> {
        Err(VmError::NotFound(*lease))
    }
    async fn get(&self, _: &LeaseHash) -> Option<VmInfo> {
        None
    }
    async fn list(&self) -> Vec<VmInfo> {
        Vec::new()
    }
    async fn recover(&self, _: &[ProvisionRequest]) -> Result<Vec<VmInfo>, VmError> {
        self.started.notify_one();
        self.release.notified().await;
        Ok(Vec::new())
    }
    async fn shutdown(&self) {}
}

#[tokio::test]
async fn a_vm_asked_for_during_recovery_is_503_with_retry_after_then_404() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = Arc::new(HeldRecovery::default());
    let mut cfg = NodeConfig::new(dir.path().join("node"));
    cfg.net.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr")];
    cfg.provide = Some(ProvideConfig {
        backend: VmBackend::Custom(backend.clone()),
        capacity: Capacity::default(),
    });
    let node = Node::start(cfg).await.expect("start node");
    let api = start_api(
        xe_api::ApiContext::from_node(&node),
        xe_api::ApiConfig::default(),
    )
    .await;
    let lease = LeaseHash([5; 32]);
    backend.started.notified().await;

    let r = get(api.addr, &format!("/vms/{lease}")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert_eq!(r.headers["retry-after"], "5");
    assert!(
        r.error().contains("still bringing its VMs back"),
        "{}",
        r.error()
    );

    backend.release.notify_one();
    let provider = node.provider.as_ref().expect("provider");
    tokio::time::timeout(std::time::Duration::from_secs(20), provider.recovered())
        .await
        .expect("recovery finished once released");
    assert!(!provider.recovering());
    let r = get(api.addr, &format!("/vms/{lease}")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text());
}
