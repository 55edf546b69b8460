//! Starting and stopping a host: open the store, build the engine, load the
//! stored functions, bind the listener, serve connections until told to stop,
//! then let in-flight requests finish (for a bounded time).
//!
//! `Server::bind` and `Server::run` are separate so a caller (the binary, a
//! test) knows the bound address, port 0 included, before serving starts.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::api::{self, ApiLimits, AppState};
use crate::audit::Audit;
use crate::cluster::{Cluster, ClusterConfig};
use crate::connections::{Drain, HeadTimer};
use crate::engine::{EngineSettings, Runtime};
use crate::error::{BUSY_HEADER, RETRY_AFTER_SECS};
use crate::functions::{Functions, Services};
use crate::kv::{Kv, LocalBackend, NatsBackend};
use crate::metrics::Metrics;
use crate::oci::{Registries, RegistryConfig};
use crate::outbound::{Outbound, OutboundConfig};
use crate::policy::PolicyTable;
use crate::scheduler::Scheduler;
use crate::secrets::{self, Secrets};
use crate::shared_registry::SharedRegistry;
use crate::store::ModuleStore;
use crate::tls::{PeerCertified, Tls, TlsFiles};
use crate::tokens::Tokens;
use crate::trace::{TraceConfig, Tracing};

/// The embedded key-value store, in the data directory.
const KV_FILE: &str = "kv.redb";

/// Default cap on an uploaded component: large enough for any real function
/// (ours are ~100 KB; big ones with a language runtime are tens of MB).
pub const DEFAULT_MAX_UPLOAD: u64 = 64 << 20;

/// Request head limits: more headers is answered 431 by hyper; a head over
/// `api::MAX_HEAD_BYTES` by the API. hyper's read buffer is a backstop.
const MAX_HEADERS: usize = 100;
const READ_BUFFER_BYTES: usize = 2 * api::MAX_HEAD_BYTES;

/// Open connections at once by default: plenty for an edge host, and far
/// below the usual 64k descriptor limit.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 1024;
/// Invocations in flight across all functions by default: a quarter of the
/// pooling allocator's instance slots, so slots never run out first.
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 256;
/// How long a host keeps serving after SIGTERM by default, answering
/// `/readyz` with 503: long enough for a load balancer polling every second
/// or two to take it out.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(5);
/// Functions whose compiled code stays loaded by default.
pub const DEFAULT_MAX_LOADED_FUNCTIONS: usize = 256;

/// The start of the log line that announces the bound address; scripts and
/// tests read the URL from it (see [`listening_url`]).
pub const LISTENING_PREFIX: &str = "listening on http://";
/// The same, for a host serving TLS.
pub const LISTENING_TLS_PREFIX: &str = "listening on https://";

/// The `http://IP:PORT` (or `https://`) URL of a "listening on" log line,
/// in text or JSON log format.
pub fn listening_url(line: &str) -> Option<String> {
    let at = line
        .find(LISTENING_PREFIX)
        .or_else(|| line.find(LISTENING_TLS_PREFIX))?;
    let url: String = line[at + "listening on ".len()..]
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '"')
        .collect();
    Some(url)
}

/// What a scoped token's policy may not reach on this host: its own
/// directories and addresses, its NATS servers, and the ceilings.
fn fences(config: &ServeConfig) -> crate::api::scoped::Fences {
    let tls = config.tls.iter().flat_map(|files| {
        [
            Some(files.cert.clone()),
            Some(files.key.clone()),
            files.dir.clone(),
        ]
        .into_iter()
        .flatten()
    });
    let others = [
        config.secrets_key_file.clone(),
        config.registry.auth_file.clone(),
        config.outbound.ca_cert.clone(),
    ];
    let tls = tls
        .chain(others.into_iter().flatten())
        .chain(config.protected.iter().cloned());
    let nats = match &config.kv {
        KvConfig::Nats { urls, .. } => urls.clone(),
        KvConfig::Local => Vec::new(),
    };
    let mut own = vec![config.listen];
    if let Some(cluster) = &config.cluster {
        own.push(cluster.gossip_listen);
        own.extend(cluster.gossip_advertise);
        own.extend(cluster.api_advertise);
    }
    crate::api::scoped::Fences {
        data_dir: config.data_dir.clone(),
        tls: tls.collect(),
        nats,
        own,
        ceilings: config.scoped,
    }
}

