//! A small HTTP/1.1 client for the API (hyper's connection-level client,
//! one TCP connection per request: the CLI makes a handful of requests, so
//! pooling would buy nothing), and [`carry`] and [`forward`], the engines of
//! `xe tunnel`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};
use xe_store::{LeaseEvent, LeaseHash, LeaseKey, LeaseState, now_secs};

use crate::auth::{
    NODE_HEADER, NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, TunnelAuth, UPGRADE_PROTOCOL,
};
use crate::types::{ErrorBody, LeaseView, NodeInfo, ProviderView, SubmitResult, VmView};

mod error;
mod tls;
mod url;

pub use error::ClientError;
pub use url::NodeUrl;

/// Default node URL of the CLI.
pub const DEFAULT_NODE_URL: &str = "http://127.0.0.1:8080";
/// Default deadline for one request (connect, send, read the answer).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response body the client reads; a node never sends more than a
/// lease list, so a bigger one is a wrong URL or a broken server.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// A client of one node's API.
#[derive(Debug, Clone)]
pub struct ApiClient {
    url: NodeUrl,
    timeout: Duration,
    /// The node's peer id, once asked: fresh tunnel signatures name it.
    peer_id: Arc<tokio::sync::OnceCell<String>>,
}

/// An open HTTP tunnel: a byte stream to the VM's sshd.
pub type TunnelConn = TokioIo<Upgraded>;

/// A raw answer.
#[derive(Debug)]
pub struct RawResponse {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl RawResponse {
    fn error(&self) -> ClientError {
        let message = serde_json::from_slice::<ErrorBody>(&self.body)
            .map(|e| e.error)
            .unwrap_or_else(|_| self.foreign_body());
        ClientError::Status {
            status: self.status,
            message,
            retry_after: self
                .headers
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok()),
        }
    }

    fn json<T: DeserializeOwned>(&self) -> Result<T, ClientError> {
        if !self.status.is_success() {
            return Err(self.error());
        }
        serde_json::from_slice(&self.body).map_err(|e| {
            if self.is_json() {
                ClientError::Decode(e.to_string())
            } else {
                ClientError::Decode(self.foreign_body())
            }
        })
    }

    fn is_json(&self) -> bool {
        self.headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"))
    }

    /// A body that is not the API's JSON. A node's own plain-text answers
    /// (axum's rejections) are short and shown as they are; anything else —
    /// a web page, a proxy's error — means `--node` names something else,
    /// and printing it would bury that under markup.
    fn foreign_body(&self) -> String {
        let kind = self
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("no content type");
        let text = String::from_utf8_lossy(&self.body);
        let text = text.trim();
        if kind.starts_with("text/plain") && text.len() <= 300 && !text.contains('\n') {
            return text.to_string();
        }
        format!(
            "the answer is not an xe node's ({kind}, {} bytes): is --node the URL of an xe node's API?",
            self.body.len()
        )
    }
}

impl ApiClient {
    /// A client of the node at `url`.
    pub fn new(url: NodeUrl) -> Self {
        ApiClient {
            url,
            timeout: DEFAULT_TIMEOUT,
            peer_id: Arc::new(tokio::sync::OnceCell::new()),
        }
    }

    /// The node's URL.
    pub fn url(&self) -> &NodeUrl {
        &self.url
    }

    /// Change the per-request deadline.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    async fn connect(&self) -> Result<tls::Conn, ClientError> {
        let addr = self.url.authority();
        let tcp = TcpStream::connect((self.url.host.as_str(), self.url.port))
            .await
            .map_err(|source| ClientError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        if self.url.tls {
            tls::wrap(tcp, &self.url.host, &addr).await
        } else {
            Ok(Box::pin(tcp))
        }
    }

    fn http_err(&self, e: impl std::fmt::Display) -> ClientError {
        ClientError::Http {
            addr: self.url.authority(),
            detail: e.to_string(),
        }
    }

