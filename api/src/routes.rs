//! The JSON routes, the body cap and the write rate limit.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;
use xe_store::{
    AccountAddress, Applied, LeaseEvent, LeaseHash, LeaseRecord, LeaseState, StoreError, now_secs,
};

use crate::error::HttpError;
use crate::types::{LeaseView, NodeInfo, PeerView, ProviderView, ReadyView, SubmitResult, VmView};
use crate::{App, MAX_LEASE_WAIT};

pub(crate) fn router(app: App) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/node", get(node_info))
        .route("/leases", get(list_leases).post(submit_event))
        .route("/leases/{hash}", get(show_lease))
        .route("/providers", get(providers))
        .route("/vms", get(list_vms))
        .route("/vms/{lease}", get(show_vm))
        .route("/metrics", get(crate::metrics::metrics))
        .route("/tunnel/{lease}/tcp", post(crate::tunnel::tunnel))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        // Outermost last: a client over its write budget is refused before
        // its body is read.
        .layer(middleware::from_fn_with_state(app.clone(), body_deadline))
        .layer(middleware::from_fn_with_state(app.clone(), rate_limit))
        .layer(DefaultBodyLimit::max(app.config.max_body_bytes))
        .with_state(app)
}

async fn no_route(method: Method, uri: axum::http::Uri) -> HttpError {
    HttpError::not_found(format!("no route {method} {}", uri.path()))
}

async fn wrong_method(method: Method, uri: axum::http::Uri) -> HttpError {
    HttpError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// A request's body must be in within [`crate::ApiConfig::body_read_timeout`]
/// of its headers: read here, whole (bodies are small, at most
/// `max_body_bytes`), so no handler can be held by a client that trickles
/// bytes. Past the deadline: 408 and the connection is closed.
async fn body_deadline(State(app): State<App>, req: Request, next: Next) -> Response {
    if req.method() == Method::GET || req.method() == Method::HEAD {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    // One more byte than allowed, so an oversized body still reaches the
    // handler's own 413 (and its counter) instead of a second message.
    let limit = app.config.max_body_bytes.saturating_add(1);
    let read = tokio::time::timeout(
        app.config.body_read_timeout,
        axum::body::to_bytes(body, limit),
    )
    .await;
    match read {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
                .await
        }
        Ok(Err(e)) if !is_length_limit(&e) => {
            HttpError::bad_request(format!("reading the request body: {e}")).into_response()
        }
        Ok(Err(_)) => body_too_large(&app).into_response(),
        Err(_) => {
            app.stats.record_body_too_slow();
            HttpError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s of its headers; send it whole",
                    app.config.body_read_timeout.as_secs()
                ),
            )
            .with_header(header::CONNECTION, HeaderValue::from_static("close"))
            .into_response()
        }
    }
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Writes (anything but GET/HEAD) spend one token of the client IP's bucket.
async fn rate_limit(State(app): State<App>, req: Request, next: Next) -> Response {
    if req.method() == Method::GET || req.method() == Method::HEAD {
        return next.run(req).await;
    }
    let ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    if let Some(ip) = ip
        && let Err(wait) = app.limiter.check(ip)
    {
        app.stats.record_rate_limited();
        if req.uri().path().starts_with("/tunnel/") {
            app.stats.record_tunnel_refusal(429);
        }
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let secs = secs.max(1);
        return HttpError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("too many write requests from {ip}; retry in {secs} s"),
        )
        .with_header(header::RETRY_AFTER, HeaderValue::from(secs))
        .into_response();
    }
    next.run(req).await
}

/// Liveness: 200 whenever the process serves, with the bootstrap status
/// for whoever looks (`/ready` is what a probe should gate on).
async fn health(State(app): State<App>) -> Json<serde_json::Value> {
    let view = ready_view(&app);
    Json(serde_json::json!({
        "status": "ok",
        "peers": view.peers,
        "bootstrap": view.bootstrap,
    }))
}

/// Readiness: 200 when the node is ready, else 503 with the reason
/// (see [`xe_net::Readiness`]).
async fn ready(State(app): State<App>) -> (StatusCode, Json<ReadyView>) {
    let view = ready_view(&app);
    let status = if view.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(view))
}

fn ready_view(app: &App) -> ReadyView {
    let net = &app.ctx.net;
    let peers = *net.peer_count().borrow();
    ReadyView::new(&net.readiness(), peers)
}

