//! One client connection: the russh [`Handler`] (authentication, channel
//! opens, request replies) and the task that owns the connection's life
//! (grace time, lease end, expiry, shutdown).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use russh::keys::Certificate;
use russh::keys::ssh_key::PublicKey;
use russh::server::{
    Auth, ChannelOpenHandle, Handler, Msg, PublicKeyOffer, Session, VerifiedPublicKey,
};
use russh::{Channel, ChannelId, ChannelOpenFailure, Disconnect, Pty};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, info, warn};
use xe_store::{LeaseHash, LeaseRecord};

use super::Shared;
use super::auth::{self, loggable};
use super::channel::{self, ChannelCtx, ChannelSlot};
use super::pump::Killable;
use super::refusal::{Refusals, Verdict};
use super::registry::Registration;
use super::stats::{AuthFailure, ConnectionRefusal};

/// How long a closing connection gets to deliver its disconnect message,
/// and then to finish, before its transport is cut. Two of these stay well
/// inside the promise that an ended lease's connections close within 1 s.
const DISCONNECT_GRACE: Duration = Duration::from_millis(250);

/// Longest wait armed for a lease's expiry; re-armed when reached. Keeps
/// `Instant` arithmetic far from overflow for absurd expiry times.
const MAX_EXPIRY_WAIT: Duration = Duration::from_secs(24 * 3600);

/// What the handler tells the connection task when authentication succeeds.
struct AuthInfo {
    lease: LeaseHash,
    expires_at: Option<u64>,
    /// Kept for the connection's life; dropping it unregisters.
    _registration: Registration,
}

