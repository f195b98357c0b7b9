//! `xe node`: run a node (gateway, provider, or plain replica).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use xe_net::Multiaddr;
use xe_node::{Capacity, Node, NodeConfig, ProvideConfig, SshConfig, VmBackend};

/// Which VM backend a provider uses.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Backend {
    /// Lima VMs via `limactl` (production).
    Lima,
    /// One QEMU VM per lease, of the lease's size (Linux; needs --qemu-image).
    Qemu,
    /// A real OpenSSH sshd per lease on 127.0.0.1 (host or container access).
    Sshd,
    /// Embedded SSH server giving a shell on THIS machine. Development only.
    Dev,
}

#[derive(Args, Debug, Clone)]
pub struct NodeArgs {
    /// Directory holding everything the node keeps (store, keys, VM state).
    #[arg(long, value_name = "DIR", env = "XE_DATA")]
    pub data: Option<PathBuf>,
    /// The node's account wallet [default: DIR/wallet.seed, created on first run].
    #[arg(long, value_name = "PATH")]
    pub wallet: Option<PathBuf>,
    /// libp2p listen multiaddr (repeatable).
    #[arg(long = "p2p-listen", value_name = "MULTIADDR",
          default_values = ["/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"])]
    pub p2p_listen: Vec<Multiaddr>,
    /// Peer to dial at start, ending in /p2p/<peer id> (repeatable).
    #[arg(long, value_name = "MULTIADDR")]
    pub bootstrap: Vec<Multiaddr>,

    /// Host VMs for leases that name this node's account.
    #[arg(long)]
    pub provide: bool,
    /// VM backend for --provide.
    #[arg(long, value_enum, default_value = "lima")]
    pub vm_backend: Backend,
    /// limactl binary (lima backend).
    #[arg(long, value_name = "PATH", default_value = "limactl")]
    pub limactl: PathBuf,
    /// Cloud image for Lima VMs: a local path or URL (never downloaded by tests).
    #[arg(
        long,
        value_name = "LOCATION",
        default_value = "https://dl-cdn.alpinelinux.org/alpine/v3.20/releases/cloud/nocloud_alpine-3.20.3-x86_64-bios-cloudinit-r0.qcow2"
    )]
    pub lima_image: String,
    #[command(flatten)]
    pub qemu: crate::qemu_args::QemuArgs,
    /// sshd binary (sshd backend) [default: /usr/sbin/sshd or PATH].
    #[arg(long, value_name = "PATH")]
    pub sshd: Option<PathBuf>,
    /// Most leases hosted at once.
    #[arg(long, default_value_t = 16, value_parser = at_least_one())]
    pub max_leases: usize,
    /// Most vCPUs across all leases.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_vcpus: u32,
    /// Most memory (MiB) across all leases.
    #[arg(long, default_value_t = 256 * 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_memory_mb: u64,
    /// Most disk (GiB) across all leases.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_disk_gb: u64,
    /// Most tunnels (SSH sessions) served at once across all leases.
    #[arg(long, default_value_t = 1024, value_parser = at_least_one())]
    pub max_tunnels: usize,
    /// Most p2p connections one address (an IPv4 address, an IPv6 /64)
    /// may hold to this node (1-4096). Raise it when many nodes share one
    /// NAT address and all connect here.
    #[arg(long, default_value_t = xe_net::inbound::MAX_ESTABLISHED_PER_SOURCE,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    pub p2p_max_connections_per_source: usize,
    /// Cipher of the overlay's TCP and relayed connections: `aes-gcm`
    /// (offered first, standard ChaCha20 noise for peers without it) or
    /// `chacha20` (standard libp2p noise only).
    #[arg(long, value_name = "CIPHER", default_value = "aes-gcm")]
    pub overlay_cipher: xe_net::OverlayCipher,

    /// SSH gateway port (0 = gateway disabled).
    #[arg(long, default_value_t = 0)]
    pub ssh_port: u16,
    /// SSH gateway address: an IP (uses --ssh-port), or IP:PORT, which
    /// enables the gateway on that port (`127.0.0.1:0` picks a free one).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0")]
    pub ssh_listen: String,
    /// Most concurrent authenticated SSH sessions (the seed's
    /// maxSSHConnections); connections still authenticating are counted
    /// apart (--ssh-max-startups).
    #[arg(long, default_value_t = 100, value_parser = at_least_one())]
    pub max_ssh_connections: usize,
    /// Unauthenticated SSH connections, as OpenSSH's MaxStartups
    /// START:RATE:FULL: beyond START, refuse new ones with RATE % chance,
    /// rising to 100 % at FULL; those admitted get a 10 s grace.
    #[arg(long, value_name = "START:RATE:FULL", default_value = "10:30:100")]
    pub ssh_max_startups: xe_node::gateway::Startups,
    /// Unauthenticated SSH connections one client address (IPv4, IPv6 /64)
    /// may hold (1-1000).
    #[arg(long, default_value_t = xe_node::gateway::DEFAULT_STARTUPS_PER_SOURCE,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000))]
    pub ssh_max_startups_per_source: usize,
    /// New SSH connections one client address may make back to back before
    /// pacing starts (1-100000).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub ssh_connect_burst: u32,
    /// New SSH connections per second one client address regains after its
    /// burst; beyond it, key exchanges wait their turn (1-100000).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub ssh_connect_rate: u32,
    /// Seconds an SSH client has to authenticate (1-3600).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub ssh_auth_grace: u64,

    /// Tunnel handshake deadline in seconds, both sides (1-600).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub handshake_timeout: u64,
    /// Seconds between directory re-announcements, providers (5-86400).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(5..=86_400))]
    pub announce_interval: u64,
    /// Days an ended lease stays in this node's ledger copy before it is
    /// compacted (at least 1, the offer lifetime). Shorter saves disk; a
    /// node offline for longer than this may miss how a lease ended.
    #[arg(long, value_name = "DAYS", default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(1..=365))]
    pub ledger_retention_days: u64,

    /// Serve circuit relay v2 so peers behind NAT are reachable through
    /// this node [default: on when the SSH gateway is enabled].
    #[arg(long, conflicts_with = "no_relay_server")]
    pub relay_server: bool,
    /// Do not relay for other peers, even with the SSH gateway enabled.
    #[arg(long)]
    pub no_relay_server: bool,
    /// An address other peers can reach this node at, e.g. its public IP
    /// (repeatable). A relay server advertises these; without it, its
    /// listen addresses.
    #[arg(long = "external-addr", value_name = "MULTIADDR")]
    pub external_addr: Vec<Multiaddr>,
    /// Reserve a slot on this relay, ending in /p2p/<peer id> (repeatable),
    /// whatever AutoNAT says [default: bootstrap peers that relay, once
    /// AutoNAT finds this node unreachable].
    #[arg(long, value_name = "MULTIADDR")]
    pub relay: Vec<Multiaddr>,
    /// This node is not publicly reachable: reserve on relays at once
    /// instead of waiting for AutoNAT's verdict.
    #[arg(long)]
    pub behind_nat: bool,

    /// HTTP API port (0 = API disabled; the CLI's default node URL is
    /// http://127.0.0.1:8080).
    #[arg(long, default_value_t = 0)]
    pub api_port: u16,
    /// HTTP API address: an IP (uses --api-port), or IP:PORT, which
    /// enables the API on that port (`127.0.0.1:0` picks a free one).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1")]
    pub api_listen: String,
    /// Refuse the seed's timeless X-Signature form on POST
    /// /tunnel/{lease}/tcp: require the fresh form (bound to this node,
    /// used once, ±60 s; see the README's HTTP API section).
    #[arg(long)]
    pub http_tunnel_require_fresh: bool,
    /// Most HTTP API connections one client address (an IPv4 address, an
    /// IPv6 /64) may hold at once (1-1024; all clients together: 1024).
    #[arg(long, default_value_t = xe_api::DEFAULT_MAX_CONNECTIONS_PER_SOURCE,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    pub api_max_connections_per_source: usize,
}

