//! Outbound TCP for guests (`wasi:sockets`), granted by the policy's
//! `[outbound] tcp` destinations and fenced by address like outbound HTTP.
//!
//! - **Name lookup** (`ip-name-lookup`) answers only for the names a grant
//!   names (the linker's lookup is replaced, [`add_to_linker`]); any other
//!   name is the guest's `access-denied`, so a guest cannot use DNS to ask
//!   about, or signal to, names it was not given.
//! - **Every connect is checked on the address it goes to** (wasmtime's
//!   socket address check, [`TcpFence::check`]): allowed when a grant names
//!   that address (or a range holding it) at that port, or when a grant
//!   names a name at that port, the name resolves to that address here, and
//!   the address is not internal (loopback, private, link-local...: those
//!   only when a grant names the address). A refused connect is the guest's
//!   `access-denied`. No listening, no accepting, no UDP.
//! - **At most `max_tcp_connections` connects per instance** (so per
//!   invocation with a fresh instance per request, the default); each
//!   connect counted in `lichen_outbound_tcp_connects_total{function,
//!   outcome}`.
//! - **At most `max_tcp_bytes` sent and received per instance**: a
//!   connection's streams are wrapped as `finish-connect` hands them out
//!   (that function replaced too, [`Metered`]); past the budget a read or
//!   write is the stream's error, naming the limit.
//!
//! What wasmtime's sockets leave no hook for: a connect timeout of its own
//! (the invocation's deadline bounds a connect), and the budget of a WASIp3
//! guest's own `wasi:sockets@0.3` streams (Rust's std, in p3 components
//! too, uses the 0.2 sockets).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use anyhow::bail;
use bytes::Bytes;
use prometheus::IntCounterVec;
use wasmtime::component::{Linker, LinkerInstance, Resource};
use wasmtime_wasi::WasiView;
use wasmtime_wasi::p2::bindings::sockets::ip_name_lookup::{Host as _, ResolveAddressStream};
use wasmtime_wasi::p2::bindings::sockets::network::{ErrorCode, Host as _, Network};
use wasmtime_wasi::p2::bindings::sockets::tcp::HostTcpSocket as _;
use wasmtime_wasi::p2::{
    DynInputStream, DynOutputStream, InputStream, OutputStream, Pollable, StreamError,
    StreamResult, TcpSocket,
};
use wasmtime_wasi::p3::bindings::sockets::ip_name_lookup::ErrorCode as ErrorCode3;
use wasmtime_wasi::p3::bindings::sockets::types::IpAddress as IpAddress3;
use wasmtime_wasi::sockets::{SocketAddrUse, WasiSocketsView};

use crate::outbound::is_internal;
use crate::policy::Policy;

/// The name lookups replaced: the ones wasmtime-wasi links (components
/// importing any 0.2.x reach the first).
const LOOKUP_P2: &str = "wasi:sockets/ip-name-lookup@0.2.12";
const LOOKUP_P3: &str = "wasi:sockets/ip-name-lookup@0.3.0";
/// The TCP interface whose `finish-connect` is replaced.
const TCP_P2: &str = "wasi:sockets/tcp@0.2.12";

/// One instance's outbound TCP: what its policy grants, and the connects
/// made so far.
pub struct TcpFence {
    function: Arc<str>,
    policy: Arc<Policy>,
    made: AtomicU32,
    /// Bytes sent and received so far.
    moved: AtomicU64,
    connects: Option<IntCounterVec>,
}

impl TcpFence {
    pub fn new(function: Arc<str>, policy: Arc<Policy>, connects: Option<IntCounterVec>) -> Self {
        TcpFence {
            function,
            policy,
            made: AtomicU32::new(0),
            moved: AtomicU64::new(0),
            connects,
        }
    }

