//! Who is refused and what ends a connection: authentication refusals by
//! reason, lease settlement and expiry, the connection cap, the grace time,
//! restart with the same host key, shutdown. Real OpenSSH client; a real
//! `sshd` as the VM where a session must actually run.

mod common;

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Backend, CMD_LIMIT, Scene, run, text, wait_exit, wait_line};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, ChildStdout, Command};
use xe_node::gateway::{
    AuthFailure, ConnectionRefusal, GatewayStats, host_key_fingerprint, load_or_create_host_key,
};
use xe_store::{LeaseKey, now_secs};
use xe_testkit::require_openssh;

/// Bound for "the connection is closed within 1 s": generous, so a loaded
/// machine does not fail the test; the log prints the real time.
const CLOSE_LIMIT: Duration = Duration::from_secs(5);

fn failures(stats: &GatewayStats) -> Vec<(AuthFailure, u64)> {
    stats
        .snapshot()
        .auth_failures
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// Run `cmd` (an ssh to the gateway), expect it refused with the reason
/// `says` on OpenSSH's stderr (the disconnect description, as OpenSSH
/// prints it), and exactly one new rejection, for `reason`.
async fn expect_refused(s: &Scene, mut cmd: Command, reason: AuthFailure, says: &str) {
    let before = s.gw.stats.auth_failures(reason);
    let out = run(&mut cmd, CMD_LIMIT).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(255), "{reason}: stderr {stderr:?}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("Received disconnect from 127.0.0.1"))
        .unwrap_or_else(|| panic!("{reason}: no disconnect reason in {stderr:?}"));
    assert!(line.contains(": xe gateway: "), "{reason}: {line:?}");
    assert!(line.contains(says), "{reason}: want {says:?} in {line:?}");
    assert!(
        !stderr.contains("Permission denied"),
        "{reason}: {stderr:?}"
    );
    assert_eq!(
        s.gw.stats.auth_failures(reason),
        before + 1,
        "{reason}: {:?}",
        failures(&s.gw.stats)
    );
}

/// `SHA256:…` of the public key next to `key`, as ssh-keygen prints it.
async fn fingerprint(key: &std::path::Path) -> String {
    let out = run(Command::new("ssh-keygen").arg("-lf").arg(key), CMD_LIMIT).await;
    assert!(out.status.success(), "ssh-keygen -l: {}", text(&out.stderr));
    text(&out.stdout)
        .split_whitespace()
        .nth(1)
        .expect("fingerprint field")
        .to_string()
}

/// Every refusal reaches OpenSSH's stderr as one line naming the lease and
/// what to do (not a bare "Permission denied"), and is counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_is_counted_under_its_reason() {
    require_openssh!("every_refusal_is_counted_under_its_reason");
    let s = Scene::new(Backend::Failing("unused"), |_| {}).await;
    let lease = s.lease.to_string();

    let short = |h: &xe_store::LeaseHash| h.short();

    // A different ed25519 key: named by fingerprint, with what to use.
    let other = LeaseKey::load_or_create(&s.path("other.lease_key")).expect("other key");
    let other_fp = fingerprint(other.path()).await;
    let mut cmd = s.gw_ssh(&lease, other.path());
    cmd.arg("true");
    let says = format!(
        "the key you offered (ssh-ed25519 {other_fp}) is not lease {}'s access key; use -i ~/.xe/wallet.lease_key",
        short(&s.lease)
    );
    expect_refused(&s, cmd, AuthFailure::WrongKey, &says).await;

    // An RSA key.
    let rsa = s.path("id_rsa");
    common::ssh_keygen(&rsa, "rsa").await;
    let mut cmd = s.gw_ssh(&lease, &rsa);
    cmd.arg("true");
    let says = format!(
        "lease {} takes only its ssh-ed25519 access key; you offered",
        short(&s.lease)
    );
    expect_refused(&s, cmd, AuthFailure::WrongKeyType, &says).await;

    // A username that is not 64 hex characters. (OpenSSH itself refuses
    // to send control characters; the unit tests cover their removal.)
    let mut cmd = s.gw_ssh("root", s.key.path());
    cmd.arg("true");
    let says = "the username must be the 64-hex lease hash (xe lease create prints it), got 'root'";
    expect_refused(&s, cmd, AuthFailure::MalformedUsername, says).await;
    // ... and only 80 characters of it are echoed.
    let mut cmd = s.gw_ssh(&"x".repeat(300), s.key.path());
    cmd.arg("true");
    let says = format!("got '{}", "x".repeat(80));
    expect_refused(&s, cmd, AuthFailure::MalformedUsername, &says).await;
    let out = run(&mut s.gw_ssh(&"x".repeat(300), s.key.path()), CMD_LIMIT).await;
    let stderr = text(&out.stderr);
    assert!(stderr.contains(&"x".repeat(80)), "{stderr:?}");
    assert!(
        !stderr.contains(&format!("'{}", "x".repeat(81))),
        "{stderr:?}"
    );

    // A lease nobody has heard of (or not replicated here yet).
    let unknown: xe_store::LeaseHash = hex::encode(rand::random::<[u8; 32]>())
        .parse()
        .expect("hash");
    let mut cmd = s.gw_ssh(&unknown.to_string(), s.key.path());
    cmd.arg("true");
    let says = format!(
        "unknown lease {u}: it is not on this gateway's ledger (yet); if you just created it, wait",
        u = short(&unknown)
    );
    expect_refused(&s, cmd, AuthFailure::UnknownLease, &says).await;

    // A settled lease for the right key.
    let settled = s
        .ledger
        .active(s.key.access_pub_key(), common::UNUSED_VM_HOST_KEY);
    s.ledger.settle(settled);
    let mut cmd = s.gw_ssh(&settled.to_string(), s.key.path());
    cmd.arg("true");
    let says = format!("lease {} is settled and grants no access", short(&settled));
    expect_refused(&s, cmd, AuthFailure::LeaseSettled, &says).await;

    // An expired lease: accepted two hours ago for one hour.
    let expired = s.ledger.lease(
        s.key.access_pub_key(),
        Some(now_secs() - 7200),
        3600,
        common::UNUSED_VM_HOST_KEY,
    );
    let mut cmd = s.gw_ssh(&expired.to_string(), s.key.path());
    cmd.arg("true");
    let says = format!("lease {} has expired", short(&expired));
    expect_refused(&s, cmd, AuthFailure::LeaseExpired, &says).await;

    // A lease the provider has not accepted yet.
    let created = s.ledger.lease(
        s.key.access_pub_key(),
        None,
        3600,
        common::UNUSED_VM_HOST_KEY,
    );
    let mut cmd = s.gw_ssh(&created.to_string(), s.key.path());
    cmd.arg("true");
    let says = format!(
        "lease {} is not accepted by its provider yet",
        short(&created)
    );
    expect_refused(&s, cmd, AuthFailure::LeaseNotAccepted, &says).await;

    // A lease the consumer cancelled before acceptance.
    let cancelled = s.ledger.lease(
        s.key.access_pub_key(),
        None,
        3600,
        common::UNUSED_VM_HOST_KEY,
    );
    s.ledger.cancel(cancelled);
    let mut cmd = s.gw_ssh(&cancelled.to_string(), s.key.path());
    cmd.arg("true");
    let says = format!("lease {} was cancelled", short(&cancelled));
    expect_refused(&s, cmd, AuthFailure::LeaseCancelled, &says).await;

    // A lease its provider declined.
    let declined = s.ledger.lease(
        s.key.access_pub_key(),
        None,
        3600,
        common::UNUSED_VM_HOST_KEY,
    );
    s.ledger.decline(declined, "over capacity");
    let mut cmd = s.gw_ssh(&declined.to_string(), s.key.path());
    cmd.arg("true");
    let says = format!("lease {} was declined by its provider", short(&declined));
    expect_refused(&s, cmd, AuthFailure::LeaseDeclined, &says).await;

    assert_eq!(s.gw.stats.auth_successes(), 0);
    assert_eq!(
        failures(&s.gw.stats).iter().map(|(_, n)| n).sum::<u64>(),
        11
    );
    s.gw.stop().await;
}

