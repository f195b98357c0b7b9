//! One client connection's russh [`Handler`]: authentication, channel
//! opens, request replies. The task around it is `lifecycle.rs`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, OnceLock};

use russh::keys::Certificate;
use russh::keys::ssh_key::PublicKey;
use russh::server::{
    Auth, ChannelOpenHandle, Handler, Msg, PublicKeyOffer, Session, VerifiedPublicKey,
};
use russh::{Channel, ChannelId, ChannelOpenFailure, Pty};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, info, warn};
use xe_store::{LeaseHash, LeaseRecord};

use super::Shared;
use super::auth::{self, loggable};
use super::channel::{self, ChannelCtx, ChannelSlot};
use super::refusal::{Refusals, Verdict};
use super::stats::AuthFailure;

/// What the handler tells the connection task when authentication succeeds.
pub(crate) struct AuthInfo {
    pub(crate) lease: LeaseHash,
    /// One of `max_connections`, for the session's life.
    _session: tokio::sync::OwnedSemaphorePermit,
}

/// The russh handler of one connection.
pub(crate) struct ConnHandler {
    shared: Arc<Shared>,
    peer: SocketAddr,
    local: SocketAddr,
    span: Span,
    /// Parent of every channel task of this connection.
    channels_token: CancellationToken,
    auth_tx: Option<oneshot::Sender<AuthInfo>>,
    /// Accepted in `auth_publickey`, handed over in `auth_succeeded`.
    pending: Option<AuthInfo>,
    lease: Option<LeaseRecord>,
    channel_count: Arc<AtomicUsize>,
    sessions: HashSet<ChannelId>,
    started: HashSet<ChannelId>,
    refusals: Refusals,
}

impl ConnHandler {
    /// A handler for a new connection; `handle_slot` is filled by the
    /// connection task once the session runs.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        shared: Arc<Shared>,
        peer: SocketAddr,
        local: SocketAddr,
        span: Span,
        channels_token: CancellationToken,
        auth_tx: oneshot::Sender<AuthInfo>,
        handle_slot: Arc<OnceLock<russh::server::Handle>>,
    ) -> Self {
        let max_keys = shared.config.max_auth_attempts;
        ConnHandler {
            shared,
            peer,
            local,
            span,
            channels_token,
            auth_tx: Some(auth_tx),
            pending: None,
            lease: None,
            channel_count: Arc::new(AtomicUsize::new(0)),
            sessions: HashSet::new(),
            started: HashSet::new(),
            refusals: Refusals::new(handle_slot, max_keys),
        }
    }

    /// Log and (the first time) count a rejected attempt.
    fn note_rejection(
        &self,
        verdict: Verdict,
        reason: AuthFailure,
        user: &str,
        key: Option<&PublicKey>,
    ) {
        if verdict == Verdict::Repeat {
            return;
        }
        self.shared.stats.record_auth_failure(reason);
        let fingerprint = key.map(|k| k.fingerprint(russh::keys::HashAlg::Sha256).to_string());
        warn!(
            parent: &self.span,
            peer = %self.peer,
            %reason,
            user = %loggable(user),
            key_type = %key.map(|k| k.algorithm().to_string()).unwrap_or_default(),
            fingerprint = %fingerprint.unwrap_or_default(),
            "SSH authentication rejected"
        );
    }

    /// Reject a key for `reason`, telling the user why once the client has
    /// no other key to try (see `refusal.rs`).
    async fn reject_key(&mut self, reason: AuthFailure, user: &str, key: &PublicKey) -> Auth {
        let lease = auth::parse_username(user).ok();
        let (verdict, auth) = self
            .refusals
            .at_key(reason, user, lease.as_ref(), key)
            .await;
        self.note_rejection(verdict, reason, user, Some(key));
        auth
    }

    /// A context for a new channel, if the connection is authenticated and
    /// under its channel cap.
    fn channel_ctx(&mut self, session: &Session, kind: &str) -> Option<ChannelCtx> {
        let lease = self.lease.clone()?;
        let max = self.shared.config.max_channels_per_connection;
        let Some(slot) = ChannelSlot::try_take(&self.channel_count, max) else {
            self.shared.stats.record_channel_refused();
            warn!(parent: &self.span, kind, max, "channel limit of this connection reached; refusing the channel");
            return None;
        };
        Some(ChannelCtx {
            shared: self.shared.clone(),
            lease,
            handle: session.handle(),
            token: self.channels_token.clone(),
            local: self.local,
            _slot: slot,
        })
    }

    fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.shared.tracker.spawn(fut.instrument(self.span.clone()));
    }

    fn is_session(&self, channel: ChannelId) -> bool {
        self.sessions.contains(&channel)
    }

    fn reply(session: &mut Session, channel: ChannelId, ok: bool) -> Result<(), russh::Error> {
        if ok {
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }

    async fn refuse_channel(&self, reply: ChannelOpenHandle, kind: &str) {
        self.shared.stats.record_channel_refused();
        info!(parent: &self.span, kind, "refusing channel type");
        reply.reject(ChannelOpenFailure::UnknownChannelType).await;
    }
}

impl Handler for ConnHandler {
    type Error = russh::Error;

