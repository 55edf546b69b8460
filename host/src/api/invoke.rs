//! The invocation path, from a request's arrival to its response: access,
//! body limits, admission (here, at a peer, or in this host's queue), the
//! run itself in a fresh instance, and the response cap.
//!
//! Why it is built this way:
//! - Local cores first. When the function has no free slot here, the
//!   request goes to a peer with room before it waits in this host's queue,
//!   so `503` means the whole cluster is full. A forwarded request is
//!   admitted or refused at once, never queued at the peer.
//! - The URI stays the original `/fn/...` until admission, so a forward
//!   sends the request as it came; only then does the guest's URI replace it
//!   (`/fn/hello/a?x=1` reaches the guest as `/a?x=1`, as under
//!   `wasmtime serve`).
//! - A private function's token is for the host: it is checked, then taken
//!   out of the headers before the guest sees them. So are the headers that
//!   only pass between hosts.
//! - Body limits are checked on the declared length before anything runs
//!   and again while the body streams; the response is cut at its limit.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode, header};
use http_body::Body as _;
use http_body_util::BodyExt;

use super::AppState;
use super::auth;
use super::body::{RequestBody, declared_length, read_capped};
use crate::cluster::forward::{Forward, Replay};
use crate::cluster::{HOP_HEADER, HOST_HEADER, MODULE_HEADER, SERVED_BY_HEADER, SIGNATURE_HEADER};
use crate::engine::{Deployed, Outcome};
use crate::error::{ApiError, Body};
use crate::names::FunctionName;
use crate::policy::Policy;
use crate::sandbox::{CappedResponseBody, GuardedRequestBody, Handoff, InvocationStats};
use crate::scheduler::Refusal;
use crate::serving::Serving;
use crate::trace::Traced;
use lichen_core::seal::{self, Signed};
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;

/// How an invocation reached this host.
#[derive(Clone)]
pub enum Arrival {
    /// From a client: forwarded to a peer when this host has no room.
    Client,
    /// An item of a map: like a client's; its body is held whole, and
    /// never sent to a second peer once one took it (it may have run).
    MapItem(Bytes),
    /// A trigger of the function's own policy (a cron tick, a NATS
    /// message): no access check; held and sent at most once like a map
    /// item.
    Trigger(Bytes),
    /// Forwarded by a peer (its signature checked; with the digest of the
    /// body it signed, if it knew the body): run here at once or refuse as
    /// busy, never forwarded again. The peer checked access.
    Forwarded(Signed),
}