    /// wasmtime's socket address check: whether the guest may use `addr`
    /// as `usage` says.
    pub fn check(
        self: &Arc<Self>,
        addr: SocketAddr,
        usage: SocketAddrUse,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + Sync>> {
        let fence = Arc::clone(self);
        Box::pin(async move {
            match usage {
                // The implicit bind of a connect (any address, any port).
                SocketAddrUse::TcpBind => addr.ip().is_unspecified() && addr.port() == 0,
                SocketAddrUse::TcpConnect => {
                    let outcome = fence.admit(addr).await;
                    if let Some(connects) = &fence.connects {
                        connects
                            .with_label_values(&[fence.function.as_ref(), outcome])
                            .inc();
                    }
                    outcome == "ok"
                }
                _ => false,
            }
        })
    }

    /// How many of `wanted` bytes may still move; an error once none may.
    fn allowance(&self, wanted: usize) -> StreamResult<usize> {
        let left = self
            .policy
            .tcp_bytes
            .saturating_sub(self.moved.load(Ordering::Relaxed));
        if left == 0 && wanted > 0 {
            return Err(self.over());
        }
        Ok(wanted.min(usize::try_from(left).unwrap_or(usize::MAX)))
    }

    /// The error of a read or write past `max_tcp_bytes`.
    fn over(&self) -> StreamError {
        tracing::info!(function = %self.function, limit = self.policy.tcp_bytes, "outbound TCP stopped: max_tcp_bytes reached");
        StreamError::LastOperationFailed(wasmtime::format_err!(
            "max_tcp_bytes: this instance may send and receive {} bytes of TCP",
            self.policy.tcp_bytes
        ))
    }

    fn spend(&self, bytes: usize) {
        self.moved.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// The outcome of a connect to `addr`.
    async fn admit(&self, addr: SocketAddr) -> &'static str {
        if !self.allows(addr).await {
            tracing::info!(function = %self.function, %addr, "outbound TCP refused: no grant names this destination");
            return "refused";
        }
        if self.made.fetch_add(1, Ordering::Relaxed) >= self.policy.tcp_connections {
            tracing::info!(function = %self.function, %addr, limit = self.policy.tcp_connections, "outbound TCP refused: max_tcp_connections reached");
            return "limit";
        }
        "ok"
    }

    async fn allows(&self, addr: SocketAddr) -> bool {
        if self
            .policy
            .tcp
            .iter()
            .any(|grant| grant.names_address(addr))
        {
            return true;
        }
        let ip = addr.ip().to_canonical();
        if is_internal(ip) {
            return false;
        }
        for grant in &self.policy.tcp {
            let Some(name) = grant.name().filter(|_| grant.port() == addr.port()) else {
                continue;
            };
            if let Ok(mut resolved) = tokio::net::lookup_host((name, addr.port())).await
                && resolved.any(|a| a.ip().to_canonical() == ip)
            {
                return true;
            }
        }
        false
    }
}

/// Whether a guest under `policy` may look up `name`: with outbound TCP
/// granted, a name a grant names, or an address written out (looking it up
/// asks no one).
fn may_look_up(policy: &Policy, name: &str) -> bool {
    let address = name
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .is_ok();
    !policy.tcp.is_empty() && (address || policy.grants_tcp_name(name))
}

/// Replaces `wasi:sockets` name lookup in `linker` (after WASI was added),
/// p2 and p3, with one that answers only for names the instance's policy
/// (`policy` of the store's state) grants.
pub fn add_to_linker<T: WasiView + 'static>(
    linker: &mut Linker<T>,
    policy: fn(&T) -> &Policy,
    fence: fn(&T) -> Option<Arc<TcpFence>>,
) -> anyhow::Result<()> {
    replace(linker, TCP_P2, move |tcp| {
        tcp.func_wrap(
            "[method]tcp-socket.finish-connect",
            move |mut store, (this,): (Resource<TcpSocket>,)| {
                type Streams = (Resource<DynInputStream>, Resource<DynOutputStream>);
                let state: &mut T = store.data_mut();
                let fence = fence(state);
                let socket = this.rep();
                let mut view = state.sockets();
                let (input, output) = match view.finish_connect(this) {
                    Ok(streams) => streams,
                    Err(error) => {
                        return Ok((Err::<Streams, _>(view.convert_error_code(error)?),));
                    }
                };
                let Some(fence) = fence else {
                    return Ok((Ok((input, output)),));
                };
                // The same streams, metered, children of the same socket.
                let parent = Resource::<TcpSocket>::new_borrow(socket);
                let input: DynInputStream = view.table.delete(input)?;
                let output: DynOutputStream = view.table.delete(output)?;
                let input: DynInputStream = Box::new(Metered {
                    inner: input,
                    fence: Arc::clone(&fence),
                });
                let output: DynOutputStream = Box::new(Metered {
                    inner: output,
                    fence,
                });
                let input = view.table.push_child(input, &parent)?;
                let output = view.table.push_child(output, &parent)?;
                Ok((Ok((input, output)),))
            },
        )
    })?;
    replace(linker, LOOKUP_P2, move |lookup| {
        lookup.func_wrap(
            "resolve-addresses",
            move |mut store, (network, name): (Resource<Network>, String)| {
                type Answer = Result<Resource<ResolveAddressStream>, ErrorCode>;
                let state: &mut T = store.data_mut();
                if !may_look_up(policy(state), &name) {
                    return Ok((Answer::Err(ErrorCode::AccessDenied),));
                }
                let mut view = state.sockets();
                match view.resolve_addresses(network, name) {
                    Ok(stream) => Ok((Ok(stream),)),
                    Err(error) => Ok((Err(view.convert_error_code(error)?),)),
                }
            },
        )
    })?;
    replace(linker, LOOKUP_P3, move |lookup| {
        lookup.func_wrap_concurrent("resolve-addresses", move |store, (name,): (String,)| {
            Box::pin(async move {
                type Answer = Result<Vec<IpAddress3>, ErrorCode3>;
                if !store.with(|mut view| may_look_up(policy(view.get()), &name)) {
                    return Ok((Answer::Err(ErrorCode3::AccessDenied),));
                }
                let literal = name.trim_start_matches('[').trim_end_matches(']');
                if let Ok(ip) = literal.parse::<std::net::IpAddr>() {
                    return Ok((Answer::Ok(vec![ip.into()]),));
                }
                Ok((match tokio::net::lookup_host((name.as_str(), 0)).await {
                    Ok(addrs) => Ok(addrs.map(|a| a.ip().to_canonical().into()).collect()),
                    Err(_) => Err(ErrorCode3::NameUnresolvable),
                },))
            })
        })
    })
}

