//! What the CLI tests share: the built `xe` binary, an `xe node` process,
//! bounded waits.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

pub const XE: &str = env!("CARGO_BIN_EXE_xe");
/// Bound on every wait for an `xe` process (longer than the kit's
/// [`xe_testkit::LIMIT`]: a CLI run starts a whole node).
pub const LIMIT: Duration = Duration::from_secs(90);

#[allow(unused_imports)] // each test binary uses a different subset
pub use xe_testkit::{SSH, SSHD, openssh_available};

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub async fn read_line(out: &mut BufReader<ChildStdout>, what: &str) -> String {
    let mut line = String::new();
    let n = tokio::time::timeout(LIMIT, out.read_line(&mut line))
        .await
        .unwrap_or_else(|_| panic!("no {what} within {LIMIT:?}"))
        .expect("read stdout");
    assert!(n > 0, "stdout closed before {what}");
    line.trim_end().to_string()
}

/// Ask a child we started to stop (SIGTERM, by its PID) and wait for it.
pub async fn terminate(child: &mut Child) -> std::process::ExitStatus {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
    match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
        Ok(s) => s.expect("wait"),
        Err(_) => {
            let _ = child.start_kill();
            panic!("process did not stop within 30 s of SIGTERM");
        }
    }
}

/// An `xe node` process with its API on a free loopback port.
pub struct NodeProc {
    pub child: Child,
    pub ready: serde_json::Value,
    pub log: PathBuf,
}

impl NodeProc {
    pub async fn start(dir: &Path, extra: &[&str]) -> NodeProc {
        std::fs::create_dir_all(dir).expect("node dir");
        let log = dir.join("node.log");
        let child = Command::new(XE)
            .arg("node")
            .arg("--data")
            .arg(dir.join("node"))
            .args([
                "--p2p-listen",
                "/ip4/127.0.0.1/tcp/0",
                "--api-listen",
                "127.0.0.1:0",
            ])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn xe node");
        let mut me = NodeProc {
            child,
            ready: serde_json::Value::Null,
            log,
        };
        let mut out = BufReader::new(me.child.stdout.take().expect("stdout"));
        let line = read_line(&mut out, "the ready line").await;
        me.ready = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("ready line {line:?}: {e}\n{}", me.log_text()));
        me
    }

    pub fn url(&self) -> String {
        format!(
            "http://{}",
            self.ready["api_addr"]
                .as_str()
                .expect("api_addr in the ready line")
        )
    }

    pub fn account(&self) -> String {
        self.ready["account"].as_str().expect("account").to_string()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        // A failed test still stops the node gracefully, so it stops the
        // sshd processes it started.
        if let (Ok(None), Some(pid)) = (self.child.try_wait(), self.child.id()) {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
}

/// Run `xe ARGS` to completion.
pub async fn xe(args: &[&str]) -> Output {
    xe_env(args, &[]).await
}

pub fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

pub fn last_line(s: &str) -> String {
    s.lines().last().unwrap_or_default().to_string()
}

/// Run `xe ARGS` to completion with extra environment variables.
pub async fn xe_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(XE);
    cmd.args(args)
        .env_remove("XE_NODE")
        .env_remove("XE_WALLET")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(LIMIT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("xe {args:?} did not finish within {LIMIT:?}"))
        .expect("run xe")
}