/// The russh handler of one connection.
pub(crate) struct ConnHandler {
    shared: Arc<Shared>,
    conn_id: u64,
    peer: SocketAddr,
    local: SocketAddr,
    span: Span,
    /// Cancelled by the registry when the lease ends.
    kill: CancellationToken,
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
        // Register, then look again: a lease that ends before this line is
        // caught by the second read, one that ends after it by the watcher.
        let registration = self
            .shared
            .registry
            .register(rec.hash, self.conn_id, self.kill.clone());
        let rec = match auth::active_lease(&self.shared.store, &rec.hash) {
            Ok(rec) => rec,
            Err(reason) => return Ok(self.reject_key(reason, user, key.public_key).await),
        };
        self.pending = Some(AuthInfo {
            lease: rec.hash,
            expires_at: rec.expires_at(),
            _registration: registration,
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
        self.spawn(channel::session(channel, ctx));
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

/// Why the connection task ended the connection.
#[derive(Debug)]
enum End {
    Closed(Option<String>),
    GraceExpired,
    LeaseEnded(&'static str),
    Shutdown,
}

/// An `Instant` for a unix time in seconds (now, if it has passed).
fn instant_for_unix(secs: u64) -> Instant {
    let target = UNIX_EPOCH + Duration::from_secs(secs);
    let wait = target
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    Instant::now() + wait.min(MAX_EXPIRY_WAIT)
}

/// Serve one accepted TCP connection until it ends. Holds `permit` (one of
/// `max_connections`) for its whole life.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    shutdown: CancellationToken,
) {
    let conn_id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("ssh", conn = conn_id, %peer, lease = tracing::field::Empty);
    serve_inner(shared, tcp, peer, permit, shutdown, conn_id, span.clone())
        .instrument(span)
        .await;
}

async fn serve_inner(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    shutdown: CancellationToken,
    conn_id: u64,
    span: Span,
) {
    let _permit = permit;
    let _active = shared.stats.connection_opened();
    let local = match tcp.local_addr() {
        Ok(a) => a,
        Err(e) => {
            debug!(error = %e, "connection gone before it was served");
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    debug!("connection accepted");

    // Cutting the transport is the last resort that always ends russh's
    // session task; the guard does it whenever this function returns.
    let transport = CancellationToken::new();
    let _transport_guard = transport.clone().drop_guard();
    let kill = CancellationToken::new();
    let channels_token = shutdown.child_token();
    let _channels_guard = channels_token.clone().drop_guard();
    let (auth_tx, mut auth_rx) = oneshot::channel();
    let handle_slot = Arc::new(OnceLock::new());
    let handler = ConnHandler {
        shared: shared.clone(),
        conn_id,
        peer,
        local,
        span,
        kill: kill.clone(),
        channels_token: channels_token.clone(),
        auth_tx: Some(auth_tx),
        pending: None,
        lease: None,
        channel_count: Arc::new(AtomicUsize::new(0)),
        sessions: HashSet::new(),
        started: HashSet::new(),
        refusals: Refusals::new(handle_slot.clone(), shared.config.max_auth_attempts),
    };

    let grace_deadline = Instant::now() + shared.config.auth_grace;
    let started = tokio::select! {
        _ = shutdown.cancelled() => return,
        r = tokio::time::timeout_at(
            grace_deadline,
            russh::server::run_stream(shared.russh.clone(), Killable::new(tcp, transport.clone()), handler),
        ) => r,
    };
    let session = match started {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            shared.stats.record_refusal(ConnectionRefusal::Handshake);
            info!(error = %e, "SSH version exchange failed; closing");
            return;
        }
        Err(_) => {
            shared.stats.record_refusal(ConnectionRefusal::AuthTimeout);
            info!(grace = ?shared.config.auth_grace, "no SSH version exchange within the grace time; closing");
            return;
        }
    };
    let handle = session.handle();
    // Before any authentication request can arrive (that takes the key
    // exchange's round trips), so a refusal can always be sent.
    let _ = handle_slot.set(handle.clone());
    tokio::pin!(session);

    let mut authed: Option<AuthInfo> = None;
    let mut auth_pending = true;
    let mut expiry: Option<Instant> = None;
    let end = loop {
        tokio::select! {
            r = &mut session => break End::Closed(r.err().map(|e| e.to_string())),
            a = &mut auth_rx, if auth_pending => {
                auth_pending = false;
                if let Ok(info) = a {
                    expiry = info.expires_at.map(instant_for_unix);
                    authed = Some(info);
                }
            }
            _ = tokio::time::sleep_until(grace_deadline), if authed.is_none() => break End::GraceExpired,
            _ = tokio::time::sleep_until(expiry.unwrap_or(grace_deadline)), if expiry.is_some() => {
                // Look again rather than trust the timer: the state decides.
                let Some(info) = &authed else { break End::LeaseEnded("expired") };
                match auth::active_lease(&shared.store, &info.lease) {
                    Ok(rec) => {
                        let next = rec.expires_at().map(instant_for_unix);
                        // Never spin: re-arm at least a little in the future.
                        let floor = Instant::now() + Duration::from_millis(100);
                        expiry = next.map(|t| t.max(floor));
                    }
                    Err(reason) => break End::LeaseEnded(reason.as_str()),
                }
            }
            _ = kill.cancelled() => {
                let why = authed
                    .as_ref()
                    .and_then(|i| auth::active_lease(&shared.store, &i.lease).err())
                    .map(|r| r.as_str())
                    .unwrap_or("lease_ended");
                break End::LeaseEnded(why);
            }
            _ = shutdown.cancelled() => break End::Shutdown,
        }
    };

    let message = match &end {
        End::Closed(err) => {
            info!(error = ?err, "connection closed");
            return;
        }
        End::GraceExpired => {
            shared.stats.record_refusal(ConnectionRefusal::AuthTimeout);
            info!(grace = ?shared.config.auth_grace, "not authenticated within the grace time; closing");
            "authentication timed out".to_string()
        }
        End::LeaseEnded(why) => {
            shared.stats.record_lease_disconnect();
            info!(reason = %why, "lease no longer grants access; closing the connection");
            format!("the lease no longer grants access ({why})")
        }
        End::Shutdown => {
            info!("gateway shutting down; closing the connection");
            "the gateway is shutting down".to_string()
        }
    };
    // Stop the channel tasks first: their tunnels close, and russh can no
    // longer be blocked on a channel nobody reads.
    channels_token.cancel();
    let _ = tokio::time::timeout(
        DISCONNECT_GRACE,
        handle.disconnect(Disconnect::ByApplication, message, "en".into()),
    )
    .await;
    if tokio::time::timeout(DISCONNECT_GRACE, &mut session)
        .await
        .is_err()
    {
        debug!("client did not close after the disconnect; cutting the connection");
    }
    // `_transport_guard` cuts the transport on return.
}
