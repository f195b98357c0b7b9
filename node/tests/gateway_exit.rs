//! The exit status of a session the gateway runs in the VM always reaches
//! the client, also for a client that closes its channel the moment it
//! sees EOF (PuTTY's plink does: it lost `exit 21` in 4 runs of 20 when the
//! gateway passed the VM's EOF on before the VM's exit status).

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::{Agent, Backend, CMD_LIMIT, Scene, run, text};
use russh::keys::PrivateKeyWithHashAlg;
use russh::{ChannelMsg, client};
use tokio::process::Command;
use xe_testkit::require_openssh;

/// A command whose output ends well before it exits: sshd sends EOF, then,
/// after the pause, the exit status. The pause is the scenario (a process
/// that closes its output early), not a synchronisation.
const EARLY_EOF: &str = "exec >&- 2>&-; sleep 0.3; exit 21";

/// A client like plink: forwards its agent (a real ssh-agent), and closes
/// the channel as soon as it has received EOF.
struct ClosesOnEof {
    agent_sock: PathBuf,
}

impl client::Handler for ClosesOnEof {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        channel: russh::Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let sock = self.agent_sock.clone();
        tokio::spawn(async move {
            let Ok(mut agent) = tokio::net::UnixStream::connect(&sock).await else {
                return;
            };
            reply.accept().await;
            let mut ch = channel.into_stream();
            let _ = tokio::io::copy_bidirectional(&mut ch, &mut agent).await;
        });
        Ok(())
    }
}

/// Run `command` through the gateway with a plink-like client; the exit
/// status it saw before it closed the channel on EOF, if any.
async fn plink_like(s: &Scene, agent: &Agent, command: &str) -> Option<u32> {
    let key = russh::keys::load_secret_key(s.key.path(), None).expect("lease key");
    let tcp = tokio::net::TcpStream::connect(s.gw.addr)
        .await
        .expect("connect");
    let handler = ClosesOnEof {
        agent_sock: agent.sock.clone(),
    };
    let mut h = client::connect_stream(Arc::new(client::Config::default()), tcp, handler)
        .await
        .expect("handshake");
    let auth = h
        .authenticate_publickey(
            s.lease.to_string(),
            PrivateKeyWithHashAlg::new(Arc::new(key), None),
        )
        .await
        .expect("auth");
    assert!(auth.success(), "lease key refused");
    let mut ch = h.channel_open_session().await.expect("session");
    ch.agent_forward(false).await.expect("agent request");
    ch.exec(true, command).await.expect("exec");
    ch.eof().await.expect("client eof");
    let mut status = None;
    let run = async {
        while let Some(msg) = ch.wait().await {
            match msg {
                ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                ChannelMsg::Eof => {
                    // Both EOFs are done: plink closes now, and once the
                    // gateway has its CLOSE nothing more can arrive on the
                    // channel (russh answers a CLOSE and drops the channel).
                    let _ = ch.close().await;
                    break;
                }
                ChannelMsg::Close => break,
                _ => {}
            }
        }
    };
    tokio::time::timeout(CMD_LIMIT, run)
        .await
        .expect("session ends");
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_status_reaches_a_client_that_closes_on_eof() {
    require_openssh!("exit_status_reaches_a_client_that_closes_on_eof");
    let s = Scene::new(Backend::Sshd, |_| {}).await;
    let agent = Agent::start(s.dir.path()).await;
    agent.add(s.key.path()).await;
    for i in 0..5 {
        assert_eq!(
            plink_like(&s, &agent, EARLY_EOF).await,
            Some(21),
            "run {i}: exit status lost"
        );
    }
    s.gw.stop().await;
}

/// OpenSSH, with and without a PTY, 20 runs each: the status is always 21.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_status_is_relayed_every_time_with_openssh() {
    require_openssh!("exit_status_is_relayed_every_time_with_openssh");
    let s = Scene::new(Backend::Sshd, |_| {}).await;
    let agent = Agent::start(s.dir.path()).await;
    agent.add(s.key.path()).await;
    for tty in ["-T", "-tt"] {
        for i in 0..20 {
            let command = if i % 2 == 0 { "exit 21" } else { EARLY_EOF };
            let mut cmd = Command::new("ssh");
            cmd.args(Scene::base_opts(true))
                .arg("-o")
                .arg(format!("UserKnownHostsFile={}", s.gw_known_hosts.display()))
                .args(["-A", tty, "-p"])
                .arg(s.gw.addr.port().to_string())
                .arg(format!("{}@127.0.0.1", s.lease))
                .arg(command)
                .env("SSH_AUTH_SOCK", &agent.sock);
            let out = run(&mut cmd, CMD_LIMIT).await;
            assert_eq!(
                out.status.code(),
                Some(21),
                "{tty} run {i} ({command}): {:?}",
                text(&out.stderr)
            );
        }
    }
    s.gw.stop().await;
}
