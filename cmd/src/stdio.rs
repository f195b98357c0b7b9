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

use tokio::io::{AsyncRead, AsyncWrite, Join};
use tokio::net::unix::pipe;

type Reader = Box<dyn AsyncRead + Unpin + Send>;
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// Standard input (read side) and standard output (write side).
pub type Stdio = Join<Reader, Writer>;

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

/// This process's standard input and output. Must run inside a tokio
/// runtime (pipes are registered with its reactor).
pub fn stdio() -> io::Result<Stdio> {
    let reader: Reader = match fifo(io::stdin().as_fd()) {
        Some(f) => Box::new(pipe::Receiver::from_file(f)?),
        None => Box::new(tokio::io::stdin()),
    };
    let writer: Writer = match fifo(io::stdout().as_fd()) {
        Some(f) => Box::new(pipe::Sender::from_file(f)?),
        None => Box::new(tokio::io::stdout()),
    };
    Ok(tokio::io::join(reader, writer))
}
