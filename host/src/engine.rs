//! The wasmtime side: one `Engine` for the whole host, compiling uploads,
//! loading compiled code from the store's cache, and running one invocation
//! in a fresh `Store` and instance.
//!
//! Why it is built this way:
//! - The pooling allocator keeps instance slots, memories and stacks mapped
//!   ahead of time, so a fresh instance per request costs microseconds. It
//!   needs a lot of virtual address space; where the machine refuses it (a
//!   `ulimit -v`, say) the engine falls back to on-demand allocation and says so.
//! - Each function keeps a pre-instantiated component with its wasi:http
//!   export resolved (`ProxyPre` for WASI 0.2, `ServicePre` for 0.3; the
//!   export tells which at upload), so an invocation is instantiate + call,
//!   nothing more. A p3 guest runs inside `run_concurrent` until its tasks
//!   are done, since it may write its body after `handle` has returned.
//! - A panic inside wasmtime while a guest runs (GHSA-xrvr-8678-5wp8 in
//!   48.0.8, reachable by a p3 guest) is caught: that request's 500.
//! - Deadlines use epoch interruption driven by one ticker thread: the guest
//!   yields to tokio at every tick, so a guest spinning in a loop shares its
//!   worker thread, and a tokio timeout around the whole invocation (guest code
//!   and host calls alike) ends it with a 504.
//! - What the guest may touch is decided per invocation by its policy (see
//!   `sandbox`); the engine only runs it.
//! - Uploads are accepted only as WebAssembly binaries: never text (the `wat`
//!   feature is for tests), never precompiled code, which is only ever read
//!   back from the host's own cache.

use std::any::Any;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use http::{Response, StatusCode};
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::handler;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p3::bindings::ServicePre;

use crate::error::{ApiError, Body};
use crate::names::FunctionName;
use crate::policy::MAX_MEMORY;
use crate::pool::{Head, Pool, Ran, Run, run_until_head};
use crate::sandbox::{Handoff, HostState, Invocation, InvocationStats, new_store};
use crate::store::{Abi, VersionInfo};

/// How often the epoch advances: the granularity of deadlines, and how long a
/// guest computing without host calls holds its worker thread at most.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Instances that can exist at once with the pooling allocator. Each slot
/// reserves address space, not memory.
pub const POOL_INSTANCES: u32 = 1000;

/// A component built by `wasm32-wasip2` toolchains has a few core instances
/// and memories (the program, its adapters); room for several per component.
const POOL_CORE_PER_COMPONENT: u32 = 4;

/// Linear memory kept resident between instances instead of handed back to
/// the kernel: resetting it with memset is cheaper than the page faults and
/// TLB shoot-downs of unmapping it. With `pagemap_scan` (Linux 6.7+) wasmtime
/// resets only the pages a guest dirtied. Measured with `lichen-bench
/// instantiate`: 128 KiB without pagemap_scan ~170 µs per instantiate + call,
/// with it ~68 µs; 1 MiB resident was slower again (more to reset) and kept a
/// memory bomb's pages resident, so the host's RSS did not come back.
const KEEP_RESIDENT: usize = 128 << 10;

/// Wasm stack per invocation: deep enough for real programs, small enough
/// that runaway recursion traps quickly (wasmtime's default, made explicit).
const MAX_WASM_STACK: usize = 512 << 10;

/// How the engine is set up; per-invocation limits come from policies.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Try the pooling allocator (falls back if the machine refuses it).
    pub pooling: bool,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings { pooling: true }
    }
}

/// Why an upload was refused; each becomes a `422` with its own code.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error(
        "the upload is not a WebAssembly binary (it does not start with \\0asm); upload the .wasm component that `cargo build --target wasm32-wasip2` writes"
    )]
    NotWasm,
    #[error(
        "this is a core WebAssembly module, not a component; build with `cargo build --release --target wasm32-wasip2` (which writes a component), or wrap a wasip1 module with `wasm-tools component new`"
    )]
    CoreModule,
    #[error("the component does not compile: {0}")]
    Invalid(String),
    #[error(
        "the component is not a wasi:http handler: a WASI 0.2 component must export wasi:http/incoming-handler@0.2.x (the wasi:http/proxy world), a WASI 0.3 one wasi:http/handler@0.3.x (the wasi:http/service world), and import only what WASI provides: {0}"
    )]
    NotHttpHandler(String),
}

