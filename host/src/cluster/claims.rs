//! Who runs a cron tick: claims exchanged directly between hosts.
//!
//! Each tick `(function, trigger, time)` ranks the hosts that serve the
//! function by a rendezvous weight of the tick and the host
//! ([`placement::tick_weight`]), which every host computes alike whatever
//! its view of the members. The host ranked `r` acts `r` takeover steps
//! after the tick, unless it already knows a claim for it. To act it claims:
//! it sends the claim to every live peer, signed, and runs the tick only if
//! none refused. A host refuses a claim when it holds one of higher weight
//! (its own, pending or running, or a peer's it accepted), and gives up its
//! own pending claim for one of higher weight; so of two hosts that claim
//! at once and can reach each other, at most one runs the tick, and a host
//! that died before its turn is passed over one step later.
//!
//! What this does not give: hosts that cannot reach each other (a
//! partition) may both run a tick; a host that dies after its claim was
//! accepted but before its guest ran leaves that tick unrun.
//!
//! With the NATS key-value backend a claim the peers accepted must also
//! take the tick's lease: a key created in a JetStream key-value bucket
//! ([`LEASES_BUCKET`]), which only one create can do. Hosts that cannot see
//! each other but reach NATS still run each tick once. A host whose claim
//! its peers accepted but that cannot reach NATS runs no tick: it releases
//! its claim, and the next host in turn claims the tick again and takes
//! the lease if NATS answers it (unless the first create happened after
//! all, unseen: then nobody runs the tick).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use tokio::sync::OnceCell;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use serde::{Deserialize, Serialize};

use super::{Cluster, Peer, placement};

/// The internal route claims are sent to.
pub const CLAIMS_PATH: &str = "/v1/internal/cron-claims";
/// How long a claim is remembered: ticks older than this are not run late.
pub const CLAIMS_KEPT: Duration = Duration::from_secs(15 * 60);
/// The largest claim body read.
pub const MAX_CLAIM_BYTES: usize = 1024;
/// The JetStream key-value bucket of tick leases, with the NATS backend.
pub const LEASES_BUCKET: &str = "lichen_cron_leases";
/// How long a host waits for NATS to give a lease (at most: the key-value
/// backend's own timeout may be shorter); well under the minute its peers
/// keep the tick for it to be released.
pub const LEASE_WAIT: Duration = Duration::from_secs(10);

/// One tick of one trigger of a function.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Tick {
    pub function: String,
    pub trigger: u32,
    /// The tick's time, milliseconds since the Unix epoch.
    pub at_ms: i64,
}

impl Tick {
    /// The weight of `node` for this tick: the highest weight runs it.
    pub fn weight(&self, node: &str) -> u64 {
        placement::tick_weight(&self.function, self.trigger, self.at_ms, node)
    }
}

/// A claim as sent between hosts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimMessage {
    #[serde(flatten)]
    pub tick: Tick,
    pub node: String,
    /// The node gives its claim up: it could not take the tick's lease.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub release: bool,
}

/// A host's answer to a claim.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimAnswer {
    pub accepted: bool,
    /// The host whose claim this host holds for the tick.
    pub holder: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// This host's own claim, still collecting answers.
    Pending,
    /// This host's own claim, answered by all: it runs (or ran) the tick.
    Running,
    /// A peer's claim, accepted.
    Peer,
}

#[derive(Debug, Clone)]
struct Holding {
    node: String,
    weight: u64,
    held: Held,
    since: Instant,
}

/// The claims a host knows, by tick.
#[derive(Default)]
pub struct Claims {
    held: Mutex<HashMap<Tick, Holding>>,
}

impl Claims {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Tick, Holding>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether any claim for `tick` is known here.
    pub fn known(&self, tick: &Tick) -> bool {
        self.lock().contains_key(tick)
    }