/// Global requests (remote forwarding) are refused; the session still
/// authenticates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_forwarding_is_refused() {
    require_openssh!("remote_forwarding_is_refused");
    let s = Scene::new(Backend::Failing("unused"), |_| {}).await;
    let mut cmd = s.gw_ssh(&s.lease.to_string(), s.key.path());
    cmd.args([
        "-o",
        "ExitOnForwardFailure=yes",
        "-R",
        "0:127.0.0.1:9",
        "-N",
    ]);
    let out = run(&mut cmd, CMD_LIMIT).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(255), "stderr {stderr:?}");
    assert!(
        stderr.contains("remote port forwarding failed"),
        "stderr {stderr:?}"
    );
    assert_eq!(s.gw.stats.auth_successes(), 1);
    s.gw.stop().await;
}

/// Start `ssh … root@vm 'echo ready; CMD'` through `-W` and wait for ready.
async fn session_ready(s: &Scene, then: &str) -> (Child, BufReader<ChildStdout>) {
    let mut cmd = s.vm_ssh(&s.proxy_command("-W %h:%p"), &format!("echo ready; {then}"));
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn ssh");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    wait_line(&mut out, "ready", CMD_LIMIT).await;
    (child, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settling_a_lease_closes_its_sessions() {
    require_openssh!("settling_a_lease_closes_its_sessions");
    let s = Scene::new(Backend::Sshd, |_| {}).await;
    let (mut child, _out) = session_ready(&s, "sleep 60").await;
    let t = Instant::now();
    s.ledger.settle(s.lease);
    let status = wait_exit(&mut child, CLOSE_LIMIT).await;
    eprintln!("session closed {:?} after the settle", t.elapsed());
    assert!(
        status.is_some(),
        "ssh still running {CLOSE_LIMIT:?} after the lease was settled"
    );
    assert!(!status.is_some_and(|st| st.success()));
    assert_eq!(s.gw.stats.lease_disconnects(), 1);
    // And the lease no longer opens.
    let mut cmd = s.gw_ssh(&s.lease.to_string(), s.key.path());
    cmd.arg("true");
    let says = format!("lease {} is settled", s.lease.short());
    expect_refused(&s, cmd, AuthFailure::LeaseSettled, &says).await;
    s.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_closes_its_sessions() {
    require_openssh!("expiry_closes_its_sessions");
    let s = Scene::new(Backend::Sshd, |_| {}).await;
    // The shortest lease the ledger allows (60 s), accepted 52 s ago.
    let vm_key = s.vm.as_ref().map(|v| v.host_key_line.clone()).expect("vm");
    let accepted_at = now_secs() - 52;
    let short = s
        .ledger
        .lease(s.key.access_pub_key(), Some(accepted_at), 60, &vm_key);
    let expires_at = s.ledger.record(&short).expires_at().expect("accepted");
    let proxy = s
        .proxy_command("-W %h:%p")
        .replace(&s.lease.to_string(), &short.to_string());
    let mut cmd = s.vm_ssh(&proxy, "echo ready; sleep 60");
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn ssh");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    wait_line(&mut out, "ready", CMD_LIMIT).await;
    let left = expires_at.saturating_sub(now_secs());
    let status = wait_exit(&mut child, Duration::from_secs(left) + CLOSE_LIMIT).await;
    assert!(
        status.is_some(),
        "ssh still running after the lease expired"
    );
    let late = now_secs().saturating_sub(expires_at);
    eprintln!("session closed {late} s after expiry (whole seconds)");
    assert!(now_secs() >= expires_at, "closed before the lease expired");
    assert_eq!(s.gw.stats.lease_disconnects(), 1);
    s.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixth_connection_is_refused_while_five_stay_up() {
    require_openssh!("sixth_connection_is_refused_while_five_stay_up");
    let s = Scene::new(Backend::Sshd, |c| c.max_connections = 5).await;
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(session_ready(&s, "read line; echo got-$line").await);
    }
    assert_eq!(s.gw.stats.connections_active(), 5);

    let mut cmd = s.gw_ssh(&s.lease.to_string(), s.key.path());
    cmd.arg("true");
    let out = run(&mut cmd, CMD_LIMIT).await;
    assert_eq!(
        out.status.code(),
        Some(255),
        "stderr {:?}",
        text(&out.stderr)
    );
    assert_eq!(s.gw.stats.refused(ConnectionRefusal::ConnectionLimit), 1);
    assert!(
        text(&out.stderr).contains("serves as many sessions as it allows"),
        "the sixth is told why: {}",
        text(&out.stderr)
    );
    // The sixth authenticated before it was refused (silent connections
    // no longer take sessions' places), so it was counted while it lived:
    // wait (bounded) for its teardown.
    let deadline = Instant::now() + CMD_LIMIT;
    while s.gw.stats.connections_active() != 5 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.gw.stats.connections_active(), 5);

    // The five still work, end to end.
    for (i, (child, out)) in held.iter_mut().enumerate() {
        let stdin = child.stdin.as_mut().expect("stdin");
        stdin
            .write_all(format!("{i}\n").as_bytes())
            .await
            .expect("write");
        stdin.flush().await.expect("flush");
        wait_line(out, &format!("got-{i}"), CMD_LIMIT).await;
    }
    for (mut child, _) in held {
        let status = wait_exit(&mut child, CMD_LIMIT).await.expect("ssh exits");
        assert!(status.success(), "held session failed: {status}");
    }
    s.gw.stop().await;
}

/// Connections that do not authenticate are dropped after the grace time,
/// whether they never speak or stop after the version exchange.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_connections_are_dropped_after_the_grace_time() {
    common::init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = common::Ledger::new();
    let gw = common::start_gateway(
        dir.path(),
        ledger.store.clone(),
        Arc::new(common::FailingDialer("unused")),
        |c| c.auth_grace = Duration::from_secs(1),
    )
    .await;

    let mut silent = TcpStream::connect(gw.addr).await.expect("connect");
    let mut hello = TcpStream::connect(gw.addr).await.expect("connect");
    hello
        .write_all(b"SSH-2.0-probe\r\n")
        .await
        .expect("write version");
    for conn in [&mut silent, &mut hello] {
        let mut sink = Vec::new();
        let t = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut sink)).await;
        assert!(
            r.is_ok(),
            "connection still open 10 s after a 1 s grace time"
        );
        eprintln!("dropped after {:?}", t.elapsed());
        assert!(
            sink.starts_with(b"SSH-2.0-xe-gateway"),
            "{:?}",
            String::from_utf8_lossy(&sink)
        );
    }
    assert_eq!(gw.stats.refused(ConnectionRefusal::AuthTimeout), 2);
    assert_eq!(gw.stats.connections_active(), 0);
    gw.stop().await;
}

