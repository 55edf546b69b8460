//! Sending an invocation this host has no room for to a peer that has.
//!
//! Peers are tried in placement order: first the power-of-two choice among
//! the function's rendezvous owners with room, then the other peers serving
//! the same version by rank. The request body streams through. What may be
//! retried on another peer follows from what the first one could have done:
//! - the connection failed: nothing was sent, so any request is retried;
//! - the peer refused it as busy (before running it): retried while the body
//!   was not started, as nothing ran;
//! - it failed after the request left: only an idempotent method without a
//!   body is sent once more elsewhere; anything else (a map item, a
//!   trigger's tick or message included) is 502, or 504 past the deadline.
//!   A non-idempotent request, and triggered work, is never run twice.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::placement::{self, Candidate};
use super::{
    Cluster, HOP_HEADER, HOST_HEADER, MODULE_HEADER, Peer, SERVED_BY_HEADER, SIGNATURE_HEADER,
};
use crate::error::{ApiError, BUSY_HEADER, Body, MODULE_MISMATCH_HEADER};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ForwardBody = UnsyncBoxBody<Bytes, BoxError>;
pub type Client =
    hyper_util::client::legacy::Client<hyper_rustls::HttpsConnector<HttpConnector>, ForwardBody>;

/// Owners among which the power of two choices picks.
const OWNERS: usize = 3;
/// Peers tried for one invocation.
const MAX_ATTEMPTS: usize = 3;

/// The client of internal requests: HTTP, or HTTPS verified with `tls`
/// for a peer that publishes an `https://` address; HTTPS only with
/// `https_only` (mutual TLS: a peer is only ever reached over it).
pub fn client(tls: rustls::ClientConfig, https_only: bool) -> Client {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(1)));
    connector.enforce_http(false);
    let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls);
    let builder = if https_only {
        builder.https_only()
    } else {
        builder.https_or_http()
    };
    let connector = builder.enable_http1().wrap_connector(connector);
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

/// What a forward came to.
pub enum Forward<B> {
    /// A peer answered; its response streams through.
    Done(Response<Body>),
    /// No peer took it. The body is handed back if it was never started.
    NoRoom(http::request::Parts, Option<B>),
    /// It failed after leaving this host.
    Failed(ApiError),
}

/// What the caller holds of the body, and whether it may be sent again
/// after a peer failed mid-request.
#[derive(Clone)]
pub enum Replay {
    /// The body streams through, unknown: never sent twice.
    Never,
    /// Held whole (its digest signed), and safe to send to a second peer
    /// after the first failed mid-request.
    Body(Bytes),
    /// Held whole (its digest signed), but once sent never sent again: it
    /// may have run.
    Once(Bytes),
}

impl Replay {
    /// The body, when it is held whole.
    fn known(&self) -> Option<&Bytes> {
        match self {
            Replay::Body(bytes) | Replay::Once(bytes) => Some(bytes),
            Replay::Never => None,
        }
    }

    /// Whether it may go to a second peer after the first one had it.
    fn resendable(&self) -> bool {
        matches!(self, Replay::Body(_))
    }
}

