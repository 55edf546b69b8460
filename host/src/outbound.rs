//! Outbound HTTP for guests: pooled per function, fenced by address.
//!
//! - **A pool per function.** Keep-alive connections are reused across the
//!   invocations of one function (never across functions, nor across a
//!   policy edit: a new policy gets a new pool), at most `[outbound]
//!   max_connections` open at once; a request beyond it waits for one, within
//!   the invocation's deadline. A new connection per request would cap a
//!   function at a few hundred calls a second (TIME_WAIT) and let one
//!   function hold unbounded sockets.
//! - **Fenced by address, not only by name.** The policy's allow-list is
//!   checked on the name as written (in `sandbox.rs`); here every address a
//!   name resolves to is checked again before it is connected to. Loopback,
//!   link-local (the cloud metadata address among them), private, shared
//!   (CGNAT), unique-local and unspecified addresses are refused unless an
//!   allow pattern names that address or a CIDR range holding it
//!   (`"http://127.0.0.1:*"`, `"http://10.0.0.0/8:*"`): a name that
//!   resolves, or flips, to an internal address gets nowhere (DNS
//!   rebinding). The address checked is the address connected to.
//! - **HTTPS** through rustls (ring), with the public roots and
//!   `--outbound-ca`; `--resolve NAME=IP` pins names (as curl's `--resolve`).
//! - `[outbound] timeout` bounds connecting and the response head.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::Result;
use http::Uri;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody};

use crate::policy::Policy;

/// Idle pooled connections are closed after this.
const IDLE: Duration = Duration::from_secs(30);

/// The `outcome` label values of `lichen_outbound_requests_total`.
pub const OUTCOMES: &[&str] = &["ok", "refused", "timeout", "error"];

/// The `outcome` label values of `lichen_outbound_tcp_connects_total`
/// (`crate::tcp`).
pub const TCP_OUTCOMES: &[&str] = &["ok", "refused", "limit"];

/// Outbound HTTP of every function on this host.
pub struct Outbound {
    pinned: HashMap<String, Vec<IpAddr>>,
    keep_alive: bool,
    tls: Arc<rustls::ClientConfig>,
    /// One pool per function, made under the policy it belongs to.
    pools: Mutex<HashMap<Arc<str>, Pool>>,
    metrics: OutboundMetrics,
}

#[derive(Clone)]
struct Pool {
    policy: Arc<Policy>,
    client: Client<Connector, WasiBody>,
}

/// The outbound series of the host's registry.
#[derive(Clone)]
pub struct OutboundMetrics {
    pub requests: IntCounterVec,
    /// Outbound TCP connects of guests, by outcome (`crate::tcp`).
    pub tcp_connects: IntCounterVec,
    pub duration: HistogramVec,
    pub connections: IntGaugeVec,
}

impl OutboundMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let metrics = OutboundMetrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "lichen_outbound_requests_total",
                    "Outbound HTTP requests of guests by outcome (ok, refused by the address fence, timeout, error).",
                ),
                &["function", "outcome"],
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new(
                    "lichen_outbound_duration_seconds",
                    "Time from an outbound request to its response head, per function.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0,
                ]),
                &["function"],
            )?,
            tcp_connects: IntCounterVec::new(
                Opts::new(
                    "lichen_outbound_tcp_connects_total",
                    "Outbound TCP connects of guests (wasi:sockets) by outcome (ok, refused: no grant names the destination, limit: max_tcp_connections reached).",
                ),
                &["function", "outcome"],
            )?,
            connections: IntGaugeVec::new(
                Opts::new(
                    "lichen_outbound_connections",
                    "Outbound connections open now (in use or idle in the pool), per function.",
                ),
                &["function"],
            )?,
        };
        registry.register(Box::new(metrics.requests.clone()))?;
        registry.register(Box::new(metrics.duration.clone()))?;
        registry.register(Box::new(metrics.connections.clone()))?;
        registry.register(Box::new(metrics.tcp_connects.clone()))?;
        Ok(metrics)
    }

    pub fn forget_function(&self, function: &str) {
        for outcome in OUTCOMES {
            let _ = self.requests.remove_label_values(&[function, outcome]);
        }
        let _ = self.duration.remove_label_values(&[function]);
        let _ = self.connections.remove_label_values(&[function]);
        for outcome in TCP_OUTCOMES {
            let _ = self.tcp_connects.remove_label_values(&[function, outcome]);
        }
    }
}

