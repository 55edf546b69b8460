//! Turns a function's policy into the `Store` state of one invocation, and
//! guards what crosses the sandbox's edge while it runs.
//!
//! Deny by default, one grant at a time: the `WasiCtx` starts empty (no
//! environment, no arguments, no files, no sockets, no inherited stdio) and
//! receives only what the policy names: each `[env]` variable, each `[files]`
//! directory opened read-only through cap-std (the guest cannot write,
//! create, truncate or climb out of it). Its stdout and stderr go to the host
//! log, a bounded number of lines per invocation.
//!
//! Outbound HTTP is checked against `[outbound] allow` before any connection
//! is made, on the scheme, host and port of the request URI. The guest cannot
//! steer a request with a forged `Host` header (CVE-2024-32980 in another
//! host): wasmtime-wasi-http forbids guests from setting `Host`, and the
//! connection goes to the URI's authority, which is what is checked. Names
//! are checked as written; a name that an allowed pattern matches is trusted
//! to resolve where its owner says.
//!
//! Bodies are bounded both ways: the request body by `request_body` (a larger
//! declared length is refused before the guest starts; a longer stream is cut
//! and answered 413), the response body by `response_body` (cut off, and the
//! connection aborted, so the client cannot mistake it for complete).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use opentelemetry::KeyValue;
use tokio::io::AsyncWrite;
use wasmtime::component::ResourceTable;
use wasmtime::{Engine, ResourceLimiter, Store};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{
    RequestOptions, WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView,
};

use crate::kv::KvAccess;
use crate::kv::wasi::{KvCtx, KvView};
use crate::outbound::Outbound;
use crate::policy::Policy;
use crate::recent::{LogLine, Recent};
use crate::secrets::Secrets;
use crate::tcp::TcpFence;
use crate::trace::Traced;
use crate::wasi_config::ConfigView;

/// Instances, tables and memories one invocation may create: a component
/// from a wasm32-wasip2 toolchain has a handful.
const MAX_INSTANCES: usize = 32;
const MAX_TABLES: usize = 32;
const MAX_MEMORIES: usize = 32;
const MAX_TABLE_ELEMENTS: usize = 100_000;
/// Host resources (streams, fields, requests...) a guest may hold at once;
/// unbounded, a guest could fill host memory with handles
/// (GHSA-852m-cvvp-9p4w).
const MAX_RESOURCES: usize = 10_000;
/// Bytes of randomness per call to `get-random-bytes`.
const MAX_RANDOM_BYTES: u64 = 1 << 20;
/// In-memory size of one HTTP fields resource (GHSA-243v-98vx-264h).
const MAX_FIELDS_SIZE: usize = 64 << 10;
/// Guest output lines logged per invocation, and the longest line kept.
const MAX_LOG_LINES: u32 = 100;
const MAX_LOG_LINE: usize = 4096;
/// The body a guest may write ahead of its reader (the client, or the peer
/// of an outbound request): up to `BODY_CHUNKS` writes of at most
/// `BODY_CHUNK` bytes each (about 1 MiB in all; wasmtime's defaults, one
/// write of up to 1 MiB, hold up to 2 MiB). A guest that writes its answer in
/// a few pieces then finishes without waiting for the connection, so it runs
/// to its end in the request's own task; with one buffered write, a second
/// write parked the guest until hyper had taken the first, and the rest of it
/// ran as a task of its own. The in-process instantiate + call loop over the
/// two-write raw-wasi fixture: the call went from about 39 µs to 11-13 µs.
const BODY_CHUNKS: usize = 16;
const BODY_CHUNK: usize = 64 << 10;

/// Who is running, for logs and the outbound check.
#[derive(Clone)]
pub struct Invocation {
    pub function: Arc<str>,
    pub request_id: Arc<str>,
    pub policy: Arc<Policy>,
    /// Called once per outbound request the policy denied.
    pub on_denied: Arc<dyn Fn() + Send + Sync>,
    /// Filled in while it runs, read for metrics.
    pub stats: Arc<InvocationStats>,
    /// Called when a reused instance is created, reused or retired.
    pub on_instance: Arc<dyn Fn(InstanceEvent) + Send + Sync>,
    /// Called with a reused instance's memory high-water mark when it goes.
    pub on_memory_peak: Arc<dyn Fn(usize) + Send + Sync>,
    /// The host's key-value backend and its metrics (what the policy
    /// grants is checked on use).
    pub kv: Option<Arc<KvAccess>>,
    /// Where outbound requests go (pooled, fenced by address); `None`: a
    /// connection per request, unfenced (in-process benchmarks only).
    pub outbound: Option<Arc<Outbound>>,
    /// Where the guest's log lines are kept for the status page.
    pub recent: Option<Arc<Recent>>,
    /// The host's secrets, for `[config]` values that name one; `None`:
    /// such a value is the interface's `upstream` error.
    pub secrets: Option<Arc<Secrets>>,
    /// The span of the guest call, when traced: each outbound request is
    /// a child of it (fresh instances only; a reused one serves many).
    pub trace: Option<Traced>,
}

