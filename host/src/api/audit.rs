//! The admin side of the audit log ([`crate::audit`]): which routes are
//! changes, each one's line written before its answer goes out, and
//! `GET /v1/audit`.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Response, StatusCode};
use http_body_util::BodyExt;

use super::auth::Caller;
use super::{AppState, Handler, Params, Route, json, query_param};
use crate::audit::{Entry, MAX_READ};
use crate::error::{ApiError, Body, full_body};

/// Whether `handler` changes something the audit log records.
pub fn records(handler: Handler) -> bool {
    matches!(
        handler,
        Handler::Deploy
            | Handler::Delete
            | Handler::PutPolicy
            | Handler::KvPurge
            | Handler::Rollback
            | Handler::SetSecret
            | Handler::DeleteSecret
            | Handler::CreateToken
            | Handler::RevokeToken
            | Handler::RunTrigger
    )
}

/// Lines of refusals without a known token a host writes per second at
/// most: enough to see an attack, too few to rotate the history away.
const ANONYMOUS_PER_SECOND: u64 = 5;

/// Whether a line for a refusal without a known token may be written now.
pub fn anonymous_allowed() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static WINDOW: AtomicU64 = AtomicU64::new(0);
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let second = crate::recent::now_unix_ms() / 1000;
    if WINDOW.swap(second, Ordering::Relaxed) != second {
        COUNT.store(0, Ordering::Relaxed);
    }
    COUNT.fetch_add(1, Ordering::Relaxed) < ANONYMOUS_PER_SECOND
}

/// The longest path a line keeps.
const MAX_WHAT: usize = 256;

/// A change asked for: by which token, from where, what (its method
/// and path).
pub struct Attempt<'a> {
    pub token: &'a str,
    pub client: SocketAddr,
    pub what: &'a str,
}

/// The line of `attempt` at `route`, before its outcome.
fn entry_of(attempt: &Attempt<'_>, route: &Route, params: Params<'_>) -> Entry {
    let what = match attempt.what.char_indices().nth(MAX_WHAT) {
        Some((at, _)) => &attempt.what[..at],
        None => attempt.what,
    };
    let mut entry = Entry::now(attempt.token, what);
    entry.client = Some(attempt.client.ip().to_string());
    let named = params.get(0).to_string();
    if route.path.starts_with("/v1/functions/") {
        entry.function = Some(named);
    } else if !named.is_empty() {
        entry.name = Some(named);
    }
    entry
}

/// Writes the line of a change a scoped token was refused (its scope, or
/// its expiry or revocation).
pub async fn note_refused(
    state: &AppState,
    attempt: Attempt<'_>,
    route: &Route,
    params: Params<'_>,
    error: &ApiError,
) {
    let mut entry = entry_of(&attempt, route, params);
    entry.result = error.status.as_u16();
    entry.code = Some(error.code.to_string());
    state.functions.audit.record(entry).await;
}

/// Writes the line of a change `caller` asked for from `client` (`what`:
/// its method and path), then hands its answer on, unchanged.
pub async fn note(
    state: &AppState,
    caller: &Option<Caller>,
    client: SocketAddr,
    what: &str,
    route: &Route,
    params: Params<'_>,
    answer: Result<Response<Body>, ApiError>,
) -> Result<Response<Body>, ApiError> {
    let token = match caller {
        Some(Caller::Token(grant)) => grant.name.as_str(),
        Some(Caller::Root) | None => "admin",
    };
    let attempt = Attempt {
        token,
        client,
        what,
    };
    let mut entry = entry_of(&attempt, route, params);
    let answer = match answer {
        Ok(response) => {
            let (parts, body) = response.into_parts();
            // Admin answers are in memory already (a full body).
            let bytes = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .map_err(|e| ApiError::internal(anyhow::anyhow!("reading an answer: {e}")))?;
            entry.result = parts.status.as_u16();
            if let Ok(said) = serde_json::from_slice::<serde_json::Value>(&bytes) {
                entry.version = said["version"].as_u64();
                entry.sha256 = said["sha256"].as_str().map(str::to_string);
                if entry.name.is_none() && route.path == "/v1/tokens" {
                    entry.name = said["name"].as_str().map(str::to_string);
                }
            }
            Ok(Response::from_parts(parts, full_body(bytes)))
        }
        Err(error) => {
            entry.result = error.status.as_u16();
            entry.code = Some(error.code.to_string());
            Err(error)
        }
    };
    state.functions.audit.record(entry).await;
    answer
}

/// `GET /v1/audit?since=UNIX_MS&function=NAME`: the latest entries
/// (at most [`MAX_READ`]), oldest first.
pub async fn read(state: &Arc<AppState>, query: Option<&str>) -> Result<Response<Body>, ApiError> {
    let since = match query_param(query, "since") {
        None => 0,
        Some(text) => text.parse::<u64>().map_err(|_| {
            ApiError::bad_request(
                "invalid_query",
                format!("since={text:?} is not a time in Unix milliseconds"),
            )
        })?,
    };
    let function = query_param(query, "function").map(str::to_string);
    let audit = Arc::clone(&state.functions.audit);
    let entries = tokio::task::spawn_blocking(move || audit.read(since, function.as_deref()))
        .await
        .map_err(|e| ApiError::internal(anyhow::anyhow!("audit read task failed: {e}")))?
        .map_err(ApiError::internal)?;
    json(
        StatusCode::OK,
        &serde_json::json!({ "entries": entries, "limit": MAX_READ }),
    )
}