/// The host key is created once and reused: the same fingerprint after a
/// restart on the same data directory, and a client that pinned it on the
/// first run connects again with strict checking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_key_is_stable_across_restarts() {
    require_openssh!("host_key_is_stable_across_restarts");
    common::init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let ledger = common::Ledger::new();
    let key = LeaseKey::load_or_create(&dir.path().join("k.lease_key")).expect("key");
    let lease = ledger.active(key.access_pub_key(), common::UNUSED_VM_HOST_KEY);
    let known = dir.path().join("known_hosts");
    let dialer = Arc::new(common::FailingDialer("no VM in this test"));

    let connect = |port: u16, strict: &str| {
        let mut c = Command::new("ssh");
        // OpenSSH keeps the first value of an option: override first.
        c.args(["-o", &format!("StrictHostKeyChecking={strict}")])
            .args(Scene::base_opts(false))
            .args(["-o", &format!("UserKnownHostsFile={}", known.display())])
            .args([
                "-o",
                "HostKeyAlias=xe-gateway",
                "-T",
                "-p",
                &port.to_string(),
                "-i",
            ])
            .arg(key.path())
            .arg(format!("{lease}@127.0.0.1"));
        c.env_remove("SSH_AUTH_SOCK");
        c
    };

    let gw = common::start_gateway(&data, ledger.store.clone(), dialer.clone(), |_| {}).await;
    let first = gw.fingerprint.clone();
    // Authenticated, then the (failing) tunnel: exit 1, not 255.
    let out = run(&mut connect(gw.addr.port(), "accept-new"), CMD_LIMIT).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    gw.stop().await;

    let gw = common::start_gateway(&data, ledger.store.clone(), dialer, |_| {}).await;
    assert_eq!(gw.fingerprint, first);
    let out = run(&mut connect(gw.addr.port(), "yes"), CMD_LIMIT).await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "host key changed? {}",
        text(&out.stderr)
    );

    // The file is OpenSSH's format, private, and what the gateway uses.
    let path = data.join(xe_node::gateway::HOST_KEY_FILE);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&path).expect("meta").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let out = run(Command::new("ssh-keygen").arg("-lf").arg(&path), CMD_LIMIT).await;
    assert!(
        text(&out.stdout).contains(&first),
        "ssh-keygen -lf: {}",
        text(&out.stdout)
    );
    let loaded = load_or_create_host_key(&path).expect("load");
    assert_eq!(host_key_fingerprint(&loaded), first);
    gw.stop().await;
}

