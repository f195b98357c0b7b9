//! yamux as the TCP (and relayed) connections' stream multiplexer, with the
//! settings `libp2p-yamux` does not let us reach. Same protocol
//! (`/yamux/1.0.0`), same yamux crate, so peers cannot tell the difference.
//!
//! Why not `libp2p::yamux::Config`: it exposes only the stream count, and
//! yamux asserts 256 KiB of connection receive window per stream against a
//! 1 GiB default, so a gateway could hold at most 4096 sessions to one
//! provider; and its 16 KiB frames mean one noise frame, one flush and one
//! `send` per 16 KiB of tunnelled data.

use std::io::{self, IoSlice, IoSliceMut};
use std::iter;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use futures::{AsyncRead, AsyncWrite, future, ready};
use libp2p::core::muxing::{StreamMuxer, StreamMuxerEvent};
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade, UpgradeInfo};
use std::collections::VecDeque;
use yamux::{Connection, ConnectionError, Mode};

/// Most concurrent streams (one per tunnel) on one connection.
pub const MAX_STREAMS: usize = 16 * 1024;

/// yamux's initial per-stream window; the connection-wide cap must allow
/// every stream at least this much.
const STREAM_WINDOW: usize = 256 * 1024;

/// Largest data frame. A frame plus its 12-byte header fits in one noise
/// frame (65,535 bytes less the 16-byte tag), so each is encrypted and sent
/// whole: a quarter of the frames, flushes and `send` calls of the default.
pub const FRAME_SIZE: usize = 60 * 1024;

/// Inbound streams parked here while the swarm has
/// [`MAX_NEGOTIATING_STREAMS`] being negotiated; more are reset (yamux's
/// own ACK backlog keeps well-behaved peers below this).
///
/// What a peer can make a connection hold that nobody reads: yamux gives
/// every stream 256 KiB of credit the moment it opens (the spec's initial
/// window; it cannot be smaller), so a parked or negotiating stream may
/// hold that much. With these caps that is (32 + 32) × 256 KiB = 16 MiB
/// per connection, however many streams the peer opens; how many
/// connections one source may hold is [`crate::inbound`]'s cap. Streams a
/// protocol has taken are read by it (a tunnel's handshake reads 32 bytes
/// and then pipes to the VM), so they hold at most their window while the
/// reader catches up.
pub const MAX_PARKED_STREAMS: usize = 32;

/// Inbound streams being negotiated at once on one connection (libp2p's
/// default is 128); the rest wait in [`MAX_PARKED_STREAMS`].
pub const MAX_NEGOTIATING_STREAMS: usize = 32;

/// The upgrade: `/yamux/1.0.0` with our settings.
#[derive(Clone)]
pub struct YamuxUpgrade(yamux::Config);

/// The settings for every TCP and relayed connection.
pub fn config() -> YamuxUpgrade {
    let mut c = yamux::Config::default();
    // Window first: yamux checks window >= streams × 256 KiB on each call.
    c.set_max_connection_receive_window(Some(MAX_STREAMS * STREAM_WINDOW));
    c.set_max_num_streams(MAX_STREAMS);
    c.set_split_send_size(FRAME_SIZE);
    YamuxUpgrade(c)
}

impl UpgradeInfo for YamuxUpgrade {
    type Info = &'static str;
    type InfoIter = iter::Once<Self::Info>;

    fn protocol_info(&self) -> Self::InfoIter {
        iter::once("/yamux/1.0.0")
    }
}

impl<C> InboundConnectionUpgrade<C> for YamuxUpgrade
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = Muxer<C>;
    type Error = io::Error;
    type Future = future::Ready<Result<Self::Output, Self::Error>>;

    fn upgrade_inbound(self, io: C, _: Self::Info) -> Self::Future {
        future::ready(Ok(Muxer::new(Connection::new(io, self.0, Mode::Server))))
    }
}

impl<C> OutboundConnectionUpgrade<C> for YamuxUpgrade
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = Muxer<C>;
    type Error = io::Error;
    type Future = future::Ready<Result<Self::Output, Self::Error>>;

    fn upgrade_outbound(self, io: C, _: Self::Info) -> Self::Future {
        future::ready(Ok(Muxer::new(Connection::new(io, self.0, Mode::Client))))
    }
}

