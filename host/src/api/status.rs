//! `GET /v1/status`: what the status page shows, as JSON, from the host's
//! own counters and its recent history (`recent.rs`), never from its
//! `/metrics` text. `?function=NAME` adds that function's detail: its policy
//! in force and the last load error, its versions, its last invocations and
//! its guest's last log lines.

use std::time::Instant;

use anyhow::Context;
use http::{Response, StatusCode};
use serde_json::{Value, json};

use super::{AppState, json};
use crate::error::{ApiError, Body};
use crate::names::FunctionName;

/// When this process started, for uptime.
static STARTED: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Marks the start of the process (called when the server binds).
pub fn mark_start() {
    STARTED.get_or_init(Instant::now);
}

pub async fn status(
    state: &AppState,
    query: Option<&str>,
    caller: &super::auth::Caller,
) -> Result<Response<Body>, ApiError> {
    let detail = match super::query_param(query, "function") {
        Some(name) => Some(
            FunctionName::new(name)
                .map_err(|e| ApiError::bad_request("invalid_name", e.to_string()))?,
        ),
        None => None,
    };
    let functions = &state.functions;
    let mut slots = functions.list();
    slots.sort_by(|a, b| a.name.cmp(&b.name));
    let mut total_rate = 0.0;
    let mut rows = Vec::with_capacity(slots.len());
    for slot in &slots {
        let name = slot.name.as_str();
        let summary = functions.recent.summary(name);
        total_rate += summary.requests_per_second;
        let policy = functions.policies.status(&slot.name);
        let (in_flight, queued) = functions.scheduler.load(name);
        let outcomes: serde_json::Map<String, Value> = functions
            .metrics
            .invocations_of(name)
            .into_iter()
            .map(|(outcome, count)| (outcome, json!(count)))
            .collect();
        let memory_peak = functions.metrics.memory_peak_of(name);
        let triggers: Vec<Value> = policy
            .policy
            .as_ref()
            .map(|p| {
                let cron = state
                    .cron
                    .status(name, &p.cron)
                    .into_iter()
                    .map(|t| json!(t));
                let nats = state
                    .queues
                    .status(name, &p.nats)
                    .into_iter()
                    .map(|t| json!(t));
                cron.chain(nats).collect()
            })
            .unwrap_or_default();
        rows.push(json!({
            "name": name,
            "version": slot.version.version,
            "abi": slot.version.abi,
            "sha256": slot.version.sha256,
            "size": slot.version.size,
            "created_unix": slot.version.created_unix,
            "public": policy.policy.as_ref().map(|p| p.public),
            "policy_error": policy.error.as_ref().map(|e| super::admin::shown_error(e, caller)),
            "loaded": slot.get().is_some(),
            "requests_per_second": summary.requests_per_second,
            "p50_ms": summary.p50_ms,
            "p99_ms": summary.p99_ms,
            "history": summary.history,
            "invocations": outcomes,
            "in_flight": in_flight,
            "queued": queued,
            "memory_peak_bytes": memory_peak,
            "triggers": triggers,
        }));
    }
    let (cpu_seconds, rss_bytes) = functions.metrics.process();
    let loaded = slots.iter().filter(|s| s.get().is_some()).count();
    let cluster = state.cluster().map(|cluster| {
        let forwarded = functions.metrics.forwarded_by_peer();
        let mut peers: Vec<Value> = cluster
            .peers()
            .iter()
            .map(|peer| {
                json!({
                    "node_id": peer.node_id,
                    "api": peer.api,
                    "alive": true,
                    "load": peer.load,
                    "free_slots": peer.free_slots,
                    "functions": peer.functions.keys().filter(|f| peer.serving(f).is_some()).count(),
                    "forwarded": forwarded.get(&peer.node_id).copied().unwrap_or(0),
                    "clock_offset_ms": peer.clock_offset_ms,
                    "clock_off": peer.clock_offset_ms.is_some_and(|o| {
                        o.unsigned_abs() > crate::cluster::MAX_CLOCK_OFFSET.as_millis() as u64
                    }),
                })
            })
            .collect();
        peers.extend(cluster.departed().iter().map(|peer| {
            json!({
                "node_id": peer.node_id,
                "api": peer.api,
                "alive": false,
                "load": null,
                "free_slots": null,
                "functions": null,
                "forwarded": forwarded.get(&peer.node_id).copied().unwrap_or(0),
                "clock_offset_ms": null,
                "clock_off": false,
            })
        }));
        json!({
            "node_id": cluster.node_id(),
            "peers": peers,
            "conflicts": cluster.conflicts(),
            "apply_errors": cluster.apply_errors(),
        })
    });
    let mut body = json!({
        "host": {
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": STARTED.get().map_or(0, |t| t.elapsed().as_secs()),
            "cpu_seconds": cpu_seconds,
            "rss_bytes": rss_bytes,
            "invocations_per_second": total_rate,
            "functions": slots.len(),
            "loaded_functions": loaded,
            "max_loaded_functions": functions.max_loaded(),
            "draining": state.draining(),
        },
        "functions": rows,
        "cluster": cluster,
    });
    if let Some(name) = detail {
        body["function"] = function_detail(state, &name, caller)?;
    }
    json(StatusCode::OK, &body)
}

/// One function's policy, versions, recent invocations and log lines.
/// For any reader but the admin, what may be a credential is redacted.
fn function_detail(
    state: &AppState,
    name: &FunctionName,
    caller: &super::auth::Caller,
) -> Result<Value, ApiError> {
    let functions = &state.functions;
    let record = functions
        .record(name)
        .filter(|r| r.serving.is_some())
        .ok_or_else(|| ApiError::not_found(format!("no function named {name}")))?;
    let policy = functions.policies.status(name);
    let shown = policy.policy.as_ref().map(|p| match caller {
        super::auth::Caller::Root => p.source.clone(),
        super::auth::Caller::Token(_) => p.source.redacted(),
    });
    // The policy as a person would write it, for the page.
    let in_force_toml = shown
        .as_ref()
        .map(toml::to_string)
        .transpose()
        .context("writing a policy as TOML")?;
    Ok(json!({
        "name": name,
        "active": record.serving.as_ref().map(|s| s.version),
        "versions": super::admin::versions_json(functions, &record),
        "apply_error": state.cluster().and_then(|c| c.apply_error(name.as_str())),
        "policy": {
            "in_force": shown,
            "in_force_toml": in_force_toml,
            "error": policy.error.as_ref().map(|e| super::admin::shown_error(e, caller)),
            "loaded_unix": policy.loaded_unix,
        },
        "invocations": functions.recent.invocations(name.as_str()),
        "log": functions.recent.log(name.as_str()),
    }))
}