/// Cancelling the shutdown token closes open sessions and `run` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_sessions_and_returns() {
    require_openssh!("shutdown_closes_sessions_and_returns");
    let s = Scene::new(Backend::Sshd, |_| {}).await;
    let (mut child, _out) = session_ready(&s, "sleep 60").await;
    let stats = s.gw.stats.clone();
    s.gw.stop().await;
    let status = wait_exit(&mut child, CLOSE_LIMIT).await;
    assert!(status.is_some(), "session survived the gateway's shutdown");
    assert_eq!(stats.connections_active(), 0);
    assert_eq!(stats.tunnels_active(), 0);
}

/// `ssh -L SOCKET:vm:22` turns each connection to SOCKET into a
/// `direct-tcpip` channel on one gateway connection: with a cap of 2, two
/// reach the VM's sshd and the third is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_per_connection_are_capped() {
    require_openssh!("channels_per_connection_are_capped");
    let s = Scene::new(Backend::Sshd, |c| c.max_channels_per_connection = 2).await;
    let sock = s.path("fwd.sock");
    let mut cmd = s.gw_ssh(&s.lease.to_string(), s.key.path());
    cmd.args(["-v", "-N", "-o", "ExitOnForwardFailure=yes", "-L"])
        .arg(format!("{}:vm:22", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn ssh -L");
    let mut err = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let ready = format!("Local forwarding listening on path {}.", sock.display());
    tokio::time::timeout(CMD_LIMIT, async {
        while let Some(line) = err.next_line().await.expect("read ssh stderr") {
            if line.contains(&ready) {
                return;
            }
        }
        panic!("ssh -L exited before listening");
    })
    .await
    .expect("ssh -L listens");
    // Keep draining its debug output.
    tokio::spawn(async move { while let Ok(Some(_)) = err.next_line().await {} });

    async fn banner(sock: &std::path::Path) -> Vec<u8> {
        let mut c = tokio::net::UnixStream::connect(sock)
            .await
            .expect("connect to -L socket");
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        // Read until the VM's version line, or EOF when the channel is refused.
        tokio::time::timeout(CMD_LIMIT, async {
            while !got.contains(&b'\n') {
                let n = c.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .expect("answer or EOF");
        // Keep the channel open for the caller: leak the stream into a task
        // that holds it until the test ends.
        tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = c.read_to_end(&mut sink).await;
        });
        got
    }
    for _ in 0..2 {
        let got = banner(&sock).await;
        assert!(
            got.starts_with(b"SSH-2.0-OpenSSH"),
            "{:?}",
            String::from_utf8_lossy(&got)
        );
    }
    let got = banner(&sock).await;
    assert!(
        got.is_empty(),
        "third channel was served: {:?}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(s.gw.stats.snapshot().channels_refused, 1);
    assert_eq!(s.gw.stats.connections_active(), 1);
    drop(child);
    s.gw.stop().await;
}

/// Refusing a wrong key waits until the client has offered all its keys:
/// with two wrong keys ahead of the right one in the agent, the client
/// still logs in; with only wrong keys, the refusal names each of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_keys_before_the_right_one_do_not_lock_the_client_out() {
    require_openssh!("wrong_keys_before_the_right_one_do_not_lock_the_client_out");
    let s = Scene::new(Backend::Failing("provider unreachable"), |_| {}).await;
    let agent = common::Agent::start(s.dir.path()).await;
    let mut fps = Vec::new();
    for name in ["a_ed25519", "b_ed25519"] {
        let k = s.path(name);
        common::ssh_keygen(&k, "ed25519").await;
        agent.add(&k).await;
        fps.push(fingerprint(&k).await);
    }
    let via_agent = || {
        let mut cmd = Command::new("ssh");
        cmd.args(Scene::base_opts(true))
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", s.gw_known_hosts.display()))
            .arg("-p")
            .arg(s.gw.addr.port().to_string())
            .arg(format!("{}@127.0.0.1", s.lease))
            .arg("-T")
            .env("SSH_AUTH_SOCK", &agent.sock);
        cmd
    };

    let out = run(&mut via_agent(), CMD_LIMIT).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(255), "{stderr:?}");
    for fp in &fps {
        assert!(stderr.contains(fp.as_str()), "{fp} not named in {stderr:?}");
    }
    assert!(stderr.contains("is not lease"), "{stderr:?}");
    assert_eq!(s.gw.stats.auth_failures(AuthFailure::WrongKey), 2);

    agent.add(s.key.path()).await;
    let out = run(&mut via_agent(), CMD_LIMIT).await;
    let stderr = text(&out.stderr);
    // Logged in: the session then fails on the tunnel, not on auth.
    assert_eq!(out.status.code(), Some(1), "{stderr:?}");
    assert!(stderr.contains("provider unreachable"), "{stderr:?}");
    assert_eq!(s.gw.stats.auth_successes(), 1);
    s.gw.stop().await;
}
