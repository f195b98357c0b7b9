//! Standard input and output as one async byte stream, for `xe tunnel
//! --stdio` (an OpenSSH ProxyCommand).
//!
//! Why not `tokio::io::stdin()`: it reads on tokio's blocking thread pool,
//! a thread hand-off and a copy per read. ssh gives a ProxyCommand pipes,
//! and a pipe can be registered with the reactor like a socket; anything
//! else (a terminal, a file, a socket) falls back to tokio's own.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileTypeExt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, Join};
use tokio::net::unix::pipe;

type Reader = Box<dyn AsyncRead + Unpin + Send>;
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// Standard input (read side) and standard output (write side).
pub type Stdio = Join<Reader, Stdout>;

/// Pipe capacity asked for: 1 MiB (Linux's default 64 KiB is one wake-up
/// per 64 KiB; the system's limit, /proc/sys/fs/pipe-max-size, is 1 MiB by
/// default).
const PIPE_SIZE: usize = 1 << 20;

/// A duplicate of `fd` as a `File`, if it is a pipe.
fn fifo(fd: std::os::fd::BorrowedFd<'_>) -> Option<File> {
    let file = File::from(fd.try_clone_to_owned().ok()?);
    let is_fifo = file.metadata().ok()?.file_type().is_fifo();
    if is_fifo {
        // Best effort: a smaller pipe still works.
        let _ = rustix::pipe::fcntl_setpipe_size(&file, PIPE_SIZE);
    }
    is_fifo.then_some(file)
}

/// Standard output whose shutdown really closes a pipe: the reader sees
/// EOF while this process still reads standard input (a half-close, as a
/// socket's would be). tokio's pipe `Sender` cannot close, and fd 1 stays
/// open behind our duplicate, so both go: the duplicate is dropped and fd 1
/// is pointed at /dev/null.
pub struct Stdout {
    inner: Option<Writer>,
    fd1_is_pipe: bool,
}

impl AsyncWrite for Stdout {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.inner.as_mut() {
            Some(w) => Pin::new(w).poll_write(cx, buf),
            None => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.inner.as_mut() {
            Some(w) => Pin::new(w).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(w) = self.inner.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        ready!(Pin::new(w).poll_shutdown(cx))?;
        self.inner = None;
        if self.fd1_is_pipe {
            let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
            rustix::stdio::dup2_stdout(&null)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// This process's standard input and output. Must run inside a tokio
/// runtime (pipes are registered with its reactor).
pub fn stdio() -> io::Result<Stdio> {
    let reader: Reader = match fifo(io::stdin().as_fd()) {
        Some(f) => Box::new(pipe::Receiver::from_file(f)?),
        None => Box::new(tokio::io::stdin()),
    };
    let (writer, fd1_is_pipe): (Writer, bool) = match fifo(io::stdout().as_fd()) {
        Some(f) => (Box::new(pipe::Sender::from_file(f)?), true),
        None => (Box::new(tokio::io::stdout()), false),
    };
    let stdout = Stdout {
        inner: Some(writer),
        fd1_is_pipe,
    };
    Ok(tokio::io::join(reader, stdout))
}
