//! A `Node` owns its parts — store, p2p host, provider role, SSH gateway —
//! and one cancellation token that stops them all.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use xe_net::{NetConfig, NetHandle, NetRoles};
use xe_store::{Store, Wallet};
use xe_vm::VmManager;

use crate::gateway::{Gateway, GatewayConfig, GatewayStats};
use crate::provider::{Capacity, Provider};
use crate::stages::{Stage, Stages, TaskEnd};
use crate::vm_dialer::VmDialer;

/// Which VM backend a provider uses.
#[derive(Clone)]
pub enum VmBackend {
    /// Lima VMs (production).
    Lima {
        /// `limactl` binary.
        limactl: PathBuf,
        /// Cloud image location (local file or URL Lima can read).
        image: String,
    },
    /// One QEMU VM per lease (its `state_dir` is replaced by
    /// `DATA/vms/qemu`).
    Qemu(xe_vm::qemu::QemuConfig),
    /// A real OpenSSH sshd per lease.
    Sshd {
        /// sshd binary, if not on PATH / in /usr/sbin.
        sshd: Option<PathBuf>,
    },
    /// Embedded development SSH server (shell on the host!).
    Dev,
    /// A backend supplied by the program embedding the node (benchmarks,
    /// tests, other VM systems).
    Custom(Arc<dyn VmManager>),
}

impl std::fmt::Debug for VmBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmBackend::Lima { limactl, image } => f
                .debug_struct("Lima")
                .field("limactl", limactl)
                .field("image", image)
                .finish(),
            VmBackend::Qemu(c) => f.debug_tuple("Qemu").field(c).finish(),
            VmBackend::Sshd { sshd } => f.debug_struct("Sshd").field("sshd", sshd).finish(),
            VmBackend::Dev => f.write_str("Dev"),
            VmBackend::Custom(vm) => write!(f, "Custom({})", vm.backend()),
        }
    }
}

/// Provider settings.
#[derive(Debug, Clone)]
pub struct ProvideConfig {
    /// Backend.
    pub backend: VmBackend,
    /// Limits.
    pub capacity: Capacity,
}

/// SSH gateway settings: where it listens, and the gateway's own settings.
#[derive(Debug, Clone)]
pub struct SshConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Limits, timeouts and the host key file (see [`GatewayConfig`]).
    pub gateway: GatewayConfig,
}

impl SshConfig {
    /// The gateway's defaults, listening on `listen`, its host key in
    /// `data_dir`.
    pub fn new(listen: SocketAddr, data_dir: &Path) -> Self {
        SshConfig {
            listen,
            gateway: GatewayConfig::new(data_dir),
        }
    }
}

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Holds the store, identity, host key, VM state.
    pub data_dir: PathBuf,
    /// The node's account wallet (created on first run).
    pub wallet: PathBuf,
    /// The overlay: listen addresses, bootstrap peers, NAT traversal,
    /// tunnel limits and deadlines, cipher, inbound caps.
    pub net: NetConfig,
    /// Provider role, if enabled.
    pub provide: Option<ProvideConfig>,
    /// SSH gateway, if enabled.
    pub ssh: Option<SshConfig>,
    /// How long an ended lease stays in the store (see `xe_store::retention`).
    pub ledger_retention: Duration,
}

impl NodeConfig {
    /// Defaults for a node in `data_dir`.
    pub fn new(data_dir: PathBuf) -> Self {
        NodeConfig {
            wallet: data_dir.join("wallet.seed"),
            data_dir,
            // A node is reached from other machines; a bare host (tests,
            // benches) listens on loopback.
            net: NetConfig {
                listen: NetConfig::every_interface(),
                ..NetConfig::default()
            },
            provide: None,
            ssh: None,
            ledger_retention: Duration::from_secs(xe_store::DEFAULT_RETENTION_SECS),
        }
    }
}

