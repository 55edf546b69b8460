//! The HTTP surface: admin routes under `/v1` (bearer token), invocation
//! under `/fn/{name}/...`, and `/metrics`, `/healthz`, `/readyz`.
//!
//! Every response carries `x-lichen-request-id`; every error is JSON, made in
//! one place ([`ApiError::into_response`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method, Response, StatusCode, header};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Serialize;
use subtle::ConstantTimeEq;

use crate::cluster::forward::{Forward, Replay};
use crate::cluster::{CLUSTER_AUTH_HEADER, Cluster, HOP_HEADER};
use crate::engine::{Deployed, Outcome, Runtime};
use crate::error::{ApiError, Body, full_body};
use crate::metrics::Metrics;
use crate::names::FunctionName;
use crate::policy::{Policy, PolicyTable, WriteError};
use crate::sandbox::{
    CappedResponseBody, GuardedRequestBody, Invocation, InvocationStats, drain_in_background,
};
use crate::scheduler::{Refusal, Scheduler};
use crate::store::{FunctionRecord, ModuleStore, VersionInfo, sha256_hex};

pub const REQUEST_ID_HEADER: &str = "x-lichen-request-id";

/// Largest policy file accepted by `PUT /v1/functions/{name}/policy`.
const MAX_POLICY_BYTES: u64 = 64 << 10;

/// Limits of the HTTP surface that are not per function.
#[derive(Debug, Clone)]
pub struct ApiLimits {
    /// Largest component upload.
    pub max_upload: u64,
    /// Longest pause between two chunks of a request body.
    pub body_idle_timeout: Duration,
    /// Whether `GET /metrics` needs the admin token.
    pub metrics_require_token: bool,
    /// How many functions keep their compiled code loaded; beyond it the
    /// least recently called are unloaded (and load again when called).
    pub max_loaded: usize,
}

/// Everything a request handler needs; one per host.
pub struct AppState {
    pub runtime: Runtime,
    pub store: ModuleStore,
    pub metrics: Metrics,
    pub policies: Arc<PolicyTable>,
    pub scheduler: Scheduler,
    functions: RwLock<HashMap<FunctionName, Arc<Slot>>>,
    admin_token: String,
    limits: ApiLimits,
    /// Deploys and deletes change the store and the table together; one at a
    /// time keeps them in step. Invocations never take it.
    admin_lock: tokio::sync::Mutex<()>,
    request_ids: RequestIds,
    /// Counts calls, to order functions by how recently they were called.
    clock: AtomicU64,
    /// Set once the host has joined a cluster.
    cluster: OnceLock<Arc<Cluster>>,
}

