//! Per-channel tasks. Every accepted channel is owned by exactly one task
//! that reads it until it closes: russh's session loop blocks when a
//! channel's buffer is full, so an unread channel would stall the whole
//! connection (keepalives included).
//!
//! - `direct-tcpip` ([`direct_tcpip`]): open the tunnel, accept the channel
//!   only once it is up, copy bytes. End to end with the VM's sshd.
//! - `session` ([`super::session`]): what the session channels share
//!   lives here ([`SessionSetup`], [`Request`], [`finish_with_error`]);
//!   the dispatch is in `session.rs`, the joined session in `join.rs`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use russh::server::{ChannelOpenHandle, Msg};
use russh::{Channel, ChannelMsg, ChannelOpenFailure, ChannelWriteHalf, Pty};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use xe_store::LeaseRecord;

use super::Shared;
use super::auth;
use super::pump::{Prelude, PumpEnd, pump};
use super::stats::ActiveGuard;
use super::tunnel::VmStream;

/// Most `env` requests kept per session; more are ignored.
const MAX_ENV_VARS: usize = 64;

/// Holds one of a connection's channel slots; frees it when dropped.
pub(crate) struct ChannelSlot(Arc<AtomicUsize>);

impl ChannelSlot {
    /// Take a slot if fewer than `max` are in use.
    pub(crate) fn try_take(count: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| ChannelSlot(count.clone()))
    }
}

impl Drop for ChannelSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a channel task needs.
pub(crate) struct ChannelCtx {
    pub(crate) shared: Arc<Shared>,
    pub(crate) lease: LeaseRecord,
    /// The server session, for requests outside the channel (agent
    /// channel, exit-signal).
    pub(crate) handle: russh::server::Handle,
    /// Cancelled when the connection closes.
    pub(crate) token: CancellationToken,
    /// The gateway address this client connected to (for the hints).
    pub(crate) local: SocketAddr,
    pub(crate) _slot: ChannelSlot,
}

impl ChannelCtx {
    pub(crate) fn short(&self) -> String {
        self.lease.hash.short()
    }
}

/// Open the lease's tunnel, bounded by the configured timeout. The error is
/// the one-line reason.
pub(crate) async fn open_tunnel(ctx: &ChannelCtx) -> Result<(VmStream, ActiveGuard), String> {
    let limit = ctx.shared.config.tunnel_open_timeout;
    let res = tokio::time::timeout(limit, ctx.shared.dialer.open(&ctx.lease)).await;
    let reason = match res {
        Ok(Ok(stream)) => {
            info!("tunnel to the VM open");
            return Ok((stream, ctx.shared.stats.tunnel_opened()));
        }
        Ok(Err(e)) => e.reason().to_string(),
        Err(_) => format!("the provider did not answer within {} s", limit.as_secs()),
    };
    ctx.shared.stats.record_tunnel_failure();
    warn!(%reason, "tunnel to the VM failed");
    Err(reason)
}

/// Names a client may use for the VM's sshd in `direct-tcpip` (`-W`, `-J`,
/// `-L`): what `xe ssh` and `xe ssh-config` pass (`vm`), loopback names
/// (the VM seen from itself), the lease hash and the `xe-<8 hex>` alias
/// `xe ssh-config` suggests. Anything else would silently reach sshd
/// while the user asked for another service, so it is refused.
pub(crate) fn is_vm_ssh_target(lease: &xe_store::LeaseHash, host: &str, port: u32) -> bool {
    if port != VM_SSH_PORT {
        return false;
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let hex = lease.to_hex();
    ["vm", "localhost", "127.0.0.1", "::1"]
        .iter()
        .any(|h| host.eq_ignore_ascii_case(h))
        || host.eq_ignore_ascii_case(&hex)
        || host
            .strip_prefix("xe-")
            .is_some_and(|p| p.eq_ignore_ascii_case(&hex[..8]))
}

/// The port `direct-tcpip` must name: the VM's sshd is the only service the
/// gateway reaches.
const VM_SSH_PORT: u32 = 22;

/// The channel-open failure text for any other target. OpenSSH prints it
/// as "channel 0: open failed: administratively prohibited: …".
pub(crate) fn target_refusal(
    lease: &xe_store::LeaseHash,
    host: &str,
    port: u32,
    gateway: SocketAddr,
) -> String {
    format!(
        "xe gateway: only the VM's SSH is reachable through the gateway, not {}:{port}; \
         accepted: vm:22 (also localhost, 127.0.0.1, ::1, the lease hash or xe-{} as the host, port 22). \
         For another port let the VM's sshd forward it: ssh -J {lease}@{gateway} -L PORT:localhost:PORT root@vm",
        auth::loggable(host),
        &lease.to_hex()[..8],
    )
}

/// Serve a `direct-tcpip` channel to the VM's sshd (the target was checked
/// with [`is_vm_ssh_target`]).
pub(crate) async fn direct_tcpip(channel: Channel<Msg>, reply: ChannelOpenHandle, ctx: ChannelCtx) {
    let opened = tokio::select! {
        // Dropping `reply` rejects the channel.
        _ = ctx.token.cancelled() => return,
        r = open_tunnel(&ctx) => r,
    };
    let (tunnel, _active) = match opened {
        Ok(t) => t,
        Err(reason) => {
            // Code 2 (connect failed) with our reason as its description:
            // OpenSSH prints "channel 0: open failed: connect failed: …".
            reply
                .reject(ChannelOpenFailure::Other {
                    code: ChannelOpenFailure::ConnectFailed.code(),
                    reason: format!(
                        "xe gateway: cannot reach the VM of lease {}: {reason}",
                        ctx.short()
                    ),
                })
                .await;
            return;
        }
    };
    reply.accept().await;
    let (end, wr) = pump(
        channel,
        tunnel,
        Prelude::default(),
        ctx.shared.stats.clone(),
        &ctx.token,
    )
    .await;
    info!(end = ?end, "direct-tcpip channel finished");
    if end != PumpEnd::Cancelled {
        let _ = ctx.token.run_until_cancelled(wr.close()).await;
    }
}

/// A `pty-req`, as last updated by `window-change`.
#[derive(Debug, Clone)]
pub(crate) struct PtyRequest {
    pub(crate) term: String,
    pub(crate) cols: u32,
    pub(crate) rows: u32,
    pub(crate) pix_width: u32,
    pub(crate) pix_height: u32,
    pub(crate) modes: Vec<(Pty, u32)>,
}

/// Everything a session channel asked for before `shell`/`exec`.
#[derive(Debug, Default)]
pub(crate) struct SessionSetup {
    pub(crate) pty: Option<PtyRequest>,
    pub(crate) agent: bool,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) prelude: Prelude,
}