/// Where the generated admin token is kept, inside the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub policies_dir: PathBuf,
    /// `None`: generate one and write it to `data_dir/admin-token`.
    pub admin_token: Option<String>,
    pub max_upload: u64,
    pub engine: EngineSettings,
    /// How long the host keeps serving after a shutdown signal, saying it
    /// is not ready, so load balancers move traffic away first.
    pub drain: Duration,
    /// How long in-flight requests may run on after the drain, once the
    /// host has stopped accepting.
    pub shutdown_grace: Duration,
    /// Open connections at once; past it new ones get a 503 and are closed.
    pub max_connections: u32,
    /// Invocations running at once across all functions; past it, 503.
    pub max_in_flight: u32,
    /// Longest pause between two chunks of a request body.
    pub body_idle_timeout: Duration,
    /// How long a client may take to send its request head; slower clients
    /// are cut off (slowloris).
    pub header_read_timeout: Duration,
    /// Whether `GET /metrics` needs the admin token.
    pub metrics_require_token: bool,
    /// Whether `GET /ui` serves the status page.
    pub ui: bool,
    /// How many functions keep their compiled code loaded. Each costs its
    /// mapped code and metadata (about 0.4 MB for hello); beyond this the
    /// least recently called are unloaded, and load again from the cache
    /// (about a millisecond) when next called.
    pub max_loaded_functions: usize,
    /// Join a cluster of peer hosts.
    pub cluster: Option<ClusterConfig>,
    /// Where functions' key-value stores live.
    pub kv: KvConfig,
    /// The secrets key's file; `None`: `data_dir/secrets.key`, generated
    /// on first start.
    pub secrets_key_file: Option<PathBuf>,
    /// Serve HTTPS with this certificate and key (plain HTTP without).
    pub tls: Option<TlsFiles>,
    /// How guests' outbound requests resolve names and trust servers.
    pub outbound: OutboundConfig,
    /// Which OCI registries deploys may pull from, and how.
    pub registry: RegistryConfig,
    /// Where traces of invocations are exported (nowhere by default).
    pub trace: TraceConfig,
    /// The most a policy written by a scoped token may ask for.
    pub scoped: lichen_core::grants::Ceilings,
    /// How the host proves itself to NATS and checks NATS's certificate.
    pub kv_nats_auth: crate::kv::nats::NatsAuth,
    /// Files holding credentials or settings (the admin token's, the
    /// cluster secret's, the registry's, the config file): no `[files]`
    /// path of a scoped token's policy reaches them.
    pub protected: Vec<PathBuf>,
}

/// The key-value backend a host uses.
#[derive(Debug, Clone, Default)]
pub enum KvConfig {
    /// redb in the data directory: this host's own data.
    #[default]
    Local,
    /// NATS JetStream: shared by every host on the same NATS cluster;
    /// `timeout` bounds each JetStream request.
    Nats {
        urls: Vec<String>,
        replicas: usize,
        timeout: Duration,
    },
}

impl ServeConfig {
    pub fn new(listen: SocketAddr, data_dir: impl Into<PathBuf>) -> Self {
        ServeConfig {
            listen,
            data_dir: data_dir.into(),
            policies_dir: PathBuf::from("policies"),
            admin_token: None,
            max_upload: DEFAULT_MAX_UPLOAD,
            engine: EngineSettings::default(),
            drain: DEFAULT_DRAIN,
            shutdown_grace: Duration::from_secs(30),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            body_idle_timeout: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
            metrics_require_token: false,
            ui: true,
            max_loaded_functions: DEFAULT_MAX_LOADED_FUNCTIONS,
            cluster: None,
            kv: KvConfig::Local,
            secrets_key_file: None,
            tls: None,
            outbound: OutboundConfig::default(),
            registry: RegistryConfig::default(),
            trace: TraceConfig::default(),
            scoped: lichen_core::grants::Ceilings::default(),
            kv_nats_auth: crate::kv::nats::NatsAuth::default(),
            protected: Vec::new(),
        }
    }
}

