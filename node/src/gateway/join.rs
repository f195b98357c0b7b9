//! A session run in the VM by the gateway: the client forwarded its agent
//! and asked for a terminal, a command or a subsystem (sftp), with or
//! without a PTY. The gateway logs in to the VM's sshd as an SSH client
//! (over the tunnel), checks the VM's host key against the one the
//! provider published in the lease's accept, authenticates with the
//! *forwarded* agent (the gateway never holds the lease key), forwards that
//! agent on into the VM (`agent.rs`), and joins the two sessions: PTY size,
//! `window-change`, env, the request, signals, exit status / exit signal,
//! EOF.
//!
//! # Ending
//! The VM's CLOSE ends the join, never the client's: the exit status is
//! relayed before the client can close. The VM's EOF is held back until
//! its exit status (or exit signal, or CLOSE) arrives, because a client
//! that has sent its own EOF closes the channel as soon as it sees ours
//! (PuTTY does), and OpenSSH's sshd sends EOF *before* exit-status: passing
//! EOF on at once let plink's CLOSE overtake the status (rc 0 for `exit
//! 21`, 4 runs in 20).

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use russh::keys::PublicKeyOrCertificate;
use russh::keys::agent::client::AgentClient;
use russh::keys::ssh_key::{Algorithm, HashAlg, PublicKey};
use russh::server::Msg;
use russh::{Channel, ChannelMsg, Disconnect, client};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{info, warn};

use super::agent::AgentRelay;
use super::channel::{
    ChannelCtx, Request, SessionSetup, drain_while, finish_with_error, open_tunnel,
};
use super::pump::{Killable, Prelude};
use super::stats::{ActiveGuard, GatewayStats};

/// Bound on the whole login to the VM (tunnel, handshake, agent, auth,
/// channel). The tunnel open has its own, usually shorter, limit.
const VM_LOGIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Keepalive towards the VM, so a dead provider path is noticed.
const VM_KEEPALIVE: Duration = Duration::from_secs(30);

/// After the client closed its channel, how long the VM gets to close its
/// side (sshd answers our CLOSE at once) before the join is cut.
const VM_CLOSE_GRACE: Duration = Duration::from_secs(5);

/// The gateway's client towards the VM: checks the VM's host key against
/// the lease's published one, and joins the agent channels the VM opens to
/// the consumer's agent.
struct VmHostCheck {
    expected: PublicKey,
    mismatch: Arc<AtomicBool>,
    agent: AgentRelay,
}

impl client::Handler for VmHostCheck {
    type Error = russh::Error;

    async fn server_channel_open_agent_forward(
        &mut self,
        channel: Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.agent.relay(channel, reply);
        Ok(())
    }

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let ok = matches!(key, PublicKeyOrCertificate::PublicKey { key, .. }
            if key.key_data() == self.expected.key_data());
        if !ok {
            self.mismatch.store(true, Ordering::Relaxed);
        }
        Ok(ok)
    }
}

/// Host key algorithms to offer: only the published key's, so a VM with
/// several host keys presents the one we can check.
fn host_key_algorithms(expected: &PublicKey) -> Vec<Algorithm> {
    match expected.algorithm() {
        Algorithm::Rsa { .. } => vec![
            Algorithm::Rsa {
                hash: Some(HashAlg::Sha512),
            },
            Algorithm::Rsa {
                hash: Some(HashAlg::Sha256),
            },
        ],
        other => vec![other],
    }
}

/// A logged-in session on the VM.
struct VmSession {
    handle: client::Handle<VmHostCheck>,
    channel: Channel<client::Msg>,
    _tunnel: ActiveGuard,
    /// Cuts the tunnel (and so the client task russh spawned) when dropped.
    _kill: DropGuard,
}