impl SessionSetup {
    /// Take in a message that may arrive while the session is being set up.
    pub(crate) fn absorb(&mut self, msg: ChannelMsg) {
        match msg {
            ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                pix_width,
                pix_height,
                terminal_modes,
                ..
            } => {
                self.pty = Some(PtyRequest {
                    term,
                    cols: col_width,
                    rows: row_height,
                    pix_width,
                    pix_height,
                    modes: terminal_modes,
                });
            }
            ChannelMsg::WindowChange {
                col_width,
                row_height,
                pix_width,
                pix_height,
            } => {
                if let Some(p) = &mut self.pty {
                    p.cols = col_width;
                    p.rows = row_height;
                    p.pix_width = pix_width;
                    p.pix_height = pix_height;
                }
            }
            // Past the cap, env requests are dropped.
            ChannelMsg::SetEnv {
                variable_name,
                variable_value,
                ..
            } if self.env.len() < MAX_ENV_VARS => {
                self.env.push((variable_name, variable_value));
            }
            ChannelMsg::AgentForward { .. } => self.agent = true,
            ChannelMsg::Data { data } => self.prelude.push(&data),
            ChannelMsg::Eof => self.prelude.eof = true,
            _ => {}
        }
    }
}

/// Run `fut` while still reading `channel` (buffering what the client sends
/// into `setup`). `None` if the client closed the channel or the connection
/// is closing; then `fut` is dropped.
pub(crate) async fn drain_while<F: Future>(
    channel: &mut Channel<Msg>,
    setup: &mut SessionSetup,
    token: &CancellationToken,
    fut: F,
) -> Option<F::Output> {
    tokio::pin!(fut);
    loop {
        tokio::select! {
            _ = token.cancelled() => return None,
            out = &mut fut => return Some(out),
            msg = channel.wait(), if !setup.prelude.is_full() => match msg {
                None | Some(ChannelMsg::Close) => return None,
                Some(m) => setup.absorb(m),
            },
        }
    }
}

/// End a session channel with a one-line message on stderr and exit
/// status 1. Gives up when `token` is cancelled (writing waits for the
/// client's window, which a dead or hostile client never opens).
pub(crate) async fn finish_with_error(
    wr: &ChannelWriteHalf<Msg>,
    line: &str,
    pty: bool,
    token: &CancellationToken,
) {
    let mut message = format!("xe gateway: {line}\n");
    if pty {
        // A PTY's output is raw: a bare LF would not return the cursor.
        message = message.replace('\n', "\r\n");
    }
    let message = message.into_bytes();
    let _ = token
        .run_until_cancelled(async {
            let _ = wr.extended_data_bytes(1, message).await;
            let _ = wr.exit_status(1).await;
            let _ = wr.eof().await;
            let _ = wr.close().await;
        })
        .await;
}

/// What a session channel asked to run.
#[derive(Debug, Clone)]
pub(crate) enum Request {
    Shell,
    Exec(Vec<u8>),
    /// e.g. `sftp` (what scp, sftp and IDEs ask for).
    Subsystem(String),
}

impl Request {
    /// What was asked for, for the help text and logs.
    pub(crate) fn what(&self) -> String {
        match self {
            Request::Shell => "a terminal".to_string(),
            Request::Exec(_) => "a command".to_string(),
            Request::Subsystem(name) => format!("the {} subsystem", auth::loggable(name)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_and_freed() {
        let count = Arc::new(AtomicUsize::new(0));
        let a = ChannelSlot::try_take(&count, 2).expect("first");
        let _b = ChannelSlot::try_take(&count, 2).expect("second");
        assert!(ChannelSlot::try_take(&count, 2).is_none());
        drop(a);
        assert!(ChannelSlot::try_take(&count, 2).is_some());
    }
}
