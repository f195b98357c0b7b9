//! A `session` channel: collect the requests up to `shell`/`exec`/
//! `subsystem`, then either copy raw bytes (a shell without a PTY: the
//! gateway used as a `ProxyCommand`), join an SSH session to the VM
//! (anything else, with a forwarded agent, [`super::join`]), or explain how
//! to connect (anything else, no agent).

use russh::server::Msg;
use russh::{Channel, ChannelMsg};
use tracing::{info, warn};

use super::channel::{
    ChannelCtx, Request, SessionSetup, drain_while, finish_with_error, open_tunnel,
};
use super::pump::{PumpEnd, pump};

/// Serve a `session` channel: the raw byte pipe for a shell without a PTY
/// (the gateway as a `ProxyCommand`), the VM for anything else when the
/// client forwarded its agent, and otherwise how to connect instead.
pub(crate) async fn session(mut channel: Channel<Msg>, ctx: ChannelCtx) {
    let mut setup = SessionSetup::default();
    let request = loop {
        let msg = tokio::select! {
            _ = ctx.token.cancelled() => return,
            m = channel.wait() => m,
        };
        match msg {
            None | Some(ChannelMsg::Close) => return,
            Some(ChannelMsg::RequestShell { .. }) => break Request::Shell,
            Some(ChannelMsg::Exec { command, .. }) => break Request::Exec(command),
            Some(ChannelMsg::RequestSubsystem { name, .. }) => break Request::Subsystem(name),
            Some(m) => setup.absorb(m),
        }
        if setup.prelude.is_full() {
            // A quarter MiB of input before even asking for a shell: not a
            // client we serve; closing bounds what we buffer.
            warn!("session sent too much data before shell/exec; closing it");
            let (_, wr) = channel.split();
            let _ = ctx.token.run_until_cancelled(wr.close()).await;
            return;
        }
    };
    match (&request, setup.pty.is_some(), setup.agent) {
        (Request::Shell, false, _) => raw_session(channel, setup, ctx).await,
        (_, _, true) => super::join::joined_session(channel, setup, request, ctx).await,
        (_, pty, false) => explain(channel, &ctx, &request, pty).await,
    }
}

/// No PTY: the client speaks SSH to the VM through this channel (the
/// gateway used as a `ProxyCommand` without `-W`). Copy raw bytes.
async fn raw_session(mut channel: Channel<Msg>, mut setup: SessionSetup, ctx: ChannelCtx) {
    info!("session without PTY: copying raw bytes to the VM");
    let Some(opened) = drain_while(&mut channel, &mut setup, &ctx.token, open_tunnel(&ctx)).await
    else {
        return;
    };
    let (tunnel, _active) = match opened {
        Ok(t) => t,
        Err(reason) => {
            let (_, wr) = channel.split();
            let line = format!("cannot reach the VM of lease {}: {reason}", ctx.short());
            finish_with_error(&wr, &line, false, &ctx.token).await;
            return;
        }
    };
    let (end, wr) = pump(
        channel,
        tunnel,
        setup.prelude,
        ctx.shared.stats.clone(),
        &ctx.token,
    )
    .await;
    info!(end = ?end, "raw session finished");
    let token = &ctx.token;
    match end {
        PumpEnd::Done => {
            let _ = token
                .run_until_cancelled(async {
                    let _ = wr.exit_status(0).await;
                    let _ = wr.close().await;
                })
                .await;
        }
        PumpEnd::TunnelError(e) => {
            let line = format!("the tunnel to the VM broke: {e}");
            finish_with_error(&wr, &line, false, token).await;
        }
        PumpEnd::ClientClosed => {
            let _ = token.run_until_cancelled(wr.close()).await;
        }
        PumpEnd::Cancelled => {}
    }
}

/// No forwarded agent: the gateway cannot log in to the VM on the user's
/// behalf, and raw protocol bytes must never reach a terminal, a command's
/// output or an sftp client.
async fn explain(channel: Channel<Msg>, ctx: &ChannelCtx, request: &Request, pty: bool) {
    info!(request = %request.what(), pty, "no forwarded agent: explaining how to connect");
    let text = super::refusal::needs_agent_text(&ctx.lease.hash, &request.what(), ctx.local);
    let (_, wr) = channel.split();
    finish_with_error(&wr, &text, pty, &ctx.token).await;
}