    fn build(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> Result<Request<Full<Bytes>>, ClientError> {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.url.authority());
        if body.is_some() {
            b = b.header(header::CONTENT_TYPE, "application/json");
        }
        for (k, v) in headers {
            b = b.header(*k, v);
        }
        b.body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Url {
                url: path.to_string(),
                detail: e.to_string(),
            })
    }

    /// Send one request and read the whole answer, within `timeout`.
    pub async fn request_with_timeout(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<RawResponse, ClientError> {
        let req = self.build(method, path, &[], body)?;
        let work = async {
            let tcp = self.connect().await?;
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .map_err(|e| self.http_err(e))?;
            // The connection future does the I/O; it ends with the exchange.
            let conn_task = tokio::spawn(async move {
                let _ = conn.await;
            });
            let resp = send.send_request(req).await.map_err(|e| self.http_err(e))?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| self.http_err(e))?
                .to_bytes();
            conn_task.abort();
            Ok(RawResponse {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| ClientError::Timeout(timeout))?
    }

    /// Send one request with the default deadline.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<RawResponse, ClientError> {
        self.request_with_timeout(method, path, body, self.timeout)
            .await
    }

    /// GET a JSON body; any non-2xx status is an error.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.request(Method::GET, path, None).await?.json()
    }

    /// `GET /node`.
    pub async fn node(&self) -> Result<NodeInfo, ClientError> {
        self.get_json("/node").await
    }

    /// The node's libp2p peer id (asked once per client, then kept): what
    /// a fresh tunnel signature is bound to.
    pub async fn peer_id(&self) -> Result<String, ClientError> {
        self.peer_id
            .get_or_try_init(|| async { Ok(self.node().await?.peer_id) })
            .await
            .cloned()
    }

    /// `GET /leases` with optional filters: every page.
    pub async fn leases(
        &self,
        state: Option<LeaseState>,
        consumer: Option<xe_store::AccountAddress>,
    ) -> Result<Vec<LeaseView>, ClientError> {
        let mut q = Vec::new();
        if let Some(s) = state {
            q.push(format!("state={s}"));
        }
        if let Some(c) = consumer {
            q.push(format!("consumer={c}"));
        }
        // The node answers a page at a time (newest first); follow the
        // cursor so a listing is never silently cut at one page.
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut page_q = q.clone();
            if let Some(a) = &after {
                page_q.push(format!("after={a}"));
            }
            let path = if page_q.is_empty() {
                "/leases".to_string()
            } else {
                format!("/leases?{}", page_q.join("&"))
            };
            let r = self.request(Method::GET, &path, None).await?;
            let page: Vec<LeaseView> = r.json()?;
            let next = r
                .headers
                .get("x-next-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            out.extend(page);
            match next {
                // A cursor that does not move would loop for ever.
                Some(n) if after.as_deref() != Some(n.as_str()) => after = Some(n),
                _ => return Ok(out),
            }
        }
    }

    /// `GET /metrics`: the Prometheus text.
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let r = self.request(Method::GET, "/metrics", None).await?;
        if !r.status.is_success() {
            return Err(r.error());
        }
        Ok(String::from_utf8_lossy(&r.body).into_owned())
    }

    /// `GET /leases/{hash}`.
    pub async fn lease(&self, hash: &LeaseHash) -> Result<LeaseView, ClientError> {
        self.get_json(&format!("/leases/{hash}")).await
    }

    /// `GET /leases/{hash or unique prefix}`: the node resolves a prefix of
    /// at least 8 hex digits (404 if none matches, 409 listing candidates
    /// if several do). `lease` must be hex: it is put in the path as is.
    pub async fn lease_by_prefix(&self, lease: &str) -> Result<LeaseView, ClientError> {
        if !lease.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ClientError::Decode(format!("lease {lease:?} is not hex")));
        }
        self.get_json(&format!("/leases/{lease}")).await
    }

    /// `GET /leases/{hash}?wait=…&since=…`: answers as soon as the lease's
    /// state is no longer `since`, or after `wait` with the current state.
    pub async fn lease_wait(
        &self,
        hash: &LeaseHash,
        since: LeaseState,
        wait: Duration,
    ) -> Result<LeaseView, ClientError> {
        let path = format!("/leases/{hash}?wait={}&since={since}", wait.as_secs());
        self.request_with_timeout(Method::GET, &path, None, wait + self.timeout)
            .await?
            .json()
    }

    /// `POST /leases`: submit a signed event.
    pub async fn submit(&self, event: &LeaseEvent) -> Result<SubmitResult, ClientError> {
        self.post_json("/leases", event).await
    }

    /// POST a JSON body and read a JSON answer; non-2xx is an error.
    pub async fn post_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let bytes = serde_json::to_vec(body).map_err(|e| ClientError::Decode(e.to_string()))?;
        self.request(Method::POST, path, Some(bytes)).await?.json()
    }

    /// `GET /providers`.
    pub async fn providers(&self) -> Result<Vec<ProviderView>, ClientError> {
        self.get_json("/providers").await
    }

    /// `GET /vms/{lease}`: `None` when the node has no such VM or is not a
    /// provider (both 404).
    pub async fn vm(&self, lease: &LeaseHash) -> Result<Option<VmView>, ClientError> {
        let r = self
            .request(Method::GET, &format!("/vms/{lease}"), None)
            .await?;
        if r.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        r.json().map(Some)
    }

    /// `POST /tunnel/{lease}/tcp` with `auth`; on 101 the returned stream
    /// is a byte pipe to the lease VM's sshd.
    pub async fn open_tunnel(
        &self,
        lease: &LeaseHash,
        auth: TunnelAuth,
    ) -> Result<TunnelConn, ClientError> {
        let mut headers = vec![
            (SIGNATURE_HEADER, auth.signature.to_hex()),
            ("connection", "Upgrade".to_string()),
            ("upgrade", UPGRADE_PROTOCOL.to_string()),
        ];
        if let Some(f) = &auth.fresh {
            headers.push((TIMESTAMP_HEADER, f.timestamp.to_string()));
            headers.push((NONCE_HEADER, hex::encode(f.nonce)));
            headers.push((NODE_HEADER, f.node.clone()));
        }
        let req = self.build(
            Method::POST,
            &format!("/tunnel/{lease}/tcp"),
            &headers,
            None,
        )?;
        let work = async {
            let tcp = self.connect().await?;
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .map_err(|e| self.http_err(e))?;
            tokio::spawn(async move {
                let _ = conn.with_upgrades().await;
            });
            let resp = send.send_request(req).await.map_err(|e| self.http_err(e))?;
            if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                let (parts, body) = resp.into_parts();
                let body = Limited::new(body, MAX_RESPONSE_BYTES)
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                return Err(RawResponse {
                    status: parts.status,
                    headers: parts.headers,
                    body,
                }
                .error());
            }
            let proto = resp.headers().get(header::UPGRADE).cloned();
            if proto != Some(HeaderValue::from_static(UPGRADE_PROTOCOL)) {
                return Err(ClientError::Decode(format!(
                    "101 with Upgrade {proto:?}, expected {UPGRADE_PROTOCOL}"
                )));
            }
            let up = hyper::upgrade::on(resp)
                .await
                .map_err(|e| self.http_err(e))?;
            Ok(TokioIo::new(up))
        };
        tokio::time::timeout(self.timeout + Duration::from_secs(30), work)
            .await
            .map_err(|_| ClientError::Timeout(self.timeout + Duration::from_secs(30)))?
    }
}