impl AppState {
    pub fn new(
        runtime: Runtime,
        store: ModuleStore,
        metrics: Metrics,
        policies: Arc<PolicyTable>,
        scheduler: Scheduler,
        admin_token: String,
        limits: ApiLimits,
    ) -> Self {
        AppState {
            runtime,
            store,
            metrics,
            policies,
            scheduler,
            functions: RwLock::new(HashMap::new()),
            admin_token,
            limits,
            admin_lock: tokio::sync::Mutex::new(()),
            request_ids: RequestIds::new(),
            clock: AtomicU64::new(1),
            cluster: OnceLock::new(),
        }
    }

    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.get()
    }

    /// Makes this host a cluster member (once).
    pub fn join(&self, cluster: Arc<Cluster>) {
        let _ = self.cluster.set(cluster);
    }

    pub fn limits(&self) -> &ApiLimits {
        &self.limits
    }

    /// Deploys and deletes (local or from the cluster) take this first.
    pub(crate) async fn lock_admin(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.admin_lock.lock().await
    }

    /// The SHA-256 of the active version of `name`, if deployed here.
    pub(crate) fn active_sha(&self, name: &FunctionName) -> Option<String> {
        self.lookup(name.as_str())
            .map(|slot| slot.version.sha256.clone())
    }

    /// The text of the policy in force for `name`, if it has a file.
    pub(crate) fn policy_source(&self, name: &FunctionName) -> Option<String> {
        self.policies.status(name).policy.map(|p| p.text.clone())
    }

    /// The stored record of `name`, or an empty one for a new function.
    pub(crate) fn record_or_new(&self, name: &FunctionName) -> Result<FunctionRecord, ApiError> {
        Ok(self
            .store
            .read_record(name)?
            .unwrap_or_else(|| FunctionRecord::new(name.clone())))
    }

    /// Makes `version` the active version of the function of `record` (as
    /// read under the admin lock, which callers hold): compiles it (or loads
    /// its cached code), stores the module if `bytes` are given, records it,
    /// and swaps it in.
    pub(crate) async fn activate(
        self: &Arc<Self>,
        _admin: &tokio::sync::MutexGuard<'_, ()>,
        record: FunctionRecord,
        version: VersionInfo,
        bytes: Option<Bytes>,
    ) -> Result<(), ApiError> {
        let name = &record.name;
        let mut next = record.clone();
        next.install(version.clone());
        // Compiling takes milliseconds to seconds of CPU: off the async workers.
        let deployed = {
            let state = Arc::clone(self);
            let name = name.clone();
            tokio::task::spawn_blocking(move || -> Result<Deployed, ApiError> {
                let sha256 = version.sha256.clone();
                let deployed = state.load_version(&name, version, bytes.as_deref())?;
                if let Some(bytes) = bytes {
                    state.store.write_module(&sha256, &bytes)?;
                }
                Ok(deployed)
            })
            .await
            .map_err(|e| ApiError::internal(anyhow::anyhow!("compile task failed: {e}")))??
        };
        self.store.write_record(&next)?;
        self.insert(deployed);
        if !record.versions.is_empty() && next.versions.len() <= record.versions.len() {
            // A version was forgotten or replaced: its module may be unused.
            if let Err(error) = self.store.collect_garbage() {
                tracing::warn!(error = format!("{error:#}"), "collecting unused modules");
            }
        }
        Ok(())
    }

    /// Deletes `name` from this host; `false` if it was not here. Callers
    /// hold the admin lock.
    pub(crate) fn delete_function(
        &self,
        _admin: &tokio::sync::MutexGuard<'_, ()>,
        name: &FunctionName,
    ) -> Result<bool, ApiError> {
        if self.store.read_record(name)?.is_none() {
            return Ok(false);
        }
        self.store.remove_record(name)?;
        self.remove(name);
        self.scheduler.remove(name.as_str());
        self.metrics.forget_function(name.as_str());
        if let Err(error) = self.store.collect_garbage() {
            tracing::warn!(error = format!("{error:#}"), "collecting unused modules");
        }
        Ok(true)
    }

    /// Loads every stored function's active version, from the compiled-code
    /// cache where it can. A function that fails to load is logged and left
    /// out; its record stays, so a later deploy or restart can bring it back.
    pub fn load_stored_functions(&self) -> anyhow::Result<usize> {
        let records = self.store.load_records()?;
        let mut table = self.functions.write().unwrap_or_else(|e| e.into_inner());
        for record in records {
            if let Some(version) = record.active_version().cloned() {
                let slot = Slot::new(record.name.clone(), version, None);
                table.insert(record.name, Arc::new(slot));
            }
        }
        Ok(table.len())
    }

    /// The function's code, loading it on first use (from the compiled-code
    /// cache, or compiling if the cache cannot be used). Loading one more
    /// function than `max_loaded` unloads the one called least recently.
    async fn load_slot(self: &Arc<Self>, slot: &Arc<Slot>) -> Result<Arc<Deployed>, ApiError> {
        slot.touch(&self.clock);
        if let Some(deployed) = slot.get() {
            return Ok(deployed);
        }
        let _loading = slot.loading.lock().await;
        if let Some(deployed) = slot.get() {
            return Ok(deployed);
        }
        let state = Arc::clone(self);
        let (name, version) = (slot.name.clone(), slot.version.clone());
        let deployed =
            tokio::task::spawn_blocking(move || state.load_version(&name, version, None))
                .await
                .map_err(|e| ApiError::internal(anyhow::anyhow!("load task failed: {e}")))??;
        let deployed = Arc::new(deployed);
        *slot.loaded.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&deployed));
        self.unload_beyond_cap();
        Ok(deployed)
    }

    /// Keeps at most `max_loaded` functions' code in memory: unloading the
    /// least recently called ones (invocations running keep their own `Arc`).
    fn unload_beyond_cap(&self) {
        let cap = self.limits.max_loaded.max(1);
        let table = self.functions.read().unwrap_or_else(|e| e.into_inner());
        let mut loaded: Vec<&Arc<Slot>> = table.values().filter(|s| s.get().is_some()).collect();
        if loaded.len() <= cap {
            return;
        }
        loaded.sort_by_key(|s| s.last_used.load(Ordering::Relaxed));
        for slot in &loaded[..loaded.len() - cap] {
            *slot.loaded.write().unwrap_or_else(|e| e.into_inner()) = None;
            tracing::debug!(function = %slot.name, "unloaded (least recently called)");
        }
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
        let slot = Slot::new(
            deployed.name.clone(),
            deployed.version.clone(),
            Some(Arc::new(deployed)),
        );
        slot.touch(&self.clock);
        {
            let mut table = self.functions.write().unwrap_or_else(|e| e.into_inner());
            table.insert(slot.name.clone(), Arc::new(slot));
        }
        self.unload_beyond_cap();
    }

    fn remove(&self, name: &FunctionName) -> Option<Arc<Slot>> {
        let mut table = self.functions.write().unwrap_or_else(|e| e.into_inner());
        table.remove(name)
    }

    fn lookup(&self, name: &str) -> Option<Arc<Slot>> {
        let table = self.functions.read().unwrap_or_else(|e| e.into_inner());
        let name = FunctionName::new(name).ok()?;
        table.get(&name).cloned()
    }

    /// Sets the gauges that mirror state, just before a scrape.
    fn refresh_gauges(&self) {
        let table = self.functions.read().unwrap_or_else(|e| e.into_inner());
        self.metrics.functions.set(table.len() as i64);
        for name in table.keys() {
            let (in_flight, queued) = self.scheduler.load(name.as_str());
            let name = name.as_str();
            self.metrics
                .inflight
                .with_label_values(&[name])
                .set(i64::from(in_flight));
            self.metrics
                .queued
                .with_label_values(&[name])
                .set(i64::from(queued));
        }
    }
}

