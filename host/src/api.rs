//! The HTTP surface: admin routes under `/v1` (bearer token), invocation
//! under `/fn/{name}/...`, and `/metrics`, `/healthz`, `/readyz`.
//!
//! Every response carries `x-lichen-request-id`; every error is JSON, made in
//! one place ([`ApiError::into_response`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Serialize;
use subtle::ConstantTimeEq;

use crate::engine::{Deployed, Outcome, Runtime};
use crate::error::{ApiError, Body, full_body};
use crate::metrics::Metrics;
use crate::names::FunctionName;
use crate::store::{FunctionRecord, ModuleStore, VersionInfo, sha256_hex};

pub const REQUEST_ID_HEADER: &str = "x-lichen-request-id";

/// Everything a request handler needs; one per host.
pub struct AppState {
    pub runtime: Runtime,
    pub store: ModuleStore,
    pub metrics: Metrics,
    functions: RwLock<HashMap<FunctionName, Arc<Deployed>>>,
    admin_token: String,
    max_upload: u64,
    /// Deploys and deletes change the store and the table together; one at a
    /// time keeps them in step. Invocations never take it.
    admin_lock: tokio::sync::Mutex<()>,
    request_ids: RequestIds,
}

impl AppState {
    pub fn new(
        runtime: Runtime,
        store: ModuleStore,
        metrics: Metrics,
        admin_token: String,
        max_upload: u64,
    ) -> Self {
        AppState {
            runtime,
            store,
            metrics,
            functions: RwLock::new(HashMap::new()),
            admin_token,
            max_upload,
            admin_lock: tokio::sync::Mutex::new(()),
            request_ids: RequestIds::new(),
        }
    }

    /// Loads every stored function's active version, from the compiled-code
    /// cache where it can. A function that fails to load is logged and left
    /// out; its record stays, so a later deploy or restart can bring it back.
    pub fn load_stored_functions(&self) -> anyhow::Result<usize> {
        let records = self.store.load_records()?;
        let mut loaded = 0;
        for record in records {
            let Some(version) = record.active_version().cloned() else {
                continue;
            };
            match self.load_version(&record.name, version, None) {
                Ok(deployed) => {
                    self.insert(deployed);
                    loaded += 1;
                }
                Err(error) => tracing::error!(
                    function = %record.name,
                    error = %error.message,
                    "cannot load stored function"
                ),
            }
        }
        Ok(loaded)
    }

    /// Turns a stored (or just uploaded) version into a ready function:
    /// compiled code from the cache if present, else compile and cache it.
    fn load_version(
        &self,
        name: &FunctionName,
        version: VersionInfo,
        uploaded: Option<&[u8]>,
    ) -> Result<Deployed, ApiError> {
        let key = self.runtime.cache_key();
        let sha = version.sha256.clone();
        let cached = if self.store.has_compiled(key, &sha) {
            match self
                .runtime
                .load_cached(&self.store.compiled_path(key, &sha))
            {
                Ok(component) => Some(component),
                Err(error) => {
                    tracing::warn!(sha256 = %sha, error = format!("{error:#}"), "recompiling: cached code unusable");
                    None
                }
            }
        } else {
            None
        };
        let (component, fresh) = match cached {
            Some(component) => {
                self.metrics.cache_loads.inc();
                (component, false)
            }
            None => {
                let bytes = match uploaded {
                    Some(bytes) => bytes.to_vec(),
                    None => self.store.read_module(&sha)?,
                };
                let started = Instant::now();
                let component = self.runtime.compile(&bytes)?;
                self.metrics
                    .compile_duration
                    .observe(started.elapsed().as_secs_f64());
                (component, true)
            }
        };
        let deployed = self.runtime.prepare(name.clone(), version, &component)?;
        // Only code that passed every check is cached.
        if fresh {
            let code = component
                .serialize()
                .map_err(anyhow::Error::from)
                .with_context(|| format!("serialising compiled code of {name}"))?;
            self.store.write_compiled(key, &sha, &code)?;
        }
        Ok(deployed)
    }