/// Figures of one invocation, written from inside the sandbox.
#[derive(Debug, Default)]
pub struct InvocationStats {
    /// Time to instantiate, in nanoseconds (0 if it never got that far).
    pub instantiate_ns: AtomicU64,
    /// Largest total linear memory the instance reached, in bytes.
    pub memory_peak: AtomicUsize,
    /// Why the guest ran on another task than the request's, if it did
    /// (a [`Handoff`] as its number; 0: it did not).
    pub handoff: AtomicU8,
}

/// Why a guest ran on another task than its request's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handoff {
    /// It was still writing its body after the head.
    Body = 1,
    /// It joined an instance another request was driving.
    Joined = 2,
}

impl Handoff {
    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Handoff::Body => "body",
            Handoff::Joined => "joined",
        }
    }

    /// Records it in `stats`.
    pub fn record(self, stats: &InvocationStats) {
        stats.handoff.store(self as u8, Ordering::Relaxed);
    }

    /// What `stats` recorded.
    pub fn of(stats: &InvocationStats) -> Option<Handoff> {
        match stats.handoff.load(Ordering::Relaxed) {
            1 => Some(Handoff::Body),
            2 => Some(Handoff::Joined),
            _ => None,
        }
    }
}

/// What happened to an instance, for metrics (`pool` reports them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceEvent {
    Created,
    /// A request went to an instance that had served one before.
    Reused,
    Retired,
}

impl InstanceEvent {
    /// The `event` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceEvent::Created => "created",
            InstanceEvent::Reused => "reused",
            InstanceEvent::Retired => "retired",
        }
    }
}

/// What a `Store` holds for one invocation.
pub struct HostState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    pub limits: Limiter,
    hooks: OutboundGuard,
    kv: KvCtx,
    /// Outbound TCP's grants and counts, when the policy grants any.
    tcp: Option<Arc<TcpFence>>,
}

/// Bounds memory (all of an instance's memories together), tables and
/// instance counts, and records the memory high-water mark. Growth past the
/// limit fails in the guest (`memory.grow` returns -1), which a guest
/// usually turns into a trap.
pub struct Limiter {
    memory_limit: usize,
    memory_total: usize,
    stats: Arc<InvocationStats>,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self
            .memory_total
            .saturating_sub(current)
            .saturating_add(desired);
        if total > self.memory_limit {
            return Ok(false);
        }
        self.memory_total = total;
        self.stats.memory_peak.fetch_max(total, Ordering::Relaxed);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }
}