/// `/fn/{name}` and `/fn/{name}/{rest...}`: the guest sees `/{rest...}` and
/// the query, as if it were served at the root.
pub async fn invoke(
    state: &Arc<AppState>,
    req: hyper::Request<RequestBody>,
    (name, rest): (&str, &str),
    request_id: &str,
    arrival: Arrival,
) -> Result<Response<Body>, ApiError> {
    let functions = &state.functions;
    let Some(slot) = functions.lookup(name) else {
        functions.metrics.unknown_function.inc();
        return Err(ApiError::not_found(format!("no function named {name:?}")));
    };
    let function = functions.load(&slot).await?;
    let policy = match functions.policies.get(&function.name) {
        Ok(policy) => policy,
        Err(error) => {
            let name = function.name.as_str();
            functions
                .metrics
                .record_invocation(name, Outcome::Rejected, Duration::ZERO, None, 0);
            return Err(policy_invalid(&function.name, error));
        }
    };
    let serving = Serving::of(functions, &function, &policy);
    let method = req.method().clone();
    let started = Instant::now();
    let stats = Arc::new(InvocationStats::default());
    let traced = state.tracing.invocation(
        req.headers(),
        !matches!(arrival, Arrival::Client),
        function.name.as_str(),
        || {
            let instance = match serving.pool {
                Some(_) => "reused",
                None => "fresh",
            };
            let mut attributes = vec![
                KeyValue::new("lichen.version", function.version.version as i64),
                KeyValue::new("lichen.route", format!("/{rest}")),
                KeyValue::new("lichen.request_id", request_id.to_string()),
                KeyValue::new("lichen.instance", instance),
            ];
            if let Some(peer) = req.headers().get(HOP_HEADER).and_then(|v| v.to_str().ok()) {
                attributes.push(KeyValue::new("lichen.forwarded_from", peer.to_string()));
            }
            attributes
        },
    );
    let (result, outcome) = admit_and_run(
        state,
        &function,
        &serving,
        req,
        rest,
        request_id,
        Arc::clone(&stats),
        arrival,
        traced.as_ref(),
    )
    .await;
    let duration = started.elapsed();
    if let Some(handoff) = Handoff::of(&stats) {
        serving.metrics.handed_off(handoff);
    }
    let status = match &result {
        Ok(response) => response.status(),
        Err(error) => error.status,
    };
    if let Some(span) = &traced {
        span.set(KeyValue::new("lichen.outcome", outcome.as_str()));
        span.set(KeyValue::new(
            "http.response.status_code",
            i64::from(status.as_u16()),
        ));
        if status.is_server_error() {
            span.fail(format!("answered {status}"));
        }
        span.end();
    }
    let instantiate_ns = stats.instantiate_ns.load(Ordering::Relaxed);
    serving.metrics.record_invocation(
        outcome,
        duration,
        (instantiate_ns > 0).then(|| Duration::from_nanos(instantiate_ns)),
        stats.memory_peak.load(Ordering::Relaxed),
    );
    serving.history.invocation(
        crate::recent::Invocation {
            request_id: request_id.to_string(),
            status: status.as_u16(),
            outcome: outcome.as_str(),
            duration_us: duration.as_micros() as u64,
            at_unix_ms: crate::recent::now_unix_ms(),
        },
        duration,
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
    // Which module answered (a peer's answer carries its own).
    result.map(|mut response| {
        if !response.headers().contains_key(MODULE_HEADER) {
            response
                .headers_mut()
                .insert(MODULE_HEADER, function.module_header.clone());
        }
        response
    })
}

/// Everything between finding the function and logging the outcome: access,
/// body limits, admission (here or at a peer), the run itself, and the
/// response cap.
#[allow(clippy::too_many_arguments)]
async fn admit_and_run(
    state: &Arc<AppState>,
    function: &Arc<Deployed>,
    serving: &Serving,
    mut req: hyper::Request<RequestBody>,
    rest: &str,
    request_id: &str,
    stats: Arc<InvocationStats>,
    arrival: Arrival,
    traced: Option<&Traced>,
) -> (Result<Response<Body>, ApiError>, Outcome) {
    let refused = |error: ApiError| (Err(error), Outcome::Rejected);
    let policy = &serving.policy;
    // A forward names the module the forwarding host runs: a host serving
    // another (the registry's change has yet to reach one of them) says so
    // rather than answer with another version.
    if matches!(arrival, Arrival::Forwarded(_))
        && let Some(expected) = req.headers().get(MODULE_HEADER)
        && expected.as_bytes() != function.version.sha256.as_bytes()
    {
        return refused(ApiError::new(
            StatusCode::CONFLICT,
            "module_mismatch",
            format!(
                "this host serves another module of {} ({}) than the forwarding host expects",
                function.name, function.version.sha256
            ),
        ));
    }
    req.headers_mut().remove(MODULE_HEADER);
    if !policy.public {
        // A forwarded request was checked by the host it came through; a
        // trigger is the policy's own.
        if !matches!(arrival, Arrival::Forwarded(_) | Arrival::Trigger(_))
            && let Err(error) = auth::invoke(state, policy, &req)
        {
            return (Err(error), Outcome::Denied);
        }
    }
    // A token is for the host (the function's, or the admin's sent to a
    // name the function claims): the guest sees it only if its policy asks,
    // and never the admin token.
    if !policy.pass_authorization || auth::is_admin_token(state, &req) {
        req.headers_mut().remove(header::AUTHORIZATION);
    }
    let declared = declared_length(req.headers());
    if declared.is_some_and(|len| len > policy.request_body) {
        return refused(ApiError::too_large(format!(
            "the request body is larger than {}'s limit of {} bytes",
            function.name, policy.request_body
        )));
    }
    // A forward whose body its peer signed: the body read whole and checked
    // before anything runs (the peer held it whole too).
    if let Arrival::Forwarded(signed) = &arrival
        && signed.body.is_some()
    {
        let (parts, body) = req.into_parts();
        let limit = policy.request_body;
        let idle = state.limits.body_idle_timeout;
        let bytes = match read_capped(hyper::Request::new(body), limit, idle).await {
            Ok(bytes) => bytes,
            Err(error) => return refused(error),
        };
        if let Err(refusal) = seal::check_body(signed, &bytes) {
            if let Some(cluster) = state.cluster() {
                cluster.note_refused(refusal);
            }
            return refused(auth::refused(refusal));
        }
        req = hyper::Request::from_parts(parts, RequestBody::from(bytes));
    } else if let Arrival::Forwarded(_) = &arrival
        && !req.body().is_end_stream()
    {
        // A signature without a digest covers no body: one captured could
        // carry any. Peers sign the digest of every body they send.
        let refusal = seal::Refused::BodyUnsigned;
        if let Some(cluster) = state.cluster() {
            cluster.note_refused(refusal);
        }
        return refused(auth::refused(refusal));
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

    let functions = &state.functions;
    let gate = &serving.gate;
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
    let admitting = SystemTime::now();
    let _admission = match functions.scheduler.try_admit(gate) {
        Ok(admission) => admission,
        Err(refusal) if matches!(arrival, Arrival::Forwarded(_)) => return refused(busy(refusal)),
        Err(_) => {
            if let Some(cluster) = state.cluster() {
                let replay = match &arrival {
                    // Triggered work (a tick, a message, a map item) runs
                    // at most once: after a peer took it, never elsewhere.
                    Arrival::MapItem(bytes) | Arrival::Trigger(bytes) => {
                        Replay::Once(bytes.clone())
                    }
                    _ if is_idempotent(req.method()) && req.body().is_end_stream() => {
                        Replay::Body(Bytes::new())
                    }
                    _ if req.body().is_end_stream() => Replay::Once(Bytes::new()),
                    // A client's body is held whole (within the function's
                    // limit) so the forward signs its digest; once sent it
                    // is never sent to a second peer.
                    _ => {
                        let (parts, body) = req.into_parts();
                        let limit = policy.request_body;
                        let idle = state.limits.body_idle_timeout;
                        let bytes = match read_capped(hyper::Request::new(body), limit, idle).await
                        {
                            Ok(bytes) => bytes,
                            Err(error) => return refused(error),
                        };
                        req = hyper::Request::from_parts(parts, RequestBody::from(bytes.clone()));
                        Replay::Once(bytes)
                    }
                };
                let forward = traced.map(|span| span.child("forward", SpanKind::Client));
                if let Some(span) = &forward {
                    span.inject(req.headers_mut());
                }
                let forwarded = cluster
                    .forward(
                        function.name.as_str(),
                        &function.version.sha256,
                        req,
                        policy.timeout + FORWARD_SLACK,
                        replay.clone(),
                        policy.keyvalue.grants_any(),
                    )
                    .await;
                if let Some(span) = &forward {
                    note_forward(span, &forwarded);
                }
                req = match forwarded {
                    Forward::Done(response) => return (Ok(response), Outcome::Forwarded),
                    Forward::Failed(error) => return (Err(error), Outcome::ForwardFailed),
                    Forward::NoRoom(parts, Some(body)) => hyper::Request::from_parts(parts, body),
                    Forward::NoRoom(parts, None) => match replay {
                        Replay::Body(bytes) | Replay::Once(bytes) => {
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
            // The wait for a slot is a span; an admission that did not
            // wait is not worth one.
            let admitted = functions.scheduler.admit(gate, policy.timeout).await;
            if let Some(span) = traced {
                let waited = (admitting, SystemTime::now());
                let outcome = match &admitted {
                    Ok(_) => "admitted",
                    Err(_) => "refused",
                };
                span.child_between(
                    "admission",
                    waited,
                    [KeyValue::new("lichen.admission", outcome)],
                );
            }
            match admitted {
                Ok(admission) => admission,
                Err(refusal) => return refused(busy(refusal)),
            }
        }
    };
    *req.uri_mut() = guest_uri;
    // A forwarded request's guest sees the client's `Host`, as it would
    // have on the first host; a client cannot set it.
    let forwarded_host = req.headers_mut().remove(HOST_HEADER);
    if let (Arrival::Forwarded(_), Some(host)) = (&arrival, forwarded_host) {
        req.headers_mut().insert(header::HOST, host);
    }
    if !req.headers().contains_key(header::HOST) {
        req.headers_mut()
            .insert(header::HOST, HeaderValue::from_static("localhost"));
    }
    // Between hosts only.
    req.headers_mut().remove(HOP_HEADER);
    req.headers_mut().remove(SIGNATURE_HEADER);
    // The guest's call is a span of its own, and the guest is handed its
    // context, so what the guest traces hangs from it.
    let guest = traced.map(|span| span.child("guest", SpanKind::Internal));
    if let Some(span) = &guest {
        span.inject(req.headers_mut());
    }
    let calling = SystemTime::now();

    let (parts, body) = req.into_parts();
    let body = GuardedRequestBody::new(body, policy.request_body, state.limits.body_idle_timeout);
    let exceeded = Arc::clone(&body.exceeded);
    let request = hyper::Request::from_parts(parts, body);
    let runtime = &functions.runtime;
    let (result, outcome) = match &serving.pool {
        Some(pool) => {
            let name = &function.name;
            runtime
                .invoke_pooled(name, pool, request, &stats, request_id)
                .await
        }
        None => {
            let mut invocation = serving.invocation(request_id, Arc::clone(&stats));
            invocation.trace = guest.clone();
            runtime.invoke(function, request, &invocation).await
        }
    };
    if let Some(span) = &guest {
        let instantiate_ns = stats.instantiate_ns.load(Ordering::Relaxed);
        if instantiate_ns > 0 {
            let instantiated = calling + Duration::from_nanos(instantiate_ns);
            span.child_between("instantiate", (calling, instantiated), []);
        }
        if let Err(error) = &result {
            span.fail(error.message.clone());
        }
        span.end();
    }
    if exceeded.load(Ordering::Relaxed) {
        return refused(ApiError::too_large(format!(
            "the request body is longer than {}'s limit of {} bytes",
            function.name, policy.request_body
        )));
    }
    let mut response = match result {
        Ok(response) => response,
        Err(error) => return (Err(error), outcome),
    };
    // A guest's answer never says "not run here": a forwarding host would
    // take it at its word and run the request again elsewhere.
    response.headers_mut().remove(crate::error::BUSY_HEADER);
    response
        .headers_mut()
        .remove(crate::error::MODULE_MISMATCH_HEADER);
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
    let limit = policy.response_body;
    let on_cut = Arc::clone(&serving.on_cut);
    let response =
        response.map(move |body| CappedResponseBody::new(body, limit, on_cut).boxed_unsync());
    (Ok(response), outcome)
}

/// Notes on a forward's span where it went and how it ended.
fn note_forward<B>(span: &Traced, forwarded: &Forward<B>) {
    match forwarded {
        Forward::Done(response) => {
            if let Some(peer) = response
                .headers()
                .get(SERVED_BY_HEADER)
                .and_then(|v| v.to_str().ok())
            {
                span.set(KeyValue::new("lichen.forwarded_to", peer.to_string()));
            }
            span.set(KeyValue::new(
                "http.response.status_code",
                i64::from(response.status().as_u16()),
            ));
        }
        Forward::NoRoom(..) => span.set(KeyValue::new("lichen.forward", "no_room")),
        Forward::Failed(error) => span.fail(error.message.clone()),
    }
    span.end();
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

/// Whether an invocation came from a client or, forwarded, from a peer
/// (which must prove it is one).
pub fn arrival<B>(state: &AppState, req: &hyper::Request<B>) -> Result<Arrival, ApiError> {
    if req.headers().contains_key(HOP_HEADER) {
        Ok(Arrival::Forwarded(auth::peer(state, req)?))
    } else {
        Ok(Arrival::Client)
    }
}

/// For a map: the function exists, has a valid policy, and the request may
/// invoke it. Returns the `Authorization` each item carries, and the policy.
pub fn check_access<B>(
    state: &AppState,
    name: &FunctionName,
    req: &hyper::Request<B>,
) -> Result<(Option<HeaderValue>, Arc<Policy>), ApiError> {
    let policy = policy_of(state, name)?;
    auth::invoke(state, &policy, req)?;
    Ok((req.headers().get(header::AUTHORIZATION).cloned(), policy))
}

/// The policy in force for `name`: `404` if no such function is deployed,
/// `503` if its policy never loaded.
pub fn policy_of(state: &AppState, name: &FunctionName) -> Result<Arc<Policy>, ApiError> {
    if state.functions.lookup(name.as_str()).is_none() {
        return Err(ApiError::not_found(format!("no function named {name:?}")));
    }
    state
        .functions
        .policies
        .get(name)
        .map_err(|error| policy_invalid(name, error))
}

/// `503`: the function has no policy in force.
fn policy_invalid(name: &FunctionName, error: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "policy_invalid",
        format!("{name} has no valid policy: {error}"),
    )
}