impl UploadError {
    pub fn code(&self) -> &'static str {
        match self {
            UploadError::NotWasm => "not_wasm",
            UploadError::CoreModule => "core_module",
            UploadError::Invalid(_) => "invalid_component",
            UploadError::NotHttpHandler(_) => "not_http_handler",
        }
    }
}

impl From<UploadError> for ApiError {
    fn from(error: UploadError) -> Self {
        ApiError::unprocessable(error.code(), error.to_string())
    }
}

/// A function ready to serve: its version and its pre-instantiated component.
pub struct Deployed {
    pub name: FunctionName,
    pub version: VersionInfo,
    /// The module's SHA-256 as a response header value, made once.
    pub module_header: http::HeaderValue,
    pre: Pre,
    /// What its caller keeps for serving it under the policy in force (the
    /// host's `serving::Serving`), made once per policy.
    attached: Mutex<Option<Arc<dyn Any + Send + Sync>>>,
}

/// A pre-instantiated component of either `wasi:http` generation.
enum Pre {
    P2(ProxyPre<HostState>),
    P3(ServicePre<HostState>),
}

/// What happened to one invocation, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The guest answered 4xx/5xx, or answered wrongly.
    GuestError,
    Trap,
    Timeout,
    /// Refused before running: busy (503) or body too large (413).
    Rejected,
    /// Refused for access: missing or wrong token.
    Denied,
    /// Run by a peer (this host was full).
    Forwarded,
    /// A peer took it and failed, or timed out.
    ForwardFailed,
}

impl Outcome {
    /// The `outcome` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::GuestError => "guest_error",
            Outcome::Trap => "trap",
            Outcome::Timeout => "timeout",
            Outcome::Rejected => "rejected",
            Outcome::Denied => "denied",
            Outcome::Forwarded => "forwarded",
            Outcome::ForwardFailed => "forward_failed",
        }
    }
}

/// The host's wasmtime engine and the linker every function is checked
/// against.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    settings: EngineSettings,
    cache_key: String,
    pooling: bool,
}

