//! The SSH gateway's paths, driven by the real OpenSSH client, with a real
//! `sshd` as the VM behind the tunnel.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Agent, Backend, CMD_LIMIT, Scene, run, text};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use xe_testkit::require_openssh;

/// The seed's `xe ssh`: `ProxyCommand="ssh -W %h:%p LEASE@gw"`, end to end
/// with the VM's sshd (its host key checked against the published one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_command_with_w_runs_a_command_on_the_vm() {
    require_openssh!("proxy_command_with_w_runs_a_command_on_the_vm");
    let s = Scene::new(Backend::Sshd, |_| {}).await;
    let out = run(
        &mut s.vm_ssh(&s.proxy_command("-W %h:%p"), "echo hello"),
        CMD_LIMIT,
    )
    .await;
    assert!(out.status.success(), "ssh failed: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello\n");
    assert_eq!(s.gw.stats.auth_successes(), 1);
    assert!(s.gw.stats.bytes_client_to_vm() > 0 && s.gw.stats.bytes_vm_to_client() > 0);
    s.gw.stop().await;
}

/// `ssh -J gw root@vm`: ProxyJump, configured the way a user would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_jump_runs_a_command_on_the_vm() {
    require_openssh!("proxy_jump_runs_a_command_on_the_vm");
    let s = Scene::new(Backend::Sshd, |_| {}).await;
    let config = s.path("ssh_config");
    std::fs::write(
        &config,
        format!(
            "Host gw\n  HostName 127.0.0.1\n  Port {port}\n  User {lease}\n  IdentityFile {key}\n  \
             IdentitiesOnly yes\n  IdentityAgent none\n  UserKnownHostsFile {gwkh}\n  \
             StrictHostKeyChecking yes\n  BatchMode yes\n\
             Host vm\n  User root\n  IdentityFile {key}\n  IdentitiesOnly yes\n  IdentityAgent none\n  \
             UserKnownHostsFile {vmkh}\n  StrictHostKeyChecking yes\n  BatchMode yes\n",
            port = s.gw.addr.port(),
            lease = s.lease,
            key = s.key.path().display(),
            gwkh = s.gw_known_hosts.display(),
            vmkh = s.vm_known_hosts.display(),
        ),
    )
    .expect("write ssh config");
    let mut cmd = Command::new("ssh");
    cmd.arg("-F")
        .arg(&config)
        .args(["-J", "gw", "vm", "echo hello"]);
    cmd.env_remove("SSH_AUTH_SOCK");
    let out = run(&mut cmd, CMD_LIMIT).await;
    assert!(out.status.success(), "ssh -J failed: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello\n");
    s.gw.stop().await;
}

/// The gateway as a ProxyCommand without `-W`: a session channel with no
/// PTY carries the raw SSH bytes (the seed's session behaviour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_as_proxy_command_without_w() {
    require_openssh!("session_as_proxy_command_without_w");
    let s = Scene::new(Backend::Sshd, |_| {}).await;
    let out = run(
        &mut s.vm_ssh(&s.proxy_command("-T"), "echo hello"),
        CMD_LIMIT,
    )
    .await;
    assert!(out.status.success(), "ssh failed: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello\n");
    s.gw.stop().await;
}

/// `ssh -A -tt LEASE@gw CMD` with the lease key in a real agent: the
/// gateway logs in to the VM with the forwarded agent, passes env, runs the
/// command in a PTY and returns its exit status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pty_with_forwarded_agent_runs_in_the_vm() {
    require_openssh!("pty_with_forwarded_agent_runs_in_the_vm");
    let s = Scene::new(Backend::Sshd, |_| {}).await;
    let agent = Agent::start(s.dir.path()).await;
    agent.add(s.key.path()).await;
    let mut cmd = Command::new("ssh");
    cmd.args(Scene::base_opts(true))
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", s.gw_known_hosts.display()))
        .args(["-o", "SetEnv=XE_PROBE=42", "-A", "-tt", "-p"])
        .arg(s.gw.addr.port().to_string())
        .arg(format!("{}@127.0.0.1", s.lease))
        .arg("echo inside $XE_PROBE $(tty | cut -c1-8); exit 7")
        .env("SSH_AUTH_SOCK", &agent.sock);
    let out = run(&mut cmd, CMD_LIMIT).await;
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(7),
        "stdout {stdout:?} stderr {:?}",
        text(&out.stderr)
    );
    // A real PTY on the VM (tty prints /dev/pts/N), env forwarded.
    assert!(stdout.contains("inside 42 /dev/pts"), "stdout {stdout:?}");
    assert_eq!(s.gw.stats.auth_successes(), 1);
    s.gw.stop().await;
}

