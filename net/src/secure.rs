//! Overlay security: libp2p's Noise XX handshake, with AES-256-GCM instead of
//! ChaCha20-Poly1305 when both ends speak it.
//!
//! Why: on the tunnel path the overlay's ChaCha20-Poly1305 was the largest
//! single CPU cost of the gateway and the provider (about a quarter of each,
//! BENCHMARKS.md), and `libp2p-noise` fixes that cipher. AES-GCM on AES-NI is
//! several times cheaper. The handshake is unchanged in shape, so the
//! security argument is libp2p noise's: each side proves its libp2p identity
//! by signing its noise static key.
//!
//! Negotiation: multistream-select offers [`PROTOCOL`] first and standard
//! `/noise` second, so a node without this upgrade still connects (one extra
//! round trip), and [`OverlayCipher::ChaCha20`] turns the new protocol off.
//!
//! Wire format of [`PROTOCOL`]:
//! - every message is a frame: 2-byte big-endian length, then that many
//!   bytes (at most 65,535), as in `/noise`;
//! - handshake `Noise_XX_25519_AESGCM_SHA256`, empty prologue:
//!   `-> e`, `<- e, ee, s, es, payload`, `-> s, se, payload`; the first
//!   message's payload must be empty (a responder refuses one that is not);
//! - payload: 2-byte length + the sender's libp2p public key (protobuf),
//!   2-byte length + its signature over [`STATIC_KEY_DOMAIN`] followed by
//!   the sender's noise static public key;
//! - then each frame is one AES-256-GCM message of at most 65,519 bytes.
//!
//! Test vectors (fixed keys, every handshake message and a first transport
//! frame each way) are in `secure/vectors.txt`, checked by a test, for a
//! second implementation to check itself against.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures::future::{BoxFuture, Either};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, FutureExt, ready};
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade, UpgradeInfo};
use libp2p::identity::{Keypair, PublicKey};
use libp2p::{PeerId, noise};
use snow::resolvers::{DefaultResolver, FallbackResolver, RingResolver};
use zeroize::Zeroizing;

/// The protocol name negotiated for the AES-GCM variant.
pub const PROTOCOL: &str = "/xe/noise-aesgcm/1.0.0";
/// Standard libp2p noise, the fallback.
const NOISE_PROTOCOL: &str = "/noise";
const PARAMS: &str = "Noise_XX_25519_AESGCM_SHA256";
/// Prefix of the signed message, so the signature means this and nothing else.
pub const STATIC_KEY_DOMAIN: &[u8] = b"xe-noise-aesgcm-static-key:";
/// Largest frame body (Noise's message limit).
const MAX_FRAME: usize = 65_535;
const TAG: usize = 16;
/// Largest plaintext per frame.
const MAX_PLAINTEXT: usize = MAX_FRAME - TAG;

/// Which cipher the overlay offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OverlayCipher {
    /// AES-256-GCM ([`PROTOCOL`]) first, standard noise for peers without it.
    #[default]
    AesGcm,
    /// Standard libp2p noise only (ChaCha20-Poly1305).
    ChaCha20,
}

impl std::fmt::Display for OverlayCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OverlayCipher::AesGcm => "aes-gcm",
            OverlayCipher::ChaCha20 => "chacha20",
        })
    }
}

impl std::str::FromStr for OverlayCipher {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "aes-gcm" => Ok(OverlayCipher::AesGcm),
            "chacha20" => Ok(OverlayCipher::ChaCha20),
            other => Err(format!(
                "unknown overlay cipher {other:?}: expected aes-gcm or chacha20"
            )),
        }
    }
}

/// Secured connections by cipher, since start.
#[derive(Debug, Default)]
pub struct HandshakeCounts {
    /// Handshakes completed over [`PROTOCOL`].
    pub aes_gcm: AtomicU64,
    /// Handshakes completed over standard `/noise`.
    pub chacha20: AtomicU64,
}

