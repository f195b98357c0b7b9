//! One tokio runtime per process, and panics in spawned tasks made loud.

use std::future::Future;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

static PANICKED: AtomicBool = AtomicBool::new(false);

/// The process's runtime (two workers: the machines have two cores).
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        // A panic in a task the runtime spawned (an axum handler, a russh
        // session) only ends that task; note it so the input fails. The
        // hook before ours (libFuzzer's aborts) still runs.
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICKED.store(true, Ordering::SeqCst);
            previous(info);
        }));
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

/// Run `fut` to completion; panic if any task panicked meanwhile.
pub(crate) fn block_on<F: Future>(fut: F) -> F::Output {
    let out = runtime().block_on(fut);
    assert!(
        !PANICKED.load(Ordering::SeqCst),
        "a task panicked while this input ran (see the message above)"
    );
    out
}

/// Send `data` to `addr` over a fresh loopback TCP connection, half-close,
/// and read until the server closes. Resets are fine; a server that keeps
/// the connection open `limit` after the client's EOF is a hang.
pub(crate) fn exchange(
    addr: std::net::SocketAddr,
    data: &[u8],
    limit: std::time::Duration,
) -> Vec<u8> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    block_on(async {
        tokio::time::timeout(limit, async {
            let mut tcp = tokio::net::TcpStream::connect(addr)
                .await
                .expect("connect to loopback");
            let (mut r, mut w) = tcp.split();
            let send = async {
                let _ = w.write_all(data).await;
                let _ = w.shutdown().await;
            };
            let mut answer = Vec::new();
            let _ = tokio::join!(send, r.read_to_end(&mut answer));
            answer
        })
        .await
        .unwrap_or_else(|_| {
            panic!("{addr} still had the connection open {limit:?} after the client's EOF")
        })
    })
}
