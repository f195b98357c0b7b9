//! TLS for `https://` node URLs: the README tells operators to put a node's
//! API behind a TLS proxy, so the CLI must speak to one.
//!
//! Certificates are checked against the system's trust store, which
//! `rustls-native-certs` reads from `SSL_CERT_FILE` / `SSL_CERT_DIR` first
//! (so a private CA needs no new flag) and otherwise from the OS's bundle.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::ClientError;

/// A connection to a node: plain TCP or TLS over it.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// What [`super::ApiClient`] speaks HTTP over.
pub(crate) type Conn = Pin<Box<dyn Io>>;

/// One client configuration per process: loading the trust store reads and
/// parses every root certificate, too slow to repeat per request.
fn connector() -> Result<TlsConnector, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = rustls::RootCertStore::empty();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map_or_else(|| "none found".to_string(), ToString::to_string);
                return Err(format!(
                    "no trusted root certificates could be loaded ({why}): install ca-certificates, or point SSL_CERT_FILE at your CA's PEM file"
                ));
            }
            // ring, named: another dependency also enables aws-lc-rs, and
            // with two providers compiled in rustls will not pick one.
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS set-up: {e}"))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            // HTTP/1.1 only: the client and the tunnel's upgrade are HTTP/1.
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            Ok(Arc::new(cfg))
        })
        .clone()
        .map(TlsConnector::from)
}

/// TLS over `tcp` to `host`, checking its certificate names `host`.
pub(crate) async fn wrap(tcp: TcpStream, host: &str, addr: &str) -> Result<Conn, ClientError> {
    let tls_err = |detail: String| ClientError::Tls {
        addr: addr.to_string(),
        detail,
    };
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| tls_err(format!("{host:?} is not a valid TLS server name: {e}")))?;
    let stream = connector()
        .map_err(tls_err)?
        .connect(name, tcp)
        .await
        .map_err(|e| tls_err(describe(&e)))?;
    Ok(Box::pin(stream))
}

/// rustls reports a certificate problem as an `InvalidData` I/O error
/// wrapping the rustls error; say what it means for the person.
fn describe(e: &std::io::Error) -> String {
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match inner {
        Some(rustls::Error::InvalidCertificate(c)) => format!(
            "the server's certificate is not trusted ({c:?}); if the node uses a private CA, set SSL_CERT_FILE to its PEM file"
        ),
        Some(rustls::Error::InvalidMessage(_)) => format!(
            "TLS handshake failed: {} (the server does not speak TLS on this port; if it is the node's own API, use http://)",
            inner.map_or_else(String::new, ToString::to_string)
        ),
        Some(other) => format!("TLS handshake failed: {other}"),
        None => format!("TLS handshake failed: {e} (is this port TLS? try http://)"),
    }
}