async fn connect_vm(ctx: &ChannelCtx, kill: CancellationToken) -> Result<VmSession, String> {
    let short = ctx.short();
    let line = ctx
        .lease
        .accept
        .as_ref()
        .map(|a| a.vm_host_key.clone())
        .ok_or_else(|| format!("the provider published no VM host key for lease {short}; refusing to log in unverified"))?;
    let expected = PublicKey::from_openssh(&line).map_err(|_| {
        format!("the VM host key published for lease {short} is not an OpenSSH public key; refusing to log in")
    })?;
    let (tunnel, active) = open_tunnel(ctx)
        .await
        .map_err(|reason| format!("cannot reach the VM of lease {short}: {reason}"))?;
    let kill_guard = kill.clone().drop_guard();
    let mismatch = Arc::new(AtomicBool::new(false));
    let config = client::Config {
        preferred: russh::Preferred {
            key: Cow::Owned(host_key_algorithms(&expected)),
            ..Default::default()
        },
        keepalive_interval: Some(VM_KEEPALIVE),
        nodelay: true,
        ..Default::default()
    };
    let check = VmHostCheck {
        expected,
        mismatch: mismatch.clone(),
        agent: AgentRelay::new(ctx.handle.clone(), ctx.shared.tracker.clone(), kill.clone()),
    };
    let mut handle = client::connect_stream(Arc::new(config), Killable::new(tunnel, kill), check)
        .await
        .map_err(|e| {
            if mismatch.load(Ordering::Relaxed) {
                format!(
                    "the VM's host key does not match the one the provider published for lease {short}; refusing to log in"
                )
            } else {
                format!("SSH handshake with the VM failed: {e}")
            }
        })?;

    let agent_channel = ctx
        .handle
        .channel_open_agent()
        .await
        .map_err(|e| format!("could not open your forwarded agent: {e}"))?;
    let mut agent = AgentClient::connect(agent_channel.into_stream());
    let identities = agent
        .request_identities()
        .await
        .map_err(|e| format!("could not list the keys of your forwarded agent: {e}"))?;
    let want = ctx.lease.lease.access_pub_key.0;
    let key = identities
        .iter()
        .map(|id| id.public_key().into_owned())
        .find(|k| k.key_data().ed25519().map(|e| e.0) == Some(want))
        .ok_or_else(|| {
            "your forwarded agent does not hold the lease key; add it with `ssh-add KEY` and retry"
                .to_string()
        })?;
    let user = ctx.shared.config.vm_user.clone();
    let auth = handle
        .authenticate_publickey_with(user.clone(), key, None, &mut agent)
        .await
        .map_err(|e| format!("signing with your forwarded agent failed: {e}"))?;
    if !auth.success() {
        return Err(format!("the VM refused the lease key for user {user}"));
    }
    drop(agent);
    let channel = handle
        .channel_open_session()
        .await
        .map_err(|e| format!("the VM refused a session: {e}"))?;
    Ok(VmSession {
        handle,
        channel,
        _tunnel: active,
        _kill: kill_guard,
    })
}

/// Serve a session channel whose client forwarded its agent.
pub(crate) async fn joined_session(
    mut channel: Channel<Msg>,
    mut setup: SessionSetup,
    request: Request,
    ctx: ChannelCtx,
) {
    info!(request = %request.what(), pty = setup.pty.is_some(), "forwarded agent: logging in to the VM");
    let kill = ctx.token.child_token();
    let login =
        async { tokio::time::timeout(VM_LOGIN_TIMEOUT, connect_vm(&ctx, kill.clone())).await };
    let Some(res) = drain_while(&mut channel, &mut setup, &ctx.token, login).await else {
        kill.cancel();
        return;
    };
    let vm = match res {
        Ok(Ok(vm)) => vm,
        Ok(Err(line)) => {
            warn!(reason = %line, "login to the VM failed");
            let (_, wr) = channel.split();
            finish_with_error(&wr, &line, setup.pty.is_some(), &ctx.token).await;
            return;
        }
        Err(_) => {
            kill.cancel();
            let line = format!(
                "logging in to the VM took longer than {} s",
                VM_LOGIN_TIMEOUT.as_secs()
            );
            warn!(reason = %line, "login to the VM failed");
            let (_, wr) = channel.split();
            finish_with_error(&wr, &line, setup.pty.is_some(), &ctx.token).await;
            return;
        }
    };
    info!("logged in to the VM; joining the sessions");

    let VmSession {
        handle: vm_handle,
        channel: vm_channel,
        _tunnel,
        _kill,
    } = vm;
    // Replies to pty-req and exec/shell come back in order.
    let mut expect = VecDeque::new();
    let start = async {
        let mut ok = vm_channel.agent_forward(true).await.is_ok();
        expect.push_back(Expect::Agent);
        if let Some(p) = &setup.pty {
            ok &= vm_channel
                .request_pty(
                    true,
                    &p.term,
                    p.cols,
                    p.rows,
                    p.pix_width,
                    p.pix_height,
                    &p.modes,
                )
                .await
                .is_ok();
            expect.push_back(Expect::Pty);
        }
        for (k, v) in std::mem::take(&mut setup.env) {
            ok &= vm_channel.set_env(false, k, v).await.is_ok();
        }
        ok &= match request {
            Request::Shell => vm_channel.request_shell(true).await.is_ok(),
            Request::Exec(c) => vm_channel.exec(true, c).await.is_ok(),
            Request::Subsystem(name) => vm_channel.request_subsystem(true, name).await.is_ok(),
        };
        expect.push_back(Expect::Command);
        ok
    };
    match ctx.token.run_until_cancelled(start).await {
        None => return,
        Some(true) => {}
        Some(false) => {
            let (_, wr) = channel.split();
            let line = "the connection to the VM closed while starting the session";
            finish_with_error(&wr, line, setup.pty.is_some(), &ctx.token).await;
            return;
        }
    }

    let pty = setup.pty.is_some();
    let prelude = std::mem::take(&mut setup.prelude);
    let stats = ctx.shared.stats.clone();
    join_pump(channel, vm_channel, expect, prelude, pty, &ctx, stats).await;
    let bye = vm_handle.disconnect(Disconnect::ByApplication, "", "en");
    let _ = ctx.token.run_until_cancelled(bye).await;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Agent,
    Pty,
    Command,
}