impl Runtime {
    pub fn new(settings: EngineSettings) -> Result<Self> {
        let (engine, pooling) = if settings.pooling {
            match Engine::new(&engine_config(true)) {
                Ok(engine) => (engine, true),
                Err(error) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "the pooling allocator is unavailable here; allocating instances on demand (slower)"
                    );
                    (Engine::new(&engine_config(false))?, false)
                }
            }
        } else {
            (Engine::new(&engine_config(false))?, false)
        };
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(anyhow::Error::from)
            .context("adding WASI to the linker")?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
            .map_err(anyhow::Error::from)
            .context("adding wasi:http to the linker")?;
        // WASIp3 beside it: a p3 component still imports p2 interfaces (Rust's
        // std uses p2 `wasi:cli`, `wasi:io`, `wasi:clocks`, `wasi:filesystem`),
        // so both generations are linked together, as `wasmtime serve` does.
        wasmtime_wasi::p3::add_to_linker(&mut linker)
            .map_err(anyhow::Error::from)
            .context("adding WASIp3 to the linker")?;
        wasmtime_wasi_http::p3::add_to_linker(&mut linker)
            .map_err(anyhow::Error::from)
            .context("adding wasi:http 0.3 to the linker")?;
        crate::kv::wasi::add_to_linker(&mut linker, HostState::kv)
            .map_err(anyhow::Error::from)
            .context("adding wasi:keyvalue to the linker")?;
        crate::wasi_config::add_to_linker(&mut linker, HostState::config)
            .map_err(anyhow::Error::from)
            .context("adding wasi:config to the linker")?;
        crate::tcp::add_to_linker(&mut linker, HostState::policy, HostState::tcp_fence)
            .context("replacing wasi:sockets name lookup")?;
        spawn_epoch_ticker(&engine);
        let cache_key = engine_cache_key(&engine);
        Ok(Runtime {
            engine,
            linker,
            settings,
            cache_key,
            pooling,
        })
    }

    /// Names the compiled-code cache: differs whenever wasmtime or engine
    /// settings would make cached code unusable.
    pub fn cache_key(&self) -> &str {
        &self.cache_key
    }

    pub fn pooling(&self) -> bool {
        self.pooling
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    /// Checks that `bytes` is a component and compiles it.
    pub fn compile(&self, bytes: &[u8]) -> Result<Component, UploadError> {
        const CORE_VERSION: [u8; 4] = [1, 0, 0, 0];
        if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
            return Err(UploadError::NotWasm);
        }
        if bytes[4..8] == CORE_VERSION {
            return Err(UploadError::CoreModule);
        }
        Component::from_binary(&self.engine, bytes)
            .map_err(|e| UploadError::Invalid(format!("{e:#}")))
    }

    /// Loads code that this host compiled and cached earlier.
    pub fn load_cached(&self, path: &std::path::Path) -> Result<Component> {
        // SAFETY: the file is in the host's own cache, written only by
        // `Component::serialize` of this engine configuration (the cache key
        // is in its path); wasmtime checks the version and settings again in
        // its header. Nothing from a client or a peer is ever loaded here.
        #[allow(unsafe_code)]
        unsafe { Component::deserialize_file(&self.engine, path) }
            .map_err(anyhow::Error::from)
            .with_context(|| format!("loading compiled code {}", path.display()))
    }

    /// Resolves the component's imports and its wasi:http export, which
    /// says its ABI: `wasi:http/handler@0.3` (p3) or
    /// `wasi:http/incoming-handler@0.2` (p2).
    pub fn prepare(
        &self,
        name: FunctionName,
        mut version: VersionInfo,
        component: &Component,
    ) -> Result<Deployed, UploadError> {
        let instance_pre = self
            .linker
            .instantiate_pre(component)
            .map_err(|e| UploadError::NotHttpHandler(format!("{e:#}")))?;
        let pre = match ServicePre::new(instance_pre.clone()) {
            Ok(pre) => Pre::P3(pre),
            Err(p3) => match ProxyPre::new(instance_pre) {
                Ok(pre) => Pre::P2(pre),
                Err(p2) => {
                    return Err(UploadError::NotHttpHandler(format!(
                        "as WASI 0.2: {p2:#}; as WASI 0.3: {p3:#}"
                    )));
                }
            },
        };
        version.abi = match pre {
            Pre::P2(_) => Abi::P2,
            Pre::P3(_) => Abi::P3,
        };
        // Lower-case hex: always a valid header value.
        let module_header = http::HeaderValue::from_str(&version.sha256)
            .unwrap_or_else(|_| http::HeaderValue::from_static(""));
        Ok(Deployed {
            name,
            version,
            module_header,
            pre,
            attached: Mutex::new(None),
        })
    }

    /// Runs one invocation of `function` in a fresh instance, under the
    /// invocation's policy.
    ///
    /// `request` is what the guest sees: its path already relative to the
    /// function's mount.
    pub async fn invoke<B>(
        &self,
        function: &Deployed,
        request: hyper::Request<B>,
        invocation: &Invocation,
    ) -> (Result<Response<Body>, ApiError>, Outcome)
    where
        B: http_body::Body<Data = bytes::Bytes, Error = wasmtime_wasi_http::Error> + Send + 'static,
    {
        let started = Instant::now();
        let deadline = invocation.policy.timeout;
        let request_id = &*invocation.request_id;
        let mut store = match new_store(&self.engine, invocation) {
            Ok(store) => store,
            Err(error) => {
                let error = error.context(format!("preparing the sandbox of {}", function.name));
                return (Err(ApiError::internal(error)), Outcome::Trap);
            }
        };

        let stats = Arc::clone(&invocation.stats);
        let (head, task) = match &function.pre {
            Pre::P2(pre) => {
                let (sender, receiver) = tokio::sync::oneshot::channel();
                let setup = (|| {
                    let mut http = store.data_mut().http();
                    let req = http.new_incoming_request(Scheme::Http, request)?;
                    let out = http.new_response_outparam(sender)?;
                    anyhow::Ok((req, out))
                })();
                let (req, out) = match setup {
                    Ok(parts) => parts,
                    Err(error) => {
                        let error = ApiError::bad_request("bad_request", format!("{error:#}"));
                        return (Err(error), Outcome::GuestError);
                    }
                };
                let pre = pre.clone();
                let guest = ran(tokio::time::timeout(deadline, async move {
                    let proxy = instantiate(&stats, pre.instantiate_async(&mut store)).await?;
                    proxy
                        .wasi_http_incoming_handler()
                        .call_handle(&mut store, req, out)
                        .await
                }));
                let (head, task) = run_until_head(guest, receiver).await;
                let head = head.map(|answer| answer.map_err(|code| format!("{code:?}")));
                (head, task)
            }
            Pre::P3(pre) => {
                let (sender, receiver) = tokio::sync::oneshot::channel();
                let pre = pre.clone();
                let guest = ran(tokio::time::timeout(deadline, async move {
                    let service = instantiate(&stats, pre.instantiate_async(&mut store)).await?;
                    let (req, io) = {
                        let hooks = store.data_mut().http().hooks;
                        wasmtime_wasi_http::p3::Request::from_http(hooks, request)
                    };
                    store
                        .run_concurrent(async move |accessor| {
                            match service.handle(accessor, req).await? {
                                Ok(response) => {
                                    let response = accessor
                                        .with(|mut store| response.into_http(&mut store, io))?;
                                    let _ = sender.send(Ok(response));
                                }
                                Err(code) => {
                                    let _ = sender.send(Err(code));
                                }
                            }
                            // A p3 guest may still be running after `handle`
                            // returned (a task it spawned writes the body):
                            // the instance is driven until its tasks are done.
                            std::future::poll_fn(|cx| accessor.poll_no_interesting_tasks(cx)).await;
                            wasmtime::Result::<()>::Ok(())
                        })
                        .await?
                }));
                let (head, task) = run_until_head(guest, receiver).await;
                let head = head.map(|answer| answer.map_err(|code| format!("{code:?}")));
                (head, task)
            }
        };
        if task.handed_off() {
            Handoff::Body.record(&invocation.stats);
        }
        settle(
            &function.name,
            request_id,
            deadline,
            started,
            head.ok(),
            task,
        )
        .await
    }
}

