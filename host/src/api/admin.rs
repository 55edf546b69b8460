//! The admin API: deploy, list, describe and delete functions, read and
//! write their policies, and what a host tells about its cluster (its peers,
//! and module bytes for a peer that lacks them).
//!
//! Why it is built this way:
//! - A deploy or delete changes the store and the function table under the
//!   table's admin lock, and publishes the change to the cluster before it
//!   lets go, so an older registry entry being applied meanwhile stands down.
//! - Policy files stay the source of truth: `PUT .../policy` validates the
//!   text and writes the file; the watcher loads it like any edit on disk.
//! - Module bytes are served to peers only; compiled code never leaves the
//!   host.

use std::sync::Arc;

use http::{HeaderValue, Response, StatusCode, header};
use hyper::body::Incoming;
use serde::Serialize;

use super::auth::Caller;
use super::body;
use super::{AppState, json};
use crate::error::{ApiError, Body, full_body};
use crate::kv::{Backend, KvError, Scope};
use crate::names::FunctionName;
use crate::oci::OciSource;
use crate::policy::{StoreLabel, WriteError};
use crate::store::{Abi, VersionInfo};
use lichen_core::registry::stamp_ms;

/// Largest policy file accepted by `PUT /v1/functions/{name}/policy`.
const MAX_POLICY_BYTES: u64 = 64 << 10;
/// Largest JSON body of a deploy (`{"oci": ...}`) or a rollback.
const MAX_JSON_BODY_BYTES: u64 = 64 << 10;

#[derive(Serialize)]
struct FunctionSummary<'a> {
    name: &'a FunctionName,
    version: u64,
    sha256: &'a str,
    size: u64,
    created_unix: u64,
    abi: Abi,
    #[serde(skip_serializing_if = "Option::is_none")]
    oci: Option<&'a OciSource>,
}

impl<'a> FunctionSummary<'a> {
    fn new(name: &'a FunctionName, version: &'a VersionInfo) -> Self {
        FunctionSummary {
            name,
            version: version.version,
            sha256: &version.sha256,
            size: version.size,
            created_unix: version.created_unix,
            abi: version.abi,
            oci: version.oci.as_ref(),
        }
    }
}

/// `GET /v1/functions`: every deployed function, by name.
pub fn list(state: &AppState) -> Result<Response<Body>, ApiError> {
    let slots = state.functions.list();
    let functions: Vec<FunctionSummary> = slots
        .iter()
        .map(|f| FunctionSummary::new(&f.name, &f.version))
        .collect();
    json(
        StatusCode::OK,
        &serde_json::json!({ "functions": functions }),
    )
}

/// `GET /v1/functions/{name}`: the version served here, the versions the
/// registry keeps (each with what superseded it), and the policy in force.
pub fn describe(
    state: &AppState,
    name: &FunctionName,
    caller: &Caller,
) -> Result<Response<Body>, ApiError> {
    let functions = &state.functions;
    let record = functions
        .record(name)
        .filter(|r| r.serving.is_some() || r.entry.active().is_some())
        .ok_or_else(|| ApiError::not_found(format!("no function named {name}")))?;
    let loaded = functions.lookup(name.as_str());
    let entry = &record.entry;
    let active = entry.active().map(|v| v.id);
    let versions = versions_json(functions, &record);
    let serving = record.serving.as_ref();
    let head = entry.head.as_ref();
    json(
        StatusCode::OK,
        &serde_json::json!({
            "name": name,
            "version": serving.map(|v| v.version),
            "sha256": serving.map(|v| &v.sha256),
            "size": serving.map(|v| v.size),
            "created_unix": serving.map(|v| v.created_unix),
            "abi": serving.map(|v| v.abi),
            "oci": serving.and_then(|v| v.oci.as_ref()),
            "loaded": loaded.is_some_and(|slot| slot.get().is_some()),
            "active": active,
            "converged": serving.map(|v| v.version) == active,
            "changed_by": head.map(|h| &h.origin),
            "changed_ms": head.map(|h| stamp_ms(h.stamp)),
            "versions": versions,
            "apply_error": state.cluster().and_then(|c| c.apply_error(name.as_str())),
            "policy": policy_json(state, name, caller),
        }),
    )
}

