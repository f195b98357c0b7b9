//! The consumer's forwarded agent, passed on into the VM for a joined
//! session (`ssh -A` through the gateway): the gateway asks the VM's sshd
//! for agent forwarding, and each `auth-agent@openssh.com` channel the VM
//! opens back is joined to a new agent channel to the consumer. The
//! gateway never speaks the agent protocol on these channels; it only
//! copies bytes, so what the VM may do with the agent is exactly what the
//! consumer allowed by forwarding it (ssh-add -c confirmations included).

use std::sync::Arc;

use russh::{Channel, ChannelOpenFailure, client};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, Span, debug, info};

/// Concurrent agent channels per joined session. `ssh-add -l` or a login
/// uses one at a time; the cap bounds what a misbehaving VM can make the
/// gateway open towards the consumer.
const MAX_AGENT_CHANNELS: usize = 8;

/// Joins the VM's agent channels to the consumer's agent.
pub(crate) struct AgentRelay {
    /// The consumer's session, to open agent channels on.
    handle: russh::server::Handle,
    tracker: TaskTracker,
    /// The joined session's token: its agent channels end with it.
    token: CancellationToken,
    slots: Arc<Semaphore>,
    span: Span,
}

impl AgentRelay {
    pub(crate) fn new(
        handle: russh::server::Handle,
        tracker: TaskTracker,
        token: CancellationToken,
    ) -> Self {
        AgentRelay {
            handle,
            tracker,
            token,
            slots: Arc::new(Semaphore::new(MAX_AGENT_CHANNELS)),
            span: Span::current(),
        }
    }

    /// Serve one agent channel the VM opened. Returns at once (it runs in
    /// russh's client loop, which must never wait on the consumer).
    pub(crate) fn relay(&self, vm: Channel<client::Msg>, reply: client::ChannelOpenHandle) {
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            info!(
                max = MAX_AGENT_CHANNELS,
                "the VM opened too many agent channels; refusing one"
            );
            // Dropping `reply` rejects the channel.
            return;
        };
        let handle = self.handle.clone();
        let token = self.token.clone();
        let task = async move {
            let _permit = permit;
            let consumer = match handle.channel_open_agent().await {
                Ok(c) => c,
                Err(e) => {
                    debug!(error = %e, "the client refused an agent channel");
                    reply.reject(ChannelOpenFailure::ConnectFailed).await;
                    return;
                }
            };
            reply.accept().await;
            debug!("agent channel from the VM joined to the client's agent");
            let mut vm = vm.into_stream();
            let mut consumer = consumer.into_stream();
            let copied = token
                .run_until_cancelled(tokio::io::copy_bidirectional(&mut vm, &mut consumer))
                .await;
            debug!(?copied, "agent channel finished");
        };
        self.tracker.spawn(task.instrument(self.span.clone()));
    }
}