impl Runtime {
    /// A pool of reused instances of `function`, for invocations like
    /// `invocation`.
    pub fn pool(&self, function: &Deployed, invocation: &Invocation) -> Arc<Pool> {
        let pre = match &function.pre {
            Pre::P2(pre) => handler::ProxyPre::P2(pre.clone()),
            Pre::P3(pre) => handler::ProxyPre::P3(pre.clone()),
        };
        Pool::new(&self.engine, pre, invocation)
    }

    /// Runs one invocation of `name` in an instance of `pool`.
    pub async fn invoke_pooled<B>(
        &self,
        name: &FunctionName,
        pool: &Pool,
        request: hyper::Request<B>,
        stats: &InvocationStats,
        request_id: &str,
    ) -> (Result<Response<Body>, ApiError>, Outcome)
    where
        B: http_body::Body<Data = bytes::Bytes, Error = wasmtime_wasi_http::Error> + Send + 'static,
    {
        let started = Instant::now();
        let request = request.map(http_body_util::BodyExt::boxed_unsync);
        let (head, run) = pool.invoke(request, stats).await;
        let deadline = pool.policy.timeout;
        settle(name, request_id, deadline, started, head, run).await
    }
}

/// The outcome of a guest's run: its answer, or why there is none.
async fn settle(
    name: &FunctionName,
    request_id: &str,
    deadline: Duration,
    started: Instant,
    head: Option<Head>,
    run: Run,
) -> (Result<Response<Body>, ApiError>, Outcome) {
    match head {
        Some(Ok(response)) => answered(response),
        Some(Err(code)) => (
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "guest_error",
                format!("{name} answered with a wasi:http error: {code}"),
            )),
            Outcome::GuestError,
        ),
        // The guest dropped the response outparam: it returned without
        // answering, trapped, or ran out of time.
        None => match run.result().await {
            Ok(Ran::TimedOut) => (Err(timed_out(name, deadline, started)), Outcome::Timeout),
            Ok(Ran::Failed(error)) if pool_full(&error) => no_slot(name, &error),
            Ok(Ran::Failed(trap)) => trapped(name, request_id, &trap),
            Ok(Ran::Done) => (
                Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "no_response",
                    format!("{name} returned without setting a response"),
                )),
                Outcome::GuestError,
            ),
            Err(failure) => (
                Err(ApiError::internal(anyhow::anyhow!(
                    "running {name} failed in the host (contained; the host keeps serving): {failure}"
                ))),
                Outcome::Trap,
            ),
        },
    }
}