/// A deployed function: its active version, and its code while loaded.
/// Stored functions are loaded on first use, so a host with many functions
/// starts at once and only holds the code of those that are called.
pub struct Slot {
    pub name: FunctionName,
    pub version: VersionInfo,
    loaded: RwLock<Option<Arc<Deployed>>>,
    /// Serialises loading, so concurrent first calls load once.
    loading: tokio::sync::Mutex<()>,
    /// The host's clock value at the latest call, for unloading.
    last_used: AtomicU64,
}

impl Slot {
    fn new(name: FunctionName, version: VersionInfo, loaded: Option<Arc<Deployed>>) -> Self {
        Slot {
            name,
            version,
            loaded: RwLock::new(loaded),
            loading: tokio::sync::Mutex::new(()),
            last_used: AtomicU64::new(0),
        }
    }

    fn get(&self) -> Option<Arc<Deployed>> {
        self.loaded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn touch(&self, clock: &AtomicU64) {
        let now = clock.fetch_add(1, Ordering::Relaxed);
        self.last_used.store(now, Ordering::Relaxed);
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

/// The largest request head accepted (request line and headers), as common
/// proxies allow; hyper's read buffer bounds it only loosely.
pub const MAX_HEAD_BYTES: usize = 64 << 10;

/// Answers one request. Never fails: errors become JSON responses.
pub async fn handle(state: Arc<AppState>, req: hyper::Request<Incoming>) -> Response<Body> {
    let request_id = state.request_ids.next();
    // Measured without formatting the URI: this runs on every request.
    let uri = req.uri();
    let head_bytes: usize = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |p| p.as_str().len())
        + req
            .headers()
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum::<usize>();
    let routed = if head_bytes > MAX_HEAD_BYTES {
        Err(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!("the request head is {head_bytes} bytes; the limit is {MAX_HEAD_BYTES}"),
        ))
    } else {
        route(&state, req, &request_id).await
    };
    let mut response = match routed {
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
        let arrival = arrival(state, &req)?;
        let req = req.map(RequestBody::Streamed);
        return invoke(state, req, rest, request_id, arrival).await;
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (req.method(), segments.as_slice()) {
        (&Method::GET, ["v1", "internal", "modules", sha256]) => {
            authorize_peer(state, &req)?;
            module(state, sha256)
        }
        (&Method::POST, ["v1", "functions", name, "map"]) => {
            let name = parse_name(name)?;
            crate::map::map(state, &name, req, request_id).await
        }
        (&Method::GET, ["healthz"]) => Ok(text(StatusCode::OK, "ok\n")),
        (&Method::GET, ["readyz"]) => Ok(text(StatusCode::OK, "ready\n")),
        (&Method::GET, ["metrics"]) => {
            if state.limits.metrics_require_token {
                authorize(state, &req)?;
            }
            state.refresh_gauges();
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
        (Method::GET, ["peers"]) => peers(state),
        (Method::PUT, ["functions", name]) => deploy(state, parse_name(name)?, req).await,
        (Method::GET, ["functions", name]) => describe(state, &parse_name(name)?),
        (Method::DELETE, ["functions", name]) => delete(state, &parse_name(name)?).await,
        (Method::PUT, ["functions", name, "policy"]) => {
            put_policy(state, &parse_name(name)?, req).await
        }
        (Method::GET, ["functions", name, "policy"]) => get_policy(state, &parse_name(name)?),
        (method, ["functions"] | ["functions", _] | ["functions", _, "policy"]) => {
            Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{method} is not allowed here"),
            ))
        }
        _ => Err(ApiError::not_found(format!(
            "no admin route /v1/{}",
            segments.join("/")
        ))),
    }
}

/// Admin routes need `Authorization: Bearer <token>`.
fn authorize(state: &AppState, req: &hyper::Request<Incoming>) -> Result<(), ApiError> {
    check_bearer(req, [state.admin_token.as_str()], "admin routes")
}

/// Internal routes need the cluster token.
fn authorize_peer<B>(state: &AppState, req: &hyper::Request<B>) -> Result<(), ApiError> {
    let Some(cluster) = state.cluster() else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this host is not in a cluster",
        ));
    };
    let Some(presented) = req.headers().get(CLUSTER_AUTH_HEADER) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            format!("internal requests need an `{CLUSTER_AUTH_HEADER}` header"),
        ));
    };
    if cluster.secret().accepts(presented.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the cluster token is not valid here",
        ))
    }
}