/// A PTY without a forwarded agent: an explanation on stderr and exit
/// status 1 — never raw SSH protocol bytes on the terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pty_without_agent_explains_how_to_connect() {
    require_openssh!("pty_without_agent_explains_how_to_connect");
    let s = Scene::new(Backend::Sshd, |_| {}).await;
    let mut cmd = s.gw_ssh(&s.lease.to_string(), s.key.path());
    cmd.args(["-tt", "echo never"]);
    let out = run(&mut cmd, CMD_LIMIT).await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout {stdout:?} stderr {stderr:?}"
    );
    // With -tt OpenSSH writes stderr data to its stderr.
    let all = format!("{stdout}{stderr}");
    for hint in [
        format!("xe ssh {}", s.lease),
        format!("-o HostKeyAlias={}", s.lease),
        "ssh -A".into(),
    ] {
        assert!(all.contains(&hint), "missing {hint:?} in {all:?}");
    }
    assert!(
        !all.contains("SSH-2.0"),
        "protocol bytes reached the terminal: {all:?}"
    );
    assert!(!all.contains("never"));
    assert_eq!(s.gw.stats.tunnels_active(), 0);
    s.gw.stop().await;
}

/// Provider unreachable: a session gets the one-line reason on stderr and
/// exit status 1; `-W` gets the reason in the channel-open failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_failure_reaches_the_user_as_one_line() {
    require_openssh!("tunnel_failure_reaches_the_user_as_one_line");
    let reason = "provider 1a2b3c4d refused: lease settled";
    let s = Scene::new(Backend::Failing(reason), |_| {}).await;

    // Session without PTY (shell): stderr + exit 1.
    let mut cmd = s.gw_ssh(&s.lease.to_string(), s.key.path());
    cmd.arg("-T");
    let out = run(&mut cmd, CMD_LIMIT).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr {stderr:?}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains(reason)).collect();
    assert_eq!(lines.len(), 1, "stderr {stderr:?}");
    assert!(
        lines[0].starts_with("xe gateway: cannot reach the VM of lease"),
        "{stderr:?}"
    );

    // direct-tcpip: OpenSSH prints the open failure with our description.
    let out = run(
        &mut s.vm_ssh(&s.proxy_command("-W %h:%p"), "true"),
        CMD_LIMIT,
    )
    .await;
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(reason), "stderr {stderr:?}");
    assert_eq!(s.gw.stats.tunnel_failures(), 2);
    s.gw.stop().await;
}

/// 100 MiB through `-W` into the VM's `sha256sum`, compared with the hash
/// of what was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_mib_arrive_byte_exact() {
    require_openssh!("hundred_mib_arrive_byte_exact");
    const TOTAL: usize = 100 * 1024 * 1024;
    const CHUNK: usize = 1024 * 1024;
    let s = Scene::new(Backend::Sshd, |_| {}).await;
    let mut cmd = s.vm_ssh(&s.proxy_command("-W %h:%p"), "sha256sum");
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn ssh");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = child.stdout.take().expect("stdout");
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        use rand::{RngCore, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        for _ in 0..TOTAL / CHUNK {
            rng.fill_bytes(&mut buf);
            hasher.update(&buf);
            stdin.write_all(&buf).await.expect("write to ssh");
        }
        drop(stdin);
        hex::encode(hasher.finalize())
    });
    let mut remote = String::new();
    let read =
        tokio::time::timeout(Duration::from_secs(300), stdout.read_to_string(&mut remote)).await;
    read.expect("transfer finished within 300 s")
        .expect("read ssh stdout");
    let sent = writer.await.expect("writer task");
    let status = common::wait_exit(&mut child, CMD_LIMIT)
        .await
        .expect("ssh exits");
    assert!(status.success(), "ssh exit {status}");
    let remote = remote
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    assert_eq!(remote, sent, "sha256 at the VM differs from the one sent");
    eprintln!("100 MiB through the gateway in {:?}", start.elapsed());
    assert!(s.gw.stats.bytes_client_to_vm() >= TOTAL as u64);
    s.gw.stop().await;
}