async fn node_info(State(app): State<App>) -> Result<Json<NodeInfo>, HttpError> {
    let net = &app.ctx.net;
    let listen_addrs = net
        .p2p_addrs()
        .await
        .map_err(|e| HttpError::internal(e.to_string()))?
        .iter()
        .map(ToString::to_string)
        .collect();
    let peers = net
        .peers()
        .await
        .map_err(|e| HttpError::internal(e.to_string()))?
        .into_iter()
        .map(|p| PeerView {
            path: p.path().to_string(),
            peer_id: p.peer_id,
            addrs: p.addrs,
            relayed: p.relayed,
        })
        .collect();
    let mut roles = vec!["replica".to_string()];
    if app.ctx.provider.is_some() {
        roles.push("provider".into());
    }
    if app.ctx.ssh_addr.is_some() {
        roles.push("gateway".into());
    }
    roles.push("api".into());
    Ok(Json(NodeInfo {
        peer_id: net.peer_id().to_string(),
        address: app.ctx.account,
        listen_addrs,
        ssh_port: app.ctx.ssh_addr.map_or(0, |a| a.port()),
        api_port: app.api_addr.port(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        peers,
        roles,
        http_tunnel_require_fresh: app.config.require_fresh,
        reachability: app.ctx.net.reachability().to_string(),
    }))
}

fn query_error(e: QueryRejection) -> HttpError {
    HttpError::bad_request(format!("query string: {}", e.body_text()))
}

#[derive(Debug, Deserialize)]
struct LeasesQuery {
    state: Option<String>,
    consumer: Option<String>,
    provider: Option<String>,
    /// Most leases in one answer ([`LIST_DEFAULT`] if absent).
    limit: Option<usize>,
    /// Continue after this cursor (the previous page's `x-next-after`).
    after: Option<String>,
}

/// Leases in one `GET /leases` answer unless `limit` says otherwise.
const LIST_DEFAULT: usize = 1000;
/// Most leases one answer may carry.
const LIST_MAX: usize = 10_000;
/// Response header with the cursor of the next page, when there may be one.
const NEXT_HEADER: &str = "x-next-after";

fn parse_state(s: &str) -> Result<LeaseState, HttpError> {
    s.parse::<LeaseState>()
        .map_err(|e| HttpError::bad_request(format!("state: {e}")))
}

fn parse_account(what: &str, s: &str) -> Result<AccountAddress, HttpError> {
    s.parse::<AccountAddress>()
        .map_err(|e| HttpError::bad_request(format!("{what}: {e}")))
}

fn parse_lease(s: &str) -> Result<LeaseHash, HttpError> {
    s.parse::<LeaseHash>()
        .map_err(|e| HttpError::bad_request(e.to_string()))
}

/// Shortest lease-hash prefix `GET /leases/{prefix}` resolves: the short
/// form xe prints.
const MIN_PREFIX: usize = 8;

/// A full hash, or a unique prefix of at least [`MIN_PREFIX`] hex digits
/// of a lease this node holds (like git's abbreviated ids).
async fn resolve_lease(app: &App, raw: &str) -> Result<LeaseHash, HttpError> {
    let p = raw.to_ascii_lowercase();
    if p.len() == 64 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
        return parse_lease(raw);
    }
    if p.len() < MIN_PREFIX || p.len() > 64 {
        return Err(HttpError::bad_request(format!(
            "lease {raw:?}: give the 64-hex lease hash or at least its first {MIN_PREFIX} hex digits"
        )));
    }
    let store = app.ctx.store.clone();
    let q = p.clone();
    let found = blocking(move || store.lease_hashes_with_prefix(&q, 6)).await?;
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(HttpError::not_found(format!(
            "no lease here starts with {p} (`xe lease list` shows this node's leases)"
        ))),
        many => Err(HttpError::new(
            StatusCode::CONFLICT,
            format!(
                "lease prefix {p} is ambiguous: it matches {}{}; give more digits",
                many.iter()
                    .take(5)
                    .map(|h| h.to_hex())
                    .collect::<Vec<_>>()
                    .join(", "),
                if many.len() > 5 { ", …" } else { "" }
            ),
        )),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, HttpError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| HttpError::internal(format!("store task failed: {e}")))?
        .map_err(HttpError::from)
}

