//! `xe devnet`: the whole system on loopback in one command — a gateway
//! node, a provider node and a consumer node, each with its own data dir
//! and libp2p host, so the lease really travels over the overlay.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use xe_node::{Capacity, Node, NodeConfig, ProvideConfig, SshConfig, VmBackend};
use xe_store::{Lease, LeaseEvent, LeaseKey, LeaseState, Wallet, lease_key_path, now_secs};

use crate::known_hosts::pin_host_key;
use crate::node_cmd::{Backend, ShutdownSignal};
use crate::ssh_target::SshTarget;

/// `xe devnet` flags.
#[derive(Args, Debug)]
pub struct DevnetArgs {
    /// Keep all data here instead of a fresh temporary directory.
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// VM backend of the provider node: dev (embedded SSH server, shell on
    /// this machine), sshd (real OpenSSH per lease) or qemu (a real VM per
    /// lease; needs --qemu-image).
    #[arg(long, value_enum, default_value = "dev")]
    pub vm_backend: Backend,
    #[command(flatten)]
    pub qemu: crate::qemu_args::QemuArgs,
    /// Start, run CMD in the VM through the gateway with real OpenSSH,
    /// print its output, stop, and exit with CMD's status.
    #[arg(long, requires = "cmd")]
    pub once: bool,
    /// Seconds to wait for the lease to be accepted [default: 120; with
    /// qemu, the boot timeout plus 60].
    #[arg(long)]
    pub timeout: Option<u64>,
    /// With --once: the command to run in the VM.
    #[arg(last = true)]
    pub cmd: Vec<String>,
}

fn step(msg: &str) {
    eprintln!("[devnet] {msg}");
}

fn loopback_listen() -> Vec<xe_net::Multiaddr> {
    vec![
        "/ip4/127.0.0.1/tcp/0".parse().expect("valid"),
        "/ip4/127.0.0.1/udp/0/quic-v1".parse().expect("valid"),
    ]
}

struct Net3 {
    gateway: Node,
    provider: Node,
    consumer: Node,
    /// The gateway's HTTP API (for `xe tunnel`); a door of the gateway node.
    api_addr: std::net::SocketAddr,
}

impl Net3 {
    async fn shutdown(mut self) {
        // Consumer and gateway first so sessions end before VMs stop.
        self.consumer.shutdown().await;
        self.gateway.shutdown().await;
        self.provider.shutdown().await;
    }
}

async fn start_nodes(dir: &Path, args: &DevnetArgs) -> anyhow::Result<Net3> {
    let backend = args.vm_backend;
    step("starting gateway node (SSH gateway on 127.0.0.1, libp2p on loopback)…");
    let mut g = NodeConfig::new(dir.join("gateway"));
    g.net.listen = loopback_listen();
    g.ssh = Some(SshConfig::new(
        "127.0.0.1:0".parse().expect("valid"),
        &dir.join("gateway"),
    ));
    let mut gateway = Node::start(g).await.context("starting the gateway node")?;
    let boot = gateway.net.p2p_addrs().await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the gateway's HTTP API")?;
    let api_addr = listener.local_addr()?;
    let ctx = xe_api::ApiContext::from_node(&gateway);
    gateway.attach("HTTP API", move |cancel| {
        xe_api::serve(listener, ctx, xe_api::ApiConfig::default(), cancel)
    });
    step(&format!(
        "  gateway peer {} ssh {}",
        gateway.net.peer_id(),
        gateway.ssh_addr.map(|a| a.to_string()).unwrap_or_default()
    ));

    step(&format!(
        "starting provider node (vm backend: {backend:?})…"
    ));
    let mut p = NodeConfig::new(dir.join("provider"));
    p.net.listen = loopback_listen();
    p.net.bootstrap = boot.clone();
    p.provide = Some(ProvideConfig {
        backend: match backend {
            Backend::Dev => VmBackend::Dev,
            Backend::Sshd => VmBackend::Sshd { sshd: None },
            Backend::Qemu => VmBackend::Qemu(args.qemu.config()?),
            Backend::Lima => bail!(
                "devnet runs the dev, sshd or qemu backend; use --vm-backend qemu for a real VM on this host"
            ),
        },
        capacity: Capacity::default(),
    });
    let provider = Node::start(p).await.context("starting the provider node")?;
    step(&format!(
        "  provider peer {} account {}",
        provider.net.peer_id(),
        provider.wallet.address()
    ));

    step("starting consumer node…");
    let mut c = NodeConfig::new(dir.join("consumer"));
    c.net.listen = loopback_listen();
    c.net.bootstrap = boot;
    let consumer = Node::start(c).await.context("starting the consumer node")?;
    Ok(Net3 {
        gateway,
        provider,
        consumer,
        api_addr,
    })
}