/// Errors of the security handshake.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    /// Standard noise failed.
    #[error(transparent)]
    Noise(#[from] noise::Error),
    /// The Noise state machine refused a message (bad MAC, wrong length…).
    #[error("overlay handshake ({PROTOCOL}): {0}")]
    Snow(#[from] snow::Error),
    /// The connection failed during the handshake.
    #[error("overlay handshake ({PROTOCOL}): {0}")]
    Io(#[from] io::Error),
    /// The peer's identity payload is malformed or its signature is wrong.
    #[error("overlay handshake ({PROTOCOL}): {0}")]
    Identity(&'static str),
}

/// The connection upgrade for TCP and relayed connections: offers
/// [`PROTOCOL`] (unless [`OverlayCipher::ChaCha20`]) and `/noise`.
#[derive(Clone)]
pub struct SecurityUpgrade {
    cipher: OverlayCipher,
    local: Arc<LocalKeys>,
    noise: noise::Config,
    counts: Arc<HandshakeCounts>,
}

/// This node's noise static key and its signed identity payload.
struct LocalKeys {
    dh_private: Zeroizing<Vec<u8>>,
    payload: Vec<u8>,
}

impl SecurityUpgrade {
    /// A fresh noise static key for `identity`, signed by it.
    pub fn new(
        identity: &Keypair,
        cipher: OverlayCipher,
        counts: Arc<HandshakeCounts>,
    ) -> Result<Self, SecurityError> {
        Ok(SecurityUpgrade {
            cipher,
            local: Arc::new(LocalKeys::new(identity)?),
            noise: noise::Config::new(identity)?,
            counts,
        })
    }
}

fn params() -> snow::params::NoiseParams {
    PARAMS.parse().expect("valid noise protocol name")
}

/// ring for AES-GCM and SHA-256; snow's own resolver for X25519 and the RNG,
/// which ring does not offer through snow.
fn builder<'a>() -> snow::Builder<'a> {
    snow::Builder::with_resolver(
        params(),
        Box::new(FallbackResolver::new(
            Box::new(RingResolver),
            Box::new(DefaultResolver),
        )),
    )
}

impl LocalKeys {
    fn new(identity: &Keypair) -> Result<Self, SecurityError> {
        let kp = builder().generate_keypair()?;
        let signature = identity
            .sign(&[STATIC_KEY_DOMAIN, &kp.public].concat())
            .map_err(|_| SecurityError::Identity("cannot sign the noise static key"))?;
        Ok(LocalKeys {
            dh_private: Zeroizing::new(kp.private),
            payload: encode_payload(&identity.public().encode_protobuf(), &signature),
        })
    }
}

fn encode_payload(public_key: &[u8], signature: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(4 + public_key.len() + signature.len());
    for part in [public_key, signature] {
        p.extend_from_slice(&(part.len() as u16).to_be_bytes());
        p.extend_from_slice(part);
    }
    p
}

/// The peer's identity, if `payload` is well formed and signs `remote_static`.
fn verify_payload(payload: &[u8], remote_static: &[u8]) -> Result<PeerId, SecurityError> {
    let mut rest = payload;
    let malformed = || SecurityError::Identity("malformed identity payload");
    let mut take = || -> Result<&[u8], SecurityError> {
        let (len, tail) = rest.split_first_chunk::<2>().ok_or_else(malformed)?;
        let len = u16::from_be_bytes(*len) as usize;
        if tail.len() < len {
            return Err(malformed());
        }
        let (part, tail) = tail.split_at(len);
        rest = tail;
        Ok(part)
    };
    let key = take()?;
    let signature = take()?;
    if !rest.is_empty() {
        return Err(SecurityError::Identity(
            "trailing bytes after the identity payload",
        ));
    }
    let key = PublicKey::try_decode_protobuf(key)
        .map_err(|_| SecurityError::Identity("the peer's identity key does not decode"))?;
    if !key.verify(&[STATIC_KEY_DOMAIN, remote_static].concat(), signature) {
        return Err(SecurityError::Identity(
            "the peer's signature over its noise static key does not verify",
        ));
    }
    Ok(key.to_peer_id())
}

async fn read_frame<T: AsyncRead + Unpin>(io: &mut T, buf: &mut Vec<u8>) -> io::Result<()> {
    let mut len = [0u8; 2];
    io.read_exact(&mut len).await?;
    buf.resize(u16::from_be_bytes(len) as usize, 0);
    io.read_exact(buf).await
}

async fn write_frame<T: AsyncWrite + Unpin>(io: &mut T, body: &[u8]) -> io::Result<()> {
    let mut frame = Vec::with_capacity(2 + body.len());
    frame.extend_from_slice(&(body.len() as u16).to_be_bytes());
    frame.extend_from_slice(body);
    io.write_all(&frame).await?;
    io.flush().await
}

/// Runs the XX handshake; returns the authenticated peer and the stream.
async fn handshake<T>(
    mut io: T,
    local: &LocalKeys,
    initiator: bool,
) -> Result<(PeerId, SecureStream<T>), SecurityError>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let b = builder().local_private_key(&local.dh_private)?;
    let mut hs = if initiator {
        b.build_initiator()?
    } else {
        b.build_responder()?
    };
    let mut msg = vec![0u8; MAX_FRAME];
    let mut inbound = Vec::with_capacity(MAX_FRAME);
    let mut payload = vec![0u8; MAX_FRAME];
    let peer;
    if initiator {
        let n = hs.write_message(&[], &mut msg)?;
        write_frame(&mut io, &msg[..n]).await?;
        read_frame(&mut io, &mut inbound).await?;
        let n = hs.read_message(&inbound, &mut payload)?;
        peer = verify_payload(&payload[..n], remote_static(&hs)?)?;
        let n = hs.write_message(&local.payload, &mut msg)?;
        write_frame(&mut io, &msg[..n]).await?;
    } else {
        read_frame(&mut io, &mut inbound).await?;
        // `-> e` carries no payload (libp2p noise spec): nothing in it is
        // authenticated yet, so a peer that sends one is refused, not
        // believed or silently ignored.
        if hs.read_message(&inbound, &mut payload)? != 0 {
            return Err(SecurityError::Identity(
                "the first handshake message carries a payload, which the libp2p noise spec forbids",
            ));
        }
        let n = hs.write_message(&local.payload, &mut msg)?;
        write_frame(&mut io, &msg[..n]).await?;
        read_frame(&mut io, &mut inbound).await?;
        let n = hs.read_message(&inbound, &mut payload)?;
        peer = verify_payload(&payload[..n], remote_static(&hs)?)?;
    }
    Ok((peer, SecureStream::new(io, hs.into_transport_mode()?)))
}

fn remote_static(hs: &snow::HandshakeState) -> Result<&[u8], SecurityError> {
    hs.get_remote_static()
        .ok_or(SecurityError::Identity("the peer sent no static key"))
}

/// What a secured connection is: ours or standard noise.
pub type SecureOutput<T> = Either<SecureStream<T>, noise::Output<T>>;

impl UpgradeInfo for SecurityUpgrade {
    type Info = &'static str;
    type InfoIter = std::vec::IntoIter<&'static str>;

    fn protocol_info(&self) -> Self::InfoIter {
        match self.cipher {
            OverlayCipher::AesGcm => vec![PROTOCOL, NOISE_PROTOCOL],
            OverlayCipher::ChaCha20 => vec![NOISE_PROTOCOL],
        }
        .into_iter()
    }
}

impl SecurityUpgrade {
    fn upgrade<T>(
        self,
        io: T,
        info: &'static str,
        initiator: bool,
    ) -> BoxFuture<'static, Result<(PeerId, SecureOutput<T>), SecurityError>>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let counts = self.counts.clone();
        if info == PROTOCOL {
            let local = self.local.clone();
            async move {
                let (peer, s) = handshake(io, &local, initiator).await?;
                counts.aes_gcm.fetch_add(1, Ordering::Relaxed);
                Ok((peer, Either::Left(s)))
            }
            .boxed()
        } else {
            let fut = if initiator {
                self.noise.upgrade_outbound(io, info)
            } else {
                self.noise.upgrade_inbound(io, info)
            };
            async move {
                let (peer, s) = fut.await?;
                counts.chacha20.fetch_add(1, Ordering::Relaxed);
                Ok((peer, Either::Right(s)))
            }
            .boxed()
        }
    }
}

impl<T> InboundConnectionUpgrade<T> for SecurityUpgrade
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Output = (PeerId, SecureOutput<T>);
    type Error = SecurityError;
    type Future = BoxFuture<'static, Result<Self::Output, Self::Error>>;

    fn upgrade_inbound(self, io: T, info: Self::Info) -> Self::Future {
        self.upgrade(io, info, false)
    }
}

