//! Peer hosts sharing work: membership, one registry of functions, modules
//! moved by content hash, and forwarding when this host is full.
//!
//! - Membership and failure detection are chitchat's (Scuttlebutt gossip
//!   with a phi-accrual failure detector, as Quickwit runs it), over UDP
//!   datagrams sealed with the cluster secret ([`transport`]). Each host
//!   publishes `api` (its HTTP
//!   address), `load` (free invocation slots and invocations in flight),
//!   `mod:<sha256>` per module it holds, `fn:<name>` per function it
//!   knows: its registry entry (`lichen_core::registry`) and the version it
//!   serves, and `secret:<name>` per secret it holds (or removed), sealed
//!   under a key derived from the cluster secret.
//! - A host joins every peer's entry into its own record ([`sync`]), so an
//!   entry outlives the host that wrote it; then it fetches the modules of
//!   the versions kept (from a peer that holds them, checking the hash) and
//!   serves the active one, compiling it itself. Secrets go the same way: the
//!   later version wins, and is sealed again with this host's own key.
//! - Forwarding ([`forward`]) sends an invocation this host has no room for
//!   to the function's rendezvous owners with room ([`placement`]).
//! - Cron ticks are run by one host each, chosen by claims sent between
//!   hosts ([`claims`]).
//! - Every internal HTTP request (module fetches, forwards, claims) is signed
//!   ([`Cluster::sign`]) and checked ([`Cluster::verify`]) with keys from
//!   the same secret; over HTTPS when the host serves TLS.

pub mod claims;
pub mod forward;
pub mod placement;
pub mod sync;
pub mod transport;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use chitchat::{ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig};
use serde::Serialize;

use crate::functions::Functions;
use crate::kv::Kv;
use crate::metrics::Metrics;
use crate::names::FunctionName;
use crate::secrets::Secrets;
use crate::tokens::Tokens;
use lichen_core::gossip::{
    self, FunctionState, KEY_API, KEY_KV, KEY_LOAD, PREFIX_FN, PREFIX_MOD, PREFIX_SECRET,
    PREFIX_TOKEN, SealedText, SecretState, TokenState,
};
pub use lichen_core::registry;
use lichen_core::registry::Stamp;
use lichen_core::seal::{self, NonceCache, Signed};
pub use lichen_core::seal::{Keyring, SIGNATURE_HEADER, Secret};
use transport::{PeerKeys, SealedTransport};

/// Header of a forwarded request: the node that forwarded it. A request that
/// carries it is never forwarded again.
pub const HOP_HEADER: &str = "x-lichen-forwarded-by";
/// Header naming the host that ran a forwarded invocation.
pub const SERVED_BY_HEADER: &str = "x-lichen-served-by";
/// Header of a forwarded request: the SHA-256 of the module the forwarding
/// host runs for the function; a peer serving another answers `409`
/// `module_mismatch` without running it. On a function's response: the
/// module that answered.
pub const MODULE_HEADER: &str = "x-lichen-module";
/// Header of a forwarded request: the `Host` the client sent (the hop to
/// the peer has the peer's own), given back to the guest there.
pub const HOST_HEADER: &str = "x-lichen-forwarded-host";
/// The gossip cluster id. Not secret and the same for every cluster: the
/// sealing of each datagram is what keeps clusters apart.
const CLUSTER_ID: &str = "lichen";
/// Signatures a host remembers at once (each for twice the request window);
/// past this, internal requests are refused as busy rather than a nonce
/// forgotten early.
const NONCES_KEPT: usize = 1_000_000;

/// A peer clock further off than this is reported (log, status page).
pub const MAX_CLOCK_OFFSET: Duration = Duration::from_secs(10);

/// Gossip rounds after which a host that has seen no peer serves anyway.
const JOIN_ROUNDS: u64 = 5;

/// How a host takes part in a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub node_id: String,
    /// Where gossip (UDP) listens.
    pub gossip_listen: SocketAddr,
    /// The gossip address peers use; `None`: `gossip_listen`.
    pub gossip_advertise: Option<SocketAddr>,
    /// The HTTP address peers use for this host; `None`: the bound address.
    pub api_advertise: Option<SocketAddr>,
    /// Gossip addresses of hosts to join through.
    pub seeds: Vec<String>,
    /// The cluster secret, and the previous one during a rotation.
    pub keyring: Arc<Keyring>,
    /// CA certificates (PEM) that sign peers' HTTPS certificates; `None`:
    /// the chain of this host's own certificate.
    pub peer_ca: Option<std::path::PathBuf>,
    pub gossip_interval: Duration,
    /// `--max-clock-ahead`: a stamp further ahead of this host's clock is
    /// refused (see [`crate::functions::Functions::admit_stamp`]).
    pub max_clock_ahead: Duration,
    /// The registry lives in the NATS cluster of the key-value backend
    /// (`crate::shared_registry`); gossip carries it too.
    pub shared_registry: bool,
}

