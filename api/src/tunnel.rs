//! `POST /tunnel/{leaseHash}/tcp`: the seed's HTTP tunnel endpoint.
//!
//! Checks, in order, each with its status:
//!
//! | check | status |
//! |---|---|
//! | path holds a 64-hex lease hash | 400 |
//! | `X-Signature` present | 401 |
//! | `X-Signature` is 128 hex; `X-Timestamp`, `X-Nonce`, `X-Node` (if any) parse | 400 |
//! | the fresh form when the node requires it; all three of its headers | 401 |
//! | `X-Node` is this node's peer id | 401 |
//! | the lease is known | 404 |
//! | the signature verifies against the lease's access key | 403 |
//! | the timestamp is within ±60 s of this node's clock | 401 |
//! | the nonce was not used here before (and the lease's share of the nonce table is not full) | 401 (429) |
//! | the lease is accepted and not settled, cancelled or expired | 410 |
//! | `Connection: Upgrade` and `Upgrade: xe-tunnel`, on HTTP/1.1 | 426 |
//! | fewer than `max_tunnels` HTTP tunnels are open | 503 |
//! | the provider's `/xe/tunnel/2.0.0` handshake answers `0x00` | 502, with the provider's message |
//!
//! Then `101 Switching Protocols` and the connection is a raw byte pipe to
//! the VM's sshd. The tunnel is opened before the 101 is sent, so a client
//! that sees 101 knows the provider accepted. When this node is itself the
//! lease's provider, the VM is dialled in-process (same validation).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::{Instrument, debug, info, warn};
use xe_node::gateway::TunnelDialer;
use xe_store::{LeaseHash, Sig, now_secs};

use crate::App;
use crate::auth::{
    Freshness, NODE_HEADER, NONCE_HEADER, NonceRefusal, SIGNATURE_HEADER, TIMESTAMP_HEADER,
    TIMESTAMP_WINDOW, UPGRADE_PROTOCOL, signing_message,
};
use crate::error::HttpError;

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, HttpError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim()))
            .map_err(|_| HttpError::bad_request(format!("{name}: not visible ASCII"))),
    }
}

/// The fresh form's headers, parsed and checked against this node; `None`
/// for the seed's timeless form (refused when the node requires fresh).
fn freshness(app: &App, headers: &HeaderMap) -> Result<Option<Freshness>, HttpError> {
    let ts = header_str(headers, TIMESTAMP_HEADER)?;
    let nonce = header_str(headers, NONCE_HEADER)?;
    let node = header_str(headers, NODE_HEADER)?;
    let unauthorized = |m: String| HttpError::new(StatusCode::UNAUTHORIZED, m);
    let (ts, nonce, node) = match (ts, nonce, node) {
        (None, None, None) if app.config.require_fresh => {
            return Err(unauthorized(
                "this node requires the fresh X-Signature form (X-Timestamp, X-Nonce, X-Node: bound to this node, used once); the timeless form is refused".into(),
            ));
        }
        (None, None, None) => return Ok(None),
        (Some(ts), Some(nonce), Some(node)) => (ts, nonce, node),
        _ => {
            return Err(unauthorized(
                "the fresh X-Signature form needs all of X-Timestamp (unix seconds), X-Nonce (32 hex digits) and X-Node (this node's peer id, from GET /node); an older xe sends X-Timestamp alone: update it".into(),
            ));
        }
    };
    let timestamp = ts.parse::<u64>().map_err(|_| {
        HttpError::bad_request(format!("X-Timestamp: expected unix seconds, got {ts:?}"))
    })?;
    let mut n = [0u8; 16];
    hex::decode_to_slice(nonce, &mut n).map_err(|_| {
        HttpError::bad_request(format!(
            "X-Nonce: expected 32 hex digits, got {:?}",
            xe_store::human::echo(nonce)
        ))
    })?;
    let me = app.ctx.net.peer_id().to_string();
    if node != me {
        return Err(unauthorized(format!(
            "X-Node {:?} is not this node ({me}): a fresh X-Signature opens a tunnel only at the node it was signed for",
            xe_store::human::echo(node)
        )));
    }
    Ok(Some(Freshness {
        timestamp,
        nonce: n,
        node: me,
    }))
}

/// Whether a comma-separated header lists `token` (case-insensitive).
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn upgrade_required(msg: impl Into<String>) -> HttpError {
    HttpError::new(StatusCode::UPGRADE_REQUIRED, msg)
        .with_header(header::UPGRADE, HeaderValue::from_static(UPGRADE_PROTOCOL))
        .with_header(header::CONNECTION, HeaderValue::from_static("Upgrade"))
}

pub(crate) async fn tunnel(
    State(app): State<App>,
    Path(raw): Path<String>,
    req: Request,
) -> Response {
    match open(&app, &raw, req).await {
        Ok(resp) => resp,
        Err(e) => {
            app.stats.record_tunnel_refusal(e.status.as_u16());
            debug!(status = %e.status, error = %e.message, "HTTP tunnel refused");
            e.into_response()
        }
    }
}