/// Whether an invocation came from a client or, forwarded, from a peer
/// (which must prove it is one).
fn arrival<B>(state: &AppState, req: &hyper::Request<B>) -> Result<Arrival, ApiError> {
    if req.headers().contains_key(HOP_HEADER) {
        authorize_peer(state, req)?;
        Ok(Arrival::Forwarded)
    } else {
        Ok(Arrival::Client)
    }
}

/// `GET /v1/internal/modules/{sha256}`: a module's bytes, for a peer.
fn module(state: &AppState, sha256: &str) -> Result<Response<Body>, ApiError> {
    let valid = sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit());
    if !valid || !state.store.has_module(sha256) {
        return Err(ApiError::not_found(format!("no module {sha256}")));
    }
    let bytes = state.store.read_module(sha256)?;
    let mut response = Response::new(full_body(bytes));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/wasm"),
    );
    Ok(response)
}

/// `GET /v1/peers`: the live peers and what they advertise.
fn peers(state: &AppState) -> Result<Response<Body>, ApiError> {
    let Some(cluster) = state.cluster() else {
        return json(
            StatusCode::OK,
            &serde_json::json!({ "node_id": null, "peers": [] }),
        );
    };
    let peers: Vec<serde_json::Value> = cluster
        .peers()
        .iter()
        .map(|peer| {
            let mut functions: Vec<_> = peer
                .functions
                .values()
                .filter(|e| !e.is_tombstone())
                .map(|e| serde_json::json!({ "name": e.name, "version": e.version, "sha256": e.sha256 }))
                .collect();
            functions.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
            serde_json::json!({
                "node_id": peer.node_id,
                "api": peer.api,
                "gossip": peer.gossip,
                "free_slots": peer.free_slots,
                "load": peer.load,
                "modules": peer.modules,
                "functions": functions,
            })
        })
        .collect();
    json(
        StatusCode::OK,
        &serde_json::json!({ "node_id": cluster.node_id(), "peers": peers }),
    )
}