/// Leases newest first, a page at a time: the store walks its creation
/// index and decodes only what it returns, so a million leases cost one
/// page of memory. The next page's cursor is in the `x-next-after` header.
async fn list_leases(
    State(app): State<App>,
    q: Result<Query<LeasesQuery>, QueryRejection>,
) -> Result<Response, HttpError> {
    let Query(q) = q.map_err(query_error)?;
    let state = q.state.as_deref().map(parse_state).transpose()?;
    let consumer = q
        .consumer
        .as_deref()
        .map(|s| parse_account("consumer", s))
        .transpose()?;
    let provider = q
        .provider
        .as_deref()
        .map(|s| parse_account("provider", s))
        .transpose()?;
    let limit = q.limit.unwrap_or(LIST_DEFAULT);
    if !(1..=LIST_MAX).contains(&limit) {
        return Err(HttpError::bad_request(format!(
            "limit: {limit} not in 1..={LIST_MAX}"
        )));
    }
    let after = q
        .after
        .as_deref()
        .map(|s| {
            s.parse::<xe_store::LeaseCursor>()
                .map_err(|e| HttpError::bad_request(format!("after: {e}")))
        })
        .transpose()?;
    let store = app.ctx.store.clone();
    let now = now_secs();
    let (records, next) = blocking(move || {
        store.leases_newest_first(after.as_ref(), limit, |r| {
            state.is_none_or(|s| r.state_at(now) == s)
                && consumer.is_none_or(|c| r.lease.consumer_address() == c)
                && provider.is_none_or(|p| r.lease.provider == p)
        })
    })
    .await?;
    let out: Vec<LeaseView> = records
        .iter()
        .map(|r| LeaseView::from_record(r, now))
        .collect();
    let mut resp = Json(out).into_response();
    if let Some(c) = next
        && let Ok(v) = HeaderValue::from_str(&c.to_string())
    {
        resp.headers_mut().insert(NEXT_HEADER, v);
    }
    Ok(resp)
}

#[derive(Debug, Deserialize)]
struct ShowQuery {
    wait: Option<String>,
    since: Option<String>,
}

async fn show_lease(
    State(app): State<App>,
    Path(raw): Path<String>,
    q: Result<Query<ShowQuery>, QueryRejection>,
) -> Result<Json<LeaseView>, HttpError> {
    let hash = resolve_lease(&app, &raw).await?;
    let Query(q) = q.map_err(query_error)?;
    let wait = match q.wait.as_deref() {
        None => None,
        Some(w) => Some(
            w.parse::<u64>()
                .map(|s| Duration::from_secs(s).min(MAX_LEASE_WAIT))
                .map_err(|_| {
                    HttpError::bad_request(format!("wait: expected whole seconds, got {w:?}"))
                })?,
        ),
    };
    let since = q.since.as_deref().map(parse_state).transpose()?;
    // Subscribe before reading, so a change in between is not missed.
    let mut changes = app.ctx.store.subscribe();
    let read = |store: xe_store::Store| async move {
        blocking(move || store.lease(&hash))
            .await?
            .ok_or_else(|| HttpError::not_found(format!("unknown lease {hash}")))
    };
    let Some(wait) = wait else {
        let rec: LeaseRecord = read(app.ctx.store.clone()).await?;
        return Ok(Json(LeaseView::from_record(&rec, now_secs())));
    };
    // A long poll also waits for a lease this node has not heard of yet:
    // right after `create` on another node, gossip may still be on its way.
    let first = {
        let store = app.ctx.store.clone();
        blocking(move || store.lease(&hash)).await?
    };
    let since = since.or(first.as_ref().map(|r| r.state()));
    let ready = |rec: &Option<LeaseRecord>| match (rec, since) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(r), Some(s)) => r.state() != s,
    };
    if ready(&first) {
        let rec = first.expect("ready implies known");
        return Ok(Json(LeaseView::from_record(&rec, now_secs())));
    }
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => break,
            () = app.cancel.cancelled() => break,
            c = changes.recv() => match c {
                Ok(c) if c.lease == hash && since != Some(c.new) => break,
                Ok(_) => {}
                // Missed some changes: re-read and answer.
                Err(RecvError::Lagged(_)) | Err(RecvError::Closed) => break,
            },
        }
    }
    let rec = read(app.ctx.store.clone()).await?;
    Ok(Json(LeaseView::from_record(&rec, now_secs())))
}

