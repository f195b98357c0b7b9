//! The `/xe/tunnel/2.0.0` protocol, byte for byte as the seed specifies:
//!
//! | step | direction | data |
//! |---|---|---|
//! | 1 | client → provider | 32 bytes: the lease hash, raw |
//! | 2 | provider → client | 1 byte: `0x00` ok, `0x01` error |
//! | 3 | provider → client | if error: up to 4 KiB of UTF-8 message, then EOF |
//!
//! After `0x00` the stream is a byte pipe to the VM's sshd. Both sides
//! enforce a handshake deadline; the data phase has none.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use libp2p::{PeerId, StreamProtocol};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};
use xe_store::LeaseHash;

use crate::host::peers::{self, ConnPath, PeerTunnels};
use crate::slots::{ConnLimits, SlotTable};

mod refusal;
pub use refusal::{TunnelRefusal, lease_for_tunnel};

/// The protocol id.
pub const TUNNEL_PROTOCOL: StreamProtocol = StreamProtocol::new("/xe/tunnel/2.0.0");
/// Status byte: tunnel established.
pub const STATUS_OK: u8 = 0x00;
/// Status byte: refused, a message follows.
pub const STATUS_ERR: u8 = 0x01;
/// Longest error message either side will send or read (the seed's 4 KB).
pub const MAX_ERROR_LEN: usize = 4096;
/// The seed's handshake deadline.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest copy buffer per direction, reached during bulk transfers
/// (256 KiB measured +25 % over 64 KiB; BENCHMARKS.md).
pub const PIPE_BUFFER: usize = 256 * 1024;

/// The client end of an open tunnel: a tokio byte stream to the VM's sshd.
///
/// While it lives it counts as one tunnel to its provider peer, so a
/// relayed connection that DCUtR has upgraded is only closed once no
/// tunnel may be riding on it (see [`crate::nat`]).
pub struct TunnelStream {
    inner: Compat<libp2p::Stream>,
    path: ConnPath,
    _guard: Option<peers::PeerTunnelSlot>,
}

impl TunnelStream {
    pub(crate) fn new(
        inner: Compat<libp2p::Stream>,
        path: ConnPath,
        guard: Option<peers::PeerTunnelSlot>,
    ) -> Self {
        TunnelStream {
            inner,
            path,
            _guard: guard,
        }
    }

    /// How this node was connected to the provider when the tunnel opened.
    pub fn path(&self) -> ConnPath {
        self.path
    }
}

impl std::fmt::Debug for TunnelStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelStream")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Why a tunnel could not be opened (client side).
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// Neither the directory nor the DHT knows where the peer is.
    #[error("provider peer {0} not found (no known addresses and the DHT lookup failed)")]
    PeerNotFound(PeerId),
    /// Dialling failed.
    #[error("could not connect to provider peer {peer}: {detail}")]
    DialFailed {
        /// Peer.
        peer: PeerId,
        /// Reason.
        detail: String,
    },
    /// The lease's provider could not be reached at any address the
    /// directory (or the DHT) gave for it. ASCII only: OpenSSH shows other
    /// bytes of a channel-open failure as octal escapes.
    #[error(
        "provider {} is unreachable: {cause} (last announced: {}); it may be offline: try again later, or ask its operator",
        .provider.short(),
        xe_store::human::relative(*.announced_at, xe_store::now_secs())
    )]
    ProviderUnreachable {
        /// The provider's account.
        provider: xe_store::AccountAddress,
        /// When its directory entry was signed (unix seconds).
        announced_at: u64,
        /// Why, in a few words.
        cause: String,
    },
    /// The peer does not speak the tunnel protocol.
    #[error("provider peer {0} does not support {TUNNEL_PROTOCOL}")]
    Unsupported(PeerId),
    /// The provider answered 0x01.
    #[error("provider refused: {0}")]
    Refused(String),
    /// The handshake did not complete in time.
    #[error("tunnel handshake timed out after {0:?}")]
    HandshakeTimeout(Duration),
    /// The provider answered with a byte other than 0x00 or 0x01.
    #[error("unexpected tunnel status byte 0x{0:02x}")]
    UnexpectedStatus(u8),
    /// Stream I/O failed during the handshake.
    #[error("tunnel I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Opening one more would put this peer's connection over its stream
    /// limit, which would close it with every tunnel on it.
    #[error(
        "{limit} tunnels are already open with provider peer {peer}, the most one connection \
         carries; wait for some to close or spread the load over more gateways"
    )]
    TooManyTunnels {
        /// Peer.
        peer: PeerId,
        /// The limit.
        limit: usize,
    },
    /// The network task is gone.
    #[error("network is shutting down")]
    Shutdown,
}