    /// A peer's claim: accepted unless a claim of higher weight is held
    /// (this host's own pending one gives way to a higher one). A release
    /// forgets the claim of the node that sent it.
    pub fn receive(&self, claim: &ClaimMessage) -> ClaimAnswer {
        let weight = claim.tick.weight(&claim.node);
        let mut held = self.lock();
        held.retain(|_, h| h.since.elapsed() < CLAIMS_KEPT);
        if claim.release {
            if held.get(&claim.tick).is_some_and(|h| h.node == claim.node) {
                held.remove(&claim.tick);
            }
            return ClaimAnswer {
                accepted: true,
                holder: String::new(),
            };
        }
        let accept = match held.get(&claim.tick) {
            None => true,
            Some(h) if h.node == claim.node => true,
            Some(h) if h.held == Held::Running => false,
            Some(h) => weight > h.weight,
        };
        if accept {
            held.insert(
                claim.tick.clone(),
                Holding {
                    node: claim.node.clone(),
                    weight,
                    held: Held::Peer,
                    since: Instant::now(),
                },
            );
        }
        let holder = held
            .get(&claim.tick)
            .map_or_else(|| claim.node.clone(), |h| h.node.clone());
        ClaimAnswer {
            accepted: accept,
            holder,
        }
    }

    /// Starts this host's claim: `false` if a claim is already known.
    fn begin(&self, tick: &Tick, node: &str) -> bool {
        let mut held = self.lock();
        if held.contains_key(tick) {
            return false;
        }
        held.insert(
            tick.clone(),
            Holding {
                node: node.to_string(),
                weight: tick.weight(node),
                held: Held::Pending,
                since: Instant::now(),
            },
        );
        true
    }

    /// Gives up this host's running claim (its lease could not be taken):
    /// kept as a claim of weight 0 by nobody, so this host does not claim
    /// the tick again but accepts any other host's claim.
    fn give_up(&self, tick: &Tick, node: &str) {
        if let Some(holding) = self.lock().get_mut(tick)
            && holding.node == node
        {
            holding.node = String::new();
            holding.weight = 0;
            holding.held = Held::Peer;
        }
    }

    /// Ends this host's claim: running if it is still this host's and every
    /// answer accepted it; else it gives way (to the holder a refusal
    /// named, kept so this host does not claim the tick again).
    fn settle(&self, tick: &Tick, node: &str, refused_by: Option<String>) -> bool {
        let mut held = self.lock();
        let Some(holding) = held.get_mut(tick) else {
            return false;
        };
        if holding.node != node || holding.held != Held::Pending {
            return false;
        }
        match refused_by {
            None => {
                holding.held = Held::Running;
                true
            }
            Some(holder) => {
                holding.node = holder;
                holding.weight = 0;
                holding.held = Held::Peer;
                false
            }
        }
    }
}

/// Tick leases in NATS: a key per tick, created once.
pub struct Leases {
    js: jetstream::Context,
    replicas: usize,
    store: OnceCell<kv::Store>,
}

/// What taking a lease came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    Taken,
    /// Another host created the key first.
    Held,
    /// NATS did not answer, or answered with an error: the tick is not run
    /// here (the create may have happened).
    Unavailable,
}

impl Leases {
    pub fn new(js: jetstream::Context, replicas: usize) -> Self {
        Leases {
            js,
            replicas,
            store: OnceCell::new(),
        }
    }

    /// Creates `tick`'s key holding `node`, waiting at most [`LEASE_WAIT`].
    pub async fn take(&self, tick: &Tick, node: &str) -> Lease {
        match tokio::time::timeout(LEASE_WAIT, self.create(tick, node)).await {
            Ok(lease) => lease,
            Err(_) => {
                tracing::warn!(function = %tick.function, tick_ms = tick.at_ms, "no answer from NATS to a cron lease in time");
                Lease::Unavailable
            }
        }
    }