/// A live peer as its gossip state says.
#[derive(Debug, Clone, Serialize)]
pub struct Peer {
    pub node_id: String,
    pub api: String,
    pub gossip: SocketAddr,
    pub free_slots: u32,
    pub load: u32,
    /// Which key-value data it sees: a function with stores is only sent
    /// to peers that see the same as this host.
    pub kv: String,
    /// What it knows of each function and which version it serves.
    #[serde(skip)]
    pub functions: HashMap<String, FunctionState>,
    pub modules: BTreeSet<String>,
    /// Its wall clock minus this host's, as its latest load value read
    /// (late by up to the gossip delay, so a little low).
    pub clock_offset_ms: Option<i64>,
}

impl Peer {
    /// Whether it serves exactly this version of `function`.
    pub fn serves(&self, function: &str, sha256: &str) -> bool {
        self.serving(function).is_some_and(|(_, sha)| sha == sha256)
    }

    /// The version of `function` it serves: id and module.
    pub fn serving(&self, function: &str) -> Option<(u64, &str)> {
        let state = self.functions.get(function)?;
        let id = state.serving?;
        let version = state.entry.version(id)?;
        Some((id, version.sha256.as_str()))
    }
}

/// How many conflicts a host remembers for its status page.
const CONFLICTS_KEPT: usize = 20;

/// Two changes to one function made without seeing each other, as seen here.
#[derive(Debug, Clone, Serialize)]
pub struct ConflictNote {
    pub function: String,
    /// When this host saw it (Unix ms).
    pub seen_ms: u64,
    pub winner: registry::Head,
    pub loser: registry::Head,
}

/// A peer the failure detector holds dead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Departed {
    pub node_id: String,
    /// The API address it last published, if this host saw one.
    pub api: Option<String>,
}

/// A gossip value's place: (node incarnation, key).
type GossipKey = (String, String);

/// The change a `secret:` or `token:` value carries: (stamp, origin).
type Carried = (Stamp, String);

/// This host's membership in a cluster.
pub struct Cluster {
    node_id: String,
    keyring: Arc<Keyring>,
    /// Which secret each peer speaks (see [`transport`]).
    peer_keys: Arc<PeerKeys>,
    /// Nonces of the peer requests taken in the window.
    nonces: Mutex<NonceCache>,
    /// `--peer-mtls`: peer requests come only over connections whose
    /// client presented a certificate of the peer CA.
    mutual: bool,
    api_url: String,
    interval: Duration,
    chitchat: ChitchatHandle,
    /// Live peers at the latest gossip round (this host excluded).
    peers: RwLock<Arc<Vec<Peer>>>,
    /// Peers the failure detector holds dead (until chitchat forgets them,
    /// an hour later), and the API address each was last seen with: the
    /// status page lists them. Entries of nodes neither live nor dead go.
    departed: RwLock<Arc<Vec<Departed>>>,
    last_api: Mutex<HashMap<String, String>>,
    /// Parsed gossip values by (node, key): re-read only when their version
    /// changes, as a round sees every key of every peer.
    parsed: Mutex<HashMap<GossipKey, (u64, Option<FunctionState>)>>,
    /// The version of each `secret:` and `token:` value already read, by
    /// (node, key), and which change it carries: (stamp, origin).
    parsed_secrets: Mutex<HashMap<GossipKey, (u64, Option<Carried>)>>,
    /// The version (stamp, origin) this host gossips of each `secret:` and
    /// `token:` key (see [`Cluster::keep_custody`]).
    published: Mutex<HashMap<String, Carried>>,
    /// Each peer incarnation's clock offset, with the version of the load
    /// value it was measured from.
    offsets: Mutex<HashMap<String, (u64, i64)>>,
    /// Peers whose clock is off by more than [`MAX_CLOCK_OFFSET`] now (said
    /// once when they go past it, and once when they are back).
    skewed: Mutex<HashSet<String>>,
    /// The latest conflicts this host saw, newest last.
    conflicts: Mutex<VecDeque<ConflictNote>>,
    /// Why each function's registry entry does not apply here, while it
    /// does not.
    apply_errors: Mutex<HashMap<String, String>>,
    /// Why this host left the cluster at once: another host already runs
    /// under its node id.
    refused: Mutex<Option<String>>,
    /// Peers this host has forwarded to, per function, to drop their series
    /// when the function is deleted.
    forwarded_to: Mutex<HashMap<String, HashSet<String>>>,
    /// Peers a connection just failed to, and when: skipped by forwarding
    /// until the failure detector catches up.
    suspects: Mutex<HashMap<String, Instant>>,
    client: forward::Client,
    metrics: Metrics,
    /// The key-value backend, whose identity each round publishes.
    kv: Arc<Kv>,
    /// Gossip rounds done since the start.
    rounds: AtomicU64,
    /// Whether this host has heard from the cluster (see [`Cluster::joined`]).
    joined: AtomicBool,
    /// Draining before a shutdown: gossiped as no free slots, so peers stop
    /// sending it work before its connections close (work they sent as a
    /// connection closed could not be sent again elsewhere).
    draining: AtomicBool,
    /// Cron ticks claimed, by this host or its peers ([`claims`]).
    claims: claims::Claims,
    /// Tick leases in NATS, with the NATS key-value backend.
    leases: Option<claims::Leases>,
}

