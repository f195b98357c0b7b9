//! The gateway under test: a separate `xe node` process, so that its memory
//! can be read on its own from /proc.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

use crate::child::{spawn_ready, wait_or_kill};

pub struct GatewayProc {
    child: Child,
    pub pid: u32,
    pub ssh_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub p2p_addrs: Vec<xe_net::Multiaddr>,
}

impl GatewayProc {
    /// Start `xe node` as a gateway (SSH + HTTP API, no relay service)
    /// that accepts `max_connections` SSH connections.
    pub async fn start(xe: &Path, data: &Path, max_connections: usize) -> anyhow::Result<Self> {
        let mut cmd = Command::new(xe);
        cmd.args(["node", "--data"])
            .arg(data)
            .args([
                "--p2p-listen",
                "/ip4/127.0.0.1/tcp/0",
                "--ssh-listen",
                "127.0.0.1:0",
                "--api-listen",
                "127.0.0.1:0",
                "--no-relay-server",
                "--max-ssh-connections",
                &max_connections.to_string(),
                // Every simulated client connects from 127.0.0.1: the
                // per-source limits (meant for one real client) are lifted
                // so one address can stand for thousands of clients.
                "--ssh-max-startups",
                "1000:30:2000",
                "--ssh-max-startups-per-source",
                "1000",
                "--ssh-connect-burst",
                "100000",
                "--ssh-connect-rate",
                "100000",
            ])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        let what = format!(
            "gateway {} (build it: cargo build --release -p xe)",
            xe.display()
        );
        let (child, ready) = spawn_ready(&mut cmd, &data.with_extension("log"), &what).await?;
        let pid = child.id().context("gateway exited at once")?;
        let field = |k: &str| -> anyhow::Result<SocketAddr> {
            ready[k]
                .as_str()
                .with_context(|| format!("ready line has no {k}"))?
                .parse()
                .with_context(|| format!("ready line {k}"))
        };
        let p2p_addrs = ready["p2p_addrs"]
            .as_array()
            .context("ready line has no p2p_addrs")?
            .iter()
            .filter_map(|a| a.as_str()?.parse().ok())
            .collect::<Vec<xe_net::Multiaddr>>();
        if p2p_addrs.is_empty() {
            bail!("gateway listens on no p2p address");
        }
        Ok(GatewayProc {
            pid,
            ssh_addr: field("ssh_addr")?,
            api_addr: field("api_addr")?,
            p2p_addrs,
            child,
        })
    }

    /// Resident and proportional set size, in KiB.
    pub fn memory(&self) -> anyhow::Result<Memory> {
        Memory::of(self.pid)
    }

    /// SIGTERM (by PID, the process this tool started), then wait.
    pub async fn stop(self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        wait_or_kill(self.child).await;
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    pub rss_kib: u64,
    pub pss_kib: u64,
}

impl Memory {
    pub fn of(pid: u32) -> anyhow::Result<Memory> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rollup =
            std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
        Ok(Memory {
            rss_kib: kib_field(&status, "VmRSS:").context("VmRSS")?,
            pss_kib: kib_field(&rollup, "Pss:").unwrap_or(0),
        })
    }
}

fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}
