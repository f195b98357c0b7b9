//! `xe lease`, `xe providers` and `xe tunnel` as a user runs them: the
//! built `xe` binary against a real `xe node --provide --api-listen …`
//! process, and real OpenSSH through `xe tunnel`.

use std::process::Stdio;

use tokio::io::BufReader;
use tokio::process::Command;

mod common;
use common::*;

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

    // Another wallet's key is not this lease's access key: xe ssh says so
    // instead of starting an ssh that the gateway would refuse.
    let other = dir.path().join("other.seed");
    let other = other.to_str().expect("utf-8");
    ok(
        &xe(&["wallet", "create", "--wallet", other]).await,
        "xe wallet create (other)",
    );
    let out = xe(&[
        "ssh",
        &lease[..8],
        "--http",
        "--node",
        &url,
        "--wallet",
        other,
    ])
    .await;
    assert!(!out.status.success(), "ssh with another wallet's key");
    assert!(
        text(&out.stderr).contains("does not admit the lease key")
            && text(&out.stderr).contains("another wallet"),
        "{}",
        text(&out.stderr)
    );

    // xe tunnel on a free port (named by the short form xe prints); real
    // ssh through it, twice.
    let user = xe_vm::default_vm_user("sshd");
    let tunnel_log = dir.path().join("tunnel.log");
    let kh = dir
        .path()
        .join("known_hosts")
        .to_str()
        .expect("utf-8")
        .to_string();
    let mut tunnel = Command::new(XE)
        .args([
            "tunnel",
            &lease[..8],
            "--listen",
            "127.0.0.1:0",
            "--user",
            &user,
            "--known-hosts",
            &kh,
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
    // The same known_hosts as xe ssh, the key under the lease's alias.
    assert!(
        ssh_line.contains(&format!("-o UserKnownHostsFile={kh} ")),
        "{ssh_line}"
    );
    let pinned = std::fs::read_to_string(&kh).expect("known_hosts written");
    assert!(
        pinned
            .lines()
            .any(|l| l.starts_with(&format!("{lease} ssh-ed25519 "))),
        "{pinned}"
    );
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
    let node = NodeProc::start(
        &dir.path().join("provider"),
        &["--provide", "--vm-backend", "dev", "--max-vcpus", "2"],
    )
    .await;
    let provider = node.account();
    // The consumer talks to its own node, as the README shows: the decline
    // reaches it through the ledger, not through the provider's API.
    let bootstrap = node.ready["p2p_addrs"][0]
        .as_str()
        .expect("p2p_addrs in the ready line")
        .to_string();
    let consumer = NodeProc::start(
        &dir.path().join("consumer"),
        &["--bootstrap", &bootstrap, "--ssh-port", "0"],
    )
    .await;
    let url = consumer.url();
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
        stderr.contains("the provider declined lease")
            && stderr.contains("over capacity")
            && stderr.contains("nothing to cancel"),
        "{stderr}"
    );
    let declined = last_line(&text(&out.stdout));
    assert_eq!(
        declined.len(),
        64,
        "hash still printed: {:?}",
        text(&out.stdout)
    );
    let shown = ok(
        &xe(&["lease", "show", &declined, "--json", "--node", &url]).await,
        "xe lease show (declined)",
    );
    let v: serde_json::Value = serde_json::from_str(&shown).expect("json");
    assert_eq!(v["state"], "declined", "{shown}");
    assert!(
        v["decline_reason"]
            .as_str()
            .is_some_and(|r| r.contains("over capacity")),
        "{shown}"
    );
    let out = xe(&[
        "lease", "cancel", &declined, "--node", &url, "--wallet", wallet,
    ])
    .await;
    assert!(
        text(&out.stderr).contains("it is already declined; nothing to cancel"),
        "{}",
        text(&out.stderr)
    );

    // A provider nobody runs: a warning first, then no answer within
    // --timeout, non-zero exit, and the lease is said to be still open.
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
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("is not in the directory")
            && stderr.contains("was not accepted within 2 s")
            && stderr.contains("still open")
            && stderr.contains("xe lease cancel"),
        "{stderr}"
    );
    let lease = last_line(&text(&out.stdout));
    assert_eq!(lease.len(), 64, "{:?}", text(&out.stdout));
    // xe ssh says why before ssh could say "Permission denied".
    let out = xe(&[
        "ssh",
        &lease[..8],
        "--node",
        &url,
        "--wallet",
        wallet,
        "--gateway",
        "127.0.0.1:9",
    ])
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains(&format!("lease {} is not accepted yet", &lease[..8])),
        "{}",
        text(&out.stderr)
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
    let out = xe(&[
        "ssh",
        &lease,
        "--node",
        &url,
        "--wallet",
        wallet,
        "--gateway",
        "127.0.0.1:9",
    ])
    .await;
    assert!(
        text(&out.stderr).contains("is cancelled: it grants no access"),
        "{}",
        text(&out.stderr)
    );
    let shown = ok(
        &xe(&["lease", "show", &lease[..12], "--json", "--node", &url]).await,
        "xe lease show <prefix>",
    );
    assert!(shown.contains(&lease), "{shown}");
    // Scripts keep unix seconds; people get ISO 8601 and how long ago.
    let json: serde_json::Value = serde_json::from_str(&shown).expect("lease show --json");
    assert!(json["created_at"].is_u64(), "{shown}");
    let human = ok(
        &xe(&["lease", "show", &lease[..8], "--node", &url]).await,
        "xe lease show",
    );
    let created = human
        .lines()
        .find(|l| l.starts_with("created at:"))
        .unwrap_or_else(|| panic!("no created line:\n{human}"));
    let year = &created["created at:".len()..].trim_start()[..4];
    assert!(
        year.starts_with("20") && created.contains("Z (") && created.ends_with(" ago)")
            || created.ends_with("(now)"),
        "created time not ISO 8601 + relative: {created:?}"
    );
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

    // --timeout 0 waits without a limit, so a lease accepted later is a
    // success, not a failure at 0 s.
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
        "--wait",
        "--timeout",
        "0",
        "--node",
        &url,
        "--wallet",
        wallet,
    ])
    .await;
    let stderr = text(&out.stderr);
    ok(&out, "xe lease create --wait --timeout 0");
    assert!(
        stderr.contains("no time limit") && stderr.contains("accepted after"),
        "{stderr}"
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
    let out = xe(&["providers", "--node", "ftp://example.invalid"]).await;
    assert!(
        text(&out.stderr).contains("only http:// and https:// URLs are supported"),
        "{}",
        text(&out.stderr)
    );

    let mut consumer = consumer;
    let st = terminate(&mut consumer.child).await;
    assert!(
        st.success(),
        "consumer xe node exit {st}:\n{}",
        consumer.log_text()
    );
    let mut node = node;
    let st = terminate(&mut node.child).await;
    assert!(st.success(), "xe node exit {st}:\n{}", node.log_text());
}
