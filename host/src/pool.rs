//! Instance reuse, opt-in per function (`[instances]` in its policy).
//!
//! A fresh instance per request is the default and the isolation promise:
//! nothing a guest leaves in memory reaches the next request. A function
//! whose policy sets `reuse` above 1 (or, for WASIp3, `concurrency` above 1)
//! gives that up for speed: its instances live on and serve up to `reuse`
//! requests, up to `concurrency` at once for a p3 guest, and are dropped
//! after `idle` without work.
//!
//! Run to completion, on the request's own task: a pool is a stack of idle
//! instances (last in, first out, so the warmest is reused). A request pops
//! one and drives the guest itself, in its connection's task, until the
//! guest has answered; only a guest still writing its body after the head
//! moves to a task of its own (as a fresh instance does). It then goes back
//! on the stack. Nothing idle and the pool under its cap (`max`): the
//! request instantiates one in place. At the cap, and only then, a WASIp3
//! request joins an instance another request is driving, if that one has
//! room (`concurrency`); otherwise it waits for one to come back. So the
//! common path hands nothing to another task and arms one timer, the
//! deadline; an idle stack has one sweeper timer for the whole pool.
//!
//! The rules kept:
//! - a trap retires the instance at once, and so does a request past its
//!   deadline (the instance is dropped with the future that drove it) and a
//!   panic in the host while the guest ran;
//! - an instance never outlives the policy or the version it was created
//!   under: a pool belongs to one `Deployed` and one `Arc<Policy>` (its
//!   `Serving`); a new policy or version gets a new pool, and the old one is
//!   dropped with the last request that held it: its idle instances go
//!   with it, and its busy ones when they finish (they hold it weakly);
//! - the memory limit is the store's, so it holds over an instance's whole
//!   life, not per request; `max_ops` for key-value is counted per request.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::task::AtomicWaker;
use http::Response;
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use tokio::sync::{Notify, oneshot};
use wasmtime::component::Accessor;
use wasmtime::{Engine, Store};
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::handler::{Proxy, ProxyPre};
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;

use crate::error::Body;
use crate::policy::Policy;
use crate::sandbox::{Handoff, HostState, InstanceEvent, Invocation, InvocationStats, new_store};

/// What a guest answered: its response, or the `wasi:http` error code it
/// returned instead (as text).
pub type Head = Result<Response<Body>, String>;

/// A request body as a pooled instance takes it.
pub type GuestBody = UnsyncBoxBody<Bytes, wasmtime_wasi_http::Error>;

/// How a guest's run ended.
pub enum Ran {
    /// It returned (with or without answering).
    Done,
    /// It trapped, failed to instantiate, or its instance failed under it.
    Failed(wasmtime::Error),
    /// It was still running at its deadline, and was stopped.
    TimedOut,
}

/// The instances of one function version under one policy.
pub struct Pool {
    pub policy: Arc<Policy>,
    engine: Engine,
    pre: ProxyPre<HostState>,
    /// Whose instances these are; `stats` and the id its output is logged
    /// under are replaced per instance.
    invocation: Invocation,
    /// Instances alive at once, idle or busy.
    cap: usize,
    /// Requests one instance takes at once (1 for WASIp2).
    per_instance: usize,
    slots: Mutex<Slots>,
    /// Signalled when an instance comes back, retires or has room again.
    freed: Notify,
    /// Instances created so far (they are named by it in the log).
    created: AtomicUsize,
    this: Weak<Pool>,
}

#[derive(Default)]
struct Slots {
    /// Idle instances, the most recently used last.
    idle: Vec<Instance>,
    /// Instances alive, idle or busy (or being created).
    live: usize,
    /// Busy WASIp3 instances another request may join.
    shared: Vec<Arc<Inbox>>,
    /// Whether a task is sweeping idle instances out.
    sweeping: bool,
}

