//! Fixtures for end-to-end tests: the built `xe` binary as child processes,
//! each node with its own data dir; ports are picked by the node and read
//! back from its "ready" line, never guessed.
#![allow(dead_code)]

pub mod netns;
pub mod three_nodes;

use std::io::{BufRead, BufReader};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

#[allow(unused_imports)] // each test binary uses a different subset
pub use xe_testkit::xe_bin;

/// `xe ARGS…`, waited for.
pub fn xe(args: &[&str]) -> Output {
    Command::new(xe_bin()).args(args).output().expect("run xe")
}

/// The stdout of a command that must have succeeded.
pub fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({:?}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// One HTTP/1.1 GET against a node's API, returning the JSON body.
pub fn http_get(addr: &str, path: &str) -> (u16, serde_json::Value) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect api");
    s.set_read_timeout(Some(Duration::from_secs(70)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    let status: u16 = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

#[allow(unused_imports)] // each test binary uses a different subset
pub use xe_testkit::openssh_available;

/// A running `xe node` process; SIGTERM on drop.
pub struct NodeProc {
    pub child: Child,
    pub ready: serde_json::Value,
    pub data: PathBuf,
    pub log: PathBuf,
    /// JSON lines the node prints after its ready line (`{"event":"nat",…}`).
    pub events: std::sync::mpsc::Receiver<serde_json::Value>,
}

impl NodeProc {
    /// Start `xe node --data DIR ARGS…` and wait (bounded) for its ready line.
    pub fn start(data: &Path, args: &[&str]) -> NodeProc {
        let mut cmd = Command::new(xe_bin());
        cmd.arg("node")
            .arg("--data")
            .arg(data)
            .args(["--p2p-listen", "/ip4/127.0.0.1/tcp/0"])
            .args(args);
        NodeProc::spawn(cmd, data)
    }

    /// Start `ip netns exec NETNS xe node --data DIR ARGS…` (no default
    /// `--p2p-listen`: pass one). `ip netns exec` execs, so the child's PID
    /// is the node's and SIGTERM reaches it.
    pub fn start_in(netns: &str, data: &Path, args: &[&str]) -> NodeProc {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns])
            .arg(xe_bin())
            .arg("node")
            .arg("--data")
            .arg(data)
            .args(args);
        NodeProc::spawn(cmd, data)
    }

    /// Start `cmd` (an `xe node` command line, with its environment) and
    /// wait (bounded) for its ready line; its log goes to `DATA/node.log`.
    pub fn spawn(mut cmd: Command, data: &Path) -> NodeProc {
        std::fs::create_dir_all(data).expect("data dir");
        let log = data.join("node.log");
        let logf = std::fs::File::create(&log).expect("log file");
        let mut child = cmd
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(logf)
            .spawn()
            .expect("spawn xe node");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        let (etx, events) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            let _ = tx.send(line);
            // Keep reading so the node never blocks on a full pipe; later
            // JSON lines are events for whoever waits on them.
            for l in r.lines() {
                let Ok(l) = l else { break };
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&l) {
                    let _ = etx.send(v);
                }
            }
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        let ready: serde_json::Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "xe node did not become ready; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        NodeProc {
            child,
            ready,
            data: data.to_path_buf(),
            log,
            events,
        }
    }

    /// Wait (bounded) for an event line that satisfies `pred`; earlier
    /// events are consumed.
    pub fn wait_event(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.events.recv_timeout(left) {
                Ok(v) if pred(&v) => return v,
                Ok(_) => {}
                Err(_) => panic!(
                    "no event {what} within {timeout:?}; log:\n{}",
                    self.log_text()
                ),
            }
        }
    }

    pub fn field(&self, k: &str) -> String {
        self.ready[k].as_str().unwrap_or_default().to_string()
    }

    pub fn bootstrap_args(&self) -> Vec<String> {
        self.ready["p2p_addrs"]
            .as_array()
            .expect("p2p_addrs")
            .iter()
            .flat_map(|a| {
                [
                    "--bootstrap".to_string(),
                    a.as_str().expect("str").to_string(),
                ]
            })
            .collect()
    }

    /// SIGTERM and wait (bounded); returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id();
        // Signal only the child we started, by its PID.
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        // Wait for the exit event in a thread so the wait is bounded.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                let _ = tx.send(self.child.wait());
            });
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(st) => st.expect("wait"),
                Err(_) => {
                    let _ = Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .status();
                    panic!("xe node {pid} did not stop within 30 s of SIGTERM");
                }
            }
        })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let _ = self.child.wait();
        }
    }
}
