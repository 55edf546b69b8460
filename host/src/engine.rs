//! The wasmtime side: one `Engine` for the whole host, compiling uploads,
//! loading compiled code from the store's cache, and running one invocation
//! in a fresh `Store` and instance.
//!
//! Why it is built this way:
//! - The pooling allocator keeps instance slots, memories and stacks mapped
//!   ahead of time, so a fresh instance per request costs microseconds. It
//!   needs a lot of virtual address space; where the machine refuses it (a
//!   `ulimit -v`, say) the engine falls back to on-demand allocation and says so.
//! - Each function keeps a `ProxyPre` (an `InstancePre` with the wasi:http
//!   exports resolved), so an invocation is instantiate + call, nothing more.
//! - Deadlines use epoch interruption driven by one ticker thread: the guest
//!   yields to tokio at every tick, so a guest spinning in a loop shares its
//!   worker thread, and a tokio timeout around the whole invocation (guest code
//!   and host calls alike) ends it with a 504.
//! - The guest gets only what the invocation needs: no environment, no files,
//!   no sockets, no inherited stdio. Its stdout and stderr go to the host log,
//!   tagged with the function and the request id. Outbound HTTP is denied.
//! - Uploads are accepted only as WebAssembly binaries: never text (the `wat`
//!   feature is for tests), never precompiled code, which is only ever read
//!   back from the host's own cache.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use http::{Response, StatusCode};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWrite;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, StoreLimits,
    StoreLimitsBuilder,
};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use crate::error::{ApiError, Body};
use crate::names::FunctionName;
use crate::store::VersionInfo;

/// How often the epoch advances: the granularity of deadlines, and how long a
/// guest computing without host calls holds its worker thread at most.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Instances that can exist at once with the pooling allocator. Each slot
/// reserves address space, not memory.
const POOL_INSTANCES: u32 = 1000;

/// A component built by `wasm32-wasip2` toolchains has a few core instances
/// and memories (the program, its adapters); room for several per component.
const POOL_CORE_PER_COMPONENT: u32 = 4;

/// Linear memory pages kept resident between instances instead of handed back
/// to the kernel: resetting them with memset is cheaper than the page faults
/// and TLB shoot-downs of unmapping them.
const KEEP_RESIDENT: usize = 128 * 1024;

/// How the engine runs guests; limits apply to every invocation.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Largest linear memory of one instance, all memories together.
    pub memory_limit: usize,
    /// Wall-clock deadline of one invocation.
    pub timeout: Duration,
    /// Try the pooling allocator (falls back if the machine refuses it).
    pub pooling: bool,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            memory_limit: 128 << 20,
            timeout: Duration::from_secs(30),
            pooling: true,
        }
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
        "the component does not fit the wasi:http/proxy world (it must export wasi:http/incoming-handler and import only what that world provides): {0}"
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
    pre: ProxyPre<HostState>,
}

/// What happened to one invocation, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    GuestError,
    Trap,
    Timeout,
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
            match Engine::new(&engine_config(Some(&settings))) {
                Ok(engine) => (engine, true),
                Err(error) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "the pooling allocator is unavailable here; allocating instances on demand (slower)"
                    );
                    (Engine::new(&engine_config(None))?, false)
                }
            }
        } else {
            (Engine::new(&engine_config(None))?, false)
        };
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(anyhow::Error::from)
            .context("adding WASI to the linker")?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
            .map_err(anyhow::Error::from)
            .context("adding wasi:http to the linker")?;
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

    /// Resolves the component's imports and its wasi:http export.
    pub fn prepare(
        &self,
        name: FunctionName,
        version: VersionInfo,
        component: &Component,
    ) -> Result<Deployed, UploadError> {
        let instance_pre = self
            .linker
            .instantiate_pre(component)
            .map_err(|e| UploadError::NotHttpHandler(format!("{e:#}")))?;
        let pre = ProxyPre::new(instance_pre)
            .map_err(|e| UploadError::NotHttpHandler(format!("{e:#}")))?;
        Ok(Deployed { name, version, pre })
    }

    /// Runs one invocation of `function` in a fresh instance.
    ///
    /// `request` is what the guest sees: its path already relative to the
    /// function's mount.
    pub async fn invoke(
        &self,
        function: &Deployed,
        request: hyper::Request<hyper::body::Incoming>,
        request_id: &str,
    ) -> (Result<Response<Body>, ApiError>, Outcome) {
        let started = Instant::now();
        let deadline = self.settings.timeout;
        let mut store = Store::new(
            &self.engine,
            HostState::new(&function.name, request_id, self.settings.memory_limit),
        );
        store.limiter(|state| &mut state.limits);
        store.set_epoch_deadline(1);
        store.epoch_deadline_async_yield_and_update(1);

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

        let pre = function.pre.clone();
        // The guest may keep writing the body after it has sent the response
        // head, so it runs in a task of its own; the deadline covers all of it.
        let task = tokio::spawn(async move {
            tokio::time::timeout(deadline, async move {
                let proxy = pre.instantiate_async(&mut store).await?;
                proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut store, req, out)
                    .await
            })
            .await
        });

        match receiver.await {
            Ok(Ok(response)) => {
                let outcome =
                    if response.status().is_client_error() || response.status().is_server_error() {
                        Outcome::GuestError
                    } else {
                        Outcome::Ok
                    };
                (Ok(response.map(|body| body)), outcome)
            }
            Ok(Err(code)) => (
                Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "guest_error",
                    format!(
                        "{} answered with a wasi:http error: {code:?}",
                        function.name
                    ),
                )),
                Outcome::GuestError,
            ),
            // The guest dropped the response outparam: it returned without
            // answering, trapped, or ran out of time.
            Err(_) => match task.await {
                Ok(Err(_elapsed)) => (
                    Err(ApiError::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "timeout",
                        format!(
                            "{} did not answer within {:?} (ran {:?})",
                            function.name,
                            deadline,
                            started.elapsed()
                        ),
                    )),
                    Outcome::Timeout,
                ),
                Ok(Ok(Err(trap))) => {
                    tracing::warn!(
                        function = %function.name,
                        request_id,
                        error = format!("{trap:#}"),
                        "guest trapped"
                    );
                    (
                        Err(ApiError::new(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "trap",
                            format!("{} trapped: {}", function.name, trap_summary(&trap)),
                        )),
                        Outcome::Trap,
                    )
                }
                Ok(Ok(Ok(()))) => (
                    Err(ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "no_response",
                        format!("{} returned without setting a response", function.name),
                    )),
                    Outcome::GuestError,
                ),
                Err(join) => (
                    Err(ApiError::internal(anyhow::anyhow!(
                        "the invocation task of {} failed: {join}",
                        function.name
                    ))),
                    Outcome::Trap,
                ),
            },
        }
    }
}

