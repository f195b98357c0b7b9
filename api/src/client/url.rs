//! The node URL the CLI is given: `http://` or `https://`, host, port, no path.

use super::error::ClientError;

/// A parsed `http[s]://host[:port]` node URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeUrl {
    pub(super) host: String,
    pub(super) port: u16,
    /// `https://`: TLS to the host, certificate checked against the
    /// system's roots (or `SSL_CERT_FILE`).
    pub(super) tls: bool,
}

impl NodeUrl {
    /// Is this an `https://` URL?
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The host name (or address) as given, without brackets.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// `host:port`, for connecting and the Host header.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl std::fmt::Display for NodeUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}", self.authority())
    }
}

impl std::str::FromStr for NodeUrl {
    type Err = ClientError;
    fn from_str(s: &str) -> Result<Self, ClientError> {
        let bad = |detail: &str| ClientError::Url {
            url: s.to_string(),
            detail: detail.to_string(),
        };
        let (rest, tls) = if let Some(r) = s.strip_prefix("http://") {
            (r, false)
        } else if let Some(r) = s.strip_prefix("https://") {
            (r, true)
        } else if s.contains("://") {
            return Err(bad("only http:// and https:// URLs are supported"));
        } else {
            (s, false)
        };
        let authority = rest.trim_end_matches('/');
        if authority.contains('/') || authority.contains('?') {
            return Err(bad("expected http[s]://HOST[:PORT] with no path"));
        }
        let uri: axum::http::uri::Authority = authority
            .parse()
            .map_err(|e| bad(&format!("not a host[:port]: {e}")))?;
        if uri.as_str().contains('@') {
            return Err(bad("user info is not supported"));
        }
        let host = uri
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if host.is_empty() {
            return Err(bad("missing host"));
        }
        Ok(NodeUrl {
            host,
            port: uri.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            tls,
        })
    }
}