    /// OpenSSH's first request names the user and no key: whatever does
    /// not depend on the key is decided here, where the reason can still
    /// reach the user before the client gives up.
    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        let checked =
            auth::parse_username(user).and_then(|h| auth::active_lease(&self.shared.store, &h));
        let Err(reason) = checked else {
            return Ok(Auth::reject());
        };
        let lease = auth::parse_username(user).ok();
        let (verdict, auth) = self.refusals.at_none(reason, user, lease.as_ref()).await;
        self.note_rejection(verdict, reason, user, None);
        Ok(auth)
    }

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        // Cheap and complete: a key that would be refused after its
        // signature is refused before the client signs anything.
        Ok(
            match auth::check(&self.shared.store, user, offer.public_key) {
                Ok(_) => Auth::Accept,
                Err(reason) => self.reject_key(reason, user, offer.public_key).await,
            },
        )
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let rec = match auth::check(&self.shared.store, user, key.public_key) {
            Ok(rec) => rec,
            Err(reason) => return Ok(self.reject_key(reason, user, key.public_key).await),
        };
        // A lease that ends from here on is seen by the connection task's
        // `Store::until_inactive`, whose first read is after this one.
        // Sessions are capped here, not at accept: connections that never
        // authenticate must not take a session's place.
        let Ok(session) = self.shared.sessions.clone().try_acquire_owned() else {
            self.shared
                .stats
                .record_refusal(super::stats::ConnectionRefusal::ConnectionLimit);
            tracing::warn!(
                limit = self.shared.config.max_connections,
                "SSH session limit reached; refusing an authenticated login"
            );
            return Ok(self
                .reject_key(AuthFailure::GatewayFull, user, key.public_key)
                .await);
        };
        self.pending = Some(AuthInfo {
            lease: rec.hash,
            _session: session,
        });
        self.lease = Some(rec);
        Ok(Auth::Accept)
    }

    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        certificate: &Certificate,
    ) -> Result<Auth, Self::Error> {
        let key = PublicKey::new(certificate.public_key().clone(), "");
        Ok(self.reject_key(AuthFailure::WrongKeyType, user, &key).await)
    }

    async fn auth_succeeded(&mut self, _session: &mut Session) -> Result<(), Self::Error> {
        if let Some(info) = self.pending.take() {
            self.span.record("lease", info.lease.short());
            self.shared.stats.record_auth_success();
            info!(parent: &self.span, peer = %self.peer, "authenticated");
            if let Some(tx) = self.auth_tx.take() {
                let _ = tx.send(info);
            }
        }
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(ctx) = self.channel_ctx(session, "session") else {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        };
        self.sessions.insert(channel.id());
        reply.accept().await;
        self.spawn(super::session::session(channel, ctx));
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(lease) = &self.lease
            && !channel::is_vm_ssh_target(&lease.hash, host_to_connect, port_to_connect)
        {
            self.shared.stats.record_channel_refused();
            info!(
                parent: &self.span,
                requested = %format!("{}:{port_to_connect}", loggable(host_to_connect)),
                "direct-tcpip to something other than the VM's SSH; refusing"
            );
            let reason =
                channel::target_refusal(&lease.hash, host_to_connect, port_to_connect, self.local);
            reply
                .reject(ChannelOpenFailure::Other {
                    code: ChannelOpenFailure::AdministrativelyProhibited.code(),
                    reason,
                })
                .await;
            return Ok(());
        }
        let Some(ctx) = self.channel_ctx(session, "direct-tcpip") else {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        };
        self.spawn(channel::direct_tcpip(channel, reply, ctx));
        Ok(())
    }

    async fn channel_open_x11(
        &mut self,
        _channel: Channel<Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse_channel(reply, "x11").await;
        Ok(())
    }

    async fn channel_open_forwarded_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        _host_to_connect: &str,
        _port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse_channel(reply, "forwarded-tcpip").await;
        Ok(())
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        _socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse_channel(reply, "direct-streamlocal").await;
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.sessions.remove(&channel);
        self.started.remove(&channel);
        Ok(())
    }

    // Session requests: the channel task sees the same messages and acts;
    // replies are sent here, in order, as the protocol wants.

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ok = self.is_session(channel) && !self.started.contains(&channel);
        Self::reply(session, channel, ok)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        _variable_name: &str,
        _variable_value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ok = self.is_session(channel) && !self.started.contains(&channel);
        Self::reply(session, channel, ok)
    }

    async fn agent_request(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(self.is_session(channel) && !self.started.contains(&channel))
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ok = self.is_session(channel) && self.started.insert(channel);
        Self::reply(session, channel, ok)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ok = self.is_session(channel) && self.started.insert(channel);
        Self::reply(session, channel, ok)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Accepted like exec: the channel task runs it in the VM or, without
        // an agent, tells the user how to reach sftp instead (a refused
        // request would only print "subsystem request failed").
        debug!(parent: &self.span, subsystem = %loggable(name), "subsystem requested");
        let ok = self.is_session(channel) && self.started.insert(channel);
        Self::reply(session, channel, ok)
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ok = self.is_session(channel);
        Self::reply(session, channel, ok)
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        info!(parent: &self.span, address = %loggable(address), port = *port, "refusing tcpip-forward");
        Ok(false)
    }

    async fn cancel_tcpip_forward(
        &mut self,
        _address: &str,
        _port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(false)
    }

    async fn streamlocal_forward(
        &mut self,
        _socket_path: &str,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        info!(parent: &self.span, "refusing streamlocal-forward");
        Ok(false)
    }

    async fn cancel_streamlocal_forward(
        &mut self,
        _socket_path: &str,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(false)
    }
}