/// Checks the request's bearer token against `accepted`: `401` without one,
/// `403` with a wrong one. Each comparison takes the same time wherever the
/// tokens differ.
fn check_bearer<'a, B>(
    req: &hyper::Request<B>,
    accepted: impl IntoIterator<Item = &'a str>,
    what: &str,
) -> Result<(), ApiError> {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            format!("{what} need an `Authorization: Bearer <token>` header"),
        ));
    };
    let presented = value
        .as_bytes()
        .strip_prefix(b"Bearer ")
        .unwrap_or_default();
    let mut matched = false;
    for token in accepted {
        matched |= bool::from(presented.ct_eq(token.as_bytes()));
    }
    if matched && !presented.is_empty() {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the token is not valid here",
        ))
    }
}

/// For a map: the function exists, has a valid policy, and the request may
/// invoke it. Returns the `Authorization` each item carries, and the policy.
pub(crate) fn check_access<B>(
    state: &AppState,
    name: &FunctionName,
    req: &hyper::Request<B>,
) -> Result<(Option<HeaderValue>, Arc<Policy>), ApiError> {
    if state.lookup(name.as_str()).is_none() {
        return Err(ApiError::not_found(format!("no function named {name:?}")));
    }
    let policy = state
        .policies
        .get(name)
        .map_err(|error| policy_invalid(name, error))?;
    check_invoke_access(state, &policy, req)?;
    Ok((req.headers().get(header::AUTHORIZATION).cloned(), policy))
}

/// `503`: the function has no policy in force.
fn policy_invalid(name: &FunctionName, error: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "policy_invalid",
        format!("{name} has no valid policy: {error}"),
    )
}

/// A private function takes the admin token or one of its policy's tokens.
fn check_invoke_access<B>(
    state: &AppState,
    policy: &Policy,
    req: &hyper::Request<B>,
) -> Result<(), ApiError> {
    if policy.public {
        return Ok(());
    }
    let accepted =
        std::iter::once(state.admin_token.as_str()).chain(policy.tokens.iter().map(String::as_str));
    check_bearer(req, accepted, "private functions")
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
            "loaded": loaded.is_some_and(|slot| slot.get().is_some()),
            "versions": record.versions,
            "policy": policy_json(state, name),
        }),
    )
}

/// The policy in force (as written in its file) and the last load error.
fn policy_json(state: &AppState, name: &FunctionName) -> serde_json::Value {
    let status = state.policies.status(name);
    serde_json::json!({
        "in_force": status.policy.as_ref().map(|p| &p.source),
        "loaded_unix": status.loaded_unix,
        "error": status.error.as_ref().map(|e| e.to_string()),
        "file": state.policies.dir().join(format!("{name}.toml")),
    })
}

fn get_policy(state: &AppState, name: &FunctionName) -> Result<Response<Body>, ApiError> {
    json(StatusCode::OK, &policy_json(state, name))
}