async fn submit_event(
    State(app): State<App>,
    ext: axum::http::Extensions,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<SubmitResult>), HttpError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            body_too_large(&app)
        } else {
            HttpError::bad_request(format!("reading the request body: {}", e.body_text()))
        }
    })?;
    let event: LeaseEvent = serde_json::from_slice(&body).map_err(|e| {
        HttpError::bad_request(format!(
            "body is not a lease event ({{\"kind\": \"create\"|\"accept\"|\"settle\"|\"cancel\"|\"decline\", …}}): {e}"
        ))
    })?;
    let lease_hash = event.lease_hash();
    let kind = event.kind().to_string();
    // A self-check first gives the precise reason without touching anything.
    event
        .check_self()
        .map_err(|e| HttpError::bad_request(format!("event refused: {e}")))?;
    // An event for a lease this node has not seen is kept pending under
    // the client's IP, whose share is small (`xe_store::pending`): the
    // write limiter bounds a client's rate, this bounds what it leaves.
    let source = ext
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(xe_store::Source::Local, |c| {
            // One client as the connection caps count one: an IPv6 /64
            // is one share, not 2^64.
            xe_store::Source::Client(xe_node::limits::Source::of(c.0.ip()).addr())
        });
    let applied = app
        .ctx
        .net
        .publish_event_from(event, source)
        .await
        .map_err(|e| match e {
            xe_net::NetError::Store(StoreError::Rejected(e)) => {
                HttpError::bad_request(format!("event refused: {e}"))
            }
            // Over the client's own share: its doing, so 429.
            xe_net::NetError::Store(StoreError::PendingRefused(
                e @ (xe_store::PendingRefused::SourceShare { .. }
                | xe_store::PendingRefused::SignerShare { .. }
                | xe_store::PendingRefused::LeaseFull { .. }),
            )) => HttpError::new(StatusCode::TOO_MANY_REQUESTS, e.to_string()),
            xe_net::NetError::Store(StoreError::PendingRefused(e)) => {
                HttpError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            other => HttpError::internal(other.to_string()),
        })?;
    let (status, applied, state) = match applied {
        Applied::Changed(s) => (StatusCode::CREATED, "changed", Some(s)),
        Applied::Duplicate => (
            StatusCode::OK,
            "duplicate",
            app.ctx
                .store
                .lease(&lease_hash)
                .ok()
                .flatten()
                .map(|r| r.state()),
        ),
        Applied::Pending => (StatusCode::ACCEPTED, "pending", None),
    };
    Ok((
        status,
        Json(SubmitResult {
            lease_hash,
            kind,
            applied: applied.into(),
            state,
        }),
    ))
}

async fn providers(State(app): State<App>) -> Result<Json<Vec<ProviderView>>, HttpError> {
    let store = app.ctx.store.clone();
    let entries = blocking(move || store.directory()).await?;
    let connected: HashSet<String> = app
        .ctx
        .net
        .peers()
        .await
        .map(|ps| ps.into_iter().map(|p| p.peer_id).collect())
        .unwrap_or_default();
    Ok(Json(
        entries
            .iter()
            .map(|e| ProviderView::from_entry(e, connected.contains(&e.peer_id)))
            .collect(),
    ))
}

fn provider(app: &App) -> Result<&std::sync::Arc<xe_node::Provider>, HttpError> {
    app.ctx.provider.as_ref().ok_or_else(|| {
        HttpError::not_found("this node is not a provider (start it with `xe node --provide`)")
    })
}

fn vm_view(info: xe_vm::VmInfo) -> VmView {
    VmView {
        lease: info.lease,
        status: info.status.to_string(),
        backend: Some(info.backend),
        ssh_port: info.ssh_port,
        host_key: info.host_key,
        error: info.error,
        accelerator: info.accelerator,
    }
}

async fn list_vms(State(app): State<App>) -> Result<Json<Vec<VmView>>, HttpError> {
    let p = provider(&app)?;
    Ok(Json(p.vm().list().await.into_iter().map(vm_view).collect()))
}

async fn show_vm(
    State(app): State<App>,
    Path(raw): Path<String>,
) -> Result<Json<VmView>, HttpError> {
    let lease = parse_lease(&raw)?;
    let p = provider(&app)?;
    if let Some(info) = p.vm().get(&lease).await {
        let mut v = vm_view(info);
        if v.error.is_none() {
            v.error = p.declined(&lease);
        }
        return Ok(Json(v));
    }
    if let Some(reason) = p.declined(&lease) {
        return Ok(Json(VmView {
            lease,
            status: "declined".into(),
            backend: None,
            ssh_port: None,
            host_key: None,
            error: Some(reason),
            accelerator: None,
        }));
    }
    if p.recovering() {
        return Err(HttpError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "no VM for lease {lease} yet: this provider restarted and is still bringing its VMs back; ask again in a few seconds"
            ),
        )
        .with_header(header::RETRY_AFTER, HeaderValue::from_static("5")));
    }
    Err(HttpError::not_found(format!(
        "no VM for lease {lease} on this provider (not a lease for this provider, not seen yet, or already torn down)"
    )))
}

/// A body over `--max-body-bytes`, counted: the one answer both the body
/// deadline layer and the extractor give.
fn body_too_large(app: &App) -> HttpError {
    app.stats.record_body_too_large();
    HttpError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "request body is over the {} byte limit",
            app.config.max_body_bytes
        ),
    )
}