/// Why [`carry`] ended without carrying a whole session.
#[derive(Debug, thiserror::Error)]
pub enum CarryError {
    /// The node did not open the tunnel (its answer says why).
    #[error("the node did not open the tunnel: {0}")]
    Refused(#[from] ClientError),
    /// The tunnel opened, then failed mid-session.
    #[error("the tunnel broke: {0}")]
    Broken(std::io::Error),
    /// `cancel` fired.
    #[error("stopped")]
    Stopped,
}

/// Open one HTTP tunnel to `lease`'s VM, signed with a fresh `X-Timestamp`
/// signature by `key`, and carry `local` through it until both directions
/// end (half-closes are passed on) or `cancel` fires. Returns bytes
/// (local → VM, VM → local).
pub async fn carry<S>(
    client: &ApiClient,
    lease: &LeaseHash,
    key: &LeaseKey,
    local: &mut S,
    cancel: &CancellationToken,
) -> Result<(u64, u64), CarryError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
{
    let node = tokio::select! {
        r = client.peer_id() => r?,
        () = cancel.cancelled() => return Err(CarryError::Stopped),
    };
    let auth = TunnelAuth::fresh(key, lease, &node, now_secs());
    let mut up = tokio::select! {
        r = client.open_tunnel(lease, auth) => r?,
        () = cancel.cancelled() => return Err(CarryError::Stopped),
    };
    info!("tunnel open");
    // The tunnels' own copy loop: its buffers grow to 256 KiB under bulk
    // data, where tokio's copy_bidirectional stays at 8 KiB and cost this
    // process 0.6 CPU s/GiB instead of 0.45.
    match xe_net::tunnel::pipe(local, &mut up, cancel).await {
        Ok(n) => Ok(n),
        Err(_) if cancel.is_cancelled() => Err(CarryError::Stopped),
        Err(e) => Err(CarryError::Broken(e)),
    }
}

/// `xe tunnel`: accept local TCP connections on `listener` until `cancel`,
/// and [`carry`] each through its own HTTP tunnel to `lease`'s VM. A
/// connection that fails (the node refuses, the provider is down) is logged
/// and closed; the listener keeps serving. Accept errors are retried with a
/// back-off.
pub async fn forward(
    listener: TcpListener,
    client: ApiClient,
    lease: LeaseHash,
    key: Arc<LeaseKey>,
    cancel: CancellationToken,
) {
    let tasks = tokio_util::task::TaskTracker::new();
    let mut backoff = Duration::from_millis(10);
    let mut next_id: u64 = 0;
    loop {
        let (tcp, peer): (TcpStream, SocketAddr) = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => { backoff = Duration::from_millis(10); x }
                Err(e) => {
                    warn!(error = %e, "accept failed; retrying");
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        next_id += 1;
        let client = client.clone();
        let key = key.clone();
        let token = cancel.child_token();
        let span = tracing::info_span!("conn", id = next_id, %peer);
        tasks.spawn(
            async move {
                let mut tcp = tcp;
                let _ = tcp.set_nodelay(true);
                match carry(&client, &lease, &key, &mut tcp, &token).await {
                    Ok((a, b)) => info!(sent = a, received = b, "connection closed"),
                    Err(CarryError::Stopped) => info!("connection closed: xe tunnel is stopping"),
                    Err(e @ CarryError::Refused(_)) => warn!("{e}; closing this connection"),
                    Err(e) => info!("connection ended: {e}"),
                }
            }
            .instrument(span),
        );
    }
    tasks.close();
    tasks.wait().await;
}