impl Slots {
    /// A busy instance no longer takes other requests.
    fn unshare(&mut self, inbox: &Arc<Inbox>) {
        self.shared.retain(|shared| !Arc::ptr_eq(shared, inbox));
    }
}

/// One store and instance, with what its life has been.
struct Instance {
    store: Store<HostState>,
    proxy: Proxy,
    /// Requests started in it.
    served: usize,
    idle_since: Instant,
    stats: Arc<InvocationStats>,
    on_instance: Arc<dyn Fn(InstanceEvent) + Send + Sync>,
    on_memory_peak: Arc<dyn Fn(usize) + Send + Sync>,
    pool: Weak<Pool>,
    /// Where others' requests join it while it is busy (WASIp3 with
    /// `concurrency` above 1).
    inbox: Option<Arc<Inbox>>,
}

impl Drop for Instance {
    fn drop(&mut self) {
        (self.on_memory_peak)(self.stats.memory_peak.load(Ordering::Relaxed));
        (self.on_instance)(InstanceEvent::Retired);
        if let Some(pool) = self.pool.upgrade() {
            pool.retired(self.inbox.as_ref());
        }
    }
}

/// A place in the pool taken for an instance being created: given back if
/// the creation fails or its request goes away first.
struct Reserved<'a> {
    pool: &'a Pool,
    inbox: Option<Arc<Inbox>>,
    kept: bool,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.pool.retired(self.inbox.as_ref());
        }
    }
}

/// Where requests joining a busy WASIp3 instance wait for its driver; one
/// per instance, opened each time a request starts driving it.
struct Inbox {
    jobs: Mutex<Jobs>,
    /// Requests waiting in `jobs`, read without the lock.
    queued: AtomicUsize,
    /// Requests in the instance now, its own included.
    load: AtomicUsize,
    /// Requests it may still take before its `reuse` is spent.
    remaining: AtomicUsize,
    /// Wakes the driver when a request joins.
    driver: AtomicWaker,
    /// The latest deadline of the requests in it, in nanoseconds after
    /// `base`: the instance is stopped when it passes.
    deadline_ns: AtomicU64,
    base: Instant,
}

#[derive(Default)]
struct Jobs {
    /// Whether the driver takes requests.
    open: bool,
    waiting: Vec<Job>,
}

/// A request that joined a busy instance.
struct Job {
    request: hyper::Request<GuestBody>,
    head: oneshot::Sender<Head>,
}

/// What a request got from the pool.
enum Taken {
    Idle(Instance),
    /// Room for one more instance (counted as live already), with the
    /// inbox it opens with, if it takes others' requests.
    Create(Option<Arc<Inbox>>),
    Join(Arc<Inbox>),
    Wait,
}

