//! The HTTP surface of a host: the route table, and the helpers every
//! handler shares to answer.
//!
//! The routes are data ([`ROUTES`], kept in `lichen_core::routes` so they
//! are fuzzed without a server): a method, a path pattern, who may call
//! it, and the handler. One table is what the router matches, what `405`'s
//! `Allow` lists, and what the test holding the OpenAPI document
//! (`host/openapi.json`) to account compares against, so a route cannot be
//! served without being documented.
//!
//! Where each concern lives: [`admin`] (deploy, list, describe, delete,
//! policies, peers, module bytes for peers), [`secrets`] (set, list and
//! remove secrets; values go in and never out), [`invoke`] (the invocation path
//! from arrival to response), [`map`] (one invocation per element of an
//! array), [`body`] (capped body reading, the invocation body type),
//! [`auth`] (the three kinds of token), [`tokens`] (scoped API tokens),
//! [`audit`] (each admin change's line, `GET /v1/audit`), [`observe`]
//! (metrics, health, the OpenAPI document), [`status`] (what the status
//! page shows, as JSON), [`ui`] (the status page), [`state`] (what
//! handlers share). A request whose `Host` a function's `[http]` claims
//! goes to that function before the route table is looked at.
//!
//! Every response carries `x-lichen-request-id`; every error is JSON, made in
//! one place (`ApiError::into_response`). Under `/v1`, a path that is not a
//! public route answers `401`/`403` before `404`/`405`, so a caller without
//! the admin token learns nothing about which admin routes exist.

pub mod admin;
pub mod audit;
pub mod auth;
pub mod body;
pub mod cron;
pub mod invoke;
pub mod map;
pub mod observe;
pub mod queue;
pub mod scoped;
pub mod secrets;
pub mod state;
pub mod status;
pub mod tokens;
pub mod ui;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use http::{HeaderValue, Response, StatusCode, header};
use hyper::body::Incoming;
use serde::Serialize;

use crate::error::{ApiError, Body, full_body};
use crate::names::FunctionName;
use body::RequestBody;
use lichen_core::routes::{self, Lookup};
pub use lichen_core::routes::{Access, Handler, Params, ROUTES, Route};
use lichen_core::scopes::{self, Needed};
pub use state::{ApiLimits, AppState};

pub const REQUEST_ID_HEADER: &str = "x-lichen-request-id";

/// The largest request head accepted (request line and headers), as common
/// proxies allow; hyper's read buffer bounds it only loosely.
pub const MAX_HEAD_BYTES: usize = 64 << 10;

/// Answers one request. Never fails: errors become JSON responses.
pub async fn handle(
    state: Arc<AppState>,
    req: hyper::Request<Incoming>,
    client: SocketAddr,
) -> Response<Body> {
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
        route_request(&state, req, &request_id, client).await
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

/// Finds the request's route, checks who is calling, and runs its handler.
async fn route_request(
    state: &Arc<AppState>,
    req: hyper::Request<Incoming>,
    request_id: &str,
    client: SocketAddr,
) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_owned();
    // A peer's signed request names its function in its path; a name a
    // function claims (a peer's own, say) never takes it.
    if !is_hosts_own(&path)
        && !req
            .headers()
            .contains_key(lichen_core::seal::SIGNATURE_HEADER)
        && let Some(function) = routed(state, &req)
    {
        return invoke_routed(state, req, &function, request_id).await;
    }
    let allowed = match routes::lookup(req.method(), &path) {
        Lookup::Found(route, params) if audit::records(route.handler) => {
            let what = format!("{} {path}", req.method());
            let caller = match route_caller(state, route, &params, &req) {
                Ok(caller) => caller,
                Err(error) => {
                    // Every refused change is noted: a known token by its
                    // name; a wrong one or none as such, at most a few a
                    // second (strangers cannot push the history out).
                    let token = match auth::token_name(state, &req) {
                        Some(name) => Some(name),
                        None if audit::anonymous_allowed() => {
                            Some(if req.headers().contains_key(http::header::AUTHORIZATION) {
                                "unknown".to_string()
                            } else {
                                "none".to_string()
                            })
                        }
                        None => None,
                    };
                    if let Some(token) = token {
                        let refused = audit::Attempt {
                            token: &token,
                            client,
                            what: &what,
                        };
                        audit::note_refused(state, refused, route, params, &error).await;
                    }
                    return Err(error);
                }
            };
            let answer = dispatch(state, route, params, req, request_id, caller.clone()).await;
            return audit::note(state, &caller, client, &what, route, params, answer).await;
        }
        Lookup::Found(route, params) => {
            let caller = route_caller(state, route, &params, &req)?;
            return dispatch(state, route, params, req, request_id, caller).await;
        }
        Lookup::MethodNotAllowed(allowed) => allowed,
        Lookup::NotFound => Vec::new(),
    };
    if path == "/v1" || path.starts_with("/v1/") {
        auth::admin(state, &req, Needed::Nothing)?;
    }
    if allowed.is_empty() {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok());
        return Err(ApiError::not_found(match host {
            Some(host) if state.functions.policies.has_routes() => format!(
                "no route for {path}, and no function's [http] hosts claims {host:?} for it"
            ),
            _ => format!("no route for {path}"),
        }));
    }
    let allow: Vec<&str> = allowed.iter().map(|m| m.as_str()).collect();
    let allow = allow.join(", ");
    let mut response = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{} is not allowed on {path}; allowed: {allow}",
            req.method()
        ),
    )
    .into_response();
    if let Ok(value) = HeaderValue::from_str(&allow) {
        response.headers_mut().insert(header::ALLOW, value);
    }
    Ok(response)
}