/// Defines a function of `instance` again with `define`, which must
/// replace one already there (defined without shadowing first, it fails:
/// a wasmtime that stopped linking it is caught at start, not missed).
fn replace<T: 'static>(
    linker: &mut Linker<T>,
    instance: &str,
    define: impl Fn(&mut LinkerInstance<'_, T>) -> wasmtime::Result<()>,
) -> anyhow::Result<()> {
    linker.allow_shadowing(false);
    if define(&mut linker.instance(instance)?).is_ok() {
        bail!("{instance} was not linked before: nothing to replace");
    }
    linker.allow_shadowing(true);
    let defined = define(&mut linker.instance(instance)?);
    linker.allow_shadowing(false);
    Ok(defined?)
}

/// A TCP stream whose bytes count against its instance's `max_tcp_bytes`.
struct Metered<S> {
    inner: S,
    fence: Arc<TcpFence>,
}

#[async_trait::async_trait]
impl<S: Send + 'static + Pollable + ?Sized> Pollable for Metered<Box<S>> {
    async fn ready(&mut self) {
        self.inner.ready().await;
    }
}

#[async_trait::async_trait]
impl InputStream for Metered<DynInputStream> {
    fn read(&mut self, size: usize) -> StreamResult<Bytes> {
        let allowed = self.fence.allowance(size)?;
        let bytes = self.inner.read(allowed)?;
        self.fence.spend(bytes.len());
        Ok(bytes)
    }

    async fn cancel(&mut self) {
        self.inner.cancel().await;
    }
}

#[async_trait::async_trait]
impl OutputStream for Metered<DynOutputStream> {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        if self.fence.allowance(bytes.len())? < bytes.len() {
            // Not a part of it: the whole write is refused.
            return Err(self.fence.over());
        }
        self.fence.spend(bytes.len());
        self.inner.write(bytes)
    }

    fn flush(&mut self) -> StreamResult<()> {
        self.inner.flush()
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        let ready = self.inner.check_write()?;
        if ready == 0 {
            return Ok(0);
        }
        self.fence.allowance(ready)
    }

    async fn cancel(&mut self) {
        self.inner.cancel().await;
    }
}
