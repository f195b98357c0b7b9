//! Moving bytes: a stream the gateway can cut at any moment, and the copy
//! between an SSH channel and a tunnel with half-close.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use russh::server::Msg;
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use xe_net::tunnel::AdaptiveBuffer;

use super::stats::GatewayStats;
use super::tunnel::VmStream;

/// Copy buffer for tunnel → channel at its largest. russh cuts a write into
/// packets of the client's maximum size (32 KiB for OpenSSH) and its
/// session task drains every queued packet before one socket write, so a
/// 256 KiB read becomes one 256 KiB `send` instead of eight 32 KiB ones:
/// path 3 down went 272/275 → 286/294 MB/s and the gateway's CPU 1.60 →
/// 1.45 s/GiB (BENCHMARKS.md, eighth run).
const COPY_BUFFER: usize = 256 * 1024;
/// ... and at its smallest. It starts here, doubles while reads fill it
/// and drops back on a tiny read, so an idle session holds 4 KiB, not 32
/// (10,000 idle sessions twice over: 901 → 639 MiB of gateway RSS).
const COPY_BUFFER_MIN: usize = 4 * 1024;

/// A stream that fails every read and write once its token is cancelled.
///
/// russh runs each session in a task of its own that we cannot abort, and a
/// session blocked in the protocol would not notice a polite disconnect.
/// Cutting the transport under it always ends it.
pub(crate) struct Killable<S> {
    inner: S,
    kill: Pin<Box<WaitForCancellationFutureOwned>>,
    killed: bool,
}

impl<S> Killable<S> {
    pub(crate) fn new(inner: S, token: CancellationToken) -> Self {
        Killable {
            inner,
            kill: Box::pin(token.cancelled_owned()),
            killed: false,
        }
    }

    fn is_killed(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.killed && self.kill.as_mut().poll(cx).is_ready() {
            self.killed = true;
        }
        self.killed
    }
}