impl<T> OutboundConnectionUpgrade<T> for SecurityUpgrade
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Output = (PeerId, SecureOutput<T>);
    type Error = SecurityError;
    type Future = BoxFuture<'static, Result<Self::Output, Self::Error>>;

    fn upgrade_outbound(self, io: T, info: Self::Info) -> Self::Future {
        self.upgrade(io, info, true)
    }
}

/// A connection after the [`PROTOCOL`] handshake: plaintext in, AES-GCM
/// frames out. Writes are buffered up to one frame and sealed on flush or
/// when full; reads pull as many frames as the socket has.
pub struct SecureStream<T> {
    io: T,
    state: snow::TransportState,
    /// Ciphertext read but not yet opened: `rx[rx_start..rx_end]`.
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    /// Opened plaintext not yet returned: `plain[plain_pos..]`.
    plain: Vec<u8>,
    plain_pos: usize,
    /// Plaintext accepted, not yet sealed.
    tx_plain: Vec<u8>,
    /// A sealed frame being written: `tx_frame[tx_pos..tx_len]`. The
    /// buffer keeps its largest length, so sealing never zero-fills it
    /// again (that memset was ~1 % of a relaying node's CPU).
    tx_frame: Vec<u8>,
    tx_pos: usize,
    tx_len: usize,
}

