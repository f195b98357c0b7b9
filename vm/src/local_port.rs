//! Reaching a VM's SSH port on `127.0.0.1`.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::VmError;

/// How long one TCP connect to a local VM port may take. Loopback connects
/// either succeed or are refused at once; this only bounds a wedged stack.
pub(crate) const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause between two connect attempts while waiting for a VM's sshd.
const PORT_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Connect to `127.0.0.1:port`.
pub(crate) async fn connect_local(port: u16) -> std::io::Result<TcpStream> {
    match tokio::time::timeout(
        LOCAL_CONNECT_TIMEOUT,
        TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("connect to 127.0.0.1:{port} timed out"),
        )),
    }
}

/// Wait until `127.0.0.1:port` accepts a TCP connection, or `deadline`.
pub(crate) async fn wait_for_port(port: u16, deadline: Instant, what: &str) -> Result<(), VmError> {
    loop {
        let last_err = match connect_local(port).await {
            Ok(_) => return Ok(()),
            Err(e) => e.to_string(),
        };
        if Instant::now() + PORT_POLL_INTERVAL > deadline {
            return Err(VmError::Timeout {
                what: format!("{what}: 127.0.0.1:{port} never accepted a connection"),
                detail: format!("last error: {last_err}"),
            });
        }
        tokio::time::sleep(PORT_POLL_INTERVAL).await;
    }
}

/// A port that was free on 127.0.0.1 a moment ago. For programs that must
/// bind themselves (sshd); callers retry if they lose the race.
pub(crate) fn free_local_port() -> Result<u16, VmError> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0))
        .map_err(VmError::io("binding 127.0.0.1:0"))?;
    Ok(l.local_addr()
        .map_err(VmError::io("reading a bound port"))?
        .port())
}