impl Deployed {
    pub fn sha256(&self) -> &str {
        &self.version.sha256
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

fn engine_config(pooling: Option<&EngineSettings>) -> Config {
    let mut config = Config::new();
    config.epoch_interruption(true);
    config.wasm_component_model(true);
    if let Some(settings) = pooling {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(POOL_INSTANCES)
            .total_core_instances(POOL_INSTANCES * POOL_CORE_PER_COMPONENT)
            .total_memories(POOL_INSTANCES * POOL_CORE_PER_COMPONENT)
            .total_tables(POOL_INSTANCES * POOL_CORE_PER_COMPONENT)
            .total_stacks(POOL_INSTANCES)
            .max_memory_size(settings.memory_limit)
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(KEEP_RESIDENT);
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

/// What a `Store` holds for one invocation.
pub struct HostState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    limits: StoreLimits,
    hooks: DenyOutbound,
}

impl HostState {
    fn new(function: &FunctionName, request_id: &str, memory_limit: usize) -> Self {
        let output = |stream| GuestOutput {
            function: Arc::from(function.as_str()),
            request_id: Arc::from(request_id),
            stream,
        };
        let mut wasi = WasiCtx::builder();
        wasi.stdout(output("stdout")).stderr(output("stderr"));
        HostState {
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(memory_limit)
                .trap_on_grow_failure(false)
                .build(),
            hooks: DenyOutbound,
        }
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

impl WasiHttpView for HostState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// Outbound HTTP is denied until a policy grants hosts: the guest gets
/// `HTTP-request-denied` and no connection is made.
struct DenyOutbound;

impl WasiHttpHooks for DenyOutbound {
    fn send_request(
        &mut self,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
        _options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<
        dyn Future<
                Output = Result<
                    (
                        http::Response<wasmtime_wasi_http::WasiBody>,
                        Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
                    ),
                    wasmtime_wasi_http::Error,
                >,
            > + Send,
    > {
        tracing::info!(uri = %request.uri(), "outbound request denied");
        Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) })
    }
}

/// Longest line of guest output kept in one log record; the rest of a longer
/// line becomes further records.
const MAX_LOG_LINE: usize = 4096;

/// A guest's stdout or stderr: each line becomes a log record.
#[derive(Clone)]
struct GuestOutput {
    function: Arc<str>,
    request_id: Arc<str>,
    stream: &'static str,
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
        let line = String::from_utf8_lossy(line);
        tracing::info!(
            target: "lichen::guest",
            function = &*self.output.function,
            request_id = &*self.output.request_id,
            stream = self.output.stream,
            "{}",
            line.trim_end_matches('\r')
        );
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
        _cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.buffer.extend_from_slice(buf);
        self.emit_complete_lines();
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        _cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.emit_rest();
        Poll::Ready(Ok(()))
    }
}

impl Drop for LineLogger {
    fn drop(&mut self) {
        self.emit_rest();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> Runtime {
        Runtime::new(EngineSettings::default()).unwrap()
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