async fn open(app: &App, raw: &str, mut req: Request) -> Result<Response, HttpError> {
    let lease: LeaseHash = raw
        .parse()
        .map_err(|e| HttpError::bad_request(format!("{e}")))?;
    let headers = req.headers();
    let sig = header_str(headers, SIGNATURE_HEADER)?.ok_or_else(|| {
        HttpError::new(
            StatusCode::UNAUTHORIZED,
            "missing X-Signature: hex ed25519 signature of the lease hash bytes by the lease's access key",
        )
    })?;
    let sig: Sig = sig
        .parse()
        .map_err(|e| HttpError::bad_request(format!("X-Signature: {e}")))?;
    let fresh = freshness(app, headers)?;
    let rec = app
        .ctx
        .store
        .lease(&lease)?
        .ok_or_else(|| HttpError::not_found(format!("unknown lease {lease}")))?;
    if !rec
        .lease
        .access_pub_key
        .verify(&signing_message(&lease, fresh.as_ref()), &sig)
    {
        return Err(HttpError::new(
            StatusCode::FORBIDDEN,
            match fresh {
                None => {
                    "X-Signature does not verify against the lease's access key (expected a signature of the 32 lease hash bytes)"
                }
                Some(_) => {
                    "X-Signature does not verify against the lease's access key (expected a signature of \"xe/tunnel/v2\" ‖ lease hash ‖ X-Timestamp u64 big-endian ‖ X-Nonce bytes ‖ X-Node)"
                }
            },
        ));
    }
    if let Some(f) = &fresh {
        let now = now_secs();
        let off = now.abs_diff(f.timestamp);
        if off > TIMESTAMP_WINDOW.as_secs() {
            let dir = if f.timestamp < now {
                "old"
            } else {
                "in the future"
            };
            return Err(HttpError::new(
                StatusCode::UNAUTHORIZED,
                format!(
                    "X-Timestamp {} is {off} s {dir} by this node's clock (allowed ±{} s); sign a fresh one",
                    f.timestamp,
                    TIMESTAMP_WINDOW.as_secs()
                ),
            ));
        }
        // Only a signature that checked out takes a place in the table.
        app.seen_nonces
            .remember(&lease, f.nonce, f.timestamp, now)
            .map_err(|e| {
                let status = match e {
                    NonceRefusal::Replayed => StatusCode::UNAUTHORIZED,
                    NonceRefusal::LeaseBusy | NonceRefusal::Full => StatusCode::TOO_MANY_REQUESTS,
                };
                HttpError::new(status, e.to_string())
            })?;
    }
    rec.access()
        .map_err(|why| HttpError::new(StatusCode::GONE, format!("lease is not active: {why}")))?;
    let headers = req.headers();
    if req.version() != Version::HTTP_11 {
        return Err(upgrade_required(format!(
            "the tunnel needs an HTTP/1.1 upgrade; this request is {:?}",
            req.version()
        )));
    }
    if !has_token(headers, header::CONNECTION, "upgrade")
        || !has_token(headers, header::UPGRADE, UPGRADE_PROTOCOL)
    {
        return Err(upgrade_required(format!(
            "send `Connection: Upgrade` and `Upgrade: {UPGRADE_PROTOCOL}`"
        )));
    }
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return Err(upgrade_required("this connection cannot be upgraded"));
    };
    let client_ip = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map_or(std::net::IpAddr::from([127, 0, 0, 1]), |c| c.0.ip());
    let permit = app.tunnels.admit(client_ip).map_err(|e| {
        let status = match e {
            xe_node::limits::ConnRefusal::SourceFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            xe_node::limits::ConnRefusal::Full { .. } => StatusCode::SERVICE_UNAVAILABLE,
        };
        HttpError::new(status, e.to_string())
    })?;
    let provider = rec.lease.provider;
    let bad_gateway = |e: String| {
        HttpError::new(
            StatusCode::BAD_GATEWAY,
            format!("tunnel to the provider failed: {e}"),
        )
    };
    // The gateway's way to the VM: in-process when this node is the
    // provider, else the overlay.
    let mut vm = app
        .ctx
        .vm_dialer
        .open(&rec)
        .await
        .map_err(|e| bad_gateway(e.to_string()))?;
    let token = app.cancel.child_token();

    let guard = app.stats.tunnel_opened();
    let store = app.ctx.store.clone();
    let up = app.stats.bytes_client_to_vm.clone();
    let down = app.stats.bytes_vm_to_client.clone();
    let span =
        tracing::info_span!("http_tunnel", lease = %lease.short(), provider = %provider.short());
    app.tracker.spawn(
        async move {
            let _permit = permit;
            let _guard = guard;
            let upgraded = tokio::select! {
                u = on_upgrade => match u {
                    Ok(u) => u,
                    Err(e) => { warn!("upgrade failed: {e}"); return; }
                },
                () = token.cancelled() => return,
            };
            info!("HTTP tunnel open");
            let mut client = Counted {
                inner: TokioIo::new(upgraded),
                read: up,
                written: down,
            };
            // The same copy loop as provider tunnels: buffers grow only
            // while bulk data flows, so idle tunnels stay small.
            // The lease's end closes the tunnel here too, whichever path
            // it took (the provider closes its side; this one must not wait
            // for that).
            let copied = tokio::select! {
                r = xe_net::tunnel::pipe(&mut client, &mut vm, &token) => r,
                why = store.until_inactive(&lease) => {
                    info!(lease_is = %why, "HTTP tunnel closed: the lease ended");
                    return;
                }
            };
            if token.is_cancelled() {
                info!("HTTP tunnel closed: the node is stopping");
                return;
            }
            match copied {
                Ok((a, b)) => info!(client_to_vm = a, vm_to_client = b, "HTTP tunnel closed"),
                Err(e) => info!("HTTP tunnel ended: {e}"),
            }
        }
        .instrument(span),
    );
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    resp.headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static(UPGRADE_PROTOCOL));
    Ok(resp)
}

/// Counts bytes read from and written to the client as they pass, so
/// `/metrics` moves during a long session, not only when it ends.
struct Counted<T> {
    inner: T,
    read: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
