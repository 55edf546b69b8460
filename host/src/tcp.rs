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
//!
//! What wasmtime's sockets leave no hook for, and so is not limited here:
//! bytes sent and received (the invocation's deadline and memory bound
//! them) and a connect timeout of its own (the deadline bounds it).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::bail;
use prometheus::IntCounterVec;
use wasmtime::component::{Linker, LinkerInstance, Resource};
use wasmtime_wasi::WasiView;
use wasmtime_wasi::p2::bindings::sockets::ip_name_lookup::{Host as _, ResolveAddressStream};
use wasmtime_wasi::p2::bindings::sockets::network::{ErrorCode, Host as _, Network};
use wasmtime_wasi::p3::bindings::sockets::ip_name_lookup::ErrorCode as ErrorCode3;
use wasmtime_wasi::p3::bindings::sockets::types::IpAddress as IpAddress3;
use wasmtime_wasi::sockets::{SocketAddrUse, WasiSocketsView};

use crate::outbound::is_internal;
use crate::policy::Policy;

/// The name lookups replaced: the ones wasmtime-wasi links (components
/// importing any 0.2.x reach the first).
const LOOKUP_P2: &str = "wasi:sockets/ip-name-lookup@0.2.12";
const LOOKUP_P3: &str = "wasi:sockets/ip-name-lookup@0.3.0";

/// One instance's outbound TCP: what its policy grants, and the connects
/// made so far.
pub struct TcpFence {
    function: Arc<str>,
    policy: Arc<Policy>,
    made: AtomicU32,
    connects: Option<IntCounterVec>,
}

impl TcpFence {
    pub fn new(function: Arc<str>, policy: Arc<Policy>, connects: Option<IntCounterVec>) -> Self {
        TcpFence {
            function,
            policy,
            made: AtomicU32::new(0),
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
) -> anyhow::Result<()> {
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