/// A guest's run under its deadline, as a `Ran`.
async fn ran<F>(guest: tokio::time::Timeout<F>) -> Ran
where
    F: Future<Output = wasmtime::Result<()>>,
{
    match guest.await {
        Ok(Ok(())) => Ran::Done,
        Ok(Err(error)) => Ran::Failed(error),
        Err(_elapsed) => Ran::TimedOut,
    }
}

/// The guest's own answer: `GuestError` for a 4xx or 5xx.
fn answered(response: Response<Body>) -> (Result<Response<Body>, ApiError>, Outcome) {
    let status = response.status();
    let outcome = if status.is_client_error() || status.is_server_error() {
        Outcome::GuestError
    } else {
        Outcome::Ok
    };
    (Ok(response), outcome)
}

/// `500`: the guest trapped. Logged with the whole chain; the client gets
/// the trap's own message.
fn trapped(
    name: &FunctionName,
    request_id: &str,
    trap: &wasmtime::Error,
) -> (Result<Response<Body>, ApiError>, Outcome) {
    tracing::warn!(function = %name, request_id, error = format!("{trap:#}"), "guest trapped");
    let error = ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "trap",
        format!("{name} trapped: {}", trap_summary(trap)),
    );
    (Err(error), Outcome::Trap)
}

/// Whether every instance slot of the pooling allocator was taken.
fn pool_full(error: &wasmtime::Error) -> bool {
    error
        .chain()
        .any(|cause| cause.is::<wasmtime::PoolConcurrencyLimitError>())
}

/// `503`: no instance slot was free. The host is full, not the guest at
/// fault.
fn no_slot(
    name: &FunctionName,
    error: &wasmtime::Error,
) -> (Result<Response<Body>, ApiError>, Outcome) {
    let busy = ApiError::busy(format!("no instance slot free for {name}: {error}"));
    (Err(busy), Outcome::Rejected)
}

/// `504`: the function did not answer within its deadline.
fn timed_out(name: &FunctionName, deadline: Duration, started: Instant) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "timeout",
        format!(
            "{name} did not answer within {deadline:?} (ran {:?})",
            started.elapsed()
        ),
    )
}

/// Instantiates a pre-instantiated component, recording how long it took.
async fn instantiate<T>(
    stats: &InvocationStats,
    instantiating: impl Future<Output = wasmtime::Result<T>>,
) -> wasmtime::Result<T> {
    let started = Instant::now();
    let instance = instantiating.await?;
    let nanos = started.elapsed().as_nanos();
    stats
        .instantiate_ns
        .store(u64::try_from(nanos).unwrap_or(u64::MAX), Ordering::Relaxed);
    Ok(instance)
}

impl Deployed {
    pub fn sha256(&self) -> &str {
        &self.version.sha256
    }

    /// What the caller keeps for this version: the `T` it attached, while
    /// `current` holds for it, else a new one made by `build`.
    pub fn attached<T: Any + Send + Sync>(
        &self,
        current: impl Fn(&T) -> bool,
        build: impl FnOnce() -> T,
    ) -> Arc<T> {
        let mut attached = self.attached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(kept) = attached
            .as_ref()
            .and_then(|kept| Arc::clone(kept).downcast::<T>().ok())
            .filter(|kept| current(kept))
        {
            return kept;
        }
        let fresh = Arc::new(build());
        *attached = Some(Arc::clone(&fresh) as Arc<dyn Any + Send + Sync>);
        fresh
    }
}

