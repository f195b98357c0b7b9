//! `xe tunnel LEASE --listen 127.0.0.1:PORT`: a local port whose every TCP
//! connection is carried to the lease VM's sshd through the node's HTTP
//! upgrade tunnel (`POST /tunnel/{lease}/tcp`, fresh `X-Timestamp`
//! signature per connection), so plain `ssh -p PORT root@127.0.0.1` works.
//!
//! `xe tunnel LEASE --stdio`: one tunnel carrying standard input and output,
//! for `ssh -o ProxyCommand="xe tunnel --stdio LEASE" …` (what `xe ssh
//! --http` runs): no local port, and only HTTP to the node is needed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use tokio_util::sync::CancellationToken;
use xe_store::{LeaseHash, LeaseKey, Wallet};

use crate::lease_cmd::NodeUrlArg;
use crate::paths::WalletArg;

/// `xe tunnel` flags.
#[derive(Args, Debug)]
pub struct TunnelArgs {
    /// The lease hash, or a unique prefix of at least 8 hex digits.
    pub lease: String,
    /// Local address to listen on; port 0 picks a free one (printed).
    #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Carry standard input and output through one tunnel instead of
    /// listening (as an ssh ProxyCommand); nothing else is written to
    /// standard output.
    #[arg(long, conflicts_with = "listen")]
    pub stdio: bool,
    /// User to show in the printed ssh command (the VM's login user).
    #[arg(long, default_value = "root")]
    pub user: String,
    /// known_hosts file that pins VM host keys, shared with `xe ssh`
    /// [default: ~/.xe/known_hosts].
    #[arg(long, value_name = "PATH", conflicts_with = "stdio")]
    pub known_hosts: Option<PathBuf>,
    #[command(flatten)]
    pub p2p: crate::p2p_tunnel::P2pArgs,
    #[command(flatten)]
    pub node: NodeUrlArg,
    #[command(flatten)]
    pub wallet: WalletArg,
}

pub async fn run(args: TunnelArgs) -> anyhow::Result<ExitCode> {
    let mut signals = crate::node_cmd::ShutdownSignal::install()?;
    let typed = crate::lease_cmd::lease_arg(&args.lease)?;
    if args.p2p.p2p {
        if !args.stdio {
            anyhow::bail!(
                "xe tunnel --p2p carries one session on standard input and output: add --stdio \
                 (as ssh's ProxyCommand; `xe ssh --p2p LEASE` runs it for you)"
            );
        }
        // No wallet: the provider checks only the lease, and the VM's sshd
        // authenticates the lease key end to end.
        return crate::p2p_tunnel::run_stdio(&typed, &args.p2p, &args.node, signals).await;
    }
    let wallet_path = args.wallet.path();
    let wallet = Wallet::load(&wallet_path)
        .with_context(|| format!("loading the wallet {}", wallet_path.display()))?;
    let key = LeaseKey::load(&wallet.lease_key_path())
        .with_context(|| format!("loading the lease key of {}", wallet_path.display()))?;
    let client = args.node.client()?;
    let lease: LeaseHash = if typed.len() == 64 {
        typed.parse().map_err(|e| anyhow::anyhow!("{e}"))?
    } else {
        client
            .lease_by_prefix(&typed)
            .await
            .context("resolving the lease prefix")?
            .lease_hash
    };
    if args.stdio {
        return run_stdio(client, lease, key, signals).await;
    }
    let view = crate::lease_check::usable_lease(&client, &lease.to_hex(), &key).await?;
    // One file for xe ssh and xe tunnel: a lease's key is pinned once,
    // under its own alias, whichever way the VM is reached.
    let known_hosts = args
        .known_hosts
        .clone()
        .unwrap_or_else(crate::paths::default_known_hosts);
    let known_hosts = match &view.vm_host_key {
        Some(k) => {
            crate::known_hosts::pin_host_key(&known_hosts, &lease, k)?;
            Some(known_hosts)
        }
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

/// `--stdio`. No lease lookup first: every connection of ssh pays for this
/// one, and the node's refusal already says what is wrong with the lease.
async fn run_stdio(
    client: xe_api::client::ApiClient,
    lease: LeaseHash,
    key: LeaseKey,
    signals: crate::node_cmd::ShutdownSignal,
) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal;
    use xe_api::client::{CarryError, carry};
    if std::io::stdin().is_terminal() {
        eprintln!(
            "xe tunnel --stdio carries raw bytes to the VM's sshd; it is meant as ssh's ProxyCommand \
             (`xe ssh --http {lease}` runs it for you). Ctrl-C to stop."
        );
    }
    let mut stdio = crate::stdio::stdio().context("standard input and output")?;
    let cancel = signals.into_token();
    match carry(&client, &lease, &key, &mut stdio, &cancel).await {
        Ok(_) | Err(CarryError::Stopped) => Ok(ExitCode::SUCCESS),
        // A refusal about the lease (4xx) points at the lease's state; a
        // provider that cannot be reached (502) has said all there is.
        Err(e @ CarryError::Refused(xe_api::client::ClientError::Status { status, .. }))
            if status.is_client_error() =>
        {
            Err(anyhow::anyhow!(
                "{e} (lease {}, node {}; `xe lease show {}` shows its state)",
                lease.short(),
                client.url(),
                lease.short()
            ))
        }
        Err(e) => Err(e.into()),
    }
}