    fn insert(&self, deployed: Deployed) {
        let mut table = self.functions.write().unwrap_or_else(|e| e.into_inner());
        table.insert(deployed.name.clone(), Arc::new(deployed));
    }

    fn remove(&self, name: &FunctionName) -> Option<Arc<Deployed>> {
        let mut table = self.functions.write().unwrap_or_else(|e| e.into_inner());
        table.remove(name)
    }

    fn lookup(&self, name: &str) -> Option<Arc<Deployed>> {
        let table = self.functions.read().unwrap_or_else(|e| e.into_inner());
        let name = FunctionName::new(name).ok()?;
        table.get(&name).cloned()
    }

    pub fn function_count(&self) -> usize {
        self.functions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

/// Request ids: unique per host run without coordination, short enough to
/// grep. A random prefix per host and a counter.
struct RequestIds {
    prefix: u32,
    next: AtomicU64,
}

impl RequestIds {
    fn new() -> Self {
        let mut prefix = [0u8; 4];
        // Without randomness ids are still unique within this run.
        let _ = getrandom::fill(&mut prefix);
        RequestIds {
            prefix: u32::from_le_bytes(prefix),
            next: AtomicU64::new(1),
        }
    }

    fn next(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{:08x}{:08x}", self.prefix, n)
    }
}

/// Answers one request. Never fails: errors become JSON responses.
pub async fn handle(state: Arc<AppState>, req: hyper::Request<Incoming>) -> Response<Body> {
    let request_id = state.request_ids.next();
    let mut response = match route(&state, req, &request_id).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

async fn route(
    state: &Arc<AppState>,
    req: hyper::Request<Incoming>,
    request_id: &str,
) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_string();
    if let Some(rest) = path.strip_prefix("/fn/") {
        return invoke(state, req, rest, request_id).await;
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (req.method(), segments.as_slice()) {
        (&Method::GET, ["healthz"]) => Ok(text(StatusCode::OK, "ok\n")),
        (&Method::GET, ["readyz"]) => Ok(text(StatusCode::OK, "ready\n")),
        (&Method::GET, ["metrics"]) => {
            let (content_type, body) = state.metrics.render()?;
            let mut response = Response::new(full_body(body));
            if let Ok(value) = HeaderValue::from_str(&content_type) {
                response.headers_mut().insert(header::CONTENT_TYPE, value);
            }
            Ok(response)
        }
        (_, ["v1", ..]) => {
            authorize(state, &req)?;
            admin(state, req, &segments[1..]).await
        }
        _ => Err(ApiError::not_found(format!("no route for {path}"))),
    }
}

async fn admin(
    state: &Arc<AppState>,
    req: hyper::Request<Incoming>,
    segments: &[&str],
) -> Result<Response<Body>, ApiError> {
    match (req.method().clone(), segments) {
        (Method::GET, ["functions"]) => list(state),
        (Method::PUT, ["functions", name]) => deploy(state, parse_name(name)?, req).await,
        (Method::GET, ["functions", name]) => describe(state, &parse_name(name)?),
        (Method::DELETE, ["functions", name]) => delete(state, &parse_name(name)?).await,
        (method, ["functions"] | ["functions", _]) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{method} is not allowed here"),
        )),
        _ => Err(ApiError::not_found(format!(
            "no admin route /v1/{}",
            segments.join("/")
        ))),
    }
}

/// Admin routes need `Authorization: Bearer <token>`. The comparison takes
/// the same time wherever the tokens differ.
fn authorize(state: &AppState, req: &hyper::Request<Incoming>) -> Result<(), ApiError> {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "admin routes need an `Authorization: Bearer <token>` header",
        ));
    };
    let presented = value
        .as_bytes()
        .strip_prefix(b"Bearer ")
        .unwrap_or_default();
    if bool::from(presented.ct_eq(state.admin_token.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the admin token is not valid",
        ))
    }
}

