//! `/v1/secrets`: set, list and remove the secrets policies name. A value
//! goes in (the body of a `PUT`) and never comes out: answers carry the
//! name, a digest and when it was set.

use std::sync::Arc;

use http::{Response, StatusCode};
use hyper::body::Incoming;

use super::auth::Caller;
use super::{AppState, body, json};
use crate::error::{ApiError, Body};
use crate::policy::SecretName;
use crate::secrets::{MAX_SECRET_BYTES, SetError};
use lichen_core::scopes::Needed;

/// `GET /v1/secrets`: those the caller may manage.
pub fn list(state: &Arc<AppState>, caller: &Caller) -> Result<Response<Body>, ApiError> {
    let mut secrets = state.functions.secrets.list();
    secrets.retain(|secret| caller.may(Needed::Secret(&secret.name)));
    json(StatusCode::OK, &serde_json::json!({ "secrets": secrets }))
}

/// `PUT /v1/secrets/{name}`: the body is the value (UTF-8 text, as
/// `wasi:config` hands it to guests). `201` when new, `200` when replaced;
/// functions see the new value from their next invocation.
pub async fn set(
    state: &Arc<AppState>,
    name: &str,
    req: hyper::Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let name = secret_name(name)?;
    let value =
        body::read_capped(req, MAX_SECRET_BYTES as u64, state.limits.body_idle_timeout).await?;
    let functions = Arc::clone(&state.functions);
    let existed = functions.secrets.contains(&name.0);
    let set_name = name.clone();
    let set = tokio::task::spawn_blocking(move || {
        functions
            .secrets
            .set(
                &functions.store,
                &set_name,
                &value,
                functions.origin(),
                |seen| functions.tick_after(seen),
            )
            .inspect(|_| functions.policies.reload_failed())
    })
    .await
    .map_err(|e| ApiError::internal(anyhow::anyhow!("secret write task failed: {e}")))?;
    match set {
        Ok(info) => {
            tracing::info!(secret = %name.0, "secret set through the admin API");
            publish(state, &name).await;
            let status = if existed {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            json(status, &info)
        }
        Err(SetError::Invalid(message)) => Err(ApiError::bad_request("invalid_secret", message)),
        Err(SetError::Full) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "too_many_secrets",
            format!(
                "this host holds {} secrets, its maximum; remove one first",
                crate::secrets::MAX_SECRETS
            ),
        )),
        Err(SetError::Store(error)) => Err(ApiError::internal(error)),
    }
}

/// `DELETE /v1/secrets/{name}`: refused (`409`) while a policy in force
/// names it, so no function loses a value it was promised.
pub async fn delete(state: &Arc<AppState>, name: &str) -> Result<Response<Body>, ApiError> {
    let name = secret_name(name)?;
    let users = state.functions.policies.users_of_secret(&name.0);
    if !users.is_empty() {
        let users: Vec<String> = users.iter().map(ToString::to_string).collect();
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "secret_in_use",
            format!(
                "secret {:?} is named by the policy of {}; change those policies first",
                name.0,
                users.join(", ")
            ),
        ));
    }
    let functions = Arc::clone(&state.functions);
    let removed_name = name.clone();
    let removed = tokio::task::spawn_blocking(move || {
        functions.secrets.remove(
            &functions.store,
            &removed_name,
            functions.origin(),
            |seen| functions.tick_after(seen),
        )
    })
    .await
    .map_err(|e| ApiError::internal(anyhow::anyhow!("secret removal task failed: {e}")))?
    .map_err(ApiError::internal)?;
    if !removed {
        return Err(ApiError::not_found(format!("no secret {:?}", name.0)));
    }
    tracing::info!(secret = %name.0, "secret removed through the admin API");
    publish(state, &name).await;
    json(StatusCode::OK, &serde_json::json!({ "removed": name.0 }))
}

/// Gossips this host's version of `name` to the cluster, if any.
async fn publish(state: &AppState, name: &SecretName) {
    if let Some(cluster) = state.cluster() {
        cluster
            .publish_secret(&state.functions.secrets, &name.0)
            .await;
    }
}

fn secret_name(name: &str) -> Result<SecretName, ApiError> {
    SecretName::try_from(name.to_string())
        .map_err(|message| ApiError::bad_request("invalid_name", message))
}
