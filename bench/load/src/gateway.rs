//! The gateway under test: a separate `xe node` process, so that its memory
//! can be read on its own from /proc.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

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
        let log = std::fs::File::create(data.with_extension("log"))
            .with_context(|| format!("creating {}", data.with_extension("log").display()))?;
        let mut child = Command::new(xe)
            .args(["node", "--data"])
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
            ])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (build it: cargo build --release -p xe)",
                    xe.display()
                )
            })?;
        let pid = child.id().context("gateway exited at once")?;
        let stdout = child.stdout.take().context("gateway stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .context("gateway not ready within 60 s")??
            .with_context(|| {
                format!(
                    "gateway exited before it was ready; see {}",
                    data.with_extension("log").display()
                )
            })?;
        // Keep draining stdout (NAT lines) so the gateway never blocks.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let ready: serde_json::Value = serde_json::from_str(&line).context("gateway ready line")?;
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
    pub async fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        if tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
        }
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
