//! Who may call what. Three kinds of bearer, each checked here and nowhere
//! else:
//! - the admin token (`Authorization: Bearer`), for `/v1` admin routes and,
//!   with `--metrics-require-token`, for `/metrics`;
//! - a peer's signature (`x-lichen-peer-signature`, keyed from the cluster
//!   secret, once per request: `lichen_core::seal`), for module fetches and
//!   forwarded invocations from peers;
//! - a private function's own tokens (its policy's `[access] tokens`, or the
//!   admin token), for invoking it and mapping over it.
//!
//! A missing token is `401`, a wrong one `403`; a peer signature that does
//! not check out is `401` with a code saying why. Tokens are compared in
//! constant time, so the time an answer takes says nothing about how much
//! of a guess was right.

use http::{StatusCode, header};
use lichen_core::seal::{Refused, Signed};
use subtle::ConstantTimeEq;

use super::AppState;
use crate::error::ApiError;
use crate::policy::Policy;

/// Admin routes need `Authorization: Bearer <token>`.
pub fn admin<B>(state: &AppState, req: &hyper::Request<B>) -> Result<(), ApiError> {
    check_bearer(req, [state.admin_token.as_str()], "admin routes")
}

/// Internal routes need a peer's signature. Returns it, for the body check
/// of a forwarded invocation.
pub fn peer<B>(state: &AppState, req: &hyper::Request<B>) -> Result<Signed, ApiError> {
    let Some(cluster) = state.cluster() else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this host is not in a cluster",
        ));
    };
    cluster.verify(req).map_err(refused)
}

/// The answer to a refused peer request.
pub fn refused(refused: Refused) -> ApiError {
    match refused {
        Refused::Busy => ApiError::busy(refused.message()),
        _ => ApiError::new(StatusCode::UNAUTHORIZED, refused.code(), refused.message()),
    }
}

/// A private function takes the admin token or one of its policy's tokens.
pub fn invoke<B>(
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
