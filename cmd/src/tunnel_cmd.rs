//! `xe tunnel LEASE --listen 127.0.0.1:PORT`: a local port whose every TCP
//! connection is carried to the lease VM's sshd through the node's HTTP
//! upgrade tunnel (`POST /tunnel/{lease}/tcp`, fresh `X-Timestamp`
//! signature per connection), so plain `ssh -p PORT root@127.0.0.1` works.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Args;
use tokio_util::sync::CancellationToken;
use xe_store::{LeaseHash, LeaseKey, LeaseState, Wallet};

use crate::lease_cmd::NodeUrlArg;
use crate::paths::WalletArg;

/// `xe tunnel` flags.
#[derive(Args, Debug)]
pub struct TunnelArgs {
    /// The lease hash.
    pub lease: String,
    /// Local address to listen on; port 0 picks a free one (printed).
    #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// User to show in the printed ssh command (the VM's login user).
    #[arg(long, default_value = "root")]
    pub user: String,
    #[command(flatten)]
    pub node: NodeUrlArg,
    #[command(flatten)]
    pub wallet: WalletArg,
}

/// Write (or replace) the VM's host key under the alias `lease` in a
/// known_hosts file next to the wallet, so ssh can check the VM it reaches
/// is the one the provider signed for, whatever local port is used.
fn pin_vm_host_key(wallet: &Path, lease: &LeaseHash, host_key: &str) -> anyhow::Result<PathBuf> {
    let dir = wallet.parent().unwrap_or(Path::new("."));
    let file = dir.join("tunnel_known_hosts");
    let alias = lease.to_hex();
    let old = std::fs::read_to_string(&file).unwrap_or_default();
    let mut lines: Vec<&str> = old
        .lines()
        .filter(|l| l.split_whitespace().next() != Some(alias.as_str()))
        .collect();
    let entry = format!("{alias} {host_key}");
    lines.push(&entry);
    std::fs::write(&file, format!("{}\n", lines.join("\n")))
        .with_context(|| format!("writing {}", file.display()))?;
    Ok(file)
}

pub async fn run(args: TunnelArgs) -> anyhow::Result<ExitCode> {
    let mut signals = crate::node_cmd::ShutdownSignal::install()?;
    let lease: LeaseHash = args
        .lease
        .trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let wallet_path = args.wallet.path();
    let wallet = Wallet::load(&wallet_path)
        .with_context(|| format!("loading the wallet {}", wallet_path.display()))?;
    let key = LeaseKey::load(&wallet.lease_key_path())
        .with_context(|| format!("loading the lease key of {}", wallet_path.display()))?;
    let client = args.node.client()?;
    let view = client.lease(&lease).await.context("looking the lease up")?;
    if view.access_pub_key != key.access_pub_key() {
        bail!(
            "lease {} was created for access key {}, but {}'s lease key is {}: use the wallet that created it (--wallet)",
            lease.short(),
            view.access_pub_key,
            wallet_path.display(),
            key.access_pub_key()
        );
    }
    if view.state != LeaseState::Accepted {
        bail!(
            "lease {} is {}, not accepted: there is no VM to reach",
            lease.short(),
            view.state
        );
    }
    let known_hosts = match &view.vm_host_key {
        Some(k) => Some(pin_vm_host_key(&wallet_path, &lease, k)?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let local = listener.local_addr()?;
    println!("listening on {local}");
    let mut ssh = format!("ssh -p {} -i {}", local.port(), key.path().display());
    if let Some(kh) = &known_hosts {
        ssh.push_str(&format!(
            " -o HostKeyAlias={lease} -o UserKnownHostsFile={} -o StrictHostKeyChecking=yes",
            kh.display()
        ));
    }
    ssh.push_str(&format!(" {}@{}", args.user, local.ip()));
    println!("{ssh}");
    eprintln!(
        "each connection goes through {} (Ctrl-C to stop)",
        client.url()
    );
    let cancel = CancellationToken::new();
    let forward = tokio::spawn(xe_api::client::forward(
        listener,
        client,
        lease,
        Arc::new(key),
        cancel.clone(),
    ));
    signals.recv().await;
    cancel.cancel();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), forward).await;
    Ok(ExitCode::SUCCESS)
}