fn parse_name(name: &str) -> Result<FunctionName, ApiError> {
    FunctionName::new(name).map_err(|e| ApiError::bad_request("invalid_name", e.to_string()))
}

#[derive(Serialize)]
struct FunctionSummary<'a> {
    name: &'a FunctionName,
    version: u64,
    sha256: &'a str,
    size: u64,
    created_unix: u64,
}

impl<'a> FunctionSummary<'a> {
    fn new(name: &'a FunctionName, version: &'a VersionInfo) -> Self {
        FunctionSummary {
            name,
            version: version.version,
            sha256: &version.sha256,
            size: version.size,
            created_unix: version.created_unix,
        }
    }
}

fn list(state: &AppState) -> Result<Response<Body>, ApiError> {
    let table = state.functions.read().unwrap_or_else(|e| e.into_inner());
    let mut functions: Vec<FunctionSummary> = table
        .values()
        .map(|f| FunctionSummary::new(&f.name, &f.version))
        .collect();
    functions.sort_by(|a, b| a.name.cmp(b.name));
    json(
        StatusCode::OK,
        &serde_json::json!({ "functions": functions }),
    )
}

fn describe(state: &AppState, name: &FunctionName) -> Result<Response<Body>, ApiError> {
    let record = state
        .store
        .read_record(name)?
        .ok_or_else(|| ApiError::not_found(format!("no function named {name}")))?;
    let loaded = state.lookup(name.as_str());
    let active = record.active_version().ok_or_else(|| {
        ApiError::internal(anyhow::anyhow!("record of {name} has no active version"))
    })?;
    json(
        StatusCode::OK,
        &serde_json::json!({
            "name": name,
            "version": active.version,
            "sha256": active.sha256,
            "size": active.size,
            "created_unix": active.created_unix,
            "loaded": loaded.is_some(),
            "versions": record.versions,
        }),
    )
}

async fn deploy(
    state: &Arc<AppState>,
    name: FunctionName,
    req: hyper::Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let result = deploy_inner(state, name, req).await;
    let outcome = match &result {
        Ok(_) => "ok",
        Err(error) if error.status.is_client_error() => "rejected",
        Err(_) => "failed",
    };
    state.metrics.deploys.with_label_values(&[outcome]).inc();
    result
}

async fn deploy_inner(
    state: &Arc<AppState>,
    name: FunctionName,
    req: hyper::Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let bytes = read_body_capped(req, state.max_upload).await?;
    let sha256 = sha256_hex(&bytes);
    let size = bytes.len() as u64;

    let _guard = state.admin_lock.lock().await;
    let record = state.store.read_record(&name)?.unwrap_or(FunctionRecord {
        name: name.clone(),
        active: 0,
        versions: Vec::new(),
    });
    if let Some(active) = record.active_version()
        && active.sha256 == sha256
        && state.lookup(name.as_str()).is_some()
    {
        // The same bytes again: nothing changes, and the answer says so.
        let body = FunctionSummary::new(&name, active);
        return json(StatusCode::OK, &body);
    }

    let mut next = record.clone();
    let version = next.push_version(&sha256, size);
    // Compiling takes milliseconds to seconds of CPU: off the async workers.
    let deployed = {
        let state = Arc::clone(state);
        let name = name.clone();
        let version = version.clone();
        tokio::task::spawn_blocking(move || -> Result<Deployed, ApiError> {
            let deployed = state.load_version(&name, version, Some(&bytes))?;
            state.store.write_module(&sha256, &bytes)?;
            Ok(deployed)
        })
        .await
        .map_err(|e| ApiError::internal(anyhow::anyhow!("compile task failed: {e}")))??
    };
    state.store.write_record(&next)?;
    state.insert(deployed);
    tracing::info!(function = %name, version = version.version, sha256 = %version.sha256, size, "deployed");
    let body = FunctionSummary::new(&name, &version);
    json(StatusCode::CREATED, &body)
}