impl Cluster {
    /// Joins (or starts) the cluster: opens the gossip socket and publishes
    /// this host's address.
    pub async fn start(
        config: ClusterConfig,
        api_addr: SocketAddr,
        tls: Option<&Arc<crate::tls::Tls>>,
        metrics: Metrics,
        kv: Arc<Kv>,
    ) -> anyhow::Result<Arc<Cluster>> {
        let api = config.api_advertise.unwrap_or(api_addr);
        if api.ip().is_unspecified() {
            anyhow::bail!(
                "the API listens on {api}: peers need a reachable address, give --advertise"
            );
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        let api_url = format!("{scheme}://{api}");
        let mutual = tls.is_some_and(|tls| tls.mutual());
        let client = forward::client(
            match tls {
                Some(tls) => tls.peer_client_config(config.peer_ca.as_deref())?,
                None => crate::tls::peer_client_config(config.peer_ca.as_deref(), None)?,
            },
            mutual,
        );
        let gossip_advertise = config.gossip_advertise.unwrap_or(config.gossip_listen);
        if gossip_advertise.ip().is_unspecified() {
            anyhow::bail!(
                "gossip listens on {gossip_advertise}: peers need a reachable address, give --gossip with an IP"
            );
        }
        for seed in &config.seeds {
            if tokio::net::lookup_host(seed.as_str()).await.is_err() {
                tracing::warn!(
                    peer = %seed,
                    "a peer does not resolve (yet); gossip tries it again every minute"
                );
            }
        }
        let generation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let chitchat_id = ChitchatId::new(config.node_id.clone(), generation, gossip_advertise);
        let interval = config.gossip_interval;
        let chitchat_config = ChitchatConfig {
            chitchat_id,
            cluster_id: CLUSTER_ID.to_string(),
            gossip_interval: interval,
            listen_addr: config.gossip_listen,
            seed_nodes: config.seeds.clone(),
            failure_detector_config: FailureDetectorConfig {
                // About ten silent rounds mark a peer dead.
                initial_interval: interval,
                max_interval: interval * 10,
                dead_node_grace_period: Duration::from_secs(3600),
                ..FailureDetectorConfig::default()
            },
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: chitchat::ProtocolVersion::V0,
        };
        let initial = vec![(KEY_API.to_string(), api_url.clone())];
        let peer_keys = Arc::new(PeerKeys::default());
        let transport = SealedTransport {
            keyring: Arc::clone(&config.keyring),
            peer_keys: Arc::clone(&peer_keys),
            rejected: metrics.gossip_rejected.clone(),
        };
        let chitchat = chitchat::spawn_chitchat(chitchat_config, initial, &transport)
            .await
            .with_context(|| format!("starting gossip on {}", config.gossip_listen))?;
        tracing::info!(node_id = %config.node_id, gossip = %gossip_advertise, api = %api_url, seeds = ?config.seeds, "joined the cluster");
        let leases = kv
            .nats_context()
            .map(|(js, replicas)| claims::Leases::new(js, replicas));
        Ok(Arc::new(Cluster {
            node_id: config.node_id,
            client,
            keyring: config.keyring,
            peer_keys,
            nonces: Mutex::new(NonceCache::new(NONCES_KEPT)),
            mutual,
            api_url,
            interval,
            chitchat,
            peers: RwLock::new(Arc::new(Vec::new())),
            departed: RwLock::new(Arc::new(Vec::new())),
            last_api: Mutex::new(HashMap::new()),
            parsed: Mutex::new(HashMap::new()),
            parsed_secrets: Mutex::new(HashMap::new()),
            published: Mutex::new(HashMap::new()),
            offsets: Mutex::new(HashMap::new()),
            skewed: Mutex::new(HashSet::new()),
            conflicts: Mutex::new(VecDeque::new()),
            apply_errors: Mutex::new(HashMap::new()),
            refused: Mutex::new(None),
            forwarded_to: Mutex::new(HashMap::new()),
            suspects: Mutex::new(HashMap::new()),
            metrics,
            kv,
            rounds: AtomicU64::new(0),
            joined: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            claims: claims::Claims::default(),
            leases,
        }))
    }

    /// Whether the host has heard from the cluster: a round has seen a live
    /// peer, or [`JOIN_ROUNDS`] rounds have passed without one (the first
    /// host of a cluster, or seeds all down: it serves on its own). Until
    /// then `/readyz` says not ready, since the host may not know the
    /// cluster's functions yet.
    pub fn joined(&self) -> bool {
        self.joined.load(Ordering::Relaxed)
    }

    /// Stops taking work from peers: from the next round this host gossips
    /// no free slots (it still serves what reaches it).
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Whether [`Cluster::start_draining`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The gossip interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Signs `request` to `peer`, with every header it will carry set: under
    /// the secret the peer speaks, its timestamp in the peer's time (this
    /// host's clock plus the offset gossip measured), bound to the peer's
    /// node id and to the request's headers that change its meaning
    /// (`seal::canonical_headers`, `Host` set to the peer's address first
    /// so it is one of them), over the body when it is known.
    pub fn sign<B>(
        &self,
        peer: &Peer,
        request: &mut http::Request<B>,
        body: Option<&[u8]>,
    ) -> anyhow::Result<()> {
        if !request.headers().contains_key(http::header::HOST)
            && let Some(authority) = request.uri().authority()
        {
            let host = http::HeaderValue::from_str(authority.as_str())?;
            request.headers_mut().insert(http::header::HOST, host);
        }
        let secret = self.keyring.get(self.peer_keys.for_peer(peer.gossip));
        let ts = now_ms().saturating_add_signed(peer.clock_offset_ms.unwrap_or(0));
        let digest = body.map(seal::body_digest);
        let target = request.uri().path_and_query().map_or("/", |p| p.as_str());
        let headers = seal::canonical_headers(request.headers());
        let header = seal::sign_request(
            secret,
            request.method().as_str(),
            target,
            &peer.node_id,
            &headers,
            digest.as_ref(),
            ts,
        )?;
        request
            .headers_mut()
            .insert(SIGNATURE_HEADER, http::HeaderValue::from_str(&header)?);
        Ok(())
    }

    /// Checks an internal request's signature and takes its nonce (and
    /// under mutual TLS, that it came with a peer certificate); what is
    /// refused is counted by its code.
    pub fn verify<B>(&self, req: &http::Request<B>) -> Result<Signed, seal::Refused> {
        if self.mutual
            && req
                .extensions()
                .get::<crate::tls::PeerCertified>()
                .is_none()
        {
            self.note_refused(seal::Refused::CertificateMissing);
            return Err(seal::Refused::CertificateMissing);
        }
        let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let header = req
            .headers()
            .get(SIGNATURE_HEADER)
            .map(|h| h.to_str().unwrap_or_default());
        let now = now_ms();
        let headers = seal::canonical_headers(req.headers());
        let bound = (self.node_id.as_str(), headers.as_str());
        let verified = seal::verify_request(
            &self.keyring,
            req.method().as_str(),
            target,
            bound,
            header,
            now,
        )
        .and_then(|signed| {
            let taken = self
                .nonces
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(&signed, now);
            match taken {
                Ok(()) => Ok(signed),
                Err(seal::Take::Replayed) => Err(seal::Refused::Replayed),
                Err(seal::Take::Full) => Err(seal::Refused::Busy),
            }
        });
        if let Err(refused) = &verified {
            self.note_refused(*refused);
        }
        verified
    }

    /// Counts a refused internal request.
    pub fn note_refused(&self, refused: seal::Refused) {
        self.metrics
            .peer_requests_refused
            .with_label_values(&[refused.code()])
            .inc();
    }

    /// Which key-value data this host sees, as it gossips it.
    pub fn kv_identity(&self) -> String {
        self.kv.identity(&self.node_id)
    }

    /// Live peers as of the latest gossip round.
    pub fn peers(&self) -> Arc<Vec<Peer>> {
        Arc::clone(&self.peers.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Peers held dead as of the latest gossip round (a node id that is
    /// live again under a new incarnation is not among them).
    pub fn departed(&self) -> Arc<Vec<Departed>> {
        Arc::clone(&self.departed.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Gossips this host's record of `name`: its registry entry and the
    /// version it serves, and the modules it holds. Callers hold the admin
    /// lock, so records are published in the order they were written.
    pub async fn publish(&self, functions: &Functions, name: &FunctionName) {
        self.publish_holding(functions, name, &held_modules(functions))
            .await;
    }

    /// [`Cluster::publish`], with the modules this host holds already
    /// known.
    async fn publish_holding(
        &self,
        functions: &Functions,
        name: &FunctionName,
        modules: &BTreeSet<String>,
    ) {
        let Some(record) = functions.record(name) else {
            return;
        };
        let key = format!("{PREFIX_FN}{name}");
        let state = FunctionState {
            entry: record.entry,
            serving: record.serving.map(|s| s.version),
        };
        let Ok(json) = serde_json::to_string(&state) else {
            return;
        };
        self.chitchat
            .with_chitchat(|chitchat| {
                let state = chitchat.self_node_state();
                state.set(key.as_str(), json.as_str());
                self.set_modules(state, modules);
            })
            .await;
    }

    /// Gossips every record (at start: what this host stored before it
    /// joined, stamps and origins as they were). Secrets and tokens follow
    /// from [`Cluster::keep_custody`] each round.
    pub async fn publish_all(&self, functions: &Functions) {
        let names = functions.scan_records(|r| Some(r.name.clone()));
        self.publish_each(functions, &names).await;
    }

    /// Gossips each secret and token this host holds if it is the one to
    /// ([`Cluster::is_custodian`]), and withdraws those it is no longer the
    /// one for: a change travels in one copy, from the host that made it,
    /// not one per host that applied it (a secret may be 32 MiB), and still
    /// reaches a host that joins after its origin is gone.
    pub async fn keep_custody(&self, functions: &Functions) {
        let mut held: Vec<(String, Stamp, String, bool)> = functions
            .secrets
            .versions()
            .into_iter()
            .map(|(name, v)| (name, v.stamp, v.origin, true))
            .collect();
        held.extend(functions.tokens.names().into_iter().filter_map(|name| {
            let state = functions.tokens.state(&name)?;
            Some((name, state.stamp, state.origin, false))
        }));
        // Who gossips which version of each key, read once for the round.
        let mut carriers: HashMap<String, Vec<(String, Carried)>> = HashMap::new();
        for ((node, key), (_, carried)) in self
            .parsed_secrets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            if let Some(carried) = carried {
                let node = node.rsplit_once('/').map_or(node.as_str(), |(id, _)| id);
                carriers
                    .entry(key.clone())
                    .or_default()
                    .push((node.to_string(), carried.clone()));
            }
        }
        let mut counts = [0i64; 2];
        for (name, stamp, origin, secret) in held {
            let key = if secret {
                format!("{PREFIX_SECRET}{name}")
            } else {
                format!("{PREFIX_TOKEN}{name}")
            };
            let wanted = self.is_custodian(carriers.get(&key), stamp, &origin);
            let have = self
                .published
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key)
                .cloned();
            match (wanted, have) {
                (true, Some(have)) if have == (stamp, origin.clone()) => {}
                (true, _) if secret => self.publish_secret(&functions.secrets, &name).await,
                (true, _) => self.publish_token(&functions.tokens, &name).await,
                (false, Some(_)) => self.withdraw(&key).await,
                (false, None) => {}
            }
            if wanted {
                counts[usize::from(!secret)] += 1;
            }
        }
        self.metrics
            .gossip_custody
            .with_label_values(&["secret"])
            .set(counts[0]);
        self.metrics
            .gossip_custody
            .with_label_values(&["token"])
            .set(counts[1]);
    }

    /// Whether this host gossips its version (`stamp`, `origin`) of a key
    /// that live peers `carriers` gossip too: the host that made the change
    /// does; another, once it has heard the cluster, does while no peer
    /// gossiping that same version is its origin or has a lower node id:
    /// when the origin is gone, the holder of the lowest id takes over
    /// (after a round in which several may). A later version elsewhere
    /// that this host has not taken (refused for its stamp, say) does not
    /// count: its own stays gossiped.
    fn is_custodian(
        &self,
        carriers: Option<&Vec<(String, Carried)>>,
        stamp: Stamp,
        origin: &str,
    ) -> bool {
        if origin == self.node_id {
            return true;
        }
        if !self.joined() {
            return false;
        }
        !carriers.is_some_and(|carriers| {
            carriers.iter().any(|(node, (s, o))| {
                *s == stamp && o == origin && (node == origin || *node < self.node_id)
            })
        })
    }

    /// Stops gossiping `key` (a tombstone peers drop it by).
    async fn withdraw(&self, key: &str) {
        self.chitchat
            .with_chitchat(|chitchat| chitchat.self_node_state().delete(key))
            .await;
        self.published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    /// Gossips this host's version of the token `name` (revoked ones too,
    /// so an older version elsewhere does not come back): its hash, never
    /// the token.
    pub async fn publish_token(&self, tokens: &Tokens, name: &str) {
        let key = format!("{PREFIX_TOKEN}{name}");
        self.chitchat
            .with_chitchat(|chitchat| {
                let Some(state) = tokens.state(name) else {
                    return;
                };
                if let Ok(json) = serde_json::to_string(&state) {
                    chitchat.self_node_state().set(key.as_str(), json.as_str());
                    self.published
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(key.clone(), (state.stamp, state.origin.clone()));
                }
            })
            .await;
    }

    /// Gossips this host's version of the secret `name`, sealed (removed
    /// ones too, so an older value elsewhere does not come back). Read and
    /// sealed under gossip's lock, so what is published last is the latest.
    pub async fn publish_secret(&self, secrets: &Secrets, name: &str) {
        let key = format!("{PREFIX_SECRET}{name}");
        self.chitchat
            .with_chitchat(|chitchat| {
                let Some(version) = secrets.version(name) else {
                    return;
                };
                let aad = gossip::secret_aad(name, version.stamp, &version.origin);
                let sealed = match version.value {
                    Some(value) => match self.keyring.seal_value(&aad, value.as_bytes()) {
                        Ok(sealed) => Some(SealedText::from(&sealed)),
                        Err(error) => {
                            tracing::error!(secret = name, error = %error, "cannot seal a secret for the cluster");
                            return;
                        }
                    },
                    None => None,
                };
                let state = SecretState {
                    stamp: version.stamp,
                    origin: version.origin,
                    sealed,
                };
                if let Ok(json) = serde_json::to_string(&state) {
                    chitchat.self_node_state().set(key.as_str(), json.as_str());
                    self.published
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(key.clone(), (state.stamp, state.origin.clone()));
                }
            })
            .await;
    }

    /// The value a peer published for the secret `name`, opened; `None` if
    /// none of this host's cluster secrets opens it.
    pub fn open_secret(&self, name: &str, state: &SecretState) -> Option<Option<String>> {
        let Some(sealed) = &state.sealed else {
            return Some(None);
        };
        let aad = gossip::secret_aad(name, state.stamp, &state.origin);
        let plain = self.keyring.open_value(&aad, &sealed.decode()?)?;
        String::from_utf8(plain).ok().map(Some)
    }

    /// [`Cluster::publish`] of each of `names`, looking up the modules
    /// this host holds once.
    pub async fn publish_each(&self, functions: &Functions, names: &[FunctionName]) {
        let modules = held_modules(functions);
        for name in names {
            self.publish_holding(functions, name, &modules).await;
        }
    }

    /// Why this host does not take part in the cluster, if it does not:
    /// another host was there first under its node id.
    pub fn refused(&self) -> Option<String> {
        self.refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Leaves the cluster if another host runs under this host's node id
    /// and was there first (an earlier generation; the same: the lower
    /// gossip address). The one there first carries on.
    fn check_twins(&self, me: &ChitchatId, twins: &[ChitchatId]) {
        for twin in twins {
            let first = (twin.generation_id, twin.gossip_advertise_addr)
                < (me.generation_id, me.gossip_advertise_addr);
            if !first {
                tracing::warn!(node_id = %self.node_id, other = %twin.gossip_advertise_addr, "another host started under this host's node id; it leaves the cluster");
                continue;
            }
            let why = format!(
                "another host already runs as node id {:?} (gossip {}); this host left the cluster: give it another --node-id",
                self.node_id, twin.gossip_advertise_addr
            );
            tracing::error!("{why}");
            *self.refused.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
            self.shutdown();
            return;
        }
    }

    /// Counts, logs and remembers a conflict.
    pub fn note_conflict(&self, conflict: registry::Conflict) {
        self.metrics.registry_conflicts.inc();
        tracing::warn!(
            function = %conflict.name,
            winner = ?conflict.winner,
            loser = ?conflict.loser,
            "two changes made without seeing each other: the later stamp is in force, both versions are kept"
        );
        let mut conflicts = self.conflicts.lock().unwrap_or_else(|e| e.into_inner());
        if conflicts.len() == CONFLICTS_KEPT {
            conflicts.pop_front();
        }
        conflicts.push_back(ConflictNote {
            function: conflict.name,
            seen_ms: now_ms(),
            winner: conflict.winner,
            loser: conflict.loser,
        });
    }

    /// The latest conflicts, oldest first.
    pub fn conflicts(&self) -> Vec<ConflictNote> {
        let conflicts = self.conflicts.lock().unwrap_or_else(|e| e.into_inner());
        conflicts.iter().cloned().collect()
    }

    /// Why `function`'s registry entry does not apply here, if it does not.
    pub fn apply_error(&self, function: &str) -> Option<String> {
        let errors = self.apply_errors.lock().unwrap_or_else(|e| e.into_inner());
        errors.get(function).cloned()
    }

    /// Every function whose registry entry does not apply here, and why.
    pub fn apply_errors(&self) -> HashMap<String, String> {
        self.apply_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_apply_error(&self, function: &str, error: Option<String>) {
        let mut errors = self.apply_errors.lock().unwrap_or_else(|e| e.into_inner());
        match error {
            Some(error) => errors.insert(function.to_string(), error),
            None => errors.remove(function),
        };
    }

    /// Forgets every parsed value, so the next round reads all of them as
    /// new (after entries failed to merge).
    fn reread(&self) {
        self.parsed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Forgets every `secret:` value read, so the next round reads them
    /// again (after one failed to be stored).
    fn reread_secrets(&self) {
        // What each value carries is kept (custody goes on knowing who
        // gossips what); only the versions are forgotten.
        for (version, _) in self
            .parsed_secrets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values_mut()
        {
            *version = u64::MAX;
        }
    }

    /// Makes the `mod:` keys say exactly which modules this host holds.
    fn set_modules(&self, state: &mut chitchat::NodeState, modules: &BTreeSet<String>) {
        let held: Vec<String> = state
            .key_values()
            .filter_map(|(k, _)| k.strip_prefix(PREFIX_MOD).map(str::to_string))
            .collect();
        for sha in &held {
            if !modules.contains(sha) {
                state.delete(&format!("{PREFIX_MOD}{sha}"));
            }
        }
        for sha in modules {
            let key = format!("{PREFIX_MOD}{sha}");
            if !state.contains_key(&key) {
                state.set(key, "");
            }
        }
    }

    /// Publishes this host's free slots and load, and reads every live
    /// peer's state into [`Cluster::peers`]. Returns the function states
    /// and secrets peers published since the last round.
    async fn gossip_round(&self, free_slots: u32, load: u32) -> Fresh {
        let load_value = format!("{free_slots} {load} {}", now_ms());
        let kv_value = self.kv_identity();
        let (snapshot, dead, me, twins) = self
            .chitchat
            .with_chitchat(|chitchat| {
                let state = chitchat.self_node_state();
                state.set(KEY_LOAD, load_value.as_str());
                state.set(KEY_KV, kv_value.as_str());
                let me = chitchat.self_chitchat_id().clone();
                let dead: Vec<String> = chitchat
                    .dead_nodes()
                    .filter(|id| id.node_id != me.node_id)
                    .map(|id| id.node_id.to_string())
                    .collect();
                let twins: Vec<ChitchatId> = chitchat
                    .live_nodes()
                    .filter(|id| id.node_id == me.node_id && **id != me)
                    .cloned()
                    .collect();
                let live: Vec<ChitchatId> = chitchat
                    .live_nodes()
                    .filter(|id| id.node_id != me.node_id)
                    .cloned()
                    .collect();
                let live = live
                    .into_iter()
                    .filter_map(|id| {
                        let state = chitchat.node_state(&id)?;
                        let values: Vec<(String, u64, String)> = state
                            .key_values_including_deleted()
                            .filter(|(_, v)| !v.is_deleted())
                            .map(|(k, v)| (k.to_string(), v.version, v.value.clone()))
                            .collect();
                        Some((id, values))
                    })
                    .collect::<Vec<_>>();
                (live, dead, me, twins)
            })
            .await;
        self.check_twins(&me, &twins);
        let live: HashSet<String> = snapshot.iter().map(|(id, _)| incarnation(id)).collect();
        self.parsed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(node, _), _| live.contains(node));
        // Only what live peers gossip now (a key a peer withdrew goes).
        let gossiped: HashSet<(String, &str)> = snapshot
            .iter()
            .flat_map(|(id, values)| {
                let node = incarnation(id);
                values
                    .iter()
                    .filter(|(k, _, _)| k.starts_with(PREFIX_SECRET) || k.starts_with(PREFIX_TOKEN))
                    .map(move |(k, _, _)| (node.clone(), k.as_str()))
            })
            .collect();
        self.parsed_secrets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(node, key), _| gossiped.contains(&(node.clone(), key.as_str())));
        self.offsets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|node, _| live.contains(node));
        let mut fresh = Fresh::default();
        let peers: Vec<Peer> = snapshot
            .into_iter()
            .filter_map(|(id, values)| self.read_peer(&id, values, &mut fresh))
            .collect();
        self.metrics.peers_alive.set(peers.len() as i64);
        self.metrics.peer_clock_offset.reset();
        let mut skewed = self.skewed.lock().unwrap_or_else(|e| e.into_inner());
        for peer in &peers {
            if let Some(offset) = peer.clock_offset_ms {
                self.metrics
                    .peer_clock_offset
                    .with_label_values(&[peer.node_id.as_str()])
                    .set(offset as f64 / 1000.0);
                let past = offset.unsigned_abs() > MAX_CLOCK_OFFSET.as_millis() as u64;
                if past && skewed.insert(peer.node_id.clone()) {
                    tracing::warn!(peer = %peer.node_id, offset_ms = offset, "a peer's clock is off by more than {} s: changes made apart are ordered by the clocks", MAX_CLOCK_OFFSET.as_secs());
                } else if !past && skewed.remove(&peer.node_id) {
                    tracing::info!(peer = %peer.node_id, offset_ms = offset, "a peer's clock is back within {} s", MAX_CLOCK_OFFSET.as_secs());
                }
            }
        }
        drop(skewed);
        self.note_departed(&peers, dead);
        let rounds = self.rounds.fetch_add(1, Ordering::Relaxed) + 1;
        if !peers.is_empty() || rounds >= JOIN_ROUNDS {
            self.joined.store(true, Ordering::Relaxed);
        }
        *self.peers.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(peers);
        fresh
    }

    /// Remembers live peers' API addresses and lists the dead ones.
    fn note_departed(&self, live: &[Peer], dead: Vec<String>) {
        let mut last_api = self.last_api.lock().unwrap_or_else(|e| e.into_inner());
        for peer in live {
            last_api.insert(peer.node_id.clone(), peer.api.clone());
        }
        let mut departed: Vec<Departed> = dead
            .into_iter()
            .filter(|node| !live.iter().any(|p| p.node_id == *node))
            .map(|node_id| Departed {
                api: last_api.get(&node_id).cloned(),
                node_id,
            })
            .collect();
        departed.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        departed.dedup_by(|a, b| a.node_id == b.node_id);
        let known = |node: &str| {
            live.iter().any(|p| p.node_id == node) || departed.iter().any(|d| d.node_id == node)
        };
        last_api.retain(|node, _| known(node));
        // Peers chitchat forgot (dead for its grace period): their
        // forwarding series and clock notes go too.
        let mut forwarded_to = self.forwarded_to.lock().unwrap_or_else(|e| e.into_inner());
        for (function, peers) in forwarded_to.iter_mut() {
            peers.retain(|peer| {
                let keep = known(peer);
                if !keep {
                    let _ = self
                        .metrics
                        .forwarded
                        .remove_label_values(&[function, peer.as_str()]);
                }
                keep
            });
        }
        forwarded_to.retain(|_, peers| !peers.is_empty());
        drop(forwarded_to);
        self.skewed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|node| live.iter().any(|p| p.node_id == *node));
        *self.departed.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(departed);
    }

    /// A peer from its gossip values; `None` if it has not (validly)
    /// published an API address. Values that do not parse are ignored.
    fn read_peer(
        &self,
        id: &ChitchatId,
        values: Vec<(String, u64, String)>,
        fresh: &mut Fresh,
    ) -> Option<Peer> {
        let node = &*id.node_id;
        let mut peer = Peer {
            node_id: node.to_string(),
            api: String::new(),
            gossip: id.gossip_advertise_addr,
            free_slots: 0,
            load: 0,
            kv: String::new(),
            functions: HashMap::new(),
            modules: BTreeSet::new(),
            clock_offset_ms: None,
        };
        let mut parsed = self.parsed.lock().unwrap_or_else(|e| e.into_inner());
        for (key, version, value) in values {
            if key.starts_with(PREFIX_FN) {
                let cache_key = (incarnation(id), key.clone());
                let entry = match parsed.get(&cache_key) {
                    Some((v, entry)) if *v == version => entry.clone(),
                    _ => {
                        let entry = match gossip::read(&key, &value) {
                            Some(gossip::Value::Function(entry)) => Some(entry),
                            _ => None,
                        };
                        match &entry {
                            Some(state) => fresh.functions.push(state.clone()),
                            None => tracing::warn!(
                                peer = node,
                                key,
                                "ignoring a gossip value that does not parse"
                            ),
                        }
                        parsed.insert(cache_key, (version, entry.clone()));
                        entry
                    }
                };
                if let Some(state) = entry {
                    peer.functions.insert(state.entry.name.clone(), state);
                }
                continue;
            }
            if key.starts_with(PREFIX_SECRET) || key.starts_with(PREFIX_TOKEN) {
                let cache_key = (incarnation(id), key.clone());
                let mut seen = self
                    .parsed_secrets
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if seen.get(&cache_key).map(|(v, _)| *v) != Some(version) {
                    let carried = match gossip::read(&key, &value) {
                        Some(gossip::Value::Secret(name, state)) => {
                            let carried = (state.stamp, state.origin.clone());
                            fresh.secrets.push((name.to_string(), state));
                            Some(carried)
                        }
                        Some(gossip::Value::Token(name, state)) => {
                            let carried = (state.stamp, state.origin.clone());
                            fresh.tokens.push((name.to_string(), state));
                            Some(carried)
                        }
                        _ => {
                            tracing::warn!(
                                peer = node,
                                key,
                                "ignoring a gossip value that does not parse"
                            );
                            None
                        }
                    };
                    seen.insert(cache_key, (version, carried));
                }
                continue;
            }
            match gossip::read(&key, &value) {
                // Under mutual TLS a peer is reached over HTTPS only (its
                // certificate checked against the cluster's CA): one that
                // gossips a plain address (the secret without a
                // certificate) is no peer.
                Some(gossip::Value::Api(api)) if self.mutual && !api.starts_with("https://") => {
                    tracing::debug!(
                        peer = node,
                        api,
                        "a peer without HTTPS under mutual TLS: not a peer"
                    );
                }
                Some(gossip::Value::Api(api)) => peer.api = api.to_string(),
                Some(gossip::Value::Load {
                    free,
                    load,
                    clock_ms,
                }) => {
                    peer.free_slots = free;
                    peer.load = load;
                    peer.clock_offset_ms = clock_ms.map(|clock| {
                        let mut offsets = self.offsets.lock().unwrap_or_else(|e| e.into_inner());
                        match offsets.get(&incarnation(id)) {
                            Some((seen, offset)) if *seen == version => *offset,
                            _ => {
                                let offset = clock as i64 - now_ms() as i64;
                                offsets.insert(incarnation(id), (version, offset));
                                offset
                            }
                        }
                    });
                }
                Some(gossip::Value::Kv(kv)) => peer.kv = kv.to_string(),
                Some(gossip::Value::Module(sha)) => {
                    peer.modules.insert(sha.to_string());
                }
                Some(
                    gossip::Value::Function(_)
                    | gossip::Value::Secret(..)
                    | gossip::Value::Token(..),
                )
                | None => {}
            }
        }
        (!peer.api.is_empty()).then_some(peer)
    }

    /// Marks `node` as unreachable for a while.
    fn suspect(&self, node: &str) {
        self.suspects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.to_string(), Instant::now());
    }

    /// Whether a connection to `node` failed within the last few rounds.
    fn is_suspect(&self, node: &str) -> bool {
        let mut suspects = self.suspects.lock().unwrap_or_else(|e| e.into_inner());
        let window = self.interval * 10;
        suspects.retain(|_, at| at.elapsed() < window);
        suspects.contains_key(node)
    }

    /// Forgets a deleted function's forwarding series.
    pub fn forget_function(&self, function: &str) {
        let peers = self
            .forwarded_to
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(function)
            .unwrap_or_default();
        for peer in peers {
            let _ = self
                .metrics
                .forwarded
                .remove_label_values(&[function, peer.as_str()]);
        }
    }

    /// Leaves the cluster (peers see this host dead after their detector's
    /// interval).
    pub fn shutdown(&self) {
        let _ = self.chitchat.initiate_shutdown();
    }

    pub fn api_url(&self) -> &str {
        &self.api_url
    }
}

/// What peers published since the last round.
#[derive(Default)]
pub struct Fresh {
    pub functions: Vec<FunctionState>,
    /// Secrets by name, as published.
    pub secrets: Vec<(String, SecretState)>,
    /// API tokens by name, as published.
    pub tokens: Vec<(String, TokenState)>,
}

/// The modules on this host's disk that its records refer to.
fn held_modules(functions: &Functions) -> BTreeSet<String> {
    functions
        .scan_records(|r| {
            let held: Vec<String> = r
                .modules()
                .filter(|sha| functions.store.has_module(sha))
                .map(str::to_string)
                .collect();
            Some(held)
        })
        .into_iter()
        .flatten()
        .collect()
}

/// A node's id and generation: a restarted node numbers its values afresh,
/// so parsed values are cached per incarnation.
fn incarnation(id: &ChitchatId) -> String {
    format!("{}/{}", id.node_id, id.generation_id)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