/// Wait until `node` knows `lease` in `state` (bounded), on change events.
async fn wait_lease(
    node: &Node,
    lease: &xe_store::LeaseHash,
    want: LeaseState,
    timeout: Duration,
) -> anyhow::Result<()> {
    let mut rx = node.store.subscribe();
    let wait = async {
        loop {
            if node.store.lease(lease)?.map(|r| r.state()) == Some(want) {
                return anyhow::Ok(());
            }
            match rx.recv().await {
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => bail!("store closed: {e}"),
            }
        }
    };
    // A VM's boot takes up to minutes (TCG): say that we are still waiting.
    let started = tokio::time::Instant::now();
    let progress = async {
        let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
        tick.tick().await;
        loop {
            tick.tick().await;
            step(&format!(
                "  still waiting for {want} ({} s of {} s)…",
                started.elapsed().as_secs(),
                timeout.as_secs()
            ));
        }
    };
    tokio::select! {
        r = tokio::time::timeout(timeout, wait) => r
            .with_context(|| format!("lease {} not {want} after {timeout:?}", lease.short()))?,
        () = progress => unreachable!("the progress ticker never ends"),
    }
}

/// How often a long wait prints that it is still waiting.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(15);

/// Wait until the gateway's directory knows the provider (bounded).
async fn wait_directory(
    gateway: &Node,
    provider: &xe_store::AccountAddress,
    timeout: Duration,
) -> anyhow::Result<()> {
    let mut rx = gateway.store.subscribe_directory();
    let wait = async {
        while gateway.store.peer_for_account(provider)?.is_none() {
            let _ = rx.recv().await;
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(timeout, wait)
        .await
        .context("the provider's directory entry never reached the gateway")?
}

pub async fn run(args: DevnetArgs) -> anyhow::Result<ExitCode> {
    let mut signals = ShutdownSignal::install()?;
    let _tmp;
    let dir = match &args.data {
        Some(d) => d.clone(),
        None => {
            let t = tempfile::Builder::new().prefix("xe-devnet-").tempdir()?;
            let p = t.path().to_path_buf();
            _tmp = t;
            p
        }
    };
    std::fs::create_dir_all(&dir)?;
    let timeout = Duration::from_secs(args.timeout.unwrap_or(match args.vm_backend {
        Backend::Qemu => args.qemu.qemu_boot_timeout + 60,
        _ => 120,
    }));
    let net = start_nodes(&dir, &args).await?;
    let result = drive(&dir, &net, &args, timeout, &mut signals).await;
    step("stopping all nodes…");
    net.shutdown().await;
    step("stopped");
    result
}

async fn drive(
    dir: &Path,
    net: &Net3,
    args: &DevnetArgs,
    timeout: Duration,
    signals: &mut ShutdownSignal,
) -> anyhow::Result<ExitCode> {
    let wallet_path = dir.join("consumer.seed");
    let wallet = Wallet::load_or_create(&wallet_path)?;
    let key = LeaseKey::load_or_create(&lease_key_path(&wallet_path))?;
    let provider_addr = net.provider.wallet.address();
    wait_directory(&net.gateway, &provider_addr, timeout).await?;

    step("consumer creates a lease on the consumer node (it travels by gossip)…");
    let mut nonce = [0u8; 16];
    nonce[..8].copy_from_slice(&now_secs().to_be_bytes());
    nonce[8..].copy_from_slice(&u64::from(std::process::id()).to_be_bytes());
    let create = LeaseEvent::create(
        &wallet,
        Lease {
            consumer: wallet.public_key(),
            provider: provider_addr,
            vcpus: 1,
            memory_mb: 512,
            disk_gb: 1,
            duration: 24 * 3600,
            access_pub_key: key.access_pub_key(),
            created_at: now_secs(),
            nonce,
        },
    );
    let lease = create.lease_hash();
    net.consumer.net.publish_event(create).await?;
    step(&format!("  lease {lease}"));
    step("waiting for the provider to provision the VM and accept…");
    wait_lease(&net.gateway, &lease, LeaseState::Accepted, timeout).await?;
    let rec = net.gateway.store.lease(&lease)?.context("lease vanished")?;
    let host_key = rec
        .accept
        .as_ref()
        .map(|a| a.vm_host_key.clone())
        .context("accepted without host key")?;
    let known_hosts = dir.join("known_hosts");
    pin_host_key(&known_hosts, &lease, &host_key)?;
    let gateway = net.gateway.ssh_addr.context("gateway has no SSH address")?;
    let user = match args.vm_backend {
        Backend::Sshd if is_root() => "root".to_string(),
        Backend::Sshd => std::env::var("USER").unwrap_or_else(|_| "root".into()),
        _ => "root".to_string(),
    };
    let target = SshTarget {
        lease,
        via: crate::ssh_target::Via::Gateway(gateway.to_string()),
        key: key.path().to_path_buf(),
        known_hosts: known_hosts.clone(),
        user,
    };
    step("lease accepted; the VM is reachable through the gateway");

    if args.once {
        let argv = target.ssh_args(&args.cmd)?;
        let out = tokio::process::Command::new("ssh")
            .args(&argv)
            .stdin(std::process::Stdio::null())
            .status()
            .await
            .context("running ssh (is the OpenSSH client installed?)")?;
        let code = out.code().unwrap_or(255).clamp(0, 255) as u8;
        return Ok(ExitCode::from(code));
    }

    let xe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("xe"));
    println!();
    println!("xe devnet is running. Data: {}", dir.display());
    println!();
    println!("# 1. xe ssh (ProxyCommand -W through the gateway, VM host key pinned):");
    println!(
        "{} ssh --wallet {} --gateway {} --known-hosts {} --user {} {}",
        xe.display(),
        wallet_path.display(),
        gateway,
        known_hosts.display(),
        target.user,
        lease
    );
    println!();
    println!("# 2. plain OpenSSH with ProxyCommand -W:");
    let quoted: Vec<String> = target
        .ssh_args(&[])?
        .iter()
        .map(|a| {
            if a.contains(' ') {
                format!("'{a}'")
            } else {
                a.clone()
            }
        })
        .collect();
    println!("ssh {}", quoted.join(" "));
    println!();
    println!("# 3. interactive shell with a forwarded agent (the gateway logs in for you):");
    println!("eval $(ssh-agent) && ssh-add {}", key.path().display());
    println!(
        "ssh -A -p {} -o UserKnownHostsFile={} -o StrictHostKeyChecking=accept-new {}@127.0.0.1",
        gateway.port(),
        known_hosts.display(),
        lease
    );
    println!();
    println!("# 4. the same session through the node's HTTP-upgrade tunnel (only HTTP needed):");
    println!(
        "{} ssh --http --node http://{} --wallet {} --known-hosts {} --user {} {}",
        xe.display(),
        net.api_addr,
        wallet_path.display(),
        known_hosts.display(),
        target.user,
        lease
    );
    println!();
    println!(
        "# 5. an ~/.ssh/config block, for scp, sftp, rsync and IDEs (then: ssh xe-{}):",
        lease.short()
    );
    println!(
        "{} ssh-config --wallet {} --gateway {} --known-hosts {} --user {} {} >> ~/.ssh/config",
        xe.display(),
        wallet_path.display(),
        gateway,
        known_hosts.display(),
        target.user,
        lease
    );
    println!();
    println!("# 6. the HTTP-upgrade tunnel as a local port, then plain ssh to it:");
    println!(
        "{} tunnel --wallet {} --node http://{} --listen 127.0.0.1:0 {}   # prints PORT",
        xe.display(),
        wallet_path.display(),
        net.api_addr,
        lease
    );
    println!(
        "ssh -p PORT -i {} -o HostKeyAlias={} -o UserKnownHostsFile={} -o StrictHostKeyChecking=yes {}@127.0.0.1",
        key.path().display(),
        lease,
        known_hosts.display(),
        target.user
    );
    println!();
    println!("Press Ctrl-C to stop everything.");
    signals.recv().await;
    Ok(ExitCode::SUCCESS)
}

fn is_root() -> bool {
    std::env::var("USER").map(|u| u == "root").unwrap_or(false)
        || std::fs::metadata("/proc/self")
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
            .unwrap_or(false)
}