fn aborted() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "connection closed by the gateway",
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for Killable<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.is_killed(cx) {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Killable<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.is_killed(cx) {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.is_killed(cx) {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.is_killed(cx) {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What a client sent on a channel before its tunnel was up.
#[derive(Debug, Default)]
pub(crate) struct Prelude {
    /// Payload, in order.
    pub(crate) data: Vec<Vec<u8>>,
    /// Total bytes in `data`.
    pub(crate) bytes: usize,
    /// The client already sent EOF.
    pub(crate) eof: bool,
}

impl Prelude {
    /// Stop reading the channel (and so push back on the client) once this
    /// much is buffered while a tunnel opens. What legitimately arrives
    /// early is an SSH client's version line and KEXINIT (a few KiB) or
    /// keystrokes; the cap keeps the worst case (every channel of every
    /// connection full) at 256 KiB × channels × connections.
    pub(crate) const LIMIT: usize = 256 * 1024;

    pub(crate) fn push(&mut self, data: &[u8]) {
        self.bytes += data.len();
        self.data.push(data.to_vec());
    }

    pub(crate) fn is_full(&self) -> bool {
        self.bytes >= Self::LIMIT
    }
}

/// How a channel ↔ tunnel copy ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PumpEnd {
    /// Both sides sent EOF.
    Done,
    /// The client closed the channel or went away.
    ClientClosed,
    /// Reading or writing the tunnel failed.
    TunnelError(String),
    /// The gateway is closing this connection.
    Cancelled,
}

enum UpEnd {
    Eof,
    Closed,
    Failed(String),
}

enum DownEnd {
    Eof,
    ClientGone,
    Failed(String),
}

async fn wait_opt(rd: &mut Option<ChannelReadHalf>) -> Option<ChannelMsg> {
    match rd {
        Some(r) => r.wait().await,
        None => std::future::pending().await,
    }
}

/// Copy between `channel` and `tunnel` until both sides are done, the client
/// closes the channel, the tunnel fails or `token` is cancelled. EOF is
/// propagated each way (half-close). Returns the channel's write half so
/// the caller can send an exit status and close it.
pub(crate) async fn pump(
    channel: russh::Channel<Msg>,
    tunnel: VmStream,
    prelude: Prelude,
    stats: Arc<GatewayStats>,
    token: &CancellationToken,
) -> (PumpEnd, ChannelWriteHalf<Msg>) {
    let (rd, wr) = channel.split();
    let (mut trd, mut twr) = tokio::io::split(tunnel);
    let mut chan_writer = wr.make_writer();

    let up_stats = stats.clone();
    let up = async move {
        let mut rd = rd;
        for chunk in prelude.data {
            if let Err(e) = twr.write_all(&chunk).await {
                return (UpEnd::Failed(format!("writing to the tunnel: {e}")), rd);
            }
            up_stats.add_client_to_vm(chunk.len());
        }
        if !prelude.eof {
            loop {
                match rd.wait().await {
                    Some(ChannelMsg::Data { data }) => {
                        if let Err(e) = twr.write_all(&data).await {
                            return (UpEnd::Failed(format!("writing to the tunnel: {e}")), rd);
                        }
                        up_stats.add_client_to_vm(data.len());
                    }
                    Some(ChannelMsg::Eof) => break,
                    Some(ChannelMsg::Close) | None => return (UpEnd::Closed, rd),
                    Some(_) => {}
                }
            }
        }
        // Half-close: the VM sees EOF and may still answer.
        match twr.shutdown().await {
            Ok(()) => (UpEnd::Eof, rd),
            Err(e) => (
                UpEnd::Failed(format!("closing the tunnel for writing: {e}")),
                rd,
            ),
        }
    };

    let down = async move {
        let mut buf = AdaptiveBuffer::new(COPY_BUFFER_MIN, COPY_BUFFER);
        loop {
            let n = match trd.read(buf.space()).await {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => return DownEnd::Failed(format!("reading from the tunnel: {e}")),
            };
            if chan_writer.write_all(buf.filled(n)).await.is_err() {
                return DownEnd::ClientGone;
            }
            stats.add_vm_to_client(n);
            buf.after_read(n);
        }
        // Sends SSH_MSG_CHANNEL_EOF.
        match chan_writer.shutdown().await {
            Ok(()) => DownEnd::Eof,
            Err(_) => DownEnd::ClientGone,
        }
    };

    tokio::pin!(up);
    tokio::pin!(down);
    let mut up_done = false;
    let mut down_done = false;
    let mut rd_after_eof: Option<ChannelReadHalf> = None;
    let end = loop {
        tokio::select! {
            _ = token.cancelled() => break PumpEnd::Cancelled,
            (end, rd) = &mut up, if !up_done => {
                up_done = true;
                match end {
                    UpEnd::Eof => {
                        if down_done {
                            break PumpEnd::Done;
                        }
                        // Keep draining the channel: a close must be noticed
                        // and russh must never block on a full channel buffer.
                        rd_after_eof = Some(rd);
                    }
                    UpEnd::Closed => break PumpEnd::ClientClosed,
                    UpEnd::Failed(e) => break PumpEnd::TunnelError(e),
                }
            }
            end = &mut down, if !down_done => {
                down_done = true;
                match end {
                    DownEnd::Eof => {
                        if up_done {
                            break PumpEnd::Done;
                        }
                    }
                    DownEnd::ClientGone => break PumpEnd::ClientClosed,
                    DownEnd::Failed(e) => break PumpEnd::TunnelError(e),
                }
            }
            msg = wait_opt(&mut rd_after_eof), if rd_after_eof.is_some() => {
                if matches!(msg, None | Some(ChannelMsg::Close)) {
                    break if down_done { PumpEnd::Done } else { PumpEnd::ClientClosed };
                }
            }
        }
    };
    (end, wr)
}
