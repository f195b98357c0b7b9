//! Why a request to a node failed: its own file so that the parts that
//! fail with it (URL parsing) need not import the client itself.

use std::time::Duration;

use axum::http::StatusCode;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The node URL cannot be used.
    #[error("node URL {url:?}: {detail}")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        detail: String,
    },
    /// TCP connect failed.
    #[error(
        "cannot connect to the node at {addr}: {source} (is `xe node --api-port` running there? set --node or XE_NODE)"
    )]
    Connect {
        /// host:port.
        addr: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// TLS to an `https://` node failed.
    #[error("TLS with {addr} failed: {detail}")]
    Tls {
        /// host:port.
        addr: String,
        /// What failed and what to do.
        detail: String,
    },
    /// The HTTP exchange failed.
    #[error("HTTP exchange with {addr} failed: {detail}")]
    Http {
        /// host:port.
        addr: String,
        /// What failed.
        detail: String,
    },
    /// The node answered with an error status.
    #[error("node answered {status}: {message}")]
    Status {
        /// The status.
        status: StatusCode,
        /// The node's `error` text (or the raw body).
        message: String,
        /// Seconds from `Retry-After`, on 429.
        retry_after: Option<u64>,
    },
    /// The body was not what the API sends.
    #[error("unexpected response from the node: {0}")]
    Decode(String),
    /// The deadline passed.
    #[error("no answer from the node within {0:?}")]
    Timeout(Duration),
}