    async fn create(&self, tick: &Tick, node: &str) -> Lease {
        let store = self
            .store
            .get_or_try_init(|| async {
                crate::kv::nats::open_bucket(
                    &self.js,
                    LEASES_BUCKET,
                    self.replicas,
                    true,
                    CLAIMS_KEPT,
                )
                .await?
                .ok_or_else(|| crate::kv::KvError::Unavailable("no lease bucket".to_string()))
            })
            .await;
        let store = match store {
            Ok(store) => store,
            Err(error) => {
                tracing::warn!(error = %error, "the cron lease bucket cannot be opened");
                return Lease::Unavailable;
            }
        };
        let key = format!("{}.{}.{}", tick.function, tick.trigger, tick.at_ms);
        // Created only if the key has no message yet, under one message
        // id: a create whose answer was lost is recognised as this host's,
        // not taken for another's lease.
        let value = bytes::Bytes::from(node.to_string());
        match crate::kv::nats::write_once(&self.js, store, &key, Some(value), 0).await {
            Ok(crate::kv::nats::Cas::Applied(_)) => Lease::Taken,
            Ok(crate::kv::nats::Cas::Lost) => Lease::Held,
            Err(error) => {
                tracing::warn!(error = %error, key, "taking a cron lease failed");
                Lease::Unavailable
            }
        }
    }
}

impl Cluster {
    /// Claims `tick` for this host among its live peers: `true` if none
    /// refused (peers that do not answer within `wait` are passed over:
    /// they are down, or cut off) and, with the NATS backend, this host
    /// took the tick's lease.
    pub async fn claim_tick(&self, tick: &Tick, wait: Duration) -> bool {
        if !self.claims.begin(tick, &self.node_id) {
            return false;
        }
        let peers = self.peers();
        let answers = self.send_to_all(&peers, tick, false, wait).await;
        let refused_by = answers
            .into_iter()
            .flatten()
            .find(|answer| !answer.accepted)
            .map(|answer| answer.holder);
        let accepted = self.claims.settle(tick, &self.node_id, refused_by.clone());
        let lease = match (&self.leases, accepted) {
            (Some(leases), true) => leases.take(tick, &self.node_id).await,
            _ => Lease::Taken,
        };
        let won = accepted && lease == Lease::Taken;
        if accepted && lease == Lease::Unavailable {
            // The peers hold this claim: they take the tick over only once
            // told. The peers now are those that may claim it next.
            self.claims.give_up(tick, &self.node_id);
            self.send_to_all(&self.peers(), tick, true, wait).await;
        }
        let outcome = match lease {
            _ if won => "won",
            Lease::Unavailable => "lease_unavailable",
            _ => "lost",
        };
        self.metrics
            .triggers
            .claims
            .with_label_values(&[outcome])
            .inc();
        if let Some(holder) = refused_by {
            tracing::debug!(function = %tick.function, trigger = tick.trigger, tick_ms = tick.at_ms, holder, "cron tick claimed by another host");
        }
        won
    }

    /// A peer's claim, from the internal route.
    pub fn receive_claim(&self, claim: &ClaimMessage) -> ClaimAnswer {
        self.claims.receive(claim)
    }

    /// Whether a claim for `tick` is known here.
    pub fn tick_claimed(&self, tick: &Tick) -> bool {
        self.claims.known(tick)
    }

    /// Sends this host's claim of `tick` (or its release) to each of
    /// `peers` at once; their answers, `None` where none came in time.
    async fn send_to_all(
        &self,
        peers: &[Peer],
        tick: &Tick,
        release: bool,
        wait: Duration,
    ) -> Vec<Option<ClaimAnswer>> {
        let message = ClaimMessage {
            tick: tick.clone(),
            node: self.node_id.clone(),
            release,
        };
        let Ok(body) = serde_json::to_vec(&message) else {
            return Vec::new();
        };
        let body = Bytes::from(body);
        let asks = peers
            .iter()
            .map(|peer| self.send_claim(peer, body.clone(), wait));
        futures::future::join_all(asks).await
    }