impl Pool {
    /// A pool for invocations like `invocation` (its function and policy).
    pub fn new(engine: &Engine, pre: ProxyPre<HostState>, invocation: &Invocation) -> Arc<Self> {
        let policy = &invocation.policy;
        let per_instance = match pre {
            ProxyPre::P3(_) => policy.instance_concurrency.max(1) as usize,
            ProxyPre::P2(_) => 1,
        };
        let cap = policy.max_instances(per_instance as u32) as usize;
        Arc::new_cyclic(|this| Pool {
            policy: Arc::clone(policy),
            engine: engine.clone(),
            pre,
            invocation: invocation.clone(),
            cap,
            per_instance,
            slots: Mutex::new(Slots::default()),
            freed: Notify::new(),
            created: AtomicUsize::new(0),
            this: this.clone(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs one request in an instance of this pool: its head (or why there
    /// is none), and the guest's run, finished or still going in a task of
    /// its own.
    pub async fn invoke(
        &self,
        request: hyper::Request<GuestBody>,
        stats: &InvocationStats,
    ) -> (Option<Head>, Run) {
        let started = Instant::now();
        let taken = match self.take() {
            Taken::Wait => self.wait(started).await,
            taken => taken,
        };
        let instance = match taken {
            Taken::Idle(instance) => instance,
            Taken::Create(inbox) => {
                let mut reserved = Reserved {
                    pool: self,
                    inbox,
                    kept: false,
                };
                let instantiated = Instant::now();
                match self.instantiate(reserved.inbox.clone()).await {
                    Ok(instance) => {
                        reserved.kept = true;
                        let nanos = instantiated.elapsed().as_nanos();
                        stats
                            .instantiate_ns
                            .store(u64::try_from(nanos).unwrap_or(u64::MAX), Ordering::Relaxed);
                        instance
                    }
                    Err(error) => return (None, Run::Finished(Ok(Ran::Failed(error)))),
                }
            }
            Taken::Join(inbox) => {
                Handoff::Joined.record(stats);
                return self.join(inbox, request, started, stats).await;
            }
            Taken::Wait => return (None, Run::Finished(Ok(Ran::TimedOut))),
        };
        let (head, run) = self.drive(instance, request, started).await;
        if run.handed_off() {
            Handoff::Body.record(stats);
        }
        (head, run)
    }

    /// Waits for an instance, or room for one, to free up; `Wait` if none
    /// did within the deadline.
    async fn wait(&self, started: Instant) -> Taken {
        loop {
            // Registered before looking again, so a slot freed in between
            // wakes it.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            match self.take() {
                Taken::Wait => {}
                taken => return taken,
            }
            let left = self.policy.timeout.saturating_sub(started.elapsed());
            if tokio::time::timeout(left, freed).await.is_err() {
                return Taken::Wait;
            }
        }
    }

    /// An idle instance, room to create one, a busy instance to join, or
    /// nothing yet.
    fn take(&self) -> Taken {
        let mut slots = self.lock();
        // An instance that may take others' requests while it serves this
        // one: as many as it has room and `reuse` left for.
        let left = |served: usize| (self.policy.reuse as usize).saturating_sub(served + 1);
        if let Some(instance) = slots.idle.pop() {
            if let Some(inbox) = &instance.inbox {
                inbox.open(left(instance.served));
                slots.shared.push(Arc::clone(inbox));
            }
            return Taken::Idle(instance);
        }
        if slots.live < self.cap {
            slots.live += 1;
            let inbox = (self.per_instance > 1).then(|| {
                let inbox = Arc::new(Inbox::default());
                inbox.open(left(0));
                slots.shared.push(Arc::clone(&inbox));
                inbox
            });
            return Taken::Create(inbox);
        }
        let per_instance = self.per_instance;
        for inbox in &slots.shared {
            let reserved = inbox
                .load
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < per_instance).then_some(n + 1)
                });
            if reserved.is_err() {
                continue;
            }
            let counted = inbox
                .remaining
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
            if counted.is_ok() {
                return Taken::Join(Arc::clone(inbox));
            }
            inbox.load.fetch_sub(1, Ordering::AcqRel);
        }
        Taken::Wait
    }

    /// A new instance (its slot already counted as live).
    async fn instantiate(&self, inbox: Option<Arc<Inbox>>) -> wasmtime::Result<Instance> {
        let stats = Arc::new(InvocationStats::default());
        // An instance serves many requests, so its output cannot carry one
        // request's id: its log lines say which instance wrote them.
        let number = self.created.fetch_add(1, Ordering::Relaxed) + 1;
        let invocation = Invocation {
            stats: Arc::clone(&stats),
            request_id: Arc::from(format!("instance-{number}")),
            ..self.invocation.clone()
        };
        let mut store =
            new_store(&self.engine, &invocation).map_err(wasmtime::Error::from_anyhow)?;
        let instantiate =
            tokio::time::timeout(self.policy.timeout, self.pre.instantiate_async(&mut store));
        let proxy = instantiate
            .await
            .map_err(|_| wasmtime::format_err!("instantiation took longer than the deadline"))??;
        (invocation.on_instance)(InstanceEvent::Created);
        Ok(Instance {
            store,
            proxy,
            served: 0,
            idle_since: Instant::now(),
            stats,
            on_instance: Arc::clone(&invocation.on_instance),
            on_memory_peak: Arc::clone(&invocation.on_memory_peak),
            pool: self.this.clone(),
            inbox,
        })
    }

    /// Runs `request` in `instance` on this task until the guest has
    /// answered, then moves what is left (a body still being written, other
    /// requests that joined) to a task of its own.
    async fn drive(
        &self,
        mut instance: Instance,
        request: hyper::Request<GuestBody>,
        started: Instant,
    ) -> (Option<Head>, Run) {
        let pool = self.this.clone();
        let inbox = instance.inbox.clone();
        let deadline = self.policy.timeout;
        if let Some(inbox) = &inbox {
            inbox.extend(started + deadline);
        }
        let (head, receiver) = oneshot::channel::<Head>();
        instance.start_request();
        let guest = async move {
            let ran = Deadline::new(
                started + deadline,
                inbox.clone(),
                instance.run(request, head, inbox.as_deref()),
            )
            .await;
            if let Some(inbox) = &inbox {
                inbox.shut();
            }
            let ran = match ran {
                Some(Ok(())) => Ran::Done,
                Some(Err(error)) => Ran::Failed(error),
                None => Ran::TimedOut,
            };
            match (&ran, pool.upgrade()) {
                (Ran::Done, Some(pool)) => pool.give_back(instance),
                // Retired: its drop frees its place in the pool.
                _ => drop(instance),
            }
            ran
        };
        let (head, run) = run_until_head(guest, receiver).await;
        (head.ok(), run)
    }

    /// Runs `request` in a busy instance whose driver has room for it.
    async fn join(
        &self,
        inbox: Arc<Inbox>,
        request: hyper::Request<GuestBody>,
        started: Instant,
        stats: &InvocationStats,
    ) -> (Option<Head>, Run) {
        let deadline = self.policy.timeout;
        let (head, receiver) = oneshot::channel();
        if let Err(job) = inbox.push(Job { request, head }, started + deadline) {
            // The driver stopped taking requests just now: try again.
            inbox.load.fetch_sub(1, Ordering::AcqRel);
            self.lock().unshare(&inbox);
            return Box::pin(self.invoke(job.request, stats)).await;
        }
        let left = deadline.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, receiver).await {
            Ok(Ok(head)) => (Some(head), Run::Finished(Ok(Ran::Done))),
            Ok(Err(_)) if started.elapsed() >= deadline => (None, Run::Finished(Ok(Ran::TimedOut))),
            Ok(Err(_)) => (
                None,
                Run::Finished(Ok(Ran::Failed(wasmtime::format_err!(
                    "the instance it shared with other requests failed"
                )))),
            ),
            Err(_) => (None, Run::Finished(Ok(Ran::TimedOut))),
        }
    }