/// Run the client half of the handshake on an opened stream.
pub async fn client_handshake<S>(
    stream: &mut S,
    lease: &LeaseHash,
    timeout: Duration,
) -> Result<(), TunnelError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let work = async {
        stream.write_all(lease.as_bytes()).await?;
        stream.flush().await?;
        let mut status = [0u8; 1];
        stream.read_exact(&mut status).await?;
        match status[0] {
            STATUS_OK => Ok(()),
            STATUS_ERR => {
                // Read at most MAX_ERROR_LEN, however much the provider sends.
                let mut msg = Vec::new();
                (&mut *stream)
                    .take(MAX_ERROR_LEN as u64)
                    .read_to_end(&mut msg)
                    .await?;
                Err(TunnelError::Refused(
                    String::from_utf8_lossy(&msg).into_owned(),
                ))
            }
            other => Err(TunnelError::UnexpectedStatus(other)),
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| TunnelError::HandshakeTimeout(timeout))?
}

/// A boxed byte stream to the VM's sshd.
pub trait VmConn: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> VmConn for T {}

/// What the provider handler needs from the node (the seed's
/// `TunnelValidator`). A refusal's text is what the client reads.
#[async_trait::async_trait]
pub trait TunnelValidator: Send + Sync + 'static {
    /// The lease exists, is active, and this node is its provider.
    async fn validate_tunnel_lease(
        &self,
        lease: &LeaseHash,
        peer: &PeerId,
    ) -> Result<(), TunnelRefusal>;
    /// A connection to the lease VM's sshd.
    async fn dial_ssh(&self, lease: &LeaseHash) -> Result<Box<dyn VmConn>, TunnelRefusal>;
    /// Resolves once a validated lease stops granting access; its tunnels
    /// then close. A node answers with `Store::until_inactive`.
    async fn until_inactive(&self, lease: &LeaseHash) -> xe_store::Inactive;
}

/// Open tunnels per lease (what `/metrics` and tests count). Each tunnel
/// ends itself when its lease does (`Store::until_inactive`); its token
/// is a child of the node's, so shutdown ends it too.
#[derive(Default, Clone)]
pub struct TunnelRegistry {
    inner: Arc<Mutex<HashMap<LeaseHash, HashMap<u64, CancellationToken>>>>,
    next: Arc<AtomicU64>,
}

/// Removes a tunnel from the registry when dropped.
pub struct RegisteredTunnel {
    registry: TunnelRegistry,
    lease: LeaseHash,
    id: u64,
    /// Cancelled when the tunnel must close.
    pub token: CancellationToken,
}

impl Drop for RegisteredTunnel {
    fn drop(&mut self) {
        let mut m = self
            .registry
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(set) = m.get_mut(&self.lease) {
            set.remove(&self.id);
            if set.is_empty() {
                m.remove(&self.lease);
            }
        }
    }
}

impl TunnelRegistry {
    /// Register a tunnel for `lease`, as a child of `parent`.
    pub fn register(&self, lease: LeaseHash, parent: &CancellationToken) -> RegisteredTunnel {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let token = parent.child_token();
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(lease)
            .or_default()
            .insert(id, token.clone());
        RegisteredTunnel {
            registry: self.clone(),
            lease,
            id,
            token,
        }
    }

    /// Open tunnels for one lease.
    pub fn count_for(&self, lease: &LeaseHash) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(lease)
            .map_or(0, HashMap::len)
    }

    /// Open tunnels in total.
    pub fn active(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(HashMap::len)
            .sum()
    }
}