async fn delete(state: &Arc<AppState>, name: &FunctionName) -> Result<Response<Body>, ApiError> {
    let _guard = state.admin_lock.lock().await;
    if state.store.read_record(name)?.is_none() {
        return Err(ApiError::not_found(format!("no function named {name}")));
    }
    state.store.remove_record(name)?;
    state.remove(name);
    if let Err(error) = state.store.collect_garbage() {
        tracing::warn!(error = format!("{error:#}"), "collecting unused modules");
    }
    tracing::info!(function = %name, "deleted");
    json(
        StatusCode::OK,
        &serde_json::json!({ "name": name, "deleted": true }),
    )
}

/// After refusing a body, how much more of it is read and thrown away, and for
/// how long, so the client has sent its request before the connection closes
/// and can read the `413` (closing on unread data resets the connection, and
/// the client would see a broken pipe instead).
const DRAIN_BYTES: usize = 4 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// Reads a request body, refusing it with `413` as soon as it passes `limit`
/// (by its declared length, or while it streams), never buffering more.
async fn read_body_capped(req: hyper::Request<Incoming>, limit: u64) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::too_large(format!(
            "the body is larger than the limit of {limit} bytes"
        ))
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = req.into_body();
    if declared.is_some_and(|len| len > limit) {
        drain_in_background(body);
        return Err(too_large());
    }
    let mut buffer = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ApiError::bad_request("bad_body", format!("reading the request body: {e}"))
        })?;
        if let Ok(data) = frame.into_data() {
            if buffer.len() as u64 + data.len() as u64 > limit {
                drain_in_background(body);
                return Err(too_large());
            }
            buffer.extend_from_slice(&data);
        }
    }
    Ok(buffer.freeze())
}

fn drain_in_background(mut body: Incoming) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(DRAIN_TIME, async move {
            let mut drained = 0;
            while let Some(Ok(frame)) = body.frame().await {
                drained += frame.data_ref().map_or(0, |d| d.len());
                if drained > DRAIN_BYTES {
                    break;
                }
            }
        })
        .await;
    });
}

/// `/fn/{name}` and `/fn/{name}/{rest...}`: the guest sees `/{rest...}` and
/// the query, as if it were served at the root.
async fn invoke(
    state: &Arc<AppState>,
    mut req: hyper::Request<Incoming>,
    after_prefix: &str,
    request_id: &str,
) -> Result<Response<Body>, ApiError> {
    let (name, rest) = match after_prefix.split_once('/') {
        Some((name, rest)) => (name, rest),
        None => (after_prefix, ""),
    };
    let function = state
        .lookup(name)
        .ok_or_else(|| ApiError::not_found(format!("no function named {name:?}")))?;
    let guest_uri = match req.uri().query() {
        Some(query) => format!("/{rest}?{query}"),
        None => format!("/{rest}"),
    };
    *req.uri_mut() = guest_uri
        .parse()
        .map_err(|e| ApiError::bad_request("bad_uri", format!("invalid path: {e}")))?;
    if !req.headers().contains_key(header::HOST) {
        req.headers_mut()
            .insert(header::HOST, HeaderValue::from_static("localhost"));
    }

    let method = req.method().clone();
    let started = Instant::now();
    let (result, outcome) = state.runtime.invoke(&function, req, request_id).await;
    let status = match &result {
        Ok(response) => response.status(),
        Err(error) => error.status,
    };
    tracing::info!(
        request_id,
        function = %function.name,
        version = function.version.version,
        %method,
        status = status.as_u16(),
        duration_us = started.elapsed().as_micros() as u64,
        outcome = ?outcome,
        "invocation"
    );
    result
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(full_body(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn json<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Result<Response<Body>, ApiError> {
    let body = serde_json::to_vec(value).context("serialising a response")?;
    let mut response = Response::new(full_body(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::GuestError => "guest_error",
            Outcome::Trap => "trap",
            Outcome::Timeout => "timeout",
        }
    }
}
