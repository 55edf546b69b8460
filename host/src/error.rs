//! Errors a client sees. Every failure the API reports becomes a response in
//! exactly one place, [`ApiError::into_response`]: a JSON body
//! `{"error": "...", "code": "..."}` with the status that says what went wrong.
//! Host-side failures arrive as `anyhow::Error` and become `500`, or `507` when
//! the disk is full, so nothing internal is ever answered with a 200.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

/// Seconds a client refused as busy is told to wait before retrying.
pub const RETRY_AFTER_SECS: u32 = 1;

/// On a `409 module_mismatch`: the host serves another module of the
/// function than a forwarded request named, and did not run it.
pub const MODULE_MISMATCH_HEADER: &str = "x-lichen-module-mismatch";

/// Header on a "busy" `503`: the host refused before running anything, so a
/// peer that forwarded the request may send it elsewhere.
pub const BUSY_HEADER: &str = "x-lichen-busy";

/// A response body: the same type the guest's responses use, so every route
/// returns one type.
pub type Body = HyperOutgoingBody;

/// A full, in-memory response body.
pub fn full_body(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// Stable, machine-readable: clients branch on it, not on the message.
    pub code: &'static str,
    pub message: String,
    pub retry_after_secs: Option<u32>,
    /// On a `409 registry_contended`: the registry revision the change
    /// lost to (in the body as `revision`).
    pub revision: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after_secs: None,
            revision: None,
        }
    }

    /// Tells the client to wait `secs` before trying again.
    pub fn retry_after(mut self, secs: u32) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    /// Names the registry revision a change lost to.
    pub fn with_revision(mut self, revision: u64) -> Self {
        self.revision = Some(revision);
        self
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    /// No room to run it now: `503` with `Retry-After`, and a header that
    /// tells a forwarding peer nothing ran (so it may go elsewhere).
    pub fn busy(message: impl Into<String>) -> Self {
        let mut error = Self::new(StatusCode::SERVICE_UNAVAILABLE, "busy", message);
        error.retry_after_secs = Some(RETRY_AFTER_SECS);
        error
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
    }

    /// A host-side failure. The full chain goes to the log; the client gets
    /// the chain too, since it names what failed and never holds secrets.
    pub fn internal(error: anyhow::Error) -> Self {
        if is_disk_full(&error) {
            return Self::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "disk_full",
                format!("{error:#}"),
            );
        }
        tracing::error!(error = format!("{error:#}"), "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("{error:#}"),
        )
    }

    pub fn into_response(self) -> Response<Body> {
        let mut body = serde_json::json!({ "error": self.message, "code": self.code });
        if let Some(revision) = self.revision {
            body["revision"] = revision.into();
        }
        let mut response = Response::new(full_body(body.to_string()));
        *response.status_mut() = self.status;
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if self.code == "busy" {
            response
                .headers_mut()
                .insert(BUSY_HEADER, HeaderValue::from_static("1"));
        }
        if self.code == "module_mismatch" {
            response
                .headers_mut()
                .insert(MODULE_MISMATCH_HEADER, HeaderValue::from_static("1"));
        }
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(error: anyhow::Error) -> Self {
        ApiError::internal(error)
    }
}

fn is_disk_full(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::StorageFull)
    })
}
