//! xe-api: a node's HTTP API and the `X-Signature` HTTP-upgrade tunnel.
//!
//! `xe node --api-port PORT` (or `--api-listen IP:PORT`) serves it; the
//! `xe lease`, `xe providers` and `xe tunnel` commands are its clients.
//!
//! | route | what |
//! |---|---|
//! | `GET /health` | liveness: always 200 while serving; peers and each bootstrap address's status |
//! | `GET /ready` | readiness: 200 `{"ready":true,…}` once listening and (if given `--bootstrap`) connected to a bootstrap peer; else 503 with `reason` naming each address and its last cause |
//! | `GET /node` | peer id, account, listen addresses, ports, peers, roles |
//! | `GET /leases[?state=&consumer=&provider=]` | leases in the local ledger copy |
//! | `GET /leases/{hash}[?wait=SECS&since=STATE]` | one lease; with `wait`, a long poll that answers once the state differs from `since` |
//! | `POST /leases` | submit a signed lease event (201 / 200 duplicate / 202 pending / 400 naming the failed check) |
//! | `GET /providers` | directory entries |
//! | `GET /vms`, `GET /vms/{lease}` | providers: VM status, errors, why a lease was declined (503 during start-up recovery) |
//! | `GET /metrics` | Prometheus text exposition |
//! | `POST /tunnel/{hash}/tcp` | HTTP upgrade to a byte pipe to the lease VM's sshd (see [`auth`]) |
//!
//! Every error is `{"error": "…"}`. Request bodies are capped
//! ([`ApiConfig::max_body_bytes`], 413) and write requests are rate limited
//! per client IP ([`ApiConfig::write_rate`], 429 with `Retry-After`).
//!
//! # Layout
//! - this file: [`ApiContext`], [`ApiConfig`], [`serve`] (the accept loop).
//! - [`auth`]: the `X-Signature` / `X-Timestamp` scheme, shared with the client.
//! - `routes.rs`: the JSON handlers; `tunnel.rs`: the upgrade endpoint;
//!   `metrics.rs`: the exposition; per-source connection caps and token buckets live in `xe_node::limits` (the gateway counts clients the same way).
//! - [`types`]: the JSON bodies, shared by server and client.
//! - [`client`]: the HTTP client used by the CLI, including [`client::forward`]
//!   behind `xe tunnel`.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tracing::{Instrument, debug, info, warn};
use xe_net::NetHandle;
use xe_node::Node;
use xe_node::Provider;
use xe_node::gateway::GatewayStats;
use xe_store::{AccountAddress, Store};

pub mod auth;
pub mod client;
mod error;
pub mod metrics;
mod routes;
pub mod stats;
mod tunnel;
pub mod types;

pub use error::ApiError;
pub use stats::ApiStats;
pub use xe_node::limits::{ConnLimits, ConnRefusal, RateLimit, Source};

/// Default cap on concurrent HTTP tunnels (the seed's maxSSHConnections).
pub const DEFAULT_MAX_TUNNELS: usize = 100;
/// Default cap on the HTTP tunnels one source may hold: a consumer's
/// `xe tunnel` with a few dozen sessions, never the node's whole budget.
pub const DEFAULT_MAX_TUNNELS_PER_SOURCE: usize = 32;
/// Default cap on open HTTP connections (tunnels excluded once upgraded).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default cap on the connections one source (an IPv4 address, an IPv6
/// /64) may hold: a CLI needs a handful, `xe tunnel` one per session being
/// set up; one client must never hold them all.
pub const DEFAULT_MAX_CONNECTIONS_PER_SOURCE: usize = 64;
/// Of the connection cap, the last this many go only to sources holding
/// none: with everyone else saturated, a newcomer still gets in.
pub const DEFAULT_CONNECTION_RESERVE: usize = 64;
/// How long a client may take to send a request's body, once its headers
/// are in. Without it a client that sends a byte now and then holds its
/// connection for ever.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default request body cap. A signed lease event is under 2 KiB; this
/// matches the overlay's gossip message cap.
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024;
/// How long a client may take to send a request's headers. Without it a
/// client that opens connections and sends nothing holds them forever.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for open requests and tunnels before dropping them.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Longest `?wait=` a lease long poll may ask for.
pub const MAX_LEASE_WAIT: Duration = Duration::from_secs(60);

