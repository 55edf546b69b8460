//! `/v1/tokens`: make, list and revoke scoped API tokens. A token is in
//! the answer that made it and nowhere else; listings show names, scopes
//! and times.

use std::sync::Arc;
use std::time::Duration;

use http::{Response, StatusCode};
use hyper::body::Incoming;
use serde::Deserialize;

use super::auth::Caller;
use super::{AppState, body, json};
use crate::error::{ApiError, Body};
use crate::tokens::{CreateError, MAX_TOKENS, check_name, parse_scopes};

/// The largest request body of `POST /v1/tokens`.
const MAX_REQUEST_BYTES: u64 = 16 << 10;
/// The longest a token may be made to last.
const MAX_LIFETIME: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRequest {
    name: String,
    scopes: Vec<String>,
    /// `"90d"`, `"12h"`, `"30m"`, `"45s"`, or seconds; never, without it.
    #[serde(default)]
    expires_in: Option<Lifetime>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Lifetime {
    Seconds(u64),
    Text(String),
}

impl Lifetime {
    fn duration(&self) -> Result<Duration, String> {
        let duration = match self {
            Lifetime::Seconds(seconds) => Duration::from_secs(*seconds),
            Lifetime::Text(text) => {
                let days_or_hours = text
                    .strip_suffix('d')
                    .map(|n| (n, 24 * 3600))
                    .or_else(|| text.strip_suffix('h').map(|n| (n, 3600)));
                match days_or_hours {
                    Some((n, unit)) => {
                        let n: u64 = n.parse().map_err(|_| {
                            format!("expires_in {text:?} is not a duration, like \"90d\", \"12h\", \"30m\" or \"45s\"")
                        })?;
                        Duration::from_secs(n.saturating_mul(unit))
                    }
                    None => lichen_core::policy::parse_duration(text)?,
                }
            }
        };
        if duration.is_zero() || duration > MAX_LIFETIME {
            return Err(format!(
                "expires_in must be more than nothing and at most ten years ({}s given)",
                duration.as_secs()
            ));
        }
        Ok(duration)
    }
}

/// `POST /v1/tokens`: `201` with the token, which is never shown again.
pub async fn create(
    state: &Arc<AppState>,
    caller: &Caller,
    req: hyper::Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let bytes = body::read_capped(req, MAX_REQUEST_BYTES, state.limits.body_idle_timeout).await?;
    let asked: CreateRequest = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad_request(
            "invalid_token",
            format!("the body must be {{\"name\", \"scopes\": [...], \"expires_in\"}}: {e}"),
        )
    })?;
    check_name(&asked.name).map_err(|m| ApiError::bad_request("invalid_name", m))?;
    let scopes =
        parse_scopes(&asked.scopes).map_err(|m| ApiError::bad_request("invalid_token", m))?;
    // A scoped maker gives only what it holds: each scope covered by one
    // of its own (`tokens:admin` alone makes no root).
    if let Caller::Token(maker) = caller
        && let Some(wider) = scopes
            .iter()
            .find(|asked| !maker.scopes.iter().any(|held| held.covers(asked)))
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "missing_scope",
            format!(
                "the token {:?} cannot give {wider}: a token gives only scopes it holds itself, with patterns as narrow or narrower",
                maker.name
            ),
        ));
    }
    let expires_unix_ms = match &asked.expires_in {
        Some(lifetime) => {
            let lifetime = lifetime
                .duration()
                .map_err(|m| ApiError::bad_request("invalid_token", m))?;
            Some(crate::recent::now_unix_ms().saturating_add(lifetime.as_millis() as u64))
        }
        None => None,
    };
    let functions = Arc::clone(&state.functions);
    let name = asked.name.clone();
    let made = tokio::task::spawn_blocking(move || {
        functions.tokens.create(
            &functions.store,
            &name,
            asked.scopes,
            expires_unix_ms,
            functions.origin(),
            |seen| functions.tick_after(seen),
        )
    })
    .await
    .map_err(|e| ApiError::internal(anyhow::anyhow!("token write task failed: {e}")))?;
    match made {
        Ok((token, info)) => {
            tracing::info!(token = %info.name, scopes = ?info.scopes, "API token made");
            publish(state, &info.name).await;
            let mut answer = serde_json::to_value(&info).map_err(anyhow::Error::from)?;
            answer["token"] = serde_json::Value::String(token);
            json(StatusCode::CREATED, &answer)
        }
        Err(CreateError::Exists) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "token_exists",
            format!(
                "a token named {:?} exists; revoke it first or choose another name",
                asked.name
            ),
        )),
        Err(CreateError::Full) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "too_many_tokens",
            format!(
                "this host keeps at most {MAX_TOKENS} live tokens (revoked and expired ones are collected a week after)"
            ),
        )),
        Err(CreateError::Store(error)) => Err(ApiError::internal(error)),
    }
}

/// `GET /v1/tokens`: names, scopes and times; never a token.
pub fn list(state: &AppState) -> Result<Response<Body>, ApiError> {
    let tokens = state.functions.tokens.list();
    json(StatusCode::OK, &serde_json::json!({ "tokens": tokens }))
}

/// `DELETE /v1/tokens/{name}`: refused everywhere from the next gossip
/// round on.
pub async fn revoke(state: &Arc<AppState>, name: &str) -> Result<Response<Body>, ApiError> {
    check_name(name).map_err(|m| ApiError::bad_request("invalid_name", m))?;
    let functions = Arc::clone(&state.functions);
    let revoked_name = name.to_string();
    let revoked = tokio::task::spawn_blocking(move || {
        functions.tokens.revoke(
            &functions.store,
            &revoked_name,
            functions.origin(),
            |seen| functions.tick_after(seen),
        )
    })
    .await
    .map_err(|e| ApiError::internal(anyhow::anyhow!("token revocation task failed: {e}")))?
    .map_err(ApiError::internal)?;
    if !revoked {
        return Err(ApiError::not_found(format!("no token named {name:?}")));
    }
    tracing::info!(token = name, "API token revoked");
    publish(state, name).await;
    json(StatusCode::OK, &serde_json::json!({ "revoked": name }))
}

/// Gossips this host's version of the token `name`, if in a cluster.
async fn publish(state: &AppState, name: &str) {
    if let Some(cluster) = state.cluster() {
        cluster.publish_token(&state.functions.tokens, name).await;
    }
}