impl HostState {
    pub fn new(invocation: &Invocation) -> anyhow::Result<Self> {
        let policy = &invocation.policy;
        let log_budget = Arc::new(AtomicU32::new(MAX_LOG_LINES));
        let output = |stream| GuestOutput {
            function: invocation.function.clone(),
            request_id: invocation.request_id.clone(),
            stream,
            budget: log_budget.clone(),
            recent: invocation.recent.clone(),
        };
        let mut wasi = WasiCtx::builder();
        let tcp = !policy.tcp.is_empty();
        wasi.stdout(output("stdout"))
            .stderr(output("stderr"))
            .allow_tcp(tcp)
            .allow_udp(false)
            .allow_ip_name_lookup(tcp)
            .max_random_size(MAX_RANDOM_BYTES);
        let tcp = tcp.then(|| {
            Arc::new(TcpFence::new(
                Arc::clone(&invocation.function),
                Arc::clone(policy),
                invocation.outbound.as_ref().map(|o| o.tcp_connects()),
            ))
        });
        if let Some(fence) = &tcp {
            let fence = Arc::clone(fence);
            wasi.socket_addr_check(move |addr, usage| fence.check(addr, usage));
        }
        for (name, value) in &policy.env {
            wasi.env(name, value);
        }
        for preopen in &policy.files {
            wasi.preopened_dir(&preopen.host, &preopen.guest, FsPerms::ReadOnly)
                .map_err(anyhow::Error::from)?;
        }
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_RESOURCES);
        let mut http = WasiHttpCtx::new();
        http.set_field_size_limit(MAX_FIELDS_SIZE);
        let memory = usize::try_from(policy.memory).unwrap_or(usize::MAX);
        Ok(HostState {
            wasi: wasi.build(),
            http,
            table,
            limits: Limiter {
                memory_limit: memory,
                memory_total: 0,
                stats: Arc::clone(&invocation.stats),
            },
            hooks: OutboundGuard {
                invocation: invocation.clone(),
            },
            kv: KvCtx::new(
                Arc::clone(&invocation.function),
                Arc::clone(policy),
                invocation.kv.clone(),
            )
            .traced(invocation.trace.clone()),
            tcp,
        })
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// A store for one invocation (or one reused instance) under its policy:
/// its limits, the epoch deadline that lets a spinning guest be stopped,
/// and, for a function granted key-value stores, hostcall fuel that bounds
/// what the guest can hand the host in one call near the value limit (a
/// larger value traps in the lifting, before the host holds it; one within
/// the fuel but over the limit gets the interface's error). The floor
/// leaves room for what other calls carry (body chunks, header lists).
pub fn new_store(engine: &Engine, invocation: &Invocation) -> anyhow::Result<Store<HostState>> {
    let state = HostState::new(invocation)?;
    let mut store = Store::new(engine, state);
    store.limiter(|state| &mut state.limits);
    store.set_epoch_deadline(1);
    store.epoch_deadline_async_yield_and_update(1);
    let kv = &invocation.policy.keyvalue;
    if kv.grants_any() {
        let fuel = kv
            .max_value_bytes
            .max(HOSTCALL_FUEL_FLOOR)
            .saturating_add(kv.max_key_bytes)
            .saturating_add(64 << 10);
        store.set_hostcall_fuel(usize::try_from(fuel).unwrap_or(usize::MAX));
    }
    Ok(store)
}

/// The least hostcall fuel a function granted key-value stores gets.
const HOSTCALL_FUEL_FLOOR: u64 = 1 << 20;

impl HostState {
    /// A reused instance starts another request: a new count of key-value
    /// operations.
    pub fn kv_request_started(&mut self) {
        self.kv.reset_ops();
    }

    /// The key-value stores' view of this state (`wasi:keyvalue`).
    pub fn kv(&mut self) -> KvView<'_> {
        KvView {
            ctx: &mut self.kv,
            table: &mut self.table,
        }
    }

    /// The policy the instance runs under.
    pub fn policy(&self) -> &Policy {
        &self.hooks.invocation.policy
    }

    /// Outbound TCP's fence, when the policy grants any.
    pub fn tcp_fence(&self) -> Option<Arc<TcpFence>> {
        self.tcp.clone()
    }

    /// What `wasi:config/store` reads: the policy's `[config]`.
    pub fn config(&mut self) -> ConfigView<'_> {
        ConfigView {
            policy: &self.hooks.invocation.policy,
            secrets: self.hooks.invocation.secrets.as_deref(),
        }
    }
}

impl WasiHttpView for HostState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// Checks each outbound request against the policy before connecting.
struct OutboundGuard {
    invocation: Invocation,
}

type ErrorFuture = Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>;
type SendFuture = Box<
    dyn Future<Output = Result<(http::Response<WasiBody>, ErrorFuture), wasmtime_wasi_http::Error>>
        + Send,
>;

impl WasiHttpHooks for OutboundGuard {
    fn p2_outgoing_body_buffer_chunks(&mut self) -> usize {
        BODY_CHUNKS
    }

    fn p2_outgoing_body_chunk_size(&mut self) -> usize {
        BODY_CHUNK
    }