/// What the API reads from the node.
#[derive(Clone)]
pub struct ApiContext {
    /// The ledger.
    pub store: Store,
    /// The overlay host (publishing events, opening tunnels, peers).
    pub net: NetHandle,
    /// The node's account address.
    pub account: AccountAddress,
    /// The provider role, if the node has it (`GET /vms`).
    pub provider: Option<Arc<Provider>>,
    /// The SSH gateway's address, if enabled.
    pub ssh_addr: Option<SocketAddr>,
    /// The SSH gateway's counters, if enabled (`GET /metrics`).
    pub gateway_stats: Option<Arc<GatewayStats>>,
    /// How the node reaches a lease's VM (the HTTP tunnel's way too).
    pub vm_dialer: Arc<xe_node::vm_dialer::VmDialer>,
}

impl ApiContext {
    /// Everything the API needs from a running node.
    pub fn from_node(node: &Node) -> Self {
        ApiContext {
            store: node.store.clone(),
            net: node.net.clone(),
            account: node.wallet.address(),
            provider: node.provider.clone(),
            ssh_addr: node.ssh_addr,
            gateway_stats: node.gateway_stats.clone(),
            vm_dialer: node.vm_dialer.clone(),
        }
    }
}

/// API limits and policy.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Refuse the seed's timeless `X-Signature` form: require `X-Timestamp`
    /// (`xe node --http-tunnel-require-fresh`).
    pub require_fresh: bool,
    /// Concurrent HTTP tunnels; beyond this, 503.
    pub max_tunnels: usize,
    /// Concurrent HTTP tunnels one source may hold; beyond this, 429.
    pub max_tunnels_per_source: usize,
    /// Concurrent HTTP connections; beyond this a new connection gets a
    /// short 503 and is closed.
    pub max_connections: usize,
    /// See [`DEFAULT_MAX_CONNECTIONS_PER_SOURCE`].
    pub max_connections_per_source: usize,
    /// See [`DEFAULT_CONNECTION_RESERVE`].
    pub connection_reserve: usize,
    /// See [`DEFAULT_BODY_READ_TIMEOUT`].
    pub body_read_timeout: Duration,
    /// Request body cap in bytes; beyond this, 413.
    pub max_body_bytes: usize,
    /// Per-client-IP budget for write requests (anything but GET/HEAD).
    pub write_rate: RateLimit,
    /// See [`DEFAULT_HEADER_READ_TIMEOUT`].
    pub header_read_timeout: Duration,
    /// See [`DEFAULT_SHUTDOWN_GRACE`].
    pub shutdown_grace: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            require_fresh: false,
            max_tunnels: DEFAULT_MAX_TUNNELS,
            max_tunnels_per_source: DEFAULT_MAX_TUNNELS_PER_SOURCE,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_source: DEFAULT_MAX_CONNECTIONS_PER_SOURCE,
            connection_reserve: DEFAULT_CONNECTION_RESERVE,
            body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            write_rate: RateLimit::default(),
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

/// Shared by every handler.
pub(crate) struct AppInner {
    pub(crate) ctx: ApiContext,
    pub(crate) config: ApiConfig,
    pub(crate) api_addr: SocketAddr,
    pub(crate) limiter: xe_node::limits::RateLimiter,
    pub(crate) tunnels: xe_node::limits::ConnTable,
    pub(crate) conns: xe_node::limits::ConnTable,
    /// Nonces of fresh tunnel signatures already used here.
    pub(crate) seen_nonces: auth::SeenNonces,
    pub(crate) stats: Arc<ApiStats>,
    /// Tunnel pipes outlive their request; shutdown waits for them here.
    pub(crate) tracker: TaskTracker,
    pub(crate) cancel: CancellationToken,
}

pub(crate) type App = Arc<AppInner>;

/// A running API's handle on its counters (for tests and embedding).
#[derive(Clone)]
pub struct ApiHandle {
    stats: Arc<ApiStats>,
}

impl ApiHandle {
    /// The API's counters.
    pub fn stats(&self) -> &ApiStats {
        &self.stats
    }
}

