//! Instance reuse, opt-in per function (`[instances]` in its policy).
//!
//! A fresh instance per request is the default and the isolation promise:
//! nothing a guest leaves in memory reaches the next request. A function
//! whose policy sets `reuse` above 1 (or, for WASIp3, `concurrency` above 1)
//! gives that up for speed: its instances live on and serve up to `reuse`
//! requests, up to `concurrency` at once for a p3 guest, and are dropped
//! after `idle` without work.
//!
//! Built on wasmtime-wasi-http's `handler` module (what `wasmtime serve`
//! runs): one `ProxyHandler` per function version and policy, whose workers
//! each own one store and instance. The rules kept here:
//! - a trap retires the instance at once (the worker ends with an error);
//!   so does a request past its deadline (the worker stops taking requests,
//!   and is dropped once those it holds are done) and a failed memory
//!   growth, which the guest turns into a trap;
//! - an instance never outlives the policy or the version it was created
//!   under: a pool belongs to one `Deployed` and one `Arc<Policy>`, and a
//!   new policy or version gets a new pool, while the old one's instances
//!   finish what they hold and are dropped when idle;
//! - the memory limit is the store's, so it holds over an instance's whole
//!   life, not per request.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use wasmtime::component::GuestTaskId;
use wasmtime::{Engine, Store, StoreContextMut};
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::handler::{
    HandlerState, Instance, ProxyHandler, ProxyPre, ShouldAccept, WorkerExpiration, WorkerState,
    WorkerStatus,
};

use crate::policy::Policy;
use crate::sandbox::{HostState, InstanceEvent, Invocation, InvocationStats, new_store};

/// The instances of one function version under one policy.
pub struct Pool {
    pub policy: Arc<Policy>,
    pub handler: ProxyHandler<PoolState>,
}

impl Pool {
    /// A pool for invocations like `invocation` (its function and policy).
    pub fn new(engine: &Engine, pre: ProxyPre<HostState>, invocation: &Invocation) -> Self {
        Pool {
            policy: Arc::clone(&invocation.policy),
            handler: ProxyHandler::new(PoolState {
                engine: engine.clone(),
                pre,
                invocation: invocation.clone(),
                instances: AtomicUsize::new(0),
            }),
        }
    }
}

pub struct PoolState {
    engine: Engine,
    pre: ProxyPre<HostState>,
    /// Whose instances these are; `stats` and the id its output is logged
    /// under are replaced per instance.
    invocation: Invocation,
    /// Instances created so far.
    instances: AtomicUsize,
}

impl HandlerState for PoolState {
    type StoreData = HostState;
    type WorkerExpiration = Expiry;
    type WorkerState = Worker;

    async fn instantiate(
        &self,
    ) -> wasmtime::Result<Instance<HostState, Self::WorkerExpiration, Self::WorkerState>> {
        let stats = Arc::new(InvocationStats::default());
        // An instance serves many requests, so its output cannot carry one
        // request's id: its log lines say which instance wrote them.
        let number = self.instances.fetch_add(1, Ordering::Relaxed) + 1;
        let invocation = Invocation {
            stats: Arc::clone(&stats),
            request_id: Arc::from(format!("instance-{number}")),
            ..self.invocation.clone()
        };
        let mut store =
            new_store(&self.engine, &invocation).map_err(wasmtime::Error::from_anyhow)?;
        let policy = &invocation.policy;
        let instantiate =
            tokio::time::timeout(policy.timeout, self.pre.instantiate_async(&mut store));
        let proxy = instantiate
            .await
            .map_err(|_| wasmtime::format_err!("instantiation took longer than the deadline"))??;
        (invocation.on_instance)(InstanceEvent::Created);
        Ok(Instance {
            store,
            proxy,
            view: <HostState as WasiHttpView>::http,
            expiration: Expiry::new(policy.idle, policy.timeout),
            state: Worker {
                reuse: policy.reuse as usize,
                // A p2 instance serves one request at a time.
                concurrency: if matches!(self.pre, ProxyPre::P3(_)) {
                    policy.instance_concurrency as usize
                } else {
                    1
                },
                timeout: policy.timeout,
                invocation,
                stats,
                served: AtomicUsize::new(0),
            },
        })
    }
}

/// The life of one instance: how many requests it may take, and what is
/// recorded when it goes.
pub struct Worker {
    reuse: usize,
    concurrency: usize,
    timeout: Duration,
    invocation: Invocation,
    stats: Arc<InvocationStats>,
    /// Requests started in this instance.
    served: AtomicUsize,
}

impl WorkerState for Worker {
    type StoreData = HostState;
    type RequestData = ();

    fn should_accept_request(&self, concurrent: usize, total: usize) -> ShouldAccept {
        if total >= self.reuse {
            ShouldAccept::Never
        } else if concurrent >= self.concurrency {
            ShouldAccept::No
        } else {
            ShouldAccept::Yes
        }
    }

    fn on_request_start(
        &self,
        mut store: StoreContextMut<'_, HostState>,
        _data: (),
        _task: GuestTaskId,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + Sync>> {
        // `max_ops` is per request: each one starts a new count (requests
        // running at once in one p3 instance share it).
        store.data_mut().kv_request_started();
        if self.served.fetch_add(1, Ordering::Relaxed) > 0 {
            (self.invocation.on_instance)(InstanceEvent::Reused);
        }
        Box::pin(tokio::time::sleep(self.timeout))
    }

    fn drop(&self, store: Store<HostState>, result: wasmtime::Result<()>) {
        if let Err(error) = &result {
            tracing::debug!(
                function = &*self.invocation.function,
                error = format!("{error:#}"),
                "reused instance retired after a failure"
            );
        }
        let peak = self.stats.memory_peak.load(Ordering::Relaxed);
        (self.invocation.on_memory_peak)(peak);
        drop(store);
        (self.invocation.on_instance)(InstanceEvent::Retired);
    }
}

/// When an instance is dropped: idle for `idle`, or busy past the deadline
/// (a second line of defence: a guest spinning or blocked in a host call
/// holds the store, so the per-request expiration cannot run).
pub struct Expiry {
    idle: Duration,
    busy: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    armed_for: Option<(WorkerStatus, Instant)>,
}

impl Expiry {
    fn new(idle: Duration, busy: Duration) -> Self {
        Expiry {
            idle,
            busy,
            sleep: Box::pin(tokio::time::sleep(idle)),
            armed_for: None,
        }
    }
}

impl WorkerExpiration for Expiry {
    fn poll(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        status: WorkerStatus,
        start: Instant,
    ) -> Poll<()> {
        let this = self.get_mut();
        if this.armed_for != Some((status, start)) {
            let wait = match status {
                WorkerStatus::Idle => this.idle,
                WorkerStatus::Requests | WorkerStatus::PostReturn => this.busy,
            };
            this.sleep
                .as_mut()
                .reset(tokio::time::Instant::from_std(start + wait));
            this.armed_for = Some((status, start));
        }
        this.sleep.as_mut().poll(cx)
    }
}