    fn send_request(
        &mut self,
        mut request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: ErrorFuture,
    ) -> SendFuture {
        let span = self.invocation.trace.as_ref().map(|trace| {
            let span = trace.child("outbound", opentelemetry::trace::SpanKind::Client);
            let uri = request.uri();
            span.set(KeyValue::new(
                "http.request.method",
                request.method().to_string(),
            ));
            span.set(KeyValue::new(
                "server.address",
                uri.host().unwrap_or_default().to_string(),
            ));
            span.set(KeyValue::new("url.path", uri.path().to_string()));
            span.inject(request.headers_mut());
            span
        });
        let uri = request.uri();
        let scheme = uri.scheme_str().unwrap_or("https").to_ascii_lowercase();
        let host = uri.host().unwrap_or_default();
        let default_port = if scheme == "https" { 443 } else { 80 };
        let port = uri.port_u16().unwrap_or(default_port);
        if !self.invocation.policy.allows_outbound(&scheme, host, port) {
            tracing::warn!(
                function = &*self.invocation.function,
                request_id = &*self.invocation.request_id,
                destination = format!("{scheme}://{host}:{port}"),
                "outbound request denied by policy"
            );
            (self.invocation.on_denied)();
            if let Some(span) = &span {
                span.fail("denied by the policy");
                span.end();
            }
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        let Some(outbound) = &self.invocation.outbound else {
            return Box::new(async move {
                let (response, io) =
                    wasmtime_wasi_http::default_send_request(request, options).await?;
                Ok((
                    response.map(BodyExt::boxed_unsync),
                    Box::new(io) as ErrorFuture,
                ))
            });
        };
        let sent = outbound.send(
            &self.invocation.function,
            &self.invocation.policy,
            request,
            options,
        );
        Box::new(async move {
            let response = sent.await;
            if let Some(span) = &span {
                match &response {
                    Ok(response) => span.set(KeyValue::new(
                        "http.response.status_code",
                        i64::from(response.status().as_u16()),
                    )),
                    Err(error) => span.fail(error.to_string()),
                }
                span.end();
            }
            // The pool drives the connection; nothing is left to await.
            Ok((response?, Box::new(async { Ok(()) }) as ErrorFuture))
        })
    }
}

/// The request body as the guest reads it: at most `limit` bytes, and no
/// more than `idle` between two chunks. Past the limit it sets `exceeded`
/// and fails, so the guest sees an error and the client gets a 413.
pub struct GuardedRequestBody<B = hyper::body::Incoming>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
{
    /// `None` only while being dropped.
    inner: Option<B>,
    remaining: u64,
    limit: u64,
    idle: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    pub exceeded: Arc<AtomicBool>,
}

impl<B> GuardedRequestBody<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
{
    pub fn new(inner: B, limit: u64, idle: Duration) -> Self {
        GuardedRequestBody {
            inner: Some(inner),
            remaining: limit,
            limit,
            idle,
            timer: None,
            exceeded: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl<B> Body for GuardedRequestBody<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<wasmtime_wasi_http::Error>,
{
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.timer = None;
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > this.remaining {
                        this.exceeded.store(true, Ordering::Relaxed);
                        this.remaining = 0;
                        return Poll::Ready(Some(Err(
                            wasmtime_wasi_http::Error::HttpRequestBodySize(Some(this.limit)),
                        )));
                    }
                    this.remaining -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let idle = this.idle;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        Poll::Ready(Some(Err(wasmtime_wasi_http::Error::ConnectionReadTimeout)))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl<B> Drop for GuardedRequestBody<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
{
    fn drop(&mut self) {
        if self.exceeded.load(Ordering::Relaxed)
            && let Some(inner) = self.inner.take()
        {
            drain_in_background(inner);
        }
    }
}

/// After refusing a body, how much more of it is read and thrown away, and for
/// how long, so the client has sent its request before the connection closes
/// and can read the `413` (closing on unread data resets the connection, and
/// the client would see a broken pipe instead).
const DRAIN_BYTES: usize = 4 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// Reads and discards the rest of a refused body, within bounds.
pub fn drain_in_background<B>(mut body: B)
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
{
    tokio::spawn(async move {
        let _ = tokio::time::timeout(DRAIN_TIME, async move {
            let mut drained = 0;
            while let Some(Ok(frame)) = body.frame().await {
                drained += frame.data_ref().map_or(0, |d| d.len());
                if drained > DRAIN_BYTES {
                    break;
                }
            }
        })
        .await;
    });
}

/// The response body on its way to the client: cut off with an error past
/// `limit` bytes, which makes hyper abort the connection. Empty data frames
/// (a guest's empty writes) are dropped here: passed on, each would become
/// an empty HTTP/2 DATA frame queued for the client (GHSA-f8mm-ggr3-89wh),
/// and a client may take a stream of them as abuse and hang up.
pub struct CappedResponseBody<B> {
    inner: B,
    remaining: u64,
    limit: u64,
    on_cut: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl<B> CappedResponseBody<B> {
    /// `on_cut` is called once, if the body is cut.
    pub fn new(inner: B, limit: u64, on_cut: Arc<dyn Fn() + Send + Sync>) -> Self {
        CappedResponseBody {
            inner,
            remaining: limit,
            limit,
            on_cut: Some(on_cut),
        }
    }
}

impl<B> Body for CappedResponseBody<B>
where
    B: Body<Data = Bytes, Error = wasmtime_wasi_http::Error> + Unpin,
{
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let mut skipped = 0;
        loop {
            return match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame)))
                    if frame.data_ref().is_some_and(|data| data.is_empty()) =>
                {
                    skipped += 1;
                    if skipped == MAX_EMPTY_FRAMES_PER_POLL {
                        // Let other tasks run; come back for the rest.
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    continue;
                }
                Poll::Ready(Some(Ok(frame))) => this.pass(frame),
                other => other,
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Empty frames dropped in one poll before yielding to other tasks.
const MAX_EMPTY_FRAMES_PER_POLL: u32 = 1024;

impl<B> CappedResponseBody<B> {
    /// Counts a frame against the limit: the frame, or the cut.
    fn pass(
        &mut self,
        frame: Frame<Bytes>,
    ) -> Poll<Option<Result<Frame<Bytes>, wasmtime_wasi_http::Error>>> {
        if let Some(data) = frame.data_ref() {
            let len = data.len() as u64;
            if len > self.remaining {
                self.remaining = 0;
                if let Some(on_cut) = self.on_cut.take() {
                    on_cut();
                }
                return Poll::Ready(Some(Err(wasmtime_wasi_http::Error::HttpResponseBodySize(
                    Some(self.limit),
                ))));
            }
            self.remaining -= len;
        }
        Poll::Ready(Some(Ok(frame)))
    }
}

/// A guest's stdout or stderr: each line becomes a log record, up to the
/// invocation's budget of lines (shared by both streams).
#[derive(Clone)]
struct GuestOutput {
    function: Arc<str>,
    request_id: Arc<str>,
    stream: &'static str,
    budget: Arc<AtomicU32>,
    recent: Option<Arc<Recent>>,
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(LineLogger {
            output: self.clone(),
            buffer: Vec::new(),
        })
    }
}

struct LineLogger {
    output: GuestOutput,
    buffer: Vec<u8>,
}

impl LineLogger {
    fn emit(&self, line: &[u8]) {
        let budget = &self.output.budget;
        let left = budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .unwrap_or(0);
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches('\r');
        match left {
            0 => {}
            1 => tracing::warn!(
                target: "lichen::guest",
                function = &*self.output.function,
                request_id = &*self.output.request_id,
                "guest output limit of {MAX_LOG_LINES} lines reached; dropping the rest"
            ),
            _ => {
                tracing::info!(
                    target: "lichen::guest",
                    function = &*self.output.function,
                    request_id = &*self.output.request_id,
                    stream = self.output.stream,
                    "{text}"
                );
                if let Some(recent) = &self.output.recent {
                    recent.log_line(
                        &self.output.function,
                        LogLine {
                            request_id: self.output.request_id.to_string(),
                            stream: self.output.stream,
                            line: text.to_string(),
                            at_unix_ms: crate::recent::now_unix_ms(),
                        },
                    );
                }
            }
        }
    }

    fn emit_complete_lines(&mut self) {
        while let Some(newline) = self.buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buffer.drain(..=newline).collect();
            self.emit(&line[..line.len() - 1]);
        }
        while self.buffer.len() >= MAX_LOG_LINE {
            let chunk: Vec<u8> = self.buffer.drain(..MAX_LOG_LINE).collect();
            self.emit(&chunk);
        }
    }

    fn emit_rest(&mut self) {
        if !self.buffer.is_empty() {
            let rest = std::mem::take(&mut self.buffer);
            self.emit(&rest);
        }
    }
}

impl AsyncWrite for LineLogger {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        // Once the budget is spent, output is accepted and dropped unread.
        if self.output.budget.load(Ordering::Relaxed) > 0 {
            self.buffer.extend_from_slice(buf);
            self.emit_complete_lines();
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.emit_rest();
        Poll::Ready(Ok(()))
    }
}

impl Drop for LineLogger {
    fn drop(&mut self) {
        self.emit_rest();
    }
}