    /// An instance whose request went well: back on the stack, unless it
    /// has served its `reuse`.
    fn give_back(&self, mut instance: Instance) {
        let keep = instance.served < self.policy.reuse as usize;
        let mut slots = self.lock();
        if let Some(inbox) = &instance.inbox {
            slots.unshare(inbox);
        }
        if !keep {
            drop(slots);
            drop(instance);
            return;
        }
        instance.idle_since = Instant::now();
        slots.idle.push(instance);
        let sweep = !std::mem::replace(&mut slots.sweeping, true);
        drop(slots);
        self.freed.notify_one();
        if sweep {
            tokio::spawn(sweep_idle(self.this.clone(), self.policy.idle));
        }
    }

    /// An instance went (or was never made): its place is free, and
    /// requests waiting to join it are told it failed.
    fn retired(&self, inbox: Option<&Arc<Inbox>>) {
        if let Some(inbox) = inbox {
            inbox.shut();
        }
        let mut slots = self.lock();
        slots.live = slots.live.saturating_sub(1);
        if let Some(inbox) = inbox {
            slots.unshare(inbox);
        }
        drop(slots);
        self.freed.notify_one();
    }
}

/// Drops instances idle for `idle`, oldest first, while any are idle: one
/// timer for the whole pool.
async fn sweep_idle(pool: Weak<Pool>, idle: Duration) {
    loop {
        let next = {
            let Some(pool) = pool.upgrade() else { return };
            let mut slots = pool.lock();
            let now = Instant::now();
            let expired = slots
                .idle
                .iter()
                .take_while(|instance| now.duration_since(instance.idle_since) >= idle)
                .count();
            let gone: Vec<Instance> = slots.idle.drain(..expired).collect();
            let next = slots.idle.first().map(|oldest| oldest.idle_since + idle);
            if next.is_none() {
                slots.sweeping = false;
            }
            drop(slots);
            drop(gone);
            next
        };
        match next {
            Some(at) => tokio::time::sleep_until(at.into()).await,
            None => return,
        }
    }
}