/// The versions the registry keeps of a function, oldest first, each with
/// where and when it was deployed and what superseded it.
pub(super) fn versions_json(
    functions: &crate::functions::Functions,
    record: &crate::store::FunctionRecord,
) -> Vec<serde_json::Value> {
    let entry = &record.entry;
    let active = entry.active().map(|v| v.id);
    let serving = record.serving.as_ref();
    entry
        .versions
        .iter()
        .map(|v| {
            serde_json::json!({
                "version": v.id,
                "sha256": v.sha256,
                "size": v.size,
                "created_unix": stamp_ms(v.stamp) / 1000,
                "deployed_ms": stamp_ms(v.stamp),
                "stamp": v.stamp,
                "origin": v.origin,
                "parent": v.parent,
                "active": Some(v.id) == active,
                "superseded_by": entry.superseded_by(v.id),
                "module_here": functions.store.has_module(&v.sha256),
                "oci": record.oci.get(&v.id),
                // Known once compiled here: for the version served.
                "abi": serving.filter(|s| s.version == v.id).map(|s| s.abi),
            })
        })
        .collect()
}

/// The policy in force (as written in its file) and the last load error;
/// for any reader but the admin, what may be a credential redacted.
fn policy_json(state: &AppState, name: &FunctionName, caller: &Caller) -> serde_json::Value {
    let policies = &state.functions.policies;
    let status = policies.status(name);
    let shown = status.policy.as_ref().map(|p| match caller {
        Caller::Root => p.source.clone(),
        Caller::Token(_) => p.source.redacted(),
    });
    serde_json::json!({
        "in_force": shown,
        "loaded_unix": status.loaded_unix,
        "error": status.error.as_ref().map(|e| shown_error(e, caller)),
        "file": policies.dir().join(format!("{name}.toml")),
    })
}

/// A policy's load error as `caller` may see it: a parse error quotes the
/// file's line, which may hold a credential, so only the admin sees it.
pub(super) fn shown_error(error: &lichen_core::policy::PolicyError, caller: &Caller) -> String {
    match caller {
        Caller::Root => error.to_string(),
        Caller::Token(_) => format!(
            "{}: the policy does not load (the admin token sees why)",
            error.file
        ),
    }
}

/// `GET /v1/functions/{name}/policy`.
pub fn get_policy(
    state: &AppState,
    name: &FunctionName,
    caller: &Caller,
) -> Result<Response<Body>, ApiError> {
    json(StatusCode::OK, &policy_json(state, name, caller))
}

/// `GET /v1/routes`: which function each name (and path prefix) of a
/// policy's `[http]` reaches, as this host routes them.
pub fn routes(state: &AppState) -> Result<Response<Body>, ApiError> {
    let routes: Vec<serde_json::Value> = state
        .functions
        .policies
        .routes()
        .list()
        .into_iter()
        .map(|(host, prefix, function)| {
            serde_json::json!({
                "host": host,
                "path_prefix": if prefix.is_empty() { "/".to_string() } else { prefix },
                "function": function.as_str(),
            })
        })
        .collect();
    json(StatusCode::OK, &serde_json::json!({ "routes": routes }))
}

/// Validates a TOML policy and writes it to the policies directory, where it
/// takes effect at once (files stay the single source of truth).
pub async fn put_policy(
    state: &Arc<AppState>,
    name: &FunctionName,
    caller: &Caller,
    req: hyper::Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let bytes = body::read_capped(req, MAX_POLICY_BYTES, state.limits.body_idle_timeout).await?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| ApiError::bad_request("invalid_policy", "the policy is not UTF-8 text"))?;
    // Function tokens are kept, shown and gossiped as hashes only.
    let hashed = lichen_core::policy::hash_access_tokens(text);
    let text = hashed.as_deref().unwrap_or(text);
    state.functions.check_policy_size(name, text)?;
    // Parsed once for the checks; a text that does not parse is refused by
    // the write below, with what is wrong with it.
    let file = toml::from_str::<lichen_core::policy::PolicyFile>(text).map_err(|e| {
        ApiError::bad_request("invalid_policy", e.to_string().trim_end().to_string())
    })?;
    // A policy read with a scoped token and written back would otherwise
    // make `<redacted>` a working token, or a value.
    if file.redacted_anywhere() {
        return Err(ApiError::bad_request(
            "invalid_policy",
            format!(
                "the policy holds {:?} (what a redacted read shows) as a value or token: write the real values",
                lichen_core::policy::REDACTED
            ),
        ));
    }
    super::scoped::check(state, caller, &file).await?;
    check_streams(state, &file).await?;
    let policies = Arc::clone(&state.functions.policies);
    let name_owned = name.clone();
    let text = text.to_string();
    let text_for_cluster = text.clone();
    let written = tokio::task::spawn_blocking(move || policies.write(&name_owned, &text))
        .await
        .map_err(|e| ApiError::internal(anyhow::anyhow!("policy write task failed: {e}")))?;
    match written {
        Ok(_) => {
            tracing::info!(function = %name, "policy written through the admin API");
            let functions = &state.functions;
            let guard = functions.lock_admin().await;
            if functions.set_policy(&guard, name, text_for_cluster).await? {
                publish(state, name).await;
            }
            drop(guard);
            json(StatusCode::OK, &policy_json(state, name, caller))
        }
        Err(WriteError::Invalid(error)) => {
            Err(ApiError::bad_request("invalid_policy", error.to_string()))
        }
        Err(WriteError::Io(error)) => Err(ApiError::internal(error)),
    }
}