/// Serve the API on `listener` until `cancel` fires, then stop accepting,
/// let open requests finish and close tunnels within
/// [`ApiConfig::shutdown_grace`]. Accept errors (EMFILE…) are logged and
/// retried, never fatal.
pub async fn serve(
    listener: TcpListener,
    ctx: ApiContext,
    config: ApiConfig,
    cancel: CancellationToken,
) -> Result<(), ApiError> {
    let (handle, fut) = start(listener, ctx, config, cancel)?;
    drop(handle);
    fut.await;
    Ok(())
}

/// Like [`serve`], but returns a handle on the counters and the server
/// future (spawn or await it).
pub fn start(
    listener: TcpListener,
    ctx: ApiContext,
    config: ApiConfig,
    cancel: CancellationToken,
) -> Result<(ApiHandle, impl Future<Output = ()> + Send + 'static), ApiError> {
    let api_addr = listener.local_addr().map_err(ApiError::Listener)?;
    let stats = Arc::new(ApiStats::default());
    let app: App = Arc::new(AppInner {
        limiter: xe_node::limits::RateLimiter::new(config.write_rate),
        tunnels: xe_node::limits::ConnTable::new(
            ConnLimits {
                global: config.max_tunnels,
                per_source: config.max_tunnels_per_source,
                reserve: 0,
            },
            "HTTP tunnels",
        ),
        conns: xe_node::limits::ConnTable::new(
            ConnLimits {
                global: config.max_connections,
                per_source: config.max_connections_per_source,
                reserve: config.connection_reserve,
            },
            "connections",
        ),
        seen_nonces: auth::SeenNonces::default(),
        stats: stats.clone(),
        tracker: TaskTracker::new(),
        cancel: cancel.clone(),
        ctx,
        config,
        api_addr,
    });
    let fut = accept_loop(listener, app);
    Ok((ApiHandle { stats }, fut))
}

/// Tell a refused client why, in one short answer, then close. Bounded in
/// time so a refused client cannot hold even this (it need not read).
fn refuse_connection(tcp: tokio::net::TcpStream, refusal: &ConnRefusal, tracker: &TaskTracker) {
    let body = format!(
        "{{\"error\":{}}}\n",
        serde_json::Value::from(refusal.to_string())
    );
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 5\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    tracker.spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tcp;
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            tcp.write_all(resp.as_bytes()).await?;
            tcp.shutdown().await?;
            // Closing with the client's request still unread would send a
            // reset, and the client would lose the answer: read it away.
            let mut sink = [0u8; 4096];
            while tcp.read(&mut sink).await? > 0 {}
            Ok::<(), std::io::Error>(())
        })
        .await;
    });
}

async fn accept_loop(listener: TcpListener, app: App) {
    let router = routes::router(app.clone());
    let cancel = app.cancel.clone();
    info!(addr = %app.api_addr, require_fresh = app.config.require_fresh, "HTTP API listening");
    let mut backoff = Duration::from_millis(10);
    loop {
        let (tcp, peer) = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => { backoff = Duration::from_millis(10); x }
                Err(e) => {
                    // EMFILE and friends: wait and try again, never give up.
                    warn!(error = %e, ?backoff, "API accept failed; retrying");
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        let permit = match app.conns.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(refusal) => {
                app.stats.record_connection_refused();
                debug!(%peer, "API connection refused: {refusal}");
                refuse_connection(tcp, &refusal, &app.tracker);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let svc = router
            .clone()
            .map_request(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                req.map(Body::new)
            });
        let svc = TowerToHyperService::new(svc);
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(app.config.header_read_timeout);
        let token = cancel.child_token();
        let grace = app.config.shutdown_grace;
        app.tracker.spawn(
            async move {
                let _permit = permit;
                let conn = builder
                    .serve_connection(TokioIo::new(tcp), svc)
                    .with_upgrades();
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r { debug!("connection ended: {e}"); }
                        return;
                    }
                    () = token.cancelled() => conn.as_mut().graceful_shutdown(),
                }
                if tokio::time::timeout(grace, conn).await.is_err() {
                    debug!("request still running at shutdown; dropped");
                }
            }
            .instrument(tracing::debug_span!("api_conn", %peer)),
        );
    }
    app.tracker.close();
    if tokio::time::timeout(
        app.config.shutdown_grace + Duration::from_secs(1),
        app.tracker.wait(),
    )
    .await
    .is_err()
    {
        warn!("API tasks did not stop within the shutdown grace");
    }
    info!("HTTP API stopped");
}