/// Provider-side settings.
#[derive(Debug, Clone)]
pub struct TunnelServerConfig {
    /// Deadline for reading the lease hash and answering.
    pub handshake_timeout: Duration,
    /// Deadline for the lease hash alone: an honest client sends it with
    /// the stream, so a stream still short of 32 bytes after this is cut
    /// well before [`Self::handshake_timeout`] (which also covers dialling
    /// the VM).
    pub lease_timeout: Duration,
    /// Concurrent tunnels; beyond this a stream is refused. A slot is
    /// taken once the lease is validated, so streams stalled in their
    /// handshake hold none.
    pub max_tunnels: usize,
    /// Streams in their handshake at once, all peers together; the last
    /// [`HANDSHAKE_RESERVE`] go only to peers that have none in flight.
    pub max_handshakes: usize,
    /// Streams in their handshake at once from one peer. A gateway opens
    /// one per SSH login in flight (`--ssh-max-startups` full, 100).
    pub max_handshakes_per_peer: usize,
}

/// Of [`TunnelServerConfig::max_handshakes`], the slots kept for peers
/// with no handshake in flight, so one that holds the rest locks no one out.
pub const HANDSHAKE_RESERVE: usize = 64;

impl Default for TunnelServerConfig {
    fn default() -> Self {
        TunnelServerConfig {
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            lease_timeout: Duration::from_secs(10),
            max_tunnels: 1024,
            max_handshakes: 512,
            max_handshakes_per_peer: 128,
        }
    }
}

/// Smallest copy buffer per direction. A direction starts here, doubles
/// while reads fill its buffer (a bulk transfer) up to [`PIPE_BUFFER`], and
/// drops back here on a tiny read (interactive traffic, keepalives), so an
/// idle tunnel holds 2 × 8 KiB instead of 2 × [`PIPE_BUFFER`].
pub const PIPE_BUFFER_MIN: usize = 8 * 1024;

/// A copy buffer that doubles while reads fill it (bulk data) up to its
/// largest size and drops back to its smallest on a tiny read (interactive
/// traffic, keepalives), so an idle connection holds only the smallest.
#[derive(Debug)]
pub struct AdaptiveBuffer {
    buf: Vec<u8>,
    min: usize,
    max: usize,
}

impl AdaptiveBuffer {
    /// Reads shorter than this are interactive traffic: shrink.
    const SHRINK_BELOW: usize = 1024;

    /// Starts at `min` bytes, grows to at most `max`.
    pub fn new(min: usize, max: usize) -> Self {
        AdaptiveBuffer {
            buf: vec![0u8; min],
            min,
            max,
        }
    }

    /// Where the next read goes.
    pub fn space(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// The first `n` bytes (what a read of `n` filled).
    pub fn filled(&self, n: usize) -> &[u8] {
        self.buf.get(..n).unwrap_or(&self.buf)
    }

    /// Resize after a read of `n` bytes (once they were used). Returns
    /// whether that read filled the buffer, i.e. more is probably waiting.
    pub fn after_read(&mut self, n: usize) -> bool {
        let full = n == self.buf.len();
        if full && self.buf.len() < self.max {
            self.buf.resize((self.buf.len() * 2).min(self.max), 0);
        } else if !full && n < Self::SHRINK_BELOW && self.buf.len() > self.min {
            self.buf = vec![0u8; self.min];
        }
        full
    }
}

/// Copy `r` to `w` until EOF, then half-close `w`. Returns bytes copied.
async fn copy_one_way<R, W>(r: &mut R, w: &mut W) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut buf = AdaptiveBuffer::new(PIPE_BUFFER_MIN, PIPE_BUFFER);
    let mut total = 0u64;
    loop {
        let n = r.read(buf.space()).await?;
        if n == 0 {
            w.shutdown().await?;
            return Ok(total);
        }
        w.write_all(buf.filled(n)).await?;
        total += n as u64;
        if !buf.after_read(n) {
            // Nothing more was waiting: push what we wrote out now.
            w.flush().await?;
        }
    }
}