/// A policy's NATS triggers name streams NATS has (when NATS answers: one
/// that does not is the trigger's status error, retried).
async fn check_streams(
    state: &AppState,
    file: &lichen_core::policy::PolicyFile,
) -> Result<(), ApiError> {
    if file.triggers.nats.is_empty() {
        return Ok(());
    }
    let Some((js, _)) = state.functions.kv.nats_context() else {
        return Err(ApiError::bad_request(
            "invalid_policy",
            "[[triggers.nats]] consumes the NATS of the key-value backend: this host runs without one (start it with --kv-backend nats)",
        ));
    };
    for (index, trigger) in file.triggers.nats.iter().enumerate() {
        let refused = |message: String| {
            Err(ApiError::bad_request(
                "invalid_policy",
                format!("triggers.nats[{index}]: {message}"),
            ))
        };
        let stream = &trigger.stream.0;
        // NATS not answering in time is not the policy's fault: the
        // consumer says so on /v1/status.
        let stream = match tokio::time::timeout(STREAM_CHECK, js.get_stream(stream)).await {
            Ok(Ok(found)) => found,
            Ok(Err(error)) if crate::kv::nats::is_not_found(&error) => {
                return refused(format!(
                    "stream = {stream:?}: NATS has no such stream (make it first, e.g. `nats stream add`)"
                ));
            }
            _ => continue,
        };
        let config = &stream.cached_info().config;
        // A stream made without subjects takes its name as its subject.
        let subjects = if config.subjects.is_empty() {
            std::slice::from_ref(&config.name)
        } else {
            &config.subjects[..]
        };
        if let Some(subject) = &trigger.subject
            && !subjects.iter().any(|s| subject.overlaps(s))
        {
            return refused(format!(
                "subject = {:?} matches nothing the stream {:?} holds (its subjects: {})",
                subject.0,
                config.name,
                subjects.join(", ")
            ));
        }
    }
    Ok(())
}

/// How long a policy write waits for NATS to say whether a stream exists.
const STREAM_CHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// `PUT /v1/functions/{name}`: validate, compile, store and activate an
/// upload; `201`, or `200` when it is the active version already.
pub async fn deploy(
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
    state
        .functions
        .metrics
        .deploys
        .with_label_values(&[outcome])
        .inc();
    result
}

/// A deploy's JSON body: where to pull the component from.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployFrom {
    oci: String,
}

