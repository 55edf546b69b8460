//! Who may call what. Three kinds of bearer, each checked here and nowhere
//! else:
//! - the admin token (`Authorization: Bearer`), for `/v1` admin routes and,
//!   with `--metrics-require-token`, for `/metrics`; or a scoped API token
//!   ([`crate::tokens`]) with the scope the route needs
//!   ([`lichen_core::scopes::needed`]): without it `403 missing_scope`,
//!   naming the scope; expired or revoked, `401`;
//! - a peer's signature (`x-lichen-peer-signature`, keyed from the cluster
//!   secret, once per request: `lichen_core::seal`), for module fetches and
//!   forwarded invocations from peers;
//! - a private function's own tokens (the SHA-256 its policy's `[access] tokens` holds, or the
//!   admin token), for invoking it and mapping over it.
//!
//! A missing token is `401`, a wrong one `403`; a peer signature that does
//! not check out is `401` with a code saying why. Tokens are compared in
//! constant time, so the time an answer takes says nothing about how much
//! of a guess was right.

use std::sync::Arc;

use http::{StatusCode, header};
use lichen_core::scopes::Needed;
use lichen_core::seal::{Refused, Signed};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AppState;
use crate::error::ApiError;
use crate::policy::Policy;
use crate::tokens::{Grant, Verdict};

/// Who made an admin request.
#[derive(Debug, Clone)]
pub enum Caller {
    /// The admin token: the root credential.
    Root,
    /// A scoped token.
    Token(Arc<Grant>),
}

impl Caller {
    /// Whether the caller may do `needed`.
    pub fn may(&self, needed: Needed<'_>) -> bool {
        match self {
            Caller::Root => true,
            Caller::Token(grant) => needed.granted_by(&grant.scopes),
        }
    }
}

/// Admin routes need `Authorization: Bearer <token>`: the admin token, or
/// a scoped token that grants `needed`.
pub fn admin<B>(
    state: &AppState,
    req: &hyper::Request<B>,
    needed: Needed<'_>,
) -> Result<Caller, ApiError> {
    let presented = bearer(req, "admin routes")?;
    if is_admin(state, presented) {
        return Ok(Caller::Root);
    }
    match state.functions.tokens.check(presented) {
        Verdict::Valid(grant) if needed.granted_by(&grant.scopes) => Ok(Caller::Token(grant)),
        Verdict::Valid(grant) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "missing_scope",
            format!(
                "the token {:?} does not have the scope this needs: {needed}",
                grant.name
            ),
        )),
        Verdict::Revoked(name) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "token_revoked",
            format!("the token {name:?} was revoked"),
        )),
        Verdict::Expired(name) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "token_expired",
            format!("the token {name:?} has expired"),
        )),
        Verdict::Unknown => Err(not_valid()),
    }
}

/// The name of the scoped token the request presents, valid or not (for
/// the audit log of a refused change); `None` for anything else.
pub fn token_name<B>(state: &AppState, req: &hyper::Request<B>) -> Option<String> {
    let presented = bearer(req, "").ok()?;
    state.functions.tokens.name_of(presented)
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

/// Whether `presented` is the admin token, compared in constant time.
fn is_admin(state: &AppState, presented: &[u8]) -> bool {
    !presented.is_empty() && bool::from(presented.ct_eq(state.admin_token.as_bytes()))
}

/// Whether the request presents the admin token.
pub fn is_admin_token<B>(state: &AppState, req: &hyper::Request<B>) -> bool {
    bearer(req, "").is_ok_and(|presented| is_admin(state, presented))
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
    let presented = bearer(req, "private functions")?;
    if presented.is_empty() {
        return Err(not_valid());
    }
    // The policy holds its tokens' hashes; the admin token is itself.
    let mut matched = is_admin(state, presented);
    let hash = hex::encode(Sha256::digest(presented));
    for stored in &policy.tokens {
        matched |= bool::from(hash.as_bytes().ct_eq(stored.as_bytes()));
    }
    if matched { Ok(()) } else { Err(not_valid()) }
}

/// The request's bearer token (empty if the header is not `Bearer ...`);
/// `401` without an `Authorization` header.
fn bearer<'r, B>(req: &'r hyper::Request<B>, what: &str) -> Result<&'r [u8], ApiError> {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            format!("{what} need an `Authorization: Bearer <token>` header"),
        ));
    };
    Ok(value
        .as_bytes()
        .strip_prefix(b"Bearer ")
        .unwrap_or_default())
}

fn not_valid() -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        "the token is not valid here",
    )
}