/// Copy both ways until both directions finished (half-closes are
/// propagated) or either side fails, or `cancel` fires. Returns bytes
/// (a → b, b → a).
pub async fn pipe<A, B>(
    a: &mut A,
    b: &mut B,
    cancel: &CancellationToken,
) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let both = async {
        tokio::try_join!(
            copy_one_way(&mut ar, &mut bw),
            copy_one_way(&mut br, &mut aw)
        )
    };
    tokio::select! {
        r = both => r,
        () = cancel.cancelled() => Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "tunnel closed by provider")),
    }
}

/// Serve inbound tunnel streams until `cancel` fires; each counts in
/// `tunnels` while it lives.
pub(crate) async fn serve(
    mut control: libp2p_stream::Control,
    validator: Arc<dyn TunnelValidator>,
    registry: TunnelRegistry,
    config: TunnelServerConfig,
    tunnels: PeerTunnels,
    cancel: CancellationToken,
) {
    let mut incoming = match control.accept(TUNNEL_PROTOCOL) {
        Ok(i) => i,
        Err(e) => {
            warn!("tunnel protocol already registered: {e}");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(config.max_tunnels));
    let handshakes: SlotTable<PeerId> = SlotTable::new(
        ConnLimits {
            global: config.max_handshakes,
            per_source: config.max_handshakes_per_peer,
            reserve: HANDSHAKE_RESERVE.min(config.max_handshakes / 2),
        },
        "tunnel handshakes in flight",
    );
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        // The inbound queue has no capacity: only spawn here, never work.
        let next = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            n = incoming.next() => n,
        };
        let Some((peer, stream)) = next else { break };
        let mut stream = stream.compat();
        let handshake = handshakes.admit_key(peer);
        let slots = slots.clone();
        let validator = validator.clone();
        let registry = registry.clone();
        let cfg = config.clone();
        let cancel = cancel.clone();
        let guard = tunnels.enter(peer);
        tasks.spawn(
            async move {
                let _guard = guard;
                let handshake = match handshake {
                    Ok(h) => h,
                    Err(e) => {
                        debug!("refused: {e}");
                        refuse(&mut stream, &e.to_string()).await;
                        return;
                    }
                };
                let served = Served {
                    peer,
                    validator,
                    registry,
                    slots,
                    cfg,
                    cancel,
                };
                serve_stream(stream, Some(handshake), served).await;
            }
            .instrument(tracing::info_span!("tunnel", %peer)),
        );
    }
    tasks.shutdown().await;
}

async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, msg: &str) {
    let mut out = Vec::with_capacity(1 + msg.len().min(MAX_ERROR_LEN));
    out.push(STATUS_ERR);
    let mut end = msg.len().min(MAX_ERROR_LEN);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&msg.as_bytes()[..end]);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        stream.write_all(&out).await?;
        stream.shutdown().await
    })
    .await;
}

/// What serving one inbound tunnel needs besides its stream.
struct Served {
    peer: PeerId,
    validator: Arc<dyn TunnelValidator>,
    registry: TunnelRegistry,
    /// [`TunnelServerConfig::max_tunnels`].
    slots: Arc<Semaphore>,
    cfg: TunnelServerConfig,
    cancel: CancellationToken,
}

/// The provider side of one tunnel stream, outside the accept loop: read
/// the 32-byte lease hash, ask `validator` about the lease and for a
/// connection to its VM, answer `0x00` and pipe until either side ends,
/// the validator says the lease ended, or `cancel` fires; or answer `0x01` and a
/// message. It takes any byte stream so the handshake can be driven over
/// an in-memory pipe (the tunnel fuzz target does); the accept loop runs
/// the same code with its shared slot tables.
pub async fn handle_stream<S>(
    stream: S,
    peer: PeerId,
    validator: Arc<dyn TunnelValidator>,
    registry: TunnelRegistry,
    cfg: TunnelServerConfig,
    cancel: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let served = Served {
        peer,
        validator,
        registry,
        slots: Arc::new(Semaphore::new(cfg.max_tunnels)),
        cfg,
        cancel,
    };
    serve_stream(stream, None, served).await;
}

