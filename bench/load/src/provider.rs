//! Provider nodes for the load test, each in a process of its own: the
//! sandbox this runs in caps open files at 20,000 per process, and a
//! provider holds two sockets per tunnel (its dial to the echo and the
//! echo's accept), so 10,000 tunnels need more than one process.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use xe_node::{Capacity, Node, NodeConfig, ProvideConfig, VmBackend};
use xe_store::AccountAddress;

use crate::child::{spawn_ready, wait_or_kill};
use crate::echo::EchoVms;

/// `xe-load provider`: run one provider node with the echo backend until
/// stdin closes.
#[derive(Args, Debug)]
pub struct ProviderArgs {
    /// Data directory of the node.
    #[arg(long)]
    data: PathBuf,
    /// The gateway's p2p address (repeatable).
    #[arg(long)]
    bootstrap: Vec<xe_net::Multiaddr>,
    /// Most tunnels this provider serves.
    #[arg(long)]
    max_tunnels: usize,
}

pub async fn serve(args: ProviderArgs) -> anyhow::Result<()> {
    crate::raise_fd_limit((args.max_tunnels as u64) * 2 + 1024)?;
    let cancel = CancellationToken::new();
    let host_key = {
        let k = xe_node::gateway::load_or_create_host_key(&args.data.join("echo_host_key"))?;
        let line = k.public_key().to_openssh()?;
        line.split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    };
    let vms = Arc::new(EchoVms::start(host_key, cancel.child_token()).await?);
    let mut cfg = NodeConfig::new(args.data.clone());
    cfg.net.listen = vec!["/ip4/127.0.0.1/tcp/0".parse()?];
    cfg.net.bootstrap = args.bootstrap;
    cfg.net.tunnel.max_tunnels = args.max_tunnels;
    cfg.provide = Some(ProvideConfig {
        backend: VmBackend::Custom(vms),
        capacity: Capacity::default(),
    });
    let mut node = Node::start(cfg).await?;
    println!(
        "{}",
        serde_json::json!({"account": node.wallet.address().to_string(), "pid": std::process::id()})
    );
    // Until the parent closes our stdin (or dies).
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    cancel.cancel();
    node.shutdown().await;
    Ok(())
}

/// A provider process started by this tool.
pub struct ProviderProc {
    child: Child,
    pub account: AccountAddress,
}

impl ProviderProc {
    pub async fn start(
        data: &Path,
        bootstrap: &[xe_net::Multiaddr],
        max_tunnels: usize,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data)?;
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("provider").arg("--data").arg(data);
        for b in bootstrap {
            cmd.arg("--bootstrap").arg(b.to_string());
        }
        cmd.args(["--max-tunnels", &max_tunnels.to_string()])
            .stdin(Stdio::piped());
        let (child, ready) = spawn_ready(&mut cmd, &data.join("provider.log"), "provider").await?;
        let account = ready["account"]
            .as_str()
            .context("provider ready line has no account")?
            .parse()
            .map_err(|e| anyhow::anyhow!("provider account: {e}"))?;
        Ok(ProviderProc { child, account })
    }

    /// Close its stdin (it shuts down), wait; kill if it hangs.
    pub async fn stop(mut self) {
        drop(self.child.stdin.take());
        wait_or_kill(self.child).await;
    }
}