impl Cluster {
    /// Forwards `req` (whose URI is the original `/fn/...` path) to a peer
    /// serving `sha256` of `function`; with `same_kv` (a function with
    /// key-value stores), only to a peer that sees the same stores.
    pub async fn forward<B>(
        &self,
        function: &str,
        sha256: &str,
        req: Request<B>,
        deadline: Duration,
        replay: Replay,
        same_kv: bool,
    ) -> Forward<B>
    where
        B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let peers = self.peers();
        let kv = same_kv.then(|| self.kv_identity());
        let candidates: Vec<&Peer> = candidates(&peers, function, sha256)
            .into_iter()
            .filter(|p| !self.is_suspect(&p.node_id))
            .filter(|p| kv.as_ref().is_none_or(|kv| *kv == p.kv))
            .collect();
        let (parts, body) = req.into_parts();
        let mut body = Some(body);
        let mut retried_after_sent = false;
        for peer in candidates.into_iter().take(MAX_ATTEMPTS) {
            let (outgoing, slot) = match body.take() {
                Some(body) => {
                    let (outgoing, slot) = Reclaimable::new(body);
                    (outgoing.boxed_unsync(), Some(slot))
                }
                None => match replay.known() {
                    Some(bytes) => (full(bytes.clone()), None),
                    None => break,
                },
            };
            let known = replay.known().map(|bytes| &bytes[..]);
            let request = match self.peer_request(&parts, peer, sha256, outgoing, known) {
                Ok(request) => request,
                Err(error) => return Forward::Failed(error),
            };
            let sent = tokio::time::timeout(deadline, self.client.request(request)).await;
            match sent {
                Err(_) => {
                    self.metrics.forward_failures.inc();
                    return Forward::Failed(ApiError::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "peer_timeout",
                        format!("peer {} did not answer within {deadline:?}", peer.node_id),
                    ));
                }
                Ok(Ok(response))
                    if response.status() == StatusCode::SERVICE_UNAVAILABLE
                        && response.headers().contains_key(BUSY_HEADER) =>
                {
                    // Refused before running: free to go elsewhere.
                    body = slot.and_then(|s| s.reclaim());
                    if body.is_none() && replay.known().is_none() {
                        return Forward::Done(self.relay(function, peer, response));
                    }
                }
                Ok(Ok(response))
                    if response.status() == StatusCode::CONFLICT
                        && response.headers().contains_key(MODULE_MISMATCH_HEADER) =>
                {
                    // It serves another version: not run there.
                    tracing::info!(peer = %peer.node_id, function, expected = sha256, "a peer serves another module of the function; not forwarding there");
                    body = slot.and_then(|s| s.reclaim());
                    if body.is_none() && replay.known().is_none() {
                        return Forward::Failed(ApiError::busy(
                            "the peer with room serves another version of this function",
                        ));
                    }
                }
                Ok(Ok(response)) => return Forward::Done(self.relay(function, peer, response)),
                Ok(Err(error)) if error.is_connect() => {
                    self.metrics.forward_failures.inc();
                    tracing::warn!(peer = %peer.node_id, error = %error, "cannot connect to peer; trying another");
                    self.suspect(&peer.node_id);
                    body = slot.and_then(|s| s.reclaim());
                }
                Ok(Err(error)) => {
                    self.metrics.forward_failures.inc();
                    tracing::warn!(peer = %peer.node_id, error = format!("{error:#}"), "peer failed after the request was sent");
                    self.suspect(&peer.node_id);
                    if !replay.resendable() || retried_after_sent {
                        return Forward::Failed(ApiError::new(
                            StatusCode::BAD_GATEWAY,
                            "peer_failed",
                            format!("peer {} failed: {error}", peer.node_id),
                        ));
                    }
                    retried_after_sent = true;
                }
            }
        }
        match (body, &replay) {
            (Some(body), _) => Forward::NoRoom(parts, Some(body)),
            (None, Replay::Body(_) | Replay::Once(_)) => Forward::NoRoom(parts, None),
            (None, Replay::Never) => Forward::Failed(ApiError::busy(
                "no host in the cluster has room for this request",
            )),
        }
    }

    /// The request to `peer`, signed; over `known`, the body when the
    /// caller holds it whole (it is `body`).
    fn peer_request(
        &self,
        parts: &http::request::Parts,
        peer: &Peer,
        sha256: &str,
        body: ForwardBody,
        known: Option<&[u8]>,
    ) -> Result<Request<ForwardBody>, ApiError> {
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let uri: http::Uri = format!("{}{path}", peer.api).parse().map_err(|e| {
            ApiError::internal(anyhow::anyhow!("peer {} address: {e}", peer.node_id))
        })?;
        let mut request = Request::new(body);
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = uri;
        let headers = request.headers_mut();
        for (name, value) in &parts.headers {
            if !is_hop_by_hop(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        if let Some(host) = parts.headers.get(header::HOST) {
            headers.insert(HOST_HEADER, host.clone());
        }
        let hop = HeaderValue::from_str(&self.node_id)
            .map_err(|e| ApiError::internal(anyhow::anyhow!("node id as a header: {e}")))?;
        headers.insert(HOP_HEADER, hop);
        let module = HeaderValue::from_str(sha256)
            .map_err(|e| ApiError::internal(anyhow::anyhow!("module hash as a header: {e}")))?;
        headers.insert(MODULE_HEADER, module);
        self.sign(peer, &mut request, known)
            .map_err(|e| ApiError::internal(e.context("signing a forward")))?;
        Ok(request)
    }

    /// The peer's response, streamed back with who served it.
    fn relay(
        &self,
        function: &str,
        peer: &Peer,
        response: Response<hyper::body::Incoming>,
    ) -> Response<Body> {
        self.metrics
            .forwarded
            .with_label_values(&[function, peer.node_id.as_str()])
            .inc();
        self.forwarded_to
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(function.to_string())
            .or_default()
            .insert(peer.node_id.clone());
        let mut response = response.map(|body| {
            body.map_err(wasmtime_wasi_http::Error::Hyper)
                .boxed_unsync()
        });
        if let Ok(value) = HeaderValue::from_str(&peer.node_id) {
            response.headers_mut().insert(SERVED_BY_HEADER, value);
        }
        response
    }
}

/// Peers serving this version with room, best first.
fn candidates<'a>(peers: &'a [Peer], function: &str, sha256: &str) -> Vec<&'a Peer> {
    let members: Vec<Candidate> = peers
        .iter()
        .filter(|p| p.free_slots > 0 && p.serves(function, sha256))
        .map(|p| Candidate {
            node_id: p.node_id.clone(),
            free_slots: p.free_slots,
            load: p.load,
        })
        .collect();
    let first = placement::choose(function, &members, OWNERS).map(|c| c.node_id.clone());
    let mut order: Vec<String> = first.iter().cloned().collect();
    for owner in placement::owners(function, &members, members.len()) {
        if Some(&owner.node_id) != first.as_ref() {
            order.push(owner.node_id.clone());
        }
    }
    order
        .iter()
        .filter_map(|id| peers.iter().find(|p| &p.node_id == id))
        .collect()
}