impl Instance {
    /// Counts a request started in this instance.
    fn start_request(&mut self) {
        // `max_ops` is per request: each one starts a new count (requests
        // running at once in one p3 instance share it).
        self.store.data_mut().kv_request_started();
        if self.served > 0 {
            (self.on_instance)(InstanceEvent::Reused);
        }
        self.served += 1;
    }

    /// Runs `request` and, for WASIp3, any that join it, until the guest has
    /// no work left.
    async fn run(
        &mut self,
        request: hyper::Request<GuestBody>,
        head: oneshot::Sender<Head>,
        inbox: Option<&Inbox>,
    ) -> wasmtime::Result<()> {
        match &self.proxy {
            Proxy::P2(proxy) => {
                let mut http = self.store.data_mut().http();
                let req = http.new_incoming_request(Scheme::Http, request);
                // The guest's `response-outparam::set` answers through `head`.
                let answer = move |answer: Result<Response<Body>, _>| {
                    let _ = head.send(answer.map_err(|code| format!("{code:?}")));
                };
                let parts = req
                    .and_then(|req| Ok((req, http.new_response_outparam_from_callback(answer)?)));
                let (req, out) = match parts {
                    Ok(parts) => parts,
                    // The request could not be handed over (the sender went
                    // with the callback: the caller sees no answer).
                    Err(error) => return Err(error.context("handing the request to the guest")),
                };
                proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut self.store, req, out)
                    .await
            }
            Proxy::P3(service) => {
                let served = &mut self.served;
                let pool = &self.pool;
                let on_instance = &self.on_instance;
                self.store
                    .run_concurrent(async move |accessor| {
                        let mut running = FuturesUnordered::new();
                        running.push(serve_p3(accessor, service, request, head));
                        let mut closed = inbox.is_none();
                        std::future::poll_fn(|cx| {
                            loop {
                                if let Some(inbox) = inbox.filter(|_| !closed) {
                                    inbox.driver.register(cx.waker());
                                    for job in inbox.take() {
                                        accessor.with(|mut store| {
                                            store.data_mut().kv_request_started()
                                        });
                                        *served += 1;
                                        on_instance(InstanceEvent::Reused);
                                        running.push(serve_p3(
                                            accessor,
                                            service,
                                            job.request,
                                            job.head,
                                        ));
                                    }
                                }
                                match running.poll_next_unpin(cx) {
                                    Poll::Ready(Some(result)) => {
                                        if let Some(inbox) = inbox {
                                            // Room again: a request waiting
                                            // at the cap may join.
                                            inbox.load.fetch_sub(1, Ordering::AcqRel);
                                            if let Some(pool) = pool.upgrade() {
                                                pool.freed.notify_one();
                                            }
                                        }
                                        result?;
                                    }
                                    Poll::Ready(None) => match inbox {
                                        // No request left: stop taking them
                                        // unless one arrived meanwhile.
                                        Some(inbox) if !closed => closed = inbox.close(),
                                        _ => return Poll::Ready(wasmtime::Result::<()>::Ok(())),
                                    },
                                    Poll::Pending => return Poll::Pending,
                                }
                            }
                        })
                        .await?;
                        // A p3 guest may still be running after `handle`
                        // returned (a task it spawned writes the body): the
                        // instance is driven until its tasks are done.
                        std::future::poll_fn(|cx| accessor.poll_no_interesting_tasks(cx)).await;
                        wasmtime::Result::<()>::Ok(())
                    })
                    .await?
            }
        }
    }
}