enum UpEnd {
    ClientClosed,
    VmGone,
}

enum DownEnd {
    VmClosed { exit_seen: bool, eof_sent: bool },
    Refused,
    ClientGone,
}

/// Text for the client's stderr, with the line ending a PTY needs.
fn stderr_line(line: &str, pty: bool) -> Vec<u8> {
    let nl = if pty { "\r\n" } else { "\n" };
    format!("xe gateway: {line}{nl}").into_bytes()
}

async fn join_pump(
    channel: Channel<Msg>,
    vm_channel: Channel<client::Msg>,
    mut expect: VecDeque<Expect>,
    prelude: Prelude,
    pty: bool,
    ctx: &ChannelCtx,
    stats: Arc<GatewayStats>,
) {
    let (mut srd, swr) = channel.split();
    let (mut vrd, vwr) = vm_channel.split();
    let id = swr.id();
    let handle = ctx.handle.clone();

    let up_stats = stats.clone();
    // What the client sent while the gateway logged in goes first. sshd
    // opens a session channel with a zero window and opens it only once the
    // request succeeded, so this may wait: it must not hold up `down`,
    // which reads the request's reply (a refused one never opens it).
    let up = async move {
        for chunk in prelude.data {
            let n = chunk.len();
            if vwr.data_bytes(chunk).await.is_err() {
                return (UpEnd::VmGone, vwr);
            }
            up_stats.add_client_to_vm(n);
        }
        if prelude.eof && vwr.eof().await.is_err() {
            return (UpEnd::VmGone, vwr);
        }
        loop {
            let ok = match srd.wait().await {
                Some(ChannelMsg::Data { data }) => {
                    let n = data.len();
                    let ok = vwr.data_bytes(data).await.is_ok();
                    up_stats.add_client_to_vm(n);
                    ok
                }
                Some(ChannelMsg::Eof) => vwr.eof().await.is_ok(),
                Some(ChannelMsg::WindowChange {
                    col_width,
                    row_height,
                    pix_width,
                    pix_height,
                }) => vwr
                    .window_change(col_width, row_height, pix_width, pix_height)
                    .await
                    .is_ok(),
                Some(ChannelMsg::Signal { signal }) => vwr.signal(signal).await.is_ok(),
                Some(ChannelMsg::Close) | None => return (UpEnd::ClientClosed, vwr),
                Some(_) => true,
            };
            if !ok {
                return (UpEnd::VmGone, vwr);
            }
        }
    };

    let down = async move {
        let mut exit_seen = false;
        // The VM's EOF, held until its exit status (see the module doc).
        let mut eof_held = false;
        let mut eof_sent = false;
        loop {
            let ok = match vrd.wait().await {
                Some(ChannelMsg::Data { data }) => {
                    let n = data.len();
                    let ok = swr.data_bytes(data).await.is_ok();
                    stats.add_vm_to_client(n);
                    ok
                }
                Some(ChannelMsg::ExtendedData { data, ext }) => {
                    let n = data.len();
                    let ok = swr.extended_data_bytes(ext, data).await.is_ok();
                    stats.add_vm_to_client(n);
                    ok
                }
                Some(ChannelMsg::Eof) => {
                    if exit_seen {
                        eof_sent = true;
                        swr.eof().await.is_ok()
                    } else {
                        eof_held = true;
                        true
                    }
                }
                Some(ChannelMsg::ExitStatus { exit_status }) => {
                    exit_seen = true;
                    let mut ok = swr.exit_status(exit_status).await.is_ok();
                    if eof_held && !eof_sent {
                        eof_sent = true;
                        ok &= swr.eof().await.is_ok();
                    }
                    ok
                }
                Some(ChannelMsg::ExitSignal {
                    signal_name,
                    core_dumped,
                    error_message,
                    lang_tag,
                }) => {
                    exit_seen = true;
                    let mut ok = handle
                        .exit_signal_request(id, signal_name, core_dumped, error_message, lang_tag)
                        .await
                        .is_ok();
                    if eof_held && !eof_sent {
                        eof_sent = true;
                        ok &= swr.eof().await.is_ok();
                    }
                    ok
                }
                Some(ChannelMsg::Success) => {
                    expect.pop_front();
                    true
                }
                Some(ChannelMsg::Failure) => match expect.pop_front() {
                    Some(Expect::Command) => return (DownEnd::Refused, swr),
                    Some(Expect::Agent) => {
                        // The session still works, only without the agent.
                        warn!("the VM refused agent forwarding");
                        let line = stderr_line(
                            "the VM's sshd refused agent forwarding (AllowAgentForwarding no?); \
                             your agent is not available inside the VM",
                            pty,
                        );
                        swr.extended_data_bytes(1, line).await.is_ok()
                    }
                    // The VM could not allocate a PTY: the command still
                    // runs, as with OpenSSH.
                    _ => true,
                },
                Some(ChannelMsg::Close) | None => {
                    return (
                        DownEnd::VmClosed {
                            exit_seen,
                            eof_sent,
                        },
                        swr,
                    );
                }
                Some(_) => true,
            };
            if !ok {
                return (DownEnd::ClientGone, swr);
            }
        }
    };

    tokio::pin!(up);
    tokio::pin!(down);
    let token = &ctx.token;
    // Only the VM side ends the join: when the client closes first, the VM
    // is asked to close too and what it still sends is drained.
    enum First {
        Down(DownEnd, russh::ChannelWriteHalf<Msg>),
        Up(UpEnd, russh::ChannelWriteHalf<client::Msg>),
    }
    let first = tokio::select! {
        _ = token.cancelled() => return,
        (end, swr) = &mut down => First::Down(end, swr),
        (end, vwr) = &mut up => First::Up(end, vwr),
    };
    let (end, swr) = match first {
        First::Down(end, swr) => (end, swr),
        First::Up(end, vwr) => {
            match end {
                UpEnd::ClientClosed => info!("client closed the session; closing it on the VM"),
                UpEnd::VmGone => warn!("the connection to the VM went away"),
            }
            let _ = token.run_until_cancelled(vwr.close()).await;
            let rest = tokio::time::timeout(VM_CLOSE_GRACE, token.run_until_cancelled(&mut down));
            match rest.await {
                Ok(Some(d)) => d,
                Ok(None) => return,
                Err(_) => {
                    warn!(grace = ?VM_CLOSE_GRACE, "the VM did not close the session after the client did");
                    return;
                }
            }
        }
    };
    // Whatever is left to say is said only while the connection lives.
    match end {
        DownEnd::VmClosed {
            exit_seen,
            eof_sent,
        } => {
            info!(exit_seen, "the VM closed the session");
            let _ = token
                .run_until_cancelled(async {
                    if !exit_seen {
                        let line = stderr_line("the VM session ended without an exit status", pty);
                        let _ = swr.extended_data_bytes(1, line).await;
                        let _ = swr.exit_status(255).await;
                    }
                    if !eof_sent {
                        let _ = swr.eof().await;
                    }
                    let _ = swr.close().await;
                })
                .await;
        }
        DownEnd::Refused => {
            let line = "the VM refused to start the shell, command or subsystem";
            warn!("{line}");
            finish_with_error(&swr, line, pty, token).await;
        }
        DownEnd::ClientGone => info!("client went away"),
    }
}