fn is_hop_by_hop(name: &header::HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "upgrade"
            | "host"
            | HOP_HEADER
            | SIGNATURE_HEADER
    )
}

fn full(bytes: Bytes) -> ForwardBody {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body the HTTP client may take, that can be had back untouched if the
/// client never started sending it (the connection failed, or the peer
/// answered before reading it).
struct Reclaimable<B> {
    shared: Arc<Shared<B>>,
}

struct Shared<B> {
    body: Mutex<Option<B>>,
    started: AtomicBool,
}

struct Slot<B>(Arc<Shared<B>>);

impl<B> Slot<B> {
    fn reclaim(self) -> Option<B> {
        if self.0.started.load(Ordering::Acquire) {
            return None;
        }
        self.0.body.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl<B> Reclaimable<B> {
    fn new(body: B) -> (Self, Slot<B>) {
        let shared = Arc::new(Shared {
            body: Mutex::new(Some(body)),
            started: AtomicBool::new(false),
        });
        (
            Reclaimable {
                shared: Arc::clone(&shared),
            },
            Slot(shared),
        )
    }
}

impl<B> HttpBody for Reclaimable<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.shared.started.store(true, Ordering::Release);
        let mut body = self.shared.body.lock().unwrap_or_else(|e| e.into_inner());
        match body.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        let body = self.shared.body.lock().unwrap_or_else(|e| e.into_inner());
        body.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let body = self.shared.body.lock().unwrap_or_else(|e| e.into_inner());
        body.as_ref()
            .map_or(SizeHint::with_exact(0), |b| b.size_hint())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};

    use super::*;
    use crate::cluster::registry::{Entry, Version};
    use lichen_core::gossip::FunctionState;

    fn peer(id: &str, free: u32, load: u32, sha: Option<&str>) -> Peer {
        let mut functions = HashMap::new();
        if let Some(sha) = sha {
            let mut entry = Entry::new("f");
            entry.deploy(Version {
                id: 1,
                sha256: sha.to_string(),
                size: 1,
                stamp: 1,
                origin: "x".to_string(),
                parent: None,
            });
            functions.insert(
                "f".to_string(),
                FunctionState {
                    entry,
                    serving: Some(1),
                },
            );
        }
        Peer {
            node_id: id.to_string(),
            api: format!("http://{id}"),
            gossip: ([127, 0, 0, 1], 1).into(),
            free_slots: free,
            load,
            kv: String::new(),
            functions,
            modules: BTreeSet::new(),
            clock_offset_ms: None,
        }
    }

    #[test]
    fn only_peers_with_room_serving_the_same_version_are_candidates() {
        let peers = [
            peer("full", 0, 9, Some("v1")),
            peer("old", 5, 0, Some("v0")),
            peer("none", 5, 0, None),
            peer("p", 5, 3, Some("v1")),
            peer("q", 5, 1, Some("v1")),
        ];
        let ids: Vec<&str> = candidates(&peers, "f", "v1")
            .iter()
            .map(|p| p.node_id.as_str())
            .collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(sorted, ["p", "q"]);
        // The two owners with room: the less loaded goes first.
        assert_eq!(ids[0], "q");
    }

    #[tokio::test]
    async fn an_untouched_body_can_be_had_back_and_a_started_one_cannot() {
        let (body, slot) = Reclaimable::new(Full::new(Bytes::from_static(b"x")));
        drop(body);
        assert!(slot.reclaim().is_some());

        let (body, slot) = Reclaimable::new(Full::new(Bytes::from_static(b"x")));
        let collected = body.collect().await.unwrap().to_bytes();
        assert_eq!(&collected[..], b"x");
        assert!(slot.reclaim().is_none());
    }
}