/// Validates a TOML policy and writes it to the policies directory, where it
/// takes effect at once (files stay the single source of truth).
async fn put_policy(
    state: &Arc<AppState>,
    name: &FunctionName,
    req: hyper::Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let bytes = read_body_capped(req, MAX_POLICY_BYTES, state.limits.body_idle_timeout).await?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| ApiError::bad_request("invalid_policy", "the policy is not UTF-8 text"))?;
    let policies = Arc::clone(&state.policies);
    let name_owned = name.clone();
    let text = text.to_string();
    let text_for_cluster = text.clone();
    let written = tokio::task::spawn_blocking(move || policies.write(&name_owned, &text))
        .await
        .map_err(|e| ApiError::internal(anyhow::anyhow!("policy write task failed: {e}")))?;
    match written {
        Ok(_) => {
            tracing::info!(function = %name, "policy written through the admin API");
            if let Some(cluster) = state.cluster()
                && let Some(slot) = state.lookup(name.as_str())
            {
                cluster
                    .publish_local(
                        &state.store,
                        name.as_str(),
                        Some(slot.version.sha256.clone()),
                        slot.version.version,
                        Some(text_for_cluster),
                    )
                    .await;
            }
            json(StatusCode::OK, &policy_json(state, name))
        }
        Err(WriteError::Invalid(error)) => {
            Err(ApiError::bad_request("invalid_policy", error.to_string()))
        }
        Err(WriteError::Io(error)) => Err(ApiError::internal(error)),
    }
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
    let bytes =
        read_body_capped(req, state.limits.max_upload, state.limits.body_idle_timeout).await?;
    let sha256 = sha256_hex(&bytes);
    let size = bytes.len() as u64;

    let guard = state.lock_admin().await;
    let record = state.record_or_new(&name)?;
    if let Some(active) = record.active_version()
        && active.sha256 == sha256
        && state.lookup(name.as_str()).is_some()
    {
        // The same bytes again: nothing changes, and the answer says so.
        let body = FunctionSummary::new(&name, active);
        return json(StatusCode::OK, &body);
    }

    let version = record.next_version(&sha256, size);
    state
        .activate(&guard, record, version.clone(), Some(bytes))
        .await?;
    // Published before the lock is let go, so an older registry entry being
    // applied meanwhile sees this one and stands down.
    if let Some(cluster) = state.cluster() {
        let policy = state.policy_source(&name);
        cluster
            .publish_local(
                &state.store,
                name.as_str(),
                Some(sha256),
                version.version,
                policy,
            )
            .await;
    }
    drop(guard);
    tracing::info!(function = %name, version = version.version, sha256 = %version.sha256, size, "deployed");
    let body = FunctionSummary::new(&name, &version);
    json(StatusCode::CREATED, &body)
}

async fn delete(state: &Arc<AppState>, name: &FunctionName) -> Result<Response<Body>, ApiError> {
    let guard = state.lock_admin().await;
    if !state.delete_function(&guard, name)? {
        return Err(ApiError::not_found(format!("no function named {name}")));
    }
    if let Some(cluster) = state.cluster() {
        cluster.forget_function(name.as_str());
        let version = cluster.entry(name.as_str()).map_or(0, |e| e.version);
        cluster
            .publish_local(&state.store, name.as_str(), None, version, None)
            .await;
    }
    drop(guard);
    tracing::info!(function = %name, "deleted");
    json(
        StatusCode::OK,
        &serde_json::json!({ "name": name, "deleted": true }),
    )
}

/// Reads a request body, refusing it with `413` as soon as it passes `limit`
/// (by its declared length, or while it streams), never buffering more.
pub(crate) async fn read_body_capped(
    req: hyper::Request<Incoming>,
    limit: u64,
    idle: Duration,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::too_large(format!(
            "the body is larger than the limit of {limit} bytes"
        ))
    };
    let declared = declared_length(req.headers());
    let mut body = req.into_body();
    if declared.is_some_and(|len| len > limit) {
        drain_in_background(body);
        return Err(too_large());
    }
    let mut buffer = BytesMut::new();
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "body_timeout",
                    format!("no request body data for {idle:?}"),
                ));
            }
        };
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

/// The body of an invocation: streamed from a client or a peer, or whole
/// (a map item).
pub enum RequestBody {
    Streamed(Incoming),
    Whole(http_body_util::Full<Bytes>),
}

impl From<Bytes> for RequestBody {
    fn from(bytes: Bytes) -> Self {
        RequestBody::Whole(http_body_util::Full::new(bytes))
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Streamed(body) => std::pin::Pin::new(body).poll_frame(cx),
            RequestBody::Whole(body) => std::pin::Pin::new(body)
                .poll_frame(cx)
                .map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Streamed(body) => body.is_end_stream(),
            RequestBody::Whole(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            RequestBody::Streamed(body) => body.size_hint(),
            RequestBody::Whole(body) => body.size_hint(),
        }
    }
}

/// How an invocation reached this host.
#[derive(Clone)]
pub enum Arrival {
    /// From a client: forwarded to a peer when this host has no room.
    Client,
    /// An item of a map: like a client's, and its body can be sent again
    /// if a peer fails after receiving it.
    MapItem(Bytes),
    /// Forwarded by a peer (authenticated): run here at once or refuse as
    /// busy, never forwarded again. The peer checked access.
    Forwarded,
}

