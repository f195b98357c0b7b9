//! Child processes this tool starts: each prints one JSON "ready" line on
//! stdout, is killed if this tool goes away, and is stopped by PID.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Spawn `cmd` (stderr to `log`), wait up to 60 s for its first stdout
/// line and parse it as JSON. Later stdout lines are drained so the child
/// never blocks on a full pipe.
pub async fn spawn_ready(
    cmd: &mut Command,
    log: &Path,
    what: &str,
) -> anyhow::Result<(Child, serde_json::Value)> {
    let log_file =
        std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting the {what}"))?;
    let stdout = child
        .stdout
        .take()
        .with_context(|| format!("{what} stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .with_context(|| format!("{what} not ready within 60 s"))??
        .with_context(|| format!("{what} exited before it was ready; see {}", log.display()))?;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let ready = serde_json::from_str(&line).with_context(|| format!("{what} ready line"))?;
    Ok((child, ready))
}

/// Wait up to 15 s for `child` to exit after it was asked to; then kill it.
pub async fn wait_or_kill(mut child: Child) {
    if tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .is_err()
    {
        let _ = child.start_kill();
    }
}
