//! Sessions the gateway runs in the VM itself (the client forwarded its
//! agent): commands, sftp, the agent passed on into the VM, exit statuses
//! — and what a client without an agent is told instead. Real OpenSSH
//! client tools, a real `sshd` as the VM.

mod common;

use std::path::Path;

use common::{Agent, Backend, CMD_LIMIT, Scene, run, text};
use tokio::process::Command;
use xe_testkit::require_openssh;

/// `ssh -A [extra] LEASE@gw [command]` with `agent` as the only key source.
fn agent_ssh(s: &Scene, agent: &Agent, extra: &[&str], command: Option<&str>) -> Command {
    let mut cmd = Command::new("ssh");
    cmd.args(Scene::base_opts(true))
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", s.gw_known_hosts.display()))
        .args(["-A", "-p"])
        .arg(s.gw.addr.port().to_string())
        .args(extra)
        .arg(format!("{}@127.0.0.1", s.lease))
        .args(command)
        .env("SSH_AUTH_SOCK", &agent.sock);
    cmd
}

async fn scene_with_agent() -> (Scene, Agent) {
    let s = Scene::new(Backend::Sshd, |_| {}).await;
    let agent = Agent::start(s.dir.path()).await;
    agent.add(s.key.path()).await;
    (s, agent)
}

/// The help a client without an agent gets: every way to connect instead.
fn assert_help(all: &str, s: &Scene) {
    for hint in [
        format!("xe ssh {}", s.lease),
        // The VM's key under the lease's alias, so the next lease's VM
        // does not clash with it under the shared name `vm`.
        format!("-o HostKeyAlias={} -o ProxyCommand=", s.lease),
        format!("-W %h:%p {}@", s.lease),
        format!("xe ssh-config {}", s.lease),
        "-o ProxyJump=".into(),
        "ssh -A".into(),
    ] {
        assert!(all.contains(&hint), "missing {hint:?} in {all:?}");
    }
    assert!(!all.contains("SSH-2.0"), "protocol bytes leaked: {all:?}");
}

/// `ssh LEASE@gw CMD` without an agent used to get the raw pipe (sshd's
/// banner, exit 0, CMD never run). Now: the help on stderr, exit 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_without_agent_explains_and_fails() {
    require_openssh!("exec_without_agent_explains_and_fails");
    let s = Scene::new(Backend::Sshd, |_| {}).await;
    let mut cmd = s.gw_ssh(&s.lease.to_string(), s.key.path());
    cmd.arg("echo never-ran");
    let out = run(&mut cmd, CMD_LIMIT).await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout:?} {stderr:?}");
    assert!(stdout.is_empty(), "{stdout:?}");
    assert!(
        stderr.contains("a command through the gateway needs your SSH agent"),
        "{stderr:?}"
    );
    assert_help(&stderr, &s);
    assert_eq!(s.gw.stats.tunnels_active(), 0);
    s.gw.stop().await;
}

/// scp never forwards an agent: it gets the help (naming `xe ssh-config`
/// and ProxyJump) instead of a misleading protocol error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scp_and_sftp_without_agent_are_told_what_to_do() {
    require_openssh!("scp_and_sftp_without_agent_are_told_what_to_do");
    let s = Scene::new(Backend::Sshd, |_| {}).await;
    let src = s.path("src.txt");
    std::fs::write(&src, "payload\n").expect("write src");
    let dst = s.path("dst.txt");
    // Default scp (SFTP protocol) and legacy scp (-O, an exec of `scp -t`).
    for legacy in [false, true] {
        let mut cmd = Command::new("scp");
        cmd.args(Scene::base_opts(false))
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", s.gw_known_hosts.display()))
            .args(legacy.then_some("-O"))
            .arg("-P")
            .arg(s.gw.addr.port().to_string())
            .arg("-i")
            .arg(s.key.path())
            .arg(&src)
            .arg(format!("{}@127.0.0.1:{}", s.lease, dst.display()))
            .env_remove("SSH_AUTH_SOCK");
        let out = run(&mut cmd, CMD_LIMIT).await;
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "legacy={legacy}: {stderr:?}");
        assert!(!dst.exists(), "legacy={legacy}: the copy must not happen");
        assert_help(&stderr, &s);
    }
    s.gw.stop().await;
}