fn ssh_listen(args: &NodeArgs) -> anyhow::Result<Option<SocketAddr>> {
    if let Ok(sa) = args.ssh_listen.parse::<SocketAddr>() {
        return Ok(Some(sa));
    }
    let ip: IpAddr = args.ssh_listen.parse().with_context(|| {
        format!(
            "--ssh-listen {:?}: expected an IP address or IP:PORT",
            args.ssh_listen
        )
    })?;
    Ok((args.ssh_port != 0).then_some(SocketAddr::new(ip, args.ssh_port)))
}

fn api_listen(args: &NodeArgs) -> anyhow::Result<Option<SocketAddr>> {
    if let Ok(sa) = args.api_listen.parse::<SocketAddr>() {
        return Ok(Some(sa));
    }
    let ip: IpAddr = args.api_listen.parse().with_context(|| {
        format!(
            "--api-listen {:?}: expected an IP address or IP:PORT",
            args.api_listen
        )
    })?;
    Ok((args.api_port != 0).then_some(SocketAddr::new(ip, args.api_port)))
}

/// A count that must be at least one (0 would refuse everything while
/// looking configured).
fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
}

impl NodeArgs {
    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.data
            .clone()
            .unwrap_or_else(|| crate::paths::xe_home().join("node"))
    }

    /// Translate flags into a node configuration.
    pub fn to_config(&self) -> anyhow::Result<NodeConfig> {
        let data = self.data_dir();
        let mut cfg = NodeConfig::new(data.clone());
        if let Some(w) = &self.wallet {
            cfg.wallet = w.clone();
        }
        cfg.net.listen = self.p2p_listen.clone();
        cfg.net.bootstrap = self.bootstrap.clone();
        for b in &cfg.net.bootstrap {
            crate::paths::require_peer_id(b, format_args!("--bootstrap {b}"), BOOTSTRAP_HINT)?;
        }
        // One flag for both ends of a tunnel's handshake.
        cfg.net.client_handshake_timeout = Duration::from_secs(self.handshake_timeout);
        cfg.net.tunnel.handshake_timeout = cfg.net.client_handshake_timeout;
        cfg.net.announce_interval = Duration::from_secs(self.announce_interval);
        cfg.net.tunnel.max_tunnels = self.max_tunnels;
        cfg.net.inbound.established_per_source = self.p2p_max_connections_per_source;
        cfg.ledger_retention = Duration::from_secs(self.ledger_retention_days * 86_400);
        cfg.net.overlay_cipher = self.overlay_cipher;
        if self.provide {
            cfg.provide = Some(ProvideConfig {
                backend: match self.vm_backend {
                    Backend::Lima => VmBackend::Lima {
                        limactl: self.limactl.clone(),
                        image: self.lima_image.clone(),
                    },
                    Backend::Qemu => VmBackend::Qemu(self.qemu.config()?),
                    Backend::Sshd => VmBackend::Sshd {
                        sshd: self.sshd.clone(),
                    },
                    Backend::Dev => VmBackend::Dev,
                },
                capacity: Capacity {
                    max_leases: self.max_leases,
                    max_vcpus: self.max_vcpus,
                    max_memory_mb: self.max_memory_mb,
                    max_disk_gb: self.max_disk_gb,
                },
            });
        }
        if let Some(listen) = ssh_listen(self)? {
            let mut ssh = SshConfig::new(listen, &data);
            ssh.gateway.max_connections = self.max_ssh_connections;
            ssh.gateway.auth_grace = Duration::from_secs(self.ssh_auth_grace);
            ssh.gateway.startups = self.ssh_max_startups;
            ssh.gateway.startups_per_source = self.ssh_max_startups_per_source;
            ssh.gateway.connect_rate = xe_node::limits::RateLimit {
                burst: self.ssh_connect_burst,
                per_second: f64::from(self.ssh_connect_rate),
            };
            cfg.ssh = Some(ssh);
        }
        for r in &self.relay {
            crate::paths::require_peer_id(r, format_args!("--relay {r}"), "the relay's p2p_addrs")?;
        }
        cfg.net.nat = xe_net::NatConfig {
            relay_server: !self.no_relay_server && (self.relay_server || cfg.ssh.is_some()),
            external_addrs: self.external_addr.clone(),
            relays: self.relay.clone(),
            behind_nat: self.behind_nat,
            ..xe_net::NatConfig::default()
        };
        Ok(cfg)
    }
}