/// One yamux connection as libp2p's [`StreamMuxer`].
pub struct Muxer<C> {
    connection: Connection<C>,
    /// yamux only makes progress through `poll_next_inbound`, which
    /// [`StreamMuxer::poll`] drives too; streams it yields there wait here
    /// for [`StreamMuxer::poll_inbound`].
    inbound: VecDeque<Stream>,
    inbound_waker: Option<Waker>,
}

impl<C> Muxer<C> {
    fn new(connection: Connection<C>) -> Self {
        Muxer {
            connection,
            inbound: VecDeque::new(),
            inbound_waker: None,
        }
    }
}

impl<C> Muxer<C>
where
    C: AsyncRead + AsyncWrite + Unpin + 'static,
{
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<Stream, MuxError>> {
        match ready!(self.connection.poll_next_inbound(cx)) {
            Some(Ok(s)) => Poll::Ready(Ok(Stream(s))),
            Some(Err(e)) => Poll::Ready(Err(MuxError(e))),
            None => Poll::Ready(Err(MuxError(ConnectionError::Closed))),
        }
    }
}

impl<C> StreamMuxer for Muxer<C>
where
    C: AsyncRead + AsyncWrite + Unpin + 'static,
{
    type Substream = Stream;
    type Error = MuxError;

    fn poll_inbound(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        if let Some(s) = self.inbound.pop_front() {
            return Poll::Ready(Ok(s));
        }
        if let Poll::Ready(r) = self.poll_next(cx) {
            return Poll::Ready(r);
        }
        self.inbound_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn poll_outbound(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        let s = ready!(self.connection.poll_new_outbound(cx)).map_err(MuxError)?;
        Poll::Ready(Ok(Stream(s)))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.connection.poll_close(cx).map_err(MuxError)
    }

    fn poll(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<StreamMuxerEvent, Self::Error>> {
        let this = self.get_mut();
        let s = ready!(this.poll_next(cx))?;
        if this.inbound.len() >= MAX_PARKED_STREAMS {
            tracing::debug!(
                parked = MAX_PARKED_STREAMS,
                "yamux: inbound streams parked at the cap, resetting a new one"
            );
            drop(s);
        } else {
            this.inbound.push_back(s);
            if let Some(w) = this.inbound_waker.take() {
                w.wake();
            }
        }
        // Come back at once: there may be more to do.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// A yamux stream.
pub struct Stream(yamux::Stream);

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }

    fn poll_read_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_read_vectored(cx, bufs)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_close(cx)
    }
}

/// A yamux connection error.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct MuxError(ConnectionError);

impl From<MuxError> for io::Error {
    fn from(e: MuxError) -> Self {
        match e.0 {
            ConnectionError::Io(e) => e,
            e => io::Error::other(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{AsyncReadExt, AsyncWriteExt};
    use libp2p::core::muxing::StreamMuxerExt;
    use std::future::poll_fn;
    use tokio::sync::{mpsc, oneshot};
    use tokio_util::compat::TokioAsyncReadCompatExt;

    type Open = oneshot::Sender<yamux::Stream>;

    /// Keep `conn` making progress, opening a stream for each request.
    async fn drive<C>(mut conn: Connection<C>, mut opens: mpsc::UnboundedReceiver<Open>)
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let mut want: Option<Open> = None;
        poll_fn(|cx| {
            loop {
                if want.is_none() {
                    match opens.poll_recv(cx) {
                        Poll::Ready(Some(o)) => want = Some(o),
                        Poll::Ready(None) => return Poll::Ready(()),
                        Poll::Pending => {}
                    }
                }
                let mut progressed = false;
                if want.is_some()
                    && let Poll::Ready(r) = conn.poll_new_outbound(cx)
                {
                    let s = r.expect("open an outbound stream");
                    let _ = want.take().map(|o| o.send(s));
                    progressed = true;
                }
                match conn.poll_next_inbound(cx) {
                    Poll::Ready(Some(Ok(_))) => progressed = true,
                    Poll::Ready(_) => return Poll::Ready(()),
                    Poll::Pending => {}
                }
                if !progressed {
                    return Poll::Pending;
                }
            }
        })
        .await;
    }

    /// Fails with libp2p-yamux's settings: the 4097th stream is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_connection_carries_more_streams_than_libp2p_yamux_allowed() {
        const N: usize = 5000;
        let (a, b) = tokio::io::duplex(1 << 20);
        let YamuxUpgrade(cfg) = config();
        let mut server = Connection::new(b.compat(), cfg.clone(), Mode::Server);
        let client = Connection::new(a.compat(), cfg, Mode::Client);
        // Server: echo one byte on every stream and keep it open.
        tokio::spawn(async move {
            while let Some(Ok(mut s)) = poll_fn(|cx| server.poll_next_inbound(cx)).await {
                tokio::spawn(async move {
                    let mut b = [0u8; 1];
                    if s.read_exact(&mut b).await.is_ok() && s.write_all(&b).await.is_ok() {
                        let _ = s.flush().await;
                        // Hold it open until the peer goes.
                        let _ = s.read(&mut b).await;
                    }
                });
            }
        });
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(drive(client, rx));
        let mut held = Vec::with_capacity(N);
        for i in 0..N {
            let (otx, orx) = oneshot::channel();
            tx.send(otx).expect("driver alive");
            let mut s = orx
                .await
                .unwrap_or_else(|_| panic!("stream {i} not opened"));
            let byte = [(i % 251) as u8];
            s.write_all(&byte).await.expect("write");
            s.flush().await.expect("flush");
            let mut back = [0u8; 1];
            s.read_exact(&mut back)
                .await
                .unwrap_or_else(|e| panic!("stream {i}: {e}"));
            assert_eq!(back, byte);
            held.push(s);
        }
        assert_eq!(held.len(), N);
    }

    /// A hostile client on `conn`: opens `n` streams, writes a full
    /// initial window on each and never reads; reports each stream the
    /// server reset. Keep the returned sender: dropping it stops `drive`.
    async fn open_and_fill<C>(
        conn: Connection<C>,
        n: usize,
    ) -> (mpsc::UnboundedReceiver<usize>, mpsc::UnboundedSender<Open>)
    where
        C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (reset_tx, reset_rx) = mpsc::unbounded_channel();
        let (open_tx, open_rx) = mpsc::unbounded_channel();
        tokio::spawn(drive(conn, open_rx));
        for i in 0..n {
            let (tx, rx) = oneshot::channel();
            open_tx.send(tx).expect("driver");
            let mut s = rx.await.expect("opened");
            let reset = reset_tx.clone();
            tokio::spawn(async move {
                // One initial window: yamux lets it all go without the
                // server reading a byte.
                let _ = s.write_all(&vec![0x5a; STREAM_WINDOW]).await;
                let _ = s.flush().await;
                let mut b = [0u8; 1];
                // A parked stream never answers; a reset one ends.
                if s.read(&mut b).await.map_or(true, |n| n == 0) {
                    let _ = reset.send(i);
                }
            });
        }
        (reset_rx, open_tx)
    }

    /// Before the cap was 32, 256 streams of 256 KiB each (64 MiB) could
    /// wait here per connection; a swarm at its negotiation limit takes
    /// none, which the test plays by never calling `poll_inbound`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_parks_at_most_max_parked_streams_and_resets_the_rest() {
        const EXTRA: usize = 8;
        let (a, b) = tokio::io::duplex(1 << 20);
        let YamuxUpgrade(cfg) = config();
        let mut server = Muxer::new(Connection::new(b.compat(), cfg.clone(), Mode::Server));
        let client = Connection::new(a.compat(), cfg, Mode::Client);
        let (mut resets, _opens) = open_and_fill(client, MAX_PARKED_STREAMS + EXTRA).await;
        let parked = tokio::spawn(async move {
            let mut seen = std::collections::HashSet::new();
            let drive = poll_fn(|cx| {
                // Only `poll`, as the swarm does while it negotiates others.
                let _ = server.poll_unpin(cx);
                Poll::<()>::Pending
            });
            tokio::pin!(drive);
            loop {
                tokio::select! {
                    () = &mut drive => unreachable!(),
                    r = resets.recv() => {
                        seen.insert(r.expect("client alive"));
                        if seen.len() == EXTRA {
                            break;
                        }
                    }
                }
            }
            (server.inbound.len(), seen)
        });
        let (held, reset) = tokio::time::timeout(std::time::Duration::from_secs(60), parked)
            .await
            .expect("the server reset the streams past its cap")
            .expect("task");
        assert_eq!(held, MAX_PARKED_STREAMS);
        // Which ones is the client's to say: each stream's SYN goes with
        // its first write, and the writers race.
        assert_eq!(reset.len(), EXTRA);
    }
}
