//! `xe lease`, `xe providers` and `xe tunnel` as a user runs them: the
//! built `xe` binary against a real `xe node --provide --api-listen …`
//! process, and real OpenSSH through `xe tunnel`.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

const XE: &str = env!("CARGO_BIN_EXE_xe");
const SSHD: &str = "/usr/sbin/sshd";
const SSH: &str = "/usr/bin/ssh";
/// Bound on every wait.
const LIMIT: Duration = Duration::from_secs(90);

fn openssh_available(test: &str) -> bool {
    let missing: Vec<&str> = [SSHD, SSH]
        .into_iter()
        .filter(|b| !Path::new(b).is_file())
        .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("XE_REQUIRE_SSHD").as_deref() == Ok("1") {
        panic!("{test}: XE_REQUIRE_SSHD=1 but OpenSSH is missing: {missing:?}");
    }
    eprintln!(
        "SKIPPED {test}: OpenSSH missing ({missing:?}); set XE_REQUIRE_SSHD=1 to make this a failure"
    );
    false
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn read_line(out: &mut BufReader<ChildStdout>, what: &str) -> String {
    let mut line = String::new();
    let n = tokio::time::timeout(LIMIT, out.read_line(&mut line))
        .await
        .unwrap_or_else(|_| panic!("no {what} within {LIMIT:?}"))
        .expect("read stdout");
    assert!(n > 0, "stdout closed before {what}");
    line.trim_end().to_string()
}

/// Ask a child we started to stop (SIGTERM, by its PID) and wait for it.
async fn terminate(child: &mut Child) -> std::process::ExitStatus {
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
struct NodeProc {
    child: Child,
    ready: serde_json::Value,
    log: PathBuf,
}

impl NodeProc {
    async fn start(dir: &Path, extra: &[&str]) -> NodeProc {
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

    fn url(&self) -> String {
        format!(
            "http://{}",
            self.ready["api_addr"]
                .as_str()
                .expect("api_addr in the ready line")
        )
    }

    fn account(&self) -> String {
        self.ready["account"].as_str().expect("account").to_string()
    }

    fn log_text(&self) -> String {
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
async fn xe(args: &[&str]) -> Output {
    let mut cmd = Command::new(XE);
    cmd.args(args)
        .env_remove("XE_NODE")
        .env_remove("XE_WALLET")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(LIMIT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("xe {args:?} did not finish within {LIMIT:?}"))
        .expect("run xe")
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn last_line(s: &str) -> String {
    s.lines().last().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_create_wait_then_ssh_through_xe_tunnel() {
    if !openssh_available("lease_create_wait_then_ssh_through_xe_tunnel") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProc::start(
        dir.path(),
        &[
            "--provide",
            "--vm-backend",
            "sshd",
            "--sshd",
            SSHD,
            "--http-tunnel-require-fresh",
        ],
    )
    .await;
    let url = node.url();
    let provider = node.account();
    let wallet = dir.path().join("me.seed");
    let wallet = wallet.to_str().expect("utf-8");
    ok(
        &xe(&["wallet", "create", "--wallet", wallet]).await,
        "xe wallet create",
    );

    let out = ok(&xe(&["providers", "--node", &url]).await, "xe providers");
    assert!(
        out.contains(&provider),
        "provider {provider} not listed:\n{out}"
    );

    let out = xe(&[
        "lease",
        "create",
        "--provider",
        &provider,
        "--vcpus",
        "1",
        "--memory-mb",
        "256",
        "--disk-gb",
        "1",
        "--duration",
        "600",
        "--wait",
        "--timeout",
        "60",
        "--node",
        &url,
        "--wallet",
        wallet,
    ])
    .await;
    let stdout = ok(&out, "xe lease create --wait");
    let lease = last_line(&stdout);
    assert_eq!(
        lease.len(),
        64,
        "last stdout line is not a lease hash: {stdout:?}"
    );
    assert!(lease.chars().all(|c| c.is_ascii_hexdigit()));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("accepted after"),
        "no progress on stderr:\n{stderr}"
    );

    let show = ok(
        &xe(&["lease", "show", &lease, "--json", "--node", &url]).await,
        "xe lease show",
    );
    let v: serde_json::Value = serde_json::from_str(&show).expect("show --json");
    assert_eq!(v["state"], "accepted");
    assert_eq!(v["provider"], provider);
    assert_eq!(v["vcpus"], 1);
    let show = ok(
        &xe(&["lease", "show", &lease, "--node", &url]).await,
        "xe lease show",
    );
    assert!(show.contains("state:          accepted"), "{show}");
    let list = ok(
        &xe(&[
            "lease", "list", "--mine", "--state", "accepted", "--node", &url, "--wallet", wallet,
        ])
        .await,
        "xe lease list",
    );
    assert!(list.contains(&lease), "{list}");

    // xe tunnel on a free port (named by the short form xe prints); real
    // ssh through it, twice.
    let user = xe_vm::default_vm_user("sshd");
    let tunnel_log = dir.path().join("tunnel.log");
    let mut tunnel = Command::new(XE)
        .args([
            "tunnel",
            &lease[..8],
            "--listen",
            "127.0.0.1:0",
            "--user",
            &user,
            "--node",
            &url,
            "--wallet",
            wallet,
        ])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&tunnel_log).expect("log"))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn xe tunnel");
    let mut out = BufReader::new(tunnel.stdout.take().expect("stdout"));
    let listening = read_line(&mut out, "the listening line").await;
    let addr = listening
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {listening:?}"))
        .to_string();
    let port = addr.rsplit(':').next().expect("port").to_string();
    assert_ne!(port, "0");
    let ssh_line = read_line(&mut out, "the ssh command").await;
    assert!(
        ssh_line.starts_with(&format!("ssh -p {port} -i ")),
        "{ssh_line}"
    );
    assert!(ssh_line.contains("StrictHostKeyChecking=yes"), "{ssh_line}");
    assert!(
        ssh_line.ends_with(&format!("{user}@127.0.0.1")),
        "{ssh_line}"
    );
    for word in ["hi", "again"] {
        // Exactly the printed command, made non-interactive.
        let mut words = ssh_line.split_whitespace();
        assert_eq!(words.next(), Some("ssh"));
        let out = tokio::time::timeout(
            LIMIT,
            Command::new(SSH)
                .args([
                    "-F",
                    "/dev/null",
                    "-o",
                    "BatchMode=yes",
                    "-o",
                    "IdentitiesOnly=yes",
                ])
                .args(words)
                .arg(format!("echo {word}"))
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("ssh finished in time")
        .expect("run ssh");
        assert!(
            out.status.success(),
            "ssh through xe tunnel failed: {}\n--- tunnel log\n{}",
            text(&out.stderr),
            std::fs::read_to_string(&tunnel_log).unwrap_or_default()
        );
        assert_eq!(text(&out.stdout), format!("{word}\n"));
    }

    // Settle; the tunnel's next connection is refused by the node and
    // closed, and xe tunnel keeps running.
    let out = xe(&[
        "lease", "settle", &lease, "--node", &url, "--wallet", wallet,
    ])
    .await;
    ok(&out, "xe lease settle");
    assert!(
        text(&out.stderr).contains("settle"),
        "{}",
        text(&out.stderr)
    );
    let show = ok(
        &xe(&["lease", "show", &lease, "--json", "--node", &url]).await,
        "xe lease show",
    );
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&show).expect("json")["state"],
        "settled"
    );
    let mut conn = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect to xe tunnel");
    let mut buf = Vec::new();
    let n = tokio::time::timeout(
        LIMIT,
        tokio::io::AsyncReadExt::read_to_end(&mut conn, &mut buf),
    )
    .await
    .expect("refused connection is closed in time");
    assert!(
        n.map_or(true, |n| n == 0),
        "got bytes through a settled lease"
    );
    assert!(
        tunnel.try_wait().expect("try_wait").is_none(),
        "xe tunnel exited after one failed connection"
    );
    let status = terminate(&mut tunnel).await;
    assert!(status.success(), "xe tunnel exit: {status}");
    let log = std::fs::read_to_string(&tunnel_log).unwrap_or_default();
    assert!(log.contains("410"), "tunnel log lacks the refusal:\n{log}");

    let mut node = node;
    let st = terminate(&mut node.child).await;
    assert!(st.success(), "xe node exit {st}:\n{}", node.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_create_wait_reports_the_decline_and_the_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The dev backend is never started here: nothing is provisioned.
    let node = NodeProc::start(
        dir.path(),
        &["--provide", "--vm-backend", "dev", "--max-vcpus", "2"],
    )
    .await;
    let url = node.url();
    let provider = node.account();
    let wallet = dir.path().join("me.seed");
    let wallet = wallet.to_str().expect("utf-8");
    ok(
        &xe(&["wallet", "create", "--wallet", wallet]).await,
        "xe wallet create",
    );

    // More vCPUs than the provider offers: it declines, --wait says why.
    let out = xe(&[
        "lease",
        "create",
        "--provider",
        &provider,
        "--vcpus",
        "4",
        "--wait",
        "--timeout",
        "60",
        "--node",
        &url,
        "--wallet",
        wallet,
    ])
    .await;
    assert!(!out.status.success(), "declined lease reported success");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("did not take lease") && stderr.contains("over capacity"),
        "{stderr}"
    );
    let lease = last_line(&text(&out.stdout));
    assert_eq!(
        lease.len(),
        64,
        "hash still printed: {:?}",
        text(&out.stdout)
    );
    // The short form xe prints is enough to name the lease.
    let out = xe(&[
        "lease",
        "cancel",
        &lease[..8],
        "--node",
        &url,
        "--wallet",
        wallet,
    ])
    .await;
    ok(&out, "xe lease cancel <8-hex prefix>");
    assert!(
        text(&out.stderr).contains("cancelled"),
        "{}",
        text(&out.stderr)
    );
    let list = ok(
        &xe(&["lease", "list", "--state", "cancelled", "--node", &url]).await,
        "xe lease list",
    );
    assert!(list.contains(&lease), "{list}");
    let shown = ok(
        &xe(&["lease", "show", &lease[..12], "--json", "--node", &url]).await,
        "xe lease show <prefix>",
    );
    assert!(shown.contains(&lease), "{shown}");
    let out = xe(&["lease", "show", "abc", "--node", &url]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("at least its first 8 hex digits"),
        "{}",
        text(&out.stderr)
    );

    // Ending a lease the node does not know, or one that has ended, fails
    // with the reason and sends nothing (before, an unknown lease's settle
    // went pending and the command said nothing was wrong).
    let unknown = "cd".repeat(32);
    for (args, want) in [
        (["settle", unknown.as_str()], "is not known to the node"),
        (
            ["settle", lease.as_str()],
            "it is already cancelled; nothing to settle",
        ),
        (
            ["cancel", lease.as_str()],
            "it is already cancelled; nothing to cancel",
        ),
    ] {
        let out = xe(&[
            "lease", args[0], args[1], "--node", &url, "--wallet", wallet,
        ])
        .await;
        assert!(!out.status.success(), "xe lease {args:?} reported success");
        let stderr = text(&out.stderr);
        assert!(stderr.contains(want), "xe lease {args:?}: {stderr}");
    }

    // A provider nobody runs: no answer within --timeout, non-zero exit.
    let nobody = "ab".repeat(32);
    let out = xe(&[
        "lease",
        "create",
        "--provider",
        &nobody,
        "--wait",
        "--timeout",
        "2",
        "--node",
        &url,
        "--wallet",
        wallet,
    ])
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("was not accepted within 2 s"),
        "{}",
        text(&out.stderr)
    );

    // Precise errors for bad input, before anything is sent.
    let out = xe(&[
        "lease",
        "create",
        "--provider",
        &provider,
        "--vcpus",
        "0",
        "--node",
        &url,
        "--wallet",
        wallet,
    ])
    .await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("vcpus"), "{}", text(&out.stderr));
    let out = xe(&[
        "lease",
        "create",
        "--provider",
        "xyz",
        "--node",
        &url,
        "--wallet",
        wallet,
    ])
    .await;
    assert!(
        text(&out.stderr).contains("--provider: account address"),
        "{}",
        text(&out.stderr)
    );
    let out = xe(&["lease", "show", "12", "--node", &url]).await;
    assert!(
        text(&out.stderr).contains(
            "lease \"12\": expected the 64-hex lease hash or at least its first 8 hex digits"
        ),
        "{}",
        text(&out.stderr)
    );
    let out = xe(&["lease", "show", &nobody, "--node", &url]).await;
    assert!(
        text(&out.stderr).contains("404 Not Found: unknown lease"),
        "{}",
        text(&out.stderr)
    );
    let out = xe(&["providers", "--node", "https://example.invalid"]).await;
    assert!(
        text(&out.stderr).contains("https is not supported"),
        "{}",
        text(&out.stderr)
    );

    let mut node = node;
    let st = terminate(&mut node.child).await;
    assert!(st.success(), "xe node exit {st}:\n{}", node.log_text());
}