/// `/fn/{name}` and `/fn/{name}/{rest...}`: the guest sees `/{rest...}` and
/// the query, as if it were served at the root.
pub(crate) async fn invoke(
    state: &Arc<AppState>,
    req: hyper::Request<RequestBody>,
    after_prefix: &str,
    request_id: &str,
    arrival: Arrival,
) -> Result<Response<Body>, ApiError> {
    let (name, rest) = match after_prefix.split_once('/') {
        Some((name, rest)) => (name, rest),
        None => (after_prefix, ""),
    };
    let Some(slot) = state.lookup(name) else {
        state.metrics.unknown_function.inc();
        return Err(ApiError::not_found(format!("no function named {name:?}")));
    };
    let function = state.load_slot(&slot).await?;
    let policy = match state.policies.get(&function.name) {
        Ok(policy) => policy,
        Err(error) => {
            let name = function.name.as_str();
            state
                .metrics
                .record_invocation(name, Outcome::Rejected, Duration::ZERO, None, 0);
            return Err(policy_invalid(&function.name, error));
        }
    };
    let method = req.method().clone();
    let started = Instant::now();
    let stats = Arc::new(InvocationStats::default());
    let (result, outcome) = admit_and_run(
        state,
        &function,
        policy,
        req,
        rest,
        request_id,
        Arc::clone(&stats),
        arrival,
    )
    .await;
    let duration = started.elapsed();
    let status = match &result {
        Ok(response) => response.status(),
        Err(error) => error.status,
    };
    let instantiate_ns = stats
        .instantiate_ns
        .load(std::sync::atomic::Ordering::Relaxed);
    state.metrics.record_invocation(
        function.name.as_str(),
        outcome,
        duration,
        (instantiate_ns > 0).then(|| Duration::from_nanos(instantiate_ns)),
        stats.memory_peak.load(std::sync::atomic::Ordering::Relaxed),
    );
    tracing::info!(
        request_id,
        function = %function.name,
        version = function.version.version,
        %method,
        status = status.as_u16(),
        duration_us = duration.as_micros() as u64,
        outcome = outcome.as_str(),
        "invocation"
    );
    result
}