/// What `xe node` prints on stdout (one JSON line) once it is ready, and
/// writes to `DIR/node.json`: scripts and tests read ports from here.
pub async fn ready_info(node: &Node, api: Option<SocketAddr>) -> serde_json::Value {
    let addrs: Vec<String> = node
        .net
        .p2p_addrs()
        .await
        .unwrap_or_default()
        .iter()
        .map(ToString::to_string)
        .collect();
    serde_json::json!({
        "event": "ready",
        "peer_id": node.net.peer_id().to_string(),
        "account": node.wallet.address().to_string(),
        "p2p_addrs": addrs,
        "ssh_addr": node.ssh_addr.map(|a| a.to_string()),
        "api_addr": api.map(|a| a.to_string()),
        "pid": std::process::id(),
    })
}

/// After the ready line: one `{"event":"nat",…}` JSON line on stdout now
/// and whenever the node's reachability or relay addresses change (relay
/// addresses are reported after the directory entry carrying them was
/// published).
async fn print_nat_events(mut nat: tokio::sync::watch::Receiver<xe_net::NatInfo>) {
    loop {
        let line = {
            let i = nat.borrow_and_update();
            serde_json::json!({
                "event": "nat",
                "reachability": i.reachability,
                "relay_addrs": i.relay_addrs,
            })
        };
        println!("{line}");
        if nat.changed().await.is_err() {
            return;
        }
    }
}