/// `ssh -A LEASE@gw CMD` without a PTY runs CMD in the VM: its output, its
/// stderr and its exit status come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_with_agent_runs_in_the_vm() {
    require_openssh!("exec_with_agent_runs_in_the_vm");
    let (s, agent) = scene_with_agent().await;
    let cmd = "echo out; echo err >&2; test -t 0 || echo no-tty; exit 3";
    let out = run(&mut agent_ssh(&s, &agent, &["-T"], Some(cmd)), CMD_LIMIT).await;
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out\nno-tty\n");
    assert_eq!(text(&out.stderr), "err\n");
    s.gw.stop().await;
}

/// sftp straight at the gateway, with the agent forwarded: the subsystem
/// runs in the VM (here the VM is this host, so the file lands locally).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sftp_with_agent_runs_the_subsystem_in_the_vm() {
    require_openssh!("sftp_with_agent_runs_the_subsystem_in_the_vm");
    let (s, agent) = scene_with_agent().await;
    let src = s.path("src.txt");
    std::fs::write(&src, "payload through sftp\n").expect("write src");
    let dst = s.path("dst.txt");
    let batch = s.path("batch");
    std::fs::write(&batch, format!("put {} {}\n", src.display(), dst.display())).expect("batch");
    let mut cmd = Command::new("sftp");
    cmd.args(Scene::base_opts(true))
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", s.gw_known_hosts.display()))
        .args(["-o", "ForwardAgent=yes", "-b"])
        .arg(&batch)
        .arg("-P")
        .arg(s.gw.addr.port().to_string())
        .arg(format!("{}@127.0.0.1", s.lease))
        .env("SSH_AUTH_SOCK", &agent.sock);
    let out = run(&mut cmd, CMD_LIMIT).await;
    assert!(out.status.success(), "sftp: {}", text(&out.stderr));
    assert_eq!(
        std::fs::read_to_string(&dst).expect("uploaded file"),
        "payload through sftp\n"
    );
    s.gw.stop().await;
}

/// `ssh-add -l` inside the VM lists the consumer's lease key: the agent
/// the consumer forwarded to the gateway is forwarded on into the VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_agent_reaches_the_vm() {
    require_openssh!("forwarded_agent_reaches_the_vm");
    let (s, agent) = scene_with_agent().await;
    let want = key_fingerprint(s.key.path()).await;
    for extra in [&["-T"][..], &["-tt"][..]] {
        let out = run(
            &mut agent_ssh(&s, &agent, extra, Some("ssh-add -l")),
            CMD_LIMIT,
        )
        .await;
        let stdout = text(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{extra:?}: {stdout:?} {:?}",
            text(&out.stderr)
        );
        assert!(
            stdout.contains(&want),
            "{extra:?}: {want} not in {stdout:?}"
        );
    }
    s.gw.stop().await;
}

async fn key_fingerprint(key: &Path) -> String {
    let out = run(Command::new("ssh-keygen").arg("-lf").arg(key), CMD_LIMIT).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
        .split_whitespace()
        .nth(1)
        .expect("fingerprint")
        .to_string()
}

/// A subsystem the VM does not have: one line and exit status 1, no hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_subsystem_is_refused_by_the_vm() {
    require_openssh!("unknown_subsystem_is_refused_by_the_vm");
    let (s, agent) = scene_with_agent().await;
    let out = run(
        &mut agent_ssh(&s, &agent, &["-T", "-s"], Some("no-such-subsystem")),
        CMD_LIMIT,
    )
    .await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr:?}");
    assert!(
        stderr.contains("xe gateway: the VM refused to start the shell, command or subsystem"),
        "{stderr:?}"
    );
    s.gw.stop().await;
}