impl<T> SecureStream<T> {
    fn new(io: T, state: snow::TransportState) -> Self {
        SecureStream {
            io,
            state,
            // Buffers grow on first use: an idle connection costs little.
            rx: Vec::new(),
            rx_start: 0,
            rx_end: 0,
            plain: Vec::new(),
            plain_pos: 0,
            tx_plain: Vec::new(),
            tx_frame: Vec::new(),
            tx_pos: 0,
            tx_len: 0,
        }
    }
}

fn invalid(e: snow::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{PROTOCOL}: {e}"))
}

impl<T: AsyncRead + AsyncWrite + Unpin> SecureStream<T> {
    /// Opens the next whole frame in `rx` into `plain`; false if none is whole.
    fn open_frame(&mut self) -> io::Result<bool> {
        let have = &self.rx[self.rx_start..self.rx_end];
        let Some((len, body)) = have.split_first_chunk::<2>() else {
            return Ok(false);
        };
        let len = u16::from_be_bytes(*len) as usize;
        if body.len() < len {
            return Ok(false);
        }
        self.plain.resize(len, 0);
        let n = self
            .state
            .read_message(&body[..len], &mut self.plain)
            .map_err(invalid)?;
        self.plain.truncate(n);
        self.plain_pos = 0;
        self.rx_start += 2 + len;
        Ok(true)
    }

    /// Seals `tx_plain` (or `direct`, when nothing is buffered) into `tx_frame`.
    fn seal(&mut self, direct: Option<&[u8]>) -> io::Result<()> {
        let plain = direct.unwrap_or(&self.tx_plain[..]);
        let most = 2 + plain.len() + TAG;
        if self.tx_frame.len() < most {
            self.tx_frame.resize(most, 0);
        }
        let n = self
            .state
            .write_message(plain, &mut self.tx_frame[2..most])
            .map_err(invalid)?;
        self.tx_frame[..2].copy_from_slice(&(n as u16).to_be_bytes());
        self.tx_len = 2 + n;
        self.tx_pos = 0;
        if direct.is_none() {
            self.tx_plain.clear();
        }
        Ok(())
    }

    /// Writes out the sealed frame, if any.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.tx_pos < self.tx_len {
            let n = ready!(
                Pin::new(&mut self.io).poll_write(cx, &self.tx_frame[self.tx_pos..self.tx_len])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.tx_pos += n;
        }
        self.tx_len = 0;
        self.tx_pos = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for SecureStream<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            if this.plain_pos < this.plain.len() {
                let n = buf.len().min(this.plain.len() - this.plain_pos);
                buf[..n].copy_from_slice(&this.plain[this.plain_pos..this.plain_pos + n]);
                this.plain_pos += n;
                return Poll::Ready(Ok(n));
            }
            if this.open_frame()? {
                continue;
            }
            if this.rx.len() < 2 + MAX_FRAME {
                this.rx.resize(2 + MAX_FRAME, 0);
            }
            // Make room for the rest of the current frame: move its start
            // to the front only when its end would not fit.
            let have = &this.rx[this.rx_start..this.rx_end];
            let frame_end = this.rx_start
                + match have.split_first_chunk::<2>() {
                    Some((len, _)) => 2 + u16::from_be_bytes(*len) as usize,
                    None => 2,
                };
            if this.rx_start == this.rx_end || frame_end > this.rx.len() {
                this.rx.copy_within(this.rx_start..this.rx_end, 0);
                this.rx_end -= this.rx_start;
                this.rx_start = 0;
            }
            let n = ready!(Pin::new(&mut this.io).poll_read(cx, &mut this.rx[this.rx_end..]))?;
            if n == 0 {
                return Poll::Ready(if this.rx_end == 0 {
                    Ok(0)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("{PROTOCOL}: connection closed inside a frame"),
                    ))
                });
            }
            this.rx_end += n;
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for SecureStream<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.tx_plain.len() == MAX_PLAINTEXT || this.tx_len != 0 {
            ready!(this.poll_send(cx))?;
            if this.tx_plain.len() == MAX_PLAINTEXT {
                this.seal(None)?;
                ready!(this.poll_send(cx))?;
            }
        }
        // A whole frame's worth with nothing buffered: seal it from the
        // caller's buffer and skip a copy.
        if this.tx_plain.is_empty() && buf.len() >= MAX_PLAINTEXT {
            this.seal(Some(&buf[..MAX_PLAINTEXT]))?;
            return Poll::Ready(Ok(MAX_PLAINTEXT));
        }
        let n = buf.len().min(MAX_PLAINTEXT - this.tx_plain.len());
        this.tx_plain.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        if !this.tx_plain.is_empty() {
            this.seal(None)?;
            ready!(this.poll_send(cx))?;
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_flush(cx))?;
        Pin::new(&mut self.get_mut().io).poll_close(cx)
    }
}

#[cfg(test)]
mod tests;