/// Everything between finding the function and logging the outcome: access,
/// body limits, admission (here or at a peer), the run itself, and the
/// response cap.
#[allow(clippy::too_many_arguments)]
async fn admit_and_run(
    state: &Arc<AppState>,
    function: &Arc<Deployed>,
    policy: Arc<Policy>,
    mut req: hyper::Request<RequestBody>,
    rest: &str,
    request_id: &str,
    stats: Arc<InvocationStats>,
    arrival: Arrival,
) -> (Result<Response<Body>, ApiError>, Outcome) {
    let refused = |error: ApiError| (Err(error), Outcome::Rejected);
    if !policy.public {
        // A forwarded request was checked by the host it came through.
        if !matches!(arrival, Arrival::Forwarded)
            && let Err(error) = check_invoke_access(state, &policy, &req)
        {
            return (Err(error), Outcome::Denied);
        }
        // The token was for the host; the guest does not get to see it.
        req.headers_mut().remove(header::AUTHORIZATION);
    }
    let declared = declared_length(req.headers());
    if declared.is_some_and(|len| len > policy.request_body) {
        return refused(ApiError::too_large(format!(
            "the request body is larger than {}'s limit of {} bytes",
            function.name, policy.request_body
        )));
    }

    // The URI stays the original `/fn/...` until admission: a forward
    // sends it as it came.
    let guest_uri = match req.uri().query() {
        Some(query) => format!("/{rest}?{query}"),
        None => format!("/{rest}"),
    };
    let guest_uri: http::Uri = match guest_uri.parse() {
        Ok(uri) => uri,
        Err(e) => {
            return refused(ApiError::bad_request(
                "bad_uri",
                format!("invalid path: {e}"),
            ));
        }
    };

    let gate = state
        .scheduler
        .gate(function.name.as_str(), policy.concurrency, policy.queue);
    let busy = |refusal: Refusal| {
        ApiError::busy(match refusal {
            Refusal::FunctionBusy => format!(
                "{} is at its concurrency limit ({}) and its queue ({}) is full",
                function.name, policy.concurrency, policy.queue
            ),
            Refusal::HostBusy => "this host is at its limit of invocations in flight".to_string(),
            Refusal::QueueTimeout => format!(
                "{} did not get a free slot within its deadline of {:?}",
                function.name, policy.timeout
            ),
        })
    };
    // Local cores first; when they are taken, a peer with room; when no
    // peer has room either, this host's queue.
    let _admission = match state.scheduler.try_admit(&gate) {
        Ok(admission) => admission,
        Err(refusal) if matches!(arrival, Arrival::Forwarded) => return refused(busy(refusal)),
        Err(_) => {
            if let Some(cluster) = state.cluster() {
                let replay = match &arrival {
                    Arrival::MapItem(bytes) => Replay::Body(bytes.clone()),
                    _ if is_idempotent(req.method()) && req.body().is_end_stream() => {
                        Replay::Body(Bytes::new())
                    }
                    _ => Replay::Never,
                };
                let forwarded = cluster
                    .forward(
                        function.name.as_str(),
                        &function.version.sha256,
                        req,
                        policy.timeout + FORWARD_SLACK,
                        replay.clone(),
                    )
                    .await;
                req = match forwarded {
                    Forward::Done(response) => return (Ok(response), Outcome::Forwarded),
                    Forward::Failed(error) => return (Err(error), Outcome::ForwardFailed),
                    Forward::NoRoom(parts, Some(body)) => hyper::Request::from_parts(parts, body),
                    Forward::NoRoom(parts, None) => match replay {
                        Replay::Body(bytes) => {
                            hyper::Request::from_parts(parts, RequestBody::from(bytes))
                        }
                        Replay::Never => {
                            return refused(ApiError::busy(
                                "no host in the cluster has room for this request",
                            ));
                        }
                    },
                };
            }
            match state.scheduler.admit(&gate, policy.timeout).await {
                Ok(admission) => admission,
                Err(refusal) => return refused(busy(refusal)),
            }
        }
    };
    *req.uri_mut() = guest_uri;
    if !req.headers().contains_key(header::HOST) {
        req.headers_mut()
            .insert(header::HOST, HeaderValue::from_static("localhost"));
    }
    // Between hosts only.
    req.headers_mut().remove(HOP_HEADER);
    req.headers_mut().remove(CLUSTER_AUTH_HEADER);

    let (parts, body) = req.into_parts();
    let body = GuardedRequestBody::new(body, policy.request_body, state.limits.body_idle_timeout);
    let exceeded = Arc::clone(&body.exceeded);
    let request = hyper::Request::from_parts(parts, body);
    let invocation = Invocation {
        function: Arc::from(function.name.as_str()),
        request_id: Arc::from(request_id),
        policy: Arc::clone(&policy),
        on_denied: {
            let denied = state
                .metrics
                .outbound_denied
                .with_label_values(&[function.name.as_str()]);
            Arc::new(move || denied.inc())
        },
        stats,
    };
    let (result, outcome) = state.runtime.invoke(function, request, &invocation).await;
    if exceeded.load(std::sync::atomic::Ordering::Relaxed) {
        return refused(ApiError::too_large(format!(
            "the request body is longer than {}'s limit of {} bytes",
            function.name, policy.request_body
        )));
    }
    let response = match result {
        Ok(response) => response,
        Err(error) => return (Err(error), outcome),
    };
    let declared = declared_length(response.headers());
    if declared.is_some_and(|len| len > policy.response_body) {
        let error = ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "response_too_large",
            format!(
                "{}'s response is larger than its limit of {} bytes",
                function.name, policy.response_body
            ),
        );
        return (Err(error), Outcome::GuestError);
    }
    let name = function.name.clone();
    let limit = policy.response_body;
    let cut = state
        .metrics
        .responses_cut
        .with_label_values(&[function.name.as_str()]);
    let response = response.map(move |body| {
        let on_cut = Box::new(move || {
            cut.inc();
            tracing::warn!(function = %name, limit, "response body cut off at the policy limit");
        });
        CappedResponseBody::new(body, limit, on_cut).boxed_unsync()
    });
    (Ok(response), outcome)
}

/// A forward may take this much longer than the function's deadline (the
/// peer's own queueing and the network).
const FORWARD_SLACK: Duration = Duration::from_secs(1);

/// Methods that may be sent twice with the effect of once (RFC 9110 9.2.2).
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// The `Content-Length` a request or response declares, if any and valid.
fn declared_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
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
