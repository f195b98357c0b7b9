//! The task that owns one connection's life: the SSH handshake under the
//! grace time, then waiting for the end — the client leaving, the grace
//! time without authentication, the lease ending or expiring, shutdown —
//! and closing the connection with a reason.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use russh::Disconnect;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, info};
use xe_store::Inactive;

use super::Shared;
use super::auth;
use super::conn::{AuthInfo, ConnHandler};
use super::pump::Killable;
use super::startups::Startup;
use super::stats::ConnectionRefusal;

/// How long a closing connection gets to deliver its disconnect message,
/// and then to finish, before its transport is cut. Two of these stay well
/// inside the promise that an ended lease's connections close within 1 s.
const DISCONNECT_GRACE: Duration = Duration::from_millis(250);

/// Why the connection task ended the connection.
#[derive(Debug)]
enum End {
    Closed(Option<String>),
    GraceExpired,
    LeaseEnded(&'static str),
    Shutdown,
}

/// Serve one accepted TCP connection until it ends. Holds its `startup`
/// slot until it authenticates; a session slot (one of `max_connections`)
/// is taken at authentication and held from then on.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    startup: Startup,
    shutdown: CancellationToken,
) {
    let conn_id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("ssh", conn = conn_id, %peer, lease = tracing::field::Empty);
    serve_inner(shared, tcp, peer, startup, shutdown, span.clone())
        .instrument(span)
        .await;
}

async fn serve_inner(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    startup: Startup,
    shutdown: CancellationToken,
    span: Span,
) {
    let grace = startup.grace;
    let mut startup_slot = Some(startup.slot);
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
    let channels_token = shutdown.child_token();
    let _channels_guard = channels_token.clone().drop_guard();
    let (auth_tx, mut auth_rx) = oneshot::channel();
    let handle_slot = Arc::new(OnceLock::new());
    let handler = ConnHandler::new(
        shared.clone(),
        peer,
        local,
        span,
        channels_token.clone(),
        auth_tx,
        handle_slot.clone(),
    );

    let grace_deadline = Instant::now() + grace;
    // A source over its connection rate waits here, before the key
    // exchange, holding only its startup slot (of which it has few).
    let mut paced = false;
    loop {
        let wait = shared.startups.pace(peer.ip());
        if wait.is_zero() {
            break;
        }
        if !paced {
            paced = true;
            shared.stats.record_paced();
            debug!(
                ?wait,
                "connection rate of this source exceeded; pacing its key exchange"
            );
        }
        if Instant::now() + wait >= grace_deadline {
            shared.stats.record_refusal(ConnectionRefusal::AuthTimeout);
            return;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
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
            info!(
                ?grace,
                "no SSH version exchange within the grace time; closing"
            );
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
    // Once authenticated: ends when the lease stops granting access
    // (settled, cancelled, declined, or its time is up).
    let mut lease_end: Option<Pin<Box<dyn Future<Output = Inactive> + Send>>> = None;
    let end = loop {
        tokio::select! {
            r = &mut session => break End::Closed(r.err().map(|e| e.to_string())),
            a = &mut auth_rx, if auth_pending => {
                auth_pending = false;
                if let Ok(info) = a {
                    let store = shared.store.clone();
                    let lease = info.lease;
                    lease_end = Some(Box::pin(async move { store.until_inactive(&lease).await }));
                    authed = Some(info);
                    // A session now (it holds a session slot): no longer
                    // one of the unauthenticated.
                    drop(startup_slot.take());
                }
            }
            _ = tokio::time::sleep_until(grace_deadline), if authed.is_none() => break End::GraceExpired,
            why = async { lease_end.as_mut().expect("guarded").await }, if lease_end.is_some() => {
                break End::LeaseEnded(auth::failure_of(why).as_str());
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
            info!(?grace, "not authenticated within the grace time; closing");
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
