//! The provider side of the load test: a VM backend whose "VM" is a TCP
//! echo server on 127.0.0.1. It holds tens of thousands of connections
//! where one OpenSSH `sshd` process per connection could not, and an echo
//! lets the load tool check every byte it sent comes back in order.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use xe_store::LeaseHash;
use xe_vm::{ProvisionRequest, VmError, VmInfo, VmManager, VmStatus};

/// Echo buffer per connection and direction: small, so the provider's
/// memory stays low while it holds 10,000 idle tunnels.
const ECHO_BUFFER: usize = 16 * 1024;

pub struct EchoVms {
    addr: SocketAddr,
    host_key: String,
    vms: Mutex<HashMap<LeaseHash, VmInfo>>,
}

impl EchoVms {
    /// Start the echo server (it runs until `cancel`).
    pub async fn start(host_key: String, cancel: CancellationToken) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            loop {
                let conn = tokio::select! {
                    _ = cancel.cancelled() => return,
                    c = listener.accept() => c,
                };
                match conn {
                    Ok((s, _)) => {
                        let c = cancel.clone();
                        tokio::spawn(async move { c.run_until_cancelled(echo(s)).await });
                    }
                    // EMFILE and friends: the load tool reports the tunnel
                    // that failed; keep accepting.
                    Err(_) => tokio::task::yield_now().await,
                }
            }
        });
        Ok(EchoVms {
            addr,
            host_key,
            vms: Mutex::new(HashMap::new()),
        })
    }
}

async fn echo(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let (mut r, mut w) = s.split();
    let mut r = tokio::io::BufReader::with_capacity(ECHO_BUFFER, &mut r);
    let _ = tokio::io::copy_buf(&mut r, &mut w).await;
}

#[async_trait::async_trait]
impl VmManager for EchoVms {
    fn backend(&self) -> &'static str {
        "echo"
    }

    async fn provision(&self, req: &ProvisionRequest) -> Result<VmInfo, VmError> {
        let info = VmInfo {
            lease: req.lease,
            backend: "echo".into(),
            status: VmStatus::Running,
            ssh_port: Some(self.addr.port()),
            host_key: Some(self.host_key.clone()),
            error: None,
            accelerator: None,
        };
        self.vms
            .lock()
            .expect("vm table")
            .insert(req.lease, info.clone());
        Ok(info)
    }

    async fn teardown(&self, lease: &LeaseHash) -> Result<(), VmError> {
        self.vms.lock().expect("vm table").remove(lease);
        Ok(())
    }

    async fn dial_ssh(&self, lease: &LeaseHash) -> Result<TcpStream, VmError> {
        if !self.vms.lock().expect("vm table").contains_key(lease) {
            return Err(VmError::NotFound(*lease));
        }
        TcpStream::connect(self.addr)
            .await
            .map_err(|source| VmError::Io {
                what: format!("connecting to the echo server {}", self.addr),
                source,
            })
    }

    async fn get(&self, lease: &LeaseHash) -> Option<VmInfo> {
        self.vms.lock().expect("vm table").get(lease).cloned()
    }

    async fn list(&self) -> Vec<VmInfo> {
        self.vms
            .lock()
            .expect("vm table")
            .values()
            .cloned()
            .collect()
    }

    async fn recover(&self, _keep: &[ProvisionRequest]) -> Result<Vec<VmInfo>, VmError> {
        Ok(Vec::new())
    }

    async fn shutdown(&self) {}
}