/// `ssh -A -tt` as a user: the gateway's own checks before it logs in for
/// you — the VM must present the host key the provider published, and the
/// forwarded agent must hold the lease key. Each failure is one line and
/// exit status 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pty_login_checks_vm_host_key_and_agent_key() {
    require_openssh!("pty_login_checks_vm_host_key_and_agent_key");
    let s = Scene::new(Backend::Sshd, |_| {}).await;
    let agent = Agent::start(s.dir.path()).await;
    let pty_ssh = |lease: &str| {
        let mut cmd = Command::new("ssh");
        cmd.args(Scene::base_opts(true))
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", s.gw_known_hosts.display()))
            .args(["-o", "IdentitiesOnly=yes", "-i"])
            .arg(s.key.path())
            .args(["-A", "-tt", "-p"])
            .arg(s.gw.addr.port().to_string())
            .arg(format!("{lease}@127.0.0.1"))
            .arg("echo reached-the-vm")
            .env("SSH_AUTH_SOCK", &agent.sock);
        cmd
    };

    // The agent holds some other key only.
    let other = s.path("other_ed25519");
    common::ssh_keygen(&other, "ed25519").await;
    agent.add(&other).await;
    let out = run(&mut pty_ssh(&s.lease.to_string()), CMD_LIMIT).await;
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{all:?}");
    assert!(all.contains("does not hold the lease key"), "{all:?}");
    assert!(!all.contains("reached-the-vm"));

    // The lease publishes a host key the VM does not have.
    agent.add(s.key.path()).await;
    let forged = s
        .ledger
        .active(s.key.access_pub_key(), common::UNUSED_VM_HOST_KEY);
    let out = run(&mut pty_ssh(&forged.to_string()), CMD_LIMIT).await;
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{all:?}");
    assert!(all.contains("host key does not match"), "{all:?}");
    assert!(!all.contains("reached-the-vm"));

    // Same agent, the real lease: it works.
    let out = run(&mut pty_ssh(&s.lease.to_string()), CMD_LIMIT).await;
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out.stderr));
    assert!(text(&out.stdout).contains("reached-the-vm"));
    s.gw.stop().await;
}

/// Half-close through `-W`: the client sends EOF at once (stdin is
/// /dev/null), and what the VM still sends (its version line) arrives
/// before the channel closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tcpip_propagates_half_close() {
    require_openssh!("direct_tcpip_propagates_half_close");
    let s = Scene::new(Backend::Sshd, |_| {}).await;
    let mut cmd = s.gw_ssh(&s.lease.to_string(), s.key.path());
    cmd.args(["-W", "vm:22"]);
    let out = run(&mut cmd, CMD_LIMIT).await;
    assert!(out.status.success(), "ssh -W: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("SSH-2.0-OpenSSH"), "stdout {stdout:?}");
    s.gw.stop().await;
}

/// `direct-tcpip` reaches only the VM's SSH: the names `xe ssh` and users
/// pass for it work; any other host or port is refused with a text that
/// says what is accepted (it used to reach sshd silently).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tcpip_accepts_only_the_vm_ssh() {
    require_openssh!("direct_tcpip_accepts_only_the_vm_ssh");
    let s = Scene::new(Backend::Sshd, |_| {}).await;
    let hex = s.lease.to_string();
    let w = |target: &str| {
        let mut cmd = s.gw_ssh(&hex, s.key.path());
        cmd.args(["-W", target]);
        cmd
    };
    for ok in [
        "vm:22".to_string(),
        "localhost:22".into(),
        "127.0.0.1:22".into(),
        "[::1]:22".into(),
        format!("{}:22", hex.to_uppercase()),
        format!("xe-{}:22", &hex[..8]),
    ] {
        let out = run(&mut w(&ok), CMD_LIMIT).await;
        assert!(out.status.success(), "{ok}: {}", text(&out.stderr));
        assert!(text(&out.stdout).starts_with("SSH-2.0-OpenSSH"), "{ok}");
    }
    for bad in [
        "example.com:80",
        "vm:80",
        "10.0.0.1:22",
        "xe-00000000:22",
        "localhost:2222",
    ] {
        let out = run(&mut w(bad), CMD_LIMIT).await;
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{bad} was let through");
        assert!(
            text(&out.stdout).is_empty(),
            "{bad}: {:?}",
            text(&out.stdout)
        );
        assert!(
            stderr.contains(
                "open failed: administratively prohibited: xe gateway: only the VM's SSH"
            ),
            "{bad}: {stderr:?}"
        );
        assert!(stderr.contains("accepted: vm:22"), "{bad}: {stderr:?}");
    }
    assert_eq!(s.gw.stats.tunnels_active(), 0);
    s.gw.stop().await;
}
