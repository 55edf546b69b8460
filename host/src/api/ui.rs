//! `GET /ui`: the status page, for people. Four files embedded in the
//! binary (`host/ui/`): the page asks for the admin token and draws
//! `GET /v1/status` every two seconds. The page itself is public and holds
//! no data; everything it shows needs the token.
//!
//! Every answer carries a Content-Security-Policy that allows only the
//! host's own script, style and API (no inline scripts or styles, no other
//! origin, no framing), `nosniff`, and `Referrer-Policy: no-referrer`.
//! `--ui false` turns the page off: `404`.

use http::{HeaderValue, Response, StatusCode, header};

use super::AppState;
use crate::error::{ApiError, Body, full_body};

/// The page and its assets: path under `/ui`, content type, bytes.
const FILES: &[(&str, &str, &str)] = &[
    (
        "",
        "text/html; charset=utf-8",
        include_str!("../../ui/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../../ui/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_str!("../../ui/app.css"),
    ),
    (
        "icon.svg",
        "image/svg+xml",
        include_str!("../../ui/icon.svg"),
    ),
];

/// What the page may load and where it may connect: this host only.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

/// `file`: the segment after `/ui/`; empty for the page itself.
pub fn serve(state: &AppState, file: &str) -> Result<Response<Body>, ApiError> {
    if !state.limits.ui {
        return Err(ApiError::not_found(
            "the status page is off on this host (--ui false)",
        ));
    }
    let Some((_, content_type, bytes)) = FILES.iter().find(|(name, _, _)| *name == file) else {
        return Err(ApiError::not_found(format!(
            "the status page has no file /ui/{file}"
        )));
    };
    let mut response = Response::new(full_body(*bytes));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, *content_type),
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CACHE_CONTROL, "no-cache"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    Ok(response)
}