/// Where a bootstrap address's peer id is found.
pub const BOOTSTRAP_HINT: &str = "see `listen_addrs` in the peer's GET /node";

/// SIGINT/SIGTERM handlers, installed when created: a signal that arrives
/// while the node is still starting is delivered here, not fatal.
pub struct ShutdownSignal {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl ShutdownSignal {
    /// Install the handlers now.
    pub fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(ShutdownSignal {
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }

    /// Wait for SIGINT or SIGTERM.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }

    /// A token cancelled by the first SIGINT or SIGTERM.
    pub fn into_token(mut self) -> tokio_util::sync::CancellationToken {
        let token = tokio_util::sync::CancellationToken::new();
        let stop = token.clone();
        tokio::spawn(async move {
            self.recv().await;
            stop.cancel();
        });
        token
    }
}

pub async fn run(args: NodeArgs) -> anyhow::Result<std::process::ExitCode> {
    let mut signals = ShutdownSignal::install()?;
    let cfg = args.to_config()?;
    let api = api_listen(&args)?;
    let data = cfg.data_dir.clone();
    let mut node = Node::start(cfg)
        .await
        .with_context(|| format!("starting the node in {}", data.display()))?;
    let api_addr = match api {
        Some(listen) => {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding the HTTP API to {listen}"))?;
            let addr = listener
                .local_addr()
                .context("reading the HTTP API address")?;
            let config = xe_api::ApiConfig {
                require_fresh: args.http_tunnel_require_fresh,
                max_connections_per_source: args.api_max_connections_per_source,
                ..xe_api::ApiConfig::default()
            };
            let ctx = xe_api::ApiContext::from_node(&node);
            node.attach("HTTP API", move |cancel| {
                xe_api::serve(listener, ctx, config, cancel)
            });
            Some(addr)
        }
        None => None,
    };
    let info = ready_info(&node, api_addr).await;
    let line = serde_json::to_string(&info)?;
    std::fs::write(data.join("node.json"), format!("{line}\n")).context("writing node.json")?;
    println!("{line}");
    let nat_events = tokio::spawn(print_nat_events(node.net.nat()));
    // A part that stops on its own (or panics) ends the process too: a
    // node without its gateway or host must not look alive.
    let failed = tokio::select! {
        _ = signals.recv() => None,
        end = node.failed() => Some(end),
    };
    nat_events.abort();
    match &failed {
        None => tracing::info!("signal received; shutting down"),
        Some(end) => tracing::error!("{end}; shutting down (the log above says why)"),
    }
    let panicked = node.shutdown().await;
    if failed.is_some() || !panicked.is_empty() {
        return Ok(std::process::ExitCode::FAILURE);
    }
    Ok(std::process::ExitCode::SUCCESS)
}