/// A host that has bound its listener and loaded its functions.
pub struct Server {
    listener: TcpListener,
    state: Arc<AppState>,
    local_addr: SocketAddr,
    admin_token: String,
    drain: Duration,
    shutdown_grace: Duration,
    connections: Arc<tokio::sync::Semaphore>,
    header_read_timeout: Duration,
    cluster: Option<Arc<Cluster>>,
    /// Reloads policies while the server lives.
    _policy_watcher: notify::RecommendedWatcher,
    /// TLS in force, with the watcher that reloads it.
    tls: Option<(Arc<Tls>, notify::RecommendedWatcher)>,
}

impl Server {
    pub async fn bind(config: ServeConfig) -> Result<Server> {
        if config.max_in_flight > crate::engine::POOL_INSTANCES {
            anyhow::bail!(
                "--max-in-flight {} is above the {} instance slots of the pooling allocator",
                config.max_in_flight,
                crate::engine::POOL_INSTANCES
            );
        }
        let metrics = Metrics::new()?;
        let mut fences = fences(&config);
        let tls = match &config.tls {
            Some(files) => {
                let tls = Tls::load(files.clone(), metrics.tls_reloads.clone())
                    .context("loading the TLS certificate")?;
                let watcher = tls.watch()?;
                Some((tls, watcher))
            }
            None => None,
        };
        crate::api::status::mark_start();
        let store = ModuleStore::open(&config.data_dir)?;
        let secrets_key =
            secrets::load_or_create_key(&config.data_dir, config.secrets_key_file.as_deref())
                .context("loading the secrets key")?;
        let secrets = Arc::new(Secrets::open(&store, &secrets_key).context("opening secrets")?);
        let tokens = Arc::new(Tokens::open(&store).context("opening API tokens")?);
        let audit = Arc::new(Audit::open(&config.data_dir).context("opening the audit log")?);
        let kv = Arc::new(match &config.kv {
            KvConfig::Local => Kv::Local(
                LocalBackend::open(store.open_database(KV_FILE)?)
                    .with_context(|| format!("opening the key-value store {KV_FILE}"))?,
            ),
            KvConfig::Nats {
                urls,
                replicas,
                timeout,
            } => Kv::Nats(Box::new(
                NatsBackend::connect(urls, *replicas, *timeout, &config.kv_nats_auth)
                    .await
                    .context("setting up the NATS key-value backend")?,
            )),
        });
        let admin_token = match config.admin_token {
            Some(token) if !token.is_empty() => token,
            _ => load_or_create_token(&config.data_dir)?,
        };
        let runtime = Runtime::new(config.engine.clone())?;
        let outbound = Arc::new(
            Outbound::new(&config.outbound, metrics.outbound.clone())
                .context("setting up outbound HTTP")?,
        );
        let reload_errors = metrics.policy_reload_errors.clone();
        let known = Arc::clone(&secrets);
        let policies = Arc::new(PolicyTable::load(
            &config.policies_dir,
            Box::new(move || reload_errors.inc()),
            Box::new(move |name| known.contains(name)),
        )?);
        let policy_watcher = policies.watch()?;
        let recorder = Arc::clone(&audit);
        policies.on_edit(Box::new(move |name| {
            let mut entry = crate::audit::Entry::now("policy-file", "edit policies/{name}.toml");
            entry.function = Some(name.to_string());
            if let Err(error) = recorder.append(&entry) {
                tracing::error!(function = %name, error = format!("{error:#}"), "a policy file edit could not be written to the audit log");
            }
        }));
        let shared_registry = match (&config.cluster, kv.nats_context()) {
            (Some(cluster), Some((js, replicas))) if cluster.shared_registry => {
                Some(Arc::new(SharedRegistry::new(
                    js,
                    replicas,
                    Arc::clone(&cluster.keyring),
                    metrics.registry_rejected.clone(),
                )))
            }
            (Some(cluster), None) if cluster.shared_registry => {
                anyhow::bail!("the cluster's registry on NATS needs the NATS key-value backend")
            }
            _ => None,
        };
        let functions = Functions::new(
            runtime,
            store,
            metrics,
            policies,
            Scheduler::new(config.max_in_flight),
            config.max_loaded_functions,
            Services {
                kv,
                outbound,
                secrets,
                tokens,
                audit,
            },
        )
        .with_origin(
            config
                .cluster
                .as_ref()
                .map_or_else(|| "local".to_string(), |c| c.node_id.clone()),
        )
        .with_max_clock_ahead(
            config
                .cluster
                .as_ref()
                .map_or(crate::functions::MAX_CLOCK_AHEAD, |c| c.max_clock_ahead),
        );
        let functions = Arc::new(match &shared_registry {
            Some(shared) => functions.with_shared_registry(Arc::clone(shared)),
            None => functions,
        });
        let loader = Arc::clone(&functions);
        let loaded = tokio::task::spawn_blocking(move || loader.load_stored())
            .await
            .context("loading stored functions")??;
        tracing::info!(
            functions = loaded,
            pooling = functions.runtime.pooling(),
            data_dir = %config.data_dir.display(),
            "functions loaded"
        );
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let local_addr = listener.local_addr()?;
        fences.own.push(local_addr);
        let cluster = match config.cluster {
            Some(cluster_config) => {
                let cluster = Cluster::start(
                    cluster_config,
                    local_addr,
                    tls.as_ref().map(|(tls, _)| tls),
                    functions.metrics.clone(),
                    Arc::clone(&functions.kv),
                )
                .await?;
                tokio::spawn(crate::cluster::sync::run(
                    Arc::clone(&cluster),
                    Arc::downgrade(&functions),
                    config.max_upload,
                ));
                if let Some(shared) = shared_registry {
                    tokio::spawn(crate::cluster::sync::follow_shared(
                        Arc::clone(&cluster),
                        Arc::downgrade(&functions),
                        shared,
                    ));
                }
                Some(cluster)
            }
            None => None,
        };
        let registries = Registries::new(config.registry.clone())
            .context("setting up the OCI registry client")?;
        let node = cluster.as_ref().map_or("local", |c| c.node_id());
        let tracing = Tracing::start(&config.trace, node).context("starting tracing")?;
        let state = Arc::new(
            AppState::new(
                functions,
                registries,
                admin_token.clone(),
                ApiLimits {
                    max_upload: config.max_upload,
                    body_idle_timeout: config.body_idle_timeout,
                    metrics_require_token: config.metrics_require_token,
                    ui: config.ui,
                    fences,
                },
            )
            .with_tracing(tracing),
        );
        if let Some(cluster) = &cluster {
            state.join(Arc::clone(cluster));
        }
        tokio::spawn(crate::api::cron::run(Arc::downgrade(&state)));
        tokio::spawn(crate::api::queue::run(Arc::downgrade(&state)));
        Ok(Server {
            listener,
            state,
            local_addr,
            admin_token,
            drain: config.drain,
            shutdown_grace: config.shutdown_grace,
            connections: Arc::new(tokio::sync::Semaphore::new(config.max_connections as usize)),
            header_read_timeout: config.header_read_timeout,
            cluster,
            _policy_watcher: policy_watcher,
            tls,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    pub fn state(&self) -> Arc<AppState> {
        Arc::clone(&self.state)
    }

    /// Serves until `shutdown` completes; then drains: `/readyz` answers 503
    /// while the host goes on serving for the drain period, then it stops
    /// accepting, leaves the cluster, and waits for open connections to
    /// finish their requests, at most the grace period.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        match &self.tls {
            Some(_) => tracing::info!("{LISTENING_TLS_PREFIX}{}", self.local_addr),
            None => tracing::info!("{LISTENING_PREFIX}{}", self.local_addr),
        }
        let connections = Arc::new(Drain::default());
        tokio::pin!(shutdown);
        let mut drained: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        loop {
            let (stream, peer) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown, if drained.is_none() => {
                    self.state.start_draining();
                    if let Some(cluster) = &self.cluster {
                        cluster.start_draining();
                    }
                    tracing::info!(
                        drain_ms = self.drain.as_millis() as u64,
                        "draining: /readyz answers 503, still serving"
                    );
                    drained = Some(Box::pin(tokio::time::sleep(self.drain)));
                    continue;
                }
                () = until(&mut drained) => break,
            };
            let _ = stream.set_nodelay(true);
            let Ok(slot) = Arc::clone(&self.connections).try_acquire_owned() else {
                // Over TLS a plain-text answer would only confuse the
                // client: the connection is just closed.
                if self.tls.is_none() {
                    tokio::spawn(refuse_connection(stream));
                }
                continue;
            };
            let state = Arc::clone(&self.state);
            // Each request of the connection learns whether its client
            // presented a peer certificate (mutual TLS).
            let service = move |certified: bool| {
                service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                    let state = Arc::clone(&state);
                    if certified {
                        req.extensions_mut().insert(PeerCertified);
                    }
                    async move { Ok::<_, std::convert::Infallible>(api::handle(state, req, peer).await) }
                })
            };
            // Counted from here: a shutdown waits for its TLS handshake too.
            let ticket = connections.ticket();
            let head_timeout = self.header_read_timeout;
            let acceptor = self.tls.as_ref().map(|(tls, _)| tls.acceptor());
            tokio::spawn(async move {
                let served = match acceptor {
                    None => {
                        ticket
                            .watch(http1_connection(stream, service(false), head_timeout))
                            .await
                    }
                    Some(acceptor) => {
                        // The handshake is bounded like a request head.
                        let handshake = tokio::time::timeout(head_timeout, acceptor.accept(stream));
                        match handshake.await {
                            Ok(Ok(tls)) if tls.get_ref().1.alpn_protocol() == Some(b"h2") => {
                                let service =
                                    service(tls.get_ref().1.peer_certificates().is_some());
                                let connection = http2::Builder::new(TokioExecutor::new())
                                    .timer(TokioTimer::new())
                                    .max_header_list_size(api::MAX_HEAD_BYTES as u32)
                                    .serve_connection(TokioIo::new(tls), service);
                                ticket.watch(connection).await
                            }
                            Ok(Ok(tls)) => {
                                let service =
                                    service(tls.get_ref().1.peer_certificates().is_some());
                                ticket
                                    .watch(http1_connection(tls, service, head_timeout))
                                    .await
                            }
                            Ok(Err(error)) => {
                                tracing::debug!(%peer, %error, "TLS handshake failed");
                                Ok(())
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "TLS handshake timed out");
                                Ok(())
                            }
                        }
                    }
                };
                if let Err(error) = served {
                    tracing::debug!(%peer, %error, "connection ended with an error");
                }
                drop(slot);
            });
        }
        drop(self.listener);
        if let Some(cluster) = &self.cluster {
            cluster.shutdown();
        }
        tracing::info!("shutting down: waiting for in-flight requests");
        connections.start();
        match tokio::time::timeout(self.shutdown_grace, connections.finished()).await {
            Ok(()) => tracing::info!("all connections closed"),
            Err(_) => tracing::warn!(
                "requests still running after {:?}; stopping anyway",
                self.shutdown_grace
            ),
        }
        self.state.functions.kv.close().await;
        let state = Arc::clone(&self.state);
        let _ = tokio::task::spawn_blocking(move || state.tracing.shutdown()).await;
        Ok(())
    }
}