/// One request through a WASIp3 guest's `handle`: its answer is sent on
/// `head` as soon as it is there.
async fn serve_p3(
    accessor: &Accessor<HostState>,
    service: &wasmtime_wasi_http::p3::bindings::Service,
    request: hyper::Request<GuestBody>,
    head: oneshot::Sender<Head>,
) -> wasmtime::Result<()> {
    // Boxed to name it outside `with`: the future's type names the hooks'
    // borrow, although it holds none of it.
    let (req, io) = accessor.with(|mut store| {
        let hooks = store.data_mut().http().hooks;
        let (req, io) = wasmtime_wasi_http::p3::Request::from_http(hooks, request);
        let io: Pin<Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>> =
            Box::pin(io);
        (req, io)
    });
    match service.handle(accessor, req).await? {
        Ok(response) => {
            let response = accessor.with(|mut store| response.into_http(&mut store, io))?;
            let _ = head.send(Ok(
                response.map(|body| body.map_err(Into::into).boxed_unsync())
            ));
        }
        Err(code) => {
            let _ = head.send(Err(format!("{code:?}")));
        }
    }
    Ok(())
}

impl Default for Inbox {
    fn default() -> Self {
        Inbox {
            jobs: Mutex::new(Jobs::default()),
            queued: AtomicUsize::new(0),
            load: AtomicUsize::new(0),
            remaining: AtomicUsize::new(0),
            driver: AtomicWaker::new(),
            deadline_ns: AtomicU64::new(0),
            base: Instant::now(),
        }
    }
}

impl Inbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, Jobs> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A request starts driving the instance: others may join, up to
    /// `remaining` of them over this run.
    fn open(&self, remaining: usize) {
        let mut jobs = self.lock();
        jobs.open = true;
        self.load.store(1, Ordering::Release);
        self.remaining.store(remaining, Ordering::Release);
        self.deadline_ns.store(0, Ordering::Release);
    }

    /// Hands `job` to the driver, or back if it stopped taking requests.
    fn push(&self, job: Job, deadline: Instant) -> Result<(), Box<Job>> {
        let mut jobs = self.lock();
        if !jobs.open {
            return Err(Box::new(job));
        }
        self.extend(deadline);
        jobs.waiting.push(job);
        self.queued.fetch_add(1, Ordering::Release);
        drop(jobs);
        self.driver.wake();
        Ok(())
    }

    /// The requests that joined since the last look (no lock when none).
    fn take(&self) -> Vec<Job> {
        if self.queued.load(Ordering::Acquire) == 0 {
            return Vec::new();
        }
        let mut jobs = self.lock();
        self.queued.store(0, Ordering::Release);
        std::mem::take(&mut jobs.waiting)
    }

    /// Stops taking requests, unless some arrived: whether it stopped.
    fn close(&self) -> bool {
        let mut jobs = self.lock();
        if !jobs.waiting.is_empty() {
            return false;
        }
        jobs.open = false;
        true
    }

    /// Stops taking requests; any not started get no answer.
    fn shut(&self) {
        let waiting = {
            let mut jobs = self.lock();
            jobs.open = false;
            self.queued.store(0, Ordering::Release);
            std::mem::take(&mut jobs.waiting)
        };
        drop(waiting);
    }

    /// Moves the instance's deadline to `at` if that is later.
    fn extend(&self, at: Instant) {
        let ns =
            u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX);
        self.deadline_ns.fetch_max(ns, Ordering::AcqRel);
    }

    fn deadline(&self) -> Instant {
        self.base + Duration::from_nanos(self.deadline_ns.load(Ordering::Acquire))
    }
}