/// How outbound requests are made: names pinned to addresses, and a CA to
/// trust beside the public roots.
#[derive(Debug, Clone)]
pub struct OutboundConfig {
    pub pinned: HashMap<String, Vec<IpAddr>>,
    pub ca_cert: Option<std::path::PathBuf>,
    /// `false`: a new connection per request, closed after it (the
    /// benchmark's baseline; the fence and the cap still apply).
    pub keep_alive: bool,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        OutboundConfig {
            pinned: HashMap::new(),
            ca_cert: None,
            keep_alive: true,
        }
    }
}

impl Outbound {
    pub fn new(config: &OutboundConfig, metrics: OutboundMetrics) -> Result<Self> {
        Ok(Outbound {
            pinned: config
                .pinned
                .iter()
                .map(|(name, addrs)| (name.to_ascii_lowercase(), addrs.clone()))
                .collect(),
            keep_alive: config.keep_alive,
            tls: Arc::new(crate::tls::client_config(config.ca_cert.as_deref())?),
            pools: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    /// Sends a guest's request (already allowed by name) on the function's
    /// pool.
    pub fn send(
        self: &Arc<Self>,
        function: &Arc<str>,
        policy: &Arc<Policy>,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
    ) -> impl Future<Output = Result<http::Response<WasiBody>, Error>> + Send + 'static {
        let client = self.pool(function, policy);
        let metrics = self.metrics.clone();
        let function = Arc::clone(function);
        // The policy's bound on connecting plus the response head, or the
        // guest's own (its connect and first-byte timeouts) if less.
        let guest = options.map_or(Duration::MAX, |o| {
            o.connect_timeout
                .unwrap_or(Duration::MAX)
                .saturating_add(o.first_byte_timeout.unwrap_or(Duration::MAX))
        });
        let timeout = policy.outbound_timeout.min(guest);
        async move {
            let started = Instant::now();
            let sent = tokio::time::timeout(timeout, client.request(request)).await;
            let (outcome, result) = match sent {
                Err(_) => ("timeout", Err(Error::ConnectionTimeout)),
                Ok(Ok(response)) => (
                    "ok",
                    Ok(response.map(|body| body.map_err(Error::from).boxed_unsync())),
                ),
                Ok(Err(error)) => {
                    let (outcome, refusal) = classify(&error);
                    if outcome != "refused" {
                        tracing::debug!(
                            function = &*function,
                            error = format!("{error:#}"),
                            "outbound request failed"
                        );
                    }
                    (outcome, Err(refusal))
                }
            };
            metrics
                .requests
                .with_label_values(&[&function, outcome])
                .inc();
            if outcome == "ok" {
                metrics
                    .duration
                    .with_label_values(&[&function])
                    .observe(started.elapsed().as_secs_f64());
            }
            result
        }
    }

    /// The function's pool under `policy`, made anew when the policy changed.
    fn pool(&self, function: &Arc<str>, policy: &Arc<Policy>) -> Client<Connector, WasiBody> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pool) = pools.get(function)
            && Arc::ptr_eq(&pool.policy, policy)
        {
            return pool.client.clone();
        }
        let connector = Connector {
            shared: Arc::new(ConnectorShared {
                policy: Arc::clone(policy),
                pinned: self.pinned.clone(),
                tls: Arc::clone(&self.tls),
                permits: Arc::new(Semaphore::new(policy.outbound_connections as usize)),
                open: self.metrics.connections.with_label_values(&[function]),
            }),
        };
        let max = if self.keep_alive {
            policy.outbound_connections as usize
        } else {
            0
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(IDLE)
            .pool_max_idle_per_host(max)
            .build(connector);
        pools.insert(
            Arc::clone(function),
            Pool {
                policy: Arc::clone(policy),
                client: client.clone(),
            },
        );
        client
    }

    /// The counter of guests' TCP connects.
    pub fn tcp_connects(&self) -> IntCounterVec {
        self.metrics.tcp_connects.clone()
    }

    /// Drops a deleted function's pool.
    pub fn forget_function(&self, function: &str) {
        self.pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(function);
        self.metrics.forget_function(function);
    }
}

/// Whether an address is one a guest reaches only when the policy names
/// it: the IANA special-purpose ranges that are not globally reachable,
/// and multicast (`lichen_core::fence`, a table of ranges).
pub fn is_internal(ip: IpAddr) -> bool {
    lichen_core::fence::is_internal(ip)
}

/// The error a connector reports when the fence refused every address.
#[derive(Debug)]
struct Fenced(String);

impl std::fmt::Display for Fenced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Fenced {}

/// What a failed request reports: the `outcome` label, and the error the
/// guest gets, from the first cause in the chain that says (the fence, an
/// I/O error, an HTTP error).
fn classify(error: &hyper_util::client::legacy::Error) -> (&'static str, Error) {
    let causes = std::iter::successors(std::error::Error::source(error), |e| e.source());
    for cause in causes {
        if cause.is::<Fenced>() {
            return ("refused", Error::DestinationIpProhibited);
        }
        if let Some(io) = cause.downcast_ref::<io::Error>() {
            return (
                "error",
                match io.kind() {
                    io::ErrorKind::ConnectionRefused => Error::ConnectionRefused,
                    io::ErrorKind::TimedOut => Error::ConnectionTimeout,
                    io::ErrorKind::NotFound => Error::DestinationNotFound,
                    _ => Error::Connect(io::Error::new(io.kind(), io.to_string())),
                },
            );
        }
        if let Some(hyper) = cause.downcast_ref::<hyper::Error>() {
            if hyper.is_incomplete_message() || hyper.is_closed() {
                return ("error", Error::ConnectionTerminated);
            }
            return ("error", Error::HttpProtocolError);
        }
    }
    ("error", Error::DestinationUnavailable)
}

#[derive(Clone)]
struct Connector {
    shared: Arc<ConnectorShared>,
}

struct ConnectorShared {
    policy: Arc<Policy>,
    pinned: HashMap<String, Vec<IpAddr>>,
    tls: Arc<rustls::ClientConfig>,
    /// `max_connections`: one permit per open connection.
    permits: Arc<Semaphore>,
    open: prometheus::IntGauge,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for Connector {
    type Response = Conn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let shared = Arc::clone(&self.shared);
        Box::pin(async move { shared.connect(uri).await })
    }
}

impl ConnectorShared {
    async fn connect(&self, uri: Uri) -> Result<Conn, BoxError> {
        let https = uri.scheme_str() == Some("https");
        let scheme = if https { "https" } else { "http" };
        let host = uri.host().ok_or("the URI has no host")?;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let addrs = self.resolve(bare, port).await?;
        let allowed: Vec<SocketAddr> = addrs
            .iter()
            .copied()
            .filter(|addr| {
                !is_internal(addr.ip()) || self.policy.allows_address(scheme, addr.ip(), port)
            })
            .collect();
        if allowed.is_empty() {
            tracing::warn!(
                destination = format!("{scheme}://{host}:{port}"),
                addresses = ?addrs,
                "outbound request refused: the name resolves only to internal addresses the policy does not name"
            );
            return Err(Box::new(Fenced(format!(
                "{host} resolves to internal addresses only ({addrs:?})"
            ))));
        }
        let permit = Arc::clone(&self.permits).acquire_owned().await?;
        let mut last_error = None;
        for addr in allowed {
            match TcpStream::connect(addr).await {
                Ok(tcp) => {
                    let _ = tcp.set_nodelay(true);
                    let io = if https {
                        let name = ServerName::try_from(bare.to_string())?;
                        let connector = tokio_rustls::TlsConnector::from(Arc::clone(&self.tls));
                        Io::Tls(Box::new(connector.connect(name, tcp).await?))
                    } else {
                        Io::Plain(tcp)
                    };
                    self.open.inc();
                    return Ok(Conn {
                        io: TokioIo::new(io),
                        _permit: permit,
                        open: self.open.clone(),
                    });
                }
                Err(error) => last_error = Some(error),
            }
        }
        Err(Box::new(last_error.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "no address")
        })))
    }

    async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        if let Some(pinned) = self.pinned.get(&host.to_ascii_lowercase()) {
            return Ok(pinned.iter().map(|ip| SocketAddr::new(*ip, port)).collect());
        }
        Ok(tokio::net::lookup_host((host, port)).await?.collect())
    }
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A pooled connection: holds its place under `max_connections` until it
/// closes.
struct Conn {
    io: TokioIo<Io>,
    _permit: OwnedSemaphorePermit,
    open: prometheus::IntGauge,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_the_ones_a_policy_must_name() {
        for internal in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "224.0.0.1",
        ] {
            assert!(is_internal(internal.parse().unwrap()), "{internal}");
        }
        for public in ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "100.128.0.1"] {
            assert!(!is_internal(public.parse().unwrap()), "{public}");
        }
    }
}