/// Errors starting a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Store failure.
    #[error(transparent)]
    Store(#[from] xe_store::StoreError),
    /// Wallet failure.
    #[error(transparent)]
    Wallet(#[from] xe_store::WalletError),
    /// Network failure.
    #[error(transparent)]
    Net(#[from] xe_net::NetError),
    /// VM backend failure.
    #[error(transparent)]
    Vm(#[from] xe_vm::VmError),
    /// I/O.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Error.
        source: std::io::Error,
    },
    /// Gateway failure.
    #[error("ssh gateway: {0}")]
    Gateway(#[from] crate::gateway::GatewayError),
    /// The ledger retention window cannot be used.
    #[error(transparent)]
    Retention(#[from] xe_store::WindowTooShort),
}

/// A running node.
pub struct Node {
    /// The ledger.
    pub store: Store,
    /// The p2p host.
    pub net: NetHandle,
    /// This node's account.
    pub wallet: Arc<Wallet>,
    /// Provider role, if enabled.
    pub provider: Option<Arc<Provider>>,
    /// SSH gateway address, if enabled.
    pub ssh_addr: Option<SocketAddr>,
    /// SSH gateway counters, if enabled.
    pub gateway_stats: Option<Arc<crate::gateway::GatewayStats>>,
    /// How this node reaches a lease's VM (gateway and HTTP tunnel alike).
    pub vm_dialer: Arc<VmDialer>,
    stages: Stages,
}

fn build_vm(
    data_dir: &std::path::Path,
    backend: &VmBackend,
) -> Result<Arc<dyn VmManager>, NodeError> {
    let state = data_dir.join("vms");
    Ok(match backend {
        VmBackend::Lima { limactl, image } => Arc::new(xe_vm::lima::LimaManager::new(
            xe_vm::lima::LimaConfig::new(limactl.clone(), data_dir.join("lima"), image.clone()),
        )?),
        VmBackend::Qemu(c) => {
            let mut c = c.clone();
            c.state_dir = state.join("qemu");
            Arc::new(xe_vm::qemu::QemuManager::new(c)?)
        }
        VmBackend::Sshd { sshd } => {
            Arc::new(xe_vm::sshd::SshdManager::new(xe_vm::sshd::SshdConfig {
                state_dir: state.join("sshd"),
                sshd_path: sshd.clone(),
            })?)
        }
        VmBackend::Dev => Arc::new(xe_vm::dev::DevManager::new(state.join("dev"))),
        VmBackend::Custom(vm) => vm.clone(),
    })
}

impl Node {
    /// Start every part of the node. Returns once listeners are bound.
    pub async fn start(cfg: NodeConfig) -> Result<Node, NodeError> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|source| NodeError::Io {
            what: format!("creating {}", cfg.data_dir.display()),
            source,
        })?;
        let store = Store::open(&cfg.data_dir.join("db"))?;
        store.set_retention(cfg.ledger_retention.as_secs())?;
        let wallet = Arc::new(Wallet::load_or_create(&cfg.wallet)?);
        let keypair = xe_net::load_or_create_keypair(&cfg.data_dir.join("p2p_key"))?;
        let mut stages = Stages::new();

        let provider = match &cfg.provide {
            Some(p) => {
                let vm = build_vm(&cfg.data_dir, &p.backend)?;
                Some(Provider::new(
                    store.clone(),
                    wallet.clone(),
                    vm,
                    p.capacity.clone(),
                ))
            }
            None => None,
        };
        let mut roles = NetRoles::new(keypair);
        if let Some(p) = &provider {
            roles.announce = Some(wallet.clone());
            roles.validator = Some(p.clone() as Arc<dyn xe_net::TunnelValidator>);
        }
        let net = xe_net::start(
            roles,
            cfg.net.clone(),
            store.clone(),
            stages.network.token(),
        )
        .await?;
        let handle = net.handle.clone();
        let mut net_tasks = net.tasks;
        stages.network.spawn("p2p host", async move {
            while let Some(r) = net_tasks.join_next().await {
                // Passed on, so the stage reports the host's panic.
                if let Err(e) = r
                    && e.is_panic()
                {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        });
        if let Some(p) = &provider {
            let token = stages.roles.token();
            stages
                .roles
                .spawn("provider", p.clone().run(handle.clone(), token));
        }
        let vm_dialer = Arc::new(VmDialer::new(handle.clone(), provider.clone()));
        let (ssh_addr, gateway_stats) = match &cfg.ssh {
            Some(ssh) => {
                let (addr, stats) =
                    start_gateway(vm_dialer.clone(), ssh, &store, &mut stages.doors).await?;
                (Some(addr), Some(stats))
            }
            None => (None, None),
        };
        info!(peer_id = %handle.peer_id(), account = %wallet.address(), "node started");
        Ok(Node {
            store,
            net: handle,
            wallet,
            provider,
            ssh_addr,
            gateway_stats,
            vm_dialer,
            stages,
        })
    }

    /// Run `serve` as one of the node's doors (the HTTP API): it gets the
    /// token it must stop on, stops first at shutdown (while the network
    /// still carries what it drains), and its error is logged.
    pub fn attach<F, Fut, E>(&mut self, name: &'static str, serve: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        let fut = serve(self.stages.doors.token());
        self.stages.doors.spawn(name, async move {
            if let Err(e) = fut.await {
                error!("{name}: {e}");
            }
        });
    }

    /// Whether shutdown has begun.
    pub fn is_shutdown(&self) -> bool {
        self.stages.stopping.is_cancelled()
    }

    /// The first part of the node that stops on its own (or panics) while
    /// the node runs; pending while all run. A node without it is not the
    /// node that was started: shut down and exit.
    pub async fn failed(&mut self) -> TaskEnd {
        self.stages.failed().await
    }

    /// Stop in stages — the doors (gateway and API stop accepting, their
    /// sessions end), then the network, then the roles (the provider stops
    /// its VMs' processes; their state stays for the next start) — and
    /// flush the store. Bounded (25 s in all); a stage's tasks that do not
    /// finish in its time are aborted. Returns the parts that panicked; a
    /// second call does nothing.
    pub async fn shutdown(&mut self) -> Vec<TaskEnd> {
        if self.is_shutdown() {
            return Vec::new();
        }
        let panicked = self.stages.stop().await;
        if let Err(e) = self.store.flush() {
            warn!("final store flush failed: {e}");
        }
        info!("node stopped");
        panicked
    }
}

/// Bind and spawn the SSH gateway; returns its bound address and counters.
async fn start_gateway(
    dialer: Arc<VmDialer>,
    ssh: &SshConfig,
    store: &Store,
    doors: &mut Stage,
) -> Result<(SocketAddr, Arc<GatewayStats>), NodeError> {
    let stats = Arc::new(GatewayStats::new());
    let gateway = Gateway::new(ssh.gateway.clone(), store.clone(), dialer, stats.clone())?;
    let listener = tokio::net::TcpListener::bind(ssh.listen)
        .await
        .map_err(|source| NodeError::Io {
            what: format!("binding the SSH gateway to {}", ssh.listen),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| NodeError::Io {
        what: "reading the SSH gateway address".into(),
        source,
    })?;
    info!(%addr, fingerprint = %gateway.host_key_fingerprint(), "SSH gateway enabled");
    let token = doors.token();
    doors.spawn("SSH gateway", async move {
        if let Err(e) = gateway.run(listener, token).await {
            error!("SSH gateway stopped: {e}");
        }
    });
    Ok((addr, stats))
}