/// An HTTP/1.1 connection with the host's limits: head size, header count,
/// how long a client may take to send its head.
fn http1_connection<I, S>(
    io: I,
    service: S,
    head_timeout: Duration,
) -> http1::Connection<TokioIo<I>, S>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = crate::error::Body>,
{
    http1::Builder::new()
        .timer(HeadTimer::default())
        .header_read_timeout(head_timeout)
        .max_headers(MAX_HEADERS)
        .max_buf_size(READ_BUFFER_BYTES)
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), service)
}

/// Answers a connection over the cap with a 503 and closes it, without
/// reading its request.
async fn refuse_connection(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let body = r#"{"error":"this host is at its connection limit","code":"busy"}"#;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: {RETRY_AFTER_SECS}\r\n{BUSY_HEADER}: 1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Reads the admin token from the data directory, or makes a random one and
/// writes it there readable by the owner only.
fn load_or_create_token(data_dir: &Path) -> Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    let path = data_dir.join(ADMIN_TOKEN_FILE);
    if let Ok(existing) = std::fs::read_to_string(&path) {
        let token = existing.trim().to_string();
        if !token.is_empty() {
            tracing::info!(path = %path.display(), "admin token read from file");
            return Ok(token);
        }
    }
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw)
        .map_err(|e| anyhow::anyhow!("no randomness for the admin token: {e}"))?;
    let token = hex::encode(raw);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(format!("{token}\n").as_bytes())?;
    file.sync_all()?;
    tracing::info!(path = %path.display(), "generated an admin token");
    Ok(token)
}

/// Resolves when `sleep` is set and done; never while it is `None`.
async fn until(sleep: &mut Option<std::pin::Pin<Box<tokio::time::Sleep>>>) {
    match sleep {
        Some(sleep) => sleep.await,
        None => std::future::pending().await,
    }
}

/// Resolves when the process gets SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the host");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
}
