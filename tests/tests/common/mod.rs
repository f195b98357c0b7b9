//! Fixtures for end-to-end tests: the built `xe` binary as child processes,
//! each node with its own data dir; ports are picked by the node and read
//! back from its "ready" line, never guessed.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The `xe` binary built alongside this test (target/<profile>/xe), or `XE_BIN`.
pub fn xe_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("XE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>/xe
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("xe");
    assert!(
        bin.exists(),
        "{} not found: build it first (`cargo build -p xe`, or run the suite with `cargo nextest run --workspace`)",
        bin.display()
    );
    bin
}

/// Whether OpenSSH's sshd is installed. When it is not, tests that need it
/// skip loudly — unless `XE_REQUIRE_SSHD=1` (CI), where that is a failure.
pub fn sshd_available(test: &str) -> bool {
    let found = ["/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd"]
        .iter()
        .any(|p| Path::new(p).exists());
    if !found {
        if std::env::var("XE_REQUIRE_SSHD").as_deref() == Ok("1") {
            panic!(
                "{test}: sshd is not installed but XE_REQUIRE_SSHD=1 (apt-get install openssh-server)"
            );
        }
        eprintln!(
            "\n!!! SKIPPING {test}: OpenSSH sshd is not installed (apt-get install openssh-server) !!!\n"
        );
    }
    found
}

/// A running `xe node` process; SIGTERM on drop.
pub struct NodeProc {
    pub child: Child,
    pub ready: serde_json::Value,
    pub data: PathBuf,
    pub log: PathBuf,
}

impl NodeProc {
    /// Start `xe node --data DIR ARGS…` and wait (bounded) for its ready line.
    pub fn start(data: &Path, args: &[&str]) -> NodeProc {
        std::fs::create_dir_all(data).expect("data dir");
        let log = data.join("node.log");
        let logf = std::fs::File::create(&log).expect("log file");
        let mut child = Command::new(xe_bin())
            .arg("node")
            .arg("--data")
            .arg(data)
            .args(["--p2p-listen", "/ip4/127.0.0.1/tcp/0"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(logf)
            .spawn()
            .expect("spawn xe node");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining so the node never blocks on a full pipe.
            let _ = std::io::copy(&mut r, &mut std::io::sink());
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
        let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        // Wait for the exit event in a thread so the wait is bounded.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                let _ = tx.send(self.child.wait());
            });
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(st) => st.expect("wait"),
                Err(_) => {
                    let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
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