async fn deploy_inner(
    state: &Arc<AppState>,
    name: FunctionName,
    req: hyper::Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let is_json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    let (bytes, oci) = if is_json {
        let body =
            body::read_capped(req, MAX_JSON_BODY_BYTES, state.limits.body_idle_timeout).await?;
        let from: DeployFrom = serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(
                "invalid_deploy",
                format!("a JSON deploy body is {{\"oci\": \"REGISTRY/REPOSITORY[:TAG][@sha256:DIGEST]\"}}: {e}"),
            )
        })?;
        let pulled = state
            .registries
            .pull(&from.oci, state.limits.max_upload)
            .await?;
        tracing::info!(function = %name, reference = %from.oci, manifest = %pulled.source.manifest_digest, "pulled from a registry");
        (bytes::Bytes::from(pulled.bytes), Some(pulled.source))
    } else {
        let bytes =
            body::read_capped(req, state.limits.max_upload, state.limits.body_idle_timeout).await?;
        (bytes, None)
    };
    let size = bytes.len() as u64;
    let functions = &state.functions;
    let guard = functions.lock_admin().await;
    let Some(version) = functions.deploy(&guard, &name, bytes, oci).await? else {
        // The same bytes again: nothing changes, and the answer says so.
        let active = functions.lookup(name.as_str()).ok_or_else(|| {
            ApiError::internal(anyhow::anyhow!("{name} is active but not in the table"))
        })?;
        return json(
            StatusCode::OK,
            &FunctionSummary::new(&name, &active.version),
        );
    };
    publish(state, &name).await;
    drop(guard);
    tracing::info!(function = %name, version = version.version, sha256 = %version.sha256, size, "deployed");
    let body = FunctionSummary::new(&name, &version);
    json(StatusCode::CREATED, &body)
}

/// Gossips this host's record of `name` to the cluster, if any. Callers
/// hold the admin lock: published before it is let go, so no entry being
/// applied meanwhile is published after it.
async fn publish(state: &AppState, name: &FunctionName) {
    if let Some(cluster) = state.cluster() {
        cluster.publish(&state.functions, name).await;
    }
}

/// The body of `POST /v1/functions/{name}/rollback` (empty: the version
/// before the active one).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackTo {
    version: u64,
}

/// `POST /v1/functions/{name}/rollback`: makes a remembered version active
/// again, the one before the active version unless the body names one. A
/// change like a deploy: peers apply it too.
pub async fn rollback(
    state: &Arc<AppState>,
    name: &FunctionName,
    req: hyper::Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let bytes = body::read_capped(req, MAX_JSON_BODY_BYTES, state.limits.body_idle_timeout).await?;
    let wanted = if bytes.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let to: RollbackTo = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::bad_request(
                "invalid_rollback",
                format!("the body must be empty or {{\"version\": N}}: {e}"),
            )
        })?;
        Some(to.version)
    };
    let functions = &state.functions;
    let guard = functions.lock_admin().await;
    let from = functions.lookup(name.as_str()).map(|f| f.version.version);
    let version = functions.rollback(&guard, name, wanted).await?;
    if from != Some(version.version) {
        publish(state, name).await;
        tracing::info!(function = %name, from, to = version.version, sha256 = %version.sha256, "rolled back");
    }
    drop(guard);
    json(StatusCode::OK, &FunctionSummary::new(name, &version))
}

/// `DELETE /v1/functions/{name}`. The function's key-value data stays
/// (a redeploy finds it) unless the query says `purge_kv=true`.
pub async fn delete(
    state: &AppState,
    name: &FunctionName,
    query: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let purge_kv = match query_flag(query, "purge_kv") {
        Ok(flag) => flag,
        Err(why) => return Err(ApiError::bad_request("invalid_query", why)),
    };
    let functions = &state.functions;
    let guard = functions.lock_admin().await;
    if !functions.delete(&guard, name).await? {
        return Err(ApiError::not_found(format!("no function named {name}")));
    }
    if purge_kv {
        let stores = functions
            .kv
            .stores(name.as_str())
            .await
            .map_err(kv_unavailable)?;
        for (label, _) in stores {
            functions
                .kv
                .purge(&Scope::new(name.as_str(), &label))
                .await
                .map_err(kv_unavailable)?;
        }
    }
    if let Some(cluster) = state.cluster() {
        cluster.forget_function(name.as_str());
    }
    publish(state, name).await;
    drop(guard);
    tracing::info!(function = %name, purge_kv, "deleted");
    json(
        StatusCode::OK,
        &serde_json::json!({ "name": name, "deleted": true, "purged_kv": purge_kv }),
    )
}

/// A `true`/`false` query parameter (absent: false).
fn query_flag(query: Option<&str>, name: &str) -> Result<bool, String> {
    match super::query_param(query, name) {
        None | Some("false" | "0") => Ok(false),
        Some("true" | "1") => Ok(true),
        Some(other) => Err(format!("{name}={other:?}: use true or false")),
    }
}