/// The trap's own message (the first line of the chain is wasmtime's
/// "error while executing at wasm backtrace: ..." which is noise to a client).
fn trap_summary(error: &wasmtime::Error) -> String {
    match error.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => trap.to_string(),
        None => error.root_cause().to_string(),
    }
}

fn engine_config(pooling: bool) -> Config {
    let mut config = Config::new();
    config.epoch_interruption(true);
    config.wasm_component_model(true);
    // WASIp3 components: async lifts and lowers, streams, futures.
    config.wasm_component_model_async(true);
    config.max_wasm_stack(MAX_WASM_STACK);
    if pooling {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(POOL_INSTANCES)
            .total_core_instances(POOL_INSTANCES * POOL_CORE_PER_COMPONENT)
            .total_memories(POOL_INSTANCES * POOL_CORE_PER_COMPONENT)
            .total_tables(POOL_INSTANCES * POOL_CORE_PER_COMPONENT)
            .total_stacks(POOL_INSTANCES)
            .max_memory_size(MAX_MEMORY as usize)
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(KEEP_RESIDENT)
            .pagemap_scan(Enabled::Auto);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    config
}

/// A stable name for the engine's compatibility hash (std's `DefaultHasher`
/// may change between Rust releases; SHA-256 does not).
fn engine_cache_key(engine: &Engine) -> String {
    struct ShaHasher(Sha256);
    impl std::hash::Hasher for ShaHasher {
        fn finish(&self) -> u64 {
            0
        }
        fn write(&mut self, bytes: &[u8]) {
            self.0.update(bytes);
        }
    }
    let mut hasher = ShaHasher(Sha256::new());
    std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut hasher);
    let digest = hasher.0.finalize();
    hex::encode(&digest[..12])
}

/// Advances the epoch every tick until the engine is dropped.
fn spawn_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    let spawned = std::thread::Builder::new()
        .name("lichen-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        });
    if let Err(error) = spawned {
        tracing::error!(%error, "cannot start the epoch ticker: deadlines will not interrupt guests");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> Runtime {
        Runtime::new(EngineSettings::default()).unwrap()
    }

    #[test]
    fn the_pooling_allocator_is_available_here() {
        // Not a requirement of the host (it falls back), but the tests and
        // benchmarks should exercise the configuration production uses.
        assert!(runtime().pooling());
    }

    #[test]
    fn core_modules_and_garbage_are_refused_with_reasons() {
        let rt = runtime();
        let core = wat::parse_str("(module)").unwrap();
        assert!(matches!(rt.compile(&core), Err(UploadError::CoreModule)));
        assert!(matches!(
            rt.compile(b"hello world"),
            Err(UploadError::NotWasm)
        ));
        assert!(matches!(
            rt.compile(b"(component)"),
            Err(UploadError::NotWasm)
        ));
        let mut broken = wat::parse_str("(component)").unwrap();
        broken.extend_from_slice(&[0xff, 0xff]);
        assert!(matches!(rt.compile(&broken), Err(UploadError::Invalid(_))));
    }

    #[test]
    fn a_component_without_the_http_export_is_refused() {
        let rt = runtime();
        let component = rt.compile(&wat::parse_str("(component)").unwrap()).unwrap();
        let name = FunctionName::new("empty").unwrap();
        let version = VersionInfo {
            version: 1,
            sha256: String::new(),
            size: 0,
            created_unix: 0,
            abi: Default::default(),
            oci: None,
        };
        assert!(matches!(
            rt.prepare(name, version, &component),
            Err(UploadError::NotHttpHandler(_))
        ));
    }

    #[test]
    fn the_cache_key_is_stable_for_one_engine_configuration() {
        assert_eq!(runtime().cache_key(), runtime().cache_key());
    }
}
