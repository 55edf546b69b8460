//! What tools poll: Prometheus metrics, and the API's own written contract,
//! the OpenAPI document (`host/openapi.json`, compiled into the binary and
//! served as written, so what a host serves is what the repository says).

use http::{HeaderValue, Response, StatusCode, header};

use super::AppState;
use crate::error::{ApiError, Body, full_body};

/// The OpenAPI 3.1 document of this host's HTTP API.
pub const OPENAPI: &str = include_str!("../../openapi.json");

/// `GET /v1/openapi.json`.
pub fn openapi() -> Response<Body> {
    let mut response = Response::new(full_body(OPENAPI));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// `GET /metrics`: Prometheus text, with the gauges that mirror state set
/// just before.
pub async fn metrics(state: &AppState) -> Result<Response<Body>, ApiError> {
    state.functions.refresh_gauges();
    state.functions.refresh_kv_gauges().await;
    let (content_type, body) = state.functions.metrics.render()?;
    let mut response = Response::new(full_body(body));
    if let Ok(value) = HeaderValue::from_str(&content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    Ok(response)
}

/// `GET /readyz`: whether a load balancer should send this host traffic.
/// Not while it drains before stopping, not before its first gossip round
/// in a cluster (it does not know its peers' functions yet), and not while
/// the key-value backend is out of reach (the host still serves; functions
/// with stores get the interface's error). `/healthz` stays 200 throughout.
pub fn readyz(state: &AppState) -> Response<Body> {
    if let Some(why) = state.cluster().and_then(|c| c.refused()) {
        return super::text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        );
    }
    let why_not = if state.draining() {
        Some("shutting down: draining\n")
    } else if state.cluster().is_some_and(|c| !c.joined()) {
        Some("not ready: the first gossip round has not finished\n")
    } else if !state.functions.kv.reachable() {
        Some("not ready: the key-value backend (NATS) is unreachable\n")
    } else {
        None
    };
    match why_not {
        None => super::text(StatusCode::OK, "ready\n"),
        Some(why) => super::text(StatusCode::SERVICE_UNAVAILABLE, why),
    }
}