/// `GET /v1/functions/{name}/kv`: each store the function is granted or
/// has data in, with what it holds against the policy's limits.
pub async fn kv_usage(state: &AppState, name: &FunctionName) -> Result<Response<Body>, ApiError> {
    let functions = &state.functions;
    let stored = functions
        .kv
        .stores(name.as_str())
        .await
        .map_err(kv_unavailable)?;
    let deployed = functions.lookup(name.as_str()).is_some();
    if !deployed && stored.is_empty() {
        return Err(ApiError::not_found(format!(
            "no function named {name}, and no key-value data of one"
        )));
    }
    let grant = functions
        .policies
        .get(name)
        .map(|policy| policy.keyvalue.clone())
        .unwrap_or_default();
    let mut labels: Vec<String> = grant.stores.clone();
    for (label, _) in &stored {
        if !labels.contains(label) {
            labels.push(label.clone());
        }
    }
    labels.sort();
    let stores: Vec<serde_json::Value> = labels
        .iter()
        .map(|label| {
            let usage = stored
                .iter()
                .find(|(l, _)| l == label)
                .map(|(_, usage)| *usage)
                .unwrap_or_default();
            serde_json::json!({
                "label": label,
                "granted": grant.stores.contains(label),
                "keys": usage.keys,
                "bytes": usage.bytes,
                "max_keys": grant.max_keys,
                "max_bytes": grant.max_bytes,
            })
        })
        .collect();
    json(
        StatusCode::OK,
        &serde_json::json!({
            "name": name,
            "backend": functions.kv.kind(),
            "stores": stores,
        }),
    )
}

/// `DELETE /v1/functions/{name}/kv/{label}`: deletes everything in one
/// store of a function (deployed or not: data outlives a delete).
pub async fn kv_purge(
    state: &AppState,
    name: &FunctionName,
    label: &str,
) -> Result<Response<Body>, ApiError> {
    let label = StoreLabel::try_from(label.to_string())
        .map_err(|why| ApiError::bad_request("invalid_label", why))?;
    let scope = Scope::new(name.as_str(), &label.0);
    state
        .functions
        .kv
        .purge(&scope)
        .await
        .map_err(kv_unavailable)?;
    tracing::info!(function = %name, store = %label.0, "key-value store purged");
    json(
        StatusCode::OK,
        &serde_json::json!({ "name": name, "label": label.0, "purged": true }),
    )
}

fn kv_unavailable(error: KvError) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "kv_unavailable",
        error.to_string(),
    )
}

/// `GET /v1/internal/modules/{sha256}`: a module's bytes, for a peer.
pub fn module(state: &AppState, sha256: &str) -> Result<Response<Body>, ApiError> {
    let store = &state.functions.store;
    let valid = sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit());
    if !valid || !store.has_module(sha256) {
        return Err(ApiError::not_found(format!("no module {sha256}")));
    }
    let bytes = store.read_module(sha256)?;
    let mut response = Response::new(full_body(bytes));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/wasm"),
    );
    Ok(response)
}

/// `GET /v1/peers`: the live peers and what they advertise.
pub fn peers(state: &AppState) -> Result<Response<Body>, ApiError> {
    let Some(cluster) = state.cluster() else {
        return json(
            StatusCode::OK,
            &serde_json::json!({
                "node_id": null,
                "kv": null,
                "peers": [],
            }),
        );
    };
    let peers: Vec<serde_json::Value> = cluster
        .peers()
        .iter()
        .map(|peer| {
            let mut functions: Vec<_> = peer
                .functions
                .keys()
                .filter_map(|name| {
                    let (version, sha256) = peer.serving(name)?;
                    Some(serde_json::json!({ "name": name, "version": version, "sha256": sha256 }))
                })
                .collect();
            functions.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
            serde_json::json!({
                "node_id": peer.node_id,
                "api": peer.api,
                "gossip": peer.gossip,
                "free_slots": peer.free_slots,
                "load": peer.load,
                "kv": peer.kv,
                "modules": peer.modules,
                "clock_offset_ms": peer.clock_offset_ms,
                "functions": functions,
            })
        })
        .collect();
    json(
        StatusCode::OK,
        &serde_json::json!({
            "node_id": cluster.node_id(),
            "kv": cluster.kv_identity(),
            "peers": peers,
        }),
    )
}
