//! Errors: [`ApiError`] for the server as a whole, and the JSON error
//! responses handlers return.

use axum::Json;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::types::ErrorBody;

/// Why the API server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The listener's address could not be read.
    #[error("API listener: {0}")]
    Listener(#[source] std::io::Error),
}

/// A refused request: a status and one line of explanation, sent as
/// `{"error": "…"}`, plus any headers the status calls for.
#[derive(Debug)]
pub(crate) struct HttpError {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
}

impl HttpError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        HttpError {
            status,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    pub(crate) fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    pub(crate) fn bad_request(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, m)
    }

    pub(crate) fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, m)
    }

    pub(crate) fn internal(m: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, m)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response();
        for (k, v) in self.headers {
            resp.headers_mut().insert(k, v);
        }
        resp
    }
}

impl From<xe_store::StoreError> for HttpError {
    fn from(e: xe_store::StoreError) -> Self {
        // The store's own texts already say "store: …" where it matters.
        HttpError::internal(e.to_string())
    }
}