/// The function whose `[http]` claims the request's host and path, if
/// any does.
fn routed<B>(state: &AppState, req: &hyper::Request<B>) -> Option<FunctionName> {
    if !state.functions.policies.has_routes() {
        return None;
    }
    let host = match req.uri().host() {
        Some(host) => host,
        None => req.headers().get(header::HOST)?.to_str().ok()?,
    };
    let routes = state.functions.policies.routes();
    routes.find(host, req.uri().path()).cloned()
}

/// The paths the host answers on every name, whatever a function claims
/// in `[http]`: its API, peers' internal routes, metrics, health, the
/// status page and the API's description. A function claiming a name
/// would otherwise answer `/v1/*` on it and read the admin token that
/// operators send there.
const HOSTS_OWN: &[&str] = &[
    "/v1",
    "/internal",
    "/metrics",
    "/healthz",
    "/readyz",
    "/ui",
    "/openapi.json",
];

/// Whether the host answers `path` itself on every name.
fn is_hosts_own(path: &str) -> bool {
    HOSTS_OWN.iter().any(|own| {
        path.strip_prefix(own)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

/// Invokes `function` with a request its host routed to it: as
/// `/fn/{function}{path}` (what a forward to a peer carries), so the guest
/// sees the request's own path and host.
async fn invoke_routed(
    state: &Arc<AppState>,
    mut req: hyper::Request<Incoming>,
    function: &FunctionName,
    request_id: &str,
) -> Result<Response<Body>, ApiError> {
    // Over HTTP/2 the name is the URI's authority: the guest sees it as
    // `Host`, as over HTTP/1.1.
    if !req.headers().contains_key(header::HOST)
        && let Some(authority) = req.uri().authority()
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        req.headers_mut().insert(header::HOST, host);
    }
    let path_and_query = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let uri = format!("/fn/{function}{path_and_query}")
        .parse()
        .map_err(|e| ApiError::bad_request("bad_uri", format!("invalid path: {e}")))?;
    let rest = req
        .uri()
        .path()
        .strip_prefix('/')
        .unwrap_or_default()
        .to_string();
    *req.uri_mut() = uri;
    let arrival = invoke::arrival(state, &req)?;
    let req = req.map(RequestBody::Streamed);
    invoke::invoke(state, req, (function.as_str(), &rest), request_id, arrival).await
}

/// Who is calling `route`, checked: `None` for routes that take no admin
/// credential (a peer's signature is checked in [`dispatch`]).
fn route_caller<B>(
    state: &AppState,
    route: &Route,
    params: &Params<'_>,
    req: &hyper::Request<B>,
) -> Result<Option<auth::Caller>, ApiError> {
    match route.access {
        Access::Admin => {
            // A route the scopes do not cover takes the admin token only.
            let needed = scopes::needed(route.handler, params).unwrap_or(Needed::Root);
            auth::admin(state, req, needed).map(Some)
        }
        Access::Metrics if state.limits.metrics_require_token => {
            auth::admin(state, req, Needed::StatusRead).map(Some)
        }
        Access::Public | Access::Function | Access::Peer | Access::Metrics => Ok(None),
    }
}

async fn dispatch(
    state: &Arc<AppState>,
    route: &Route,
    params: Params<'_>,
    req: hyper::Request<Incoming>,
    request_id: &str,
    caller: Option<auth::Caller>,
) -> Result<Response<Body>, ApiError> {
    let mut signed = None;
    if route.access == Access::Peer {
        signed = Some(auth::peer(state, &req)?);
    }
    // Only admin routes look at the caller, and they always have one.
    let caller = caller.unwrap_or(auth::Caller::Root);
    let name = || parse_name(params.get(0));
    match route.handler {
        Handler::Invoke => {
            let arrival = invoke::arrival(state, &req)?;
            let req = req.map(RequestBody::Streamed);
            let target = (params.get(0), params.get(1));
            invoke::invoke(state, req, target, request_id, arrival).await
        }
        Handler::ListFunctions => admin::list(state),
        Handler::ListRoutes => admin::routes(state),
        Handler::Deploy => admin::deploy(state, name()?, req).await,
        Handler::Describe => admin::describe(state, &name()?, &caller),
        Handler::Delete => admin::delete(state, &name()?, req.uri().query()).await,
        Handler::GetPolicy => admin::get_policy(state, &name()?, &caller),
        Handler::PutPolicy => admin::put_policy(state, &name()?, &caller, req).await,
        Handler::KvUsage => admin::kv_usage(state, &name()?).await,
        Handler::KvPurge => admin::kv_purge(state, &name()?, params.get(1)).await,
        Handler::Rollback => admin::rollback(state, &name()?, req).await,
        Handler::ListSecrets => secrets::list(state, &caller),
        Handler::SetSecret => secrets::set(state, params.get(0), req).await,
        Handler::DeleteSecret => secrets::delete(state, params.get(0)).await,
        Handler::Map => map::map(state, &name()?, req, request_id).await,
        Handler::CreateToken => tokens::create(state, &caller, req).await,
        Handler::ListTokens => tokens::list(state),
        Handler::RevokeToken => tokens::revoke(state, params.get(0)).await,
        Handler::Peers => admin::peers(state),
        Handler::Module => admin::module(state, params.get(0)),
        Handler::CronClaim => match &signed {
            Some(signed) => cron::receive_claim(state, signed, req).await,
            None => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "claims come from peers",
            )),
        },
        Handler::RunTrigger => cron::run_now(state, &name()?, params.get(1)).await,
        Handler::Status => status::status(state, req.uri().query(), &caller).await,
        Handler::Audit => audit::read(state, req.uri().query()).await,
        Handler::Ui => ui::serve(state, params.get(0)),
        Handler::OpenApi => Ok(observe::openapi()),
        Handler::Metrics => observe::metrics(state).await,
        Handler::Healthz => Ok(text(StatusCode::OK, "ok\n")),
        Handler::Readyz => Ok(observe::readyz(state)),
    }
}

/// The value of `key` in a query string: `Some("")` for a bare `key`,
/// `None` without it. No percent-decoding: the values read this way (names,
/// flags, paths) are plain.
pub fn query_param<'q>(query: Option<&'q str>, key: &str) -> Option<&'q str> {
    query?
        .split('&')
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn parse_name(name: &str) -> Result<FunctionName, ApiError> {
    FunctionName::new(name).map_err(|e| ApiError::bad_request("invalid_name", e.to_string()))
}

/// A plain-text response.
pub fn text(status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<Body> {
    let mut response = Response::new(full_body(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A JSON response.
pub fn json<T: Serialize + ?Sized>(
    status: StatusCode,
    value: &T,
) -> Result<Response<Body>, ApiError> {
    let body = serde_json::to_vec(value).context("serialising a response")?;
    let mut response = Response::new(full_body(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}