    /// Sends a claim to `peer`; `None` if it did not answer in time.
    async fn send_claim(&self, peer: &Peer, body: Bytes, wait: Duration) -> Option<ClaimAnswer> {
        let method = http::Method::POST;
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{CLAIMS_PATH}", peer.api))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(
                Full::new(body.clone())
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            )
            .ok()?;
        self.sign(peer, &mut request, Some(&body)).ok()?;
        let asked = async {
            let response = self.client.request(request).await.ok()?;
            if response.status() != StatusCode::OK {
                return None;
            }
            let body = Limited::new(response.into_body(), MAX_CLAIM_BYTES)
                .collect()
                .await
                .ok()?
                .to_bytes();
            serde_json::from_slice::<ClaimAnswer>(&body).ok()
        };
        match tokio::time::timeout(wait, asked).await {
            Ok(answer) => answer,
            Err(_) => {
                tracing::debug!(peer = %peer.node_id, "no answer to a cron claim in time");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tick(at_ms: i64) -> Tick {
        Tick {
            function: "sweep".to_string(),
            trigger: 0,
            at_ms,
        }
    }

    fn claim(tick: &Tick, node: &str) -> ClaimMessage {
        ClaimMessage {
            tick: tick.clone(),
            node: node.to_string(),
            release: false,
        }
    }

    fn release(tick: &Tick, node: &str) -> ClaimMessage {
        ClaimMessage {
            release: true,
            ..claim(tick, node)
        }
    }

    /// The two nodes of `tick` ordered by weight, higher first.
    fn ranked(tick: &Tick) -> (&'static str, &'static str) {
        if tick.weight("a") > tick.weight("b") {
            ("a", "b")
        } else {
            ("b", "a")
        }
    }

    #[test]
    fn of_two_claims_at_once_only_the_higher_one_is_accepted_by_both() {
        for at in 0..50 {
            let tick = tick(at * 1000);
            let (high, low) = ranked(&tick);
            let (at_high, at_low) = (Claims::default(), Claims::default());
            assert!(at_high.begin(&tick, high));
            assert!(at_low.begin(&tick, low));
            // Each receives the other's claim.
            let low_answer = at_high.receive(&claim(&tick, low));
            let high_answer = at_low.receive(&claim(&tick, high));
            assert!(!low_answer.accepted);
            assert_eq!(low_answer.holder, high);
            assert!(high_answer.accepted);
            assert!(at_high.settle(&tick, high, None));
            assert!(!at_low.settle(&tick, low, Some(low_answer.holder)));
            assert!(at_low.known(&tick));
        }
    }

    #[test]
    fn a_running_claim_is_never_given_up_and_a_known_tick_is_not_claimed_again() {
        let tick = tick(7_000);
        let (high, low) = ranked(&tick);
        let claims = Claims::default();
        assert!(claims.begin(&tick, low));
        assert!(claims.settle(&tick, low, None));
        assert!(!claims.receive(&claim(&tick, high)).accepted);
        assert!(!claims.begin(&tick, low));
        // A third party takes the first claim, then a higher one.
        let other = Claims::default();
        assert!(other.receive(&claim(&tick, low)).accepted);
        assert!(other.receive(&claim(&tick, high)).accepted);
        assert!(!other.receive(&claim(&tick, low)).accepted);
        assert!(!other.begin(&tick, "c"));
    }

    #[test]
    fn a_released_claim_is_forgotten_and_the_tick_can_be_claimed_again() {
        let tick = tick(9_000);
        let (high, low) = ranked(&tick);
        // `high` claimed and was accepted here, then could not take the
        // lease: its release makes room for `low`.
        let here = Claims::default();
        assert!(here.receive(&claim(&tick, high)).accepted);
        assert!(!here.receive(&claim(&tick, low)).accepted);
        // A release from a node that does not hold the tick changes nothing.
        here.receive(&release(&tick, low));
        assert!(here.known(&tick));
        here.receive(&release(&tick, high));
        assert!(!here.known(&tick));
        assert!(here.begin(&tick, low));
        // On `high` itself: given up, it claims no more and accepts `low`.
        let there = Claims::default();
        assert!(there.begin(&tick, high));
        assert!(there.settle(&tick, high, None));
        there.give_up(&tick, high);
        assert!(!there.begin(&tick, high));
        assert!(there.receive(&claim(&tick, low)).accepted);
    }
}