/// `handshake_slot` (the accept loop's share of its handshake table) is
/// given back as soon as the handshake is over.
async fn serve_stream<S>(
    mut stream: S,
    handshake_slot: Option<crate::slots::Slot<PeerId>>,
    served: Served,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let Served {
        peer,
        validator,
        registry,
        slots,
        cfg,
        cancel,
    } = served;
    let handshake = async {
        let mut raw = [0u8; 32];
        match tokio::time::timeout(cfg.lease_timeout, stream.read_exact(&mut raw)).await {
            Err(_) => return Err(TunnelRefusal::HandshakeTimeout),
            Ok(r) => r.map_err(|e| TunnelRefusal::ReadingLease(e.to_string()))?,
        };
        let lease = LeaseHash(raw);
        validator.validate_tunnel_lease(&lease, &peer).await?;
        let Ok(permit) = slots.try_acquire_owned() else {
            warn!("refused: too many tunnels");
            return Err(TunnelRefusal::AtTunnelLimit);
        };
        let vm = validator.dial_ssh(&lease).await?;
        Ok::<_, TunnelRefusal>((lease, vm, permit))
    };
    let outcome = tokio::time::timeout(cfg.handshake_timeout, handshake).await;
    drop(handshake_slot);
    let (lease, mut vm, _permit) = match outcome {
        Ok(Ok(v)) => v,
        Ok(Err(refusal)) => {
            warn!(error = %refusal, "tunnel refused");
            refuse(&mut stream, &refusal.to_string()).await;
            return;
        }
        Err(_) => {
            warn!(timeout = ?cfg.handshake_timeout, "tunnel handshake timed out");
            refuse(&mut stream, &TunnelRefusal::HandshakeTimeout.to_string()).await;
            return;
        }
    };
    let span = tracing::info_span!("lease", lease = %lease.short());
    async move {
        if let Err(e) = stream.write_all(&[STATUS_OK]).await {
            debug!("client went away before OK: {e}");
            return;
        }
        let guard = registry.register(lease, &cancel);
        info!("tunnel open");
        // The lease's end closes the tunnel (a node's validator waits on
        // `Store::until_inactive`: a settle, cancel or decline written, or
        // the expiry time).
        let (r, ended) = tokio::select! {
            r = pipe(&mut stream, &mut vm, &guard.token) => (r, None),
            why = validator.until_inactive(&lease) => (Ok((0, 0)), Some(why)),
        };
        if ended.is_some() || guard.token.is_cancelled() {
            // Closed by the lease's end or shutdown: end the stream cleanly
            // so the client sees EOF rather than a reset.
            let _ = tokio::time::timeout(Duration::from_secs(2), stream.shutdown()).await;
        }
        match (r, ended) {
            (_, Some(why)) => info!(lease_is = %why, "lease ended; tunnel closed"),
            (Ok((up, down)), None) => {
                info!(bytes_to_vm = up, bytes_from_vm = down, "tunnel closed")
            }
            (Err(e), None) => info!("tunnel ended: {e}"),
        }
    }
    .instrument(span)
    .await;
}

#[cfg(test)]
mod adaptive_buffer_tests {
    use super::AdaptiveBuffer;

    #[test]
    fn grows_on_full_reads_and_shrinks_on_tiny_ones() {
        let mut b = AdaptiveBuffer::new(2048, 8192);
        assert_eq!(b.space().len(), 2048);
        assert!(b.after_read(2048));
        assert_eq!(b.space().len(), 4096);
        assert!(b.after_read(4096));
        assert!(b.after_read(8192));
        assert_eq!(b.space().len(), 8192, "capped at max");
        assert!(!b.after_read(1500));
        assert_eq!(
            b.space().len(),
            8192,
            "a partial, not tiny, read keeps the size"
        );
        assert!(!b.after_read(100));
        assert_eq!(b.space().len(), 2048, "a tiny read drops back to min");
        assert_eq!(b.filled(100).len(), 100);
    }
}
