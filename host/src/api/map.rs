//! `POST /v1/functions/{name}/map`: one invocation per element of a JSON
//! array, run in parallel over this host's cores and its peers', answered
//! as an array in input order of `{"status", "body"}`.
//!
//! Each item is an ordinary invocation (`POST /`, or the path `?path=`
//! names, the element as its JSON body) going through the same admission as
//! a client's: here if there is
//! room, else a peer with room, else this host's queue. An item refused as
//! busy waits and tries again until the function's deadline; an item whose
//! peer fails after taking it is `502` (it may have run there, so it is
//! never run a second time). One failed item fails only itself. In a cluster each result says which host ran it (`served_by`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::AppState;
use super::body::{self, RequestBody};
use super::invoke::{self, Arrival};
use crate::cluster::SERVED_BY_HEADER;
use crate::error::{ApiError, Body};
use crate::names::FunctionName;
use crate::policy::Policy;
use lichen_core::map::{MapError, parse_items};

/// Items in flight at once, at most.
const MAX_IN_FLIGHT: usize = 256;
/// Longest `?path=`.
const MAX_PATH: usize = 1024;
/// Pause before a busy item tries again.
const BUSY_PAUSE: Duration = Duration::from_millis(5);

pub async fn map(
    state: &Arc<AppState>,
    name: &FunctionName,
    req: hyper::Request<Incoming>,
    request_id: &str,
) -> Result<Response<Body>, ApiError> {
    let (authorization, policy) = invoke::check_access(state, name, &req)?;
    // Each item carries the map's span as its parent.
    let traced = state.tracing.map(req.headers(), name.as_str());
    let mut carried = HeaderMap::new();
    if let Some(span) = &traced {
        span.inject(&mut carried);
    }
    let path = item_path(name, req.uri().query())?;
    let body = body::read_capped(
        req,
        state.limits().max_upload,
        state.limits().body_idle_timeout,
    )
    .await?;
    let items = parse_items(&body).map_err(|e| match e {
        MapError::NotAnArray(_) => ApiError::bad_request("invalid_map", e.to_string()),
        MapError::TooMany(_) => ApiError::too_large(e.to_string()),
    })?;
    let width = in_flight_bound(state, name, &policy);
    let started = Instant::now();
    let count = items.len();
    let path = path.as_str();
    let results: Vec<serde_json::Value> = futures::stream::iter(items.into_iter().enumerate())
        .map(|(i, item)| {
            let authorization = authorization.clone();
            let deadline = Instant::now() + policy.timeout + policy.timeout;
            let carried = &carried;
            async move {
                run_item(
                    state,
                    (name, path),
                    item,
                    (authorization, carried),
                    &format!("{request_id}-{i}"),
                    deadline,
                )
                .await
            }
        })
        .buffered(width)
        .collect()
        .await;
    if let Some(span) = &traced {
        span.set(opentelemetry::KeyValue::new("lichen.items", count as i64));
        span.end();
    }
    tracing::info!(request_id, function = %name, items = count, width, duration_us = started.elapsed().as_micros() as u64, "map");
    let body = serde_json::to_vec(&results).map_err(anyhow::Error::from)?;
    let mut response = Response::new(crate::error::full_body(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

/// Items in flight: this host's slots for the function plus the free slots
/// of peers serving it (each at most the function's concurrency); for a
/// function with key-value stores, only peers that see the same stores,
/// as only those are forwarded to.
fn in_flight_bound(state: &AppState, name: &FunctionName, policy: &Policy) -> usize {
    let concurrency = policy.concurrency;
    let local = concurrency as usize;
    let peers = match (state.cluster(), state.functions.active_sha(name)) {
        (Some(cluster), Some(sha)) => {
            let kv = policy.keyvalue.grants_any().then(|| cluster.kv_identity());
            cluster
                .peers()
                .iter()
                .filter(|p| p.serves(name.as_str(), &sha))
                .filter(|p| kv.as_ref().is_none_or(|kv| *kv == p.kv))
                .map(|p| p.free_slots.min(concurrency) as usize)
                .sum()
        }
        _ => 0,
    };
    (local + peers).clamp(1, MAX_IN_FLIGHT)
}

/// Where each item is sent: `?path=/x` (a path the guest sees, without a
/// query), `/` by default.
fn item_path(name: &FunctionName, query: Option<&str>) -> Result<String, ApiError> {
    let path = super::query_param(query, "path").unwrap_or("/");
    let invalid = |why: &str| {
        ApiError::bad_request(
            "invalid_map",
            format!("path={path:?}: {why}; e.g. ?path=/grad"),
        )
    };
    if !path.starts_with('/') {
        return Err(invalid("it must start with /"));
    }
    if path.len() > MAX_PATH {
        return Err(invalid(&format!("longer than {MAX_PATH} bytes")));
    }
    let uri = format!("/fn/{name}{path}");
    match uri.parse::<http::uri::PathAndQuery>() {
        Ok(parsed) if parsed.query().is_none() && !uri.contains('#') => Ok(path.to_string()),
        _ => Err(invalid("not a plain URI path")),
    }
}

async fn run_item(
    state: &Arc<AppState>,
    (name, path): (&FunctionName, &str),
    item: serde_json::Value,
    (authorization, carried): (Option<HeaderValue>, &HeaderMap),
    request_id: &str,
    deadline: Instant,
) -> serde_json::Value {
    let bytes = Bytes::from(serde_json::to_vec(&item).unwrap_or_default());
    loop {
        let mut req = hyper::Request::new(RequestBody::from(bytes.clone()));
        *req.method_mut() = Method::POST;
        if let Ok(uri) = format!("/fn/{name}{path}").parse() {
            *req.uri_mut() = uri;
        }
        let headers = req.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        if let Some(value) = &authorization {
            headers.insert(header::AUTHORIZATION, value.clone());
        }
        for (name, value) in carried {
            headers.insert(name, value.clone());
        }
        let arrival = Arrival::MapItem(bytes.clone());
        // As the router splits `/fn/{name}/{rest...}`: `//x` stays `//x`.
        let rest = path.strip_prefix('/').unwrap_or(path);
        match invoke::invoke(state, req, (name.as_str(), rest), request_id, arrival).await {
            Err(error) if error.code == "busy" && Instant::now() < deadline => {
                tokio::time::sleep(BUSY_PAUSE).await;
            }
            Err(error) => {
                return serde_json::json!({
                    "status": error.status.as_u16(),
                    "body": { "error": error.message, "code": error.code },
                });
            }
            Ok(response) => match collect(state, response).await {
                Ok(result) => return result,
                // The response broke off (a peer died mid-answer): the item
                // may have run, so it is not run again.
                Err(error) => {
                    return serde_json::json!({
                        "status": StatusCode::BAD_GATEWAY.as_u16(),
                        "body": { "error": error, "code": "response_failed" },
                    });
                }
            },
        }
    }
}

/// `{"status", "body"}`: the body as JSON when it is JSON, else as text;
/// in a cluster also `served_by`, the node that ran it.
async fn collect(state: &AppState, response: Response<Body>) -> Result<serde_json::Value, String> {
    let status = response.status().as_u16();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"));
    let served_by = state.cluster().map(|cluster| {
        response
            .headers()
            .get(SERVED_BY_HEADER)
            .and_then(|v| v.to_str().ok())
            .map_or_else(|| cluster.node_id().to_string(), str::to_string)
    });
    let mut body = response.into_body();
    let mut bytes = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Ok(data) = frame.into_data() {
            bytes.extend_from_slice(&data);
        }
    }
    let body = match is_json
        .then(|| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .flatten()
    {
        Some(value) => value,
        None => serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned()),
    };
    let mut result = serde_json::json!({ "status": status, "body": body });
    if let Some(node) = served_by {
        result["served_by"] = serde_json::Value::String(node);
    }
    Ok(result)
}
