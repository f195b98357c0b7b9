//! A terminal through the gateway: the client asked for a PTY and forwarded
//! its agent. The gateway logs in to the VM's sshd as an SSH client (over
//! the tunnel), checks the VM's host key against the one the provider
//! published in the lease's accept, authenticates with the *forwarded*
//! agent (the gateway never holds the lease key), and joins the two
//! sessions: PTY size, `window-change`, env, the command, signals, exit
//! status / exit signal, EOF.

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

use super::channel::{ChannelCtx, SessionSetup, drain_while, finish_with_error, open_tunnel};
use super::pump::Killable;
use super::stats::{ActiveGuard, GatewayStats};

/// Bound on the whole login to the VM (tunnel, handshake, agent, auth,
/// channel). The tunnel open has its own, usually shorter, limit.
const VM_LOGIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Keepalive towards the VM, so a dead provider path is noticed.
const VM_KEEPALIVE: Duration = Duration::from_secs(30);

/// Checks the VM's host key against the lease's published one.
struct VmHostCheck {
    expected: PublicKey,
    mismatch: Arc<AtomicBool>,
}

impl client::Handler for VmHostCheck {
    type Error = russh::Error;

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

/// Serve a session channel that has a PTY and a forwarded agent.
pub(crate) async fn joined_session(
    mut channel: Channel<Msg>,
    mut setup: SessionSetup,
    command: Option<Vec<u8>>,
    ctx: ChannelCtx,
) {
    info!("PTY with a forwarded agent: logging in to the VM");
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
            finish_with_error(&wr, &line, true, &ctx.token).await;
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
            finish_with_error(&wr, &line, true, &ctx.token).await;
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
        let mut ok = true;
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
        ok &= match command {
            Some(c) => vm_channel.exec(true, c).await.is_ok(),
            None => vm_channel.request_shell(true).await.is_ok(),
        };
        expect.push_back(Expect::Command);
        for chunk in std::mem::take(&mut setup.prelude.data) {
            ok &= vm_channel.data_bytes(chunk).await.is_ok();
        }
        if setup.prelude.eof {
            ok &= vm_channel.eof().await.is_ok();
        }
        ok
    };
    match ctx.token.run_until_cancelled(start).await {
        None => return,
        Some(true) => {}
        Some(false) => {
            let (_, wr) = channel.split();
            let line = "the connection to the VM closed while starting the session";
            finish_with_error(&wr, line, true, &ctx.token).await;
            return;
        }
    }

    join_pump(channel, vm_channel, expect, &ctx, ctx.shared.stats.clone()).await;
    let bye = vm_handle.disconnect(Disconnect::ByApplication, "", "en");
    let _ = ctx.token.run_until_cancelled(bye).await;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
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

async fn join_pump(
    channel: Channel<Msg>,
    vm_channel: Channel<client::Msg>,
    mut expect: VecDeque<Expect>,
    ctx: &ChannelCtx,
    stats: Arc<GatewayStats>,
) {
    let (mut srd, swr) = channel.split();
    let (mut vrd, vwr) = vm_channel.split();
    let id = swr.id();
    let handle = ctx.handle.clone();

    let up_stats = stats.clone();
    let up = async move {
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
                    eof_sent = true;
                    swr.eof().await.is_ok()
                }
                Some(ChannelMsg::ExitStatus { exit_status }) => {
                    exit_seen = true;
                    swr.exit_status(exit_status).await.is_ok()
                }
                Some(ChannelMsg::ExitSignal {
                    signal_name,
                    core_dumped,
                    error_message,
                    lang_tag,
                }) => {
                    exit_seen = true;
                    handle
                        .exit_signal_request(id, signal_name, core_dumped, error_message, lang_tag)
                        .await
                        .is_ok()
                }
                Some(ChannelMsg::Success) => {
                    expect.pop_front();
                    true
                }
                Some(ChannelMsg::Failure) => match expect.pop_front() {
                    Some(Expect::Command) => return (DownEnd::Refused, swr),
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
    enum Finished {
        Up(UpEnd, russh::ChannelWriteHalf<client::Msg>),
        Down(DownEnd, russh::ChannelWriteHalf<Msg>),
    }
    let finished = tokio::select! {
        _ = ctx.token.cancelled() => return,
        (end, vwr) = &mut up => Finished::Up(end, vwr),
        (end, swr) = &mut down => Finished::Down(end, swr),
    };
    // Whatever is left to say is said only while the connection lives.
    let token = &ctx.token;
    match finished {
        Finished::Up(end, vwr) => {
            match end {
                UpEnd::ClientClosed => info!("client closed the session; closing it on the VM"),
                UpEnd::VmGone => warn!("the connection to the VM went away"),
            }
            let _ = token.run_until_cancelled(vwr.close()).await;
        }
        Finished::Down(
            DownEnd::VmClosed {
                exit_seen,
                eof_sent,
            },
            swr,
        ) => {
            info!(exit_seen, "the VM closed the session");
            let _ = token
                .run_until_cancelled(async {
                    if !exit_seen {
                        let line = b"xe gateway: the VM session ended without an exit status\r\n";
                        let _ = swr.extended_data_bytes(1, line.to_vec()).await;
                        let _ = swr.exit_status(255).await;
                    }
                    if !eof_sent {
                        let _ = swr.eof().await;
                    }
                    let _ = swr.close().await;
                })
                .await;
        }
        Finished::Down(DownEnd::Refused, swr) => {
            let line = "the VM refused to start the shell or command";
            warn!("{line}");
            finish_with_error(&swr, line, true, token).await;
        }
        Finished::Down(DownEnd::ClientGone, _) => info!("client went away"),
    }
}