/// A guest's run, bounded by the latest deadline of the requests in it: one
/// timer, moved on only when a request joins.
struct Deadline<F> {
    run: Pin<Box<F>>,
    sleep: Pin<Box<tokio::time::Sleep>>,
    inbox: Option<Arc<Inbox>>,
}

impl<F> Deadline<F> {
    fn new(at: Instant, inbox: Option<Arc<Inbox>>, run: F) -> Self {
        Deadline {
            run: Box::pin(run),
            sleep: Box::pin(tokio::time::sleep_until(at.into())),
            inbox,
        }
    }
}

impl<F: Future> Future for Deadline<F> {
    type Output = Option<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Poll::Ready(output) = self.run.as_mut().poll(cx) {
            return Poll::Ready(Some(output));
        }
        while self.sleep.as_mut().poll(cx).is_ready() {
            // A request that joined since moved the deadline on.
            let later = self
                .inbox
                .as_ref()
                .map(|inbox| inbox.deadline())
                .filter(|at| *at > self.sleep.deadline().into_std());
            match later {
                Some(at) => self.sleep.as_mut().reset(at.into()),
                None => return Poll::Ready(None),
            }
        }
        Poll::Pending
    }
}

/// Where a guest is after its response head: done, or still running in a
/// task of its own (writing its body). Either way its panics were caught.
pub enum Run {
    Finished(std::thread::Result<Ran>),
    Running(tokio::task::JoinHandle<std::thread::Result<Ran>>),
}

impl Run {
    /// How the guest's run ended, or what went wrong in the host while it
    /// ran.
    pub async fn result(self) -> Result<Ran, String> {
        let caught = match self {
            Run::Finished(caught) => caught,
            Run::Running(task) => task.await.map_err(|join| join.to_string())?,
        };
        caught.map_err(|panic| {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_string());
            format!("the host caught a panic: {message}")
        })
    }

    /// Whether the guest moved to a task of its own.
    pub fn handed_off(&self) -> bool {
        matches!(self, Run::Running(_))
    }
}

/// Runs `guest` in this task until it has either finished (most functions
/// answer and return at once: no task to spawn and wake) or sent its
/// response head while still writing the body, in which case the rest of it
/// moves to a task of its own. The deadline (inside `guest`) covers all of it.
pub async fn run_until_head<G, H>(
    guest: G,
    mut receiver: oneshot::Receiver<H>,
) -> (Result<H, oneshot::error::RecvError>, Run)
where
    G: Future<Output = Ran> + Send + 'static,
{
    use futures::FutureExt;
    // A panic inside wasmtime while it runs a guest (a bug it may have, such
    // as GHSA-xrvr-8678-5wp8 in stream and future copies, until the upgrade
    // that fixes it) fails that invocation with a 500; the host keeps
    // serving.
    let mut guest = Box::pin(std::panic::AssertUnwindSafe(guest).catch_unwind());
    let first = tokio::select! {
        biased;
        result = &mut guest => Ok(result),
        head = &mut receiver => Err(head),
    };
    match first {
        // Finished: the head was sent, or never will be once the store that
        // holds the sender is gone.
        Ok(result) => {
            // A guest stopped at its deadline still holds its store (and the
            // sender) until dropped.
            drop(guest);
            (receiver.await, Run::Finished(result))
        }
        Err(head) => {
            // A guest that answered may only have yielded at an epoch tick
            // (which it does every 10 ms of running): a few more turns here
            // finish most, without a task to spawn.
            for _ in 0..AFTER_HEAD_TURNS {
                if let Poll::Ready(result) = futures::poll!(&mut guest) {
                    return (head, Run::Finished(result));
                }
            }
            (head, Run::Running(tokio::spawn(guest)))
        }
    }
}

/// Turns a guest gets on its request's task after it has answered.
const AFTER_HEAD_TURNS: usize = 2;
